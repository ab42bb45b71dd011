//! How the `slipway` CLI authenticates, through the real binaries: operator
//! client certificates (`slipway-controller operator create`, `slipway
//! --cert --key`), API token listing and revocation, and their refusals.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

use crate::support::{artifact, bin, sha256_file, text, Agent, Controller};

#[test]
fn an_operator_certificate_works_like_a_scoped_token_until_revoked() {
    let controller = Controller::start();
    let agent = Agent::enroll(&controller, "n1");
    let out_dir = tempfile::tempdir().unwrap();
    let out_arg = out_dir.path().to_str().unwrap();

    let created = controller.cli(&[
        "operator",
        "create",
        "ci",
        "--scope",
        "deploy:web",
        "--ttl",
        "1d",
        "--out",
        out_arg,
    ]);
    assert!(created.status.success(), "{}", text(&created));
    let (cert, key) = (out_dir.path().join("ci.pem"), out_dir.path().join("ci.key"));
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key is private");
    let id = text(&created)
        .split_whitespace()
        .find(|w| w.starts_with("op-"))
        .unwrap()
        .to_owned();

    // Reads with the certificate alone (no token anywhere).
    let nodes = controller.slipway_as(&cert, &key, &["nodes", "--json"]);
    assert!(nodes.status.success(), "{}", text(&nodes));
    let nodes: Vec<serde_json::Value> = serde_json::from_slice(&nodes.stdout).unwrap();
    assert_eq!(nodes.len(), 1);

    // Deploy scope for web only: another app is refused, saying why.
    let dir = tempfile::tempdir().unwrap();
    let art = artifact(dir.path(), "v1", "web");
    let sha = sha256_file(&art);
    let art_arg = art.to_str().unwrap();
    let refused = controller.slipway_as(&cert, &key, &["deploy", "api", art_arg, "--sha", &sha]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(text(&refused).contains(&id), "{}", text(&refused));
    assert!(text(&refused).contains("deploy:web"), "{}", text(&refused));

    // Listed, then revoked by name: the next call is refused.
    let listed = controller.cli(&["operator", "list", "--json"]);
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed[0]["id"], id.as_str());
    assert_eq!(listed[0]["scopes"][0], "deploy:web");
    assert!(listed[0]["revoked_at"].is_null());
    let revoked = controller.cli(&["operator", "revoke", "ci"]);
    assert!(revoked.status.success(), "{}", text(&revoked));
    let after = controller.slipway_as(&cert, &key, &["nodes"]);
    assert_eq!(after.status.code(), Some(1), "{}", text(&after));
    assert!(text(&after).contains("revoked"), "{}", text(&after));

    let events = controller.audit(&controller.api_token("read"));
    let of = |t: &str| events.iter().filter(|e| e["event_type"] == t).count();
    assert_eq!(of("OPERATOR_CREATED"), 1);
    assert_eq!(of("OPERATOR_REVOKED"), 1);
    assert!(events
        .iter()
        .any(|e| e["event_type"] == "API_CALL_REFUSED" && e["actor"] == id.as_str()));
    drop(agent);
}

#[test]
fn operator_create_refuses_bad_input_and_writes_nothing() {
    let controller = Controller::start();
    let out_dir = tempfile::tempdir().unwrap();
    let out_arg = out_dir.path().to_str().unwrap();
    let empty = || std::fs::read_dir(out_dir.path()).unwrap().count() == 0;

    for (args, says) in [
        (
            vec![
                "operator", "create", "a/b", "--scope", "read", "--out", out_arg,
            ],
            "invalid operator name",
        ),
        (
            vec![
                "operator", "create", "x", "--scope", "write", "--out", out_arg,
            ],
            "invalid scope",
        ),
        (
            vec![
                "operator", "create", "x", "--scope", "read", "--ttl", "soon", "--out", out_arg,
            ],
            "soon",
        ),
    ] {
        let out = controller.cli(&args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(says), "{args:?}: {}", text(&out));
        assert!(empty(), "{args:?} wrote files");
    }
    // An existing file is never overwritten.
    std::fs::write(out_dir.path().join("x.key"), "mine").unwrap();
    let out = controller.cli(&[
        "operator", "create", "x", "--scope", "read", "--out", out_arg,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("already exists"), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(out_dir.path().join("x.key")).unwrap(),
        "mine"
    );
    let listed = controller.cli(&["operator", "list", "--json"]);
    assert_eq!(
        serde_json::from_slice::<Vec<serde_json::Value>>(&listed.stdout)
            .unwrap()
            .len(),
        0
    );
    // --cert needs --key.
    let out = Command::new(bin("slipway"))
        .args([
            "--controller",
            &controller.url(),
            "--cert",
            "x.pem",
            "nodes",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("--key"), "{}", text(&out));
    // No credentials at all: a usage error naming both ways.
    let out = Command::new(bin("slipway"))
        .args(["--controller", &controller.url(), "--ca"])
        .arg(controller.ca_pem())
        .arg("nodes")
        .env_remove("SLIPWAY_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("--token") && text(&out).contains("--cert"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_revoked_api_token_is_refused_and_listed_as_revoked() {
    let controller = Controller::start();
    let token = controller.api_token("read");
    let ok = controller.slipway(&token, &["nodes"]);
    assert!(ok.status.success(), "{}", text(&ok));

    let id = token.split('.').nth(1).unwrap().to_owned();
    let revoked = controller.cli(&["token", "revoke", &id]);
    assert!(revoked.status.success(), "{}", text(&revoked));
    assert!(text(&revoked).contains(&id), "{}", text(&revoked));
    let again = controller.cli(&["token", "revoke", &id]);
    assert!(text(&again).contains("already revoked"), "{}", text(&again));
    let unknown = controller.cli(&["token", "revoke", "00000000deadbeef"]);
    assert_eq!(unknown.status.code(), Some(64), "{}", text(&unknown));

    let refused = controller.slipway(&token, &["nodes"]);
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("unknown or revoked API token"),
        "{}",
        text(&refused)
    );

    let listed = controller.cli(&["token", "list", "--json"]);
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    let row = listed.iter().find(|t| t["id"] == id.as_str()).unwrap();
    assert!(row["revoked_at"].is_i64(), "{row}");
    assert!(
        !String::from_utf8_lossy(&controller.cli(&["token", "list"]).stdout)
            .contains(token.rsplit('.').next().unwrap())
    );
}
