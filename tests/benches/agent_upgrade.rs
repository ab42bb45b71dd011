//! Fleet agent upgrade time: 20 local agent processes (each running its own
//! copy of the agent binary, enrolled with a real controller over mTLS)
//! upgraded with `slipway agent-upgrade --wait`: upload, fetch by every
//! node, `--version`, swap, re-exec, reconnect and commit. Prints the wall
//! time of the whole upgrade, all at once and rolling in batches.
//!
//! `cargo build --release --workspace --bins && cargo bench -p slipway-e2e --bench agent_upgrade`
//! (or, with the debug binaries: `cargo build --workspace && cargo bench
//! -p slipway-e2e --bench agent_upgrade --profile dev`).
//!
//! The new binary is the workspace's agent with a version trailer: a test
//! build (`fault-injection`) reports that version, any other build its own;
//! either way the file, its digest, and therefore a real swap, differ.
//! `SLIPWAY_BENCH_AGENTS=N` changes the fleet size (default 20).

// A benchmark that cannot set up should stop with the reason.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../it/support/mod.rs"]
mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use support::{bin, text, Agent, Controller};

fn new_binary(dir: &Path, version: &str) -> PathBuf {
    let path = dir.join(format!("slipway-agent-{version}"));
    let mut bytes = fs::read(bin("slipway-agent")).unwrap();
    bytes.extend_from_slice(
        format!("{}{version}\n", slipway_agent::version::TEST_TRAILER).as_bytes(),
    );
    fs::write(&path, bytes).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn upgrade(controller: &Controller, token: &str, binary: &Path, extra: &[&str]) -> Duration {
    let mut args = vec![
        "agent-upgrade",
        "--version-file",
        binary.to_str().unwrap(),
        "--wait",
        "--json",
    ];
    args.extend_from_slice(extra);
    let start = Instant::now();
    let out = controller.slipway(token, &args);
    let took = start.elapsed();
    assert!(out.status.success(), "{}", text(&out));
    took
}

fn main() {
    let n: usize = std::env::var("SLIPWAY_BENCH_AGENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let controller = Controller::start();
    let token = controller.api_token("agent-upgrade");
    let names: Vec<String> = (1..=n).map(|i| format!("node-{i:02}")).collect();
    let start = Instant::now();
    let mut agents: Vec<Agent> = names
        .iter()
        .map(|name| {
            let mut a = Agent::enroll(&controller, name);
            a.own_binary();
            a
        })
        .collect();
    for a in &mut agents {
        a.run();
    }
    controller.wait_online(&token, n, Duration::from_secs(120));
    println!(
        "{n} agents enrolled, started and online in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let work = tempfile::tempdir().unwrap();
    let size = fs::metadata(bin("slipway-agent")).unwrap().len();

    let first = new_binary(work.path(), "9.0.0-bench1");
    let all = upgrade(&controller, &token, &first, &["--commit-deadline", "120"]);
    println!(
        "agent upgrade of {n} agents, all at once ({:.1} MB binary): {:.2} s",
        size as f64 / 1e6,
        all.as_secs_f64()
    );
    controller.wait_online(&token, n, Duration::from_secs(60));

    let second = new_binary(work.path(), "9.0.0-bench2");
    let rolling = upgrade(
        &controller,
        &token,
        &second,
        &[
            "--strategy",
            "rolling",
            "--max-parallel",
            "5",
            "--commit-deadline",
            "120",
        ],
    );
    println!(
        "agent upgrade of {n} agents, rolling in batches of 5: {:.2} s",
        rolling.as_secs_f64()
    );
}
