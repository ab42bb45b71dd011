//! Operator client certificates: the other way, besides API tokens, for the
//! `slipway` CLI to authenticate (`slipway --cert op.pem --key op.key`).
//!
//! `slipway-controller operator create NAME --scope …` has the CA issue a
//! short-lived client certificate (`CN=op-…`, SAN `urn:slipway:operator:op-…`)
//! either for a key made on the spot (written next to it, mode 0600) or for
//! the key in a CSR the operator made elsewhere (`--csr`, so the key never
//! leaves their machine). What the certificate may do lives in the database
//! under its sha256, like an API token's scopes, so `operator revoke` takes
//! effect at the next call. Expiry is enforced by the TLS handshake.
//!
//! Node certificates are refused here (a node never gets API scopes), and
//! operator certificates are refused on the agent link (it only accepts
//! certificates recorded for a node).

use std::time::Duration;

use crate::audit::{self, AuditEvent};
use crate::auth::apitoken::{self, ApiTokenError, Caller, Scope};
use crate::pki::ca::{Ca, CaError};
use crate::pki::crypto::{self, CryptoError};
use crate::store::{OperatorRow, Store, StoreError};

/// Default lifetime of an operator certificate.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 60 * 60);

/// Errors from issuing, checking or revoking operator certificates.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// The name is not a usable label.
    #[error("invalid operator name {0:?}: use 1-64 letters, digits, '.', '_' or '-'")]
    Name(String),
    /// Bad `--scope`.
    #[error(transparent)]
    Scope(#[from] ApiTokenError),
    /// Issuing the certificate failed (bad CSR, ...).
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The presented certificate belongs to a node.
    #[error(
        "a node certificate cannot call the controller API; use an API token or an operator certificate"
    )]
    NodeCert,
    /// The presented certificate is not one the controller issued to an
    /// operator (or it was never recorded).
    #[error("unknown client certificate (sha256 {0}): not an operator certificate")]
    UnknownCert(String),
    /// The operator was revoked.
    #[error("operator certificate {0} was revoked")]
    Revoked(String),
    /// `operator revoke` named nobody.
    #[error("no operator {0:?} (slipway-controller operator list shows them)")]
    NotFound(String),
    /// `operator revoke` named a name several operators have.
    #[error("operator name {name:?} is ambiguous ({ids}); give the id")]
    Ambiguous {
        /// The name.
        name: String,
        /// The matching ids.
        ids: String,
    },
    /// Database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No randomness for the id.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl OperatorError {
    /// A bad name or `--scope`, or an id or name that names no single
    /// operator (exit 64).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::Name(_) | Self::Scope(_) | Self::NotFound(_) | Self::Ambiguous { .. }
        )
    }
}

/// A newly issued operator certificate.
#[derive(Debug)]
pub struct Issued {
    /// What was recorded.
    pub operator: OperatorRow,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The new private key, PEM (None when a CSR was given).
    pub key_pem: Option<String>,
}

/// Issues a certificate for operator `name` with `scopes`, records it and
/// audits OPERATOR_CREATED.
pub async fn create(
    store: &Store,
    ca: &Ca,
    name: &str,
    scopes: &[Scope],
    validity: Duration,
    csr_pem: Option<&str>,
    now: i64,
) -> Result<Issued, OperatorError> {
    if !apitoken::is_app_name(name) {
        return Err(OperatorError::Name(name.to_owned()));
    }
    if scopes.is_empty() {
        return Err(ApiTokenError::NoScope.into());
    }
    let id = format!("op-{}", crypto::random_hex::<8>()?);
    let (cert, key_pem) = ca.issue_operator(csr_pem, &id, validity)?;
    let scopes: Vec<String> = scopes.iter().map(ToString::to_string).collect();
    let operator = OperatorRow {
        id: id.clone(),
        name: name.to_owned(),
        cert_fingerprint: cert.fingerprint.clone(),
        scopes: scopes.clone(),
        created_at: now,
        expires_at: cert.not_after,
        revoked_at: None,
    };
    let event = AuditEvent::success(
        audit::OPERATOR_CREATED,
        "operator",
        "operator",
        &id,
        serde_json::json!({
            "name": name,
            "scopes": scopes,
            "expires_at": cert.not_after,
            "cert_sha256": cert.fingerprint,
            "key_made_by": if csr_pem.is_some() { "operator (csr)" } else { "controller" },
        }),
    );
    store.insert_operator(&operator, &event).await?;
    Ok(Issued {
        operator,
        cert_pem: cert.pem,
        key_pem,
    })
}

/// The caller behind a verified TLS client certificate (`leaf_der`, already
/// checked by the handshake to chain to our CA and be within its validity).
pub async fn authenticate(store: &Store, leaf_der: &[u8]) -> Result<Caller, OperatorError> {
    let fingerprint = crypto::sha256_hex(leaf_der);
    let Some(operator) = store.operator_by_fingerprint(&fingerprint).await? else {
        if store.peer_cert(&fingerprint).await?.is_some() {
            return Err(OperatorError::NodeCert);
        }
        return Err(OperatorError::UnknownCert(fingerprint));
    };
    if operator.revoked_at.is_some() {
        return Err(OperatorError::Revoked(operator.id));
    }
    let scopes = operator
        .scopes
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<Scope>, _>>()?;
    Ok(Caller {
        token_id: operator.id,
        scopes,
    })
}

