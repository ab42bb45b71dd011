//! Process drivers: what runs the app once `current` points at a release.
//!
//! Every driver implements [`Driver`]. The deploy calls [`Driver::activate`]
//! after the switch, runs the health gate against the [`Activation`] it
//! returns, then either [`Driver::commit`]s (retire what was replaced) or, on
//! a failed gate, switches `current` back and calls [`Driver::restore`].
//!
//! - [`pm2`]: the app runs under PM2, reloaded with zero downtime in cluster
//!   mode.
//! - [`docker`]: one container per release through the Engine API, blue/green
//!   across a host port pair.
//! - [`exec`]: the agent supervises one process itself (`slipway-agent
//!   supervise`): restart on crash with backoff, SIGTERM then SIGKILL; with
//!   `listen`, the public socket is held and handed to each process, so a
//!   new release starts beside the old one (zero-downtime).

pub mod docker;
pub mod exec;
pub mod pm2;

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::bridge::Bridge;
use crate::config::{AppConfig, RunConfig};
use crate::envfile;
use crate::release::ReleaseId;

/// Errors from a driver, with the driver's own words.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("{driver}: {message}")]
    Failed {
        driver: &'static str,
        message: String,
    },
    #[error("{driver}: cannot run {command}: {source}")]
    Spawn {
        driver: &'static str,
        command: String,
        source: std::io::Error,
    },
    #[error("cannot read the app's environment file: {0}")]
    Env(#[from] envfile::EnvError),
}

impl DriverError {
    pub fn failed(driver: &'static str, message: impl Into<String>) -> Self {
        Self::Failed {
            driver,
            message: message.into(),
        }
    }
}

/// The release a driver is asked to run.
#[derive(Debug, Clone)]
pub struct Target {
    pub app: AppConfig,
    pub release: ReleaseId,
    /// `root/current`: drivers run from this path (not the resolved release
    /// dir) so a reload follows the symlink to the new release.
    pub current: PathBuf,
    /// `root/releases/<id>`, for files of this very release (image archives).
    pub release_dir: PathBuf,
    /// `shared/.env`, parsed; handed to the app, never shown.
    pub env: Vec<(String, String)>,
}

impl Target {
    /// The target for `release` of `app`, reading `shared/.env` if present.
    pub fn new(app: &AppConfig, release: &ReleaseId) -> Result<Self, DriverError> {
        let env = envfile::load(&app.root)?;
        Ok(Self {
            app: app.clone(),
            release: release.clone(),
            current: app.root.join("current"),
            release_dir: app.root.join("releases").join(release.as_str()),
            env,
        })
    }

    /// Environment every driver gives the app besides `.env`.
    pub fn slipway_env(&self) -> Vec<(String, String)> {
        vec![
            ("SLIPWAY_APP".into(), self.app.name.clone()),
            ("SLIPWAY_RELEASE".into(), self.release.to_string()),
        ]
    }
}

/// What an activation brought up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Activation {
    /// The port the new release serves on, when the driver chose it (docker's
    /// blue/green port); health checks substitute it for `{port}`.
    pub port: Option<u16>,
    /// Driver-specific handle (container id) for commit/restore.
    pub handle: Option<String>,
    /// One line for the deploy log and report.
    pub detail: String,
}

/// One running process (or container) of the app.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ProcessInfo {
    pub name: String,
    pub pid: Option<u32>,
    /// Driver's word: online, stopped, errored, running, exited, backoff…
    pub status: String,
    /// Restarts after a crash (by the process manager).
    pub restarts: u64,
    /// Restarts the agent made (PM2 reloads at deploys); 0 for drivers
    /// whose deploys start new processes.
    pub reloads: u64,
    pub memory_bytes: Option<u64>,
    pub cpu_percent: Option<f64>,
    pub uptime_secs: Option<u64>,
    /// The release it runs, when the driver knows.
    pub release: Option<String>,
}

/// What `status` shows of a driver. Never environment values.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DriverStatus {
    pub driver: String,
    pub processes: Vec<ProcessInfo>,
    /// E.g. "fork mode: reload is a restart, not zero-downtime".
    pub notes: Vec<String>,
}

/// Runs an app.
pub trait Driver: fmt::Debug + Send + Sync {
    fn name(&self) -> &'static str;

    /// Runs the release `current` points at: starts the app if it is not
    /// running, otherwise replaces it (with zero downtime where the driver
    /// can).
    fn activate(&self, target: &Target) -> Result<Activation, DriverError>;

    /// The gate passed: retire whatever `activation` replaced.
    fn commit(&self, target: &Target, activation: &Activation) -> Result<(), DriverError>;

    /// The gate failed and `current` points at `previous` again: put the
    /// previous release back in service and drop `failed`.
    fn restore(&self, previous: &Target, failed: &Activation) -> Result<Activation, DriverError>;

    /// Stops the app.
    fn stop(&self, app: &AppConfig) -> Result<(), DriverError>;

    /// What the driver knows about why `activation` failed its health gate
    /// (the exec driver: the process is gone, how it exited and the end of
    /// its output), appended to the gate's reason; `None` when it knows
    /// nothing more than the probe.
    fn gate_note(&self, _app: &AppConfig, _activation: &Activation) -> Option<String> {
        None
    }

    /// Whether the driver runs `target`'s release as it should (`port`: the
    /// port recorded for it): `None` when it does, else what is wrong, in
    /// one line ("the PM2 daemon is not running", "container … is gone").
    /// Asks only; never starts anything.
    fn drift(&self, target: &Target, port: Option<u16>) -> Result<Option<String>, DriverError>;

    /// Puts `target`'s release back in service after [`Driver::drift`],
    /// reusing what is left of it where the driver can (Docker: the same
    /// container, on its port). The caller holds it to the health gate and
    /// then [`Driver::commit`]s.
    fn repair(&self, target: &Target, _port: Option<u16>) -> Result<Activation, DriverError> {
        self.activate(target)
    }

    /// Whether a restart of `target`'s release (recorded on `port`) was
    /// cut short by a kill of the agent, leaving two instances of it: the
    /// one that served, and its replacement. Another activation must not
    /// start before a [`Driver::repair`] settled which one serves (Docker
    /// behind the front: the stepped-aside container and the new one).
    fn cut_short(&self, _target: &Target, _port: Option<u16>) -> Result<bool, DriverError> {
        Ok(false)
    }

    /// The app's processes.
    fn status(&self, app: &AppConfig) -> Result<DriverStatus, DriverError>;

    /// Removes what the driver keeps per release (Docker images) for
    /// releases not in `keep`; returns bytes freed. Most drivers keep nothing.
    fn prune_images(&self, _app: &AppConfig, _keep: &[ReleaseId]) -> Result<u64, DriverError> {
        Ok(0)
    }
}

/// The driver an app is configured with, if any. `bridge` is how a driver
/// with an async client (docker) blocks on it: the caller's runtime.
pub fn for_app(app: &AppConfig, bridge: &Bridge) -> Option<Box<dyn Driver>> {
    match app.run.as_ref()? {
        RunConfig::Pm2(c) => Some(Box::new(pm2::Pm2::new(c.clone()))),
        RunConfig::Docker(c) => Some(Box::new(docker::Docker::new(c.clone(), bridge.clone()))),
        RunConfig::Exec(c) => Some(Box::new(exec::Exec::new(c.clone(), app.listen.clone()))),
    }
}
