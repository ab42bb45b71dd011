//! The exec driver with `listen`: the supervisor holds the app's public
//! socket and hands it to each release's process (systemd socket
//! activation), so deploys, failed gates and an app that will not take the
//! socket lose no request. Real processes: the agent binary, its detached
//! supervisor and a Python server on the handed-over sockets, with the load
//! loop of `support::load` (a new TCP connection per request, bounded).

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;
use std::time::Duration;

use crate::support::load::Load;
use crate::support::{free_port, http_get, tar_of, targz, Node, SAMPLE_APP};

const SOCKET_APP: &str = include_str!("../../../tests/fixtures/socket_server.py");
/// Bounds of every load loop here.
const LOAD_TIME: Duration = Duration::from_secs(240);
const LOAD_REQUESTS: usize = 200_000;

struct App {
    node: Node,
    port: u16,
}

impl Drop for App {
    fn drop(&mut self) {
        // Never leave a supervisor behind, whatever the test did.
        let _ = self.node.run(&["stop", "--app", "web"]);
    }
}

fn app() -> App {
    let port = free_port();
    let node = Node::new(&format!(
        r#"listen = "127.0.0.1:{port}"

[apps.web.run]
driver = "exec"
command = ["python3", "server.py"]
stop_grace = "5s"

[apps.web.health]
check = "http"
url = "http://127.0.0.1:{{port}}/api/health"
status = "200-299"
interval = "50ms"
successes = 2
retries = 2
start_period = "1s"
deadline = "10s"
"#
    ));
    // PORT: what an app that binds its own port (server.py) would use.
    fs::write(node.root.join("shared/.env"), format!("PORT={port}\n")).unwrap();
    App { node, port }
}

/// A release of the socket-activated app (`socket: false`: the plain
/// server.py, which binds PORT itself and so cannot start).
fn release(node: &Node, version: &str, health: Option<u16>, socket: bool) -> PathBuf {
    let server = if socket { SOCKET_APP } else { SAMPLE_APP };
    let mut files = vec![
        ("server.py", server.to_owned()),
        ("VERSION", version.to_owned()),
    ];
    if let Some(code) = health {
        files.push(("HEALTH", code.to_string()));
    }
    let refs: Vec<(&str, &str)> = files.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let path = node.dir.path().join(format!("{version}.tar.gz"));
    fs::write(&path, targz(&tar_of(&refs))).unwrap();
    path
}

fn status(node: &Node) -> serde_json::Value {
    node.run(&["status", "--json"]).ok().json()
}

