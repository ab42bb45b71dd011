//! `slipway-agent supervise`: the process the exec driver leaves running.
//!
//! One supervisor per app runs the app's command in `current/` (so a restart
//! picks up whatever release `current` points at), restarts it when it exits
//! with exponential backoff, restarts it on SIGHUP (a deploy or rollback), and
//! on SIGTERM stops it — SIGTERM to its process group, SIGKILL after the grace
//! period — and exits. Its state goes to `.slipway/run/state.json` after every
//! change so the driver and `status` can read it without talking to it; an
//! flock on `.slipway/run/supervisor.lock` says it is alive.
//!
//! With `--listen ADDR` (the app's `listen`) it binds the public socket once
//! and keeps it until it exits; every child gets it as fd 3 and its own
//! private probe socket as fd 4 (see [`socket_exec`]). Then SIGHUP starts the
//! new child *beside* the live one, SIGUSR2 retires the previous one (SIGTERM,
//! SIGKILL after the grace period, in the background while the new one
//! serves) and SIGWINCH drops the new one and makes the previous one live
//! again. Because the supervisor is detached from the agent, the socket
//! also outlives a restart (or a kill -9) of `slipway-agent run`.

use std::fs::{self, File, OpenOptions};
use std::os::fd::OwnedFd;
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

use crate::listen::ListenAddr;
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
    /// The public address this supervisor holds (`listen`), if any.
    #[serde(default)]
    pub listen: Option<String>,
    /// The live child's private probe port (listen mode): `{port}` of the
    /// health check.
    #[serde(default)]
    pub probe_port: Option<u16>,
    /// The child the live one replaced, still serving on the shared socket
    /// until the new one passed its gate (listen mode).
    #[serde(default)]
    pub previous_pid: Option<u32>,
    #[serde(default)]
    pub previous_release: Option<String>,
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
pub fn run(
    root: &Path,
    command: &[String],
    grace: Duration,
    listen: Option<&ListenAddr>,
) -> anyhow::Result<()> {
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
    runtime.block_on(supervise(root, &files, command, grace, listen))
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

/// One running child and what belongs to it.
struct Slot {
    child: tokio::process::Child,
    pid: Option<u32>,
    release: Option<String>,
    started: tokio::time::Instant,
    copiers: Vec<tokio::task::JoinHandle<()>>,
    /// Its private probe socket (listen mode), kept for its restarts.
    probe: Option<std::net::TcpListener>,
}

impl Slot {
    fn pgid(&self) -> Option<Pid> {
        self.pid.map(|p| Pid::from_raw(p as i32))
    }

    fn probe_port(&self) -> Option<u16> {
        self.probe
            .as_ref()
            .and_then(|p| p.local_addr().ok())
            .map(|a| a.port())
    }

    /// What the child wrote before it ended still reaches the log (its pipes
    /// close with it; a grandchild holding them is not waited for).
    async fn drain_output(&mut self) {
        for c in self.copiers.drain(..) {
            let _ = tokio::time::timeout(COPY_DRAIN, c).await;
        }
    }
}

/// Waits for the slot's child to exit; never, when there is none.
async fn exited(slot: &mut Option<Slot>) -> std::io::Result<std::process::ExitStatus> {
    match slot {
        Some(s) => s.child.wait().await,
        None => std::future::pending().await,
    }
}

/// Stops a child in the background: SIGTERM, SIGKILL after `grace`. Its
/// in-flight requests finish meanwhile (it stopped accepting first).
fn retire(mut slot: Slot, grace: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let pgid = slot.pgid();
        stop(&mut slot.child, pgid, grace).await;
        slot.drain_output().await;
    })
}

/// The state file's view of the live and the previous child.
fn describe(state: &mut State, live: &Option<Slot>, old: &Option<Slot>) {
    state.child_pid = live.as_ref().and_then(|s| s.pid);
    state.probe_port = live.as_ref().and_then(Slot::probe_port);
    state.previous_pid = old.as_ref().and_then(|s| s.pid);
    state.previous_release = old.as_ref().and_then(|s| s.release.clone());
}

