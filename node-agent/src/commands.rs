//! Commands from the controller, run on this node.
//!
//! Each command carries an id and is idempotent here: its result is recorded
//! in `<state_dir>/commands.json`, and a command id seen before is answered
//! with the recorded result instead of being run twice (a controller that
//! re-sends after a reconnect must not deploy twice). Progress is streamed as
//! it happens; every command ends with exactly one `CommandResult`.
//!
//! The work itself is the same code as the node-local CLI: a [`Store`]
//! session (lock, journal, recovery) for deploy, rollback, prune and restart.
//! A deploy's artifact is fetched from the controller by digest or — when
//! the command carries `artifact_url` — downloaded by the agent itself
//! ([`crate::download`]); either way into the app's artifact cache under its
//! sha256, with the app locked, and not at all when the cache already holds
//! that digest.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use slipway_proto::v1::{
    agent_message, controller_message, AgentMessage, CommandResult, ControllerMessage, Outcome,
    Progress,
};
use tokio::sync::mpsc;

use crate::bridge::Bridge;
use crate::config::{AppConfig, Config, ControllerConfig};
use crate::download;
use crate::durable;
use crate::link;
use crate::release::{DeployReport, DeployRequest, ReleaseId, Store};

/// Results kept for idempotency: enough for any realistic re-send window.
const KEEP_RESULTS: usize = 500;

/// A recorded result, as kept in `commands.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub command_id: String,
    /// `succeeded`, `failed`, `rolled_back`.
    pub outcome: String,
    pub release_id: String,
    pub message: String,
}

impl Recorded {
    fn to_proto(&self) -> CommandResult {
        CommandResult {
            command_id: self.command_id.clone(),
            outcome: match self.outcome.as_str() {
                "succeeded" => Outcome::Succeeded,
                "rolled_back" => Outcome::RolledBack,
                _ => Outcome::Failed,
            } as i32,
            release_id: self.release_id.clone(),
            message: self.message.clone(),
        }
    }
}

/// The results of commands already run, newest last.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Ledger {
    pub results: VecDeque<Recorded>,
}

impl Ledger {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("commands.json")
    }

    pub fn load(state_dir: &Path) -> Self {
        durable::read_json(&Self::path(state_dir)).unwrap_or_default()
    }

    fn find(&self, id: &str) -> Option<&Recorded> {
        self.results.iter().find(|r| r.command_id == id)
    }

    fn record(state_dir: &Path, r: Recorded) {
        // Commands for different apps finish concurrently: without this,
        // two of them could each load the file, add their own result and
        // write, and the first write would be lost.
        static WRITER: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _writer = WRITER.lock();
        let mut ledger = Self::load(state_dir);
        ledger.results.retain(|x| x.command_id != r.command_id);
        ledger.results.push_back(r);
        while ledger.results.len() > KEEP_RESULTS {
            ledger.results.pop_front();
        }
        let path = Self::path(state_dir);
        if let Err(e) = durable::write_json(&path, &ledger) {
            tracing::warn!(path = %path.display(), error = %e, "cannot record a command result");
        }
    }
}

/// Where command output goes: the *current* session's stream. A command
/// outlives the session it came on (a reconnect mid-deploy); its progress and
/// result then go to the new session, which the controller expects.
#[derive(Debug, Clone, Default)]
pub struct Outbox(std::sync::Arc<std::sync::Mutex<Option<mpsc::Sender<AgentMessage>>>>);

impl Outbox {
    /// Points the outbox at a new session's stream.
    pub fn attach(&self, tx: mpsc::Sender<AgentMessage>) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(tx);
        }
    }

    fn sender(&self) -> Option<mpsc::Sender<AgentMessage>> {
        self.0.lock().ok().and_then(|s| s.clone())
    }
}

/// Command ids running right now: a re-send of one of them is not run again
/// (its result will reach the current session when it is done).
fn in_flight() -> &'static std::sync::Mutex<std::collections::HashSet<String>> {
    static SET: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<String>>> =
        std::sync::OnceLock::new();
    SET.get_or_init(Default::default)
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
        message,
        unix_time: time::OffsetDateTime::now_utc().unix_timestamp(),
    })
}

async fn progress(out: &Outbox, id: &str, step: &str, message: String) {
    send(out, progress_kind(id, step, message)).await;
}

