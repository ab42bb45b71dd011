//! The release store of one app: its releases on disk, its journal, its
//! lock, and the steps a deploy, a rollback and a prune are made of.
//!
//! The store knows nothing of drivers or health checks: it keeps files and
//! the journal true. The deploy pipeline ([`crate::deploy`]) runs the steps
//! in order, with the app's driver and health gate between them; its state
//! machine is documented there. Each step here records itself in the
//! journal (temp + fsync + rename) before and after it changes anything, so
//! a crash at any point leaves a journal that says what was in flight.
//!
//! # Recovery
//!
//! A failure (or a crash, found by the next process that takes the lock)
//! *undoes* an uncommitted deploy: `current` goes back to the previous
//! release, staging is removed, and a release that reached `releases/` is
//! kept as `failed` with the reason. A deploy that got as far as
//! `Activated` may have a driver running the new release: the undo then
//! asks the caller's [`Service`] to put the previous one back in service.
//! A rollback that already switched `current` is finished; one that did
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
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::config::AppConfig;
pub use crate::lock::{CachePin, Holder, LockError};
use crate::{durable, fault, lock};
pub use id::{InvalidId, ReleaseId};
pub use journal::{DeployStep, Journal, Operation, Release, ReleaseStatus};
use manifest::Manifest;
use objects::{GcStats, ObjectStore};
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
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
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
}

impl ReleaseError {
    /// `cannot {action} {path}: {error}`.
    pub fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
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
}

/// What serves a release once `current` points at it: the app's driver and
/// health gate, which the deploy pipeline ([`crate::deploy`]) brings. The
/// store runs nothing itself; it asks this when it undoes a deploy that
/// went live — the deploy failing, or recovery after a crash.
pub trait Service {
    /// `current` points at `previous` again (`None`: nothing was deployed
    /// before, `current` is gone) after the release that went live failed:
    /// put `previous` back in service, or stop the app. Best effort: the
    /// switch back already happened, so what fails here is reported in
    /// [`Restored::outcome`], not raised.
    fn restore(&mut self, previous: Option<&ReleaseId>) -> Restored;
}

/// What a [`Service`] did to put the previous release back.
#[derive(Debug, Clone, Default)]
pub struct Restored {
    /// In words, for the journal, the deploy log and the report.
    pub outcome: String,
    /// The port the previous release now serves on, when the service chose
    /// one (recorded in the journal for liveness checks).
    pub port: Option<u16>,
}

