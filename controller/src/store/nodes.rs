//! Nodes, their certificates and latest reported state (`nodes`,
//! `node_certs`), and enrollment, which uses a join token in the same step.
//!
//! Heartbeats are stored as JSON in the shapes defined here ([`Metrics`],
//! [`App`]), converted once from the protocol types and read back into
//! them by [`Store::fleet`].

use serde::{Deserialize, Serialize};
use slipway_proto::v1::{AppStatus, DiskUsage, Heartbeat, NodeMetrics, PublicAddress, ReleaseInfo};
use sqlx::AnyConnection;
use sqlx::Row as _;

use super::join_tokens::use_join_token;
use super::{insert_audit, Backend, Store, StoreError};
use crate::audit::AuditEvent;

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
    /// The env version `shared/.env` was last written from (0: never).
    #[serde(default)]
    pub env_version: u64,
    /// Where the app is reached and which release takes new connections;
    /// absent from agents that do not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public: Option<Public>,
}

/// An app's public address on a node, as stored and shown (checked on
/// receipt by `slipway_proto::limits::check_public`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Public {
    /// `listen` ("0.0.0.0:3000" or a unix socket path); "" without one.
    pub address: String,
    /// socket_handover, agent_proxy, pm2_cluster or none.
    pub mode: String,
    /// The release new connections go to; "" when the address is not held.
    pub release: String,
    /// agent_proxy: the loopback backend new connections go to.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub backend: String,
    /// Connections still finishing on earlier backends.
    #[serde(default)]
    pub draining: u64,
    /// Whether the kernel forwards the node's own clients, or why not.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub forwarding: String,
}

impl From<&PublicAddress> for Public {
    fn from(p: &PublicAddress) -> Self {
        Self {
            address: p.address.clone(),
            mode: p.mode.clone(),
            release: p.release.clone(),
            backend: p.backend.clone(),
            draining: p.draining,
            forwarding: p.forwarding.clone(),
        }
    }
}

impl From<&Public> for PublicAddress {
    fn from(p: &Public) -> Self {
        Self {
            address: p.address.clone(),
            mode: p.mode.clone(),
            release: p.release.clone(),
            backend: p.backend.clone(),
            draining: p.draining,
            forwarding: p.forwarding.clone(),
        }
    }
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
    /// Why it is failed or bad, and who marked it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
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
            env_version: a.env_version,
            public: a.public.as_ref().map(Public::from),
            releases: a
                .releases
                .iter()
                .map(|r| Release {
                    id: r.id.clone(),
                    status: r.status.clone(),
                    created_at_unix: r.created_at_unix,
                    artifact_sha256: r.artifact_sha256.clone(),
                    reason: r.reason.clone(),
                })
                .collect(),
        }
    }
}

impl From<&Metrics> for NodeMetrics {
    fn from(m: &Metrics) -> Self {
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
                .map(|d| DiskUsage {
                    mount: d.mount.clone(),
                    used_bytes: d.used_bytes,
                    total_bytes: d.total_bytes,
                })
                .collect(),
        }
    }
}

impl From<&App> for AppStatus {
    fn from(a: &App) -> Self {
        Self {
            app: a.app.clone(),
            current_release: a.current_release.clone(),
            health: a.health.clone(),
            in_progress: a.in_progress,
            env_version: a.env_version,
            public: a.public.as_ref().map(PublicAddress::from),
            releases: a
                .releases
                .iter()
                .map(|r| ReleaseInfo {
                    id: r.id.clone(),
                    status: r.status.clone(),
                    created_at_unix: r.created_at_unix,
                    artifact_sha256: r.artifact_sha256.clone(),
                    reason: r.reason.clone(),
                    // The controller fills it in from its deployments.
                    env_version: 0,
                })
                .collect(),
        }
    }
}

/// The JSON stored for a heartbeat's metrics.
fn metrics_json(metrics: &NodeMetrics) -> String {
    serde_json::to_value(Metrics::from(metrics))
        .unwrap_or_default()
        .to_string()
}

/// The JSON stored for a list of app states.
fn apps_json(apps: &[AppStatus]) -> String {
    serde_json::to_value(apps.iter().map(App::from).collect::<Vec<_>>())
        .unwrap_or_default()
        .to_string()
}

