//! Fleet agent upgrades (`slipway agent-upgrade`) with real agent processes,
//! each running its own copy of the agent binary: a good binary is swapped
//! in and the agent restarts in place with its apps untouched; a binary
//! that exits at start is rolled back by the node's guard and stops a
//! rolling upgrade; binaries that fail `--version` or arrive with another
//! digest are refused before any swap.
//!
//! The "new" agent is the workspace's binary with a test-version trailer
//! (`slipway_agent::version`), honoured only by builds with the
//! `fault-injection` feature: `cargo test --workspace` builds the agent
//! binary that way; after a plain `cargo build --workspace`, run
//! `cargo test -p slipway-agent --no-run` first.

// A failed set-up step should panic with its error, as unwrap does.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::support::{
    bin, json, output_retrying, sha256_file, text, wait_until, Agent, Controller,
};

/// The version the good new binary reports.
const NEW_VERSION: &str = "9.0.0-test";

/// Writes a copy of the workspace's agent binary that reports `version`.
fn agent_with_version(dir: &Path, version: &str) -> PathBuf {
    let path = dir.join(format!("slipway-agent-{version}"));
    let mut bytes = fs::read(bin("slipway-agent")).unwrap();
    bytes.extend_from_slice(
        format!("{}{version}\n", slipway_agent::version::TEST_TRAILER).as_bytes(),
    );
    fs::write(&path, bytes).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    let out = output_retrying(std::process::Command::new(&path).arg("--version"));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(version),
        "{} does not honour the test-version trailer: build it with the \
         fault-injection feature (`cargo test -p slipway-agent --no-run`)\n{}",
        bin("slipway-agent").display(),
        text(&out)
    );
    path
}

/// A shell script that answers `--version` like an agent and exits 3 on
/// anything else (so `run` dies at once).
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// `slipway nodes --json`, by node name.
fn nodes(controller: &Controller, token: &str) -> Vec<Value> {
    let out = controller.slipway(token, &["nodes", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn agent_version(controller: &Controller, token: &str, name: &str) -> String {
    nodes(controller, token)
        .iter()
        .find(|n| n["name"] == name)
        .and_then(|n| n["agent_version"].as_str())
        .unwrap_or_default()
        .to_owned()
}

fn node_result<'a>(outcome: &'a Value, name: &str) -> &'a Value {
    outcome["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_name"] == name)
        .unwrap_or_else(|| panic!("no result for {name}: {outcome}"))
}

/// An agent with the exec app `web` v1 serving, running its own binary.
fn serving_agent(controller: &Controller, name: &str) -> Agent {
    let mut agent = Agent::enroll(controller, name);
    agent.deploy("v1");
    agent.own_binary();
    agent.run();
    agent
}

