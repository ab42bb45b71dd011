//! Certificates that never expire into an outage: the controller's server
//! certificate is renewed at two thirds of its life, while serving (no
//! session dropped) and at start (a controller restarted 400 days later).

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::time::{Duration, Instant};

use serde_json::Value;

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

/// `slipway status --json` as (exit code, summary), run at the controller's
/// clock plus `offset` (e.g. "+3645d") when given.
fn status_at(controller: &Controller, token: &str, offset: Option<&str>) -> (i32, Value) {
    let mut command = match offset {
        Some(offset) => {
            let mut c = std::process::Command::new("faketime");
            c.args(["-f", offset]).arg(crate::support::bin("slipway"));
            c
        }
        None => std::process::Command::new(crate::support::bin("slipway")),
    };
    let out = command
        .args(["--controller", &controller.url(), "--ca"])
        .arg(controller.ca_pem())
        .args(["--token", token, "status", "--json"])
        .output()
        .unwrap();
    let value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    (out.status.code().unwrap_or(-1), value)
}

fn certificate<'a>(status: &'a Value, kind: &str, name: &str) -> &'a Value {
    status["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["kind"] == kind && (name.is_empty() || c["name"] == name))
        .unwrap_or_else(|| panic!("no {kind} certificate {name}: {status:#}"))
}

fn lines_with<'a>(status: &'a Value, list: &str, needle: &str) -> Vec<&'a str> {
    status[list]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .filter(|l| l.contains(needle))
        .collect()
}

