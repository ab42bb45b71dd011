-- GitHub (issue 13). Webhook deliveries already handled (a replayed
-- X-GitHub-Delivery is ignored), and the GitHub Deployment made for each
-- rollout of a linked app (so the one a new rollout replaces gets its
-- `inactive` status, also after a restart).

CREATE TABLE github_deliveries (
    -- X-GitHub-Delivery (checked: letters, digits, '-', at most 100).
    id           TEXT PRIMARY KEY,
    event        TEXT NOT NULL,
    received_at  INTEGER NOT NULL
);

CREATE INDEX github_deliveries_received ON github_deliveries (received_at);

CREATE TABLE github_deployments (
    -- The Slipway deployment (d-…).
    deployment_id  TEXT PRIMARY KEY,
    app            TEXT NOT NULL,
    repo           TEXT NOT NULL,
    environment    TEXT NOT NULL,
    -- GitHub's deployment id.
    github_id      INTEGER NOT NULL,
    sha            TEXT NOT NULL,
    -- The last state GitHub took: queued, in_progress, success, failure,
    -- error, inactive.
    state          TEXT NOT NULL,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);

CREATE INDEX github_deployments_env ON github_deployments (repo, environment, state);
