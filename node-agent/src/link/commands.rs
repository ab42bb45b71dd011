//! Commands from the controller, run on this node.
//!
//! Each command carries an id and is idempotent here: its result is recorded
//! in `<state_dir>/commands.json`, and a command id seen before is answered
//! with the recorded result instead of being run twice (a controller that
//! re-sends after a reconnect must not deploy twice). Progress is streamed as
//! it happens; every command ends with exactly one `CommandResult`.
//!
//! All of that state — the [`ledger`](super::ledger), the ids in flight, the
//! session output goes to — belongs to one [`Commands`] the daemon makes (no
//! statics). A ledger that cannot be read refuses every command with an
//! error naming the file.
//!
//! The work itself is the same code as the node-local CLI: a [`Deployer`]
//! session (lock, journal, recovery) for deploy, rollback, prune and restart.
//! A deploy's artifact is fetched from the controller by digest or — when
//! the command carries `artifact_url` — downloaded by the agent itself
//! ([`crate::artifact::https`]); either way into the app's artifact cache under its
//! sha256, and not at all when the cache already holds that digest. The
//! fetch runs without the app's lock (the cache is pinned instead, see
//! [`crate::release::CachePin`]): a rollback during a long download works.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use slipway_proto::limits::{self, Validate as _};
use slipway_proto::v1::{
    agent_message, controller_message, AgentMessage, ControllerMessage, Progress,
};
use tokio::sync::mpsc;

use super::heartbeat::heartbeat;
use super::ledger::{LedgerFile, Recorded};
use super::replicas::{self, Replicas};
use super::{tls, LinkError};
use crate::artifact::cache::{self, Fetched};
use crate::artifact::controller::FetchError;
use crate::artifact::https as download;
use crate::bridge::Bridge;
use crate::config::{AppConfig, ArtifactsConfig, Config, ControllerConfig};
use crate::deploy::{DeployReport, DeployRequest, Deployer, Outcome};
use crate::digest::Sha256;
use crate::release::ReleaseId;

/// How long an artifact fetch is tried again while the controller answers
/// that it cannot serve it now (its database does not answer), and the
/// pause between tries: a database outage of a few seconds in the middle
/// of a rollout does not fail the node.
const FETCH_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(120);
const FETCH_RETRY_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Where command output goes: the *current* session's stream. A command
/// outlives the session it came on (a reconnect mid-deploy); its progress and
/// result then go to the new session, which the controller expects.
#[derive(Debug, Clone, Default)]
struct Outbox(Arc<Mutex<Option<mpsc::Sender<AgentMessage>>>>);

impl Outbox {
    fn attach(&self, tx: mpsc::Sender<AgentMessage>) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(tx);
        }
    }

    fn sender(&self) -> Option<mpsc::Sender<AgentMessage>> {
        self.0.lock().ok().and_then(|s| s.clone())
    }
}

/// The agent's command runner, one per daemon (`slipway-agent run` makes
/// one and keeps it across reconnects, since a command outlives the session
/// it came on). Cheap to clone: the clones share the state.
#[derive(Debug, Clone)]
pub struct Commands {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    config: Config,
    ctl: ControllerConfig,
    /// The controller replicas, and the one the session is on: fetches go
    /// there first.
    replicas: Replicas,
    /// Results already sent, for idempotency across re-sends.
    ledger: LedgerFile,
    /// Command ids running right now: a re-send of one of them is not run
    /// again (its result reaches the current session when it is done).
    /// Locked only to insert or remove, never across an await or I/O.
    in_flight: Mutex<HashSet<String>>,
    out: Outbox,
}

impl Commands {
    /// A runner for the apps in `config`, keeping its ledger in the
    /// controller state dir.
    pub fn new(config: Config, ctl: ControllerConfig) -> Self {
        Self {
            inner: Arc::new(Shared {
                ledger: LedgerFile::new(&ctl.state_dir),
                replicas: Replicas::new(ctl.urls.clone()),
                config,
                ctl,
                in_flight: Mutex::default(),
                out: Outbox::default(),
            }),
        }
    }

    /// Points progress and results at a new session's stream.
    pub fn attach(&self, tx: mpsc::Sender<AgentMessage>) {
        self.inner.out.attach(tx);
    }

    /// The ledger of results.
    pub fn ledger(&self) -> &LedgerFile {
        &self.inner.ledger
    }

    /// The controller replicas: the session records here which one it is
    /// on, and the commands' own calls to the controller follow it.
    pub fn replicas(&self) -> &Replicas {
        &self.inner.replicas
    }

