//! The controller's container image (`packaging/docker/Dockerfile.controller`,
//! FROM scratch, built by `packaging/docker/build-controller-image.sh` from
//! the static binary in `target/static/dev/`), built with the local engine
//! and run with a published port and a named volume: it serves, the host's
//! `slipway` CLI talks to it, and an agent on the host enrolls and shows
//! online. Its API and join tokens are made by `docker exec` of the same
//! binary on the same volume. The container, volume and image are removed
//! whatever happens.
//!
//! Without a reachable docker engine the test says so and passes without
//! running, like tests/it/docker.rs (scripts/setup-docker.sh starts one).

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::{bin, text, wait_until};

fn docker(args: &[&str]) -> Output {
    Command::new("docker").args(args).output().unwrap()
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Removes the test's container, volume and image.
struct Cleanup {
    container: String,
    volume: String,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", &self.container]);
        let _ = docker(&["volume", "rm", "-f", &self.volume]);
        let _ = docker(&["rmi", "-f", &self.image]);
    }
}

struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_scratch_controller_image_serves_the_cli_and_an_agent() {
    if !docker(&["info"]).status.success() {
        eprintln!("SKIPPED: no docker engine answers (scripts/setup-docker.sh starts one)");
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let id = format!("{}-{}", std::process::id(), crate::support::free_port());
    let guard = Cleanup {
        container: format!("slipway-ctl-test-{id}"),
        volume: format!("slipway-ctl-test-{id}"),
        image: format!("slipway-controller-test:{id}"),
    };
    let built = Command::new("bash")
        .arg(repo.join("packaging/docker/build-controller-image.sh"))
        .args(["--profile", "dev", "--tag", &guard.image])
        .output()
        .unwrap();
    assert_eq!(ok(built, "build-controller-image.sh"), guard.image);

    // Nothing in the image but the binary, the user and the data dir.
    let layers = ok(
        docker(&[
            "image",
            "inspect",
            "--format",
            "{{json .Config}}",
            &guard.image,
        ]),
        "image inspect",
    );
    let config: Value = serde_json::from_str(&layers).unwrap();
    assert_eq!(config["User"], "10001:10001", "{config}");

    ok(
        docker(&[
            "run",
            "-d",
            "--name",
            &guard.container,
            "-p",
            "127.0.0.1::7443",
            "-v",
            &format!("{}:/data", guard.volume),
            &guard.image,
            "serve",
            "--data-dir",
            "/data",
            "--listen",
            "0.0.0.0:7443",
            "--server-name",
            "127.0.0.1",
        ]),
        "docker run",
    );
    let published = ok(docker(&["port", &guard.container, "7443"]), "docker port");
    // `docker port` may list an IPv6 binding too; the first is ours.
    let addr = published.lines().next().unwrap().to_owned();
    let exec = |args: &[&str]| {
        let mut all = vec!["exec", guard.container.as_str(), "/slipway-controller"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--data-dir", "/data"]);
        ok(docker(&all), "docker exec slipway-controller")
    };
    wait_until("the CA in the volume", Duration::from_secs(60), || {
        docker(&["exec", &guard.container, "/slipway-controller", "--version"])
            .status
            .success()
            && docker(&["cp", &format!("{}:/data/ca.pem", guard.container), "-"])
                .status
                .success()
    });
    let work = tempfile::tempdir().unwrap();
    let ca = work.path().join("ca.pem");
    ok(
        docker(&[
            "cp",
            &format!("{}:/data/ca.pem", guard.container),
            ca.to_str().unwrap(),
        ]),
        "docker cp ca.pem",
    );
    let read = exec(&["token", "api", "--scope", "read"]);
    let join = exec(&["token", "create"]);
    let nodes = || -> Option<Vec<Value>> {
        let out = Command::new(bin("slipway"))
            .args(["--controller", &addr, "--ca"])
            .arg(&ca)
            .args(["--token", &read, "nodes", "--json"])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    };
    wait_until(
        "the CLI answered by the container",
        Duration::from_secs(60),
        || nodes().is_some(),
    );
    assert_eq!(nodes().unwrap().len(), 0);

    // An agent on the host enrolls with it and keeps a session.
    let state = work.path().join("state");
    let config = work.path().join("agent.toml");
    fs::create_dir_all(work.path().join("app")).unwrap();
    fs::write(
        &config,
        format!(
            "[controller]\nurl = \"{addr}\"\nstate_dir = \"{}\"\n\n[apps.web]\nroot = \"{}\"\n",
            state.display(),
            work.path().join("app").display()
        ),
    )
    .unwrap();
    let enrolled = Command::new(bin("slipway-agent"))
        .arg("--config")
        .arg(&config)
        .args([
            "enroll",
            "--controller",
            &addr,
            "--token",
            &join,
            "--name",
            "boxed-1",
        ])
        .arg("--state-dir")
        .arg(&state)
        .output()
        .unwrap();
    ok(enrolled, "enroll with the container");
    let _run = Reaped(
        Command::new(bin("slipway-agent"))
            .arg("--config")
            .arg(&config)
            .arg("run")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("the agent online", Duration::from_secs(60), || {
        nodes().is_some_and(|n| {
            n.iter()
                .any(|n| n["name"] == "boxed-1" && n["state"] == "online")
        })
    });
    drop(guard);
}
