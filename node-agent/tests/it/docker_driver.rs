//! The docker driver against a real engine (scripts/setup-docker.sh):
//! blue/green activation, commit, restore, image archives, env and limits, a
//! taken port, and the error for an unreachable socket.
//!
//! Images are made here with `docker import` from a tiny root filesystem
//! (Debian's static busybox serving `/www` with httpd): nothing is pulled.
//! Every test uses its own app name, image tags and host ports, and a
//! [`Cleanup`] guard removes what it made even when an assertion fails.
// A failed setup step should panic with its error, which is what unwrap does.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bollard::models::{ContainerInspectResponse, RestartPolicyNameEnum};
use bollard::query_parameters::{InspectContainerOptions, ListContainersOptions};
use slipway_agent::bridge::Bridge;
use slipway_agent::config::{AppConfig, DockerConfig, RunConfig};
use slipway_agent::driver::docker::{container_name, Docker, LABEL_APP, LABEL_PORT, LABEL_RELEASE};
use slipway_agent::driver::{Activation, Driver, Target};
use slipway_agent::release::ReleaseId;

use crate::support::free_ports;

const SOCKET: &str = "/var/run/docker.sock";
/// Where Debian's busybox-static puts its binary.
const BUSYBOX: &str = "/bin/busybox";
/// The port busybox httpd listens on inside the container.
const CONTAINER_PORT: u16 = 3000;
/// Bound on waiting for a container's HTTP answer.
const HTTP_WAIT: Duration = Duration::from_secs(20);

// --- engine access for assertions (the driver is what is tested) ------------

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

fn api() -> bollard::Docker {
    block_on(async {
        bollard::Docker::connect_with_unix(SOCKET, 30, bollard::API_DEFAULT_VERSION)
            .unwrap_or_else(|e| {
                panic!("no docker engine at {SOCKET} ({e}): run scripts/setup-docker.sh")
            })
            .negotiate_version()
            .await
            .unwrap_or_else(|e| {
                panic!("no docker engine at {SOCKET} ({e}): run scripts/setup-docker.sh")
            })
    })
}

fn inspect(id: &str) -> Option<ContainerInspectResponse> {
    let api = api();
    block_on(async move {
        match api
            .inspect_container(id, None::<InspectContainerOptions>)
            .await
        {
            Ok(c) => Some(c),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => None,
            Err(e) => panic!("inspect {id}: {e}"),
        }
    })
}

/// Names of the app's containers, any state.
fn container_names(app: &str) -> Vec<String> {
    let api = api();
    let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_APP}={app}")])]);
    let list = block_on(async move {
        api.list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap()
    });
    let mut names: Vec<String> = list
        .into_iter()
        .flat_map(|c| c.names.unwrap_or_default())
        .map(|n| n.trim_start_matches('/').to_owned())
        .collect();
    names.sort();
    names
}

/// The runtime a driver of these tests blocks on: each test thread is a
/// one-shot caller, like the `slipway-agent` CLI.
fn bridge() -> Bridge {
    Bridge::owned().unwrap()
}

fn docker(args: &[&str]) -> String {
    crate::support::docker_cli(args)
}

// --- fixtures -----------------------------------------------------------------

/// Removes the test's containers (by app label) and image tags on drop.
struct Cleanup {
    apps: Vec<String>,
    images: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for app in &self.apps {
            let ids = Command::new("docker")
                .args(["ps", "-aq", "--filter", &format!("label={LABEL_APP}={app}")])
                .output();
            if let Ok(out) = ids {
                let ids = String::from_utf8_lossy(&out.stdout);
                let ids: Vec<&str> = ids.split_whitespace().collect();
                if !ids.is_empty() {
                    let _ = Command::new("docker")
                        .args(["rm", "-f"])
                        .args(&ids)
                        .output();
                }
            }
        }
        for app in &self.apps {
            // Release tags the driver made (slipway/<app>:<release>).
            let reference = format!("reference=slipway/{}:*", app.to_ascii_lowercase());
            if let Ok(out) = Command::new("docker")
                .args(["images", "-q", "--filter", &reference])
                .output()
            {
                for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("docker").args(["rmi", "-f", id]).output();
                }
            }
        }
        for image in &self.images {
            let _ = Command::new("docker").args(["rmi", "-f", image]).output();
        }
    }
}

