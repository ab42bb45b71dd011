//! `slipway-agent run` keeps every app running: it reconciles what each
//! driver runs with the app's current release (a "reboot" that took the PM2
//! daemon down, `pm2 delete`, `docker rm -f`, stopped containers, a killed
//! exec supervisor) and repairs it behind the health gate; it restarts an
//! app that fails its liveness check, with backoff, and stops at a crash
//! loop. An app stopped on purpose is left alone. Real PM2, dockerd and
//! processes.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::support::{
    busybox_image_on, docker_cli, docker_cli_on, exec_python_web, free_port, free_ports, http_get,
    tar_of, targz, wait_until, Node, PrivateDockerd, RawTar, RunningAgent, SAMPLE_APP,
};

/// Kills this test's PM2 daemon, whatever happened.
struct Pm2Home(PathBuf);

impl Drop for Pm2Home {
    fn drop(&mut self) {
        let _ = pm2(&self.0, &["kill"]);
    }
}

fn pm2(home: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new("pm2")
        .args(args)
        .env("PM2_HOME", home)
        .output()
        .unwrap()
}

const PM2_SERVER: &str = r#"'use strict';
const http = require('http');
const fs = require('fs');
const VERSION = fs.readFileSync('VERSION', 'utf8').trim();
http.createServer((req, res) => {
  res.writeHead(200, { 'content-length': Buffer.byteLength(VERSION), connection: 'close' });
  res.end(VERSION);
}).listen(Number(process.env.PORT), '127.0.0.1');
"#;

fn status(node: &Node) -> Value {
    node.run(&["status", "--json"]).ok().json()
}