/// A node as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    /// Controller-assigned id, also the certificate's common name.
    pub id: String,
    /// Human-friendly name from enrollment.
    pub name: String,
    /// sha256 hex of the node's current certificate.
    pub cert_fingerprint: String,
    /// Set when the node was revoked; its certificate is then refused.
    pub revoked_at: Option<i64>,
    /// Last time a session was accepted or a heartbeat arrived.
    pub last_seen_at: Option<i64>,
}

/// A live certificate and the node it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCert {
    /// The node.
    pub node: NodeRow,
    /// When this certificate was issued (seconds since the epoch).
    pub issued_at: i64,
    /// When it expires.
    pub expires_at: i64,
}

/// A live node's newest certificate, for certificate health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCert {
    /// Node id.
    pub id: String,
    /// Node name.
    pub name: String,
    /// When the certificate was issued (seconds since the epoch).
    pub issued_at: i64,
    /// When it expires.
    pub expires_at: i64,
    /// sha256 hex of the CA that signed it; None for certificates recorded
    /// before the store kept it.
    pub ca_sha256: Option<String>,
}

/// A node with its latest reported state, for the fleet view.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetRow {
    /// Node id.
    pub id: String,
    /// Node name.
    pub name: String,
    /// JSON object of labels.
    pub labels: std::sync::Arc<serde_json::Value>,
    /// Agent version last reported.
    pub agent_version: String,
    /// Enrollment time.
    pub enrolled_at: i64,
    /// Revocation time.
    pub revoked_at: Option<i64>,
    /// Last Hello or heartbeat.
    pub last_seen_at: Option<i64>,
    /// Last heartbeat.
    pub heartbeat_at: Option<i64>,
    /// Agent RSS from the last heartbeat.
    pub agent_rss_bytes: Option<u64>,
    /// Host metrics from the last heartbeat.
    pub metrics: Option<std::sync::Arc<Metrics>>,
    /// App states from the last Hello or heartbeat.
    pub apps: std::sync::Arc<[App]>,
    /// Interval announced in the node's last Welcome.
    pub heartbeat_interval_secs: Option<u64>,
    /// Expiry of the node's newest certificate.
    pub cert_expires_at: i64,
}

/// Everything recorded about a freshly enrolled node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewNode<'a> {
    /// Controller-assigned id.
    pub id: &'a str,
    /// Name from the enrollment request.
    pub name: &'a str,
    /// Hex serial of the issued certificate.
    pub cert_serial: &'a str,
    /// sha256 hex of the issued certificate.
    pub cert_fingerprint: &'a str,
    /// sha256 hex of the CA certificate that signed it.
    pub cert_ca_sha256: &'a str,
    /// Expiry of the issued certificate.
    pub cert_expires_at: i64,
    /// JSON object of labels.
    pub labels: &'a serde_json::Value,
    /// Agent version from the request.
    pub agent_version: &'a str,
    /// Now.
    pub enrolled_at: i64,
}

impl NewNode<'_> {
    /// Its certificate as [`insert_node_cert`] records it.
    fn cert(&self) -> NewCert<'_> {
        NewCert {
            fingerprint: self.cert_fingerprint,
            serial: self.cert_serial,
            expires_at: self.cert_expires_at,
            ca_sha256: self.cert_ca_sha256,
        }
    }
}

/// A node certificate to record (enrollment or renewal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewCert<'a> {
    /// sha256 hex of the certificate's DER.
    pub fingerprint: &'a str,
    /// Hex serial.
    pub serial: &'a str,
    /// Expiry, seconds since the epoch.
    pub expires_at: i64,
    /// sha256 hex of the CA certificate that signed it.
    pub ca_sha256: &'a str,
}

/// A node to record together with the join token it used: see
/// [`Store::enroll_node`].
#[derive(Debug, Clone, PartialEq)]
pub struct NewEnrollment<'a> {
    /// The join token (its id); the caller checked its secret.
    pub token_id: &'a str,
    /// The node and its first certificate.
    pub node: NewNode<'a>,
    /// `enroll --replace`: the id of the live node of that name, which
    /// this enrollment re-keys instead of adding a node (its certificates
    /// are replaced by the new one; name, labels, history and apps stay).
    /// `node.id` is then that id.
    pub replace: Option<&'a str>,
    /// The NODE_ENROLLED (or, replacing, NODE_REPLACED) event.
    pub event: &'a AuditEvent,
}

