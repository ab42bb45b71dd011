//! An operator edits `listen` of a Docker app behind the agent's front:
//! a changed address is taken up by a new front (the old one let go) when
//! `slipway-agent run` starts; a removed one stops the front, and the
//! container is published on the app's own `host_ip` again, at the next
//! `run` pass or deploy. `status` says what holds the address throughout.
//! Real processes: the agent binary, its detached front, the machine's
//! docker engine with busybox images made by `docker import`.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::{
    busybox_image, docker_cli, free_ports, http_get, targz, wait_until, Node, RawTar, RunningAgent,
    BIN,
};

/// Removes the app's containers and the test's images, whatever happened.
struct Cleanup {
    /// The node's agent.toml: `stop` ends the app's front too.
    config: PathBuf,
    app: String,
    images: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::process::Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .args(["stop", "--app", &self.app])
            .output();
        let label = format!("label=slipway.app={}", self.app);
        if let Ok(out) = std::process::Command::new("docker")
            .args(["ps", "-aq", "--filter", &label])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = std::process::Command::new("docker")
                    .args(["rm", "-f", id])
                    .output();
            }
        }
        let repo = format!("slipway/{}", self.app.to_ascii_lowercase());
        for image in self.images.iter().chain([&repo]) {
            let _ = std::process::Command::new("docker")
                .args(["rmi", "-f", image])
                .output();
        }
    }
}

/// Release `version`: `image.tar` of a busybox httpd answering `version`.
fn image_artifact(dir: &Path, app: &str, version: &str, images: &mut Vec<String>) -> PathBuf {
    let tag = format!("slipway-listen-{app}:{version}");
    busybox_image(dir, &tag, version, true);
    images.push(tag.clone());
    let saved = dir.join(format!("{version}-image.tar"));
    docker_cli(&["save", "-o", saved.to_str().unwrap(), &tag]);
    let tar = RawTar::default()
        .file("image.tar", 0o644, &fs::read(&saved).unwrap())
        .finish();
    fs::remove_file(&saved).unwrap();
    let art = dir.join(format!("{version}.tar.gz"));
    fs::write(&art, targz(&tar)).unwrap();
    art
}

fn config(root: &Path, app: &str, listen: Option<&str>, ports: [u16; 2]) -> String {
    let listen = listen.map_or_else(String::new, |l| format!("listen = \"{l}\"\n"));
    format!(
        r#"[apps.{app}]
root = "{}"
{listen}
[apps.{app}.run]
driver = "docker"
image_archive = "image.tar"
container_port = 3000
ports = [{}, {}]
memory = "64MiB"
stop_grace = "2s"

[apps.{app}.health]
check = "http"
url = "http://127.0.0.1:{{port}}/api/health"
interval = "100ms"
successes = 2
start_period = "500ms"
deadline = "20s"
liveness_interval = "300ms"
"#,
        root.join(app).display(),
        ports[0],
        ports[1],
    )
}

fn status(node: &Node) -> serde_json::Value {
    node.run(&["status", "--json"]).ok().json()["apps"][0].clone()
}

/// Deploys `art` as release v0 of `app`; it must succeed.
fn deploy_v0(node: &Node, app: &str, art: &Path) {
    let r = node
        .run(&[
            "deploy",
            "--app",
            app,
            "--artifact",
            art.to_str().unwrap(),
            "--id",
            "v0",
            "--json",
        ])
        .json();
    assert_eq!(r["outcome"], "succeeded", "{r:#}");
}

/// `NAME STATE` of every container of `app`, running or not (`docker ps -a`).
fn containers_of(app: &str) -> String {
    docker_cli(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=slipway.app={app}"),
        "--format",
        "{{.Names}} {{.State}}",
    ])
}

/// What the app's container publishes its port on (`docker ps`).
fn published(app: &str) -> String {
    docker_cli(&[
        "ps",
        "--filter",
        &format!("label=slipway.app={app}"),
        "--format",
        "{{.Ports}}",
    ])
}

