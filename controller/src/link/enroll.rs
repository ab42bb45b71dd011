//! The Enrollment service: a join token plus a CSR become a node and its
//! first client certificate. Reachable without a client certificate.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use slipway_proto::join_token::JoinToken;
use slipway_proto::limits::{self, FieldError, Validate as _};
use slipway_proto::v1::enrollment_server::Enrollment;
use slipway_proto::v1::{EnrollRequest, EnrollResponse};
use tonic::{Request, Response, Status};

use crate::audit::{self, AuditEvent};
use crate::auth::token;
use crate::pki::ca::{Ca, CaError};
use crate::pki::crypto::{self, CryptoError};
use crate::store::{Enrolled, NewEnrollment, NewNode, Store, StoreError};

/// Why an enrollment was refused. The message goes to the agent and into
/// the audit log, so it names the problem but never the secret.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// The token text is not a join token.
    #[error(transparent)]
    Malformed(#[from] slipway_proto::join_token::ParseJoinTokenError),
    /// The token pins a different CA: it was made by another controller.
    #[error("join token {0} was issued by another controller (CA fingerprint mismatch)")]
    WrongController(String),
    /// No such token, or the secret does not match.
    #[error("join token {0} is unknown")]
    Unknown(String),
    /// The token was already used.
    #[error("join token {0} was already used")]
    Used(String),
    /// The token's TTL has passed.
    #[error("join token {0} has expired")]
    Expired(String),
    /// The token is bound to another node name (`droplets create`).
    #[error(
        "join token {token} is bound to node name {bound:?} (made by `droplets create` for \
         that droplet) and cannot enroll a node named {asked:?}"
    )]
    BoundToOtherName {
        /// The token id.
        token: String,
        /// The name it was made for.
        bound: String,
        /// The name asked for.
        asked: String,
    },
    /// A field breaks its rule or limit (the node name, labels, …).
    #[error(transparent)]
    Field(#[from] FieldError),
    /// A live node already has the name, and `--replace` was not given.
    #[error(
        "node name {name} is taken by node {existing} (enrolled {enrolled_at}); \
         enroll with --replace to take that node over (it keeps its id, tags and \
         history; its old certificates stop working), or choose another name"
    )]
    NameTaken {
        /// The name asked for.
        name: String,
        /// The live node that has it.
        existing: String,
        /// When that node enrolled (RFC 3339).
        enrolled_at: String,
    },
    /// `--replace`: the node of that name changed (revoked or replaced)
    /// during the enrollment.
    #[error("node {node} ({name}) was revoked or replaced meanwhile; enroll again")]
    Changed {
        /// The name asked for.
        name: String,
        /// The node that had it.
        node: String,
    },
    /// The CSR is unusable.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No randomness for the node id.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl From<EnrollError> for Status {
    fn from(err: EnrollError) -> Self {
        match err {
            EnrollError::Malformed(_)
            | EnrollError::Field(_)
            | EnrollError::Ca(CaError::Csr(_)) => Status::invalid_argument(err.to_string()),
            EnrollError::NameTaken { .. } => Status::already_exists(err.to_string()),
            EnrollError::Changed { .. } => Status::aborted(err.to_string()),
            EnrollError::WrongController(_)
            | EnrollError::Unknown(_)
            | EnrollError::Used(_)
            | EnrollError::Expired(_)
            | EnrollError::BoundToOtherName { .. } => Status::permission_denied(err.to_string()),
            // Internal details stay in the server log and the audit event.
            EnrollError::Ca(_) | EnrollError::Store(_) | EnrollError::Crypto(_) => {
                Status::internal("enrollment failed inside the controller; see its log")
            }
        }
    }
}

/// The Enrollment gRPC service.
#[derive(Debug, Clone)]
pub struct EnrollmentService {
    ca: Arc<Ca>,
    store: Store,
    /// Lifetime of issued node certificates.
    cert_validity: Duration,
}

impl EnrollmentService {
    /// A service issuing certificates valid for `cert_validity`.
    pub fn new(ca: Arc<Ca>, store: Store, cert_validity: Duration) -> Self {
        Self {
            ca,
            store,
            cert_validity,
        }
    }

