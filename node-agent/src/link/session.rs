//! The agent's session with the controller: the AgentLink stream
//! ([`connect`]: dial with the client certificate, Hello, wait for the
//! Welcome) and the loop `slipway-agent run` keeps it up with ([`run`]).
//!
//! The agent dials out (droplets open no inbound port) with the identity
//! `slipway-agent enroll` stored, sends Hello with the state of every app,
//! then a heartbeat on the interval the controller announced in its Welcome
//! — the first one at a random point of the first interval, so a fleet that
//! reconnects together does not heartbeat together.
//!
//! With several controller replicas (`[controller] urls`) it starts on one
//! picked at random and, when the session drops or cannot be opened, moves
//! to the next one in the list, wrapping around ([`Rotation`]): 250–500 ms
//! (jittered) before trying the next replica, and once a whole pass over the
//! list found none, exponential backoff with full jitter — uniform below a
//! step of 0.5 s doubling per failed pass, capped at 60 s — before the next
//! pass. With one address every failure is a whole pass: the backoff alone,
//! as before replicas. Every other call to the controller follows the
//! replica the session is on ([`super::replicas`]).
//!
//! A change of an app's `current` or journal (a node-local deploy or
//! rollback from a shell, say) is sent at once as an extra heartbeat, so
//! the fleet view does not lag an interval behind ([`crate::link::watch`]).
//!
//! Nothing here touches the apps: losing the controller leaves them running,
//! their health checks and log rotation going, and node-local deploy and
//! rollback working.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use slipway_proto::limits::Validate as _;
use slipway_proto::notify::Notifier;
use slipway_proto::v1::agent_link_client::AgentLinkClient;
use slipway_proto::v1::{
    agent_message, controller_message, AgentMessage, ControllerMessage, Hello, NodeEvent,
    NodeEventKind, Welcome,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use super::commands::Commands;
use super::enroll::read_node_id;
use super::heartbeat::{app_statuses, heartbeat};
use super::replicas::{self, LinkState, Replicas};
use super::watch::StateWatcher;
use super::{identity, tls, LinkError};
use crate::bridge::Bridge;
use crate::config::{Config, ControllerConfig};
use crate::error::status_text;
use crate::upkeep::EventKind;

/// Give up waiting for the controller's Welcome after this long.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Agent messages queued for sending before senders wait.
const OUTBOUND_QUEUE: usize = 16;
/// First reconnect delay ceiling; doubles per failed attempt.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Reconnect delay ceiling: a fleet that lost its controller retries at
/// least once a minute.
const BACKOFF_CAP: Duration = Duration::from_secs(60);
/// Pause before trying the next replica within a pass: uniform in
/// `[NEXT_REPLICA_MIN, 2 × NEXT_REPLICA_MIN)`, so agents that lost the same
/// replica do not dial the next one together, and a list of dead replicas
/// is never walked in a tight loop.
const NEXT_REPLICA_MIN: Duration = Duration::from_millis(250);
/// Heartbeat interval when the controller does not say.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

/// An open AgentLink session.
#[derive(Debug)]
pub struct Session {
    /// The controller's answer to Hello.
    pub welcome: Welcome,
    /// Send heartbeats, progress and results here.
    pub outbound: mpsc::Sender<AgentMessage>,
    /// Commands from the controller.
    pub inbound: Streaming<ControllerMessage>,
}

/// Opens the AgentLink session with the identity enrolled in `state_dir`,
/// sends `hello` (an empty `node_id` is filled from the state dir) and waits
/// for the controller's Welcome.
pub async fn connect(
    controller: &str,
    state_dir: &Path,
    mut hello: Hello,
) -> Result<Session, LinkError> {
    if hello.node_id.is_empty() {
        hello.node_id = read_node_id(state_dir)?;
    }
    if hello.agent_version.is_empty() {
        hello.agent_version = crate::version::current().to_owned();
    }
    let channel = tls::mtls_channel(controller, state_dir).await?;
    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    // The queue is empty, so this cannot fail for lack of room.
    let _ = tx.try_send(AgentMessage {
        kind: Some(agent_message::Kind::Hello(hello)),
    });
    let mut inbound = AgentLinkClient::new(channel)
        .connect(ReceiverStream::new(rx))
        .await
        .map_err(|status| LinkError::SessionRefused(status_text(&status)))?
        .into_inner();
    let first = tokio::time::timeout(WELCOME_TIMEOUT, inbound.message())
        .await
        .map_err(|_| LinkError::NoWelcome)?
        .map_err(|status| LinkError::SessionRefused(status_text(&status)))?;
    match first {
        Some(ControllerMessage {
            kind: Some(controller_message::Kind::Welcome(welcome)),
        }) => Ok(Session {
            welcome,
            outbound: tx,
            inbound,
        }),
        Some(other) => Err(LinkError::Unexpected(format!("{:?}", other.kind))),
        None => Err(LinkError::NoWelcome),
    }
}

/// Keeps the session up until `stop` resolves. How it goes is told to
/// systemd as the unit's status line (`notifier`, when under systemd) and
/// written to the state dir for `slipway-agent status`
/// ([`replicas::LINK_FILE`]).
pub async fn run(
    config: Config,
    ctl: ControllerConfig,
    notifier: Arc<Notifier>,
    stop: impl std::future::Future<Output = ()>,
) {
    let apps = config.apps.len();
    let status = |url: &str, what: String| {
        if let Err(e) = notifier.status(&format!("{apps} app(s); controller {url}: {what}")) {
            tracing::debug!(error = %e, "cannot notify systemd (STATUS)");
        }
    };
    tokio::pin!(stop);
    recover_identity(&ctl).await;
    let mut rng = Jitter::seeded();
    // One runner for the daemon, not per session: a command outlives the
    // session it came on, and its result goes to the session of the moment.
    let commands = Commands::new(config.clone(), ctl.clone());
    let replicas = commands.replicas().clone();
    if replicas.is_empty() {
        tracing::error!("no controller address configured; not connecting");
        return;
    }
    let mut rotation = Rotation::start(replicas.len(), &mut rng);
    // What an earlier run recorded is not true of this one.
    record_down(
        &ctl,
        &replicas,
        format!("starting: dialling {}", replicas.urls()[rotation.at()]),
    )
    .await;
    let roots: Vec<_> = config.apps.values().map(|a| a.root.clone()).collect();
    let mut watch = match StateWatcher::new(&roots) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "inotify unavailable; node-local changes reach the controller with the next heartbeat");
            None
        }
    };
    // Read until it succeeds once (the id of a droplet never changes).
    let mut droplet_id = 0;
    loop {
        if let (0, Some(url)) = (droplet_id, &config.metadata_url) {
            match super::metadata::droplet_id(url).await {
                Ok(id) => droplet_id = id,
                Err(e) => tracing::warn!(error = %e, "cannot read the droplet id; reporting none"),
            }
        }
        let hello = {
            let cfg = config.clone();
            let bridge = Bridge::current();
            tokio::task::spawn_blocking(move || Hello {
                node_id: String::new(),
                agent_version: crate::version::current().to_owned(),
                apps: app_statuses(&cfg, &bridge),
                droplet_id,
            })
            .await
            .unwrap_or_default()
        };
        let at = rotation.at();
        let url = replicas.urls()[at].clone();
        replicas.dialling(at);
        let outcome = tokio::select! {
            r = connect(&url, &ctl.state_dir, hello) => r,
            () = &mut stop => return,
        };
        // Why the session is not up, for the log and `status`.
        let why = match outcome {
            Ok(session) => {
                rotation.connected();
                replicas.connected(at);
                // Before any command is read: an agent upgrade in flight is
                // committed (or found rolled back) and its result put where
                // the re-sent command finds it.
                super::upgrade::settle(&ctl.state_dir, commands.ledger()).await;
                tracing::info!(
                    controller = %url,
                    replica = at + 1,
                    replicas = replicas.len(),
                    node = %session.welcome.node_id,
                    "connected to the controller"
                );
                status(
                    &url,
                    format!("connected as node {}", session.welcome.node_id),
                );
                record(
                    &ctl,
                    LinkState {
                        connected_to: Some(url.clone()),
                        node_id: Some(session.welcome.node_id.clone()),
                        replicas: replicas.urls().to_vec(),
                        since_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
                        detail: None,
                    },
                )
                .await;
                let interval = match session.welcome.heartbeat_interval_secs {
                    0 => DEFAULT_INTERVAL,
                    n => Duration::from_secs(u64::from(n)),
                };
                let renew_at = session.welcome.renew_cert_after_unix;
                let ended = tokio::select! {
                    e = serve(&config, &ctl, &replicas, session, interval, renew_at, &mut rng, &commands, watch.as_mut()) => e,
                    () = &mut stop => return,
                };
                replicas.disconnected();
                if ended.code == tonic::Code::PermissionDenied {
                    // Revoked: reconnecting would only be refused again. The
                    // apps keep running; re-enroll to rejoin.
                    tracing::error!(controller = %url, "this node was revoked by the controller ({}); not reconnecting", ended.text);
                    status(
                        &url,
                        "revoked: not reconnecting (enroll again to rejoin)".to_owned(),
                    );
                    record_down(
                        &ctl,
                        &replicas,
                        format!("revoked by {url}: not reconnecting"),
                    )
                    .await;
                    return;
                }
                status(
                    &url,
                    format!("session ended ({}); reconnecting", ended.text),
                );
                format!("session with {url} ended: {}", ended.text)
            }
            Err(e) => {
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                let attempt = rotation.passes();
                match identity::expired_message(&ctl.state_dir, now) {
                    // Retrying cannot help, but an `enroll --replace` run
                    // meanwhile is picked up at the next attempt (each dial
                    // reads the identity afresh); the apps keep running.
                    Some(message) => {
                        tracing::error!(controller = %url, attempt, "{message} ({e})");
                        status(&url, message);
                    }
                    None if e.to_string().contains("UnknownIssuer") => {
                        let message = format!(
                            "the controller's certificate is not from a CA this node trusts \
                             ({e}); if the controller's CA was rotated while this node was \
                             offline, re-enroll with `slipway-agent enroll --replace --token …`"
                        );
                        tracing::error!(controller = %url, attempt, "{message}");
                        status(&url, message);
                    }
                    None => {
                        status(&url, format!("unreachable (attempt {}): {e}", attempt + 1));
                    }
                }
                format!("cannot reach {url}: {e}")
            }
        };
        let delay = rotation.failed(&mut rng);
        let next = &replicas.urls()[rotation.at()];
        let pass_over = rotation.at_pass_start();
        tracing::warn!(
            controller = %url,
            next = %next,
            after_ms = delay.as_millis() as u64,
            "{why}; {}",
            if replicas.len() == 1 {
                "reconnecting".to_owned()
            } else if pass_over {
                format!("no replica of {} answered; backing off, then trying {next}", replicas.len())
            } else {
                format!("moving to the next replica, {next}")
            }
        );
        record_down(&ctl, &replicas, format!("{why}; next: {next}")).await;
        replicas.dialling(rotation.at());
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = &mut stop => return,
        }
    }
}

