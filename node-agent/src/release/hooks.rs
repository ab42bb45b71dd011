//! Deploy hooks: shell commands run around activation.
//!
//! Each command runs through `sh -c` in the release directory, with
//! `SLIPWAY_APP`, `SLIPWAY_RELEASE`, `SLIPWAY_PREVIOUS` and
//! `SLIPWAY_RELEASE_DIR` set and its output appended to the deploy log,
//! under [`crate::proc`]: in its own process group, which is killed at the
//! timeout and when the hook exits (nothing a hook forks outlives it).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use crate::proc;

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
        source: proc::ProcError,
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
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .current_dir(ctx.release_dir)
        .env("SLIPWAY_APP", ctx.app)
        .env("SLIPWAY_RELEASE", ctx.release)
        .env("SLIPWAY_PREVIOUS", ctx.previous.unwrap_or(""))
        .env("SLIPWAY_RELEASE_DIR", ctx.release_dir);
    // A hook is one step of the deploy: nothing it starts in the background
    // outlives it (a long-running process belongs to the driver).
    let policy = proc::Policy {
        timeout: ctx.timeout,
        kill_grace: KILL_GRACE,
        after_exit: proc::AfterExit::KillGroup,
    };
    let done = proc::run(
        cmd,
        proc::Output::File(log.try_clone().map_err(log_err)?),
        &policy,
    )
    .map_err(|e| HookError::Spawn {
        phase,
        command: command.to_owned(),
        source: e,
    })?;
    let tail = || tail(ctx.log, start_len);
    match done.ending {
        proc::Ending::Exited(s) if s.success() => {
            writeln!(log, "== {phase}: ok").map_err(log_err)?;
            Ok(())
        }
        proc::Ending::Exited(status) => {
            let tail = tail();
            let _ = writeln!(log, "== {phase}: {status}");
            Err(HookError::Failed {
                phase,
                command: command.to_owned(),
                status,
                tail,
            })
        }
        proc::Ending::TimedOut => {
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
        use crate::proc::testing::{forks_grandchild, is_gone, recorded_pid};
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("deploy.log");
        let pid_file = dir.path().join("pid");
        let cmd = format!("echo started; {}", forks_grandchild(&pid_file));
        let t = std::time::Instant::now();
        let err = run(
            "after_activate",
            &[cmd],
            &ctx(dir.path(), &log, Duration::from_secs(1)),
        )
        .unwrap_err();
        assert!(matches!(err, HookError::TimedOut { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(10));
        assert!(err.to_string().contains("started"), "{err}");
        let pid = recorded_pid(&pid_file);
        assert!(is_gone(pid), "grandchild {pid} survived the hook");
    }

    #[test]
    fn nothing_a_hook_forks_outlives_it() {
        use crate::proc::testing::{is_gone, recorded_pid};
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("deploy.log");
        let pid_file = dir.path().join("pid");
        let cmd = format!("sleep 1000 & echo $! > '{}'", pid_file.display());
        run(
            "after_activate",
            &[cmd],
            &ctx(dir.path(), &log, Duration::from_secs(20)),
        )
        .unwrap();
        let pid = recorded_pid(&pid_file);
        assert!(is_gone(pid), "background {pid} outlived its hook");
    }
}
