//! A Docker app (driver `docker`, its image shipped as `image.tar` in the
//! release) pushed through the controller to `slipway-agent run`: deploys
//! that serve, a deploy the health gate rolls back, `slipway rollback`,
//! `restart` and `prune`, and the images of pruned releases removed from
//! the engine (by prunes, and by `run`'s housekeeping under disk pressure)
//! while the current release's and the rollback target's stay.
//!
//! `run` calls the driver on the blocking threads of its runtime; the local
//! `slipway-agent deploy` tests (node-agent/tests/docker_*) never do.
//!
//! Images are made with `docker import` from Debian's static busybox (its
//! httpd serving `/www`): nothing is pulled. Names are unique to the test
//! run, and a [`Cleanup`] guard removes the test's containers and images
//! whatever happens. Without a reachable docker engine the test says so and
//! passes without running (scripts/setup-docker.sh sets one up).

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::docker_image::{busybox_image, docker_cli as docker};
use crate::support::{free_ports, sha256_file, stdout, text, Agent, Controller};

/// The engine's socket (the driver's default).
const SOCKET: &str = "/var/run/docker.sock";
/// Where Debian's busybox-static puts its binary.
/// The port busybox httpd listens on inside the container.
const CONTAINER_PORT: u16 = 3000;

/// Why the engine cannot be used, or `None` when it answers `/_ping`.
pub(crate) fn engine_unreachable() -> Option<String> {
    let mut s = match UnixStream::connect(SOCKET) {
        Ok(s) => s,
        Err(e) => return Some(format!("cannot connect to {SOCKET}: {e}")),
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if let Err(e) = s.write_all(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n") {
        return Some(format!("cannot talk to {SOCKET}: {e}"));
    }
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    let status = answer.lines().next().unwrap_or_default().to_owned();
    (!status.contains(" 200 ")).then(|| format!("{SOCKET} answered {status:?} to /_ping"))
}

/// Whether the engine has an image by this reference.
fn has_image(reference: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", reference])
        .output()
        .unwrap()
        .status
        .success()
}

/// Removes the app's containers (by the driver's label), its release
/// images (`slipway/<app>:*`) and the test's own tags on drop.
pub(crate) struct Cleanup {
    pub(crate) app: String,
    pub(crate) images: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let run = |args: &[&str]| Command::new("docker").args(args).output().ok();
        let label = format!("label=slipway.app={}", self.app);
        if let Some(out) = run(&["ps", "-aq", "--filter", &label]) {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                run(&["rm", "-f", id]);
            }
        }
        let reference = format!("reference=slipway/{}:*", self.app.to_ascii_lowercase());
        if let Some(out) = run(&["images", "-q", "--filter", &reference]) {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                run(&["rmi", "-f", id]);
            }
        }
        for image in &self.images {
            run(&["rmi", "-f", image]);
        }
    }
}

/// `<work>/<version>.tar.gz`: `image.tar` (`docker save` of `tag`) and
/// `VERSION`.
pub(crate) fn artifact(work: &Path, tag: &str, version: &str) -> PathBuf {
    let saved = work.join(format!("{version}-image.tar"));
    docker(&["save", "-o", saved.to_str().unwrap(), tag]);
    let art = work.join(format!("{version}.tar.gz"));
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        fs::File::create(&art).unwrap(),
        flate2::Compression::fast(),
    ));
    b.append_path_with_name(&saved, "image.tar").unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_size(version.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "VERSION", version.as_bytes())
        .unwrap();
    b.into_inner().unwrap().finish().unwrap().flush().unwrap();
    art
}

/// What `GET /` answers on 127.0.0.1:`port`, if anything.
fn get(port: u16) -> Option<String> {
    let addr = ([127, 0, 0, 1], port).into();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(s, "GET / HTTP/1.0\r\nHost: t\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    if !text.starts_with("HTTP/1.0 200") && !text.starts_with("HTTP/1.1 200") {
        return None;
    }
    Some(text.split("\r\n\r\n").nth(1)?.trim().to_owned())
}

/// The versions answering on the app's port pair: after a commit or a
/// rollback exactly one container serves.
fn serving(ports: [u16; 2]) -> Vec<String> {
    ports.iter().filter_map(|p| get(*p)).collect()
}

