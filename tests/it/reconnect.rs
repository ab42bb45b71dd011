//! After a controller restart, 100 agents do not reconnect in lockstep: their
//! backoff has full jitter. Each agent is its own process (no apps: only the
//! controller session), enrolled with its own token.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::support::{bin, wait_until, Controller};

const AGENTS: usize = 100;

struct Fleet(Vec<Child>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Timestamps (seconds, from the log line prefix) of "connected" lines.
fn connects(log: &PathBuf) -> Vec<f64> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("connected to the controller"))
        .filter_map(|l| {
            // 2026-11-25T13:13:07.320499Z ...
            let t = l.split_whitespace().next()?;
            let hms = t.split('T').nth(1)?.trim_end_matches('Z');
            let mut parts = hms.split(':');
            let (h, m, s): (f64, f64, f64) = (
                parts.next()?.parse().ok()?,
                parts.next()?.parse().ok()?,
                parts.next()?.parse().ok()?,
            );
            Some(h * 3600.0 + m * 60.0 + s)
        })
        .collect()
}

#[test]
fn a_hundred_agents_reconnect_spread_out_after_a_controller_restart() {
    let mut controller = Controller::start();
    let dir = tempfile::tempdir().unwrap();
    let mut logs = Vec::new();
    let mut fleet = Fleet(Vec::new());
    for i in 0..AGENTS {
        let node = dir.path().join(format!("a{i}"));
        fs::create_dir_all(&node).unwrap();
        let config = node.join("agent.toml");
        let state = node.join("state");
        fs::write(
            &config,
            format!(
                "[controller]\nurl = \"{}\"\nstate_dir = \"{}\"\n",
                controller.url(),
                state.display()
            ),
        )
        .unwrap();
        let out = controller.enroll_cli(&format!("a{i}"), &state, &[]);
        assert!(out.status.success(), "enroll a{i}: {out:?}");
        let log = node.join("agent.log");
        fleet.0.push(
            Command::new(bin("slipway-agent"))
                .arg("--config")
                .arg(&config)
                .arg("run")
                .stdout(Stdio::null())
                .stderr(Stdio::from(fs::File::create(&log).unwrap()))
                .spawn()
                .unwrap(),
        );
        logs.push(log);
    }
    wait_until("every agent to connect", Duration::from_secs(60), || {
        logs.iter().all(|l| connects(l).len() == 1)
    });

    controller.stop();
    std::thread::sleep(Duration::from_secs(3));
    controller.restart();
    wait_until("every agent to reconnect", Duration::from_secs(90), || {
        logs.iter().all(|l| connects(l).len() >= 2)
    });
    let mut times: Vec<f64> = logs.iter().map(|l| connects(l)[1]).collect();
    times.sort_by(f64::total_cmp);
    let (p10, p90) = (times[AGENTS / 10], times[AGENTS * 9 / 10]);
    let spread = p90 - p10;
    println!(
        "reconnect spread of {AGENTS} agents: p10-p90 {spread:.2} s, first-last {:.2} s",
        times[AGENTS - 1] - times[0]
    );
    // Lockstep would put them all within a few milliseconds.
    assert!(
        spread > 0.5,
        "agents reconnected in lockstep: p10-p90 spread {spread:.3} s"
    );
}
