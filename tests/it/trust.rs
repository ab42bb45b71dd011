//! The trust boundary through the real binaries and real TLS: a deploy ships
//! exactly the file it was given; node names are unique and follow one rule
//! at enrollment and in every selector; no field a peer sends is unbounded;
//! nothing from outside can forge a log line or a table row; a node without
//! a live session is not online.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::process::{Command, Output};
use std::time::Duration;

use crate::support::{
    artifact, bin, json, sha256_file, stderr, stdout, text, wait_until, Agent, Controller, APP,
};

/// `slipway-agent enroll` into a fresh state dir, unchecked.
fn enroll(controller: &Controller, name: &str, extra: &[&str]) -> (tempfile::TempDir, Output) {
    let state = tempfile::tempdir().unwrap();
    let out = controller.enroll_cli(name, state.path(), extra);
    (state, out)
}

fn controller_log(controller: &Controller) -> String {
    fs::read_to_string(controller.dir.path().join("controller.log")).unwrap()
}

#[test]
fn a_deploy_ships_the_file_it_was_given_whatever_sha_is_named() {
    let controller = Controller::start();
    let mut agent = Agent::enroll(&controller, "n1");
    agent.run();
    let token = controller.api_token("deploy:web");
    let work = tempfile::tempdir().unwrap();
    let v1 = controller.deploy_version(&token, work.path(), "v1", APP, &["--wait"]);
    assert!(v1.status.success(), "{}", text(&v1));
    let v1_sha = sha256_file(&artifact(work.path(), "v1", APP));

    // The controller holds v1; the v4 file is named with v1's digest.
    let v4 = artifact(work.path(), "v4", APP);
    let v4_arg = v4.to_str().unwrap();
    let mistaken = controller.slipway(
        &token,
        &[
            "deploy", "web", v4_arg, "--sha", &v1_sha, "--id", "v4e", "--wait",
        ],
    );
    assert_eq!(mistaken.status.code(), Some(64), "{}", text(&mistaken));
    let said = stderr(&mistaken);
    assert!(
        said.contains(&format!("--sha {v1_sha} does not match")),
        "{said}"
    );
    assert!(said.contains(&sha256_file(&v4)), "{said}");
    assert!(!text(&mistaken).contains("already on the controller"));
    // And a digest the controller does not hold: refused the same way.
    let unknown = "0".repeat(64);
    let out = controller.slipway(
        &token,
        &["deploy", "web", v4_arg, "--sha", &unknown, "--wait"],
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(stderr(&out).contains("does not match"), "{}", text(&out));
    // Nothing was deployed, uploaded or even started.
    let audit = controller.audit(&token);
    assert!(!audit
        .iter()
        .any(|e| e["resource_id"] == "v4e" || e["details"]["release_id"] == "v4e"));
    assert_eq!(
        audit
            .iter()
            .filter(|e| e["event_type"] == "DEPLOY_STARTED")
            .count(),
        1,
        "{audit:#?}"
    );
    assert_eq!(agent.get().as_deref(), Some("v1"));

    // Without --sha the file is hashed here and ships as itself.
    let out = controller.slipway(&token, &["deploy", "web", v4_arg, "--id", "v4", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&sha256_file(&v4)), "{}", text(&out));
    wait_until("v4 to serve", Duration::from_secs(10), || {
        agent.get().as_deref() == Some("v4")
    });
}

#[test]
fn node_names_are_unique_checked_and_escaped() {
    let controller = Controller::start();
    let (_first, out) = enroll(&controller, "n1", &[]);
    assert!(out.status.success(), "{}", text(&out));
    let first_id = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("n-"))
        .unwrap()
        .to_owned();

    // A second n1 is refused naming the node that has the name.
    let (_second, out) = enroll(&controller, "n1", &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr(&out).contains(&format!("node name n1 is taken by node {first_id}")),
        "{}",
        text(&out)
    );
    // --replace takes it over: the same node (id, history) with the new
    // key, not a second one; it is audited.
    let (_third, out) = enroll(&controller, "n1", &["--replace"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&first_id), "{}", text(&out));
    let read = controller.api_token("read,deploy:web");
    let nodes = json(&controller.slipway(&read, &["nodes", "--json"]));
    let named: Vec<_> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["name"] == "n1")
        .collect();
    assert_eq!(named.len(), 1, "{nodes:#}");
    assert_eq!(named[0]["id"], first_id.as_str(), "{nodes:#}");
    assert!(named[0]["revoked_at"].is_null(), "{nodes:#}");
    let audit = controller.audit(&read);
    assert!(
        audit
            .iter()
            .any(|e| e["event_type"] == "NODE_REPLACED" && e["resource_id"] == first_id.as_str()),
        "{audit:#?}"
    );
    // A selector by name targets the one live node.
    let out = controller.slipway(&read, &["restart", "web", "--node", "n1", "--json"]);
    let results = json(&out);
    assert_eq!(
        results["nodes"].as_array().map(Vec::len),
        Some(1),
        "{}",
        text(&out)
    );

    // Hostile names: refused by the agent before it dials (exit 64)...
    for bad in [
        "../../etc",
        "a/b",
        "<script>",
        "n1\nFAKE LOG LINE",
        &"n".repeat(254),
    ] {
        let (_s, out) = enroll(&controller, bad, &[]);
        assert_eq!(out.status.code(), Some(64), "{bad:?}: {}", text(&out));
        assert!(stderr(&out).contains("invalid node name"), "{}", text(&out));
    }
    // ...and by the controller when sent anyway (a hostile agent).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let refused = runtime.block_on(raw_enroll(&controller, "n1\nFAKE LOG LINE"));
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused
        .message()
        .contains(r#"invalid node name "n1\nFAKE LOG LINE""#));
    // In every selector.
    for args in [
        vec!["restart", "web", "--node", "../../etc"],
        vec!["prune", "web", "--node", "a/b"],
        vec!["rollback", "web", "--node", "<script>"],
        vec!["restart", "web", "--tag", "env:a b"],
    ] {
        let out = controller.slipway(&read, &args);
        assert_ne!(out.status.code(), Some(0), "{args:?}");
        let said = stderr(&out);
        assert!(
            said.contains("invalid node name") || said.contains("label value"),
            "{args:?}: {said}"
        );
        assert!(
            said.contains("InvalidArgument") || out.status.code() == Some(64),
            "{said}"
        );
    }
    // Nothing from outside forged a log line or a table row.
    let log = controller_log(&controller);
    assert!(
        !log.lines().any(|l| l.starts_with("FAKE LOG LINE")),
        "{log}"
    );
    assert!(log.contains(r"n1\nFAKE LOG LINE"), "{log}");
    let table = controller.slipway(&read, &["nodes"]);
    assert!(table.status.success(), "{}", text(&table));
    // A header and the one node n1 (replaced, not doubled).
    assert_eq!(
        String::from_utf8_lossy(&table.stdout).lines().count(),
        2,
        "{}",
        text(&table)
    );
}

