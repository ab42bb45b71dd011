-- The steps each node reported during a deployment (fetch, verify, unpack,
-- activate, health, rollback, ...), as a JSON array of
-- {"step", "message", "unix_time"}: kept with the node's result, so a
-- finished deployment still shows them (they used to live in memory only).
ALTER TABLE deployment_nodes ADD COLUMN steps TEXT NOT NULL DEFAULT '[]';
