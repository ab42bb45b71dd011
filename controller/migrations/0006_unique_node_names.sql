-- Schema version 6: a node name belongs to one live (non-revoked) node, so
-- `--node NAME` always means one machine. Live duplicates enrolled before
-- this rule keep their rows: all but the newest get their id appended to the
-- name (`web-1-n-0123…`), which the operator can then revoke or keep.
UPDATE nodes SET name = name || '-' || id
 WHERE revoked_at IS NULL
   AND EXISTS (SELECT 1 FROM nodes newer
                WHERE newer.name = nodes.name
                  AND newer.revoked_at IS NULL
                  AND (newer.enrolled_at > nodes.enrolled_at
                       OR (newer.enrolled_at = nodes.enrolled_at AND newer.id > nodes.id)));
CREATE UNIQUE INDEX nodes_live_name ON nodes (name) WHERE revoked_at IS NULL;
