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

#[path = "../it/support/mod.rs"]
mod support;

use std::fs;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slipway_agent::link;
use slipway_proto::v1::{
    agent_message, AgentMessage, AppStatus, DiskUsage, Heartbeat, Hello, NodeMetrics,
};
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

/// `wrk` on `url`: (requests/s, p50 ms, p99 ms).
fn wrk(url: &str, token: &str, secs: u64) -> (f64, f64, f64) {
    let out = Command::new("wrk")
        .args([
            "-t2",
            "-c4",
            &format!("-d{secs}s"),
            "--latency",
            "--timeout",
            "5s",
        ])
        .arg("-H")
        .arg(format!("Authorization: Bearer {token}"))
        .arg(url)
        .output()
        .expect("wrk (Debian package wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk: {text}");
    assert!(!text.contains("Non-2xx"), "wrk saw errors: {text}");
    let ms = |label: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap_or_else(|| panic!("no {label} in {text}"));
        let v = line.split_whitespace().nth(1).unwrap();
        if let Some(us) = v.strip_suffix("us") {
            us.parse::<f64>().unwrap() / 1000.0
        } else if let Some(ms) = v.strip_suffix("ms") {
            ms.parse().unwrap()
        } else {
            v.strip_suffix('s').unwrap().parse::<f64>().unwrap() * 1000.0
        }
    };
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    (rps, ms("50%"), ms("99%"))
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
    let sessions = rt.block_on(async {
        let store = slipway_controller::store::Store::open(&data).await.unwrap();
        let ca = slipway_controller::pki::ca::Ca::load_or_create(&data).unwrap();
        let mut sessions = Vec::new();
        for i in 0..n {
            let now = time::OffsetDateTime::now_utc().unix_timestamp();
            let join = slipway_controller::auth::token::create(
                &store,
                &ca.fingerprint(),
                slipway_controller::auth::token::DEFAULT_TTL,
                &[],
                now,
            )
            .await
            .unwrap()
            .to_string();
            let state = dir.path().join(format!("a{i}"));
            link::enroll(&url, &join, &state, &format!("sim{i:04}"), false)
                .await
                .unwrap();
            sessions.push(link::connect(&url, &state, Hello::default()).await.unwrap());
        }
        sessions
    });
    println!(
        "web: {n} agents enrolled and connected in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Heartbeats on the announced interval until the measurements end.
    let stop = Arc::new(AtomicBool::new(false));
    let interval = Duration::from_secs(u64::from(
        sessions[0].welcome.heartbeat_interval_secs.max(1),
    ));
    let mut tasks = Vec::new();
    for (i, s) in sessions.into_iter().enumerate() {
        let stop = stop.clone();
        tasks.push(rt.spawn(async move {
            let mut inbound = s.inbound;
            // Bounded: the measurements take a few minutes at most.
            let end = Instant::now() + Duration::from_secs(600);
            while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                let beat = AgentMessage {
                    kind: Some(agent_message::Kind::Heartbeat(heartbeat(i))),
                };
                if s.outbound.send(beat).await.is_err() {
                    break;
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = inbound.message() => {}
                }
            }
        }));
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

    let (rps, p50, p99) = wrk(&format!("{base}/"), &token, secs);
    println!(
        "web: fleet page / with {n} nodes: {rps:.0} req/s, p50 {p50:.1} ms, p99 {p99:.1} ms (goal p99 < 100 ms)"
    );
    let (rps, p50, p99) = wrk(&format!("{base}/api/v1/nodes"), &token, secs);
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
