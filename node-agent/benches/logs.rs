//! Log benchmarks: `cargo bench -p slipway-agent --bench logs`.
//!
//! - Rotation + compression of a 1 GiB log against `gzip` of the same file
//!   (same run, same level 6).
//! - The agent's CPU while watching 100 idle log files for 5 minutes.
//!
//! `SLIPWAY_BENCH_QUICK=1` uses 128 MiB and 20 seconds.

// A benchmark that cannot set up should stop with the reason.
#![allow(clippy::unwrap_used, missing_docs)]

use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use slipway_agent::config::{AppConfig, Compress};
use slipway_agent::logs;

fn main() {
    let quick = std::env::var_os("SLIPWAY_BENCH_QUICK").is_some();
    let work = tempfile::tempdir_in(
        std::env::var_os("SLIPWAY_BENCH_DIR").unwrap_or_else(|| std::env::temp_dir().into()),
    )
    .unwrap();
    let size: u64 = if quick { 128 << 20 } else { 1 << 30 };
    let watch = if quick {
        Duration::from_secs(20)
    } else {
        Duration::from_secs(300)
    };
    rotation(work.path(), size);
    idle_cpu(work.path(), watch);
}

/// Log-like lines: timestamps, levels, request paths, ids.
fn write_log(path: &Path, size: u64) {
    let mut w = BufWriter::with_capacity(1 << 20, fs::File::create(path).unwrap());
    let (mut written, mut i) = (0u64, 0u64);
    let levels = ["INFO", "WARN", "DEBUG", "ERROR"];
    let paths = [
        "/api/health",
        "/api/users",
        "/api/orders/42",
        "/static/app.js",
        "/login",
    ];
    while written < size {
        let line = format!(
            "2026-11-25T12:{:02}:{:02}.{:03}Z {} request id={:016x} path={} status={} ms={}\n",
            (i / 60_000) % 60,
            (i / 1000) % 60,
            i % 1000,
            levels[(i % 7 % 4) as usize],
            i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            paths[(i % 5) as usize],
            if i % 13 == 0 { 500 } else { 200 },
            i % 250
        );
        w.write_all(line.as_bytes()).unwrap();
        written += line.len() as u64;
        i += 1;
    }
    w.flush().unwrap();
}

fn rotation(work: &Path, size: u64) {
    let dir = work.join("rot");
    fs::create_dir_all(dir.join("shared/logs")).unwrap();
    let live = dir.join("shared/logs/app.log");
    write_log(&live, size);
    let mib = size as f64 / 1048576.0;
    println!("rotation: {mib:.0} MiB log");

    // Baseline: gzip -6 of the same file, to a file, same disk.
    let copy = dir.join("baseline.log");
    fs::copy(&live, &copy).unwrap();
    let t = Instant::now();
    let out = fs::File::create(dir.join("baseline.log.gz")).unwrap();
    let st = Command::new("gzip")
        .args(["-6", "-c"])
        .arg(&copy)
        .stdout(out)
        .status()
        .unwrap();
    let gzip = t.elapsed();
    assert!(st.success());
    let gz_size = fs::metadata(dir.join("baseline.log.gz")).unwrap().len();

    // Slipway: the whole rotation of the live file (rename/copy + compress +
    // retention), through the same code the agent runs.
    let mut app = AppConfig::with_defaults("bench", dir.clone());
    app.logs.compress = Compress::Gzip;
    app.logs.max_size = Some(1);
    let t = Instant::now();
    let (done, errors) = logs::rotate_app(&app, true);
    let ours = t.elapsed();
    assert!(errors.is_empty(), "{errors:?}");
    let ours_size = fs::metadata(&done[0].rotated_to).unwrap().len();

    // zstd for comparison.
    fs::write(&live, b"").unwrap();
    fs::rename(&copy, &live).unwrap();
    app.logs.compress = Compress::Zstd;
    let t = Instant::now();
    let (done_z, _) = logs::rotate_app(&app, true);
    let zstd = t.elapsed();
    let z_size = fs::metadata(&done_z[0].rotated_to).unwrap().len();

    let speed = |d: Duration| mib / d.as_secs_f64();
    println!(
        "  gzip -6:            {:>7.2} s  {:>6.0} MiB/s  -> {:.1} MiB",
        gzip.as_secs_f64(),
        speed(gzip),
        gz_size as f64 / 1048576.0
    );
    println!(
        "  slipway gzip:       {:>7.2} s  {:>6.0} MiB/s  -> {:.1} MiB  ({:.2}x gzip's speed)",
        ours.as_secs_f64(),
        speed(ours),
        ours_size as f64 / 1048576.0,
        gzip.as_secs_f64() / ours.as_secs_f64()
    );
    println!(
        "  slipway zstd:       {:>7.2} s  {:>6.0} MiB/s  -> {:.1} MiB  ({:.2}x gzip's speed)",
        zstd.as_secs_f64(),
        speed(zstd),
        z_size as f64 / 1048576.0,
        gzip.as_secs_f64() / zstd.as_secs_f64()
    );
    fs::remove_dir_all(&dir).unwrap();
}

/// CPU seconds (user + system) of `pid` so far, from /proc.
fn cpu_secs(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the `(comm)`: utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn idle_cpu(work: &Path, window: Duration) {
    let dir = work.join("idle");
    let logs = dir.join("app/shared/logs");
    fs::create_dir_all(&logs).unwrap();
    for i in 0..100 {
        fs::write(logs.join(format!("svc{i:03}.log")), "started\n").unwrap();
    }
    let config = dir.join("agent.toml");
    fs::write(
        &config,
        format!("[apps.idle]\nroot = \"{}\"\n", dir.join("app").display()),
    )
    .unwrap();
    let mut agent = Command::new(env!("CARGO_BIN_EXE_slipway-agent"))
        .arg("--config")
        .arg(&config)
        .arg("run")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Let it start, then measure only the steady state.
    std::thread::sleep(Duration::from_secs(2));
    let pid = agent.id();
    let rss_kib = |pid: u32| -> u64 {
        fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let before = cpu_secs(pid);
    let t = Instant::now();
    std::thread::sleep(window);
    let used = cpu_secs(pid) - before;
    let elapsed = t.elapsed().as_secs_f64();
    let rss = rss_kib(pid);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = agent.wait();
    println!(
        "idle watch: 100 log files for {elapsed:.0} s: agent used {used:.2} CPU s = {:.3}% of one core, RSS {:.1} MiB",
        used / elapsed * 100.0,
        rss as f64 / 1024.0
    );
    fs::remove_dir_all(&dir).unwrap();
}