/// The app's node events (`status --json`), oldest first.
fn events(node: &Node) -> Vec<Value> {
    status(node)["apps"][0]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// App `app`'s node events, on a node with several apps.
fn events_of(node: &Node, app: &str) -> Vec<Value> {
    let st = status(node);
    let apps = st["apps"].as_array().unwrap();
    let a = apps
        .iter()
        .find(|a| a["app"] == app)
        .unwrap_or_else(|| panic!("no app {app} in {st:#}"));
    a["events"].as_array().cloned().unwrap_or_default()
}

fn serves(port: u16, version: &str) -> bool {
    http_get(port, "/").is_some_and(|(code, body)| code == 200 && body.trim() == version)
}

/// Waits a few liveness intervals: long enough for `run` to have acted if
/// it were going to (the test then checks that it did not).
fn some_passes() {
    std::thread::sleep(Duration::from_secs(2));
}

#[test]
fn pm2_reboot_and_pm2_delete_are_repaired_and_a_stopped_app_is_left_alone() {
    let port = free_port();
    let pm2_home = tempfile::tempdir().unwrap();
    let _guard = Pm2Home(pm2_home.path().to_owned());
    let node = Node::new(&format!(
        r#"
[apps.web.run]
driver = "pm2"
script = "server.js"
instances = 1
exec_mode = "fork"
pm2_home = "{}"

[apps.web.health]
check = "http"
url = "http://127.0.0.1:{port}/"
interval = "100ms"
successes = 2
start_period = "1s"
deadline = "30s"
liveness_interval = "300ms"
"#,
        pm2_home.path().display()
    ));
    fs::write(node.root.join("shared/.env"), format!("PORT={port}\n")).unwrap();
    let art = node.artifact("v1.tar.gz", &[("server.js", PM2_SERVER), ("VERSION", "v1")]);
    node.deploy(&art, "v1").ok();
    assert!(serves(port, "v1"));

    // A reboot: PM2's daemon is gone, and no `pm2 startup` brings it back.
    assert!(pm2(pm2_home.path(), &["kill"]).status.success());
    assert!(http_get(port, "/").is_none());
    let _agent = RunningAgent::start(&node);
    wait_until(
        "run to bring the app back after the reboot",
        Duration::from_secs(30),
        || serves(port, "v1"),
    );
    let ev = events(&node);
    assert_eq!(ev.len(), 1, "{ev:#?}");
    assert_eq!(ev[0]["kind"], "APP_RESTORED");
    assert_eq!(ev[0]["release"], "v1");
    assert!(
        ev[0]["cause"]
            .as_str()
            .unwrap()
            .contains("PM2 daemon is not running"),
        "{ev:#?}"
    );
    assert_eq!(ev[0]["ok"], true, "{ev:#?}");

    // `pm2 delete` by hand.
    assert!(pm2(pm2_home.path(), &["delete", "web"]).status.success());
    wait_until(
        "run to restore the deleted app",
        Duration::from_secs(30),
        || serves(port, "v1") && events(&node).len() == 2,
    );
    let ev = events(&node);
    // What the pass saw depends on when it came: the process gone, or
    // PM2 still deleting it (`stopping`): both are the drift to repair.
    let cause = ev[1]["cause"].as_str().unwrap();
    assert!(
        cause.contains("no process named") || cause.contains("is stopping"),
        "{ev:#?}"
    );

    // Stopped on purpose: left alone, through every liveness pass.
    node.run(&["stop", "--app", "web"]).ok();
    assert!(http_get(port, "/").is_none());
    some_passes();
    assert!(
        http_get(port, "/").is_none(),
        "run restarted an app stopped on purpose"
    );
    assert_eq!(events(&node).len(), 2, "{:#?}", events(&node));
    let st = status(&node);
    assert!(
        st["apps"][0]["stopped"]["by"] == "slipway-agent stop",
        "{st:#}"
    );

    // `start` clears the stop; a later `pm2 delete` is repaired again.
    node.run(&["start", "--app", "web"]).ok();
    assert!(serves(port, "v1"));
    assert!(status(&node)["apps"][0]["stopped"].is_null());
    assert!(pm2(pm2_home.path(), &["delete", "web"]).status.success());
    wait_until(
        "run to restore the app after start",
        Duration::from_secs(30),
        || serves(port, "v1") && events(&node).len() == 3,
    );
}

/// Removes the app's containers and the test's images, whatever happened.
struct DockerCleanup {
    app: String,
    images: Vec<String>,
}

impl Drop for DockerCleanup {
    fn drop(&mut self) {
        let ids = docker_cli(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=slipway.app={}", self.app),
        ]);
        for id in ids.split_whitespace() {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f", id])
                .output();
        }
        let reference = format!("reference=slipway/{}:*", self.app.to_ascii_lowercase());
        let images = docker_cli(&["images", "-q", "--filter", &reference]);
        for i in images
            .split_whitespace()
            .map(str::to_owned)
            .chain(self.images.clone())
        {
            let _ = std::process::Command::new("docker")
                .args(["rmi", "-f", &i])
                .output();
        }
    }
}

/// The names of the app's containers in state `running`.
fn running(app: &str) -> Vec<String> {
    running_on(None, app)
}

/// [`running`] in the engine at `socket` (the machine's when `None`).
fn running_on(socket: Option<&Path>, app: &str) -> Vec<String> {
    docker_cli_on(
        socket,
        &[
            "ps",
            "--filter",
            &format!("label=slipway.app={app}"),
            "--format",
            "{{.Names}}",
        ],
    )
    .split_whitespace()
    .map(str::to_owned)
    .collect()
}

/// `[apps.APP]` of a Docker app on `ports` (busybox httpd on 3000), with
/// `restart_after` (the default when `None`), `extra` keys added to its
/// `[run]` table.
fn docker_app(
    app: &str,
    root: &Path,
    ports: [u16; 2],
    restart_after: Option<u32>,
    extra: &str,
) -> String {
    let restart_after = restart_after.map_or(String::new(), |n| format!("restart_after = {n}"));
    format!(
        r#"[apps.{app}]
root = "{}"
{restart_after}

[apps.{app}.run]
driver = "docker"
image_archive = "image.tar"
container_port = 3000
ports = [{}, {}]
host_ip = "127.0.0.1"
memory = "64MiB"
stop_grace = "1s"
{extra}

[apps.{app}.health]
check = "http"
url = "http://127.0.0.1:{{port}}/api/health"
interval = "100ms"
successes = 2
start_period = "500ms"
deadline = "20s"
liveness_interval = "300ms"
"#,
        root.display(),
        ports[0],
        ports[1]
    )
}

