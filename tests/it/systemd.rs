//! systemd, without systemd as PID 1 (it cannot be here): the units in
//! `packaging/systemd/` are checked with `systemd-analyze verify` and their
//! `systemd-analyze security` exposure is held to what the README records;
//! the sd_notify protocol is spoken by the real binaries to a notify socket
//! the test binds; and the property `KillMode=process` relies on — SIGTERM
//! to the agent's main process leaves the apps serving, and a new agent
//! adopts them without restarting them — is shown with real processes.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Read as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{
    artifact, bin, free_port, sha256_file, text, wait_until, Agent, Controller, APP,
};

/// The exposure (`systemd-analyze security`) each unit may have at most:
/// the figures in the README's "systemd units".
const AGENT_EXPOSURE: f64 = 3.0;
const CONTROLLER_EXPOSURE: f64 = 1.1;

fn unit_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging/systemd")
        .join(name)
}

fn systemd_analyze(args: &[&str]) -> std::process::Output {
    Command::new("systemd-analyze")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("systemd-analyze ({e}): install Debian's systemd package"))
}

/// The unit with its ExecStart pointing at this build's binary (verify
/// checks that the program exists), in `dir`.
fn unit_for_verify(dir: &Path, name: &str, binary: &str) -> PathBuf {
    let unit = fs::read_to_string(unit_path(name)).unwrap();
    let installed = format!("ExecStart=/usr/local/bin/{binary} ");
    assert!(unit.contains(&installed), "{name} runs {installed}");
    let here = format!("ExecStart={} ", bin(binary).display());
    let path = dir.join(name);
    fs::write(&path, unit.replace(&installed, &here)).unwrap();
    path
}

fn exposure(unit: &Path) -> f64 {
    let out = systemd_analyze(&[
        "security",
        "--offline=true",
        "--no-pager",
        unit.to_str().unwrap(),
    ]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = said
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level in: {}", text(&out)));
    let figure = line.split(':').nth(1).unwrap().split_whitespace().next();
    figure.unwrap().parse().unwrap()
}

#[test]
fn units_verify_clean_and_keep_their_exposure() {
    let dir = tempfile::tempdir().unwrap();
    for (name, binary, limit) in [
        ("slipway-agent.service", "slipway-agent", AGENT_EXPOSURE),
        (
            "slipway-controller.service",
            "slipway-controller",
            CONTROLLER_EXPOSURE,
        ),
    ] {
        let unit = unit_for_verify(dir.path(), name, binary);
        let out = systemd_analyze(&["verify", unit.to_str().unwrap()]);
        // verify exits 0 on settings it ignores, so any output is a failure.
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "systemd-analyze verify {name}: {}",
            text(&out)
        );
        let text = fs::read_to_string(&unit).unwrap();
        for needed in ["Type=notify", "WatchdogSec=", "Restart=on-failure"] {
            assert!(text.contains(needed), "{name} lacks {needed}");
        }
        let found = exposure(&unit);
        eprintln!("{name}: exposure {found}");
        assert!(
            found <= limit,
            "{name}: exposure {found} > {limit} (update the README's figures if this is meant)"
        );
    }
    let agent = fs::read_to_string(unit_path("slipway-agent.service")).unwrap();
    assert!(
        agent.contains("\nKillMode=process\n"),
        "the agent's apps outlive it"
    );

    // A unit verify does not accept fails the check above: prove it can.
    let broken = dir.path().join("broken.service");
    let unit = fs::read_to_string(dir.path().join("slipway-agent.service")).unwrap();
    fs::write(&broken, unit.replace("Type=notify", "Type=notfy")).unwrap();
    let out = systemd_analyze(&["verify", broken.to_str().unwrap()]);
    assert!(!out.stderr.is_empty(), "verify says nothing of Type=notfy");
}

/// A notify socket the test binds (`NOTIFY_SOCKET`): a path, or an abstract
/// name (`@…`).
struct NotifySocket {
    sock: UnixDatagram,
    name: String,
}

impl NotifySocket {
    fn path(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).unwrap();
        Self {
            sock,
            name: path.to_str().unwrap().to_owned(),
        }
    }

    fn abstract_name() -> Self {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("slipway-test-notify-{}-{}", std::process::id(), free_port());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        Self {
            sock,
            name: format!("@{name}"),
        }
    }

    /// The next datagram, within `limit`.
    fn recv(&self, limit: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    }

    /// Every datagram for `span`.
    fn collect(&self, span: Duration) -> Vec<String> {
        let end = Instant::now() + span;
        let mut got = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            if left.is_zero() {
                break;
            }
            if let Some(m) = self.recv(left) {
                got.push(m);
            }
        }
        got
    }
}

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sigterm(child: &Child) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