/// What a prune removed from the store.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub removed: Vec<ReleaseId>,
    pub kept: Vec<ReleaseId>,
    pub objects_removed: u64,
    /// Bytes freed by collecting store objects.
    pub bytes_freed: u64,
    pub cached_artifacts_removed: u64,
    pub cached_artifact_bytes_freed: u64,
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

    /// Records it (best effort: it only feeds `status`).
    pub fn save(&self, root: &Path) {
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
    /// The store of `app`.
    pub fn new(app: &AppConfig) -> Self {
        let paths = Paths::new(&app.root);
        Self {
            objects: ObjectStore::new(paths.objects.clone()),
            app: app.clone(),
            paths,
        }
    }

    pub fn paths(&self) -> &Paths {
        &self.paths
    }

    pub fn app(&self) -> &AppConfig {
        &self.app
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
    /// held), reads the journal and recovers from any interrupted operation
    /// — with `service` when a deploy that went live must be undone.
    pub fn begin(
        &self,
        operation: &str,
        release: Option<&ReleaseId>,
        service: &mut dyn Service,
    ) -> Result<Session<'_>> {
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
            recovered: None,
            actor: None,
        };
        session.recovered = session.recover(service)?;
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

    /// The app's state. Recovers first (with `service`) when no one holds
    /// the lock; otherwise reads the journal as it stands and reports who
    /// holds the lock.
    pub fn snapshot(&self, service: &mut dyn Service) -> Result<Snapshot> {
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
            match self.begin("recover", None, service) {
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
    /// What recovery did when the session began.
    pub recovered: Option<String>,
    /// Who asked for this operation ("alice on the node", "the controller
    /// (command c-1)"), named in the reason a rollback marks a release bad.
    actor: Option<String>,
}

/// What deploying an artifact comes to, decided under the lock.
#[derive(Debug, Clone)]
pub enum DeployPlan {
    /// The release is current and good already: nothing to do.
    AlreadyCurrent { id: ReleaseId, existing: Release },
    /// Deploy `id`: unpack it, or switch back to it when it is a good
    /// release still on disk (`reactivate`).
    Deploy { id: ReleaseId, reactivate: bool },
}

/// How a release's files came to be, for the deploy report.
#[derive(Debug, Default)]
pub struct UnpackStats {
    /// `unpacked`, `rebuilt from manifest` or `reactivated`.
    pub method: &'static str,
    pub files: u64,
    pub bytes: u64,
    /// Files hardlinked from the content store rather than written.
    pub reused_files: u64,
    pub new_objects: u64,
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

    /// The release `current` points at.
    pub fn current(&self) -> Result<Option<ReleaseId>> {
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
    fn recover(&mut self, service: &mut dyn Service) -> Result<Option<String>> {
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
                let live = step >= DeployStep::Activated;
                let outcome = self.undo_deploy(
                    &release,
                    previous.as_ref(),
                    &reason,
                    !reactivate,
                    live.then_some(service),
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
    /// `live` is set when a driver may be running `id`: the previous
    /// release is then put back in service through it too.
    pub fn undo_deploy(
        &mut self,
        id: &ReleaseId,
        previous: Option<&ReleaseId>,
        reason: &str,
        mark_failed: bool,
        live: Option<&mut dyn Service>,
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
        if let Some(service) = live {
            let restored = service.restore(restored_to.as_ref());
            outcome.push_str("; ");
            outcome.push_str(&restored.outcome);
            if let (Some(prev), Some(port)) = (&restored_to, restored.port) {
                if let Some(r) = self.journal.get_mut(prev) {
                    r.port = Some(port);
                }
            }
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

    /// Records the port the driver now serves `id` on (for liveness checks
    /// that use `{port}`); no port leaves the journal as it is.
    pub fn record_port(&mut self, id: &ReleaseId, port: Option<u16>) -> Result<()> {
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

    /// Decides what deploying artifact `sha` as `id` (default: a fresh id)
    /// comes to: nothing (it is current), a reactivation of a good release
    /// still on disk, or a new release (a failed or bad one under the same
    /// id is replaced).
    pub fn plan_deploy(&mut self, id: Option<&ReleaseId>, sha: &str) -> Result<DeployPlan> {
        let current = self.current()?;
        let id = match id {
            Some(id) => id.clone(),
            None => self.fresh_id(sha),
        };
        let mut reactivate = false;
        if let Some(existing) = self.journal.get(&id).cloned() {
            if existing.artifact_sha256 != sha {
                return Err(ReleaseError::IdConflict {
                    id,
                    existing: existing.artifact_sha256,
                    new: sha.to_owned(),
                });
            }
            if existing.status == ReleaseStatus::Good {
                if current.as_ref() == Some(&id) {
                    return Ok(DeployPlan::AlreadyCurrent { id, existing });
                }
                reactivate = true;
            } else {
                // A failed or bad release under the same id is replaced.
                self.remove_release_files(&id)?;
                self.journal.releases.retain(|r| r.id != id);
            }
        }
        Ok(DeployPlan::Deploy { id, reactivate })
    }

    /// Records that the deploy of `id` over `previous` has begun, its
    /// artifact fetched (`Fetched`); the lock's holder record names it.
    pub fn start_deploy(
        &mut self,
        id: &ReleaseId,
        previous: Option<&ReleaseId>,
        reactivate: bool,
    ) -> Result<()> {
        self.holder.release = Some(id.to_string());
        self.lock.update(&self.holder);
        self.journal.op = Some(Operation::Deploy {
            release: id.clone(),
            previous: previous.cloned(),
            step: DeployStep::Fetched,
            pid: std::process::id(),
            started_at: OffsetDateTime::now_utc(),
            reactivate,
        });
        self.save()?;
        fault::point("after_fetch");
        Ok(())
    }

    /// Builds release `id` from the cached artifact (`Unpacked`): unpacked,
    /// or rebuilt from the manifest of a release of the same artifact; then
    /// records it in the journal as deploying.
    pub fn unpack(&mut self, id: &ReleaseId, cached: &Path, sha: &str) -> Result<UnpackStats> {
        let stats = self.build_release(id, cached, sha)?;
        let manifest_path = self.paths().manifest(id);
        let manifest =
            Manifest::load(&manifest_path).map_err(ReleaseError::io("read", &manifest_path))?;
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
        Ok(stats)
    }

    /// Links the app's shared files and directories into release `id`
    /// (`Linked`).
    pub fn link_shared(&mut self, id: &ReleaseId) -> Result<()> {
        let p = self.paths();
        shared::link(self.app(), &p.shared, &p.release(id))?;
        self.set_step(DeployStep::Linked)?;
        fault::point("after_link");
        Ok(())
    }

    /// Runs the `before_activate` hooks in release `id` (`Hooked`).
    pub fn before_activate(&mut self, id: &ReleaseId, previous: Option<&ReleaseId>) -> Result<()> {
        let commands = self.app().hooks.before_activate.clone();
        self.run_hooks("before_activate", &commands, id, previous)?;
        self.set_step(DeployStep::Hooked)?;
        fault::point("after_hooks");
        Ok(())
    }

    /// Runs the `after_activate` hooks in release `id`, now live.
    pub fn after_activate(&mut self, id: &ReleaseId, previous: Option<&ReleaseId>) -> Result<()> {
        let commands = self.app().hooks.after_activate.clone();
        self.run_hooks("after_activate", &commands, id, previous)
    }

    fn run_hooks(
        &self,
        phase: &'static str,
        commands: &[String],
        id: &ReleaseId,
        previous: Option<&ReleaseId>,
    ) -> Result<()> {
        let app = self.app();
        let release_dir = self.paths().release(id);
        let log = self.paths().log(id);
        let ctx = hooks::HookContext {
            app: &app.name,
            release: id.as_str(),
            previous: previous.map(ReleaseId::as_str),
            release_dir: &release_dir,
            log: &log,
            timeout: app.hooks.timeout,
        };
        Ok(hooks::run(phase, commands, &ctx)?)
    }

    /// Makes release `id` current (`Activated`): everything it holds
    /// reaches the disk first, then `current` is switched.
    pub fn switch_to(&mut self, id: &ReleaseId) -> Result<()> {
        let root = self.paths().root.clone();
        let dir = File::open(&root).map_err(ReleaseError::io("open", &root))?;
        nix::unistd::syncfs(&dir).map_err(|e| ReleaseError::io("sync", &root)(e.into()))?;
        activate::switch(&root, id).map_err(ReleaseError::io("switch current in", &root))?;
        fault::point("after_switch");
        self.set_step(DeployStep::Activated)
    }

    /// Commits the deploy of `id`: a good release, serving on `port` when
    /// its driver chose one; the operation is over.
    pub fn commit_deploy(&mut self, id: &ReleaseId, port: Option<u16>) -> Result<()> {
        let now = OffsetDateTime::now_utc();
        if let Some(r) = self.journal.get_mut(id) {
            r.status = ReleaseStatus::Good;
            r.reason = None;
            r.activated_at = Some(now);
            r.port = port;
        }
        self.journal.op = None;
        self.save()
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
    /// release rolled away from as bad; returns where from and to. Entirely
    /// node-local: putting `to` in service is the caller's.
    pub fn rollback(&mut self, to: Option<&ReleaseId>) -> Result<(Option<ReleaseId>, ReleaseId)> {
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
        Ok((current, target))
    }

    /// Names who asked for this operation (see [`Session::actor`]).
    pub fn set_actor(&mut self, who: impl Into<String>) {
        self.actor = Some(who.into());
    }

    fn finish_rollback(&mut self, from: Option<&ReleaseId>, to: &ReleaseId) -> Result<()> {
        let now = OffsetDateTime::now_utc();
        if let Some(from) = from {
            let stamp = now
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_default();
            let by = self
                .actor
                .as_ref()
                .map_or_else(String::new, |who| format!(" by {who}"));
            self.journal.mark(
                from,
                ReleaseStatus::Bad,
                Some(format!("rolled back to {to} at {stamp}{by}")),
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
    /// or the rollback target. Then collects unreferenced objects, deploy
    /// logs and cached artifacts. Records nothing: the caller, who may free
    /// more (a driver's images), records the prune ([`PruneRecord`]).
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
        let gc = self.collect_objects()?;
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
        if !report.removed.is_empty() {
            tracing::info!(app = %self.app().name, removed = %join_ids(&report.removed), "pruned");
        }
        Ok(report)
    }

    /// Removes cached artifacts whose sha256 is not in `keep` (and temp
    /// files of fetches that died) — unless a fetch has the cache pinned:
    /// then nothing, and the next prune does it.
    pub fn remove_cached_except(&self, keep: &[String]) -> Result<(u64, u64)> {
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

    /// Removes store objects no release refers to any more.
    pub fn collect_objects(&self) -> Result<GcStats> {
        let p = self.paths();
        self.store
            .objects
            .gc()
            .map_err(ReleaseError::io("collect objects in", &p.objects))
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
