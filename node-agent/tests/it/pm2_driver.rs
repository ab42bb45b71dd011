//! The PM2 driver against a real PM2 (run `scripts/setup-pm2.sh` first).
//!
//! Each test builds an app root by hand (`releases/<id>`, `shared/.env`,
//! `current`), runs its own PM2 daemon in its own PM2_HOME and kills that
//! daemon when it ends, pass or fail. The app is a small Node HTTP server on a
//! port picked per test; it answers `200 <release> <pid>`.
// Test helpers panic on a failed setup step, which is what unwrap does.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use slipway_agent::config::{AppConfig, Pm2Config};
use slipway_agent::driver::pm2::Pm2;
use slipway_agent::driver::{Driver, Target};
use slipway_agent::release::{activate, ReleaseId};

use crate::support::free_port;

const SERVER_JS: &str = include_str!("../fixtures/pm2-app/server.js");
const ECOSYSTEM_JS: &str = include_str!("../fixtures/pm2-app/ecosystem.config.js");
const CRASH_JS: &str = include_str!("../fixtures/pm2-app/crash.js");

const FORK_NOTE: &str = "fork mode: pm2 reload is a restart, not zero-downtime";
/// How long the app may take to answer (or stop answering) after a driver call.
const HTTP_SETTLE: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// `pm2 kill` at the end of a test.
const KILL_TIMEOUT: Duration = Duration::from_secs(20);

/// The tests run one at a time: each starts a PM2 daemon and node workers,
/// and the zero-downtime test must not compete with another test's reload
/// for this machine's two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A PM2_HOME of its own; dropping it kills that daemon and its apps.
struct Pm2Home {
    dir: tempfile::TempDir,
}