/// READY=1 (with the ready file already there), watchdog pings at half of
/// WATCHDOG_USEC, STOPPING=1 on SIGTERM. Returns every message before
/// STOPPING=1.
fn speaks_sd_notify(
    socket: &NotifySocket,
    mut command: Command,
    ready_file: &Path,
    what: &str,
) -> Vec<String> {
    let child = command
        .env("NOTIFY_SOCKET", &socket.name)
        .env("WATCHDOG_USEC", "400000")
        .env_remove("WATCHDOG_PID")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Reaped(child);
    let mut seen = Vec::new();
    while !seen
        .last()
        .is_some_and(|m: &String| m.starts_with("READY=1"))
    {
        let m = socket
            .recv(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("{what}: no READY=1 within 60 s after {seen:?}"));
        seen.push(m);
    }
    assert!(
        ready_file.exists(),
        "{what}: READY=1 comes with the ready file"
    );
    // 0.4 s watchdog: a ping every 0.2 s.
    let more = socket.collect(Duration::from_millis(1500));
    let n = more.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(
        (4..=12).contains(&n),
        "{what}: {n} pings in 1.5 s: {more:?}"
    );
    seen.extend(more);
    sigterm(&child.0);
    let mut stopping = None;
    while let Some(m) = socket.recv(Duration::from_secs(10)) {
        if m.starts_with("STOPPING=1") {
            stopping = Some(m);
            break;
        }
    }
    assert!(
        stopping.is_some_and(|m| m.starts_with("STOPPING=1\nSTATUS=")),
        "{what}: no STOPPING=1"
    );
    let status = child.0.wait().unwrap();
    assert!(status.success(), "{what}: exit {status}");
    eprintln!("{what}: {seen:?}");
    seen
}

