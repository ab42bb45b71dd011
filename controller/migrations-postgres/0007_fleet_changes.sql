-- Schema version 7 (SQLite's 0019): every change of a `nodes` row is
-- stamped with the server's clock (microseconds since the epoch), so a
-- replica reads only the rows changed since its last read of the fleet
-- (`slipway status` at 10,000 nodes read them all on every call). Writers
-- run at once here, so a stamp is not a commit order: a reader asks again
-- for the rows stamped shortly before its previous read (see
-- store::fleet_cache), and reads everything now and then.
ALTER TABLE nodes ADD COLUMN changed BIGINT NOT NULL DEFAULT 0;

CREATE FUNCTION slipway_nodes_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.changed := (extract(epoch FROM clock_timestamp()) * 1000000)::bigint;
    RETURN NEW;
END
$$;

CREATE TRIGGER nodes_changed BEFORE INSERT OR UPDATE ON nodes
    FOR EACH ROW EXECUTE FUNCTION slipway_nodes_changed();
