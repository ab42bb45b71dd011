//! Agent configuration: the TOML file that declares the apps on this node.
//!
//! The file is read in two steps, as the rest of the agent expects: serde
//! turns the text into a [`RawConfig`] that mirrors the file (unknown keys are
//! errors), then [`Config::new`] checks every value and gathers *all*
//! problems, each with the file, line and key, so an operator fixes the file
//! in one go.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use crate::listen::{ListenAddr, ListenMode};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::CertificateDer;
use serde::Deserialize;

/// Where the agent looks when neither `--config` nor `SLIPWAY_CONFIG` is given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/slipway/agent.toml";

/// Releases kept by `prune` when the app does not say (the seeds' "keep 5").
pub const DEFAULT_KEEP: usize = 5;
/// Failed and bad releases kept for inspection beyond the good ones.
pub const DEFAULT_KEEP_FAILED: usize = 2;
/// Refuse archives that would expand past this many bytes.
pub const DEFAULT_MAX_EXPANDED: u64 = 4 << 30;
/// Refuse archives with more entries than this (a zip-bomb of empty files).
pub const DEFAULT_MAX_ENTRIES: u64 = 1_000_000;
/// Free space that must remain on the app root's filesystem after unpacking.
pub const DEFAULT_FREE_SPACE_MARGIN: u64 = 256 << 20;
/// How long one hook command may run before it is killed.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(300);

/// One problem in the configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key path, e.g. `apps.web.keep`.
    pub key: String,
    /// 1-based line of the key in the file, when it could be located.
    pub line: Option<usize>,
    pub message: String,
}

/// Everything wrong with one configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render_problems(path, problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<ConfigProblem>,
    },
}

fn render_problems(path: &Path, problems: &[ConfigProblem]) -> String {
    let mut out = format!(
        "invalid config file {} ({} problem{})",
        path.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "s" }
    );
    for p in problems {
        match p.line {
            Some(line) => out.push_str(&format!(
                "\n  {}:{line}: {}: {}",
                path.display(),
                p.key,
                p.message
            )),
            None => out.push_str(&format!("\n  {}: {}: {}", path.display(), p.key, p.message)),
        }
    }
    out
}

/// The file as written, before any value is checked.
#[derive(Debug, Deserialize)]
pub struct RawConfig {
    #[serde(default)]
    pub apps: BTreeMap<String, RawApp>,
    /// `[controller]`: where the agent reports (absent: node-local only).
    pub controller: Option<RawController>,
    /// `[artifacts]`: how artifacts are downloaded from HTTPS URLs.
    pub artifacts: Option<RawArtifacts>,
    /// `[digitalocean]`: where the droplet's metadata service is.
    pub digitalocean: Option<RawDigitalOcean>,
}

/// `[digitalocean]` as written.
#[derive(Debug, Deserialize)]
pub struct RawDigitalOcean {
    /// `http://169.254.169.254` on a droplet; a loopback URL in tests.
    pub metadata_url: Option<String>,
}

/// Checks a `metadata_url`: `http://` to 169.254.169.254 or a loopback
/// address, with a port or not, no path. Returns (host, port).
pub fn check_metadata_url(url: &str) -> Result<(String, u16), String> {
    let rest = url
        .trim_end_matches('/')
        .strip_prefix("http://")
        .ok_or_else(|| {
            format!("{url:?}: must start with http:// (the metadata service is plain HTTP)")
        })?;
    if rest.contains('/') || rest.contains('@') || rest.is_empty() {
        return Err(format!("{url:?}: give only http://host[:port]"));
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
            h,
            p.parse::<u16>()
                .map_err(|_| format!("{url:?}: bad port {p:?}"))?,
        ),
        _ => (rest, 80),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ip: std::net::IpAddr = host
        .parse()
        .map_err(|_| format!("{url:?}: the host must be an IP address"))?;
    let link_local_metadata = ip == std::net::IpAddr::from([169, 254, 169, 254]);
    if !(link_local_metadata || ip.is_loopback()) {
        return Err(format!(
            "{url:?}: only the metadata address 169.254.169.254 (or a loopback address, for tests)"
        ));
    }
    Ok((host.to_owned(), port))
}

/// `[artifacts]` as written.
#[derive(Debug, Deserialize)]
pub struct RawArtifacts {
    pub ca_file: Option<String>,
    pub max_size: Option<Size>,
    pub connect_timeout: Option<DurationValue>,
    pub read_timeout: Option<DurationValue>,
}

/// Largest artifact downloaded from a URL when `[artifacts] max_size` is not set.
pub const DEFAULT_DOWNLOAD_MAX_SIZE: u64 = 2 << 30;
/// Time allowed for the TCP connect and, separately, the TLS handshake.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time allowed without a byte from the server (response head or body).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How the agent fetches artifacts: downloads from an HTTPS URL, and the
/// limits of a fetch from the controller too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactsConfig {
    /// Extra CA certificates trusted besides the system roots (an internal
    /// artifact server): `ca_file`, read once when the config is checked.
    pub ca_file: Option<CaFile>,
    /// Refuse a download larger than this (by Content-Length or as streamed).
    pub max_size: u64,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

/// The certificates of `[artifacts] ca_file`, as read when the config was
/// checked (a download uses these, never the file again).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaFile {
    /// Where they came from, for messages.
    pub path: PathBuf,
    /// At least one.
    pub certs: Vec<CertificateDer<'static>>,
}

impl CaFile {
    /// Reads the PEM certificates at `path` (at least one).
    pub fn load(path: &Path) -> Result<Self, String> {
        let fail = |reason: String| {
            format!(
                "cannot read the artifacts CA file {}: {reason}",
                path.display()
            )
        };
        let data = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
        let certs = CertificateDer::pem_slice_iter(&data)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| fail(format!("not PEM certificates: {e}")))?;
        if certs.is_empty() {
            return Err(fail("no PEM certificate in it".into()));
        }
        Ok(Self {
            path: path.to_owned(),
            certs,
        })
    }
}

impl Default for ArtifactsConfig {
    fn default() -> Self {
        Self {
            ca_file: None,
            max_size: DEFAULT_DOWNLOAD_MAX_SIZE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
        }
    }
}

/// `[controller]` as written.
#[derive(Debug, Deserialize)]
pub struct RawController {
    /// One controller (or several replicas behind one address).
    pub url: Option<String>,
    /// Controller replicas the agent chooses among (instead of `url`).
    pub urls: Option<Vec<String>>,
    pub state_dir: Option<String>,
}

/// The controller this node reports to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerConfig {
    /// `host:port` or `https://host:port` of each replica, as written (one
    /// for `url`, at least one for `urls`): never empty, no two the same
    /// address. The session picks one at random and moves to the next on
    /// failure ([`crate::link::replicas`]).
    pub urls: Vec<String>,
    /// Where `slipway-agent enroll` put the key, certificate and CA.
    pub state_dir: PathBuf,
}

/// Most replicas `urls` may list: a full pass over them, with the short
/// pause between two, stays well under the reconnect backoff's cap.
pub const MAX_CONTROLLER_URLS: usize = 16;

/// A controller address checked: what to dial and the name its server
/// certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControllerAddress {
    /// `host:port` (`[v6]:port`) to dial.
    pub authority: String,
    /// The host part, checked against the server certificate.
    pub host: String,
}

/// Parses a controller address: `host[:port]` or `https://host[:port]`
/// (an optional trailing `/`), the port 7443 when not given. The link is
/// always TLS, so any other scheme (`http://`) is refused.
pub fn controller_address(text: &str) -> Result<ControllerAddress, String> {
    let bad = |why: &str| format!("{text:?}: {why} (expected https://host:port or host:port)");
    let rest = text.strip_prefix("https://").unwrap_or(text);
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains("://") {
        return Err(bad("not an https:// address"));
    }
    if rest.is_empty() || rest.contains('/') || rest.contains('@') {
        return Err(bad("not a controller address"));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| bad("unclosed `[` in an IPv6 address"))?;
        match after.strip_prefix(':') {
            Some(port) => (host, Some(port)),
            None if after.is_empty() => (host, None),
            None => return Err(bad("not a controller address")),
        }
    } else {
        match rest.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        }
    };
    let port: u16 = match port {
        Some(port) => port.parse().map_err(|_| bad("bad port"))?,
        None => DEFAULT_CONTROLLER_PORT,
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok(ControllerAddress {
        authority,
        host: host.to_owned(),
    })
}

/// Port used when a controller address has none.
pub const DEFAULT_CONTROLLER_PORT: u16 = 7443;

/// Where enrollment keeps the node's identity by default.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/slipway-agent";

/// One `[apps.NAME]` table as written.
#[derive(Debug, Deserialize)]
pub struct RawApp {
    pub root: String,
    pub keep: Option<i64>,
    pub keep_failed: Option<i64>,
    #[serde(default)]
    pub shared_files: Vec<String>,
    #[serde(default)]
    pub shared_dirs: Vec<String>,
    /// When true, a real file in the artifact at a shared path is kept and the
    /// shared link is skipped; when false (default) that is an error.
    #[serde(default)]
    pub artifact_wins: bool,
    pub content_store: Option<bool>,
    pub max_entries: Option<i64>,
    pub max_expanded_size: Option<Size>,
    pub free_space_margin: Option<Size>,
    #[serde(default)]
    pub hooks: RawHooks,
    /// `[apps.NAME.run]`: how the app runs; absent = files only.
    pub run: Option<RawRun>,
    /// `[apps.NAME.health]`: the readiness gate and liveness check.
    pub health: Option<RawHealth>,
    /// `[apps.NAME.logs]`: rotation and retention of the app's logs.
    #[serde(default)]
    pub logs: RawLogs,
    /// Free space on the root's file system below which the agent prunes
    /// (docker images, rotated logs, cached artifacts, store objects).
    pub disk_pressure_free: Option<Size>,
    /// Consecutive liveness failures that restart the app (0 = never).
    pub restart_after: Option<i64>,
    /// Restarts allowed within `restart_window`; one more is a crash loop.
    pub max_restarts: Option<i64>,
    pub restart_window: Option<DurationValue>,
    /// First pause before a liveness restart; doubled after each one.
    pub restart_backoff: Option<DurationValue>,
    /// On a crash loop, roll back to the previous good release when the
    /// current one went live within `crashloop_grace`.
    pub rollback_on_crashloop: Option<bool>,
    pub crashloop_grace: Option<DurationValue>,
    /// The app's public address, held by the agent across deploys:
    /// `"0.0.0.0:3000"` or an absolute unix socket path.
    pub listen: Option<String>,
    /// How the agent's proxy forwards `listen`: `"tcp"` or `"http"`.
    pub listen_mode: Option<String>,
    /// TCP mode on an IPv4 `listen`: let the kernel (nftables DNAT) forward
    /// local clients' connections to the live backend (default true).
    pub kernel_forward: Option<bool>,
}