async fn supervise(
    root: &Path,
    files: &RunFiles,
    command: &[String],
    grace: Duration,
    listen: Option<&ListenAddr>,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // SIGUSR1: a rotation renamed the output log; reopen it.
    let mut usr1 = signal(SignalKind::user_defined1())?;
    // SIGUSR2: the new child passed its gate: retire the previous one.
    let mut usr2 = signal(SignalKind::user_defined2())?;
    // SIGWINCH: the new child failed its gate: it goes, the previous one
    // (still running, still on the socket) is the live one again.
    let mut winch = signal(SignalKind::window_change())?;
    let log: SharedLog = std::sync::Arc::new(tokio::sync::Mutex::new(
        open_output(files)
            .await
            .with_context(|| format!("cannot open {}", files.output.display()))?,
    ));
    // The public socket: bound once, kept for this supervisor's lifetime,
    // handed to every child.
    let public = match listen {
        Some(addr) => Some(addr.bind().with_context(|| format!("listen = {addr}"))?),
        None => None,
    };
    let mut state = State {
        supervisor_pid: std::process::id(),
        status: "starting".into(),
        listen: listen.map(ToString::to_string),
        ..State::default()
    };
    let mut backoff = BACKOFF_START;
    let mut live: Option<Slot> = None;
    let mut old: Option<Slot> = None;
    // A crashed child's probe socket, for the child that replaces it (the
    // port recorded for liveness stays right).
    let mut reuse_probe: Option<std::net::TcpListener> = None;
    let mut start_at: Option<tokio::time::Instant> = Some(tokio::time::Instant::now());
    let mut retiring: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    loop {
        if live.is_none() && start_at.is_some_and(|t| t <= tokio::time::Instant::now()) {
            start_at = None;
            let release = release::activate::read_current(root)
                .ok()
                .flatten()
                .map(|r| r.to_string());
            match spawn(
                root,
                command,
                release.as_deref(),
                public.as_ref(),
                reuse_probe.take(),
            ) {
                Ok(mut slot) => {
                    if let Some(out) = slot.child.stdout.take() {
                        slot.copiers
                            .push(tokio::spawn(copy_lines(out, log.clone())));
                    }
                    if let Some(err) = slot.child.stderr.take() {
                        slot.copiers
                            .push(tokio::spawn(copy_lines(err, log.clone())));
                    }
                    state.generation += 1;
                    state.release = release;
                    state.status = "running".into();
                    state.started_at = Some(OffsetDateTime::now_utc());
                    live = Some(slot);
                }
                Err((e, probe)) => {
                    reuse_probe = probe;
                    state.status = "failed to start".into();
                    state.last_exit = Some(format!("{e:#}"));
                    tracing::error!(error = %format!("{e:#}"), "cannot start the app");
                    start_at = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
            describe(&mut state, &live, &old);
            state.save(files);
        }
        let wake = start_at.unwrap_or_else(|| tokio::time::Instant::now() + BACKOFF_MAX);
        tokio::select! {
            exit = exited(&mut live) => {
                let Some(mut slot) = live.take() else { continue };
                slot.drain_output().await;
                let how = match exit {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                };
                state.restarts += 1;
                state.last_exit = Some(how.clone());
                if slot.started.elapsed() >= STABLE_AFTER {
                    backoff = BACKOFF_START;
                }
                reuse_probe = slot.probe.take();
                state.status = "backoff".into();
                start_at = Some(tokio::time::Instant::now() + backoff);
                tracing::warn!(exit = %how, delay = ?backoff, "app exited; restarting");
                backoff = (backoff * 2).min(BACKOFF_MAX);
                describe(&mut state, &live, &old);
                state.save(files);
            }
            exit = exited(&mut old) => {
                if let Some(mut slot) = old.take() {
                    slot.drain_output().await;
                    tracing::warn!(exit = ?exit, "the previous release's process exited");
                }
                describe(&mut state, &live, &old);
                state.save(files);
            }
            _ = tokio::time::sleep_until(wake), if start_at.is_some() => {}
            _ = usr1.recv() => reopen(files, &log, &mut state).await,
            _ = hup.recv() => {
                backoff = BACKOFF_START;
                reuse_probe = None;
                if public.is_some() {
                    // The new child starts beside the live one, on the same
                    // socket; the live one serves until USR2 or WINCH.
                    if live.is_some() {
                        if let Some(o) = old.take() {
                            retiring.push(retire(o, grace));
                        }
                        old = live.take();
                    }
                } else if let Some(mut l) = live.take() {
                    let pgid = l.pgid();
                    stop(&mut l.child, pgid, grace).await;
                    l.drain_output().await;
                    state.last_exit = Some("restarted for a new release".into());
                }
                start_at = Some(tokio::time::Instant::now());
            }
            _ = usr2.recv() => {
                if let Some(o) = old.take() {
                    retiring.push(retire(o, grace));
                }
                describe(&mut state, &live, &old);
                state.save(files);
            }
            _ = winch.recv() => {
                if let Some(o) = old.take() {
                    if let Some(l) = live.take() {
                        retiring.push(retire(l, grace));
                    }
                    state.generation += 1;
                    state.release = o.release.clone();
                    state.status = "running".into();
                    state.last_exit = Some("the new release's process was dropped; the previous one serves".into());
                    live = Some(o);
                    start_at = None;
                    describe(&mut state, &live, &old);
                    state.save(files);
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        retiring.retain(|t| !t.is_finished());
    }
    state.status = "stopping".into();
    state.save(files);
    for slot in [live.take(), old.take()].into_iter().flatten() {
        retiring.push(retire(slot, grace));
    }
    for t in retiring {
        let _ = t.await;
    }
    state.status = "stopped".into();
    describe(&mut state, &live, &old);
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

/// Starts the app's command in `current/`. With a public socket the child
/// gets it as fd 3 and a private probe socket (`reuse`, else a new one on
/// 127.0.0.1) as fd 4, through `slipway-agent socket-exec`, which sets
/// `LISTEN_PID` to the app's own pid. On failure the probe socket comes back
/// for the next try.
#[allow(clippy::type_complexity)]
fn spawn(
    root: &Path,
    command: &[String],
    release: Option<&str>,
    public: Option<&OwnedFd>,
    reuse: Option<std::net::TcpListener>,
) -> Result<Slot, (anyhow::Error, Option<std::net::TcpListener>)> {
    let env = match envfile::load(root) {
        Ok(e) => e,
        Err(e) => return Err((e.into(), reuse)),
    };
    let current = root.join("current");
    let mut probe = None;
    let mut cmd = match public {
        None => {
            let mut cmd = tokio::process::Command::new(&command[0]);
            cmd.args(&command[1..]).stdout(Stdio::piped());
            cmd
        }
        Some(public) => {
            let listener = match reuse {
                Some(l) => l,
                None => std::net::TcpListener::bind(("127.0.0.1", 0))
                    .map_err(|e| (anyhow::anyhow!("cannot bind a probe socket: {e}"), None))?,
            };
            let fds = public
                .try_clone()
                .and_then(|p| Ok((p, listener.try_clone()?)));
            let (public, probe_fd) = match fds {
                Ok(f) => f,
                Err(e) => {
                    return Err((
                        anyhow::anyhow!("cannot hand the sockets over: {e}"),
                        Some(listener),
                    ))
                }
            };
            probe = Some(listener);
            // /proc/self/exe: this very binary, even if an upgrade replaced
            // the file since.
            let mut cmd = tokio::process::Command::new("/proc/self/exe");
            cmd.arg("socket-exec")
                .arg("--")
                .args(command)
                .stdin(Stdio::from(public))
                .stdout(Stdio::from(OwnedFd::from(probe_fd)));
            cmd
        }
    };
    if public.is_none() {
        cmd.stdin(Stdio::null());
    }
    cmd.current_dir(&current)
        .envs(env)
        .env("SLIPWAY_APP_ROOT", root)
        .env("SLIPWAY_RELEASE", release.unwrap_or(""))
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    match cmd.spawn() {
        Ok(child) => Ok(Slot {
            pid: child.id(),
            child,
            release: release.map(str::to_owned),
            started: tokio::time::Instant::now(),
            copiers: Vec::new(),
            probe,
        }),
        Err(e) => Err((
            anyhow::anyhow!(
                "cannot start {:?} in {}: {e}",
                command[0],
                current.display()
            ),
            probe,
        )),
    }
}

/// `slipway-agent socket-exec -- COMMAND…`, started by the supervisor with
/// the public socket as stdin and the probe socket as stdout: puts them at
/// fds 3 and 4, sends the app's output to stderr (the log pipe), and execs
/// the command with `LISTEN_FDS=2`, `LISTEN_FDNAMES=public:probe` and
/// `LISTEN_PID` = its own pid (the systemd socket-activation protocol).
/// Returns only on failure.
pub fn socket_exec(command: &[String]) -> anyhow::Error {
    use std::os::fd::AsFd;
    use std::os::unix::process::CommandExt;
    let place = |fd: std::os::fd::BorrowedFd<'_>, at: i32, what: &str| -> anyhow::Result<()> {
        let got = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD(at))
            .with_context(|| format!("cannot duplicate the {what} socket"))?;
        anyhow::ensure!(
            got == at,
            "fd {at} is already open, so the {what} socket landed on fd {got}"
        );
        Ok(())
    };
    let result = (|| -> anyhow::Result<std::io::Error> {
        anyhow::ensure!(!command.is_empty(), "socket-exec needs a command after --");
        place(std::io::stdin().as_fd(), 3, "public")?;
        place(std::io::stdout().as_fd(), 4, "probe")?;
        nix::unistd::dup2_stdout(std::io::stderr().as_fd()).context("cannot redirect stdout")?;
        let null = File::open("/dev/null").context("cannot open /dev/null")?;
        nix::unistd::dup2_stdin(null.as_fd()).context("cannot redirect stdin")?;
        drop(null);
        Ok(std::process::Command::new(&command[0])
            .args(&command[1..])
            .env("LISTEN_PID", std::process::id().to_string())
            .env("LISTEN_FDS", "2")
            .env("LISTEN_FDNAMES", "public:probe")
            .exec())
    })();
    match result {
        Ok(e) => anyhow::anyhow!("cannot start {:?}: {e}", command[0]),
        Err(e) => e,
    }
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
