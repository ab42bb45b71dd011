//! Running a command with a deadline: the one place the agent runs a child
//! to completion (health exec checks, deploy hooks, `pm2` calls).
//!
//! # Guarantees
//!
//! - The command runs in a process group of its own (`process_group(0)`),
//!   so whatever it forks can be signalled with it.
//! - The deadline bounds the whole call, output reading included: a
//!   background process that keeps the output pipes open cannot make
//!   [`run`] wait past it.
//! - The kill policy: SIGTERM (and SIGCONT, so a stopped process sees it) to
//!   the group, then SIGKILL once `kill_grace` passed, and [`run`] returns
//!   only when no process of the group is left alive. The group is seen in
//!   `/proc`, so a group that obeys SIGTERM costs no grace.
//! - Output is bounded: of each stream only the last `limit` bytes are kept
//!   in memory ([`Captured::dropped`] counts the rest), or it goes to a file.
//! - The group leader (the command itself) is reaped only after its group
//!   was dealt with: until then it stays a zombie and its pid — the group's
//!   id — cannot be handed to another process that `killpg` would then hit.
//!
//! A process that leaves the group (`setsid`, `setpgid`, as the PM2 daemon
//! does) is out of reach by design: that is how a command starts something
//! meant to outlive it.
//!
//! Blocking code: call it from a blocking thread.

use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Longest wait between two looks at the child while nothing is read.
const POLL: Duration = Duration::from_millis(10);
/// After SIGKILL, how long to wait for the group to be gone. SIGKILL cannot
/// be caught; only a process stuck in the kernel (uninterruptible I/O) takes
/// longer, and then waiting more would not help the caller.
const KILL_WAIT: Duration = Duration::from_secs(2);
/// Read at most this much per stream in one turn, so a child that writes
/// faster than we read cannot keep us from looking at the clock.
const TURN_BYTES: usize = 1 << 20;
/// Size of one read.
const CHUNK: usize = 16 << 10;

/// Errors from [`run`]: the command could not be started or waited for.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("cannot start: {0}")]
    Spawn(#[source] io::Error),
    #[error("cannot set up output pipes: {0}")]
    Pipe(#[source] io::Error),
    #[error("waiting for it: {0}")]
    Wait(#[source] io::Error),
}

impl ProcError {
    /// The underlying I/O error (e.g. to tell "program not found").
    pub fn io(&self) -> &io::Error {
        match self {
            Self::Spawn(e) | Self::Pipe(e) | Self::Wait(e) => e,
        }
    }

    pub fn into_io(self) -> io::Error {
        match self {
            Self::Spawn(e) | Self::Pipe(e) | Self::Wait(e) => e,
        }
    }
}

/// Where the command's stdout and stderr go (stdin is always `/dev/null`).
#[derive(Debug)]
pub enum Output {
    /// Each into a pipe of its own; the last `limit` bytes of each are kept.
    Capture { limit: usize },
    /// Both appended to this file (e.g. the deploy log), in the order
    /// written; nothing is kept in memory.
    File(File),
}

/// What happens to the rest of the process group once the command exited
/// by itself before the deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterExit {
    /// Killed (SIGTERM, SIGKILL after the grace): the command was one step,
    /// and nothing it forked outlives the step.
    KillGroup,
    /// Left alone: its output is read until the pipes close or `drain`
    /// passes (never past the deadline). For a command that legitimately
    /// starts something, like the `pm2` CLI its daemon.
    Leave { drain: Duration },
}

/// The time limits and kill policy of one run.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// The command (output reading included) must be done within this.
    pub timeout: Duration,
    /// Between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    pub after_exit: AfterExit,
}

/// How the command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// It exited (or died of a signal) by itself before the deadline.
    Exited(ExitStatus),
    /// The deadline passed first; its group was killed.
    TimedOut,
}

/// The bytes kept of one output stream.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Captured {
    /// The last bytes written (at most the limit).
    pub bytes: Vec<u8>,
    /// Bytes written before those, not kept.
    pub dropped: u64,
}

impl Captured {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }
}

/// A finished run.
#[derive(Debug)]
pub struct Finished {
    pub ending: Ending,
    /// Empty with [`Output::File`].
    pub stdout: Captured,
    pub stderr: Captured,
    pub elapsed: Duration,
}

impl Finished {
    /// Exited by itself with status 0.
    pub fn success(&self) -> bool {
        matches!(self.ending, Ending::Exited(s) if s.success())
    }
}

