//! PM2 cluster reloads under load: `cargo bench -p slipway-agent --bench pm2_reload`.
//!
//! The same two-instance cluster app (tests/fixtures/pm2-app/server.js,
//! which closes its server on SIGINT) under the same bounded load loop (2
//! threads of new connections, 2 of keep-alive connections; every request
//! must be answered within 2 s), reloaded the same number of times with
//! plain `pm2 reload`, once under a PM2 daemon with Node's default
//! round-robin balancing (the baseline: PM2 as people run it) and once under
//! a daemon with `NODE_CLUSTER_SCHED_POLICY=none` (what Slipway's PM2
//! driver runs). Prints what the load loop saw for each.
//!
//! `SLIPWAY_BENCH_RELOADS=N` sets the number of reloads (default 20).

// A benchmark that cannot set up should stop with the reason.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/it/support/load.rs"]
mod load;

use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SERVER_JS: &str = include_str!("../tests/fixtures/pm2-app/server.js");

fn main() {
    let reloads: usize = std::env::var("SLIPWAY_BENCH_RELOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    println!("pm2 cluster app, 2 instances, {reloads} reloads under load each:");
    let base = run("round-robin (pm2 default)", None, reloads);
    let ours = run(
        "kernel (NODE_CLUSTER_SCHED_POLICY=none, Slipway)",
        Some("none"),
        reloads,
    );
    println!(
        "hung connections: {} with PM2's default, {} with Slipway's setting",
        base.hung.len(),
        ours.hung.len()
    );
}

fn run(label: &str, policy: Option<&str>, reloads: usize) -> load::LoadReport {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("pm2");
    let app = dir.path().join("app");
    fs::create_dir_all(&app).unwrap();
    fs::write(
        app.join("server.js"),
        SERVER_JS.replace("__RELEASE__", "bench"),
    )
    .unwrap();
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let pm2 = |args: &[&str]| {
        let mut cmd = Command::new("pm2");
        cmd.args(args)
            .env("PM2_HOME", &home)
            .env("PORT", port.to_string())
            .env_remove("NODE_CLUSTER_SCHED_POLICY")
            .current_dir(&app)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(p) = policy {
            cmd.env("NODE_CLUSTER_SCHED_POLICY", p);
        }
        let status = cmd.status().unwrap();
        assert!(status.success(), "pm2 {args:?} failed: {status}");
    };
    pm2(&["start", "server.js", "-i", "2", "--name", "bench"]);
    let _kill = Kill(&home);
    wait_serving(port);

    let started = Instant::now();
    let l = load::Load::start(port, "/", 2, 2, Duration::from_secs(600), 1_000_000);
    for _ in 0..reloads {
        pm2(&["reload", "bench"]);
        std::thread::sleep(Duration::from_millis(1000));
    }
    let report = l.stop();
    println!(
        "  {label:<50} {:>6.1} s: {}",
        started.elapsed().as_secs_f64(),
        report.summary()
    );
    report
}

fn wait_serving(port: u16) {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the app never listened"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `pm2 kill` of this run's daemon when it ends.
struct Kill<'a>(&'a Path);

impl Drop for Kill<'_> {
    fn drop(&mut self) {
        let _ = Command::new("pm2")
            .arg("kill")
            .env("PM2_HOME", self.0)
            .stdin(Stdio::null())
            .output();
    }
}
