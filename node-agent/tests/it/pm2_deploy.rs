//! PM2 through the whole agent: deploy in cluster mode behind the health
//! gate; a release answering 500 on /api/health is rolled back and PM2 serves
//! the previous one again; twenty deploys in a row under load lose nothing.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::PathBuf;

use std::time::Duration;

use crate::support::load::{Load, ANSWER_WITHIN};
use crate::support::{free_port, http_get, Node};

/// The PM2 test app that stops gracefully on SIGINT (module doc of the
/// driver: what a cluster app must do for zero-downtime reloads).
const GRACEFUL_SERVER: &str = include_str!("../fixtures/pm2-app/server.js");

const SERVER: &str = r#"'use strict';
const http = require('http');
const fs = require('fs');
const VERSION = fs.readFileSync('VERSION', 'utf8').trim();
const HEALTH = fs.existsSync('HEALTH') ? Number(fs.readFileSync('HEALTH', 'utf8')) : 200;
http.createServer((req, res) => {
  const code = req.url === '/api/health' ? HEALTH : 200;
  if (req.url.startsWith('/log/')) console.log(`request ${req.url.slice(5)}`);
  const body = `${VERSION} ${process.pid}`;
  res.writeHead(code, { 'content-length': Buffer.byteLength(body), connection: 'close' });
  res.end(body);
}).listen(Number(process.env.PORT), '127.0.0.1');
"#;

/// Kills this test's PM2 daemon, whatever happened.
struct Pm2Home(PathBuf);

impl Drop for Pm2Home {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pm2")
            .arg("kill")
            .env("PM2_HOME", &self.0)
            .output();
    }
}

/// A node whose app `web` is a two-instance PM2 cluster on `port`, gated on
/// `/api/health` (`successes` in a row, forgiven for `start_period`).
fn cluster_node(port: u16, pm2_home: &std::path::Path, successes: u32, start_period: &str) -> Node {
    Node::new(&format!(
        r#"
[apps.web.run]
driver = "pm2"
script = "server.js"
instances = 2
exec_mode = "cluster"
pm2_home = "{}"

[apps.web.health]
check = "http"
url = "http://127.0.0.1:{port}/api/health"
interval = "100ms"
successes = {successes}
retries = 2
start_period = "{start_period}"
deadline = "30s"
"#,
        pm2_home.display()
    ))
}

#[test]
fn pm2_cluster_deploy_gated_on_health_and_rolled_back_on_500() {
    let port = free_port();
    let pm2_home = tempfile::tempdir().unwrap();
    let _guard = Pm2Home(pm2_home.path().to_owned());
    let node = cluster_node(port, pm2_home.path(), 3, "1s");
    fs::write(
        node.root.join("shared/.env"),
        format!("PORT={port}\nAPP_SECRET=s3cr3t-pm2\n"),
    )
    .unwrap();
    let artifact = |v: &str, health: Option<&str>| {
        let mut files = vec![("server.js", SERVER), ("VERSION", v)];
        if let Some(h) = health {
            files.push(("HEALTH", h));
        }
        node.artifact(&format!("{v}.tar.gz"), &files)
    };

    let r1 = node.deploy_json(&artifact("v1", None), "v1").ok().json();
    assert_eq!(r1["outcome"], "succeeded", "{r1:#}");
    assert!(http_get(port, "/").unwrap().1.starts_with("v1 "));

    let run = node.deploy_json(&artifact("v2", Some("500")), "v2");
    assert_eq!(run.code, Some(1), "{run:#?}");
    let r2 = run.json();
    assert_eq!(r2["outcome"], "rolled_back", "{r2:#}");
    assert!(
        r2["failure"].as_str().unwrap().contains("HTTP 500"),
        "{r2:#}"
    );
    assert!(
        r2["restored"]
            .as_str()
            .unwrap()
            .contains("pm2 restarted v1"),
        "{r2:#}"
    );
    assert_eq!(node.current().as_deref(), Some("v1"));
    for _ in 0..4 {
        let (code, body) = http_get(port, "/api/health").unwrap();
        assert_eq!(
            (code, body.split(' ').next().unwrap()),
            (200, "v1"),
            "v1 not serving on every worker"
        );
    }

    let status = node.run(&["status", "--json"]).ok().json();
    assert!(
        !status.to_string().contains("s3cr3t-pm2"),
        "status leaked .env"
    );
    let procs = status["apps"][0]["processes"]["processes"]
        .as_array()
        .unwrap();
    assert_eq!(procs.len(), 2, "{status:#}");
    assert!(
        procs
            .iter()
            .all(|p| p["status"] == "online" && p["release"] == "v1"),
        "{status:#}"
    );
}