/// Runs the command in `msg` (if it is one) and reports on `out`.
pub async fn execute(config: Config, ctl: ControllerConfig, msg: ControllerMessage, out: Outbox) {
    let Some(kind) = msg.kind else { return };
    let id = match &kind {
        controller_message::Kind::Deploy(d) => d.command_id.clone(),
        controller_message::Kind::Rollback(r) => r.command_id.clone(),
        controller_message::Kind::Prune(p) => p.command_id.clone(),
        controller_message::Kind::StatusRequest(s) => s.command_id.clone(),
        controller_message::Kind::Restart(r) => r.command_id.clone(),
        controller_message::Kind::Welcome(_) => return,
        controller_message::Kind::ArtifactChunk(_) => {
            tracing::warn!("inline artifact chunks are not used by this agent (it fetches artifacts by digest)");
            return;
        }
    };
    if id.is_empty() {
        tracing::warn!("controller command without an id ignored");
        return;
    }
    if let controller_message::Kind::StatusRequest(_) = kind {
        // Answered with a fresh heartbeat: it changes nothing, so asking
        // again is harmless and it is neither recorded nor de-duplicated.
        let cfg = config.clone();
        let bridge = Bridge::current();
        if let Ok(beat) =
            tokio::task::spawn_blocking(move || crate::uplink::heartbeat(&cfg, &bridge)).await
        {
            send(&out, agent_message::Kind::Heartbeat(beat)).await;
        }
        let done = recorded(&id, "succeeded", "", "status sent");
        send(&out, agent_message::Kind::Result(done.to_proto())).await;
        return;
    }
    if let Some(done) = Ledger::load(&ctl.state_dir).find(&id).cloned() {
        tracing::info!(command = %id, "command already run; sending its recorded result");
        send(&out, agent_message::Kind::Result(done.to_proto())).await;
        return;
    }
    let fresh = in_flight()
        .lock()
        .map(|mut s| s.insert(id.clone()))
        .unwrap_or(true);
    if !fresh {
        tracing::info!(command = %id, "command is still running; its result will follow");
        return;
    }
    let result = run(&config, &ctl, &id, kind, &out).await;
    let r = result.to_proto();
    // Recorded before it stops counting as in flight: a re-send in between
    // finds one or the other, never neither.
    Ledger::record(&ctl.state_dir, result);
    if let Ok(mut s) = in_flight().lock() {
        s.remove(&id);
    }
    send(&out, agent_message::Kind::Result(r)).await;
}

fn recorded(id: &str, outcome: &str, release: &str, message: impl Into<String>) -> Recorded {
    Recorded {
        command_id: id.to_owned(),
        outcome: outcome.to_owned(),
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
        Ok(Ok(r)) if r.outcome == "succeeded" => recorded(
            id,
            "succeeded",
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
            "rolled_back",
            r.release.as_str(),
            format!(
                "{}; {}",
                r.failure.unwrap_or_default(),
                r.restored.unwrap_or_default()
            ),
        ),
        Ok(Err(e)) => recorded(id, "failed", release_id, e),
        Err(e) => recorded(id, "failed", release_id, format!("deploy task failed: {e}")),
    }
}

/// Where a deploy's artifact comes from.
#[derive(Debug)]
enum Source {
    /// The controller holds it: fetched by digest over the mTLS link.
    Controller(ControllerConfig),
    /// The agent downloads it itself from this HTTPS URL.
    Url(String),
}

