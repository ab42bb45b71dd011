//! Controller-initiated commands and the fleet status, end to end: a
//! controller and three agent processes over real mTLS, driven with the
//! `slipway` CLI: `restart`, `prune`, `status [--refresh]`, scopes and audit.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use crate::support::{json, stderr, stdout, text, wait_until, Agent, Controller, APP};
use serde_json::Value;

/// Where `agent`'s app looks for the file that makes it sick.
fn sick_file(agent: &Agent) -> PathBuf {
    agent.dir.path().join("sick")
}

/// The app's health as the agent's liveness loop last recorded it.
fn local_health(agent: &Agent) -> Option<bool> {
    let record = fs::read(agent.root.join(".slipway/health.json")).ok()?;
    serde_json::from_slice::<Value>(&record).ok()?["healthy"].as_bool()
}

/// `slipway status --refresh --json`: the summary and whether it exited 0.
fn refreshed_status(controller: &Controller, token: &str) -> (bool, Value, Output) {
    let out = controller.slipway(token, &["status", "--refresh", "--json"]);
    let ok = out.status.success();
    assert!(
        ok || out.status.code() == Some(1),
        "status failed to run: {}",
        text(&out)
    );
    (ok, json(&out), out)
}

/// Names of the nodes on which `release` of the app is current.
fn nodes_on(status: &Value, release: &str) -> Vec<String> {
    status["apps"][0]["releases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["release"] == release)
        .map(|r| {
            r["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn restart_prune_and_status_across_three_agents() {
    let controller = Controller::start();
    let mut agents = Agent::enroll_all(&controller, &["n1", "n2", "n3"]);
    for a in &mut agents {
        a.add_env(&format!("SICK_FILE={}", sick_file(a).display()));
        a.run();
    }
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    controller.wait_online(&reader, 3, Duration::from_secs(30));

    // Three releases everywhere, so there is something to prune.
    let work = tempfile::tempdir().unwrap();
    for version in ["v1", "v2", "v3"] {
        let out = controller.deploy_version(&deployer, work.path(), version, APP, &["--wait"]);
        assert!(out.status.success(), "{}", text(&out));
    }
    for a in &agents {
        assert_eq!(
            a.get().as_deref(),
            Some("v3"),
            "{} does not serve v3",
            a.name
        );
        assert_eq!(a.release_dirs(), ["v1", "v2", "v3"], "{}", a.name);
    }

    // All is well: exit 0, the release current everywhere, the last deploy.
    let out = controller.slipway(&reader, &["status", "--refresh"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains("v3 current on 3 node(s): n1, n2, n3"),
        "{}",
        text(&out)
    );
    assert!(
        stdout(&out).contains("OK: 3 nodes online, 1 app healthy"),
        "{}",
        text(&out)
    );
    let (ok, status, out) = refreshed_status(&controller, &reader);
    assert!(ok, "{}", text(&out));
    assert_eq!(status["counts"]["online"], 3, "{status:#}");
    assert_eq!(status["problems"], serde_json::json!([]), "{status:#}");
    let last = &status["apps"][0]["last_deployment"];
    assert_eq!(last["kind"], "deploy", "{status:#}");
    assert_eq!(last["release_id"], "v3", "{status:#}");
    assert_eq!(last["nodes"].as_array().unwrap().len(), 3, "{status:#}");
    assert!(
        status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["refresh"] == "answered" && n["connected"] == true),
        "{status:#}"
    );

    // Restart on n2 only: its app process changes and still serves v3;
    // the others keep theirs.
    let before: Vec<u64> = agents.iter().map(|a| a.app_pid().unwrap()).collect();
    let out = controller.slipway(&deployer, &["restart", "web", "--node", "n2"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains("[n2] SUCCEEDED (release v3)"),
        "{}",
        text(&out)
    );
    assert!(!stdout(&out).contains("[n1]"), "{}", text(&out));
    let after: Vec<u64> = agents.iter().map(|a| a.app_pid().unwrap()).collect();
    assert_ne!(after[1], before[1], "n2's app was not restarted");
    assert_eq!(after[0], before[0], "n1's app was restarted");
    assert_eq!(after[2], before[2], "n3's app was restarted");
    assert_eq!(agents[1].get().as_deref(), Some("v3"));

    // A rolling restart takes the nodes one at a time: every app process
    // changes, every node still serves.
    let out = controller.slipway(
        &deployer,
        &[
            "restart",
            "web",
            "--strategy",
            "rolling",
            "--max-parallel",
            "1",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains("batch 3/3: n3"), "{}", text(&out));
    for (a, pid) in agents.iter().zip(&after) {
        assert_ne!(
            a.app_pid(),
            Some(*pid),
            "{}'s app was not restarted",
            a.name
        );
        assert_eq!(
            a.get().as_deref(),
            Some("v3"),
            "{} does not serve v3",
            a.name
        );
    }

    // A read token may not restart or prune: refused, named, audited.
    let out = controller.slipway(&reader, &["restart", "web"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stderr(&out).contains("PermissionDenied"), "{}", text(&out));
    assert!(
        stderr(&out).contains("may not restart app web"),
        "{}",
        text(&out)
    );
    let out = controller.slipway(&reader, &["prune", "web", "--keep", "1"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains("may not prune app web"),
        "{}",
        text(&out)
    );
    // Bad input is refused before anything is sent.
    let out = controller.slipway(&deployer, &["prune", "no/such"]);
    assert!(stderr(&out).contains("InvalidArgument"), "{}", text(&out));
    assert!(stderr(&out).contains("invalid app name"), "{}", text(&out));
    let out = controller.slipway(&deployer, &["prune", "web", "--keep", "0"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        stderr(&out).contains("0 is not in 1..=1000"),
        "{}",
        text(&out)
    );

    // Prune on n1 keeping one: v1 goes; v3 (current) and v2 (the rollback
    // target) stay; n2 and n3 are untouched.
    let out = controller.slipway(&deployer, &["prune", "web", "--keep", "1", "--node", "n1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains("[n1] SUCCEEDED: removed 1 release(s): v1"),
        "{}",
        text(&out)
    );
    assert_eq!(agents[0].release_dirs(), ["v2", "v3"]);
    assert_eq!(agents[1].release_dirs(), ["v1", "v2", "v3"]);
    assert_eq!(agents[0].get().as_deref(), Some("v3"));
    // Everywhere, with each node's configured keep (5): nothing to remove.
    let out = controller.slipway(&deployer, &["prune", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        stdout(&out)
            .matches("SUCCEEDED: removed no release")
            .count(),
        3,
        "{}",
        text(&out)
    );
    assert_eq!(agents[2].release_dirs(), ["v1", "v2", "v3"]);

    // n3's app turns unhealthy. As soon as n3's agent knows (its liveness
    // record), a refreshed status names it with the check's output and
    // exits 1, without waiting for n3's next heartbeat (a health change
    // sends none by itself); the others are not named.
    fs::write(sick_file(&agents[2]), "").unwrap();
    wait_until(
        "n3's agent to see it unhealthy",
        Duration::from_secs(30),
        || local_health(&agents[2]) == Some(false),
    );
    let out = controller.slipway(&reader, &["status", "--refresh"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stdout(&out).contains("- web on n3 (v3) is not healthy: unhealthy:"),
        "{}",
        text(&out)
    );
    assert!(
        stdout(&out).contains("UNHEALTHY on n3 (v3)"),
        "{}",
        text(&out)
    );
    let (_, status, _) = refreshed_status(&controller, &reader);
    let unhealthy = status["apps"][0]["unhealthy"].as_array().unwrap();
    assert_eq!(unhealthy.len(), 1, "{status:#}");
    assert_eq!(unhealthy[0]["node_name"], "n3", "{status:#}");
    assert!(
        unhealthy[0]["output"]
            .as_str()
            .unwrap()
            .contains("HTTP 503"),
        "{status:#}"
    );
    assert_eq!(
        status["problems"].as_array().unwrap().len(),
        1,
        "{status:#}"
    );
    fs::remove_file(sick_file(&agents[2])).unwrap();
    wait_until(
        "n3's agent to see it healthy",
        Duration::from_secs(30),
        || local_health(&agents[2]) == Some(true),
    );
    let (ok, status, out) = refreshed_status(&controller, &reader);
    assert!(ok, "{}", text(&out));
    assert_eq!(status["problems"], serde_json::json!([]), "{status:#}");

    // A node-local rollback on n1 shows at once with --refresh.
    let out = agents[0].cli(&["rollback", "--app", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    let (_, status, _) = refreshed_status(&controller, &reader);
    assert_eq!(nodes_on(&status, "v2"), ["n1"], "{status:#}");
    assert_eq!(nodes_on(&status, "v3"), ["n2", "n3"], "{status:#}");

    // n3's agent stops: a refresh finds it gone at once, a restart there
    // fails naming it, and it turns unreachable once its heartbeats are due.
    agents[2].stop_run();
    let out = controller.slipway(&reader, &["status", "--refresh"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // "(no session …)", or "(its session ended …)" if the controller had
    // not yet seen the connection close when it asked.
    assert!(
        stdout(&out).contains("- n3 did not answer the status request ("),
        "{}",
        text(&out)
    );
    let out = controller.slipway(&deployer, &["restart", "web", "--node", "n3"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // The reason once, on the node's line; the end names the node only.
    assert!(
        stdout(&out).contains("[n3] FAILED: unreachable (no live session)"),
        "{}",
        text(&out)
    );
    assert!(
        stderr(&out).contains("failed: 1 of 1 nodes failed: n3 (failed)\n"),
        "{}",
        text(&out)
    );
    assert_eq!(
        text(&out).matches("unreachable (no live session)").count(),
        1,
        "{}",
        text(&out)
    );
    wait_until("n3 to be unreachable", Duration::from_secs(60), || {
        let out = controller.slipway(&reader, &["status"]);
        out.status.code() == Some(1) && stdout(&out).contains("- n3 is unreachable")
    });
    let out = controller.slipway(&reader, &["status", "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let status = json(&out);
    assert_eq!(status["counts"]["unreachable"], 1, "{status:#}");
    assert_eq!(status["counts"]["online"], 2, "{status:#}");
    let last = &status["apps"][0]["last_deployment"];
    assert_eq!(last["kind"], "restart", "{status:#}");
    assert_eq!(last["status"], "failed", "{status:#}");
    assert_eq!(last["nodes"][0]["node_name"], "n3", "{status:#}");

    // The audit log, by duration and by RFC 3339 time.
    let out = controller.slipway(&reader, &["audit", "--since", "1h", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let events: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let count = |t: &str| events.iter().filter(|e| e["event_type"] == t).count();
    assert_eq!(count("RESTART_STARTED"), 3);
    assert_eq!(count("RESTART_COMPLETED"), 2);
    assert_eq!(count("RESTART_FAILED"), 1);
    assert_eq!(count("PRUNE_STARTED"), 2);
    assert_eq!(count("PRUNE_COMPLETED"), 2);
    let refused: Vec<&Value> = events
        .iter()
        .filter(|e| e["event_type"] == "API_CALL_REFUSED")
        .map(|e| &e["resource_id"])
        .collect();
    assert_eq!(refused, ["restart app web", "prune app web"], "{events:#?}");
    let prune = events
        .iter()
        .find(|e| e["event_type"] == "PRUNE_STARTED")
        .unwrap();
    assert_eq!(prune["details"]["keep"], 1, "{prune:#}");
    let hour_ago = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
    let since = hour_ago
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let out = controller.slipway(&reader, &["audit", "--since", &since, "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        serde_json::from_slice::<Vec<Value>>(&out.stdout)
            .unwrap()
            .len(),
        events.len()
    );
    let _ = fs::remove_dir_all(work.path());
}

/// A fleet of web and worker nodes: a deploy, restart or env change of
/// `web` without a selector goes to the nodes whose agent runs web, not to
/// the worker node (which does not declare it); a worker node named with
/// `--node` is refused by its agent, naming what it declares.
#[test]
fn commands_for_an_app_go_to_the_nodes_that_run_it() {
    let controller = Controller::start();
    let work = tempfile::tempdir().unwrap();
    let mut web = Agent::enroll(&controller, "w1");
    let mut worker = Agent::enroll_with(&controller, "k1", "worker", |root, port| {
        format!(
            "[apps.worker]\nroot = \"{}\"\n\n[apps.worker.run]\ndriver = \"exec\"\n\
             command = [\"python3\", \"server.py\"]\nstop_grace = \"2s\"\n\n\
             [apps.worker.health]\ncheck = \"http\"\nurl = \"http://127.0.0.1:{port}/api/health\"\n\
             interval = \"100ms\"\nsuccesses = 2\nstart_period = \"3s\"\ndeadline = \"15s\"\n",
            root.display()
        )
    });
    web.run();
    worker.run();
    let reader = controller.api_token("read");
    controller.wait_online(&reader, 2, Duration::from_secs(30));
    let deployer = controller.api_token("deploy:web");

    let out = controller.deploy_version(&deployer, work.path(), "v1", APP, &["--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(web.get().as_deref(), Some("v1"));
    assert!(!text(&out).contains("k1"), "{}", text(&out));
    // The controller's env is the whole of shared/.env: PORT with it.
    let port = format!("PORT={}", web.port);
    let out = controller.slipway(
        &deployer,
        &["env", "set", "web", &port, "GREETING=hi", "--wait"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("k1"), "{}", text(&out));
    let out = controller.slipway(&deployer, &["restart", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("k1"), "{}", text(&out));

    let out = controller.deploy_version(
        &deployer,
        work.path(),
        "v2",
        APP,
        &["--wait", "--node", "k1"],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("is not declared") && text(&out).contains("worker"),
        "{}",
        text(&out)
    );
    // A tag no node running web carries: said, nothing started.
    let out = controller.deploy_version(
        &deployer,
        work.path(),
        "v3",
        APP,
        &["--wait", "--tag", "role:none"],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("runs app \"web\""), "{}", text(&out));
}
