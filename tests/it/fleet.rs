//! A controller and three agent processes, each with its own root, enrolled
//! with one-time tokens over real mTLS.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::time::Duration;

use crate::support::{wait_until, Agent, Controller};

fn nodes(controller: &Controller) -> Vec<serde_json::Value> {
    let out = controller.cli(&["nodes", "--json"]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn log_of(agent: &Agent) -> String {
    fs::read_to_string(agent.dir.path().join("agent.log")).unwrap_or_default()
}

fn connections(agent: &Agent) -> usize {
    log_of(agent).matches("connected to the controller").count()
}

#[test]
fn fleet_keeps_serving_and_deploying_without_its_controller_and_reconnects() {
    let mut controller = Controller::start();
    let mut agents = Agent::enroll_all(&controller, &["n1", "n2", "n3"]);
    for a in &mut agents {
        let rep = a.deploy("v1");
        assert_eq!(rep["outcome"], "succeeded", "{rep:#}");
        a.run();
    }
    for a in &agents {
        wait_until(
            &format!("{} to connect", a.name),
            Duration::from_secs(30),
            || connections(a) >= 1,
        );
        assert_eq!(a.get().as_deref(), Some("v1"));
    }
    // The controller's fleet view: every node online, with its heartbeat
    // (agent version and RSS, metrics) and its app on v1.
    wait_until("three heartbeating nodes", Duration::from_secs(30), || {
        let nodes = nodes(&controller);
        nodes.len() == 3
            && nodes.iter().all(|n| {
                n["state"] == "online"
                    && n["agent_rss_bytes"].as_u64().is_some_and(|r| r > 0)
                    && n["metrics"]["mem_total_bytes"]
                        .as_u64()
                        .is_some_and(|m| m > 0)
                    && n["apps"][0]["current_release"] == "v1"
            })
    });
    let names: Vec<String> = nodes(&controller)
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        ["n1", "n2", "n3"]
            .iter()
            .all(|n| names.iter().any(|x| x == n)),
        "{names:?}"
    );

    // The controller goes away: apps keep running, local deploys work.
    controller.stop();
    std::thread::sleep(Duration::from_secs(1));
    for a in &agents {
        assert_eq!(a.get().as_deref(), Some("v1"), "{} stopped serving", a.name);
    }
    let rep = agents[0].deploy("v2");
    assert_eq!(rep["outcome"], "succeeded", "{rep:#}");
    assert_eq!(agents[0].get().as_deref(), Some("v2"));
    let rb = agents[0].cli(&["rollback", "--app", "web"]);
    assert!(rb.status.success(), "{rb:?}");
    assert_eq!(agents[0].get().as_deref(), Some("v1"));

    // Back: every agent reconnects by itself (backoff capped at 60 s).
    controller.restart();
    for a in &agents {
        wait_until(
            &format!("{} to reconnect", a.name),
            Duration::from_secs(75),
            || connections(a) >= 2,
        );
    }
}

#[test]
fn a_revoked_node_is_cut_off_but_keeps_its_apps() {
    let controller = Controller::start();
    let mut agent = Agent::enroll(&controller, "doomed");
    agent.deploy("v1");
    agent.run();
    wait_until("the agent to connect", Duration::from_secs(30), || {
        connections(&agent) >= 1
    });
    let id = nodes(&controller)[0]["id"].as_str().unwrap().to_owned();
    let out = controller.cli(&["node", "revoke", &id]);
    assert!(out.status.success(), "{out:?}");
    wait_until(
        "the agent to learn it was revoked",
        Duration::from_secs(30),
        || log_of(&agent).contains("revoked"),
    );
    assert_eq!(nodes(&controller)[0]["state"], "revoked");
    // It does not hammer the controller, and its app still serves.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(connections(&agent), 1, "{}", log_of(&agent));
    assert_eq!(agent.get().as_deref(), Some("v1"));
}
