//! The agent's front (its proxy on an app's public address) against
//! connecting to the backend directly and against nginx:
//! `cargo bench -p slipway-agent --bench front`.
//!
//! A small HTTP/1.1 backend in this process (a thread per connection,
//! keep-alive, `200 ok`), real `slipway-agent front` processes in TCP mode
//! and in HTTP mode (`listen_mode = "http"`), and Debian's nginx as a
//! reverse proxy with keep-alive to the same backend, started here with a
//! config and prefix of its own on a loopback port (one worker process, as
//! the front has one thread), and nginx's TCP proxy (`stream`) as the
//! reference for TCP mode. Then:
//! - latency: N requests one after another, each on a new TCP connection:
//!   mean, p50, p99, max and failures, per path;
//! - `wrk --latency` from loopback, keep-alive connections: requests/s and
//!   p99 per path, compared with the goals (TCP mode within 10 % of direct,
//!   HTTP mode faster than nginx);
//! - memory: 10 fronts, each in front of a backend of its own, all under
//!   `wrk` at once: the sum of their resident memory during the load.
//!
//! TCP mode is measured twice: as it runs by default, with kernel
//! forwarding (the front's nftables table DNATs this machine's connections
//! to the backend, so wrk's requests never pass the front), and with
//! `kernel_forward = false` (the front copies every byte itself). Run as
//! root with `ip` and `nft` at hand, the bench runs itself again inside a
//! network namespace of its own (`ip netns exec`, loopback only) and
//! removes it afterwards: no rule touches the machine's namespace.
//! Otherwise it runs where it is, and says whether kernel forwarding could
//! be set up (if it could, the fronts' tables are in the current namespace
//! for the bench's duration and removed when each front stops).
//!
//! A missing `wrk` or `nginx` is said and its lines skipped: never a figure
//! made up. `SLIPWAY_BENCH_REQUESTS=N` sets N (default 5000),
//! `SLIPWAY_BENCH_SECONDS` the time of each `wrk` run (default 10),
//! `SLIPWAY_BENCH_CONNECTIONS` its connections (default 32).

// A benchmark that cannot set up should stop with the reason.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_slipway-agent");
const KEEP: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok";
const CLOSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nok";
/// Apps (fronts, each with a backend) of the memory figure.
const APPS: usize = 10;

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Set in the bench process started inside its network namespace.
const INSIDE: &str = "SLIPWAY_BENCH_NETNS";