    /// Runs the command in `msg` (if it is one) and reports on the current
    /// session.
    pub async fn execute(&self, msg: ControllerMessage) {
        let Shared {
            config,
            ctl,
            replicas,
            ledger,
            in_flight,
            out,
        } = &*self.inner;
        // What the controller sends is checked here too, before any of it
        // names a directory, a release or a file.
        let checked = msg.validate();
        let Some(kind) = msg.kind else { return };
        let id = match &kind {
            controller_message::Kind::Deploy(d) => d.command_id.clone(),
            controller_message::Kind::Rollback(r) => r.command_id.clone(),
            controller_message::Kind::Prune(p) => p.command_id.clone(),
            controller_message::Kind::StatusRequest(s) => s.command_id.clone(),
            controller_message::Kind::Restart(r) => r.command_id.clone(),
            controller_message::Kind::StopApp(r) => r.command_id.clone(),
            controller_message::Kind::StartApp(r) => r.command_id.clone(),
            controller_message::Kind::AgentUpgrade(u) => u.command_id.clone(),
            controller_message::Kind::SetEnv(e) => e.command_id.clone(),
            // The session handles acknowledgements itself.
            controller_message::Kind::Welcome(_)
            | controller_message::Kind::NodeEventAck(_)
            | controller_message::Kind::TrustBundle(_) => return,
            controller_message::Kind::ArtifactChunk(_) => {
                tracing::warn!("inline artifact chunks are not used by this agent (it fetches artifacts by digest)");
                return;
            }
        };
        if id.is_empty() {
            tracing::warn!("controller command without an id ignored");
            return;
        }
        if let Err(err) = checked {
            tracing::warn!(%err, "controller command refused");
            if limits::check_line("command_id", &id, limits::MAX_COMMAND_ID).is_ok() {
                let refused = recorded(&id, Outcome::Failed, "", format!("command refused: {err}"));
                send(out, agent_message::Kind::Result(refused.to_proto())).await;
            }
            return;
        }
        if let controller_message::Kind::StatusRequest(_) = kind {
            // Answered with a fresh heartbeat: it changes nothing, so asking
            // again is harmless and it is neither recorded nor de-duplicated.
            let cfg = config.clone();
            let bridge = Bridge::current();
            if let Ok(beat) = tokio::task::spawn_blocking(move || heartbeat(&cfg, &bridge)).await {
                send(out, agent_message::Kind::Heartbeat(beat)).await;
            }
            let done = recorded(&id, Outcome::Succeeded, "", "status sent");
            send(out, agent_message::Kind::Result(done.to_proto())).await;
            return;
        }
        match ledger.find(&id).await {
            Ok(Some(done)) => {
                tracing::info!(command = %id, "command already run; sending its recorded result");
                send(out, agent_message::Kind::Result(done.to_proto())).await;
                return;
            }
            Ok(None) => {}
            Err(e) => {
                // Without the ledger a re-sent command could run twice:
                // refuse every command until the file is readable again.
                tracing::error!(command = %id, "{e}; command not run");
                let refused = recorded(&id, Outcome::Failed, "", format!("not run: {e}"));
                send(out, agent_message::Kind::Result(refused.to_proto())).await;
                return;
            }
        }
        let fresh = in_flight
            .lock()
            .map(|mut s| s.insert(id.clone()))
            .unwrap_or(true);
        if !fresh {
            tracing::info!(command = %id, "command is still running; its result will follow");
            return;
        }
        let result = match kind {
            controller_message::Kind::AgentUpgrade(u) => {
                // The restart would cut other commands short.
                let busy: Vec<String> = in_flight
                    .lock()
                    .map(|s| s.iter().filter(|i| **i != id).cloned().collect())
                    .unwrap_or_default();
                if busy.is_empty() {
                    upgrade_agent(config, ctl, replicas, &id, u, out).await
                } else {
                    recorded(
                        &id,
                        Outcome::Failed,
                        "",
                        format!(
                            "agent not upgraded: other commands are running on this node ({})",
                            busy.join(", ")
                        ),
                    )
                }
            }
            kind => run(config, ctl, replicas, &id, kind, out).await,
        };
        let r = result.to_proto();
        // Recorded before it stops counting as in flight: a re-send in between
        // finds one or the other, never neither.
        if let Err(e) = ledger.record(result).await {
            tracing::warn!(command = %id, "cannot record the command result: {e}");
        }
        if let Ok(mut s) = in_flight.lock() {
            s.remove(&id);
        }
        send(out, agent_message::Kind::Result(r)).await;
    }
}

/// Sends one message on the current session (with no session the message is
/// dropped: the controller re-sends the command after a reconnect and gets
/// the recorded result).
async fn send(out: &Outbox, kind: agent_message::Kind) {
    if let Some(tx) = out.sender() {
        let _ = tx.send(AgentMessage { kind: Some(kind) }).await;
    }
}

/// A progress line of command `id`, stamped now.
fn progress_kind(id: &str, step: &str, message: String) -> agent_message::Kind {
    agent_message::Kind::Progress(Progress {
        command_id: id.to_owned(),
        step: step.to_owned(),
        message: limits::truncate(&message, limits::MAX_MESSAGE).to_owned(),
        unix_time: time::OffsetDateTime::now_utc().unix_timestamp(),
    })
}

async fn progress(out: &Outbox, id: &str, step: &str, message: String) {
    send(out, progress_kind(id, step, message)).await;
}

fn recorded(id: &str, outcome: Outcome, release: &str, message: impl Into<String>) -> Recorded {
    Recorded {
        command_id: id.to_owned(),
        outcome,
        release_id: release.to_owned(),
        message: message.into(),
    }
}

