//! `slipway status` at fleet scale, phase by phase, with no network in the
//! way: `cargo bench -p slipway-controller --bench status`.
//!
//! N nodes (default 10,000; `SLIPWAY_BENCH_NODES`) enrolled in a SQLite
//! store in a temporary data dir, each with a certificate and a heartbeat
//! like a real agent's (one app, metrics, version, RSS), all holding a
//! session. Then, R times (default 30; `SLIPWAY_BENCH_RUNS`), each phase
//! of a status call as the controller and the CLI run it, timed apart:
//! - controller: the fleet read (warm cache: nothing changed), the views and
//!   sessions, the summary, the certificate health, the wire message and
//!   its encoding;
//! - CLI: decoding the message and rendering it as text, and as `--json`.
//!
//! Each phase's median and worst CPU time (the process's CPU clock, all its
//! threads: what the rest of the machine does counts little) and median
//! wall time, the encoded size, and the two sides' totals (CPU), compared with the budget they leave of the 200 ms goal of the
//! replicas benchmark (`tests/benches/replicas.rs`, which measures the
//! real thing end to end over mTLS, at 10,000 heartbeating agents).

// A benchmark that cannot set up should stop with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::HashSet;
use std::time::{Duration, Instant};

use prost::Message as _;
use slipway_controller::fleet;
use slipway_controller::fleet::certs::{CertHealth, CertKind, SystemCertHealth};
use slipway_controller::proto::v1::{self, AppStatus, Heartbeat, NodeMetrics};
use slipway_controller::proto::view;
use slipway_controller::store::Store;

/// The end-to-end goal (`slipway status` p99, ms) the phases share.
const GOAL_MS: f64 = 200.0;

fn env_or(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let nodes = env_or("SLIPWAY_BENCH_NODES", 10_000);
    let runs = env_or("SLIPWAY_BENCH_RUNS", 30).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(nodes, runs));
}

async fn run(nodes: usize, runs: usize) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let setup = Instant::now();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    populate(dir.path(), nodes, now).await;
    for i in 0..nodes {
        let recorded = store
            .record_heartbeat(&node_id(i), now, &beat())
            .await
            .unwrap();
        assert!(recorded, "the heartbeat of {} was not recorded", node_id(i));
    }
    println!(
        "{nodes} nodes enrolled with a heartbeat each in {:.1} s; {runs} runs of each phase",
        setup.elapsed().as_secs_f64()
    );
    // The first read fills the cache, as a replica's first status call.
    let cold = Instant::now();
    fleet::nodes_and_certs(&store, now).await.unwrap();
    println!(
        "first fleet read (cache empty): {:.1} ms",
        ms(cold.elapsed())
    );

    let online: HashSet<String> = (0..nodes).map(node_id).collect();
    let mut phases = Phases::default();
    let mut size = 0;
    let mut lines = 0;
    for _ in 0..runs {
        let t = start();
        let (mut views, node_certs) = fleet::nodes_and_certs(&store, now).await.unwrap();
        phases.add("controller: fleet read", t);

        let t = start();
        fleet::apply_sessions(&mut views, |id| online.contains(id));
        let connected: Vec<String> = views
            .iter()
            .filter(|v| online.contains(&v.id))
            .map(|v| v.id.clone())
            .collect();
        phases.add("controller: sessions", t);

        let t = start();
        let certs = SystemCertHealth::new(
            now,
            node_certs
                .into_iter()
                .map(|c| CertHealth {
                    kind: CertKind::Node,
                    name: c.name,
                    id: c.id,
                    not_before: c.issued_at,
                    not_after: c.expires_at,
                })
                .collect(),
        );
        phases.add("controller: certificates", t);

        let t = start();
        let status = fleet::summarize_status(
            &views,
            &fleet::StatusInputs {
                app: None,
                connected: &connected,
                refresh: None,
                deployments: &[],
                now,
                certs: Some(&certs),
            },
        );
        phases.add("controller: summary", t);
        assert!(status.ok(), "the fleet has problems: {:?}", status.problems);
        assert_eq!(status.nodes.len(), nodes, "nodes lost in the summary");

        let t = start();
        let wire: v1::FleetStatus = status.into();
        phases.add("controller: wire message", t);

        let t = start();
        let bytes = v1::FleetStatusResponse {
            status: Some(wire),
            droplets: None,
        }
        .encode_to_vec();
        phases.add("controller: encode", t);
        size = bytes.len();

        let t = start();
        let decoded = v1::FleetStatusResponse::decode(bytes.as_slice())
            .unwrap()
            .status
            .unwrap();
        phases.add("CLI: decode", t);

        let t = start();
        let text = view::render_status(&decoded);
        phases.add("CLI: render text", t);
        lines = text.lines().count();
        assert_eq!(decoded.nodes.len(), nodes, "nodes lost on the way");

        let t = start();
        let json = view::status_json(&decoded).unwrap();
        phases.add("CLI: render --json", t);
        assert!(json.len() > nodes, "the JSON cannot hold every node");
    }
    println!(
        "message: {:.2} MB encoded; text: {lines} lines",
        size as f64 / 1e6
    );
    phases.print();
    let controller = phases.total_median("controller:");
    let cli = phases.median("CLI: decode") + phases.median("CLI: render text");
    println!(
        "CPU: controller total {controller:.1} ms + CLI decode and text {cli:.1} ms = {:.1} ms of the {GOAL_MS:.0} ms goal ({:.0} %), before TLS, the network, the process start and a loaded machine",
        controller + cli,
        (controller + cli) / GOAL_MS * 100.0
    );
}

