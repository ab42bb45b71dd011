//! Controller backup and restore: an encrypted backup taken while a rolling
//! deploy runs, restored into a new data dir served on a new port; the
//! agents, pointed at it, reconnect with the identities they have, and
//! history and audit are there up to the backup.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

use crate::support::{artifact, sha256_file, text, wait_until, Agent, Controller, APP};

#[test]
fn backup_during_a_rolling_deploy_restores_into_a_controller_the_agents_rejoin() {
    let mut controller = Controller::start();
    let mut agents = Agent::enroll_all(&controller, &["b1", "b2", "b3"]);
    for a in &mut agents {
        a.run();
    }
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    controller.wait_online(&reader, 3, Duration::from_secs(30));
    let work = tempfile::tempdir().unwrap();
    let v1 = artifact(work.path(), "v1", APP);
    let out = controller.deploy_web(&deployer, &v1, &sha256_file(&v1), "v1", &["--wait"]);
    assert!(out.status.success(), "{}", text(&out));

    // A rolling deploy of v2, one node at a time, running while the backup
    // is taken.
    let v2 = artifact(work.path(), "v2", APP);
    let sha2 = sha256_file(&v2);
    let deploying = {
        let mut cmd = controller.slipway_command();
        cmd.args(["--token", &deployer, "deploy", "web"])
            .arg(&v2)
            .args(["--sha", &sha2, "--id", "v2", "--wait"])
            .args(["--strategy", "rolling", "--max-parallel", "1"]);
        std::thread::spawn(move || cmd.output().unwrap())
    };
    wait_until(
        "the rolling deploy to start",
        Duration::from_secs(30),
        || {
            controller.audit(&reader).iter().any(|e| {
                e["event_type"] == "DEPLOY_STARTED" && e["details"].to_string().contains("v2")
            })
        },
    );

    // Every event recorded before the backup starts must be in it.
    let at_backup: BTreeSet<String> = controller
        .audit(&reader)
        .iter()
        .map(|e| e["id"].to_string())
        .collect();
    let pass = work.path().join("passphrase");
    fs::write(&pass, "correct horse battery staple\n").unwrap();
    let backup = work.path().join("ctl.age");
    let out = controller.cli(&[
        "backup",
        "--out",
        backup.to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("wrote "),
        "{}",
        text(&out)
    );
    let done = deploying.join().unwrap();
    assert!(done.status.success(), "{}", text(&done));
    // The file is encrypted: no CA key, no database text in it.
    let raw = fs::read(&backup).unwrap();
    assert!(raw.starts_with(b"age-encryption.org/v1"));
    assert!(!String::from_utf8_lossy(&raw).contains("PRIVATE KEY"));

    // The old machine is gone.
    controller.stop();
    for a in &mut agents {
        a.stop_run();
    }

    // Refusals: a wrong passphrase, a data dir that has files. Nothing is
    // left behind by either.
    let new_home = tempfile::tempdir().unwrap();
    let data = new_home.path().join("data");
    let wrong = work.path().join("wrong");
    fs::write(&wrong, "not the passphrase\n").unwrap();
    let restore = |pass: &std::path::Path, dir: &std::path::Path| {
        std::process::Command::new(crate::support::bin("slipway-controller"))
            .args(["restore", "--from"])
            .arg(&backup)
            .arg("--data-dir")
            .arg(dir)
            .arg("--passphrase-file")
            .arg(pass)
            .output()
            .unwrap()
    };
    let out = restore(&wrong, &data);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot decrypt"),
        "{}",
        text(&out)
    );
    assert_eq!(
        fs::read_dir(new_home.path()).unwrap().count(),
        0,
        "a failed restore left files"
    );
    let out = restore(&pass, controller.data_dir().as_path());
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not empty"),
        "{}",
        text(&out)
    );

    let out = restore(&pass, &data);
    assert!(out.status.success(), "{}", text(&out));
    let mode = |p: &str| {
        use std::os::unix::fs::PermissionsExt as _;
        fs::metadata(data.join(p)).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(
        (mode("ca.key"), mode("server.key"), mode(".")),
        (0o600, 0o600, 0o700)
    );

    // A new controller on the restored data, at a new address; the agents
    // are pointed at it and come back with the identities they have.
    let restored = Controller::start_on(new_home);
    assert_ne!(restored.port, controller.port);
    for a in &mut agents {
        a.set_controller_url(&restored.url());
        a.run();
    }
    // The API token made before the backup still works.
    restored.wait_online(&reader, 3, Duration::from_secs(30));
    let audit = restored.audit(&reader);
    let after: BTreeSet<String> = audit.iter().map(|e| e["id"].to_string()).collect();
    let missing: Vec<&String> = at_backup.difference(&after).collect();
    assert!(missing.is_empty(), "audit events lost: {missing:?}");
    // v1's deployment is complete; the v2 deployment, running when the
    // backup was taken, is marked interrupted by the restart, not running.
    let out = restored.slipway(&reader, &["releases", "web", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let status = restored.slipway(&reader, &["status", "--json"]);
    let status_text = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(status_text.contains("\"web\""), "{status_text}");
    assert!(
        !status_text.contains("\"RUNNING\""),
        "a deployment still shows running: {status_text}"
    );
    // And it can deploy again.
    let v3 = artifact(work.path(), "v3", APP);
    let out = restored.deploy_web(&deployer, &v3, &sha256_file(&v3), "v3", &["--wait"]);
    assert!(out.status.success(), "{}", text(&out));
}
