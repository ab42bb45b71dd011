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
//! live replicas alone, and a dead replica's rollout is taken over by
//! another, which carries it on from its recorded state: no node deploys
//! twice, the audit log tells the takeover between the start and the end.
//! Commands go through any replica: a deploy, a restart and `status
//! --refresh` through one that holds no session reach the nodes through
//! the one that does.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::load::Load;
use crate::support::{free_ports, json, stderr, stdout, text, wait_until, Agent, Controller, APP};

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
pub(crate) fn slow_app() -> String {
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
    start_rolling_in_batches(controller, token, work, version, 1)
}

/// [`start_rolling`] with batches of `per_batch` nodes.
fn start_rolling_in_batches(
    controller: &Controller,
    token: &str,
    work: &std::path::Path,
    version: &str,
    per_batch: u32,
) -> String {
    let per_batch = per_batch.to_string();
    let out = controller.deploy_version(
        token,
        work,
        version,
        &slow_app(),
        &[
            "--json",
            "--strategy",
            "rolling",
            "--max-parallel",
            &per_batch,
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let started: Value = serde_json::from_slice(&out.stdout).unwrap();
    started["deployment_id"].as_str().unwrap().to_owned()
}

#[test]
fn replicas_share_sessions_and_only_a_dead_replicas_rollout_is_taken_over() {
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
    // reaches them through the one that does (routed through the store).
    let out = b.slipway(&deployer, &["restart", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains(&a_id), "{}", text(&out));

    // Replica a dies in the middle of its next rolling deploy: another
    // replica takes it over within the liveness sweep. Its agents know
    // only a and never come to b: the node in flight is failed once the
    // reconnect grace (30 s) is over, and the rollout stops as it would
    // have on a.
    let second = start_rolling(&a, &deployer, work.path(), "s2");
    std::thread::sleep(Duration::from_secs(1));
    a.kill();
    let mut failed = None;
    wait_until(
        "the dead replica's deploy to be taken over and failed",
        Duration::from_secs(90),
        || {
            failed = deployment_events(&b, &reader, &second)
                .into_iter()
                .find(|e| e["event_type"] == "DEPLOY_FAILED");
            failed.is_some()
        },
    );
    let failed = failed.unwrap();
    let why = failed["error_message"].as_str().unwrap_or_default();
    assert!(
        why.contains("connection lost during the command"),
        "{failed:#}"
    );
    let events = in_order(deployment_events(&b, &reader, &second));
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        kinds,
        ["DEPLOY_STARTED", "DEPLOY_TAKEN_OVER", "DEPLOY_FAILED"],
        "{events:#?}"
    );
    assert_eq!(
        events[1]["details"]["from_replica"],
        a_id.as_str(),
        "{events:#?}"
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

/// `events` (as `slipway audit` lists them) oldest first.
pub(crate) fn in_order(mut events: Vec<Value>) -> Vec<Value> {
    events.sort_by_key(|e| e["id"].as_i64().unwrap_or_default());
    events
}

/// How many results `agent` recorded in its command ledger for
/// `command_id`: one per run of the command (a command sent again is
/// answered from the ledger without running or recording again).
pub(crate) fn ledger_runs(agent: &Agent, command_id: &str) -> usize {
    let Ok(text) = fs::read_to_string(agent.state_dir().join("commands.json")) else {
        return 0;
    };
    let ledger: Value = serde_json::from_str(&text).unwrap();
    ledger["results"].as_array().map_or(0, |r| {
        r.iter().filter(|e| e["command_id"] == command_id).count()
    })
}

/// The command ids of deployment `id` in `agent`'s ledger (its undo
/// commands included).
pub(crate) fn ledger_commands_of(agent: &Agent, id: &str) -> Vec<String> {
    let Ok(text) = fs::read_to_string(agent.state_dir().join("commands.json")) else {
        return Vec::new();
    };
    let ledger: Value = serde_json::from_str(&text).unwrap();
    ledger["results"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|e| e["command_id"].as_str())
                .filter(|c| c.starts_with(&format!("{id}.")))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Checks that deployment `id` ended succeeded after being taken over
/// once, from `from` (a replica id) or any replica if None, with its audit
/// events complete and in order, and that every agent ran its command
/// exactly once and runs `version`.
fn assert_taken_over_and_completed(
    controller: &Controller,
    reader: &str,
    id: &str,
    agents: &[Agent],
    version: &str,
) {
    let events = in_order(ended_deployment_events(controller, reader, id));
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        kinds,
        ["DEPLOY_STARTED", "DEPLOY_TAKEN_OVER", "DEPLOY_COMPLETED"],
        "{events:#?}"
    );
    let taken = &events[1]["details"];
    assert_ne!(taken["from_replica"], taken["to_replica"], "{taken:#}");
    assert_eq!(
        events[2]["details"]["failed_nodes"],
        serde_json::json!([]),
        "{events:#?}"
    );
    for agent in agents {
        let commands = ledger_commands_of(agent, id);
        assert_eq!(commands.len(), 1, "{}: {commands:?}", agent.name);
        assert_eq!(
            ledger_runs(agent, &commands[0]),
            1,
            "{} ran {} more than once",
            agent.name,
            commands[0]
        );
        assert_eq!(agent.current().as_deref(), Some(version), "{}", agent.name);
    }
}

/// Two replicas a and b, and agents `names` (listing both, a slow health
/// gate) whose sessions are all on a — so the takeover, not routing, is
/// what is tested: b is down while they connect, then back on its port
/// (an agent stays on the replica it is on). Also a read and a deploy
/// token.
fn agents_on_one_of_two(names: &[&str]) -> (Controller, Controller, String, String, Vec<Agent>) {
    let a = Controller::start();
    let b = a.replica();
    agents_on_first_of(a, b, names)
}

/// [`agents_on_one_of_two`] with replicas `a` and `b` started by the
/// caller.
fn agents_on_first_of(
    a: Controller,
    mut b: Controller,
    names: &[&str],
) -> (Controller, Controller, String, String, Vec<Agent>) {
    let reader = a.api_token("read");
    let deployer = a.api_token("deploy:web");
    let urls = [a.https_url(), b.https_url()];
    b.kill();
    let mut agents = Agent::enroll_all(&a, names);
    for agent in &mut agents {
        agent.set_controller_urls(&urls);
        agent.set_start_period("8s");
        agent.run();
    }
    for agent in &agents {
        connected_to_other(agent, &urls[0], Duration::from_secs(30));
    }
    b.restart();
    a.wait_online(&reader, names.len(), Duration::from_secs(60));
    (a, b, reader, deployer, agents)
}

#[test]
fn a_dead_replicas_rolling_deploy_is_taken_over_and_completes_without_deploying_a_node_twice() {
    let (mut a, mut b, reader, deployer, agents) = agents_on_one_of_two(&["t1", "t2", "t3"]);
    let urls = [a.https_url(), b.https_url()];
    let work = tempfile::tempdir().unwrap();

    // (b) a dies in the middle of a batch: the first node is deploying.
    let first = start_rolling(&a, &deployer, work.path(), "k1");
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        ledger_commands_of(&agents[0], &first).is_empty(),
        "the first node finished before the kill"
    );
    let killed_at = Instant::now();
    a.kill();
    for agent in &agents {
        connected_to_other(agent, &urls[1], Duration::from_secs(30));
    }
    assert_taken_over_and_completed(&b, &reader, &first, &agents, "k1");
    println!(
        "mid-batch kill: deployment {first} completed through the other replica {:?} after the kill",
        killed_at.elapsed()
    );

    // (a) a back, the agents stay on b; b dies as soon as the first node
    // of the next deploy has its result (at the batch boundary).
    a.restart();
    let second = start_rolling(&b, &deployer, work.path(), "k2");
    wait_until("the first node's result", Duration::from_secs(60), || {
        !ledger_commands_of(&agents[0], &second).is_empty()
    });
    let killed_at = Instant::now();
    b.kill();
    for agent in &agents {
        connected_to_other(agent, &urls[0], Duration::from_secs(30));
    }
    assert_taken_over_and_completed(&a, &reader, &second, &agents, "k2");
    println!(
        "batch-boundary kill: deployment {second} completed through the other replica {:?} \
         after the kill",
        killed_at.elapsed()
    );
    // `slipway status` through the survivor shows the record.
    let out = a.slipway(&reader, &["status", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&second), "{}", text(&out));
}

#[test]
fn a_taken_over_rolling_deploy_that_fails_stops_and_rolls_back_as_it_would_have() {
    let (mut a, b, reader, deployer, agents) = agents_on_one_of_two(&["f1", "f2", "f3"]);
    let work = tempfile::tempdir().unwrap();
    // Slow to come up, and failing at start on a node whose BREAK lists
    // the release.
    let app = format!(
        "import os, sys, time\ntime.sleep(4)\nif open('VERSION').read().strip() in \
         os.environ.get('BREAK', '').split(','):\n    sys.exit(3)\n{APP}"
    );
    let out = a.deploy_version(&deployer, work.path(), "g1", &app, &["--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    agents[1].add_env("BREAK=g2");

    // a dies while f1 deploys g2; b carries the rollout on: f1 succeeds,
    // f2 fails, so f3 is skipped and f1 sent back to g1, as a would have.
    let out = a.deploy_version(
        &deployer,
        work.path(),
        "g2",
        &app,
        &["--json", "--strategy", "rolling", "--max-parallel", "1"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let started: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = started["deployment_id"].as_str().unwrap().to_owned();
    std::thread::sleep(Duration::from_secs(1));
    a.kill();
    let events = in_order(ended_deployment_events(&b, &reader, &id));
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        kinds,
        ["DEPLOY_STARTED", "DEPLOY_TAKEN_OVER", "DEPLOY_FAILED"],
        "{events:#?}"
    );
    let details = &events[2]["details"];
    assert_eq!(
        details["stop_reason"], "deployment stopped after f2 failed",
        "{details:#}"
    );
    assert_eq!(
        details["rolled_back_nodes"],
        serde_json::json!(["f1"]),
        "{details:#}"
    );
    assert_eq!(
        details["skipped_nodes"],
        serde_json::json!(["f3"]),
        "{details:#}"
    );
    // Each command ran once: f1 its deploy and its undo, f2 its deploy,
    // f3 nothing.
    let f1 = ledger_commands_of(&agents[0], &id);
    assert_eq!(f1.len(), 2, "{f1:?}");
    assert!(f1.iter().any(|c| c.ends_with(".undo")), "{f1:?}");
    for command in &f1 {
        assert_eq!(ledger_runs(&agents[0], command), 1, "{command}");
    }
    assert_eq!(ledger_commands_of(&agents[1], &id).len(), 1);
    assert!(ledger_commands_of(&agents[2], &id).is_empty());
    for agent in &agents {
        assert_eq!(agent.current().as_deref(), Some("g1"), "{}", agent.name);
    }
}

/// Needs commands routed between replicas (a command for a node goes to
/// the replica holding its session): the agents spread over the three.
#[test]
fn three_replicas_twenty_agents_a_killed_owners_rolling_deploys_complete_through_the_others() {
    let mut a = Controller::start();
    let mut b = a.replica();
    let c = a.replica();
    let reader = a.api_token("read");
    let deployer = a.api_token("deploy:web");
    let urls = [a.https_url(), b.https_url(), c.https_url()];
    let names: Vec<String> = (1..=20).map(|i| format!("m{i:02}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut agents = Agent::enroll_all(&a, &names);
    for agent in &mut agents {
        agent.set_controller_urls(&urls);
        agent.set_start_period("8s");
        agent.run();
    }
    for replica in [&a, &b, &c] {
        replica.wait_online(&reader, 20, Duration::from_secs(120));
    }
    let work = tempfile::tempdir().unwrap();
    // A deploy through each replica reaches all twenty.
    for (replica, version) in [(&a, "w1"), (&b, "w2"), (&c, "w3")] {
        let out = replica.deploy_version(&deployer, work.path(), version, APP, &["--wait"]);
        assert!(out.status.success(), "{version}: {}", text(&out));
        for agent in &agents {
            assert_eq!(agent.current().as_deref(), Some(version), "{}", agent.name);
        }
    }

    // The owner dies in the middle of a batch (the first five deploying).
    let first = start_rolling_in_batches(&a, &deployer, work.path(), "w4", 5);
    std::thread::sleep(Duration::from_secs(1));
    let killed_at = Instant::now();
    a.kill();
    assert_taken_over_and_completed(&b, &reader, &first, &agents, "w4");
    println!(
        "mid-batch kill: {first} completed {:?} after the kill",
        killed_at.elapsed()
    );

    // The owner dies at a batch boundary (the first five done).
    a.restart();
    let second = start_rolling_in_batches(&b, &deployer, work.path(), "w5", 5);
    wait_until("the first batch's results", Duration::from_secs(90), || {
        agents
            .iter()
            .filter(|agent| !ledger_commands_of(agent, &second).is_empty())
            .count()
            >= 5
    });
    let killed_at = Instant::now();
    b.kill();
    assert_taken_over_and_completed(&c, &reader, &second, &agents, "w5");
    println!(
        "batch-boundary kill: {second} completed {:?} after the kill",
        killed_at.elapsed()
    );
}

/// The `nodes` of a `deploy --wait --json` result: (name, outcome,
/// release) each, by name.
fn node_outcomes(done: &Value) -> Vec<(String, String, String)> {
    let mut nodes: Vec<(String, String, String)> = done["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no nodes in {done}"))
        .iter()
        .map(|n| {
            let field = |k: &str| n[k].as_str().unwrap_or_default().to_owned();
            (field("node_name"), field("outcome"), field("release_id"))
        })
        .collect();
    nodes.sort();
    nodes
}

#[test]
fn commands_through_a_replica_without_the_sessions_reach_the_nodes_through_the_holder() {
    let a = Controller::start();
    let b = a.replica();
    commands_reach_the_nodes_through_the_holder(&a, b);
}

/// Agents pinned to replica `b`; a rolling deploy (results, progress,
/// audit), `status --refresh` and a restart through `a`, which holds no
/// session; then `b` is killed and a deploy through `a` reaches nobody.
pub(crate) fn commands_reach_the_nodes_through_the_holder(a: &Controller, b: Controller) {
    let reader = a.api_token("read");
    let deployer = a.api_token("deploy:web");
    // The agents know replica b only: a never holds their sessions.
    let mut agents = Agent::enroll_all(a, &["p1", "p2"]);
    for agent in &mut agents {
        agent.set_controller_urls(&[b.https_url()]);
        agent.run();
    }
    for agent in &agents {
        assert_eq!(connected_to(agent, Duration::from_secs(30)), b.https_url());
    }
    a.wait_online(&reader, 2, Duration::from_secs(30));

    // A rolling deploy through a: both nodes switch, each result is the
    // node's own, and a records the deployment's end.
    let work = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let out = a.deploy_version(
        &deployer,
        work.path(),
        "q1",
        APP,
        &[
            "--strategy",
            "rolling",
            "--max-parallel",
            "1",
            "--wait",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let took = started.elapsed();
    let done: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["succeeded"], true, "{done}");
    let ok = |name: &str| (name.to_owned(), "succeeded".to_owned(), "q1".to_owned());
    assert_eq!(node_outcomes(&done), [ok("p1"), ok("p2")], "{done}");
    for agent in &agents {
        assert_eq!(agent.current().as_deref(), Some("q1"), "{}", agent.name);
        assert_eq!(agent.get().as_deref(), Some("q1"), "{}", agent.name);
    }
    let id = done["deployment_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let events = ended_deployment_events(a, &reader, &id);
    assert!(
        events.iter().any(|e| e["event_type"] == "DEPLOY_COMPLETED"),
        "{events:#?}"
    );
    eprintln!("rolling deploy of 2 nodes through the replica without their sessions: {took:?}");

    // The agents' progress comes through too: the streamed steps of a
    // second deploy name both nodes.
    let out = a.deploy_version(&deployer, work.path(), "q2", APP, &["--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let shown = stdout(&out);
    for name in ["p1", "p2"] {
        assert!(
            shown.lines().filter(|l| l.contains(name)).count() >= 2,
            "no progress of {name}: {}",
            text(&out)
        );
    }
    for agent in &agents {
        assert_eq!(agent.current().as_deref(), Some("q2"), "{}", agent.name);
    }

    // One-off asks: `status --refresh` through a hears both nodes.
    let out = a.slipway(&reader, &["status", "--refresh"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains("OK: 2 nodes online, 1 app healthy"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("did not answer"), "{}", text(&out));
    // A restart through a.
    let pids: Vec<Option<u64>> = agents.iter().map(Agent::app_pid).collect();
    let out = a.slipway(&deployer, &["restart", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    for (agent, before) in agents.iter().zip(&pids) {
        wait_until("the app to restart", Duration::from_secs(20), || {
            agent.app_pid().is_some() && agent.app_pid() != *before
        });
    }

    // Replica b dies: no live replica holds the nodes; a deploy through a
    // reaches nobody and says so.
    let mut b = b;
    b.kill();
    a.wait_online(&reader, 0, Duration::from_secs(30));
    let out = a.deploy_version(&deployer, work.path(), "q3", APP, &["--wait"]);
    assert!(!out.status.success(), "{}", text(&out));
    for agent in &agents {
        assert_eq!(agent.current().as_deref(), Some("q2"), "{}", agent.name);
    }
}

#[test]
fn a_node_moving_between_replicas_mid_deploy_gets_its_command_where_it_lands() {
    let a = Controller::start();
    let b = a.replica();
    let c = a.replica();
    let reader = a.api_token("read");
    let deployer = a.api_token("deploy:web");
    // The agents know b and c, never a: a's deploy is routed throughout.
    let urls = [b.https_url(), c.https_url()];
    let mut agents = Agent::enroll_all(&a, &["m1", "m2"]);
    for agent in &mut agents {
        agent.set_controller_urls(&urls);
        agent.set_start_period("8s");
        agent.run();
    }
    a.wait_online(&reader, 2, Duration::from_secs(60));

    // The replica holding the session of the node whose command runs
    // (its release unpacked, the slow app not yet healthy) dies: the node
    // moves to the other replica and gets its command again there.
    let work = tempfile::tempdir().unwrap();
    let id = start_rolling(&a, &deployer, work.path(), "w1");
    let mut busy = 0;
    wait_until(
        "a node to receive w1",
        Duration::from_secs(30),
        || match agents.iter().position(|a| a.has_release("w1")) {
            Some(i) => {
                busy = i;
                true
            }
            None => false,
        },
    );
    let on = connected_to(&agents[busy], Duration::from_secs(5));
    let (mut holder, other) = if on == urls[0] { (b, c) } else { (c, b) };
    holder.kill();
    wait_until(
        "the node to move to the live replica",
        Duration::from_secs(60),
        || agents[busy].link()["connected_to"].as_str() == Some(other.https_url().as_str()),
    );
    let events = ended_deployment_events(&a, &reader, &id);
    assert!(
        events.iter().any(|e| e["event_type"] == "DEPLOY_COMPLETED"),
        "{events:#?}"
    );
    assert!(
        !events.iter().any(|e| e["event_type"] == "DEPLOY_FAILED"),
        "{events:#?}"
    );
    for agent in &agents {
        assert_eq!(agent.current().as_deref(), Some("w1"), "{}", agent.name);
    }
    // a sent it again to where the node landed.
    let log = fs::read_to_string(a.dir.path().join("controller.log")).unwrap();
    assert!(
        log.contains("node moved: sending the command again"),
        "{log}"
    );
}

/// A TCP load balancer in front of controller replicas, as an operator
/// puts one before them: each connection goes to the first address that
/// accepts it, bytes copied both ways; when either side closes, so does
/// the other (a client whose replica died sees its connection end).
struct Balancer {
    addr: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Backends taken out (as a health-checking balancer would), by index.
    down: std::sync::Arc<Vec<std::sync::atomic::AtomicBool>>,
}

impl Balancer {
    fn start(backends: Vec<String>) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let down: std::sync::Arc<Vec<AtomicBool>> =
            std::sync::Arc::new(backends.iter().map(|_| AtomicBool::new(false)).collect());
        let is_down = down.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                let server = backends
                    .iter()
                    .zip(is_down.iter())
                    .filter(|(_, down)| !down.load(Ordering::Relaxed))
                    .find_map(|(b, _)| std::net::TcpStream::connect(b).ok());
                match server {
                    Some(server) => {
                        Self::pipe(client.try_clone().unwrap(), server.try_clone().unwrap());
                        Self::pipe(server, client);
                    }
                    None => {
                        let _ = client.shutdown(std::net::Shutdown::Both);
                    }
                }
            }
        });
        Self { addr, stop, down }
    }

    /// Sends no new connection to backend `index` (open ones stay).
    fn take_out(&self, index: usize) {
        self.down[index].store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Copies `from` to `to` on a thread of its own; closes both at the end.
    fn pipe(mut from: std::net::TcpStream, mut to: std::net::TcpStream) {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = from.shutdown(std::net::Shutdown::Both);
            let _ = to.shutdown(std::net::Shutdown::Both);
        });
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `slipway deploy web … --wait` of release `id` of the slow app (one node
/// at a time) through `balancer`, started in the background: the process
/// and the files its stdout and stderr go to (in `dir`).
fn slow_deploy_wait(
    balancer: &Balancer,
    controller: &Controller,
    deployer: &str,
    dir: &std::path::Path,
    id: &str,
) -> (std::process::Child, std::path::PathBuf, std::path::PathBuf) {
    let art = crate::support::artifact(dir, id, &slow_app());
    let sha = crate::support::sha256_file(&art);
    let out_path = dir.join("deploy.out");
    let err_path = dir.join("deploy.err");
    let deploy = std::process::Command::new(crate::support::bin("slipway"))
        .args(["--controller", &balancer.addr, "--ca"])
        .arg(controller.ca_pem())
        .args(["--token", deployer, "deploy", "web"])
        .arg(&art)
        .args(["--sha", &sha, "--id", id])
        .args(["--strategy", "rolling", "--max-parallel", "1", "--wait"])
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    (deploy, out_path, err_path)
}

/// The deployment id (`d-` and 16 hex digits) in `text`, if any.
fn deployment_id_in(text: &str) -> Option<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .find(|w| {
            w.len() == 18 && w.starts_with("d-") && w[2..].chars().all(|c| c.is_ascii_hexdigit())
        })
        .map(str::to_owned)
}

/// How many lines of `text` contain `needle`.
fn lines_with(text: &str, needle: &str) -> usize {
    text.lines().filter(|l| l.contains(needle)).count()
}

/// `curl -N` following `GET /api/v1/deployments/{id}/events` on
/// `controller`'s HTTP API into `path`.
fn follow_sse(
    controller: &Controller,
    token: &str,
    id: &str,
    path: &std::path::Path,
) -> std::process::Child {
    std::process::Command::new("curl")
        .args(["-sS", "-N", "--max-time", "180", "--cacert"])
        .arg(controller.ca_pem())
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg(format!(
            "{}/api/v1/deployments/{id}/events",
            controller.http_url()
        ))
        .stdout(std::process::Stdio::from(fs::File::create(path).unwrap()))
        .spawn()
        .unwrap()
}

/// Waits (up to `limit`) for `child` to exit; its status.
fn exits_within(
    child: &mut std::process::Child,
    what: &str,
    limit: Duration,
) -> std::process::ExitStatus {
    let mut status = None;
    wait_until(what, limit, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status.unwrap()
}

/// The `node_result` events of an SSE stream: (node name, outcome) each.
fn sse_results(events: &[(String, Value)]) -> Vec<(String, String)> {
    let mut results: Vec<(String, String)> = events
        .iter()
        .filter(|(kind, _)| kind == "node_result")
        .map(|(_, data)| {
            (
                data["node_name"].as_str().unwrap_or_default().to_owned(),
                data["outcome"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    results.sort();
    results
}

#[test]
fn deploy_wait_through_a_balancer_re_attaches_when_its_replica_dies_and_any_replica_follows_by_id()
{
    let a = Controller::start_http();
    let b = a.http_replica();
    let names = ["l1", "l2", "l3"];
    let (mut a, b, reader, deployer, agents) = agents_on_first_of(a, b, &names);
    let work = tempfile::tempdir().unwrap();
    let balancer = Balancer::start(vec![a.url(), b.url()]);

    // A slow rolling deploy followed through the balancer (to a, the
    // first address, while it lives).
    let (mut deploy, out_path, err_path) =
        slow_deploy_wait(&balancer, &a, &deployer, work.path(), "z1");
    let shown = || fs::read_to_string(&out_path).unwrap_or_default();
    let mut id = String::new();
    wait_until(
        "the deploy to start",
        Duration::from_secs(60),
        || match deployment_id_in(&shown()) {
            Some(found) => {
                id = found;
                true
            }
            None => false,
        },
    );
    // Followed through b, which does not run it: from the record.
    let sse_path = work.path().join("events.txt");
    let mut sse = follow_sse(&b, &reader, &id, &sse_path);

    // a dies once the first node has its result, the others to come.
    wait_until("the first node's result", Duration::from_secs(60), || {
        shown().contains("[l1] SUCCEEDED")
    });
    let killed_at = Instant::now();
    a.kill();
    let status = exits_within(
        &mut deploy,
        "deploy --wait to end",
        Duration::from_secs(180),
    );
    let out = shown();
    let err = fs::read_to_string(&err_path).unwrap();
    println!(
        "deploy --wait ended {:?} after its replica was killed:\n{out}{err}",
        killed_at.elapsed()
    );
    assert!(status.success(), "{status}\n{out}{err}");
    for name in names {
        assert_eq!(
            lines_with(&out, &format!("[{name}] SUCCEEDED")),
            1,
            "{name}\n{out}{err}"
        );
    }
    assert!(
        out.contains(&format!("deploy {id} succeeded: 3 of 3 nodes succeeded")),
        "{out}{err}"
    );
    // The last batch, started by b after it took the deployment over, is
    // shown (b's live events are followed once it runs it), once.
    assert_eq!(lines_with(&out, "batch 3/3: l3"), 1, "{out}{err}");
    assert_eq!(
        lines_with(&err, "lost the controller replica it followed"),
        1,
        "{out}{err}"
    );
    assert!(
        err.contains(&format!("re-attached through {}", balancer.addr)),
        "{out}{err}"
    );
    assert_taken_over_and_completed(&b, &reader, &id, &agents, "z1");

    // The SSE stream through b: every node's result once, then finished.
    let curl = exits_within(&mut sse, "the SSE stream to end", Duration::from_secs(60));
    assert!(curl.success(), "curl -N ended with {curl}");
    let events = crate::http::sse_events(&fs::read_to_string(&sse_path).unwrap());
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"started"), "{events:?}");
    assert_eq!(kinds.last(), Some(&"finished"), "{events:?}");
    let ok = |n: &str| (n.to_owned(), "succeeded".to_owned());
    assert_eq!(
        sse_results(&events),
        [ok("l1"), ok("l2"), ok("l3")],
        "{events:?}"
    );
    // l1's steps, recorded with its result by a, came from the record.
    assert!(
        events
            .iter()
            .any(|(kind, data)| kind == "progress" && data["node_name"] == "l1"),
        "{events:?}"
    );
    let finished = &events.last().unwrap().1;
    assert_eq!(finished["deployment_id"], id.as_str(), "{finished}");
    assert_eq!(finished["succeeded"], true, "{finished}");

    // `slipway watch` of the finished deployment: its results, its
    // outcome.
    let watched = b.slipway(&reader, &["watch", &id]);
    let watched_text = text(&watched);
    assert!(watched.status.success(), "{watched_text}");
    for name in names {
        assert_eq!(
            lines_with(&stdout(&watched), &format!("[{name}] SUCCEEDED")),
            1,
            "{watched_text}"
        );
    }
    assert!(
        watched_text.contains(&format!(
            "deployment {id} succeeded: 3 of 3 nodes succeeded"
        )),
        "{watched_text}"
    );

    // A deployment that fails (the release exits at start: each node
    // rolls back), run by b, followed through a (back, running none).
    a.restart();
    let broken = "import sys\nsys.exit(3)\n";
    let started = b.deploy_version(&deployer, work.path(), "z2", broken, &["--json"]);
    assert!(started.status.success(), "{}", text(&started));
    let failed_id = json(&started)["deployment_id"].as_str().unwrap().to_owned();
    let sse_path = work.path().join("failed.txt");
    let mut sse = follow_sse(&a, &reader, &failed_id, &sse_path);
    let curl = exits_within(&mut sse, "the SSE stream to end", Duration::from_secs(120));
    assert!(curl.success(), "curl -N ended with {curl}");
    let events = crate::http::sse_events(&fs::read_to_string(&sse_path).unwrap());
    let results = sse_results(&events);
    assert_eq!(results.len(), 3, "{events:?}");
    assert!(
        results.iter().all(|(_, outcome)| outcome != "succeeded"),
        "{events:?}"
    );
    let (last, finished) = events.last().unwrap();
    assert_eq!(last, "finished", "{events:?}");
    assert_eq!(finished["succeeded"], false, "{finished}");
    assert_eq!(finished["failed_nodes"], 3, "{finished}");

    // Watched through either replica: each node's failure, exit 1.
    for replica in [&a, &b] {
        let watched = replica.slipway(&reader, &["watch", &failed_id, "--json"]);
        assert_eq!(watched.status.code(), Some(1), "{}", text(&watched));
        let done = json(&watched);
        assert_eq!(done["deployment_id"], failed_id.as_str(), "{done}");
        assert_eq!(done["succeeded"], false, "{done}");
        let outcomes = node_outcomes(&done);
        assert_eq!(outcomes.len(), 3, "{done}");
        assert!(
            outcomes
                .iter()
                .all(|(_, outcome, _)| outcome != "succeeded"),
            "{done}"
        );
    }
    let watched = a.slipway(&reader, &["watch", &failed_id]);
    assert_eq!(watched.status.code(), Some(1), "{}", text(&watched));
    assert!(
        stderr(&watched).contains(&format!(
            "deployment {failed_id} failed: 3 of 3 nodes failed"
        )),
        "{}",
        text(&watched)
    );

    // Ids are checked: a malformed one is refused before anything is
    // asked, an unknown one by the controller.
    let bad = b.slipway(&reader, &["watch", "d-nothex"]);
    assert_eq!(bad.status.code(), Some(64), "{}", text(&bad));
    assert!(
        stderr(&bad).contains("is not d- and 16 hex digits"),
        "{}",
        text(&bad)
    );
    let unknown = b.slipway(&reader, &["watch", "d-0000000000000000"]);
    assert_eq!(unknown.status.code(), Some(1), "{}", text(&unknown));
    assert!(
        stderr(&unknown).contains("no deployment d-0000000000000000"),
        "{}",
        text(&unknown)
    );
}

/// A replica that goes silent (its process stopped: no reset, no close,
/// the connection just stops answering) while `deploy --wait` follows it:
/// the CLI's HTTP/2 pings go unanswered, it drops the connection and
/// re-attaches through the balancer (which took the silent replica out),
/// and ends with the deployment's result once that replica carries on.
#[test]
fn deploy_wait_re_attaches_when_its_replica_goes_silent() {
    let a = Controller::start_http();
    let b = a.http_replica();
    let names = ["q1", "q2"];
    let (a, b, reader, deployer, _agents) = agents_on_first_of(a, b, &names);
    let work = tempfile::tempdir().unwrap();
    let balancer = Balancer::start(vec![a.url(), b.url()]);
    let (mut deploy, out_path, err_path) =
        slow_deploy_wait(&balancer, &a, &deployer, work.path(), "q1");
    let shown = || fs::read_to_string(&out_path).unwrap_or_default();
    let said = || fs::read_to_string(&err_path).unwrap_or_default();
    wait_until("the deploy to start", Duration::from_secs(60), || {
        deployment_id_in(&shown()).is_some()
    });
    let id = deployment_id_in(&shown()).unwrap();

    // a goes silent; the balancer sends new connections to b only.
    balancer.take_out(0);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(a.pid().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let silent_at = Instant::now();
    wait_until(
        "deploy --wait to notice the silence and re-attach",
        Duration::from_secs(90),
        || said().contains("lost the controller replica it followed"),
    );
    println!(
        "re-attached {:?} after its replica went silent: {}",
        silent_at.elapsed(),
        said().trim()
    );
    assert!(
        said().contains(&format!("re-attached through {}", balancer.addr)),
        "{}",
        said()
    );
    // a carries on (its lock was held all along: nobody took over).
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let status = exits_within(
        &mut deploy,
        "deploy --wait to end",
        Duration::from_secs(180),
    );
    let (out, err) = (shown(), said());
    assert!(status.success(), "{status}\n{out}{err}");
    for name in names {
        assert_eq!(
            lines_with(&out, &format!("[{name}] SUCCEEDED")),
            1,
            "{name}\n{out}{err}"
        );
    }
    assert!(
        out.contains(&format!("deploy {id} succeeded: 2 of 2 nodes succeeded")),
        "{out}{err}"
    );
    drop((b, reader));
}
