-- Schema version 3: API tokens for the `slipway` CLI, and deployments with
-- their per-node results.

CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY,
    -- sha256 (hex) of the 256-bit random secret; printed once, never stored.
    secret_hash TEXT NOT NULL,
    -- JSON array of scopes: "read", "deploy:<app>".
    scopes      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    revoked_at  INTEGER
);

-- One deploy or rollback of an app to a set of nodes.
CREATE TABLE deployments (
    id          TEXT PRIMARY KEY,
    -- 'deploy' or 'rollback'.
    kind        TEXT NOT NULL,
    app         TEXT NOT NULL,
    -- Release deployed, or rolled back to ('' = each node's previous).
    release_id  TEXT NOT NULL,
    artifact_sha256 TEXT NOT NULL DEFAULT '',
    -- The API token id that asked for it.
    actor       TEXT NOT NULL,
    -- JSON of the selector as given.
    selector    TEXT NOT NULL DEFAULT '{}',
    -- 'running', 'succeeded', 'failed'.
    status      TEXT NOT NULL,
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    message     TEXT NOT NULL DEFAULT ''
);
CREATE INDEX deployments_app ON deployments (app, started_at);

-- One row per node a deployment targets.
CREATE TABLE deployment_nodes (
    deployment_id TEXT NOT NULL REFERENCES deployments (id),
    node_id       TEXT NOT NULL,
    -- The id of the command sent to the node (unique per node).
    command_id    TEXT NOT NULL UNIQUE,
    -- 'pending', 'succeeded', 'failed', 'rolled_back'.
    outcome       TEXT NOT NULL,
    release_id    TEXT NOT NULL DEFAULT '',
    message       TEXT NOT NULL DEFAULT '',
    finished_at   INTEGER,
    PRIMARY KEY (deployment_id, node_id)
);