/// Runs `cmd` under `policy`: see the module doc for what is guaranteed.
/// `cmd`'s stdin, stdout, stderr and process group are set here.
pub fn run(mut cmd: Command, output: Output, policy: &Policy) -> Result<Finished, ProcError> {
    let start = Instant::now();
    let deadline = start + policy.timeout;
    let limit = match output {
        Output::Capture { limit } => {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            limit
        }
        Output::File(file) => {
            let err = file.try_clone().map_err(ProcError::Pipe)?;
            cmd.stdout(Stdio::from(file)).stderr(Stdio::from(err));
            0
        }
    };
    cmd.stdin(Stdio::null()).process_group(0);
    let mut child = cmd.spawn().map_err(ProcError::Spawn)?;
    let group = Group {
        pgid: Pid::from_raw(child.id() as i32),
    };
    let mut run = Running {
        pipes: match Pipes::new(child.stdout.take(), child.stderr.take(), limit) {
            Ok(p) => p,
            Err(e) => {
                group.kill_now(&mut child);
                return Err(ProcError::Pipe(e));
            }
        },
        group,
    };
    let ending = loop {
        match run.group.leader_exited() {
            Ok(true) => break None,
            Ok(false) => {}
            Err(e) => {
                run.group.kill_now(&mut child);
                return Err(ProcError::Wait(e));
            }
        }
        let now = Instant::now();
        if now >= deadline {
            break Some(Ending::TimedOut);
        }
        run.pipes.turn(POLL.min(deadline - now));
    };
    match (ending, policy.after_exit) {
        (Some(_), _) | (None, AfterExit::KillGroup) => run.terminate(policy.kill_grace),
        (None, AfterExit::Leave { drain }) => {
            let until = deadline.min(Instant::now() + drain);
            while run.pipes.open() {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                run.pipes.turn(POLL.min(until - now));
            }
        }
    }
    // Whatever is still buffered; then the read ends are dropped, so a
    // writer left outside the group gets EPIPE rather than holding us.
    run.pipes.turn(Duration::ZERO);
    let status = child.wait().map_err(ProcError::Wait)?;
    let [stdout, stderr] = run.pipes.into_captured();
    Ok(Finished {
        ending: ending.unwrap_or(Ending::Exited(status)),
        stdout,
        stderr,
        elapsed: start.elapsed(),
    })
}

/// The command's process group; its id is the leader's pid.
#[derive(Debug, Clone, Copy)]
struct Group {
    pgid: Pid,
}

impl Group {
    /// Whether the leader exited, without reaping it (`WNOWAIT`): the pid
    /// stays ours until [`Child::wait`].
    fn leader_exited(&self) -> io::Result<bool> {
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(self.pgid), flags) {
            Ok(WaitStatus::StillAlive) => Ok(false),
            Ok(_) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    fn signal(&self, signal: Signal) {
        // ESRCH: nothing left to signal, which is what we want.
        let _ = killpg(self.pgid, signal);
    }

    /// Whether a process of the group is alive (zombies do not count). When
    /// `/proc` cannot be read, assume so: the caller then waits its grace.
    fn alive(&self) -> bool {
        let Ok(entries) = fs::read_dir("/proc") else {
            return true;
        };
        let want = self.pgid.as_raw();
        entries.flatten().any(|e| {
            let name = e.file_name();
            let Some(pid) = name.to_str().filter(|n| n.bytes().all(|b| b.is_ascii_digit())) else {
                return false;
            };
            // Gone between the listing and the read: not alive.
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                return false;
            };
            matches!(stat_state_pgrp(&stat), Some((state, pgrp)) if pgrp == want && state != 'Z' && state != 'X')
        })
    }

    /// Error path only: SIGKILL to the group and reap the leader.
    fn kill_now(&self, child: &mut Child) {
        self.signal(Signal::SIGKILL);
        let _ = child.wait();
    }
}

/// State letter and process group from a `/proc/<pid>/stat` line. The
/// command name (in parentheses) may itself hold spaces and `)`.
fn stat_state_pgrp(stat: &str) -> Option<(char, i32)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}

/// The group and its output while it runs.
#[derive(Debug)]
struct Running {
    group: Group,
    pipes: Pipes,
}

impl Running {
    /// SIGTERM to the group; SIGKILL once `grace` passed with any of it
    /// alive; returns once none of it is alive (or after [`KILL_WAIT`]).
    /// Output is read all along: a process blocked on a full pipe must be
    /// able to reach its signal handler.
    fn terminate(&mut self, grace: Duration) {
        if !self.group.alive() {
            return;
        }
        self.group.signal(Signal::SIGTERM);
        self.group.signal(Signal::SIGCONT);
        if self.wait_gone(grace) {
            return;
        }
        tracing::debug!(pgid = %self.group.pgid, ?grace, "process group outlived SIGTERM; sending SIGKILL");
        self.group.signal(Signal::SIGKILL);
        if !self.wait_gone(KILL_WAIT) {
            tracing::warn!(pgid = %self.group.pgid, "process group still alive after SIGKILL");
        }
    }

