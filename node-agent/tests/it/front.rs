//! The agent's front (its TCP proxy on the app's public address) with a
//! real Docker engine of the test's own: deploys of busybox images under
//! load, each new container on the other blue/green port, lose no request;
//! the public address never changes; a release that fails its gate never
//! receives a connection; the front outlives the agent process that
//! started it.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::load::{Load, Timeline};
use crate::support::{
    busybox_image_on, docker_cli_on, free_port, free_ports, http_get, netns, targz, wait_until,
    Node, PrivateDockerd, RawTar, RunningAgent,
};

const LOAD_TIME: Duration = Duration::from_secs(300);
const LOAD_REQUESTS: usize = 200_000;

/// Release `version` of `app`: `image.tar` of a busybox httpd saying
/// `version` (without /api/health when `healthy` is false).
fn image_artifact(node: &Node, socket: &Path, app: &str, version: &str, healthy: bool) -> PathBuf {
    let tag = format!("slipway-front-{app}:{version}");
    busybox_image_on(Some(socket), node.dir.path(), &tag, version, healthy);
    let saved = node.dir.path().join(format!("{version}-image.tar"));
    docker_cli_on(Some(socket), &["save", "-o", saved.to_str().unwrap(), &tag]);
    let tar = RawTar::default()
        .file("image.tar", 0o644, &fs::read(&saved).unwrap())
        .finish();
    fs::remove_file(&saved).unwrap();
    let art = node.dir.path().join(format!("{version}.tar.gz"));
    fs::write(&art, targz(&tar)).unwrap();
    art
}

fn deploy(node: &Node, app: &str, art: &Path, id: &str) -> serde_json::Value {
    node.run(&[
        "deploy",
        "--app",
        app,
        "--artifact",
        art.to_str().unwrap(),
        "--id",
        id,
        "--json",
    ])
    .json()
}

