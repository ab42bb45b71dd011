//! The AgentLink service: enrolled agents' sessions and certificate renewal
//! over mTLS.
//!
//! The node is identified by the certificate its TLS connection was verified
//! with (looked up by fingerprint among the node's live certificates), never
//! by message fields: a Hello that names another node is refused.
//!
//! # Session contract
//!
//! 1. Agent sends Hello (its node id, version, apps). The controller answers
//!    Welcome: the heartbeat interval (see [`crate::link::liveness`]), its clock,
//!    and `renew_cert_after_unix`.
//! 2. Agent sends a Heartbeat every interval. Each is stored as the node's
//!    latest state (`nodes` columns) and refreshes `last_seen_at`.
//! 3. Commands (Deploy, Rollback, ...) are queued on the stream only after
//!    the Welcome. The agent's Progress and CommandResult are handed to the
//!    deployment that sent the command ([`crate::link::commands::Commands`]), and
//!    only if the command was sent to this node.
//! 4. The controller closes the stream with a status when the node is
//!    revoked (PERMISSION_DENIED), the node opened a newer session (ABORTED),
//!    or the controller shuts down (UNAVAILABLE). Revocation is noticed on
//!    the next heartbeat (its UPDATE skips revoked nodes) and by the server's
//!    poll of the database every [`crate::server::REVOCATION_POLL`],
//!    whichever comes first.
//!
//! # Renew contract
//!
//! `Renew(csr_pem)` over mTLS with a current certificate returns a new
//! certificate for the same node (validity [`crate::pki::ca::NODE_CERT_VALIDITY`]
//! by default). Both certificates work until each expires; the agent writes
//! the new one and uses it from its next connection, without dropping the
//! open session. Audited as CERT_RENEWED / CERT_RENEW_REFUSED.

use std::sync::Arc;
use std::time::Duration;

use slipway_proto::limits::{FieldError, Validate as _};
use slipway_proto::v1::agent_link_server::AgentLink;
use slipway_proto::v1::{
    agent_message, controller_message, AgentMessage, ArtifactChunk, ControllerMessage,
    FetchArtifactRequest, NodeEvent, NodeEventAck, NodeEventKind, RenewRequest, RenewResponse,
    Welcome,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::artifacts::{ArtifactError, Artifacts};
use crate::audit::{self, AuditEvent};
use crate::link::commands::Commands;
use crate::link::liveness::{self, HeartbeatPolicy};
use crate::link::registry::{CloseReason, SessionHandle, Sessions};
use crate::pki::ca::{Ca, CaError};
use crate::pki::crypto;
use crate::store::{PeerCert, Store, StoreError};

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
    /// The CSR of a renewal is unusable, or signing failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The requested artifact is unknown or unreadable.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// A field of the agent's message breaks its rule or limit.
    #[error(transparent)]
    Field(#[from] FieldError),
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
            SessionError::NoHello | SessionError::Ca(CaError::Csr(_)) | SessionError::Field(_) => {
                Status::invalid_argument(err.to_string())
            }
            // An agent tries again (an artifact fetch) while it says so.
            SessionError::Store(ref store) if store.is_unavailable() => {
                Status::unavailable(crate::store::DATABASE_UNAVAILABLE)
            }
            SessionError::Ca(_) | SessionError::Store(_) => {
                Status::internal("session failed inside the controller; see its log")
            }
            SessionError::Artifact(err) => err.into(),
        }
    }
}

/// The gRPC status that ends a session the controller closes.
fn close_status(node_id: &str, reason: CloseReason) -> Status {
    match reason {
        CloseReason::Revoked => Status::from(SessionError::Revoked(node_id.to_owned())),
        CloseReason::Replaced => Status::aborted(format!("node {node_id} opened a newer session")),
        CloseReason::Shutdown => Status::unavailable("controller is shutting down"),
    }
}

/// Settings of the AgentLink service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkSettings {
    /// How the announced heartbeat interval grows with the fleet.
    pub heartbeat: HeartbeatPolicy,
    /// Lifetime of certificates issued by Renew.
    pub cert_validity: Duration,
}