/// Writes `state` for `slipway-agent status`; a failure is only logged
/// (the session does not depend on it).
async fn record(ctl: &ControllerConfig, state: LinkState) {
    let dir = ctl.state_dir.clone();
    match tokio::task::spawn_blocking(move || replicas::write_state(&dir, &state)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "cannot record the link state for status"),
        Err(e) => tracing::debug!(error = %e, "link state task failed"),
    }
}

/// [`record`]s that no session is up, and why.
async fn record_down(ctl: &ControllerConfig, replicas: &Replicas, detail: String) {
    let state = LinkState {
        connected_to: None,
        node_id: None,
        replicas: replicas.urls().to_vec(),
        since_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
        detail: Some(detail),
    };
    record(ctl, state).await;
}

/// Puts the node's key and certificate in order before the first dial:
/// finishes or undoes an interrupted renewal, migrates an older layout. A
/// failure is logged; the dial then says what is wrong, and is retried.
async fn recover_identity(ctl: &ControllerConfig) {
    let dir = ctl.state_dir.clone();
    match tokio::task::spawn_blocking(move || identity::recover(&dir)).await {
        Ok(Ok(identity::Recovered::Migrated { from })) => tracing::info!(
            state_dir = %ctl.state_dir.display(),
            "moved the node key and certificate ({from}) into {}/",
            identity::LINK
        ),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::error!("node identity: {e}"),
        Err(e) => tracing::error!("node identity recovery task failed: {e}"),
    }
}

