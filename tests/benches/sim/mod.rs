//! What the fleet benchmarks share: simulated agents (each enrolled with
//! its own identity and holding its own mTLS gRPC session from the bench
//! process: real handshakes, real heartbeats) and `wrk` from loopback.

// Each bench uses part of it.
#![allow(dead_code, unreachable_pub)]

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use slipway_agent::link::{self, Session};
use slipway_proto::v1::{
    agent_message, controller_message, AgentMessage, CommandResult, ControllerMessage, Heartbeat,
    Hello, Outcome,
};

/// Enrolls `n` agents named `name(i)` with the controller listening at
/// `url` (its data dir `data`: join tokens are made in its store), their
/// state dirs under `states`, and opens a session for each.
pub async fn connect_agents(
    url: &str,
    data: &Path,
    states: &Path,
    n: usize,
    name: impl Fn(usize) -> String,
) -> Vec<Session> {
    let store = slipway_controller::store::Store::open(data).await.unwrap();
    let ca = slipway_controller::pki::ca::Ca::load_or_create(data)
        .unwrap()
        .fingerprint();
    let mut sessions = Vec::with_capacity(n);
    for i in 0..n {
        sessions.push(enroll_and_connect(url, &store, &ca, states, &name(i), &[]).await);
    }
    sessions
}

/// Enrolls one agent named `name` (with `tags`) with the controller at
/// `url`, whose store is `store` and CA's fingerprint `ca`, its state dir
/// under `states`, and opens its session. Each step is tried up to
/// [`ATTEMPTS`] times, a second apart (thousands enrolling at once can
/// outwait a connection pool); the last error stops the bench.
pub async fn enroll_and_connect(
    url: &str,
    store: &slipway_controller::store::Store,
    ca: &str,
    states: &Path,
    name: &str,
    tags: &[String],
) -> Session {
    let state = states.join(name);
    let token = retry(name, || async {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        slipway_controller::auth::token::create(
            store,
            ca,
            slipway_controller::auth::token::DEFAULT_TTL,
            tags,
            now,
        )
        .await
        .map(|t| t.to_string())
    })
    .await;
    retry(name, || link::enroll(url, &token, &state, name, false)).await;
    retry(name, || link::connect(url, &state, Hello::default())).await
}

/// Tries of each step of [`enroll_and_connect`].
const ATTEMPTS: u32 = 5;

/// `step()` until it succeeds, at most [`ATTEMPTS`] times a second apart.
async fn retry<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    name: &str,
    mut step: impl FnMut() -> F,
) -> T {
    let mut attempt = 1;
    loop {
        match step().await {
            Ok(value) => return value,
            Err(err) if attempt < ATTEMPTS => {
                eprintln!("{name}: attempt {attempt} failed: {err}");
                attempt += 1;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(err) => panic!("{name}: {ATTEMPTS} attempts failed, the last: {err}"),
        }
    }
}

/// The heartbeat interval the controller announced.
pub fn interval(sessions: &[Session]) -> Duration {
    Duration::from_secs(u64::from(
        sessions[0].welcome.heartbeat_interval_secs.max(1),
    ))
}

/// Sends `beat()` on `session` every `interval` (as a real agent does)
/// until `end` or until `go_on` says stop, answering every Deploy command
/// at once with a success (an instantly-acking agent: nothing is fetched
/// or started); returns how many heartbeats were sent.
pub async fn heartbeat(
    session: Session,
    interval: Duration,
    end: Instant,
    go_on: impl Fn() -> bool,
    beat: impl Fn() -> Heartbeat,
) -> u64 {
    let mut inbound = session.inbound;
    let mut sent = 0;
    let mut next = Instant::now();
    while go_on() && Instant::now() < end {
        if Instant::now() >= next {
            let message = AgentMessage {
                kind: Some(agent_message::Kind::Heartbeat(beat())),
            };
            if session.outbound.send(message).await.is_err() {
                break;
            }
            sent += 1;
            next += interval;
        }
        let wake = tokio::time::Instant::from_std(next.min(end));
        tokio::select! {
            () = tokio::time::sleep_until(wake) => {}
            message = inbound.message() => match message {
                Ok(Some(ControllerMessage {
                    kind: Some(controller_message::Kind::Deploy(deploy)),
                })) => {
                    let result = AgentMessage {
                        kind: Some(agent_message::Kind::Result(CommandResult {
                            command_id: deploy.command_id,
                            outcome: Outcome::Succeeded as i32,
                            release_id: deploy.release_id,
                            message: "simulated agent: deployed".into(),
                        })),
                    };
                    if session.outbound.send(result).await.is_err() {
                        break;
                    }
                }
                Ok(Some(_)) => {}
                _ => break,
            },
        }
    }
    sent
}

/// What `wrk --latency` measured.
#[derive(Debug, Clone, Copy)]
pub struct Wrk {
    /// Median latency, ms.
    pub p50: f64,
    /// 99th percentile, ms.
    pub p99: f64,
    /// Requests per second.
    pub rps: f64,
}

/// Runs `wrk --latency` (2 threads, `connections` keep-alive connections,
/// `seconds` long) on `url` with an API token.
pub fn wrk(url: &str, token: &str, connections: u32, seconds: u32) -> Wrk {
    let out = Command::new("wrk")
        .args(["--latency", "-t", "2"])
        .args(["-c", &connections.to_string()])
        .args(["-d", &format!("{seconds}s")])
        .args(["--timeout", "10s"])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(url)
        .output()
        .unwrap_or_else(|e| panic!("wrk is not installed ({e}): apt-get install wrk"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk failed: {text}");
    assert!(!text.contains("Non-2xx"), "wrk got error answers:\n{text}");
    let percentile = |p: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(p).map(str::trim))
            .map(millis)
            .unwrap_or_else(|| panic!("no {p} line in:\n{text}"))
    };
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Requests/sec in:\n{text}"));
    Wrk {
        p50: percentile("50%"),
        p99: percentile("99%"),
        rps,
    }
}

/// wrk's "1.23ms" / "456.00us" / "1.02s" in milliseconds.
fn millis(text: &str) -> f64 {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        (text, 1.0)
    };
    number.parse::<f64>().unwrap() * factor
}
