//! The liveness check: the current release of an app probed on its
//! `liveness_interval`, each result folded into `.slipway/health.json`.

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::config::AppConfig;
use crate::health::{self, Liveness, ProbeTarget};
use crate::release::{activate, Journal, Paths};

/// Probes `app` until `stop`.
pub(super) async fn watch(app: AppConfig, stop: CancellationToken) {
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
