//! The docker driver: one container per release through the Docker Engine
//! API (bollard over the unix socket), blue/green across a host port pair.
//!
//! `activate` starts `slipway-<app>-<release>` on the port of the pair the
//! running container does not use and leaves the old container serving, so
//! the health gate probes the new one while users still reach the old one.
//! `commit` then stops and removes the old container; `restore` removes the
//! new one instead and makes sure the previous release's container runs,
//! recreating it when it is gone. Images are never removed: the previous
//! release's image stays for rollback.
//!
//! Containers are found by label, so names the operator gives by hand never
//! confuse the driver:
//! - `slipway.app`: the app name;
//! - `slipway.release`: the release id;
//! - `slipway.port`: the host port of the pair it was given.
//!
//! The [`Driver`] trait is synchronous: every call blocks on the Engine API
//! through the [`Bridge`] the driver was built with (the daemon's runtime
//! handle under `slipway-agent run`, a runtime of the one-shot command's
//! own otherwise). Call it from a blocking thread (`spawn_blocking`), never
//! from async code. One driver keeps one engine client: it connects (and
//! negotiates the API version) on its first call, not on every call.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use bollard::errors::Error as ApiError;
use bollard::models::{
    ContainerCreateBody, ContainerStateStatusEnum, ContainerStatsResponse, ContainerSummary,
    HostConfig, HostConfigLogConfig, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{
    CreateContainerOptions, ImportImageOptions, InspectContainerOptions, ListContainersOptions,
    ListImagesOptions, RemoveContainerOptions, RemoveImageOptions, RenameContainerOptions,
    StartContainerOptions, StatsOptions, StopContainerOptions, TagImageOptions,
};
use futures_util::StreamExt;
use tokio::io::AsyncReadExt;

use super::{Activation, Driver, DriverError, DriverStatus, ProcessInfo, Target};
use crate::bridge::Bridge;
use crate::config::{AppConfig, DockerConfig};
use crate::release::ReleaseId;

const DRIVER: &str = "docker";

/// Label holding the app name: how the driver finds an app's containers.
pub const LABEL_APP: &str = "slipway.app";
/// Label holding the release id a container runs.
pub const LABEL_RELEASE: &str = "slipway.release";
/// Label holding the host port (of the pair) a container publishes.
pub const LABEL_PORT: &str = "slipway.port";

/// Bound on one API request until the engine answers (bollard's timeout).
const API_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on the first request, which also tells whether the engine is there.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Extra time beyond `stop_grace` for the engine to answer a stop.
const STOP_SLACK: Duration = Duration::from_secs(30);
/// Bound on loading an image archive (upload and unpack of a large image).
const LOAD_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a started container may take to be `running`.
const START_WAIT: Duration = Duration::from_secs(30);
/// Bound on one stats sample in `status`: the engine takes about a second to
/// measure CPU use; past this the numbers are left out.
const STATS_TIMEOUT: Duration = Duration::from_secs(5);
/// Time between state polls while waiting for `running`.
const POLL: Duration = Duration::from_millis(100);
/// Read size when streaming an image archive to the engine.
const CHUNK: usize = 256 * 1024;

/// Runs each release in its own container.
#[derive(Debug)]
pub struct Docker {
    config: DockerConfig,
    /// The runtime the engine client runs on (see the module docs).
    bridge: Bridge,
    /// The version-negotiated engine client, made by the first call: its
    /// connections live on `bridge`'s runtime, so it is never shared across
    /// bridges. A failed connect is not kept; the next call tries again.
    api: tokio::sync::OnceCell<bollard::Docker>,
}

impl Docker {
    pub fn new(config: DockerConfig, bridge: Bridge) -> Self {
        Self {
            config,
            bridge,
            api: tokio::sync::OnceCell::new(),
        }
    }

    /// Runs `work` against the engine, blocking on the driver's bridge.
    fn run<'a, T, F, Fut>(&'a self, work: F) -> Result<T, DriverError>
    where
        F: FnOnce(Engine<'a>) -> Fut,
        Fut: Future<Output = Result<T, DriverError>>,
    {
        self.bridge.block_on(async {
            let api = self
                .api
                .get_or_try_init(|| Engine::connect(&self.config))
                .await?;
            work(Engine {
                api,
                config: &self.config,
            })
            .await
        })
    }
}

impl Driver for Docker {
    fn name(&self) -> &'static str {
        DRIVER
    }

    fn activate(&self, target: &Target) -> Result<Activation, DriverError> {
        self.run(|engine| async move { engine.activate(target).await })
    }

    fn commit(&self, target: &Target, activation: &Activation) -> Result<(), DriverError> {
        self.run(|engine| async move { engine.commit(target, activation).await })
    }

    fn restore(&self, previous: &Target, failed: &Activation) -> Result<Activation, DriverError> {
        self.run(|engine| async move { engine.restore(previous, failed).await })
    }

    fn drift(&self, target: &Target, port: Option<u16>) -> Result<Option<String>, DriverError> {
        self.run(|engine| async move { engine.drift(target, port).await })
    }

    fn repair(&self, target: &Target, port: Option<u16>) -> Result<Activation, DriverError> {
        self.run(|engine| async move { engine.repair(target, port).await })
    }

    fn cut_short(&self, target: &Target, port: Option<u16>) -> Result<bool, DriverError> {
        self.run(|engine| async move {
            let containers = engine.containers(&target.app.name).await?;
            Ok(restart_cut_short(&containers, target, port))
        })
    }

    fn stop(&self, app: &AppConfig) -> Result<(), DriverError> {
        self.run(|engine| async move {
            for c in engine.containers(&app.name).await? {
                engine.retire(&c).await?;
            }
            Ok(())
        })
    }

    fn prune_images(&self, app: &AppConfig, keep: &[ReleaseId]) -> Result<u64, DriverError> {
        let keep: Vec<String> = keep.iter().map(ToString::to_string).collect();
        self.run(|d| async move { d.prune_images(&app.name, &keep).await })
    }

    fn status(&self, app: &AppConfig) -> Result<DriverStatus, DriverError> {
        self.run(|engine| async move { engine.status(&app.name).await })
    }
}