/// A deploy from the controller: under the app's lock (so nothing prunes
/// the cache in between), the artifact is found in the app's artifact cache
/// by its digest or fetched into it from `source`, then deployed. Fetch
/// progress goes to the controller.
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
        Source::Controller(_) => "the controller".to_owned(),
        Source::Url(url) => url.clone(),
    };
    progress(
        out,
        id,
        "fetch",
        format!("downloading artifact {sha256} from {from}"),
    )
    .await;
    let settings = config.artifacts.clone();
    let handle = tokio::runtime::Handle::current();
    let out = out.clone();
    let id = id.to_owned();
    tokio::task::spawn_blocking(move || {
        // A bad digest or URL is refused before the lock is taken.
        let sha256 = download::normalize_sha256(&sha256).map_err(|e| e.to_string())?;
        if let Source::Url(url) = &source {
            download::parse_url(url).map_err(|e| e.to_string())?;
        }
        let store = Store::new(&app, &Bridge::from(handle.clone()));
        let mut session = store
            .begin("deploy", release.as_ref())
            .map_err(|e| e.to_string())?;
        let cache = &store.paths().cache;
        let mut report = |line: String| progress_now(&out, &id, "fetch", line);
        // One cache check for both sources (the same digest deployed before
        // is not fetched again). This is a blocking-pool thread: waiting on
        // the runtime is allowed.
        let fetched = match download::cached(cache, &sha256).map_err(|e| e.to_string())? {
            Some(hit) => {
                report(format!(
                    "artifact {sha256} is already cached; not fetching it from {from}"
                ));
                hit
            }
            None => match &source {
                Source::Url(url) => handle
                    .block_on(download::fetch(url, &sha256, cache, &settings, &mut report))
                    .map_err(|e| format!("cannot download the artifact: {e}"))?,
                Source::Controller(ctl) => {
                    let dest = cache.join(&sha256);
                    let bytes = handle
                        .block_on(link::fetch_artifact(
                            &ctl.url,
                            &ctl.state_dir,
                            &sha256,
                            &id,
                            &dest,
                        ))
                        .map_err(|e| format!("cannot fetch the artifact: {e}"))?;
                    download::Fetched {
                        path: dest,
                        bytes,
                        cached: false,
                    }
                }
            },
        };
        progress_now(
            &out,
            &id,
            "deploy",
            format!(
                "artifact verified ({} bytes{}); deploying",
                fetched.bytes,
                if fetched.cached { ", cached" } else { "" }
            ),
        );
        session
            .deploy(&DeployRequest {
                artifact: fetched.path,
                sha256: Some(sha256),
                id: release,
            })
            .map_err(|e| e.to_string())
    })
    .await
}

