//! The deploy pipeline: the release store ([`crate::release`]), the app's
//! driver ([`crate::driver`]), the health gate ([`crate::health`]) and its
//! logs ([`crate::logs`]) put together. A [`Deployer`] gives a locked
//! [`Session`] (after crash recovery) that deploys, rolls back, restarts
//! and prunes; every caller — the command line, the controller's commands,
//! the daemon — goes through one.
//!
//! # State machine of a deploy
//!
//! ```text
//! Started ─fetch+verify─▶ Fetched ─unpack─▶ Unpacked ─link shared─▶ Linked
//!   ─before_activate─▶ Hooked ─syncfs, switch current─▶ Activated
//!   ─driver.activate, health gate, driver.commit─▶ ─after_activate─▶ commit (good) ─▶ prune
//! ```
//!
//! The store records each step in the journal before and after it (see
//! [`crate::release`]). A failure undoes an uncommitted deploy: `current`
//! goes back to the previous release, and from `Activated` on — the driver
//! may be running the new release — the driver restarts the previous one
//! and the gate checks it ([`release::Service`]); a deploy that failed
//! there is reported `rolled_back`, not as an error. Recovery after a crash
//! does the same when the next session begins.
//!
//! The fetch copies the artifact into the app's cache through its one
//! writer ([`crate::artifact::cache`]), verifying the digest given.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::artifact::cache::{self, CacheError};
use crate::bridge::Bridge;
use crate::config::{AppConfig, RunConfig};
use crate::digest::Sha256;
use crate::driver::{self, Activation, Driver, DriverError, Target};
use crate::fault;
use crate::health::{self, GateFailed, GatePassed, ProbeTarget};
use crate::release::{
    self, unpack::SpaceGuard, DeployPlan, Journal, Paths, PruneRecord, ReleaseError, ReleaseId,
    Restored, Snapshot, Store, UnpackStats, VerifyReport,
};

/// Everything that can go wrong in a deploy, a rollback, a restart or a
/// prune.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The release store (lock, journal, files, hooks).
    #[error(transparent)]
    Store(#[from] ReleaseError),
    #[error(transparent)]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Gate(#[from] GateFailed),
    /// The artifact could not be copied into the cache.
    #[error(transparent)]
    Artifact(CacheError),
    #[error("artifact {path} has sha256 {actual}, expected {expected}")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("deploy of release {id} failed: {source}; {outcome}")]
    DeployFailed {
        id: ReleaseId,
        outcome: String,
        source: Box<DeployError>,
    },
}

impl DeployError {
    /// The local artifact `src` did not make it into the cache.
    fn fetch(src: &Path, e: CacheError) -> Self {
        match e {
            CacheError::Digest { expected, actual } => Self::Checksum {
                path: src.to_owned(),
                expected: expected.into_string(),
                actual: actual.into_string(),
            },
            e => Self::Artifact(e),
        }
    }
}

type Result<T, E = DeployError> = std::result::Result<T, E>;

/// How long a switch of the front waits for the previous PM2 process set's
/// open connections (Docker uses its `stop_grace`).
const FRONT_DRAIN: std::time::Duration = std::time::Duration::from_secs(3);

/// What to deploy.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    pub artifact: PathBuf,
    /// The digest the artifact must have; without one it is deployed as it
    /// hashes.
    pub sha256: Option<Sha256>,
    pub id: Option<ReleaseId>,
    /// The artifact is already the app's cache entry for `sha256`, verified
    /// by this process while it fetched or looked it up, and pinned since
    /// (so prune could not touch it): not hashed a second time. Used only
    /// when it is exactly that entry; anything else is copied and checked.
    pub verified: Option<cache::Fetched>,
}

/// Time spent in one step, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct StepTiming {
    pub step: &'static str,
    pub ms: f64,
}

/// How a deploy or a controller command ended. One type for the deploy
/// report, `--json` output and the agent's command ledger, so a misspelt
/// outcome is a compile error rather than a silent failure. Serialised as
/// `succeeded`, `failed` and `rolled_back`: the spellings `--json` and
/// `commands.json` have always used, so existing ledgers still read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It did what it was asked.
    Succeeded,
    /// It failed; `current` was not switched, or was switched back.
    Failed,
    /// The release failed once live and the previous one was restored.
    RolledBack,
}