/// Sends progress from synchronous code (a download's progress callback):
/// dropped when the session's queue is full, as a later line supersedes it.
fn progress_now(out: &Outbox, id: &str, step: &str, message: String) {
    if let Some(tx) = out.sender() {
        let _ = tx.try_send(AgentMessage {
            kind: Some(progress_kind(id, step, message)),
        });
    }
}

/// The recorded result of a deploy: the report of the release store, or
/// why it failed (`Err` of the outer result: the task itself failed).
fn deploy_outcome(
    id: &str,
    release_id: &str,
    result: Result<Result<DeployReport, String>, tokio::task::JoinError>,
) -> Recorded {
    match result {
        Ok(Ok(r)) if r.outcome == Outcome::Succeeded => recorded(
            id,
            Outcome::Succeeded,
            r.release.as_str(),
            format!(
                "{} ({}; {} files) in {:.0} ms{}",
                r.release,
                r.method,
                r.files,
                r.total_ms,
                r.health
                    .as_ref()
                    .map_or(String::new(), |h| format!("; healthy: {}", h.last.output))
            ),
        ),
        Ok(Ok(r)) => recorded(
            id,
            r.outcome,
            r.release.as_str(),
            format!(
                "{}; {}",
                r.failure.unwrap_or_default(),
                r.restored.unwrap_or_default()
            ),
        ),
        Ok(Err(e)) => recorded(id, Outcome::Failed, release_id, e),
        Err(e) => recorded(
            id,
            Outcome::Failed,
            release_id,
            format!("deploy task failed: {e}"),
        ),
    }
}

/// Where a deploy's artifact comes from.
#[derive(Debug)]
enum Source {
    /// The controller holds it: fetched by digest over the mTLS link, from
    /// the replica the session is on, else from the others.
    Controller {
        replicas: Replicas,
        /// The node's identity for the mTLS dial.
        state_dir: std::path::PathBuf,
    },
    /// The agent downloads it itself from this HTTPS URL.
    Url(String),
}

/// A deploy from the controller: the artifact is found in the app's
/// artifact cache by its digest or fetched into it from `source` — with
/// the cache pinned but the app *not* locked, so a rollback or restart
/// meanwhile works — then the app's lock is taken and the artifact
/// deployed (verified again under the lock). Fetch progress goes to the
/// controller. The fetch is plain async code; file work and the deploy
/// run on blocking threads.
async fn deploy_artifact(
    config: &Config,
    app: AppConfig,
    release: Option<ReleaseId>,
    source: Source,
    sha256: String,
    id: &str,
    out: &Outbox,
) -> Result<Result<DeployReport, String>, tokio::task::JoinError> {
    let from = match &source {
        Source::Controller { .. } => "the controller".to_owned(),
        Source::Url(url) => url.clone(),
    };
    // A bad digest or URL is refused before anything is fetched.
    let sha256 = match Sha256::parse(&sha256) {
        Ok(s) => s,
        Err(e) => return Ok(Err(e.to_string())),
    };
    if let Source::Url(url) = &source {
        if let Err(e) = download::parse_url(url) {
            return Ok(Err(e.to_string()));
        }
    }
    progress(
        out,
        id,
        "fetch",
        format!("downloading artifact {sha256} from {from}"),
    )
    .await;
    let store = Deployer::new(&app, &Bridge::current());
    // A busy app fails the deploy now rather than after the download; the
    // pin keeps prune out of the cache until the deploy holds the lock.
    let pinned = {
        let (store, release) = (store.clone(), release.clone());
        tokio::task::spawn_blocking(move || {
            store.check_idle("deploy", release.as_ref())?;
            store.pin_cache()
        })
        .await?
    };
    let pin = match pinned {
        Ok(p) => p,
        Err(e) => return Ok(Err(e.to_string())),
    };
    let cache = store.paths().cache.clone();
    let hit = {
        let (cache, sha256) = (cache.clone(), sha256.clone());
        tokio::task::spawn_blocking(move || cache::lookup(&cache, &sha256)).await?
    };
    let mut report = |line: String| progress_now(out, id, "fetch", line);
    // One cache check for both sources (the same digest deployed before is
    // not fetched again).
    let fetched = match hit {
        Err(e) => Err(e.to_string()),
        Ok(Some(hit)) => {
            report(format!(
                "artifact {sha256} is already cached; not fetching it from {from}"
            ));
            Ok(hit)
        }
        Ok(None) => match &source {
            Source::Url(url) => {
                download::fetch(url, &sha256, &cache, &config.artifacts, &mut report)
                    .await
                    .map_err(|e| format!("cannot download the artifact: {e}"))
            }
            Source::Controller {
                replicas,
                state_dir,
            } => {
                let started = tokio::time::Instant::now();
                loop {
                    let fetched = replicas::first_answer(replicas, "artifact fetch", |url| {
                        let (sha256, cache, state_dir) = (&sha256, &cache, &state_dir);
                        async move {
                            fetch_from_controller(
                                &url,
                                state_dir,
                                sha256,
                                id,
                                cache,
                                &config.artifacts,
                            )
                            .await
                        }
                    })
                    .await;
                    match fetched {
                        Err(LinkError::Fetch(FetchError::Unavailable(why)))
                            if started.elapsed() + FETCH_RETRY_EVERY <= FETCH_RETRY_FOR =>
                        {
                            report(format!(
                                "the controller cannot serve the artifact now ({why}); trying \
                                 again in {} s",
                                FETCH_RETRY_EVERY.as_secs()
                            ));
                            tokio::time::sleep(FETCH_RETRY_EVERY).await;
                        }
                        other => {
                            break other.map_err(|e| format!("cannot fetch the artifact: {e}"))
                        }
                    }
                }
            }
        },
    };
    let fetched = match fetched {
        Ok(f) => f,
        Err(e) => return Ok(Err(e)),
    };
    progress(
        out,
        id,
        "deploy",
        format!(
            "artifact verified ({} bytes{}); deploying",
            fetched.bytes,
            if fetched.cached { ", cached" } else { "" }
        ),
    )
    .await;
    tokio::task::spawn_blocking(move || {
        let mut session = store
            .begin("deploy", release.as_ref())
            .map_err(|e| e.to_string())?;
        // The app's lock keeps prune away from here on.
        drop(pin);
        session
            .deploy(&DeployRequest {
                artifact: fetched.path.clone(),
                sha256: Some(sha256),
                id: release,
                // Verified above (looked up or fetched) and pinned since.
                verified: Some(fetched),
            })
            .map_err(|e| e.to_string())
    })
    .await
}