#[test]
fn controller_and_agent_speak_sd_notify() {
    let dir = tempfile::tempdir().unwrap();

    // The controller, on a path socket.
    let socket = NotifySocket::path(dir.path());
    let ready = dir.path().join("controller.ready");
    let mut serve = Command::new(bin("slipway-controller"));
    serve
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--ready-file"])
        .arg(&ready);
    let seen = speaks_sd_notify(&socket, serve, &ready, "slipway-controller serve");
    let served = fs::read_to_string(&ready).unwrap();
    assert_eq!(
        seen[0],
        format!("READY=1\nSTATUS=serving on {}", served.trim())
    );

    // The agent with no controller, on an abstract socket.
    let socket = NotifySocket::abstract_name();
    let config = dir.path().join("agent.toml");
    fs::create_dir_all(dir.path().join("app")).unwrap();
    fs::write(
        &config,
        format!(
            "[apps.web]\nroot = \"{}\"\n",
            dir.path().join("app").display()
        ),
    )
    .unwrap();
    let ready = dir.path().join("agent.ready");
    let run = || {
        let mut run = Command::new(bin("slipway-agent"));
        run.arg("--config")
            .arg(&config)
            .args(["run", "--ready-file"])
            .arg(&ready);
        run
    };
    let seen = speaks_sd_notify(&socket, run(), &ready, "slipway-agent run");
    assert_eq!(seen[0], "READY=1\nSTATUS=running: 1 app(s), no controller");

    // With a controller, the status line follows the session.
    let controller = Controller::start();
    let agent = Agent::enroll_with(&controller, "sd-1", "web", |root, _| {
        format!("[apps.web]\nroot = \"{}\"\n", root.display())
    });
    fs::create_dir_all(&agent.root).unwrap();
    let socket = NotifySocket::abstract_name();
    let _ = fs::remove_file(&ready);
    let mut linked = Command::new(bin("slipway-agent"));
    linked
        .arg("--config")
        .arg(&agent.config)
        .args(["run", "--ready-file"])
        .arg(&ready);
    let seen = speaks_sd_notify(&socket, linked, &ready, "slipway-agent run (controller)");
    let connected = format!(
        "STATUS=1 app(s); controller {}: connected as node n-",
        controller.url()
    );
    assert!(
        seen.iter().any(|m| m.starts_with(&connected)),
        "{connected} in {seen:?}"
    );
    assert!(seen.iter().any(|m| m == "READY=1"), "{seen:?}");

    // A watchdog meant for another process (WATCHDOG_PID): READY, no pings.
    let socket = NotifySocket::abstract_name();
    let _ = fs::remove_file(&ready);
    let child = run()
        .env("NOTIFY_SOCKET", &socket.name)
        .env("WATCHDOG_USEC", "400000")
        .env("WATCHDOG_PID", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = Reaped(child);
    let first = socket.recv(Duration::from_secs(60)).unwrap();
    assert!(first.starts_with("READY=1"), "{first:?}");
    let pings = socket.collect(Duration::from_millis(1000));
    assert!(pings.is_empty(), "pings for another pid: {pings:?}");
    sigterm(&child.0);
}

/// The Node app PM2 runs: answers `VERSION PID`.
const NODE_APP: &str = r#"'use strict';
const http = require('http');
const fs = require('fs');
const VERSION = fs.readFileSync('VERSION', 'utf8').trim();
http.createServer((req, res) => {
  const body = `${VERSION} ${process.pid}`;
  res.writeHead(200, { 'content-length': Buffer.byteLength(body), connection: 'close' });
  res.end(body);
}).listen(Number(process.env.PORT), '127.0.0.1');
"#;

/// Kills this test's PM2 daemon, whatever happened.
struct Pm2Home(PathBuf);

impl Drop for Pm2Home {
    fn drop(&mut self) {
        let _ = Command::new("pm2")
            .arg("kill")
            .env("PM2_HOME", &self.0)
            .output();
    }
}

fn get(port: u16) -> Option<String> {
    use std::io::Write as _;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET / HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.split("\r\n\r\n").nth(1).map(str::to_owned)
}

fn supervisor_state(root: &Path) -> Value {
    serde_json::from_slice(&fs::read(root.join(".slipway/run/state.json")).unwrap()).unwrap()
}

fn pid_of(v: &Value, key: &str) -> i32 {
    v[key].as_i64().unwrap_or_else(|| panic!("no {key} in {v}")) as i32
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Starts `slipway-agent run` and waits for its ready file.
fn start_run(config: &Path, dir: &Path, notify: Option<&str>) -> Reaped {
    let ready = dir.join("run.ready");
    let _ = fs::remove_file(&ready);
    let log = fs::File::options()
        .create(true)
        .append(true)
        .open(dir.join("run.log"))
        .unwrap();
    let mut c = Command::new(bin("slipway-agent"));
    c.arg("--config")
        .arg(config)
        .args(["run", "--ready-file"])
        .arg(&ready)
        .stdout(Stdio::null())
        .stderr(log);
    if let Some(name) = notify {
        c.env("NOTIFY_SOCKET", name);
    }
    let child = Reaped(c.spawn().unwrap());
    wait_until("slipway-agent run ready", Duration::from_secs(60), || {
        ready.exists()
    });
    child
}

#[test]
fn sigterm_to_the_agent_leaves_exec_and_pm2_apps_running_and_a_new_agent_adopts_them() {
    let dir = tempfile::tempdir().unwrap();
    let pm2_home = dir.path().join("pm2");
    fs::create_dir_all(&pm2_home).unwrap();
    let _pm2 = Pm2Home(pm2_home.clone());
    let (web_port, node_port) = (free_port(), free_port());
    let web_root = dir.path().join("web");
    let node_root = dir.path().join("node");
    for (root, port) in [(&web_root, web_port), (&node_root, node_port)] {
        fs::create_dir_all(root.join("shared")).unwrap();
        fs::write(root.join("shared/.env"), format!("PORT={port}\n")).unwrap();
    }
    let config = dir.path().join("agent.toml");
    fs::write(
        &config,
        format!(
            r#"[apps.web]
root = "{web}"
shared_files = [".env"]

[apps.web.run]
driver = "exec"
command = ["python3", "server.py"]
stop_grace = "2s"

[apps.web.health]
check = "http"
url = "http://127.0.0.1:{web_port}/api/health"
interval = "100ms"
successes = 2
deadline = "20s"

[apps.node]
root = "{node}"
shared_files = [".env"]

[apps.node.run]
driver = "pm2"
script = "server.js"
instances = 1
exec_mode = "fork"
pm2_home = "{pm2}"

[apps.node.health]
check = "http"
url = "http://127.0.0.1:{node_port}/"
interval = "100ms"
successes = 2
deadline = "30s"
"#,
            web = web_root.display(),
            node = node_root.display(),
            pm2 = pm2_home.display(),
        ),
    )
    .unwrap();
    let agent = |args: &[&str]| {
        Command::new(bin("slipway-agent"))
            .arg("--config")
            .arg(&config)
            .args(args)
            .output()
            .unwrap()
    };
    let deploy = |app: &str, art: &Path| {
        let out = agent(&[
            "deploy",
            "--app",
            app,
            "--artifact",
            art.to_str().unwrap(),
            "--sha256",
            &sha256_file(art),
            "--id",
            "v1",
        ]);
        assert!(out.status.success(), "deploy {app}: {}", text(&out));
    };
    let work = dir.path().join("work");
    fs::create_dir_all(&work).unwrap();
    deploy("web", &artifact(&work, "v1", APP));
    let node_art = work.join("node-v1.tar.gz");
    {
        let build = work.join("node-build");
        fs::create_dir_all(&build).unwrap();
        fs::write(build.join("server.js"), NODE_APP).unwrap();
        fs::write(build.join("VERSION"), "v1\n").unwrap();
        let out = agent(&[
            "pack",
            "--dir",
            build.to_str().unwrap(),
            "--out",
            node_art.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "pack: {}", text(&out));
    }
    deploy("node", &node_art);

    // The exec app started by `run` itself: its supervisor and app killed
    // (as by a reboot; `slipway-agent stop` would be a stop on purpose,
    // which the agent leaves alone), then brought back by the agent's
    // start-up.
    let before = supervisor_state(&web_root);
    for key in ["supervisor_pid", "child_pid"] {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid_of(&before, key)),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    wait_until("web stopped", Duration::from_secs(10), || {
        get(web_port).is_none()
    });
    let socket = NotifySocket::abstract_name();
    let first = start_run(&config, dir.path(), Some(&socket.name));
    wait_until("web serving again", Duration::from_secs(20), || {
        get(web_port).as_deref() == Some("v1")
    });
    let web = supervisor_state(&web_root);
    let (supervisor, web_pid) = (pid_of(&web, "supervisor_pid"), pid_of(&web, "child_pid"));
    let node_before = get(node_port).unwrap();
    assert!(node_before.starts_with("v1 "), "{node_before}");

    // Neither the supervisor nor its app is in the agent's process group
    // (a signal to the agent's group spares them), and neither inherited
    // the notify socket (they must not speak for the agent's unit).
    let group = |pid: i32| nix::unistd::getpgid(Some(nix::unistd::Pid::from_raw(pid))).unwrap();
    let agent_group = group(first.0.id() as i32);
    assert_ne!(
        group(supervisor),
        agent_group,
        "supervisor in the agent's group"
    );
    assert_ne!(group(web_pid), agent_group, "app in the agent's group");
    let environ = fs::read(format!("/proc/{web_pid}/environ")).unwrap();
    assert!(
        !String::from_utf8_lossy(&environ).contains("NOTIFY_SOCKET"),
        "the app inherited NOTIFY_SOCKET"
    );

    // SIGTERM to the agent's main process only, as KillMode=process sends.
    sigterm(&first.0);
    let mut first = first;
    let status = first.0.wait().unwrap();
    assert!(status.success(), "run exited {status}");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        alive(supervisor) && alive(web_pid),
        "exec app gone with the agent"
    );
    assert_eq!(get(web_port).as_deref(), Some("v1"));
    assert_eq!(get(node_port).as_deref(), Some(node_before.as_str()));

    // A new agent adopts them: same processes, still serving.
    let _second = start_run(&config, dir.path(), None);
    std::thread::sleep(Duration::from_secs(2));
    let web = supervisor_state(&web_root);
    assert_eq!(pid_of(&web, "supervisor_pid"), supervisor);
    assert_eq!(pid_of(&web, "child_pid"), web_pid);
    assert_eq!(get(web_port).as_deref(), Some("v1"));
    assert_eq!(get(node_port).as_deref(), Some(node_before.as_str()));

    let out = agent(&["stop", "--app", "web"]);
    assert!(out.status.success(), "stop: {}", text(&out));
}
