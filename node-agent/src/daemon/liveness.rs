//! Keeping each app running. On every pass (at start, then every
//! `liveness_interval`):
//!
//! 1. **Reconcile**: the app's current release is compared with what its
//!    driver runs ([`Driver::drift`]); on drift (a reboot, `pm2 delete`,
//!    `docker rm`, a dead supervisor) the driver puts the release back
//!    ([`Driver::repair`]) behind the health gate.
//! 2. **Liveness**: the health check, each result folded into
//!    `.slipway/health.json`; `restart_after` failures in a row restart the
//!    app through its driver — not while the driver cannot say what runs
//!    (dockerd down): that restart would fail too, and count.
//!
//! Repairs and restarts are paced (none before the first, then
//! `restart_backoff` doubled each time) and counted: one more than
//! `max_restarts` within `restart_window` is a crash loop — the restarts
//! stop, the app is reported `crashlooping`, and with
//! `rollback_on_crashloop` a release that went live within
//! `crashloop_grace` is rolled back. Each repair, crash loop and rollback is
//! a node event ([`crate::upkeep`]) for `status` and the controller's
//! audit log. An app stopped on purpose is left alone.
//!
//! [`Driver::drift`]: crate::driver::Driver::drift
//! [`Driver::repair`]: crate::driver::Driver::repair

use std::time::Duration;

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::bridge::Bridge;
use crate::config::{AppConfig, MAX_RESTART_BACKOFF};
use crate::deploy::Deployer;
use crate::driver;
use crate::health::{self, Liveness, Probe, ProbeTarget};
use crate::release::{activate, Journal, Paths, ReleaseId};
use crate::upkeep::{self, Crashloop, EventKind, NewEvent, Recovery};

/// How often an app without a health check is reconciled.
const RECONCILE_INTERVAL: Duration = Duration::from_secs(10);

/// Keeps `app` running until `stop`.
pub(super) async fn watch(app: AppConfig, bridge: Bridge, stop: CancellationToken) {
    let interval = app
        .health
        .as_ref()
        .map_or(RECONCILE_INTERVAL, |h| h.liveness_interval);
    // Liveness failures in a row since the last restart.
    let mut failures = 0u32;
    loop {
        // `run` made the first pass before the loops started.
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
        let (a, b) = (app.clone(), bridge.clone());
        let result = tokio::task::spawn_blocking(move || {
            let mut f = failures;
            pass(&a, &b, &mut f);
            f
        })
        .await;
        match result {
            Ok(f) => failures = f,
            Err(e) => tracing::warn!(app = %app.name, error = %e, "liveness pass panicked"),
        }
    }
}

/// One pass over `app` (blocking): reconcile, then probe and act on the
/// result. Errors are logged: one app must not keep the agent down.
pub(super) fn pass(app: &AppConfig, bridge: &Bridge, failures: &mut u32) {
    let current = match activate::read_current(&app.root) {
        Ok(Some(c)) => c,
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(app = %app.name, error = %e, "cannot read current release");
            return;
        }
    };
    if let Some(s) = upkeep::stopped(&app.root) {
        tracing::debug!(app = %app.name, by = %s.by, "stopped on purpose; left alone");
        *failures = 0;
        return;
    }
    // `listen` removed or changed since the front started: let the old
    // address go, or take up the new one.
    match crate::deploy::settle_front(app) {
        Ok(Some(line)) => tracing::warn!(app = %app.name, "{line}"),
        Ok(None) => {}
        Err(e) => tracing::error!(app = %app.name, error = %e, "cannot settle the app's front"),
    }
    // Docker and PM2 fork mode behind listen: the front holds the public
    // address; after a reboot (or a kill) it takes up its recorded target.
    if let (Some(l), Some(run)) = (&app.listen, &app.run) {
        if run.driver_name() != "exec" {
            match crate::front::ensure(&app.root, l) {
                Ok(true) => {
                    tracing::warn!(app = %app.name, "the app's front was not running; started it on {l}")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(app = %app.name, error = %e, "cannot start the app's front")
                }
            }
        }
    }
    let reconciled = reconcile(app, bridge, &current);
    if reconciled == Reconciled::Repaired {
        *failures = 0;
        return;
    }
    let probe = match probe_once(app) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(app = %app.name, error = %e, "liveness record not written");
            None
        }
    };
    let Some(probe) = probe else { return };
    if probe.ok {
        *failures = 0;
        return;
    }
    *failures = failures.saturating_add(1);
    let after = app.recovery.restart_after;
    if after > 0 && *failures >= after && reconciled == Reconciled::Unknown {
        // dockerd down (restarting, say): a restart would fail the same way
        // and count toward a crash loop. The engine's restart policy or the
        // next reconcile brings the app back once it answers.
        if *failures == after {
            tracing::warn!(app = %app.name, "{failures} liveness failures in a row; no restart while the driver cannot be asked");
        }
    } else if after > 0 && *failures >= after && driver::for_app(app, bridge).is_some() {
        let cause = format!(
            "{} liveness failures in a row: {}",
            failures,
            slipway_proto::limits::truncate(&probe.output, 512)
        );
        if attempt(app, bridge, &current, &cause, None) {
            *failures = 0;
        }
    }
}

