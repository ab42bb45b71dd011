//! `slipway-agent front`: the agent's TCP proxy on an app's public address,
//! for drivers whose new release listens on a port of its own (Docker's
//! blue/green host port, PM2 fork mode's blue/green process set).
//!
//! One detached front process per app (like the exec supervisor, so it
//! outlives a restart or a `kill -9` of `slipway-agent run`) binds `listen`
//! once and forwards every connection to the backend named in
//! `.slipway/run/front-target.json`, byte for byte (`copy_bidirectional`).
//! A switch is a journalled step: the deploy writes the new target durably
//! (temp + fsync + rename) once the new release passed its gate, then sends
//! SIGHUP; the front answers in `front.json` with the target's `seq`. New
//! connections go to the new backend from then on; open ones finish on the
//! old one, whose count the front reports under `draining` until it is
//! zero; the deploy waits for that, bounded by the driver's stop grace,
//! before the old backend is stopped. A kill -9 of the agent before the
//! target is written leaves the front on the old, still running, backend.
//!
//! A backend that refuses a connection is tried once more after a re-read
//! of the target (a switch may be under way); then the client's connection
//! is closed.
//!
//! In TCP mode on an IPv4 address the front also has the kernel forward
//! the connections opened on this machine (nftables DNAT, see
//! [`kernel`]): it installs the rules for the target before it answers a
//! switch, counts the connections the kernel forwarded to earlier backends
//! under `draining`, and removes its table when it exits cleanly.
//! `kernel_forward = false` (in the target) turns that off; a missing or
//! refused `nft` is logged once and leaves the front proxying everything.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::signal::unix::{signal, SignalKind};

use crate::durable;

mod http;
pub mod kernel;
use crate::listen::{ListenAddr, ListenMode};

/// How long a backend connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the front may take to start or to answer a switch.
const ANSWER_WAIT: Duration = Duration::from_secs(10);
/// On SIGTERM: how long open connections may take to finish.
const EXIT_DRAIN: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);
/// Reaching the backend took this long: logged (a keep-alive connection
/// that lives long is not; its life is logged at debug level).
const SLOW: Duration = Duration::from_secs(1);
/// Before the one retry of a backend that could not be reached.
const RETRY_PAUSE: Duration = Duration::from_millis(50);
/// How often the kernel-forwarded connections still open to earlier
/// backends are counted, while there are any.
const CONNTRACK_POLL: Duration = Duration::from_millis(100);

/// Environment variable setting the front's worker threads (default 1: a
/// front per app, most apps on a droplet idle; more for one busy app).
pub const THREADS_ENV: &str = "SLIPWAY_FRONT_THREADS";

/// Environment variable naming the agent binary to run `front` with (tests
/// and packagers; default: this executable).
pub const AGENT_BIN_ENV: &str = "SLIPWAY_AGENT_BIN";

/// The front's files under `<root>/.slipway/run/`.
#[derive(Debug, Clone)]
pub struct FrontFiles {
    pub dir: PathBuf,
    pub lock: PathBuf,
    /// What the deploy wants: [`Target`].
    pub target: PathBuf,
    /// What the front does: [`FrontState`].
    pub state: PathBuf,
    pub log: PathBuf,
}

impl FrontFiles {
    pub fn new(root: &Path) -> Self {
        let dir = root.join(".slipway/run");
        Self {
            lock: dir.join("front.lock"),
            target: dir.join("front-target.json"),
            state: dir.join("front.json"),
            log: dir.join("front.log"),
            dir,
        }
    }
}

/// The backend new connections go to, as the deploy last decided.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub backend: SocketAddr,
    /// Bumped by every switch; the front echoes it once applied.
    pub seq: u64,
    /// The release behind `backend`, for `status`.
    #[serde(default)]
    pub release: Option<String>,
    /// How new connections are forwarded (`listen_mode`); absent in the
    /// files of fronts older than the HTTP mode: TCP.
    #[serde(default)]
    pub mode: ListenMode,
    /// TCP mode, IPv4: the kernel forwards this machine's own clients
    /// (`kernel_forward` of the app's config); absent in older files: on.
    #[serde(default = "yes")]
    pub kernel_forward: bool,
}

