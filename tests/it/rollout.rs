//! Rollout strategies end to end: a controller and agent processes over
//! real mTLS, `slipway deploy --strategy …`: rolling batches that stop on a
//! failing node (the rest skipped, the switched nodes rolled back), canary
//! first, tolerated failures, all at once; one deployment per app at a
//! time; deploys that return at once without --wait; the live display
//! under a pseudo-terminal.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::support::{artifact, sha256_file, text, wait_until, Agent, Controller, APP};

/// The test app, failing at start (so its health gate fails and the agent
/// rolls it back) on a node whose `BREAK` lists the release's VERSION.
fn breakable_app() -> String {
    format!(
        "import os, sys\nif open('VERSION').read().strip() in os.environ.get('BREAK', '').split(','):\n    sys.exit(3)\n{APP}"
    )
}

/// The test app, slow to come up: its health gate takes seconds (the
/// agents of that test have a start period longer than that).
fn slow_app() -> String {
    format!("import time\ntime.sleep(4)\n{APP}")
}

/// A controller and `names.len()` running agents, all online; each
/// agent's health gate ignores failures for `start_period`.
fn fleet(names: &[&str], start_period: &str) -> (Controller, Vec<Agent>, String, String) {
    let controller = Controller::start();
    let mut agents = Agent::enroll_all(&controller, names);
    for a in &mut agents {
        a.set_start_period(start_period);
        a.run();
    }
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    controller.wait_online(&reader, names.len(), Duration::from_secs(60));
    (controller, agents, reader, deployer)
}