impl Pm2Home {
    fn new() -> Self {
        Self {
            dir: tempfile::Builder::new()
                .prefix("pm2home")
                .tempdir()
                .unwrap(),
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Pm2Home {
    fn drop(&mut self) {
        let home = self.dir.path();
        if home.join("pm2.pid").exists() {
            let child = Command::new("pm2")
                .arg("kill")
                .env("PM2_HOME", home)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            if let Ok(mut child) = child {
                let deadline = Instant::now() + KILL_TIMEOUT;
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    thread::sleep(Duration::from_millis(50));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // `pm2 kill` removes the pid file; if it is still there the daemon
        // hung: SIGKILL it (its cluster workers exit when it goes).
        if let Some(pid) = fs::read_to_string(home.join("pm2.pid"))
            .ok()
            .and_then(|t| t.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// One app root with its port, `.env` secret and PM2 daemon.
struct Fixture {
    // Declared first so it drops first: the daemon dies before the app root
    // it runs from is deleted.
    pm2_home: Pm2Home,
    _dir: tempfile::TempDir,
    root: PathBuf,
    port: u16,
    /// Only ever compared against output: it must never show up there.
    secret: String,
    app: AppConfig,
}

impl Fixture {
    fn new() -> Self {
        let pm2_home = Pm2Home::new();
        let dir = tempfile::Builder::new().prefix("pm2app").tempdir().unwrap();
        let root = dir.path().join("app");
        fs::create_dir_all(root.join("shared")).unwrap();
        fs::create_dir_all(root.join("releases")).unwrap();
        let port = free_port();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let secret = format!("s3cr3t-{}-{nanos}", std::process::id());
        fs::write(
            root.join("shared/.env"),
            format!("PORT={port}\nAPP_SECRET={secret}\n"),
        )
        .unwrap();
        let app = AppConfig::with_defaults("web", root.clone());
        Self {
            pm2_home,
            _dir: dir,
            root,
            port,
            secret,
            app,
        }
    }

    fn config(&self, cluster: bool, instances: u32) -> Pm2Config {
        Pm2Config {
            name: "web".into(),
            ecosystem: None,
            script: None,
            instances,
            cluster,
            pm2_home: Some(self.pm2_home.path().to_owned()),
            pm2_bin: PathBuf::from("pm2"),
            user: None,
            ports: None,
        }
    }

    /// Writes `releases/<id>` with the server (answering `<id> <pid>`) and
    /// the ecosystem file.
    fn release(&self, id: &str) {
        let dir = self.root.join("releases").join(id);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("server.js"), SERVER_JS.replace("__RELEASE__", id)).unwrap();
        fs::write(dir.join("ecosystem.config.js"), ECOSYSTEM_JS).unwrap();
    }

    /// Points `current` at `id` and returns the driver's target for it.
    fn switch(&self, id: &str) -> Target {
        let id = ReleaseId::new(id).unwrap();
        activate::switch(&self.root, &id).unwrap();
        Target::new(&self.app, &id).unwrap()
    }

    fn get(&self, path: &str) -> io::Result<Response> {
        http_get(self.port, path)
    }

    /// Waits until `/` answers from release `id`; returns that response.
    #[track_caller]
    fn wait_for_release(&self, id: &str) -> Response {
        let deadline = Instant::now() + HTTP_SETTLE;
        loop {
            let last = self.get("/");
            if let Ok(r) = &last {
                if r.status == 200 && r.release() == id {
                    return r.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "release {id} never answered on port {}; last: {last:?}",
                self.port
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Processes in PM2's dump (what `pm2 resurrect` starts at boot).
fn dump_len(fx: &Fixture) -> usize {
    let dump = fs::read(fx.pm2_home.path().join("dump.pm2")).unwrap();
    // Count only: the dump holds every process's environment.
    serde_json::from_slice::<Vec<serde::de::IgnoredAny>>(&dump)
        .unwrap()
        .len()
}

#[derive(Debug, Clone)]
struct Response {
    status: u16,
    /// Header lines, lowercased names.
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The release in `<release> <pid>`.
    fn release(&self) -> &str {
        self.body.split(' ').next().unwrap_or("")
    }

    fn pid(&self) -> u32 {
        self.body.split(' ').nth(1).unwrap().trim().parse().unwrap()
    }
}

/// `GET path` on a new connection with short timeouts (no keep-alive).
fn http_get(port: u16, path: &str) -> io::Result<Response> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {text:?}"));
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("no header end"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("no status line"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: body.to_owned(),
    })
}

#[test]
fn cluster_start_then_reload_follows_current() {
    let _serial = serial();
    let fx = Fixture::new();
    let pm2 = Pm2::new(fx.config(true, 2));

    fx.release("v1");
    let t1 = fx.switch("v1");
    let a1 = pm2.activate(&t1).unwrap();
    assert_eq!(a1.detail, "pm2 start web (cluster, 2 instances)");
    assert_eq!((a1.port, a1.handle.as_deref()), (None, None));
    let r = fx.wait_for_release("v1");
    assert_eq!(r.header("x-slipway-release"), Some("v1"));
    assert_eq!(r.header("x-from-ecosystem"), Some("yes"));
    assert_eq!(r.header("x-secret-set"), Some("yes"));
    let health = fx.get("/api/health").unwrap();
    assert_eq!((health.status, health.release()), (200, "v1"));

    // The process file runs from the `current` link, is private, and took
    // the ecosystem's __dirname script back under `current`.
    let file = fx.root.join(".slipway/run/pm2-web.json");
    let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", file.display());
    let doc: serde_json::Value = serde_json::from_slice(&fs::read(&file).unwrap()).unwrap();
    let app = &doc["apps"][0];
    assert_eq!(app["cwd"], fx.root.join("current").to_str().unwrap());
    assert_eq!(app["script"], "server.js");
    assert_eq!(app["exec_mode"], "cluster");
    assert_eq!(app["instances"], 2);

    fx.release("v2");
    let t2 = fx.switch("v2");
    let a2 = pm2.activate(&t2).unwrap();
    assert_eq!(a2.detail, "pm2 reload web (cluster, 2 instances)");
    let r = fx.wait_for_release("v2");
    assert_eq!(r.header("x-slipway-release"), Some("v2"));
    // Every answer now comes from v2, spread over both workers.
    let mut http_pids = BTreeSet::new();
    for _ in 0..10 {
        let r = fx.get("/").unwrap();
        assert_eq!((r.status, r.release()), (200, "v2"), "{r:?}");
        http_pids.insert(r.pid());
    }
    pm2.commit(&t2, &a2).unwrap();
    assert_eq!(dump_len(&fx), 2, "commit saves PM2's dump");

    let status = pm2.status(&fx.app).unwrap();
    assert_eq!(status.driver, "pm2");
    assert_eq!(status.processes.len(), 2, "{status:#?}");
    let mut status_pids = BTreeSet::new();
    for p in &status.processes {
        assert_eq!(p.status, "online", "{p:?}");
        assert!(p.name.starts_with("web#"), "{p:?}");
        assert!(p.memory_bytes.is_some_and(|m| m > 0), "{p:?}");
        assert!(p.cpu_percent.is_some(), "{p:?}");
        assert!(p.uptime_secs.is_some(), "{p:?}");
        assert_eq!(p.release.as_deref(), Some("v2"), "{p:?}");
        status_pids.insert(p.pid.unwrap());
    }
    assert_eq!(status_pids, http_pids, "status pids are the serving pids");
    assert!(!status.notes.iter().any(|n| n == FORK_NOTE), "{status:?}");
    let json = serde_json::to_string(&status).unwrap();
    assert!(
        !json.contains(&fx.secret),
        "status shows an env value: {json}"
    );
    assert!(
        !json.contains("APP_SECRET"),
        "status shows env names: {json}"
    );
}

#[test]
fn cluster_reload_has_zero_downtime() {
    /// Bounds of the load loop: whichever comes first ends it.
    const MAX_REQUESTS: usize = 2000;
    const MAX_TIME: Duration = Duration::from_secs(30);
    /// Successful requests still made once the reload has returned.
    const AFTER_RELOAD: usize = 50;
    /// Successful requests before the reload starts, so the old release
    /// is surely seen.
    const BEFORE_RELOAD: usize = 20;

    let _serial = serial();
    let fx = Fixture::new();
    let pm2 = Pm2::new(fx.config(true, 2));
    fx.release("v2");
    pm2.activate(&fx.switch("v2")).unwrap();
    fx.wait_for_release("v2");

    let reloaded = Arc::new(AtomicBool::new(false));
    let ok_count = Arc::new(AtomicUsize::new(0));
    let port = fx.port;
    let load = {
        let reloaded = Arc::clone(&reloaded);
        let ok_count = Arc::clone(&ok_count);
        thread::spawn(move || {
            let start = Instant::now();
            let mut seen = Vec::new();
            let mut failures = Vec::new();
            let mut after = 0;
            for i in 0..MAX_REQUESTS {
                if start.elapsed() > MAX_TIME {
                    break;
                }
                let done = reloaded.load(Ordering::SeqCst);
                match http_get(port, "/api/health") {
                    Ok(r) if r.status == 200 => {
                        seen.push(r.release().to_owned());
                        ok_count.fetch_add(1, Ordering::SeqCst);
                        if done {
                            after += 1;
                            if after >= AFTER_RELOAD {
                                break;
                            }
                        }
                    }
                    Ok(r) => failures.push(format!("request {i}: status {}", r.status)),
                    Err(e) => failures.push(format!("request {i}: {e}")),
                }
                thread::sleep(Duration::from_millis(5));
            }
            (seen, failures, after)
        })
    };

    let deadline = Instant::now() + HTTP_SETTLE;
    while ok_count.load(Ordering::SeqCst) < BEFORE_RELOAD && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    fx.release("v3");
    let result = pm2.activate(&fx.switch("v3"));
    reloaded.store(true, Ordering::SeqCst);
    let (seen, failures, after) = load.join().unwrap();
    let activation = result.unwrap();
    let count = |v: &str| seen.iter().filter(|s| *s == v).count();
    eprintln!(
        "zero-downtime: {} requests ok ({} v2, {} v3), {} failed",
        seen.len(),
        count("v2"),
        count("v3"),
        failures.len()
    );

    assert_eq!(activation.detail, "pm2 reload web (cluster, 2 instances)");
    assert!(
        failures.is_empty(),
        "failed requests during the reload: {failures:#?}"
    );
    let versions: BTreeSet<&str> = seen.iter().map(String::as_str).collect();
    assert_eq!(
        versions,
        BTreeSet::from(["v2", "v3"]),
        "{} requests",
        seen.len()
    );
    assert_eq!(after, AFTER_RELOAD, "the load loop hit its bound first");
    assert_eq!(seen.last().map(String::as_str), Some("v3"));
}

#[test]
fn fork_mode_restarts_and_restore_brings_previous_back() {
    let _serial = serial();
    let fx = Fixture::new();
    // `script` instead of the ecosystem file: the other way to name the app.
    let pm2 = Pm2::new(Pm2Config {
        script: Some(PathBuf::from("server.js")),
        ..fx.config(false, 1)
    });

    fx.release("v1");
    let t1 = fx.switch("v1");
    let a1 = pm2.activate(&t1).unwrap();
    assert_eq!(a1.detail, "pm2 start web (fork, 1 instance)");
    let r = fx.wait_for_release("v1");
    // No ecosystem file was read.
    assert_eq!(r.header("x-from-ecosystem"), Some(""));

    fx.release("v2");
    let t2 = fx.switch("v2");
    let a2 = pm2.activate(&t2).unwrap();
    assert_eq!(
        a2.detail,
        "pm2 reload web (fork, 1 instance); fork mode: a restart, not zero-downtime"
    );
    fx.wait_for_release("v2");

    let status = pm2.status(&fx.app).unwrap();
    assert!(status.notes.iter().any(|n| n == FORK_NOTE), "{status:?}");
    assert_eq!(status.processes.len(), 1, "{status:#?}");
    assert_eq!(status.processes[0].release.as_deref(), Some("v2"));

    // The health gate failed: the deploy points `current` back, then
    // restores.
    let back = fx.switch("v1");
    let restored = pm2.restore(&back, &a2).unwrap();
    assert!(
        restored.detail.starts_with("pm2 reload web (fork"),
        "{restored:?}"
    );
    let r = fx.wait_for_release("v1");
    assert_eq!(r.header("x-slipway-release"), Some("v1"));
    let status = pm2.status(&fx.app).unwrap();
    assert_eq!(status.processes.len(), 1, "{status:#?}");
    assert_eq!(status.processes[0].release.as_deref(), Some("v1"));
    assert_eq!(status.processes[0].status, "online");
}

#[test]
fn stop_removes_the_app_and_missing_pm2_is_named() {
    let _serial = serial();
    let fx = Fixture::new();
    // instances 0 is PM2's "max": one per core.
    let pm2 = Pm2::new(fx.config(true, 0));
    fx.release("v1");
    let t1 = fx.switch("v1");
    let a1 = pm2.activate(&t1).unwrap();
    assert!(a1.detail.starts_with("pm2 start web (cluster, "), "{a1:?}");
    fx.wait_for_release("v1");
    assert!(!pm2.status(&fx.app).unwrap().processes.is_empty());

    pm2.stop(&fx.app).unwrap();
    let status = pm2.status(&fx.app).unwrap();
    assert!(status.processes.is_empty(), "{status:#?}");
    let deadline = Instant::now() + HTTP_SETTLE;
    while fx.get("/").is_ok() {
        assert!(
            Instant::now() < deadline,
            "the app still answers after stop"
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        !fx.root.join(".slipway/run/pm2-web.json").exists(),
        "the process file (with .env values) is left behind"
    );
    assert_eq!(dump_len(&fx), 0, "a reboot would resurrect the stopped app");
    // Stopping what is not running is fine.
    pm2.stop(&fx.app).unwrap();

    let missing = Pm2::new(Pm2Config {
        pm2_bin: PathBuf::from("/nonexistent/pm2"),
        ..fx.config(true, 1)
    });
    let want = "pm2 not found (looked for /nonexistent/pm2); install it with `npm install -g pm2`";
    let err = missing.activate(&t1).unwrap_err().to_string();
    assert!(err.contains(want), "{err}");
    let err = missing.status(&fx.app).unwrap_err().to_string();
    assert!(err.contains(want), "{err}");
    let err = missing.stop(&fx.app).unwrap_err().to_string();
    assert!(err.contains(want), "{err}");
}

#[test]
fn a_release_that_crashes_fails_with_pm2_status_and_restore_recovers() {
    let _serial = serial();
    let fx = Fixture::new();
    let pm2 = Pm2::new(fx.config(true, 2));
    fx.release("v1");
    let t1 = fx.switch("v1");
    pm2.activate(&t1).unwrap();
    fx.wait_for_release("v1");

    // A script that is not there fails before PM2 is asked: a reload would
    // not notice and keep the old processes.
    let missing = Pm2::new(Pm2Config {
        script: Some(PathBuf::from("missing.js")),
        ..fx.config(true, 2)
    });
    let err = missing.activate(&t1).unwrap_err().to_string();
    assert!(
        err.contains(r#"script "missing.js" is neither in release"#),
        "{err}"
    );

    // v2's server dies at start: PM2 gives up on it and says so.
    fx.release("v2");
    fs::write(fx.root.join("releases/v2/server.js"), CRASH_JS).unwrap();
    let started = Instant::now();
    let err = pm2.activate(&fx.switch("v2")).unwrap_err().to_string();
    assert!(err.contains("web#") && err.contains("errored"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60), "{err}");

    // The deploy switches back and restores: v1 serves again.
    let back = fx.switch("v1");
    let failed = slipway_agent::driver::Activation::default();
    pm2.restore(&back, &failed).unwrap();
    fx.wait_for_release("v1");
    let status = pm2.status(&fx.app).unwrap();
    assert_eq!(status.processes.len(), 2, "{status:#?}");
    assert!(status.processes.iter().all(|p| p.status == "online"));
}

#[test]
fn run_settings_changes_apply_on_the_next_activation() {
    let _serial = serial();
    let fx = Fixture::new();
    // Run pm2 as a named user (ourselves): the uid/gid switch path.
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .unwrap();
    let config = |cluster, instances| Pm2Config {
        user: Some(me.name.clone()),
        ..fx.config(cluster, instances)
    };
    fx.release("v1");
    let t1 = fx.switch("v1");
    let a = Pm2::new(config(true, 2)).activate(&t1).unwrap();
    assert_eq!(a.detail, "pm2 start web (cluster, 2 instances)");
    fx.wait_for_release("v1");

    // A reload keeps the instance count; the driver scales after it.
    let a = Pm2::new(config(true, 1)).activate(&t1).unwrap();
    assert_eq!(a.detail, "pm2 reload web (cluster, 1 instance)");
    fx.wait_for_release("v1");
    let status = Pm2::new(config(true, 1)).status(&fx.app).unwrap();
    assert_eq!(status.processes.len(), 1, "{status:#?}");

    // A reload keeps the exec mode; the driver restarts instead.
    fx.release("v2");
    let t2 = fx.switch("v2");
    let fork = Pm2::new(config(false, 1));
    let a = fork.activate(&t2).unwrap();
    assert_eq!(
        a.detail,
        "pm2 restart web (fork, 1 instance): exec mode was cluster_mode, now fork_mode"
    );
    fx.wait_for_release("v2");
    let status = fork.status(&fx.app).unwrap();
    assert_eq!(status.processes.len(), 1, "{status:#?}");
    assert!(status.notes.iter().any(|n| n == FORK_NOTE), "{status:?}");

    let nobody = Pm2::new(Pm2Config {
        user: Some("slipway-no-such-user".into()),
        ..fx.config(true, 1)
    });
    let err = nobody.activate(&t2).unwrap_err().to_string();
    assert!(
        err.contains("user \"slipway-no-such-user\" does not exist"),
        "{err}"
    );
}

/// PM2's `restart_time` counts the agent's reloads too: status tells them
/// apart from restarts after a crash, across further reloads.
#[test]
fn reloads_and_crash_restarts_are_told_apart() {
    let _serial = serial();
    let fx = Fixture::new();
    let pm2 = Pm2::new(fx.config(true, 2));
    let counts = || {
        let status = pm2.status(&fx.app).unwrap();
        let mut c: Vec<(String, u64, u64, Option<u32>)> = status
            .processes
            .iter()
            .map(|p| (p.name.clone(), p.restarts, p.reloads, p.pid))
            .collect();
        c.sort();
        c
    };
    for id in ["v1", "v2", "v3"] {
        fx.release(id);
        let t = fx.switch(id);
        let a = pm2.activate(&t).unwrap();
        pm2.commit(&t, &a).unwrap();
        fx.wait_for_release(id);
    }
    // A start and two reloads: no crash, two reloads each.
    let after_deploys = counts();
    assert_eq!(after_deploys.len(), 2, "{after_deploys:?}");
    for (name, crashes, reloads, _) in &after_deploys {
        assert_eq!((*crashes, *reloads), (0, 2), "{name}: {after_deploys:?}");
    }
    // One worker killed: PM2 restarts it, a crash restart.
    let (victim, _, _, pid) = after_deploys[0].clone();
    let pid = pid.unwrap();
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + HTTP_SETTLE;
    loop {
        let now = counts();
        let restarted = now
            .iter()
            .find(|c| c.0 == victim)
            .is_some_and(|c| c.3.is_some() && c.3 != Some(pid) && c.1 == 1);
        if restarted {
            for (name, crashes, reloads, _) in &now {
                let want = if *name == victim { (1, 2) } else { (0, 2) };
                assert_eq!((*crashes, *reloads), want, "{name}: {now:?}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "no crash restart seen: {now:?}");
        thread::sleep(Duration::from_millis(200));
    }
    // Another reload: the crash stays counted as one, the reloads go on.
    fx.release("v4");
    let t = fx.switch("v4");
    let a = pm2.activate(&t).unwrap();
    pm2.commit(&t, &a).unwrap();
    fx.wait_for_release("v4");
    let last = counts();
    for (name, crashes, reloads, _) in &last {
        let want = if *name == victim { (1, 3) } else { (0, 3) };
        assert_eq!((*crashes, *reloads), want, "{name}: {last:?}");
    }
}
