//! Push deploys from the `slipway` CLI: a controller and three agent
//! processes over real mTLS; the artifact is uploaded once to the
//! controller and fetched by every agent over its link.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

mod support;

use std::fs;
use std::process::Output;
use std::time::Duration;

use support::{artifact, sha256_file, wait_until, Agent, Controller, APP};

/// An app that dies at once: its health gate fails and the agent rolls back.
const BROKEN_APP: &str = "import sys\nsys.exit(3)\n";

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn online(controller: &Controller, token: &str) -> usize {
    let out = controller.slipway(token, &["nodes", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let nodes: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    nodes.iter().filter(|n| n["state"] == "online").count()
}

#[test]
fn slipway_deploy_reaches_three_agents_and_reports_a_failing_node() {
    let controller = Controller::start();
    let mut agents: Vec<Agent> = ["n1", "n2", "n3"]
        .iter()
        .map(|n| Agent::enroll(&controller, n))
        .collect();
    for a in &mut agents {
        a.run();
    }
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    wait_until("three online nodes", Duration::from_secs(30), || {
        online(&controller, &reader) == 3
    });

    // A read token cannot deploy.
    let work = tempfile::tempdir().unwrap();
    let v1 = artifact(work.path(), "v1", APP);
    let sha1 = sha256_file(&v1);
    let refused = controller.slipway(
        &reader,
        &[
            "deploy",
            "web",
            v1.to_str().unwrap(),
            "--sha",
            &sha1,
            "--id",
            "v1",
            "--wait",
        ],
    );
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("PermissionDenied"),
        "{}",
        text(&refused)
    );

    // Upload once, deploy everywhere.
    let out = controller.slipway(
        &deployer,
        &[
            "deploy",
            "web",
            v1.to_str().unwrap(),
            "--sha",
            &sha1,
            "--id",
            "v1",
            "--wait",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("uploaded artifact"), "{stdout}");
    for a in &agents {
        assert!(
            stdout.contains(&format!("[{}] SUCCEEDED", a.name)),
            "{stdout}"
        );
        assert!(stdout.contains(&format!("[{}] fetch", a.name)), "{stdout}");
        assert_eq!(
            a.get().as_deref(),
            Some("v1"),
            "{} does not serve v1",
            a.name
        );
    }

    // A release that fails its health gate, sent to n2 only: n2 rolls back
    // to v1, the CLI exits non-zero and says which node and why.
    let bad = artifact(work.path(), "v2", BROKEN_APP);
    let sha2 = sha256_file(&bad);
    let out = controller.slipway(
        &deployer,
        &[
            "deploy",
            "web",
            bad.to_str().unwrap(),
            "--sha",
            &sha2,
            "--id",
            "v2",
            "--wait",
            "--node",
            "n2",
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1 of 1 nodes failed: n2 (rolled back"),
        "{}",
        text(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("[n2] ROLLED_BACK"));
    for a in &agents {
        assert_eq!(
            a.get().as_deref(),
            Some("v1"),
            "{} does not serve v1",
            a.name
        );
    }

    // The same artifact again is not uploaded twice.
    let again = controller.slipway(
        &deployer,
        &[
            "deploy",
            "web",
            v1.to_str().unwrap(),
            "--sha",
            &sha1,
            "--id",
            "v1",
            "--wait",
            "--node",
            "n1",
        ],
    );
    assert!(again.status.success(), "{}", text(&again));
    assert!(String::from_utf8_lossy(&again.stdout).contains("already on the controller"));

    // Roll one node forward to v3, then back through the controller.
    let v3 = artifact(work.path(), "v3", APP);
    let sha3 = sha256_file(&v3);
    let out = controller.slipway(
        &deployer,
        &[
            "deploy",
            "web",
            v3.to_str().unwrap(),
            "--sha",
            &sha3,
            "--id",
            "v3",
            "--wait",
            "--node",
            "n3",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(agents[2].get().as_deref(), Some("v3"));
    let out = controller.slipway(
        &deployer,
        &["rollback", "web", "--node", "n3", "--to", "v1", "--wait"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("[n3] SUCCEEDED"),
        "{}",
        text(&out)
    );
    assert_eq!(agents[2].get().as_deref(), Some("v1"));
    // A read token cannot roll back.
    let out = controller.slipway(&reader, &["rollback", "web", "--node", "n3"]);
    assert!(!out.status.success(), "{}", text(&out));

    let audit = controller.slipway(&reader, &["audit", "--since", "1h", "--json"]);
    assert!(audit.status.success(), "{}", text(&audit));
    let events: Vec<serde_json::Value> = serde_json::from_slice(&audit.stdout).unwrap();
    let count = |t: &str| events.iter().filter(|e| e["event_type"] == t).count();
    assert_eq!(count("DEPLOY_STARTED"), 4);
    assert_eq!(count("DEPLOY_COMPLETED"), 3);
    assert_eq!(count("ROLLBACK_COMPLETED"), 1);
    assert_eq!(count("DEPLOY_FAILED"), 1);
    assert_eq!(count("API_CALL_REFUSED"), 2);
    let failed = events
        .iter()
        .find(|e| e["event_type"] == "DEPLOY_FAILED")
        .unwrap();
    assert_eq!(failed["details"]["failed_nodes"][0]["node_name"], "n2");
    let _ = fs::remove_dir_all(work.path());
}