    fn wait_gone(&mut self, within: Duration) -> bool {
        let until = Instant::now() + within;
        loop {
            if !self.group.alive() {
                return true;
            }
            let now = Instant::now();
            if now >= until {
                return false;
            }
            self.pipes.turn(POLL.min(until - now));
        }
    }
}

/// The read ends of stdout and stderr (non-blocking), each with its tail.
#[derive(Debug)]
struct Pipes {
    out: Stream<ChildStdout>,
    err: Stream<ChildStderr>,
}

#[derive(Debug)]
struct Stream<R> {
    /// `None` once at end of file (or never piped).
    pipe: Option<R>,
    kept: VecDeque<u8>,
    dropped: u64,
    limit: usize,
}

impl<R: Read + AsFd> Stream<R> {
    fn new(pipe: Option<R>, limit: usize) -> io::Result<Self> {
        if let Some(p) = &pipe {
            fcntl(p, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
        }
        Ok(Self {
            pipe,
            kept: VecDeque::new(),
            dropped: 0,
            limit,
        })
    }

    /// Reads what is there now (up to [`TURN_BYTES`]).
    fn read_available(&mut self) {
        let mut buf = [0u8; CHUNK];
        let mut read = 0;
        while read < TURN_BYTES {
            let Some(pipe) = &mut self.pipe else { return };
            match pipe.read(&mut buf) {
                Ok(0) => self.pipe = None,
                Ok(n) => {
                    read += n;
                    self.keep(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // Any other read error ends this stream like end of file.
                Err(_) => self.pipe = None,
            }
        }
    }

    fn keep(&mut self, data: &[u8]) {
        self.kept.extend(data);
        let excess = self.kept.len().saturating_sub(self.limit);
        if excess > 0 {
            self.kept.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    fn captured(self) -> Captured {
        Captured {
            bytes: self.kept.into(),
            dropped: self.dropped,
        }
    }
}

impl Pipes {
    fn new(out: Option<ChildStdout>, err: Option<ChildStderr>, limit: usize) -> io::Result<Self> {
        Ok(Self {
            out: Stream::new(out, limit)?,
            err: Stream::new(err, limit)?,
        })
    }

    fn open(&self) -> bool {
        self.out.pipe.is_some() || self.err.pipe.is_some()
    }

    /// Waits up to `wait` for output and reads what came; just sleeps when
    /// no pipe is open.
    fn turn(&mut self, wait: Duration) {
        let mut fds = Vec::with_capacity(2);
        if let Some(p) = &self.out.pipe {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
        }
        if let Some(p) = &self.err.pipe {
            fds.push(PollFd::new(p.as_fd(), PollFlags::POLLIN));
        }
        if fds.is_empty() {
            std::thread::sleep(wait);
            return;
        }
        let timeout = PollTimeout::try_from(wait).unwrap_or(PollTimeout::MAX);
        if let Err(e) = poll(&mut fds, timeout) {
            if e != nix::errno::Errno::EINTR {
                // Cannot wait on the pipes: still keep to the clock.
                std::thread::sleep(wait);
            }
        }
        drop(fds);
        // Non-blocking: reading both is cheap whichever one woke us.
        self.out.read_available();
        self.err.read_available();
    }

    fn into_captured(self) -> [Captured; 2] {
        [self.out.captured(), self.err.captured()]
    }
}

/// Helpers for the tests of the modules that run commands through here.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::Path;

    /// A shell line that forks `sleep 1000` into the background, writes its
    /// pid to `pid_file`, then waits for it (so the command outlives any
    /// short deadline).
    pub(crate) fn forks_grandchild(pid_file: &Path) -> String {
        format!("sleep 1000 & echo $! > '{}'; wait", pid_file.display())
    }

    /// The pid [`forks_grandchild`] recorded.
    pub(crate) fn recorded_pid(pid_file: &Path) -> i32 {
        let text = std::fs::read_to_string(pid_file)
            .unwrap_or_else(|e| panic!("{}: {e}", pid_file.display()));
        text.trim().parse().expect("a pid")
    }

    /// Whether `pid` no longer runs: no such process, or a zombie waiting
    /// for its (new) parent to reap it.
    pub(crate) fn is_gone(pid: i32) -> bool {
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| super::stat_state_pgrp(&s))
            .map(|(state, _)| state);
        !alive || matches!(state, None | Some('Z') | Some('X'))
    }

    /// Kills a process a test left behind on purpose.
    pub(crate) fn kill(pid: i32) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(script);
        c
    }

    fn policy(timeout_ms: u64, grace_ms: u64, after_exit: AfterExit) -> Policy {
        Policy {
            timeout: Duration::from_millis(timeout_ms),
            kill_grace: Duration::from_millis(grace_ms),
            after_exit,
        }
    }

    const CAPTURE: Output = Output::Capture { limit: 1024 };

    #[test]
    fn exit_status_and_both_streams() {
        let f = run(
            sh("echo out; echo err >&2; exit 3"),
            CAPTURE,
            &policy(10_000, 1000, AfterExit::KillGroup),
        )
        .unwrap();
        assert!(matches!(f.ending, Ending::Exited(s) if s.code() == Some(3)));
        assert!(!f.success());
        assert_eq!(
            (f.stdout.text(), f.stderr.text()),
            ("out\n".into(), "err\n".into())
        );
    }

    #[test]
    fn output_keeps_only_the_last_bytes() {
        // 4 MiB through a 1 KiB window, then a recognisable end.
        let f = run(
            sh("head -c 4194304 /dev/zero; echo; echo the-end"),
            CAPTURE,
            &policy(30_000, 1000, AfterExit::KillGroup),
        )
        .unwrap();
        assert!(f.success());
        assert_eq!(f.stdout.bytes.len(), 1024);
        assert_eq!(f.stdout.dropped, 4_194_304 + 9 - 1024);
        assert!(f.stdout.text().ends_with("\nthe-end\n"));
    }

    #[test]
    fn deadline_kills_the_whole_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let f = run(
            sh(&forks_grandchild(&pid_file)),
            CAPTURE,
            &policy(300, 5000, AfterExit::KillGroup),
        )
        .unwrap();
        assert_eq!(f.ending, Ending::TimedOut);
        let pid = recorded_pid(&pid_file);
        assert!(is_gone(pid), "grandchild {pid} survived the deadline");
        // sh and sleep obey SIGTERM: no waiting out the 5 s grace.
        assert!(f.elapsed < Duration::from_secs(4), "{:?}", f.elapsed);
    }

    #[test]
    fn sigterm_ignored_means_sigkill_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        // An ignored signal stays ignored across fork and exec.
        let script = format!("trap '' TERM; {}", forks_grandchild(&pid_file));
        let f = run(
            sh(&script),
            CAPTURE,
            &policy(200, 400, AfterExit::KillGroup),
        )
        .unwrap();
        assert_eq!(f.ending, Ending::TimedOut);
        assert!(f.elapsed >= Duration::from_millis(600), "{:?}", f.elapsed);
        let pid = recorded_pid(&pid_file);
        assert!(is_gone(pid), "grandchild {pid} survived SIGKILL");
    }