#[test]
fn twenty_deploys_and_restarts_under_load_on_the_held_socket_lose_nothing() {
    let a = app();
    a.node
        .deploy(&release(&a.node, "v1", None, true), "v1")
        .ok();
    assert_eq!(http_get(a.port, "/").unwrap().1, "v1");
    let s = status(&a.node);
    let notes = s["apps"][0]["processes"]["notes"].to_string();
    assert!(notes.contains("socket handover"), "{s:#}");

    let load = Load::start(a.port, "/", 4, 2, LOAD_TIME, LOAD_REQUESTS);
    let mut versions = BTreeSet::from(["v1".to_owned()]);
    for i in 2..=21 {
        let v = format!("v{i}");
        let run = a.node.deploy_json(&release(&a.node, &v, None, true), &v);
        let rep = run.json();
        assert_eq!(rep["outcome"], "succeeded", "deploy {v}: {rep:#}");
        versions.insert(v);
    }
    // Restarts of the app under the same load: each starts a new process
    // of the live release on the held socket, gated, then the old one
    // drains, as a deploy does.
    // The pid of the one process left once an old one has drained.
    let pid = |node: &Node| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let s = status(node);
            let procs = s["apps"][0]["processes"]["processes"].clone();
            if procs.as_array().is_some_and(|p| p.len() == 1) {
                assert_eq!(procs[0]["release"], "v21", "{s:#}");
                return procs[0]["pid"].clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "never one process: {s:#}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    for _ in 0..2 {
        let before = pid(&a.node);
        a.node.run(&["restart", "--app", "web"]).ok();
        let after = pid(&a.node);
        assert_ne!(before, after, "a restart started a new process");
    }
    // A request after the last switch answers from the last release.
    std::thread::sleep(Duration::from_millis(300));
    let report = load.stop();
    assert_eq!(
        report.failures(),
        0,
        "{}\nsupervisor log:\n{}",
        report.summary(),
        fs::read_to_string(a.node.root.join(".slipway/run/supervisor.log")).unwrap_or_default()
            + &fs::read_to_string(a.node.root.join(".slipway/run/output.log")).unwrap_or_default()
    );
    assert!(report.ok >= 200, "too little load: {}", report.summary());
    let seen: BTreeSet<String> = report.bodies.iter().cloned().collect();
    assert!(
        seen.is_subset(&versions),
        "answers from no deployed release: {seen:?}"
    );
    assert!(seen.len() >= 10, "releases seen: {seen:?}");
    assert_eq!(http_get(a.port, "/").unwrap().1, "v21");
    // One process serves once the deploys are done: the old ones drained.
    let s = status(&a.node);
    let procs = s["apps"][0]["processes"]["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1, "{s:#}");
    assert_eq!(procs[0]["release"], "v21");
    eprintln!("20 deploys and 2 restarts under load: {}", report.summary());
}

#[test]
fn failed_gate_and_an_app_that_refuses_the_socket_leave_the_old_release_serving() {
    let a = app();
    a.node
        .deploy(&release(&a.node, "v1", None, true), "v1")
        .ok();
    let load = Load::start(a.port, "/", 3, 1, LOAD_TIME, LOAD_REQUESTS);
    // A release whose private probe answers 500.
    let run = a
        .node
        .deploy_json(&release(&a.node, "v2", Some(500), true), "v2");
    let rep = run.json();
    assert_eq!(rep["outcome"], "rolled_back", "{rep:#}");
    assert!(
        rep["failure"].as_str().unwrap().contains("HTTP 500"),
        "{rep:#}"
    );
    // A release that binds its own port instead of taking the socket: it
    // cannot start (the agent holds the address) and never serves.
    let run = a
        .node
        .deploy_json(&release(&a.node, "v3", None, false), "v3");
    let rep = run.json();
    assert_eq!(rep["outcome"], "rolled_back", "{rep:#}");
    // The failure says why: the process is gone, what it said, and what
    // an app under socket handover must do instead.
    let failure = rep["failure"].as_str().unwrap();
    assert!(
        failure.contains("Address already in use") && failure.contains("LISTEN_FDS"),
        "{rep:#}"
    );
    let report = load.stop();
    assert_eq!(report.failures(), 0, "{}", report.summary());
    // The release on its gate shares the socket (it answers some requests
    // until it is dropped); the one that cannot take the socket never does.
    assert!(
        report.bodies.iter().all(|b| b == "v1" || b == "v2"),
        "a release that never started answered: {}",
        report.summary()
    );
    assert_eq!(http_get(a.port, "/").unwrap().1, "v1");
    assert_eq!(a.node.current().as_deref(), Some("v1"));
    let s = status(&a.node);
    let procs = s["apps"][0]["processes"]["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1, "{s:#}");
    assert_eq!(procs[0]["release"], "v1");
    // status: the address is still handed over, to v1.
    let public = &s["apps"][0]["public"];
    assert_eq!(public["mode"], "socket_handover", "{s:#}");
    assert_eq!(public["address"], format!("127.0.0.1:{}", a.port), "{s:#}");
    assert_eq!(public["release"], "v1", "{s:#}");
    let log = fs::read_to_string(a.node.root.join(".slipway/run/output.log")).unwrap();
    assert!(log.contains("Address already in use"), "{log}");
}

/// `GET /` over the unix socket at `path`: the body of a 200.
fn get_unix(path: &std::path::Path) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.starts_with("HTTP/1.0 200")
        .then(|| out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned())
}

#[test]
fn a_unix_socket_address_is_held_and_handed_over_too() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("web.sock");
    let node = Node::new(&format!(
        r#"listen = "{}"

[apps.web.run]
driver = "exec"
command = ["python3", "server.py"]
stop_grace = "5s"

[apps.web.health]
check = "http"
url = "http://127.0.0.1:{{port}}/api/health"
interval = "50ms"
successes = 2
start_period = "1s"
deadline = "10s"
"#,
        sock.display()
    ));
    let a = App { node, port: 0 };
    for v in ["v1", "v2", "v3"] {
        let rep = a
            .node
            .deploy_json(&release(&a.node, v, None, true), v)
            .json();
        assert_eq!(rep["outcome"], "succeeded", "{rep:#}");
        assert_eq!(get_unix(&sock).as_deref(), Some(v));
    }
    let s = status(&a.node);
    let notes = s["apps"][0]["processes"]["notes"].to_string();
    assert!(notes.contains(&sock.display().to_string()), "{s:#}");
}

// `listen` removed from an exec app's config, then a deploy of a release
// that binds its own port: the supervisor lets go of the address it held,
// so the new release can bind it, and `status` says the app is restarted,
// not handed a socket; added back, the next deploy holds it again.
#[test]
fn listen_removed_then_added_back_through_deploys() {
    let a = app();
    a.node
        .deploy(&release(&a.node, "v1", None, true), "v1")
        .ok();
    assert_eq!(http_get(a.port, "/").unwrap().1, "v1");
    let with_listen = fs::read_to_string(&a.node.config).unwrap();
    let listen_line = format!("listen = \"127.0.0.1:{}\"\n", a.port);
    assert!(with_listen.contains(&listen_line), "{with_listen}");
    // Without the held socket the health URL names the app's own port.
    let without = with_listen.replace(&listen_line, "").replace(
        "http://127.0.0.1:{port}/api/health",
        &format!("http://127.0.0.1:{}/api/health", a.port),
    );
    fs::write(&a.node.config, &without).unwrap();
    let rep = a
        .node
        .deploy_json(&release(&a.node, "v2", None, false), "v2")
        .json();
    assert_eq!(rep["outcome"], "succeeded", "{rep:#}");
    assert_eq!(http_get(a.port, "/").unwrap().1, "v2");
    let s = status(&a.node);
    let notes = s["apps"][0]["processes"]["notes"].to_string();
    assert!(
        notes.contains("restart: a new release stops the old process"),
        "{s:#}"
    );
    assert_eq!(s["apps"][0]["public"]["mode"], "none", "{s:#}");
    let procs = s["apps"][0]["processes"]["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1, "{s:#}");
    assert_eq!(procs[0]["release"], "v2", "{s:#}");

    // Back again: the socket app is handed the address once more.
    fs::write(&a.node.config, &with_listen).unwrap();
    let rep = a
        .node
        .deploy_json(&release(&a.node, "v3", None, true), "v3")
        .json();
    assert_eq!(rep["outcome"], "succeeded", "{rep:#}");
    assert_eq!(http_get(a.port, "/").unwrap().1, "v3");
    let s = status(&a.node);
    let notes = s["apps"][0]["processes"]["notes"].to_string();
    assert!(notes.contains("socket handover"), "{s:#}");
}