#[test]
fn docker_deploys_under_load_through_the_front_lose_nothing() {
    // In a network namespace of its own (the test's dockerd too): the
    // front forwards in the kernel (nftables) there, as it does by default.
    if !netns::enter("front::docker_deploys_under_load_through_the_front_lose_nothing") {
        return;
    }
    const DEPLOYS: usize = 20;
    let engine = PrivateDockerd::start();
    let socket = engine.socket();
    let app = format!("fr{}", std::process::id());
    let public = free_port();
    let ports = free_ports::<2>();
    let node = docker_front_node(&app, "tcp", public, ports, &socket);
    struct Stop<'a>(&'a Node, String);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = self.0.run(&["stop", "--app", &self.1]);
        }
    }
    let _stop = Stop(&node, app.clone());
    let arts: Vec<PathBuf> = (0..=DEPLOYS)
        .map(|i| image_artifact(&node, &socket, &app, &format!("v{i}"), true))
        .collect();
    let sick = image_artifact(&node, &socket, &app, "sick", false);

    let r = deploy(&node, &app, &arts[0], "v0");
    assert_eq!(r["outcome"], "succeeded", "{r:#}");
    assert_eq!(http_get(public, "/").unwrap().1.trim(), "v0");
    // The container's own port is on loopback only.
    let bound = docker_cli_on(
        Some(&socket),
        &[
            "ps",
            "--filter",
            &format!("label=slipway.app={app}"),
            "--format",
            "{{.Ports}}",
        ],
    );
    assert!(bound.starts_with("127.0.0.1:"), "{bound}");

    let t0 = std::time::Instant::now();
    let mut timeline = Timeline::live("v0", t0);
    let load = Load::start(public, "/", 3, 1, LOAD_TIME, LOAD_REQUESTS);
    let mut deployed = BTreeSet::new();
    for (i, art) in arts.iter().enumerate().skip(1) {
        let v = format!("v{i}");
        let started = std::time::Instant::now();
        let r = deploy(&node, &app, art, &v);
        assert_eq!(r["outcome"], "succeeded", "deploy {v}: {r:#}");
        timeline.step(&v, started, std::time::Instant::now());
        eprintln!(
            "{:.3}s: {v} deployed: {}",
            t0.elapsed().as_secs_f64(),
            r["steps"]
        );
        deployed.insert(v);
        if i == DEPLOYS / 2 {
            // A release that fails its gate: the front never moves to it.
            let r = deploy(&node, &app, &sick, "sick");
            assert_eq!(r["outcome"], "rolled_back", "{r:#}");
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let report = load.stop();
    eprintln!(
        "{DEPLOYS} docker deploys through the front: {}",
        report.summary()
    );
    assert_eq!(
        report.failures(),
        0,
        "{}\nfront log:\n{}",
        report.summary(),
        fs::read_to_string(node.root.join(&app).join(".slipway/run/front.log")).unwrap_or_default()
    );
    assert!(report.ok >= 200, "too little load: {}", report.summary());
    deployed.insert("v0".into());
    let seen: BTreeSet<String> = report.bodies.iter().map(|b| b.trim().to_owned()).collect();
    assert!(
        seen.is_subset(&deployed),
        "answers from a release never switched to: {seen:?}"
    );
    // TCP mode: a connection stays on the backend it was opened to.
    let stale = timeline.stale(&report, false);
    assert!(
        stale.is_empty(),
        "{} stale: {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
    let last = format!("v{DEPLOYS}");
    assert_eq!(http_get(public, "/").unwrap().1.trim(), last);
    let st = node.run(&["status", "--json"]).ok().json();
    let notes = st["apps"][0]["processes"]["notes"].to_string();
    assert!(
        notes.contains(&format!("agent proxy: 127.0.0.1:{public} forwards"))
            && notes.contains(&last)
            && notes.contains("kernel-forwarded for local clients"),
        "{st:#}"
    );
}

/// A node whose app `app` is a Docker app behind the front on `public` in
/// `listen_mode = mode` ("tcp" or "http"), its containers on `ports`.
fn docker_front_node(app: &str, mode: &str, public: u16, ports: [u16; 2], socket: &Path) -> Node {
    Node::with_config(|root| {
        format!(
            r#"[apps.{app}]
root = "{}"
listen = "127.0.0.1:{public}"
listen_mode = "{mode}"

[apps.{app}.run]
driver = "docker"
image_archive = "image.tar"
container_port = 3000
ports = [{}, {}]
memory = "64MiB"
stop_grace = "2s"
docker_socket = "{}"

[apps.{app}.health]
check = "http"
url = "http://127.0.0.1:{{port}}/api/health"
interval = "100ms"
successes = 2
start_period = "500ms"
deadline = "20s"
"#,
            root.join(app).display(),
            ports[0],
            ports[1],
            socket.display()
        )
    })
}

/// Stops the app however the test ends.
struct StopApp<'a>(&'a Node, String);

impl Drop for StopApp<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(&["stop", "--app", &self.1]);
    }
}

fn front_log(node: &Node, app: &str) -> String {
    fs::read_to_string(node.root.join(app).join(".slipway/run/front.log")).unwrap_or_default()
}