#[test]
fn status_shows_every_certificate_and_warns_then_fails_as_expiry_nears() {
    let mut controller = Controller::start();
    let mut agent = Agent::enroll(&controller, "h1");
    agent.run();
    let reader = controller.api_token("read");
    controller.wait_online(&reader, 1, Duration::from_secs(30));

    // A fresh system: every certificate listed, all fine, exit 0.
    let (code, status) = status_at(&controller, &reader, None);
    assert_eq!(code, 0, "{status:#}");
    let ca = certificate(&status, "ca", "");
    assert!(ca["days_left"].as_i64().unwrap() >= 3649, "{ca:#}");
    assert_eq!(ca["level"], "ok");
    let server = certificate(&status, "server", "controller");
    assert!(
        (364..=365).contains(&server["days_left"].as_i64().unwrap()),
        "{server:#}"
    );
    assert_eq!(server["renewed_automatically"], true);
    let node = certificate(&status, "node", "h1");
    assert!(
        (6..=7).contains(&node["days_left"].as_i64().unwrap()),
        "{node:#}"
    );
    assert_eq!(node["level"], "ok");
    assert!(
        node["not_after_rfc3339"].as_str().unwrap().ends_with('Z'),
        "{node:#}"
    );

    // An operator certificate made for 20 days: a note (exit still 0).
    let creds = tempfile::tempdir().unwrap();
    let out_arg = creds.path().to_str().unwrap();
    for (name, ttl) in [("soon", "20d"), ("late", "5d")] {
        let out = controller.cli(&[
            "operator", "create", name, "--scope", "read", "--ttl", ttl, "--out", out_arg,
        ]);
        assert!(out.status.success(), "{}", text(&out));
        if name == "soon" {
            let (code, status) = status_at(&controller, &reader, None);
            assert_eq!(code, 0, "{status:#}");
            assert_eq!(certificate(&status, "operator", "soon")["level"], "warning");
            assert_eq!(
                lines_with(&status, "notes", "operator soon's certificate expires in").len(),
                1,
                "{status:#}"
            );
        }
    }
    // One with 5 days left: a problem, exit 1, and the text says which.
    let (code, status) = status_at(&controller, &reader, None);
    assert_eq!(code, 1, "{status:#}");
    assert_eq!(certificate(&status, "operator", "late")["level"], "failing");
    assert_eq!(
        lines_with(
            &status,
            "problems",
            "operator late's certificate expires in "
        )
        .len(),
        1,
        "{status:#}"
    );
    let out = controller.slipway(&reader, &["status"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let shown = text(&out);
    assert!(shown.contains("certificates:"), "{shown}");
    assert!(shown.contains("node certificates: 1"), "{shown}");
    assert!(
        shown.contains("- operator late's certificate expires in "),
        "{shown}"
    );
    // Revoking it takes it off the list: status is clean again.
    let out = controller.cli(&["operator", "revoke", "late"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = controller.cli(&["operator", "revoke", "soon"]);
    assert!(out.status.success(), "{}", text(&out));
    let (code, status) = status_at(&controller, &reader, None);
    assert_eq!(code, 0, "{status:#}");

    // 3645 days on the CA (10 years) has 4 days left and the node's
    // certificate expired long ago: both are problems, named.
    agent.stop_run();
    controller.wrapper = ["faketime", "-f", "+3645d"].map(String::from).to_vec();
    controller.restart();
    let (code, status) = status_at(&controller, &reader, Some("+3645d"));
    assert_eq!(code, 1, "{status:#}");
    assert_eq!(certificate(&status, "ca", "")["level"], "failing");
    assert_eq!(
        lines_with(&status, "problems", "the CA Slipway controller CA").len(),
        1,
        "{status:#}"
    );
    assert_eq!(
        lines_with(&status, "problems", "ca rotate start").len(),
        1,
        "{status:#}"
    );
    let node = certificate(&status, "node", "h1");
    assert!(node["days_left"].as_i64().unwrap() < -3600, "{node:#}");
    assert_eq!(
        lines_with(&status, "problems", "node h1's certificate expired").len(),
        1,
        "{status:#}"
    );
    // The server certificate was reissued at that start: fine.
    assert_eq!(certificate(&status, "server", "")["level"], "ok");
}

#[test]
fn a_node_back_after_its_certificate_expired_is_told_and_replace_brings_it_back_as_itself() {
    // Node certificates of 30 s: one expires while its agent is stopped.
    let controller = Controller::start_with(&["--node-cert-validity", "30s"]);
    let mut agent = Agent::enroll(&controller, "x1");
    agent.run();
    let token = controller.api_token("read,deploy:web");
    controller.wait_online(&token, 1, Duration::from_secs(30));
    let work = tempfile::tempdir().unwrap();
    let out =
        controller.deploy_version(&token, work.path(), "v1", crate::support::APP, &["--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let nodes = crate::support::json(&controller.slipway(&token, &["nodes", "--json"]));
    let id = nodes[0]["id"].as_str().unwrap().to_owned();

    // Stopped past its certificate's end (renewed at most 30 s ago).
    agent.stop_run();
    let stopped = std::time::Instant::now();
    let nodes = crate::support::json(&controller.slipway(&token, &["nodes", "--json"]));
    let expires = nodes[0]["cert_expires_at"].as_i64().unwrap();
    let now = time_now();
    assert!(expires - now <= 31, "{nodes:#}");
    std::thread::sleep(Duration::from_secs(
        u64::try_from(expires - now + 2).unwrap_or(0),
    ));
    assert!(stopped.elapsed() < Duration::from_secs(40));

    // Back: refused, and both sides say why and what to do.
    agent.run();
    let log_path = agent.dir.path().join("agent.log");
    wait_until(
        "the agent to say its certificate expired",
        Duration::from_secs(30),
        || {
            fs::read_to_string(&log_path)
                .unwrap_or_default()
                .contains("this node's certificate expired")
        },
    );
    let log = fs::read_to_string(&log_path).unwrap();
    assert!(
        log.contains("re-enroll with `slipway-agent enroll --replace --token …`"),
        "{log}"
    );
    let refused = |c: &Controller| {
        c.audit(&token)
            .into_iter()
            .find(|e| e["event_type"] == "CLIENT_CERT_REFUSED" && e["resource_id"] == id.as_str())
    };
    wait_until(
        "the controller to audit the expired certificate",
        Duration::from_secs(30),
        || refused(&controller).is_some(),
    );
    let event = refused(&controller).unwrap();
    let message = event["error_message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with(&format!("node x1 ({id}): certificate expired ")),
        "{event:#}"
    );
    assert!(
        message.contains("slipway-agent enroll --replace --name x1 --token"),
        "{event:#}"
    );
    let controller_log = fs::read_to_string(controller.dir.path().join("controller.log")).unwrap();
    assert!(
        controller_log.contains("certificate expired"),
        "{controller_log}"
    );
    // Status fails on it, naming the node.
    let (code, status) = status_at(&controller, &token, None);
    assert_eq!(code, 1, "{status:#}");
    assert_eq!(
        lines_with(&status, "problems", "node x1's certificate expired").len(),
        1,
        "{status:#}"
    );

    // `enroll --replace` with a new join token: the same node, re-keyed.
    agent.stop_run();
    let out = controller.enroll_cli("x1", &agent.state_dir(), &["--replace"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("enrolled as node {id}")),
        "{}",
        text(&out)
    );
    agent.run();
    controller.wait_online(&token, 1, Duration::from_secs(30));
    let nodes = crate::support::json(&controller.slipway(&token, &["nodes", "--json"]));
    let nodes = nodes.as_array().unwrap();
    assert_eq!(nodes.len(), 1, "one node, not a second: {nodes:#?}");
    assert_eq!(nodes[0]["id"], id.as_str());
    assert_eq!(nodes[0]["name"], "x1");
    assert_eq!(nodes[0]["state"], "online");
    assert!(nodes[0]["revoked_at"].is_null(), "{nodes:#?}");
    let audit = controller.audit(&token);
    assert!(
        audit
            .iter()
            .any(|e| e["event_type"] == "NODE_REPLACED" && e["resource_id"] == id.as_str()),
        "{audit:#?}"
    );
    // Its history is its own still: the deployment names it, the app
    // runs v1, and status no longer complains about its certificate.
    let (_, status) = status_at(&controller, &token, None);
    let last = &status["apps"][0]["last_deployment"];
    assert_eq!(last["nodes"][0]["node_id"], id.as_str(), "{status:#}");
    assert_eq!(last["nodes"][0]["node_name"], "x1", "{status:#}");
    assert!(
        lines_with(&status, "problems", "x1's certificate").is_empty(),
        "{status:#}"
    );
    assert_eq!(agent.get().as_deref(), Some("v1"));
}

fn time_now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

/// The CAs in a PEM file, as sha256 hex of their DER.
fn pem_fingerprints(path: &std::path::Path) -> Vec<String> {
    use rustls::pki_types::pem::PemObject as _;
    use sha2::Digest as _;
    let pem = fs::read(path).unwrap();
    rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .map(|der| hex::encode(sha2::Sha256::digest(der.unwrap().as_ref())))
        .collect()
}

// The rotation starts with a rolling deploy in flight and one node offline;
// every connected node must renew onto the new CA with no session dropped.
// (It once timed out here under load: `start` writes its state file last,
// and a controller that read the new CA files in between sent every node
// the bundle without `renew_now`, once. The watch now waits for the state
// and sends the bundle again to nodes that still lag. It failed once more
// with no node lagging at all: "gone" was enrolled in the same second the
// rotation started, and lagging was judged by issue time in whole seconds.
// The store now records which CA signed each certificate.)
#[test]
fn ca_rotation_with_ten_agents_and_a_deploy_running_drops_no_session() {
    let controller = Controller::start();
    let old_ca = pem_fingerprints(&controller.ca_pem());
    assert_eq!(old_ca.len(), 1);
    let mut agents: Vec<Agent> = (0..10)
        .map(|i| Agent::enroll(&controller, &format!("rot{i}")))
        .collect();
    for agent in &mut agents {
        agent.run();
    }
    // Enrolled, then offline while the rotation starts.
    let mut late = Agent::enroll(&controller, "late");
    // Enrolled, then offline through the whole rotation.
    let mut gone = Agent::enroll(&controller, "gone");
    let token = controller.api_token("read,deploy:web");
    controller.wait_online(&token, 10, Duration::from_secs(60));
    // An operator certificate of the old CA: refused once it is dropped.
    let creds = tempfile::tempdir().unwrap();
    let out = controller.cli(&[
        "operator",
        "create",
        "old-op",
        "--scope",
        "read",
        "--out",
        creds.path().to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let (op_cert, op_key) = (
        creds.path().join("old-op.pem"),
        creds.path().join("old-op.key"),
    );

    // A rolling deploy across the ten, running while the rotation starts.
    let work = tempfile::tempdir().unwrap();
    let art = crate::support::artifact(work.path(), "v1", crate::support::APP);
    let sha = crate::support::sha256_file(&art);
    let deploy = {
        let mut command = controller.slipway_command();
        command
            .args(["--token", &token, "deploy", "web"])
            .arg(&art)
            .args([
                "--sha",
                &sha,
                "--id",
                "v1",
                "--wait",
                "--strategy",
                "rolling",
                "--max-parallel",
                "3",
                // The offline node fails (unreachable); the rest go on.
                "--max-unavailable",
                "2",
            ]);
        std::thread::spawn(move || command.output().unwrap())
    };
    wait_until("the deployment to start", Duration::from_secs(30), || {
        controller
            .audit(&token)
            .iter()
            .any(|e| e["event_type"] == "DEPLOY_STARTED")
    });
    let out = controller.cli(&["ca", "rotate", "start", "--now"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("CA rotation started"), "{}", text(&out));
    let bundle = pem_fingerprints(&controller.ca_pem());
    assert_eq!(bundle.len(), 2, "old and new trusted");
    assert_eq!(bundle[0], old_ca[0]);
    let new_ca = bundle[1].clone();
    // A second start is refused while this one runs.
    let again = controller.cli(&["ca", "rotate", "start"]);
    assert_eq!(again.status.code(), Some(64), "{}", text(&again));

    // The node that was offline comes back before finish: it joins.
    late.run();
    controller.wait_online(&token, 11, Duration::from_secs(60));
    // Every online node renews onto the new CA; status names who lags.
    let mut last = serde_json::Value::Null;
    let waited = Instant::now();
    while last["ca_rotation"]["lagging_nodes"] != serde_json::json!(["gone"]) {
        assert!(
            waited.elapsed() < Duration::from_secs(90),
            "timed out after 90 s waiting for every online node on the new CA; last: {:#}",
            last["ca_rotation"]
        );
        std::thread::sleep(Duration::from_millis(200));
        last = status_at(&controller, &token, None).1;
    }
    let (_, status) = status_at(&controller, &token, None);
    assert_eq!(status["ca_rotation"]["phase"], "started", "{status:#}");
    assert_eq!(status["ca_rotation"]["new_ca_sha256"], new_ca.as_str());
    let certificates = status["certificates"].as_array().unwrap();
    assert_eq!(
        certificates.iter().filter(|c| c["kind"] == "ca").count(),
        2,
        "{status:#}"
    );
    // Every agent has stored the bundle.
    for agent in agents.iter().chain(std::iter::once(&late)) {
        let path = agent.state_dir().join("ca.pem");
        wait_until(
            "the agent to store the bundle",
            Duration::from_secs(30),
            || pem_fingerprints(&path).contains(&new_ca),
        );
    }
    // Every online node deployed; only the offline one failed.
    let deployed = deploy.join().unwrap();
    let said = text(&deployed);
    assert!(said.contains("2 of 12 nodes failed"), "{said}");
    assert_eq!(said.matches("] SUCCEEDED").count(), 10, "{said}");

    // Not finished while a live node is on the old CA, unless forced.
    let out = controller.cli(&["ca", "rotate", "finish"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("still on the old CA: gone"),
        "{}",
        text(&out)
    );
    let out = controller.cli(&["ca", "rotate", "finish", "--force"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        pem_fingerprints(&controller.ca_pem()),
        std::slice::from_ref(&new_ca)
    );
    // The CLI trusting only the new CA reaches the moved server certificate.
    wait_until(
        "the server certificate to move to the new CA",
        Duration::from_secs(30),
        || controller.slipway(&token, &["nodes"]).status.success(),
    );
    let (_, status) = status_at(&controller, &token, None);
    assert!(status["ca_rotation"].is_null(), "{status:#}");
    // Old-CA client certificates are refused.
    let refused = controller.slipway_as(&op_cert, &op_key, &["nodes"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    let audit = controller.audit(&token);
    for event in ["CA_ROTATION_STARTED", "CA_ROTATION_FINISHED"] {
        assert!(
            audit.iter().any(|e| e["event_type"] == event),
            "{event}: {audit:#?}"
        );
    }
    // Named, and told what to do.
    assert!(
        audit.iter().any(|e| {
            e["event_type"] == "CLIENT_CERT_REFUSED"
                && e["resource_type"] == "operator"
                && e["error_message"].as_str().is_some_and(|m| {
                    m.contains("certificate is not from a CA this controller trusts")
                        && m.contains("operator create")
                })
        }),
        "{audit:#?}"
    );
    // Every agent is still on its first session, on the new CA.
    for agent in &agents {
        let log = fs::read_to_string(agent.dir.path().join("agent.log")).unwrap();
        assert_eq!(
            log.matches("connected to the controller").count(),
            1,
            "{} reconnected:\n{log}",
            agent.name
        );
        assert!(log.contains("certificate renewed onto the new CA"), "{log}");
        assert_eq!(agent.get().as_deref(), Some("v1"), "{}", agent.name);
    }
    assert_eq!(controller.online(&token), 11);

    // The node offline through it all is told to re-enroll; --replace
    // (a join token of the new CA) brings it back as itself.
    gone.run();
    let log_path = gone.dir.path().join("agent.log");
    wait_until("the stale node to say why", Duration::from_secs(30), || {
        fs::read_to_string(&log_path)
            .unwrap_or_default()
            .contains("not from a CA this node trusts")
    });
    let log = fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("enroll --replace --token"), "{log}");
    gone.stop_run();
    let out = controller.enroll_cli("gone", &gone.state_dir(), &["--replace"]);
    assert!(out.status.success(), "{}", text(&out));
    gone.run();
    controller.wait_online(&token, 12, Duration::from_secs(60));
    let (_, status) = status_at(&controller, &token, None);
    let named = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["name"] == "gone")
        .count();
    assert_eq!(named, 1, "{status:#}");
    assert!(
        lines_with(&status, "problems", "certificate").is_empty(),
        "{status:#}"
    );
}
