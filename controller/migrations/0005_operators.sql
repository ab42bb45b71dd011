-- Schema version 5: operator client certificates, the other way (besides
-- API tokens) for the `slipway` CLI to authenticate. The certificate is
-- issued by the controller's CA; what it may do is stored here, keyed by
-- the certificate's sha256, so it can be revoked.

CREATE TABLE operators (
    -- op-<16 hex>; also the certificate's common name.
    id               TEXT PRIMARY KEY,
    -- Label given at creation (who holds it), e.g. "ci-github".
    name             TEXT NOT NULL,
    -- sha256 (hex) of the certificate's DER.
    cert_fingerprint TEXT NOT NULL UNIQUE,
    -- JSON array of scopes: "read", "deploy:<app>".
    scopes           TEXT NOT NULL,
    created_at       INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    revoked_at       INTEGER
);
