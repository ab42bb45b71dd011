//! The release store of one app: deploy, rollback, prune, verify.
//!
//! # State machine of a deploy
//!
//! ```text
//! Started ─fetch+verify─▶ Fetched ─unpack─▶ Unpacked ─link shared─▶ Linked
//!   ─before_activate─▶ Hooked ─syncfs, switch current─▶ Activated
//!   ─driver.activate, health gate, driver.commit─▶ ─after_activate─▶ commit (good) ─▶ prune
//! ```
//!
//! The journal records the step before and after each transition. A failure
//! (or a crash, found by the next process that takes the lock) *undoes* an
//! uncommitted deploy: `current` goes back to the previous release, staging is
//! removed, and a release that reached `releases/` is kept as `failed` with the
//! reason. From `Activated` on, the driver may be running the new release, so
//! the undo also has the driver restart the previous one (and checks its
//! health); a deploy that failed there is reported `rolled_back`, not as an
//! error. A rollback that already switched `current` is finished; one that did
//! not is dropped. A prune is always finished.

pub mod activate;
pub mod hooks;
pub mod id;
pub mod journal;
pub mod manifest;
pub mod objects;
pub mod shared;
pub mod unpack;
mod verify;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::bridge::Bridge;
use crate::config::AppConfig;
use crate::digest::{self, HashingWriter, Sha256};
use crate::driver::{self, Activation, Target};
use crate::health::{self, GatePassed, ProbeTarget};
use crate::{durable, fault, lock};
pub use id::{InvalidId, ReleaseId};
pub use journal::{DeployStep, Journal, Operation, Release, ReleaseStatus};
pub use crate::lock::{CachePin, Holder, LockError};
use manifest::Manifest;
use objects::ObjectStore;
pub use verify::{Finding, VerifyReport};

/// Everything that can go wrong in the release store.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error(transparent)]
    Unpack(#[from] unpack::UnpackError),
    #[error(transparent)]
    Hook(#[from] hooks::HookError),
    #[error(transparent)]
    Shared(#[from] shared::SharedError),
    #[error(transparent)]
    InvalidId(#[from] InvalidId),
    #[error(transparent)]
    Driver(#[from] driver::DriverError),
    #[error(transparent)]
    Gate(#[from] health::GateFailed),
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("artifact {path} has sha256 {actual}, expected {expected}")]
    Checksum {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error(transparent)]
    BadSha256(#[from] digest::BadSha256),
    #[error(
        "release {id} already exists with artifact sha256 {existing}, not {new}; deploy it under a new id"
    )]
    IdConflict {
        id: ReleaseId,
        existing: String,
        new: String,
    },
    #[error("app {app:?} has no release {id} (releases: {known})")]
    UnknownRelease {
        app: String,
        id: ReleaseId,
        known: String,
    },
    #[error(
        "app {app:?} has no good release to roll back to {}",
        current.as_ref().map_or("(nothing is deployed)".to_owned(), |c| format!("other than the current one ({c})"))
    )]
    NoRollbackTarget {
        app: String,
        current: Option<ReleaseId>,
    },
    #[error("app {app:?} has no release deployed")]
    NothingDeployed { app: String },
    #[error("release {id} is already current")]
    AlreadyCurrent { id: ReleaseId },
    #[error("release {id} never deployed successfully ({reason}); it cannot be activated")]
    NotActivatable { id: ReleaseId, reason: String },
    #[error("deploy of release {id} failed: {source}; {outcome}")]
    DeployFailed {
        id: ReleaseId,
        outcome: String,
        source: Box<ReleaseError>,
    },
}

impl ReleaseError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}

type Result<T, E = ReleaseError> = std::result::Result<T, E>;

/// The on-disk layout of one app (see DESIGN.md).
#[derive(Debug, Clone)]
pub struct Paths {
    pub root: PathBuf,
    pub releases: PathBuf,
    pub shared: PathBuf,
    pub meta: PathBuf,
    pub journal: PathBuf,
    pub lock: PathBuf,
    pub cache: PathBuf,
    /// Fetches into `cache` hold it shared; a prune's cache clean-up needs
    /// it exclusively ([`lock::CachePin`]).
    pub cache_lock: PathBuf,
    pub objects: PathBuf,
    pub staging: PathBuf,
    pub manifests: PathBuf,
    pub logs: PathBuf,
    /// Releases being deleted are renamed here first, so `releases/` never
    /// shows a half-deleted tree.
    pub trash: PathBuf,
}

impl Paths {
    pub fn new(root: &Path) -> Self {
        let meta = root.join(".slipway");
        Self {
            root: root.to_owned(),
            releases: root.join("releases"),
            shared: root.join("shared"),
            journal: meta.join("journal.json"),
            lock: meta.join("lock"),
            cache: meta.join("cache"),
            cache_lock: meta.join("cache.lock"),
            objects: meta.join("objects"),
            staging: meta.join("staging"),
            manifests: meta.join("manifests"),
            logs: meta.join("logs"),
            trash: meta.join("trash"),
            meta,
        }
    }

    pub fn release(&self, id: &ReleaseId) -> PathBuf {
        self.releases.join(id.as_str())
    }

    pub fn manifest(&self, id: &ReleaseId) -> PathBuf {
        self.manifests.join(format!("{id}.json"))
    }

    pub fn log(&self, id: &ReleaseId) -> PathBuf {
        self.logs.join(format!("{id}.log"))
    }
}

/// One app's release store.
#[derive(Debug, Clone)]
pub struct Store {
    app: AppConfig,
    paths: Paths,
    objects: ObjectStore,
    /// Handed to the app's driver: how it blocks on an async client.
    bridge: Bridge,
}

/// What to deploy.
#[derive(Debug, Clone)]
pub struct DeployRequest {
    pub artifact: PathBuf,
    pub sha256: Option<String>,
    pub id: Option<ReleaseId>,
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

/// The outcome of a prune.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub removed: Vec<ReleaseId>,
    pub kept: Vec<ReleaseId>,
    pub objects_removed: u64,
    /// Bytes freed by collecting store objects.
    pub bytes_freed: u64,
    pub cached_artifacts_removed: u64,
    pub cached_artifact_bytes_freed: u64,
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

/// The last prune of an app, kept in `.slipway/prune-last.json` for `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PruneRecord {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// `prune` (command or after a deploy) or `disk_pressure`.
    pub trigger: String,
    pub bytes_freed: u64,
    pub detail: serde_json::Value,
}

