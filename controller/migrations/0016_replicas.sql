-- Schema version 16: controller replicas sharing this database. Each
-- `serve` registers itself under a random id and renews `seen_at` on a
-- short interval; one unseen for a few intervals is dead. `agent_sessions`
-- says which replica holds each node's agent session (the node's latest
-- session wins; `session_id` tells it apart from an older one of the same
-- replica). A deployment records the replica that runs it, so a starting
-- replica fails only those of dead replicas (NULL: started before this
-- version, by a controller that is gone).
CREATE TABLE replicas (
    id TEXT PRIMARY KEY,
    grpc_addr TEXT NOT NULL,
    http_addr TEXT,
    started_at BIGINT NOT NULL,
    seen_at BIGINT NOT NULL
);
CREATE TABLE agent_sessions (
    node_id TEXT PRIMARY KEY,
    replica_id TEXT NOT NULL,
    session_id BIGINT NOT NULL,
    opened_at BIGINT NOT NULL
);
ALTER TABLE deployments ADD COLUMN owner_replica TEXT;
