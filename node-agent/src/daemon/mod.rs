//! `slipway-agent run`: the long-running agent. On start it reconciles
//! every app — what its driver runs against its current release — and
//! repairs drift (after a reboot: the PM2 daemon gone, containers stopped,
//! the exec supervisor dead). Then, per app, until shutdown:
//!
//! - [`liveness`]: the same reconcile and the app's health check on its
//!   interval, with results (and timestamps) in `.slipway/health.json`;
//!   failures in a row restart the app, too many restarts are a crash loop
//!   (see the module);
//! - [`housekeeping`]: logs rotated as soon as inotify says one passed its
//!   size (or on a tick, for age), and pruning when free space falls below
//!   the app's `disk_pressure_free`.
//!
//! With a `[controller]` in the config, the session with it runs here too
//! ([`crate::link::session`]). `status` shows all of it.

pub mod housekeeping;
pub mod liveness;

use std::future::Future;
use std::time::Duration;

use slipway_proto::notify::Notifier;
use tokio_util::sync::CancellationToken;

use crate::bridge::Bridge;
use crate::config::{AppConfig, Config};

/// How long shutdown waits for each task (an in-flight probe, a rotation).
const DRAIN: Duration = Duration::from_secs(5);

/// Runs, until `shutdown`: a liveness loop for every app with a health
/// check, housekeeping for every app, and the controller session when one is
/// configured. Once every app's logs are watched and housekept once, the
/// word `ready` goes to `ready_file` (if given), atomically, and `READY=1`
/// to systemd (`notifier`, a `Type=notify` unit), which from then on gets
/// watchdog pings (when `WatchdogSec=` is set) from this runtime, so a
/// wedged runtime is restarted; `STOPPING=1` once shutdown begins.
pub async fn run(
    config: Config,
    ready_file: Option<std::path::PathBuf>,
    notifier: Notifier,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    // Drivers block on this (multi-thread) runtime from its blocking threads.
    let bridge = Bridge::current();
    let apps: Vec<AppConfig> = config.apps.values().cloned().collect();
    let b = bridge.clone();
    tokio::task::spawn_blocking(move || {
        for app in &apps {
            // Failures counted from here on by each app's loop.
            liveness::pass(app, &b, &mut 0);
        }
    })
    .await?;
    let stop = CancellationToken::new();
    // Each with what it is, for the shutdown warning.
    let mut tasks = Vec::new();
    let mut readiness = Vec::new();
    for app in config.apps.values() {
        if app.health.is_some() || app.run.is_some() {
            let t = tokio::spawn(liveness::watch(app.clone(), bridge.clone(), stop.clone()));
            tasks.push((format!("liveness check of {}", app.name), t));
        }
        let (ready, is_ready) = tokio::sync::oneshot::channel();
        readiness.push(is_ready);
        let t = tokio::spawn(housekeeping::run(
            app.clone(),
            bridge.clone(),
            stop.clone(),
            ready,
        ));
        tasks.push((format!("housekeeping of {}", app.name), t));
    }
    let notifier = std::sync::Arc::new(notifier);
    if let Some(ctl) = config.controller.clone() {
        let s = stop.clone();
        let t = tokio::spawn(crate::link::session::run(
            config.clone(),
            ctl,
            notifier.clone(),
            async move {
                s.cancelled().await;
            },
        ));
        tasks.push(("controller session".to_owned(), t));
    }
    tracing::info!(
        apps = config.apps.len(),
        liveness_checks = config.apps.values().filter(|a| a.health.is_some()).count(),
        controller = config.controller.is_some(),
        "agent running"
    );
    let all_ready = async {
        for is_ready in readiness {
            // A task that ended early (it panicked) is logged by its join.
            let _ = is_ready.await;
        }
    };
    tokio::pin!(shutdown);
    // A SIGTERM before the first housekeeping pass ends stops at once.
    let stopped_before_ready = tokio::select! {
        () = all_ready => false,
        () = &mut shutdown => true,
    };
    if !stopped_before_ready {
        if let Some(path) = ready_file {
            crate::durable::write_atomic(&path, b"ready\n").map_err(|e| {
                anyhow::anyhow!("cannot write the ready file {}: {e}", path.display())
            })?;
        }
        // With a controller, the status line is the session's (connected,
        // unreachable…), which may have been sent already.
        let ready = match &config.controller {
            Some(_) => notifier.notify("READY=1"),
            None => notifier.ready(&format!(
                "running: {} app(s), no controller",
                config.apps.len()
            )),
        };
        if let Err(e) = ready {
            tracing::warn!(error = %e, "cannot notify systemd (READY=1)");
        }
        if let Some(every) = notifier.watchdog_interval() {
            tracing::info!(?every, "systemd watchdog on");
            let t = tokio::spawn(watchdog(notifier.clone(), every, stop.clone()));
            tasks.push(("systemd watchdog".to_owned(), t));
        }
        shutdown.await;
    }
    if let Err(e) = notifier.stopping("stopping (the apps keep running)") {
        tracing::warn!(error = %e, "cannot notify systemd (STOPPING=1)");
    }
    stop.cancel();
    for (what, t) in tasks {
        if tokio::time::timeout(DRAIN, t).await.is_err() {
            tracing::warn!("{what} did not finish within {DRAIN:?} of shutdown");
        }
    }
    Ok(())
}

/// Pings systemd's watchdog every `every` until `stop`.
async fn watchdog(notifier: std::sync::Arc<Notifier>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(e) = notifier.watchdog() {
            tracing::warn!(error = %e, "cannot notify systemd (WATCHDOG=1)");
        }
    }
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