fn yes() -> bool {
    true
}

/// Whether the kernel forwards the connections made from this machine
/// (TCP mode), as the front last applied it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelForward {
    /// The nftables table doing it, when it does.
    pub table: Option<String>,
    /// Why not, when it does not.
    pub why_not: Option<String>,
}

impl KernelForward {
    /// For `status`: "kernel-forwarded for local clients …" or why not.
    pub fn describe(&self) -> String {
        match (&self.table, &self.why_not) {
            (Some(t), _) => format!(
                "kernel-forwarded for local clients (nftables table ip {t}); clients from other machines through the front"
            ),
            (None, Some(why)) => format!("not kernel-forwarded: {why}"),
            (None, None) => "not kernel-forwarded".to_owned(),
        }
    }
}

/// What the front reports in `front.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontState {
    pub pid: u32,
    pub listen: String,
    pub backend: Option<SocketAddr>,
    pub release: Option<String>,
    pub seq: u64,
    /// How new connections are forwarded.
    #[serde(default)]
    pub mode: ListenMode,
    /// Earlier backends with connections (TCP mode) or requests (HTTP
    /// mode) still open.
    #[serde(default)]
    pub draining: BTreeMap<String, u64>,
    /// TCP mode: kernel forwarding for local clients.
    #[serde(default)]
    pub kernel: KernelForward,
}

impl FrontState {
    pub fn load(files: &FrontFiles) -> Option<Self> {
        durable::read_json(&files.state)
    }
}

/// Whether a front holds the lock for this root.
pub fn is_running(files: &FrontFiles) -> bool {
    crate::lock::is_held(&files.lock)
}

/// Errors of the deploy's side of the front.
#[derive(Debug, thiserror::Error)]
pub enum FrontError {
    #[error("front on {listen}: {message}")]
    Failed { listen: String, message: String },
}

fn failed(listen: &ListenAddr, message: impl Into<String>) -> FrontError {
    FrontError::Failed {
        listen: listen.to_string(),
        message: message.into(),
    }
}