/// Fetches artifact `sha256` from the controller over mTLS into the app's
/// artifact cache `cache` ([`crate::artifact::controller`]: the limits of
/// `limits`, everything checked before the file takes its name), on a
/// connection of its own, dialled within `[artifacts] connect_timeout`.
async fn fetch_from_controller(
    controller: &str,
    state_dir: &Path,
    sha256: &Sha256,
    command_id: &str,
    cache: &Path,
    limits: &ArtifactsConfig,
) -> Result<Fetched, LinkError> {
    let addr = tls::Target::parse(controller)?.authority;
    let channel = tokio::time::timeout(
        limits.connect_timeout,
        tls::mtls_channel(controller, state_dir),
    )
    .await
    .map_err(|_| LinkError::Idle {
        addr: addr.clone(),
        during: "while connecting",
        after: limits.connect_timeout,
    })??;
    Ok(
        crate::artifact::controller::fetch(channel, &addr, sha256, command_id, cache, limits)
            .await?,
    )
}

/// An agent upgrade ([`super::upgrade`]): the binary fetched by digest
/// into a directory next to the executable (size and sha256 checked),
/// moved beside it and run with `--version`, then swapped in and the
/// agent restarted. Returns only when nothing was swapped (the result
/// FAILED); on success this process is replaced, and the agent that comes
/// up answers the command.
async fn upgrade_agent(
    config: &Config,
    ctl: &ControllerConfig,
    replicas: &Replicas,
    id: &str,
    u: slipway_proto::v1::AgentUpgrade,
    out: &Outbox,
) -> Recorded {
    let failed = |why: String| {
        recorded(
            id,
            Outcome::Failed,
            "",
            format!("agent not upgraded: {why}"),
        )
    };
    let sha256 = match Sha256::parse(&u.sha256) {
        Ok(s) => s,
        Err(e) => return failed(e.to_string()),
    };
    let exe = match super::upgrade::own_exe() {
        Ok(e) => e,
        Err(e) => return failed(e),
    };
    let state_dir = ctl.state_dir.clone();
    {
        let dir = state_dir.clone();
        match tokio::task::spawn_blocking(move || super::upgrade::check_idle(&dir)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return failed(e),
            Err(e) => return failed(format!("upgrade task failed: {e}")),
        }
    }
    progress(
        out,
        id,
        "fetch",
        format!(
            "downloading agent binary {sha256} ({} bytes) from the controller",
            u.size
        ),
    )
    .await;
    let cache = super::upgrade::download_dir(&exe);
    // An agent binary is held to [artifacts] too, and to its own limit.
    let mut limits = config.artifacts.clone();
    limits.max_size = limits.max_size.min(slipway_proto::limits::MAX_AGENT_BINARY);
    if let Err(e) = tokio::fs::create_dir_all(&cache).await {
        return failed(format!("cannot create {}: {e}", cache.display()));
    }
    // From the replica the session is on, else from the others.
    let fetched = replicas::first_answer(replicas, "agent binary fetch", |url| {
        let (state_dir, sha256, cache, limits) = (&state_dir, &sha256, &cache, &limits);
        async move {
            let addr = tls::Target::parse(&url)?.authority;
            let channel =
                tokio::time::timeout(limits.connect_timeout, tls::mtls_channel(&url, state_dir))
                    .await
                    .map_err(|_| LinkError::Idle {
                        addr: addr.clone(),
                        during: "while connecting",
                        after: limits.connect_timeout,
                    })??;
            Ok(crate::artifact::controller::fetch_agent_binary(
                channel, &addr, sha256, id, cache, limits,
            )
            .await?)
        }
    })
    .await;
    let fetched = match fetched {
        Ok(f) => f,
        Err(e) => {
            let _ = tokio::fs::remove_dir_all(&cache).await;
            return failed(format!("cannot fetch the agent binary: {e}"));
        }
    };
    if fetched.bytes != u.size {
        let _ = tokio::fs::remove_dir_all(&cache).await;
        return failed(format!(
            "the agent binary {sha256} has {} bytes, the command says {}",
            fetched.bytes, u.size
        ));
    }
    progress(
        out,
        id,
        "verify",
        format!(
            "agent binary verified ({} bytes); checking it runs (--version)",
            fetched.bytes
        ),
    )
    .await;
    let staged = {
        let (exe, expected, cache) = (exe.clone(), u.version.clone(), cache.clone());
        let path = fetched.path.clone();
        tokio::task::spawn_blocking(move || {
            let staged = super::upgrade::stage(&path, &exe, &expected);
            // Nothing is kept in the download directory.
            let _ = std::fs::remove_dir_all(&cache);
            staged
        })
        .await
    };
    let (new, version) = match staged {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return failed(e),
        Err(e) => return failed(format!("upgrade task failed: {e}")),
    };
    let from = crate::version::current();
    progress(
        out,
        id,
        "restart",
        format!("swapping agent {from} for {version} and restarting"),
    )
    .await;
    // Let the progress line leave before the process is replaced.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let staged = super::upgrade::Staged {
        command_id: id.to_owned(),
        sha256,
        version,
        new,
        exe,
        state_dir,
        deadline: std::time::Duration::from_secs(u64::from(u.commit_deadline_secs)),
    };
    let why = tokio::task::spawn_blocking(move || super::upgrade::swap_and_restart(staged, from))
        .await
        .unwrap_or_else(|e| format!("upgrade task failed: {e}"));
    failed(why)
}

