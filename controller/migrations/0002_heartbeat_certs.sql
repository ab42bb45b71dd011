-- Schema version 2: the latest heartbeat per node, every live certificate of
-- a node (certificate renewal), and what the running controller told agents
-- (so `slipway-controller nodes`, another process, judges liveness the same way).

-- Latest heartbeat (or Hello) per node; last_seen_at stays the liveness clock.
ALTER TABLE nodes ADD COLUMN heartbeat_at INTEGER;
-- Resident set size of the agent process, bytes (a leak shows fleet-wide).
ALTER TABLE nodes ADD COLUMN agent_rss_bytes INTEGER;
-- JSON object: NodeMetrics (cpu_percent, mem_*_bytes, load1/5/15, disks).
ALTER TABLE nodes ADD COLUMN metrics TEXT;
-- JSON array of AppStatus (app, current_release, health, in_progress, releases).
ALTER TABLE nodes ADD COLUMN apps TEXT NOT NULL DEFAULT '[]';
-- The heartbeat interval (seconds) the controller announced in the node's
-- last Welcome: silence is judged against what the node was told.
ALTER TABLE nodes ADD COLUMN heartbeat_interval_secs INTEGER;

-- Every certificate a node may still present. Renewal adds a row instead of
-- replacing one, so the old certificate keeps working until the agent has
-- switched (rows are dropped once expired). nodes.cert_fingerprint remains
-- the newest one.
CREATE TABLE node_certs (
    fingerprint TEXT PRIMARY KEY,
    node_id     TEXT NOT NULL REFERENCES nodes (id),
    serial      TEXT NOT NULL,
    issued_at   INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);
CREATE INDEX node_certs_node_id ON node_certs (node_id);
INSERT INTO node_certs (fingerprint, node_id, serial, issued_at, expires_at)
    SELECT cert_fingerprint, id, cert_serial, enrolled_at, cert_expires_at FROM nodes;

-- One row (id = 1) written by `serve` at start-up: when it started and how
-- many missed heartbeat intervals make a node unreachable. Read by the
-- `nodes` command for the restart grace period.
CREATE TABLE controller_state (
    id                  INTEGER PRIMARY KEY CHECK (id = 1),
    started_at          INTEGER NOT NULL,
    unreachable_after_intervals INTEGER NOT NULL
);
