//! Upgrades of the agent itself (the controller's `AgentUpgrade`), and the
//! guard that brings the old binary back when the new one does not come up.
//!
//! # State machine (one node)
//!
//! ```text
//! command ──▶ fetch by digest into .<name>.download/ next to the executable
//!   (sha256 checked as written, size checked, fsync) ──▶ renamed to
//!   .<name>.new (same filesystem) ──▶ `new --version`
//!   (deadline, must print `slipway-agent VERSION`) ── any failure ──▶ FAILED,
//!   nothing swapped
//!   ▼
//! old binary hard-linked to <exe>.old ──▶ record `upgrade/pending.json`
//!   (stage armed: command, versions, digest, args, deadline) ──▶ guard
//!   started from <exe>.old (`slipway-agent upgrade-guard`), holding
//!   `upgrade/guard.lock` ──▶ rename .new over <exe> ──▶ restart:
//!   under systemd exit 75 (Restart=on-failure starts the new file;
//!   KillMode=process leaves apps and the guard alone), else exec(2) of
//!   <exe> with the same arguments (same pid)
//!   ▼
//! new agent: session open (Welcome) ──▶ under `upgrade/lock`: armed and
//!   running the new file (its inode, recorded) ──▶ stage committed ──▶ ledger: SUCCEEDED
//!   (the version in its message) ──▶ record removed ──▶ the controller's
//!   re-sent command is answered from the ledger
//! guard: committed or removed ──▶ exits. Still armed at the deadline, or
//!   (without systemd) no agent holding `agent.lock` for DEAD_AGENT_GRACE ──▶ under `upgrade/lock`:
//!   <exe>.old renamed back over <exe>, stage rolled_back{reason} ──▶ the
//!   running agent stopped (SIGTERM, SIGKILL) ──▶ old agent started with the
//!   same arguments (systemd: `systemctl restart UNIT`) ──▶ its session
//!   records ROLLED_BACK with the reason
//! ```
//!
//! Every step leaves one working binary at <exe>: the swap is one rename,
//! the old file stays whole under <exe>.old until a commit, and the record
//! is written (temp + fsync + rename) before the swap. An agent started on
//! the old binary with the record still armed (a crash before the rename)
//! records the upgrade as rolled back. `agent.lock` (held by `run` for its
//! life, released by the kernel however it ends) keeps two agents of one
//! state dir from running at once, and tells the guard whether one runs.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::ledger::{LedgerFile, Recorded};
use crate::deploy::Outcome;
use crate::digest::Sha256;
use crate::lock::{self, AppLock, Holder, LockError};
use crate::{durable, proc};

/// Exit code of an agent that leaves so that systemd starts its new
/// binary (EX_TEMPFAIL: non-zero, so `Restart=on-failure` restarts it).
pub const EXIT_RESTART: i32 = 75;
/// `--version` of a new binary must answer within this.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the guard looks at the record and the agent lock.
const GUARD_POLL: Duration = Duration::from_millis(200);
/// No agent holding `agent.lock` this long after the swap: the new agent
/// is not coming up (it exits at start); roll back before the deadline.
/// Not under systemd, whose `RestartSec` may be longer: there the commit
/// deadline alone decides.
const DEAD_AGENT_GRACE: Duration = Duration::from_secs(5);
/// How long the guard waits for the guard lock to show it started.
const GUARD_START: Duration = Duration::from_secs(10);
/// SIGTERM to SIGKILL for a new agent the guard stops.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Bytes of `--version` output kept.
const VERSION_OUTPUT: usize = 4096;
/// Tries at running a file just written while another thread's fork may
/// still hold its write descriptor (ETXTBSY until that child execs).
const BUSY_TRIES: u32 = 50;
/// Between those tries.
const BUSY_WAIT: Duration = Duration::from_millis(20);

/// Whether `e` is ETXTBSY: a file just written is still open for writing
/// in some process (a fork between our write and its exec).
fn text_busy(e: &std::io::Error) -> bool {
    e.raw_os_error() == Some(nix::errno::Errno::ETXTBSY as i32)
}