/// Restarts `app`'s current release through its driver behind the health
/// gate, as `operation` ("restart", "start") under the app's lock.
async fn restart_current(
    id: &str,
    app: AppConfig,
    operation: &'static str,
    bridge: Bridge,
) -> Recorded {
    let result = tokio::task::spawn_blocking(move || {
        let store = Deployer::new(&app, &bridge);
        let mut session = store.begin(operation, None)?;
        session.restart()
    })
    .await;
    match result {
        Ok(Ok((release, a, _))) => recorded(id, Outcome::Succeeded, release.as_str(), a.detail),
        Ok(Err(e)) => recorded(id, Outcome::Failed, "", e.to_string()),
        Err(e) => recorded(
            id,
            Outcome::Failed,
            "",
            format!("{operation} task failed: {e}"),
        ),
    }
}

/// Writes a version of the app's environment and restarts the app with it
/// behind its gate (see [`crate::deploy::Session::set_env`]). The content
/// is checked first: its sha256 and that it parses as a `.env` file.
/// Results name the version only, never a value.
async fn set_env(
    id: &str,
    app: AppConfig,
    e: slipway_proto::v1::SetEnv,
    bridge: Bridge,
    out: &Outbox,
) -> Recorded {
    let version = e.version;
    let digest = Sha256::of_bytes(e.content.as_bytes());
    if digest.as_str() != e.sha256.to_ascii_lowercase() {
        return recorded(
            id,
            Outcome::Failed,
            "",
            format!(
                "env v{version} refused: its content does not match the sha256 sent ({})",
                e.sha256
            ),
        );
    }
    if let Err(err) = crate::envfile::parse(Path::new("shared/.env"), &e.content) {
        return recorded(
            id,
            Outcome::Failed,
            "",
            format!("env v{version} refused: {err}"),
        );
    }
    progress(out, id, "env", format!("writing env v{version}")).await;
    let result = tokio::task::spawn_blocking(move || {
        let store = Deployer::new(&app, &bridge);
        let mut session = store.begin("env", None)?;
        session.set_env(e.content.as_bytes(), version)
    })
    .await;
    use crate::deploy::EnvChange;
    match result {
        Ok(Ok(EnvChange::Unchanged)) => recorded(
            id,
            Outcome::Succeeded,
            "",
            format!("env v{version} unchanged on this node; the app was not restarted"),
        ),
        Ok(Ok(EnvChange::Applied(done))) => recorded(id, Outcome::Succeeded, "", done),
        Ok(Ok(EnvChange::RolledBack { why, restored })) => recorded(
            id,
            Outcome::RolledBack,
            "",
            format!("env v{version} failed: {why}; the previous env is back: {restored}"),
        ),
        Ok(Err(err)) => recorded(id, Outcome::Failed, "", format!("env v{version}: {err}")),
        Err(err) => recorded(id, Outcome::Failed, "", format!("env task failed: {err}")),
    }
}