impl Outcome {
    /// The serialised spelling (`succeeded`, `failed`, `rolled_back`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::RolledBack => "rolled_back",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of a successful deploy.
#[derive(Debug, Clone, Serialize)]
pub struct DeployReport {
    pub app: String,
    pub release: ReleaseId,
    /// `Succeeded`, or `RolledBack` when the release failed once live (driver,
    /// health gate or after_activate hook) and the previous one was restored.
    pub outcome: Outcome,
    /// Why it was rolled back, with the failing check's last output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// What happened to the previous release on rollback.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restored: Option<String>,
    /// What the driver brought up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activation: Option<Activation>,
    /// The readiness gate that passed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<GatePassed>,
    pub previous: Option<ReleaseId>,
    pub artifact_sha256: String,
    /// `unpacked`, `rebuilt from manifest`, `reactivated` or `already current`.
    pub method: &'static str,
    pub files: u64,
    pub bytes: u64,
    /// Files hardlinked from the content store rather than written.
    pub reused_files: u64,
    pub new_objects: u64,
    pub steps: Vec<StepTiming>,
    pub total_ms: f64,
    pub pruned: Vec<ReleaseId>,
}

/// The outcome of a rollback.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackReport {
    pub app: String,
    pub from: Option<ReleaseId>,
    pub to: ReleaseId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub activation: Option<Activation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<GatePassed>,
    /// The driver or health gate failed after the switch: `current` is on
    /// `to`, but it is not serving healthily.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// The outcome of a prune: what the store removed, and what the driver
/// freed of its own.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    #[serde(flatten)]
    pub store: release::PruneReport,
    /// Bytes freed by removing the driver's images of releases gone.
    pub image_bytes_freed: u64,
}

/// What the agent did under disk pressure (free space below
/// `disk_pressure_free`), in the order it tried.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PressureReport {
    pub threshold: u64,
    pub free_before: u64,
    pub free_after: u64,
    /// (step, bytes freed): docker images, rotated logs, cached artifacts,
    /// store objects; it stops once free space is back above the threshold.
    pub steps: Vec<(String, u64)>,
    pub relieved: bool,
}

/// What an env change did on this node (no values in any of it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvChange {
    /// `shared/.env` already held it: nothing was touched.
    Unchanged,
    /// Written, and the app restarted with it behind its gate (or not
    /// running): what happened, in one line.
    Applied(String),
    /// The app failed with it: the previous file is back and the app was
    /// restarted with it.
    RolledBack {
        /// Why the new environment failed (the gate or the driver).
        why: String,
        /// How the previous one was put back.
        restored: String,
    },
}

/// One app: its release store, and how its driver reaches async clients.
#[derive(Debug, Clone)]
pub struct Deployer {
    store: Store,
    /// Handed to the app's driver: how it blocks on an async client.
    bridge: Bridge,
}

impl Deployer {
    /// The pipeline of `app`; its driver (for deploys, rollbacks, restarts,
    /// prunes and crash recovery) reaches async clients through `bridge`.
    pub fn new(app: &AppConfig, bridge: &Bridge) -> Self {
        Self {
            store: Store::new(app),
            bridge: bridge.clone(),
        }
    }

    pub fn app(&self) -> &AppConfig {
        self.store.app()
    }

    pub fn paths(&self) -> &Paths {
        self.store.paths()
    }

    /// How blocking work on this app reaches async clients (its driver's,
    /// an artifact download's).
    pub fn bridge(&self) -> &Bridge {
        &self.bridge
    }

    /// The app's driver, if it has one.
    fn driver(&self) -> Option<Box<dyn Driver>> {
        driver::for_app(self.app(), &self.bridge)
    }

    /// What puts the previous release back in service after `failed` went
    /// live and failed.
    fn restorer(&self, failed: Activation) -> Restorer<'_> {
        Restorer {
            deployer: self,
            failed,
        }
    }

    /// Takes the app's lock (failing at once, naming the holder, if it is
    /// held), reads the journal and recovers from any interrupted operation
    /// — through the driver when a deploy that went live is undone.
    pub fn begin(&self, operation: &str, release: Option<&ReleaseId>) -> Result<Session<'_>> {
        let inner = self.store.begin(
            operation,
            release,
            &mut self.restorer(Activation::default()),
        )?;
        Ok(Session {
            deployer: self,
            inner,
            live: None,
            served: None,
        })
    }

    /// The app's state. Recovers first (through the driver, if need be)
    /// when no one holds the lock.
    pub fn snapshot(&self) -> Result<Snapshot> {
        Ok(self
            .store
            .snapshot(&mut self.restorer(Activation::default()))?)
    }

    /// See [`Store::check_idle`].
    pub fn check_idle(&self, operation: &str, release: Option<&ReleaseId>) -> Result<()> {
        Ok(self.store.check_idle(operation, release)?)
    }

    /// See [`Store::pin_cache`].
    pub fn pin_cache(&self) -> Result<release::CachePin> {
        Ok(self.store.pin_cache()?)
    }

    /// See [`Store::verify`].
    pub fn verify(&self, id: Option<&ReleaseId>) -> Result<VerifyReport> {
        Ok(self.store.verify(id)?)
    }
}

/// Points the app's front (the agent's proxy on `listen`) at the release
/// served on `port`, for the drivers that serve a new release on a port of
/// its own; `None` when the app has no front (no `listen`, or exec, which
/// hands the socket itself).
fn switch_front(app: &AppConfig, port: Option<u16>, release: &str) -> Result<Option<String>> {
    let (Some(listen), Some(port)) = (&app.listen, port) else {
        return Ok(None);
    };
    let drain = match &app.run {
        Some(RunConfig::Docker(d)) => d.stop_grace,
        Some(RunConfig::Pm2(_)) => FRONT_DRAIN,
        _ => return Ok(None),
    };
    crate::front::switch(
        &app.root,
        listen,
        app.listen_mode,
        app.kernel_forward,
        port,
        release,
        drain,
    )
    .map(Some)
    .map_err(|e| DriverError::failed("front", e.to_string()).into())
}