/// Points the app's front at `127.0.0.1:port` (starting the front if it is
/// not running; `kernel_forward`: see [`Target::kernel_forward`]), then
/// waits, at most `drain`, for the connections still open to the previous
/// backend to finish. Returns one line for the deploy log.
pub fn switch(
    root: &Path,
    listen: &ListenAddr,
    mode: ListenMode,
    kernel_forward: bool,
    port: u16,
    release: &str,
    drain: Duration,
) -> Result<String, FrontError> {
    let files = FrontFiles::new(root);
    fs::create_dir_all(&files.dir).map_err(|e| {
        failed(
            listen,
            format!("cannot create {}: {e}", files.dir.display()),
        )
    })?;
    let backend = SocketAddr::from(([127, 0, 0, 1], port));
    let before: Option<Target> = durable::read_json(&files.target);
    if before.as_ref().is_some_and(|t| {
        t.backend == backend && t.mode == mode && t.kernel_forward == kernel_forward
    }) && is_running(&files)
    {
        // Applied: the front answered that target's seq (its kernel rules,
        // if any, follow it).
        let seq = before.as_ref().map_or(0, |t| t.seq);
        if let Some(s) = FrontState::load(&files)
            .filter(|s| s.backend == Some(backend) && s.mode == mode && s.seq >= seq)
        {
            // Switched already (a switch cut short by a kill of the agent,
            // taken up again): what may still drain from the previous
            // backend is waited for all the same, as its process is about
            // to be stopped.
            let (open, waited) = wait_drained(&files, s.draining, drain);
            return Ok(format!(
                "front on {listen} already forwards to {backend}{}",
                drained_text(mode, open, waited, drain)
            ));
        }
    }
    let target = Target {
        backend,
        seq: before.map_or(1, |t| t.seq + 1),
        release: Some(release.to_owned()),
        mode,
        kernel_forward,
    };
    durable::write_json(&files.target, &target).map_err(|e| {
        failed(
            listen,
            format!("cannot write {}: {e}", files.target.display()),
        )
    })?;
    let state = FrontState::load(&files);
    let running = is_running(&files);
    if running
        && state
            .as_ref()
            .is_some_and(|s| s.listen != listen.to_string())
    {
        // The address changed: a new front binds the new one.
        stop(root).map_err(|e| failed(listen, e))?;
    }
    if is_running(&files) {
        let pid = state.map(|s| s.pid).unwrap_or(0);
        kill(Pid::from_raw(pid as i32), Signal::SIGHUP)
            .map_err(|e| failed(listen, format!("cannot signal front pid {pid}: {e}")))?;
    } else {
        spawn(root, listen, &files)?;
    }
    let t = Instant::now();
    let applied = loop {
        if let Some(s) = FrontState::load(&files).filter(|s| s.seq >= target.seq) {
            break s;
        }
        if t.elapsed() > ANSWER_WAIT {
            return Err(failed(
                listen,
                format!(
                    "did not take the switch to {backend} within {ANSWER_WAIT:?} (see {})",
                    files.log.display()
                ),
            ));
        }
        std::thread::sleep(POLL);
    };
    let switched_in = t.elapsed();
    let (open, waited) = wait_drained(&files, applied.draining, drain);
    Ok(format!(
        "front on {listen} forwards new {} to {backend} (switched in {} ms{}{})",
        what(mode),
        switched_in.as_millis(),
        match (&applied.kernel.table, mode) {
            (Some(_), _) => "; kernel-forwarded for local clients".to_owned(),
            (None, ListenMode::Tcp) if listen.is_tcp_v4() && kernel_forward =>
                format!("; {}", applied.kernel.describe()),
            _ => String::new(),
        },
        drained_text(mode, open, waited, drain)
    ))
}

/// Waits, at most `drain`, for the connections (requests) the front still
/// has open to earlier backends to finish: how many are left, and how long
/// it waited.
fn wait_drained(
    files: &FrontFiles,
    mut left: BTreeMap<String, u64>,
    drain: Duration,
) -> (u64, Duration) {
    let d = Instant::now();
    while !left.is_empty() && d.elapsed() < drain {
        std::thread::sleep(POLL);
        left = FrontState::load(files)
            .map(|s| s.draining)
            .unwrap_or_default();
    }
    (left.values().sum(), d.elapsed())
}

fn what(mode: ListenMode) -> &'static str {
    match mode {
        ListenMode::Tcp => "connections",
        ListenMode::Http => "requests",
    }
}

/// "; previous backend drained in N ms", or what is still open after
/// `drain`; nothing when there was nothing to drain.
fn drained_text(mode: ListenMode, open: u64, waited: Duration, drain: Duration) -> String {
    if open > 0 {
        format!(
            "; {open} {} still open to the previous backend after {drain:?}",
            what(mode)
        )
    } else if waited > Duration::ZERO {
        format!("; previous backend drained in {} ms", waited.as_millis())
    } else {
        String::new()
    }
}

/// Starts the app's front if it is not running but a switch was made (after
/// a reboot, or a kill): it takes up the recorded target. Returns whether
/// it started one.
pub fn ensure(root: &Path, listen: &ListenAddr) -> Result<bool, FrontError> {
    let files = FrontFiles::new(root);
    if is_running(&files) || !files.target.exists() {
        return Ok(false);
    }
    spawn(root, listen, &files)?;
    let t = Instant::now();
    while !is_running(&files) || FrontState::load(&files).is_none_or(|s| s.pid == 0) {
        if t.elapsed() > ANSWER_WAIT {
            return Err(failed(
                listen,
                format!(
                    "did not start within {ANSWER_WAIT:?} (see {})",
                    files.log.display()
                ),
            ));
        }
        std::thread::sleep(POLL);
    }
    Ok(true)
}