fn node_id(i: usize) -> String {
    format!("n{i:06}")
}

/// A heartbeat like the replicas benchmark's simulated agents send.
fn beat() -> Heartbeat {
    Heartbeat {
        unix_time: 0,
        metrics: Some(NodeMetrics {
            cpu_percent: 3.0,
            mem_used_bytes: 1 << 30,
            mem_total_bytes: 4 << 30,
            ..NodeMetrics::default()
        }),
        apps: vec![AppStatus {
            app: "web".into(),
            current_release: "v0".into(),
            health: "healthy".into(),
            ..AppStatus::default()
        }],
        agent_version: "bench".into(),
        agent_rss_bytes: 8 << 20,
    }
}

/// The nodes and their certificates, written straight into the store's
/// database (enrolling 10,000 through the API would sign 10,000 keys).
async fn populate(data_dir: &std::path::Path, nodes: usize, now: i64) {
    use sqlx::sqlite::SqliteConnectOptions;
    let options = SqliteConnectOptions::new()
        .filename(data_dir.join("controller.db"))
        .busy_timeout(Duration::from_secs(10));
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    let expires = now + 90 * 86_400;
    for i in 0..nodes {
        sqlx::query(
            "INSERT INTO nodes (id, name, cert_serial, cert_fingerprint, cert_expires_at,
                                labels, enrolled_at)
             VALUES (?1, ?2, ?3, ?4, ?5, '{\"region\":\"fra1\",\"role\":\"web\"}', ?6)",
        )
        .bind(node_id(i))
        .bind(format!("web-{i:05}"))
        .bind(format!("s{i}"))
        .bind(format!("f{i:064}"))
        .bind(expires + i as i64)
        .bind(now - 86_400)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO node_certs (fingerprint, node_id, serial, issued_at, expires_at, ca_sha256)
             VALUES (?1, ?2, ?3, ?4, ?5, 'ca')",
        )
        .bind(format!("f{i:064}"))
        .bind(node_id(i))
        .bind(format!("s{i}"))
        .bind(now - 86_400)
        .bind(expires + i as i64)
        .execute(&mut *tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    pool.close().await;
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// This process's CPU time so far (every thread).
fn cpu_now() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID).unwrap();
    Duration::new(
        u64::try_from(t.tv_sec()).unwrap(),
        u32::try_from(t.tv_nsec()).unwrap(),
    )
}

/// When a phase started: wall clock and CPU clock.
#[derive(Clone, Copy)]
struct Start {
    wall: Instant,
    cpu: Duration,
}

fn start() -> Start {
    Start {
        wall: Instant::now(),
        cpu: cpu_now(),
    }
}

/// Each phase's CPU and wall times, in the order first seen.
#[derive(Default)]
struct Phases {
    times: Vec<(&'static str, Vec<f64>)>,
    walls: Vec<Vec<f64>>,
}

impl Phases {
    fn add(&mut self, name: &'static str, since: Start) {
        let cpu = ms(cpu_now().saturating_sub(since.cpu));
        let wall = ms(since.wall.elapsed());
        match self.times.iter().position(|(n, _)| *n == name) {
            Some(i) => {
                self.times[i].1.push(cpu);
                self.walls[i].push(wall);
            }
            None => {
                self.times.push((name, vec![cpu]));
                self.walls.push(vec![wall]);
            }
        }
    }

    fn median(&self, name: &str) -> f64 {
        self.times
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0.0, |(_, t)| median(t))
    }

    fn total_median(&self, prefix: &str) -> f64 {
        self.times
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, t)| median(t))
            .sum()
    }

    fn print(&self) {
        for ((name, times), walls) in self.times.iter().zip(&self.walls) {
            let worst = times.iter().copied().fold(0.0, f64::max);
            println!(
                "  {name:<28} CPU median {:>7.2} ms  worst {worst:>7.2} ms   wall median {:>7.2} ms",
                median(times),
                median(walls)
            );
        }
    }
}

fn median(times: &[f64]) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}
