//! The fleet view and the operator's node actions, read from and written to
//! the database only, so they work from another process while `serve` runs
//! (SQLite WAL): `slipway-controller nodes` and `node revoke`.
//!
//! Heartbeats are stored as JSON in the shapes defined here ([`Metrics`],
//! [`App`]), converted once from the protocol types.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use slipway_proto::v1::{AppStatus, NodeMetrics};

use crate::audit::{self, AuditEvent};
use crate::liveness::{self, NodeState};
use crate::store::{self, FleetRow, Store, StoreError};

/// Host metrics as stored and shown.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Whole-host CPU usage, 0..100.
    pub cpu_percent: f64,
    /// Memory in use, bytes.
    pub mem_used_bytes: u64,
    /// Installed memory, bytes.
    pub mem_total_bytes: u64,
    /// Load averages.
    pub load1: f64,
    /// 5-minute load.
    pub load5: f64,
    /// 15-minute load.
    pub load15: f64,
    /// Filesystems.
    #[serde(default)]
    pub disks: Vec<Disk>,
}

/// One filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// Mount point.
    pub mount: String,
    /// Bytes used.
    pub used_bytes: u64,
    /// Size, bytes.
    pub total_bytes: u64,
}

/// One app on a node as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct App {
    /// App name.
    pub app: String,
    /// Release `current` points at.
    pub current_release: String,
    /// Last health verdict.
    pub health: String,
    /// A deploy/rollback/prune holds the app lock.
    pub in_progress: bool,
    /// Releases kept on disk.
    #[serde(default)]
    pub releases: Vec<Release>,
}

/// One release directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Release {
    /// Release id.
    pub id: String,
    /// Lifecycle state.
    pub status: String,
    /// Unpacked at (seconds since the epoch).
    pub created_at_unix: i64,
    /// Artifact sha256.
    pub artifact_sha256: String,
}

impl From<&NodeMetrics> for Metrics {
    fn from(m: &NodeMetrics) -> Self {
        Self {
            cpu_percent: m.cpu_percent,
            mem_used_bytes: m.mem_used_bytes,
            mem_total_bytes: m.mem_total_bytes,
            load1: m.load1,
            load5: m.load5,
            load15: m.load15,
            disks: m
                .disks
                .iter()
                .map(|d| Disk {
                    mount: d.mount.clone(),
                    used_bytes: d.used_bytes,
                    total_bytes: d.total_bytes,
                })
                .collect(),
        }
    }
}

impl From<&AppStatus> for App {
    fn from(a: &AppStatus) -> Self {
        Self {
            app: a.app.clone(),
            current_release: a.current_release.clone(),
            health: a.health.clone(),
            in_progress: a.in_progress,
            releases: a
                .releases
                .iter()
                .map(|r| Release {
                    id: r.id.clone(),
                    status: r.status.clone(),
                    created_at_unix: r.created_at_unix,
                    artifact_sha256: r.artifact_sha256.clone(),
                })
                .collect(),
        }
    }
}

/// The JSON stored for a heartbeat's metrics.
pub fn metrics_json(metrics: &NodeMetrics) -> serde_json::Value {
    serde_json::to_value(Metrics::from(metrics)).unwrap_or_default()
}

/// The JSON stored for a list of app states.
pub fn apps_json(apps: &[AppStatus]) -> serde_json::Value {
    serde_json::to_value(apps.iter().map(App::from).collect::<Vec<_>>()).unwrap_or_default()
}

/// One node in `slipway-controller nodes` (also its `--json` shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Node name.
    pub name: String,
    /// Labels.
    pub labels: serde_json::Value,
    /// online / unreachable / unknown / revoked.
    pub state: NodeState,
    /// Last Hello or heartbeat (seconds since the epoch).
    pub last_seen_at: Option<i64>,
    /// Seconds since the last heartbeat, at the time of the query.
    pub heartbeat_age_secs: Option<i64>,
    /// Agent version last reported.
    pub agent_version: String,
    /// Agent RSS, bytes.
    pub agent_rss_bytes: Option<u64>,
    /// Host metrics from the last heartbeat.
    pub metrics: Option<Metrics>,
    /// Apps from the last Hello or heartbeat.
    pub apps: Vec<App>,
    /// When the node was revoked.
    pub revoked_at: Option<i64>,
    /// Expiry of its newest certificate.
    pub cert_expires_at: i64,
}

/// The fleet as of `now`.
///
/// State uses [`liveness::node_state`] with the interval each node was told
/// and the start time and setting the running (or last) `serve` recorded; a
/// data dir where `serve` never ran counts as started at the epoch.
pub async fn nodes(store: &Store, now: i64) -> Result<Vec<NodeView>, StoreError> {
    let start = store.controller_start().await?;
    let (started_at, unreachable_after) = start
        .map_or((0, liveness::DEFAULT_UNREACHABLE_AFTER), |s| {
            (s.started_at, s.unreachable_after)
        });
    let rows = store.fleet().await?;
    rows.into_iter()
        .map(|row| view(row, now, started_at, unreachable_after))
        .collect()
}

