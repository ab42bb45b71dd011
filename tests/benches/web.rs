//! Web page and /metrics benchmarks with 1,000 simulated agents connected:
//! `cargo build --release --workspace --bins && cargo bench -p slipway-e2e --bench web`.
//!
//! The controller is the real `slipway-controller serve --http-listen`
//! process; the agents are simulated in this process, each with its own
//! enrolled identity, mTLS session and heartbeats (host metrics, two disks,
//! one app; every tenth node on another release, so the page shows drift).
//! Then, from loopback:
//! - the fleet page `/` and `/api/v1/nodes` under `wrk` (Debian's; 2
//!   threads, 4 connections, 10 s each): requests/s, p50 and p99 (goals:
//!   page p99 < 100 ms, JSON p99 < 50 ms);
//! - `/metrics`: 20 sequential scrapes with curl: time p50/max and size.
//!
//! `SLIPWAY_BENCH_QUICK=1`: 100 agents, 5 s of wrk. `SLIPWAY_BIN_DIR=target/release`
//! with `--profile dev`: a release controller under a debug-built bench.

// A benchmark that cannot set up should stop with the reason.
#![allow(clippy::unwrap_used, missing_docs)]

mod sim;
#[path = "../it/support/mod.rs"]
mod support;

use std::fs;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slipway_proto::v1::{AppStatus, DiskUsage, Heartbeat, NodeMetrics};
use support::{wait_until, Controller};

/// Sequential /metrics scrapes timed.
const SCRAPES: usize = 20;

fn heartbeat(i: usize) -> Heartbeat {
    Heartbeat {
        unix_time: time::OffsetDateTime::now_utc().unix_timestamp(),
        metrics: Some(NodeMetrics {
            cpu_percent: (i % 100) as f64,
            mem_used_bytes: 1 << 30,
            mem_total_bytes: 4 << 30,
            load1: 0.5,
            load5: 0.4,
            load15: 0.3,
            disks: vec![
                DiskUsage {
                    mount: "/".into(),
                    used_bytes: 10 << 30,
                    total_bytes: 50 << 30,
                },
                DiskUsage {
                    mount: "/app".into(),
                    used_bytes: 3 << 30,
                    total_bytes: 20 << 30,
                },
            ],
        }),
        apps: vec![AppStatus {
            app: "web".into(),
            current_release: if i.is_multiple_of(10) { "v2" } else { "v1" }.into(),
            health: "healthy".into(),
            ..AppStatus::default()
        }],
        agent_version: "bench".into(),
        agent_rss_bytes: 8 << 20,
    }
}

fn main() {
    let quick = std::env::var_os("SLIPWAY_BENCH_QUICK").is_some();
    let (n, secs) = if quick { (100, 5) } else { (1000, 10) };
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("http-ready");
    let controller = Controller::start_with(&[
        "--http-listen",
        "127.0.0.1:0",
        "--http-plain",
        "--http-ready-file",
        ready.to_str().unwrap(),
    ]);
    let mut http = String::new();
    wait_until("the HTTP listener", Duration::from_secs(30), || {
        http = fs::read_to_string(&ready).unwrap_or_default();
        http.ends_with('\n')
    });
    let base = format!("http://{}", http.trim());
    let token = controller.api_token("read");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let url = controller.url();
    let data = controller.data_dir();
    let t = Instant::now();
    let sessions = rt.block_on(sim::connect_agents(&url, &data, dir.path(), n, |i| {
        format!("sim{i:04}")
    }));
    println!(
        "web: {n} agents enrolled and connected in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Heartbeats on the announced interval until the measurements end
    // (bounded: they take a few minutes at most).
    let stop = Arc::new(AtomicBool::new(false));
    let interval = sim::interval(&sessions);
    let end = Instant::now() + Duration::from_secs(600);
    let mut tasks = Vec::new();
    for (i, s) in sessions.into_iter().enumerate() {
        let stop = stop.clone();
        let go_on = move || !stop.load(Ordering::Relaxed);
        tasks.push(rt.spawn(sim::heartbeat(s, interval, end, go_on, move || {
            heartbeat(i)
        })));
    }
    // Every node online with its app, as the controller's /metrics says.
    let metrics_url = format!("{base}/metrics");
    wait_until(
        "every node online with its app",
        Duration::from_secs(120),
        || {
            let out = Command::new("curl")
                .args([
                    "-sf",
                    "-H",
                    &format!("Authorization: Bearer {token}"),
                    &metrics_url,
                ])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            text.contains(&format!("slipway_nodes{{state=\"online\"}} {n}\n"))
                && text.contains(&format!(
                    "slipway_apps{{app=\"web\",health=\"healthy\"}} {n}\n"
                ))
        },
    );

    let sim::Wrk { p50, p99, rps } = sim::wrk(&format!("{base}/"), &token, 4, secs);
    println!(
        "web: fleet page / with {n} nodes: {rps:.0} req/s, p50 {p50:.1} ms, p99 {p99:.1} ms (goal p99 < 100 ms)"
    );
    let sim::Wrk { p50, p99, rps } = sim::wrk(&format!("{base}/api/v1/nodes"), &token, 4, secs);
    println!(
        "web: /api/v1/nodes with {n} nodes: {rps:.0} req/s, p50 {p50:.1} ms, p99 {p99:.1} ms (goal p99 < 50 ms)"
    );
    let mut times = Vec::new();
    let mut size = 0.0;
    for _ in 0..SCRAPES {
        let out = Command::new("curl")
            .args([
                "-sf",
                "-o",
                "/dev/null",
                "-w",
                "%{time_total} %{size_download}",
                "-H",
                &format!("Authorization: Bearer {token}"),
                &metrics_url,
            ])
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (t, s) = text.split_once(' ').unwrap();
        times.push(t.parse::<f64>().unwrap() * 1000.0);
        size = s.parse().unwrap();
    }
    times.sort_by(f64::total_cmp);
    println!(
        "web: /metrics with {n} nodes: {SCRAPES} scrapes, p50 {:.1} ms, max {:.1} ms, {:.0} KiB ({} bytes)",
        times[SCRAPES / 2],
        times[SCRAPES - 1],
        size / 1024.0,
        size
    );
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for t in tasks {
            let _ = tokio::time::timeout(interval * 2, t).await;
        }
    });
}