impl PruneRecord {
    pub fn path(root: &Path) -> PathBuf {
        root.join(".slipway/prune-last.json")
    }

    pub fn load(root: &Path) -> Option<Self> {
        durable::read_json(&Self::path(root))
    }

    fn save(&self, root: &Path) {
        if let Err(e) = durable::write_json(&Self::path(root), self) {
            tracing::warn!(error = %e, "cannot record the prune");
        }
    }
}

/// A release as `releases` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ReleaseView {
    #[serde(flatten)]
    pub release: Release,
    pub current: bool,
    pub rollback_target: bool,
    /// Whether `releases/<id>` exists on disk.
    pub present: bool,
    pub path: PathBuf,
    pub log: Option<PathBuf>,
}

/// The state of one app, as `releases` and `status` show it.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub app: String,
    pub root: PathBuf,
    pub current: Option<ReleaseId>,
    pub rollback_target: Option<ReleaseId>,
    /// An operation running right now (lock held) or left by a crash.
    pub in_progress: Option<Operation>,
    pub lock_holder: Option<Holder>,
    /// What recovery did when this snapshot was taken, if anything.
    pub recovered: Option<String>,
    pub releases: Vec<ReleaseView>,
}

impl Store {
    /// The store of `app`; its driver (for deploys, rollbacks, restarts,
    /// prunes and crash recovery) reaches async clients through `bridge`.
    pub fn new(app: &AppConfig, bridge: &Bridge) -> Self {
        let paths = Paths::new(&app.root);
        Self {
            objects: ObjectStore::new(paths.objects.clone()),
            app: app.clone(),
            paths,
            bridge: bridge.clone(),
        }
    }

    /// The app's driver, if it has one.
    fn driver(&self) -> Option<Box<dyn driver::Driver>> {
        driver::for_app(&self.app, &self.bridge)
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    pub fn app(&self) -> &AppConfig {
        &self.app
    }

    /// How blocking work on this store reaches async clients (its driver's,
    /// an artifact download's).
    pub fn bridge(&self) -> &Bridge {
        &self.bridge
    }

    fn ensure_layout(&self) -> Result<()> {
        let p = &self.paths;
        for dir in [
            &p.root,
            &p.releases,
            &p.shared,
            &p.meta,
            &p.cache,
            &p.objects,
            &p.staging,
            &p.manifests,
            &p.logs,
            &p.trash,
        ] {
            fs::create_dir_all(dir).map_err(ReleaseError::io("create", dir))?;
        }
        Ok(())
    }

    /// Takes the app's lock (failing at once, naming the holder, if it is
    /// held), reads the journal and recovers from any interrupted operation.
    pub fn begin(&self, operation: &str, release: Option<&ReleaseId>) -> Result<Session<'_>> {
        self.ensure_layout()?;
        let holder = Holder {
            pid: std::process::id(),
            operation: operation.to_owned(),
            release: release.map(ToString::to_string),
            started_at: OffsetDateTime::now_utc(),
        };
        let lock = lock::AppLock::acquire(&self.paths.lock, &self.app.name, &holder)?;
        let journal = Journal::load(&self.paths.journal, &self.app.name)?;
        let mut session = Session {
            store: self,
            journal,
            lock,
            holder,
            live: None,
            served: None,
            recovered: None,
        };
        session.recovered = session.recover()?;
        Ok(session)
    }

    /// Fails, naming the holder, when some process holds the app's lock
    /// right now; takes nothing. A deploy asks this before fetching its
    /// artifact, so it does not download only to find the app busy.
    pub fn check_idle(&self, operation: &str, release: Option<&ReleaseId>) -> Result<()> {
        self.ensure_layout()?;
        let holder = Holder {
            pid: std::process::id(),
            operation: operation.to_owned(),
            release: release.map(ToString::to_string),
            started_at: OffsetDateTime::now_utc(),
        };
        lock::AppLock::acquire(&self.paths.lock, &self.app.name, &holder)?;
        Ok(())
    }

    /// Pins the artifact cache for a fetch that runs without the app's
    /// lock: until the pin is dropped — once the deploy holds the lock — no
    /// prune removes anything from the cache (see [`lock::CachePin`]).
    pub fn pin_cache(&self) -> Result<CachePin> {
        self.ensure_layout()?;
        Ok(CachePin::acquire(&self.paths.cache_lock)?)
    }

    /// The app's state. Recovers first when no one holds the lock; otherwise
    /// reads the journal as it stands and reports who holds the lock.
    pub fn snapshot(&self) -> Result<Snapshot> {
        if !self.paths.meta.exists() {
            return Ok(Snapshot {
                app: self.app.name.clone(),
                root: self.paths.root.clone(),
                current: activate::read_current(&self.paths.root).ok().flatten(),
                rollback_target: None,
                in_progress: None,
                lock_holder: None,
                recovered: None,
                releases: Vec::new(),
            });
        }
        // Reading takes no lock, so polling `releases`/`status` never makes a
        // deploy fail with "busy". Only a journal left mid-operation by a dead
        // process needs the lock, to recover.
        let mut journal = Journal::load(&self.paths.journal, &self.app.name)?;
        if journal.op.is_some() && !lock::is_held(&self.paths.lock) {
            match self.begin("recover", None) {
                Ok(session) => return session.snapshot(),
                // Someone took the lock in between: read what they wrote.
                Err(ReleaseError::Lock(LockError::Busy { .. })) => {
                    journal = Journal::load(&self.paths.journal, &self.app.name)?;
                }
                Err(e) => return Err(e),
            }
        }
        let mut snap = snapshot_of(self, &journal)?;
        if lock::is_held(&self.paths.lock) {
            snap.lock_holder = lock::read_holder(&self.paths.lock);
        }
        Ok(snap)
    }

