//! The web pages in headless Chromium (Debian's `chromium`, driven by
//! `playwright-core` from npm: tests/web/fleet.cjs) against a real
//! controller and three real agent processes: log in with a token, see the
//! three nodes, start a rolling deploy from the app page (through its
//! confirmation step) and watch the deployment page show each node's steps
//! without a reload, see the refused buttons of a read token and the app's
//! environment (names and layers, never a value). Screenshots
//! land in target/web-screenshots/.
//!
//! scripts/test.sh installs chromium and playwright-core (in
//! ~/.cache/slipway/web-test, once per machine); SLIPWAY_WEB_MODULES may
//! name another node_modules.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::deploy::HttpsFiles;
use crate::metrics::controller_with_http;
use crate::support::{artifact, sha256_file, text, Agent, APP};

fn node_modules() -> PathBuf {
    match std::env::var_os("SLIPWAY_WEB_MODULES") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap())
            .join(".cache/slipway/web-test/node_modules"),
    }
}

/// A value the pages must never show.
const ENV_VALUE: &str = "web-page-secret-Hx72-never-shown";

#[test]
fn browser_logs_in_sees_the_fleet_and_follows_a_rolling_deploy_live() {
    let modules = node_modules();
    assert!(
        modules.join("playwright-core").is_dir(),
        "playwright-core is not in {} (scripts/test.sh installs it)",
        modules.display()
    );
    let (controller, http, _http_dir) = controller_with_http(&["--http-plain"]);
    let work = tempfile::tempdir().unwrap();
    let files = work.path().join("files");
    fs::create_dir_all(&files).unwrap();
    // Slow to come up, so each batch of the rolling deploy takes a while.
    let slow = format!("import time\ntime.sleep(1)\n{APP}");
    let v1 = artifact(&files, "v1", &slow);
    let v2 = artifact(&files, "v2", &slow);
    let server = HttpsFiles::start(work.path(), &files);
    let names = ["w1", "w2", "w3"];
    let mut agents = Agent::enroll_all(&controller, &names);
    for a in &mut agents {
        let mut config = fs::read_to_string(&a.config).unwrap();
        config.push_str(&format!(
            "\n[artifacts]\nca_file = \"{}\"\n",
            server.ca_pem.display()
        ));
        fs::write(&a.config, config).unwrap();
        a.set_start_period("10s");
        a.run();
    }
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    controller.wait_online(&reader, 3, Duration::from_secs(60));
    let url1 = server.url(v1.file_name().unwrap().to_str().unwrap());
    let out = controller.slipway(
        &deployer,
        &[
            "deploy",
            "web",
            "--url",
            &url1,
            "--sha256",
            &sha256_file(&v1),
            "--id",
            "v1",
            "--wait",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    // The fleet page's matrix needs the heartbeats that report v1.
    crate::support::wait_until("heartbeats with v1", Duration::from_secs(60), || {
        let out = controller.cli(&["nodes", "--json"]);
        let nodes: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
        nodes.len() == 3
            && nodes
                .iter()
                .all(|n| n["apps"][0]["current_release"] == "v1")
    });

    // An env layer no node carries (stored, delivered nowhere: the nodes'
    // .env holds their PORT): the app page lists its name, never its value.
    let out = controller.slipway(
        &deployer,
        &[
            "env",
            "set",
            "web",
            &format!("WEB_API_KEY={ENV_VALUE}"),
            "--tag",
            "env:nowhere",
        ],
    );
    assert!(
        text(&out).contains("is stored, but was not delivered"),
        "{}",
        text(&out)
    );

    let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/web-screenshots");
    fs::create_dir_all(&shots).unwrap();
    let out = Command::new("node")
        .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("web/fleet.cjs"))
        .env("PLAYWRIGHT_MODULES", &modules)
        .env("BASE", &http)
        .env("SCREENSHOTS", &shots)
        .env("NODES", names.join(","))
        .env("DEPLOY_TOKEN", &deployer)
        .env("READ_TOKEN", &reader)
        .env(
            "ARTIFACT_URL",
            server.url(v2.file_name().unwrap().to_str().unwrap()),
        )
        .env("SHA256", sha256_file(&v2))
        .env("ENV_NAME", "WEB_API_KEY")
        .env("ENV_LAYER", "env:nowhere")
        .env("ENV_VALUE", ENV_VALUE)
        .output()
        .unwrap();
    let report = text(&out);
    assert!(out.status.success(), "browser test failed: {report}");
    let line = String::from_utf8_lossy(&out.stdout);
    let seen: serde_json::Value =
        serde_json::from_str(line.trim().lines().last().unwrap()).unwrap();
    assert_eq!(seen["ok"], true, "{report}");
    eprintln!("what the browser saw: {:#}", seen["seen"]);
    for shot in [
        "fleet.png",
        "confirm.png",
        "deployment.png",
        "fleet-phone.png",
        "app-read-only.png",
    ] {
        let size = fs::metadata(shots.join(shot)).map(|m| m.len()).unwrap_or(0);
        assert!(size > 1000, "screenshot {shot}: {size} bytes");
    }
    // The deploy the browser started really ran: every node serves v2.
    for a in &agents {
        assert_eq!(a.get().as_deref(), Some("v2"), "{}", a.name);
    }
    // And it is on record as the deploy token's rolling deploy.
    let audit = controller.audit(&reader);
    assert!(
        audit.iter().any(|e| e["event_type"] == "DEPLOY_COMPLETED" && e["details"]["strategy"] == "rolling"),
        "{audit:#?}"
    );
}
