//! The exec driver end to end through the real binary: the agent supervises
//! a small Python HTTP server, the health gate decides, and a release that
//! answers 500 on /api/health ends rolled back with the previous one serving.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::{
    exec_python_web, free_port, http_get, tar_of, targz, wait_until, Node, RunningAgent, SAMPLE_APP,
};
use serde_json::Value;

const SECRET: &str = "s3cr3t-never-shown";

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

fn app(extra_health: &str) -> App {
    let port = free_port();
    let node = Node::new(&format!(
        r#"{}status = "200-299"
interval = "100ms"
successes = 2
retries = 2
start_period = "1s"
deadline = "15s"
liveness_interval = "200ms"
{extra_health}
"#,
        exec_python_web(&format!("http://127.0.0.1:{port}/api/health"))
    ));
    fs::write(
        node.root.join("shared/.env"),
        format!(
            "PORT={port}\nAPI_KEY={SECRET}\nSICK_FILE={}\n",
            node.root.join("shared/fail").display()
        ),
    )
    .unwrap();
    App { node, port }
}

fn release(node: &Node, version: &str, health: Option<u16>) -> PathBuf {
    let mut files = vec![
        ("server.py", SAMPLE_APP.to_owned()),
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

fn deploy_json(node: &Node, artifact: &Path, id: &str) -> (Option<i32>, Value) {
    let run = node.deploy_json(artifact, id);
    (run.code, run.json())
}

fn status(node: &Node) -> Value {
    node.run(&["status", "--json"]).ok().json()
}

#[test]
fn unhealthy_release_is_rolled_back_and_previous_keeps_serving() {
    let a = app("");
    let v1 = release(&a.node, "v1", None);
    let (code, rep) = deploy_json(&a.node, &v1, "v1");
    assert_eq!(code, Some(0), "{rep:#}");
    assert_eq!(rep["outcome"], "succeeded");
    assert!(rep["health"]["probes"].as_u64().unwrap() >= 2, "{rep:#}");
    assert_eq!(http_get(a.port, "/").unwrap().1, "v1");

    let v2 = release(&a.node, "v2", Some(500));
    let (code, rep) = deploy_json(&a.node, &v2, "v2");
    assert_eq!(code, Some(1), "{rep:#}");
    assert_eq!(rep["outcome"], "rolled_back", "{rep:#}");
    let failure = rep["failure"].as_str().unwrap();
    assert!(
        failure.contains("HTTP 500"),
        "last check output missing: {failure}"
    );
    let restored = rep["restored"].as_str().unwrap();
    assert!(
        restored.contains("current restored to v1") && restored.contains("healthy"),
        "{restored}"
    );
    assert_eq!(a.node.current().as_deref(), Some("v1"));
    let (code, body) = http_get(a.port, "/api/health").unwrap();
    assert_eq!((code, body.as_str()), (200, "v1"));
    let st = a.node.statuses();
    assert!(st.contains(&("v2".into(), "failed".into())), "{st:?}");
    let log = fs::read_to_string(a.node.root.join(".slipway/logs/v2.log")).unwrap();
    assert!(
        log.contains("health gate failed") && log.contains("ROLLED BACK"),
        "{log}"
    );

    // Status shows the supervised process, typed, and no environment values.
    let s = status(&a.node);
    let text = s.to_string();
    assert!(!text.contains(SECRET), "status leaked an environment value");
    let proc_ = &s["apps"][0]["processes"]["processes"][0];
    assert_eq!(proc_["status"], "running", "{s:#}");
    assert_eq!(proc_["release"], "v1");
    assert!(proc_["memory_bytes"].as_u64().unwrap() > 0, "{s:#}");
    assert!(s["node"]["mem_total_bytes"].as_u64().unwrap() > 0);
    assert!(s["node"]["disks"][0]["total_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn supervisor_restarts_a_crashed_app_and_rollback_restarts_the_old_release() {
    let a = app("");
    a.node.deploy(&release(&a.node, "v1", None), "v1").ok();
    a.node.deploy(&release(&a.node, "v2", None), "v2").ok();
    assert_eq!(http_get(a.port, "/").unwrap().1, "v2");
    let pid = status(&a.node)["apps"][0]["processes"]["processes"][0]["pid"]
        .as_u64()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the app to be restarted", Duration::from_secs(20), || {
        let p = &status(&a.node)["apps"][0]["processes"]["processes"][0];
        p["pid"].as_u64().is_some_and(|n| n != pid)
            && p["restarts"].as_u64() == Some(1)
            && http_get(a.port, "/").is_some()
    });

    let rep = a
        .node
        .run(&["rollback", "--app", "web", "--json"])
        .ok()
        .json();
    assert_eq!(rep["to"], "v1");
    assert!(rep["health"]["probes"].as_u64().is_some(), "{rep:#}");
    assert_eq!(http_get(a.port, "/").unwrap().1, "v1");

    a.node.run(&["stop", "--app", "web"]).ok();
    assert!(
        http_get(a.port, "/").is_none(),
        "app still answers after stop"
    );
    let p = &status(&a.node)["apps"][0]["processes"]["processes"][0];
    assert!(p["status"].as_str().unwrap().contains("stopped"), "{p:#}");
    a.node.run(&["restart", "--app", "web"]).ok();
    assert_eq!(http_get(a.port, "/").unwrap().1, "v1");
}

#[test]
fn first_release_failing_its_gate_leaves_nothing_running() {
    let a = app("");
    let (code, rep) = deploy_json(&a.node, &release(&a.node, "v1", Some(500)), "v1");
    assert_eq!(code, Some(1));
    assert_eq!(rep["outcome"], "rolled_back");
    assert!(
        rep["restored"]
            .as_str()
            .unwrap()
            .contains("stopped the app"),
        "{rep:#}"
    );
    assert!(a.node.current().is_none());
    assert!(http_get(a.port, "/").is_none());
}

#[test]
fn crash_after_going_live_restores_the_previous_release_process() {
    let a = app("");
    a.node.deploy(&release(&a.node, "v1", None), "v1").ok();
    let v2 = release(&a.node, "v2", None);
    a.node.deploy_killed_at("before_commit", &v2, "v2");
    // The killed deploy left v2 running; the next command recovers.
    assert_eq!(http_get(a.port, "/").unwrap().1, "v2");
    let rel = a.node.releases();
    assert!(
        rel["recovered"]
            .as_str()
            .unwrap()
            .contains("exec restarted v1"),
        "{rel:#}"
    );
    assert_eq!(http_get(a.port, "/").unwrap().1, "v1");
}

#[test]
fn liveness_failures_are_recorded_with_timestamps() {
    let a = app("");
    a.node.deploy(&release(&a.node, "v1", None), "v1").ok();
    // As after a reboot: no supervisor (nor app). `run` brings the app back
    // first. (`stop` would be a stop on purpose, which `run` leaves alone.)
    let state: Value =
        serde_json::from_slice(&fs::read(a.node.root.join(".slipway/run/state.json")).unwrap())
            .unwrap();
    for key in ["supervisor_pid", "child_pid"] {
        let pid = nix::unistd::Pid::from_raw(state[key].as_i64().unwrap() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
    wait_until(
        "the app to die with its supervisor",
        Duration::from_secs(10),
        || http_get(a.port, "/").is_none(),
    );
    // A panic below drops the agent, which stops it.
    let mut agent = RunningAgent::start(&a.node);
    wait_until(
        "the app to be started by the agent",
        Duration::from_secs(20),
        || http_get(a.port, "/").is_some_and(|(_, body)| body == "v1"),
    );
    wait_until("a healthy liveness record", Duration::from_secs(20), || {
        status(&a.node)["apps"][0]["liveness"]["healthy"] == true
    });
    fs::write(a.node.root.join("shared/fail"), "").unwrap();
    wait_until(
        "liveness to turn unhealthy",
        Duration::from_secs(20),
        || status(&a.node)["apps"][0]["liveness"]["healthy"] == false,
    );
    let l = &status(&a.node)["apps"][0]["liveness"];
    let f = &l["failures"][0];
    assert!(f["output"].as_str().unwrap().contains("HTTP 503"), "{l:#}");
    assert!(f["at"].as_str().unwrap().starts_with("20"), "{l:#}");
    assert_eq!(l["release"], "v1");
    assert_eq!(agent.stop(), Some(0), "the agent's exit code on SIGTERM");
}

#[test]
fn bad_run_and_health_config_is_refused_with_keys() {
    let node = Node::new("[apps.web.run]\ndriver = \"systemd\"\n[apps.web.health]\ncheck = \"http\"\nurl = \"ftp://x\"\nsuccesses = 0\n");
    let run = node.run(&["status"]).fails(64);
    assert!(run.stderr.contains("apps.web.run.driver"), "{}", run.stderr);
    assert!(run.stderr.contains("apps.web.health.url"), "{}", run.stderr);
    assert!(
        run.stderr.contains("apps.web.health.successes"),
        "{}",
        run.stderr
    );
    let node = Node::new("[apps.web.run]\ndriver = \"exec\"\ncommand = [\"x\"]\nports = [1, 2]\n");
    let run = node.run(&["status"]).fails(64);
    assert!(
        run.stderr
            .contains("apps.web.run.ports: is not a setting of the exec driver"),
        "{}",
        run.stderr
    );
}