    /// Re-hashes release `id` (default: current) against its manifest.
    pub fn verify(&self, id: Option<&ReleaseId>) -> Result<VerifyReport> {
        let id = match id {
            Some(id) => id.clone(),
            None => activate::read_current(&self.paths.root)
                .map_err(ReleaseError::io("read", &self.paths.root.join("current")))?
                .ok_or_else(|| ReleaseError::NothingDeployed {
                    app: self.app.name.clone(),
                })?,
        };
        let manifest_path = self.paths.manifest(&id);
        let manifest = Manifest::load(&manifest_path).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ReleaseError::UnknownRelease {
                    app: self.app.name.clone(),
                    id: id.clone(),
                    known: "see `releases`".into(),
                }
            } else {
                ReleaseError::io("read", &manifest_path)(e)
            }
        })?;
        verify::verify(&self.app, &id, &self.paths.release(&id), &manifest)
            .map_err(ReleaseError::io("verify", &self.paths.release(&id)))
    }
}

fn snapshot_of(store: &Store, journal: &Journal) -> Result<Snapshot> {
    let p = &store.paths;
    let current = activate::read_current(&p.root)
        .map_err(ReleaseError::io("read", &p.root.join("current")))?;
    let target = journal
        .rollback_target(current.as_ref())
        .map(|r| r.id.clone());
    let releases = journal
        .releases
        .iter()
        .map(|r| {
            let log = p.log(&r.id);
            ReleaseView {
                current: Some(&r.id) == current.as_ref(),
                rollback_target: Some(&r.id) == target.as_ref(),
                present: p.release(&r.id).is_dir(),
                path: p.release(&r.id),
                log: log.exists().then_some(log),
                release: r.clone(),
            }
        })
        .collect();
    Ok(Snapshot {
        app: store.app.name.clone(),
        root: p.root.clone(),
        current,
        rollback_target: target,
        in_progress: journal.op.clone(),
        lock_holder: None,
        recovered: None,
        releases,
    })
}