/// Runs the bench again in a network namespace of its own, when it can:
/// `true` when that was done (its output is this run's).
fn in_netns() -> bool {
    if std::env::var_os(INSIDE).is_some() || !nix::unistd::geteuid().is_root() {
        return false;
    }
    let runs = |args: &[&str]| {
        Command::new(args[0])
            .args(&args[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !runs(&["nft", "-V"]) {
        return false;
    }
    let name = format!("slipway-bench-{}", std::process::id());
    if !runs(&["ip", "netns", "add", &name]) {
        return false;
    }
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _remove = Remove(name.clone());
    assert!(
        runs(&["ip", "netns", "exec", &name, "ip", "link", "set", "lo", "up"]),
        "cannot bring lo up in {name}"
    );
    println!("(in network namespace {name}, loopback only)");
    let status = Command::new("ip")
        .args(["netns", "exec", &name])
        .arg(std::env::current_exe().unwrap())
        .args(std::env::args_os().skip(1))
        .env(INSIDE, &name)
        .status()
        .unwrap();
    assert!(status.success(), "the bench failed in {name}: {status}");
    true
}

fn main() {
    if in_netns() {
        return;
    }
    let requests = env_or("SLIPWAY_BENCH_REQUESTS", 5000) as usize;
    let seconds = env_or("SLIPWAY_BENCH_SECONDS", 10);
    let conns = env_or("SLIPWAY_BENCH_CONNECTIONS", 32);
    let backend = backend();
    let tcp = Front::start(backend, "tcp");
    let tcp_user = Front::start_with(backend, "tcp", 1, false);
    let http = Front::start(backend, "http");
    // Both sides on two threads/workers too (the machine's cores).
    let tcp2 = Front::start_with(backend, "tcp", 2, false);
    let http2 = Front::start_with(backend, "http", 2, true);
    match tcp.kernel() {
        Some(t) => println!("front, TCP mode: kernel-forwarded (nftables table ip {t})"),
        None => println!(
            "front, TCP mode: NOT kernel-forwarded ({}); both TCP lines measure the userspace proxy",
            tcp.why_not()
        ),
    }
    let wrk = tool("wrk");
    let nginx = tool("nginx").map(|bin| Nginx::start(&bin, backend, 1));
    let nginx2 = tool("nginx").map(|bin| Nginx::start(&bin, backend, 2));
    let nginx_tcp = tool("nginx").and_then(|bin| Nginx::start_stream(&bin, backend));

    let mut paths: Vec<(&str, SocketAddr)> = vec![
        ("direct", backend),
        ("front, TCP mode", tcp.public),
        ("front, TCP userspace", tcp_user.public),
        ("front, HTTP mode", http.public),
    ];
    match &nginx {
        Ok(n) => paths.push(("nginx", n.public)),
        Err(why) => println!("nginx: skipped ({why})"),
    }
    match &nginx_tcp {
        Ok(n) => paths.push(("nginx, TCP (stream)", n.public)),
        Err(why) => println!("nginx as a TCP proxy: skipped ({why})"),
    }
    paths.push(("front TCP user, 2 thr", tcp2.public));
    paths.push(("front HTTP, 2 thr", http2.public));
    if let Ok(n) = &nginx2 {
        paths.push(("nginx, 2 workers", n.public));
    }

    println!("{requests} sequential requests, a new TCP connection each:");
    for (label, addr) in &paths {
        let l = latency(*addr, requests);
        println!(
            "  {label:<20} mean {:>7.1} µs  p50 {:>7.1} µs  p99 {:>7.1} µs  max {:>8.1} µs  failed {}",
            l.mean, l.p50, l.p99, l.max, l.failed
        );
    }

    let wrk = match wrk {
        Ok(w) => w,
        Err(why) => {
            println!("wrk: skipped ({why}); no throughput figures");
            return;
        }
    };
    println!("wrk -t2 -c{conns} -d{seconds}s --latency, keep-alive connections, GET /:");
    let mut figures = Vec::new();
    for (label, addr) in &paths {
        match run_wrk(&wrk, *addr, 2, conns, seconds) {
            Ok(f) => {
                println!(
                    "  {label:<20} {:>9.0} requests/s  p50 {:>8.1} µs  p99 {:>8.1} µs  errors {}",
                    f.rps, f.p50_us, f.p99_us, f.errors
                );
                figures.push((*label, f));
            }
            Err(e) => println!("  {label:<20} wrk failed: {e}"),
        }
    }
    let get = |l: &str| figures.iter().find(|(k, _)| *k == l).map(|(_, f)| f);
    println!("goals:");
    if let (Some(d), Some(t)) = (get("direct"), get("front, TCP mode")) {
        let ratio = t.rps / d.rps;
        println!(
            "  TCP mode within 10 % of direct: {:.1} % of direct's requests/s, p99 {:+.1} µs: {}",
            ratio * 100.0,
            t.p99_us - d.p99_us,
            if ratio >= 0.9 { "met" } else { "NOT met" }
        );
        if let Some(u) = get("front, TCP userspace") {
            println!(
                "    with kernel_forward = false (every byte through the front): {:.1} % of direct, p99 {:+.1} µs",
                u.rps / d.rps * 100.0,
                u.p99_us - d.p99_us
            );
        }
        if let Some(n) = get("nginx, TCP (stream)") {
            println!(
                "    the same hop through nginx's TCP proxy: {:.1} % of direct; the front {:+.1} % against it",
                n.rps / d.rps * 100.0,
                (t.rps / n.rps - 1.0) * 100.0
            );
        }
    }
    match (get("front, HTTP mode"), get("nginx")) {
        (Some(h), Some(n)) => println!(
            "  HTTP mode faster than nginx: {:.0} against {:.0} requests/s ({:+.1} %), p99 {:.1} against {:.1} µs: {}",
            h.rps,
            n.rps,
            (h.rps / n.rps - 1.0) * 100.0,
            h.p99_us,
            n.p99_us,
            if h.rps > n.rps { "met" } else { "NOT met" }
        ),
        _ => println!("  HTTP mode faster than nginx: not measured (nginx or a wrk run missing)"),
    }
    match (get("front HTTP, 2 thr"), get("nginx, 2 workers")) {
        (Some(h), Some(n)) => println!(
            "  the same with two threads/workers each: {:.0} against {:.0} requests/s ({:+.1} %), p99 {:.1} against {:.1} µs: {}",
            h.rps,
            n.rps,
            (h.rps / n.rps - 1.0) * 100.0,
            h.p99_us,
            n.p99_us,
            if h.rps > n.rps { "met" } else { "NOT met" }
        ),
        _ => println!("  the same with two threads/workers each: not measured"),
    }
    drop((tcp, tcp_user, http, tcp2, http2, nginx, nginx2, nginx_tcp));

    for mode in ["tcp", "http"] {
        memory(&wrk, mode, seconds.min(5));
    }
}

/// 10 fronts in `mode`, each before a backend of its own, all under wrk at
/// once: their summed resident memory, sampled in the middle of the load.
/// RSS counts the pages of the agent binary every front maps; PSS shares
/// them out, so the PSS sum is what the 10 fronts cost the machine.
fn memory(wrk: &Path, mode: &str, seconds: u64) {
    // Userspace: with kernel forwarding the fronts would see no traffic.
    let fronts: Vec<Front> = (0..APPS)
        .map(|_| Front::start_with(backend(), mode, 1, false))
        .collect();
    let idle: Vec<Mem> = fronts.iter().map(|f| Mem::of(f.child.id())).collect();
    let loads: Vec<Child> = fronts
        .iter()
        .map(|f| {
            Command::new(wrk)
                .args(["-t1", "-c4", &format!("-d{seconds}s")])
                .arg(format!("http://{}/", f.public))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    std::thread::sleep(Duration::from_millis(seconds * 500));
    let busy: Vec<Mem> = fronts.iter().map(|f| Mem::of(f.child.id())).collect();
    for mut l in loads {
        let _ = l.wait();
    }
    let mib = |v: &[Mem], f: fn(&Mem) -> u64| v.iter().map(f).sum::<u64>() as f64 / 1024.0;
    println!(
        "{APPS} fronts in {mode} mode (userspace) under load (wrk -t1 -c4 each, at once): RSS {:.1} MiB in all ({:.1}–{:.1} MiB each), PSS {:.1} MiB in all, private {:.1} MiB in all; idle: RSS {:.1}, PSS {:.1} MiB in all",
        mib(&busy, |m| m.rss),
        busy.iter().map(|m| m.rss).min().unwrap() as f64 / 1024.0,
        busy.iter().map(|m| m.rss).max().unwrap() as f64 / 1024.0,
        mib(&busy, |m| m.pss),
        mib(&busy, |m| m.private),
        mib(&idle, |m| m.rss),
        mib(&idle, |m| m.pss),
    );
}

/// A process's memory in KiB, from `/proc/PID/smaps_rollup`.
struct Mem {
    rss: u64,
    pss: u64,
    private: u64,
}

impl Mem {
    fn of(pid: u32) -> Self {
        let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        let kib = |key: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0)
        };
        Self {
            rss: kib("Rss:"),
            pss: kib("Pss:"),
            private: kib("Private_Clean:") + kib("Private_Dirty:"),
        }
    }
}

/// Where `name` is on PATH, or why not.
fn tool(name: &str) -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!("{name} is not installed: apt-get install -y --no-install-recommends {name}")
        })
}

