-- Schema version 7: browser sessions of the HTTP pages (issue 12). A
-- session is made by logging in with an API token and acts with that
-- token's scopes; it ends when it expires, at logout, or when the token is
-- revoked (revoking deletes them, and every lookup also checks the token).

CREATE TABLE web_sessions (
    -- sha256 (hex) of the cookie's 256-bit random value; the value itself
    -- is never stored, so a copy of the database opens no session.
    id_hash     TEXT PRIMARY KEY,
    token_id    TEXT NOT NULL REFERENCES api_tokens(id),
    -- The CSRF token every state-changing request of the session carries.
    csrf        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
);

CREATE INDEX web_sessions_token ON web_sessions (token_id);
CREATE INDEX web_sessions_expires ON web_sessions (expires_at);