/// What a reconcile found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reconciled {
    /// Nothing to repair, or a repair put off (backoff, crash loop, a
    /// deploy in progress), or no driver to ask.
    Nothing,
    /// Drift found and repaired (or a repair tried).
    Repaired,
    /// The driver could not say what runs (dockerd down).
    Unknown,
}

/// Compares what the driver runs with the current release and repairs a
/// difference.
fn reconcile(app: &AppConfig, bridge: &Bridge, current: &ReleaseId) -> Reconciled {
    let Some(driver) = driver::for_app(app, bridge) else {
        return Reconciled::Nothing;
    };
    // A deploy or rollback in progress is not drift: its blue/green pair
    // or half-reloaded PM2 is its own business.
    let store = Deployer::new(app, bridge);
    if store.check_idle("reconcile", Some(current)).is_err() {
        return Reconciled::Nothing;
    }
    let port = recorded_port(app, current);
    let target = match driver::Target::new(app, current) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(app = %app.name, error = %e, "cannot reconcile");
            return Reconciled::Nothing;
        }
    };
    match driver.drift(&target, port) {
        Ok(None) => Reconciled::Nothing,
        Ok(Some(cause)) => {
            tracing::warn!(app = %app.name, release = %current, "{cause}");
            // Waiting (backoff) or crashlooping: the probe still runs.
            if attempt(app, bridge, current, &cause, Some(port)) {
                Reconciled::Repaired
            } else {
                Reconciled::Nothing
            }
        }
        Err(e) => {
            // The driver cannot say (dockerd down): a repair would fail the
            // same way; the liveness check still tells whether it serves.
            tracing::warn!(app = %app.name, error = %e, "cannot ask the driver what runs");
            Reconciled::Unknown
        }
    }
}

/// The port the journal recorded for `release` (docker's blue/green port).
fn recorded_port(app: &AppConfig, release: &ReleaseId) -> Option<u16> {
    Journal::load(&Paths::new(&app.root).journal, &app.name)
        .ok()
        .and_then(|j| j.get(release).and_then(|r| r.port))
}

fn now_unix() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

/// Repairs (`repair = Some(port)`) or restarts the current release, unless
/// the app is crashlooping or the backoff since the last restart has not
/// passed; declares a crash loop when this would be one restart too many.
/// Returns whether it restarted (or tried to).
fn attempt(
    app: &AppConfig,
    bridge: &Bridge,
    current: &ReleaseId,
    cause: &str,
    repair: Option<Option<u16>>,
) -> bool {
    let cfg = &app.recovery;
    let mut rec = Recovery::load(&app.root, current.as_str());
    if rec.crashloop.is_some() {
        return false;
    }
    let now = now_unix();
    let made = rec.in_window(now, cfg.restart_window);
    if made >= cfg.max_restarts {
        crashloop(app, bridge, current, &mut rec, made, cause);
        return false;
    }
    let wait = upkeep::backoff(made, cfg.restart_backoff, MAX_RESTART_BACKOFF);
    let last = rec.restarts.last().copied().unwrap_or(i64::MIN);
    let wait_secs = i64::try_from(wait.as_millis().div_ceil(1000)).unwrap_or(i64::MAX);
    if last.saturating_add(wait_secs) > now {
        tracing::info!(app = %app.name, ?wait, "{cause}; next restart after the backoff");
        return false;
    }
    let store = Deployer::new(app, bridge);
    // Both are background operations (`lock::BACKGROUND_OPERATIONS`): a
    // deploy asked for meanwhile waits for them instead of failing.
    let (what, said) = if repair.is_some() {
        ("repair", "repair")
    } else {
        ("liveness restart", "restart")
    };
    // Locked first: an app a deploy or rollback took meanwhile is not
    // touched, and its restart is not counted.
    let mut session = match store.begin(what, Some(current)) {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(app = %app.name, "{what} put off: {e}");
            return false;
        }
    };
    match session.snapshot() {
        Ok(snap) if snap.current.as_ref() == Some(current) => {}
        // Another release went live meanwhile: the next pass looks again.
        _ => return false,
    }
    rec.restarts.push(now);
    if let Err(e) = rec.save(&app.root) {
        tracing::warn!(app = %app.name, error = %e, "cannot write the restart record");
    }
    let result = session.recover(repair).map_err(|e| e.to_string());
    drop(session);
    let (ok, outcome, release) = match result {
        Ok((release, a, gate)) => {
            let healthy = gate.map_or(String::new(), |g| {
                format!(", healthy after {} probes", g.probes)
            });
            tracing::info!(app = %app.name, %release, "restored: {}{healthy}", a.detail);
            (
                true,
                format!("{said}ed: {}{healthy}", a.detail),
                release.to_string(),
            )
        }
        Err(e) => {
            tracing::error!(app = %app.name, error = %e, "{said} failed");
            (false, format!("{said} failed: {e}"), current.to_string())
        }
    };
    event(
        app,
        NewEvent {
            kind: EventKind::AppRestored,
            release,
            from_release: String::new(),
            cause: cause.to_owned(),
            outcome,
            ok,
            actor: String::new(),
        },
    );
    true
}