    async fn try_enroll(
        &self,
        req: &EnrollRequest,
        now: i64,
    ) -> Result<EnrollResponse, EnrollError> {
        req.validate()?;
        let token: JoinToken = req.join_token.parse()?;
        if token.ca_sha256 != self.ca.fingerprint() {
            return Err(EnrollError::WrongController(token.id));
        }
        let name = req.node_name.as_str();
        // `--replace` keeps the node: the live node of that name is
        // re-keyed, so the certificate names its id. Who may do it: whoever
        // holds a valid join token (the same power that may add a node) and
        // names the node; a revoked node is never brought back this way.
        let replacing = if req.replace {
            self.store
                .find_node(name)
                .await?
                .into_iter()
                .find(|n| n.name == name && n.revoked_at.is_none())
        } else {
            None
        };
        let node_id = match &replacing {
            Some(node) => node.id.clone(),
            None => format!("n-{}", crypto::random_hex::<8>()?),
        };
        // Sign before touching the token, so a bad CSR does not burn it.
        let issued = self
            .ca
            .sign_node_csr(&req.csr_pem, &node_id, self.cert_validity)?;

        let row = self
            .store
            .join_token(&token.id)
            .await?
            .filter(|row| row.secret_hash == token::secret_hash(&token.secret))
            .ok_or_else(|| EnrollError::Unknown(token.id.clone()))?;
        if row.used_at.is_some() {
            return Err(EnrollError::Used(token.id));
        }
        if row.expires_at <= now {
            return Err(EnrollError::Expired(token.id));
        }
        // Refused before the token is used: the droplet it was made for can
        // still enroll with it.
        if let Some(bound) = row.node_name.filter(|bound| bound != name) {
            return Err(EnrollError::BoundToOtherName {
                token: token.id,
                bound,
                asked: name.to_owned(),
            });
        }
        let labels = node_labels(&req.labels, &row.tags);
        let event = AuditEvent::success(
            if replacing.is_some() {
                audit::NODE_REPLACED
            } else {
                audit::NODE_ENROLLED
            },
            &node_id,
            "node",
            &node_id,
            serde_json::json!({
                "name": name,
                "join_token": token.id,
                "cert_serial": issued.serial,
                "cert_expires_at": issued.not_after,
                "labels": labels,
                "agent_version": req.agent_version,
                "replaced": replacing.is_some(),
            }),
        );
        let enrolled = self
            .store
            .enroll_node(&NewEnrollment {
                token_id: &token.id,
                node: NewNode {
                    id: &node_id,
                    name,
                    cert_serial: &issued.serial,
                    cert_fingerprint: &issued.fingerprint,
                    cert_ca_sha256: &issued.issuer_sha256,
                    cert_expires_at: issued.not_after,
                    labels: &labels,
                    agent_version: &req.agent_version,
                    enrolled_at: now,
                },
                replace: replacing.as_ref().map(|n| n.id.as_str()),
                event: &event,
            })
            .await?;
        match enrolled {
            Enrolled::Node { .. } => {}
            // Lost a race with a concurrent enrollment using the same token.
            Enrolled::TokenSpent => return Err(EnrollError::Used(token.id)),
            Enrolled::Changed { expected } => {
                return Err(EnrollError::Changed {
                    name: name.to_owned(),
                    node: expected,
                })
            }
            Enrolled::NameTaken {
                existing,
                enrolled_at,
            } => {
                return Err(EnrollError::NameTaken {
                    name: name.to_owned(),
                    existing,
                    enrolled_at: crate::rfc3339(enrolled_at),
                })
            }
        }

        Ok(EnrollResponse {
            node_id,
            cert_pem: issued.pem,
            ca_pem: self.ca.cert_pem().to_owned(),
            expires_at_unix: issued.not_after,
        })
    }
}

