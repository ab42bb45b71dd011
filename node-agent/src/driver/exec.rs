//! The exec driver: the agent itself supervises one process per app.
//!
//! For static binaries, and for machines without PM2. The work is done by a
//! detached `slipway-agent supervise` process (see [`crate::supervise`]);
//! this driver starts it, signals it (SIGHUP = restart in the release
//! `current` now points at, SIGTERM = stop) and reads its state file.
//!
//! Two modes, which `status` names:
//! - **socket handover** (the app has `listen`): the supervisor binds the
//!   public address once and hands it to every child as fd 3 with the
//!   systemd socket-activation protocol, plus a private probe socket on
//!   127.0.0.1 as fd 4 (`LISTEN_FDS=2`, `LISTEN_FDNAMES=public:probe`). A
//!   deploy starts the new release's process beside the old one on the same
//!   socket; the health gate probes `{port}` = the new process's probe port;
//!   on a pass the old process gets SIGTERM (USR2 to the supervisor) and
//!   finishes its in-flight requests within `stop_grace`; on a failure the
//!   new one goes and the old one never stopped serving (WINCH). The socket
//!   is never closed between releases, so no client is refused; the
//!   supervisor is detached, so it also outlives a restart of the agent.
//! - **restart** (no `listen`): the old process is stopped before the new
//!   one starts: not zero-downtime.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sysinfo::{Pid as SysPid, ProcessesToUpdate, System};

use super::{Activation, Driver, DriverError, DriverStatus, ProcessInfo, Target};
use crate::config::{AppConfig, ExecConfig};
use crate::listen::ListenAddr;
use crate::supervise::{self, RunFiles, State};

/// Environment variable naming the agent binary to run `supervise` with
/// (tests and packagers; default: this executable).
pub const AGENT_BIN_ENV: &str = "SLIPWAY_AGENT_BIN";
/// How much of the end of the app's output a failed gate quotes.
const GATE_TAIL_BYTES: u64 = 4096;
const GATE_TAIL_LINES: usize = 3;
/// How long each quoted line may be.
const GATE_TAIL_LINE_CHARS: usize = 200;
/// How long a (re)start may take to show a running child.
const START_WAIT: Duration = Duration::from_secs(30);
/// Extra time beyond the grace period for the supervisor to exit.
const STOP_SLACK: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(25);

/// Supervises the app with `slipway-agent supervise`.
#[derive(Debug)]
pub struct Exec {
    config: ExecConfig,
    listen: Option<ListenAddr>,
}

impl Exec {
    pub fn new(config: ExecConfig, listen: Option<ListenAddr>) -> Self {
        Self { config, listen }
    }

    /// What `status` says of the mode.
    fn mode_note(&self) -> String {
        match &self.listen {
            Some(a) => format!(
                "exec driver, socket handover: the agent holds {a} and hands it to the app (LISTEN_FDS); a new release starts beside the old one, which drains within stop_grace once the new one is healthy (zero-downtime)"
            ),
            None => "exec driver, restart: a new release stops the old process before starting the new one (not zero-downtime; set listen for socket handover)".into(),
        }
    }

    fn signal(pid: u32, sig: Signal) -> Result<(), DriverError> {
        kill(Pid::from_raw(pid as i32), sig).map_err(|e| {
            DriverError::failed("exec", format!("cannot signal supervisor pid {pid}: {e}"))
        })
    }

    /// Waits until `done` holds for the supervisor's state.
    fn wait_state(
        files: &RunFiles,
        what: &str,
        mut done: impl FnMut(&State) -> bool,
    ) -> Result<State, DriverError> {
        let deadline = Instant::now() + START_WAIT;
        while Instant::now() < deadline {
            if let Some(s) = State::load(files).filter(|s| done(s)) {
                return Ok(s);
            }
            std::thread::sleep(POLL);
        }
        Err(DriverError::failed(
            "exec",
            format!("the supervisor did not {what} within {START_WAIT:?}"),
        ))
    }

    fn activation(&self, s: &State) -> Activation {
        Activation {
            port: s.probe_port,
            handle: s.child_pid.map(|p| p.to_string()),
            detail: format!(
                "exec: {} running as pid {} under supervisor {}{}",
                self.config.command.join(" "),
                s.child_pid.unwrap_or(0),
                s.supervisor_pid,
                match (&self.listen, s.probe_port) {
                    (Some(a), Some(p)) => format!(", on {a} (probe port {p})"),
                    _ => String::new(),
                }
            ),
        }
    }

    fn agent_bin() -> Result<PathBuf, DriverError> {
        match std::env::var_os(AGENT_BIN_ENV) {
            Some(p) => Ok(PathBuf::from(p)),
            None => std::env::current_exe().map_err(|e| {
                DriverError::failed("exec", format!("cannot find the agent binary: {e}"))
            }),
        }
    }

