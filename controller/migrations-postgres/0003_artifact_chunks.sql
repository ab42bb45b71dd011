-- Schema version 3 (SQLite's 0015): artifacts kept in the database, for
-- replicas that share no directory (used unless `artifact_dir` is set).
-- Content-addressed: `kind` is the store (`artifacts` for apps,
-- `agent-binaries` for upgrades), `sha256` the digest of the whole
-- artifact, `idx` the chunk's place in it.
CREATE TABLE artifact_chunks (
    kind   TEXT   NOT NULL,
    sha256 TEXT   NOT NULL,
    idx    BIGINT NOT NULL,
    data   BYTEA  NOT NULL,
    PRIMARY KEY (kind, sha256, idx)
);

-- One row per complete artifact, written in one transaction after all its
-- chunks: an artifact without a row is never read.
CREATE TABLE stored_artifacts (
    kind       TEXT   NOT NULL,
    sha256     TEXT   NOT NULL,
    size       BIGINT NOT NULL,
    chunks     BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (kind, sha256)
);