/// Builds image `slipway-keep-APP:VERSION` in the engine at `socket`, saves
/// it into an artifact (`image.tar`), deploys that with `slipway-agent
/// deploy` and returns the port the release went live on.
fn deploy_image(node: &Node, socket: Option<&Path>, app: &str, version: &str) -> u16 {
    let tag = format!("slipway-keep-{app}:{version}");
    busybox_image_on(socket, node.dir.path(), &tag, version, true);
    let saved = node.dir.path().join(format!("{app}-{version}-image.tar"));
    docker_cli_on(socket, &["save", "-o", saved.to_str().unwrap(), &tag]);
    let tar = RawTar::default()
        .file("image.tar", 0o644, &fs::read(&saved).unwrap())
        .finish();
    let art = node.dir.path().join(format!("{app}-{version}.tar.gz"));
    fs::write(&art, targz(&tar)).unwrap();
    let r = node
        .run(&[
            "deploy",
            "--app",
            app,
            "--artifact",
            art.to_str().unwrap(),
            "--id",
            version,
            "--json",
        ])
        .ok()
        .json();
    r["activation"]["port"].as_u64().unwrap() as u16
}

#[test]
fn docker_rm_and_stopped_containers_are_restored_on_the_live_port() {
    let app = format!("keep{}", std::process::id());
    let ports = free_ports::<2>();
    // No liveness restarts: the test watches what reconcile does.
    let node =
        Node::with_config(|root| docker_app(&app, root, ports, Some(0), r#"restart = "no""#));
    let mut cleanup = DockerCleanup {
        app: app.clone(),
        images: Vec::new(),
    };
    let mut live_port = 0;
    for v in ["v1", "v2"] {
        cleanup.images.push(format!("slipway-keep-{app}:{v}"));
        live_port = deploy_image(&node, None, &app, v);
    }
    // v2 is live on the second port of the pair; v1's container is gone.
    assert_eq!(live_port, ports[1]);
    assert!(serves(live_port, "v2"));
    let live = format!("slipway-{app}-v2");
    assert_eq!(running(&app), vec![live.clone()]);
    let _agent = RunningAgent::start(&node);

    // `docker rm -f` of the live container.
    docker_cli(&["rm", "-f", &live]);
    wait_until(
        "run to recreate the container",
        Duration::from_secs(30),
        || serves(live_port, "v2"),
    );
    assert_eq!(running(&app), vec![live.clone()]);
    let ev = events(&node);
    assert_eq!(ev.len(), 1, "{ev:#?}");
    // Seen while dockerd still removes it, or once it is gone.
    let cause = ev[0]["cause"].as_str().unwrap();
    assert!(
        cause.contains("is gone") || cause.contains("is removing"),
        "{ev:#?}"
    );
    assert!(
        ev[0]["outcome"]
            .as_str()
            .unwrap()
            .contains(&format!("on port {live_port}")),
        "{ev:#?}"
    );

    // `docker stop` by hand: the live container stopped (what a dockerd
    // restart leaves with restart = "no", tested for real below). Brought
    // back, same port.
    docker_cli(&["stop", "-t", "1", &live]);
    wait_until(
        "run to start the stopped container",
        Duration::from_secs(30),
        || serves(live_port, "v2") && events(&node).len() == 2,
    );
    let ev = events(&node);
    assert!(
        ev[1]["cause"].as_str().unwrap().contains("exited"),
        "{ev:#?}"
    );
    assert!(
        ev[1]["outcome"].as_str().unwrap().contains("started again"),
        "{ev:#?}"
    );
    assert_eq!(running(&app), vec![live.clone()]);

    // A container of an older release still live (started by hand, or
    // left by an old engine state): retired, the live one kept.
    let old = format!("slipway-{app}-v1");
    docker_cli(&[
        "run",
        "-d",
        "--name",
        &old,
        "--label",
        &format!("slipway.app={app}"),
        "--label",
        "slipway.release=v1",
        &format!("slipway-keep-{app}:v1"),
    ]);
    wait_until(
        "run to retire the old release's container",
        Duration::from_secs(30),
        || running(&app) == vec![live.clone()] && events(&node).len() == 3,
    );
    let ev = events(&node);
    assert!(
        ev[2]["cause"]
            .as_str()
            .unwrap()
            .contains(&format!("{old} of release v1 is still live")),
        "{ev:#?}"
    );
    assert!(
        ev[2]["outcome"].as_str().unwrap().contains("kept"),
        "{ev:#?}"
    );
    assert!(serves(live_port, "v2"));
    assert_eq!(
        node.run(&["releases", "--app", &app, "--json"]).ok().json()["current"],
        "v2"
    );
}

#[test]
fn dockerd_restarted_brings_the_current_release_back_on_its_live_port() {
    // An engine of the test's own: restarting the machine's dockerd would
    // disturb the tests running beside this one.
    let mut engine = PrivateDockerd::start();
    let socket = engine.socket();
    let pid = std::process::id();
    // restart = "no": dockerd leaves the container stopped, `run` starts it.
    let by_run = format!("dkn{pid}");
    // The driver's default policy (unless-stopped): dockerd starts the
    // container itself, and `run` must find nothing to repair. Both apps
    // keep the default restart_after (3): the liveness failures while
    // dockerd is down restart nothing, as such a restart would fail too.
    let by_engine = format!("dku{pid}");
    let (run_ports, engine_ports) = (free_ports::<2>(), free_ports::<2>());
    let sock = format!("docker_socket = \"{}\"", socket.display());
    let node = Node::with_config(|root| {
        format!(
            "{}\n{}",
            docker_app(
                &by_run,
                &root.join(&by_run),
                run_ports,
                None,
                &format!("restart = \"no\"\n{sock}")
            ),
            docker_app(
                &by_engine,
                &root.join(&by_engine),
                engine_ports,
                None,
                &sock
            )
        )
    });
    for (app, ports) in [(&by_run, run_ports), (&by_engine, engine_ports)] {
        let mut live_port = 0;
        for v in ["v1", "v2"] {
            live_port = deploy_image(&node, Some(&socket), app, v);
        }
        assert_eq!(live_port, ports[1], "{app}");
        assert!(serves(live_port, "v2"), "{app}");
        assert_eq!(
            running_on(Some(&socket), app),
            vec![format!("slipway-{app}-v2")]
        );
    }
    let id_of = |app: &str| {
        docker_cli_on(
            Some(&socket),
            &["inspect", "-f", "{{.Id}}", &format!("slipway-{app}-v2")],
        )
    };
    let ids = [id_of(&by_run), id_of(&by_engine)];
    assert_eq!(
        engine.cli(&[
            "inspect",
            "-f",
            "{{.Config.StopTimeout}}",
            &format!("slipway-{by_run}-v2")
        ]),
        "1"
    );
    let _agent = RunningAgent::start(&node);
    some_passes();
    assert!(events_of(&node, &by_run).is_empty());
    assert!(events_of(&node, &by_engine).is_empty());

    let old_pid = engine.pid();
    let took = engine.restart();
    assert_ne!(engine.pid(), old_pid);
    // The containers carry stop_grace (1 s) as their stop timeout: dockerd
    // does not wait Docker's default 10 s for httpd, which ignores SIGTERM.
    assert!(
        took < Duration::from_secs(8),
        "dockerd took {took:?} to stop"
    );
    wait_until(
        "both apps to serve v2 again after the dockerd restart",
        Duration::from_secs(60),
        || serves(run_ports[1], "v2") && serves(engine_ports[1], "v2"),
    );
    wait_until("run to record the repair", Duration::from_secs(30), || {
        !events_of(&node, &by_run).is_empty()
    });
    let ev = events_of(&node, &by_run);
    assert_eq!(ev.len(), 1, "{ev:#?}");
    assert_eq!(ev[0]["kind"], "APP_RESTORED", "{ev:#?}");
    assert_eq!(ev[0]["release"], "v2", "{ev:#?}");
    assert_eq!(ev[0]["ok"], true, "{ev:#?}");
    assert!(
        ev[0]["cause"].as_str().unwrap().contains("is exited"),
        "{ev:#?}"
    );
    assert!(
        ev[0]["outcome"]
            .as_str()
            .unwrap()
            .contains(&format!("on port {} started again", run_ports[1])),
        "{ev:#?}"
    );
    // The same containers, on the same ports, and nothing else running.
    assert_eq!(ids, [id_of(&by_run), id_of(&by_engine)]);
    for app in [&by_run, &by_engine] {
        assert_eq!(
            running_on(Some(&socket), app),
            vec![format!("slipway-{app}-v2")]
        );
        assert_eq!(
            node.run(&["releases", "--app", app, "--json"]).ok().json()["current"],
            "v2"
        );
    }
    // Docker brought the other app back itself: no repair, then or later.
    some_passes();
    assert!(
        events_of(&node, &by_engine).is_empty(),
        "{:#?}",
        events_of(&node, &by_engine)
    );
    assert_eq!(events_of(&node, &by_run).len(), 1);
    assert!(serves(run_ports[1], "v2") && serves(engine_ports[1], "v2"));
}

/// An exec app (`python3 server.py`) on a free port, `keys` added to
/// `[apps.web]`.
fn exec_node(keys: &str) -> (Node, u16) {
    let port = free_port();
    let node = Node::new(&format!(
        r#"{keys}
{}status = "200-299"
interval = "100ms"
successes = 2
retries = 1
start_period = "1s"
deadline = "15s"
liveness_interval = "250ms"
"#,
        exec_python_web(&format!("http://127.0.0.1:{port}/api/health"))
    ));
    fs::write(node.root.join("shared/.env"), format!("PORT={port}\n")).unwrap();
    (node, port)
}

/// Stops the exec app's supervisor, whatever the test did.
struct ExecApp<'a>(&'a Node);

impl Drop for ExecApp<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(&["stop", "--app", "web"]);
    }
}

