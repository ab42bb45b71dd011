//! Controller replicas on the agent's side (`[controller] urls`): two
//! `slipway-controller serve` processes of one data dir (the SQLite store
//! in WAL mode, the CA, the artifacts) on two loopback ports. Kill -9 the
//! replica an agent's session is on and the agent reconnects to the other
//! within its backoff while its app keeps serving; a deploy through the
//! survivor then works. An agent whose list holds dead addresses comes
//! online through the live one.
//!
//! On the controller's side: a node is online through any replica while a
//! live one holds its session; a replica starting leaves the rollouts of
//! live replicas alone, and a dead replica's rollout is failed by another,
//! naming it (not taken over: that is the next step).

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::load::Load;
use crate::support::{free_ports, text, wait_until, Agent, Controller, APP};

/// The replica `slipway-agent status` says the session is on, once it says
/// one (within `limit`).
pub(crate) fn connected_to(agent: &Agent, limit: Duration) -> String {
    let mut on = String::new();
    wait_until("the agent's status to name a replica", limit, || {
        let link: Value = agent.link();
        match link["connected_to"].as_str() {
            Some(url) => {
                on = url.to_owned();
                true
            }
            None => false,
        }
    });
    on
}

#[test]
fn killing_the_replica_an_agent_is_on_moves_it_to_the_other_and_the_app_keeps_serving() {
    let a = Controller::start();
    let b = a.replica();
    assert_eq!(a.data_dir(), b.data_dir());
    let urls = [a.https_url(), b.https_url()];
    let reader = a.api_token("read");
    let deployer = a.api_token("deploy:web");

    let mut agent = Agent::enroll(&a, "n1");
    agent.set_controller_urls(&urls);
    agent.run();
    let on = connected_to(&agent, Duration::from_secs(30));
    let (mut live, other) = if on == urls[0] { (a, b) } else { (b, a) };
    assert_eq!(
        on,
        live.https_url(),
        "status names {on}, not one of {urls:?}"
    );
    let link = agent.link();
    assert_eq!(link["replicas"], serde_json::json!(urls), "{link}");
    live.wait_online(&reader, 1, Duration::from_secs(30));
    // The other replica shows the node online too: the store says which
    // live replica holds its session.
    other.wait_online(&reader, 1, Duration::from_secs(10));

    // v1 through the replica it is on.
    let work = tempfile::tempdir().unwrap();
    let out = live.deploy_version(&deployer, work.path(), "v1", APP, &["--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(agent.get().as_deref(), Some("v1"));
    let app_pid = agent.app_pid();
    assert!(app_pid.is_some());

    // Bounded: one thread of new connections, one keep-alive, at most
    // 2 min or 100,000 requests each.
    let load = Load::start(agent.port, "/", 1, 1, Duration::from_secs(120), 100_000);
    std::thread::sleep(Duration::from_millis(500));
    let killed_at = Instant::now();
    live.kill();
    let moved = connected_to_other(&agent, &other.https_url(), Duration::from_secs(20));
    let after = killed_at.elapsed();
    other.wait_online(&reader, 1, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    println!(
        "the agent was on {on}; on {moved} after {after:?}; app load: {}",
        report.summary()
    );
    assert!(report.ok > 0, "{}", report.summary());
    assert_eq!(report.failures(), 0, "{}", report.summary());
    // No app was touched.
    assert_eq!(agent.app_pid(), app_pid, "the app was restarted");
    assert!(
        report.bodies.iter().all(|b| b == "v1"),
        "{}",
        report.summary()
    );

    // The agent said why it moved.
    let log = fs::read_to_string(agent.dir.path().join("agent.log")).unwrap();
    assert!(
        log.contains(&format!("session with {on} ended"))
            && log.contains(&format!("moving to the next replica, {moved}")),
        "{log}"
    );

    // A deploy through the survivor reaches it.
    let out = other.deploy_version(&deployer, work.path(), "v2", APP, &["--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("[n1] SUCCEEDED"),
        "{}",
        text(&out)
    );
    assert_eq!(agent.get().as_deref(), Some("v2"));
    // Its artifact came from the replica the session is on: the dead one
    // was not tried first.
    let log = fs::read_to_string(agent.dir.path().join("agent.log")).unwrap();
    assert!(
        !log.contains("artifact fetch failed on this controller replica"),
        "{log}"
    );

    // `slipway-agent status` for people names the replica too.
    let status = agent.cli(&["status"]);
    let which = if moved == urls[0] { 1 } else { 2 };
    assert!(
        String::from_utf8_lossy(&status.stdout).contains(&format!(
            "controller: connected to {moved} (replica {which} of 2) as node "
        )),
        "{}",
        text(&status)
    );

    // The killed replica comes back: the agent stays where it is.
    live.restart();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(agent.link()["connected_to"].as_str(), Some(moved.as_str()));
}

/// Waits until the agent's status says it is connected to `url`.
fn connected_to_other(agent: &Agent, url: &str, limit: Duration) -> String {
    wait_until(&format!("the agent to connect to {url}"), limit, || {
        agent.link()["connected_to"].as_str() == Some(url)
    });
    url.to_owned()
}

#[test]
fn an_agent_whose_list_holds_dead_addresses_comes_online_through_the_live_one() {
    let controller = Controller::start();
    let reader = controller.api_token("read");
    // Nothing listens on these (ports below the ephemeral range, checked
    // free a moment ago).
    let dead = free_ports::<3>().map(|p| format!("https://127.0.0.1:{p}"));
    let live = controller.https_url();
    let urls = [
        dead[0].clone(),
        live.clone(),
        dead[1].clone(),
        dead[2].clone(),
    ];
    let mut agent = Agent::enroll(&controller, "n1");
    agent.set_controller_urls(&urls);
    let log_path = agent.dir.path().join("agent.log");
    // The replica to start on is random (3 in 4 a dead one): run until a
    // run started on a dead one — each run must come online — at most 6
    // times (all 6 on the live one: 1 in 4,096).
    let mut started_on_dead = false;
    for _ in 0..6 {
        let before = fs::read_to_string(&log_path).unwrap_or_default().len();
        agent.run();
        let on = connected_to(&agent, Duration::from_secs(30));
        assert_eq!(on, live);
        controller.wait_online(&reader, 1, Duration::from_secs(20));
        let log = fs::read_to_string(&log_path).unwrap();
        let this_run = &log[before..];
        started_on_dead = dead
            .iter()
            .any(|d| this_run.contains(&format!("cannot reach {d}")));
        agent.stop_run();
        if started_on_dead {
            assert!(
                this_run.contains("moving to the next replica"),
                "{this_run}"
            );
            break;
        }
    }
    assert!(
        started_on_dead,
        "no run started on a dead address (each did come online)"
    );
    // With `run` stopped, status says there is no session (not what the
    // last run recorded).
    let link = agent.link();
    assert_eq!(link["agent_running"], false, "{link}");
    assert_eq!(link["connected_to"], Value::Null, "{link}");
    let status = agent.cli(&["status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout)
            .contains("controller: no session (slipway-agent run is not running)"),
        "{}",
        text(&status)
    );
}

#[test]
fn a_bad_urls_list_stops_the_agent_at_start_naming_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    let state = dir.path().join("state");
    for (urls, says) in [
        (
            r#"["https://a:7443", "http://b:7443"]"#,
            r#"controller.urls: entry 2: "http://b:7443": not an https:// address"#,
        ),
        (
            "[]",
            "controller.urls: must list at least one controller address",
        ),
        (
            r#"["https://a:7443", "a:7443"]"#,
            r#"controller.urls: entry 2 ("a:7443") is the same address as entry 1"#,
        ),
    ] {
        fs::write(
            &config,
            format!(
                "[controller]\nstate_dir = \"{}\"\nurls = {urls}\n",
                state.display()
            ),
        )
        .unwrap();
        let out = std::process::Command::new(crate::support::bin("slipway-agent"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{}", text(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("{}:3: {says}", config.display())),
            "{}",
            text(&out)
        );
    }
}

/// The test app, slow to come up: its health gate takes seconds (the
/// agents of that test have a start period longer than that).
fn slow_app() -> String {
    format!("import time\ntime.sleep(4)\n{APP}")
}

/// The audit events about deployment `id` as `controller` shows them.
pub(crate) fn deployment_events(controller: &Controller, token: &str, id: &str) -> Vec<Value> {
    controller
        .audit(token)
        .into_iter()
        .filter(|e| e["resource_id"] == id)
        .collect()
}

/// The audit events about deployment `id` once it has ended (completed or
/// failed), as `controller` shows them; waits up to 90 s for the end.
pub(crate) fn ended_deployment_events(
    controller: &Controller,
    token: &str,
    id: &str,
) -> Vec<Value> {
    let ended = |events: &[Value]| {
        events
            .iter()
            .any(|e| e["event_type"] == "DEPLOY_COMPLETED" || e["event_type"] == "DEPLOY_FAILED")
    };
    wait_until(
        "the rolling deploy to finish",
        Duration::from_secs(90),
        || ended(&deployment_events(controller, token, id)),
    );
    deployment_events(controller, token, id)
}

/// Starts a slow rolling deploy (one node at a time) of `version` through
/// `controller` and returns its deployment id at once.
pub(crate) fn start_rolling(
    controller: &Controller,
    token: &str,
    work: &std::path::Path,
    version: &str,
) -> String {
    let out = controller.deploy_version(
        token,
        work,
        version,
        &slow_app(),
        &["--json", "--strategy", "rolling", "--max-parallel", "1"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let started: Value = serde_json::from_slice(&out.stdout).unwrap();
    started["deployment_id"].as_str().unwrap().to_owned()
}

#[test]
fn replicas_share_sessions_and_only_a_dead_replicas_rollout_is_failed() {
    let mut a = Controller::start();
    let b = a.replica();
    let reader = a.api_token("read");
    let deployer = a.api_token("deploy:web");
    // Both agents know replica a only.
    let mut agents = Agent::enroll_all(&a, &["r1", "r2"]);
    for agent in &mut agents {
        agent.set_start_period("8s");
        agent.run();
    }
    a.wait_online(&reader, 2, Duration::from_secs(60));
    // a logged the id it drew.
    let log = fs::read_to_string(a.dir.path().join("controller.log")).unwrap();
    let a_id = log
        .lines()
        .find_map(|l| l.split("controller replica registered").nth(1))
        // Past the colours around `=`: the 16 hex digits of the id.
        .and_then(|rest| {
            rest.split(|c: char| !c.is_ascii_hexdigit())
                .find(|w| w.len() == 16)
        })
        .unwrap_or_else(|| panic!("no replica id in the log: {log}"))
        .to_owned();

    // Through b, which holds no session: both online all the same.
    b.wait_online(&reader, 2, Duration::from_secs(10));
    let out = b.slipway(&reader, &["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["counts"]["online"], 2, "{status:#}");

    // A third replica starting while a's rolling deploy runs leaves it
    // alone: it completes.
    let work = tempfile::tempdir().unwrap();
    let first = start_rolling(&a, &deployer, work.path(), "s1");
    let c = a.replica();
    let events = ended_deployment_events(&c, &reader, &first);
    assert!(
        events.iter().any(|e| e["event_type"] == "DEPLOY_COMPLETED"),
        "{events:#?}"
    );
    assert!(
        !events.iter().any(|e| e["event_type"] == "DEPLOY_FAILED"),
        "{events:#?}"
    );
    for agent in &agents {
        assert_eq!(agent.current().as_deref(), Some("s1"), "{}", agent.name);
    }

    // A command through a replica that does not hold the nodes' sessions
    // says which replica does (commands are not routed between replicas).
    let out = b.slipway(&deployer, &["restart", "web"]);
    assert!(!out.status.success(), "{}", text(&out));
    let held = format!("'s session is held by replica {a_id} ({})", a.url());
    let shown = text(&out);
    assert_eq!(shown.matches(&held).count(), 2, "{shown}");
    assert!(shown.contains("this replica cannot reach it"), "{shown}");

    // Replica a dies in the middle of its next rolling deploy: another
    // replica fails it, naming a, within the liveness sweep.
    let second = start_rolling(&a, &deployer, work.path(), "s2");
    std::thread::sleep(Duration::from_secs(1));
    a.kill();
    let mut failed = None;
    wait_until(
        "the dead replica's deploy to be failed",
        Duration::from_secs(40),
        || {
            failed = deployment_events(&b, &reader, &second)
                .into_iter()
                .find(|e| e["event_type"] == "DEPLOY_FAILED");
            failed.is_some()
        },
    );
    let failed = failed.unwrap();
    let why = failed["error_message"].as_str().unwrap_or_default();
    assert!(why.contains("controller restarted"), "{failed:#}");
    assert!(why.contains("that ran it is gone"), "{failed:#}");
    assert!(
        why.contains("does not take a rollout over yet"),
        "{failed:#}"
    );
    // The app is not blocked: a deploy through b is accepted (its nodes
    // are offline now, their agents knowing only a: it fails on them).
    let out = b.deploy_version(&deployer, work.path(), "s3", APP, &["--wait"]);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("FailedPrecondition"),
        "{}",
        text(&out)
    );
}