fn view(
    row: FleetRow,
    now: i64,
    started_at: i64,
    unreachable_after: u32,
) -> Result<NodeView, StoreError> {
    let interval = row
        .heartbeat_interval_secs
        .map_or(liveness::DEFAULT_MIN_INTERVAL, Duration::from_secs);
    let state = if row.revoked_at.is_some() {
        NodeState::Revoked
    } else {
        liveness::node_state(
            row.last_seen_at,
            now,
            started_at,
            interval,
            unreachable_after,
        )
    };
    let metrics = row
        .metrics
        .map(serde_json::from_value)
        .transpose()
        .map_err(|source| StoreError::Json {
            column: "nodes.metrics",
            source,
        })?;
    let apps = serde_json::from_value(row.apps).map_err(|source| StoreError::Json {
        column: "nodes.apps",
        source,
    })?;
    Ok(NodeView {
        id: row.id,
        name: row.name,
        labels: row.labels,
        state,
        last_seen_at: row.last_seen_at,
        heartbeat_age_secs: row.heartbeat_at.map(|t| now.saturating_sub(t).max(0)),
        agent_version: row.agent_version,
        agent_rss_bytes: row.agent_rss_bytes,
        metrics,
        apps,
        revoked_at: row.revoked_at,
        cert_expires_at: row.cert_expires_at,
    })
}

/// The fleet as a text table, one node per line.
pub fn render_table(nodes: &[NodeView]) -> String {
    let header = [
        "ID",
        "NAME",
        "LABELS",
        "STATE",
        "HEARTBEAT",
        "VERSION",
        "RSS",
        "CPU",
        "MEM",
        "LOAD",
        "APPS",
    ];
    let mut rows: Vec<[String; 11]> = vec![header.map(str::to_owned)];
    for node in nodes {
        let labels = node
            .labels
            .as_object()
            .map(|labels| {
                labels
                    .iter()
                    .map(|(k, v)| match v.as_str() {
                        Some("") | None => k.clone(),
                        Some(v) => format!("{k}={v}"),
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
        let dash = || "-".to_owned();
        let (cpu, mem, load) = node.metrics.as_ref().map_or_else(
            || (dash(), dash(), dash()),
            |m| {
                (
                    format!("{:.0}%", m.cpu_percent),
                    format!("{}/{}", bytes(m.mem_used_bytes), bytes(m.mem_total_bytes)),
                    format!("{:.2}", m.load1),
                )
            },
        );
        let apps = node
            .apps
            .iter()
            .map(|a| {
                let release = if a.current_release.is_empty() {
                    "-"
                } else {
                    &a.current_release
                };
                let health = if a.health.is_empty() { "?" } else { &a.health };
                format!("{}@{release} ({health})", a.app)
            })
            .collect::<Vec<_>>()
            .join(", ");
        rows.push([
            node.id.clone(),
            node.name.clone(),
            if labels.is_empty() { dash() } else { labels },
            node.state.as_str().to_owned(),
            node.heartbeat_age_secs
                .map_or_else(dash, |age| format!("{age}s ago")),
            if node.agent_version.is_empty() {
                dash()
            } else {
                node.agent_version.clone()
            },
            node.agent_rss_bytes.map_or_else(dash, bytes),
            cpu,
            mem,
            load,
            if apps.is_empty() { dash() } else { apps },
        ]);
    }
    let mut widths = [0usize; 11];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Bytes in binary units with one decimal: `512.0M`, `1.9G`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    #[allow(clippy::cast_precision_loss)] // display only
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// Why a revoke did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    /// No node has that id or name.
    #[error("no node with id or name {0:?}")]
    NotFound(String),
    /// Several nodes share that name.
    #[error("{count} nodes are named {name:?}; give the node id")]
    Ambiguous {
        /// The name given.
        name: String,
        /// How many matched.
        count: usize,
    },
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a revoke did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The node's id.
    pub node_id: String,
    /// False if the node was already revoked (nothing changed, no event).
    pub newly: bool,
}

/// Revokes the node with this id (or unique name): sets `revoked_at` and
/// records NODE_REVOKED, in one transaction. A running `serve` refuses the
/// node's next connection at once and closes a stream it holds within
/// [`crate::server::REVOCATION_POLL`].
pub async fn revoke(
    store: &Store,
    id_or_name: &str,
    actor: &str,
    now: i64,
) -> Result<Revoked, RevokeError> {
    let mut found = store.find_node(id_or_name).await?;
    let node = match found.len() {
        0 => return Err(RevokeError::NotFound(id_or_name.to_owned())),
        1 => found.remove(0),
        count => {
            return Err(RevokeError::Ambiguous {
                name: id_or_name.to_owned(),
                count,
            })
        }
    };
    let mut tx = store.begin().await?;
    let newly = store::revoke_node(&mut tx, &node.id, now).await?;
    if newly {
        store::insert_audit(
            &mut tx,
            &AuditEvent::success(
                audit::NODE_REVOKED,
                actor,
                "node",
                &node.id,
                serde_json::json!({ "name": node.name }),
            ),
            now,
        )
        .await?;
    }
    tx.commit().await.map_err(StoreError::from)?;
    Ok(Revoked {
        node_id: node.id,
        newly,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_units() {
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(24 * 1024 * 1024), "24.0M");
        assert_eq!(bytes(2 * 1024 * 1024 * 1024), "2.0G");
    }
}