#[test]
fn docker_deploys_in_http_mode_move_keep_alive_clients_at_a_request_boundary() {
    const DEPLOYS: usize = 10;
    let engine = PrivateDockerd::start();
    let socket = engine.socket();
    let app = format!("fh{}", std::process::id());
    let public = free_port();
    let ports = free_ports::<2>();
    let node = docker_front_node(&app, "http", public, ports, &socket);
    let _stop = StopApp(&node, app.clone());
    let arts: Vec<PathBuf> = (0..=DEPLOYS)
        .map(|i| image_artifact(&node, &socket, &app, &format!("v{i}"), true))
        .collect();
    let sick = image_artifact(&node, &socket, &app, "sick", false);
    let r = deploy(&node, &app, &arts[0], "v0");
    assert_eq!(r["outcome"], "succeeded", "{r:#}");
    assert_eq!(http_get(public, "/").unwrap().1.trim(), "v0");

    // 2 threads of new connections, 3 of keep-alive connections (busybox
    // httpd closes its side after every answer; the front keeps the
    // client's connection open across them).
    let t0 = std::time::Instant::now();
    let mut timeline = Timeline::live("v0", t0);
    let load = Load::start(public, "/", 2, 3, LOAD_TIME, LOAD_REQUESTS);
    std::thread::sleep(Duration::from_millis(300));
    let mut deployed = BTreeSet::from(["v0".to_owned()]);
    for (i, art) in arts.iter().enumerate().skip(1) {
        let v = format!("v{i}");
        let started = std::time::Instant::now();
        let r = deploy(&node, &app, art, &v);
        assert_eq!(r["outcome"], "succeeded", "deploy {v}: {r:#}");
        timeline.step(&v, started, std::time::Instant::now());
        eprintln!("{:.3}s: {v} deployed", t0.elapsed().as_secs_f64());
        deployed.insert(v.clone());
        // Let the keep-alive clients send a few requests to this release.
        std::thread::sleep(Duration::from_millis(300));
        if i == DEPLOYS / 2 {
            // A release that fails its gate: every request stays on v.
            let r = deploy(&node, &app, &sick, "sick");
            assert_eq!(r["outcome"], "rolled_back", "{r:#}");
            // A restart: the same release in a new container, switched to
            // like a deploy.
            let started = std::time::Instant::now();
            let out = node.run(&["restart", "--app", &app]);
            let out = out.ok();
            timeline.step(&v, started, std::time::Instant::now());
            eprintln!(
                "{:.3}s: restarted: {}",
                t0.elapsed().as_secs_f64(),
                out.stdout
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    let report = load.stop();
    eprintln!(
        "{DEPLOYS} docker deploys, a failed gate and a restart through the HTTP front: {}",
        report.summary()
    );
    assert_eq!(
        report.failures(),
        0,
        "{}\nfront log:\n{}",
        report.summary(),
        front_log(&node, &app)
    );
    assert!(report.ok >= 500, "too little load: {}", report.summary());
    let seen: BTreeSet<String> = report.answers.iter().map(|a| a.release.clone()).collect();
    assert!(
        seen.is_subset(&deployed),
        "answers from a release never switched to (the sick one?): {seen:?}"
    );
    // HTTP mode: each request went to a release live when it started...
    let stale = timeline.stale(&report, true);
    assert!(
        stale.is_empty(),
        "{} stale answers: {:?}",
        stale.len(),
        &stale[..stale.len().min(5)]
    );
    // ...and the keep-alive connections followed every switch.
    let missed = timeline.not_followed(&report);
    assert!(
        missed.is_empty(),
        "switches no keep-alive connection followed: {missed:?}"
    );
    // Few keep-alive connections carried all of that (no reconnects).
    let conns: BTreeSet<(usize, u64)> = report
        .answers
        .iter()
        .filter(|a| a.keep_alive)
        .map(|a| (a.thread, a.conn))
        .collect();
    assert!(
        conns.len() <= 6,
        "keep-alive clients reconnected: {} connections",
        conns.len()
    );
    let last = format!("v{DEPLOYS}");
    for t in 2..5 {
        let last_of_thread = report.answers.iter().rev().find(|a| a.thread == t);
        assert_eq!(
            last_of_thread.map(|a| a.release.as_str()),
            Some(last.as_str()),
            "keep-alive thread {t}"
        );
    }
    let st = node.run(&["status", "--json"]).ok().json();
    let notes = st["apps"][0]["processes"]["notes"].to_string();
    assert!(
        notes.contains(&format!(
            "agent proxy: 127.0.0.1:{public} forwards new requests"
        )) && notes.contains(&last),
        "{st:#}"
    );
}

/// `GET path` with extra header lines; the whole answer.
fn get_with(port: u16, path: &str, headers: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\n{headers}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

#[test]
fn the_http_front_adds_forwarding_headers_and_answers_502_without_a_backend() {
    let engine = PrivateDockerd::start();
    let socket = engine.socket();
    let app = format!("fx{}", std::process::id());
    let public = free_port();
    let ports = free_ports::<2>();
    let node = docker_front_node(&app, "http", public, ports, &socket);
    let _stop = StopApp(&node, app.clone());
    let art = image_artifact(&node, &socket, &app, "v1", true);
    let r = deploy(&node, &app, &art, "v1");
    assert_eq!(r["outcome"], "succeeded", "{r:#}");

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    let text = get_with(public, "/cgi-bin/headers", "");
    let after = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("x-forwarded-for=127.0.0.1\n"), "{text}");
    assert!(text.contains("x-forwarded-proto=http\n"), "{text}");
    let start: u128 = text
        .lines()
        .find_map(|l| l.strip_prefix("x-request-start=t="))
        .unwrap_or_else(|| panic!("no X-Request-Start: {text}"))
        .trim()
        .parse()
        .unwrap();
    assert!(
        before <= start && start <= after,
        "{before} <= {start} <= {after}"
    );
    // A chain from a load balancer in front: the client's address is
    // appended; the balancer's protocol and start time are kept.
    let text = get_with(
        public,
        "/cgi-bin/headers",
        "X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-Proto: https\r\nX-Request-Start: t=1\r\n",
    );
    assert!(
        text.contains("x-forwarded-for=203.0.113.7, 127.0.0.1\n"),
        "{text}"
    );
    assert!(text.contains("x-forwarded-proto=https\n"), "{text}");
    assert!(text.contains("x-request-start=t=1\n"), "{text}");
    // Upgrades are refused, plainly.
    let text = get_with(
        public,
        "/",
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    );
    assert!(text.starts_with("HTTP/1.1 501"), "{text}");
    assert!(text.contains("use \"tcp\""), "{text}");
    // The container gone (not through the agent): the front answers 502
    // with a short body, after one retry.
    docker_cli_on(
        Some(&socket),
        &[
            "rm",
            "-f",
            &docker_cli_on(
                Some(&socket),
                &["ps", "-q", "--filter", &format!("label=slipway.app={app}")],
            ),
        ],
    );
    let text = get_with(public, "/", "");
    assert!(text.starts_with("HTTP/1.1 502"), "{text}");
    assert!(text.contains("not reachable"), "{text}");
    assert!(front_log(&node, &app).contains("cannot reach the backend"));
}

/// The PM2 test app (answers `RELEASE PID` on $PORT; SIGINT: stop
/// accepting, finish in-flight requests, close keep-alive connections).
const PM2_SERVER: &str = include_str!("../fixtures/pm2-app/server.js");

/// Kills this test's PM2 daemon, whatever happened.
pub(crate) struct Pm2Home(pub(crate) PathBuf);

impl Drop for Pm2Home {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pm2")
            .arg("kill")
            .env("PM2_HOME", &self.0)
            .output();
    }
}

/// A node whose app `web` is a one-instance PM2 fork-mode app behind the
/// front on `public`, its process sets on `ports`.
fn pm2_fork_node(public: u16, ports: [u16; 2], pm2_home: &Path) -> Node {
    pm2_fork_node_with(public, ports, pm2_home, "")
}

/// [`pm2_fork_node`] with `extra` lines in `[apps.web]`.
pub(crate) fn pm2_fork_node_with(
    public: u16,
    ports: [u16; 2],
    pm2_home: &Path,
    extra: &str,
) -> Node {
    Node::new(&format!(
        r#"listen = "127.0.0.1:{public}"
{extra}

[apps.web.run]
driver = "pm2"
script = "server.js"
instances = 1
exec_mode = "fork"
ports = [{}, {}]
pm2_home = "{}"

[apps.web.health]
check = "http"
url = "http://127.0.0.1:{{port}}/api/health"
interval = "100ms"
successes = 2
retries = 2
start_period = "500ms"
deadline = "30s"
"#,
        ports[0],
        ports[1],
        pm2_home.display()
    ))
}

#[test]
fn pm2_fork_deploys_under_load_through_the_front_lose_nothing() {
    // In a network namespace of its own: the front forwards in the kernel
    // (nftables) there, as it does by default.
    if !netns::enter("front::pm2_fork_deploys_under_load_through_the_front_lose_nothing") {
        return;
    }
    const DEPLOYS: usize = 20;
    let public = free_port();
    let ports = free_ports::<2>();
    let pm2_home = tempfile::tempdir().unwrap();
    let _guard = Pm2Home(pm2_home.path().to_owned());
    let node = pm2_fork_node(public, ports, pm2_home.path());
    struct Stop<'a>(&'a Node);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = self.0.run(&["stop", "--app", "web"]);
        }
    }
    let _stop = Stop(&node);
    let artifact = |v: &str| {
        let server = PM2_SERVER.replace("__RELEASE__", v);
        node.artifact(&format!("{v}.tar.gz"), &[("server.js", server.as_str())])
    };
    let r = node.deploy_json(&artifact("v0"), "v0").ok().json();
    assert_eq!(r["outcome"], "succeeded", "{r:#}");
    assert_eq!(r["activation"]["port"].as_u64(), Some(u64::from(ports[0])));

    let load = Load::start(public, "/", 2, 1, LOAD_TIME, LOAD_REQUESTS);
    let mut deployed = BTreeSet::from(["v0".to_owned()]);
    for i in 1..=DEPLOYS {
        let v = format!("v{i}");
        let r = node.deploy_json(&artifact(&v), &v).ok().json();
        assert_eq!(r["outcome"], "succeeded", "deploy {v}: {r:#}");
        // Blue/green: each release on the other port of the pair.
        assert_eq!(
            r["activation"]["port"].as_u64(),
            Some(u64::from(ports[i % 2])),
            "{r:#}"
        );
        deployed.insert(v);
    }
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    eprintln!(
        "{DEPLOYS} pm2 fork deploys through the front: {}",
        report.summary()
    );
    assert_eq!(report.failures(), 0, "{}", report.summary());
    assert!(report.ok >= 500, "too little load: {}", report.summary());
    let seen: BTreeSet<String> = report.bodies.iter().cloned().collect();
    assert!(seen.is_subset(&deployed), "{seen:?}");
    let last = format!("v{DEPLOYS}");
    assert!(seen.contains(&last), "{last} never answered");
    // One process set is left, the last release's.
    let st = node.run(&["status", "--json"]).ok().json();
    let procs = st["apps"][0]["processes"]["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1, "{st:#}");
    let notes = st["apps"][0]["processes"]["notes"].to_string();
    assert!(
        notes.contains("agent proxy") && notes.contains("fork mode behind the agent's proxy"),
        "{st:#}"
    );
}

#[test]
fn the_front_outlives_restarts_and_a_kill_of_the_agent_under_load() {
    // In a network namespace of its own: the front forwards in the kernel
    // (nftables) there, as it does by default.
    if !netns::enter("front::the_front_outlives_restarts_and_a_kill_of_the_agent_under_load") {
        return;
    }
    let public = free_port();
    let ports = free_ports::<2>();
    let pm2_home = tempfile::tempdir().unwrap();
    let _guard = Pm2Home(pm2_home.path().to_owned());
    let node = pm2_fork_node(public, ports, pm2_home.path());
    struct Stop<'a>(&'a Node);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = self.0.run(&["stop", "--app", "web"]);
        }
    }
    let _stop = Stop(&node);
    let artifact = |v: &str| {
        let server = PM2_SERVER.replace("__RELEASE__", v);
        node.artifact(&format!("{v}.tar.gz"), &[("server.js", server.as_str())])
    };
    let r = node.deploy_json(&artifact("v0"), "v0").ok().json();
    assert_eq!(r["outcome"], "succeeded", "{r:#}");
    let load = Load::start(public, "/", 2, 1, LOAD_TIME, LOAD_REQUESTS);
    // `slipway-agent run` starts, stops (SIGTERM), starts and is killed.
    let mut agent = RunningAgent::start(&node);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(agent.stop(), Some(0));
    let mut agent = RunningAgent::start(&node);
    std::thread::sleep(Duration::from_secs(1));
    agent.kill();
    // A deploy after all that switches as usual.
    let r = node.deploy_json(&artifact("v1"), "v1").ok().json();
    assert_eq!(r["outcome"], "succeeded", "{r:#}");
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    eprintln!(
        "agent restarts and a kill -9 under load: {}",
        report.summary()
    );
    assert_eq!(report.failures(), 0, "{}", report.summary());
    assert!(report.ok >= 200, "too little load: {}", report.summary());
    assert!(
        report.bodies.contains(&"v1".to_owned()),
        "{}",
        report.summary()
    );

    // The front itself killed (as by a reboot): `run` starts it again on
    // its recorded target.
    let state: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(node.root.join(".slipway/run/front.json")).unwrap(),
    )
    .unwrap();
    let pid = state["pid"].as_u64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the front to be gone", Duration::from_secs(10), || {
        !Path::new(&format!("/proc/{pid}")).exists()
    });
    // Its kernel rules stay, pointing at the live release: this machine's
    // clients are still served.
    assert!(http_get(public, "/").is_some_and(|(_, b)| b.starts_with("v1 ")));
    let _agent = RunningAgent::start(&node);
    wait_until(
        "run to start the front again",
        Duration::from_secs(30),
        || {
            fs::read_to_string(node.root.join(".slipway/run/front.json"))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .is_some_and(|s| {
                    s["pid"].as_u64() != Some(pid as u64) && s["kernel"]["table"].is_string()
                })
        },
    );
    assert!(http_get(public, "/").is_some_and(|(_, b)| b.starts_with("v1 ")));
}

