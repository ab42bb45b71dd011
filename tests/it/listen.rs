//! The agent-held public address through the controller: an exec app with
//! `listen` gets deploys pushed with `slipway deploy --wait` to
//! `slipway-agent run`, the agent itself restarts and the app is restarted
//! through the controller, all under load, and not one request is refused
//! or lost (the socket lives in the app's supervisor, which a restart of
//! the agent does not touch).

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::time::Duration;

use crate::load::{Load, ANSWER_WITHIN};
use crate::support::{artifact, sha256_file, text, Agent, Controller};

/// The socket-activated sample app (serves on the fds it is handed).
const SOCKET_APP: &str = include_str!("../fixtures/socket_server.py");

#[test]
fn pushed_exec_deploys_an_agent_restart_and_an_app_restart_under_load_lose_nothing() {
    const DEPLOYS: usize = 20;
    let controller = Controller::start();
    let mut agent = Agent::enroll_with(&controller, "l1", "web", |root, port| {
        format!(
            r#"[apps.web]
root = "{root}"
listen = "127.0.0.1:{port}"

[apps.web.run]
driver = "exec"
command = ["python3", "server.py"]
stop_grace = "5s"

[apps.web.health]
check = "http"
url = "http://127.0.0.1:{{port}}/api/health"
interval = "50ms"
successes = 2
start_period = "1s"
deadline = "20s"
"#,
            root = root.display(),
        )
    });
    fs::create_dir_all(agent.root.join("shared")).unwrap();
    agent.run();
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    controller.wait_online(&reader, 1, Duration::from_secs(30));

    let work = tempfile::tempdir().unwrap();
    let deploy = |v: &str| {
        let art = artifact(work.path(), v, SOCKET_APP);
        let out = controller.deploy_web(&deployer, &art, &sha256_file(&art), v, &["--wait"]);
        assert!(out.status.success(), "deploy {v}: {}", text(&out));
    };
    deploy("v0");

    // Bounded: 3 threads of new connections and 1 of keep-alive ones, at
    // most 5 min or 200,000 requests each.
    let load = Load::start(agent.port, "/", 3, 1, Duration::from_secs(300), 200_000);
    for i in 1..=DEPLOYS {
        deploy(&format!("v{i}"));
        if i == DEPLOYS / 2 {
            // The agent goes away and comes back mid-way.
            agent.stop_run();
            std::thread::sleep(Duration::from_millis(500));
            agent.run();
            controller.wait_online(&reader, 1, Duration::from_secs(30));
        }
    }
    // A restart pushed by the controller, under the same load: a new
    // process of the live release on the held socket, then the old one
    // drains.
    let before = agent.app_pid().unwrap();
    let out = controller.slipway(&deployer, &["restart", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("[l1] SUCCEEDED (release v{DEPLOYS})")),
        "{}",
        text(&out)
    );
    assert_ne!(
        agent.app_pid().unwrap(),
        before,
        "the app was not restarted"
    );
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    eprintln!(
        "{DEPLOYS} pushed exec deploys and an agent restart under load: {}",
        report.summary()
    );
    assert_eq!(
        report.failures(),
        0,
        "requests not answered within {ANSWER_WITHIN:?}: {}",
        report.summary()
    );
    assert!(report.ok > 500, "too little load: {}", report.summary());
    let last = format!("v{DEPLOYS}");
    assert!(report.bodies.contains(&last), "{last} never answered");
    assert_eq!(agent.current().as_deref(), Some(last.as_str()));
    let status = agent.cli(&["status", "--json"]);
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.contains("socket handover"), "{status}");
}