impl Default for LinkSettings {
    fn default() -> Self {
        Self {
            heartbeat: HeartbeatPolicy::default(),
            cert_validity: crate::pki::ca::NODE_CERT_VALIDITY,
        }
    }
}

/// The AgentLink gRPC service.
#[derive(Debug, Clone)]
pub struct AgentLinkService {
    ca: Arc<Ca>,
    store: Store,
    sessions: Sessions,
    settings: LinkSettings,
    /// Where FetchArtifact reads from.
    artifacts: Artifacts,
    /// Where agents' Progress and CommandResult go (by command id).
    commands: Commands,
    /// Called with each accepted Hello (after the session is live): the
    /// controller's env catch-up for nodes whose apps' env lags.
    on_hello: Option<OnHello>,
}

/// What a new session is told to whoever wants to know: the node id and
/// its apps with the env version each reported.
#[derive(Clone)]
pub struct OnHello(pub Arc<HelloHook>);

/// The function behind [`OnHello`].
pub type HelloHook = dyn Fn(String, Vec<(String, u64)>) + Send + Sync;

impl std::fmt::Debug for OnHello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnHello")
    }
}

impl AgentLinkService {
    /// Calls `hook` with every accepted session's node id and its apps' env
    /// versions.
    #[must_use]
    pub fn on_hello(mut self, hook: OnHello) -> Self {
        self.on_hello = Some(hook);
        self
    }

    /// A service registering live sessions in `sessions` and serving
    /// artifacts from `artifacts`.
    pub fn new(
        ca: Arc<Ca>,
        store: Store,
        sessions: Sessions,
        settings: LinkSettings,
        artifacts: Artifacts,
        commands: Commands,
    ) -> Self {
        Self {
            ca,
            store,
            sessions,
            settings,
            artifacts,
            commands,
            on_hello: None,
        }
    }

    /// The node (and certificate) this request's verified TLS client
    /// certificate belongs to; refused if unknown or revoked.
    async fn peer<T>(&self, request: &Request<T>) -> Result<PeerCert, SessionError> {
        let certs = request.peer_certs().ok_or(SessionError::NoClientCert)?;
        let leaf = certs.first().ok_or(SessionError::NoClientCert)?;
        let fingerprint = crypto::sha256_hex(leaf);
        let peer = self
            .store
            .peer_cert(&fingerprint)
            .await?
            .ok_or(SessionError::UnknownCert(fingerprint))?;
        if peer.node.revoked_at.is_some() {
            return Err(SessionError::Revoked(peer.node.id));
        }
        Ok(peer)
    }

