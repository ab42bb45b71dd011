-- Schema version 19: every change of a `nodes` row is numbered, so a
-- controller reads only the rows that changed since its last read of the
-- fleet (`slipway status` at 10,000 nodes read them all on every call).
-- One counter, bumped by the triggers below in the writing transaction:
-- SQLite has one writer at a time, so numbers are taken in commit order
-- and a reader sees every number up to some n and none above it.
CREATE TABLE fleet_changes (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
INSERT INTO fleet_changes (id, seq) VALUES (1, 0);
ALTER TABLE nodes ADD COLUMN changed INTEGER NOT NULL DEFAULT 0;

CREATE TRIGGER nodes_changed_insert AFTER INSERT ON nodes
BEGIN
    UPDATE fleet_changes SET seq = seq + 1 WHERE id = 1;
    UPDATE nodes SET changed = (SELECT seq FROM fleet_changes WHERE id = 1)
     WHERE rowid = NEW.rowid;
END;

-- Not for the trigger's own write of `changed` (which changes it).
CREATE TRIGGER nodes_changed_update AFTER UPDATE ON nodes
WHEN NEW.changed IS OLD.changed
BEGIN
    UPDATE fleet_changes SET seq = seq + 1 WHERE id = 1;
    UPDATE nodes SET changed = (SELECT seq FROM fleet_changes WHERE id = 1)
     WHERE rowid = NEW.rowid;
END;