/// How [`Store::enroll_node`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrolled {
    /// The node is recorded; `replaced` is the node it re-keyed
    /// (`replace`), if it did.
    Node {
        /// Id of the replaced node.
        replaced: Option<String>,
    },
    /// `replace` named a node that is no longer the live node of that name
    /// (revoked, or replaced by another enrollment, meanwhile): nothing
    /// recorded (the token stays unused).
    Changed {
        /// The node `replace` named.
        expected: String,
    },
    /// The token was used, or expired, meanwhile: nothing recorded.
    TokenSpent,
    /// A live node has the name and `replace` was not asked: nothing
    /// recorded (the token stays unused).
    NameTaken {
        /// That node's id.
        existing: String,
        /// When it enrolled.
        enrolled_at: i64,
    },
}

/// A [`NodeRow`] from a row selecting `id, name, cert_fingerprint,
/// revoked_at, last_seen_at` of `nodes`.
fn node_row(row: &sqlx::any::AnyRow) -> Result<NodeRow, StoreError> {
    Ok(NodeRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        cert_fingerprint: row.try_get("cert_fingerprint")?,
        revoked_at: row.try_get("revoked_at")?,
        last_seen_at: row.try_get("last_seen_at")?,
    })
}

impl Store {
    /// The node holding the certificate with this fingerprint, if any (any
    /// of its live certificates: the newest or one a renewal superseded).
    pub async fn node_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Option<NodeRow>, StoreError> {
        Ok(self.peer_cert(fingerprint).await?.map(|peer| peer.node))
    }