    #[test]
    fn leftover_holding_the_pipes_is_killed_when_the_command_exits() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!(
            "sleep 1000 & echo $! > '{}'; echo started",
            pid_file.display()
        );
        let f = run(
            sh(&script),
            CAPTURE,
            &policy(20_000, 5000, AfterExit::KillGroup),
        )
        .unwrap();
        assert!(f.success(), "{f:?}");
        assert_eq!(f.stdout.text(), "started\n");
        assert!(f.elapsed < Duration::from_secs(10), "{:?}", f.elapsed);
        let pid = recorded_pid(&pid_file);
        assert!(is_gone(pid), "leftover {pid} survived");
    }

    #[test]
    fn leave_stops_reading_after_the_drain_and_spares_the_leftover() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let script = format!(
            "sleep 1000 & echo $! > '{}'; echo started",
            pid_file.display()
        );
        let drain = Duration::from_millis(200);
        let f = run(
            sh(&script),
            CAPTURE,
            &policy(20_000, 5000, AfterExit::Leave { drain }),
        )
        .unwrap();
        let pid = recorded_pid(&pid_file);
        let alive = !is_gone(pid);
        kill(pid);
        assert!(f.success(), "{f:?}");
        assert_eq!(f.stdout.text(), "started\n");
        assert!(f.elapsed < Duration::from_secs(10), "{:?}", f.elapsed);
        assert!(alive, "Leave killed the leftover {pid}");
    }

    #[test]
    fn output_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let file = File::create(&log).unwrap();
        let f = run(
            sh("echo one; echo two >&2"),
            Output::File(file),
            &policy(10_000, 1000, AfterExit::KillGroup),
        )
        .unwrap();
        assert!(f.success());
        assert_eq!(f.stdout, Captured::default());
        assert_eq!(fs::read_to_string(&log).unwrap(), "one\ntwo\n");
    }

    #[test]
    fn a_missing_program_is_a_spawn_error() {
        let err = run(
            Command::new("/nonexistent/program"),
            CAPTURE,
            &policy(1000, 100, AfterExit::KillGroup),
        )
        .unwrap_err();
        assert!(matches!(err, ProcError::Spawn(_)), "{err}");
        assert_eq!(err.io().kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn stat_lines_with_odd_names() {
        assert_eq!(
            stat_state_pgrp("42 (a) b) c) S 1 40 40 0 -1"),
            Some(('S', 40))
        );
        assert_eq!(stat_state_pgrp("garbage"), None);
    }
}
