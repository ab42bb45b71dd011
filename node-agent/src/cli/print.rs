//! What the command line prints: tables for people, JSON for `--json`.

use serde::Serialize;

use crate::release::{self, ReleaseId, Snapshot};

/// `value` as pretty JSON on stdout.
pub(super) fn print_json<T: Serialize>(value: &T) {
    match serde_json::to_string_pretty(value) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode output: {e}"),
    }
}

/// The controller link as `status` shows it: what `slipway-agent run`
/// records of its session ([`crate::link::replicas::LINK_FILE`]) while it
/// runs.
#[derive(Debug, Serialize)]
pub(super) struct ControllerLink {
    /// Every configured controller replica, in order.
    pub(super) replicas: Vec<String>,
    /// Whether `slipway-agent run` runs (holds the agent lock).
    pub(super) agent_running: bool,
    /// The replica its session is on, if one is up.
    pub(super) connected_to: Option<String>,
    /// The node id that replica welcomed.
    pub(super) node_id: Option<String>,
    /// Since when (seconds since the Unix epoch) it is connected, or not.
    pub(super) since_unix: Option<i64>,
    /// While not connected: the last failure and the replica tried next.
    pub(super) detail: Option<String>,
}

/// One line about the controller link, for `status`.
pub(super) fn controller_line(link: &ControllerLink) -> String {
    let since = link
        .since_unix
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .map_or_else(String::new, |t| format!(" since {t}"));
    if !link.agent_running {
        return format!(
            "controller: no session (slipway-agent run is not running); configured: {}",
            link.replicas.join(", ")
        );
    }
    match (&link.connected_to, &link.detail) {
        (Some(url), _) => {
            let of = link
                .replicas
                .iter()
                .position(|r| r == url)
                .map_or_else(String::new, |i| {
                    format!(" (replica {} of {})", i + 1, link.replicas.len())
                });
            let node = link
                .node_id
                .as_deref()
                .map_or_else(String::new, |n| format!(" as node {n}"));
            format!("controller: connected to {url}{of}{node}{since}")
        }
        (None, Some(detail)) => format!("controller: not connected{since}: {detail}"),
        (None, None) => "controller: not connected yet".to_owned(),
    }
}

#[derive(Debug, Serialize)]
/// One app as `status` shows it.
pub(super) struct AppStatus {
    #[serde(flatten)]
    pub(super) snapshot: Snapshot,
    /// The driver's view of the app's processes (never environment values).
    pub(super) processes: Option<crate::driver::DriverStatus>,
    /// Set when the driver could not be asked.
    pub(super) process_error: Option<String>,
    /// Latest liveness results, kept by `slipway-agent run`.
    pub(super) liveness: Option<crate::health::Liveness>,
    /// Rotation state of each log file (last rotation, count, method).
    pub(super) logs: crate::logs::LogsState,
    /// The last prune and what it freed.
    pub(super) last_prune: Option<crate::release::PruneRecord>,
    /// Set while the app is stopped on purpose (`run` leaves it alone).
    pub(super) stopped: Option<crate::upkeep::Stopped>,
    /// Set while the current release is crashlooping (restarts stopped).
    pub(super) crashloop: Option<crate::upkeep::Crashloop>,
    /// Restarts and repairs `run` made of the current release (unix
    /// seconds), within the restart window as last counted.
    pub(super) restarts: Vec<i64>,
    /// The latest node events (repairs, crash loops, automatic rollbacks),
    /// newest last, with whether the controller has them.
    pub(super) events: Vec<crate::upkeep::Event>,
    /// Where the app is reached and which release takes new connections.
    pub(super) public: crate::public::Public,
}