fn exec_release(node: &Node, version: &str, server: &str) -> PathBuf {
    let path = node.dir.path().join(format!("{version}.tar.gz"));
    fs::write(
        &path,
        targz(&tar_of(&[("server.py", server), ("VERSION", version)])),
    )
    .unwrap();
    path
}

/// SIGKILLs the exec supervisor and its child, as a reboot or the OOM
/// killer would.
fn kill_supervisor_and_child(node: &Node) {
    let state: Value =
        serde_json::from_slice(&fs::read(node.root.join(".slipway/run/state.json")).unwrap())
            .unwrap();
    for key in ["supervisor_pid", "child_pid"] {
        let pid = state[key].as_i64().unwrap() as i32;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

#[test]
fn exec_supervisor_and_child_killed_are_restored_and_a_stopped_app_is_not() {
    let (node, port) = exec_node("");
    let _app = ExecApp(&node);
    node.deploy(&exec_release(&node, "v1", SAMPLE_APP), "v1")
        .ok();
    assert!(serves(port, "v1"));
    let _agent = RunningAgent::start(&node);
    kill_supervisor_and_child(&node);
    wait_until(
        "run to restore the killed app",
        Duration::from_secs(30),
        || serves(port, "v1") && !events(&node).is_empty(),
    );
    let ev = events(&node);
    assert_eq!(ev[0]["kind"], "APP_RESTORED", "{ev:#?}");
    assert!(
        ev[0]["cause"]
            .as_str()
            .unwrap()
            .contains("supervisor is not running"),
        "{ev:#?}"
    );

    node.run(&["stop", "--app", "web"]).ok();
    some_passes();
    assert!(
        http_get(port, "/").is_none(),
        "run restarted an app stopped on purpose"
    );
    assert_eq!(events(&node).len(), 1);
    node.run(&["start", "--app", "web"]).ok();
    assert!(serves(port, "v1"));
}

/// The sample app, exiting 3 s after it started: it passes its health gate
/// and then dies, again and again.
fn crashing_app() -> String {
    format!("import os, threading\nthreading.Timer(3.0, lambda: os._exit(1)).start()\n{SAMPLE_APP}")
}

#[test]
fn a_release_that_keeps_dying_is_restarted_with_backoff_then_marked_crashlooping() {
    let (node, port) = exec_node(
        "restart_after = 2\nmax_restarts = 3\nrestart_window = \"10m\"\nrestart_backoff = \"1s\"",
    );
    let _app = ExecApp(&node);
    node.deploy(&exec_release(&node, "v1", &crashing_app()), "v1")
        .ok();
    let _agent = RunningAgent::start(&node);
    wait_until(
        "the app to be marked crashlooping",
        Duration::from_secs(120),
        || !status(&node)["apps"][0]["crashloop"].is_null(),
    );
    let st = status(&node);
    let app = &st["apps"][0];
    assert_eq!(app["crashloop"]["release"], "v1", "{app:#}");
    assert_eq!(app["crashloop"]["restarts"], 3, "{app:#}");
    // Backoff: none before the first restart, then 1 s, then 2 s at least.
    let t: Vec<i64> = app["restarts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert_eq!(t.len(), 3, "{app:#}");
    assert!(t[1] - t[0] >= 1 && t[2] - t[1] >= 2, "restarts at {t:?}");
    let kinds: Vec<&str> = app["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        [
            "APP_RESTORED",
            "APP_RESTORED",
            "APP_RESTORED",
            "APP_CRASHLOOPING"
        ],
        "{app:#}"
    );
    assert!(
        app["events"][0]["cause"]
            .as_str()
            .unwrap()
            .contains("liveness failures in a row"),
        "{app:#}"
    );
    // No rollback configured: v1 stays current, no more restarts.
    assert_eq!(node.current().as_deref(), Some("v1"));
    some_passes();
    assert_eq!(
        status(&node)["apps"][0]["events"].as_array().unwrap().len(),
        4
    );
    // `start` clears the crash loop.
    let _ = http_get(port, "/");
    node.run(&["start", "--app", "web"]).ok();
    assert!(status(&node)["apps"][0]["crashloop"].is_null());
}

#[test]
fn recovery_keys_are_checked_with_clear_errors() {
    let node = Node::new("restart_after = -1\nmax_restarts = 0\nrestart_window = \"0s\"\nrollback_on_crashloop = true\n");
    let run = node.run(&["status"]).fails(64);
    for key in [
        "apps.web.restart_after",
        "apps.web.max_restarts",
        "apps.web.restart_window",
        "apps.web.rollback_on_crashloop",
    ] {
        assert!(run.stderr.contains(key), "{key} not named: {}", run.stderr);
    }
    assert!(
        run.stderr.contains("needs a health check"),
        "{}",
        run.stderr
    );
}

#[test]
fn run_logs_one_app_as_one() {
    use std::io::{BufRead as _, BufReader};
    let (node, _port) = exec_node("");
    let mut child = node
        .cmd(&["run"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = None;
    for line in lines {
        let line = line.unwrap();
        if line.contains("agent running") {
            seen = Some(line);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let line = seen.expect("no 'agent running' line");
    assert!(line.contains("apps=1 "), "{line}");
    assert!(line.contains("liveness_checks=1"), "{line}");
}