fn agent_bin() -> std::io::Result<PathBuf> {
    match std::env::var_os(AGENT_BIN_ENV) {
        Some(p) => Ok(PathBuf::from(p)),
        None => std::env::current_exe(),
    }
}

fn spawn(root: &Path, listen: &ListenAddr, files: &FrontFiles) -> Result<(), FrontError> {
    let bin =
        agent_bin().map_err(|e| failed(listen, format!("cannot find the agent binary: {e}")))?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&files.log)
        .map_err(|e| failed(listen, format!("cannot open {}: {e}", files.log.display())))?;
    let mut cmd = Command::new(&bin);
    cmd.arg("front")
        .arg("--root")
        .arg(root)
        .arg("--listen")
        .arg(listen.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log));
    // Its own process group: a Ctrl-C on the deploying terminal must not
    // reach it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd
        .spawn()
        .map_err(|e| failed(listen, format!("cannot start {} front: {e}", bin.display())))?;
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    Ok(())
}

/// Stops the app's front, if one runs: SIGTERM, then it finishes the open
/// connections (bounded) and exits.
pub fn stop(root: &Path) -> Result<(), String> {
    let files = FrontFiles::new(root);
    if !is_running(&files) {
        return Ok(());
    }
    let Some(state) = FrontState::load(&files) else {
        return Err(format!(
            "{} is locked but has no state",
            files.state.display()
        ));
    };
    kill(Pid::from_raw(state.pid as i32), Signal::SIGTERM)
        .map_err(|e| format!("cannot signal front pid {}: {e}", state.pid))?;
    let t = Instant::now();
    while is_running(&files) {
        if t.elapsed() > EXIT_DRAIN + ANSWER_WAIT {
            return Err(format!("front pid {} did not stop", state.pid));
        }
        std::thread::sleep(POLL);
    }
    Ok(())
}

/// One line for `status`, when the app has a front.
pub fn describe(root: &Path, listen: &ListenAddr) -> String {
    let files = FrontFiles::new(root);
    match (is_running(&files), FrontState::load(&files)) {
        (true, Some(s)) => format!(
            "agent proxy: {listen} forwards new {} to {} (release {}){}",
            match s.mode {
                ListenMode::Tcp if listen.is_tcp_v4() => format!("connections (tcp, {})", s.kernel.describe()),
                ListenMode::Tcp => "connections (tcp)".to_owned(),
                ListenMode::Http => "requests (listen_mode = http)".to_owned(),
            },
            s.backend.map_or("nothing yet".into(), |b| b.to_string()),
            s.release.as_deref().unwrap_or("?"),
            if s.draining.is_empty() {
                String::new()
            } else {
                format!("; draining {:?}", s.draining)
            }
        ),
        _ => format!("agent proxy: {listen} is not held (no front running; the next deploy or start starts it)"),
    }
}

/// Connection counts per backend, and where new connections go.
#[derive(Debug, Default)]
struct Routes {
    target: Option<Target>,
    open: BTreeMap<SocketAddr, u64>,
    /// The seq of the target the kernel's rules (if any) follow: what the
    /// front answers a switch with (a re-read of the target for a retry
    /// does not change it).
    applied_seq: u64,
    kernel: KernelForward,
    /// Connections the kernel forwarded to earlier backends, still open.
    kernel_open: BTreeMap<SocketAddr, u64>,
}

impl Routes {
    fn state(&self, listen: &ListenAddr) -> FrontState {
        let current = self.target.as_ref().map(|t| t.backend);
        FrontState {
            pid: std::process::id(),
            listen: listen.to_string(),
            backend: current,
            release: self.target.as_ref().and_then(|t| t.release.clone()),
            seq: self.applied_seq,
            mode: self.target.as_ref().map_or(ListenMode::Tcp, |t| t.mode),
            draining: {
                let mut d: BTreeMap<String, u64> = BTreeMap::new();
                for (b, n) in self.open.iter().chain(&self.kernel_open) {
                    if Some(*b) != current && *n > 0 {
                        *d.entry(b.to_string()).or_default() += n;
                    }
                }
                d
            },
            kernel: self.kernel.clone(),
        }
    }
}