    async fn open(
        &self,
        request: Request<Streaming<AgentMessage>>,
        actor: &mut String,
    ) -> Result<(PeerCert, slipway_proto::v1::Hello, Streaming<AgentMessage>), SessionError> {
        let peer = self.peer(&request).await?;
        actor.clone_from(&peer.node.id);
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message()).await;
        let Ok(Ok(Some(AgentMessage {
            kind: Some(agent_message::Kind::Hello(hello)),
        }))) = first
        else {
            return Err(SessionError::NoHello);
        };
        hello.validate().map_err(|e| e.within("hello"))?;
        if hello.node_id != peer.node.id {
            return Err(SessionError::IdentityMismatch {
                cert: peer.node.id,
                claimed: hello.node_id,
            });
        }
        Ok((peer, hello, inbound))
    }

    /// Registers the session and records it; returns the Welcome.
    async fn accept(
        &self,
        peer: &PeerCert,
        hello: &slipway_proto::v1::Hello,
    ) -> Result<(SessionHandle, Welcome), SessionError> {
        let node_id = &peer.node.id;
        // Registered first, so the interval counts this node and a revoke
        // racing with this accept is seen by either the UPDATE or the poll.
        let handle = self.sessions.register(node_id);
        let interval = liveness::heartbeat_interval(self.sessions.len(), &self.settings.heartbeat);
        let now = crate::now_unix();
        let recorded = self
            .store
            .record_session(
                node_id,
                now,
                &hello.agent_version,
                &hello.apps,
                interval.as_secs(),
            )
            .await?;
        if !recorded {
            return Err(SessionError::Revoked(node_id.clone()));
        }
        // Other replicas learn from the store that this one holds it.
        self.sessions
            .record_open(node_id, handle.session_id())
            .await?;
        record_droplet_claim(&self.store, node_id, hello.droplet_id, now).await?;
        let welcome = Welcome {
            node_id: node_id.clone(),
            heartbeat_interval_secs: u32::try_from(interval.as_secs()).unwrap_or(u32::MAX),
            unix_time: now,
            renew_cert_after_unix: renew_after(peer.issued_at, peer.expires_at),
        };
        Ok((handle, welcome))
    }

    async fn refuse(&self, event_type: &'static str, peer: &str, actor: &str, err: &SessionError) {
        let unavailable = match err {
            SessionError::Store(store) | SessionError::Artifact(ArtifactError::Store(store)) => {
                store.is_unavailable()
            }
            _ => false,
        };
        if unavailable {
            // Not the agent's doing, and nothing to audit it in: the agent
            // is told to try again.
            tracing::warn!(%peer, %err, event_type, "agent request not served: the database does not answer");
            return;
        }
        tracing::warn!(%peer, %err, event_type, "agent request refused");
        let event = AuditEvent::error(
            event_type,
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

    async fn try_renew(
        &self,
        request: Request<RenewRequest>,
        actor: &mut String,
    ) -> Result<RenewResponse, SessionError> {
        let peer = self.peer(&request).await?;
        let node = peer.node;
        actor.clone_from(&node.id);
        let req = request.into_inner();
        req.validate()?;
        let issued = self
            .ca
            .sign_node_csr(&req.csr_pem, &node.id, self.settings.cert_validity)?;
        let now = crate::now_unix();
        let event = AuditEvent::success(
            audit::CERT_RENEWED,
            &node.id,
            "node",
            &node.id,
            serde_json::json!({
                "old_expires_at": peer.expires_at,
                "cert_serial": issued.serial,
                "cert_fingerprint": issued.fingerprint,
                "cert_expires_at": issued.not_after,
            }),
        );
        let renewed = self
            .store
            .renew_node_cert(
                &node.id,
                &crate::store::NewCert {
                    fingerprint: &issued.fingerprint,
                    serial: &issued.serial,
                    expires_at: issued.not_after,
                    ca_sha256: &issued.issuer_sha256,
                },
                &event,
                now,
            )
            .await?;
        if !renewed {
            // Revoked between the check and now; nothing was recorded.
            return Err(SessionError::Revoked(node.id));
        }
        tracing::info!(node_id = %node.id, expires_at = issued.not_after, "certificate renewed");
        Ok(RenewResponse {
            cert_pem: issued.pem,
            expires_at_unix: issued.not_after,
        })
    }
}

/// When an agent should renew a certificate valid from `issued_at` to
/// `expires_at`: two thirds into its life.
pub fn renew_after(issued_at: i64, expires_at: i64) -> i64 {
    issued_at + (expires_at - issued_at).max(0) * 2 / 3
}

/// Reads the agent's messages until it ends the stream or the controller
/// closes the session; stores every heartbeat and routes progress and
/// results to the deployment that sent the command.
///
/// A heartbeat is written beside the loop, one at a time: while the
/// database does not answer, each write waits for a connection (seconds),
/// and progress behind it must not wait as well (a rollout carries on with
/// it in memory). A heartbeat that comes while the last one is still being
/// written waits its turn (a newer one replaces it). A command's result
/// waits (at most [`RESULT_WAITS_FOR_HEARTBEAT`]) for the heartbeats sent
/// before it to be stored: `status --refresh` counts on the store holding
/// the heartbeat the agent sent with its answer.
async fn run_session(
    store: Store,
    commands: Commands,
    sessions: Sessions,
    node_id: String,
    handle: SessionHandle,
    mut inbound: Streaming<AgentMessage>,
    tx: mpsc::Sender<Result<ControllerMessage, Status>>,
) {
    // The heartbeats being written and waiting (see above).
    let mut beats = Heartbeats {
        store: store.clone(),
        node_id: node_id.clone(),
        writing: None,
        next: None,
    };
    let closed_by = loop {
        let message = tokio::select! {
            reason = handle.closed() => break Some(reason),
            written = heartbeat_written(&mut beats.writing) => {
                if beats.written(written) {
                    break Some(CloseReason::Revoked);
                }
                continue;
            }
            message = inbound.message() => message,
        };
        // Every field is checked before anything stores or routes it; an
        // agent that breaks a limit has its session ended, naming the field.
        if let Ok(Some(message)) = &message {
            if let Err(err) = message.validate() {
                refuse_message(&store, &node_id, &err).await;
                let _ = tx.try_send(Err(Status::invalid_argument(format!(
                    "message refused: {err}"
                ))));
                break None;
            }
        }
        match message {
            Ok(Some(AgentMessage {
                kind: Some(agent_message::Kind::Heartbeat(heartbeat)),
            })) => beats.add(heartbeat),
            Ok(Some(AgentMessage {
                kind: Some(agent_message::Kind::Progress(progress)),
            })) => commands.progress(&node_id, progress),
            Ok(Some(AgentMessage {
                kind: Some(agent_message::Kind::Result(result)),
            })) => {
                if beats.settle(RESULT_WAITS_FOR_HEARTBEAT).await {
                    break Some(CloseReason::Revoked);
                }
                commands.result(&node_id, result);
            }
            Ok(Some(AgentMessage {
                kind: Some(agent_message::Kind::NodeEvent(event)),
            })) => {
                // Acknowledged only once stored, so the agent keeps it
                // until then; a resend is recorded once (audit_once).
                if record_node_event(&store, &node_id, &event).await {
                    let ack = ControllerMessage {
                        kind: Some(controller_message::Kind::NodeEventAck(NodeEventAck {
                            event_ids: vec![event.event_id],
                        })),
                    };
                    if tx.send(Ok(ack)).await.is_err() {
                        break None;
                    }
                }
            }
            // A second Hello or an empty frame: nothing to do.
            Ok(Some(_)) => {}
            Ok(None) => break None,
            Err(status) => {
                tracing::debug!(%node_id, %status, "agent stream failed");
                break None;
            }
        }
    };
    match closed_by {
        Some(reason) => {
            tracing::info!(%node_id, ?reason, "controller closed the agent session");
            // A full queue means the agent is not reading; dropping `tx`
            // ends the stream anyway.
            let _ = tx.try_send(Err(close_status(&node_id, reason)));
        }
        None => tracing::info!(%node_id, "agent disconnected"),
    }
    // A heartbeat still being written finishes on its own.
    drop(beats);
    let session_id = handle.session_id();
    drop(handle);
    sessions.record_closed(&node_id, session_id).await;
    // A node that already opened a newer session (this one was replaced)
    // has its commands again there; only a node now without a session
    // starts the deployments' reconnect grace.
    if !sessions.contains(&node_id) {
        commands.disconnected(&node_id);
    }
}

/// A heartbeat being written: whether the node is still enrolled.
type HeartbeatWrite = tokio::task::JoinHandle<Result<bool, crate::store::StoreError>>;

/// How long a command's result waits for the heartbeats before it to be
/// stored (a database that answers takes milliseconds; one that does not
/// must not hold a rollout's results for long).
const RESULT_WAITS_FOR_HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(2);

/// One session's heartbeats on their way to the store: at most one being
/// written and the newest one waiting.
struct Heartbeats {
    store: Store,
    node_id: String,
    writing: Option<HeartbeatWrite>,
    next: Option<slipway_proto::v1::Heartbeat>,
}

impl Heartbeats {
    /// Writes `heartbeat` now, or after the one being written.
    fn add(&mut self, heartbeat: slipway_proto::v1::Heartbeat) {
        if self.writing.is_some() {
            self.next = Some(heartbeat);
        } else {
            self.start(heartbeat);
        }
    }

    fn start(&mut self, heartbeat: slipway_proto::v1::Heartbeat) {
        let (store, node_id) = (self.store.clone(), self.node_id.clone());
        self.writing = Some(tokio::spawn(async move {
            store
                .record_heartbeat(&node_id, crate::now_unix(), &heartbeat)
                .await
        }));
    }

    /// The write under way ended with `written`; starts the waiting one.
    /// True if the node turned out revoked.
    fn written(
        &mut self,
        written: Result<Result<bool, crate::store::StoreError>, tokio::task::JoinError>,
    ) -> bool {
        self.writing = None;
        let node_id = &self.node_id;
        match written {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return true,
            Ok(Err(err)) => tracing::warn!(%node_id, %err, "could not record heartbeat"),
            Err(err) => tracing::error!(%node_id, %err, "heartbeat write failed"),
        }
        if let Some(next) = self.next.take() {
            self.start(next);
        }
        false
    }

    /// Waits (at most `limit`) until every heartbeat received so far is
    /// written. True if the node turned out revoked.
    async fn settle(&mut self, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while self.writing.is_some() {
            let written =
                tokio::time::timeout_at(deadline, heartbeat_written(&mut self.writing)).await;
            match written {
                Ok(written) => {
                    if self.written(written) {
                        return true;
                    }
                }
                Err(_) => {
                    tracing::warn!(node_id = %self.node_id, "a result goes on before the heartbeat before it is stored (the database is slow to answer)");
                    return false;
                }
            }
        }
        false
    }
}

/// The outcome of the heartbeat being written; never, when none is.
async fn heartbeat_written(
    writing: &mut Option<HeartbeatWrite>,
) -> Result<Result<bool, crate::store::StoreError>, tokio::task::JoinError> {
    match writing {
        Some(write) => write.await,
        None => std::future::pending().await,
    }
}

/// Records a node event in the audit log (once per node and event id):
/// a repair as `APP_RESTORED`, a crash loop as `APP_CRASHLOOPING`, an
/// automatic rollback like a rollback (`ROLLBACK_COMPLETED` /
/// `ROLLBACK_FAILED`, with `automatic: true`). Returns whether it is stored
/// (new or already), i.e. may be acknowledged.
async fn record_node_event(store: &Store, node_id: &str, e: &NodeEvent) -> bool {
    let kind = NodeEventKind::try_from(e.kind).unwrap_or(NodeEventKind::Unspecified);
    let event_type = match (kind, e.ok) {
        (NodeEventKind::AppRestored, _) => audit::APP_RESTORED,
        (NodeEventKind::AppCrashlooping, _) => audit::APP_CRASHLOOPING,
        (NodeEventKind::AppRolledBack, true) => audit::ROLLBACK_COMPLETED,
        (NodeEventKind::AppRolledBack, false) => audit::ROLLBACK_FAILED,
        (NodeEventKind::LocalDeploy, _) => audit::NODE_LOCAL_DEPLOY,
        (NodeEventKind::LocalRollback, _) => audit::NODE_LOCAL_ROLLBACK,
        // Validation refused it already.
        (NodeEventKind::Unspecified, _) => return false,
    };
    let node_name = store
        .find_node(node_id)
        .await
        .ok()
        .and_then(|rows| rows.into_iter().find(|n| n.id == node_id))
        .map(|n| n.name)
        .unwrap_or_default();
    let details = serde_json::json!({
        "node": node_id,
        "node_name": node_name,
        "event_id": e.event_id,
        "release_id": e.release_id,
        "from_release_id": e.from_release_id,
        "cause": e.cause,
        "outcome": e.outcome,
        "automatic": true,
        "agent_unix_time": e.unix_time,
    });
    // A node-local command names the node and who ran it there; the
    // agent's own repairs name the node.
    let local = matches!(
        kind,
        NodeEventKind::LocalDeploy | NodeEventKind::LocalRollback
    );
    let mut details = details;
    if local {
        details["automatic"] = serde_json::json!(false);
        details["local_user"] = serde_json::json!(e.actor);
    }
    let actor = if local {
        let node = if node_name.is_empty() {
            node_id
        } else {
            &node_name
        };
        format!("{node}:{}", e.actor)
    } else {
        node_id.to_owned()
    };
    let event = if e.ok {
        AuditEvent::success(event_type, &actor, "app", &e.app, details)
    } else {
        AuditEvent::error(
            event_type,
            &actor,
            "app",
            &e.app,
            details,
            e.outcome.clone(),
        )
    };
    let key = format!("{node_id}/{}", e.event_id);
    match store.audit_once(&key, &event, crate::now_unix()).await {
        Ok(new) => {
            if new {
                tracing::info!(%node_id, app = %e.app, event = event_type, "{}: {}", e.cause, e.outcome);
            }
            true
        }
        Err(err) => {
            tracing::error!(%node_id, %err, "could not record node event");
            false
        }
    }
}

/// Logs and audits an agent message that broke a field's rule or limit.
async fn refuse_message(store: &Store, node_id: &str, err: &FieldError) {
    tracing::warn!(%node_id, %err, "agent message refused; session ended");
    let event = AuditEvent::error(
        audit::AGENT_MESSAGE_REFUSED,
        node_id,
        "node",
        node_id,
        serde_json::json!({ "field": err.field }),
        err.to_string(),
    );
    if let Err(audit_err) = store.audit(&event, crate::now_unix()).await {
        tracing::error!(%audit_err, "could not record audit event");
    }
}

#[tonic::async_trait]
impl AgentLink for AgentLinkService {
    type ConnectStream = ReceiverStream<Result<ControllerMessage, Status>>;
    type FetchArtifactStream = ReceiverStream<Result<ArtifactChunk, Status>>;

    async fn fetch_artifact(
        &self,
        request: Request<FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let peer_addr = crate::peer_addr(&request);
        let mut actor = peer_addr.clone();
        let fetched = async {
            let peer = self.peer(&request).await?;
            actor.clone_from(&peer.node.id);
            let req = request.get_ref();
            req.validate()?;
            // Agent binaries and app artifacts are separate stores: a
            // deploy cannot fetch an agent binary, nor an upgrade an app.
            let store = if req.agent_binary {
                self.artifacts.agent_binaries()
            } else {
                self.artifacts.clone()
            };
            let stream = store.chunks(&req.sha256, &req.command_id).await?;
            tracing::info!(
                node_id = %peer.node.id, sha256 = %req.sha256, command_id = %req.command_id,
                agent_binary = req.agent_binary, "agent fetching artifact"
            );
            Ok::<_, SessionError>(stream)
        }
        .await;
        match fetched {
            Ok(stream) => Ok(Response::new(stream)),
            Err(err) => {
                // An unknown digest is the agent's (or deployer's) mistake,
                // not an identity problem, but still worth an audit line.
                self.refuse(audit::ARTIFACT_FETCH_REFUSED, &peer_addr, &actor, &err)
                    .await;
                Err(err.into())
            }
        }
    }

    async fn connect(
        &self,
        request: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let peer_addr = crate::peer_addr(&request);
        // Until the certificate names a node, the peer address is the actor.
        let mut actor = peer_addr.clone();
        let opened = async {
            let (peer, hello, inbound) = self.open(request, &mut actor).await?;
            let accepted = self.accept(&peer, &hello).await?;
            Ok::<_, SessionError>((peer, inbound, accepted, hello.apps))
        }
        .await;
        let (peer, inbound, (handle, welcome), hello_apps) = match opened {
            Ok(accepted) => accepted,
            Err(err) => {
                self.refuse(audit::NODE_CONNECT_REFUSED, &peer_addr, &actor, &err)
                    .await;
                return Err(err.into());
            }
        };
        let node = peer.node;
        tracing::info!(
            node_id = %node.id, name = ?node.name, peer = %peer_addr,
            heartbeat_secs = welcome.heartbeat_interval_secs, "agent connected"
        );

        let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
        // The queue is empty, so this cannot fail for lack of room.
        let _ = tx.try_send(Ok(ControllerMessage {
            kind: Some(controller_message::Kind::Welcome(welcome)),
        }));
        // Only now may commands be queued: the Welcome always comes first.
        handle.accept_commands(tx.clone());
        // Commands sent to an earlier session and not answered yet go out
        // again (the agent runs a command id at most once).
        let resend = self.commands.reconnected(&node.id);
        if !resend.is_empty() {
            tracing::info!(node_id = %node.id, commands = resend.len(), "re-sending unanswered commands");
            let resend_tx = tx.clone();
            tokio::spawn(async move {
                for message in resend {
                    if resend_tx.send(Ok(message)).await.is_err() {
                        break;
                    }
                }
            });
        }
        if let Some(OnHello(hook)) = &self.on_hello {
            hook(
                node.id.clone(),
                hello_apps
                    .iter()
                    .map(|a| (a.app.clone(), a.env_version))
                    .collect(),
            );
        }
        tokio::spawn(run_session(
            self.store.clone(),
            self.commands.clone(),
            self.sessions.clone(),
            node.id,
            handle,
            inbound,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        let peer_addr = crate::peer_addr(&request);
        let mut actor = peer_addr.clone();
        match self.try_renew(request, &mut actor).await {
            Ok(response) => Ok(Response::new(response)),
            Err(err) => {
                self.refuse(audit::CERT_RENEW_REFUSED, &peer_addr, &actor, &err)
                    .await;
                Err(err.into())
            }
        }
    }
}

/// Records the DigitalOcean droplet id a node's agent reported in its Hello
/// (0: none; the limit was checked with the Hello), by which the fleet view
/// matches the node to its synced droplet. A droplet id another live node
/// already claims is not recorded and is audited as refused: the node then
/// shows as an agent without a droplet.
async fn record_droplet_claim(
    store: &Store,
    node_id: &str,
    droplet_id: u64,
    now: i64,
) -> Result<(), crate::store::StoreError> {
    if droplet_id == 0 {
        return Ok(());
    }
    match store.claim_droplet(node_id, droplet_id).await? {
        crate::store::DropletClaim::Recorded => {
            tracing::info!(node = %node_id, droplet_id, "node reports its droplet id");
        }
        crate::store::DropletClaim::Unchanged => {}
        crate::store::DropletClaim::Conflict { other_node } => {
            let event = AuditEvent::error(
                audit::DROPLET_CLAIM_REFUSED,
                node_id,
                "node",
                node_id,
                serde_json::json!({ "droplet_id": droplet_id, "claimed_by": other_node }),
                format!("droplet {droplet_id} is already the droplet of live node {other_node}"),
            );
            tracing::warn!(node = %node_id, droplet_id, %other_node, "droplet id claimed twice");
            store.audit(&event, now).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_that_does_not_answer_is_unavailable_to_the_agent_not_internal() {
        use crate::store::StoreError;
        let down = || StoreError::Db(sqlx::Error::PoolTimedOut);
        for err in [
            SessionError::Store(down()),
            SessionError::Artifact(ArtifactError::Store(down())),
        ] {
            let status = Status::from(err);
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
            assert_eq!(status.message(), crate::store::DATABASE_UNAVAILABLE);
        }
        // A query the database refused is the controller's problem.
        let status = Status::from(SessionError::Store(StoreError::Db(
            sqlx::Error::RowNotFound,
        )));
        assert_eq!(status.code(), tonic::Code::Internal, "{status:?}");
    }

    #[test]
    fn renewal_is_due_two_thirds_into_the_life() {
        let week = 7 * 24 * 3600;
        assert_eq!(renew_after(1_000, 1_000 + week), 1_000 + week * 2 / 3);
        assert_eq!(renew_after(1_000, 900), 1_000);
    }
}