#[test]
fn a_changed_or_removed_listen_moves_or_stops_the_front() {
    let app = format!("lc{}", std::process::id());
    let [p, q] = free_ports::<2>();
    let ports = free_ports::<2>();
    let first = format!("127.0.0.1:{p}");
    let node = Node::with_config(|root| config(root, &app, Some(&first), ports));
    let mut cleanup = Cleanup {
        config: node.config.clone(),
        app: app.clone(),
        images: Vec::new(),
    };
    let arts: Vec<PathBuf> = ["v0", "v1", "v2", "v3"]
        .iter()
        .map(|v| image_artifact(node.dir.path(), &app, v, &mut cleanup.images))
        .collect();
    let deploy = |i: usize| {
        let v = format!("v{i}");
        let r = node
            .run(&[
                "deploy",
                "--app",
                &app,
                "--artifact",
                arts[i].to_str().unwrap(),
                "--id",
                &v,
                "--json",
            ])
            .json();
        assert_eq!(r["outcome"], "succeeded", "deploy {v}: {r:#}");
        r
    };
    let write_config = |listen: Option<&str>| {
        fs::write(&node.config, config(&node.root, &app, listen, ports)).unwrap();
    };
    deploy(0);
    assert_eq!(http_get(p, "/").unwrap().1.trim(), "v0");
    let st = status(&node);
    assert_eq!(st["public"]["address"], first.as_str(), "{st:#}");
    assert_eq!(st["public"]["mode"], "agent_proxy", "{st:#}");
    assert_eq!(st["public"]["release"], "v0", "{st:#}");
    assert!(
        published(&app).starts_with("127.0.0.1:"),
        "{}",
        published(&app)
    );

    // listen changed, then `run` starts: the new address serves, the old
    // one is let go; status said so before.
    let second = format!("127.0.0.1:{q}");
    write_config(Some(&second));
    let st = status(&node);
    assert_eq!(st["public"]["left_behind"], first.as_str(), "{st:#}");
    let mut agent = RunningAgent::start(&node);
    wait_until(
        "the front to move to the new address",
        Duration::from_secs(30),
        || http_get(q, "/").is_some_and(|(_, b)| b.trim() == "v0") && http_get(p, "/").is_none(),
    );
    let st = status(&node);
    assert_eq!(st["public"]["address"], second.as_str(), "{st:#}");
    assert_eq!(st["public"]["release"], "v0", "{st:#}");
    assert!(st["public"].get("left_behind").is_none(), "{st:#}");
    // A deploy on the new address as usual.
    agent.stop();
    deploy(1);
    assert_eq!(http_get(q, "/").unwrap().1.trim(), "v1");

    // listen removed, then `run` starts: the front stops, and the
    // container is published on the app's own host_ip (0.0.0.0 without
    // listen) again, behind the health gate.
    write_config(None);
    let _agent = RunningAgent::start(&node);
    wait_until(
        "the front to stop and the container to be published on 0.0.0.0",
        Duration::from_secs(60),
        || http_get(q, "/").is_none() && published(&app).starts_with("0.0.0.0:"),
    );
    let st = status(&node);
    assert_eq!(st["public"]["mode"], "none", "{st:#}");
    assert!(st["public"]["address"].is_null(), "{st:#}");
    assert!(st["public"].get("left_behind").is_none(), "{st:#}");
    let live: u16 = published(&app)
        .trim_start_matches("0.0.0.0:")
        .split("->")
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(ports.contains(&live), "{}", published(&app));
    assert_eq!(http_get(live, "/").unwrap().1.trim(), "v1");
    assert!(!node
        .root
        .join(&app)
        .join(".slipway/run/front-target.json")
        .exists());
    drop(_agent);

    // Through a deploy alone (no `run`): listen added back takes the
    // address again; removed, the deploy stops the front.
    write_config(Some(&first));
    deploy(2);
    assert_eq!(http_get(p, "/").unwrap().1.trim(), "v2");
    write_config(None);
    deploy(3);
    assert!(http_get(p, "/").is_none(), "the front still answers");
    let log =
        fs::read_to_string(node.root.join(&app).join(".slipway/logs/v3.log")).unwrap_or_default();
    assert!(log.contains("listen removed"), "{log}");
    assert!(
        published(&app).starts_with("0.0.0.0:"),
        "{}",
        published(&app)
    );
    let st = status(&node);
    assert_eq!(st["public"]["mode"], "none", "{st:#}");
    assert_eq!(st["current"], "v3", "{st:#}");
    drop(cleanup);
}

/// The PM2 test app (answers `RELEASE PID` on $PORT).
const PM2_SERVER: &str = include_str!("../fixtures/pm2-app/server.js");

/// Stops the app (its front too) and kills this test's PM2 daemon,
/// whatever happened.
struct Pm2Cleanup {
    config: PathBuf,
    home: PathBuf,
}

impl Drop for Pm2Cleanup {
    fn drop(&mut self) {
        let _ = std::process::Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .args(["stop", "--app", "web"])
            .output();
        let _ = std::process::Command::new("pm2")
            .arg("kill")
            .env("PM2_HOME", &self.home)
            .output();
    }
}