    /// Starts a supervisor, or asks the running one to restart, then waits
    /// for a child running in `target.release`.
    fn restart_in(&self, target: &Target) -> Result<Activation, DriverError> {
        let files = RunFiles::new(&target.app.root);
        let want = self.listen.as_ref().map(ToString::to_string);
        if supervise::is_running(&files) && State::load(&files).is_some_and(|s| s.listen != want) {
            // The public address changed: a new supervisor binds the new one.
            self.stop(&target.app)?;
        }
        let state = State::load(&files);
        let before = state.as_ref().map_or(0, |s| s.generation);
        let mut spawned = None;
        if supervise::is_running(&files) {
            let pid = state.as_ref().map(|s| s.supervisor_pid).ok_or_else(|| {
                DriverError::failed(
                    "exec",
                    format!("{} is locked but has no state", files.state.display()),
                )
            })?;
            Self::signal(pid, Signal::SIGHUP)?;
        } else {
            spawned = Some(self.spawn_supervisor(target, &files)?);
        }
        let deadline = Instant::now() + START_WAIT;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(s) = State::load(&files) {
                // A new supervisor is recognised by its pid (a stale state
                // file may say "running"); a signalled one by its generation.
                let fresh = match spawned {
                    Some(pid) => s.supervisor_pid == pid,
                    None => s.generation > before,
                };
                if fresh
                    && s.status == "running"
                    && s.release.as_deref() == Some(target.release.as_str())
                {
                    return Ok(self.activation(&s));
                }
                last = Some(s);
            }
            std::thread::sleep(POLL);
        }
        Err(DriverError::failed(
            "exec",
            format!(
                "the app did not start within {START_WAIT:?} (supervisor state: {}; see {})",
                last.map_or("none".into(), |s| format!(
                    "{}, last exit {:?}",
                    s.status, s.last_exit
                )),
                files.output.display()
            ),
        ))
    }

    /// Starts a detached supervisor; returns its pid.
    fn spawn_supervisor(&self, target: &Target, files: &RunFiles) -> Result<u32, DriverError> {
        let bin = Self::agent_bin()?;
        let log = supervise::open_log(files).map_err(|e| {
            DriverError::failed("exec", format!("cannot open {}: {e}", files.dir.display()))
        })?;
        let mut cmd = Command::new(&bin);
        cmd.arg("supervise")
            .arg("--root")
            .arg(&target.app.root)
            .arg("--grace-ms")
            .arg(self.config.stop_grace.as_millis().to_string());
        if let Some(l) = &self.listen {
            cmd.arg("--listen").arg(l.to_string());
        }
        cmd.arg("--")
            .args(&self.config.command)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        // Its own process group: a Ctrl-C on the deploying terminal must not
        // reach the app's supervisor.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().map_err(|source| DriverError::Spawn {
            driver: "exec",
            command: format!("{} supervise", bin.display()),
            source,
        })?;
        let pid = child.id();
        // Reap it if it dies early so it does not linger as a zombie while
        // this process runs; normally it outlives us and init adopts it.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        Ok(pid)
    }
}