#[test]
fn a_good_binary_is_swapped_in_and_the_apps_keep_serving() {
    let controller = Controller::start();
    let token = controller.api_token("agent-upgrade");
    let mut agents = vec![
        serving_agent(&controller, "up-1"),
        serving_agent(&controller, "up-2"),
    ];
    controller.wait_online(&token, 2, Duration::from_secs(30));
    let old_version = agent_version(&controller, &token, "up-1");
    let work = tempfile::tempdir().unwrap();
    let new = agent_with_version(work.path(), NEW_VERSION);
    assert_ne!(old_version, NEW_VERSION);

    // A second agent on the same state dir is refused while one runs.
    let second = agents[0].cli(&["run"]);
    assert!(!second.status.success(), "{}", text(&second));
    assert!(
        text(&second).contains("another slipway-agent runs"),
        "{}",
        text(&second)
    );

    let before: Vec<_> = agents
        .iter()
        .map(|a| {
            (
                a.app_pid().unwrap(),
                a.child_pid().unwrap(),
                sha256_file(&a.dir.path().join("bin/slipway-agent")),
            )
        })
        .collect();
    for a in &agents {
        let _ = fs::remove_file(a.ready_file());
    }
    // Keep asking the apps while the agents restart: not one miss.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ports: Vec<u16> = agents.iter().map(|a| a.port).collect();
    let prober = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut misses = Vec::new();
            let mut asked = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for port in &ports {
                    asked += 1;
                    match get(*port) {
                        Ok(body) if body == "v1" => {}
                        other => misses.push((*port, other)),
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (asked, misses)
        })
    };
    let out = controller.slipway(
        &token,
        &[
            "agent-upgrade",
            "--version-file",
            new.to_str().unwrap(),
            "--strategy",
            "rolling",
            "--commit-deadline",
            "30",
            "--wait",
            "--json",
        ],
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (asked, misses) = prober.join().unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let outcome = json(&out);
    assert_eq!(outcome["app"], "@agent", "{outcome}");
    for (agent, (app_pid, agent_pid, old_sha)) in agents.iter_mut().zip(before) {
        let r = node_result(&outcome, &agent.name);
        assert_eq!(r["outcome"], "succeeded", "{outcome}");
        assert_eq!(r["release_id"], NEW_VERSION, "{outcome}");
        assert!(
            r["message"]
                .as_str()
                .unwrap()
                .contains(&format!("upgraded to agent version {NEW_VERSION}")),
            "{outcome}"
        );
        // Same process (re-exec'd), the new file, the old one kept.
        assert_eq!(agent.child_pid(), Some(agent_pid));
        assert_eq!(agent.running_pid(), Some(agent_pid));
        let exe = agent.dir.path().join("bin/slipway-agent");
        assert_eq!(sha256_file(&exe), sha256_file(&new));
        assert_eq!(
            sha256_file(&agent.dir.path().join("bin/slipway-agent.old")),
            old_sha
        );
        assert!(!agent.state_dir().join("upgrade/pending.json").exists());
        // The re-exec'd agent is ready again; the app never restarted.
        wait_until(
            "the upgraded agent to be ready",
            Duration::from_secs(30),
            || agent.ready_file().exists(),
        );
        assert_eq!(agent.app_pid(), Some(app_pid));
        assert_eq!(agent.get().as_deref(), Some("v1"));
        assert_eq!(agent_version(&controller, &token, &agent.name), NEW_VERSION);
    }
    assert!(asked > 0);
    assert!(
        misses.is_empty(),
        "{} of {asked} requests failed during the upgrade: {misses:?}",
        misses.len()
    );
    let audit = controller.audit(&token);
    assert!(
        audit
            .iter()
            .any(|e| e["event_type"] == "AGENT_UPGRADE_COMPLETED"),
        "{audit:?}"
    );
    assert!(audit
        .iter()
        .any(|e| e["event_type"] == "AGENT_BINARY_UPLOADED"));

    // A deploy scope does not cover agent upgrades.
    let deploy_token = controller.api_token("deploy:web");
    let refused = controller.slipway(
        &deploy_token,
        &["agent-upgrade", "--version-file", new.to_str().unwrap()],
    );
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));
    assert!(
        text(&refused).contains("PermissionDenied") || text(&refused).contains("may not"),
        "{}",
        text(&refused)
    );
}