/// Stores the controller's trust bundle (a CA rotation) as the node's CA
/// file, after checking every certificate in it is a CA certificate and
/// that the CA it signs with is among them; with `renew_now`, renews the
/// node's certificate at once unless that CA already issued it.
async fn trust_bundle(
    ctl: &ControllerConfig,
    replicas: &Replicas,
    bundle: slipway_proto::v1::TrustBundle,
) {
    let dir = ctl.state_dir.clone();
    let checked = tokio::task::spawn_blocking(move || identity::store_trust(&dir, &bundle))
        .await
        .map_err(|e| format!("task failed: {e}"))
        .and_then(|r| r);
    match checked {
        Ok(identity::Trusted { changed, renew }) => {
            if changed {
                tracing::info!("stored the controller's new trust bundle (CA rotation)");
            }
            if renew {
                match replicas::renew(replicas, &ctl.state_dir).await {
                    Ok(expiry) => tracing::info!(
                        expires_at_unix = expiry,
                        "certificate renewed onto the new CA"
                    ),
                    Err(e) => tracing::warn!(
                        "renewal onto the new CA failed (the next scheduled renewal retries): {e}"
                    ),
                }
            }
        }
        Err(why) => tracing::warn!("trust bundle refused: {why}"),
    }
}

/// Why a session ended: the gRPC code (PermissionDenied = revoked) and text.
#[derive(Debug)]
struct Ended {
    code: tonic::Code,
    text: String,
}

