-- Schema version 7 (issue 14): the DigitalOcean droplets of the fleet's
-- tags as the last `droplets sync` saw them, and the droplet id each agent
-- read from its metadata service (how a node is matched to its droplet:
-- never by name).
ALTER TABLE nodes ADD COLUMN droplet_id INTEGER;
CREATE INDEX nodes_droplet ON nodes (droplet_id) WHERE droplet_id IS NOT NULL;
CREATE TABLE droplets (
    -- DigitalOcean's droplet id.
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL,
    region        TEXT NOT NULL,
    size          TEXT NOT NULL,
    public_ipv4   TEXT,
    private_ipv4  TEXT,
    -- JSON array of the droplet's tags (all of them, not only the fleet's).
    tags          TEXT NOT NULL DEFAULT '[]',
    status        TEXT NOT NULL,
    first_seen_at INTEGER NOT NULL,
    synced_at     INTEGER NOT NULL,
    -- Set when a sync no longer finds it under the fleet's tags (destroyed
    -- or untagged); cleared if it comes back.
    gone_at       INTEGER
);
