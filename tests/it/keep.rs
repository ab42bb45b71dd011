//! The agent keeps its apps running, seen from the controller: a repair
//! made while the controller is away reaches its audit log when the agent
//! reconnects (once); a release that passes its gate and then dies again
//! and again is restarted, marked crashlooping — `slipway status` names it
//! and exits 1 — and, when configured, rolled back by the agent itself,
//! audited like a rollback; `slipway stop` / `slipway start` stop an app on
//! purpose (the agent leaves it alone) and run it again.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use serde_json::Value;

use crate::support::{text, wait_until, Agent, Controller, APP};

/// The sample app, exiting 3 s after it started: it passes its health gate
/// and then dies, again and again.
fn crashing_app() -> String {
    format!("import os, threading\nthreading.Timer(3.0, lambda: os._exit(1)).start()\n{APP}")
}

/// Enrolls `name` with one exec app `web` and the recovery keys `keys`.
fn enroll(controller: &Controller, name: &str, keys: &str) -> Agent {
    let agent = Agent::enroll_with(controller, name, "web", |root, port| {
        format!(
            r#"[apps.web]
root = "{root}"
shared_files = [".env"]
{keys}

[apps.web.run]
driver = "exec"
command = ["python3", "server.py"]
stop_grace = "2s"

[apps.web.health]
check = "http"
url = "http://127.0.0.1:{port}/api/health"
interval = "100ms"
successes = 2
retries = 1
start_period = "1s"
deadline = "15s"
liveness_interval = "250ms"
"#,
            root = root.display(),
        )
    });
    fs::create_dir_all(agent.root.join("shared")).unwrap();
    fs::write(
        agent.root.join("shared/.env"),
        format!("PORT={}\n", agent.port),
    )
    .unwrap();
    agent
}

/// SIGKILLs the exec supervisor and its child, as a reboot would.
fn kill_app(agent: &Agent) {
    let state: Value =
        serde_json::from_slice(&fs::read(agent.root.join(".slipway/run/state.json")).unwrap())
            .unwrap();
    for key in ["supervisor_pid", "child_pid"] {
        let pid = nix::unistd::Pid::from_raw(state[key].as_i64().unwrap() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    }
}

fn of_type<'a>(events: &'a [Value], t: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["event_type"] == t).collect()
}

