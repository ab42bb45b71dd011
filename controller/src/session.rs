//! The AgentLink service: enrolled agents' sessions over mTLS.
//!
//! The node is identified by the certificate its TLS connection was verified
//! with (looked up by fingerprint in the store), never by message fields: a
//! Hello that names another node is refused.

use std::time::Duration;

use slipway_proto::v1::agent_link_server::AgentLink;
use slipway_proto::v1::{
    agent_message, controller_message, AgentMessage, ControllerMessage, RenewRequest,
    RenewResponse, Welcome,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::audit::{self, AuditEvent};
use crate::crypto;
use crate::store::{NodeRow, Store, StoreError};

/// Default heartbeat interval told to agents in the Welcome.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);
/// An agent must send its Hello this soon after opening the stream.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Controller messages queued per session before sends wait.
const OUTBOUND_QUEUE: usize = 16;

/// Why a session was refused; the text reaches the agent and the audit log.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The connection has no verified client certificate.
    #[error("a client certificate issued by this controller is required (enroll first)")]
    NoClientCert,
    /// The certificate chains to our CA but belongs to no node we know.
    #[error("client certificate {0} belongs to no enrolled node")]
    UnknownCert(String),
    /// The node was revoked.
    #[error("node {0} is revoked")]
    Revoked(String),
    /// The first message was not a Hello, or none came in time.
    #[error("expected Hello as the first message")]
    NoHello,
    /// The Hello names a different node than the certificate.
    #[error("certificate belongs to node {cert} but Hello claims node {claimed:?}")]
    IdentityMismatch {
        /// Node from the certificate.
        cert: String,
        /// Node named in the Hello.
        claimed: String,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<SessionError> for Status {
    fn from(err: SessionError) -> Self {
        match err {
            SessionError::NoClientCert | SessionError::UnknownCert(_) => {
                Status::unauthenticated(err.to_string())
            }
            SessionError::Revoked(_) | SessionError::IdentityMismatch { .. } => {
                Status::permission_denied(err.to_string())
            }
            SessionError::NoHello => Status::invalid_argument(err.to_string()),
            SessionError::Store(_) => {
                Status::internal("session failed inside the controller; see its log")
            }
        }
    }
}

/// The AgentLink gRPC service.
#[derive(Debug, Clone)]
pub struct AgentLinkService {
    store: Store,
    heartbeat_interval: Duration,
}

impl AgentLinkService {
    /// A service telling agents to heartbeat every `heartbeat_interval`.
    pub fn new(store: Store, heartbeat_interval: Duration) -> Self {
        Self {
            store,
            heartbeat_interval,
        }
    }

    /// The node whose verified certificate this request came with.
    async fn peer_node<T>(&self, request: &Request<T>) -> Result<NodeRow, SessionError> {
        let certs = request.peer_certs().ok_or(SessionError::NoClientCert)?;
        let leaf = certs.first().ok_or(SessionError::NoClientCert)?;
        let fingerprint = crypto::sha256_hex(leaf);
        let node = self
            .store
            .node_by_fingerprint(&fingerprint)
            .await?
            .ok_or(SessionError::UnknownCert(fingerprint))?;
        if node.revoked_at.is_some() {
            return Err(SessionError::Revoked(node.id));
        }
        Ok(node)
    }

    async fn open(
        &self,
        request: Request<Streaming<AgentMessage>>,
        actor: &mut String,
    ) -> Result<(NodeRow, Streaming<AgentMessage>), SessionError> {
        let node = self.peer_node(&request).await?;
        actor.clone_from(&node.id);
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await;
        let Ok(Ok(Some(AgentMessage {
            kind: Some(agent_message::Kind::Hello(hello)),
        }))) = first
        else {
            return Err(SessionError::NoHello);
        };
        if hello.node_id != node.id {
            return Err(SessionError::IdentityMismatch {
                cert: node.id,
                claimed: hello.node_id,
            });
        }
        Ok((node, inbound))
    }

    async fn refuse(&self, peer: &str, actor: &str, err: &SessionError) {
        tracing::warn!(%peer, %err, "agent session refused");
        let event = AuditEvent::error(
            audit::NODE_CONNECT_REFUSED,
            actor,
            "node",
            actor,
            serde_json::json!({ "peer": peer }),
            err.to_string(),
        );
        if let Err(audit_err) = self.store.audit(&event, crate::now_unix()).await {
            tracing::error!(%audit_err, "could not record audit event");
        }
    }
}

#[tonic::async_trait]
impl AgentLink for AgentLinkService {
    type ConnectStream = ReceiverStream<Result<ControllerMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        // Until the certificate names a node, the peer address is the actor.
        let mut actor = peer.clone();
        let (node, mut inbound) = match self.open(request, &mut actor).await {
            Ok(opened) => opened,
            Err(err) => {
                self.refuse(&peer, &actor, &err).await;
                return Err(err.into());
            }
        };
        let now = crate::now_unix();
        self.store
            .touch_node(&node.id, now)
            .await
            .map_err(SessionError::from)?;
        tracing::info!(node_id = %node.id, name = %node.name, %peer, "agent connected");

        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        let welcome = ControllerMessage {
            kind: Some(controller_message::Kind::Welcome(Welcome {
                node_id: node.id.clone(),
                heartbeat_interval_secs: u32::try_from(self.heartbeat_interval.as_secs())
                    .unwrap_or(u32::MAX),
                unix_time: now,
            })),
        };
        // The queue is empty, so this cannot fail for lack of room.
        let _ = tx.try_send(Ok(welcome));

        let store = self.store.clone();
        tokio::spawn(async move {
            // Holding `tx` here keeps the session open until the agent ends
            // it; commands will be sent through a registry of these senders.
            let _tx = tx;
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(agent_message::Kind::Heartbeat(_)) = message.kind {
                    if let Err(err) = store.touch_node(&node.id, crate::now_unix()).await {
                        tracing::warn!(node_id = %node.id, %err, "could not record heartbeat");
                    }
                }
            }
            tracing::info!(node_id = %node.id, "agent disconnected");
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn renew(
        &self,
        _request: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        Err(Status::unimplemented(
            "certificate renewal is not implemented yet",
        ))
    }
}