/// `[apps.NAME.logs]` as written.
#[derive(Debug, Default, Deserialize)]
pub struct RawLogs {
    pub paths: Option<Vec<String>>,
    pub max_size: Option<Size>,
    pub max_age: Option<DurationValue>,
    pub keep: Option<i64>,
    pub compress: Option<String>,
    pub docker_max_size: Option<Size>,
    pub docker_max_file: Option<i64>,
}

/// `[apps.NAME.run]` as written; which keys apply depends on `driver`.
#[derive(Debug, Deserialize)]
pub struct RawRun {
    pub driver: String,
    // pm2
    pub name: Option<String>,
    pub ecosystem: Option<String>,
    pub script: Option<String>,
    pub instances: Option<Instances>,
    pub exec_mode: Option<String>,
    pub pm2_home: Option<String>,
    pub pm2_bin: Option<String>,
    pub user: Option<String>,
    // docker
    pub image: Option<String>,
    pub image_archive: Option<String>,
    pub container_port: Option<i64>,
    pub ports: Option<Vec<i64>>,
    pub host_ip: Option<String>,
    pub memory: Option<Size>,
    pub cpus: Option<f64>,
    pub restart: Option<String>,
    pub docker_socket: Option<String>,
    // docker and exec
    pub command: Option<Vec<String>>,
    pub stop_grace: Option<DurationValue>,
}

/// PM2 `instances`: a count or `"max"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Instances {
    Count(i64),
    Text(String),
}

/// `[apps.NAME.health]` as written.
#[derive(Debug, Deserialize)]
pub struct RawHealth {
    pub check: String,
    pub url: Option<String>,
    pub status: Option<String>,
    pub body_contains: Option<String>,
    pub address: Option<String>,
    pub command: Option<String>,
    pub timeout: Option<DurationValue>,
    pub interval: Option<DurationValue>,
    pub successes: Option<i64>,
    pub retries: Option<i64>,
    pub start_period: Option<DurationValue>,
    pub deadline: Option<DurationValue>,
    pub liveness_interval: Option<DurationValue>,
}

/// `[apps.NAME.hooks]` as written.
#[derive(Debug, Default, Deserialize)]
pub struct RawHooks {
    #[serde(default)]
    pub before_activate: Vec<String>,
    #[serde(default)]
    pub after_activate: Vec<String>,
    pub timeout: Option<DurationValue>,
}

/// A byte size written as an integer or a string such as `"4GiB"` or `"512MB"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Size {
    Bytes(i64),
    Text(String),
}

/// A duration written as seconds or a string such as `"90s"`, `"5m"`, `"1h"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum DurationValue {
    Seconds(i64),
    Text(String),
}

/// The checked configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, for messages.
    pub path: PathBuf,
    pub apps: BTreeMap<String, AppConfig>,
    pub controller: Option<ControllerConfig>,
    /// `[artifacts]`: downloads from HTTPS URLs.
    pub artifacts: ArtifactsConfig,
    /// `[digitalocean] metadata_url` (checked): the droplet id is read
    /// there and reported in the Hello; None: not on DigitalOcean.
    pub metadata_url: Option<String>,
}

/// One app, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct AppConfig {
    pub name: String,
    /// Absolute directory holding `releases/`, `shared/`, `current`, `.slipway/`.
    pub root: PathBuf,
    /// Good releases kept by prune.
    pub keep: usize,
    /// Failed or bad releases kept for inspection.
    pub keep_failed: usize,
    /// Files under `shared/` linked into every release (relative paths).
    pub shared_files: Vec<PathBuf>,
    /// Directories under `shared/` linked into every release (relative paths).
    pub shared_dirs: Vec<PathBuf>,
    pub artifact_wins: bool,
    /// Hardlink unchanged files from the per-app object store.
    pub content_store: bool,
    pub limits: UnpackLimits,
    pub free_space_margin: u64,
    pub hooks: Hooks,
    /// How the app runs (PM2, Docker, or supervised by the agent).
    pub run: Option<RunConfig>,
    /// How the app's health is checked.
    pub health: Option<HealthConfig>,
    pub logs: LogsConfig,
    /// Prune under disk pressure when free space drops below this.
    pub disk_pressure_free: Option<u64>,
    /// What `run` does when the app keeps failing its liveness check.
    pub recovery: RecoveryConfig,
    /// The public address the agent holds for the app (exec driver: handed
    /// to each process with socket activation); `None`: the app binds its
    /// own port.
    pub listen: Option<ListenAddr>,
    /// How the agent's proxy forwards `listen` (docker, PM2 fork mode).
    pub listen_mode: ListenMode,
    /// TCP mode on an IPv4 `listen`: the front also installs nftables rules
    /// so that connections from this machine are forwarded by the kernel
    /// (`kernel_forward`, default true; see [`crate::front`]).
    pub kernel_forward: bool,
}

/// Liveness with consequences: restarts, crash loops, automatic rollback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoveryConfig {
    /// Consecutive liveness failures that restart the app; 0 = never.
    pub restart_after: u32,
    /// Restarts allowed within `restart_window`; the next one needed marks
    /// the app crashlooping instead of restarting it.
    pub max_restarts: u32,
    pub restart_window: Duration,
    /// Pause before the first restart of a streak, doubled for each next
    /// one (capped at [`MAX_RESTART_BACKOFF`]), so a dying app is not
    /// hammered.
    pub restart_backoff: Duration,
    /// Roll back by itself when the app crashloops...
    pub rollback_on_crashloop: bool,
    /// ...and its current release went live at most this long ago (an
    /// older release that starts crashing is more likely the machine's
    /// fault than the release's).
    pub crashloop_grace: Duration,
}

/// The longest pause between two liveness restarts.
pub const MAX_RESTART_BACKOFF: Duration = Duration::from_secs(300);

impl Default for RecoveryConfig {
    fn default() -> Self {
        Self {
            restart_after: 3,
            max_restarts: 5,
            restart_window: Duration::from_secs(600),
            restart_backoff: Duration::from_secs(5),
            rollback_on_crashloop: false,
            crashloop_grace: Duration::from_secs(900),
        }
    }
}

/// How an app's logs are rotated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogsConfig {
    /// Globs relative to the app root (default `shared/logs/*.log`). The exec
    /// driver's output and PM2's log files of the app are always included.
    pub paths: Vec<String>,
    /// Rotate a file once it is bigger than this.
    pub max_size: Option<u64>,
    /// Rotate a file once its oldest line is older than this (by the time of
    /// its last rotation, or its creation).
    pub max_age: Option<Duration>,
    /// Rotated files kept per log.
    pub keep: usize,
    pub compress: Compress,
    /// json-file `max-size` and `max-file` for containers the agent starts.
    pub docker_max_size: u64,
    pub docker_max_file: u32,
}

/// Compression of rotated logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compress {
    None,
    Gzip,
    Zstd,
}

/// Rotated files kept per log when the app does not say.
pub const DEFAULT_LOG_KEEP: usize = 14;
/// Size that triggers a rotation by default.
pub const DEFAULT_LOG_MAX_SIZE: u64 = 50 << 20;

impl Default for LogsConfig {
    fn default() -> Self {
        Self {
            paths: vec!["shared/logs/*.log".into()],
            max_size: Some(DEFAULT_LOG_MAX_SIZE),
            max_age: Some(Duration::from_secs(24 * 3600)),
            keep: DEFAULT_LOG_KEEP,
            compress: Compress::Gzip,
            docker_max_size: DEFAULT_LOG_MAX_SIZE,
            docker_max_file: 5,
        }
    }
}

/// Which process driver runs the app, with its settings.
#[derive(Debug, Clone, PartialEq)]
pub enum RunConfig {
    Pm2(Pm2Config),
    Docker(DockerConfig),
    Exec(ExecConfig),
}

impl RunConfig {
    pub fn driver_name(&self) -> &'static str {
        match self {
            Self::Pm2(_) => "pm2",
            Self::Docker(_) => "docker",
            Self::Exec(_) => "exec",
        }
    }
}

/// PM2: the app runs under a PM2 daemon, started or reloaded from `current`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pm2Config {
    /// PM2 process name (default: the app name).
    pub name: String,
    /// Ecosystem file relative to the release (default `ecosystem.config.js`
    /// when present and no `script` is given).
    pub ecosystem: Option<PathBuf>,
    /// Script relative to the release, when there is no ecosystem file.
    pub script: Option<PathBuf>,
    /// Number of instances; 0 means "max" (one per core).
    pub instances: u32,
    /// Cluster mode reloads with zero downtime; fork mode restarts.
    pub cluster: bool,
    pub pm2_home: Option<PathBuf>,
    pub pm2_bin: PathBuf,
    /// Run PM2 as this user (the agent runs as root).
    pub user: Option<String>,
    /// Fork mode with `listen`: the two ports the blue/green process sets
    /// alternate between (`PORT` of each), behind the agent's front.
    pub ports: Option<[u16; 2]>,
}

