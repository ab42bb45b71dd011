//! The agent's front (its TCP proxy on an app's public address) against
//! connecting to the backend directly: `cargo bench -p slipway-agent --bench front`.
//!
//! A small HTTP backend in this process (a thread per connection, `200 ok`,
//! `Connection: close`) and a real `slipway-agent front` process forwarding
//! a loopback address to it. For each path (direct, through the front):
//! - latency: N requests one after another, each on a new TCP connection
//!   (connect, request, read to EOF): mean, p50, p99, max, and failures;
//! - throughput: the tests' bounded load loop (4 threads of new
//!   connections, at most `SLIPWAY_BENCH_SECONDS` s): requests answered and
//!   failed.
//!
//! Then the front's resident memory. `SLIPWAY_BENCH_REQUESTS=N` sets N
//! (default 5000), `SLIPWAY_BENCH_SECONDS` the load time (default 5).

// A benchmark that cannot set up should stop with the reason.
#![allow(clippy::unwrap_used, missing_docs)]

#[path = "../tests/it/support/load.rs"]
mod load;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_slipway-agent");
const ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let requests = env_or("SLIPWAY_BENCH_REQUESTS", 5000) as usize;
    let seconds = env_or("SLIPWAY_BENCH_SECONDS", 5);
    let backend = backend();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join(".slipway/run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(
        run.join("front-target.json"),
        format!(r#"{{"backend":"{backend}","seq":1,"release":"bench"}}"#),
    )
    .unwrap();
    let public = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut front = Command::new(AGENT)
        .args(["front", "--root"])
        .arg(dir.path())
        .args(["--listen", &public.to_string()])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while TcpStream::connect(public).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the front did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    println!("{requests} sequential requests, a new TCP connection each:");
    let direct = latency(backend, requests);
    let fronted = latency(public, requests);
    for (label, l) in [("direct", &direct), ("through the front", &fronted)] {
        println!(
            "  {label:<18} mean {:>7.1} µs  p50 {:>7.1} µs  p99 {:>7.1} µs  max {:>8.1} µs  failed {}",
            l.mean, l.p50, l.p99, l.max, l.failed
        );
    }
    println!(
        "  added by the front: mean {:+.1} µs, p50 {:+.1} µs, p99 {:+.1} µs",
        fronted.mean - direct.mean,
        fronted.p50 - direct.p50,
        fronted.p99 - direct.p99
    );

    println!("load loop, 4 threads of new connections, {seconds} s each:");
    for (label, addr) in [("direct", backend), ("through the front", public)] {
        let l = load::Load::start(
            addr.port(),
            "/",
            4,
            0,
            Duration::from_secs(seconds),
            1_000_000,
        );
        std::thread::sleep(Duration::from_secs(seconds));
        let r = l.stop();
        println!(
            "  {label:<18} {:>8.0} requests/s, {} failed",
            r.ok as f64 / seconds as f64,
            r.failures()
        );
    }
    let rss = std::fs::read_to_string(format!("/proc/{}/status", front.id()))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .map(|l| l.trim_start_matches("VmRSS:").trim().to_owned())
        .unwrap_or_else(|| "?".into());
    println!("front resident memory after the load: {rss}");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(front.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = front.wait();
}

/// A loopback HTTP server answering every request `200 ok` and closing.
fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || serve(s));
        }
    });
    addr
}

fn serve(mut s: TcpStream) {
    let mut buf = [0u8; 2048];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let _ = s.write_all(ANSWER);
}

struct Latency {
    mean: f64,
    p50: f64,
    p99: f64,
    max: f64,
    failed: usize,
}

fn latency(addr: SocketAddr, n: usize) -> Latency {
    let mut us = Vec::with_capacity(n);
    let mut failed = 0;
    for _ in 0..n {
        let t = Instant::now();
        match one(addr) {
            Ok(()) => us.push(t.elapsed().as_secs_f64() * 1e6),
            Err(_) => failed += 1,
        }
    }
    us.sort_by(f64::total_cmp);
    let at = |q: f64| {
        us.get(((us.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Latency {
        mean: us.iter().sum::<f64>() / us.len().max(1) as f64,
        p50: at(0.5),
        p99: at(0.99),
        max: us.last().copied().unwrap_or(0.0),
        failed,
    }
}

fn one(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_nodelay(true)?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    if out.ends_with(b"ok") {
        Ok(())
    } else {
        Err(std::io::Error::other("short answer"))
    }
}
