//! `slipway-agent run`: the long-running agent. On start it brings back apps
//! of the exec driver whose supervisor is gone (after a reboot: PM2 and
//! Docker have their own resurrection), then runs every app's liveness check
//! on its interval and records the results (with timestamps) in
//! `.slipway/health.json`, which `status` shows. The controller link joins it
//! later.

use std::future::Future;
use std::time::Duration;

use cancel::CancelFlag;
use time::OffsetDateTime;

use crate::config::{AppConfig, Config, RunConfig};
use crate::health::{self, Liveness, ProbeTarget};
use crate::release::{activate, Journal, Store};
use crate::supervise;

/// How long shutdown waits for in-flight probes.
const DRAIN: Duration = Duration::from_secs(5);

/// Runs liveness loops for every app with a health check until `shutdown`.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let apps: Vec<AppConfig> = config.apps.values().cloned().collect();
    tokio::task::spawn_blocking(move || {
        for app in &apps {
            resurrect(app);
        }
    })
    .await?;
    let stop = CancelFlag::default();
    let mut tasks = Vec::new();
    for app in config.apps.values() {
        if app.health.is_some() {
            tasks.push(tokio::spawn(watch(app.clone(), stop.clone())));
        }
    }
    tracing::info!(apps = tasks.len(), "agent running liveness checks");
    shutdown.await;
    stop.cancel();
    for t in tasks {
        if tokio::time::timeout(DRAIN, t).await.is_err() {
            tracing::warn!("a liveness probe did not finish within {DRAIN:?}");
        }
    }
    Ok(())
}

async fn watch(app: AppConfig, stop: CancelFlag) {
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

/// Starts the current release of an exec-driver app that has no running
/// supervisor. Errors are logged: one app must not keep the agent down.
fn resurrect(app: &AppConfig) {
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
    let store = Store::new(app);
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
    let port = Journal::load(&app.root.join(".slipway/journal.json"), &app.name)
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

/// A cancellation flag shared by the loops (a `watch` channel underneath).
mod cancel {
    use tokio::sync::watch;

    #[derive(Debug, Clone)]
    pub(super) struct CancelFlag {
        tx: std::sync::Arc<watch::Sender<bool>>,
        rx: watch::Receiver<bool>,
    }

    impl Default for CancelFlag {
        fn default() -> Self {
            let (tx, rx) = watch::channel(false);
            Self {
                tx: std::sync::Arc::new(tx),
                rx,
            }
        }
    }

    impl CancelFlag {
        pub(super) fn cancel(&self) {
            let _ = self.tx.send(true);
        }

        pub(super) async fn cancelled(&self) {
            let mut rx = self.rx.clone();
            let _ = rx.wait_for(|v| *v).await;
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