/// Docker: one container per release, blue/green across a host port pair.
#[derive(Debug, Clone, PartialEq)]
pub struct DockerConfig {
    /// A local image reference, used when there is no `image_archive`.
    pub image: Option<String>,
    /// An image tarball (`docker save` output) inside the release.
    pub image_archive: Option<PathBuf>,
    pub container_port: u16,
    /// Host ports the old and new container alternate between.
    pub ports: [u16; 2],
    pub host_ip: String,
    pub memory_bytes: Option<u64>,
    pub cpus: Option<f64>,
    /// Docker restart policy name: no, always, unless-stopped, on-failure.
    pub restart: String,
    pub socket: PathBuf,
    /// Overrides the image's command.
    pub command: Vec<String>,
    pub stop_grace: Duration,
    /// json-file log limits for the containers (from `[apps.NAME.logs]`).
    pub log_max_size: u64,
    pub log_max_file: u32,
}

/// Exec: the agent supervises one process itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecConfig {
    /// Program and arguments, run in `current/`.
    pub command: Vec<String>,
    /// Time between SIGTERM and SIGKILL when stopping.
    pub stop_grace: Duration,
}

/// Health checks: the readiness gate after activation and periodic liveness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    pub check: CheckConfig,
    /// One probe's time limit.
    pub timeout: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Consecutive passes the gate needs (K).
    pub successes: u32,
    /// Consecutive failures tolerated after the start period before the gate
    /// fails early (and liveness turns unhealthy).
    pub retries: u32,
    /// Failures in this window after activation do not end the gate early.
    pub start_period: Duration,
    /// The gate fails if it has not passed by then.
    pub deadline: Duration,
    /// Time between liveness probes once deployed.
    pub liveness_interval: Duration,
}

/// One kind of probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckConfig {
    /// GET `url`; `{port}` is replaced by the port the driver activated on.
    Http {
        url: String,
        status: (u16, u16),
        body_contains: Option<String>,
    },
    /// Connect to `address` (`host:port`; `{port}` as for http).
    Tcp { address: String },
    /// `sh -c command` in `current/`; exit 0 passes.
    Exec { command: String },
}

/// Bounds on what one artifact may expand to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnpackLimits {
    pub max_entries: u64,
    pub max_expanded_bytes: u64,
}

impl Default for UnpackLimits {
    fn default() -> Self {
        Self {
            max_entries: DEFAULT_MAX_ENTRIES,
            max_expanded_bytes: DEFAULT_MAX_EXPANDED,
        }
    }
}

/// Commands run around activation, each through `sh -c` in the release dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hooks {
    pub before_activate: Vec<String>,
    pub after_activate: Vec<String>,
    pub timeout: Duration,
}

impl Default for Hooks {
    fn default() -> Self {
        Self {
            before_activate: Vec::new(),
            after_activate: Vec::new(),
            timeout: DEFAULT_HOOK_TIMEOUT,
        }
    }
}

impl AppConfig {
    /// An app with every default, rooted at `root` (used by the demo and tests).
    pub fn with_defaults(name: &str, root: PathBuf) -> Self {
        Self {
            name: name.to_owned(),
            root,
            keep: DEFAULT_KEEP,
            keep_failed: DEFAULT_KEEP_FAILED,
            shared_files: Vec::new(),
            shared_dirs: Vec::new(),
            artifact_wins: false,
            content_store: true,
            limits: UnpackLimits::default(),
            free_space_margin: DEFAULT_FREE_SPACE_MARGIN,
            hooks: Hooks::default(),
            run: None,
            health: None,
            logs: LogsConfig::default(),
            disk_pressure_free: None,
            recovery: RecoveryConfig::default(),
            listen: None,
            listen_mode: ListenMode::Tcp,
            kernel_forward: true,
        }
    }
}

impl Config {
    /// Reads and checks the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Checks `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let invalid = |problems| ConfigError::Invalid {
            path: path.to_owned(),
            problems,
        };
        let de = toml::de::Deserializer::parse(text).map_err(|e| {
            invalid(vec![ConfigProblem {
                key: "(syntax)".into(),
                line: e.span().map(|s| line_of_offset(text, s.start)),
                message: e.message().to_owned(),
            }])
        })?;
        // Unknown keys are collected (all of them, with lines) rather than
        // failing at the first, and reported together with any type error.
        let mut problems = Vec::new();
        let mut unknown = |path: serde_ignored::Path<'_>| {
            // serde_ignored shows an optional table (`[controller]`,
            // `[artifacts]`) as a `?` segment; the file has no such key.
            let key = path
                .to_string()
                .split('.')
                .filter(|part| *part != "?")
                .collect::<Vec<_>>()
                .join(".");
            let name = key.rsplit('.').next().unwrap_or(&key).to_owned();
            problems.push(ConfigProblem {
                line: locate_key(text, &key),
                key,
                message: format!("unknown key `{name}`"),
            });
        };
        let result = serde_path_to_error::deserialize::<_, RawConfig>(
            serde_ignored::Deserializer::new(de, &mut unknown),
        );
        match result {
            Ok(raw) if problems.is_empty() => Self::new(path, text, &raw),
            Ok(_) => Err(invalid(problems)),
            Err(e) => {
                let key = e.path().to_string();
                let inner = e.inner();
                let problem = ConfigProblem {
                    line: inner
                        .span()
                        .map(|s| line_of_offset(text, s.start))
                        .or_else(|| locate_key(text, &key)),
                    key: if key == "." {
                        "(top level)".into()
                    } else {
                        key
                    },
                    message: inner.message().to_owned(),
                };
                problems.push(problem);
                problems.sort_by_key(|p| p.line);
                Err(invalid(problems))
            }
        }
    }

    /// Converts the raw file into the checked config, reporting every problem.
    pub fn new(path: &Path, text: &str, raw: &RawConfig) -> Result<Self, ConfigError> {
        let mut problems = Vec::new();
        let mut apps = BTreeMap::new();
        let mut roots: BTreeMap<PathBuf, String> = BTreeMap::new();
        let mut listens: BTreeMap<ListenAddr, String> = BTreeMap::new();
        for (name, app) in &raw.apps {
            let mut p = Problems {
                text,
                prefix: format!("apps.{name}"),
                out: &mut problems,
            };
            if let Err(msg) = validate_app_name(name) {
                p.push("", msg);
            }
            let root = PathBuf::from(&app.root);
            if !root.is_absolute() {
                p.push("root", format!("{:?} must be an absolute path", app.root));
            } else if root.components().any(|c| c == Component::ParentDir) {
                p.push("root", format!("{:?} must not contain `..`", app.root));
            } else if let Some(other) = roots.insert(root.clone(), name.clone()) {
                p.push(
                    "root",
                    format!("{:?} is also the root of app {other:?}", app.root),
                );
            }
            let keep = p.count("keep", app.keep, DEFAULT_KEEP as i64, 1);
            let keep_failed = p.count(
                "keep_failed",
                app.keep_failed,
                DEFAULT_KEEP_FAILED as i64,
                0,
            );
            let max_entries = p.count(
                "max_entries",
                app.max_entries,
                DEFAULT_MAX_ENTRIES as i64,
                1,
            );
            let max_expanded = p.size(
                "max_expanded_size",
                app.max_expanded_size.as_ref(),
                DEFAULT_MAX_EXPANDED,
            );
            let margin = p.size(
                "free_space_margin",
                app.free_space_margin.as_ref(),
                DEFAULT_FREE_SPACE_MARGIN,
            );
            let shared_files = p.shared_paths("shared_files", &app.shared_files);
            let shared_dirs = p.shared_paths("shared_dirs", &app.shared_dirs);
            for f in &shared_files {
                if shared_dirs
                    .iter()
                    .any(|d| f.starts_with(d) || d.starts_with(f))
                {
                    p.push(
                        "shared_files",
                        format!("{} overlaps a shared dir", f.display()),
                    );
                }
            }
            let timeout = match &app.hooks.timeout {
                None => DEFAULT_HOOK_TIMEOUT,
                Some(v) => match parse_duration(v) {
                    Ok(d) => d,
                    Err(msg) => {
                        p.push("hooks.timeout", msg);
                        DEFAULT_HOOK_TIMEOUT
                    }
                },
            };
            for (key, cmds) in [
                ("hooks.before_activate", &app.hooks.before_activate),
                ("hooks.after_activate", &app.hooks.after_activate),
            ] {
                if cmds.iter().any(|c| c.trim().is_empty()) {
                    p.push(key, "hook commands must not be empty".to_owned());
                }
            }
            let mut run = app.run.as_ref().and_then(|r| p.run(name, r));
            if let (Some(RunConfig::Docker(d)), Some(r)) = (&mut run, &app.run) {
                if app.listen.is_some() && r.host_ip.is_none() {
                    // Reached through the agent's proxy only.
                    d.host_ip = "127.0.0.1".into();
                }
            }
            let health = app.health.as_ref().and_then(|h| p.health(h));
            let logs = p.logs(&app.logs);
            if let Some(RunConfig::Docker(d)) = &mut run {
                d.log_max_size = logs.docker_max_size;
                d.log_max_file = logs.docker_max_file;
            }
            let disk_pressure_free = app
                .disk_pressure_free
                .as_ref()
                .map(|v| p.size("disk_pressure_free", Some(v), 0));
            let recovery = p.recovery(app, health.is_some());
            if let Some(RunConfig::Pm2(c)) = &run {
                if c.ports.is_some() && (c.cluster || app.listen.is_none()) {
                    p.push(
                        "run.ports",
                        "is a setting of PM2 fork mode (exec_mode = \"fork\") with listen only"
                            .into(),
                    );
                }
            }
            let listen = app
                .listen
                .as_deref()
                .and_then(|l| p.listen(l, run.as_ref(), health.as_ref(), &mut listens, name));
            let listen_mode = p.listen_mode(
                app.listen_mode.as_deref(),
                app.listen.is_some(),
                run.as_ref(),
            );
            let kernel_forward = p.kernel_forward(
                app.kernel_forward,
                app.listen.is_some(),
                listen.as_ref(),
                listen_mode,
                run.as_ref(),
            );
            if let (Some(RunConfig::Docker(_)), Some(h)) = (&run, &health) {
                if !h.check.mentions_port() {
                    p.push(
                        "health",
                        "with the docker driver the check must use {port} (the blue/green host port), e.g. url = \"http://127.0.0.1:{port}/api/health\"".into(),
                    );
                }
            }
            apps.insert(
                name.clone(),
                AppConfig {
                    name: name.clone(),
                    root,
                    keep: keep as usize,
                    keep_failed: keep_failed as usize,
                    shared_files,
                    shared_dirs,
                    artifact_wins: app.artifact_wins,
                    content_store: app.content_store.unwrap_or(true),
                    limits: UnpackLimits {
                        max_entries,
                        max_expanded_bytes: max_expanded,
                    },
                    free_space_margin: margin,
                    hooks: Hooks {
                        before_activate: app.hooks.before_activate.clone(),
                        after_activate: app.hooks.after_activate.clone(),
                        timeout,
                    },
                    run,
                    health,
                    logs,
                    disk_pressure_free,
                    recovery,
                    listen,
                    listen_mode,
                    kernel_forward,
                },
            );
        }
        let controller = raw.controller.as_ref().map(|c| {
            let mut p = Problems {
                text,
                prefix: "controller".into(),
                out: &mut problems,
            };
            controller_config(&mut p, c)
        });
        let artifacts = match &raw.artifacts {
            None => ArtifactsConfig::default(),
            Some(a) => {
                let mut p = Problems {
                    text,
                    prefix: "artifacts".into(),
                    out: &mut problems,
                };
                artifacts_config(&mut p, a)
            }
        };
        let metadata_url = raw
            .digitalocean
            .as_ref()
            .and_then(|d| d.metadata_url.as_deref())
            .and_then(|url| match check_metadata_url(url) {
                Ok(_) => Some(url.trim_end_matches('/').to_owned()),
                Err(why) => {
                    Problems {
                        text,
                        prefix: "digitalocean".into(),
                        out: &mut problems,
                    }
                    .push("metadata_url", why);
                    None
                }
            });
        if problems.is_empty() {
            Ok(Self {
                path: path.to_owned(),
                apps,
                controller,
                artifacts,
                metadata_url,
            })
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }

    /// The app called `name`, or an error listing the apps that exist.
    pub fn app(&self, name: &str) -> Result<&AppConfig, UnknownApp> {
        self.apps.get(name).ok_or_else(|| UnknownApp {
            name: name.to_owned(),
            path: self.path.clone(),
            known: self.apps.keys().cloned().collect(),
        })
    }
}