/// The upgrade's files under the controller state dir.
fn upgrade_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("upgrade")
}

/// The pending-upgrade record.
pub fn record_path(state_dir: &Path) -> PathBuf {
    upgrade_dir(state_dir).join("pending.json")
}

/// Serializes the commit (new agent) against the rollback (guard).
fn upgrade_lock_path(state_dir: &Path) -> PathBuf {
    upgrade_dir(state_dir).join("lock")
}

/// Held by the one guard of an upgrade.
fn guard_lock_path(state_dir: &Path) -> PathBuf {
    upgrade_dir(state_dir).join("guard.lock")
}

/// Held by `slipway-agent run` for its whole life (pid inside).
pub fn agent_lock_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.lock")
}

/// Where an upgrade stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum Stage {
    /// The new binary is (about to be) in place; the guard waits for it.
    Armed,
    /// The new agent opened a session: the upgrade holds.
    Committed,
    /// The old binary is back, for `reason`.
    RolledBack { reason: String },
}

/// A file by device and inode: a rename keeps it, a copy does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    /// The file at `path` (following links: `/proc/self/exe` is the
    /// running image even when renamed or deleted).
    pub fn of(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::metadata(path)?;
        Ok(Self {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// `upgrade/pending.json`: everything the new agent and the guard need.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The controller's command, answered by whichever agent comes up.
    pub command_id: String,
    pub from_version: String,
    pub to_version: String,
    /// Digest of the new binary.
    pub sha256: String,
    /// The new binary's file: an agent whose running image is this file
    /// is the new one (cheaper than hashing the image at every start).
    pub new_file: FileId,
    /// The agent's executable path.
    pub exe: PathBuf,
    /// The old binary, kept.
    pub old: PathBuf,
    /// `run`'s arguments, for starting the agent again.
    pub args: Vec<String>,
    /// The systemd unit the agent runs in, if it does.
    pub systemd_unit: Option<String>,
    /// Rollback when not committed by then (seconds since Unix epoch).
    pub deadline_unix: i64,
    #[serde(flatten)]
    pub stage: Stage,
}

fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

fn read_record(state_dir: &Path) -> Result<Option<Pending>, String> {
    let path = record_path(state_dir);
    match std::fs::read(&path) {
        Ok(data) => serde_json::from_slice(&data)
            .map(Some)
            .map_err(|e| format!("the upgrade record {} is invalid: {e}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

fn write_record(state_dir: &Path, record: &Pending) -> Result<(), String> {
    let path = record_path(state_dir);
    durable::write_json(&path, record).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn remove_record(state_dir: &Path) -> Result<(), String> {
    let path = record_path(state_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => durable::fsync_parent(&path).map_err(|e| e.to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("cannot remove {}: {e}", path.display())),
    }
}

fn holder(operation: &str) -> Holder {
    Holder {
        pid: std::process::id(),
        operation: operation.to_owned(),
        release: None,
        started_at: time::OffsetDateTime::now_utc(),
    }
}

/// Takes the agent lock for `run`: refused, naming the holder, while
/// another agent of this state dir runs.
pub fn lock_agent(state_dir: &Path) -> Result<AppLock, String> {
    let path = agent_lock_path(state_dir);
    AppLock::acquire(&path, "agent", &holder("run")).map_err(|e| match e {
        LockError::Busy { holder, .. } => format!(
            "another slipway-agent runs with the state dir {} ({})",
            state_dir.display(),
            holder.map_or_else(|| "holder unknown".to_owned(), |h| h.to_string())
        ),
        other => other.to_string(),
    })
}

/// Takes the upgrade lock, waiting for it (the other side holds it only
/// for a few file operations).
fn lock_upgrade(state_dir: &Path) -> Result<AppLock, String> {
    let path = upgrade_lock_path(state_dir);
    let start = Instant::now();
    loop {
        match AppLock::acquire(&path, "agent upgrade", &holder("upgrade")) {
            Ok(l) => return Ok(l),
            Err(LockError::Busy { .. }) if start.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// A new binary, fetched, copied next to the executable and checked.
#[derive(Debug)]
pub struct Staged {
    pub command_id: String,
    pub sha256: Sha256,
    /// The version it reports.
    pub version: String,
    /// `.<name>.new` next to the executable.
    pub new: PathBuf,
    pub exe: PathBuf,
    pub state_dir: PathBuf,
    pub deadline: Duration,
}

/// The running agent's executable, refused when it is gone or replaced.
pub fn own_exe() -> Result<PathBuf, String> {
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the agent's executable: {e}"))?;
    if !exe.is_file() {
        return Err(format!(
            "the agent's executable {} is gone (replaced while running?)",
            exe.display()
        ));
    }
    Ok(exe)
}

fn new_path(exe: &Path) -> PathBuf {
    let name = exe.file_name().map_or_else(
        || "slipway-agent".to_owned(),
        |n| n.to_string_lossy().into_owned(),
    );
    exe.with_file_name(format!(".{name}.new"))
}

/// `<exe>.old`.
pub fn old_path(exe: &Path) -> PathBuf {
    let mut name = exe.as_os_str().to_owned();
    name.push(".old");
    PathBuf::from(name)
}

/// Refuses an upgrade while another one is unfinished on this node.
pub fn check_idle(state_dir: &Path) -> Result<(), String> {
    match read_record(state_dir)? {
        Some(r) => Err(format!(
            "an agent upgrade is unfinished on this node (command {}, {} to {}, {:?})",
            r.command_id, r.from_version, r.to_version, r.stage
        )),
        None => Ok(()),
    }
}

/// Where the new binary is downloaded: a directory next to the
/// executable (same filesystem, so it becomes `.<name>.new` by a rename,
/// with no copy and no second hashing pass).
pub fn download_dir(exe: &Path) -> PathBuf {
    let name = exe.file_name().map_or_else(
        || "slipway-agent".to_owned(),
        |n| n.to_string_lossy().into_owned(),
    );
    exe.with_file_name(format!(".{name}.download"))
}

/// Moves the fetched binary `fetched` (its sha256 checked as it was
/// written, fsynced) to `.<name>.new` next to `exe` and runs it with
/// `--version` (blocking). The version it reports must be `expected` when
/// that is not empty. Returns the new file and its version.
pub fn stage(fetched: &Path, exe: &Path, expected: &str) -> Result<(PathBuf, String), String> {
    let new = new_path(exe);
    let moved = std::fs::rename(fetched, &new)
        .and_then(|()| std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o755)))
        .and_then(|()| durable::fsync_parent(&new));
    if let Err(e) = moved {
        let _ = std::fs::remove_file(&new);
        return Err(format!(
            "cannot write the new binary {}: {e}",
            new.display()
        ));
    }
    let checked = binary_version(&new).and_then(|version| {
        if !expected.is_empty() && version != expected {
            return Err(format!(
                "the new binary reports version {version}, but the upgrade is to {expected}"
            ));
        }
        Ok(version)
    });
    match checked {
        Ok(version) => Ok((new, version)),
        Err(e) => {
            let _ = std::fs::remove_file(&new);
            Err(e)
        }
    }
}

/// Runs `binary --version` within [`VERSION_TIMEOUT`]: it must exit 0 and
/// print `slipway-agent VERSION…`; returns VERSION.
pub fn binary_version(binary: &Path) -> Result<String, String> {
    let policy = proc::Policy {
        timeout: VERSION_TIMEOUT,
        kill_grace: Duration::from_secs(1),
        after_exit: proc::AfterExit::KillGroup,
    };
    let mut tries = 0;
    let done = loop {
        let mut cmd = Command::new(binary);
        cmd.arg("--version");
        let output = proc::Output::Capture {
            limit: VERSION_OUTPUT,
        };
        match proc::run(cmd, output, &policy) {
            Err(e) if text_busy(e.io()) && tries < BUSY_TRIES => {
                tries += 1;
                std::thread::sleep(BUSY_WAIT);
            }
            other => break other,
        }
    }
    .map_err(|e| format!("cannot run {} --version: {e}", binary.display()))?;
    let out = done.stdout.text();
    let shown = slipway_proto::limits::one_line(&out, 200);
    match done.ending {
        proc::Ending::TimedOut => {
            return Err(format!(
                "{} --version did not answer within {VERSION_TIMEOUT:?}",
                binary.display()
            ))
        }
        proc::Ending::Exited(status) if !status.success() => {
            return Err(format!(
                "{} --version failed ({status}): {}",
                binary.display(),
                slipway_proto::limits::one_line(&done.stderr.text(), 200)
            ))
        }
        proc::Ending::Exited(_) => {}
    }
    let mut words = out.lines().next().unwrap_or("").split_whitespace();
    match (words.next(), words.next()) {
        (Some("slipway-agent"), Some(version))
            if slipway_proto::limits::check_version("version", version).is_ok() =>
        {
            Ok(version.to_owned())
        }
        _ => Err(format!(
            "{} --version printed {shown:?}, not `slipway-agent VERSION`",
            binary.display()
        )),
    }
}

/// Whether this agent runs under systemd, and its unit if it can tell.
fn systemd_unit() -> Option<String> {
    let under =
        std::env::var_os("INVOCATION_ID").is_some() || std::env::var_os("NOTIFY_SOCKET").is_some();
    if !under {
        return None;
    }
    // `0::/system.slice/slipway-agent.service`: the unit is the last part.
    let unit = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|text| {
            text.lines()
                .filter_map(|l| l.rsplit('/').next())
                .find(|u| u.ends_with(".service"))
                .map(str::to_owned)
        });
    Some(unit.unwrap_or_else(|| "slipway-agent.service".to_owned()))
}

/// Swaps `staged` in and restarts the agent: keeps the old binary as
/// `<exe>.old`, writes the record, starts the guard from the old binary,
/// renames the new one over the executable, and restarts (exit under
/// systemd, exec otherwise). Returns only on a failure, with nothing
/// swapped (blocking).
pub fn swap_and_restart(staged: Staged, from_version: &str) -> String {
    let Staged {
        command_id,
        sha256,
        version,
        new,
        exe,
        state_dir,
        deadline,
    } = staged;
    let old = old_path(&exe);
    let undo = |why: String| {
        let _ = std::fs::remove_file(&new);
        let _ = remove_record(&state_dir);
        why
    };
    let args: Vec<String> = match std::env::args_os()
        .skip(1)
        .map(|a| a.into_string())
        .collect::<Result<_, _>>()
    {
        Ok(a) => a,
        Err(a) => {
            return undo(format!(
                "the agent's argument {a:?} is not UTF-8; cannot restart it"
            ))
        }
    };
    // The old binary, whole, under <exe>.old (a hard link: the same file).
    let old_tmp = durable::temp_sibling(&old, "link");
    let kept = std::fs::hard_link(&exe, &old_tmp)
        .and_then(|()| std::fs::rename(&old_tmp, &old))
        .and_then(|()| durable::fsync_parent(&old));
    if let Err(e) = kept {
        let _ = std::fs::remove_file(&old_tmp);
        return undo(format!(
            "cannot keep the old binary as {}: {e}",
            old.display()
        ));
    }
    let systemd_unit = systemd_unit();
    let new_file = match FileId::of(&new) {
        Ok(id) => id,
        Err(e) => return undo(format!("cannot stat the new binary {}: {e}", new.display())),
    };
    let record = Pending {
        command_id,
        from_version: from_version.to_owned(),
        to_version: version,
        sha256: sha256.to_string(),
        new_file,
        exe: exe.clone(),
        old: old.clone(),
        args: args.clone(),
        systemd_unit: systemd_unit.clone(),
        deadline_unix: now_unix() + i64::try_from(deadline.as_secs()).unwrap_or(i64::MAX),
        stage: Stage::Armed,
    };
    if let Err(e) = std::fs::create_dir_all(upgrade_dir(&state_dir))
        .map_err(|e| e.to_string())
        .and_then(|()| write_record(&state_dir, &record))
    {
        return undo(e);
    }
    // The guard runs the old binary: whatever the new one does, it is not
    // the new one that decides to keep itself.
    let guard = Command::new(&old)
        .arg("upgrade-guard")
        .arg("--state-dir")
        .arg(&state_dir)
        .stdin(std::process::Stdio::null())
        // Its own process group: a signal to the agent's group (a shell's
        // Ctrl-C) does not reach it.
        .process_group(0)
        .spawn();
    let mut guard = match guard {
        Ok(g) => g,
        Err(e) => {
            return undo(format!(
                "cannot start the upgrade guard {}: {e}",
                old.display()
            ))
        }
    };
    let guard_lock = guard_lock_path(&state_dir);
    let start = Instant::now();
    while !lock::is_held(&guard_lock) {
        if let Ok(Some(status)) = guard.try_wait() {
            return undo(format!("the upgrade guard exited at start ({status})"));
        }
        if start.elapsed() > GUARD_START {
            let _ = guard.kill();
            return undo(format!(
                "the upgrade guard did not start within {GUARD_START:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Reaped by whoever inherits it: this process is replaced or exits now.
    drop(guard);
    crate::fault::point("upgrade_before_swap");
    if let Err(e) = std::fs::rename(&new, &exe).and_then(|()| durable::fsync_parent(&exe)) {
        // The guard sees the record gone and leaves.
        return undo(format!(
            "cannot move the new binary over {}: {e}",
            exe.display()
        ));
    }
    crate::fault::point("upgrade_after_swap");
    if let Some(unit) = &systemd_unit {
        tracing::info!(%unit, "agent binary replaced; exiting so systemd starts the new one");
        std::process::exit(EXIT_RESTART);
    }
    tracing::info!(exe = %exe.display(), "agent binary replaced; re-executing it");
    let mut tries = 0;
    let err = loop {
        let err = Command::new(&exe).args(&args).exec();
        if !text_busy(&err) || tries >= BUSY_TRIES {
            break err;
        }
        tries += 1;
        std::thread::sleep(BUSY_WAIT);
    };
    // exec failed: this (old) agent keeps running; put the old binary back
    // now and drop the record, so the guard leaves without restarting it.
    let why = format!("cannot execute the new binary {}: {err}", exe.display());
    match undo_swap(&state_dir) {
        Ok(()) => why,
        Err(e) => format!("{why}; {e} (the upgrade guard restores it at the deadline)"),
    }
}

/// Puts the old binary back at the executable's path and removes the
/// record (the swapping agent itself, when it cannot restart).
fn undo_swap(state_dir: &Path) -> Result<(), String> {
    let _held = lock_upgrade(state_dir)?;
    let Some(record) = read_record(state_dir)? else {
        return Ok(());
    };
    if swapped(&record) {
        std::fs::rename(&record.old, &record.exe)
            .and_then(|()| durable::fsync_parent(&record.exe))
            .map_err(|e| format!("cannot put the old binary back: {e}"))?;
    }
    remove_record(state_dir)
}

/// After a session opened (Welcome) and before any command is read: settles
/// a pending upgrade. A new agent running the new digest commits it; an
/// agent running anything else finds it rolled back. The outcome goes to
/// the ledger under the upgrade's command id (the controller re-sends the
/// command after the reconnect and gets it from there), and the record is
/// removed.
pub async fn settle(state_dir: &Path, ledger: &LedgerFile) {
    let dir = state_dir.to_owned();
    let settled = tokio::task::spawn_blocking(move || settle_record(&dir)).await;
    let result = match settled {
        Ok(Ok(Some(r))) => r,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::error!("agent upgrade: {e}");
            return;
        }
        Err(e) => {
            tracing::error!("agent upgrade task failed: {e}");
            return;
        }
    };
    tracing::info!(command = %result.command_id, outcome = ?result.outcome, "agent upgrade settled: {}", result.message);
    if let Err(e) = ledger.record(result).await {
        tracing::error!("cannot record the agent upgrade's result: {e}");
        return;
    }
    let dir = state_dir.to_owned();
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || remove_record(&dir)).await {
        tracing::warn!("agent upgrade: {e}");
    }
}

/// The blocking part of [`settle`]: the outcome to record, if an upgrade
/// was pending.
fn settle_record(state_dir: &Path) -> Result<Option<Recorded>, String> {
    if read_record(state_dir)?.is_none() {
        return Ok(None);
    }
    let _held = lock_upgrade(state_dir)?;
    let Some(mut record) = read_record(state_dir)? else {
        return Ok(None);
    };
    let running = crate::version::current();
    if record.stage == Stage::Armed {
        let me = FileId::of(Path::new("/proc/self/exe"))
            .map_err(|e| format!("cannot stat the running agent: {e}"))?;
        record.stage = if me == record.new_file {
            Stage::Committed
        } else {
            Stage::RolledBack {
                reason: format!(
                    "the agent started again on its old binary (version {running}) before the new one ran"
                ),
            }
        };
        write_record(state_dir, &record)?;
    }
    let result = match &record.stage {
        Stage::Committed => Recorded {
            command_id: record.command_id.clone(),
            outcome: Outcome::Succeeded,
            // No release: an agent version is not a release id (it may hold
            // a `+`); the controller records the version the node's session
            // reports.
            release_id: String::new(),
            message: format!(
                "agent upgraded from {} to {running}; the old binary is kept as {}",
                record.from_version,
                record.old.display()
            ),
        },
        Stage::RolledBack { reason } => Recorded {
            command_id: record.command_id.clone(),
            outcome: Outcome::RolledBack,
            release_id: String::new(),
            message: format!(
                "agent upgrade to {} rolled back: {reason}",
                record.to_version
            ),
        },
        Stage::Armed => return Err("upgrade record still armed after settling".to_owned()),
    };
    Ok(Some(result))
}

/// `slipway-agent upgrade-guard`: run from the old binary by the agent that
/// swaps itself; waits for the new agent's commit and otherwise puts the
/// old binary back and restarts the agent (blocking).
pub fn guard(state_dir: &Path) -> Result<(), String> {
    let _guard = match AppLock::acquire(
        &guard_lock_path(state_dir),
        "agent upgrade guard",
        &holder("upgrade-guard"),
    ) {
        Ok(l) => l,
        Err(LockError::Busy { holder, .. }) => {
            return Err(format!(
                "another upgrade guard runs ({})",
                holder.map_or_else(|| "holder unknown".to_owned(), |h| h.to_string())
            ))
        }
        Err(e) => return Err(e.to_string()),
    };
    let agent_lock = agent_lock_path(state_dir);
    let mut no_agent_since: Option<Instant> = None;
    loop {
        let Some(record) = read_record(state_dir)? else {
            return Ok(());
        };
        if record.stage != Stage::Armed {
            return Ok(());
        }
        if record.systemd_unit.is_none() && swapped(&record) && !lock::is_held(&agent_lock) {
            let since = *no_agent_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= DEAD_AGENT_GRACE {
                return roll_back(
                    state_dir,
                    &format!(
                        "the new agent (version {}) stopped before opening a session with the controller",
                        record.to_version
                    ),
                );
            }
        } else {
            no_agent_since = None;
        }
        if now_unix() >= record.deadline_unix {
            return roll_back(
                state_dir,
                &format!(
                    "the new agent (version {}) did not open a session with the controller in time",
                    record.to_version
                ),
            );
        }
        std::thread::sleep(GUARD_POLL);
    }
}

/// Whether the new binary is at the executable's path: the kept old one
/// is another file (a hard link of the old executable until the swap).
/// Compared by inode, as the guard asks several times a second.
fn swapped(record: &Pending) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (
        std::fs::metadata(&record.exe),
        std::fs::metadata(&record.old),
    ) {
        (Ok(exe), Ok(old)) => (exe.dev(), exe.ino()) != (old.dev(), old.ino()),
        _ => false,
    }
}

/// Puts the old binary back, records why, stops whatever agent runs and
/// starts the old one.
fn roll_back(state_dir: &Path, reason: &str) -> Result<(), String> {
    let record = {
        let _held = lock_upgrade(state_dir)?;
        let Some(mut record) = read_record(state_dir)? else {
            return Ok(());
        };
        if record.stage != Stage::Armed {
            // Committed (or settled) meanwhile.
            return Ok(());
        }
        if swapped(&record) {
            std::fs::rename(&record.old, &record.exe)
                .and_then(|()| durable::fsync_parent(&record.exe))
                .map_err(|e| {
                    format!(
                        "cannot put the old binary {} back as {}: {e}",
                        record.old.display(),
                        record.exe.display()
                    )
                })?;
        }
        record.stage = Stage::RolledBack {
            reason: format!("{reason}; version {} restored", record.from_version),
        };
        write_record(state_dir, &record)?;
        record
    };
    tracing::warn!(exe = %record.exe.display(), "agent upgrade rolled back: {reason}");
    if let Some(unit) = &record.systemd_unit {
        // Restarts a hung new agent as well as one crash-looping or given
        // up on (reset-failed clears a start limit it hit);
        // KillMode=process spares the apps and this guard.
        let _ = Command::new("systemctl")
            .arg("reset-failed")
            .arg(unit)
            .status();
        let status = Command::new("systemctl")
            .arg("restart")
            .arg(unit)
            .status()
            .map_err(|e| format!("cannot run systemctl restart {unit}: {e}"))?;
        if !status.success() {
            return Err(format!("systemctl restart {unit} failed ({status})"));
        }
        return Ok(());
    }
    stop_agent(state_dir);
    Command::new(&record.exe)
        .args(&record.args)
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the old agent {}: {e}", record.exe.display()))?;
    Ok(())
}

/// Stops the agent holding `agent.lock`, if one does: SIGTERM, SIGKILL
/// after [`STOP_GRACE`]; returns once the lock is free (or it gave up).
fn stop_agent(state_dir: &Path) {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let path = agent_lock_path(state_dir);
    let Some(pid) = lock::read_holder(&path)
        .filter(|_| lock::is_held(&path))
        .and_then(|h| i32::try_from(h.pid).ok())
    else {
        return;
    };
    let pid = Pid::from_raw(pid);
    let _ = kill(pid, Signal::SIGTERM);
    for (signal, wait) in [(Some(Signal::SIGKILL), STOP_GRACE), (None, STOP_GRACE)] {
        let start = Instant::now();
        while lock::is_held(&path) && start.elapsed() < wait {
            std::thread::sleep(Duration::from_millis(50));
        }
        if !lock::is_held(&path) {
            return;
        }
        if let Some(s) = signal {
            let _ = kill(pid, s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_path_is_next_to_the_executable() {
        assert_eq!(
            old_path(Path::new("/usr/local/bin/slipway-agent")),
            PathBuf::from("/usr/local/bin/slipway-agent.old")
        );
        assert_eq!(
            new_path(Path::new("/usr/local/bin/slipway-agent")),
            PathBuf::from("/usr/local/bin/.slipway-agent.new")
        );
    }

    #[test]
    fn record_round_trips_with_its_stage() {
        let record = Pending {
            command_id: "d-1.n-1".into(),
            from_version: "0.1.0".into(),
            to_version: "0.2.0".into(),
            sha256: "ab".repeat(32),
            new_file: FileId { dev: 1, ino: 2 },
            exe: "/x/slipway-agent".into(),
            old: "/x/slipway-agent.old".into(),
            args: vec!["run".into()],
            systemd_unit: None,
            deadline_unix: 5,
            stage: Stage::RolledBack {
                reason: "late".into(),
            },
        };
        let text = serde_json::to_string(&record).unwrap();
        assert!(text.contains(r#""stage":"rolled_back""#), "{text}");
        assert_eq!(serde_json::from_str::<Pending>(&text).unwrap(), record);
    }
}