/// One test's world: an app root on disk and names unique to the test.
struct World {
    dir: tempfile::TempDir,
    app: String,
    ports: [u16; 2],
    cleanup: Cleanup,
}

impl World {
    fn new(test: &str) -> Self {
        assert!(
            Path::new(BUSYBOX).exists(),
            "{BUSYBOX} is missing: run scripts/setup-docker.sh (installs busybox-static)"
        );
        let app = format!("t{}-{test}", std::process::id());
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir_all(dir.path().join("app/shared")).unwrap();
        Self {
            dir,
            ports: free_ports(),
            cleanup: Cleanup {
                apps: vec![app.clone()],
                images: Vec::new(),
            },
            app,
        }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("app")
    }

    /// Image `slipway-test-<app>:<version>` serving `version` at /api/health
    /// (or without that file: every health probe gets 404).
    fn image(&mut self, version: &str, with_health: bool) -> String {
        let tag = format!("slipway-test-{}:{version}", self.app);
        self.cleanup.images.push(tag.clone());
        crate::support::busybox_image(self.dir.path(), &tag, version, with_health);
        tag
    }

    fn config(&self, image: Option<&str>) -> DockerConfig {
        DockerConfig {
            image: image.map(str::to_owned),
            image_archive: None,
            container_port: CONTAINER_PORT,
            ports: self.ports,
            host_ip: "127.0.0.1".into(),
            memory_bytes: Some(64 * 1024 * 1024),
            cpus: Some(0.5),
            restart: "unless-stopped".into(),
            socket: PathBuf::from(SOCKET),
            command: Vec::new(),
            // busybox httpd ignores SIGTERM as PID 1: keep the kill quick.
            stop_grace: Duration::from_secs(1),
            log_max_size: 1 << 20,
            log_max_file: 3,
        }
    }

    fn app_config(&self, config: &DockerConfig) -> AppConfig {
        let mut app = AppConfig::with_defaults(&self.app, self.root());
        app.run = Some(RunConfig::Docker(config.clone()));
        app
    }

    /// The release directory exists and `current` points at it (as after the
    /// switch), then the target as the deploy builds it.
    fn target(&self, config: &DockerConfig, release: &str) -> Target {
        let root = self.root();
        fs::create_dir_all(root.join("releases").join(release)).unwrap();
        let tmp = root.join("current.tmp");
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(Path::new("releases").join(release), &tmp).unwrap();
        fs::rename(&tmp, root.join("current")).unwrap();
        Target::new(&self.app_config(config), &ReleaseId::new(release).unwrap()).unwrap()
    }
}

// --- http ---------------------------------------------------------------------