#[test]
fn a_kill_of_the_agent_around_the_switch_leaves_one_consistent_release_serving() {
    // In a network namespace of its own: the front forwards in the kernel
    // (nftables) there, as it does by default.
    if !netns::enter(
        "front::a_kill_of_the_agent_around_the_switch_leaves_one_consistent_release_serving",
    ) {
        return;
    }
    let public = free_port();
    let ports = free_ports::<2>();
    let pm2_home = tempfile::tempdir().unwrap();
    let _guard = Pm2Home(pm2_home.path().to_owned());
    let node = pm2_fork_node(public, ports, pm2_home.path());
    struct Stop<'a>(&'a Node);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = self.0.run(&["stop", "--app", "web"]);
        }
    }
    let _stop = Stop(&node);
    let artifact = |v: &str| {
        let server = PM2_SERVER.replace("__RELEASE__", v);
        node.artifact(&format!("{v}.tar.gz"), &[("server.js", server.as_str())])
    };
    let r = node.deploy_json(&artifact("v0"), "v0").ok().json();
    assert_eq!(r["outcome"], "succeeded", "{r:#}");
    let load = Load::start(public, "/", 2, 1, LOAD_TIME, LOAD_REQUESTS);
    for (i, point) in slipway_agent::fault::FRONT_POINTS.iter().enumerate() {
        let v = format!("v{}", i + 1);
        node.deploy_killed_at(point, &artifact(&v), &v);
        // The next command finds the interrupted deploy and undoes it: the
        // front goes back to (or stays on) v0's process set, v's is deleted.
        let rel = node.releases();
        assert!(
            rel["recovered"]
                .as_str()
                .unwrap_or_default()
                .contains("deploy interrupted"),
            "{point}: {rel:#}"
        );
        assert_eq!(node.current().as_deref(), Some("v0"), "{point}");
        assert_eq!(
            http_get(public, "/").unwrap().1.split(' ').next(),
            Some("v0")
        );
        let st = node.run(&["status", "--json"]).ok().json();
        let procs = st["apps"][0]["processes"]["processes"].as_array().unwrap();
        assert_eq!(procs.len(), 1, "{point}: {st:#}");
        let notes = st["apps"][0]["processes"]["notes"].to_string();
        assert!(notes.contains("(release v0)"), "{point}: {st:#}");
        // The kernel forwards to v0's process set too.
        assert!(
            notes.contains("kernel-forwarded for local clients"),
            "{point}: {st:#}"
        );
        let rules = std::process::Command::new("nft")
            .args([
                "list",
                "table",
                "ip",
                &slipway_agent::front::kernel::table_name(&node.root),
            ])
            .output()
            .unwrap();
        let rules = String::from_utf8_lossy(&rules.stdout);
        assert!(
            rules.contains(&format!("dnat to 127.0.0.1:{}", ports[0])),
            "{point}: {rules}"
        );
    }
    let report = load.stop();
    eprintln!("kills around the switch under load: {}", report.summary());
    assert_eq!(report.failures(), 0, "{}", report.summary());
}