fn failed(message: impl Into<String>) -> DriverError {
    DriverError::failed(DRIVER, message)
}

/// The repository under which release images of `app` are tagged.
pub fn release_repo(app: &str) -> String {
    format!("slipway/{}", app.to_ascii_lowercase())
}

/// `slipway-<app>-<release>`: one container per release, recognisable in
/// `docker ps`.
pub fn container_name(app: &str, release: &ReleaseId) -> String {
    format!("slipway-{app}-{release}")
}

/// A restart of `target`'s release behind the front cut short: the
/// container that served stepped aside and still holds the recorded `port`,
/// and its replacement exists under the release's own name.
fn restart_cut_short(containers: &[Container], target: &Target, port: Option<u16>) -> bool {
    let name = container_name(&target.app.name, &target.release);
    let aside = aside_name(&target.app.name, &target.release);
    port.is_some()
        && containers.iter().any(|c| c.name == name)
        && containers
            .iter()
            .any(|c| c.name == aside && c.is_live() && c.port == port)
}

/// The name a release's serving container steps aside to while a new
/// container of the same release (a restart behind the front) passes its
/// gate on the other port; it goes at the commit, or takes its name back
/// when the new one fails.
pub fn aside_name(app: &str, release: &ReleaseId) -> String {
    format!("{}-aside", container_name(app, release))
}

/// One container of the app, as the driver needs it.
#[derive(Debug, Clone, PartialEq)]
struct Container {
    id: String,
    name: String,
    release: Option<String>,
    port: Option<u16>,
    /// The engine's word: created, running, restarting, paused, exited…
    state: String,
    image: String,
    /// The host addresses its port is published on (empty when it
    /// publishes none right now: stopped).
    host_ips: Vec<String>,
}

impl Container {
    fn from_summary(s: ContainerSummary) -> Option<Self> {
        let id = s.id?;
        let labels = s.labels.unwrap_or_default();
        let name = s
            .names
            .unwrap_or_default()
            .first()
            .map(|n| n.trim_start_matches('/').to_owned())
            .unwrap_or_else(|| id.chars().take(12).collect());
        Some(Self {
            release: labels.get(LABEL_RELEASE).cloned(),
            port: labels.get(LABEL_PORT).and_then(|p| p.parse().ok()),
            state: s.state.map(|st| st.to_string()).unwrap_or_default(),
            image: s.image.unwrap_or_default(),
            host_ips: s
                .ports
                .unwrap_or_default()
                .into_iter()
                .filter(|p| p.public_port.is_some())
                .filter_map(|p| p.ip)
                .collect(),
            id,
            name,
        })
    }

    /// Whether its port is published on `host_ip` (`0.0.0.0` covers the
    /// IPv6 wildcard the engine adds beside it); a container publishing
    /// nothing right now is not told apart.
    fn published_on(&self, host_ip: &str) -> bool {
        let any = |ip: &str| ip == "0.0.0.0" || ip == "::";
        self.host_ips.is_empty()
            || self
                .host_ips
                .iter()
                .all(|ip| ip == host_ip || (any(ip) && any(host_ip)))
    }

    /// Not running and never will again by itself: safe to remove at once.
    fn is_stale(&self) -> bool {
        matches!(self.state.as_str(), "created" | "exited" | "dead")
    }

    /// Holds (or is about to hold again) its host port.
    fn is_live(&self) -> bool {
        !self.is_stale() && self.state != "removing"
    }

    /// `handle` is an Activation handle: the full id, or a name.
    fn is(&self, handle: &str) -> bool {
        self.id == handle
            || self.name == handle
            || (handle.len() >= 12 && self.id.starts_with(handle))
    }
}

/// The host port for a new container: the port of the pair the live
/// containers do not use (the first one when none runs).
fn pick_port(pair: [u16; 2], live: &[Container]) -> Result<u16, String> {
    let used = |p: u16| live.iter().any(|c| c.port == Some(p));
    if !used(pair[0]) {
        Ok(pair[0])
    } else if !used(pair[1]) {
        Ok(pair[1])
    } else {
        let names: Vec<&str> = live.iter().map(|c| c.name.as_str()).collect();
        Err(format!(
            "both host ports {} and {} are taken by containers {}: a deploy was neither \
             committed nor restored; stop the app or remove one of them",
            pair[0],
            pair[1],
            names.join(", ")
        ))
    }
}

/// Image references from an image load's output lines: `Loaded image:
/// name:tag`, or `Loaded image ID: sha256:…` for an untagged image.
fn loaded_references(output: &str) -> Vec<String> {
    output
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            line.strip_prefix("Loaded image ID:")
                .or_else(|| line.strip_prefix("Loaded image:"))
                .map(|r| r.trim().to_owned())
        })
        .filter(|r| !r.is_empty())
        .collect()
}

/// A stop grace in the whole seconds the Engine API takes, rounded up.
fn grace_secs(grace: Duration) -> u64 {
    grace.as_secs() + u64::from(grace.subsec_nanos() > 0)
}