async fn run(
    config: &Config,
    ctl: &ControllerConfig,
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
                Err(e) => return recorded(id, "failed", &d.release_id, e),
            };
            let release = match (!d.release_id.is_empty())
                .then(|| ReleaseId::new(&d.release_id))
                .transpose()
            {
                Ok(r) => r,
                Err(e) => return recorded(id, "failed", &d.release_id, e.to_string()),
            };
            let source = if d.artifact_url.is_empty() {
                Source::Controller(ctl.clone())
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
                Err(e) => return recorded(id, "failed", &r.to_release_id, e),
            };
            let to = match (!r.to_release_id.is_empty())
                .then(|| ReleaseId::new(&r.to_release_id))
                .transpose()
            {
                Ok(t) => t,
                Err(e) => return recorded(id, "failed", &r.to_release_id, e.to_string()),
            };
            progress(out, id, "rollback", "switching current".into()).await;
            let result = tokio::task::spawn_blocking(move || {
                let store = Store::new(&app, &bridge);
                let mut session = store.begin("rollback", to.as_ref())?;
                session.rollback(to.as_ref())
            })
            .await;
            match result {
                Ok(Ok(rep)) => match rep.problem {
                    None => recorded(
                        id,
                        "succeeded",
                        rep.to.as_str(),
                        format!("current is now {}", rep.to),
                    ),
                    Some(p) => recorded(
                        id,
                        "failed",
                        rep.to.as_str(),
                        format!(
                            "current is now {} but it is not serving healthily: {p}",
                            rep.to
                        ),
                    ),
                },
                Ok(Err(e)) => recorded(id, "failed", &r.to_release_id, e.to_string()),
                Err(e) => recorded(
                    id,
                    "failed",
                    &r.to_release_id,
                    format!("rollback task failed: {e}"),
                ),
            }
        }
        Kind::Prune(p) => {
            let app = match app_of(&p.app) {
                Ok(a) => a,
                Err(e) => return recorded(id, "failed", "", e),
            };
            let keep = if p.keep == 0 {
                app.keep
            } else {
                p.keep as usize
            };
            let result = tokio::task::spawn_blocking(move || {
                let store = Store::new(&app, &bridge);
                let mut session = store.begin("prune", None)?;
                session.prune(keep)
            })
            .await;
            match result {
                Ok(Ok(rep)) => {
                    let ids: Vec<&str> = rep.removed.iter().map(ReleaseId::as_str).collect();
                    recorded(
                        id,
                        "succeeded",
                        "",
                        if ids.is_empty() {
                            "removed no release".to_owned()
                        } else {
                            format!("removed {} release(s): {}", ids.len(), ids.join(", "))
                        },
                    )
                }
                Ok(Err(e)) => recorded(id, "failed", "", e.to_string()),
                Err(e) => recorded(id, "failed", "", format!("prune task failed: {e}")),
            }
        }
        Kind::Restart(r) => {
            let app = match app_of(&r.app) {
                Ok(a) => a,
                Err(e) => return recorded(id, "failed", "", e),
            };
            let result = tokio::task::spawn_blocking(move || {
                let store = Store::new(&app, &bridge);
                let mut session = store.begin("restart", None)?;
                session.restart()
            })
            .await;
            match result {
                Ok(Ok((release, a, _))) => recorded(id, "succeeded", release.as_str(), a.detail),
                Ok(Err(e)) => recorded(id, "failed", "", e.to_string()),
                Err(e) => recorded(id, "failed", "", format!("restart task failed: {e}")),
            }
        }
        // `execute` answers status requests and ignores the rest.
        Kind::StatusRequest(_) | Kind::Welcome(_) | Kind::ArtifactChunk(_) => {
            recorded(id, "failed", "", "not a command")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slipway_proto::v1::{Prune, Rollback, StatusRequest};

    fn setup() -> (tempfile::TempDir, Config, ControllerConfig) {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "[apps.web]\nroot = \"{}\"\n",
            dir.path().join("app").display()
        );
        let config = Config::parse(&dir.path().join("agent.toml"), &text).unwrap();
        let ctl = ControllerConfig {
            url: "127.0.0.1:1".into(),
            state_dir: dir.path().join("state"),
        };
        std::fs::create_dir_all(&ctl.state_dir).unwrap();
        (dir, config, ctl)
    }

    async fn run_one(
        config: &Config,
        ctl: &ControllerConfig,
        kind: controller_message::Kind,
    ) -> Vec<AgentMessage> {
        let (tx, mut rx) = mpsc::channel(16);
        let out = Outbox::default();
        out.attach(tx);
        execute(
            config.clone(),
            ctl.clone(),
            ControllerMessage { kind: Some(kind) },
            out,
        )
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
        assert_eq!(first.outcome, Outcome::Failed as i32);
        assert!(
            first.message.contains("no good release"),
            "{}",
            first.message
        );
        // The ledger answers the re-send with the same result.
        let again = result_of(&run_one(&config, &ctl, rollback).await);
        assert_eq!(again, first);
        assert_eq!(Ledger::load(&ctl.state_dir).results.len(), 1);
    }

    #[test]
    fn results_recorded_concurrently_are_all_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::thread::scope(|scope| {
            for t in 0..8 {
                let state_dir = dir.path();
                scope.spawn(move || {
                    for i in 0..10 {
                        Ledger::record(
                            state_dir,
                            recorded(&format!("c-{t}-{i}"), "succeeded", "", "done"),
                        );
                    }
                });
            }
        });
        assert_eq!(Ledger::load(dir.path()).results.len(), 80);
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
        let sha = crate::release::hash_file(&artifact).unwrap();

        // Not cached: the controller path is taken and fails (this node was
        // never enrolled), leaving nothing in the cache.
        let r = result_of(&run_one(&config, &ctl, deploy_of("c-4", &sha)).await);
        assert_eq!(r.outcome, Outcome::Failed as i32);
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
        assert_eq!(r.outcome, Outcome::Succeeded as i32, "{}", r.message);
        assert_eq!(r.release_id, "r-c-5");
        assert!(msgs.iter().any(|m| matches!(&m.kind,
            Some(agent_message::Kind::Progress(p)) if p.message.contains("already cached"))));
        let current = std::fs::read_to_string(dir.path().join("app/current/VERSION")).unwrap();
        assert_eq!(current, "v1");

        // A digest that is not one is refused before anything is fetched.
        let r = result_of(&run_one(&config, &ctl, deploy_of("c-6", "abc")).await);
        assert!(r.message.contains("64 hexadecimal"), "{}", r.message);
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
        assert_eq!(r.outcome, Outcome::Failed as i32);
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
        assert_eq!(result_of(&msgs).outcome, Outcome::Succeeded as i32);
    }
}