/// Checks `[controller]`: exactly one of `url` and `urls`, each address
/// one the link can dial ([`controller_address`]), `urls` a list of 1 to
/// [`MAX_CONTROLLER_URLS`] different addresses; an absolute state dir.
fn controller_config(p: &mut Problems<'_>, raw: &RawController) -> ControllerConfig {
    let urls = match (&raw.url, &raw.urls) {
        (Some(_), Some(_)) => {
            p.push(
                "urls",
                "give either `url` (one controller) or `urls` (replicas), not both".into(),
            );
            Vec::new()
        }
        (None, None) => {
            p.push(
                "",
                "needs `url = \"host:7443\"` (one controller) or `urls = [\"https://a:7443\", \"https://b:7443\"]` (replicas)".into(),
            );
            Vec::new()
        }
        (Some(url), None) => {
            let url = url.trim();
            if url.is_empty() {
                p.push(
                    "url",
                    "must name the controller, e.g. \"controller.example.com:7443\"".into(),
                );
            } else if let Err(why) = controller_address(url) {
                p.push("url", why);
            }
            vec![url.to_owned()]
        }
        (None, Some(list)) => controller_urls(p, list),
    };
    let state_dir = PathBuf::from(raw.state_dir.as_deref().unwrap_or(DEFAULT_STATE_DIR));
    if !state_dir.is_absolute() {
        p.push(
            "state_dir",
            format!("{} must be an absolute path", state_dir.display()),
        );
    }
    ControllerConfig { urls, state_dir }
}

/// Checks `urls`: 1 to [`MAX_CONTROLLER_URLS`] addresses, each valid, no
/// two naming the same host and port. Every bad entry is reported.
fn controller_urls(p: &mut Problems<'_>, list: &[String]) -> Vec<String> {
    if list.is_empty() {
        p.push(
            "urls",
            "must list at least one controller address, e.g. [\"https://a:7443\", \"https://b:7443\"]"
                .into(),
        );
    }
    if list.len() > MAX_CONTROLLER_URLS {
        p.push(
            "urls",
            format!(
                "lists {} addresses; at most {MAX_CONTROLLER_URLS} are allowed",
                list.len()
            ),
        );
    }
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut urls = Vec::new();
    for (i, url) in list.iter().enumerate() {
        let url = url.trim();
        match controller_address(url) {
            Err(why) => p.push("urls", format!("entry {}: {why}", i + 1)),
            Ok(addr) => match seen.entry(addr.authority.to_ascii_lowercase()) {
                std::collections::btree_map::Entry::Occupied(first) => p.push(
                    "urls",
                    format!(
                        "entry {} ({url:?}) is the same address as entry {}",
                        i + 1,
                        first.get()
                    ),
                ),
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert(i + 1);
                }
            },
        }
        urls.push(url.to_owned());
    }
    urls
}

/// Checks `[artifacts]`: the CA file must be an absolute path to readable
/// PEM certificates, the limits positive.
fn artifacts_config(p: &mut Problems<'_>, raw: &RawArtifacts) -> ArtifactsConfig {
    let d = ArtifactsConfig::default();
    let ca_file = raw.ca_file.as_ref().and_then(|f| {
        let path = PathBuf::from(f);
        if !path.is_absolute() {
            p.push("ca_file", format!("{f:?} must be an absolute path"));
            return None;
        }
        match CaFile::load(&path) {
            Ok(ca) => Some(ca),
            Err(e) => {
                p.push("ca_file", e);
                None
            }
        }
    });
    ArtifactsConfig {
        ca_file,
        max_size: p.size("max_size", raw.max_size.as_ref(), d.max_size),
        connect_timeout: p.duration(
            "connect_timeout",
            raw.connect_timeout.as_ref(),
            d.connect_timeout,
        ),
        read_timeout: p.duration("read_timeout", raw.read_timeout.as_ref(), d.read_timeout),
    }
}

/// A command named an app the config file does not declare.
#[derive(Debug, thiserror::Error)]
pub struct UnknownApp {
    pub name: String,
    pub path: PathBuf,
    pub known: Vec<String>,
}

impl fmt::Display for UnknownApp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "app {:?} is not declared in {} (declared: {})",
            self.name,
            self.path.display(),
            if self.known.is_empty() {
                "none".to_owned()
            } else {
                self.known.join(", ")
            }
        )
    }
}

/// Collects problems for one app, locating each key in the file.
struct Problems<'a> {
    text: &'a str,
    prefix: String,
    out: &'a mut Vec<ConfigProblem>,
}

impl Problems<'_> {
    fn push(&mut self, key: &str, message: String) {
        let key = if key.is_empty() {
            self.prefix.clone()
        } else {
            format!("{}.{key}", self.prefix)
        };
        self.out.push(ConfigProblem {
            line: locate_key(self.text, &key),
            key,
            message,
        });
    }

    fn count(&mut self, key: &str, value: Option<i64>, default: i64, min: i64) -> u64 {
        let v = value.unwrap_or(default);
        if v < min {
            self.push(key, format!("must be at least {min}, got {v}"));
            return default as u64;
        }
        v as u64
    }

    fn size(&mut self, key: &str, value: Option<&Size>, default: u64) -> u64 {
        match value.map(parse_size) {
            None => default,
            Some(Ok(v)) => v,
            Some(Err(msg)) => {
                self.push(key, msg);
                default
            }
        }
    }

    fn shared_paths(&mut self, key: &str, values: &[String]) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = Vec::new();
        for v in values {
            match relative_path(v) {
                Ok(p) if out.contains(&p) => self.push(key, format!("{v:?} is listed twice")),
                Ok(p) => out.push(p),
                Err(msg) => self.push(key, msg),
            }
        }
        out
    }
}

impl Problems<'_> {
    /// The app's recovery keys, checked.
    fn recovery(&mut self, app: &RawApp, has_health: bool) -> RecoveryConfig {
        let d = RecoveryConfig::default();
        let restart_after = self.small("restart_after", app.restart_after, d.restart_after, 0);
        let max_restarts = self.small("max_restarts", app.max_restarts, d.max_restarts, 1);
        let restart_window = self.duration(
            "restart_window",
            app.restart_window.as_ref(),
            d.restart_window,
        );
        let restart_backoff = self.duration(
            "restart_backoff",
            app.restart_backoff.as_ref(),
            d.restart_backoff,
        );
        let crashloop_grace = self.duration(
            "crashloop_grace",
            app.crashloop_grace.as_ref(),
            d.crashloop_grace,
        );
        for (key, v) in [
            ("restart_window", restart_window),
            ("restart_backoff", restart_backoff),
        ] {
            if v.is_zero() {
                self.push(key, "must be longer than 0s".into());
            }
        }
        if restart_backoff > MAX_RESTART_BACKOFF {
            self.push(
                "restart_backoff",
                format!("must be at most {}s", MAX_RESTART_BACKOFF.as_secs()),
            );
        }
        let rollback_on_crashloop = app.rollback_on_crashloop.unwrap_or(false);
        if !has_health {
            // Without a check nothing counts failures: these keys would
            // silently do nothing.
            for (key, set) in [
                ("restart_after", app.restart_after.is_some_and(|v| v > 0)),
                ("rollback_on_crashloop", rollback_on_crashloop),
            ] {
                if set {
                    self.push(
                        key,
                        "needs a health check ([apps.NAME.health]) to count liveness failures"
                            .into(),
                    );
                }
            }
        }
        if rollback_on_crashloop && restart_after == 0 {
            self.push(
                "rollback_on_crashloop",
                "needs restart_after > 0 (a crash loop is counted in liveness restarts)".into(),
            );
        }
        RecoveryConfig {
            restart_after,
            max_restarts,
            restart_window,
            restart_backoff,
            rollback_on_crashloop,
            crashloop_grace,
        }
    }

    /// A count that fits a u32, at least `min`.
    fn small(&mut self, key: &str, value: Option<i64>, default: u32, min: i64) -> u32 {
        let v = value.unwrap_or(i64::from(default));
        if v < min || v > i64::from(u32::MAX) {
            self.push(
                key,
                format!("must be between {min} and {}, got {v}", u32::MAX),
            );
            return default;
        }
        v as u32
    }
}