pub(super) fn print_status(
    node: &crate::metrics::NodeMetrics,
    link: Option<&ControllerLink>,
    apps: &[AppStatus],
) {
    const GIB: f64 = (1u64 << 30) as f64;
    println!(
        "node {}: cpu {:.0}% of {} cores, memory {:.1}/{:.1} GiB, load {:.2} {:.2} {:.2}",
        node.hostname.as_deref().unwrap_or("?"),
        node.cpu_percent,
        node.cores,
        node.mem_used_bytes as f64 / GIB,
        node.mem_total_bytes as f64 / GIB,
        node.load1,
        node.load5,
        node.load15
    );
    for d in &node.disks {
        println!(
            "disk {} ({}): {:.1}/{:.1} GiB used",
            d.path.display(),
            d.mount
                .as_ref()
                .map_or("?".into(), |m| m.display().to_string()),
            d.used_bytes as f64 / GIB,
            d.total_bytes as f64 / GIB
        );
    }
    if let Some(link) = link {
        println!("{}", controller_line(link));
    }
    for a in apps {
        let s = &a.snapshot;
        println!(
            "\n{:<16} current {:<32} releases {:<3} {}",
            s.app,
            s.current.as_ref().map_or("-", ReleaseId::as_str),
            s.releases.len(),
            match (&s.lock_holder, &s.in_progress) {
                (Some(h), _) => format!("busy: {h}"),
                (None, Some(op)) => format!("interrupted {}", op.name()),
                _ => "idle".into(),
            }
        );
        println!("  public: {}", crate::public::line(&a.public));
        if let Some(p) = &a.processes {
            for proc_ in &p.processes {
                // Crash restarts and the agent's own reloads apart: a
                // reload at every deploy is not a crash.
                let reloads = if proc_.reloads > 0 {
                    format!(" reloads {}", proc_.reloads)
                } else {
                    String::new()
                };
                println!(
                    "  {:<20} {:<10} pid {:<8} crash restarts {:<3}{reloads} mem {:>6.1} MiB  release {}",
                    proc_.name,
                    proc_.status,
                    proc_.pid.map_or("-".into(), |p| p.to_string()),
                    proc_.restarts,
                    proc_.memory_bytes.unwrap_or(0) as f64 / 1048576.0,
                    proc_.release.as_deref().unwrap_or("-")
                );
            }
            for n in &p.notes {
                println!("  note: {n}");
            }
        }
        if let Some(e) = &a.process_error {
            println!("  processes: {e}");
        }
        if let Some(st) = &a.stopped {
            println!(
                "  STOPPED on purpose by {} (`slipway-agent start` runs it again)",
                st.by
            );
        }
        if let Some(c) = &a.crashloop {
            println!(
                "  CRASHLOOPING: {} restarts of {} within the window; {}",
                c.restarts, c.release, c.action
            );
        }
        for e in a.events.iter().rev().take(5).rev() {
            println!(
                "  event {} {} {}: {} -> {}",
                e.at.format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default(),
                e.kind.as_str(),
                e.release,
                e.cause,
                e.outcome
            );
        }
        if let Some(l) = &a.liveness {
            println!(
                "  health: {} ({} probes, {} failures in a row; last: {})",
                match l.healthy {
                    Some(true) => "healthy",
                    Some(false) => "UNHEALTHY",
                    None => "unknown",
                },
                l.probes,
                l.consecutive_failures,
                l.last_output.as_deref().unwrap_or("-")
            );
        }
    }
}

pub(super) fn print_releases(snap: &Snapshot) {
    if snap.releases.is_empty() {
        println!("{}: no releases under {}", snap.app, snap.root.display());
        return;
    }
    println!(
        "{:<2} {:<36} {:<9} {:<20} {:>7} {:>12}  note",
        "", "RELEASE", "STATUS", "CREATED", "FILES", "BYTES"
    );
    for r in snap.releases.iter().rev() {
        let mark = if r.current {
            "*"
        } else if r.rollback_target {
            "<"
        } else {
            ""
        };
        let created = r
            .release
            .created_at
            .format(&time::macros::format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second]"
            ))
            .unwrap_or_default();
        println!(
            "{:<2} {:<36} {:<9} {:<20} {:>7} {:>12}  {}",
            mark,
            r.release.id.as_str(),
            r.release.status.as_str(),
            created,
            r.release.files,
            r.release.bytes,
            one_line(r.release.reason.as_deref().unwrap_or(""), 72)
        );
    }
    println!("* current   < rollback target");
    if let Some(h) = &snap.lock_holder {
        println!("busy: {h}");
    }
    if let Some(r) = &snap.recovered {
        println!("recovered: {r}");
    }
}

/// The first line of `text`, cut to `max` characters, for tables.
fn one_line(text: &str, max: usize) -> String {
    let first = text.lines().next().unwrap_or("");
    if first.chars().count() > max || text.lines().count() > 1 {
        let cut: String = first.chars().take(max).collect();
        format!("{cut}…")
    } else {
        first.to_owned()
    }
}

pub(super) fn describe_finding(f: &release::Finding) -> String {
    use release::Finding::*;
    match f {
        Modified {
            path,
            expected,
            actual,
        } => format!("modified: {path} (sha256 {actual}, expected {expected})"),
        Missing { path } => format!("missing:  {path}"),
        WrongType { path, expected } => format!("changed:  {path} is no longer a {expected}"),
        ModeChanged {
            path,
            expected,
            actual,
        } => format!("mode:     {path} is {actual}, expected {expected}"),
        SymlinkChanged {
            path,
            expected,
            actual,
        } => format!("symlink:  {path} -> {actual}, expected {expected}"),
        Added { path } => format!("added:    {path} (not in the artifact)"),
    }
}
