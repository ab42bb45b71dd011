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
/// How long a stopped child's remaining output may take to reach the log.
const COPY_DRAIN: Duration = Duration::from_secs(2);
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
    /// Bumped each time the output log is reopened (after a rotation
    /// renamed it): the rotator waits for this before compressing.
    #[serde(default)]
    pub log_generation: u64,
}

impl State {
    pub fn load(files: &RunFiles) -> Option<Self> {
        durable::read_json(&files.state)
    }

    fn save(&self, files: &RunFiles) {
        if let Err(e) = durable::write_json(&files.state, self) {
            tracing::warn!(error = %e, "cannot write supervisor state");
        }
    }
}

/// Whether a supervisor holds the lock for this root.
pub fn is_running(files: &RunFiles) -> bool {
    crate::lock::is_held(&files.lock)
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

/// The app's output file, shared by the stdout and stderr copiers. Whole
/// lines are written under the lock, so a reopen never splits a line.
type SharedLog = std::sync::Arc<tokio::sync::Mutex<tokio::fs::File>>;

/// Longest line kept whole; longer output is written in pieces.
const MAX_LINE: usize = 64 << 10;

async fn open_output(files: &RunFiles) -> std::io::Result<tokio::fs::File> {
    tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&files.output)
        .await
}

/// Copies one pipe of the child into the log, line by line.
async fn copy_lines(pipe: impl tokio::io::AsyncRead + Unpin, log: SharedLog) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let mut reader = tokio::io::BufReader::new(pipe);
    let mut line = Vec::with_capacity(256);
    loop {
        line.clear();
        let n = match (&mut reader)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(n) => n,
            Err(_) => break,
        };
        if n == 0 {
            break;
        }
        let mut f = log.lock().await;
        if f.write_all(&line).await.is_err() {
            break;
        }
    }
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
    // SIGUSR1: a rotation renamed the output log; reopen it.
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let log: SharedLog = std::sync::Arc::new(tokio::sync::Mutex::new(
        open_output(files)
            .await
            .with_context(|| format!("cannot open {}", files.output.display()))?,
    ));
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
        let child = spawn(root, command, release.as_deref());
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
        let mut copiers = Vec::new();
        if let Some(out) = child.stdout.take() {
            copiers.push(tokio::spawn(copy_lines(out, log.clone())));
        }
        if let Some(err) = child.stderr.take() {
            copiers.push(tokio::spawn(copy_lines(err, log.clone())));
        }
        let started = tokio::time::Instant::now();
        state.generation += 1;
        state.child_pid = child.id();
        state.release = release;
        state.status = "running".into();
        state.started_at = Some(OffsetDateTime::now_utc());
        state.save(files);
        let pgid = child.id().map(|p| Pid::from_raw(p as i32));
        let exit = loop {
            tokio::select! {
                exit = child.wait() => break Some(exit),
                _ = usr1.recv() => reopen(files, &log, &mut state).await,
                _ = hup.recv() => {
                    stop(&mut child, pgid, grace).await;
                    state.last_exit = Some("restarted for a new release".into());
                    backoff = BACKOFF_START;
                    break None;
                }
                _ = term.recv() => { stop(&mut child, pgid, grace).await; state.status = "stopping".into(); break None }
                _ = int.recv() => { stop(&mut child, pgid, grace).await; state.status = "stopping".into(); break None }
            }
        };
        // What the child wrote before it ended still reaches the log (its
        // pipes close with it; a grandchild holding them is not waited for).
        for c in copiers {
            let _ = tokio::time::timeout(COPY_DRAIN, c).await;
        }
        if state.status == "stopping" {
            break;
        }
        match exit {
            None => continue,
            Some(exit) => {
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
                let wake = tokio::time::sleep(backoff);
                tokio::pin!(wake);
                let quit = loop {
                    tokio::select! {
                        _ = &mut wake => break false,
                        _ = usr1.recv() => reopen(files, &log, &mut state).await,
                        _ = hup.recv() => break false,
                        _ = term.recv() => break true,
                        _ = int.recv() => break true,
                    }
                };
                if quit {
                    break;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    state.status = "stopped".into();
    state.child_pid = None;
    state.save(files);
    Ok(())
}

/// Reopens the output log after a rotation renamed it, and says so in the
/// state file (the rotator waits for that before compressing).
async fn reopen(files: &RunFiles, log: &SharedLog, state: &mut State) {
    use tokio::io::AsyncWriteExt;
    let mut f = log.lock().await;
    // tokio writes a file in the background: the last line may still be on
    // its way to the renamed file, and must land before the rotator (told
    // below) compresses it.
    if let Err(e) = f.flush().await {
        tracing::error!(error = %e, path = %files.output.display(), "cannot write the output log");
    }
    match open_output(files).await {
        Ok(new) => {
            *f = new;
            state.log_generation += 1;
            state.save(files);
        }
        Err(e) => {
            tracing::error!(error = %e, path = %files.output.display(), "cannot reopen the output log")
        }
    }
}

fn spawn(
    root: &Path,
    command: &[String],
    release: Option<&str>,
) -> anyhow::Result<tokio::process::Child> {
    let env = envfile::load(root)?;
    let current = root.join("current");
    let mut cmd = tokio::process::Command::new(&command[0]);
    cmd.args(&command[1..])
        .current_dir(&current)
        .envs(env)
        .env("SLIPWAY_APP_ROOT", root)
        .env("SLIPWAY_RELEASE", release.unwrap_or(""))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
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
