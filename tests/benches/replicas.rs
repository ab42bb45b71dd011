//! Controller replicas on one PostgreSQL: `cargo build --release --workspace
//! --bins && cargo bench -p slipway-e2e --bench replicas`.
//!
//! A private PostgreSQL server (the tests' `OwnServer`), three release-built
//! `slipway-controller serve` replicas on one database of it, and N
//! simulated agents (default 10,000; `SLIPWAY_BENCH_AGENTS`) spread over
//! the replicas, each enrolled with its own identity and holding its own
//! mTLS gRPC session from this process. Each replica is configured
//! (`heartbeats_per_sec`) so that the interval it announces to its agents
//! is 30 s; the agents heartbeat at it. Over a window (default 60 s;
//! `SLIPWAY_BENCH_WINDOW_SECS`): CPU seconds and RSS of each replica (from
//! /proc), CPU of PostgreSQL (its postmaster and every backend), heartbeats
//! sent per second and the row updates of `nodes` PostgreSQL counted, and
//! the wall time of ~50 `slipway status` runs (the real CLI, a process
//! each, spread over the window and the replicas; `SLIPWAY_BENCH_STATUS_RUNS`
//! sets how many): p50 and p99. Then a
//! rolling deploy (`--strategy rolling --max-parallel 100`) to 1,000 of the
//! agents (tag `bench:deploy`), which answer each Deploy at once with a
//! success: the wall time of `slipway deploy --wait`.
//!
//! The agents, the 1,000 deploy agents among them, are spread evenly over
//! the replicas and the deploy goes through replica 0: two thirds of its
//! commands reach their node through the replica holding its session (the
//! `node_commands` queue). The results are compared with the goals (all
//! replicas under one core in total, status p99 < 200 ms).

// A benchmark that cannot set up should stop with the reason.
#![allow(clippy::unwrap_used, missing_docs)]

mod sim;
#[path = "../it/support/mod.rs"]
mod support;
// Only the private server (OwnServer) is used here.
#[allow(dead_code)]
#[path = "../../controller/src/store/test_postgres.rs"]
mod test_postgres;

use std::fs;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slipway_proto::v1::{AppStatus, Heartbeat, NodeMetrics};
use support::Controller;

/// Replicas sharing the database.
const REPLICAS: usize = 3;
/// The heartbeat interval the replicas are configured to announce.
const HEARTBEAT: Duration = Duration::from_secs(30);
/// Agents the rolling deploy goes to (at most N), and its batch size.
const DEPLOY_AGENTS: usize = 1000;
/// Nodes per batch of the rolling deploy.
const DEPLOY_BATCH: usize = 100;
/// `slipway status` runs over the window.
const STATUS_SAMPLES: usize = 50;
/// Goal: CPU of all replicas together, in cores.
const GOAL_CORES: f64 = 1.0;
/// Goal: `slipway status` p99, ms.
const GOAL_STATUS_P99_MS: f64 = 200.0;
/// Enrollments and session opens under way at once.
const ENROLL_CONCURRENCY: usize = 32;

/// `name` from the environment as a number, else `default`.
fn env_num(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// CPU seconds (user + system) and RSS bytes of process `pid`.
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

/// CPU seconds of the PostgreSQL postmaster `pid` and of its children
/// (backends, background workers) running now.
fn postgres_cpu(pid: u32) -> f64 {
    let mut cpu = proc_stat(pid).0;
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
        if f.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            let user: f64 = f[11].parse().unwrap_or(0.0);
            let system: f64 = f[12].parse().unwrap_or(0.0);
            cpu += (user + system) / 100.0;
        }
    }
    cpu
}

/// Raises this process's open-file limit to `n` with `prlimit`, or to the
/// hard limit when that is lower and cannot be raised (no
/// CAP_SYS_RESOURCE); the controllers started after inherit it.
fn raise_nofile(n: u64) {
    let hard = std::process::Command::new("sh")
        .args(["-c", "ulimit -Hn"])
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<u64>()
                .ok()
        })
        .unwrap_or(n);
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let n = if root { n } else { n.min(hard) };
    let out = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={n}:{n}"))
        .output()
        .unwrap_or_else(|e| panic!("prlimit is not installed ({e}): apt-get install util-linux"));
    if out.status.success() {
        return;
    }
    let n = n.min(hard);
    let out = std::process::Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={n}:{hard}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "prlimit --nofile={n}:{hard}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("open files limited to {n} (the hard limit; raising it is not permitted here)");
}