/// Stops the restarts of `current`, reports it, and rolls it back when
/// configured and it went live within the grace.
fn crashloop(
    app: &AppConfig,
    bridge: &Bridge,
    current: &ReleaseId,
    rec: &mut Recovery,
    made: u32,
    cause: &str,
) {
    let cfg = &app.recovery;
    let loop_cause = format!(
        "{made} restarts within {}s, failing again: {cause}",
        cfg.restart_window.as_secs()
    );
    let went_live = Journal::load(&Paths::new(&app.root).journal, &app.name)
        .ok()
        .and_then(|j| j.get(current).and_then(|r| r.activated_at));
    let age = went_live.map(|t| OffsetDateTime::now_utc() - t);
    let within_grace = age.is_some_and(|a| a <= cfg.crashloop_grace);
    let roll_back = cfg.rollback_on_crashloop && within_grace;
    let action = if roll_back {
        "restarts stopped; rolling back".to_owned()
    } else if cfg.rollback_on_crashloop {
        format!(
            "restarts stopped; not rolled back: release {current} went live more than {}s ago",
            cfg.crashloop_grace.as_secs()
        )
    } else {
        "restarts stopped until `slipway-agent start` (or a deploy, rollback or restart)".to_owned()
    };
    tracing::error!(app = %app.name, release = %current, "crashlooping: {loop_cause}; {action}");
    // The event first, then the state that `status` shows.
    event(
        app,
        NewEvent {
            kind: EventKind::AppCrashlooping,
            release: current.to_string(),
            from_release: String::new(),
            cause: loop_cause.clone(),
            outcome: action.clone(),
            ok: false,
            actor: String::new(),
        },
    );
    rec.crashloop = Some(Crashloop {
        release: current.to_string(),
        since: OffsetDateTime::now_utc(),
        restarts: made,
        action,
    });
    if let Err(e) = rec.save(&app.root) {
        tracing::warn!(app = %app.name, error = %e, "cannot write the restart record");
    }
    if !roll_back {
        return;
    }
    let store = Deployer::new(app, bridge);
    let result = store
        .begin("rollback", Some(current))
        .map_err(|e| e.to_string())
        .and_then(|mut s| {
            s.set_actor("the agent (crashlooping)");
            s.rollback(None).map_err(|e| e.to_string())
        });
    let (ok, to, outcome) = match result {
        Ok(r) => {
            let ok = r.problem.is_none();
            let outcome = match &r.problem {
                None => format!("rolled back to {}; {current} marked bad", r.to),
                Some(p) => format!("rolled back to {} but it does not serve: {p}", r.to),
            };
            (ok, r.to.to_string(), outcome)
        }
        Err(e) => (false, current.to_string(), format!("rollback failed: {e}")),
    };
    if ok {
        tracing::warn!(app = %app.name, from = %current, %to, "{outcome}");
    } else {
        tracing::error!(app = %app.name, from = %current, "{outcome}");
    }
    event(
        app,
        NewEvent {
            kind: EventKind::AppRolledBack,
            release: to,
            from_release: current.to_string(),
            cause: format!("crashlooping: {loop_cause}"),
            outcome,
            ok,
            actor: String::new(),
        },
    );
}

fn event(app: &AppConfig, e: NewEvent) {
    if let Err(err) = upkeep::record_event(&app.root, &app.name, e) {
        tracing::error!(app = %app.name, error = %err, "cannot record the node event");
    }
}

/// Probes the current release of `app` once and folds the result into its
/// liveness record. Nothing deployed yet, or no check: nothing to probe.
pub fn probe_once(app: &AppConfig) -> std::io::Result<Option<Probe>> {
    let Some(cfg) = &app.health else {
        return Ok(None);
    };
    let Some(current) = activate::read_current(&app.root)? else {
        return Ok(None);
    };
    let target = ProbeTarget {
        port: recorded_port(app, &current),
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
    record.save(&app.root)?;
    Ok(Some(p))
}