#[test]
fn repairs_and_a_crash_loop_rollback_reach_the_audit_log_once() {
    let mut controller = Controller::start();
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    let mut agent = enroll(
        &controller,
        "n1",
        "restart_after = 2\nmax_restarts = 3\nrestart_window = \"10m\"\nrestart_backoff = \"1s\"\n\
         rollback_on_crashloop = true\ncrashloop_grace = \"15m\"",
    );
    agent.deploy("v1");
    agent.run();
    controller.wait_online(&reader, 1, Duration::from_secs(30));

    // Killed while the controller is down: repaired at once, audited when
    // the agent reconnects.
    controller.stop();
    kill_app(&agent);
    wait_until(
        "the agent to restore the app",
        Duration::from_secs(30),
        || agent.get().as_deref() == Some("v1"),
    );
    controller.restart();
    wait_until(
        "APP_RESTORED in the audit log",
        Duration::from_secs(60),
        || !of_type(&controller.audit(&reader), "APP_RESTORED").is_empty(),
    );
    let events = controller.audit(&reader);
    let restored = of_type(&events, "APP_RESTORED");
    assert_eq!(restored.len(), 1, "{restored:#?}");
    let r = restored[0];
    assert_eq!(r["resource_id"], "web");
    assert_eq!(r["status"], "success");
    assert_eq!(r["details"]["node_name"], "n1", "{r:#}");
    assert_eq!(r["details"]["release_id"], "v1", "{r:#}");
    assert!(
        r["details"]["cause"]
            .as_str()
            .unwrap()
            .contains("supervisor is not running"),
        "{r:#}"
    );

    // v2 passes its gate, then dies every 3 s.
    let work = tempfile::tempdir().unwrap();
    let out = controller.deploy_version(&deployer, work.path(), "v2", &crashing_app(), &["--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_until(
        "the agent to roll the crashlooping v2 back to v1",
        Duration::from_secs(150),
        || agent.current().as_deref() == Some("v1") && agent.get().as_deref() == Some("v1"),
    );
    wait_until(
        "the rollback in the audit log",
        Duration::from_secs(30),
        || !of_type(&controller.audit(&reader), "ROLLBACK_COMPLETED").is_empty(),
    );
    let events = controller.audit(&reader);
    let looping = of_type(&events, "APP_CRASHLOOPING");
    assert_eq!(looping.len(), 1, "{looping:#?}");
    assert_eq!(looping[0]["details"]["release_id"], "v2");
    assert_eq!(looping[0]["status"], "error");
    let rollback = of_type(&events, "ROLLBACK_COMPLETED");
    assert_eq!(rollback.len(), 1, "{rollback:#?}");
    let rb = rollback[0];
    assert_eq!(rb["details"]["automatic"], true, "{rb:#}");
    assert_eq!(rb["details"]["from_release_id"], "v2", "{rb:#}");
    assert_eq!(rb["details"]["release_id"], "v1", "{rb:#}");
    assert!(
        rb["details"]["cause"]
            .as_str()
            .unwrap()
            .contains("crashlooping"),
        "{rb:#}"
    );
    // The drift repair, then three liveness restarts of v2.
    let restored = of_type(&events, "APP_RESTORED");
    assert_eq!(restored.len(), 4, "{restored:#?}");
    assert!(restored[1..]
        .iter()
        .all(|e| e["details"]["release_id"] == "v2"));
    // Never twice: every node event id once.
    let ids: Vec<&str> = events
        .iter()
        .filter_map(|e| e["details"]["event_id"].as_str())
        .collect();
    let unique: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(ids.len(), unique.len(), "{ids:?}");
    // The local deploy of v1, four repairs, the crash loop, the rollback.
    assert_eq!(ids.len(), 7, "{ids:?}");
    assert_eq!(of_type(&events, "NODE_LOCAL_DEPLOY").len(), 1);
    // v2 is marked bad on the node.
    let releases: Value =
        serde_json::from_slice(&agent.cli(&["releases", "--app", "web", "--json"]).stdout).unwrap();
    let v2 = releases["releases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "v2")
        .cloned()
        .unwrap();
    assert_eq!(v2["status"], "bad", "{releases:#}");
}

#[test]
fn crashlooping_in_slipway_status_and_stop_start_through_the_controller() {
    let controller = Controller::start();
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    let mut agent = enroll(
        &controller,
        "n1",
        "restart_after = 2\nmax_restarts = 2\nrestart_window = \"10m\"\nrestart_backoff = \"1s\"",
    );
    agent.deploy("v1");
    agent.run();
    controller.wait_online(&reader, 1, Duration::from_secs(30));

    // Stopped on purpose through the controller: left alone.
    let out = controller.slipway(&deployer, &["stop", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(agent.get(), None);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        agent.get(),
        None,
        "the agent restarted an app stopped on purpose"
    );
    let out = controller.slipway(&reader, &["status", "--refresh"]);
    assert!(
        out.status.success(),
        "a stop on purpose is no problem: {}",
        text(&out)
    );
    assert!(
        text(&out).contains("web is stopped on n1"),
        "{}",
        text(&out)
    );
    let out = controller.slipway(&deployer, &["start", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(agent.get().as_deref(), Some("v1"));

    let work = tempfile::tempdir().unwrap();
    let out = controller.deploy_version(&deployer, work.path(), "v2", &crashing_app(), &["--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut last = String::new();
    wait_until(
        "slipway status to name the crashlooping app",
        Duration::from_secs(150),
        || {
            let out = controller.slipway(&reader, &["status", "--refresh"]);
            last = text(&out);
            out.status.code() == Some(1) && last.contains("web on n1 (v2) is crashlooping")
        },
    );
    // The event travels beside the heartbeat: wait for it, bounded.
    wait_until(
        "APP_CRASHLOOPING in the audit log",
        Duration::from_secs(30),
        || !of_type(&controller.audit(&reader), "APP_CRASHLOOPING").is_empty(),
    );
    let events = controller.audit(&reader);
    for t in ["STOP_COMPLETED", "START_COMPLETED", "APP_CRASHLOOPING"] {
        assert_eq!(of_type(&events, t).len(), 1, "{t}: {events:#?}");
    }
    assert_eq!(of_type(&events, "APP_RESTORED").len(), 2, "{events:#?}");
    // Not rolled back (not configured): v2 stays current, stopped restarting.
    assert_eq!(agent.current().as_deref(), Some("v2"));
}

/// The login name `slipway-agent` finds for the test's own user.
fn local_user() -> String {
    let uid = nix::unistd::getuid();
    nix::unistd::User::from_uid(uid)
        .unwrap()
        .map_or_else(|| format!("uid {uid}"), |u| u.name)
}

#[test]
fn node_local_deploys_and_rollbacks_reach_the_audit_log_once() {
    let mut controller = Controller::start();
    let reader = controller.api_token("read");
    let mut agent = enroll(&controller, "n1", "");
    agent.run();
    controller.wait_online(&reader, 1, Duration::from_secs(30));
    let user = local_user();

    // Connected: a local deploy reaches the audit log at once.
    agent.deploy("v1");
    agent.deploy("v2");
    wait_until(
        "two NODE_LOCAL_DEPLOY events in the audit log",
        Duration::from_secs(30),
        || of_type(&controller.audit(&reader), "NODE_LOCAL_DEPLOY").len() == 2,
    );
    let events = controller.audit(&reader);
    let deploys = of_type(&events, "NODE_LOCAL_DEPLOY");
    let v2 = deploys
        .iter()
        .find(|e| e["details"]["release_id"] == "v2")
        .unwrap_or_else(|| panic!("{deploys:#?}"));
    assert_eq!(v2["actor"], format!("n1:{user}"), "{v2:#}");
    assert_eq!(v2["status"], "success", "{v2:#}");
    assert_eq!(v2["details"]["from_release_id"], "v1", "{v2:#}");
    assert_eq!(v2["details"]["automatic"], false, "{v2:#}");
    assert_eq!(v2["details"]["local_user"], user.as_str(), "{v2:#}");

    // The controller down: an emergency rollback on the node. It reaches
    // the audit log when the controller is back, once, and survives the
    // agent's own restart without a second record.
    controller.stop();
    let out = agent.cli(&["rollback", "--app", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(agent.current().as_deref(), Some("v1"));
    controller.restart();
    wait_until(
        "NODE_LOCAL_ROLLBACK in the audit log",
        Duration::from_secs(60),
        || !of_type(&controller.audit(&reader), "NODE_LOCAL_ROLLBACK").is_empty(),
    );
    agent.stop_run();
    agent.run();
    controller.wait_online(&reader, 1, Duration::from_secs(30));
    let events = controller.audit(&reader);
    let rollbacks = of_type(&events, "NODE_LOCAL_ROLLBACK");
    assert_eq!(rollbacks.len(), 1, "{rollbacks:#?}");
    let rb = rollbacks[0];
    assert_eq!(rb["actor"], format!("n1:{user}"), "{rb:#}");
    assert_eq!(rb["resource_id"], "web", "{rb:#}");
    assert_eq!(rb["details"]["from_release_id"], "v2", "{rb:#}");
    assert_eq!(rb["details"]["release_id"], "v1", "{rb:#}");
    assert!(
        rb["details"]["outcome"]
            .as_str()
            .unwrap()
            .contains("v2 marked bad"),
        "{rb:#}"
    );
    assert_eq!(of_type(&events, "NODE_LOCAL_DEPLOY").len(), 2);

    // The fleet view says v2 is bad on n1, who marked it and why.
    let marked = "rolled back to v1 at ";
    wait_until(
        "slipway releases to show v2 bad with its reason",
        Duration::from_secs(30),
        || {
            let out = controller.slipway(&reader, &["releases", "web"]);
            let said = String::from_utf8_lossy(&out.stdout).into_owned();
            said.lines().any(|l| {
                l.contains("v2")
                    && l.contains("bad — ")
                    && l.contains(marked)
                    && l.contains(&format!("by {user} on the node"))
            })
        },
    );
    let out = controller.slipway(&reader, &["releases", "web", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    let v2 = json[0]["releases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "v2")
        .unwrap()
        .clone();
    assert_eq!(v2["status"], "bad", "{json:#}");
    assert!(
        v2["reason"]
            .as_str()
            .unwrap()
            .ends_with(&format!("by {user} on the node")),
        "{json:#}"
    );
}
