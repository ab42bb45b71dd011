-- Schema version 5 (SQLite's 0017): commands routed between controller replicas. A
-- replica that must send a command to a node whose agent session another
-- live replica holds queues it here, addressed to that replica
-- (`target_replica`); the holder claims it (`picked_at`), sends it on the
-- session and writes the agent's Progress and CommandResult for it back
-- as `node_command_events` (in `seq` order), which the sender reads and
-- deletes. `message` and `payload` are protobuf bytes (ControllerMessage;
-- Progress or CommandResult). The sender deletes a command's rows once it
-- no longer waits on it; rows older than an hour go whoever wrote them.
CREATE TABLE node_commands (
    id TEXT PRIMARY KEY,
    command_id TEXT NOT NULL,
    node_id TEXT NOT NULL,
    sender_replica TEXT NOT NULL,
    target_replica TEXT NOT NULL,
    message BYTEA NOT NULL,
    created_at BIGINT NOT NULL,
    picked_at BIGINT
);
CREATE INDEX node_commands_target ON node_commands (target_replica, picked_at);
CREATE INDEX node_commands_sender ON node_commands (sender_replica);
CREATE TABLE node_command_events (
    command_row TEXT NOT NULL,
    seq BIGINT NOT NULL,
    kind TEXT NOT NULL,
    payload BYTEA NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (command_row, seq)
);
