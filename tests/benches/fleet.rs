//! Fleet benchmarks: `cargo build --release --workspace --bins && cargo bench -p slipway-e2e --bench fleet`.
//!
//! - Controller memory and CPU with 1,000 connected agents heartbeating.
//!   The agents are simulated in this process, each with its own enrolled
//!   identity and its own mTLS session (real handshakes, real heartbeats on
//!   the interval the controller announces); the controller is the real
//!   `slipway-controller serve` process, measured from /proc.
//! - Deploy latency of a 20 MB artifact to 20 local agent processes through
//!   `slipway deploy` (upload, fetch by every node, unpack, health gate).
//!
//! `SLIPWAY_BENCH_QUICK=1`: 100 agents, 20 s window, 5 agents for the deploy.

// A benchmark that cannot set up should stop with the reason.
#![allow(clippy::unwrap_used, missing_docs)]

mod sim;
#[path = "../it/support/mod.rs"]
mod support;

use std::fs;
use std::time::{Duration, Instant};

use slipway_proto::v1::{AppStatus, Heartbeat, NodeMetrics};
use support::{Agent, Controller};

fn proc_stat(pid: u32) -> (f64, u64) {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let cpu = (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0;
    let rss = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    (cpu, rss * 1024)
}

fn main() {
    let quick = std::env::var_os("SLIPWAY_BENCH_QUICK").is_some();
    let (agents, window, deploy_nodes) = if quick {
        (100, Duration::from_secs(20), 5)
    } else {
        (1000, Duration::from_secs(60), 20)
    };
    heartbeats(agents, window);
    deploy_latency(deploy_nodes);
}

fn heartbeats(n: usize, window: Duration) {
    let controller = Controller::start();
    let pid = controller.pid().unwrap();
    let (_, rss_idle) = proc_stat(pid);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let url = controller.url();
    let data = controller.data_dir();
    let t = Instant::now();
    let sessions = rt.block_on(sim::connect_agents(&url, &data, dir.path(), n, |i| {
        format!("sim{i}")
    }));
    println!(
        "heartbeats: {n} agents enrolled and connected in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let interval = sim::interval(&sessions);
    let (cpu0, _) = proc_stat(pid);
    let beats = rt.block_on(async {
        let mut tasks = Vec::new();
        for (i, s) in sessions.into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                // Staggered like real agents.
                tokio::time::sleep(interval.mul_f64((i as f64 * 0.618_034) % 1.0)).await;
                let end = Instant::now() + window;
                sim::heartbeat(
                    s,
                    interval,
                    end,
                    || true,
                    || Heartbeat {
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
                    },
                )
                .await
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap_or(0);
        }
        total
    });
    let (cpu1, rss) = proc_stat(pid);
    let secs = window.as_secs_f64();
    println!(
        "  controller with {n} agents heartbeating every {}s for {secs:.0} s: {beats} heartbeats, CPU {:.2} s = {:.2}% of one core, RSS {:.1} MiB (idle {:.1} MiB)",
        interval.as_secs(),
        cpu1 - cpu0,
        (cpu1 - cpu0) / secs * 100.0,
        rss as f64 / 1048576.0,
        rss_idle as f64 / 1048576.0
    );
}

fn deploy_latency(n: usize) {
    let controller = Controller::start();
    let mut agents: Vec<Agent> = (0..n)
        .map(|i| Agent::enroll(&controller, &format!("d{i}")))
        .collect();
    for a in &mut agents {
        // n Python apps start at once on a small machine: give them time
        // (a healthy app still ends the gate as soon as it answers).
        a.set_start_period("10s");
        a.run();
    }
    let token = controller.api_token("deploy:web");
    // 20 MB of incompressible payload beside the app.
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("server.py"), support::APP).unwrap();
    fs::write(src.join("VERSION"), "v1").unwrap();
    let mut payload = vec![0u8; 20 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in &mut payload {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    fs::write(src.join("assets.bin"), &payload).unwrap();
    let art = dir.path().join("v1.tar.gz");
    slipway_agent::artifact::pack_dir(&src, &art, slipway_agent::artifact::Compression::Gzip)
        .unwrap();
    let sha = support::sha256_file(&art);
    controller.wait_online(&token, n, Duration::from_secs(60));
    let t = Instant::now();
    let out = controller.deploy_web(&token, &art, &sha, "v1", &["--wait"]);
    let took = t.elapsed();
    assert!(out.status.success(), "{}", support::text(&out));
    println!(
        "deploy latency: {:.1} MB artifact to {n} agents (upload, fetch, unpack, health gate): {:.2} s",
        fs::metadata(&art).unwrap().len() as f64 / 1e6,
        took.as_secs_f64()
    );
}
