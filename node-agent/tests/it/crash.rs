//! kill -9 at every step of a deploy (and of rollback and prune), then run
//! the agent again: `current` must point at a complete release and the
//! journal must agree with the disk.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;

use crate::support::Node;
use slipway_agent::fault::DEPLOY_POINTS;

fn files(version: &str) -> Vec<(String, String)> {
    let mut f: Vec<(String, String)> = (0..20)
        .map(|i| {
            (
                format!("lib/m{i}.js"),
                format!("// {version} module {i}\n").repeat(50),
            )
        })
        .collect();
    f.push(("index.js".into(), format!("console.log('{version}')")));
    f.push(("VERSION".into(), version.into()));
    f
}

fn artifact(node: &Node, version: &str) -> std::path::PathBuf {
    let f = files(version);
    let refs: Vec<(&str, &str)> = f.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    node.artifact(&format!("{version}.tar.gz"), &refs)
}

/// `current` resolves to a release whose files all match its manifest, and
/// the journal lists exactly the release dirs on disk, with nothing in flight.
fn assert_consistent(node: &Node, expect_current: &str) {
    let rel = node.releases();
    assert!(
        rel["in_progress"].is_null(),
        "operation still in flight: {rel:#}"
    );
    assert_eq!(node.current().as_deref(), Some(expect_current), "{rel:#}");
    assert_eq!(rel["current"].as_str(), Some(expect_current));
    let version = fs::read_to_string(node.root.join("current/VERSION")).unwrap();
    let dir = node.root.join("releases").join(expect_current);
    assert!(
        dir.join("VERSION").is_file(),
        "{} incomplete",
        dir.display()
    );
    assert!(!version.is_empty());
    node.run(&["verify", "--app", "web"]).ok();
    let listed: std::collections::BTreeSet<String> = rel["releases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        listed,
        node.dirs_on_disk(),
        "journal and disk disagree: {rel:#}"
    );
    for r in rel["releases"].as_array().unwrap() {
        assert_eq!(r["present"], true, "{r:#}");
    }
    assert!(node.staging_is_empty());
    let stray: Vec<_> = fs::read_dir(&node.root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("current."))
        .collect();
    assert!(stray.is_empty(), "temp links left: {stray:?}");
}

#[test]
fn kill_at_every_deploy_step_then_recover() {
    for point in DEPLOY_POINTS {
        for store in ["true", "false"] {
            let node = Node::new(&format!(
                "content_store = {store}\n[apps.web.hooks]\nbefore_activate = [\"true\"]\nafter_activate = [\"true\"]"
            ));
            let v1 = artifact(&node, "v1");
            node.deploy(&v1, "v1").ok();
            let v2 = artifact(&node, "v2");
            node.deploy_killed_at(point, &v2, "v2");

            // The next run finds the interrupted deploy and undoes it.
            let rel = node.releases();
            let recovered = rel["recovered"].as_str().unwrap_or_default().to_owned();
            assert!(recovered.contains("deploy interrupted"), "{point}: {rel:#}");
            assert_consistent(&node, "v1");
            let statuses = node.statuses();
            let v2_status = statuses
                .iter()
                .find(|(id, _)| id == "v2")
                .map(|(_, s)| s.as_str());
            assert!(
                matches!(v2_status, None | Some("failed")),
                "{point}: {statuses:?}"
            );

            // And the same deploy succeeds afterwards.
            node.deploy(&v2, "v2").ok();
            assert_consistent(&node, "v2");
            assert_eq!(
                fs::read_to_string(node.root.join("current/VERSION")).unwrap(),
                "v2"
            );
        }
    }
}

#[test]
fn kill_during_first_deploy_leaves_no_broken_current() {
    for point in ["mid_unpack", "after_switch", "before_commit"] {
        let node = Node::new("");
        let v1 = artifact(&node, "v1");
        node.deploy_killed_at(point, &v1, "v1");
        let rel = node.releases();
        assert!(rel["current"].is_null(), "{point}: {rel:#}");
        assert!(!node.root.join("current").exists());
        node.deploy(&v1, "v1").ok();
        assert_consistent(&node, "v1");
    }
}

#[test]
fn kill_during_rollback_and_prune_is_finished() {
    let node = Node::new("keep = 1\nkeep_failed = 0");
    for v in ["v1", "v2", "v3"] {
        let a = artifact(&node, v);
        node.deploy(&a, v).ok();
    }
    // keep = 1 still keeps the rollback target.
    assert_eq!(
        node.dirs_on_disk().into_iter().collect::<Vec<_>>(),
        ["v2", "v3"]
    );
    node.run_killed_at("after_rollback_switch", &["rollback", "--app", "web"]);
    let rel = node.releases();
    assert!(
        rel["recovered"]
            .as_str()
            .unwrap()
            .contains("finished rollback to v2"),
        "{rel:#}"
    );
    assert_consistent(&node, "v2");
    assert!(node.statuses().contains(&("v3".into(), "bad".into())));

    let a4 = artifact(&node, "v4");
    node.deploy(&a4, "v4").ok();
    let a5 = artifact(&node, "v5");
    node.deploy_killed_at("mid_prune", &a5, "v5");
    let rel = node.releases();
    assert!(
        rel["recovered"]
            .as_str()
            .unwrap()
            .contains("finished prune"),
        "{rel:#}"
    );
    assert_consistent(&node, "v5");
}