impl Problems<'_> {
    /// `listen`: a valid address, used by one app only, with a driver that
    /// can hand it over, and a check that probes the new process privately.
    /// `listen_mode`: a known mode, for an app whose `listen` goes through
    /// the agent's proxy (exec hands the socket itself: no proxy).
    fn listen_mode(
        &mut self,
        text: Option<&str>,
        has_listen: bool,
        run: Option<&RunConfig>,
    ) -> ListenMode {
        let Some(text) = text else {
            return ListenMode::Tcp;
        };
        let mode = match ListenMode::parse(text) {
            Ok(m) => m,
            Err(msg) => {
                self.push("listen_mode", msg);
                return ListenMode::Tcp;
            }
        };
        if !has_listen {
            self.push(
                "listen_mode",
                format!("{text:?} needs listen (the public address the agent's proxy holds)"),
            );
        } else if mode == ListenMode::Http && matches!(run, Some(RunConfig::Exec(_))) {
            self.push(
                "listen_mode",
                "\"http\" is a mode of the agent's proxy (docker, PM2 fork mode); the exec driver hands the socket itself to the app, with no proxy in between".into(),
            );
        }
        mode
    }

    /// `kernel_forward`: said only where it means something, an IPv4
    /// `listen` forwarded by the agent's proxy in TCP mode.
    fn kernel_forward(
        &mut self,
        value: Option<bool>,
        has_listen: bool,
        listen: Option<&ListenAddr>,
        mode: ListenMode,
        run: Option<&RunConfig>,
    ) -> bool {
        let Some(on) = value else {
            return true;
        };
        let why_not = match (listen, run) {
            // An invalid listen: said already.
            (None, _) if has_listen => return false,
            (None, _) => Some("needs listen (the public address the agent's proxy holds)".to_owned()),
            (Some(_), Some(RunConfig::Exec(_))) => Some(
                "is a setting of the agent's proxy (docker, PM2 fork mode); the exec driver hands the socket itself to the app, with no proxy in between".to_owned(),
            ),
            (Some(ListenAddr::Unix(p)), _) => Some(format!(
                "needs an IPv4 listen address; {} is a unix socket",
                p.display()
            )),
            (Some(ListenAddr::Tcp(a)), _) if !a.is_ipv4() => Some(format!(
                "needs an IPv4 listen address (nftables `ip` family); {a} is IPv6"
            )),
            _ if mode == ListenMode::Http => Some(
                "is a setting of TCP mode; with listen_mode = \"http\" every request passes the front".to_owned(),
            ),
            _ => None,
        };
        match why_not {
            // `false` where nothing would be forwarded by the kernel anyway
            // is harmless and kept.
            Some(msg) if on => {
                self.push("kernel_forward", msg);
                false
            }
            Some(_) => false,
            None => on,
        }
    }

    fn listen(
        &mut self,
        text: &str,
        run: Option<&RunConfig>,
        health: Option<&HealthConfig>,
        seen: &mut BTreeMap<ListenAddr, String>,
        app: &str,
    ) -> Option<ListenAddr> {
        let addr = match ListenAddr::parse(text) {
            Ok(a) => a,
            Err(msg) => {
                self.push("listen", msg);
                return None;
            }
        };
        if let Some(other) = seen.insert(addr.clone(), app.to_owned()) {
            self.push(
                "listen",
                format!("{text:?} is also the address of app {other:?}"),
            );
        }
        match run {
            Some(RunConfig::Exec(_)) => {}
            // The agent's front forwards to the blue/green port.
            Some(RunConfig::Docker(d)) => {
                if d.host_ip != "127.0.0.1" {
                    self.push(
                        "run.host_ip",
                        format!(
                            "{:?}: with listen the containers' ports are reached through the agent's proxy and must be bound to \"127.0.0.1\" (the default with listen)",
                            d.host_ip
                        ),
                    );
                }
            }
            Some(RunConfig::Pm2(c)) if !c.cluster => {
                if c.ports.is_none() {
                    self.push(
                        "run.ports",
                        "PM2 fork mode with listen needs two ports for the blue/green process sets, e.g. ports = [3001, 3002] (each set gets one as PORT)".into(),
                    );
                }
            }
            Some(other) => {
                self.push(
                    "listen",
                    format!(
                        "is not supported by the {} driver in cluster mode (PM2's own reload is zero-downtime there; exec_mode = \"fork\" works with listen)",
                        other.driver_name()
                    ),
                );
                return None;
            }
            None => {
                self.push(
                    "listen",
                    "needs [apps.NAME.run] (a process to hand the socket to)".into(),
                );
                return None;
            }
        }
        if let Some(h) = health {
            let network = !matches!(h.check, CheckConfig::Exec { .. });
            if network && !h.check.mentions_port() {
                self.push(
                    "health",
                    "with listen the check must use {port} (the new release's own port: exec's private probe socket, docker's or PM2's blue/green port), e.g. url = \"http://127.0.0.1:{port}/api/health\"; the public address may still lead to the old release".into(),
                );
            }
        }
        Some(addr)
    }
}

impl CheckConfig {
    fn mentions_port(&self) -> bool {
        match self {
            Self::Http { url, .. } => url.contains("{port}"),
            Self::Tcp { address } => address.contains("{port}"),
            Self::Exec { command } => command.contains("{port}"),
        }
    }
}