type Shared = Arc<Mutex<Routes>>;

/// Runs the front until SIGTERM or SIGINT.
pub fn run(root: &Path, listen: &ListenAddr) -> anyhow::Result<()> {
    let files = FrontFiles::new(root);
    fs::create_dir_all(&files.dir)
        .with_context(|| format!("cannot create {}", files.dir.display()))?;
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&files.lock)
        .with_context(|| format!("cannot open {}", files.lock.display()))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| anyhow::anyhow!("{} already has a front ({e})", root.display()))?;
    let socket = listen
        .bind()
        .with_context(|| format!("listen = {listen}"))?;
    let threads = match std::env::var(THREADS_ENV) {
        Err(_) => 1,
        Ok(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=64).contains(n))
            .with_context(|| {
                format!("{THREADS_ENV}={v:?}: give a number of threads from 1 to 64")
            })?,
    };
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
    .context("cannot start the front's runtime")?;
    let kernel = Kernel::new(root, listen);
    runtime.block_on(serve(files, listen.clone(), socket, kernel))
}

/// The front's side of kernel forwarding: the rules it installed, and the
/// earlier backends whose kernel-forwarded connections it still counts.
struct Kernel {
    table: String,
    /// The public address, when the kernel can forward it (TCP, IPv4).
    listen: Option<SocketAddrV4>,
    /// The backend the installed rules forward to.
    installed: Option<SocketAddrV4>,
    /// A table of an earlier front process may exist (after a kill -9):
    /// removed when this one does not forward.
    maybe_present: bool,
    /// A failure of `nft` was logged at warn already.
    warned: bool,
    /// Earlier backends kernel-forwarded connections may still be open to.
    watch: BTreeSet<SocketAddrV4>,
}

impl Kernel {
    fn new(root: &Path, listen: &ListenAddr) -> Self {
        Self {
            table: kernel::table_name(root),
            listen: match listen {
                ListenAddr::Tcp(a) => kernel::v4(*a),
                ListenAddr::Unix(_) => None,
            },
            installed: None,
            maybe_present: matches!(listen, ListenAddr::Tcp(SocketAddr::V4(_))),
            warned: false,
            watch: BTreeSet::new(),
        }
    }

    /// A failure of `nft`: at warn the first time, then at debug.
    fn failed(&mut self, what: &str, e: &str) {
        if self.warned {
            tracing::debug!(table = %self.table, error = %e, "{what}");
        } else {
            self.warned = true;
            tracing::warn!(table = %self.table, error = %e, "{what}; the front proxies every connection itself");
        }
    }

    /// Removes the table if this front installed it or one may be left;
    /// connections it forwarded are watched until they end.
    fn remove(&mut self) -> Result<(), String> {
        if self.installed.is_none() && !self.maybe_present {
            return Ok(());
        }
        if self.installed.is_none() && !kernel::exists(&self.table) {
            // Looked for, never written: nothing of ours there.
            self.maybe_present = false;
            return Ok(());
        }
        match kernel::nft(&kernel::removal(&self.table)) {
            Ok(()) => {
                self.watch.extend(self.installed.take());
                self.maybe_present = false;
                Ok(())
            }
            Err(e) => {
                // Nothing of ours can be there if it was never installed.
                if self.installed.is_none() {
                    self.maybe_present = false;
                }
                Err(e)
            }
        }
    }

