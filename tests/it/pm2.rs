//! PM2 through the controller: deploys pushed with `slipway deploy --wait`
//! to `slipway-agent run`, under load, lose no request (the same property
//! the agent's own tests check for `slipway-agent deploy`).

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::load::{Load, ANSWER_WITHIN};
use crate::support::{free_ports, sha256_file, text, Agent, Controller};

/// The PM2 test app, which stops gracefully on SIGINT.
const SERVER_JS: &str = include_str!("../../node-agent/tests/fixtures/pm2-app/server.js");

/// Kills this test's PM2 daemon, whatever happened.
struct Pm2Home(PathBuf);

impl Drop for Pm2Home {
    fn drop(&mut self) {
        let _ = Command::new("pm2")
            .arg("kill")
            .env("PM2_HOME", &self.0)
            .stdin(Stdio::null())
            .output();
    }
}

/// `<dir>/<version>.tar.gz` holding the app's server.js for `version`.
fn pm2_artifact(dir: &Path, version: &str) -> PathBuf {
    let art = dir.join(format!("{version}.tar.gz"));
    let body = SERVER_JS.replace("__RELEASE__", version);
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        fs::File::create(&art).unwrap(),
        flate2::Compression::fast(),
    ));
    let mut h = tar::Header::new_gnu();
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "server.js", body.as_bytes()).unwrap();
    b.into_inner().unwrap().finish().unwrap();
    art
}

#[test]
fn pushed_pm2_cluster_deploys_under_load_lose_nothing() {
    const DEPLOYS: usize = 10;
    let controller = Controller::start();
    let pm2_home = tempfile::tempdir().unwrap();
    let _guard = Pm2Home(pm2_home.path().to_owned());
    let home = pm2_home.path().display().to_string();
    let mut agent = Agent::enroll_with(&controller, "p1", "web", |root, port| {
        format!(
            r#"[apps.web]
root = "{root}"

[apps.web.run]
driver = "pm2"
script = "server.js"
instances = 2
exec_mode = "cluster"
pm2_home = "{home}"

[apps.web.health]
check = "http"
url = "http://127.0.0.1:{port}/api/health"
interval = "100ms"
successes = 2
start_period = "200ms"
deadline = "30s"
"#,
            root = root.display(),
        )
    });
    fs::create_dir_all(agent.root.join("shared")).unwrap();
    fs::write(
        agent.root.join("shared/.env"),
        format!("PORT={}\n", agent.port),
    )
    .unwrap();
    agent.run();
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    controller.wait_online(&reader, 1, Duration::from_secs(30));

    let work = tempfile::tempdir().unwrap();
    let deploy = |v: &str| {
        let art = pm2_artifact(work.path(), v);
        let out = controller.deploy_web(&deployer, &art, &sha256_file(&art), v, &["--wait"]);
        assert!(out.status.success(), "deploy {v}: {}", text(&out));
    };
    deploy("v0");

    // Bounded: 2 threads of new connections and 2 of keep-alive ones, at
    // most 5 min or 200,000 requests each.
    let load = Load::start(agent.port, "/", 2, 2, Duration::from_secs(300), 200_000);
    for i in 1..=DEPLOYS {
        deploy(&format!("v{i}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    eprintln!(
        "{DEPLOYS} pushed pm2 cluster deploys under load: {}",
        report.summary()
    );
    assert_eq!(
        report.failures(),
        0,
        "requests not answered within {ANSWER_WITHIN:?}: {}",
        report.summary()
    );
    assert!(
        report.ok > 500,
        "too little load to tell: {}",
        report.summary()
    );
    let last = format!("v{DEPLOYS}");
    assert!(report.bodies.contains(&last), "{last} never answered");
    assert_eq!(agent.current().as_deref(), Some(last.as_str()));
}

#[test]
fn pushed_pm2_fork_deploys_behind_the_front_under_load_lose_nothing() {
    const DEPLOYS: usize = 10;
    let controller = Controller::start();
    let pm2_home = tempfile::tempdir().unwrap();
    let _guard = Pm2Home(pm2_home.path().to_owned());
    let home = pm2_home.path().display().to_string();
    let [a, b] = free_ports::<2>();
    // The public address is the agent's (its front); each release's
    // process set gets one of `ports` as PORT.
    let mut agent = Agent::enroll_with(&controller, "f1", "web", |root, port| {
        format!(
            r#"[apps.web]
root = "{root}"
listen = "127.0.0.1:{port}"

[apps.web.run]
driver = "pm2"
script = "server.js"
instances = 1
exec_mode = "fork"
ports = [{a}, {b}]
pm2_home = "{home}"

[apps.web.health]
check = "http"
url = "http://127.0.0.1:{{port}}/api/health"
interval = "100ms"
successes = 2
retries = 2
start_period = "500ms"
deadline = "30s"
"#,
            root = root.display(),
        )
    });
    agent.run();
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    controller.wait_online(&reader, 1, Duration::from_secs(30));

    let work = tempfile::tempdir().unwrap();
    let deploy = |v: &str| {
        let art = pm2_artifact(work.path(), v);
        let out = controller.deploy_web(&deployer, &art, &sha256_file(&art), v, &["--wait"]);
        assert!(out.status.success(), "deploy {v}: {}", text(&out));
    };
    deploy("v0");

    // Bounded: 2 threads of new connections and 2 of keep-alive ones, at
    // most 5 min or 200,000 requests each, all through the front.
    let load = Load::start(agent.port, "/", 2, 2, Duration::from_secs(300), 200_000);
    for i in 1..=DEPLOYS {
        deploy(&format!("v{i}"));
    }
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    eprintln!(
        "{DEPLOYS} pushed pm2 fork deploys behind the front under load: {}",
        report.summary()
    );
    assert_eq!(
        report.failures(),
        0,
        "requests not answered within {ANSWER_WITHIN:?}: {}",
        report.summary()
    );
    assert!(
        report.ok > 500,
        "too little load to tell: {}",
        report.summary()
    );
    let last = format!("v{DEPLOYS}");
    assert!(report.bodies.contains(&last), "{last} never answered");
    assert_eq!(agent.current().as_deref(), Some(last.as_str()));
    // status says which mode serves it.
    let out = agent.cli(&["status"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("fork mode behind the agent's proxy"),
        "{}",
        text(&out)
    );
}