#[test]
fn docker_app_through_the_controller_to_slipway_agent_run() {
    if let Some(why) = engine_unreachable() {
        eprintln!(
            "SKIPPED docker_app_through_the_controller_to_slipway_agent_run: no docker engine \
             ({why}); run scripts/setup-docker.sh to run it"
        );
        return;
    }
    let app = format!("dk{}", std::process::id());
    let mut cleanup = Cleanup {
        app: app.clone(),
        images: Vec::new(),
    };
    let ports = free_ports();
    let controller = Controller::start();
    let mut agent = Agent::enroll_with(&controller, "n1", &app, |root, _| {
        format!(
            r#"[apps.{app}]
root = "{root}"
keep_failed = 0

[apps.{app}.run]
driver = "docker"
image_archive = "image.tar"
container_port = {CONTAINER_PORT}
ports = [{p1}, {p2}]
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
liveness_interval = "500ms"
"#,
            root = root.display(),
            p1 = ports[0],
            p2 = ports[1],
        )
    });
    agent.run();
    let reader = controller.api_token("read");
    let deployer = controller.api_token(&format!("deploy:{app}"));
    controller.wait_online(&reader, 1, Duration::from_secs(30));

    // Five releases; v3 never gets healthy. Each image reaches the engine
    // only through its release's image.tar: the tags made here go at once.
    let work = tempfile::tempdir().unwrap();
    let mut artifacts = std::collections::HashMap::new();
    for (version, healthy) in [
        ("v0", true),
        ("v1", true),
        ("v2", true),
        ("v3", false),
        ("v4", true),
    ] {
        let tag = format!("slipway-e2e-{app}:{version}");
        cleanup.images.push(tag.clone());
        busybox_image(work.path(), &tag, version, healthy);
        artifacts.insert(version, artifact(work.path(), &tag, version));
        docker(&["rmi", &tag]);
    }
    let deploy = |version: &str| {
        let art = &artifacts[version];
        controller.slipway(
            &deployer,
            &[
                "deploy",
                &app,
                art.to_str().unwrap(),
                "--sha",
                &sha256_file(art),
                "--id",
                version,
                "--wait",
            ],
        )
    };

    // Deploys through the controller serve, blue/green across the pair.
    for version in ["v0", "v1", "v2"] {
        let out = deploy(version);
        // Shown with --nocapture: what a user sees of a Docker deploy.
        eprint!("{}", stdout(&out));
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            stdout(&out).contains(&format!("[n1] SUCCEEDED (release {version})")),
            "{}",
            text(&out)
        );
        assert_eq!(serving(ports), [version], "after deploying {version}");
    }

    // An unhealthy release is rolled back by the health gate; v2's
    // container serves on, and v3's is gone.
    let out = deploy("v3");
    eprint!("{}", stdout(&out));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stdout(&out).contains("[n1] ROLLED_BACK"), "{}", text(&out));
    assert!(
        stdout(&out).contains("health"),
        "the gate is named: {}",
        text(&out)
    );
    assert_eq!(serving(ports), ["v2"]);
    assert_eq!(agent.current().as_deref(), Some("v2"));
    let containers = docker(&["ps", "-a", "--filter", &format!("label=slipway.app={app}")]);
    assert!(
        !containers.contains(&format!("slipway-{app}-v3")),
        "{containers}"
    );

    // `slipway rollback`: back to v1.
    let out = controller.slipway(&deployer, &["rollback", &app, "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains("[n1] SUCCEEDED"), "{}", text(&out));
    assert_eq!(agent.current().as_deref(), Some("v1"));
    assert_eq!(serving(ports), ["v1"]);

    // `slipway restart`: v1 again, in a new container.
    let before = docker(&["ps", "-q", "--filter", &format!("label=slipway.app={app}")]);
    let out = controller.slipway(&deployer, &["restart", &app]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains("[n1] SUCCEEDED (release v1)"),
        "{}",
        text(&out)
    );
    let after = docker(&["ps", "-q", "--filter", &format!("label=slipway.app={app}")]);
    assert_ne!(before, after, "the container was not replaced");
    assert_eq!(serving(ports), ["v1"]);

    let repo = format!("slipway/{}", app.to_ascii_lowercase());
    let release_images = || {
        let listed = docker(&["image", "ls", "--format", "{{.Tag}}", &repo]);
        let mut tags: Vec<String> = listed.lines().map(str::to_owned).collect();
        tags.sort_unstable();
        tags
    };
    assert_eq!(release_images(), ["v0", "v1", "v2", "v3"]);

    // v4 on top: v1 becomes the rollback target. The prune after the
    // deploy drops v2 (bad) and v3 (failed): keep_failed is 0. Their
    // images go with them.
    let out = deploy("v4");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(serving(ports), ["v4"]);
    assert_eq!(agent.release_dirs(), ["v0", "v1", "v4"]);
    assert_eq!(release_images(), ["v0", "v1", "v4"]);

    // `slipway prune --keep 1`: v0 goes, and its image; the images of v4
    // (current) and v1 (rollback target) stay.
    let out = controller.slipway(&deployer, &["prune", &app, "--keep", "1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stdout(&out).contains("[n1] SUCCEEDED: removed 1 release(s): v0"),
        "{}",
        text(&out)
    );
    assert_eq!(agent.release_dirs(), ["v1", "v4"]);
    assert_eq!(release_images(), ["v1", "v4"]);
    for gone in ["v0", "v2", "v3"] {
        assert!(!has_image(&format!("{repo}:{gone}")), "{repo}:{gone} kept");
    }
    assert_eq!(serving(ports), ["v4"]);

    // Housekeeping in `run`: under disk pressure it first removes release
    // tags of releases gone (here a stray one, as a prune whose image
    // removal failed would leave), keeping those of the releases left.
    agent.stop_run();
    docker(&["tag", &format!("{repo}:v1"), &format!("{repo}:gone")]);
    let config = fs::read_to_string(&agent.config).unwrap();
    let pressed = config.replacen(
        "keep_failed = 0\n",
        "keep_failed = 0\ndisk_pressure_free = \"1000000TB\"\n",
        1,
    );
    assert_ne!(config, pressed);
    fs::write(&agent.config, pressed).unwrap();
    agent.run();
    let last_prune = || -> Option<serde_json::Value> {
        let record = fs::read(agent.root.join(".slipway/prune-last.json")).ok()?;
        serde_json::from_slice(&record).ok()
    };
    crate::support::wait_until(
        "housekeeping to remove the stray release tag",
        Duration::from_secs(30),
        || {
            !has_image(&format!("{repo}:gone"))
                && last_prune().is_some_and(|p| p["trigger"] == "disk_pressure")
        },
    );
    assert_eq!(release_images(), ["v1", "v4"]);
    assert_eq!(agent.release_dirs(), ["v1", "v4"]);
    assert_eq!(serving(ports), ["v4"]);

    agent.stop_run();
    drop(agent);
    drop(cleanup);
}