/// The app's front after an edit of its config: a front that still holds
/// an address the app no longer has (`listen` removed, or a driver or mode
/// that needs no proxy) stops accepting, finishes its open connections
/// (bounded, see [`crate::front::stop`]) and exits, and its target is
/// forgotten, so the app is reached on its own port again; a front on an
/// address `listen` no longer names gives way to a new one on the new
/// address, forwarding to the recorded backend. Called by `run` at start
/// and on every liveness pass, and by every activation. Returns what was
/// done, for the log and the deploy log.
pub fn settle_front(app: &AppConfig) -> Result<Option<String>> {
    use crate::front::{self, FrontFiles, FrontState};
    let files = FrontFiles::new(&app.root);
    let want = match crate::public::mode(app) {
        crate::public::Mode::AgentProxy => app.listen.as_ref(),
        _ => None,
    };
    let fail = |e: String| -> DeployError { DriverError::failed("front", e).into() };
    if !front::is_running(&files) {
        if want.is_none() && files.target.exists() {
            // A later `listen` must not start a front on a stale backend.
            fs::remove_file(&files.target)
                .map_err(|e| fail(format!("cannot remove {}: {e}", files.target.display())))?;
        }
        return Ok(None);
    }
    // A front that has not written its state yet (just started) is left
    // alone: what it holds cannot be told.
    let Some(old) = FrontState::load(&files).map(|s| s.listen) else {
        return Ok(None);
    };
    if Some(&old) == want.map(ToString::to_string).as_ref() {
        return Ok(None);
    }
    front::stop(&app.root).map_err(fail)?;
    match want {
        None => {
            match fs::remove_file(&files.target) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(fail(format!(
                        "cannot remove {}: {e}",
                        files.target.display()
                    )))
                }
            }
            Ok(Some(format!(
                "listen removed: the agent's front on {old} stopped after its open connections finished; the app is reached on its own port again"
            )))
        }
        Some(l) => {
            front::ensure(&app.root, l).map_err(|e| fail(e.to_string()))?;
            Ok(Some(format!(
                "listen changed from {old} to {l}: a new front holds {l}, forwarding to the recorded backend; {old} is released"
            )))
        }
    }
}

/// Puts the previous release back in service through the app's driver and
/// holds it to the health gate, for the store's undo of a deploy that went
/// live (`failed`: what the driver had brought up, as far as known).
struct Restorer<'a> {
    deployer: &'a Deployer,
    failed: Activation,
}

impl release::Service for Restorer<'_> {
    fn restore(&mut self, previous: Option<&ReleaseId>) -> Restored {
        let said = |outcome: String| Restored {
            outcome,
            port: None,
        };
        let app = self.deployer.app();
        let Some(driver) = self.deployer.driver() else {
            return said("no driver configured".into());
        };
        let Some(prev) = previous else {
            return said(match driver.stop(app) {
                Ok(()) => format!("{} stopped the app (no previous release)", driver.name()),
                Err(e) => format!("stopping the app failed: {e}"),
            });
        };
        let target = match Target::new(app, prev) {
            Ok(t) => t,
            Err(e) => return said(format!("cannot restart {prev}: {e}")),
        };
        let restored = match driver.restore(&target, &self.failed) {
            Ok(a) => a,
            Err(e) => return said(format!("{} could not restart {prev}: {e}", driver.name())),
        };
        let mut out = format!("{} restarted {prev}", driver.name());
        if let Some(cfg) = &app.health {
            let probe_target = ProbeTarget {
                port: restored.port,
                cwd: self.deployer.paths().release(prev),
            };
            match health::gate(cfg, &probe_target) {
                Ok(p) => out.push_str(&format!(" and it is healthy ({})", p.last.output)),
                Err(e) => out.push_str(&format!(" but it is not healthy either: {e}")),
            }
        }
        match switch_front(app, restored.port, prev.as_str()) {
            Ok(Some(line)) => out.push_str(&format!("; {line}")),
            Ok(None) => {}
            Err(e) => out.push_str(&format!("; {e}")),
        }
        if let Err(e) = driver.commit(&target, &restored) {
            out.push_str(&format!(" (cleanup of the failed release: {e})"));
        }
        Restored {
            outcome: out,
            port: restored.port,
        }
    }
}

/// A locked app: every deploy, rollback, restart and prune runs in one.
#[derive(Debug)]
pub struct Session<'a> {
    deployer: &'a Deployer,
    inner: release::Session<'a>,
    /// Set once the driver was asked to run the release being deployed (with
    /// what it brought up, as far as known): a failure from then on must also
    /// put the previous release back in service.
    live: Option<Activation>,
    /// What the driver and gate did for the release being deployed.
    served: Option<(Activation, Option<GatePassed>)>,
}

/// Measures steps for the deploy report.
struct Timer {
    start: Instant,
    last: Instant,
    steps: Vec<StepTiming>,
    /// The deploy log, once the release id is known.
    log: Option<PathBuf>,
}

