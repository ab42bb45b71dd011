//! A controller and three agent processes, each with its own root, enrolled
//! with one-time tokens over real mTLS.

mod support;

use std::fs;
use std::time::Duration;

use support::{wait_until, Agent, Controller};

fn connections(agent: &Agent) -> usize {
    fs::read_to_string(agent.dir.path().join("agent.log"))
        .unwrap_or_default()
        .matches("connected to the controller")
        .count()
}

#[test]
fn fleet_keeps_serving_and_deploying_without_its_controller_and_reconnects() {
    let mut controller = Controller::start();
    let mut agents: Vec<Agent> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| Agent::enroll(&controller, n))
        .collect();
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