/// The CLIENT_CERT_REFUSED event (and an error log line) for a handshake
/// refused because the client's certificate expired or comes from a CA no
/// longer trusted (a finished CA rotation): a node's names the node and
/// tells how to bring it back (`enroll --replace`, which keeps the node),
/// an operator's how to get a new one.
pub async fn refused_cert_event(
    store: &Store,
    peer: std::net::SocketAddr,
    refused: &crate::pki::tls::RefusedClientCert,
) -> AuditEvent {
    use crate::pki::tls::ClientCertProblem;
    let not_after = crate::rfc3339(refused.not_after);
    let what = match refused.problem {
        ClientCertProblem::Expired => format!(
            "certificate expired {} ago (not after {not_after})",
            slipway_proto::span(refused.refused_at - refused.not_after)
        ),
        ClientCertProblem::UntrustedIssuer => "certificate is not from a CA this controller \
             trusts (its CA was rotated out while it was away)"
            .to_owned(),
    };
    let subject = refused.subject.as_str();
    // The CA's word when verified; otherwise only what the peer claims,
    // and said so.
    let claimed = if refused.verified {
        ""
    } else {
        "a certificate claiming to be "
    };
    let node = match store.find_node(subject).await {
        Ok(rows) => rows.into_iter().find(|n| n.id == subject),
        Err(err) => {
            tracing::warn!(%err, "cannot look up the node of a refused certificate");
            None
        }
    };
    let (resource_type, message) = match &node {
        Some(node) if node.revoked_at.is_some() => (
            "node",
            format!(
                "{claimed}node {} ({}): {what}; the node is revoked: enroll it again as a new \
                 node",
                node.name, node.id
            ),
        ),
        Some(node) => (
            "node",
            format!(
                "{claimed}node {} ({}): {what}; re-enroll with `slipway-agent enroll --replace --name {} \
                 --token …` on the node (a new join token: slipway-controller token create); it \
                 keeps its name, tags and history",
                node.name, node.id, node.name
            ),
        ),
        None if subject.starts_with("op-") => (
            "operator",
            format!(
                "{claimed}operator {}: {what}: create a new one (slipway-controller operator \
                 create)",
                slipway_proto::limits::one_line(subject, slipway_proto::limits::MAX_NODE_NAME)
            ),
        ),
        None => ("connection", refused.to_string()),
    };
    tracing::error!(%peer, "{message}");
    let resource_id = if resource_type == "connection" {
        peer.to_string()
    } else {
        subject.to_owned()
    };
    AuditEvent::error(
        audit::CLIENT_CERT_REFUSED,
        peer.to_string(),
        resource_type,
        resource_id,
        serde_json::json!({
            "peer": peer.to_string(),
            "expired": refused.problem == ClientCertProblem::Expired,
            "untrusted_issuer": refused.problem == ClientCertProblem::UntrustedIssuer,
            "subject": subject,
            "not_after": not_after,
            "node_name": node.as_ref().map(|n| n.name.clone()),
        }),
        message,
    )
}

/// The node's labels: what the agent reported, overridden by the join
/// token's tags (the operator's word wins over the node's). A tag
/// `env:production` becomes label `env = production`; a bare tag `pf-core`
/// becomes `pf-core = ""`.
fn node_labels(
    reported: &std::collections::HashMap<String, String>,
    tags: &[String],
) -> serde_json::Value {
    let mut labels: BTreeMap<&str, &str> = reported
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    for tag in tags {
        let (key, value) = tag.split_once(':').unwrap_or((tag.as_str(), ""));
        labels.insert(key, value);
    }
    serde_json::json!(labels)
}

#[tonic::async_trait]
impl Enrollment for EnrollmentService {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        let peer = crate::peer_addr(&request);
        let req = request.into_inner();
        let now = crate::now_unix();
        match self.try_enroll(&req, now).await {
            Ok(response) => {
                tracing::info!(node_id = %response.node_id, name = ?req.node_name, %peer, "node enrolled");
                Ok(Response::new(response))
            }
            Err(err) => {
                tracing::warn!(%peer, name = %limits::shown(&req.node_name), %err, "enrollment refused");
                // Token id only (the part before the secret), never the secret.
                let token_id = req
                    .join_token
                    .parse::<JoinToken>()
                    .map(|t| t.id)
                    .unwrap_or_default();
                let event = AuditEvent::error(
                    audit::NODE_ENROLL_REFUSED,
                    &peer,
                    "join_token",
                    token_id,
                    serde_json::json!({ "peer": peer, "name": limits::truncate(&req.node_name, limits::MAX_NODE_NAME) }),
                    err.to_string(),
                );
                if let Err(audit_err) = self.store.audit(&event, now).await {
                    tracing::error!(%audit_err, "could not record audit event");
                }
                Err(err.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_tags_override_reported_labels() {
        let reported = [
            ("env".to_owned(), "staging".to_owned()),
            ("region".to_owned(), "fra1".to_owned()),
        ]
        .into_iter()
        .collect();
        let labels = node_labels(
            &reported,
            &["env:production".to_owned(), "pf-core".to_owned()],
        );
        assert_eq!(
            labels,
            serde_json::json!({"env": "production", "region": "fra1", "pf-core": ""})
        );
    }
}
