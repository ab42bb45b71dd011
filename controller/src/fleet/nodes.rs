//! The fleet view and the operator's node actions, read from and written to
//! the database only, so they work from another process while `serve` runs
//! (SQLite WAL, or PostgreSQL): `slipway-controller nodes` and `node revoke`.
//!
//! Metrics and apps are shown in the shapes the store keeps them in
//! ([`Metrics`], [`App`]).

use std::time::Duration;

use crate::audit::{self, AuditEvent};
use crate::link::liveness::{self, NodeState};
use crate::store::{App, FleetRow, Metrics, Store, StoreError};

/// One node of the fleet view (`slipway-controller nodes`, ListNodes).
#[derive(Debug, Clone, PartialEq)]
pub struct NodeView {
    /// Node id.
    pub id: String,
    /// Node name.
    pub name: String,
    /// Labels.
    pub labels: std::sync::Arc<serde_json::Value>,
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
    pub metrics: Option<std::sync::Arc<Metrics>>,
    /// Apps from the last Hello or heartbeat.
    pub apps: std::sync::Arc<[App]>,
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
    let rows = store.fleet().await?;
    views(store, rows, now).await
}

/// [`nodes`] and the newest certificate of every live node, from one read
/// of the fleet.
pub async fn nodes_and_certs(
    store: &Store,
    now: i64,
) -> Result<(Vec<NodeView>, Vec<crate::store::NodeCert>), StoreError> {
    let (rows, certs) = store.fleet_and_certs().await?;
    Ok((views(store, rows, now).await?, certs))
}

async fn views(store: &Store, rows: Vec<FleetRow>, now: i64) -> Result<Vec<NodeView>, StoreError> {
    let start = store.controller_start().await?;
    let (started_at, unreachable_after) = start
        .map_or((0, liveness::DEFAULT_UNREACHABLE_AFTER), |s| {
            (s.started_at, s.unreachable_after)
        });
    Ok(rows
        .into_iter()
        .map(|row| view(row, now, started_at, unreachable_after))
        .collect())
}

fn view(row: FleetRow, now: i64, started_at: i64, unreachable_after: u32) -> NodeView {
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
    NodeView {
        id: row.id,
        name: row.name,
        labels: row.labels,
        state,
        last_seen_at: row.last_seen_at,
        heartbeat_age_secs: row.heartbeat_at.map(|t| now.saturating_sub(t).max(0)),
        agent_version: row.agent_version,
        agent_rss_bytes: row.agent_rss_bytes,
        metrics: row.metrics,
        apps: row.apps,
        revoked_at: row.revoked_at,
        cert_expires_at: row.cert_expires_at,
    }
}

/// The views know the live sessions of every replica (`connected` says which
/// node holds one): a node that looks online from its last heartbeat but
/// holds no session is [`NodeState::Disconnected`] (no command could reach
/// it), and one not yet heard from since the start that holds a session is
/// online (its Hello came in the start's second).
pub fn apply_sessions(views: &mut [NodeView], connected: impl Fn(&str) -> bool) {
    for view in views {
        match (view.state, connected(&view.id)) {
            (NodeState::Online, false) => view.state = NodeState::Disconnected,
            (NodeState::Unknown, true) => view.state = NodeState::Online,
            _ => {}
        }
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
/// records NODE_REVOKED, together. A running `serve` refuses the
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
    let event = AuditEvent::success(
        audit::NODE_REVOKED,
        actor,
        "node",
        &node.id,
        serde_json::json!({ "name": node.name }),
    );
    let newly = store.revoke_node(&node.id, &event, now).await?;
    Ok(Revoked {
        node_id: node.id,
        newly,
    })
}