impl Ended {
    fn other(text: impl Into<String>) -> Self {
        Self {
            code: tonic::Code::Unknown,
            text: text.into(),
        }
    }
}

/// Heartbeats until the session breaks — on the interval, and at once when
/// `watch` sees an app's state change — renewing the certificate when the
/// controller said to; returns why it ended.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
async fn serve(
    config: &Config,
    ctl: &ControllerConfig,
    replicas: &Replicas,
    mut session: Session,
    interval: Duration,
    renew_at: i64,
    rng: &mut Jitter,
    commands: &Commands,
    mut watch: Option<&mut StateWatcher>,
) -> Ended {
    commands.attach(session.outbound.clone());
    // Staggered first beat: somewhere in the first interval.
    let mut next = tokio::time::Instant::now() + rng.below(interval);
    let mut renew_due = renew_at > 0;
    // Node events sent on this session and not yet acknowledged: not sent
    // again until the next session (the controller records an id once).
    let mut sent = std::collections::HashSet::new();
    if let Err(ended) = send_events(config, &session, &mut sent).await {
        return ended;
    }
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(next) => {
                next += interval;
                if renew_due && time::OffsetDateTime::now_utc().unix_timestamp() >= renew_at {
                    // The session stays up on the old certificate, which the
                    // controller honours until it expires; the next connect
                    // uses the new one. A failure is retried next beat.
                    match replicas::renew(replicas, &ctl.state_dir).await {
                        Ok(expiry) => {
                            renew_due = false;
                            tracing::info!(expires_at_unix = expiry, "certificate renewed");
                        }
                        Err(e) => tracing::warn!("certificate renewal failed (will retry): {e}"),
                    }
                }
                if let Some(w) = watch.as_deref_mut() {
                    w.refresh();
                }
                if let Err(ended) = send_heartbeat(config, &session).await {
                    return ended;
                }
                if let Err(ended) = send_events(config, &session, &mut sent).await {
                    return ended;
                }
            }
            () = changed(watch.as_deref_mut()) => {
                tracing::debug!("app state changed on disk; heartbeat now");
                // Events first: what the heartbeat shows (a crash loop) is
                // then already in the audit log.
                if let Err(ended) = send_events(config, &session, &mut sent).await {
                    return ended;
                }
                if let Err(ended) = send_heartbeat(config, &session).await {
                    return ended;
                }
            }
            msg = session.inbound.message() => match msg {
                Ok(Some(m @ ControllerMessage {
                    kind: Some(controller_message::Kind::TrustBundle(_)),
                })) => {
                    if let Err(err) = m.validate() {
                        tracing::warn!(%err, "trust bundle refused");
                    } else if let Some(controller_message::Kind::TrustBundle(bundle)) = m.kind {
                        trust_bundle(ctl, replicas, bundle).await;
                    }
                }
                Ok(Some(m @ ControllerMessage {
                    kind: Some(controller_message::Kind::NodeEventAck(_)),
                })) => {
                    // Checked like every controller message: ids within
                    // their limits (they are only compared, never used as
                    // names).
                    if let Err(err) = m.validate() {
                        tracing::warn!(%err, "node event acknowledgement refused");
                    } else if let Some(controller_message::Kind::NodeEventAck(ack)) = m.kind {
                        acknowledged(config, ack.event_ids).await;
                    }
                }
                Ok(Some(m)) => {
                    // Commands run beside the heartbeats; the app lock keeps
                    // two of them off the same app.
                    let commands = commands.clone();
                    tokio::spawn(async move { commands.execute(m).await });
                }
                Ok(None) => return Ended::other("the controller closed the stream"),
                Err(status) => {
                    return Ended {
                        code: status.code(),
                        text: format!("{}: {}", status.code(), status.message()),
                    }
                }
            }
        }
    }
}

