//! The README's first command: `slipway-agent demo` must run end to end, with
//! the exec driver (a fresh machine) and with PM2 (after the test set-up).

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::process::Command;

fn demo(driver: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(crate::support::BIN)
        .args(["demo", "--driver", driver, "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo --driver {driver} failed:\n{stdout}\n{stderr}"
    );
    for needle in [
        "hello from v1",
        "ROLLED BACK: health gate failed",
        "HTTP 500",
        "current is now v1 (rolled back from v2, now marked bad)",
        "rebuilt from manifest",
        "files checked, intact",
        // The deploy of v4 prunes the older bad release (keep_failed = 1).
        "pruned v2",
        // The activations log has the rollback too (after_activate runs
        // on a rollback like on a deploy).
        "v1 is live (was: v2)",
        "stopped",
    ] {
        assert!(
            stdout.contains(needle),
            "demo --driver {driver} output lacks {needle:?}:\n{stdout}"
        );
    }
    // Status tells crash restarts from the agent's own reloads: under PM2
    // every deploy reloads each instance, and none of that is a crash.
    assert!(stdout.contains("crash restarts "), "{stdout}");
    if driver == "pm2" {
        assert!(
            stdout
                .lines()
                .any(|l| l.contains("crash restarts 0") && l.contains(" reloads ")),
            "{stdout}"
        );
    }
    // v2 served before v3 failed its gate, and again after the rollback.
    assert!(stdout.matches("hello from v2").count() >= 2, "{stdout}");
}

#[test]
fn demo_runs_with_the_exec_driver() {
    demo("exec");
}

#[test]
fn demo_runs_with_pm2_in_cluster_mode() {
    demo("pm2");
}