async fn run(
    config: &Config,
    ctl: &ControllerConfig,
    replicas: &Replicas,
    id: &str,
    kind: controller_message::Kind,
    out: &Outbox,
) -> Recorded {
    use controller_message::Kind;
    let app_of = |name: &str| config.app(name).cloned().map_err(|e| e.to_string());
    // The app's driver blocks on this runtime from the blocking threads below.
    let bridge = Bridge::current();
    match kind {
        Kind::Deploy(d) => {
            let app = match app_of(&d.app) {
                Ok(a) => a,
                Err(e) => return recorded(id, Outcome::Failed, &d.release_id, e),
            };
            let release = match (!d.release_id.is_empty())
                .then(|| ReleaseId::new(&d.release_id))
                .transpose()
            {
                Ok(r) => r,
                Err(e) => return recorded(id, Outcome::Failed, &d.release_id, e.to_string()),
            };
            let source = if d.artifact_url.is_empty() {
                Source::Controller {
                    replicas: replicas.clone(),
                    state_dir: ctl.state_dir.clone(),
                }
            } else {
                Source::Url(d.artifact_url.clone())
            };
            let result = deploy_artifact(
                config,
                app,
                release,
                source,
                d.artifact_sha256.clone(),
                id,
                out,
            )
            .await;
            deploy_outcome(id, &d.release_id, result)
        }
        Kind::Rollback(r) => {
            let app = match app_of(&r.app) {
                Ok(a) => a,
                Err(e) => return recorded(id, Outcome::Failed, &r.to_release_id, e),
            };
            let to = match (!r.to_release_id.is_empty())
                .then(|| ReleaseId::new(&r.to_release_id))
                .transpose()
            {
                Ok(t) => t,
                Err(e) => return recorded(id, Outcome::Failed, &r.to_release_id, e.to_string()),
            };
            progress(out, id, "rollback", "switching current".into()).await;
            let actor = format!("the controller (command {id})");
            let result = tokio::task::spawn_blocking(move || {
                let store = Deployer::new(&app, &bridge);
                let mut session = store.begin("rollback", to.as_ref())?;
                session.set_actor(actor);
                session.rollback(to.as_ref())
            })
            .await;
            match result {
                Ok(Ok(rep)) => match rep.problem {
                    None => recorded(
                        id,
                        Outcome::Succeeded,
                        rep.to.as_str(),
                        format!("current is now {}", rep.to),
                    ),
                    Some(p) => recorded(
                        id,
                        Outcome::Failed,
                        rep.to.as_str(),
                        format!(
                            "current is now {} but it is not serving healthily: {p}",
                            rep.to
                        ),
                    ),
                },
                Ok(Err(e)) => recorded(id, Outcome::Failed, &r.to_release_id, e.to_string()),
                Err(e) => recorded(
                    id,
                    Outcome::Failed,
                    &r.to_release_id,
                    format!("rollback task failed: {e}"),
                ),
            }
        }
        Kind::Prune(p) => {
            let app = match app_of(&p.app) {
                Ok(a) => a,
                Err(e) => return recorded(id, Outcome::Failed, "", e),
            };
            let keep = if p.keep == 0 {
                app.keep
            } else {
                p.keep as usize
            };
            let result = tokio::task::spawn_blocking(move || {
                let store = Deployer::new(&app, &bridge);
                let mut session = store.begin("prune", None)?;
                session.prune(keep)
            })
            .await;
            match result {
                Ok(Ok(rep)) => {
                    let ids: Vec<&str> = rep.store.removed.iter().map(ReleaseId::as_str).collect();
                    recorded(
                        id,
                        Outcome::Succeeded,
                        "",
                        if ids.is_empty() {
                            "removed no release".to_owned()
                        } else {
                            format!("removed {} release(s): {}", ids.len(), ids.join(", "))
                        },
                    )
                }
                Ok(Err(e)) => recorded(id, Outcome::Failed, "", e.to_string()),
                Err(e) => recorded(id, Outcome::Failed, "", format!("prune task failed: {e}")),
            }
        }
        Kind::Restart(r) => match app_of(&r.app) {
            Ok(app) => restart_current(id, app, "restart", bridge).await,
            Err(e) => recorded(id, Outcome::Failed, "", e),
        },
        Kind::StopApp(r) => {
            let app = match app_of(&r.app) {
                Ok(a) => a,
                Err(e) => return recorded(id, Outcome::Failed, "", e),
            };
            let by = format!("the controller (command {id})");
            let result = tokio::task::spawn_blocking(move || {
                let store = Deployer::new(&app, &bridge);
                let mut session = store.begin("stop", None)?;
                let current = session.snapshot()?.current;
                session.stop(&by).map(|done| (current, done))
            })
            .await;
            match result {
                Ok(Ok((current, done))) => recorded(
                    id,
                    Outcome::Succeeded,
                    current.as_ref().map_or("", ReleaseId::as_str),
                    done,
                ),
                Ok(Err(e)) => recorded(id, Outcome::Failed, "", e.to_string()),
                Err(e) => recorded(id, Outcome::Failed, "", format!("stop task failed: {e}")),
            }
        }
        // A start (clearing a stop on purpose) is a restart of the current
        // release under its own name.
        Kind::StartApp(r) => match app_of(&r.app) {
            Ok(app) => restart_current(id, app, "start", bridge).await,
            Err(e) => recorded(id, Outcome::Failed, "", e),
        },
        Kind::SetEnv(e) => match app_of(&e.app) {
            Ok(app) => set_env(id, app, e, bridge, out).await,
            Err(err) => recorded(id, Outcome::Failed, "", err),
        },
        // `execute` answers status requests, runs agent upgrades itself
        // and ignores the rest.
        Kind::StatusRequest(_)
        | Kind::Welcome(_)
        | Kind::ArtifactChunk(_)
        | Kind::NodeEventAck(_)
        | Kind::TrustBundle(_) => recorded(id, Outcome::Failed, "", "not a command"),
        Kind::AgentUpgrade(_) => recorded(
            id,
            Outcome::Failed,
            "",
            "agent upgrade refused: not run beside other commands",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::ledger::Ledger;
    use slipway_proto::v1::{CommandResult, Outcome as Wire, Prune, Rollback, StatusRequest};

    fn setup() -> (tempfile::TempDir, Config, ControllerConfig) {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[apps.web]\nroot = \"{}\"\n",
            dir.path().join("app").display()
        );
        let config = Config::parse(&dir.path().join("agent.toml"), &text).unwrap();
        let ctl = ControllerConfig {
            urls: vec!["127.0.0.1:1".into()],
            state_dir: dir.path().join("state"),
        };
        std::fs::create_dir_all(&ctl.state_dir).unwrap();
        (dir, config, ctl)
    }

    /// Runs one command on a runner of its own (so anything remembered
    /// between two calls went through the ledger file).
    async fn run_one(
        config: &Config,
        ctl: &ControllerConfig,
        kind: controller_message::Kind,
    ) -> Vec<AgentMessage> {
        run_on(&Commands::new(config.clone(), ctl.clone()), kind).await
    }

    async fn run_on(commands: &Commands, kind: controller_message::Kind) -> Vec<AgentMessage> {
        let (tx, mut rx) = mpsc::channel(16);
        commands.attach(tx);
        commands
            .execute(ControllerMessage { kind: Some(kind) })
            .await;
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.push(m);
        }
        out
    }

    fn result_of(msgs: &[AgentMessage]) -> CommandResult {
        msgs.iter()
            .find_map(|m| match &m.kind {
                Some(agent_message::Kind::Result(r)) => Some(r.clone()),
                _ => None,
            })
            .unwrap()
    }

    #[tokio::test]
    async fn a_command_id_is_run_once_and_its_result_replayed() {
        let (_dir, config, ctl) = setup();
        let rollback = controller_message::Kind::Rollback(Rollback {
            command_id: "c-1".into(),
            app: "web".into(),
            to_release_id: String::new(),
        });
        let first = result_of(&run_one(&config, &ctl, rollback.clone()).await);
        assert_eq!(first.outcome, Wire::Failed as i32);
        assert!(
            first.message.contains("no good release"),
            "{}",
            first.message
        );
        // The ledger answers the re-send with the same result, from the
        // same runner and from a new one (after a restart).
        let commands = Commands::new(config.clone(), ctl.clone());
        let again = result_of(&run_on(&commands, rollback.clone()).await);
        assert_eq!(again, first);
        let again = result_of(&run_on(&commands, rollback).await);
        assert_eq!(again, first);
        let on_disk = Ledger::load(&Ledger::path(&ctl.state_dir)).unwrap();
        assert_eq!(on_disk.results.len(), 1);
        assert_eq!(on_disk.results[0].outcome, Outcome::Failed);
    }

    #[tokio::test]
    async fn a_command_outside_the_field_rules_is_refused_naming_the_field() {
        let (dir, config, ctl) = setup();
        let hostile = controller_message::Kind::Rollback(Rollback {
            command_id: "c-9".into(),
            app: "web".into(),
            to_release_id: "../../etc".into(),
        });
        let refused = result_of(&run_one(&config, &ctl, hostile).await);
        assert_eq!(refused.outcome, Wire::Failed as i32);
        assert!(
            refused
                .message
                .starts_with("command refused: rollback.to_release_id: invalid release id"),
            "{}",
            refused.message
        );
        // Nothing ran, so nothing was recorded.
        assert!(Ledger::load(&Ledger::path(&ctl.state_dir))
            .map(|l| l.results.is_empty())
            .unwrap_or(true));
        assert!(!dir.path().join("app/releases").exists());
        // A result the agent sends stays within the controller's limit.
        let long = recorded("c-1", Outcome::Failed, "", "x".repeat(100_000));
        assert_eq!(long.to_proto().message.len(), limits::MAX_MESSAGE);
    }

    /// The ledger's spellings are the ones every earlier agent wrote, and
    /// an outcome this agent does not know is an error naming the file —
    /// not a result silently read as failed, nor a file overwritten.
    #[tokio::test]
    async fn ledgers_keep_their_spellings_and_an_unknown_outcome_is_an_error() {
        let (_dir, config, ctl) = setup();
        let path = Ledger::path(&ctl.state_dir);
        let entry = |id: &str, outcome: &str| {
            format!(
                r#"{{"command_id": "{id}", "outcome": "{outcome}", "release_id": "r", "message": "m"}}"#
            )
        };
        let old = format!(
            r#"{{"results": [{}, {}, {}]}}"#,
            entry("c-ok", "succeeded"),
            entry("c-back", "rolled_back"),
            entry("c-bad", "failed")
        );
        std::fs::write(&path, &old).unwrap();
        let ledger = Ledger::load(&path).unwrap();
        let outcomes: Vec<Outcome> = ledger.results.iter().map(|r| r.outcome).collect();
        assert_eq!(
            outcomes,
            [Outcome::Succeeded, Outcome::RolledBack, Outcome::Failed]
        );
        let json = serde_json::to_string(&ledger).unwrap();
        for word in ["\"succeeded\"", "\"rolled_back\"", "\"failed\""] {
            assert!(json.contains(word), "{json}");
        }
        // A re-sent command is answered from the old file, on the wire too.
        let back = controller_message::Kind::Prune(Prune {
            command_id: "c-back".into(),
            app: "web".into(),
            keep: 1,
        });
        let r = result_of(&run_one(&config, &ctl, back).await);
        assert_eq!(r.outcome, Wire::RolledBack as i32);

        // A misspelt outcome: every command is refused with the file's
        // name, nothing runs, and the file is left for the operator.
        let typo = format!(r#"{{"results": [{}]}}"#, entry("c-ok", "sucess"));
        std::fs::write(&path, &typo).unwrap();
        let err = Ledger::load(&path).unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("sucess"),
            "{err}"
        );
        let prune = controller_message::Kind::Prune(Prune {
            command_id: "c-new".into(),
            app: "web".into(),
            keep: 1,
        });
        let r = result_of(&run_one(&config, &ctl, prune).await);
        assert_eq!(r.outcome, Wire::Failed as i32);
        assert!(
            r.message.contains(&path.display().to_string()) && r.message.contains("sucess"),
            "{}",
            r.message
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), typo);
    }

    fn deploy_of(id: &str, sha: &str) -> controller_message::Kind {
        controller_message::Kind::Deploy(slipway_proto::v1::Deploy {
            command_id: id.into(),
            app: "web".into(),
            release_id: format!("r-{id}"),
            artifact_sha256: sha.into(),
            ..Default::default()
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cached_digest_is_not_fetched_from_the_controller_again() {
        let (dir, config, ctl) = setup();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("VERSION"), "v1").unwrap();
        let artifact = dir.path().join("v1.tar.gz");
        crate::artifact::pack_dir(&src, &artifact, crate::artifact::Compression::Gzip).unwrap();
        let sha = Sha256::of_file(&artifact).unwrap().into_string();

        // Not cached: the controller path is taken and fails (this node was
        // never enrolled), leaving nothing in the cache.
        let r = result_of(&run_one(&config, &ctl, deploy_of("c-4", &sha)).await);
        assert_eq!(r.outcome, Wire::Failed as i32);
        assert!(
            r.message.contains("cannot fetch the artifact"),
            "{}",
            r.message
        );
        let cache = dir.path().join("app/.slipway/cache");
        assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 0);

        // Cached (an earlier deploy of the same digest): deployed without
        // the controller.
        std::fs::copy(&artifact, cache.join(&sha)).unwrap();
        let msgs = run_one(&config, &ctl, deploy_of("c-5", &sha.to_uppercase())).await;
        let r = result_of(&msgs);
        assert_eq!(r.outcome, Wire::Succeeded as i32, "{}", r.message);
        assert_eq!(r.release_id, "r-c-5");
        assert!(msgs.iter().any(|m| matches!(&m.kind,
            Some(agent_message::Kind::Progress(p)) if p.message.contains("already cached"))));
        let current = std::fs::read_to_string(dir.path().join("app/current/VERSION")).unwrap();
        assert_eq!(current, "v1");

        // A digest that is not one is refused before anything is fetched.
        let r = result_of(&run_one(&config, &ctl, deploy_of("c-6", "abc")).await);
        assert!(
            r.message
                .contains(r#"artifact_sha256: "abc" is not a sha256 (64 lowercase hex digits)"#),
            "{}",
            r.message
        );
    }

    #[tokio::test]
    async fn unknown_apps_and_status_requests() {
        let (_dir, config, ctl) = setup();
        let prune = controller_message::Kind::Prune(Prune {
            command_id: "c-2".into(),
            app: "api".into(),
            keep: 3,
        });
        let r = result_of(&run_one(&config, &ctl, prune).await);
        assert_eq!(r.outcome, Wire::Failed as i32);
        assert!(
            r.message.contains("\"api\" is not declared"),
            "{}",
            r.message
        );
        let status = controller_message::Kind::StatusRequest(StatusRequest {
            command_id: "c-3".into(),
        });
        let msgs = run_one(&config, &ctl, status).await;
        assert!(msgs
            .iter()
            .any(|m| matches!(m.kind, Some(agent_message::Kind::Heartbeat(_)))));
        assert_eq!(result_of(&msgs).outcome, Wire::Succeeded as i32);
    }
}
