-- A join token may be bound to one node name (the droplet `droplets create`
-- made it for): enrollment with it under any other name is refused.
-- NULL: an ordinary token, good for any name.
ALTER TABLE join_tokens ADD COLUMN node_name TEXT;
-- A node that enrolled with a bound token (a droplet `droplets create`
-- made) is sent each app's current release once it is online; set when
-- the controller took that on, so it happens once.
ALTER TABLE join_tokens ADD COLUMN current_deployed_at INTEGER;
-- The DigitalOcean snapshots taken before a deploy (snapshot_before_deploy),
-- as a JSON array of {"node_id", "node_name", "droplet_id", "action_id",
-- "status"}.
ALTER TABLE deployments ADD COLUMN snapshots TEXT NOT NULL DEFAULT '[]';
