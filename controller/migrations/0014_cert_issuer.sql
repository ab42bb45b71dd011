-- Schema version 14: which CA signed each node certificate (sha256 hex of
-- the CA certificate's DER). A CA rotation's "nodes still on the old CA"
-- compared issue times with the rotation's start, in whole seconds, so a
-- certificate issued in the same second as the start was taken for a new
-- one. NULL for certificates recorded before this version: those are still
-- judged by their issue time.
ALTER TABLE node_certs ADD COLUMN ca_sha256 TEXT;