/// GET `path` on 127.0.0.1:`port`: (status, body), or the connection error.
fn get(port: u16, path: &str) -> Result<(u16, String), String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or(format!("no http answer: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or(format!("bad status line: {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// Waits (bounded) until GET `path` answers `status`; returns the body.
#[track_caller]
fn wait_for(port: u16, path: &str, status: u16) -> String {
    let deadline = Instant::now() + HTTP_WAIT;
    loop {
        let last = get(port, path);
        if let Ok((s, body)) = &last {
            if *s == status {
                return body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "GET :{port}{path} did not answer {status} within {HTTP_WAIT:?}; last: {last:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn label<'a>(c: &'a ContainerInspectResponse, key: &str) -> Option<&'a str> {
    c.config
        .as_ref()?
        .labels
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn handle(a: &Activation) -> &str {
    a.handle.as_deref().unwrap()
}

// --- tests ----------------------------------------------------------------------

#[test]
fn blue_green_activate_then_commit() {
    let mut w = World::new("bluegreen");
    let v1 = w.image("v1", true);
    let v2 = w.image("v2", true);
    let [port_a, port_b] = w.ports;

    let c1 = w.config(Some(&v1));
    let t1 = w.target(&c1, "v1");
    let a1 = Docker::new(c1, bridge()).activate(&t1).unwrap();
    assert_eq!(a1.port, Some(port_a));
    let name1 = container_name(&w.app, &t1.release);
    assert_eq!(a1.detail, format!("container {name1} on port {port_a}"));
    assert_eq!(wait_for(port_a, "/api/health", 200), "ok v1\n");

    let c2 = w.config(Some(&v2));
    let t2 = w.target(&c2, "v2");
    let driver = Docker::new(c2, bridge());
    let a2 = driver.activate(&t2).unwrap();
    assert_eq!(a2.port, Some(port_b));
    assert_eq!(wait_for(port_b, "/api/health", 200), "ok v2\n");
    // The old release still serves until the commit.
    assert_eq!(wait_for(port_a, "/api/health", 200), "ok v1\n");
    assert_eq!(container_names(&w.app).len(), 2);

    driver.commit(&t2, &a2).unwrap();
    assert!(
        inspect(handle(&a1)).is_none(),
        "v1's container is still there"
    );
    assert_eq!(
        container_names(&w.app),
        vec![container_name(&w.app, &t2.release)]
    );
    assert_eq!(wait_for(port_b, "/api/health", 200), "ok v2\n");
    assert!(
        get(port_a, "/api/health").is_err(),
        "port {port_a} still answers"
    );
    // The replaced image stays for a rollback.
    docker(&["image", "inspect", &v1]);

    let c = inspect(handle(&a2)).unwrap();
    assert_eq!(label(&c, LABEL_APP), Some(w.app.as_str()));
    assert_eq!(label(&c, LABEL_RELEASE), Some("v2"));
    assert_eq!(label(&c, LABEL_PORT), Some(port_b.to_string().as_str()));

    let status = driver.status(&t2.app).unwrap();
    assert_eq!(status.driver, "docker");
    assert_eq!(status.processes.len(), 1, "{status:?}");
    let p = &status.processes[0];
    assert_eq!(p.status, "running");
    assert_eq!(p.release.as_deref(), Some("v2"));
    assert!(p.pid.is_some_and(|pid| pid > 0), "{p:?}");
    assert!(p.uptime_secs.is_some(), "{p:?}");

    driver.stop(&t2.app).unwrap();
    assert!(container_names(&w.app).is_empty());
    // Stopping a stopped app is fine.
    driver.stop(&t2.app).unwrap();
}

#[test]
fn restore_puts_the_previous_release_back() {
    let mut w = World::new("restore");
    let v2 = w.image("v2", true);
    let v3 = w.image("v3", false);
    let [port_a, port_b] = w.ports;

    let c2 = w.config(Some(&v2));
    let t2 = w.target(&c2, "v2");
    let d2 = Docker::new(c2, bridge());
    let a2 = d2.activate(&t2).unwrap();
    d2.commit(&t2, &a2).unwrap();
    assert_eq!(wait_for(port_a, "/api/health", 200), "ok v2\n");

    // v3 comes up but fails its health check.
    let c3 = w.config(Some(&v3));
    let t3 = w.target(&c3, "v3");
    let d3 = Docker::new(c3, bridge());
    let a3 = d3.activate(&t3).unwrap();
    assert_eq!(a3.port, Some(port_b));
    wait_for(port_b, "/api/health", 404);

    let t2 = w.target(&w.config(Some(&v2)), "v2");
    let back = d3.restore(&t2, &a3).unwrap();
    assert!(
        inspect(handle(&a3)).is_none(),
        "the failed container is still there"
    );
    assert_eq!(back.port, Some(port_a));
    assert_eq!(back.handle, a2.handle);
    assert_eq!(wait_for(port_a, "/api/health", 200), "ok v2\n");
    assert_eq!(
        container_names(&w.app),
        vec![container_name(&w.app, &t2.release)]
    );

    // The previous container is gone (removed by hand): restore recreates it
    // from the previous release's image.
    docker(&["rm", "-f", handle(&a2)]);
    let t3 = w.target(&w.config(Some(&v3)), "v3");
    let a3 = d3.activate(&t3).unwrap();
    assert_eq!(a3.port, Some(port_a), "no container runs: the first port");
    let t2 = w.target(&w.config(Some(&v2)), "v2");
    let back = Docker::new(w.config(Some(&v2)), bridge())
        .restore(&t2, &a3)
        .unwrap();
    assert!(inspect(handle(&a3)).is_none());
    assert_eq!(back.port, Some(port_a));
    assert!(back.detail.contains("recreated"), "{}", back.detail);
    assert_eq!(wait_for(port_a, "/api/health", 200), "ok v2\n");

    // A stopped previous container is started again.
    docker(&["stop", "-t", "1", handle(&back)]);
    let again = Docker::new(w.config(Some(&v2)), bridge())
        .restore(&t2, &Activation::default())
        .unwrap();
    assert_eq!(again.handle, back.handle);
    assert_eq!(wait_for(port_a, "/api/health", 200), "ok v2\n");
}

#[test]
fn image_archive_is_loaded_from_the_release() {
    let mut w = World::new("archive");
    let tag = w.image("vx", true);
    let mut config = w.config(None);
    config.image_archive = Some(PathBuf::from("image.tar"));
    let target = w.target(&config, "vx");
    let archive = target.release_dir.join("image.tar");
    docker(&["save", "-o", archive.to_str().unwrap(), &tag]);
    docker(&["rmi", &tag]);

    let driver = Docker::new(config.clone(), bridge());
    let a = driver.activate(&target).unwrap();
    assert_eq!(wait_for(a.port.unwrap(), "/api/health", 200), "ok vx\n");
    let c = inspect(handle(&a)).unwrap();
    // The container runs the release's own tag of the loaded image.
    let release_tag = format!("slipway/{}:vx", w.app.to_ascii_lowercase());
    assert_eq!(
        c.config.unwrap().image.as_deref(),
        Some(release_tag.as_str())
    );
    assert!(
        !docker(&["images", "-q", &tag]).is_empty(),
        "loaded image tag kept"
    );

    // A release without its archive: the error names the file.
    let mut missing = config.clone();
    missing.image_archive = Some(PathBuf::from("nope.tar"));
    let err = Docker::new(missing, bridge())
        .activate(&target)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.tar"), "{err}");

    // A local image that is not there is never pulled.
    let err = Docker::new(w.config(Some("slipway-test-absent:nothing")), bridge())
        .activate(&target)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("\"slipway-test-absent:nothing\" is not on this node"),
        "{err}"
    );
}

#[test]
fn env_and_limits_reach_the_container_but_not_status() {
    let mut w = World::new("env");
    let image = w.image("v1", true);
    let secret = format!("s3cr3t-{}", std::process::id());
    fs::write(
        w.root().join("shared/.env"),
        format!("SECRET={secret}\nexport GREETING=\"hello world\"\n"),
    )
    .unwrap();
    let config = w.config(Some(&image));
    let target = w.target(&config, "v1");
    let driver = Docker::new(config, bridge());
    let a = driver.activate(&target).unwrap();
    wait_for(a.port.unwrap(), "/api/health", 200);

    let c = inspect(handle(&a)).unwrap();
    let env = c.config.as_ref().unwrap().env.clone().unwrap();
    for want in [
        format!("SECRET={secret}"),
        "GREETING=hello world".to_owned(),
        format!("SLIPWAY_APP={}", w.app),
        "SLIPWAY_RELEASE=v1".to_owned(),
    ] {
        assert!(env.contains(&want), "{want} not in the container env");
    }
    let host = c.host_config.as_ref().unwrap();
    assert_eq!(host.memory, Some(64 * 1024 * 1024));
    let log = host.log_config.as_ref().unwrap();
    assert_eq!(log.typ.as_deref(), Some("json-file"));
    let opts = log.config.as_ref().unwrap();
    assert_eq!(opts.get("max-size").map(String::as_str), Some("1048576"));
    assert_eq!(opts.get("max-file").map(String::as_str), Some("3"));
    assert_eq!(host.nano_cpus, Some(500_000_000));
    let policy = host.restart_policy.as_ref().unwrap();
    assert_eq!(policy.name, Some(RestartPolicyNameEnum::UNLESS_STOPPED));
    let binding = &host.port_bindings.as_ref().unwrap()["3000/tcp"]
        .as_ref()
        .unwrap()[0];
    assert_eq!(binding.host_ip.as_deref(), Some("127.0.0.1"));
    assert_eq!(binding.host_port, a.port.map(|p| p.to_string()));

    let status = driver.status(&target.app).unwrap();
    let json = serde_json::to_string(&status).unwrap();
    assert!(!json.contains(&secret), "status shows the secret: {json}");
    assert!(
        !json.contains("hello world"),
        "status shows an env value: {json}"
    );
    assert_eq!(status.processes.len(), 1, "{json}");
    // Stats come from one bounded call; busybox uses well under the limit.
    let mem = status.processes[0].memory_bytes;
    assert!(mem.is_some_and(|m| m < 64 * 1024 * 1024), "{json}");
}

#[test]
fn a_taken_port_fails_the_activation_and_leaves_nothing() {
    let mut w = World::new("portbusy");
    let image = w.image("v1", true);
    // Someone else (not a container) holds the first port of the pair.
    let _holder = TcpListener::bind(("127.0.0.1", w.ports[0])).unwrap();
    let config = w.config(Some(&image));
    let target = w.target(&config, "v1");
    let err = Docker::new(config, bridge())
        .activate(&target)
        .unwrap_err()
        .to_string();
    let want = format!(
        "docker: cannot start container {} on 127.0.0.1:{}: ",
        container_name(&w.app, &target.release),
        w.ports[0]
    );
    assert!(err.starts_with(&want), "{err}");
    // The engine's own words follow (they vary across versions).
    assert!(err.len() > want.len() + 10, "{err}");
    assert!(
        container_names(&w.app).is_empty(),
        "a failed container was left behind"
    );
}

/// Settings for tests that never reach a container.
fn config_without_engine(socket: PathBuf) -> DockerConfig {
    DockerConfig {
        image: Some("web:v1".into()),
        image_archive: None,
        container_port: 3000,
        ports: [8080, 8081],
        host_ip: "127.0.0.1".into(),
        memory_bytes: None,
        cpus: None,
        restart: "no".into(),
        socket,
        command: Vec::new(),
        stop_grace: Duration::from_secs(1),
        log_max_size: 1 << 20,
        log_max_file: 3,
    }
}

#[test]
fn unreachable_socket_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let app = AppConfig::with_defaults("web", dir.path().join("app"));
    fs::create_dir_all(dir.path().join("app/releases/v1")).unwrap();
    let target = Target::new(&app, &ReleaseId::new("v1").unwrap()).unwrap();
    let plain_file = dir.path().join("not-a-socket");
    fs::write(&plain_file, "").unwrap();
    for (socket, why) in [
        (dir.path().join("missing.sock"), "no such socket"),
        (plain_file, "connection refused"),
    ] {
        let driver = Docker::new(config_without_engine(socket.clone()), bridge());
        let want = format!(
            "docker: cannot reach the docker engine at {}: {why}",
            socket.display()
        );
        let err = driver.activate(&target).unwrap_err().to_string();
        assert!(err.starts_with(&want), "{err}");
        let err = driver.status(&app).unwrap_err().to_string();
        assert!(err.starts_with(&want), "{err}");
    }
}

/// `slipway-agent run` calls the driver on the blocking threads of its
/// multi-thread runtime (spawn_blocking), where a runtime handle is entered:
/// with that runtime's handle as its bridge, the driver deploys there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_on_the_blocking_threads_of_the_daemon_runtime() {
    let mut w = World::new("blocking");
    let v1 = w.image("v1", true);
    let config = w.config(Some(&v1));
    let target = w.target(&config, "v1");
    let app = w.app_config(&config);
    let driver = Docker::new(config, Bridge::current());
    let (a, status) = tokio::task::spawn_blocking(move || {
        let a = driver.activate(&target).unwrap();
        driver.commit(&target, &a).unwrap();
        let status = driver.status(&app).unwrap();
        driver
            .prune_images(&app, std::slice::from_ref(&target.release))
            .unwrap();
        (a, status)
    })
    .await
    .unwrap();
    assert_eq!(status.processes.len(), 1, "{status:?}");
    let port = a.port.unwrap();
    let body = tokio::task::spawn_blocking(move || wait_for(port, "/api/health", 200))
        .await
        .unwrap();
    assert_eq!(body, "ok v1\n");
}