/// Enrolls `name` over gRPC with no client-side check, as a hostile agent
/// would; the controller's refusal.
async fn raw_enroll(controller: &Controller, name: &str) -> tonic::Status {
    use slipway_controller::proto::client;
    use slipway_controller::proto::v1::enrollment_client::EnrollmentClient;
    use slipway_controller::proto::v1::EnrollRequest;
    slipway_controller::pki::crypto::install_default_provider();
    let roots = client::load_ca(&controller.ca_pem()).unwrap();
    let channel = client::connect(&controller.url(), roots).await.unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr_pem = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    EnrollmentClient::new(channel)
        .enroll(EnrollRequest {
            join_token: controller.token(),
            node_name: name.to_owned(),
            csr_pem,
            ..Default::default()
        })
        .await
        .unwrap_err()
}

#[test]
fn fields_at_just_under_and_over_their_limits_through_the_cli() {
    let controller = Controller::start();
    let agent = Agent::enroll(&controller, "n1");
    let token = controller.api_token("read,deploy:web");
    let work = tempfile::tempdir().unwrap();
    let art = artifact(work.path(), "v1", APP);
    let art_arg = art.to_str().unwrap();
    let deploy = |extra: &[&str]| {
        let mut args = vec!["deploy", "web", art_arg];
        args.extend_from_slice(extra);
        controller.slipway(&token, &args)
    };
    let id_128 = "v".repeat(128);
    let id_129 = "v".repeat(129);
    let id_huge = "v".repeat(100_000);
    let sha_huge = "a".repeat(100_000);
    for (extra, expected) in [
        (
            vec!["--id", id_129.as_str()],
            "release_id: invalid release id",
        ),
        (vec!["--id", id_huge.as_str()], "(100000 bytes)"),
        (vec!["--git-sha", sha_huge.as_str()], "git_sha: "),
        (vec!["--git-sha", "not-hex!"], "is not a git commit id"),
    ] {
        let out = deploy(&extra);
        assert_eq!(out.status.code(), Some(64), "{expected}: {}", text(&out));
        let said = stderr(&out);
        assert!(said.contains(expected), "{expected}: {said}");
        assert!(said.len() < 500, "{} byte error", said.len());
        assert!(!said.contains("h2 protocol error"), "{said}");
    }
    // At the limit: accepted (the node is offline: not deployed there).
    let out = deploy(&["--id", &id_128, "--git-sha", &"a".repeat(64), "--json"]);
    assert!(out.status.success(), "{}", text(&out));

    // Join-token tags become labels: at the limit they enroll, over it
    // `token create` refuses, and the fleet view renders either way.
    let at = format!("k:{}", "v".repeat(255));
    let out = controller.cli(&["token", "create", "--tag", &at]);
    assert!(out.status.success(), "{}", text(&out));
    let over = format!("k:{}", "v".repeat(256));
    let out = controller.cli(&["token", "create", "--tag", &over]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        stderr(&out).contains("256 bytes is over the limit of 255"),
        "{}",
        text(&out)
    );
    let nodes = controller.slipway(&token, &["nodes"]);
    assert!(nodes.status.success(), "{}", text(&nodes));
    let listed = controller.cli(&["nodes"]);
    assert!(listed.status.success(), "{}", text(&listed));
    drop(agent);
}

