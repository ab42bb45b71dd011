-- Schema version 9: the fleet environment (issue 20). Each app's
-- environment is a chain of immutable versions; a version's variables are
-- one AES-256-GCM sealed JSON object under the data key, which is itself
-- sealed by the key file (`secrets.key`, outside the database). Names are
-- kept in the clear (list, history, audit); values never are.

CREATE TABLE env_data_key (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    -- nonce || AES-256-GCM(data key) under the key file's key.
    sealed      BLOB NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE env_versions (
    app         TEXT NOT NULL,
    version     INTEGER NOT NULL CHECK (version >= 1),
    actor       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    -- "set", "unset", "import" or "rollback".
    change      TEXT NOT NULL,
    -- JSON arrays of the names this version set (or changed) and removed.
    set_keys    TEXT NOT NULL,
    unset_keys  TEXT NOT NULL,
    -- For a rollback: the version whose content it restored.
    rollback_to INTEGER,
    -- Variables after it.
    var_count   INTEGER NOT NULL,
    -- nonce || AES-256-GCM(JSON object name -> value) under the data key,
    -- with "<app>/<version>" as associated data (a row copied to another
    -- app or version does not open).
    sealed      BLOB NOT NULL,
    PRIMARY KEY (app, version)
);

-- The env version each deployment went live with: a deploy records the
-- app's env version current when it started, an env delivery its own;
-- NULL when the app had none (or for other kinds). `slipway releases`
-- shows it per release.
ALTER TABLE deployments ADD COLUMN env_version INTEGER;