/// Resolves when `watch` reports a change; never without a watcher.
async fn changed(watch: Option<&mut StateWatcher>) {
    match watch {
        Some(w) => w.changed().await,
        None => std::future::pending().await,
    }
}

/// Sends one heartbeat on the session.
/// Sends the node events of every app the controller has not acknowledged
/// and that were not sent on this session yet.
async fn send_events(
    config: &Config,
    session: &Session,
    sent: &mut std::collections::HashSet<String>,
) -> Result<(), Ended> {
    let roots: Vec<_> = config.apps.values().map(|a| a.root.clone()).collect();
    let events = tokio::task::spawn_blocking(move || {
        roots
            .iter()
            .flat_map(|r| crate::upkeep::unsent(r))
            .collect::<Vec<_>>()
    })
    .await
    .map_err(|e| Ended::other(format!("event task failed: {e}")))?;
    for e in events {
        if !sent.insert(e.id.clone()) {
            continue;
        }
        let cut = |t: &str| {
            slipway_proto::limits::truncate(t, slipway_proto::limits::MAX_MESSAGE).to_owned()
        };
        let kind = match e.kind {
            EventKind::AppRestored => NodeEventKind::AppRestored,
            EventKind::AppCrashlooping => NodeEventKind::AppCrashlooping,
            EventKind::AppRolledBack => NodeEventKind::AppRolledBack,
            EventKind::LocalDeploy => NodeEventKind::LocalDeploy,
            EventKind::LocalRollback => NodeEventKind::LocalRollback,
        };
        let msg = AgentMessage {
            kind: Some(agent_message::Kind::NodeEvent(NodeEvent {
                event_id: e.id,
                kind: kind as i32,
                app: e.app,
                release_id: e.release,
                from_release_id: e.from_release,
                cause: cut(&e.cause),
                outcome: cut(&e.outcome),
                ok: e.ok,
                unix_time: e.at.unix_timestamp(),
                actor: slipway_proto::limits::truncate(&e.actor, slipway_proto::limits::MAX_ACTOR)
                    .to_owned(),
            })),
        };
        session
            .outbound
            .send(msg)
            .await
            .map_err(|_| Ended::other("the stream closed"))?;
    }
    Ok(())
}

