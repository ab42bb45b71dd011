//! `slipway-agent run`: the long-running agent. On start it brings back apps
//! of the exec driver whose supervisor is gone (after a reboot: PM2 and
//! Docker have their own resurrection). Then, per app: the liveness check on
//! its interval, with results (and timestamps) in `.slipway/health.json`;
//! and housekeeping — logs rotated as soon as inotify says one passed its
//! size (or on a tick, for age), and pruning when free space falls below the
//! app's `disk_pressure_free`. `status` shows all of it. With a
//! `[controller]` in the config, the session with it runs here too
//! ([`crate::link::session`]).

use std::future::Future;
use std::time::Duration;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::bridge::Bridge;
use crate::config::{AppConfig, Config, RunConfig};
use crate::deploy::{DeployError, Deployer};
use crate::health::{self, Liveness, ProbeTarget};
use crate::lock::LockError;
use crate::release::{activate, Journal, Paths, ReleaseError};
use crate::supervise;

/// How long shutdown waits for each task (an in-flight probe, a rotation).
const DRAIN: Duration = Duration::from_secs(5);

/// Runs, until `shutdown`: a liveness loop for every app with a health
/// check, housekeeping for every app, and the controller session when one is
/// configured.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    // Drivers block on this (multi-thread) runtime from its blocking threads.
    let bridge = Bridge::current();
    let apps: Vec<AppConfig> = config.apps.values().cloned().collect();
    let b = bridge.clone();
    tokio::task::spawn_blocking(move || {
        for app in &apps {
            resurrect(app, &b);
        }
    })
    .await?;
    let stop = CancellationToken::new();
    // Each with what it is, for the shutdown warning.
    let mut tasks = Vec::new();
    for app in config.apps.values() {
        if app.health.is_some() {
            let t = tokio::spawn(watch(app.clone(), stop.clone()));
            tasks.push((format!("liveness check of {}", app.name), t));
        }
        let t = tokio::spawn(housekeeping(app.clone(), bridge.clone(), stop.clone()));
        tasks.push((format!("housekeeping of {}", app.name), t));
    }
    if let Some(ctl) = config.controller.clone() {
        let s = stop.clone();
        let t = tokio::spawn(crate::link::session::run(config.clone(), ctl, async move {
            s.cancelled().await;
        }));
        tasks.push(("controller session".to_owned(), t));
    }
    tracing::info!(
        apps = config.apps.len(),
        liveness_checks = config.apps.values().filter(|a| a.health.is_some()).count(),
        controller = config.controller.is_some(),
        "agent running"
    );
    shutdown.await;
    stop.cancel();
    for (what, t) in tasks {
        if tokio::time::timeout(DRAIN, t).await.is_err() {
            tracing::warn!("{what} did not finish within {DRAIN:?} of shutdown");
        }
    }
    Ok(())
}

async fn watch(app: AppConfig, stop: CancellationToken) {
    let Some(cfg) = app.health.clone() else {
        return;
    };
    loop {
        let probe_app = app.clone();
        let result = tokio::task::spawn_blocking(move || probe_once(&probe_app)).await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(app = %app.name, error = %e, "liveness record not written")
            }
            Err(e) => tracing::warn!(app = %app.name, error = %e, "liveness probe panicked"),
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.liveness_interval) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// How often logs are checked for age and the disk for pressure, and new log
/// directories picked up, when no file event comes first.
const HOUSEKEEPING_TICK: Duration = Duration::from_secs(30);
/// The same without inotify (polling fallback).
const POLL_TICK: Duration = Duration::from_secs(2);
/// File events are gathered this long before logs are checked again, so a
/// busy writer does not make the agent spin.
const EVENT_DEBOUNCE: Duration = Duration::from_millis(200);

/// Rotates the app's logs when due (at once when a file event says one grew,
/// otherwise on a tick) and relieves disk pressure.
async fn housekeeping(app: AppConfig, bridge: Bridge, stop: CancellationToken) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = LogWatcher::new(tx);
    if watcher.is_none() {
        tracing::warn!(app = %app.name, "inotify unavailable; polling logs every {POLL_TICK:?}");
    }
    loop {
        if let Some(w) = &mut watcher {
            w.watch_dirs(&app);
        }
        let (a, b) = (app.clone(), bridge.clone());
        if let Err(e) = tokio::task::spawn_blocking(move || housekeep_once(&a, &b)).await {
            tracing::warn!(app = %app.name, error = %e, "housekeeping panicked");
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

/// Starts the current release of an exec-driver app that has no running
/// supervisor. Errors are logged: one app must not keep the agent down.
fn resurrect(app: &AppConfig, bridge: &Bridge) {
    if !matches!(app.run, Some(RunConfig::Exec(_))) {
        return;
    }
    if supervise::is_running(&supervise::RunFiles::new(&app.root)) {
        return;
    }
    let current = match activate::read_current(&app.root) {
        Ok(Some(c)) => c,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(app = %app.name, error = %e, "cannot read current release");
            return;
        }
    };
    // Under the app's lock, so a deploy starting now cannot race the start.
    let store = Deployer::new(app, bridge);
    let result = store
        .begin("start", Some(&current))
        .map_err(|e| e.to_string())
        .and_then(|mut session| session.restart().map_err(|e| e.to_string()));
    match result {
        Ok((release, a, _)) => tracing::info!(app = %app.name, %release, "started: {}", a.detail),
        Err(e) => tracing::error!(app = %app.name, error = %e, "cannot start the app"),
    }
}

/// Probes the current release of `app` once and folds the result into its
/// liveness record. Nothing deployed yet: nothing to probe.
pub fn probe_once(app: &AppConfig) -> std::io::Result<()> {
    let Some(cfg) = &app.health else {
        return Ok(());
    };
    let Some(current) = activate::read_current(&app.root)? else {
        return Ok(());
    };
    let port = Journal::load(&Paths::new(&app.root).journal, &app.name)
        .ok()
        .and_then(|j| j.get(&current).and_then(|r| r.port));
    let target = ProbeTarget {
        port,
        cwd: app.root.join("current"),
    };
    let p = health::probe(&cfg.check, cfg.timeout, &target);
    let mut record = Liveness::load(&app.root).unwrap_or_default();
    let was = record.healthy;
    record.record(
        Some(current.as_str()),
        &p,
        cfg.retries,
        OffsetDateTime::now_utc(),
    );
    if record.healthy != was {
        match record.healthy {
            Some(false) => {
                tracing::error!(app = %app.name, release = %current, output = %p.output, "app is unhealthy")
            }
            Some(true) => tracing::info!(app = %app.name, release = %current, "app is healthy"),
            None => {}
        }
    }
    record.save(&app.root)
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop the agent with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
}
