//! The in-process controller that the controller's integration tests share:
//! `serve` on a free loopback port from a temp data dir, with its CA made
//! first so tokens created by a test and the server agree on it, plus
//! clients for each way in (Control API with a token or an operator
//! certificate, AgentLink with a node certificate, enrollment), and the
//! agent's side of a session (commands in, results out) as tests play it.

// Each test file uses a part of it.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

pub mod do_api;
pub mod gh_api;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use slipway_agent::link;
use slipway_controller::audit::AuditRecord;
use slipway_controller::auth::apitoken::{self, Scope};
use slipway_controller::auth::token;
use slipway_controller::config::ServeConfig;
use slipway_controller::pki::ca::Ca;
use slipway_controller::pki::crypto;
use slipway_controller::proto::client;
use slipway_controller::proto::v1::agent_link_client::AgentLinkClient;
use slipway_controller::proto::v1::control_client::ControlClient;
use slipway_controller::proto::v1::{
    agent_message, controller_message, deploy_event, selector, AgentMessage, CommandResult,
    DeployEvent, DeployFinished, Hello, NodeResult, Outcome, Selector,
};
use slipway_controller::server::{self, ServeError};
use slipway_controller::store::{DeploymentRecord, Store};
use tempfile::TempDir;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// Bound on every wait, so a broken server fails the test instead of hanging.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(20);