/// What the app on `port` answers on /, or why it did not (a generous
/// read timeout: the machine may be loaded; an app that is down refuses
/// the connection at once).
fn get(port: u16) -> Result<String, String> {
    use std::io::{Read as _, Write as _};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    write!(s, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    text.split("\r\n\r\n")
        .nth(1)
        .map(str::to_owned)
        .ok_or_else(|| format!("no body in {text:?}"))
}

#[test]
fn a_binary_that_dies_at_start_is_rolled_back_and_stops_a_rolling_upgrade() {
    let controller = Controller::start();
    let token = controller.api_token("agent-upgrade");
    let agents = [
        serving_agent(&controller, "br-1"),
        serving_agent(&controller, "br-2"),
    ];
    controller.wait_online(&token, 2, Duration::from_secs(30));
    let old_version = agent_version(&controller, &token, "br-1");
    let old_sha = sha256_file(&agents[0].dir.path().join("bin/slipway-agent"));
    let app_pid = agents[0].app_pid().unwrap();
    let work = tempfile::tempdir().unwrap();
    let broken = script(
        work.path(),
        "slipway-agent-broken",
        r#"if [ "$1" = "--version" ]; then echo "slipway-agent 9.9.9-broken"; exit 0; fi
echo "broken agent: exiting at start" >&2
exit 3"#,
    );
    let out = controller.slipway(
        &token,
        &[
            "agent-upgrade",
            "--version-file",
            broken.to_str().unwrap(),
            "--strategy",
            "rolling",
            "--commit-deadline",
            "60",
            "--wait",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let outcome = json(&out);
    let first = node_result(&outcome, "br-1");
    assert_eq!(first["outcome"], "rolled_back", "{outcome}");
    assert_eq!(first["release_id"], old_version.as_str(), "{outcome}");
    assert!(
        first["message"]
            .as_str()
            .unwrap()
            .contains("stopped before opening a session"),
        "{outcome}"
    );
    assert_eq!(
        node_result(&outcome, "br-2")["outcome"],
        "skipped",
        "{outcome}"
    );
    assert_eq!(outcome["stopped_by"], "br-1", "{outcome}");

    // br-1 is back on its old binary, by itself, and its app never stopped.
    let exe = agents[0].dir.path().join("bin/slipway-agent");
    assert_eq!(sha256_file(&exe), old_sha);
    assert!(agents[0].running_pid().is_some());
    assert_eq!(agent_version(&controller, &token, "br-1"), old_version);
    controller.wait_online(&token, 2, Duration::from_secs(30));
    assert_eq!(agents[0].app_pid(), Some(app_pid));
    assert_eq!(agents[0].get().as_deref(), Some("v1"));
    assert!(!agents[0].state_dir().join("upgrade/pending.json").exists());
    // br-2 was never touched.
    assert!(!agents[1].dir.path().join("bin/slipway-agent.old").exists());
    let audit = controller.audit(&token);
    assert!(
        audit
            .iter()
            .any(|e| e["event_type"] == "AGENT_UPGRADE_FAILED"),
        "{audit:?}"
    );
}

#[test]
fn binaries_that_fail_version_or_their_digest_are_refused_before_any_swap() {
    let controller = Controller::start();
    let token = controller.api_token("agent-upgrade");
    let agent = serving_agent(&controller, "ref-1");
    controller.wait_online(&token, 1, Duration::from_secs(30));
    let exe = agent.dir.path().join("bin/slipway-agent");
    let old_sha = sha256_file(&exe);
    let pid = agent.child_pid();
    let work = tempfile::tempdir().unwrap();
    let unchanged = |why: &str| {
        assert_eq!(sha256_file(&exe), old_sha, "{why}");
        assert!(
            !agent.dir.path().join("bin/slipway-agent.old").exists(),
            "{why}"
        );
        assert!(
            !agent.dir.path().join("bin/.slipway-agent.new").exists(),
            "{why}"
        );
        assert_eq!(agent.running_pid(), pid, "{why}");
    };

    // The CLI runs --version itself first: nothing is sent.
    let no_version = script(work.path(), "no-version", "echo 'no such flag' >&2; exit 2");
    let out = controller.slipway(
        &token,
        &[
            "agent-upgrade",
            "--version-file",
            no_version.to_str().unwrap(),
            "--wait",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("--version failed"), "{}", text(&out));
    unchanged("refused by the CLI");

    // Past the CLI (--no-version-check), the agent runs it and refuses.
    let out = controller.slipway(
        &token,
        &[
            "agent-upgrade",
            "--version-file",
            no_version.to_str().unwrap(),
            "--no-version-check",
            "--wait",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let r = json(&out);
    let r = node_result(&r, "ref-1");
    assert_eq!(r["outcome"], "failed", "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("--version failed"),
        "{r}"
    );
    unchanged("refused by the agent's --version check");

    // Another version than the CLI read (this one answers by its name:
    // the agent runs it as .slipway-agent.new): refused by the agent.
    let liar = script(
        work.path(),
        "liar",
        r#"case "$0" in *.new) echo "slipway-agent 2.0.0";; *) echo "slipway-agent 1.0.0";; esac; exit 0"#,
    );
    let out = controller.slipway(
        &token,
        &[
            "agent-upgrade",
            "--version-file",
            liar.to_str().unwrap(),
            "--wait",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let r = json(&out);
    let r = node_result(&r, "ref-1");
    assert_eq!(r["outcome"], "failed", "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("reports version 2.0.0, but the upgrade is to 1.0.0"),
        "{r}"
    );
    unchanged("refused for another version");

    // The controller's copy corrupted (same size): the controller checks
    // the digest before it serves any read, so it is never sent (and the
    // agent's own digest check would refuse it too).
    let good = agent_with_version(work.path(), NEW_VERSION);
    let out = controller.slipway(
        &token,
        &[
            "agent-upgrade",
            "--version-file",
            good.to_str().unwrap(),
            "--node",
            "nobody",
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let stored = controller
        .data_dir()
        .join("agent-binaries")
        .join(sha256_file(&good));
    assert!(stored.is_file(), "{}", text(&out));
    let mut bytes = fs::read(&stored).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    fs::write(&stored, bytes).unwrap();
    let out = controller.slipway(
        &token,
        &[
            "agent-upgrade",
            "--version-file",
            good.to_str().unwrap(),
            "--wait",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let r = json(&out);
    let r = node_result(&r, "ref-1");
    assert_eq!(r["outcome"], "failed", "{r}");
    let message = r["message"].as_str().unwrap();
    assert!(
        message.contains("sha256") && message.contains("corrupt"),
        "{r}"
    );
    assert!(!stored.exists(), "the corrupt copy is dropped");
    unchanged("refused by the controller's digest check");
    assert_ne!(agent_version(&controller, &token, "ref-1"), NEW_VERSION);
}

/// The agent killed (SIGKILL, no systemd to restart it) at each point of
/// its swap: the guard puts the old binary back, or finds it still in
/// place, and starts the old agent again; the node answers ROLLED_BACK.
#[test]
fn an_agent_killed_mid_swap_comes_back_on_its_old_binary() {
    let controller = Controller::start();
    let token = controller.api_token("agent-upgrade");
    let work = tempfile::tempdir().unwrap();
    let new = agent_with_version(work.path(), NEW_VERSION);
    for point in ["upgrade_before_swap", "upgrade_after_swap"] {
        let name = format!("crash-{}", point.replace('_', "-"));
        let mut agent = Agent::enroll(&controller, &name);
        agent.deploy("v1");
        agent.own_binary();
        agent.set_run_env(slipway_agent::fault::CRASH_ENV, point);
        agent.run();
        controller.wait_online(&token, 1, Duration::from_secs(30));
        let exe = agent.dir.path().join("bin/slipway-agent");
        let old_sha = sha256_file(&exe);
        let old_version = agent_version(&controller, &token, &name);
        let app_pid = agent.app_pid().unwrap();
        let first_pid = agent.child_pid();
        let out = controller.slipway(
            &token,
            &[
                "agent-upgrade",
                "--version-file",
                new.to_str().unwrap(),
                "--node",
                &name,
                "--commit-deadline",
                "5",
                "--wait",
                "--json",
            ],
        );
        assert_eq!(out.status.code(), Some(1), "{point}: {}", text(&out));
        let outcome = json(&out);
        let r = node_result(&outcome, &name);
        assert_eq!(r["outcome"], "rolled_back", "{point}: {outcome}");
        assert_eq!(r["release_id"], old_version.as_str(), "{point}: {outcome}");
        assert_eq!(sha256_file(&exe), old_sha, "{point}");
        // Another process: the guard started the old agent again.
        let pid = agent.running_pid();
        assert!(pid.is_some() && pid != first_pid, "{point}: {pid:?}");
        assert_eq!(agent.app_pid(), Some(app_pid), "{point}");
        assert_eq!(agent.get().as_deref(), Some("v1"), "{point}");
        assert!(!agent.state_dir().join("upgrade/pending.json").exists());
        agent.stop_run();
        drop(agent);
        wait_until("the node to go offline", Duration::from_secs(30), || {
            controller.online(&token) == 0
        });
    }
}

/// Under systemd (`INVOCATION_ID` set) the agent does not exec itself: it
/// exits 75 and the unit's `Restart=on-failure` starts the new binary
/// (emulated here by a restart loop, as no systemd runs in the tests).
#[test]
fn under_systemd_the_agent_exits_and_its_restart_runs_the_new_binary() {
    let controller = Controller::start();
    let token = controller.api_token("agent-upgrade");
    let mut agent = Agent::enroll(&controller, "sd-1");
    agent.deploy("v1");
    agent.own_binary();
    agent.run_supervised();
    controller.wait_online(&token, 1, Duration::from_secs(30));
    let first = agent.running_pid().unwrap();
    let app_pid = agent.app_pid().unwrap();
    let work = tempfile::tempdir().unwrap();
    let new = agent_with_version(work.path(), NEW_VERSION);
    let out = controller.slipway(
        &token,
        &[
            "agent-upgrade",
            "--version-file",
            new.to_str().unwrap(),
            "--wait",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let outcome = json(&out);
    assert_eq!(
        node_result(&outcome, "sd-1")["release_id"],
        NEW_VERSION,
        "{outcome}"
    );
    // A new process (the old one exited 75), on the new binary.
    let now = agent.running_pid().unwrap();
    assert_ne!(now, first);
    let log = fs::read_to_string(agent.dir.path().join("agent.log")).unwrap();
    assert!(log.contains("exited 75"), "{log}");
    assert_eq!(
        sha256_file(&agent.dir.path().join("bin/slipway-agent")),
        sha256_file(&new)
    );
    assert_eq!(agent_version(&controller, &token, "sd-1"), NEW_VERSION);
    assert_eq!(agent.app_pid(), Some(app_pid));
    assert_eq!(agent.get().as_deref(), Some("v1"));
}