    /// The certificate with this fingerprint and the node it belongs to.
    pub async fn peer_cert(&self, fingerprint: &str) -> Result<Option<PeerCert>, StoreError> {
        let row = sqlx::query(
            "SELECT n.id, n.name, n.cert_fingerprint, n.revoked_at, n.last_seen_at,
                    c.issued_at, c.expires_at
             FROM node_certs c JOIN nodes n ON n.id = c.node_id
             WHERE c.fingerprint = $1",
        )
        .bind(fingerprint)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(PeerCert {
                node: node_row(&row)?,
                issued_at: row.try_get("issued_at")?,
                expires_at: row.try_get("expires_at")?,
            })
        })
        .transpose()
    }

    /// Records an accepted session: the Hello's version and apps and the
    /// heartbeat interval announced. False (nothing written) if the node is
    /// revoked meanwhile.
    pub async fn record_session(
        &self,
        node_id: &str,
        now: i64,
        agent_version: &str,
        apps: &[AppStatus],
        heartbeat_interval_secs: u64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE nodes SET last_seen_at = $1,
                    agent_version = CASE WHEN $2 = '' THEN agent_version ELSE $2 END,
                    apps = $3, heartbeat_interval_secs = $4
             WHERE id = $5 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(agent_version)
        .bind(apps_json(apps))
        .bind(i64::try_from(heartbeat_interval_secs).unwrap_or(i64::MAX))
        .bind(node_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Stores the node's latest heartbeat (the agent's clock in it is not
    /// kept: `now` is the controller's). False (nothing written) if the
    /// node is revoked: the caller then closes the session.
    pub async fn record_heartbeat(
        &self,
        node_id: &str,
        now: i64,
        heartbeat: &Heartbeat,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE nodes SET last_seen_at = $1, heartbeat_at = $1,
                    agent_version = CASE WHEN $2 = '' THEN agent_version ELSE $2 END,
                    agent_rss_bytes = $3, metrics = $4, apps = $5
             WHERE id = $6 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(&heartbeat.agent_version)
        .bind(i64::try_from(heartbeat.agent_rss_bytes).unwrap_or(i64::MAX))
        .bind(heartbeat.metrics.as_ref().map(metrics_json))
        .bind(apps_json(&heartbeat.apps))
        .bind(node_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Ids of every revoked node.
    pub async fn revoked_node_ids(&self) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT id FROM nodes WHERE revoked_at IS NOT NULL")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Ids of every node not revoked, by id.
    pub async fn live_node_ids(&self) -> Result<Vec<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT id FROM nodes WHERE revoked_at IS NULL ORDER BY id")
                .fetch_all(&self.pool)
                .await?,
        )
    }

    /// Finds a node by id, or else the live node of that name (names are
    /// unique among live nodes; revoked nodes are found by id only).
    pub async fn find_node(&self, id_or_name: &str) -> Result<Vec<NodeRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, cert_fingerprint, revoked_at, last_seen_at FROM nodes
             WHERE id = $1
                OR (name = $1 AND revoked_at IS NULL
                    AND NOT EXISTS (SELECT 1 FROM nodes WHERE id = $1))",
        )
        .bind(id_or_name)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(node_row).collect()
    }

    /// Records an enrolled node in one transaction: uses the join token
    /// (only if still unused and unexpired at `node.enrolled_at`), refuses
    /// a name a live node has unless `replace` names that node (then the
    /// node is re-keyed: its certificates are dropped for the new one, the
    /// token's tags are merged into its labels, and its id, name, history
    /// and apps stay), else inserts the node with its first certificate;
    /// and records `event`. Nothing is recorded unless it ends
    /// [`Enrolled::Node`].
    pub async fn enroll_node(
        &self,
        enrollment: &NewEnrollment<'_>,
    ) -> Result<Enrolled, StoreError> {
        let node = &enrollment.node;
        let now = node.enrolled_at;
        let mut tx = self.begin().await?;
        if !use_join_token(&mut tx, enrollment.token_id, node.id, now).await? {
            return Ok(Enrolled::TokenSpent);
        }
        // Names are unique among live nodes: a second `n1` would make every
        // `--node n1` ambiguous. Replacing is explicit and audited.
        let live = live_node_named(&mut tx, node.name).await?;
        let replaced = match (live, enrollment.replace) {
            (None, None) => {
                insert_node(&mut tx, node).await?;
                None
            }
            (Some((existing, _)), Some(expected))
                if existing == expected && node.id == expected =>
            {
                rekey_node(&mut tx, node).await?;
                Some(existing)
            }
            (_, Some(expected)) => {
                return Ok(Enrolled::Changed {
                    expected: expected.to_owned(),
                })
            }
            (Some((existing, enrolled_at)), None) => {
                return Ok(Enrolled::NameTaken {
                    existing,
                    enrolled_at,
                })
            }
        };
        insert_audit(&mut tx, enrollment.event, now).await?;
        tx.commit().await?;
        Ok(Enrolled::Node { replaced })
    }

    /// Records a renewed certificate of `node_id` issued `now`, in one
    /// transaction: adds it to the node's live certificates (the others
    /// stay valid), makes it the newest, drops the node's expired ones and
    /// records `event`. False (nothing recorded) if the node is revoked.
    pub async fn renew_node_cert(
        &self,
        node_id: &str,
        cert: &NewCert<'_>,
        event: &AuditEvent,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        insert_node_cert(&mut tx, node_id, cert, now).await?;
        if !set_newest_cert(
            &mut tx,
            node_id,
            cert.fingerprint,
            cert.serial,
            cert.expires_at,
            now,
        )
        .await?
        {
            // Revoked meanwhile; dropping `tx` rolls back.
            return Ok(false);
        }
        insert_audit(&mut tx, event, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Marks a node revoked and records `event`, together; false (nothing
    /// recorded) if it already was revoked.
    pub async fn revoke_node(
        &self,
        node_id: &str,
        event: &AuditEvent,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        if !revoke_node(&mut tx, node_id, now).await? {
            return Ok(false);
        }
        insert_audit(&mut tx, event, now).await?;
        tx.commit().await?;
        Ok(true)
    }
}

/// Records a newly enrolled node on `conn`.
pub(super) async fn insert_node(
    conn: &mut AnyConnection,
    node: &NewNode<'_>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO nodes (id, name, cert_serial, cert_fingerprint, cert_expires_at, labels,
                            agent_version, enrolled_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(node.id)
    .bind(node.name)
    .bind(node.cert_serial)
    .bind(node.cert_fingerprint)
    .bind(node.cert_expires_at)
    .bind(node.labels.to_string())
    .bind(node.agent_version)
    .bind(node.enrolled_at)
    .execute(&mut *conn)
    .await?;
    insert_node_cert(conn, node.id, &node.cert(), node.enrolled_at).await
}

/// `enroll --replace` of the live node `node.id` on `conn`: every
/// certificate it had is dropped (the old key opens no new session), the
/// new one becomes its only one, the labels given are merged over its own
/// (JSON merge patch: the token's tags win), and the agent version is the
/// enrolling agent's. Its name, id, history and apps stay.
async fn rekey_node(conn: &mut AnyConnection, node: &NewNode<'_>) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM node_certs WHERE node_id = $1")
        .bind(node.id)
        .execute(&mut *conn)
        .await?;
    // Labels are a flat object of strings, for which SQLite's JSON merge
    // patch and PostgreSQL's jsonb `||` agree: the given keys win.
    let merged = match Backend::of(conn) {
        Backend::Sqlite => "json_patch(labels, $4)",
        Backend::Postgres => "(labels::jsonb || $4::jsonb)::text",
    };
    let sql = format!(
        "UPDATE nodes SET cert_serial = $1, cert_fingerprint = $2, cert_expires_at = $3,
                labels = {merged},
                agent_version = CASE WHEN $5 = '' THEN agent_version ELSE $5 END
         WHERE id = $6 AND revoked_at IS NULL"
    );
    sqlx::query(&sql)
        .bind(node.cert_serial)
        .bind(node.cert_fingerprint)
        .bind(node.cert_expires_at)
        .bind(node.labels.to_string())
        .bind(node.agent_version)
        .bind(node.id)
        .execute(&mut *conn)
        .await?;
    insert_node_cert(conn, node.id, &node.cert(), node.enrolled_at).await
}

/// Adds a live certificate of `node_id` (enrollment or renewal); the node's
/// other certificates stay valid.
pub(super) async fn insert_node_cert(
    conn: &mut AnyConnection,
    node_id: &str,
    cert: &NewCert<'_>,
    issued_at: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO node_certs (fingerprint, node_id, serial, issued_at, expires_at, ca_sha256)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(cert.fingerprint)
    .bind(node_id)
    .bind(cert.serial)
    .bind(issued_at)
    .bind(cert.expires_at)
    .bind(cert.ca_sha256)
    .execute(conn)
    .await?;
    Ok(())
}

/// After a renewal: makes the new certificate the node's newest and drops
/// its certificates that have expired (TLS refuses them anyway). False if
/// the node was revoked meanwhile.
pub(super) async fn set_newest_cert(
    conn: &mut AnyConnection,
    node_id: &str,
    fingerprint: &str,
    serial: &str,
    expires_at: i64,
    now: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE nodes SET cert_fingerprint = $1, cert_serial = $2, cert_expires_at = $3
         WHERE id = $4 AND revoked_at IS NULL",
    )
    .bind(fingerprint)
    .bind(serial)
    .bind(expires_at)
    .bind(node_id)
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM node_certs WHERE node_id = $1 AND expires_at <= $2")
        .bind(node_id)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// The id and enrollment time of the live (non-revoked) node named `name`,
/// if any, on `conn`.
pub(super) async fn live_node_named(
    conn: &mut AnyConnection,
    name: &str,
) -> Result<Option<(String, i64)>, StoreError> {
    let row =
        sqlx::query("SELECT id, enrolled_at FROM nodes WHERE name = $1 AND revoked_at IS NULL")
            .bind(name)
            .fetch_optional(conn)
            .await?;
    row.map(|row| Ok((row.try_get("id")?, row.try_get("enrolled_at")?)))
        .transpose()
}

/// Marks a node revoked; false if it already was.
pub(super) async fn revoke_node(
    conn: &mut AnyConnection,
    node_id: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query("UPDATE nodes SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL")
        .bind(now)
        .bind(node_id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit;
    use slipway_proto::v1::NodeMetrics;

    crate::store::testing::store_tests!(enrolls_beats_rekeys_and_revokes);

    fn event(kind: &'static str, id: &str) -> AuditEvent {
        AuditEvent::success(kind, "operator", "node", id, serde_json::json!({}))
    }

    async fn enrolls_beats_rekeys_and_revokes(store: Store) {
        for token in ["t1", "t2", "t3"] {
            let tags = ["env:prod".to_owned()];
            let created = event(audit::TOKEN_CREATED, token);
            store
                .insert_join_token(token, "h", &tags, None, 0, 1000, &created)
                .await
                .unwrap();
        }
        let labels = serde_json::json!({"env": "prod", "role": "web"});
        let node = NewNode {
            id: "n-1",
            name: "web-1",
            cert_serial: "01",
            cert_fingerprint: "fp1",
            cert_ca_sha256: "ca-old",
            cert_expires_at: 500,
            labels: &labels,
            agent_version: "1.0",
            enrolled_at: 10,
        };
        let enrolled = event(audit::NODE_ENROLLED, "n-1");
        let enrollment = NewEnrollment {
            token_id: "t1",
            node: node.clone(),
            replace: None,
            event: &enrolled,
        };
        assert_eq!(
            store.enroll_node(&enrollment).await.unwrap(),
            Enrolled::Node { replaced: None }
        );
        // The token is spent; another token with the same name is refused.
        assert_eq!(
            store.enroll_node(&enrollment).await.unwrap(),
            Enrolled::TokenSpent
        );
        let again = NewEnrollment {
            token_id: "t2",
            ..enrollment.clone()
        };
        assert_eq!(
            store.enroll_node(&again).await.unwrap(),
            Enrolled::NameTaken {
                existing: "n-1".into(),
                enrolled_at: 10
            }
        );

        let heartbeat = Heartbeat {
            agent_version: "1.1".into(),
            agent_rss_bytes: 4096,
            metrics: Some(NodeMetrics {
                cpu_percent: 12.5,
                load1: 0.25,
                ..NodeMetrics::default()
            }),
            ..Heartbeat::default()
        };
        assert!(store.record_heartbeat("n-1", 20, &heartbeat).await.unwrap());
        let fleet = store.fleet().await.unwrap();
        assert_eq!(fleet.len(), 1);
        assert_eq!(fleet[0].agent_version, "1.1");
        assert_eq!(fleet[0].agent_rss_bytes, Some(4096));
        assert_eq!(fleet[0].heartbeat_at, Some(20));
        let metrics = fleet[0].metrics.as_ref().unwrap();
        assert_eq!((metrics.cpu_percent, metrics.load1), (12.5, 0.25));

        // Renewed: the new certificate is the newest, the old one still
        // opens sessions until it expires.
        let renewed = event(audit::CERT_RENEWED, "n-1");
        assert!(store
            .renew_node_cert(
                "n-1",
                &NewCert {
                    fingerprint: "fp1b",
                    serial: "03",
                    expires_at: 700,
                    ca_sha256: "ca-new",
                },
                &renewed,
                25
            )
            .await
            .unwrap());
        assert_eq!(
            store.peer_cert("fp1").await.unwrap().unwrap().node.id,
            "n-1"
        );
        let newest = store.live_node_certs().await.unwrap();
        assert_eq!((newest[0].issued_at, newest[0].expires_at), (25, 700));
        // Which CA signed it is kept (a CA rotation's lagging nodes).
        assert_eq!(newest[0].ca_sha256.as_deref(), Some("ca-new"));
        assert_eq!(store.find_node("web-1").await.unwrap()[0].id, "n-1");
        assert_eq!(
            store.find_node("n-1").await.unwrap()[0].cert_fingerprint,
            "fp1b"
        );

        // Re-keyed: the new certificate only, the token's labels merged over
        // the node's own.
        let new_labels = serde_json::json!({"env": "staging", "zone": "a"});
        let replaced = event(audit::NODE_REPLACED, "n-1");
        let rekey = NewEnrollment {
            token_id: "t3",
            node: NewNode {
                cert_serial: "02",
                cert_fingerprint: "fp2",
                cert_expires_at: 900,
                labels: &new_labels,
                agent_version: "",
                enrolled_at: 30,
                ..node
            },
            replace: Some("n-1"),
            event: &replaced,
        };
        assert_eq!(
            store.enroll_node(&rekey).await.unwrap(),
            Enrolled::Node {
                replaced: Some("n-1".into())
            }
        );
        assert!(store.peer_cert("fp1").await.unwrap().is_none());
        assert!(store.peer_cert("fp1b").await.unwrap().is_none());
        assert_eq!(
            store.peer_cert("fp2").await.unwrap().unwrap().node.id,
            "n-1"
        );
        let fleet = store.fleet().await.unwrap();
        assert_eq!(
            *fleet[0].labels,
            serde_json::json!({"env": "staging", "role": "web", "zone": "a"})
        );
        assert_eq!(fleet[0].agent_version, "1.1");

        let revoked = event(audit::NODE_REVOKED, "n-1");
        assert!(store.revoke_node("n-1", &revoked, 40).await.unwrap());
        assert!(!store.revoke_node("n-1", &revoked, 41).await.unwrap());
        assert!(!store.record_heartbeat("n-1", 42, &heartbeat).await.unwrap());
        assert_eq!(store.live_node_ids().await.unwrap(), Vec::<String>::new());
        assert_eq!(store.revoked_node_ids().await.unwrap(), ["n-1"]);
        let kinds: Vec<String> = store
            .audit_events()
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.event_type)
            .collect();
        assert_eq!(
            kinds,
            [
                "TOKEN_CREATED",
                "TOKEN_CREATED",
                "TOKEN_CREATED",
                "NODE_ENROLLED",
                "CERT_RENEWED",
                "NODE_REPLACED",
                "NODE_REVOKED"
            ]
        );
    }
}
