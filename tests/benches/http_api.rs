//! HTTP API latency: `cargo build --release --workspace --bins && cargo
//! bench -p slipway-e2e --bench http_api` (or with the debug binaries:
//! `cargo bench -p slipway-e2e --bench http_api --profile dev`).
//!
//! A real `slipway-controller serve --http-listen` process with 1,000
//! simulated agents connected: each enrolled with its own identity and
//! holding its own mTLS gRPC session from this process (real handshakes),
//! each having sent one heartbeat (metrics, one app), so the controller
//! sees 1,000 live sessions and node rows. Then `wrk` (Debian's) loads
//! `GET /api/v1/nodes` over HTTPS from loopback with an API token for a
//! fixed time and prints p50/p99 (goal: p99 < 50 ms) and the throughput;
//! and `/healthz` for the server's floor.
//!
//! `SLIPWAY_BENCH_QUICK=1`: 100 agents, 5 s runs.

// A benchmark that cannot set up should stop with the reason.
#![allow(clippy::unwrap_used, missing_docs)]

mod sim;
#[path = "../it/support/mod.rs"]
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use slipway_proto::v1::{AppStatus, Heartbeat, NodeMetrics};
use support::Controller;

/// How long the simulated agents keep heartbeating (the whole bench).
const HEARTBEAT_FOR: Duration = Duration::from_secs(600);

/// One heartbeat: host metrics and one healthy app.
fn heartbeat() -> Heartbeat {
    Heartbeat {
        unix_time: time::OffsetDateTime::now_utc().unix_timestamp(),
        metrics: Some(NodeMetrics {
            cpu_percent: 3.0,
            mem_used_bytes: 1 << 30,
            mem_total_bytes: 4 << 30,
            ..NodeMetrics::default()
        }),
        apps: vec![AppStatus {
            app: "web".into(),
            current_release: "v1".into(),
            health: "healthy".into(),
            ..AppStatus::default()
        }],
        agent_version: "bench".into(),
        agent_rss_bytes: 8 << 20,
    }
}

/// The p99 goal for `/api/v1/nodes` with 1,000 agents.
const GOAL_P99_MS: f64 = 50.0;

fn main() {
    let quick = std::env::var_os("SLIPWAY_BENCH_QUICK").is_some();
    let (agents, duration) = if quick { (100, 5) } else { (1000, 20) };
    let controller = Controller::start_http();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = controller.url();
    let data = controller.data_dir();
    let t = Instant::now();
    let sessions = rt.block_on(sim::connect_agents(&url, &data, dir.path(), agents, |i| {
        format!("sim{i}")
    }));
    println!(
        "http_api: {agents} simulated agents (real mTLS gRPC sessions from this process) enrolled and connected in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Each keeps heartbeating on the interval the controller announced, as
    // a real agent does, so every node stays online; bounded in time.
    let interval = sim::interval(&sessions);
    let end = Instant::now() + HEARTBEAT_FOR;
    for s in sessions {
        rt.spawn(sim::heartbeat(s, interval, end, || true, heartbeat));
    }

    let token = controller.api_token("read");
    let base = controller.http_url();
    // Every node online and its heartbeat stored before measuring.
    support::wait_until("every node online", Duration::from_secs(120), || {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "30", "--cacert"])
            .arg(controller.ca_pem())
            .args(["-H", &format!("Authorization: Bearer {token}")])
            .arg(format!("{base}/api/v1/nodes"))
            .output()
            .unwrap();
        let nodes: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        nodes
            .iter()
            .filter(|n| n["state"] == "online" && !n["apps"].as_array().unwrap().is_empty())
            .count()
            == agents
    });
    let size = Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download}",
            "--cacert",
        ])
        .arg(controller.ca_pem())
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("{base}/api/v1/nodes"))
        .output()
        .unwrap();
    println!(
        "  /api/v1/nodes answer: {} bytes for {agents} nodes",
        String::from_utf8_lossy(&size.stdout)
    );
    for (path, connections) in [
        ("/api/v1/nodes", 4),
        ("/api/v1/nodes", 16),
        ("/healthz", 16),
    ] {
        let sim::Wrk { p50, p99, rps } =
            sim::wrk(&format!("{base}{path}"), &token, connections, duration);
        let goal = if path == "/api/v1/nodes" {
            format!(
                " (goal p99 < {GOAL_P99_MS} ms: {})",
                if p99 < GOAL_P99_MS { "met" } else { "MISSED" }
            )
        } else {
            String::new()
        };
        println!(
            "  GET {path}, {connections} connections, {duration} s: p50 {p50:.2} ms, p99 {p99:.2} ms, {rps:.0} requests/s{goal}"
        );
    }
}