impl Driver for Exec {
    fn name(&self) -> &'static str {
        "exec"
    }

    fn activate(&self, target: &Target) -> Result<Activation, DriverError> {
        self.restart_in(target)
    }

    fn commit(&self, target: &Target, _activation: &Activation) -> Result<(), DriverError> {
        // Restart mode: nothing to retire, the restart stopped the old
        // process. Socket handover: the old one drains now.
        let files = RunFiles::new(&target.app.root);
        let Some(state) = State::load(&files).filter(|s| s.previous_pid.is_some()) else {
            return Ok(());
        };
        if !supervise::is_running(&files) {
            return Ok(());
        }
        Self::signal(state.supervisor_pid, Signal::SIGUSR2)?;
        Self::wait_state(&files, "retire the previous process", |s| {
            s.previous_pid.is_none()
        })?;
        Ok(())
    }

    fn restore(&self, previous: &Target, _failed: &Activation) -> Result<Activation, DriverError> {
        let files = RunFiles::new(&previous.app.root);
        let state = State::load(&files);
        let want = previous.release.as_str();
        if let Some(s) = state
            .filter(|s| s.previous_pid.is_some() && s.previous_release.as_deref() == Some(want))
        {
            if supervise::is_running(&files) {
                // The previous release's process never stopped serving:
                // drop the new one, keep it.
                Self::signal(s.supervisor_pid, Signal::SIGWINCH)?;
                let back = Self::wait_state(&files, "put the previous process back", |n| {
                    n.generation > s.generation
                        && n.status == "running"
                        && n.release.as_deref() == Some(want)
                })?;
                return Ok(self.activation(&back));
            }
        }
        self.restart_in(previous)
    }

    fn stop(&self, app: &AppConfig) -> Result<(), DriverError> {
        let files = RunFiles::new(&app.root);
        if !supervise::is_running(&files) {
            return Ok(());
        }
        let Some(state) = State::load(&files) else {
            return Err(DriverError::failed(
                "exec",
                format!("{} is locked but has no state", files.state.display()),
            ));
        };
        kill(Pid::from_raw(state.supervisor_pid as i32), Signal::SIGTERM).map_err(|e| {
            DriverError::failed(
                "exec",
                format!("cannot signal supervisor pid {}: {e}", state.supervisor_pid),
            )
        })?;
        let deadline = Instant::now() + self.config.stop_grace + STOP_SLACK;
        while Instant::now() < deadline {
            if !supervise::is_running(&files) {
                return Ok(());
            }
            std::thread::sleep(POLL);
        }
        Err(DriverError::failed(
            "exec",
            format!(
                "supervisor pid {} did not stop within {:?}",
                state.supervisor_pid,
                self.config.stop_grace + STOP_SLACK
            ),
        ))
    }

    fn gate_note(&self, app: &AppConfig, activation: &Activation) -> Option<String> {
        let files = RunFiles::new(&app.root);
        let state = State::load(&files)?;
        let started = activation.handle.as_deref()?;
        let alive = state.status == "running"
            && state.child_pid.map(|p| p.to_string()).as_deref() == Some(started);
        if alive {
            return None;
        }
        let tail = output_tail(&files.output);
        let mut note = format!(
            "the process started for it (pid {started}) is gone ({}); {} ends with: {}",
            state
                .last_exit
                .as_deref()
                .unwrap_or("how it ended is unknown"),
            files.output.display(),
            if tail.is_empty() {
                "(nothing)".to_owned()
            } else {
                tail.join(" | ")
            }
        );
        if self.listen.is_some() && tail.iter().any(|l| l.contains("Address already in use")) {
            note.push_str(
                "; with listen the agent holds the address: the app must serve on the socket it is handed (LISTEN_FDS), not bind a port of its own (README: \"The public address\")",
            );
        }
        Some(note)
    }

    fn drift(&self, target: &Target, _port: Option<u16>) -> Result<Option<String>, DriverError> {
        let files = RunFiles::new(&target.app.root);
        if !supervise::is_running(&files) {
            return Ok(Some(
                "the exec supervisor is not running (a reboot, or it was killed)".into(),
            ));
        }
        let Some(state) = State::load(&files) else {
            return Ok(Some("the exec supervisor has written no state".into()));
        };
        let want = target.release.as_str();
        match state.release.as_deref() {
            // Its own restart of a crashed child (backoff) is not drift.
            Some(r) if r == want => Ok(None),
            Some(r) => Ok(Some(format!(
                "the exec supervisor runs release {r}, not {want}"
            ))),
            None => Ok(Some(format!(
                "the exec supervisor runs no child ({})",
                state.status
            ))),
        }
    }

    fn status(&self, app: &AppConfig) -> Result<DriverStatus, DriverError> {
        let files = RunFiles::new(&app.root);
        let mut status = DriverStatus {
            driver: "exec".into(),
            processes: Vec::new(),
            notes: vec![self.mode_note()],
        };
        let alive = supervise::is_running(&files);
        let Some(state) = State::load(&files) else {
            return Ok(status);
        };
        let mut info = ProcessInfo {
            name: app.name.clone(),
            pid: state.child_pid,
            status: if alive {
                state.status.clone()
            } else {
                "stopped (no supervisor)".into()
            },
            restarts: state.restarts,
            release: state.release.clone(),
            ..ProcessInfo::default()
        };
        if let (true, Some(pid)) = (alive, state.child_pid) {
            let mut sys = System::new();
            let spid = SysPid::from_u32(pid);
            sys.refresh_processes(ProcessesToUpdate::Some(&[spid]), true);
            if let Some(p) = sys.process(spid) {
                info.memory_bytes = Some(p.memory());
                info.cpu_percent = Some(f64::from(p.cpu_usage()));
                info.uptime_secs = Some(p.run_time());
            }
        }
        status.processes.push(info);
        if let (true, Some(pid)) = (alive, state.previous_pid) {
            // Socket handover, mid-deploy: the old release still serves
            // until the new one passes its gate.
            status.processes.push(ProcessInfo {
                name: format!(
                    "{} (previous, serving until the new one is healthy)",
                    app.name
                ),
                pid: Some(pid),
                status: "running".into(),
                release: state.previous_release.clone(),
                ..ProcessInfo::default()
            });
        }
        Ok(status)
    }
}

/// The last non-empty lines of the app's output log, each on one line and
/// cut.
fn output_tail(path: &std::path::Path) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(GATE_TAIL_BYTES)));
    let mut bytes = Vec::new();
    let _ = f.take(GATE_TAIL_BYTES).read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines[lines.len().saturating_sub(GATE_TAIL_LINES)..]
        .iter()
        .map(|l| slipway_proto::limits::one_line(l, GATE_TAIL_LINE_CHARS))
        .collect()
}
