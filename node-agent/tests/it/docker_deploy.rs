//! Docker through the whole agent: `slipway-agent deploy` loads the image
//! from the release, starts it on the other blue/green port, gates it on
//! `/api/health` at `{port}`, and rolls a failing release back.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::PathBuf;

use crate::support::{busybox_image, docker_cli, free_ports, http_get, targz, Node, RawTar};

/// Removes the app's containers and the test's images, whatever happened.
struct Cleanup {
    app: String,
    images: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ids = std::process::Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=slipway.app={}", self.app),
            ])
            .output();
        if let Ok(out) = ids {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "-f", id])
                    .output();
            }
        }
        let reference = format!("reference=slipway/{}:*", self.app.to_ascii_lowercase());
        if let Ok(out) = std::process::Command::new("docker")
            .args(["images", "-q", "--filter", &reference])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = std::process::Command::new("docker")
                    .args(["rmi", "-f", id])
                    .output();
            }
        }
        for i in &self.images {
            let _ = std::process::Command::new("docker")
                .args(["rmi", "-f", i])
                .output();
        }
    }
}

/// An artifact holding `image.tar` (`docker save` of `tag`).
fn artifact(node: &Node, tag: &str, version: &str) -> PathBuf {
    let saved = node.dir.path().join(format!("{version}-image.tar"));
    docker_cli(&["save", "-o", saved.to_str().unwrap(), tag]);
    let bytes = fs::read(&saved).unwrap();
    let tar = RawTar::default()
        .file("image.tar", 0o644, &bytes)
        .file("VERSION", 0o644, version.as_bytes())
        .finish();
    let path = node.dir.path().join(format!("{version}.tar.gz"));
    fs::write(&path, targz(&tar)).unwrap();
    path
}

#[test]
fn blue_green_deploy_gated_on_health_and_rolled_back_when_it_fails() {
    let app = format!("e2e{}", std::process::id());
    let ports: [u16; 2] = free_ports();
    let node = Node::with_config(|root| {
        format!(
            r#"[apps.{app}]
root = "{}"
shared_files = [".env"]
keep_failed = 0

[apps.{app}.run]
driver = "docker"
image_archive = "image.tar"
container_port = 3000
ports = [{}, {}]
host_ip = "127.0.0.1"
memory = "64MiB"
stop_grace = "1s"

[apps.{app}.health]
check = "http"
url = "http://127.0.0.1:{{port}}/api/health"
interval = "100ms"
successes = 2
retries = 2
start_period = "500ms"
deadline = "20s"
"#,
            root.display(),
            ports[0],
            ports[1]
        )
    });
    let mut cleanup = Cleanup {
        app: app.clone(),
        images: Vec::new(),
    };
    let deploy = |artifact: &PathBuf, id: &str| {
        node.run(&[
            "deploy",
            "--app",
            &app,
            "--artifact",
            artifact.to_str().unwrap(),
            "--id",
            id,
            "--json",
        ])
    };
    let mut artifacts = Vec::new();
    for (v, healthy) in [("v1", true), ("v2", true), ("v3", false)] {
        let tag = format!("slipway-e2e-{app}:{v}");
        busybox_image(node.dir.path(), &tag, v, healthy);
        cleanup.images.push(tag.clone());
        artifacts.push(artifact(&node, &tag, v));
    }

    let r1 = deploy(&artifacts[0], "v1").ok().json();
    assert_eq!(r1["outcome"], "succeeded", "{r1:#}");
    let p1 = r1["activation"]["port"].as_u64().unwrap() as u16;
    assert_eq!(http_get(p1, "/").unwrap(), (200, "v1".to_owned()));

    let r2 = deploy(&artifacts[1], "v2").ok().json();
    let p2 = r2["activation"]["port"].as_u64().unwrap() as u16;
    assert_ne!(p1, p2, "blue/green must alternate ports");
    assert_eq!(http_get(p2, "/").unwrap(), (200, "v2".to_owned()));
    assert!(
        http_get(p1, "/").is_none(),
        "old container still serving after commit"
    );

    let run = deploy(&artifacts[2], "v3");
    assert_eq!(run.code, Some(1), "{run:#?}");
    let r3 = run.json();
    assert_eq!(r3["outcome"], "rolled_back", "{r3:#}");
    assert!(
        r3["failure"].as_str().unwrap().contains("HTTP 404"),
        "{r3:#}"
    );
    assert_eq!(node.current().as_deref(), Some("v2"));
    assert_eq!(
        http_get(p2, "/").unwrap(),
        (200, "v2".to_owned()),
        "previous release not serving"
    );
    // Only v2's container is left.
    let names = docker_cli(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=slipway.app={app}"),
        "--format",
        "{{.Names}}",
    ]);
    assert_eq!(names, format!("slipway-{app}-v2"));

    // status: the container typed, no environment values; liveness uses the
    // recorded port.
    let status = node.run(&["status", "--json"]).ok().json();
    let text = status.to_string();
    assert!(!text.contains("s3cr3t"), "status leaked .env");
    let procs = &status["apps"][0]["processes"]["processes"];
    assert_eq!(procs[0]["release"], "v2", "{status:#}");
    let releases = node.run(&["releases", "--app", &app, "--json"]).ok().json();
    let v2 = releases["releases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == "v2")
        .unwrap()
        .clone();
    assert_eq!(v2["port"].as_u64(), Some(u64::from(p2)));

    // A node-local rollback restarts v1's image on the other port.
    let rb = node.run(&["rollback", "--app", &app, "--json"]).ok().json();
    let p = rb["activation"]["port"].as_u64().unwrap() as u16;
    assert_eq!(http_get(p, "/").unwrap(), (200, "v1".to_owned()), "{rb:#}");

    // Prune: v2 (bad) and v3 (failed) go, and with them their release images.
    let images = || {
        let mut v: Vec<String> = docker_cli(&[
            "images",
            "--filter",
            &format!("reference=slipway/{app}:*"),
            "--format",
            "{{.Tag}}",
        ])
        .lines()
        .map(str::to_owned)
        .collect();
        v.sort();
        v
    };
    assert_eq!(images(), ["v1", "v2", "v3"]);
    let pr = node.run(&["prune", "--app", &app, "--json"]).ok().json();
    assert_eq!(pr["removed"], serde_json::json!(["v2", "v3"]), "{pr:#}");
    assert!(pr["image_bytes_freed"].as_u64().unwrap() > 0, "{pr:#}");
    assert_eq!(images(), ["v1"]);
}