/// The controller recorded these events: they are not sent again.
async fn acknowledged(config: &Config, ids: Vec<String>) {
    let roots: Vec<_> = config.apps.values().map(|a| a.root.clone()).collect();
    let done = tokio::task::spawn_blocking(move || {
        for r in &roots {
            crate::upkeep::mark_sent(r, &ids)?;
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    match done {
        Ok(Ok(())) => {}
        // Sent again on the next session; the controller records it once.
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot mark node events as acknowledged"),
        Err(e) => tracing::warn!(error = %e, "event task failed"),
    }
}

async fn send_heartbeat(config: &Config, session: &Session) -> Result<(), Ended> {
    let cfg = config.clone();
    let bridge = Bridge::current();
    let beat = tokio::task::spawn_blocking(move || heartbeat(&cfg, &bridge))
        .await
        .map_err(|e| Ended::other(format!("heartbeat task failed: {e}")))?;
    let msg = AgentMessage {
        kind: Some(agent_message::Kind::Heartbeat(beat)),
    };
    session
        .outbound
        .send(msg)
        .await
        .map_err(|_| Ended::other("the stream closed"))
}

/// The full exponential step is `BASE * 2^attempt` capped at `CAP`; the delay
/// is uniform in `[0, step)` ("full jitter").
pub fn backoff(attempt: u32, rng: &mut Jitter) -> Duration {
    let step = BACKOFF_BASE
        .checked_mul(1u32.checked_shl(attempt.min(16)).unwrap_or(u32::MAX))
        .unwrap_or(BACKOFF_CAP)
        .min(BACKOFF_CAP);
    rng.below(step)
}

/// Which controller replica the session dials, and how long it waits
/// first: a pure policy (the RNG is passed in), so its order is tested.
///
/// It starts on a replica picked at random (a fleet spreads over the
/// replicas). Each failure — a dial that failed or a session that ended —
/// moves it to the next replica in the list, wrapping around: within a
/// pass after a pause uniform in 250–500 ms ([`NEXT_REPLICA_MIN`]); when
/// the failure completes a pass over the whole list with no session up,
/// after [`backoff`] of the number of such passes in a row. A session that
/// comes up starts the count afresh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// Replicas in the list (at least 1).
    len: usize,
    /// The replica to dial now.
    at: usize,
    /// Failures since the current pass began.
    failed_in_pass: usize,
    /// Whole passes in a row where no session came up: the backoff's
    /// attempt number.
    passes: u32,
}

impl Rotation {
    /// Starts on a replica of `len` picked with `rng`.
    pub fn start(len: usize, rng: &mut Jitter) -> Self {
        let len = len.max(1);
        Self {
            len,
            at: rng.index(len),
            failed_in_pass: 0,
            passes: 0,
        }
    }

    /// The replica to dial now (an index into the list).
    pub fn at(&self) -> usize {
        self.at
    }

    /// Whole passes in a row that found no replica.
    pub fn passes(&self) -> u32 {
        self.passes
    }

    /// Whether the replica to dial now begins a new pass (the last failure
    /// completed one).
    pub fn at_pass_start(&self) -> bool {
        self.failed_in_pass == 0
    }

    /// A session is up: the next failure counts from nothing.
    pub fn connected(&mut self) {
        self.failed_in_pass = 0;
        self.passes = 0;
    }

    /// The dial failed or the session ended: moves to the next replica and
    /// returns how long to wait before dialling it.
    pub fn failed(&mut self, rng: &mut Jitter) -> Duration {
        self.at = (self.at + 1) % self.len;
        self.failed_in_pass += 1;
        if self.failed_in_pass < self.len {
            return NEXT_REPLICA_MIN + rng.below(NEXT_REPLICA_MIN);
        }
        self.failed_in_pass = 0;
        let delay = backoff(self.passes, rng);
        self.passes = self.passes.saturating_add(1);
        delay
    }
}

/// A small xorshift generator for jitter: spreading reconnects needs no
/// cryptographic randomness, only different seeds per process.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self::from_seed(nanos ^ (u64::from(std::process::id()) << 32))
    }

    /// A generator whose draws are fixed by `seed` (tests).
    pub fn from_seed(seed: u64) -> Self {
        // xorshift never leaves 0.
        Self(seed | 1)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn index(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next() % n as u64) as usize
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Uniform in `[0, d)`.
    pub fn below(&mut self, d: Duration) -> Duration {
        let nanos = d.as_nanos() as u64;
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next() % nanos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_full_jitter_under_a_growing_cap() {
        let mut rng = Jitter::seeded();
        // The step doubles from 500 ms and stops at 60 s; each delay is
        // below the step and, over many draws, reaches close to it.
        let ms = Duration::from_millis;
        for (attempt, step) in [
            (0, ms(500)),
            (1, ms(1_000)),
            (2, ms(2_000)),
            (6, ms(32_000)),
            (7, ms(60_000)),
            (16, ms(60_000)),
            (17, ms(60_000)),
            (u32::MAX, ms(60_000)),
        ] {
            let most = (0..2000).map(|_| backoff(attempt, &mut rng)).max().unwrap();
            assert!(
                most < step && most > step * 9 / 10,
                "attempt {attempt}: longest of 2000 delays {most:?}, step {step:?}"
            );
        }
        // Spread: 1,000 agents at attempt 10 do not land together.
        let mut delays: Vec<u128> = (0..1000)
            .map(|_| backoff(10, &mut rng).as_millis())
            .collect();
        delays.sort_unstable();
        let spread = delays[899] - delays[99];
        assert!(spread > 30_000, "the middle 80% span only {spread} ms");
    }

    #[test]
    fn replicas_are_tried_in_turn_from_a_random_one_with_backoff_after_each_pass() {
        let ms = Duration::from_millis;
        for seed in [1, 2, 3, 42, 0xdead_beef] {
            let mut rng = Jitter::from_seed(seed);
            let first = Jitter::from_seed(seed).index(3);
            let mut r = Rotation::start(3, &mut rng);
            assert_eq!(r.at(), first, "seed {seed}");
            // Three passes over three dead replicas: next, next, then a
            // backoff whose step grows per pass (0.5 s, 1 s, 2 s).
            for pass in 0..3u32 {
                for hop in 1..=3 {
                    assert_eq!(r.passes(), pass);
                    let delay = r.failed(&mut rng);
                    assert_eq!(
                        r.at(),
                        (first + hop) % 3,
                        "seed {seed} pass {pass} hop {hop}"
                    );
                    if hop < 3 {
                        assert!(!r.at_pass_start());
                        assert!(
                            (ms(250)..ms(500)).contains(&delay),
                            "between replicas: {delay:?}"
                        );
                    } else {
                        assert!(r.at_pass_start());
                        assert!(delay < ms(500) * 2u32.pow(pass), "pass {pass}: {delay:?}");
                    }
                }
            }
            // A session comes up; when it drops, the next replica is tried
            // after the short pause, and the backoff starts again from 0.5 s.
            r.connected();
            let at = r.at();
            let delay = r.failed(&mut rng);
            assert_eq!(r.at(), (at + 1) % 3);
            assert!((ms(250)..ms(500)).contains(&delay), "{delay:?}");
            r.failed(&mut rng);
            assert!(r.failed(&mut rng) < ms(500));
            assert_eq!(r.passes(), 1);
        }
    }

    #[test]
    fn the_first_replica_is_spread_over_the_list() {
        let mut counts = [0u32; 4];
        for seed in 0..4000u64 {
            let mut rng = Jitter::from_seed(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            counts[Rotation::start(4, &mut rng).at()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
        // The same seed picks the same replica.
        let pick = |seed| Rotation::start(5, &mut Jitter::from_seed(seed)).at();
        assert_eq!(pick(77), pick(77));
    }

    #[test]
    fn one_address_backs_off_on_every_failure_as_before_replicas() {
        let mut rng = Jitter::from_seed(9);
        let mut r = Rotation::start(1, &mut rng);
        let ms = Duration::from_millis;
        for attempt in 0..20u32 {
            assert_eq!(r.at(), 0);
            let delay = r.failed(&mut rng);
            let step = (ms(500) * 2u32.pow(attempt.min(7))).min(ms(60_000));
            assert!(delay < step, "attempt {attempt}: {delay:?}");
            assert_eq!(r.passes(), attempt + 1);
        }
        r.connected();
        assert!(r.failed(&mut rng) < ms(500));
        // An empty list is treated as one (the config refuses it anyway).
        assert_eq!(Rotation::start(0, &mut rng).at(), 0);
    }
}
