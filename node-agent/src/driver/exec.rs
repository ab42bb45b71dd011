//! The exec driver: the agent itself supervises one process per app.
//!
//! For static binaries, and for machines without PM2. The work is done by a
//! detached `slipway-agent supervise` process (see [`crate::supervise`]);
//! this driver starts it, signals it (SIGHUP = restart in the release
//! `current` now points at, SIGTERM = stop) and reads its state file. A
//! restart stops the old process before starting the new one: not
//! zero-downtime, which `status` says.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use sysinfo::{Pid as SysPid, ProcessesToUpdate, System};

use super::{Activation, Driver, DriverError, DriverStatus, ProcessInfo, Target};
use crate::config::{AppConfig, ExecConfig};
use crate::supervise::{self, RunFiles, State};

/// Environment variable naming the agent binary to run `supervise` with
/// (tests and packagers; default: this executable).
pub const AGENT_BIN_ENV: &str = "SLIPWAY_AGENT_BIN";
/// How long a (re)start may take to show a running child.
const START_WAIT: Duration = Duration::from_secs(30);
/// Extra time beyond the grace period for the supervisor to exit.
const STOP_SLACK: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(25);

/// Supervises the app with `slipway-agent supervise`.
#[derive(Debug)]
pub struct Exec {
    config: ExecConfig,
}

impl Exec {
    pub fn new(config: ExecConfig) -> Self {
        Self { config }
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
            kill(Pid::from_raw(pid as i32), Signal::SIGHUP).map_err(|e| {
                DriverError::failed("exec", format!("cannot signal supervisor pid {pid}: {e}"))
            })?;
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
                    return Ok(Activation {
                        port: None,
                        handle: s.child_pid.map(|p| p.to_string()),
                        detail: format!(
                            "exec: {} running as pid {} under supervisor {}",
                            self.config.command.join(" "),
                            s.child_pid.unwrap_or(0),
                            s.supervisor_pid
                        ),
                    });
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
            .arg(self.config.stop_grace.as_millis().to_string())
            .arg("--")
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

    fn commit(&self, _target: &Target, _activation: &Activation) -> Result<(), DriverError> {
        // Nothing to retire: the old process was stopped by the restart.
        Ok(())
    }

    fn restore(&self, previous: &Target, _failed: &Activation) -> Result<Activation, DriverError> {
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
            notes: vec!["exec driver: a new release stops the old process before starting the new one (not zero-downtime)".into()],
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
        Ok(status)
    }
}
