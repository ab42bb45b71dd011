-- A join token may be bound to one node name (the droplet `droplets create`
-- made it for): enrollment with it under any other name is refused.
-- NULL: an ordinary token, good for any name.
ALTER TABLE join_tokens ADD COLUMN node_name TEXT;
-- A node that enrolled with a bound token (a droplet `droplets create`
-- made) is sent each app's current release once it is online; set when
-- the controller took that on, so it happens once.
ALTER TABLE join_tokens ADD COLUMN current_deployed_at INTEGER;