impl Problems<'_> {
    fn duration(&mut self, key: &str, v: Option<&DurationValue>, default: Duration) -> Duration {
        match v.map(parse_duration) {
            None => default,
            Some(Ok(d)) => d,
            Some(Err(msg)) => {
                self.push(key, msg);
                default
            }
        }
    }

    fn port(&mut self, key: &str, v: i64) -> u16 {
        match u16::try_from(v) {
            Ok(p) if p > 0 => p,
            _ => {
                self.push(key, format!("{v} is not a port (1-65535)"));
                1
            }
        }
    }

    /// `ports`: two different ports, the blue/green pair.
    fn port_pair(&mut self, v: &[i64]) -> [u16; 2] {
        match v {
            [a, b] => {
                let (a, b) = (self.port("run.ports", *a), self.port("run.ports", *b));
                if a == b {
                    self.push("run.ports", "the two blue/green ports must differ".into());
                }
                [a, b]
            }
            _ => {
                self.push(
                    "run.ports",
                    format!("{v:?}: give two ports, e.g. ports = [8080, 8081]"),
                );
                [1, 2]
            }
        }
    }

    /// Keys that belong to other drivers are errors, so a typo'd driver name
    /// or a leftover setting does not silently do nothing.
    fn not_for(&mut self, driver: &str, keys: &[(&str, bool)]) {
        for (key, present) in keys {
            if *present {
                self.push(
                    &format!("run.{key}"),
                    format!("is not a setting of the {driver} driver"),
                );
            }
        }
    }

    fn run(&mut self, app: &str, r: &RawRun) -> Option<RunConfig> {
        let pm2_keys = [
            ("name", r.name.is_some()),
            ("ecosystem", r.ecosystem.is_some()),
            ("script", r.script.is_some()),
            ("instances", r.instances.is_some()),
            ("exec_mode", r.exec_mode.is_some()),
            ("pm2_home", r.pm2_home.is_some()),
            ("pm2_bin", r.pm2_bin.is_some()),
            ("user", r.user.is_some()),
        ];
        let docker_keys = [
            ("image", r.image.is_some()),
            ("image_archive", r.image_archive.is_some()),
            ("container_port", r.container_port.is_some()),
            ("ports", r.ports.is_some()),
            ("host_ip", r.host_ip.is_some()),
            ("memory", r.memory.is_some()),
            ("cpus", r.cpus.is_some()),
            ("restart", r.restart.is_some()),
            ("docker_socket", r.docker_socket.is_some()),
        ];
        let grace = self.duration(
            "run.stop_grace",
            r.stop_grace.as_ref(),
            Duration::from_secs(10),
        );
        match r.driver.as_str() {
            "pm2" => {
                // `ports`: the blue/green pair of fork mode behind listen.
                let docker_only: Vec<(&str, bool)> = docker_keys
                    .iter()
                    .copied()
                    .filter(|(k, _)| *k != "ports")
                    .collect();
                self.not_for("pm2", &docker_only);
                let ports = r.ports.as_deref().map(|p| self.port_pair(p));
                self.not_for(
                    "pm2",
                    &[
                        ("command", r.command.is_some()),
                        ("stop_grace", r.stop_grace.is_some()),
                    ],
                );
                let ecosystem = r
                    .ecosystem
                    .as_deref()
                    .map(|e| self.release_path("run.ecosystem", e));
                let script = r
                    .script
                    .as_deref()
                    .map(|e| self.release_path("run.script", e));
                if ecosystem.is_some() && script.is_some() {
                    self.push(
                        "run.script",
                        "give either ecosystem or script, not both".into(),
                    );
                }
                let instances = match &r.instances {
                    None => 0,
                    Some(Instances::Count(n)) if *n >= 1 && *n <= 1024 => *n as u32,
                    Some(Instances::Text(t)) if t == "max" => 0,
                    Some(other) => {
                        self.push(
                            "run.instances",
                            format!("{other:?} must be 1-1024 or \"max\""),
                        );
                        0
                    }
                };
                let cluster = match r.exec_mode.as_deref() {
                    None | Some("cluster") => true,
                    Some("fork") => false,
                    Some(other) => {
                        self.push(
                            "run.exec_mode",
                            format!("{other:?} must be \"cluster\" or \"fork\""),
                        );
                        true
                    }
                };
                Some(RunConfig::Pm2(Pm2Config {
                    name: r.name.clone().unwrap_or_else(|| app.to_owned()),
                    ecosystem: ecosystem.flatten(),
                    script: script.flatten(),
                    instances,
                    cluster,
                    pm2_home: r.pm2_home.as_ref().map(PathBuf::from),
                    pm2_bin: PathBuf::from(r.pm2_bin.as_deref().unwrap_or("pm2")),
                    user: r.user.clone(),
                    ports,
                }))
            }
            "docker" => {
                self.not_for("docker", &pm2_keys);
                let image_archive = r
                    .image_archive
                    .as_deref()
                    .and_then(|e| self.release_path("run.image_archive", e));
                if r.image.is_none() && image_archive.is_none() {
                    self.push(
                        "run.image",
                        "the docker driver needs image or image_archive".into(),
                    );
                }
                let container_port = match r.container_port {
                    Some(p) => self.port("run.container_port", p),
                    None => {
                        self.push(
                            "run.container_port",
                            "the docker driver needs container_port".into(),
                        );
                        1
                    }
                };
                let ports = match r.ports.as_deref() {
                    Some(p) => self.port_pair(p),
                    None => {
                        self.push(
                            "run.ports",
                            "give two host ports, e.g. ports = [8080, 8081]".into(),
                        );
                        [1, 2]
                    }
                };
                let memory_bytes = r.memory.as_ref().map(|m| match parse_size(m) {
                    Ok(v) => v,
                    Err(msg) => {
                        self.push("run.memory", msg);
                        0
                    }
                });
                if let Some(c) = r.cpus {
                    if !(c > 0.0 && c <= 1024.0) {
                        self.push("run.cpus", format!("{c} must be between 0 and 1024"));
                    }
                }
                let restart = r.restart.clone().unwrap_or_else(|| "unless-stopped".into());
                if !["no", "always", "unless-stopped", "on-failure"].contains(&restart.as_str()) {
                    self.push(
                        "run.restart",
                        format!("{restart:?} must be no, always, unless-stopped or on-failure"),
                    );
                }
                Some(RunConfig::Docker(DockerConfig {
                    image: r.image.clone(),
                    image_archive,
                    container_port,
                    ports,
                    host_ip: r.host_ip.clone().unwrap_or_else(|| "0.0.0.0".into()),
                    memory_bytes,
                    cpus: r.cpus,
                    restart,
                    socket: PathBuf::from(
                        r.docker_socket.as_deref().unwrap_or("/var/run/docker.sock"),
                    ),
                    command: r.command.clone().unwrap_or_default(),
                    stop_grace: grace,
                    // Filled in from [logs] once that table is read.
                    log_max_size: DEFAULT_LOG_MAX_SIZE,
                    log_max_file: LogsConfig::default().docker_max_file,
                }))
            }
            "exec" => {
                self.not_for("exec", &pm2_keys);
                self.not_for("exec", &docker_keys);
                let command = r.command.clone().unwrap_or_default();
                if command.is_empty() || command[0].trim().is_empty() {
                    self.push(
                        "run.command",
                        "the exec driver needs command = [\"program\", \"arg\", ...]".into(),
                    );
                }
                Some(RunConfig::Exec(ExecConfig {
                    command,
                    stop_grace: grace,
                }))
            }
            other => {
                self.push(
                    "run.driver",
                    format!("{other:?} must be \"pm2\", \"docker\" or \"exec\""),
                );
                None
            }
        }
    }

    fn logs(&mut self, l: &RawLogs) -> LogsConfig {
        let d = LogsConfig::default();
        let paths = match &l.paths {
            None => d.paths.clone(),
            Some(globs) => {
                for g in globs {
                    if g.starts_with('/') || g.split('/').any(|c| c == "..") {
                        self.push(
                            "logs.paths",
                            format!("{g:?} must be relative to the app root, without `..`"),
                        );
                    } else if let Err(e) = glob::Pattern::new(g) {
                        self.push("logs.paths", format!("{g:?} is not a valid glob: {e}"));
                    }
                }
                globs.clone()
            }
        };
        let keep = match l.keep {
            None => d.keep,
            Some(n) if (1..=10_000).contains(&n) => n as usize,
            Some(n) => {
                self.push("logs.keep", format!("{n} must be 1-10000"));
                d.keep
            }
        };
        let compress = match l.compress.as_deref() {
            None | Some("gzip") => Compress::Gzip,
            Some("zstd") => Compress::Zstd,
            Some("none") => Compress::None,
            Some(other) => {
                self.push(
                    "logs.compress",
                    format!("{other:?} must be \"gzip\", \"zstd\" or \"none\""),
                );
                Compress::Gzip
            }
        };
        let docker_max_file = match l.docker_max_file {
            None => d.docker_max_file,
            Some(n) if (1..=1000).contains(&n) => n as u32,
            Some(n) => {
                self.push("logs.docker_max_file", format!("{n} must be 1-1000"));
                d.docker_max_file
            }
        };
        LogsConfig {
            paths,
            max_size: Some(self.size("logs.max_size", l.max_size.as_ref(), DEFAULT_LOG_MAX_SIZE)),
            max_age: Some(self.duration(
                "logs.max_age",
                l.max_age.as_ref(),
                Duration::from_secs(24 * 3600),
            )),
            keep,
            compress,
            docker_max_size: self.size(
                "logs.docker_max_size",
                l.docker_max_size.as_ref(),
                DEFAULT_LOG_MAX_SIZE,
            ),
            docker_max_file,
        }
    }

    fn release_path(&mut self, key: &str, v: &str) -> Option<PathBuf> {
        match relative_path(v) {
            Ok(p) => Some(p),
            Err(msg) => {
                self.push(key, format!("{msg} (paths are relative to the release)"));
                None
            }
        }
    }

    fn health(&mut self, h: &RawHealth) -> Option<HealthConfig> {
        let check = match h.check.as_str() {
            "http" => {
                let url = h.url.clone().unwrap_or_default();
                if !url.starts_with("http://") {
                    self.push(
                        "health.url",
                        format!("{url:?} must be an http:// URL (the check runs on the node)"),
                    );
                }
                let status = match h.status.as_deref() {
                    None => (200, 399),
                    Some(s) => match parse_status_range(s) {
                        Some(r) => r,
                        None => {
                            self.push(
                                "health.status",
                                format!("{s:?} must be a code or a range like \"200-399\""),
                            );
                            (200, 399)
                        }
                    },
                };
                CheckConfig::Http {
                    url,
                    status,
                    body_contains: h.body_contains.clone(),
                }
            }
            "tcp" => {
                let address = h.address.clone().unwrap_or_default();
                if !address.contains(':') {
                    self.push("health.address", format!("{address:?} must be host:port"));
                }
                CheckConfig::Tcp { address }
            }
            "exec" => {
                let command = h.command.clone().unwrap_or_default();
                if command.trim().is_empty() {
                    self.push("health.command", "the exec check needs a command".into());
                }
                CheckConfig::Exec { command }
            }
            other => {
                self.push(
                    "health.check",
                    format!("{other:?} must be \"http\", \"tcp\" or \"exec\""),
                );
                return None;
            }
        };
        let successes = match h.successes {
            None => 3,
            Some(n) if (1..=1000).contains(&n) => n as u32,
            Some(n) => {
                self.push("health.successes", format!("{n} must be 1-1000"));
                3
            }
        };
        let retries = match h.retries {
            None => 3,
            Some(n) if (0..=1000).contains(&n) => n as u32,
            Some(n) => {
                self.push("health.retries", format!("{n} must be 0-1000"));
                3
            }
        };
        let cfg = HealthConfig {
            check,
            retries,
            timeout: self.duration("health.timeout", h.timeout.as_ref(), Duration::from_secs(2)),
            interval: self.duration(
                "health.interval",
                h.interval.as_ref(),
                Duration::from_secs(1),
            ),
            successes,
            start_period: self.duration(
                "health.start_period",
                h.start_period.as_ref(),
                Duration::from_secs(5),
            ),
            deadline: self.duration(
                "health.deadline",
                h.deadline.as_ref(),
                Duration::from_secs(60),
            ),
            liveness_interval: self.duration(
                "health.liveness_interval",
                h.liveness_interval.as_ref(),
                Duration::from_secs(15),
            ),
        };
        if cfg.deadline <= cfg.start_period {
            self.push("health.deadline", "must be longer than start_period".into());
        }
        Some(cfg)
    }
}

/// `"200"` or `"200-399"`.
fn parse_status_range(s: &str) -> Option<(u16, u16)> {
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (a.trim().parse().ok()?, b.trim().parse().ok()?),
        None => {
            let v = s.trim().parse().ok()?;
            (v, v)
        }
    };
    ((100..=599).contains(&a) && (100..=599).contains(&b) && a <= b).then_some((a, b))
}

/// App names become directory and lock names: keep them plain.
fn validate_app_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "app name {name:?} must be 1-64 characters of A-Z a-z 0-9 . _ - and not start with '.'"
        ))
    }
}

/// A shared path: relative, no `..`, no empty or `.` components.
pub fn relative_path(v: &str) -> Result<PathBuf, String> {
    let trimmed = v.trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(format!("{v:?} is empty"));
    }
    let p = Path::new(trimmed);
    if p.is_absolute() {
        return Err(format!("{v:?} must be relative to the shared dir"));
    }
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            _ => return Err(format!("{v:?} must not contain `..`")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(format!("{v:?} names no file"));
    }
    Ok(out)
}

/// Parses `4GiB`, `512MB`, `100k`, `123` (bytes).
pub fn parse_size(v: &Size) -> Result<u64, String> {
    match v {
        Size::Bytes(n) if *n > 0 => Ok(*n as u64),
        Size::Bytes(n) => Err(format!("size must be positive, got {n}")),
        Size::Text(s) => {
            let t = s.trim();
            let split = t
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let n: f64 = num
                .parse()
                .map_err(|_| format!("{s:?} is not a size (try \"4GiB\" or \"512MB\")"))?;
            let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
                "" | "b" => 1,
                "k" | "kb" => 1_000,
                "kib" => 1 << 10,
                "m" | "mb" => 1_000_000,
                "mib" => 1 << 20,
                "g" | "gb" => 1_000_000_000,
                "gib" => 1 << 30,
                "t" | "tb" => 1_000_000_000_000,
                "tib" => 1 << 40,
                other => return Err(format!("{s:?} has an unknown size unit {other:?}")),
            };
            let bytes = n * mult as f64;
            if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
                return Err(format!("{s:?} is out of range"));
            }
            Ok(bytes as u64)
        }
    }
}

