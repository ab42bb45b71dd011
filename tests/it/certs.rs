//! Certificates that never expire into an outage: the controller's server
//! certificate is renewed at two thirds of its life, while serving (no
//! session dropped) and at start (a controller restarted 400 days later).

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::time::Duration;

use crate::support::{text, wait_until, Agent, Controller};

fn renewals(controller: &Controller, token: &str) -> usize {
    controller
        .audit(token)
        .iter()
        .filter(|e| e["event_type"] == "SERVER_CERT_RENEWED")
        .count()
}

#[test]
fn server_certificate_is_renewed_while_serving_without_dropping_a_session() {
    // 30 s of life: renewed about 20 s in, and again 20 s later.
    let controller = Controller::start_with(&["--server-cert-validity", "30s"]);
    let mut agent = Agent::enroll(&controller, "r1");
    agent.run();
    let reader = controller.api_token("read");
    controller.wait_online(&reader, 1, Duration::from_secs(30));
    let pem = controller.data_dir().join("server.pem");
    let first = fs::read(&pem).unwrap();

    wait_until(
        "two server certificate renewals",
        Duration::from_secs(90),
        || renewals(&controller, &reader) >= 2,
    );
    let renewed = fs::read(&pem).unwrap();
    assert_ne!(first, renewed, "server.pem was not replaced");
    let event = controller
        .audit(&reader)
        .into_iter()
        .find(|e| e["event_type"] == "SERVER_CERT_RENEWED")
        .unwrap();
    assert_eq!(event["status"], "success", "{event:#}");
    assert!(
        event["details"]["not_after"].as_str().is_some(),
        "{event:#}"
    );

    // New handshakes get the new certificate and trust it (the CLI)...
    let out = controller.slipway(&reader, &["nodes"]);
    assert!(out.status.success(), "{}", text(&out));
    // ...and the agent's session, made under the first certificate, was
    // never dropped: it connected once, and is online now.
    let log = fs::read_to_string(agent.dir.path().join("agent.log")).unwrap();
    assert_eq!(
        log.matches("connected to the controller").count(),
        1,
        "the agent reconnected:\n{log}"
    );
    assert_eq!(controller.online(&reader), 1);
}

#[test]
fn a_controller_restarted_400_days_later_reissues_its_server_certificate() {
    let mut controller = Controller::start();
    let reader = controller.api_token("read");
    let out = controller.slipway(&reader, &["nodes"]);
    assert!(out.status.success(), "{}", text(&out));
    let first = fs::read(controller.data_dir().join("server.pem")).unwrap();

    // The same data dir, 400 days on (past the 365-day certificate).
    controller.wrapper = ["faketime", "-f", "+400d"].map(String::from).to_vec();
    controller.restart();
    let log = fs::read_to_string(controller.dir.path().join("controller.log")).unwrap();
    assert!(
        log.contains("past two thirds of its life (or expired): issuing a new one"),
        "{log}"
    );
    assert_ne!(
        first,
        fs::read(controller.data_dir().join("server.pem")).unwrap(),
        "server.pem was not reissued"
    );
    // A client living 400 days on too connects (before the renewal it was
    // refused: "certificate expired").
    let out = std::process::Command::new("faketime")
        .args(["-f", "+400d"])
        .arg(crate::support::bin("slipway"))
        .args(["--controller", &controller.url(), "--ca"])
        .arg(controller.ca_pem())
        .args(["--token", &reader, "nodes"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
}
