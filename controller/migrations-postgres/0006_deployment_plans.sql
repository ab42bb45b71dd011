-- Schema version 5 (SQLite's 0017): what a running deployment needs to be carried on by
-- another replica when the one running it dies: its whole plan (action,
-- targets, rollout, actor, selector) as JSON. NULL for deployments
-- recorded before this version (they cannot be taken over: failed). The
-- lease on a deployment is its `owner_replica` being alive; another
-- replica takes it over with a conditional UPDATE of `owner_replica`, and
-- every write of the owner is conditional on still owning it.
ALTER TABLE deployments ADD COLUMN plan TEXT;
