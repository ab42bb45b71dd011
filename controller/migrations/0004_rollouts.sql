-- Schema version 4: rollout strategies (all at once, rolling, canary) and
-- one deployment per app at a time.

-- The rollout as run: JSON {"strategy", "max_parallel", "max_unavailable",
-- "canary"}; '{}' for deployments recorded before version 4 (all at once).
ALTER TABLE deployments ADD COLUMN rollout TEXT NOT NULL DEFAULT '{}';
-- Why the rollout stopped early ("deployment stopped after web-2 failed",
-- "controller restarted ..."); '' if every batch ran.
ALTER TABLE deployments ADD COLUMN stop_reason TEXT NOT NULL DEFAULT '';
-- Finds an app's running deployment (at most one) quickly.
CREATE INDEX deployments_running ON deployments (app) WHERE status = 'running';

-- outcome may now also be 'skipped' (never started: the rollout stopped),
-- and 'rolled_back' for a node the controller sent back when it stopped.
-- 1-based batch of the rollout the node is in (0 before version 4).
ALTER TABLE deployment_nodes ADD COLUMN batch INTEGER NOT NULL DEFAULT 0;
-- Release current on the node before the deployment ('' unknown): where
-- the controller sends it back if the rollout stops.
ALTER TABLE deployment_nodes ADD COLUMN prior_release TEXT NOT NULL DEFAULT '';