/// Whether the engine restarts a container that exited with `exit_code`
/// under restart policy `policy`.
fn will_restart(policy: &str, exit_code: i64) -> bool {
    match policy {
        "always" | "unless-stopped" => true,
        "on-failure" => exit_code != 0,
        _ => false,
    }
}

/// CPU use between the two samples of a stats answer, as `docker stats`
/// computes it (100% = one core).
fn cpu_percent(stats: &ContainerStatsResponse) -> Option<f64> {
    let cpu = stats.cpu_stats.as_ref()?;
    let pre = stats.precpu_stats.as_ref()?;
    let total = cpu.cpu_usage.as_ref()?.total_usage?;
    let pre_total = pre.cpu_usage.as_ref()?.total_usage?;
    let system = cpu.system_cpu_usage?;
    let pre_system = pre.system_cpu_usage?;
    let cpus = cpu.online_cpus.map(u64::from).or_else(|| {
        cpu.cpu_usage
            .as_ref()?
            .percpu_usage
            .as_ref()
            .map(|v| v.len() as u64)
    })?;
    let cpu_delta = total.checked_sub(pre_total)? as f64;
    let system_delta = system.checked_sub(pre_system)? as f64;
    (system_delta > 0.0).then(|| cpu_delta / system_delta * cpus as f64 * 100.0)
}

/// Memory in use without the page cache, as `docker stats` shows it.
fn memory_used(stats: &ContainerStatsResponse) -> Option<u64> {
    let mem = stats.memory_stats.as_ref()?;
    let usage = mem.usage?;
    let cache = mem.stats.as_ref().and_then(|s| {
        // cgroup v1 names it total_inactive_file, v2 inactive_file.
        s.get("total_inactive_file")
            .or_else(|| s.get("inactive_file"))
            .copied()
    });
    Some(match cache {
        Some(c) if c < usage => usage - c,
        _ => usage,
    })
}

/// Seconds since `started_at` (RFC 3339, as the engine gives it).
fn uptime_secs(started_at: &str) -> Option<u64> {
    let started =
        time::OffsetDateTime::parse(started_at, &time::format_description::well_known::Rfc3339)
            .ok()?;
    let secs = (time::OffsetDateTime::now_utc() - started).whole_seconds();
    u64::try_from(secs).ok()
}

/// The innermost cause of a transport error, lowercased: hyper's "client
/// error (Connect)" only wraps the "connection refused" that explains it.
fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cause = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    let text = cause.to_string();
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => text,
    }
}

fn is_status(e: &ApiError, code: u16) -> bool {
    matches!(e, ApiError::DockerResponseServerError { status_code, .. } if *status_code == code)
}

/// A connected, version-negotiated engine client and the driver's settings.
struct Engine<'a> {
    api: &'a bollard::Docker,
    config: &'a DockerConfig,
}