    /// Makes the rules follow `target`.
    fn apply(&mut self, target: Option<&Target>) -> KernelForward {
        let want = match (self.listen, target) {
            (None, _) => Err("the listen address is not IPv4 TCP".to_owned()),
            (_, None) => Err("no backend yet".to_owned()),
            (_, Some(t)) if t.mode == ListenMode::Http => {
                Err("listen_mode = \"http\": every request passes the front".to_owned())
            }
            (_, Some(t)) if !t.kernel_forward => Err("kernel_forward = false".to_owned()),
            (Some(l), Some(t)) => kernel::v4(t.backend)
                .map(|b| (l, b))
                .ok_or_else(|| format!("the backend {} is not IPv4", t.backend)),
        };
        let (listen, backend) = match want {
            Ok(w) => w,
            Err(why) => {
                let had = self.installed.is_some();
                if let Err(e) = self.remove() {
                    if !had {
                        // Only a table a killed front may have left.
                        tracing::debug!(table = %self.table, error = %e, "no kernel forwarding table removed");
                    } else {
                        tracing::error!(table = %self.table, error = %e, "cannot remove the kernel forwarding rules");
                    }
                    if had {
                        return KernelForward {
                            table: None,
                            why_not: Some(format!(
                                "{why}; but the table ip {} left could not be removed: {e}",
                                self.table
                            )),
                        };
                    }
                }
                return KernelForward {
                    table: None,
                    why_not: Some(why),
                };
            }
        };
        if self.installed == Some(backend) {
            return KernelForward {
                table: Some(self.table.clone()),
                why_not: None,
            };
        }
        let why_not = match kernel::nft(&kernel::ruleset(&self.table, listen, backend)) {
            Ok(()) => {
                self.maybe_present = true;
                if let Some(old) = self.installed.replace(backend) {
                    self.watch.insert(old);
                }
                self.watch.remove(&backend);
                // Draining needs the conntrack table: without it the rules
                // go again (connections the kernel forwarded could not be
                // waited for).
                match kernel::open_connections(listen.port(), &[]) {
                    Ok(_) => {
                        return KernelForward {
                            table: Some(self.table.clone()),
                            why_not: None,
                        }
                    }
                    Err(e) => {
                        let why = format!(
                            "cannot count the connections it would forward ({e}), so they could not be drained"
                        );
                        self.failed("kernel forwarding not used", &why);
                        if let Err(e) = self.remove() {
                            tracing::error!(table = %self.table, error = %e, "cannot remove the kernel forwarding rules");
                        }
                        why
                    }
                }
            }
            Err(e) => {
                self.failed("cannot install the kernel forwarding rules", &e);
                // Rules left to an earlier backend must not stay.
                if self.installed.is_some() {
                    if let Err(e) = self.remove() {
                        tracing::error!(table = %self.table, error = %e, "cannot remove the kernel forwarding rules to the earlier backend");
                    }
                }
                format!("nft failed: {e}")
            }
        };
        KernelForward {
            table: None,
            why_not: Some(why_not),
        }
    }

    /// The kernel-forwarded connections still open to earlier backends;
    /// those with none left are no longer watched.
    fn count(&mut self) -> BTreeMap<SocketAddr, u64> {
        let Some(listen) = self.listen else {
            return BTreeMap::new();
        };
        if self.watch.is_empty() {
            return BTreeMap::new();
        }
        let watched: Vec<SocketAddrV4> = self.watch.iter().copied().collect();
        match kernel::open_connections(listen.port(), &watched) {
            Ok(counts) => {
                self.watch.retain(|b| counts.contains_key(b));
                counts
                    .into_iter()
                    .map(|(b, n)| (SocketAddr::V4(b), n))
                    .collect()
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot count the kernel-forwarded connections to earlier backends; not waiting for them");
                self.watch.clear();
                BTreeMap::new()
            }
        }
    }
}

type SharedKernel = Arc<Mutex<Kernel>>;