/// The `p`th percentile (0..=100) of sorted `values`.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() {
    let n = usize::try_from(env_num("SLIPWAY_BENCH_AGENTS", 10_000)).unwrap();
    let window = Duration::from_secs(env_num("SLIPWAY_BENCH_WINDOW_SECS", 60));
    assert!(
        n >= REPLICAS,
        "SLIPWAY_BENCH_AGENTS={n}: at least {REPLICAS}"
    );
    let deploy_n = DEPLOY_AGENTS.min(n);
    raise_nofile(u64::try_from(n).unwrap() * 2 + 10_000);

    // Which replica each agent connects to: all spread evenly, the deploy
    // agents too, so the deploy (through replica 0) reaches two thirds of
    // them through the replica holding their session (command routing).
    let assign: Vec<usize> = (0..n).map(|i| i % REPLICAS).collect();
    let counts: Vec<usize> = (0..REPLICAS)
        .map(|r| assign.iter().filter(|&&a| a == r).count())
        .collect();

    let pg = test_postgres::OwnServer::start(&[]).unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    let url = pg.database_url().unwrap();
    let db = url.rsplit('/').next().unwrap().to_owned();
    let pg_pid = pg.pid().unwrap();
    let configs = tempfile::tempdir().unwrap();
    // Each replica's rate puts the interval it announces, ceil(agents /
    // rate) s, at 30 s once all its agents are connected.
    let config = |r: usize| {
        let path = configs.path().join(format!("replica{r}.toml"));
        let rate = (counts[r] as u64).div_ceil(HEARTBEAT.as_secs()).max(1);
        fs::write(&path, format!("heartbeats_per_sec = {rate}\n")).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let config0 = config(0);
    let first_replica = Controller::start_postgres(&url, &["--config", &config0]);
    let mut replicas = vec![first_replica];
    for r in 1..REPLICAS {
        let cfg = config(r);
        let replica = replicas[0].postgres_replica(&["--config", &cfg]);
        replicas.push(replica);
    }
    let pids: Vec<u32> = replicas.iter().map(|c| c.pid().unwrap()).collect();
    let reader = replicas[0].api_token("read");
    let deployer = replicas[0].api_token("deploy:web");
    let urls: Vec<String> = replicas.iter().map(Controller::url).collect();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let states = tempfile::tempdir().unwrap();
    let ca = slipway_controller::pki::ca::Ca::load_or_create(&replicas[0].data_dir())
        .unwrap()
        .fingerprint();
    let t = Instant::now();
    let sessions = rt.block_on(async {
        let store = slipway_controller::store::Store::open_postgres(
            &slipway_controller::store::PostgresUrl::parse(&url).unwrap(),
        )
        .await
        .unwrap();
        let mut sessions = Vec::with_capacity(n);
        let indices: Vec<usize> = (0..n).collect();
        for chunk in indices.chunks(ENROLL_CONCURRENCY) {
            let mut tasks = Vec::new();
            for &i in chunk {
                let (store, ca, url) = (store.clone(), ca.clone(), urls[assign[i]].clone());
                let states = states.path().to_owned();
                let tags = if i < deploy_n {
                    vec!["bench:deploy".to_owned()]
                } else {
                    Vec::new()
                };
                tasks.push(tokio::spawn(async move {
                    sim::enroll_and_connect(&url, &store, &ca, &states, &format!("sim{i}"), &tags)
                        .await
                }));
            }
            for task in tasks {
                sessions.push(task.await.unwrap());
            }
        }
        sessions
    });
    println!(
        "{n} agents enrolled and connected in {:.1} s: {counts:?} on the {REPLICAS} replicas",
        t.elapsed().as_secs_f64()
    );
    // The interval each replica announced last (to its last agent, with
    // all of them counted).
    let mut announced = [Duration::ZERO; REPLICAS];
    for (i, s) in sessions.iter().enumerate() {
        announced[assign[i]] = Duration::from_secs(u64::from(s.welcome.heartbeat_interval_secs));
    }
    println!(
        "heartbeat interval announced by the replicas (configured heartbeats_per_sec): {:?}",
        announced.iter().map(Duration::as_secs).collect::<Vec<_>>()
    );

    // Heartbeats from now on, at the interval each replica announced,
    // staggered like real agents; every Deploy answered at once.
    let beats = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let hard_end = Instant::now() + window + Duration::from_secs(900);
    let mut tasks = Vec::new();
    for (i, s) in sessions.into_iter().enumerate() {
        let interval = announced[assign[i]].max(Duration::from_secs(1));
        let (beats, stop) = (beats.clone(), stop.clone());
        tasks.push(rt.spawn(async move {
            tokio::time::sleep(interval.mul_f64((i as f64 * 0.618_034) % 1.0)).await;
            sim::heartbeat(
                s,
                interval,
                hard_end,
                || !stop.load(Ordering::Relaxed),
                || {
                    beats.fetch_add(1, Ordering::Relaxed);
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
                            current_release: "v0".into(),
                            health: "healthy".into(),
                            ..AppStatus::default()
                        }],
                        agent_version: "bench".into(),
                        agent_rss_bytes: 8 << 20,
                    }
                },
            )
            .await
        }));
    }
    // Let the staggered first beats spread (one interval), then measure.
    let longest = announced.iter().max().copied().unwrap_or(HEARTBEAT);
    std::thread::sleep(longest.min(Duration::from_secs(30)));

    let node_updates = || -> i64 {
        pg.psql(
            &db,
            "SELECT coalesce(sum(n_tup_upd), 0) FROM pg_stat_user_tables WHERE relname = 'nodes'",
        )
        .unwrap()
        .parse()
        .unwrap_or(0)
    };
    let commits = || -> i64 {
        pg.psql(
            &db,
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()",
        )
        .unwrap()
        .parse()
        .unwrap_or(0)
    };
    let cpu0: Vec<f64> = pids.iter().map(|&p| proc_stat(p).0).collect();
    let pg_cpu0 = postgres_cpu(pg_pid);
    let (upd0, commits0, beats0) = (node_updates(), commits(), beats.load(Ordering::Relaxed));
    let start = Instant::now();
    // `slipway status` through each replica in turn, spread over the window.
    let mut status_ms = Vec::new();
    let mut status_errors = Vec::new();
    let samples =
        usize::try_from(env_num("SLIPWAY_BENCH_STATUS_RUNS", STATUS_SAMPLES as u64)).unwrap();
    // For a profiler attached from outside (`perf record -p PID`).
    println!("window starts: replica pids {pids:?}, PostgreSQL {pg_pid}");
    for k in 0..samples {
        let slot = start + window.mul_f64(k as f64 / samples as f64);
        std::thread::sleep(slot.saturating_duration_since(Instant::now()));
        let t = Instant::now();
        let out = replicas[k % REPLICAS].slipway(&reader, &["status"]);
        status_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        let said = support::text(&out);
        if said.contains("error:") {
            status_errors.push(said);
        }
    }
    std::thread::sleep((start + window).saturating_duration_since(Instant::now()));
    let secs = start.elapsed().as_secs_f64();
    let usage: Vec<(f64, u64)> = pids.iter().map(|&p| proc_stat(p)).collect();
    let pg_cpu = postgres_cpu(pg_pid) - pg_cpu0;
    let (upd1, commits1, beats1) = (node_updates(), commits(), beats.load(Ordering::Relaxed));
    assert!(
        status_errors.is_empty(),
        "slipway status failed {} times: {}",
        status_errors.len(),
        status_errors[0]
    );

    // The rolling deploy to the tagged agents, through replica 0.
    let work = tempfile::tempdir().unwrap();
    let art = support::artifact(work.path(), "v1", support::APP);
    let sha = support::sha256_file(&art);
    let t = Instant::now();
    let out = replicas[0].deploy_web(
        &deployer,
        &art,
        &sha,
        "v1",
        &[
            "--tag",
            "bench:deploy",
            "--strategy",
            "rolling",
            "--max-parallel",
            &DEPLOY_BATCH.to_string(),
            "--wait",
        ],
    );
    let deploy_secs = t.elapsed().as_secs_f64();
    let deploy_text = support::text(&out);
    let deployed_ok = out.status.success();
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for task in tasks {
            let _ = task.await;
        }
    });
    drop(rt);
    assert!(deployed_ok, "the rolling deploy failed: {deploy_text}");
    assert!(
        deploy_text.contains(&format!("to {deploy_n} node(s)")),
        "the deploy did not go to {deploy_n} nodes: {deploy_text}"
    );

    // The table.
    println!();
    println!(
        "{n} simulated agents over mTLS on {REPLICAS} replicas, one PostgreSQL; window {secs:.0} s"
    );
    println!("| replica | agents | interval | CPU s | CPU % of a core | RSS MiB |");
    println!("|---|---|---|---|---|---|");
    let mut total_cores = 0.0;
    for r in 0..REPLICAS {
        let cpu = usage[r].0 - cpu0[r];
        total_cores += cpu / secs;
        println!(
            "| {r} | {} | {} s | {cpu:.2} | {:.1} | {:.1} |",
            counts[r],
            announced[r].as_secs(),
            cpu / secs * 100.0,
            usage[r].1 as f64 / 1_048_576.0
        );
    }
    println!(
        "| PostgreSQL | | | {pg_cpu:.2} | {:.1} | |",
        pg_cpu / secs * 100.0
    );
    let beat_rate = (beats1 - beats0) as f64 / secs;
    println!(
        "heartbeats sent: {beat_rate:.1}/s; `nodes` row updates: {:.1}/s; commits: {:.1}/s",
        (upd1 - upd0) as f64 / secs,
        (commits1 - commits0) as f64 / secs
    );
    status_ms.sort_by(f64::total_cmp);
    let p50 = percentile(&status_ms, 50.0);
    let p99 = percentile(&status_ms, 99.0);
    println!(
        "`slipway status` ({} runs, a process each, over the window): p50 {p50:.0} ms, p99 {p99:.0} ms, max {:.0} ms",
        status_ms.len(),
        status_ms.last().copied().unwrap_or(0.0)
    );
    println!(
        "rolling deploy to {deploy_n} instantly-acking agents in batches of {DEPLOY_BATCH} (through replica 0): {deploy_secs:.1} s"
    );
    println!();
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "goal: all replicas under {GOAL_CORES} core in total: {:.2} cores ({}); PostgreSQL adds {:.2}",
        total_cores,
        verdict(total_cores < GOAL_CORES),
        pg_cpu / secs
    );
    println!(
        "goal: `slipway status` p99 < {GOAL_STATUS_P99_MS} ms: {p99:.0} ms ({})",
        verdict(p99 < GOAL_STATUS_P99_MS)
    );
    drop(replicas);
    drop(pg);
}
