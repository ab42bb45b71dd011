//! `slipway-agent supervise`: the process the exec driver leaves running.
//!
//! One supervisor per app runs the app's command in `current/` (so a restart
//! picks up whatever release `current` points at), restarts it when it exits
//! with exponential backoff, restarts it on SIGHUP (a deploy or rollback), and
//! on SIGTERM stops it — SIGTERM to its process group, SIGKILL after the grace
//! period — and exits. Its state goes to `.slipway/run/state.json` after every
//! change so the driver and `status` can read it without talking to it; an
//! flock on `.slipway/run/supervisor.lock` says it is alive.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::signal::unix::{signal, SignalKind};

use crate::{durable, envfile, release};

/// First restart delay after a crash; doubles per crash up to the cap.
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A child that stayed up this long resets the backoff.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// The supervisor's files under `<root>/.slipway/run/`.
#[derive(Debug, Clone)]
pub struct RunFiles {
    pub dir: PathBuf,
    pub lock: PathBuf,
    pub state: PathBuf,
    /// The app's stdout and stderr.
    pub output: PathBuf,
}

impl RunFiles {
    pub fn new(root: &Path) -> Self {
        let dir = root.join(".slipway/run");
        Self {
            lock: dir.join("supervisor.lock"),
            state: dir.join("state.json"),
            output: dir.join("output.log"),
            dir,
        }
    }
}

/// What the supervisor is doing, as written to `state.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub supervisor_pid: u32,
    /// Bumped each time a child is started; the driver waits for a new one.
    pub generation: u64,
    pub child_pid: Option<u32>,
    /// The release the running child was started in.
    pub release: Option<String>,
    /// `running`, `backoff`, `stopped`, `failed to start`.
    pub status: String,
    /// Crashes (exits not asked for) since the supervisor started.
    pub restarts: u64,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub started_at: Option<OffsetDateTime>,
    pub last_exit: Option<String>,
}

impl State {
    pub fn load(files: &RunFiles) -> Option<Self> {
        serde_json::from_slice(&fs::read(&files.state).ok()?).ok()
    }

    fn save(&self, files: &RunFiles) {
        if let Ok(data) = serde_json::to_vec_pretty(self) {
            if let Err(e) = durable::write_atomic(&files.state, &data) {
                tracing::warn!(error = %e, "cannot write supervisor state");
            }
        }
    }
}

/// Whether a supervisor holds the lock for this root.
pub fn is_running(files: &RunFiles) -> bool {
    crate::release::lock::is_held(&files.lock)
}

/// Runs the supervisor until SIGTERM or SIGINT.
pub fn run(root: &Path, command: &[String], grace: Duration) -> anyhow::Result<()> {
    anyhow::ensure!(!command.is_empty(), "supervise needs a command after --");
    let files = RunFiles::new(root);
    fs::create_dir_all(&files.dir)
        .with_context(|| format!("cannot create {}", files.dir.display()))?;
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&files.lock)
        .with_context(|| format!("cannot open {}", files.lock.display()))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        let holder = State::load(&files).map(|s| s.supervisor_pid).unwrap_or(0);
        anyhow::anyhow!(
            "{} is already supervised by pid {holder} ({e})",
            root.display()
        )
    })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the supervisor runtime")?;
    runtime.block_on(supervise(root, &files, command, grace))
}

async fn supervise(
    root: &Path,
    files: &RunFiles,
    command: &[String],
    grace: Duration,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut state = State {
        supervisor_pid: std::process::id(),
        status: "starting".into(),
        ..State::default()
    };
    let mut backoff = BACKOFF_START;
    loop {
        let release = release::activate::read_current(root)
            .ok()
            .flatten()
            .map(|r| r.to_string());
        let child = spawn(root, files, command, release.as_deref());
        let mut child = match child {
            Ok(c) => c,
            Err(e) => {
                state.status = "failed to start".into();
                state.child_pid = None;
                state.last_exit = Some(format!("{e:#}"));
                state.save(files);
                tracing::error!(error = %format!("{e:#}"), "cannot start the app");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => { backoff = (backoff * 2).min(BACKOFF_MAX); continue }
                    _ = hup.recv() => continue,
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                }
            }
        };
        let started = tokio::time::Instant::now();
        state.generation += 1;
        state.child_pid = child.id();
        state.release = release;
        state.status = "running".into();
        state.started_at = Some(OffsetDateTime::now_utc());
        state.save(files);
        let pgid = child.id().map(|p| Pid::from_raw(p as i32));
        tokio::select! {
            exit = child.wait() => {
                let how = match exit {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                };
                state.restarts += 1;
                state.last_exit = Some(how.clone());
                state.child_pid = None;
                if started.elapsed() >= STABLE_AFTER {
                    backoff = BACKOFF_START;
                }
                state.status = "backoff".into();
                state.save(files);
                tracing::warn!(exit = %how, delay = ?backoff, "app exited; restarting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = hup.recv() => {}
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
            _ = hup.recv() => {
                stop(&mut child, pgid, grace).await;
                state.last_exit = Some("restarted for a new release".into());
                backoff = BACKOFF_START;
            }
            _ = term.recv() => { stop(&mut child, pgid, grace).await; break }
            _ = int.recv() => { stop(&mut child, pgid, grace).await; break }
        }
    }
    state.status = "stopped".into();
    state.child_pid = None;
    state.save(files);
    Ok(())
}

fn spawn(
    root: &Path,
    files: &RunFiles,
    command: &[String],
    release: Option<&str>,
) -> anyhow::Result<tokio::process::Child> {
    let env_path = root.join("shared/.env");
    let env = match fs::read_to_string(&env_path) {
        Ok(text) => envfile::parse(&env_path, &text)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", env_path.display())),
    };
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&files.output)
        .with_context(|| format!("cannot open {}", files.output.display()))?;
    let err = log.try_clone()?;
    let current = root.join("current");
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..])
        .current_dir(&current)
        .envs(env)
        .env("SLIPWAY_APP_ROOT", root)
        .env("SLIPWAY_RELEASE", release.unwrap_or(""))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        .process_group(0)
        .kill_on_drop(true);
    cmd.spawn()
        .with_context(|| format!("cannot start {:?} in {}", command[0], current.display()))
}

/// SIGTERM to the child's process group, SIGKILL after `grace`.
async fn stop(child: &mut tokio::process::Child, pgid: Option<Pid>, grace: Duration) {
    if let Some(pg) = pgid {
        let _ = killpg(pg, Signal::SIGTERM);
    }
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        tracing::warn!(?grace, "app ignored SIGTERM; sending SIGKILL");
        if let Some(pg) = pgid {
            let _ = killpg(pg, Signal::SIGKILL);
        }
        let _ = child.wait().await;
    }
}

/// Opens (creating) the output log for the supervisor's own stderr.
pub fn open_log(files: &RunFiles) -> std::io::Result<File> {
    fs::create_dir_all(&files.dir)?;
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(files.dir.join("supervisor.log"))
}