#[test]
fn pm2_logs_are_rotated_with_reload_logs_and_nothing_is_lost() {
    let port = free_port();
    let pm2_home = tempfile::tempdir().unwrap();
    let _guard = Pm2Home(pm2_home.path().to_owned());
    let node = Node::new(&format!(
        "[apps.web.run]\ndriver = \"pm2\"\nscript = \"server.js\"\ninstances = 2\npm2_home = \"{}\"\n[apps.web.logs]\ncompress = \"gzip\"\n",
        pm2_home.path().display()
    ));
    fs::write(node.root.join("shared/.env"), format!("PORT={port}\n")).unwrap();
    let a = node.artifact("v1.tar.gz", &[("server.js", SERVER), ("VERSION", "v1")]);
    node.deploy(&a, "v1").ok();
    let out = node.root.join("shared/logs/pm2-web-out.log");
    let mut n = 0;
    let mut round = |count: usize| {
        for _ in 0..count {
            assert_eq!(http_get(port, &format!("/log/{n}")).unwrap().0, 200);
            n += 1;
        }
    };
    round(50);
    wait_for_lines(&out, 50);
    let rep = node
        .run(&["logs", "--app", "web", "--rotate", "--force", "--json"])
        .ok()
        .json();
    let rotations = rep["rotations"].as_array().unwrap();
    let r = rotations
        .iter()
        .find(|r| r["file"] == out.to_str().unwrap())
        .unwrap();
    assert_eq!(r["method"], "pm2 reloadLogs", "{rep:#}");
    round(50);
    wait_for_lines(&out, 50);
    // Both halves complete: the first in the rotated file, the rest in the
    // file PM2 reopened.
    let rotated = std::path::PathBuf::from(r["rotated_to"].as_str().unwrap());
    let mut first = String::new();
    use std::io::Read;
    flate2::read::GzDecoder::new(fs::File::open(&rotated).unwrap())
        .read_to_string(&mut first)
        .unwrap();
    let count = |text: &str| text.lines().filter(|l| l.starts_with("request ")).count();
    assert_eq!(count(&first), 50, "{first}");
    assert_eq!(count(&fs::read_to_string(&out).unwrap()), 50);
}

/// Waits until `path` holds at least `n` request lines (PM2 writes logs
/// asynchronously).
fn wait_for_lines(path: &std::path::Path, n: usize) {
    let t = std::time::Instant::now();
    loop {
        let text = fs::read_to_string(path).unwrap_or_default();
        if text.lines().filter(|l| l.starts_with("request ")).count() >= n {
            return;
        }
        assert!(
            t.elapsed() < std::time::Duration::from_secs(15),
            "{} never reached {n} lines:\n{text}",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Twenty consecutive `slipway-agent deploy`s of a two-instance cluster app,
/// under a loop of new connections and one of keep-alive connections: not
/// one request hung, reset or refused, each answered within 2 s. (With
/// Node's default round-robin balancing in the PM2 daemon, about one
/// connection per reload hung forever: see the PM2 driver's module doc.)
#[test]
fn twenty_cluster_deploys_under_load_lose_nothing() {
    const DEPLOYS: usize = 20;
    let port = free_port();
    let pm2_home = tempfile::tempdir().unwrap();
    let _guard = Pm2Home(pm2_home.path().to_owned());
    let node = cluster_node(port, pm2_home.path(), 2, "200ms");
    fs::write(node.root.join("shared/.env"), format!("PORT={port}\n")).unwrap();
    let artifact = |v: &str| {
        let server = GRACEFUL_SERVER.replace("__RELEASE__", v);
        node.artifact(&format!("{v}.tar.gz"), &[("server.js", server.as_str())])
    };
    let r = node.deploy_json(&artifact("v0"), "v0").ok().json();
    assert_eq!(r["outcome"], "succeeded", "{r:#}");

    // Bounded: 2 threads of new connections, 2 of keep-alive, at most 5 min
    // or 200,000 requests each.
    let load = Load::start(port, "/", 2, 2, Duration::from_secs(300), 200_000);
    for i in 1..=DEPLOYS {
        let v = format!("v{i}");
        let r = node.deploy_json(&artifact(&v), &v).ok().json();
        assert_eq!(r["outcome"], "succeeded", "deploy {v}: {r:#}");
    }
    // A moment on the last release, so its answers are surely seen.
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    eprintln!(
        "{DEPLOYS} pm2 cluster deploys under load: {}",
        report.summary()
    );
    assert_eq!(
        report.failures(),
        0,
        "requests not answered within {ANSWER_WITHIN:?}: {}",
        report.summary()
    );
    assert!(
        report.ok > 1000,
        "too little load to tell: {}",
        report.summary()
    );
    let last = format!("v{DEPLOYS}");
    assert!(report.bodies.contains(&last), "{last} never answered");
    let status = node.run(&["status", "--json"]).ok().json();
    let notes = status["apps"][0]["processes"]["notes"].to_string();
    assert!(
        notes.contains("zero-downtime reloads, connections balanced by the kernel"),
        "{status:#}"
    );
}