/// Appends one timestamped line to a deploy log (best effort: the log is
/// for people; a write failure must not fail the deploy).
fn log_line(log: Option<&Path>, text: &str) {
    let Some(log) = log else { return };
    let stamp = OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(log) {
        let _ = writeln!(f, "{stamp} {text}");
    }
}

impl Timer {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            start: now,
            last: now,
            steps: Vec::new(),
            log: None,
        }
    }
    fn lap(&mut self, step: &'static str) {
        let now = Instant::now();
        self.steps.push(StepTiming {
            step,
            ms: (now - self.last).as_secs_f64() * 1e3,
        });
        self.last = now;
        let ms = self.steps.last().map_or(0.0, |s| s.ms);
        tracing::info!(step, ms = format!("{ms:.1}"), "deploy step done");
        log_line(
            self.log.as_deref(),
            &format!("step {step} done in {ms:.1} ms"),
        );
    }
    fn total_ms(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * 1e3
    }
}

impl Session<'_> {
    fn paths(&self) -> &Paths {
        self.deployer.paths()
    }

    fn app(&self) -> &AppConfig {
        self.deployer.app()
    }

    pub fn journal(&self) -> &Journal {
        self.inner.journal()
    }

    pub fn snapshot(&self) -> Result<Snapshot> {
        Ok(self.inner.snapshot()?)
    }

    /// Runs release `id` (which `current` points at) with the app's driver
    /// and holds it to the readiness gate.
    fn serve(&mut self, id: &ReleaseId) -> Result<(Activation, Option<GatePassed>)> {
        self.serve_as(id, None)
    }

    /// [`Session::serve`]; with `repair = Some(port)` the driver repairs
    /// what is left of the release (recorded on `port`) instead of
    /// activating it afresh.
    fn serve_as(
        &mut self,
        id: &ReleaseId,
        repair: Option<Option<u16>>,
    ) -> Result<(Activation, Option<GatePassed>)> {
        let app = self.app().clone();
        let mut activation = Activation::default();
        let driven = match self.deployer.driver() {
            Some(driver) => Some((Target::new(&app, id)?, driver)),
            None => None,
        };
        if let Some((target, driver)) = &driven {
            // From here on a failure must also restart the previous release.
            self.live = Some(Activation::default());
            activation = match repair {
                Some(port) => driver.repair(target, port)?,
                None => driver.activate(target)?,
            };
            tracing::info!(driver = driver.name(), "{}", activation.detail);
            log_line(Some(&self.paths().log(id)), &activation.detail);
            self.live = Some(activation.clone());
        }
        let health = match &app.health {
            Some(cfg) => {
                let target = ProbeTarget {
                    port: activation.port,
                    cwd: self.paths().release(id),
                };
                let passed = health::gate(cfg, &target).map_err(|mut e| {
                    // The driver may know more than the probe (a process
                    // that exited, and why).
                    if let Some((_, driver)) = &driven {
                        if let Some(note) = driver.gate_note(&app, &activation) {
                            e.why.push_str("; ");
                            e.why.push_str(&note);
                        }
                    }
                    log_line(Some(&self.paths().log(id)), &e.to_string());
                    e
                })?;
                log_line(
                    Some(&self.paths().log(id)),
                    &format!(
                        "health gate passed after {} probes: {}",
                        passed.probes, passed.last.output
                    ),
                );
                tracing::info!(
                    probes = passed.probes,
                    ms = passed.elapsed_ms,
                    "health gate passed: {}",
                    passed.last.output
                );
                Some(passed)
            }
            None => None,
        };
        if let Some((target, _)) = &driven {
            // Docker and PM2 fork mode: the agent's front moves new
            // connections to the healthy release and drains the old one
            // before the driver stops it.
            fault::point("before_front_switch");
            if let Some(line) = settle_front(&app)? {
                log_line(Some(&self.paths().log(id)), &line);
                tracing::warn!("{line}");
            }
            if let Some(line) = switch_front(&app, activation.port, target.release.as_str())? {
                log_line(Some(&self.paths().log(id)), &line);
                tracing::info!("{line}");
            }
        }
        if let Some((target, driver)) = &driven {
            fault::point("after_front_switch");
            if let Err(e) = driver.commit(target, &activation) {
                // The new release serves and is healthy; leftovers of the old
                // one are worth a warning, not a rollback.
                tracing::warn!(error = %e, "could not retire the previous release's processes");
            }
        }
        Ok((activation, health))
    }

    /// Restarts the current release through the driver and holds it to the
    /// health gate (`slipway-agent restart`).
    pub fn restart(&mut self) -> Result<(ReleaseId, Activation, Option<GatePassed>)> {
        self.run_again("restart")?;
        self.settle_cut_short()?;
        self.restart_as(None)
    }

    /// A restart of the current release cut short by a kill of the agent
    /// (see [`crate::driver::Driver::cut_short`]) is settled before anything
    /// else starts an instance, as `slipway-agent run` would: the driver
    /// repairs, the gate, the front's switch (draining the other instance)
    /// and the commit.
    fn settle_cut_short(&mut self) -> Result<()> {
        let Some(current) = self.inner.current()? else {
            return Ok(());
        };
        let Some(driver) = self.deployer.driver() else {
            return Ok(());
        };
        let port = self.journal().get(&current).and_then(|r| r.port);
        if !driver.cut_short(&Target::new(self.app(), &current)?, port)? {
            return Ok(());
        }
        tracing::warn!(app = %self.app().name, release = %current, "a restart of the current release was cut short; settling which instance serves first");
        let (_, activation, _) = self.restart_as(Some(port))?;
        log_line(
            Some(&self.paths().log(&current)),
            &format!("restart cut short, settled: {}", activation.detail),
        );
        Ok(())
    }

    /// What `slipway-agent run` does to keep the app running: with `repair
    /// = Some(port)` the driver puts back what drifted (see
    /// [`Driver::repair`]), with `None` it restarts the app (liveness
    /// failures); then the health gate. Unlike [`Session::restart`] it keeps
    /// a stop on purpose and the restart record.
    pub fn recover(
        &mut self,
        repair: Option<Option<u16>>,
    ) -> Result<(ReleaseId, Activation, Option<GatePassed>)> {
        self.restart_as(repair)
    }

    /// Stops the app on purpose (`stop`): the stop is recorded durably
    /// first, so `slipway-agent run` neither repairs nor restarts it in
    /// between or after, then the driver stops it. `by` says who asked.
    pub fn stop(&mut self, by: &str) -> Result<String> {
        let app = self.app().clone();
        crate::upkeep::record_stop(&app.root, by)
            .map_err(|e| ReleaseError::io("record the stop", &app.root)(e))?;
        let Some(driver) = self.deployer.driver() else {
            return Ok("stopped on purpose (no driver: nothing was running)".to_owned());
        };
        driver.stop(&app)?;
        if let Err(e) = crate::front::stop(&app.root) {
            tracing::warn!(error = %e, "cannot stop the app's front");
        }
        Ok(format!("stopped on purpose ({})", driver.name()))
    }

    /// Someone runs the app again on purpose: a stop on purpose and the
    /// restart record (a crash loop) are over.
    fn run_again(&self, what: &str) -> Result<()> {
        let root = &self.app().root;
        let was = crate::upkeep::clear_stop(root)
            .and_then(|was| crate::upkeep::Recovery::clear(root).map(|()| was))
            .map_err(|e| ReleaseError::io("clear the stop record", root)(e))?;
        if was {
            tracing::info!(app = %self.app().name, "{what}: the app was stopped on purpose; it runs again");
        }
        Ok(())
    }

    fn restart_as(
        &mut self,
        repair: Option<Option<u16>>,
    ) -> Result<(ReleaseId, Activation, Option<GatePassed>)> {
        let current = self
            .inner
            .current()?
            .ok_or_else(|| ReleaseError::NothingDeployed {
                app: self.app().name.clone(),
            })?;
        let (a, h) = match self.serve_as(&current, repair) {
            Ok(served) => served,
            Err(err) => {
                // Behind the agent's front the release that served still
                // runs beside its failed replacement (a Docker container
                // stepped aside, a PM2 process set): put it back in
                // service as a failed deploy does, rather than leave both.
                if crate::public::mode(self.app()) == crate::public::Mode::AgentProxy {
                    if let Some(failed) = self.live.take() {
                        let mut restorer = self.deployer.restorer(failed);
                        let r = release::Service::restore(&mut restorer, Some(&current));
                        tracing::warn!(app = %self.app().name, "{}", r.outcome);
                        if let Err(e) = self.inner.record_port(&current, r.port) {
                            tracing::warn!(error = %e, "cannot record the restored port");
                        }
                    }
                }
                return Err(err);
            }
        };
        self.live = None;
        self.inner.record_port(&current, a.port)?;
        Ok((current, a, h))
    }

    /// Replaces the app's `shared/.env` with `content` (the controller's
    /// env `version`) and restarts the current release through its driver
    /// behind the health gate. The file already holding `content` touches
    /// nothing; an app not running (nothing deployed, stopped on purpose)
    /// gets the file and starts with it later. A failed restart puts the
    /// previous file back and the release back in service with it
    /// ([`EnvChange::RolledBack`]). Values are never logged.
    pub fn set_env(&mut self, content: &[u8], version: u64) -> Result<EnvChange> {
        if crate::upkeep::stopped(&self.app().root).is_none() {
            self.settle_cut_short()?;
        }
        let root = self.app().root.clone();
        let env_path = crate::envfile::path(&root);
        let old = crate::envfile::read_raw(&root)
            .map_err(|e| ReleaseError::io("read the environment file", &env_path)(e))?;
        let record = |v: u64| {
            crate::envfile::record_version(&root, v)
                .map_err(|e| ReleaseError::io("record the env version", &root)(e))
        };
        if old.as_deref() == Some(content) {
            record(version)?;
            return Ok(EnvChange::Unchanged);
        }
        crate::envfile::write(&root, content)
            .map_err(|e| ReleaseError::io("write the environment file", &env_path)(e))?;
        let current = self.inner.current()?;
        let idle = match (&current, crate::upkeep::stopped(&root)) {
            (None, _) => Some("nothing is deployed yet"),
            (Some(_), Some(_)) => Some("the app is stopped on purpose"),
            (Some(_), None) if self.deployer.driver().is_none() => Some("the app has no driver"),
            _ => None,
        };
        if let Some(why) = idle {
            record(version)?;
            return Ok(EnvChange::Applied(format!(
                "env v{version} written; {why}: it starts with it"
            )));
        }
        match self.restart_as(None) {
            Ok((_, activation, _)) => {
                record(version)?;
                Ok(EnvChange::Applied(format!(
                    "env v{version} applied: {}",
                    activation.detail
                )))
            }
            Err(err) => {
                let why = err.to_string();
                let failed = self.live.take().unwrap_or_default();
                tracing::warn!(app = %self.app().name, version, "env change failed; putting the previous environment back: {why}");
                match &old {
                    Some(bytes) => crate::envfile::write(&root, bytes),
                    None => crate::envfile::remove(&root),
                }
                .map_err(|e| ReleaseError::io("restore the environment file", &env_path)(e))?;
                let restored = match &current {
                    Some(id) => {
                        let mut restorer = self.deployer.restorer(failed);
                        let r = release::Service::restore(&mut restorer, Some(id));
                        if let Err(e) = self.inner.record_port(id, r.port) {
                            tracing::warn!(error = %e, "cannot record the restored port");
                        }
                        r.outcome
                    }
                    None => "nothing to restart".to_owned(),
                };
                Ok(EnvChange::RolledBack { why, restored })
            }
        }
    }

    /// Deploys an artifact: the whole state machine above, under the lock.
    pub fn deploy(&mut self, req: &DeployRequest) -> Result<DeployReport> {
        self.run_again("deploy")?;
        self.settle_cut_short()?;
        let mut timer = Timer::new();
        let fetched = match &req.verified {
            Some(v)
                if req.sha256.as_ref() == Some(&v.sha256)
                    && v.path == req.artifact
                    && v.path == self.paths().cache.join(&v.sha256)
                    && v.path.is_file() =>
            {
                v.clone()
            }
            _ => cache::copy_file(&self.paths().cache, &req.artifact, req.sha256.as_ref())
                .map_err(|e| DeployError::fetch(&req.artifact, e))?,
        };
        let (cached, sha) = (fetched.path, fetched.sha256.into_string());
        timer.lap("fetch");
        let previous = self.inner.current()?;
        let (id, reactivate) = match self.inner.plan_deploy(req.id.as_ref(), &sha)? {
            DeployPlan::Deploy { id, reactivate } => (id, reactivate),
            DeployPlan::AlreadyCurrent { id, existing } => {
                tracing::info!(release = %id, "release is already current");
                return Ok(DeployReport {
                    app: self.app().name.clone(),
                    release: id,
                    outcome: Outcome::Succeeded,
                    failure: None,
                    restored: None,
                    activation: None,
                    health: None,
                    previous,
                    artifact_sha256: sha,
                    method: "already current",
                    files: existing.files,
                    bytes: existing.bytes,
                    reused_files: 0,
                    new_objects: 0,
                    total_ms: timer.total_ms(),
                    steps: timer.steps,
                    pruned: Vec::new(),
                });
            }
        };
        timer.log = Some(self.paths().log(&id));
        log_line(
            timer.log.as_deref(),
            &format!(
                "deploy of {id} (artifact sha256 {sha}) by pid {}",
                std::process::id()
            ),
        );
        self.inner
            .start_deploy(&id, previous.as_ref(), reactivate)?;
        tracing::info!(app = %self.app().name, release = %id, sha256 = %sha, "deploying");

        let result = self.deploy_steps(
            &id,
            previous.as_ref(),
            &cached,
            &sha,
            reactivate,
            &mut timer,
        );
        let stats = match result {
            Ok(s) => s,
            Err(err) => {
                let live = self.live.take();
                let reached_current = self.inner.current()?.as_ref() == Some(&id);
                let mut restorer = live.clone().map(|failed| self.deployer.restorer(failed));
                let outcome = self.inner.undo_deploy(
                    &id,
                    previous.as_ref(),
                    &err.to_string(),
                    true,
                    restorer.as_mut().map(|r| r as &mut dyn release::Service),
                )?;
                if !reached_current {
                    log_line(timer.log.as_deref(), &format!("FAILED: {err}; {outcome}"));
                    return Err(DeployError::DeployFailed {
                        id,
                        outcome,
                        source: Box::new(err),
                    });
                }
                // It went live and failed: report a rollback, not an error.
                tracing::warn!(release = %id, error = %err, "deploy rolled back: {outcome}");
                log_line(
                    timer.log.as_deref(),
                    &format!("ROLLED BACK: {err}; {outcome}"),
                );
                let r = self.journal().get(&id).cloned();
                return Ok(DeployReport {
                    app: self.app().name.clone(),
                    release: id,
                    outcome: Outcome::RolledBack,
                    failure: Some(err.to_string()),
                    restored: Some(outcome),
                    activation: live,
                    health: None,
                    previous,
                    artifact_sha256: sha,
                    method: "unpacked",
                    files: r.as_ref().map_or(0, |r| r.files),
                    bytes: r.as_ref().map_or(0, |r| r.bytes),
                    reused_files: 0,
                    new_objects: 0,
                    total_ms: timer.total_ms(),
                    steps: timer.steps,
                    pruned: Vec::new(),
                });
            }
        };
        let (activation, health) = match self.served.take() {
            Some((a, h)) => (Some(a), h),
            None => (None, None),
        };
        self.live = None;
        fault::point("before_commit");
        self.inner
            .commit_deploy(&id, activation.as_ref().and_then(|a| a.port))?;
        timer.lap("commit");
        let pruned = match self.prune(self.app().keep) {
            Ok(r) => r.store.removed,
            Err(e) => {
                tracing::warn!(error = %e, "prune after deploy failed; the deploy itself succeeded");
                Vec::new()
            }
        };
        timer.lap("prune");
        Ok(DeployReport {
            app: self.app().name.clone(),
            release: id,
            outcome: Outcome::Succeeded,
            failure: None,
            restored: None,
            activation,
            health,
            previous,
            artifact_sha256: sha,
            method: stats.method,
            files: stats.files,
            bytes: stats.bytes,
            reused_files: stats.reused_files,
            new_objects: stats.new_objects,
            total_ms: timer.total_ms(),
            steps: timer.steps,
            pruned,
        })
    }

    fn deploy_steps(
        &mut self,
        id: &ReleaseId,
        previous: Option<&ReleaseId>,
        cached: &Path,
        sha: &str,
        reactivate: bool,
        timer: &mut Timer,
    ) -> Result<UnpackStats> {
        let mut stats = UnpackStats {
            method: "reactivated",
            ..UnpackStats::default()
        };
        if !reactivate {
            stats = self.inner.unpack(id, cached, sha)?;
            // A release whose files are all in the content store is rebuilt
            // from its manifest by hardlinks: nothing is unpacked.
            timer.lap(if stats.method == "unpacked" {
                "unpack"
            } else {
                "rebuild"
            });
            self.inner.link_shared(id)?;
            timer.lap("link_shared");
            self.inner.before_activate(id, previous)?;
            timer.lap("before_activate");
        } else {
            let r = self.journal().get(id).cloned();
            stats.files = r.as_ref().map_or(0, |r| r.files);
            stats.bytes = r.as_ref().map_or(0, |r| r.bytes);
        }

        self.inner.switch_to(id)?;
        timer.lap("activate");

        self.served = Some(self.serve(id)?);
        timer.lap("driver_and_health");

        self.inner.after_activate(id, previous)?;
        timer.lap("after_activate");
        Ok(stats)
    }

    /// Switches back to the previous good release (or `to`), marking the
    /// release rolled away from as bad, and puts it in service. Entirely
    /// node-local.
    /// Names who asked for this operation: a rollback's reason for marking
    /// the release bad says it ("… by alice on the node").
    pub fn set_actor(&mut self, who: impl Into<String>) {
        self.inner.set_actor(who);
    }

    pub fn rollback(&mut self, to: Option<&ReleaseId>) -> Result<RollbackReport> {
        self.run_again("rollback")?;
        self.settle_cut_short()?;
        let (from, to) = self.inner.rollback(to)?;
        // Serve the release rolled back to. A failure here does not undo the
        // rollback (the operator asked for this release); it is reported.
        let (activation, health, mut problem) = match self.serve(&to) {
            Ok((a, h)) => (Some(a), h, None),
            Err(e) => (self.live.take(), None, Some(e.to_string())),
        };
        self.live = None;
        self.inner
            .record_port(&to, activation.as_ref().and_then(|a| a.port))?;
        // The release rolled back to is live again: its after_activate hooks
        // run as after a deploy (cache warm-up, a notification, the
        // activations log). A failing hook is reported, not undone.
        if problem.is_none() {
            if let Err(e) = self.inner.after_activate(&to, from.as_ref()) {
                problem = Some(e.to_string());
            }
        }
        Ok(RollbackReport {
            app: self.app().name.clone(),
            from,
            to,
            activation,
            health,
            problem,
        })
    }

    /// Removes old releases (see [`release::Session::prune`]) and the
    /// driver's images of releases gone, and records the prune for
    /// `status`.
    pub fn prune(&mut self, keep: usize) -> Result<PruneReport> {
        let store = self.inner.prune(keep)?;
        let report = PruneReport {
            image_bytes_freed: self.prune_driver_images().unwrap_or(0),
            store,
        };
        PruneRecord {
            at: OffsetDateTime::now_utc(),
            trigger: "prune".into(),
            bytes_freed: report.store.bytes_freed
                + report.store.cached_artifact_bytes_freed
                + report.image_bytes_freed,
            detail: serde_json::to_value(&report).unwrap_or_default(),
        }
        .save(&self.paths().root);
        Ok(report)
    }

    /// Has the driver remove its per-release images of releases gone from
    /// the journal; returns the bytes freed, or `None` without a driver. A
    /// failure is only a warning (nothing freed).
    fn prune_driver_images(&self) -> Option<u64> {
        let driver = self.deployer.driver()?;
        let kept: Vec<ReleaseId> = self
            .journal()
            .releases
            .iter()
            .map(|r| r.id.clone())
            .collect();
        Some(driver.prune_images(self.app(), &kept).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not prune the driver's images");
            0
        }))
    }

    /// Frees space in order — the driver's images of releases gone, rotated
    /// logs past retention, cached artifacts (all but those of the current
    /// release and the rollback target), unreferenced store objects — until
    /// free space is back above `threshold`. Never touches a release.
    pub fn relieve_pressure(&mut self, threshold: u64) -> Result<PressureReport> {
        let root = self.paths().root.clone();
        let free = || SpaceGuard::available(&root).map_err(ReleaseError::io("stat", &root));
        let free_before = free()?;
        let mut report = PressureReport {
            threshold,
            free_before,
            free_after: free_before,
            steps: Vec::new(),
            relieved: free_before >= threshold,
        };
        let app = self.app().clone();
        let current = self.inner.current()?;
        let target = self.journal().rollback_target(current.as_ref()).cloned();
        for step in [
            "docker images",
            "rotated logs",
            "cached artifacts",
            "store objects",
        ] {
            if report.free_after >= threshold {
                break;
            }
            let freed = match step {
                "docker images" => match self.prune_driver_images() {
                    Some(bytes) => bytes,
                    None => continue,
                },
                "rotated logs" => crate::logs::discover(&app)
                    .iter()
                    .filter_map(|log| crate::logs::retain(&log.path, app.logs.keep).ok())
                    .map(|(_, bytes)| bytes)
                    .sum(),
                "cached artifacts" => {
                    let keep: Vec<String> = [
                        current.as_ref().and_then(|c| self.journal().get(c)),
                        target.as_ref(),
                    ]
                    .into_iter()
                    .flatten()
                    .map(|r| r.artifact_sha256.clone())
                    .collect();
                    self.inner.remove_cached_except(&keep)?.1
                }
                _ => self.inner.collect_objects()?.bytes_freed,
            };
            report.steps.push((step.to_owned(), freed));
            report.free_after = free()?;
        }
        report.relieved = report.free_after >= threshold;
        let total: u64 = report.steps.iter().map(|(_, b)| b).sum();
        if report.relieved {
            tracing::info!(app = %app.name, freed = total, "disk pressure relieved");
        } else {
            tracing::error!(app = %app.name, free = report.free_after, threshold, "disk pressure persists after pruning everything the agent may prune");
        }
        PruneRecord {
            at: OffsetDateTime::now_utc(),
            trigger: "disk_pressure".into(),
            bytes_freed: total,
            detail: serde_json::to_value(&report).unwrap_or_default(),
        }
        .save(&root);
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::release::ReleaseId;

    fn store_for(dir: &Path) -> Deployer {
        let root = dir.join("app");
        let text = format!("[apps.web]\nroot = \"{}\"\n", root.display());
        let config = Config::parse(&dir.join("agent.toml"), &text).unwrap();
        Deployer::new(config.app("web").unwrap(), &Bridge::current())
    }

    fn artifact(dir: &Path, version: &str) -> PathBuf {
        let src = dir.join(format!("src-{version}"));
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("VERSION"), version).unwrap();
        let out = dir.join(format!("{version}.tar.gz"));
        crate::artifact::pack_dir(&src, &out, crate::artifact::Compression::Gzip).unwrap();
        out
    }

    fn deploy(store: &Deployer, req: &DeployRequest) -> Result<DeployReport> {
        store.begin("deploy", req.id.as_ref()).unwrap().deploy(req)
    }

    /// A claim that the artifact was verified is taken only for the
    /// app's own cache entry of that digest; any other file is checked.
    #[tokio::test]
    async fn only_the_cache_entry_itself_skips_the_second_hash() {
        let dir = tempfile::tempdir().unwrap();
        let store = store_for(dir.path());
        let v1 = artifact(dir.path(), "v1");
        let v2 = artifact(dir.path(), "v2");
        let sha1 = Sha256::of_file(&v1).unwrap();
        // The v2 file claimed "verified" as v1's digest, outside the cache:
        // copied and hashed, so refused.
        let lie = cache::Fetched {
            path: v2.clone(),
            sha256: sha1.clone(),
            bytes: 1,
            cached: true,
        };
        let refused = deploy(
            &store,
            &DeployRequest {
                artifact: v2.clone(),
                sha256: Some(sha1.clone()),
                id: Some(ReleaseId::new("r1").unwrap()),
                verified: Some(lie),
            },
        );
        assert!(refused.is_err(), "a mislabelled file was deployed");
        // The real cache entry, verified by a lookup: deployed as is.
        let cache_dir = store.paths().cache.clone();
        let entry = cache::copy_file(&cache_dir, &v1, Some(&sha1)).unwrap();
        let report = deploy(
            &store,
            &DeployRequest {
                artifact: entry.path.clone(),
                sha256: Some(sha1),
                id: Some(ReleaseId::new("r1").unwrap()),
                verified: Some(entry),
            },
        )
        .unwrap();
        assert_eq!(report.outcome, Outcome::Succeeded);
        let current = fs::read_to_string(dir.path().join("app/current/VERSION")).unwrap();
        assert_eq!(current, "v1");
    }
}
