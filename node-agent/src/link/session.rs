//! The agent's session with the controller: the AgentLink stream
//! ([`connect`]: dial with the client certificate, Hello, wait for the
//! Welcome) and the loop `slipway-agent run` keeps it up with ([`run`]).
//!
//! The agent dials out (droplets open no inbound port) with the identity
//! `slipway-agent enroll` stored, sends Hello with the state of every app,
//! then a heartbeat on the interval the controller announced in its Welcome
//! — the first one at a random point of the first interval, so a fleet that
//! reconnects together does not heartbeat together. When the session drops
//! (or cannot be opened) it reconnects with exponential backoff and full
//! jitter, capped at 60 s. A change of an app's `current` or journal (a
//! node-local deploy or rollback from a shell, say) is sent at once as an
//! extra heartbeat, so the fleet view does not lag an interval behind
//! ([`crate::link::watch`]).
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
use super::enroll::{self, read_node_id};
use super::heartbeat::{app_statuses, heartbeat};
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
/// systemd as the unit's status line (`notifier`, when under systemd).
pub async fn run(
    config: Config,
    ctl: ControllerConfig,
    notifier: Arc<Notifier>,
    stop: impl std::future::Future<Output = ()>,
) {
    let apps = config.apps.len();
    let status = |what: String| {
        if let Err(e) = notifier.status(&format!("{apps} app(s); controller {}: {what}", ctl.url)) {
            tracing::debug!(error = %e, "cannot notify systemd (STATUS)");
        }
    };
    tokio::pin!(stop);
    recover_identity(&ctl).await;
    let mut rng = Jitter::seeded();
    let mut attempt: u32 = 0;
    // One runner for the daemon, not per session: a command outlives the
    // session it came on, and its result goes to the session of the moment.
    let commands = Commands::new(config.clone(), ctl.clone());
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
        let outcome = tokio::select! {
            r = connect(&ctl.url, &ctl.state_dir, hello) => r,
            () = &mut stop => return,
        };
        match outcome {
            Ok(session) => {
                attempt = 0;
                // Before any command is read: an agent upgrade in flight is
                // committed (or found rolled back) and its result put where
                // the re-sent command finds it.
                super::upgrade::settle(&ctl.state_dir, commands.ledger()).await;
                tracing::info!(controller = %ctl.url, node = %session.welcome.node_id, "connected to the controller");
                status(format!("connected as node {}", session.welcome.node_id));
                let interval = match session.welcome.heartbeat_interval_secs {
                    0 => DEFAULT_INTERVAL,
                    n => Duration::from_secs(u64::from(n)),
                };
                let renew_at = session.welcome.renew_cert_after_unix;
                let ended = tokio::select! {
                    e = serve(&config, &ctl, session, interval, renew_at, &mut rng, &commands, watch.as_mut()) => e,
                    () = &mut stop => return,
                };
                if ended.code == tonic::Code::PermissionDenied {
                    // Revoked: reconnecting would only be refused again. The
                    // apps keep running; re-enroll to rejoin.
                    tracing::error!(controller = %ctl.url, "this node was revoked by the controller ({}); not reconnecting", ended.text);
                    status("revoked: not reconnecting (enroll again to rejoin)".to_owned());
                    return;
                }
                tracing::warn!(controller = %ctl.url, "controller session ended: {}", ended.text);
                status(format!("session ended ({}); reconnecting", ended.text));
            }
            Err(e) => {
                let now = time::OffsetDateTime::now_utc().unix_timestamp();
                match identity::expired_message(&ctl.state_dir, now) {
                    // Retrying cannot help, but an `enroll --replace` run
                    // meanwhile is picked up at the next attempt (each dial
                    // reads the identity afresh); the apps keep running.
                    Some(message) => {
                        tracing::error!(controller = %ctl.url, attempt, "{message} ({e})");
                        status(message);
                    }
                    None if e.to_string().contains("UnknownIssuer") => {
                        let message = format!(
                            "the controller's certificate is not from a CA this node trusts \
                             ({e}); if the controller's CA was rotated while this node was \
                             offline, re-enroll with `slipway-agent enroll --replace --token …`"
                        );
                        tracing::error!(controller = %ctl.url, attempt, "{message}");
                        status(message);
                    }
                    None => {
                        tracing::warn!(controller = %ctl.url, attempt, "cannot reach the controller: {e}");
                        status(format!("unreachable (attempt {}): {e}", attempt + 1));
                    }
                }
            }
        }
        let delay = backoff(attempt, &mut rng);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = &mut stop => return,
        }
    }
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
async fn trust_bundle(ctl: &ControllerConfig, bundle: slipway_proto::v1::TrustBundle) {
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
                match enroll::renew(&ctl.url, &ctl.state_dir).await {
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
                    match enroll::renew(&ctl.url, &ctl.state_dir).await {
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
                        trust_bundle(ctl, bundle).await;
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

/// A small xorshift generator for jitter: spreading reconnects needs no
/// cryptographic randomness, only different seeds per process.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Self((nanos ^ (u64::from(std::process::id()) << 32)) | 1)
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
}