/// A `slipway-agent front` process on a free loopback port.
struct Front {
    child: Child,
    public: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Front {
    /// In `mode`, with kernel forwarding (TCP mode's default).
    fn start(backend: SocketAddr, mode: &str) -> Self {
        Self::start_with(backend, mode, 1, true)
    }

    fn start_with(backend: SocketAddr, mode: &str, threads: usize, kernel: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join(".slipway/run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(
            run.join("front-target.json"),
            format!(
                r#"{{"backend":"{backend}","seq":1,"release":"bench","mode":"{mode}","kernel_forward":{kernel}}}"#
            ),
        )
        .unwrap();
        let public = free_addr();
        let child = Command::new(AGENT)
            .args(["front", "--root"])
            .arg(dir.path())
            .args(["--listen", &public.to_string()])
            .env("SLIPWAY_FRONT_THREADS", threads.to_string())
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(public, "the front");
        Self {
            child,
            public,
            _dir: dir,
        }
    }

    fn state(&self) -> serde_json::Value {
        let path = self._dir.path().join(".slipway/run/front.json");
        let t = Instant::now();
        loop {
            if let Some(s) = std::fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .filter(|s| s["seq"] == 1)
            {
                return s;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "no state in {}",
                path.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The front's nftables table, when the kernel forwards for it.
    fn kernel(&self) -> Option<String> {
        self.state()["kernel"]["table"].as_str().map(str::to_owned)
    }

    fn why_not(&self) -> String {
        self.state()["kernel"]["why_not"]
            .as_str()
            .unwrap_or("?")
            .to_owned()
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// Debian's nginx as a reverse proxy to `backend`, keep-alive upstream, in
/// a prefix of its own (nothing of the system's nginx is used or touched).
struct Nginx {
    child: Child,
    public: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// nginx as a TCP proxy (its `stream` module, a dynamic module on
    /// Debian: `libnginx-mod-stream`, looked for at
    /// `SLIPWAY_BENCH_NGINX_STREAM_MODULE` or Debian's path), the same hop
    /// as the front's TCP mode.
    fn start_stream(bin: &Path, backend: SocketAddr) -> Result<Self, String> {
        let module = std::env::var("SLIPWAY_BENCH_NGINX_STREAM_MODULE")
            .unwrap_or_else(|_| "/usr/lib/nginx/modules/ngx_stream_module.so".to_owned());
        if !Path::new(&module).exists() {
            return Err(format!(
                "{module} not found (Debian: libnginx-mod-stream; or set SLIPWAY_BENCH_NGINX_STREAM_MODULE)"
            ));
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let public = free_addr();
        let conf = format!(
            r#"load_module {module};
daemon off;
worker_processes 1;
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 4096; }}
stream {{
    server {{
        listen {public};
        proxy_pass {backend};
    }}
}}
"#,
            p = p.display()
        );
        Ok(Self::run(bin, dir, public, &conf))
    }

    fn start(bin: &Path, backend: SocketAddr, workers: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        let public = free_addr();
        let conf = format!(
            r#"daemon off;
worker_processes {workers};
pid {p}/nginx.pid;
error_log {p}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {p}/body;
    proxy_temp_path {p}/proxy;
    fastcgi_temp_path {p}/fastcgi;
    uwsgi_temp_path {p}/uwsgi;
    scgi_temp_path {p}/scgi;
    upstream backend {{
        server {backend};
        keepalive 64;
    }}
    server {{
        listen {public};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Request-Start "t=${{msec}}";
        }}
    }}
}}
"#,
            p = p.display()
        );
        Self::run(bin, dir, public, &conf)
    }

    fn run(bin: &Path, dir: tempfile::TempDir, public: SocketAddr, conf: &str) -> Self {
        let p = dir.path();
        std::fs::write(p.join("nginx.conf"), conf).unwrap();
        let child = Command::new(bin)
            .arg("-p")
            .arg(p)
            .arg("-e")
            .arg(p.join("error.log"))
            .arg("-c")
            .arg(p.join("nginx.conf"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        wait_for(public, "nginx");
        Self {
            child,
            public,
            _dir: dir,
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT: nginx's graceful stop.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGQUIT,
        );
        let _ = self.child.wait();
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn wait_for(addr: SocketAddr, what: &str) {
    let t = Instant::now();
    while TcpStream::connect(addr).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what} did not start on {addr}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Wrk {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Socket errors and non-2xx answers.
    errors: u64,
}

fn run_wrk(
    wrk: &Path,
    addr: SocketAddr,
    threads: u64,
    conns: u64,
    secs: u64,
) -> Result<Wrk, String> {
    let out = Command::new(wrk)
        .args([
            format!("-t{threads}"),
            format!("-c{conns}"),
            format!("-d{secs}s"),
            "--latency".into(),
            format!("http://{addr}/"),
        ])
        .output()
        .map_err(|e| format!("cannot run wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "wrk exited with {}: {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let field = |prefix: &str| {
        text.lines()
            .map(str::trim)
            .find_map(|l| l.strip_prefix(prefix))
            .map(str::trim)
            .ok_or_else(|| format!("no {prefix:?} in wrk's output: {text}"))
    };
    let rps: f64 = field("Requests/sec:")?
        .parse()
        .map_err(|e| format!("requests/s: {e}"))?;
    let p50_us = duration_us(field("50%")?)?;
    let p99_us = duration_us(field("99%")?)?;
    let mut errors = 0;
    if let Ok(s) = field("Socket errors:") {
        errors += s
            .split(',')
            .filter_map(|kv| kv.split_whitespace().last()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    if let Ok(n) = field("Non-2xx or 3xx responses:") {
        errors += n.parse::<u64>().unwrap_or(0);
    }
    Ok(Wrk {
        rps,
        p50_us,
        p99_us,
        errors,
    })
}

/// wrk's `123.45us`, `1.23ms`, `1.02s` in µs.
fn duration_us(text: &str) -> Result<f64, String> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| format!("{text:?} has no unit"))?;
    let (n, unit) = text.split_at(split);
    let n: f64 = n.parse().map_err(|e| format!("{text:?}: {e}"))?;
    Ok(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        "m" => n * 60e6,
        _ => return Err(format!("{text:?}: unknown unit")),
    })
}

/// A loopback HTTP/1.1 server answering every request `200 ok`, keeping
/// the connection unless the request says `Connection: close`.
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
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; 8192];
    let mut got: Vec<u8> = Vec::new();
    loop {
        // Every whole request head in the buffer gets its answer (GETs:
        // no bodies); pipelined ones too.
        while let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            got.drain(..end + 4);
            let close = head.contains("connection: close");
            if s.write_all(if close { CLOSE } else { KEEP }).is_err() || close {
                return;
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
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
    if out.starts_with(b"HTTP/1.1 200") && out.ends_with(b"ok") {
        Ok(())
    } else {
        Err(std::io::Error::other("short answer"))
    }
}