/// Parses `90`, `"90s"`, `"5m"`, `"1h"`, `"250ms"`.
pub fn parse_duration(v: &DurationValue) -> Result<Duration, String> {
    match v {
        DurationValue::Seconds(n) if *n > 0 => Ok(Duration::from_secs(*n as u64)),
        DurationValue::Seconds(n) => Err(format!("duration must be positive, got {n}")),
        DurationValue::Text(s) => {
            let t = s.trim();
            let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
            let (num, unit) = t.split_at(split);
            let n: u64 = num
                .parse()
                .map_err(|_| format!("{s:?} is not a duration (try \"90s\" or \"5m\")"))?;
            let d = match unit {
                "ms" => Duration::from_millis(n),
                "" | "s" => Duration::from_secs(n),
                "m" => Duration::from_secs(n * 60),
                "h" => Duration::from_secs(n * 3600),
                "d" => Duration::from_secs(n * 86400),
                other => return Err(format!("{s:?} has an unknown duration unit {other:?}")),
            };
            if d.is_zero() {
                return Err(format!("{s:?} must be positive"));
            }
            Ok(d)
        }
    }
}

fn line_of_offset(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// Finds the line of a dotted key such as `apps.web.hooks.timeout`, walking
/// the document's spans; falls back to the innermost table that exists.
fn locate_key(text: &str, key: &str) -> Option<usize> {
    use toml::de::{DeTable, DeValue};
    let doc = DeTable::parse(text).ok()?;
    let mut table = doc.get_ref();
    let mut line = None;
    for part in key.split('.').filter(|p| !p.is_empty()) {
        let (k, v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == part)?;
        line = Some(line_of_offset(text, k.span().start));
        match v.get_ref() {
            DeValue::Table(t) => table = t,
            _ => break,
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/slipway/agent.toml"), text)
    }

    #[test]
    fn listen_is_checked_per_app_and_driver() {
        let exec = |name: &str, listen: &str, url: &str| {
            format!(
                r#"
[apps.{name}]
root = "/srv/{name}"
listen = "{listen}"
[apps.{name}.run]
driver = "exec"
command = ["./app"]
[apps.{name}.health]
check = "http"
url = "{url}"
"#
            )
        };
        let ok = parse(&exec("web", "0.0.0.0:3000", "http://127.0.0.1:{port}/")).unwrap();
        assert_eq!(
            ok.app("web").unwrap().listen.as_ref().unwrap().to_string(),
            "0.0.0.0:3000"
        );
        let unix = parse(&exec("web", "/run/web.sock", "http://127.0.0.1:{port}/")).unwrap();
        assert!(matches!(
            unix.app("web").unwrap().listen,
            Some(ListenAddr::Unix(_))
        ));
        let msg = parse(&exec("web", "web:3000", "http://127.0.0.1:{port}/"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("apps.web.listen") && msg.contains("is not an address"),
            "{msg}"
        );
        let msg = parse(&exec("web", "127.0.0.1:3000", "http://127.0.0.1:3000/"))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("apps.web.health") && msg.contains("{port}"),
            "{msg}"
        );
        let two = format!(
            "{}{}",
            exec("a", "127.0.0.1:3000", "http://127.0.0.1:{port}/"),
            exec("b", "127.0.0.1:3000", "http://127.0.0.1:{port}/")
        );
        let msg = parse(&two).unwrap_err().to_string();
        assert!(msg.contains("also the address of app \"a\""), "{msg}");
        let msg = parse(
            r#"
[apps.web]
root = "/srv/web"
listen = "127.0.0.1:3000"
[apps.web.run]
driver = "pm2"
script = "server.js"
"#,
        )
        .unwrap_err()
        .to_string();
        assert!(msg.contains("not supported by the pm2 driver"), "{msg}");
    }

    #[test]
    fn listen_mode_is_checked() {
        let docker = |extra: &str| {
            format!(
                r#"
[apps.web]
root = "/srv/web"
listen = "127.0.0.1:3000"
{extra}
[apps.web.run]
driver = "docker"
image = "web:1"
container_port = 3000
ports = [8080, 8081]
[apps.web.health]
check = "http"
url = "http://127.0.0.1:{{port}}/"
"#
            )
        };
        let app = |cfg: Config| cfg.app("web").unwrap().listen_mode;
        assert_eq!(app(parse(&docker("")).unwrap()), ListenMode::Tcp);
        assert_eq!(
            app(parse(&docker("listen_mode = \"http\"")).unwrap()),
            ListenMode::Http
        );
        assert_eq!(
            app(parse(&docker("listen_mode = \"tcp\"")).unwrap()),
            ListenMode::Tcp
        );
        let msg = parse(&docker("listen_mode = \"https\""))
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("/etc/slipway/agent.toml:5")
                && msg.contains("apps.web.listen_mode")
                && msg.contains("\"https\" is not a mode"),
            "{msg}"
        );
        let msg = parse(
            r#"
[apps.web]
root = "/srv/web"
listen_mode = "http"
"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("apps.web.listen_mode") && msg.contains("needs listen"),
            "{msg}"
        );
        let msg = parse(
            r#"
[apps.web]
root = "/srv/web"
listen = "127.0.0.1:3000"
listen_mode = "http"
[apps.web.run]
driver = "exec"
command = ["./app"]
[apps.web.health]
check = "http"
url = "http://127.0.0.1:{port}/"
"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("apps.web.listen_mode") && msg.contains("exec driver hands the socket"),
            "{msg}"
        );
    }

    #[test]
    fn kernel_forward_is_checked() {
        let app = |listen: &str, extra: &str, driver: &str| {
            format!(
                r#"
[apps.web]
root = "/srv/web"
listen = "{listen}"
{extra}
[apps.web.run]
{driver}
[apps.web.health]
check = "http"
url = "http://127.0.0.1:{{port}}/"
"#
            )
        };
        let docker =
            "driver = \"docker\"\nimage = \"web:1\"\ncontainer_port = 3000\nports = [8080, 8081]";
        let on = |cfg: Config| cfg.app("web").unwrap().kernel_forward;
        assert!(on(parse(&app("127.0.0.1:3000", "", docker)).unwrap()));
        assert!(on(parse(&app(
            "127.0.0.1:3000",
            "kernel_forward = true",
            docker
        ))
        .unwrap()));
        assert!(!on(parse(&app(
            "127.0.0.1:3000",
            "kernel_forward = false",
            docker
        ))
        .unwrap()));
        // `false` where nothing would be kernel-forwarded anyway is kept.
        assert!(!on(parse(&app(
            "127.0.0.1:3000",
            "listen_mode = \"http\"\nkernel_forward = false",
            docker
        ))
        .unwrap()));
        for (listen, extra, driver, why) in [
            (
                "127.0.0.1:3000",
                "listen_mode = \"http\"\nkernel_forward = true",
                docker,
                "a setting of TCP mode",
            ),
            ("[::1]:3000", "kernel_forward = true", docker, "is IPv6"),
            (
                "/run/web.sock",
                "kernel_forward = true",
                docker,
                "is a unix socket",
            ),
            (
                "127.0.0.1:3000",
                "kernel_forward = true",
                "driver = \"exec\"\ncommand = [\"./app\"]",
                "exec driver hands the socket",
            ),
        ] {
            let msg = parse(&app(listen, extra, driver)).unwrap_err().to_string();
            assert!(
                msg.contains("apps.web.kernel_forward") && msg.contains(why),
                "{listen} {extra}: {msg}"
            );
        }
        let msg = parse("[apps.web]\nroot = \"/srv/web\"\nkernel_forward = true\n")
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("apps.web.kernel_forward") && msg.contains("needs listen"),
            "{msg}"
        );
        let msg = parse(&app("127.0.0.1:3000", "kernel_forward = \"yes\"", docker))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("kernel_forward"), "{msg}");
    }

    #[test]
    fn full_app_parses_with_units() {
        let cfg = parse(
            r#"
[apps.web]
root = "/app"
keep = 3
shared_files = [".env"]
shared_dirs = ["logs/", "public/uploads"]
max_expanded_size = "1GiB"
free_space_margin = 1048576

[apps.web.hooks]
before_activate = ["true"]
timeout = "2m"
"#,
        )
        .unwrap();
        let app = cfg.app("web").unwrap();
        assert_eq!(app.keep, 3);
        assert_eq!(app.limits.max_expanded_bytes, 1 << 30);
        assert_eq!(app.free_space_margin, 1 << 20);
        assert_eq!(app.hooks.timeout, Duration::from_secs(120));
        assert_eq!(app.shared_dirs[0], PathBuf::from("logs"));
        assert!(app.content_store);
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse("[apps.web]\nroot = \"/app\"\nkepp = 3\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/etc/slipway/agent.toml:3"), "{msg}");
        assert!(msg.contains("kepp"), "{msg}");
    }

    #[test]
    fn wrong_type_names_key_and_line() {
        let err = parse("[apps.web]\nroot = \"/app\"\n\nkeep = \"five\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("apps.web.keep"), "{msg}");
        assert!(msg.contains(":4:"), "{msg}");
    }

    #[test]
    fn every_bad_value_is_reported() {
        let err = parse(
            "[apps.web]\nroot = \"app\"\nkeep = 0\nshared_dirs = [\"../etc\"]\n[apps.web.hooks]\ntimeout = \"5 fortnights\"\n",
        )
        .unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("{err}")
        };
        let keys: Vec<_> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "apps.web.root",
                "apps.web.keep",
                "apps.web.shared_dirs",
                "apps.web.hooks.timeout"
            ]
        );
        assert_eq!(problems[0].line, Some(2));
        assert_eq!(problems[3].line, Some(6));
    }

    #[test]
    fn all_unknown_keys_and_a_type_error_are_reported_together() {
        let err = parse("[apps.web]\nroot = \"/app\"\nbogus = 1\nkeep = \"x\"\n[apps.web.hooks]\nbefor = []\n[agent]\n")
            .unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("{err}")
        };
        let keys: Vec<_> = problems.iter().map(|p| (p.key.as_str(), p.line)).collect();
        assert_eq!(
            keys,
            [
                ("apps.web.bogus", Some(3)),
                ("apps.web.keep", Some(4)),
                ("apps.web.hooks.befor", Some(6)),
                ("agent", Some(7)),
            ]
        );
    }

    #[test]
    fn syntax_error_has_line() {
        let err = parse("[apps.web]\nroot = \n").unwrap_err();
        assert!(err.to_string().contains(":2:"), "{err}");
    }

    #[test]
    fn duplicate_roots_are_refused() {
        let err = parse("[apps.a]\nroot = \"/app\"\n[apps.b]\nroot = \"/app\"\n").unwrap_err();
        assert!(err.to_string().contains("also the root of app"), "{err}");
    }

    #[test]
    fn unknown_app_lists_known() {
        let cfg = parse("[apps.web]\nroot = \"/app\"\n").unwrap();
        let err = cfg.app("api").unwrap_err().to_string();
        assert!(err.contains("\"api\"") && err.contains("web"), "{err}");
    }

    #[test]
    fn the_metadata_url_is_checked() {
        let text = include_str!("../../packaging/agent.toml.example");
        assert_eq!(parse(text).unwrap().metadata_url, None);
        let table: String = text
            .lines()
            .skip_while(|l| *l != "# [digitalocean]")
            .take_while(|l| !l.is_empty())
            .map(|l| format!("{}\n", l.trim_start_matches("# ")))
            .collect();
        let cfg = parse(&format!("{text}\n{table}")).unwrap();
        assert_eq!(cfg.metadata_url.as_deref(), Some("http://169.254.169.254"));
        let err = parse("[digitalocean]\nmetadata_url = \"http://10.0.0.1\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":2: digitalocean.metadata_url:") && err.contains("169.254.169.254"),
            "{err}"
        );
    }

    #[test]
    fn packaged_example_is_valid() {
        let text = include_str!("../../packaging/agent.toml.example");
        let cfg = parse(text).unwrap();
        let web = cfg.app("web").unwrap();
        assert_eq!(web.root, PathBuf::from("/app"));
        assert_eq!(web.shared_dirs.len(), 2);
        assert_eq!(cfg.controller, None);
        // The commented-out [controller] table is valid once uncommented.
        let controller: String = text
            .lines()
            .skip_while(|l| *l != "# [controller]")
            .take_while(|l| !l.is_empty())
            .map(|l| format!("{}\n", l.trim_start_matches("# ")))
            .collect();
        let cfg = parse(&format!("{text}\n{controller}")).unwrap();
        assert_eq!(
            cfg.controller,
            Some(ControllerConfig {
                urls: vec!["controller.example.com:7443".into()],
                state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            })
        );
    }

    #[test]
    fn artifacts_settings_are_checked() {
        let cfg = parse("[apps.web]\nroot = \"/app\"\n").unwrap();
        assert_eq!(cfg.artifacts, ArtifactsConfig::default());
        let cfg = parse(
            "[apps.web]\nroot = \"/app\"\n[artifacts]\nmax_size = \"1MiB\"\nconnect_timeout = \"2s\"\nread_timeout = 7\n",
        )
        .unwrap();
        assert_eq!(cfg.artifacts.max_size, 1 << 20);
        assert_eq!(cfg.artifacts.connect_timeout, Duration::from_secs(2));
        assert_eq!(cfg.artifacts.read_timeout, Duration::from_secs(7));
        assert_eq!(cfg.artifacts.ca_file, None);
        let err = parse(
            "[apps.web]\nroot = \"/app\"\n\n[artifacts]\nca_file = \"/nonexistent/ca.pem\"\nread_timeout = \"0s\"\nretries = 3\n",
        )
        .unwrap_err()
        .to_string();
        // Unknown keys are reported first, alone, like elsewhere in the file.
        assert!(err.contains(":7: artifacts.retries: unknown key"), "{err}");
        let err = parse("[controller]\nurl = \"c:7443\"\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains(":3: controller.bogus: unknown key"), "{err}");
        let err = parse("[controller]\nurl = \" \"\nstate_dir = \"state\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":2: controller.url: must name the controller")
                && err.contains(":3: controller.state_dir: state must be an absolute path"),
            "{err}"
        );
        let cfg = parse("[controller]\nurl = \" c:7443 \"\n").unwrap();
        assert_eq!(
            cfg.controller,
            Some(ControllerConfig {
                urls: vec!["c:7443".into()],
                state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            })
        );
        let err = parse(
            "[apps.web]\nroot = \"/app\"\n\n[artifacts]\nca_file = \"/nonexistent/ca.pem\"\nread_timeout = \"0s\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains(
                ":5: artifacts.ca_file: cannot read the artifacts CA file /nonexistent/ca.pem"
            ) && err.contains(":6: artifacts.read_timeout"),
            "{err}"
        );
    }

    #[test]
    fn controller_replicas_are_listed_in_urls() {
        let cfg = parse(
            "[controller]\nurls = [\"https://a.example:7443\", \" b.example:8443 \", \"https://[::1]:7443/\"]\n",
        )
        .unwrap();
        assert_eq!(
            cfg.controller,
            Some(ControllerConfig {
                urls: vec![
                    "https://a.example:7443".into(),
                    "b.example:8443".into(),
                    "https://[::1]:7443/".into()
                ],
                state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            })
        );
        // One entry is one controller, as `url`.
        let one = parse("[controller]\nurls = [\"https://a:7443\"]\n").unwrap();
        assert_eq!(one.controller.unwrap().urls, ["https://a:7443"]);
        let err = |text: &str| parse(text).unwrap_err().to_string();
        let both = err("[controller]\nurl = \"a:7443\"\nurls = [\"https://b:7443\"]\n");
        assert!(
            both.contains("/etc/slipway/agent.toml:3: controller.urls: give either `url` (one controller) or `urls` (replicas), not both"),
            "{both}"
        );
        let neither = err("[controller]\nstate_dir = \"/var/lib/s\"\n");
        assert!(
            neither.contains("/etc/slipway/agent.toml:1: controller: needs `url")
                && neither.contains("or `urls = ["),
            "{neither}"
        );
        let empty = err("[controller]\nurls = []\n");
        assert!(
            empty.contains(":2: controller.urls: must list at least one controller address"),
            "{empty}"
        );
        let dup = err(
            "[controller]\nurls = [\"https://a:7443\", \"b:1\", \"A:7443\", \"https://b:1/\"]\n",
        );
        assert!(
            dup.contains(
                ":2: controller.urls: entry 3 (\"A:7443\") is the same address as entry 1"
            ) && dup.contains(
                ":2: controller.urls: entry 4 (\"https://b:1/\") is the same address as entry 2"
            ) && dup.contains("(2 problems)"),
            "{dup}"
        );
        // A port left out is 7443: the same address.
        let dup = err("[controller]\nurls = [\"https://a\", \"a:7443\"]\n");
        assert!(
            dup.contains("entry 2 (\"a:7443\") is the same address as entry 1"),
            "{dup}"
        );
        let plain = err(
            "[controller]\nstate_dir = \"/s\"\nurls = [\"https://a:7443\", \"http://b:7443\", \"c:port\", \"\"]\n",
        );
        assert!(
            plain.contains(":3: controller.urls: entry 2: \"http://b:7443\": not an https:// address (expected https://host:port or host:port)")
                && plain.contains(":3: controller.urls: entry 3: \"c:port\": bad port")
                && plain.contains(":3: controller.urls: entry 4: \"\": not a controller address")
                && plain.contains("(3 problems)"),
            "{plain}"
        );
        let many: Vec<String> = (0..17).map(|i| format!("\"https://c{i}:7443\"")).collect();
        let too_many = err(&format!("[controller]\nurls = [{}]\n", many.join(", ")));
        assert!(
            too_many.contains(":2: controller.urls: lists 17 addresses; at most 16 are allowed"),
            "{too_many}"
        );
        let sixteen = parse(&format!(
            "[controller]\nurls = [{}]\n",
            many[..16].join(", ")
        ));
        assert_eq!(sixteen.unwrap().controller.unwrap().urls.len(), 16);
        let wrong_type = err("[controller]\nurls = \"https://a:7443\"\n");
        assert!(wrong_type.contains(":2: controller.urls:"), "{wrong_type}");
        // `url` is checked the same way (it never could dial such a value).
        let bad_url = err("[controller]\nurl = \"http://a:7443\"\n");
        assert!(
            bad_url.contains(":2: controller.url: \"http://a:7443\": not an https:// address"),
            "{bad_url}"
        );
    }

    #[test]
    fn controller_addresses_parse_to_what_is_dialled() {
        let a = controller_address("https://ctl.example.com:8443/").unwrap();
        assert_eq!(
            (a.authority.as_str(), a.host.as_str()),
            ("ctl.example.com:8443", "ctl.example.com")
        );
        assert_eq!(
            controller_address("10.0.0.5").unwrap().authority,
            "10.0.0.5:7443"
        );
        let v6 = controller_address("[::1]").unwrap();
        assert_eq!(
            (v6.authority.as_str(), v6.host.as_str()),
            ("[::1]:7443", "::1")
        );
        for bad in [
            "",
            "http://x:1",
            "grpc://x",
            "x:port",
            "x:1/path",
            ":1",
            "[::1",
            "u@x:1",
        ] {
            assert!(controller_address(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(
            parse_size(&Size::Text("512MB".into())).unwrap(),
            512_000_000
        );
        assert_eq!(parse_size(&Size::Text("1.5KiB".into())).unwrap(), 1536);
        assert!(parse_size(&Size::Text("12 parsecs".into())).is_err());
        assert!(parse_size(&Size::Bytes(-1)).is_err());
        assert_eq!(
            parse_duration(&DurationValue::Text("250ms".into())).unwrap(),
            Duration::from_millis(250)
        );
        assert!(parse_duration(&DurationValue::Text("0s".into())).is_err());
    }
}
