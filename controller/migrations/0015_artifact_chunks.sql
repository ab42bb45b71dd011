-- Schema version 15: artifacts kept in the database itself, for
-- controller replicas that share no directory (with PostgreSQL this is
-- where they go unless `artifact_dir` is set; SQLite has the same tables
-- so both engines run one copy of the queries and of their tests).
-- Content-addressed: `kind` is the store (`artifacts` for apps,
-- `agent-binaries` for upgrades, never served as one another), `sha256`
-- the digest of the whole artifact, `idx` the chunk's place in it.
CREATE TABLE artifact_chunks (
    kind   TEXT    NOT NULL,
    sha256 TEXT    NOT NULL,
    idx    INTEGER NOT NULL,
    data   BLOB    NOT NULL,
    PRIMARY KEY (kind, sha256, idx)
);

-- One row per complete artifact, written in one transaction after all its
-- chunks: an artifact without a row is an upload in progress (or cut
-- short) and is never read.
CREATE TABLE stored_artifacts (
    kind       TEXT    NOT NULL,
    sha256     TEXT    NOT NULL,
    size       INTEGER NOT NULL,
    chunks     INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (kind, sha256)
);
