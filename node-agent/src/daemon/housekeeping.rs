//! Housekeeping: an app's logs rotated when due — at once when inotify
//! says one grew, otherwise on a tick (for age) — and pruning when its
//! file system runs short of space.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::bridge::Bridge;
use crate::config::AppConfig;
use crate::deploy::{DeployError, Deployer};
use crate::lock::LockError;
use crate::release::ReleaseError;

/// How often logs are checked for age and the disk for pressure, and new log
/// directories picked up, when no file event comes first.
const HOUSEKEEPING_TICK: Duration = Duration::from_secs(30);
/// The same without inotify (polling fallback).
const POLL_TICK: Duration = Duration::from_secs(2);
/// File events are gathered this long before logs are checked again, so a
/// busy writer does not make the agent spin.
const EVENT_DEBOUNCE: Duration = Duration::from_millis(200);

/// Rotates the app's logs when due (at once when a file event says one grew,
/// otherwise on a tick) and relieves disk pressure. `ready` is told once the
/// log directories are watched and the first pass is done.
pub(super) async fn run(
    app: AppConfig,
    bridge: Bridge,
    stop: CancellationToken,
    ready: tokio::sync::oneshot::Sender<()>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = LogWatcher::new(tx);
    if watcher.is_none() {
        tracing::warn!(app = %app.name, "inotify unavailable; polling logs every {POLL_TICK:?}");
    }
    let mut ready = Some(ready);
    loop {
        if let Some(w) = &mut watcher {
            w.watch_dirs(&app);
        }
        let (a, b) = (app.clone(), bridge.clone());
        if let Err(e) = tokio::task::spawn_blocking(move || housekeep_once(&a, &b)).await {
            tracing::warn!(app = %app.name, error = %e, "housekeeping panicked");
        }
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        }
        let tick = if watcher.is_some() {
            HOUSEKEEPING_TICK
        } else {
            POLL_TICK
        };
        tokio::select! {
            _ = rx.recv() => tokio::time::sleep(EVENT_DEBOUNCE).await,
            _ = tokio::time::sleep(tick) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// One pass: rotate due logs, then prune if the disk is under pressure
/// (the driver's images first, through `bridge`).
pub fn housekeep_once(app: &AppConfig, bridge: &Bridge) {
    let (_, errors) = crate::logs::rotate_app(app, false);
    for e in errors {
        tracing::warn!(app = %app.name, error = %e, "log rotation failed");
    }
    let Some(threshold) = app.disk_pressure_free else {
        return;
    };
    let free = match crate::release::unpack::SpaceGuard::available(&app.root) {
        Ok(f) => f,
        Err(_) => return,
    };
    if free >= threshold {
        return;
    }
    tracing::warn!(app = %app.name, free, threshold, "disk pressure: pruning");
    let store = Deployer::new(app, bridge);
    match store.begin("disk pressure", None) {
        Ok(mut session) => {
            if let Err(e) = session.relieve_pressure(threshold) {
                tracing::error!(app = %app.name, error = %e, "pruning under disk pressure failed");
            }
        }
        // A deploy or prune is running; the next tick tries again.
        Err(e @ DeployError::Store(ReleaseError::Lock(LockError::Busy { .. }))) => {
            tracing::info!(app = %app.name, error = %e, "disk pressure prune postponed")
        }
        // Anything else (recovery, the journal) is not a busy app.
        Err(e) => {
            tracing::error!(app = %app.name, error = %e, "cannot prune under disk pressure")
        }
    }
}

/// inotify on the directories of an app's logs; any event wakes the loop.
struct LogWatcher {
    watcher: notify::RecommendedWatcher,
    watched: std::collections::BTreeSet<std::path::PathBuf>,
}

impl LogWatcher {
    fn new(tx: tokio::sync::mpsc::Sender<()>) -> Option<Self> {
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if let Ok(ev) = res {
                if matches!(
                    ev.kind,
                    notify::EventKind::Modify(_) | notify::EventKind::Create(_)
                ) {
                    // A full channel already holds a wake-up: dropping is fine.
                    let _ = tx.try_send(());
                }
            }
        })
        .ok()?;
        Some(Self {
            watcher,
            watched: std::collections::BTreeSet::new(),
        })
    }

    /// Adds the directories of the app's current log files (new ones appear
    /// as apps start writing).
    fn watch_dirs(&mut self, app: &AppConfig) {
        use notify::Watcher;
        let dirs: std::collections::BTreeSet<_> = crate::logs::discover(app)
            .into_iter()
            .filter_map(|f| f.path.parent().map(std::path::Path::to_path_buf))
            .chain([app.root.join("shared/logs")])
            .filter(|d| d.is_dir())
            .collect();
        for d in dirs {
            if !self.watched.contains(&d) {
                match self.watcher.watch(&d, notify::RecursiveMode::NonRecursive) {
                    Ok(()) => {
                        self.watched.insert(d);
                    }
                    Err(e) => {
                        tracing::warn!(dir = %d.display(), error = %e, "cannot watch log directory")
                    }
                }
            }
        }
    }
}