fn pm2_config(root: &Path, home: &Path, front: Option<(u16, [u16; 2])>, own: u16) -> String {
    let (listen, ports, health) = match front {
        Some((public, pair)) => (
            format!("listen = \"127.0.0.1:{public}\"\n"),
            format!("ports = [{}, {}]\n", pair[0], pair[1]),
            "{port}".to_owned(),
        ),
        None => (String::new(), String::new(), own.to_string()),
    };
    format!(
        r#"[apps.web]
root = "{}"
shared_files = [".env"]
{listen}
[apps.web.run]
driver = "pm2"
script = "server.js"
instances = 1
exec_mode = "fork"
{ports}pm2_home = "{}"

[apps.web.health]
check = "http"
url = "http://127.0.0.1:{health}/api/health"
interval = "100ms"
successes = 2
retries = 2
start_period = "500ms"
deadline = "30s"
"#,
        root.display(),
        home.display()
    )
}

#[test]
fn pm2_fork_mode_without_listen_any_more_drops_its_front_and_process_sets() {
    let [public, own] = free_ports::<2>();
    let pair = free_ports::<2>();
    let home = tempfile::tempdir().unwrap();
    let node = Node::with_config(|root| pm2_config(root, home.path(), Some((public, pair)), own));
    let _cleanup = Pm2Cleanup {
        config: node.config.clone(),
        home: home.path().to_owned(),
    };
    fs::write(node.root.join("shared/.env"), format!("PORT={own}\n")).unwrap();
    let artifact = |v: &str| {
        let server = PM2_SERVER.replace("__RELEASE__", v);
        node.artifact(&format!("{v}.tar.gz"), &[("server.js", server.as_str())])
    };
    let r = node.deploy_json(&artifact("v0"), "v0").ok().json();
    assert_eq!(r["outcome"], "succeeded", "{r:#}");
    assert!(http_get(public, "/").unwrap().1.starts_with("v0 "));
    let st = status(&node);
    assert_eq!(st["public"]["mode"], "agent_proxy", "{st:#}");

    // listen and ports removed: the next deploy runs the app as plain fork
    // mode on its own PORT, stops the front, deletes the process set.
    fs::write(&node.config, pm2_config(&node.root, home.path(), None, own)).unwrap();
    let r = node.deploy_json(&artifact("v1"), "v1").ok().json();
    assert_eq!(r["outcome"], "succeeded", "{r:#}");
    assert!(http_get(public, "/").is_none(), "the front still answers");
    assert!(http_get(own, "/").unwrap().1.starts_with("v1 "));
    for p in pair {
        assert!(
            http_get(p, "/").is_none(),
            "the process set on {p} still runs"
        );
    }
    let jlist = std::process::Command::new("pm2")
        .arg("jlist")
        .env("PM2_HOME", home.path())
        .output()
        .unwrap();
    let names: Vec<String> = serde_json::from_slice::<serde_json::Value>(&jlist.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(names, ["web"], "{names:?}");
    let st = status(&node);
    assert_eq!(st["public"]["mode"], "none", "{st:#}");
    assert!(st["public"].get("left_behind").is_none(), "{st:#}");
}

#[test]
fn a_docker_restart_behind_the_front_loses_nothing_and_a_failed_one_keeps_the_old_container() {
    let app = format!("rs{}", std::process::id());
    let public = free_ports::<1>()[0];
    let ports = free_ports::<2>();
    let listen = format!("127.0.0.1:{public}");
    let node = Node::with_config(|root| {
        // The gate fails while SICK exists: the same image, healthy or not.
        config(root, &app, Some(&listen), ports).replace(
            "check = \"http\"\nurl = \"http://127.0.0.1:{port}/api/health\"",
            &format!(
                "check = \"exec\"\ncommand = \"test ! -e {} && curl -fsS http://127.0.0.1:{{port}}/api/health\"",
                root.parent().unwrap().join("SICK").display()
            ),
        )
    });
    let sick = node.dir.path().join("SICK");
    let mut cleanup = Cleanup {
        config: node.config.clone(),
        app: app.clone(),
        images: Vec::new(),
    };
    let art = image_artifact(node.dir.path(), &app, "v0", &mut cleanup.images);
    deploy_v0(&node, &app, &art);
    let containers = || containers_of(&app);
    let load =
        crate::support::load::Load::start(public, "/", 2, 1, Duration::from_secs(120), 100_000);
    // A restart: a new container of v0 on the other port, then the switch.
    let out = node.run(&["restart", "--app", &app]);
    assert_eq!(out.code, Some(0), "{out:?}");
    assert_eq!(containers(), format!("slipway-{app}-v0 running"));
    // A restart whose new container fails its gate: the one that served
    // (stepped aside meanwhile) serves on, under its own name again.
    fs::write(&sick, "").unwrap();
    let out = node.run(&["restart", "--app", &app]);
    assert_ne!(out.code, Some(0), "{out:?}");
    assert_eq!(containers(), format!("slipway-{app}-v0 running"));
    fs::remove_file(&sick).unwrap();
    let out = node.run(&["restart", "--app", &app]);
    assert_eq!(out.code, Some(0), "{out:?}");
    std::thread::sleep(Duration::from_millis(300));
    let report = load.stop();
    eprintln!("docker restarts behind the front: {}", report.summary());
    assert_eq!(report.failures(), 0, "{}", report.summary());
    assert!(report.ok >= 100, "too little load: {}", report.summary());
    assert!(
        report.bodies.iter().all(|b| b.trim() == "v0"),
        "{}",
        report.summary()
    );
    assert_eq!(containers(), format!("slipway-{app}-v0 running"));
    let st = status(&node);
    assert_eq!(st["public"]["release"], "v0", "{st:#}");
    drop(cleanup);
}

// A kill -9 of the agent in the middle of a Docker restart behind the
// front, before and after the front moved: the next `slipway-agent run`
// pass, or the next command, leaves one container of the release serving,
// under its own name, the recorded port the one it listens on, and no
// request fails meanwhile.
#[test]
fn a_kill_of_the_agent_around_the_switch_of_a_docker_restart_leaves_one_container_serving() {
    let app = format!("rk{}", std::process::id());
    let public = free_ports::<1>()[0];
    let ports = free_ports::<2>();
    let listen = format!("127.0.0.1:{public}");
    let node = Node::with_config(|root| config(root, &app, Some(&listen), ports));
    let mut cleanup = Cleanup {
        config: node.config.clone(),
        app: app.clone(),
        images: Vec::new(),
    };
    let art = image_artifact(node.dir.path(), &app, "v0", &mut cleanup.images);
    deploy_v0(&node, &app, &art);
    let containers = || containers_of(&app);
    let load =
        crate::support::load::Load::start(public, "/", 2, 1, Duration::from_secs(120), 100_000);
    let t0 = std::time::Instant::now();
    let doors = ["run", "restart"];
    for (point, door) in slipway_agent::fault::FRONT_POINTS
        .iter()
        .flat_map(|p| doors.map(|d| (p, d)))
    {
        eprintln!(
            "{:.3}s: restart killed at {point}, then {door}",
            t0.elapsed().as_secs_f64()
        );
        node.run_killed_at(point, &["restart", "--app", &app]);
        let mut agent = match door {
            // The daemon's next pass settles it...
            "run" => Some(RunningAgent::start(&node)),
            // ...and so does the next command, before it starts anything.
            _ => {
                let out = node.run(&["restart", "--app", &app]);
                assert_eq!(out.code, Some(0), "{point}: {out:?}");
                None
            }
        };
        wait_until(
            &format!("{point}, {door}: one container of the app, under its own name"),
            Duration::from_secs(60),
            || containers() == format!("slipway-{app}-v0 running"),
        );
        eprintln!("{:.3}s: one container", t0.elapsed().as_secs_f64());
        let mut agent = agent.take().unwrap_or_else(|| RunningAgent::start(&node));
        // A few liveness passes: nothing changes any more.
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(agent.stop(), Some(0), "{point}, {door}");
        assert_eq!(
            containers(),
            format!("slipway-{app}-v0 running"),
            "{point}, {door}"
        );
        let st = status(&node);
        let port = published(&app);
        let recorded = st["releases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["current"] == true)
            .map(|r| r["port"].to_string())
            .unwrap_or_default();
        assert!(
            port.contains(&format!(":{recorded}->")),
            "{point}, {door}: recorded port {recorded}, container publishes {port}: {st:#}"
        );
        assert_eq!(
            http_get(public, "/").unwrap().1.trim(),
            "v0",
            "{point}, {door}"
        );
    }
    // And a restart after all that works as usual.
    let out = node.run(&["restart", "--app", &app]);
    assert_eq!(out.code, Some(0), "{out:?}");
    std::thread::sleep(Duration::from_millis(300));
    let report = load.stop();
    eprintln!(
        "kills around a docker restart's switch: {}",
        report.summary()
    );
    assert_eq!(report.failures(), 0, "{}", report.summary());
    assert_eq!(containers(), format!("slipway-{app}-v0 running"));
    drop(cleanup);
}
