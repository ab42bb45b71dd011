-- Schema version 2 (SQLite's 0014): which CA signed each node certificate
-- (sha256 hex of the CA certificate's DER), so a CA rotation tells the
-- nodes still on the old CA by their signer, not by an issue time in whole
-- seconds. NULL for certificates recorded before: judged by issue time.
ALTER TABLE node_certs ADD COLUMN ca_sha256 TEXT;