/// Revokes the operator `id_or_name` and audits OPERATOR_REVOKED; returns
/// its id and whether it was newly revoked.
pub async fn revoke(
    store: &Store,
    id_or_name: &str,
    now: i64,
) -> Result<(String, bool), OperatorError> {
    let all = store.operators().await?;
    let by_id: Vec<&OperatorRow> = all.iter().filter(|o| o.id == id_or_name).collect();
    let matches: Vec<&OperatorRow> = if by_id.is_empty() {
        all.iter().filter(|o| o.name == id_or_name).collect()
    } else {
        by_id
    };
    let operator = match matches.as_slice() {
        [] => return Err(OperatorError::NotFound(id_or_name.to_owned())),
        [one] => *one,
        several => {
            // Only live ones matter when a name was reused after a revoke.
            let live: Vec<&&OperatorRow> =
                several.iter().filter(|o| o.revoked_at.is_none()).collect();
            match live.as_slice() {
                [one] => **one,
                _ => {
                    return Err(OperatorError::Ambiguous {
                        name: id_or_name.to_owned(),
                        ids: several
                            .iter()
                            .map(|o| o.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })
                }
            }
        }
    };
    let event = AuditEvent::success(
        audit::OPERATOR_REVOKED,
        "operator",
        "operator",
        &operator.id,
        serde_json::json!({ "name": operator.name }),
    );
    let newly = store.revoke_operator(&operator.id, &event, now).await?;
    Ok((operator.id.clone(), newly))
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::store::testing::store_tests!(
        issued_certificates_authenticate_until_revoked,
        a_csr_keeps_the_key_with_the_operator_and_bad_input_is_refused
    );

    async fn issued_certificates_authenticate_until_revoked(store: Store) {
        crypto::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let scopes = [Scope::Deploy("web".to_owned())];
        let issued = create(&store, &ca, "ci", &scopes, DEFAULT_VALIDITY, None, 10)
            .await
            .unwrap();
        assert!(issued.key_pem.is_some());
        let der = pem_der(&issued.cert_pem);
        let caller = authenticate(&store, &der).await.unwrap();
        assert_eq!(caller.token_id, issued.operator.id);
        assert!(caller.can_deploy("web") && !caller.can_deploy("api"));

        // A second one with the same name; revoking by name is ambiguous
        // while both are live.
        let second = create(
            &store,
            &ca,
            "ci",
            &[Scope::Read],
            DEFAULT_VALIDITY,
            None,
            11,
        )
        .await
        .unwrap();
        assert!(matches!(
            revoke(&store, "ci", 20).await,
            Err(OperatorError::Ambiguous { .. })
        ));
        let (id, newly) = revoke(&store, &issued.operator.id, 20).await.unwrap();
        assert!(newly && id == issued.operator.id);
        assert!(matches!(
            authenticate(&store, &der).await,
            Err(OperatorError::Revoked(_))
        ));
        // Now the name means the one live operator.
        assert_eq!(
            revoke(&store, "ci", 21).await.unwrap().0,
            second.operator.id
        );
        // Again by id: not an error, but nothing new. By name: both are
        // revoked now, so the name no longer picks one.
        assert!(matches!(
            revoke(&store, &second.operator.id, 22).await,
            Ok((_, false))
        ));
        assert!(matches!(
            revoke(&store, "ci", 22).await,
            Err(OperatorError::Ambiguous { .. })
        ));
        assert!(matches!(
            revoke(&store, "nobody", 22).await,
            Err(OperatorError::NotFound(_))
        ));
        let events = store.audit_events().await.unwrap();
        let count = |t: &str| events.iter().filter(|e| e.event_type == t).count();
        assert_eq!(count(audit::OPERATOR_CREATED), 2);
        assert_eq!(count(audit::OPERATOR_REVOKED), 2);
    }

    async fn a_csr_keeps_the_key_with_the_operator_and_bad_input_is_refused(store: Store) {
        crypto::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path()).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let csr = rcgen::CertificateParams::new(vec!["evil.example".to_owned()])
            .unwrap()
            .serialize_request(&key)
            .unwrap()
            .pem()
            .unwrap();
        let issued = create(
            &store,
            &ca,
            "laptop",
            &[Scope::Read],
            DEFAULT_VALIDITY,
            Some(&csr),
            5,
        )
        .await
        .unwrap();
        assert!(issued.key_pem.is_none());
        // The certificate carries the CSR's key but our names, not the CSR's.
        let der = pem_der(&issued.cert_pem);
        let raw = key.public_key_raw();
        assert!(der.windows(raw.len()).any(|w| w == raw));
        // Names are IA5/UTF8 strings, readable in the DER as they are.
        let text = String::from_utf8_lossy(&der);
        assert!(text.contains("urn:slipway:operator:op-"), "{text}");
        assert!(!text.contains("evil.example"), "{text}");

        assert!(matches!(
            create(
                &store,
                &ca,
                "a/b",
                &[Scope::Read],
                DEFAULT_VALIDITY,
                None,
                5
            )
            .await,
            Err(OperatorError::Name(_))
        ));
        assert!(matches!(
            create(&store, &ca, "x", &[], DEFAULT_VALIDITY, None, 5).await,
            Err(OperatorError::Scope(ApiTokenError::NoScope))
        ));
        assert!(matches!(
            create(
                &store,
                &ca,
                "x",
                &[Scope::Read],
                DEFAULT_VALIDITY,
                Some("junk"),
                5
            )
            .await,
            Err(OperatorError::Ca(CaError::Csr(_)))
        ));
        // An unknown certificate (the CA's own) is not an operator.
        assert!(matches!(
            authenticate(&store, &ca.cert_der()).await,
            Err(OperatorError::UnknownCert(_))
        ));
    }

    fn pem_der(pem: &str) -> Vec<u8> {
        use rustls::pki_types::pem::PemObject as _;
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .unwrap()
            .to_vec()
    }
}