#[test]
fn status_is_not_ok_while_nodes_hold_no_session() {
    let mut controller = Controller::start();
    let mut agents = Agent::enroll_all(&controller, &["n1", "n2"]);
    for a in &mut agents {
        a.run();
    }
    let token = controller.api_token("read,deploy:web");
    controller.wait_online(&token, 2, Duration::from_secs(30));
    let ok = controller.slipway(&token, &["status"]);
    assert!(ok.status.success(), "{}", text(&ok));

    // Agents gone, controller restarted: nobody holds a session, so the
    // status cannot say every node is online.
    for a in &mut agents {
        a.stop_run();
    }
    controller.restart();
    let after = controller.slipway(&token, &["status"]);
    assert_eq!(after.status.code(), Some(1), "{}", text(&after));
    assert!(
        !text(&after).contains("every node online"),
        "{}",
        text(&after)
    );
    // Not heard from since the start, or (last heard in the start's own
    // second) heard but holding no session: either way a problem per node.
    for name in ["n1", "n2"] {
        assert!(
            text(&after).contains(&format!(
                "{name} has not been heard from since the controller started"
            )) || text(&after).contains(&format!("{name} holds no session with the controller")),
            "{}",
            text(&after)
        );
    }
    // A deploy at the same moment agrees: the nodes are unreachable.
    let work = tempfile::tempdir().unwrap();
    let out = controller.deploy_version(&token, work.path(), "v1", APP, &["--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("no live session"), "{}", text(&out));

    // Back: online. Then one agent killed: its heartbeat is recent, but it
    // holds no session, so it is not online, and status says why.
    for a in &mut agents {
        a.run();
    }
    controller.wait_online(&token, 2, Duration::from_secs(30));
    agents[1].stop_run();
    // (A node whose Hello came in the restart's own second reads as not
    // heard from since the start once its session is gone: also not online.)
    wait_until("n2 to lose its session", Duration::from_secs(15), || {
        let out = controller.slipway(&token, &["status"]);
        out.status.code() == Some(1)
            && stderr(&out).contains("status: 1 problem (listed above)")
            && (stdout(&out).contains("- n2 holds no session with the controller")
                || stdout(&out).contains("- n2 has not been heard from since the controller"))
    });
    let out = controller.slipway(&token, &["status"]);
    assert!(!text(&out).contains("OK:"), "{}", text(&out));
}

#[test]
fn operator_out_dir_is_private_whatever_the_umask() {
    let controller = Controller::start();
    let out_dir = tempfile::tempdir().unwrap();
    let target = out_dir.path().join("creds");
    let out = Command::new("sh")
        .arg("-c")
        .arg("umask 000; exec \"$@\"")
        .arg("sh")
        .arg(bin("slipway-controller"))
        .args(["operator", "create", "ci", "--scope", "read", "--out"])
        .arg(&target)
        .arg("--data-dir")
        .arg(controller.data_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let mode = fs::metadata(&target).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let key = fs::metadata(target.join("ci.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key, 0o600);
}