/// A controller serving on a free loopback port from a temp data dir.
pub struct Controller {
    pub addr: SocketAddr,
    pub data_dir: TempDir,
    pub ca: Ca,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl Controller {
    /// With the default settings.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// With settings changed by `configure`.
    pub async fn start_with(configure: impl FnOnce(&mut ServeConfig)) -> Self {
        crypto::install_default_provider();
        let data_dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(data_dir.path()).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = ServeConfig::with_defaults(data_dir.path().to_owned(), addr);
        configure(&mut config);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = server::serve(&config, listener, async {
                let _ = stopped.await;
            })
            .await;
            // Printed so a server that fails to start explains the test failure.
            if let Err(err) = &served {
                eprintln!("controller stopped: {err}");
            }
            served
        });
        Self {
            addr,
            data_dir,
            ca,
            stop,
            task,
        }
    }

    /// The URL agents enroll and connect with.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// Another handle on the controller's database.
    pub async fn store(&self) -> Store {
        Store::open(self.data_dir.path()).await.unwrap()
    }

    /// The latest deployment (deploy, rollback, restart or prune) of `app`
    /// with its per-node results, as `slipway status` shows it: one or none.
    pub async fn last_deployments(&self, app: &str) -> Vec<DeploymentRecord> {
        self.store()
            .await
            .last_deployments(Some(app))
            .await
            .unwrap()
    }

    /// A join token (tag env:production) valid for an hour from
    /// `now_offset_secs` from now.
    pub async fn token_at(&self, now_offset_secs: i64) -> String {
        self.token_tagged(now_offset_secs, "env:production").await
    }

    /// A join token giving the node `tag`, valid for an hour from
    /// `now_offset_secs` from now.
    pub async fn token_tagged(&self, now_offset_secs: i64, tag: &str) -> String {
        let now = OffsetDateTime::now_utc().unix_timestamp() + now_offset_secs;
        token::create(
            &self.store().await,
            &self.ca.fingerprint(),
            token::DEFAULT_TTL,
            &[tag.to_owned()],
            now,
        )
        .await
        .unwrap()
        .to_string()
    }

    /// A join token valid from now.
    pub async fn token(&self) -> String {
        self.token_at(0).await
    }

    /// A new API token.
    pub async fn api_token(&self, scopes: &[Scope]) -> String {
        apitoken::create(&self.store().await, scopes, 0)
            .await
            .unwrap()
    }

    /// A new API token that may deploy (and restart, prune, roll back) `app`.
    pub async fn deploy_token(&self, app: &str) -> String {
        self.api_token(&[Scope::Deploy(app.to_owned())]).await
    }

    /// Every audit event so far.
    pub async fn audit(&self) -> Vec<AuditRecord> {
        self.store().await.audit_events().await.unwrap()
    }

    /// The types of the audit events so far that start with `prefix`, in order.
    pub async fn audit_types(&self, prefix: &str) -> Vec<String> {
        self.audit()
            .await
            .into_iter()
            .map(|e| e.event_type)
            .filter(|t| t.starts_with(prefix))
            .collect()
    }

    /// Waits until an audit event of `event_type` exists (some are written
    /// by the server after the client has already seen its error).
    pub async fn wait_for_event(&self, event_type: &str) -> AuditRecord {
        let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
        loop {
            if let Some(event) = self
                .audit()
                .await
                .into_iter()
                .find(|e| e.event_type == event_type)
            {
                return event;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {event_type} audit event; got {:#?}",
                self.audit().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A Control client trusting only the controller's CA (as the CLI does),
    /// presenting no certificate.
    pub async fn control(&self) -> ControlClient<Channel> {
        let roots = client::load_ca(&self.data_dir.path().join("ca.pem")).unwrap();
        let channel = client::connect(&self.addr.to_string(), roots)
            .await
            .unwrap();
        ControlClient::new(channel)
    }

    /// A Control client presenting the certificate and key in these files.
    pub async fn control_as(&self, cert: &Path, key: &Path) -> ControlClient<Channel> {
        let cert = std::fs::read(cert).unwrap();
        let key = std::fs::read(key).unwrap();
        ControlClient::new(self.mtls_channel(&cert, &key).await)
    }

    /// An mTLS channel with this client certificate and key, trusting only
    /// the controller's CA.
    pub async fn mtls_channel(&self, cert_pem: &[u8], key_pem: &[u8]) -> Channel {
        let roots = client::load_ca(&self.data_dir.path().join("ca.pem")).unwrap();
        let identity = client::identity_from_pem(cert_pem, key_pem).unwrap();
        client::connect_as(&self.addr.to_string(), roots, Some(identity))
            .await
            .unwrap()
    }

    /// An AgentLink client with the node identity in `state`.
    pub async fn agent_link(&self, state: &Path) -> AgentLinkClient<Channel> {
        let cert = std::fs::read(state.join(link::CERT_FILE)).unwrap();
        let key = std::fs::read(state.join(link::KEY_FILE)).unwrap();
        AgentLinkClient::new(self.mtls_channel(&cert, &key).await)
    }

    /// Enrolls a node named `name` (as the agent does) and returns its
    /// state dir and node id.
    pub async fn enroll(&self, name: &str) -> (TempDir, String) {
        let join = self.token().await;
        let state = tempfile::tempdir().unwrap();
        let enrolled = self.try_enroll(&join, state.path(), name).await.unwrap();
        (state, enrolled.node_id)
    }

    /// Tries to enroll a node named `name` with join token `join`, its
    /// identity written to `state`, as the agent does.
    pub async fn try_enroll(
        &self,
        join: &str,
        state: &Path,
        name: &str,
    ) -> Result<link::Enrolled, link::LinkError> {
        self.try_enroll_with(join, state, name, false).await
    }

    /// [`Self::try_enroll`], replacing the live node of that name if `replace`.
    pub async fn try_enroll_with(
        &self,
        join: &str,
        state: &Path,
        name: &str,
        replace: bool,
    ) -> Result<link::Enrolled, link::LinkError> {
        tokio::time::timeout(
            TEST_TIMEOUT,
            link::enroll(&self.url(), join, state, name, replace),
        )
        .await
        .unwrap()
    }

    /// Opens the agent session of an enrolled node, as the agent does.
    pub async fn connect(&self, state: &Path, node_id: &str) -> link::Session {
        self.try_connect(state, node_id).await.unwrap()
    }

    /// Tries to open the agent session of the node whose identity is in
    /// `state`, saying hello as `node_id` ("": the id saved in `state`), as
    /// the agent does.
    pub async fn try_connect(
        &self,
        state: &Path,
        node_id: &str,
    ) -> Result<link::Session, link::LinkError> {
        let hello = Hello {
            node_id: node_id.to_owned(),
            ..Hello::default()
        };
        tokio::time::timeout(TEST_TIMEOUT, link::connect(&self.url(), state, hello))
            .await
            .unwrap()
    }

    /// Stops `serve` and checks it ended cleanly.
    pub async fn stop(self) {
        self.stop.send(()).unwrap();
        tokio::time::timeout(TEST_TIMEOUT, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// True if `audit` has an `event_type` event for which `matches` holds.
pub fn audited(
    audit: &[AuditRecord],
    event_type: &str,
    matches: impl Fn(&AuditRecord) -> bool,
) -> bool {
    audit
        .iter()
        .any(|e| e.event_type == event_type && matches(e))
}

/// `message` with `token` as its bearer credential.
pub fn authed<T>(message: T, token: &str) -> tonic::Request<T> {
    client::authed(message, &client::bearer(token).unwrap())
}

/// A selector for the one node `node` (a name or an id).
pub fn on_node(node: &str) -> Option<Selector> {
    Some(Selector {
        target: Some(selector::Target::Node(node.to_owned())),
    })
}

/// The next command the controller sends on `session`.
pub async fn next_command(session: &mut link::Session) -> controller_message::Kind {
    tokio::time::timeout(TEST_TIMEOUT, session.inbound.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .kind
        .unwrap()
}

/// Sends `kind` to the controller on `session`, as the agent does.
pub async fn send(session: &link::Session, kind: agent_message::Kind) {
    session
        .outbound
        .send(AgentMessage { kind: Some(kind) })
        .await
        .unwrap();
}

/// Answers command `command_id` on `session` with its result.
pub async fn send_result(
    session: &link::Session,
    command_id: String,
    outcome: Outcome,
    release_id: &str,
    message: &str,
) {
    send(
        session,
        agent_message::Kind::Result(CommandResult {
            command_id,
            outcome: outcome as i32,
            release_id: release_id.to_owned(),
            message: message.to_owned(),
        }),
    )
    .await;
}

/// Every event of a deploy-like stream (deploy, restart, prune), up to its end.
pub async fn collect(mut stream: tonic::Streaming<DeployEvent>) -> Vec<DeployEvent> {
    let mut events = Vec::new();
    while let Some(event) = tokio::time::timeout(TEST_TIMEOUT, stream.message())
        .await
        .unwrap()
        .unwrap()
    {
        events.push(event);
    }
    events
}

/// The DeployFinished that must end `events`.
pub fn finished_of(events: &[DeployEvent]) -> &DeployFinished {
    let Some(deploy_event::Kind::Finished(finished)) = &events.last().unwrap().kind else {
        panic!("{events:?}");
    };
    finished
}

/// The NodeResult events among `events`, in order.
pub fn node_results(events: &[DeployEvent]) -> Vec<&NodeResult> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(deploy_event::Kind::NodeResult(r)) => Some(r),
            _ => None,
        })
        .collect()
}
