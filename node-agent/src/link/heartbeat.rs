//! Heartbeats: the node's metrics and every app's state, as the controller
//! sees them (in Hello, on the session's interval, and in answer to a
//! status request).

use slipway_proto::limits;
use slipway_proto::v1::{AppStatus, Heartbeat, NodeMetrics, ReleaseInfo};

use crate::bridge::Bridge;
use crate::config::{AppConfig, Config};
use crate::deploy::Deployer;
use crate::health::Liveness;

/// One heartbeat: the node's metrics and every app's state (reading it may
/// finish an interrupted operation through the app's driver, on `bridge`).
pub fn heartbeat(config: &Config, bridge: &Bridge) -> Heartbeat {
    let roots: Vec<_> = config.apps.values().map(|a| a.root.clone()).collect();
    let m = crate::metrics::snapshot(&roots);
    let disks = m
        .disks
        .iter()
        .map(|d| slipway_proto::v1::DiskUsage {
            mount: d
                .mount
                .as_ref()
                .map_or_else(|| d.path.display().to_string(), |p| p.display().to_string()),
            used_bytes: d.used_bytes,
            total_bytes: d.total_bytes,
        })
        .collect();
    Heartbeat {
        unix_time: time::OffsetDateTime::now_utc().unix_timestamp(),
        metrics: Some(NodeMetrics {
            cpu_percent: f64::from(m.cpu_percent),
            mem_used_bytes: m.mem_used_bytes,
            mem_total_bytes: m.mem_total_bytes,
            load1: m.load1,
            load5: m.load5,
            load15: m.load15,
            disks,
        }),
        apps: app_statuses(config, bridge),
        agent_version: crate::version::current().to_owned(),
        agent_rss_bytes: own_rss_bytes(),
    }
}

/// This process's resident memory, so a leak shows fleet-wide.
fn own_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// What the controller needs of each app; an app whose state cannot be
/// read is reported with the error as its health.
pub fn app_statuses(config: &Config, bridge: &Bridge) -> Vec<AppStatus> {
    config
        .apps
        .values()
        .map(|app| app_status(app, bridge))
        .collect()
}

fn app_status(app: &AppConfig, bridge: &Bridge) -> AppStatus {
    let snap = match Deployer::new(app, bridge).snapshot() {
        Ok(s) => s,
        Err(e) => {
            return AppStatus {
                app: app.name.clone(),
                health: limits::truncate(&format!("error: {e}"), limits::MAX_HEALTH).to_owned(),
                ..AppStatus::default()
            }
        }
    };
    let current = snap.current.as_ref().map(ToString::to_string);
    let kept = crate::upkeep::verdict(&app.root, current.as_deref());
    let health = match Liveness::load(&app.root).and_then(|l| l.healthy.map(|h| (h, l))) {
        // Stopped on purpose or crashlooping says more than the last probe.
        _ if kept.is_some() => {
            limits::truncate(kept.as_deref().unwrap_or_default(), limits::MAX_HEALTH).to_owned()
        }
        Some((true, _)) => "healthy".to_owned(),
        Some((false, l)) => {
            let text = format!("unhealthy: {}", l.last_output.unwrap_or_default());
            // Within the limit the controller checks: the check's output is
            // cut, not the heartbeat refused.
            limits::truncate(&text, limits::MAX_HEALTH).to_owned()
        }
        None if app.health.is_some() => "unknown".to_owned(),
        None => "no check".to_owned(),
    };
    AppStatus {
        app: app.name.clone(),
        current_release: snap
            .current
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        releases: snap
            .releases
            .iter()
            .map(|r| ReleaseInfo {
                id: r.release.id.to_string(),
                status: r.release.status.as_str().to_owned(),
                created_at_unix: r.release.created_at.unix_timestamp(),
                artifact_sha256: r.release.artifact_sha256.clone(),
                reason: r.release.reason.as_deref().map_or_else(String::new, |why| {
                    slipway_proto::limits::truncate(
                        &slipway_proto::limits::one_line(why, 400),
                        slipway_proto::limits::MAX_RELEASE_REASON,
                    )
                    .to_owned()
                }),
                // The controller's record, filled in by it.
                env_version: 0,
            })
            .collect(),
        health,
        in_progress: snap.lock_holder.is_some() || snap.in_progress.is_some(),
        env_version: crate::envfile::version(&app.root),
        public: Some(crate::public::to_wire(&crate::public::of(app))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_status_reports_releases_and_health() {
        let dir = tempfile::tempdir().unwrap();
        let app = AppConfig::with_defaults("web", dir.path().join("app"));
        let st = app_status(&app, &Bridge::owned().unwrap());
        assert_eq!(
            (
                st.app.as_str(),
                st.current_release.as_str(),
                st.health.as_str()
            ),
            ("web", "", "no check")
        );
        assert!(!st.in_progress);
    }
}
