//! Deploy hooks: shell commands run around activation.
//!
//! Each command runs through `sh -c` in the release directory, in its own
//! process group (so a timeout kills the whole tree it started), with
//! `SLIPWAY_APP`, `SLIPWAY_RELEASE`, `SLIPWAY_PREVIOUS` and
//! `SLIPWAY_RELEASE_DIR` set, and its output appended to the deploy log.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// How often a running hook is polled for exit.
const POLL: Duration = Duration::from_millis(10);
/// Time between SIGTERM and SIGKILL when a hook times out.
const KILL_GRACE: Duration = Duration::from_secs(3);
/// Output quoted in an error message, from the end of the log.
const TAIL_BYTES: u64 = 2048;

/// Why a hook failed.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{phase} hook `{command}` exited with {status}; last output:\n{tail}")]
    Failed {
        phase: &'static str,
        command: String,
        status: ExitStatus,
        tail: String,
    },
    #[error(
        "{phase} hook `{command}` timed out after {timeout:?} and was killed; last output:\n{tail}"
    )]
    TimedOut {
        phase: &'static str,
        command: String,
        timeout: Duration,
        tail: String,
    },
    #[error("cannot run {phase} hook `{command}`: {source}")]
    Spawn {
        phase: &'static str,
        command: String,
        source: io::Error,
    },
    #[error("cannot write deploy log {path}: {source}")]
    Log { path: PathBuf, source: io::Error },
}

/// What every hook of one deploy sees.
#[derive(Debug)]
pub struct HookContext<'a> {
    pub app: &'a str,
    pub release: &'a str,
    pub previous: Option<&'a str>,
    pub release_dir: &'a Path,
    pub log: &'a Path,
    pub timeout: Duration,
}

/// Runs `commands` in order; the first failure stops the phase.
pub fn run(
    phase: &'static str,
    commands: &[String],
    ctx: &HookContext<'_>,
) -> Result<(), HookError> {
    for command in commands {
        run_one(phase, command, ctx)?;
    }
    Ok(())
}

fn run_one(phase: &'static str, command: &str, ctx: &HookContext<'_>) -> Result<(), HookError> {
    let log_err = |source| HookError::Log {
        path: ctx.log.to_owned(),
        source,
    };
    let mut log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(ctx.log)
        .map_err(log_err)?;
    writeln!(log, "== {phase}: {command}").map_err(log_err)?;
    let start_len = log.metadata().map_err(log_err)?.len();
    let out = log.try_clone().map_err(log_err)?;
    let err = log.try_clone().map_err(log_err)?;
    let spawn_err = |source| HookError::Spawn {
        phase,
        command: command.to_owned(),
        source,
    };
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .current_dir(ctx.release_dir)
        .env("SLIPWAY_APP", ctx.app)
        .env("SLIPWAY_RELEASE", ctx.release)
        .env("SLIPWAY_PREVIOUS", ctx.previous.unwrap_or(""))
        .env("SLIPWAY_RELEASE_DIR", ctx.release_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0)
        .spawn()
        .map_err(spawn_err)?;
    let deadline = Instant::now() + ctx.timeout;
    let status = loop {
        if let Some(status) = child.try_wait().map_err(spawn_err)? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(POLL);
    };
    let tail = || tail(ctx.log, start_len);
    match status {
        Some(s) if s.success() => {
            writeln!(log, "== {phase}: ok").map_err(log_err)?;
            Ok(())
        }
        Some(status) => {
            let tail = tail();
            let _ = writeln!(log, "== {phase}: {status}");
            Err(HookError::Failed {
                phase,
                command: command.to_owned(),
                status,
                tail,
            })
        }
        None => {
            let pgid = Pid::from_raw(child.id() as i32);
            let _ = killpg(pgid, Signal::SIGTERM);
            let grace = Instant::now() + KILL_GRACE;
            while Instant::now() < grace {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(POLL);
            }
            let _ = killpg(pgid, Signal::SIGKILL);
            let _ = child.wait();
            let tail = tail();
            let _ = writeln!(log, "== {phase}: timed out after {:?}", ctx.timeout);
            Err(HookError::TimedOut {
                phase,
                command: command.to_owned(),
                timeout: ctx.timeout,
                tail,
            })
        }
    }
}

/// The last bytes the hook wrote to the log.
fn tail(log: &Path, from: u64) -> String {
    let Ok(mut f) = File::open(log) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(from);
    let start = from.max(len.saturating_sub(TAIL_BYTES));
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(start)).is_ok() {
        let _ = f.read_to_end(&mut buf);
    }
    let text = String::from_utf8_lossy(&buf).trim_end().to_owned();
    if text.is_empty() {
        "(no output)".to_owned()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx<'a>(dir: &'a Path, log: &'a Path, timeout: Duration) -> HookContext<'a> {
        HookContext {
            app: "web",
            release: "v2",
            previous: Some("v1"),
            release_dir: dir,
            log,
            timeout,
        }
    }

    #[test]
    fn env_cwd_and_output_reach_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("deploy.log");
        let cmd = "echo \"$SLIPWAY_APP $SLIPWAY_RELEASE $SLIPWAY_PREVIOUS $(pwd)\"; echo oops >&2"
            .to_owned();
        run(
            "before_activate",
            &[cmd],
            &ctx(dir.path(), &log, Duration::from_secs(10)),
        )
        .unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        let cwd = std::fs::canonicalize(dir.path()).unwrap();
        assert!(
            text.contains(&format!("web v2 v1 {}", cwd.display())),
            "{text}"
        );
        assert!(text.contains("oops"), "{text}");
    }

    #[test]
    fn failure_carries_status_and_output() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("deploy.log");
        let cmds = [
            "echo first".to_owned(),
            "echo migration broke; exit 3".to_owned(),
            "touch never".to_owned(),
        ];
        let err = run(
            "before_activate",
            &cmds,
            &ctx(dir.path(), &log, Duration::from_secs(10)),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("exit status: 3") && msg.contains("migration broke"),
            "{msg}"
        );
        assert!(!dir.path().join("never").exists());
    }

    #[test]
    fn timeout_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("deploy.log");
        let cmd = "sleep 30 & echo started; wait".to_owned();
        let t = Instant::now();
        let err = run(
            "after_activate",
            &[cmd],
            &ctx(dir.path(), &log, Duration::from_millis(300)),
        )
        .unwrap_err();
        assert!(matches!(err, HookError::TimedOut { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(err.to_string().contains("started"), "{err}");
    }
}