/// Applies `target` to the kernel's rules off the runtime thread, then
/// makes it the front's target: new connections and the answer (`seq`)
/// follow it only once the rules do.
async fn take_target(routes: &Shared, kernel: &SharedKernel, target: Option<Target>) {
    let (k, t) = (kernel.clone(), target.clone());
    let applied = tokio::task::spawn_blocking(move || {
        let mut k = k.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let state = k.apply(t.as_ref());
        (state, k.count())
    })
    .await;
    let (state, counts) = applied.unwrap_or_else(|e| {
        (
            KernelForward {
                table: None,
                why_not: Some(format!("the rules' task failed: {e}")),
            },
            BTreeMap::new(),
        )
    });
    let mut r = lock(routes);
    r.applied_seq = target.as_ref().map_or(0, |t| t.seq);
    r.target = target;
    r.kernel = state;
    r.kernel_open = counts;
}

/// Writes the state file off the runtime thread, latest state last.
fn save(files: &FrontFiles, state: FrontState) {
    if let Err(e) = durable::write_json(&files.state, &state) {
        tracing::warn!(error = %e, "cannot write the front's state");
    }
}

enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

async fn serve(
    files: FrontFiles,
    listen: ListenAddr,
    socket: std::os::fd::OwnedFd,
    kernel: Kernel,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let listener = match &listen {
        ListenAddr::Tcp(_) => {
            let l = std::net::TcpListener::from(socket);
            l.set_nonblocking(true)?;
            Listener::Tcp(tokio::net::TcpListener::from_std(l)?)
        }
        ListenAddr::Unix(_) => {
            let l = std::os::unix::net::UnixListener::from(socket);
            l.set_nonblocking(true)?;
            Listener::Unix(tokio::net::UnixListener::from_std(l)?)
        }
    };
    let routes: Shared = Arc::new(Mutex::new(Routes::default()));
    let kernel: SharedKernel = Arc::new(Mutex::new(kernel));
    take_target(&routes, &kernel, durable::read_json(&files.target)).await;
    // Drain progress is written by one task, woken by connection ends.
    let changed = Arc::new(tokio::sync::Notify::new());
    let writer = {
        let (routes, changed, files, listen) = (
            routes.clone(),
            changed.clone(),
            files.clone(),
            listen.clone(),
        );
        tokio::spawn(async move {
            let mut last = None;
            loop {
                let state = lock(&routes).state(&listen);
                if last.as_ref() != Some(&state) {
                    let f = files.clone();
                    let s = state.clone();
                    let _ = tokio::task::spawn_blocking(move || save(&f, s)).await;
                    last = Some(state);
                }
                changed.notified().await;
            }
        })
    };
    // Kernel-forwarded connections to earlier backends are counted from
    // conntrack while there are any.
    let poller = {
        let (routes, changed, kernel) = (routes.clone(), changed.clone(), kernel.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(CONNTRACK_POLL).await;
                let k = kernel.clone();
                let Ok(counts) = tokio::task::spawn_blocking(move || {
                    let mut k = k.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    (!k.watch.is_empty()).then(|| k.count())
                })
                .await
                else {
                    continue;
                };
                let Some(counts) = counts else { continue };
                let mut r = lock(&routes);
                if r.kernel_open != counts {
                    r.kernel_open = counts;
                    drop(r);
                    changed.notify_one();
                }
            }
        })
    };
    loop {
        tokio::select! {
            accepted = accept(&listener) => match accepted {
                Ok((inbound, peer)) => {
                    let (routes, changed) = (routes.clone(), changed.clone());
                    let target_path = files.target.clone();
                    let mode = lock(&routes).target.as_ref().map_or(ListenMode::Tcp, |t| t.mode);
                    match mode {
                        ListenMode::Tcp => tokio::spawn(async move {
                            forward(inbound, routes, changed, target_path).await;
                        }),
                        ListenMode::Http => tokio::spawn(async move {
                            http::serve(inbound, peer, routes, changed, target_path).await;
                        }),
                    };
                }
                Err(e) => {
                    // EMFILE and the like: wait a little rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = hup.recv() => {
                let target: Option<Target> = {
                    let path = files.target.clone();
                    tokio::task::spawn_blocking(move || durable::read_json(&path)).await.ok().flatten()
                };
                take_target(&routes, &kernel, target).await;
                changed.notify_one();
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // A clean exit takes the rules away: this machine's clients reach the
    // front's socket (closed next) like any other.
    poller.abort();
    let k = kernel.clone();
    let removed = tokio::task::spawn_blocking(move || {
        k.lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove()
    })
    .await;
    if let Ok(Err(e)) = removed {
        tracing::warn!(error = %e, "cannot remove the kernel forwarding rules on exit");
    }
    drop(listener);
    let t = Instant::now();
    while lock(&routes).open.values().any(|n| *n > 0) && t.elapsed() < EXIT_DRAIN {
        tokio::time::sleep(POLL).await;
    }
    writer.abort();
    Ok(())
}

fn lock(routes: &Shared) -> std::sync::MutexGuard<'_, Routes> {
    // A panic while holding it cannot leave the counts half-changed: every
    // change is one statement.
    routes
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A new client connection and, on TCP, the client's address.
async fn accept(l: &Listener) -> std::io::Result<(Box<dyn Stream>, Option<std::net::IpAddr>)> {
    Ok(match l {
        Listener::Tcp(l) => {
            let (s, peer) = l.accept().await?;
            let _ = s.set_nodelay(true);
            (Box::new(s), Some(peer.ip().to_canonical()))
        }
        Listener::Unix(l) => (Box::new(l.accept().await?.0), None),
    })
}

/// Counts a connection against its backend while it lives.
struct Held {
    routes: Shared,
    changed: Arc<tokio::sync::Notify>,
    backend: SocketAddr,
}

impl Held {
    fn new(routes: &Shared, changed: &Arc<tokio::sync::Notify>, backend: SocketAddr) -> Self {
        *lock(routes).open.entry(backend).or_default() += 1;
        Self {
            routes: routes.clone(),
            changed: changed.clone(),
            backend,
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut r = lock(&self.routes);
        let draining = r.target.as_ref().map(|t| t.backend) != Some(self.backend);
        if let Some(n) = r.open.get_mut(&self.backend) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                r.open.remove(&self.backend);
            }
        }
        drop(r);
        if draining {
            self.changed.notify_one();
        }
    }
}

/// The target as now written, for a retry after a failed connect: a switch
/// may have been written but not yet signalled.
async fn reread_target(routes: &Shared, changed: &tokio::sync::Notify, target_path: &Path) {
    let path = target_path.to_owned();
    if let Ok(Some(t)) =
        tokio::task::spawn_blocking(move || durable::read_json::<Target>(&path)).await
    {
        let mut r = lock(routes);
        if r.target.as_ref().is_none_or(|c| c.seq < t.seq) {
            r.target = Some(t);
            changed.notify_one();
        }
    }
}

async fn forward(
    mut inbound: Box<dyn Stream>,
    routes: Shared,
    changed: Arc<tokio::sync::Notify>,
    target_path: PathBuf,
) {
    for attempt in 0..2 {
        if attempt == 1 {
            // Refused or unreachable: a switch may have been written but
            // not yet signalled; read the target again and retry once.
            tokio::time::sleep(RETRY_PAUSE).await;
            reread_target(&routes, &changed, &target_path).await;
        }
        let Some(backend) = lock(&routes).target.as_ref().map(|t| t.backend) else {
            return;
        };
        let held = Held::new(&routes, &changed, backend);
        let started = Instant::now();
        let out = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(backend))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))
            .and_then(|r| r);
        match out {
            Ok(mut outbound) => {
                let connected = started.elapsed();
                if connected >= SLOW {
                    tracing::warn!(%backend, connect_ms = connected.as_millis() as u64, "slow connect to the backend");
                }
                let _ = outbound.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                tracing::debug!(%backend, total_ms = started.elapsed().as_millis() as u64, "connection through the front ended");
                drop(held);
                return;
            }
            Err(e) => {
                tracing::warn!(%backend, error = %e, "cannot reach the backend");
                drop(held);
            }
        }
    }
}