/// Current release per node from `slipway releases web --json`.
fn reported_current(controller: &Controller, token: &str) -> Vec<(String, String)> {
    let out = controller.slipway(token, &["releases", "web", "--json"]);
    if !out.status.success() {
        return Vec::new();
    }
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.iter()
        .map(|r| {
            (
                r["node"].as_str().unwrap_or_default().to_owned(),
                r["current_release"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[test]
fn rolling_and_canary_stop_on_failure_and_roll_the_touched_nodes_back() {
    let (controller, agents, reader, deployer) = fleet(&["n1", "n2", "n3"], "3s");
    let work = tempfile::tempdir().unwrap();
    let app = breakable_app();
    agents[0].add_env("BREAK=v3");
    agents[1].add_env("BREAK=v2,v4");

    // All at once (the default), unchanged: every node gets v1.
    let out = controller.deploy_version(&deployer, work.path(), "v1", &app, &["--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("(all_at_once)"), "{stdout}");
    assert!(stdout.contains("3 of 3 nodes succeeded"), "{stdout}");
    for a in &agents {
        assert_eq!(a.get().as_deref(), Some("v1"), "{}", a.name);
    }

    // Rolling, one node at a time: n1 switches to v2, n2 fails its health
    // gate, so n3 is skipped and n1 is sent back to v1.
    let out = controller.deploy_version(
        &deployer,
        work.path(),
        "v2",
        &app,
        &["--strategy", "rolling", "--max-parallel", "1", "--wait"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("batch 1/3: n1"), "{}", text(&out));
    assert!(
        stdout.contains("[n1] SUCCEEDED (release v2)"),
        "{}",
        text(&out)
    );
    assert!(stdout.contains("[n2] ROLLED_BACK"), "{}", text(&out));
    assert!(
        stdout.contains("[n3] SKIPPED: deployment stopped after n2 failed"),
        "{}",
        text(&out)
    );
    assert!(
        stdout.contains("[n1] ROLLED_BACK (release v1): deployment stopped after n2 failed"),
        "{}",
        text(&out)
    );
    assert!(
        stderr.contains(": deployment stopped after n2 failed"),
        "{}",
        text(&out)
    );
    assert!(
        stderr.contains(
            "failed: 3 of 3 nodes failed: n1 (rolled back), n2 (rolled back), n3 (skipped)"
        ),
        "{}",
        text(&out)
    );
    for a in &agents {
        assert_eq!(a.current().as_deref(), Some("v1"), "{} on disk", a.name);
        assert_eq!(a.get().as_deref(), Some("v1"), "{} serves", a.name);
    }
    assert!(agents[0].has_release("v2") && agents[1].has_release("v2"));
    assert!(!agents[2].has_release("v2"), "the skipped node was touched");

    let events = controller.audit(&reader);
    let failed = events
        .iter()
        .rfind(|e| e["event_type"] == "DEPLOY_FAILED")
        .unwrap();
    let details = &failed["details"];
    assert_eq!(details["release_id"], "v2", "{failed}");
    assert_eq!(details["strategy"], "rolling", "{failed}");
    assert_eq!(details["stopped_by"]["node_name"], "n2", "{failed}");
    assert_eq!(details["rolled_back_nodes"], serde_json::json!(["n1"]));
    assert_eq!(details["skipped_nodes"], serde_json::json!(["n3"]));

    // Canary: the canary (n1) fails, so nobody else is touched.
    let out = controller.deploy_version(
        &deployer,
        work.path(),
        "v3",
        &app,
        &["--strategy", "canary", "--wait"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("batch 1/2 (canary): n1"), "{}", text(&out));
    assert!(stdout.contains("[n1] ROLLED_BACK"), "{}", text(&out));
    for n in ["n2", "n3"] {
        assert!(
            stdout.contains(&format!(
                "[{n}] SKIPPED: deployment stopped after n1 failed"
            )),
            "{}",
            text(&out)
        );
    }
    for a in &agents {
        assert_eq!(a.current().as_deref(), Some("v1"), "{}", a.name);
    }
    assert!(!agents[1].has_release("v3") && !agents[2].has_release("v3"));

    // One failure tolerated: n2 fails, the rollout goes on to n3 and keeps
    // n1; the deploy still fails and names n2.
    let out = controller.deploy_version(
        &deployer,
        work.path(),
        "v4",
        &app,
        &[
            "--strategy",
            "rolling",
            "--max-parallel",
            "1",
            "--max-unavailable",
            "1",
            "--wait",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1 of 3 nodes failed: n2 (rolled back"),
        "{}",
        text(&out)
    );
    assert!(!stderr.contains("stopped"), "{}", text(&out));
    assert_eq!(agents[0].current().as_deref(), Some("v4"));
    assert_eq!(agents[1].current().as_deref(), Some("v1"));
    assert_eq!(agents[2].current().as_deref(), Some("v4"));

    // Flags that do not fit the strategy are usage errors (exit 64).
    let out = controller.deploy_version(&deployer, work.path(), "v5", &app, &["--canary", "2"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--canary N needs --strategy canary"));

    // The live display on a terminal: run under a pseudo-terminal.
    live_display_on_a_terminal(&controller, &deployer, &agents, work.path(), &app);

    // A rolling rollback, one node at a time, each to its previous good
    // release (v2 was rolled away from on n1, v4 failed on n2).
    let out = controller.slipway(
        &deployer,
        &["rollback", "web", "--strategy", "rolling", "--wait"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("batch 3/3: n3"), "{}", text(&out));
    assert!(stdout.contains("3 of 3 nodes succeeded"), "{}", text(&out));
    let now: Vec<Option<String>> = agents.iter().map(Agent::current).collect();
    assert_eq!(
        now,
        [Some("v4"), Some("v1"), Some("v4")].map(|v| v.map(str::to_owned))
    );
}

/// `slipway deploy --wait` of v5 under `script` (a pseudo-terminal): the
/// live display, the exit code and the summary.
fn live_display_on_a_terminal(
    controller: &Controller,
    deployer: &str,
    agents: &[Agent],
    work: &Path,
    app: &str,
) {
    let art = artifact(work, "v5", app);
    let sha = sha256_file(&art);
    let line = controller.slipway_shell(
        deployer,
        &[
            "deploy",
            "web",
            art.to_str().unwrap(),
            "--sha",
            &sha,
            "--id",
            "v5",
            "--strategy",
            "rolling",
            "--max-parallel",
            "2",
            "--wait",
        ],
    );
    let out = Command::new("script")
        .args(["-qec", &line, "/dev/null"])
        .output()
        .unwrap_or_else(|e| panic!("cannot run `script` (util-linux; apt: bsdutils): {e}"));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(shown.contains("3 of 3 nodes succeeded"), "{shown}");
    assert!(shown.contains("✓"), "{shown}");
    assert!(
        !shown.contains("[n1] fetch"),
        "plain lines on a terminal: {shown}"
    );
    for a in agents {
        assert_eq!(a.current().as_deref(), Some("v5"), "{}", a.name);
    }
}

#[test]
fn one_deployment_per_app_and_deploys_that_return_at_once() {
    // The slow release comes up after 4 s: within the start period.
    let (mut controller, agents, reader, deployer) = fleet(&["m1", "m2"], "8s");
    let work = tempfile::tempdir().unwrap();
    let slow = slow_app();

    // Without --wait: back at once with the deployment id and the nodes.
    let out = controller.deploy_version(&deployer, work.path(), "s1", &slow, &["--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let started: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = started["deployment_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("d-"), "{started}");
    assert_eq!(started["nodes"].as_array().unwrap().len(), 2, "{started}");

    // While it runs, another deploy or rollback of the app is refused and
    // names it.
    let out = controller.deploy_version(&deployer, work.path(), "s2", APP, &["--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("FailedPrecondition"), "{}", text(&out));
    assert!(stderr.contains(&id), "{}", text(&out));
    assert!(stderr.contains("started by"), "{}", text(&out));
    let out = controller.slipway(&deployer, &["rollback", "web"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&id),
        "{}",
        text(&out)
    );

    // The first deployment still completes on its own.
    wait_until("s1 current on both nodes", Duration::from_secs(60), || {
        reported_current(&controller, &reader)
            == vec![
                ("m1".to_owned(), "s1".to_owned()),
                ("m2".to_owned(), "s1".to_owned()),
            ]
    });
    wait_until("the deployment recorded", Duration::from_secs(30), || {
        controller
            .audit(&reader)
            .iter()
            .any(|e| e["event_type"] == "DEPLOY_COMPLETED" && e["resource_id"] == id.as_str())
    });
    for a in &agents {
        assert_eq!(a.current().as_deref(), Some("s1"), "{}", a.name);
    }

    // A deployment a controller restart interrupted is carried on by the
    // restarted controller (a replica taking over a dead one's rollout):
    // it completes, and the app is not blocked.
    let out = controller.deploy_version(&deployer, work.path(), "s3", &slow, &["--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let started: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let interrupted = started["deployment_id"].as_str().unwrap().to_owned();
    controller.restart();
    wait_until(
        "the interrupted deployment carried on to its end",
        Duration::from_secs(90),
        || {
            controller.audit(&reader).iter().any(|e| {
                e["resource_id"] == interrupted.as_str()
                    && (e["event_type"] == "DEPLOY_COMPLETED" || e["event_type"] == "DEPLOY_FAILED")
            })
        },
    );
    let events = controller.audit(&reader);
    assert!(
        events
            .iter()
            .any(|e| e["event_type"] == "DEPLOY_TAKEN_OVER"
                && e["resource_id"] == interrupted.as_str()),
        "{events:?}"
    );
    // The app is not blocked: a new deploy is accepted. (The agents may
    // still be busy with s3, or have failed it when the restart cut their
    // artifact download: then a node refuses with its own app lock, and
    // the deploy is tried again.)
    controller.wait_online(&reader, 2, Duration::from_secs(60));
    wait_until("s4 deployed", Duration::from_secs(90), || {
        let out = controller.deploy_version(&deployer, work.path(), "s4", APP, &["--wait"]);
        assert!(
            !String::from_utf8_lossy(&out.stderr).contains("FailedPrecondition"),
            "{}",
            text(&out)
        );
        out.status.success()
    });
    for a in &agents {
        assert_eq!(a.current().as_deref(), Some("s4"), "{}", a.name);
        assert_eq!(a.get().as_deref(), Some("s4"), "{}", a.name);
    }

    // A node offline when its batch starts fails it: the rollout stops
    // and the node already switched (m1) goes back to s4.
    let (m1, mut m2) = {
        let mut it = agents.into_iter();
        (it.next().unwrap(), it.next().unwrap())
    };
    m2.stop_run();
    let out = controller.deploy_version(
        &deployer,
        work.path(),
        "s5",
        APP,
        &["--strategy", "rolling", "--wait", "--json"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["succeeded"], false, "{done}");
    assert_eq!(done["stopped_by"], "m2", "{done}");
    assert_eq!(
        done["stop_reason"], "deployment stopped after m2 failed",
        "{done}"
    );
    let nodes = done["nodes"].as_array().unwrap();
    assert_eq!(nodes[0]["node_name"], "m1", "{done}");
    assert_eq!(nodes[0]["outcome"], "rolled_back", "{done}");
    assert_eq!(nodes[0]["release_id"], "s4", "{done}");
    assert_eq!(nodes[1]["outcome"], "failed", "{done}");
    assert_eq!(m1.current().as_deref(), Some("s4"));
    assert!(m1.has_release("s5"), "m1 never switched to s5");
    assert_eq!(m2.current().as_deref(), Some("s4"));
    assert_eq!(m2.get().as_deref(), Some("s4"), "m2's app kept serving");

    // --url: the controller checks the scheme, passes URL and digest on.
    let sha = "ab".repeat(32);
    let out = controller.slipway(
        &deployer,
        &[
            "deploy",
            "web",
            "--url",
            "http://example.invalid/web.tar.gz",
            "--sha256",
            &sha,
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("InvalidArgument"), "{}", text(&out));
    assert!(stderr.contains("is not an https:// URL"), "{}", text(&out));
    let out = controller.slipway(
        &deployer,
        &[
            "deploy",
            "web",
            "--url",
            "https://127.0.0.1:9/web.tar.gz",
            "--sha256",
            "abc",
        ],
    );
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let url = "https://127.0.0.1:9/web.tar.gz";
    let out = controller.slipway(
        &deployer,
        &[
            "deploy", "web", "--url", url, "--sha256", &sha, "--id", "u1", "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("upload"),
        "{}",
        text(&out)
    );
    let started: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let url_id = started["deployment_id"].as_str().unwrap();
    let events = controller.audit(&reader);
    let recorded = events
        .iter()
        .find(|e| e["event_type"] == "DEPLOY_STARTED" && e["resource_id"] == url_id)
        .unwrap();
    assert_eq!(recorded["details"]["artifact_url"], url, "{recorded}");
    assert_eq!(
        recorded["details"]["artifact_sha256"],
        sha.as_str(),
        "{recorded}"
    );
}