/// A locked app: every mutation happens through one.
#[derive(Debug)]
pub struct Session<'a> {
    store: &'a Store,
    journal: Journal,
    lock: lock::AppLock,
    holder: Holder,
    /// Set once the driver was asked to run the release being deployed (with
    /// what it brought up, as far as known): a failure from then on must also
    /// put the previous release back in service.
    live: Option<Activation>,
    /// What the driver and gate did for the release being deployed.
    served: Option<(Activation, Option<GatePassed>)>,
    /// What recovery did when the session began.
    pub recovered: Option<String>,
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
        &self.store.paths
    }

    fn app(&self) -> &AppConfig {
        &self.store.app
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    fn save(&self) -> Result<()> {
        Ok(self.journal.save(&self.paths().journal)?)
    }

    fn current(&self) -> Result<Option<ReleaseId>> {
        let root = &self.paths().root;
        activate::read_current(root).map_err(ReleaseError::io("read", &root.join("current")))
    }

    pub fn snapshot(&self) -> Result<Snapshot> {
        let mut snap = snapshot_of(self.store, &self.journal)?;
        snap.recovered = self.recovered.clone();
        Ok(snap)
    }

    /// Finishes or undoes whatever the journal says was in flight, and clears
    /// leftovers (staging, trash, temp links).
    fn recover(&mut self) -> Result<Option<String>> {
        let p = self.paths().clone();
        activate::clean_temp_links(&p.root).map_err(ReleaseError::io("clean", &p.root))?;
        let op = self.journal.op.clone();
        let what = match op {
            None => None,
            Some(Operation::Deploy {
                release,
                previous,
                step,
                pid,
                reactivate,
                ..
            }) => {
                let reason = format!("deploy interrupted at step {step:?} (process {pid} died)");
                // From `Activated` on, the driver may be running the release.
                let live = (step >= DeployStep::Activated).then(Activation::default);
                let outcome = self.undo_deploy(
                    &release,
                    previous.as_ref(),
                    &reason,
                    !reactivate,
                    live.as_ref(),
                )?;
                Some(format!("{reason}: {outcome}"))
            }
            Some(Operation::Rollback { from, to, pid, .. }) => {
                if self.current()?.as_ref() == Some(&to) {
                    self.finish_rollback(from.as_ref(), &to)?;
                    Some(format!(
                        "finished rollback to {to} interrupted in process {pid}"
                    ))
                } else {
                    self.journal.op = None;
                    self.save()?;
                    Some(format!(
                        "dropped rollback to {to} that process {pid} had not started"
                    ))
                }
            }
            Some(Operation::Prune { remove, pid, .. }) => {
                self.finish_prune(&remove)?;
                Some(format!(
                    "finished prune of {} interrupted in process {pid}",
                    join_ids(&remove)
                ))
            }
        };
        // Leftovers of interrupted steps; nothing in them is referenced.
        for dir in [&p.staging, &p.trash] {
            for entry in fs::read_dir(dir).map_err(ReleaseError::io("read", dir))? {
                let entry = entry.map_err(ReleaseError::io("read", dir))?;
                durable::remove_tree(&entry.path())
                    .map_err(ReleaseError::io("remove", &entry.path()))?;
            }
        }
        if let Some(w) = &what {
            tracing::warn!(app = %self.app().name, "recovered: {w}");
        }
        Ok(what)
    }

    /// Undoes an uncommitted deploy of `id`: `current` back to `previous`,
    /// staging removed, the release kept as failed if it reached `releases/`.
    /// `live` is set when the driver may be running `id`: the previous
    /// release is then put back in service through the driver too.
    fn undo_deploy(
        &mut self,
        id: &ReleaseId,
        previous: Option<&ReleaseId>,
        reason: &str,
        mark_failed: bool,
        live: Option<&Activation>,
    ) -> Result<String> {
        let p = self.paths().clone();
        let mut outcome = String::new();
        let mut restored_to = None;
        if self.current()?.as_ref() == Some(id) {
            match previous {
                Some(prev) if p.release(prev).is_dir() => {
                    activate::switch(&p.root, prev).map_err(ReleaseError::io("switch", &p.root))?;
                    outcome = format!("current restored to {prev}");
                    restored_to = Some(prev.clone());
                }
                _ => {
                    activate::clear(&p.root)
                        .map_err(ReleaseError::io("remove", &p.root.join("current")))?;
                    outcome = "current removed (there was no previous release)".into();
                }
            }
        }
        if let Some(failed) = live {
            outcome.push_str("; ");
            outcome.push_str(&self.restore_previous(restored_to.as_ref(), failed));
        }
        let staging = p.staging.join(id.as_str());
        durable::remove_tree(&staging).map_err(ReleaseError::io("remove", &staging))?;
        if p.release(id).is_dir() {
            if self.journal.get(id).is_none() {
                // Renamed into place but not yet recorded.
                let manifest = Manifest::load(&p.manifest(id)).ok();
                self.journal.releases.push(Release {
                    id: id.clone(),
                    status: ReleaseStatus::Failed,
                    created_at: OffsetDateTime::now_utc(),
                    activated_at: None,
                    artifact_sha256: manifest
                        .as_ref()
                        .map(|m| m.artifact_sha256.clone())
                        .unwrap_or_default(),
                    files: manifest.as_ref().map_or(0, Manifest::file_count),
                    bytes: manifest.as_ref().map_or(0, Manifest::total_bytes),
                    reason: None,
                    port: None,
                });
            }
            if mark_failed {
                self.journal
                    .mark(id, ReleaseStatus::Failed, Some(reason.to_owned()));
                if !outcome.is_empty() {
                    outcome.push_str("; ");
                }
                outcome.push_str(&format!("release {id} kept as failed"));
            }
        } else {
            self.journal.releases.retain(|r| &r.id != id);
            let _ = fs::remove_file(p.manifest(id));
            if outcome.is_empty() {
                outcome = match self.current()? {
                    Some(c) => format!("current still {c}"),
                    None => "no current release".into(),
                };
            }
        }
        self.journal.op = None;
        self.save()?;
        Ok(outcome)
    }

    /// Runs release `id` (which `current` points at) with the app's driver
    /// and holds it to the readiness gate.
    fn serve(&mut self, id: &ReleaseId) -> Result<(Activation, Option<GatePassed>)> {
        let app = self.app().clone();
        let mut activation = Activation::default();
        let driven = match self.store.driver() {
            Some(driver) => Some((Target::new(&app, id)?, driver)),
            None => None,
        };
        if let Some((target, driver)) = &driven {
            // From here on a failure must also restart the previous release.
            self.live = Some(Activation::default());
            activation = driver.activate(target)?;
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
                let passed = health::gate(cfg, &target).inspect_err(|e| {
                    log_line(Some(&self.paths().log(id)), &e.to_string());
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
        if let Some((target, driver)) = &driven {
            if let Err(e) = driver.commit(target, &activation) {
                // The new release serves and is healthy; leftovers of the old
                // one are worth a warning, not a rollback.
                tracing::warn!(error = %e, "could not retire the previous release's processes");
            }
        }
        Ok((activation, health))
    }

    /// Puts `previous` (now `current` again) back in service after `failed`
    /// went wrong, and says how that went. Best effort: the switch back
    /// already happened, and what fails here is reported, not raised.
    fn restore_previous(&mut self, previous: Option<&ReleaseId>, failed: &Activation) -> String {
        let app = self.app().clone();
        let Some(driver) = self.store.driver() else {
            return "no driver configured".into();
        };
        let Some(prev) = previous else {
            return match driver.stop(&app) {
                Ok(()) => format!("{} stopped the app (no previous release)", driver.name()),
                Err(e) => format!("stopping the app failed: {e}"),
            };
        };
        let target = match Target::new(&app, prev) {
            Ok(t) => t,
            Err(e) => return format!("cannot restart {prev}: {e}"),
        };
        let restored = match driver.restore(&target, failed) {
            Ok(a) => a,
            Err(e) => return format!("{} could not restart {prev}: {e}", driver.name()),
        };
        let mut out = format!("{} restarted {prev}", driver.name());
        if let Some(cfg) = &app.health {
            let probe_target = ProbeTarget {
                port: restored.port,
                cwd: self.paths().release(prev),
            };
            match health::gate(cfg, &probe_target) {
                Ok(p) => out.push_str(&format!(" and it is healthy ({})", p.last.output)),
                Err(e) => out.push_str(&format!(" but it is not healthy either: {e}")),
            }
        }
        if let Err(e) = driver.commit(&target, &restored) {
            out.push_str(&format!(" (cleanup of the failed release: {e})"));
        }
        if let Some(r) = self.journal.get_mut(prev) {
            r.port = restored.port.or(r.port);
        }
        out
    }

    /// Restarts the current release through the driver and holds it to the
    /// health gate (`slipway-agent restart`).
    pub fn restart(&mut self) -> Result<(ReleaseId, Activation, Option<GatePassed>)> {
        let current = self
            .current()?
            .ok_or_else(|| ReleaseError::NothingDeployed {
                app: self.app().name.clone(),
            })?;
        let (a, h) = self.serve(&current)?;
        self.live = None;
        self.record_port(&current, a.port)?;
        Ok((current, a, h))
    }

    /// Records the port the driver now serves `id` on (for liveness checks
    /// that use `{port}`); no port leaves the journal as it is.
    fn record_port(&mut self, id: &ReleaseId, port: Option<u16>) -> Result<()> {
        let Some(port) = port else { return Ok(()) };
        if let Some(r) = self.journal.get_mut(id) {
            r.port = Some(port);
        }
        self.save()
    }

    fn set_step(&mut self, new: DeployStep) -> Result<()> {
        if let Some(Operation::Deploy { step, .. }) = &mut self.journal.op {
            *step = new;
        }
        self.save()
    }

    /// Deploys an artifact: the whole state machine above, under the lock.
    pub fn deploy(&mut self, req: &DeployRequest) -> Result<DeployReport> {
        let mut timer = Timer::new();
        let (cached, sha) = self.fetch(&req.artifact, req.sha256.as_deref())?;
        timer.lap("fetch");
        let previous = self.current()?;
        let id = match &req.id {
            Some(id) => id.clone(),
            None => self.fresh_id(&sha),
        };
        let mut reactivate = false;
        if let Some(existing) = self.journal.get(&id).cloned() {
            if existing.artifact_sha256 != sha {
                return Err(ReleaseError::IdConflict {
                    id,
                    existing: existing.artifact_sha256,
                    new: sha,
                });
            }
            if existing.status == ReleaseStatus::Good {
                if previous.as_ref() == Some(&id) {
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
                reactivate = true;
            } else {
                // A failed or bad release under the same id is replaced.
                self.remove_release_files(&id)?;
                self.journal.releases.retain(|r| r.id != id);
            }
        }
        self.holder.release = Some(id.to_string());
        self.lock.update(&self.holder);
        timer.log = Some(self.paths().log(&id));
        log_line(
            timer.log.as_deref(),
            &format!(
                "deploy of {id} (artifact sha256 {sha}) by pid {}",
                std::process::id()
            ),
        );
        self.journal.op = Some(Operation::Deploy {
            release: id.clone(),
            previous: previous.clone(),
            step: DeployStep::Fetched,
            pid: std::process::id(),
            started_at: OffsetDateTime::now_utc(),
            reactivate,
        });
        self.save()?;
        fault::point("after_fetch");
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
                let reached_current = self.current()?.as_ref() == Some(&id);
                let outcome = self.undo_deploy(
                    &id,
                    previous.as_ref(),
                    &err.to_string(),
                    true,
                    live.as_ref(),
                )?;
                if !reached_current {
                    log_line(timer.log.as_deref(), &format!("FAILED: {err}; {outcome}"));
                    return Err(ReleaseError::DeployFailed {
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
                let r = self.journal.get(&id).cloned();
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
        let now = OffsetDateTime::now_utc();
        if let Some(r) = self.journal.get_mut(&id) {
            r.status = ReleaseStatus::Good;
            r.reason = None;
            r.activated_at = Some(now);
            r.port = activation.as_ref().and_then(|a| a.port);
        }
        self.journal.op = None;
        self.save()?;
        timer.lap("commit");
        let pruned = match self.prune(self.app().keep) {
            Ok(r) => r.removed,
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
        let p = self.paths().clone();
        let app = self.app().clone();
        let release_dir = p.release(id);
        let log = p.log(id);
        let mut stats = UnpackStats {
            method: "reactivated",
            ..UnpackStats::default()
        };
        if !reactivate {
            stats = self.build_release(id, cached, sha)?;
            timer.lap("unpack");
            let manifest = Manifest::load(&p.manifest(id))
                .map_err(ReleaseError::io("read", &p.manifest(id)))?;
            self.journal.releases.push(Release {
                id: id.clone(),
                status: ReleaseStatus::Deploying,
                created_at: OffsetDateTime::now_utc(),
                activated_at: None,
                artifact_sha256: sha.to_owned(),
                files: manifest.file_count(),
                bytes: manifest.total_bytes(),
                reason: None,
                port: None,
            });
            self.set_step(DeployStep::Unpacked)?;
            fault::point("after_unpack");

            shared::link(&app, &p.shared, &release_dir)?;
            self.set_step(DeployStep::Linked)?;
            fault::point("after_link");
            timer.lap("link_shared");

            let ctx = hooks::HookContext {
                app: &app.name,
                release: id.as_str(),
                previous: previous.map(ReleaseId::as_str),
                release_dir: &release_dir,
                log: &log,
                timeout: app.hooks.timeout,
            };
            hooks::run("before_activate", &app.hooks.before_activate, &ctx)?;
            self.set_step(DeployStep::Hooked)?;
            fault::point("after_hooks");
            timer.lap("before_activate");
        } else {
            let r = self.journal.get(id).cloned();
            stats.files = r.as_ref().map_or(0, |r| r.files);
            stats.bytes = r.as_ref().map_or(0, |r| r.bytes);
        }

        // Everything the release holds reaches the disk before it goes live.
        let root = File::open(&p.root).map_err(ReleaseError::io("open", &p.root))?;
        nix::unistd::syncfs(&root).map_err(|e| ReleaseError::io("sync", &p.root)(e.into()))?;
        activate::switch(&p.root, id).map_err(ReleaseError::io("switch current in", &p.root))?;
        fault::point("after_switch");
        self.set_step(DeployStep::Activated)?;
        timer.lap("activate");

        self.served = Some(self.serve(id)?);
        timer.lap("driver_and_health");

        let ctx = hooks::HookContext {
            app: &app.name,
            release: id.as_str(),
            previous: previous.map(ReleaseId::as_str),
            release_dir: &release_dir,
            log: &log,
            timeout: app.hooks.timeout,
        };
        hooks::run("after_activate", &app.hooks.after_activate, &ctx)?;
        timer.lap("after_activate");
        Ok(stats)
    }

    /// Copies the artifact into the cache while hashing it, and checks the
    /// hash. Returns the cached path and the sha256.
    fn fetch(&self, src: &Path, expected: Option<&str>) -> Result<(PathBuf, String)> {
        let cache = &self.paths().cache;
        let expected = expected.map(Sha256::parse).transpose()?;
        if let Some(e) = &expected {
            let cached = cache.join(e);
            if cached.is_file() {
                let actual =
                    Sha256::of_file(&cached).map_err(ReleaseError::io("read", &cached))?;
                if actual == *e {
                    return Ok((cached, actual.into_string()));
                }
                // A damaged cache entry is dropped and fetched again.
                let _ = fs::remove_file(&cached);
            }
        }
        let mut input = File::open(src).map_err(ReleaseError::io("open artifact", src))?;
        if !input
            .metadata()
            .map_err(ReleaseError::io("stat artifact", src))?
            .is_file()
        {
            return Err(ReleaseError::io("read artifact", src)(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        let tmp = durable::temp_sibling(&cache.join("incoming"), "part");
        let result = (|| -> Result<String> {
            let mut out =
                HashingWriter::new(File::create(&tmp).map_err(ReleaseError::io("create", &tmp))?);
            let mut buf = vec![0u8; 256 << 10];
            loop {
                let n = input
                    .read(&mut buf)
                    .map_err(ReleaseError::io("read artifact", src))?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n])
                    .map_err(ReleaseError::io("write", &tmp))?;
            }
            Ok(out.finish().1.into_string())
        })();
        let actual = match result {
            Ok(a) => a,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if let Some(e) = expected {
            if e != actual {
                let _ = fs::remove_file(&tmp);
                return Err(ReleaseError::Checksum {
                    path: src.to_owned(),
                    expected: e.into_string(),
                    actual,
                });
            }
        }
        let cached = cache.join(&actual);
        fs::rename(&tmp, &cached).map_err(ReleaseError::io("store", &cached))?;
        Ok((cached, actual))
    }

    fn fresh_id(&self, sha: &str) -> ReleaseId {
        let base = ReleaseId::generate(OffsetDateTime::now_utc(), sha);
        let taken =
            |id: &ReleaseId| self.journal.get(id).is_some() || self.paths().release(id).exists();
        if !taken(&base) {
            return base;
        }
        (2..)
            .map(|n| base.with_suffix(n))
            .find(|id| !taken(id))
            .unwrap_or(base)
    }

    /// Unpacks (or rebuilds from a previous manifest) into staging, adopts new
    /// objects, writes the manifest and renames staging into `releases/`.
    fn build_release(&mut self, id: &ReleaseId, cached: &Path, sha: &str) -> Result<UnpackStats> {
        let p = self.paths().clone();
        let app = self.app().clone();
        let staging = p.staging.join(id.as_str());
        durable::remove_tree(&staging).map_err(ReleaseError::io("remove", &staging))?;
        let store = app.content_store.then_some(&self.store.objects);
        let mut stats = UnpackStats::default();
        let mut manifest = None;
        if let Some(store) = store {
            if let Some(prev) = self.reusable_manifest(sha) {
                if unpack::materialize(&prev, &staging, store)? {
                    stats.method = "rebuilt from manifest";
                    stats.reused_files = prev.file_count();
                    manifest = Some(prev);
                } else {
                    durable::remove_tree(&staging).map_err(ReleaseError::io("remove", &staging))?;
                }
            }
        }
        let manifest = match manifest {
            Some(m) => m,
            None => {
                let format = unpack::detect(cached)?;
                let guard = unpack::SpaceGuard {
                    path: p.root.clone(),
                    margin: app.free_space_margin,
                };
                let estimate = unpack::estimate_expanded_size(cached, format)
                    .map_err(ReleaseError::io("read", cached))?;
                guard.check(estimate.unwrap_or(0))?;
                let opts = unpack::Options {
                    limits: app.limits,
                    store,
                    space: Some(guard),
                };
                let unpacked = match unpack::unpack(cached, &staging, &opts) {
                    Ok(u) => u,
                    Err(e) => {
                        let _ = durable::remove_tree(&staging);
                        return Err(e.into());
                    }
                };
                if let Some(store) = store {
                    for obj in &unpacked.new_objects {
                        store
                            .adopt(&obj.path, &obj.sha256, obj.mode)
                            .map_err(ReleaseError::io("store object from", &obj.path))?;
                    }
                }
                stats.method = "unpacked";
                stats.reused_files = unpacked.reused_files;
                stats.new_objects = unpacked.new_objects.len() as u64;
                Manifest {
                    artifact_sha256: sha.to_owned(),
                    content_store: store.is_some(),
                    entries: unpacked.entries,
                }
            }
        };
        stats.files = manifest.file_count();
        stats.bytes = manifest.total_bytes();
        manifest
            .save(&p.manifest(id))
            .map_err(ReleaseError::io("write", &p.manifest(id)))?;
        let dest = p.release(id);
        fs::rename(&staging, &dest).map_err(ReleaseError::io("move staging into", &dest))?;
        durable::fsync_dir(&p.releases).map_err(ReleaseError::io("sync", &p.releases))?;
        Ok(stats)
    }

    /// The manifest of a present release built from the same artifact with
    /// the content store on, if it still fits this app's limits.
    fn reusable_manifest(&self, sha: &str) -> Option<Manifest> {
        let limits = self.app().limits;
        self.journal
            .releases
            .iter()
            .rev()
            .filter(|r| r.artifact_sha256 == sha && self.paths().release(&r.id).is_dir())
            .filter_map(|r| Manifest::load(&self.paths().manifest(&r.id)).ok())
            .find(|m| {
                m.content_store
                    && m.artifact_sha256 == sha
                    && (m.entries.len() as u64) <= limits.max_entries
                    && m.total_bytes() <= limits.max_expanded_bytes
            })
    }

    /// Switches back to the previous good release (or `to`), marking the
    /// release rolled away from as bad. Entirely node-local.
    pub fn rollback(&mut self, to: Option<&ReleaseId>) -> Result<RollbackReport> {
        let p = self.paths().clone();
        let current = self.current()?;
        let target = match to {
            Some(id) => {
                let r = self.journal.get(id).ok_or_else(|| self.unknown(id))?;
                if current.as_ref() == Some(id) {
                    return Err(ReleaseError::AlreadyCurrent { id: id.clone() });
                }
                if matches!(r.status, ReleaseStatus::Failed | ReleaseStatus::Deploying) {
                    return Err(ReleaseError::NotActivatable {
                        id: id.clone(),
                        reason: r.reason.clone().unwrap_or_else(|| r.status.as_str().into()),
                    });
                }
                id.clone()
            }
            None => self
                .journal
                .rollback_target(current.as_ref())
                .map(|r| r.id.clone())
                .ok_or_else(|| ReleaseError::NoRollbackTarget {
                    app: self.app().name.clone(),
                    current: current.clone(),
                })?,
        };
        if !p.release(&target).is_dir() {
            return Err(ReleaseError::io("find release", &p.release(&target))(
                io::ErrorKind::NotFound.into(),
            ));
        }
        self.holder.release = Some(target.to_string());
        self.lock.update(&self.holder);
        self.journal.op = Some(Operation::Rollback {
            from: current.clone(),
            to: target.clone(),
            pid: std::process::id(),
            started_at: OffsetDateTime::now_utc(),
        });
        self.save()?;
        activate::switch(&p.root, &target)
            .map_err(ReleaseError::io("switch current in", &p.root))?;
        fault::point("after_rollback_switch");
        self.finish_rollback(current.as_ref(), &target)?;
        tracing::info!(app = %self.app().name, to = %target, "rolled back");
        // Serve the release rolled back to. A failure here does not undo the
        // rollback (the operator asked for this release); it is reported.
        let (activation, health, problem) = match self.serve(&target) {
            Ok((a, h)) => (Some(a), h, None),
            Err(e) => (self.live.take(), None, Some(e.to_string())),
        };
        self.live = None;
        self.record_port(&target, activation.as_ref().and_then(|a| a.port))?;
        Ok(RollbackReport {
            app: self.app().name.clone(),
            from: current,
            to: target,
            activation,
            health,
            problem,
        })
    }

    fn finish_rollback(&mut self, from: Option<&ReleaseId>, to: &ReleaseId) -> Result<()> {
        let now = OffsetDateTime::now_utc();
        if let Some(from) = from {
            let stamp = now
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            self.journal.mark(
                from,
                ReleaseStatus::Bad,
                Some(format!("rolled back to {to} at {stamp}")),
            );
        }
        if let Some(r) = self.journal.get_mut(to) {
            r.status = ReleaseStatus::Good;
            r.reason = None;
            r.activated_at = Some(now);
        }
        self.journal.op = None;
        self.save()
    }

    fn unknown(&self, id: &ReleaseId) -> ReleaseError {
        ReleaseError::UnknownRelease {
            app: self.app().name.clone(),
            id: id.clone(),
            known: join_ids(
                &self
                    .journal
                    .releases
                    .iter()
                    .map(|r| r.id.clone())
                    .collect::<Vec<_>>(),
            ),
        }
    }

    /// Removes old releases: keeps the `keep` newest good ones and
    /// `keep_failed` newest failed or bad ones, and never the current release
    /// or the rollback target. Then collects unreferenced objects and cached
    /// artifacts.
    pub fn prune(&mut self, keep: usize) -> Result<PruneReport> {
        let current = self.current()?;
        let target = self
            .journal
            .rollback_target(current.as_ref())
            .map(|r| r.id.clone());
        let plan = plan_prune(
            &self.journal.releases,
            keep,
            self.app().keep_failed,
            current.as_ref(),
            target.as_ref(),
        );
        let mut report = PruneReport {
            kept: self
                .journal
                .releases
                .iter()
                .map(|r| r.id.clone())
                .filter(|id| !plan.contains(id))
                .collect(),
            ..PruneReport::default()
        };
        if !plan.is_empty() {
            self.journal.op = Some(Operation::Prune {
                remove: plan.clone(),
                pid: std::process::id(),
                started_at: OffsetDateTime::now_utc(),
            });
            self.save()?;
            self.finish_prune(&plan)?;
            report.removed = plan;
        }
        let p = self.paths().clone();
        let gc = self
            .store
            .objects
            .gc()
            .map_err(ReleaseError::io("collect objects in", &p.objects))?;
        report.objects_removed = gc.objects_removed;
        report.bytes_freed = gc.bytes_freed;
        // Deploy logs of deploys that left no release (refused artifacts,
        // failed unpacks) stay until here, for the operator to read.
        for entry in fs::read_dir(&p.logs).map_err(ReleaseError::io("read", &p.logs))? {
            let entry = entry.map_err(ReleaseError::io("read", &p.logs))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let id = name.strip_suffix(".log").unwrap_or(&name);
            if !self.journal.releases.iter().any(|r| r.id.as_str() == id) {
                let _ = fs::remove_file(entry.path());
            }
        }
        // Cached artifacts of releases that are gone.
        let referenced: Vec<String> = self
            .journal
            .releases
            .iter()
            .map(|r| r.artifact_sha256.clone())
            .collect();
        let (n, bytes) = self.remove_cached_except(&referenced)?;
        report.cached_artifacts_removed = n;
        report.cached_artifact_bytes_freed = bytes;
        report.image_bytes_freed = self.prune_driver_images().unwrap_or(0);
        if !report.removed.is_empty() {
            tracing::info!(app = %self.app().name, removed = %join_ids(&report.removed), "pruned");
        }
        PruneRecord {
            at: OffsetDateTime::now_utc(),
            trigger: "prune".into(),
            bytes_freed: report.bytes_freed
                + report.cached_artifact_bytes_freed
                + report.image_bytes_freed,
            detail: serde_json::to_value(&report).unwrap_or_default(),
        }
        .save(&p.root);
        Ok(report)
    }

    /// Has the driver remove its per-release images of releases gone from
    /// the journal; returns the bytes freed, or `None` without a driver. A
    /// failure is only a warning (nothing freed).
    fn prune_driver_images(&self) -> Option<u64> {
        let driver = self.store.driver()?;
        let kept: Vec<ReleaseId> = self.journal.releases.iter().map(|r| r.id.clone()).collect();
        Some(driver.prune_images(self.app(), &kept).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not prune the driver's images");
            0
        }))
    }

    /// Removes cached artifacts whose sha256 is not in `keep` (and temp
    /// files of fetches that died) — unless a fetch has the cache pinned:
    /// then nothing, and the next prune does it.
    fn remove_cached_except(&self, keep: &[String]) -> Result<(u64, u64)> {
        let cache = &self.paths().cache;
        let (mut n, mut bytes) = (0, 0);
        let Some(_clean) = lock::CacheClean::try_acquire(&self.paths().cache_lock)? else {
            tracing::info!(app = %self.app().name, "an artifact fetch is in flight; cached artifacts are left for the next prune");
            return Ok((n, bytes));
        };
        for entry in fs::read_dir(cache).map_err(ReleaseError::io("read", cache))? {
            let entry = entry.map_err(ReleaseError::io("read", cache))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !keep.contains(&name) {
                let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
                if fs::remove_file(entry.path()).is_ok() {
                    n += 1;
                    bytes += size;
                }
            }
        }
        Ok((n, bytes))
    }

    /// Frees space in order — the driver's images of releases gone, rotated
    /// logs past retention, cached artifacts (all but those of the current
    /// release and the rollback target), unreferenced store objects — until
    /// free space is back above `threshold`. Never touches a release.
    pub fn relieve_pressure(&mut self, threshold: u64) -> Result<PressureReport> {
        let root = self.paths().root.clone();
        let free = || unpack::SpaceGuard::available(&root).map_err(ReleaseError::io("stat", &root));
        let free_before = free()?;
        let mut report = PressureReport {
            threshold,
            free_before,
            free_after: free_before,
            steps: Vec::new(),
            relieved: free_before >= threshold,
        };
        let app = self.app().clone();
        let current = self.current()?;
        let target = self.journal.rollback_target(current.as_ref()).cloned();
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
                        current.as_ref().and_then(|c| self.journal.get(c)),
                        target.as_ref(),
                    ]
                    .into_iter()
                    .flatten()
                    .map(|r| r.artifact_sha256.clone())
                    .collect();
                    self.remove_cached_except(&keep)?.1
                }
                _ => {
                    let p = self.paths().clone();
                    self.store
                        .objects
                        .gc()
                        .map_err(ReleaseError::io("collect objects in", &p.objects))?
                        .bytes_freed
                }
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

    fn finish_prune(&mut self, remove: &[ReleaseId]) -> Result<()> {
        for (n, id) in remove.iter().enumerate() {
            self.remove_release_files(id)?;
            if n == 0 {
                fault::point("mid_prune");
            }
        }
        self.journal.releases.retain(|r| !remove.contains(&r.id));
        self.journal.op = None;
        self.save()
    }

    fn remove_release_files(&self, id: &ReleaseId) -> Result<()> {
        let p = self.paths();
        let dir = p.release(id);
        if dir.exists() {
            let trash = durable::temp_sibling(&p.trash.join(id.as_str()), "del");
            fs::rename(&dir, &trash).map_err(ReleaseError::io("move to trash", &dir))?;
            durable::remove_tree(&trash).map_err(ReleaseError::io("remove", &trash))?;
        }
        for f in [p.manifest(id), p.log(id)] {
            match fs::remove_file(&f) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(ReleaseError::io("remove", &f)(e))
                }
                _ => {}
            }
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct UnpackStats {
    method: &'static str,
    files: u64,
    bytes: u64,
    reused_files: u64,
    new_objects: u64,
}

/// Which releases a prune removes. Pure, so the rules are easy to test:
/// the `keep` newest good releases and `keep_failed` newest failed/bad ones
/// stay; so do the current release, the rollback target and any release still
/// deploying.
pub fn plan_prune(
    releases: &[Release],
    keep: usize,
    keep_failed: usize,
    current: Option<&ReleaseId>,
    rollback_target: Option<&ReleaseId>,
) -> Vec<ReleaseId> {
    let mut newest_first: Vec<&Release> = releases.iter().collect();
    newest_first.sort_by_key(|r| std::cmp::Reverse(r.created_at));
    let mut good = 0;
    let mut failed = 0;
    let mut remove = Vec::new();
    for r in newest_first {
        let protected = Some(&r.id) == current
            || Some(&r.id) == rollback_target
            || r.status == ReleaseStatus::Deploying;
        let keep_it = match r.status {
            ReleaseStatus::Good => {
                good += 1;
                good <= keep
            }
            ReleaseStatus::Failed | ReleaseStatus::Bad => {
                failed += 1;
                failed <= keep_failed
            }
            ReleaseStatus::Deploying => true,
        };
        if !keep_it && !protected {
            remove.push(r.id.clone());
        }
    }
    remove.reverse();
    remove
}

fn join_ids(ids: &[ReleaseId]) -> String {
    if ids.is_empty() {
        return "none".into();
    }
    ids.iter()
        .map(ReleaseId::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    fn rel(id: &str, status: ReleaseStatus, age_min: i64) -> Release {
        Release {
            id: ReleaseId::new(id).unwrap(),
            status,
            created_at: OffsetDateTime::UNIX_EPOCH + Duration::days(1) - Duration::minutes(age_min),
            activated_at: None,
            artifact_sha256: String::new(),
            files: 0,
            bytes: 0,
            reason: None,
            port: None,
        }
    }

    fn ids(v: &[ReleaseId]) -> Vec<&str> {
        v.iter().map(ReleaseId::as_str).collect()
    }

    #[test]
    fn failed_releases_never_push_good_ones_out() {
        use ReleaseStatus::*;
        let releases = vec![
            rel("g1", Good, 100),
            rel("g2", Good, 90),
            rel("f1", Failed, 80),
            rel("f2", Failed, 70),
            rel("f3", Failed, 60),
            rel("f4", Bad, 50),
        ];
        let cur = ReleaseId::new("g2").unwrap();
        let target = ReleaseId::new("g1").unwrap();
        let plan = plan_prune(&releases, 2, 1, Some(&cur), Some(&target));
        assert_eq!(ids(&plan), ["f1", "f2", "f3"]);
    }

    #[test]
    fn current_and_rollback_target_survive_keep_one() {
        use ReleaseStatus::*;
        let releases = vec![
            rel("a", Good, 40),
            rel("b", Good, 30),
            rel("c", Good, 20),
            rel("d", Good, 10),
        ];
        let cur = ReleaseId::new("b").unwrap();
        let target = ReleaseId::new("a").unwrap();
        let plan = plan_prune(&releases, 1, 0, Some(&cur), Some(&target));
        assert_eq!(ids(&plan), ["c"]);
    }

    #[test]
    fn deploying_release_is_never_pruned() {
        use ReleaseStatus::*;
        let releases = vec![rel("a", Good, 40), rel("b", Deploying, 30)];
        let plan = plan_prune(&releases, 1, 0, None, None);
        assert!(plan.is_empty());
    }
}
