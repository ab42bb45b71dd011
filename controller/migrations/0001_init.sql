-- Schema version 1: enrollment (nodes, join tokens) and the audit log.
-- Timestamps are INTEGER seconds since the Unix epoch (UTC): SQLite has no
-- timestamp type and integers compare and index cheaply.

CREATE TABLE nodes (
    id               TEXT PRIMARY KEY,
    name             TEXT NOT NULL,
    -- Hex serial and sha256 (hex, of the DER) of the node's current client
    -- certificate; the fingerprint is how a TLS peer is mapped to a node.
    cert_serial      TEXT NOT NULL,
    cert_fingerprint TEXT NOT NULL UNIQUE,
    cert_expires_at  INTEGER NOT NULL,
    -- JSON object of label -> value (join-token tags and agent labels).
    labels           TEXT NOT NULL DEFAULT '{}',
    agent_version    TEXT NOT NULL DEFAULT '',
    enrolled_at      INTEGER NOT NULL,
    revoked_at       INTEGER,
    last_seen_at     INTEGER
);

CREATE TABLE join_tokens (
    id          TEXT PRIMARY KEY,
    -- sha256 (hex) of the 256-bit random secret; the secret itself is only
    -- ever printed once to the operator.
    secret_hash TEXT NOT NULL,
    -- JSON array of tags ("env:production") given to the enrolled node.
    tags        TEXT NOT NULL DEFAULT '[]',
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    used_at     INTEGER,
    -- The node that used the token, for the audit trail.
    used_by     TEXT
);

-- The seeds' AUDIT_EVENTS shape.
CREATE TABLE audit_events (
    id            TEXT PRIMARY KEY,
    created_at    INTEGER NOT NULL,
    event_type    TEXT NOT NULL,
    actor         TEXT NOT NULL,
    resource_type TEXT NOT NULL,
    resource_id   TEXT NOT NULL,
    details       TEXT NOT NULL DEFAULT '{}',
    -- 'success' or 'error' (the seeds' queries filter on status = 'error').
    status        TEXT NOT NULL,
    error_message TEXT
);

CREATE INDEX audit_events_created_at ON audit_events (created_at);
CREATE INDEX audit_events_event_type ON audit_events (event_type);