impl<'a> Engine<'a> {
    /// A client of the engine at the configured socket, speaking its API
    /// version.
    async fn connect(config: &DockerConfig) -> Result<bollard::Docker, DriverError> {
        let socket = &config.socket;
        let unreachable = |why: &dyn fmt::Display| {
            failed(format!(
                "cannot reach the docker engine at {}: {why}",
                socket.display()
            ))
        };
        let path = socket
            .to_str()
            .ok_or_else(|| unreachable(&"the socket path is not utf-8"))?;
        // A stop waits up to stop_grace before the engine answers.
        let timeout = API_TIMEOUT.max(config.stop_grace + STOP_SLACK);
        let api = bollard::Docker::connect_with_unix(
            path,
            timeout.as_secs(),
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(|e| match e {
            ApiError::SocketNotFoundError(_) => unreachable(&"no such socket"),
            e => unreachable(&root_cause(&e)),
        })?;
        // Talk the engine's API version when it is older than bollard's
        // (Debian 12's docker.io speaks 1.41); this is also the reachability
        // check.
        let api = tokio::time::timeout(CONNECT_TIMEOUT, api.negotiate_version())
            .await
            .map_err(|_| {
                unreachable(&format_args!(
                    "no answer within {}s",
                    CONNECT_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| unreachable(&root_cause(&e)))?;
        Ok(api)
    }

    /// `what: <the engine's message>`; transport failures say the engine is
    /// unreachable.
    fn err(&self, what: impl fmt::Display, e: ApiError) -> DriverError {
        match e {
            ApiError::DockerResponseServerError { message, .. } => {
                failed(format!("{what}: {}", message.trim()))
            }
            ApiError::DockerStreamError { error } => failed(format!("{what}: {}", error.trim())),
            ApiError::RequestTimeoutError => failed(format!(
                "{what}: the docker engine at {} did not answer in time",
                self.config.socket.display()
            )),
            ApiError::HyperLegacyError { .. }
            | ApiError::HyperResponseError { .. }
            | ApiError::IOError { .. }
            | ApiError::SocketNotFoundError(_) => failed(format!(
                "{what}: cannot reach the docker engine at {}: {}",
                self.config.socket.display(),
                root_cause(&e)
            )),
            e => failed(format!("{what}: {}", crate::error::error_chain(&e))),
        }
    }

    async fn activate(&self, target: &Target) -> Result<Activation, DriverError> {
        let image = self.image_for(target).await?;
        let image = self.tag_release(&image, target).await?;
        let name = container_name(&target.app.name, &target.release);
        let mut live = Vec::new();
        for c in self.containers(&target.app.name).await? {
            if c.is_stale() {
                self.retire(&c).await?;
            } else if c.name == name && c.is_live() && target.app.listen.is_some() {
                // The same release again (a restart, a retried deploy)
                // behind the front: the serving container keeps serving
                // under another name until the new one, on the other port,
                // passed its gate and the front moved to it.
                let aside = aside_name(&target.app.name, &target.release);
                self.rename(&c, &aside).await?;
                tracing::info!(container = %c.name, %aside, "the serving container of the same release steps aside until its replacement is healthy");
                live.push(c);
            } else if c.name == name {
                // The same release again (a retried deploy): the container is
                // replaced, not reused, so it gets this deploy's env and
                // settings. If it was the one serving, this is a short gap
                // (with `listen`, the front avoids it: above).
                tracing::warn!(container = %c.name, "replacing the running container of the same release");
                self.retire(&c).await?;
            } else if c.is_live() {
                live.push(c);
            }
        }
        let port = pick_port(self.config.ports, &live).map_err(failed)?;
        let id = self.launch(target, &image, &name, port).await?;
        tracing::info!(container = %name, port, image = %image, "container started");
        Ok(Activation {
            port: Some(port),
            handle: Some(id),
            detail: format!("container {name} on port {port}"),
        })
    }

    async fn commit(&self, target: &Target, activation: &Activation) -> Result<(), DriverError> {
        let name = container_name(&target.app.name, &target.release);
        let keep = activation.handle.as_deref().unwrap_or(&name);
        let containers = self.containers(&target.app.name).await?;
        if !containers.iter().any(|c| c.is(keep)) {
            // Removing the others now would leave the app with nothing.
            return Err(failed(format!(
                "container {keep} of release {} is gone; no container was removed",
                target.release
            )));
        }
        for c in containers.iter().filter(|c| !c.is(keep)) {
            self.retire(c).await?;
        }
        Ok(())
    }

    async fn restore(
        &self,
        previous: &Target,
        failed_activation: &Activation,
    ) -> Result<Activation, DriverError> {
        let name = container_name(&previous.app.name, &previous.release);
        let aside = aside_name(&previous.app.name, &previous.release);
        let containers = self.containers(&previous.app.name).await?;
        // After a restore only the previous release runs, as after a commit:
        // every other container of the app goes, the failed one included
        // (the deploy may pass no handle when activation itself failed).
        // One that stepped aside for a restart of its release is the one
        // to keep (it still serves), under its own name again.
        let mut kept: Option<Container> = None;
        for c in containers {
            let mine = (c.name == name || c.name == aside)
                && failed_activation.handle.as_deref().is_none_or(|h| !c.is(h));
            match kept.take() {
                Some(k) if mine && c.is_live() && !k.is_live() => {
                    self.retire(&k).await?;
                    kept = Some(c);
                }
                Some(k) => {
                    kept = Some(k);
                    self.retire(&c).await?;
                }
                None if mine => kept = Some(c),
                None => self.retire(&c).await?,
            }
        }
        if let Some(c) = kept.as_mut().filter(|c| c.name == aside) {
            self.rename(c, &name).await?;
            c.name = name.clone();
        }
        // A stopped one published as the config no longer says (`listen`
        // added or removed since it was made): the engine would bind its
        // old address again on start, so it is made afresh below.
        if let Some(c) = kept.take() {
            if c.is_live() || c.published_on(&self.config.host_ip) {
                kept = Some(c);
            } else {
                tracing::info!(container = %c.name, "stopped container publishes on {}, not on host_ip {}: made afresh", c.host_ips.join(", "), self.config.host_ip);
                self.retire(&c).await?;
            }
        }
        match kept {
            Some(c) if c.is_live() => Ok(Activation {
                port: c.port,
                detail: format!("container {} on port {} kept", c.name, port_text(c.port)),
                handle: Some(c.id),
            }),
            Some(c) => {
                // Stopped (by hand, or a crash without restart policy): the
                // engine binds the same host port again on start.
                let port = c.port.unwrap_or(self.config.ports[0]);
                self.start(&c.id, &c.name, port).await?;
                Ok(Activation {
                    port: c.port,
                    detail: format!(
                        "container {} on port {} restarted",
                        c.name,
                        port_text(c.port)
                    ),
                    handle: Some(c.id),
                })
            }
            None => {
                let image = self.image_for(previous).await?;
                let port = pick_port(self.config.ports, &[]).map_err(failed)?;
                let id = self.launch(previous, &image, &name, port).await?;
                Ok(Activation {
                    port: Some(port),
                    handle: Some(id),
                    detail: format!("container {name} on port {port} recreated"),
                })
            }
        }
    }

    /// What differs from "the container of `target`'s release runs, on
    /// `port`, alone".
    async fn drift(
        &self,
        target: &Target,
        port: Option<u16>,
    ) -> Result<Option<String>, DriverError> {
        let name = container_name(&target.app.name, &target.release);
        let containers = self.containers(&target.app.name).await?;
        let mut problems = Vec::new();
        match containers.iter().find(|c| c.name == name) {
            None => problems.push(format!("container {name} is gone (`docker rm`?)")),
            Some(c) if c.state != "running" => problems.push(format!(
                "container {name} is {} (dockerd restarted, or `docker stop`?)",
                c.state
            )),
            Some(c) if port.is_some() && c.port != port => problems.push(format!(
                "container {name} is on port {}, not the live port {}",
                port_text(c.port),
                port_text(port)
            )),
            Some(c) if !c.published_on(&self.config.host_ip) => problems.push(format!(
                "container {name} publishes its port on {}, not on host_ip {} (listen added or removed?)",
                c.host_ips.join(", "),
                self.config.host_ip
            )),
            Some(_) => {}
        }
        for c in containers.iter().filter(|c| c.name != name && c.is_live()) {
            problems.push(format!(
                "container {} of release {} is still live",
                c.name,
                c.release.as_deref().unwrap_or("?")
            ));
        }
        Ok((!problems.is_empty()).then(|| problems.join("; ")))
    }

    /// Brings `target`'s container back: started again when it is only
    /// stopped (the engine binds its port again), recreated on the live
    /// `port` when it is gone (or on the free port of the pair when another
    /// container holds it). Other containers go at the commit.
    async fn repair(&self, target: &Target, port: Option<u16>) -> Result<Activation, DriverError> {
        let name = container_name(&target.app.name, &target.release);
        let containers = self.containers(&target.app.name).await?;
        let mine = containers.iter().find(|c| c.name == name);
        // A restart behind the front cut short (the agent killed between
        // the new container's start and the commit): the one that served
        // stepped aside and still holds the recorded port, the new one runs
        // on the other. The new one is kept: the deploy's switch moves the
        // front to it (if it had not yet) and drains the aside, which the
        // commit then retires — retiring the new one could cut connections
        // the front already sent it.
        let restart_cut_short = restart_cut_short(&containers, target, port);
        if let Some(c) = mine {
            let published = c.published_on(&self.config.host_ip);
            if c.state == "running"
                && (port.is_none() || c.port == port || restart_cut_short)
                && published
            {
                return Ok(Activation {
                    port: c.port,
                    handle: Some(c.id.clone()),
                    detail: format!("container {name} on port {} kept", port_text(c.port)),
                });
            }
            if c.is_stale() && (port.is_none() || c.port == port) && published {
                let p = c.port.unwrap_or(self.config.ports[0]);
                self.start(&c.id, &c.name, p).await?;
                return Ok(Activation {
                    port: Some(p),
                    handle: Some(c.id.clone()),
                    detail: format!("container {name} on port {p} started again"),
                });
            }
            self.retire(c).await?;
        }
        let image = self.image_for(target).await?;
        let image = self.tag_release(&image, target).await?;
        let live: Vec<Container> = containers
            .into_iter()
            .filter(|c| c.name != name && c.is_live())
            .collect();
        let p = match port {
            Some(p)
                if self.config.ports.contains(&p) && !live.iter().any(|c| c.port == Some(p)) =>
            {
                p
            }
            _ => pick_port(self.config.ports, &live).map_err(failed)?,
        };
        let id = self.launch(target, &image, &name, p).await?;
        Ok(Activation {
            port: Some(p),
            handle: Some(id),
            detail: format!("container {name} on port {p} recreated"),
        })
    }

    /// Creates and starts the container `name` of `target` on `port`;
    /// returns its id. One that fails to start is removed: nothing
    /// half-made is left behind (what served before still serves).
    async fn launch(
        &self,
        target: &Target,
        image: &str,
        name: &str,
        port: u16,
    ) -> Result<String, DriverError> {
        let id = self.create(target, image, name, port).await?;
        if let Err(e) = self.start(&id, name, port).await {
            if let Err(cleanup) = self.remove(&id, name).await {
                tracing::warn!(container = %name, error = %cleanup, "cannot remove the container that failed to start");
            }
            return Err(e);
        }
        Ok(id)
    }

    async fn status(&self, app: &str) -> Result<DriverStatus, DriverError> {
        let containers = self.containers(app).await?;
        let mut notes = Vec::new();
        let live = containers.iter().filter(|c| c.is_live()).count();
        if live > 1 {
            notes.push(format!(
                "{live} containers are live: a deploy was neither committed nor restored"
            ));
        }
        // Stats take about a second each on the engine's side: all at once.
        let stats = futures_util::future::join_all(containers.iter().map(|c| async move {
            if c.state == "running" {
                self.stats(&c.id).await
            } else {
                None
            }
        }))
        .await;
        let mut processes = Vec::new();
        for (c, stats) in containers.iter().zip(stats) {
            let inspect = match self
                .api
                .inspect_container(&c.id, None::<InspectContainerOptions>)
                .await
            {
                Ok(i) => i,
                // Removed between the list and now.
                Err(e) if is_status(&e, 404) => continue,
                Err(e) => {
                    return Err(self.err(format_args!("cannot inspect container {}", c.name), e))
                }
            };
            let state = inspect.state.unwrap_or_default();
            let running = state.status == Some(ContainerStateStatusEnum::RUNNING);
            processes.push(ProcessInfo {
                name: c.name.clone(),
                pid: state
                    .pid
                    .filter(|p| *p > 0)
                    .and_then(|p| u32::try_from(p).ok()),
                status: state
                    .status
                    .map_or_else(|| c.state.clone(), |s| s.to_string()),
                restarts: inspect
                    .restart_count
                    .and_then(|n| u64::try_from(n).ok())
                    .unwrap_or(0),
                // A deploy starts a new container: no reloads.
                reloads: 0,
                memory_bytes: stats.as_ref().and_then(memory_used),
                cpu_percent: stats.as_ref().and_then(cpu_percent),
                uptime_secs: if running {
                    state.started_at.as_deref().and_then(uptime_secs)
                } else {
                    None
                },
                release: c.release.clone(),
            });
            // Image and port only: the container's Config.Env holds secrets.
            notes.push(format!(
                "{}: image {}, host port {}",
                c.name,
                c.image,
                port_text(c.port)
            ));
        }
        Ok(DriverStatus {
            driver: DRIVER.into(),
            processes,
            notes,
        })
    }

    /// The app's containers, in any state.
    async fn containers(&self, app: &str) -> Result<Vec<Container>, DriverError> {
        let filters = HashMap::from([("label".to_owned(), vec![format!("{LABEL_APP}={app}")])]);
        let list = self
            .api
            .list_containers(Some(ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            }))
            .await
            .map_err(|e| self.err(format_args!("cannot list the containers of app {app:?}"), e))?;
        Ok(list
            .into_iter()
            .filter_map(Container::from_summary)
            .collect())
    }

    /// The image reference to run `target` from: its loaded archive, or the
    /// configured local image.
    async fn image_for(&self, target: &Target) -> Result<String, DriverError> {
        if let Some(archive) = &self.config.image_archive {
            return self.load(&target.release_dir.join(archive)).await;
        }
        let image = self
            .config
            .image
            .as_deref()
            .ok_or_else(|| failed("neither image nor image_archive is configured"))?;
        match self.api.inspect_image(image).await {
            Ok(_) => Ok(image.to_owned()),
            Err(e) if is_status(&e, 404) => Err(failed(format!(
                "image {image:?} is not on this node and is never pulled (no registry is \
                 reachable): load it first, or ship it as image_archive in the release"
            ))),
            Err(e) => Err(self.err(format_args!("cannot inspect image {image:?}"), e)),
        }
    }

    /// Loads a `docker save` tarball, streaming it from disk, and returns
    /// the reference of the image it holds.
    async fn load(&self, path: &Path) -> Result<String, DriverError> {
        let shown = path.display();
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| failed(format!("cannot open image archive {shown}: {e}")))?;
        let body = futures_util::stream::unfold(Some(file), |file| async move {
            let mut file = file?;
            let mut buf = vec![0u8; CHUNK];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(buf), Some(file)))
                }
                // The error ends the upload; the engine then rejects the
                // truncated archive.
                Err(e) => Some((Err(e), None)),
            }
        })
        .map(|chunk: std::io::Result<Vec<u8>>| chunk.map(Into::into));
        // The engine reads the whole archive before it answers.
        let api = self.api.clone().with_timeout(LOAD_TIMEOUT);
        let options = ImportImageOptions {
            quiet: true,
            ..Default::default()
        };
        let what = format!("cannot load image archive {shown}");
        let output = tokio::time::timeout(LOAD_TIMEOUT, async {
            let mut stream = api.import_image_stream(options, body, None);
            let mut output = String::new();
            while let Some(item) = stream.next().await {
                let info = item.map_err(|e| self.err(&what, e))?;
                if let Some(text) = info.stream {
                    output.push_str(&text);
                    output.push('\n');
                }
            }
            Ok::<_, DriverError>(output)
        })
        .await
        .map_err(|_| {
            failed(format!(
                "{what}: not done within {}s",
                LOAD_TIMEOUT.as_secs()
            ))
        })??;
        let refs = loaded_references(&output);
        let mut ids: Vec<String> = Vec::new();
        for r in &refs {
            let image = self.api.inspect_image(r).await.map_err(|e| {
                self.err(
                    format_args!("cannot inspect image {r:?} loaded from {shown}"),
                    e,
                )
            })?;
            let id = image.id.unwrap_or_default();
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        match (refs.first(), ids.len()) {
            (Some(r), 1) => {
                tracing::info!(archive = %shown, image = %r, "image loaded");
                Ok(r.clone())
            }
            (None, _) => Err(failed(format!(
                "{what}: the engine reported no image (is it `docker save` output?)"
            ))),
            _ => Err(failed(format!(
                "{what}: it holds {} images ({}); it must hold one",
                ids.len(),
                refs.join(", ")
            ))),
        }
    }

    /// Tags `image` as `slipway/<app>:<release>`: the release's own name for
    /// its image, so pruning can tell which images belong to releases that
    /// are gone (and a rollback finds its image even if the source tag moved).
    async fn tag_release(&self, image: &str, target: &Target) -> Result<String, DriverError> {
        let repo = release_repo(&target.app.name);
        let options = TagImageOptions {
            repo: Some(repo.clone()),
            tag: Some(target.release.to_string()),
        };
        self.api
            .tag_image(image, Some(options))
            .await
            .map_err(|e| {
                self.err(
                    format_args!("cannot tag image {image:?} as {repo}:{}", target.release),
                    e,
                )
            })?;
        Ok(format!("{repo}:{}", target.release))
    }

    /// Removes the release tags of `app` whose release is not in `keep`,
    /// and the images left without a tag by that. Returns bytes freed (the
    /// engine's size of each image actually deleted).
    async fn prune_images(&self, app: &str, keep: &[String]) -> Result<u64, DriverError> {
        let repo = release_repo(app);
        let options = ListImagesOptions {
            filters: Some(HashMap::from([(
                "reference".to_owned(),
                vec![format!("{repo}:*")],
            )])),
            ..Default::default()
        };
        let images = self
            .api
            .list_images(Some(options))
            .await
            .map_err(|e| self.err("cannot list images", e))?;
        let mut freed = 0u64;
        let ours = |t: &String| t.starts_with(&format!("{repo}:"));
        for image in images {
            // A listing filtered by reference shows only the matching tags;
            // the image's other tags (the archive's own) come from inspect.
            let tags = match self.api.inspect_image(&image.id).await {
                Ok(i) => i.repo_tags.unwrap_or_default(),
                Err(e) if is_status(&e, 404) => continue,
                Err(e) => {
                    return Err(self.err(format_args!("cannot inspect image {}", image.id), e))
                }
            };
            let release_of = |t: &String| t.rsplit(':').next().unwrap_or("").to_owned();
            let in_use = tags.iter().any(|t| {
                (ours(t) && keep.contains(&release_of(t)))
                    || self.config.image.as_deref() == Some(t.as_str())
            });
            // An image a kept release (or the configured `image`) still
            // names only loses the tags of releases gone; any other image
            // loses all its tags (the archive's own tag too), which deletes
            // it unless a container still uses it.
            let doomed: Vec<&String> = if in_use {
                tags.iter()
                    .filter(|t| ours(t) && !keep.contains(&release_of(t)))
                    .collect()
            } else {
                tags.iter().collect()
            };
            let mut deleted = false;
            for tag in doomed {
                // Not forced: an image a container still uses stays.
                match self
                    .api
                    .remove_image(tag, None::<RemoveImageOptions>, None)
                    .await
                {
                    Ok(items) => deleted |= items.iter().any(|i| i.deleted.is_some()),
                    Err(e) if is_status(&e, 409) => {
                        tracing::info!(image = %tag, "image still in use; kept");
                        break;
                    }
                    Err(e) => return Err(self.err(format_args!("cannot remove image {tag}"), e)),
                }
            }
            if deleted {
                freed += u64::try_from(image.size).unwrap_or(0);
            }
        }
        Ok(freed)
    }

    async fn create(
        &self,
        target: &Target,
        image: &str,
        name: &str,
        port: u16,
    ) -> Result<String, DriverError> {
        let config = self.config;
        let restart = config
            .restart
            .parse::<RestartPolicyNameEnum>()
            .map_err(|_| {
                failed(format!(
                    "restart policy {:?} must be no, always, unless-stopped or on-failure",
                    config.restart
                ))
            })?;
        let memory = config
            .memory_bytes
            .map(|m| {
                i64::try_from(m).map_err(|_| failed(format!("memory limit {m} bytes is too large")))
            })
            .transpose()?;
        let nano_cpus = config.cpus.map(|c| (c * 1e9).round() as i64);
        let container_port = format!("{}/tcp", config.container_port);
        // `.env` first, Slipway's own last: the engine keeps the last of a
        // duplicated name, so SLIPWAY_* cannot be overridden by accident.
        let env = target
            .env
            .iter()
            .chain(target.slipway_env().iter())
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let labels = HashMap::from([
            (LABEL_APP.to_owned(), target.app.name.clone()),
            (LABEL_RELEASE.to_owned(), target.release.to_string()),
            (LABEL_PORT.to_owned(), port.to_string()),
        ]);
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            env: Some(env),
            labels: Some(labels),
            cmd: (!config.command.is_empty()).then(|| config.command.clone()),
            exposed_ports: Some(vec![container_port.clone()]),
            // The engine's own stops (`docker stop`, and dockerd stopping
            // every container when it shuts down) get stop_grace too, not
            // Docker's 10 s.
            stop_timeout: Some(i64::try_from(grace_secs(config.stop_grace)).unwrap_or(i64::MAX)),
            host_config: Some(HostConfig {
                port_bindings: Some(HashMap::from([(
                    container_port,
                    Some(vec![PortBinding {
                        host_ip: Some(config.host_ip.clone()),
                        host_port: Some(port.to_string()),
                    }]),
                )])),
                restart_policy: Some(RestartPolicy {
                    name: Some(restart),
                    maximum_retry_count: None,
                }),
                memory,
                nano_cpus,
                // Bounded container logs: the engine rotates them itself.
                log_config: Some(HostConfigLogConfig {
                    typ: Some("json-file".into()),
                    config: Some(HashMap::from([
                        ("max-size".to_owned(), config.log_max_size.to_string()),
                        ("max-file".to_owned(), config.log_max_file.to_string()),
                    ])),
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptions {
            name: Some(name.to_owned()),
            ..Default::default()
        };
        let created = self
            .api
            .create_container(Some(options), body)
            .await
            .map_err(|e| {
                self.err(
                    format_args!("cannot create container {name} from image {image:?}"),
                    e,
                )
            })?;
        for warning in &created.warnings {
            tracing::warn!(container = %name, %warning, "engine warning on create");
        }
        Ok(created.id)
    }

    /// Starts a container and waits until the engine says `running`.
    async fn start(&self, id: &str, name: &str, port: u16) -> Result<(), DriverError> {
        self.api
            .start_container(id, None::<StartContainerOptions>)
            .await
            .map_err(|e| {
                self.err(
                    format_args!(
                        "cannot start container {name} on {}:{port}",
                        self.config.host_ip
                    ),
                    e,
                )
            })?;
        let deadline = Instant::now() + START_WAIT;
        loop {
            let inspect = self
                .api
                .inspect_container(id, None::<InspectContainerOptions>)
                .await
                .map_err(|e| self.err(format_args!("cannot inspect container {name}"), e))?;
            let state = inspect.state.unwrap_or_default();
            let status = state.status.unwrap_or(ContainerStateStatusEnum::EMPTY);
            match status {
                ContainerStateStatusEnum::RUNNING => return Ok(()),
                ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD => {
                    let code = state.exit_code.unwrap_or(-1);
                    if !will_restart(&self.config.restart, code) {
                        let why = state.error.filter(|e| !e.is_empty());
                        return Err(failed(format!(
                            "container {name} exited with code {code}{}",
                            why.map(|w| format!(": {w}")).unwrap_or_default()
                        )));
                    }
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(failed(format!(
                    "container {name} is still {status} after {}s",
                    START_WAIT.as_secs()
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops (within stop_grace) and removes a container; one already gone
    /// is fine.
    async fn retire(&self, c: &Container) -> Result<(), DriverError> {
        if c.is_live() {
            let options = StopContainerOptions {
                t: Some(i32::try_from(grace_secs(self.config.stop_grace)).unwrap_or(i32::MAX)),
                ..Default::default()
            };
            match self.api.stop_container(&c.id, Some(options)).await {
                Ok(()) => {}
                Err(e) if is_status(&e, 404) => return Ok(()),
                Err(e) => return Err(self.err(format_args!("cannot stop container {}", c.name), e)),
            }
        }
        self.remove(&c.id, &c.name).await?;
        tracing::info!(container = %c.name, "container removed");
        Ok(())
    }

    /// Renames a container (it keeps running, its port and its labels).
    async fn rename(&self, c: &Container, to: &str) -> Result<(), DriverError> {
        let options = RenameContainerOptions {
            name: to.to_owned(),
        };
        self.api
            .rename_container(&c.id, options)
            .await
            .map_err(|e| {
                self.err(
                    format_args!("cannot rename container {} to {to}", c.name),
                    e,
                )
            })
    }

    async fn remove(&self, id: &str, name: &str) -> Result<(), DriverError> {
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        match self.api.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(self.err(format_args!("cannot remove container {name}"), e)),
        }
    }

    /// One stats answer (two samples a second apart, so CPU use is known),
    /// or nothing when the engine is slow or the container just stopped.
    async fn stats(&self, id: &str) -> Option<ContainerStatsResponse> {
        let options = StatsOptions {
            stream: false,
            one_shot: false,
        };
        let mut stream = self.api.stats(id, Some(options));
        match tokio::time::timeout(STATS_TIMEOUT, stream.next()).await {
            Ok(Some(Ok(stats))) => Some(stats),
            _ => None,
        }
    }
}

fn port_text(port: Option<u16>) -> String {
    port.map_or_else(|| "unknown".into(), |p| p.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(name: &str, port: u16) -> Container {
        Container {
            id: format!("{name}-id"),
            name: name.into(),
            release: None,
            port: Some(port),
            state: "running".into(),
            image: "img".into(),
            host_ips: Vec::new(),
        }
    }

    #[test]
    fn published_on_tells_loopback_from_the_wildcards() {
        let mut c = live("a", 8080);
        assert!(
            c.published_on("127.0.0.1"),
            "publishing nothing: not told apart"
        );
        c.host_ips = vec!["0.0.0.0".into(), "::".into()];
        assert!(c.published_on("0.0.0.0"));
        assert!(!c.published_on("127.0.0.1"));
        c.host_ips = vec!["127.0.0.1".into()];
        assert!(c.published_on("127.0.0.1"));
        assert!(!c.published_on("0.0.0.0"));
    }

    #[test]
    fn port_alternates_across_the_pair() {
        assert_eq!(pick_port([8080, 8081], &[]), Ok(8080));
        assert_eq!(pick_port([8080, 8081], &[live("a", 8080)]), Ok(8081));
        assert_eq!(pick_port([8080, 8081], &[live("a", 8081)]), Ok(8080));
        // A container from before the pair changed does not block it.
        assert_eq!(pick_port([8080, 8081], &[live("a", 9000)]), Ok(8080));
        let err = pick_port([8080, 8081], &[live("a", 8080), live("b", 8081)]).unwrap_err();
        assert!(
            err.contains("8080 and 8081") && err.contains("a, b"),
            "{err}"
        );
    }

    #[test]
    fn load_output_names_the_image() {
        assert_eq!(
            loaded_references("Loaded image: web:v2\n"),
            vec!["web:v2".to_owned()]
        );
        assert_eq!(
            loaded_references("Loaded image ID: sha256:abc\n\n"),
            vec!["sha256:abc".to_owned()]
        );
        assert!(loaded_references("something else\n").is_empty());
    }

    #[test]
    fn stop_grace_in_whole_seconds_rounds_up() {
        assert_eq!(grace_secs(Duration::ZERO), 0);
        assert_eq!(grace_secs(Duration::from_secs(1)), 1);
        assert_eq!(grace_secs(Duration::from_millis(1500)), 2);
    }

    #[test]
    fn restart_policies() {
        assert!(will_restart("always", 0));
        assert!(will_restart("unless-stopped", 1));
        assert!(will_restart("on-failure", 1));
        assert!(!will_restart("on-failure", 0));
        assert!(!will_restart("no", 1));
    }

    #[test]
    fn stale_and_live_states() {
        let mut c = live("a", 1);
        for (state, stale, is_live) in [
            ("running", false, true),
            ("restarting", false, true),
            ("paused", false, true),
            ("exited", true, false),
            ("created", true, false),
            ("dead", true, false),
            ("removing", false, false),
        ] {
            c.state = state.into();
            assert_eq!((c.is_stale(), c.is_live()), (stale, is_live), "{state}");
        }
        assert!(c.is("a-id") && c.is("a") && !c.is("b"));
    }

    #[test]
    fn uptime_from_engine_timestamps() {
        let now = time::OffsetDateTime::now_utc() - time::Duration::seconds(90);
        let text = now
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap();
        let up = uptime_secs(&text).unwrap();
        assert!((89..=92).contains(&up), "{up}");
        assert_eq!(uptime_secs("garbage"), None);
    }
}
