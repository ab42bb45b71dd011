//! Persistent controller state in one SQLite file (`<data-dir>/controller.db`,
//! WAL mode) through sqlx: nodes (with their certificates and latest
//! heartbeat), join tokens, the controller's start record, API tokens,
//! deployments with their per-node results, and the audit log.
//!
//! Queries are checked at run time (no `query!` macros), so building needs no
//! `DATABASE_URL`. Migrations are embedded SQL files applied in order at
//! start-up and tracked with SQLite's `PRAGMA user_version`.

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Executor as _, Row as _};

use crate::audit::{AuditEvent, AuditRecord};
use crate::pki::crypto::{self, CryptoError};
use crate::fleet::{App, Metrics};

/// File name of the database inside the data dir.
pub const DB_FILE: &str = "controller.db";

/// Embedded migrations; entry `i` moves the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_init.sql"),
    include_str!("../../migrations/0002_heartbeat_certs.sql"),
    include_str!("../../migrations/0003_api_deployments.sql"),
    include_str!("../../migrations/0004_rollouts.sql"),
    include_str!("../../migrations/0005_operators.sql"),
    include_str!("../../migrations/0006_unique_node_names.sql"),
];

/// How long a writer waits for another process (e.g. `token create` while
/// `serve` runs) to release the database before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLite allows one writer at a time; a few connections serve concurrent reads.
const MAX_CONNECTIONS: u32 = 4;

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening or querying the database failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// The database was written by a newer controller.
    #[error("database schema version {found} is newer than this controller knows ({known})")]
    SchemaTooNew {
        /// Version in the file.
        found: i64,
        /// Newest version this build has migrations for.
        known: usize,
    },
    /// A JSON column does not hold what we wrote there.
    #[error("corrupt JSON in column {column}: {source}")]
    Json {
        /// Which column.
        column: &'static str,
        /// Parser error.
        source: serde_json::Error,
    },
    /// An id could not be generated.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// A deployment of the app is running: one at a time per app.
    #[error(
        "app {app} has a {kind} running: deployment {deployment_id}, started by {actor} at \
         {started}; wait for it to finish (slipway audit shows it)"
    )]
    AppBusy {
        /// The app.
        app: String,
        /// The running deployment.
        deployment_id: String,
        /// "deploy" or "rollback".
        kind: String,
        /// Who started it (API token or operator id).
        actor: String,
        /// When (RFC 3339, UTC).
        started: String,
    },
}

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: SqlitePool,
}

/// A stored join token, as needed to judge an enrollment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRow {
    /// Public part of the token.
    pub id: String,
    /// sha256 hex of the secret part.
    pub secret_hash: String,
    /// Tags the enrolled node gets.
    pub tags: Vec<String>,
    /// Seconds since the epoch.
    pub expires_at: i64,
    /// Set once the token has been used.
    pub used_at: Option<i64>,
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

/// A heartbeat as stored: protocol fields already turned into JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct HeartbeatRecord<'a> {
    /// Agent version; empty keeps the stored one (older agents omit it).
    pub agent_version: &'a str,
    /// Agent RSS, bytes.
    pub agent_rss_bytes: u64,
    /// Host metrics, if the agent sent them.
    pub metrics: Option<&'a serde_json::Value>,
    /// JSON array of app states.
    pub apps: &'a serde_json::Value,
}

/// What `serve` recorded at its last start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerStart {
    /// Seconds since the epoch.
    pub started_at: i64,
    /// Missed heartbeat intervals before a node is unreachable.
    pub unreachable_after: u32,
}

/// A node with its latest reported state, for the fleet view.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetRow {
    /// Node id.
    pub id: String,
    /// Node name.
    pub name: String,
    /// JSON object of labels.
    pub labels: serde_json::Value,
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
    pub metrics: Option<Metrics>,
    /// App states from the last Hello or heartbeat.
    pub apps: Vec<App>,
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
    /// Expiry of the issued certificate.
    pub cert_expires_at: i64,
    /// JSON object of labels.
    pub labels: &'a serde_json::Value,
    /// Agent version from the request.
    pub agent_version: &'a str,
    /// Now.
    pub enrolled_at: i64,
}

/// A stored API token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTokenRow {
    /// Public part of the token.
    pub id: String,
    /// sha256 hex of the secret part.
    pub secret_hash: String,
    /// Scopes as written ("read", "deploy:web").
    pub scopes: Vec<String>,
    /// Set when the token was revoked.
    pub revoked_at: Option<i64>,
}

/// An API token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ApiTokenInfo {
    /// Public part of the token.
    pub id: String,
    /// Scopes as written.
    pub scopes: Vec<String>,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// Set when the token was revoked.
    pub revoked_at: Option<i64>,
}

/// An operator certificate as stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OperatorRow {
    /// `op-…`, also the certificate's common name.
    pub id: String,
    /// Label given at creation.
    pub name: String,
    /// sha256 hex of the certificate's DER.
    pub cert_fingerprint: String,
    /// Scopes as written ("read", "deploy:web").
    pub scopes: Vec<String>,
    /// Seconds since the epoch.
    pub created_at: i64,
    /// When the certificate expires.
    pub expires_at: i64,
    /// Set when it was revoked.
    pub revoked_at: Option<i64>,
}

/// A deployment to record, with the nodes it targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeployment<'a> {
    /// `d-…`.
    pub id: &'a str,
    /// "deploy", "rollback", "restart" or "prune".
    pub kind: &'a str,
    /// The app.
    pub app: &'a str,
    /// Release deployed or rolled back to.
    pub release_id: &'a str,
    /// Artifact digest ("" for a rollback).
    pub artifact_sha256: &'a str,
    /// API token or operator id.
    pub actor: &'a str,
    /// Selector as JSON.
    pub selector: &'a serde_json::Value,
    /// Rollout (strategy and its settings) as JSON.
    pub rollout: &'a serde_json::Value,
    /// Now.
    pub started_at: i64,
    /// Every target, in rollout order.
    pub nodes: &'a [NewDeploymentNode<'a>],
}

/// One target of a deployment to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeploymentNode<'a> {
    /// The node.
    pub node_id: &'a str,
    /// The command sent to it (unique).
    pub command_id: &'a str,
    /// 1-based batch of the rollout it is in.
    pub batch: u32,
    /// Release current on it before ('' unknown): where the controller
    /// sends it back if the rollout stops.
    pub prior_release: &'a str,
}

/// A recorded deployment (deploy, rollback, restart or prune) with its
/// per-node results, for `slipway status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeploymentRecord {
    /// `d-…`.
    pub id: String,
    /// "deploy", "rollback", "restart" or "prune".
    pub kind: String,
    /// The app.
    pub app: String,
    /// Release deployed or rolled back to ("" when none was named).
    pub release_id: String,
    /// API token or operator id that asked for it.
    pub actor: String,
    /// "running", "succeeded" or "failed".
    pub status: String,
    /// Seconds since the epoch.
    pub started_at: i64,
    /// When the last node answered.
    pub finished_at: Option<i64>,
    /// The one-line summary ("2 of 3 nodes failed: …").
    pub message: String,
    /// One entry per target node, by node name.
    pub nodes: Vec<DeploymentNodeRecord>,
}

/// How one node of a recorded deployment ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeploymentNodeRecord {
    /// Node id.
    pub node_id: String,
    /// Node name ("" if the node is gone from the database).
    pub node_name: String,
    /// "pending", "succeeded", "failed", "rolled_back" or "skipped".
    pub outcome: String,
    /// Release current on the node afterwards, if it said.
    pub release_id: String,
    /// Why, especially on failure.
    pub message: String,
    /// When the node's result was recorded.
    pub finished_at: Option<i64>,
}

/// Columns of [`OperatorRow`], in [`operator_row`]'s order.
const OPERATOR_COLUMNS: &str =
    "id, name, cert_fingerprint, scopes, created_at, expires_at, revoked_at";

fn operator_row(row: &sqlx::sqlite::SqliteRow) -> Result<OperatorRow, StoreError> {
    Ok(OperatorRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        cert_fingerprint: row.try_get("cert_fingerprint")?,
        scopes: json_column(row, "scopes", "operators.scopes")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked_at: row.try_get("revoked_at")?,
    })
}

/// A JSON column parsed into `T`.
fn json_column<T: serde::de::DeserializeOwned>(
    row: &sqlx::sqlite::SqliteRow,
    name: &str,
    column: &'static str,
) -> Result<T, StoreError> {
    let text: String = row.try_get(name)?;
    json_text(&text, column)
}

/// JSON text read from `column` parsed into `T`.
fn json_text<T: serde::de::DeserializeOwned>(
    text: &str,
    column: &'static str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|source| StoreError::Json { column, source })
}

/// A [`NodeRow`] from a row selecting `id, name, cert_fingerprint,
/// revoked_at, last_seen_at` of `nodes`.
fn node_row(row: &sqlx::sqlite::SqliteRow) -> Result<NodeRow, StoreError> {
    Ok(NodeRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        cert_fingerprint: row.try_get("cert_fingerprint")?,
        revoked_at: row.try_get("revoked_at")?,
        last_seen_at: row.try_get("last_seen_at")?,
    })
}

/// SQLITE_BUSY (5) or SQLITE_LOCKED (6), with or without extended bits.
fn is_busy(code: Option<&str>) -> bool {
    code.and_then(|c| c.parse::<i32>().ok())
        .is_some_and(|c| matches!(c & 0xff, 5 | 6))
}

impl Store {
    /// Opens (creating if needed) `<data_dir>/controller.db` and migrates it.
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        // sqlx applies `journal_mode` before `busy_timeout` on a new
        // connection, so opening while another process (or pool) is in the
        // middle of its first transaction can fail at once with "database is
        // locked" instead of waiting: retry until the busy timeout.
        let deadline = tokio::time::Instant::now() + BUSY_TIMEOUT;
        loop {
            match Self::open_once(data_dir).await {
                Err(StoreError::Db(sqlx::Error::Database(e)))
                    if is_busy(e.code().as_deref()) && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(25)).await;
                }
                other => return other,
            }
        }
    }

    async fn open_once(data_dir: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(data_dir.join(DB_FILE))
            .create_if_missing(true)
            // WAL: readers never block the writer, and `token create` can
            // write while `serve` runs.
            .journal_mode(SqliteJournalMode::Wal)
            // NORMAL is durable across process crashes in WAL mode; only a
            // power loss can drop the last commits.
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options)
            .await?;
        let store = Self { pool };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        // IMMEDIATE takes the write lock before reading the version, so two
        // processes starting on a fresh file (`serve` and `token create`)
        // cannot both apply the same migration; the second waits, then sees
        // the new version. Schema change and version bump commit together.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let conn: &mut SqliteConnection = &mut tx;
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *conn)
            .await?;
        if version > MIGRATIONS.len() as i64 {
            return Err(StoreError::SchemaTooNew {
                found: version,
                known: MIGRATIONS.len(),
            });
        }
        let start = usize::try_from(version).unwrap_or(0);
        for (index, sql) in MIGRATIONS.iter().enumerate().skip(start) {
            // `Executor::execute` with a plain `&str`: the SQLite driver runs
            // every statement in it, unprepared (`raw_sql().execute()` trips
            // rust-lang/rust#102211 once this future is spawned).
            conn.execute(*sql).await?;
            conn.execute(format!("PRAGMA user_version = {}", index + 1).as_str())
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Starts a transaction, for steps that must happen together
    /// (using a token and recording the node it enrolled).
    ///
    /// IMMEDIATE: the transaction reads then writes; a deferred one would
    /// fail at once (SQLITE_BUSY, no busy wait) if another writer got in
    /// between, instead of waiting its turn.
    pub async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    /// Records an audit event on its own.
    pub async fn audit(&self, event: &AuditEvent, now: i64) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        insert_audit(&mut conn, event, now).await
    }

    /// Stores a new join token.
    pub async fn insert_join_token(
        &self,
        id: &str,
        secret_hash: &str,
        tags: &[String],
        created_at: i64,
        expires_at: i64,
        created: &AuditEvent,
    ) -> Result<(), StoreError> {
        let tags = serde_json::Value::from(tags.to_vec()).to_string();
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO join_tokens (id, secret_hash, tags, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(id)
        .bind(secret_hash)
        .bind(tags)
        .bind(created_at)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        insert_audit(&mut tx, created, created_at).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every audit event, oldest first.
    pub async fn audit_events(&self) -> Result<Vec<AuditRecord>, StoreError> {
        self.audit_events_since(i64::MIN).await
    }

    /// Audit events at or after `since`, oldest first.
    pub async fn audit_events_since(&self, since: i64) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, created_at, event_type, actor, resource_type, resource_id, details,
                    status, error_message
             FROM audit_events WHERE created_at >= ?1 ORDER BY created_at, rowid",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(AuditRecord {
                    id: row.try_get("id")?,
                    created_at: row.try_get("created_at")?,
                    event_type: row.try_get("event_type")?,
                    actor: row.try_get("actor")?,
                    resource_type: row.try_get("resource_type")?,
                    resource_id: row.try_get("resource_id")?,
                    details: json_column(&row, "details", "audit_events.details")?,
                    status: row.try_get("status")?,
                    error_message: row.try_get("error_message")?,
                })
            })
            .collect()
    }

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
             WHERE c.fingerprint = ?1",
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
        apps: &serde_json::Value,
        heartbeat_interval_secs: u64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE nodes SET last_seen_at = ?1,
                    agent_version = CASE WHEN ?2 = '' THEN agent_version ELSE ?2 END,
                    apps = ?3, heartbeat_interval_secs = ?4
             WHERE id = ?5 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(agent_version)
        .bind(apps.to_string())
        .bind(i64::try_from(heartbeat_interval_secs).unwrap_or(i64::MAX))
        .bind(node_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Stores the node's latest heartbeat. False (nothing written) if the
    /// node is revoked: the caller then closes the session.
    pub async fn record_heartbeat(
        &self,
        node_id: &str,
        now: i64,
        heartbeat: &HeartbeatRecord<'_>,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE nodes SET last_seen_at = ?1, heartbeat_at = ?1,
                    agent_version = CASE WHEN ?2 = '' THEN agent_version ELSE ?2 END,
                    agent_rss_bytes = ?3, metrics = ?4, apps = ?5
             WHERE id = ?6 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(heartbeat.agent_version)
        .bind(i64::try_from(heartbeat.agent_rss_bytes).unwrap_or(i64::MAX))
        .bind(heartbeat.metrics.map(serde_json::Value::to_string))
        .bind(heartbeat.apps.to_string())
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

    /// Records that `serve` started now, with its liveness setting.
    pub async fn record_controller_start(
        &self,
        started_at: i64,
        unreachable_after: u32,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO controller_state (id, started_at, unreachable_after_intervals)
             VALUES (1, ?1, ?2)
             ON CONFLICT (id) DO UPDATE SET started_at = ?1, unreachable_after_intervals = ?2",
        )
        .bind(started_at)
        .bind(i64::from(unreachable_after))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// When `serve` last started and its unreachable-after setting, if it
    /// ever ran on this data dir.
    pub async fn controller_start(&self) -> Result<Option<ControllerStart>, StoreError> {
        let row = sqlx::query(
            "SELECT started_at, unreachable_after_intervals FROM controller_state WHERE id = 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            let after: i64 = row.try_get("unreachable_after_intervals")?;
            Ok(ControllerStart {
                started_at: row.try_get("started_at")?,
                unreachable_after: u32::try_from(after).unwrap_or(u32::MAX),
            })
        })
        .transpose()
    }

    /// Every node with its latest heartbeat, by name (metrics and apps in
    /// the [`crate::fleet`] shapes they were stored in).
    pub async fn fleet(&self) -> Result<Vec<FleetRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, labels, agent_version, enrolled_at, revoked_at, last_seen_at,
                    heartbeat_at, agent_rss_bytes, metrics, apps, heartbeat_interval_secs,
                    cert_expires_at
             FROM nodes ORDER BY name, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let metrics: Option<String> = row.try_get("metrics")?;
                let rss: Option<i64> = row.try_get("agent_rss_bytes")?;
                let interval: Option<i64> = row.try_get("heartbeat_interval_secs")?;
                Ok(FleetRow {
                    id: row.try_get("id")?,
                    name: row.try_get("name")?,
                    labels: json_column(&row, "labels", "nodes.labels")?,
                    agent_version: row.try_get("agent_version")?,
                    enrolled_at: row.try_get("enrolled_at")?,
                    revoked_at: row.try_get("revoked_at")?,
                    last_seen_at: row.try_get("last_seen_at")?,
                    heartbeat_at: row.try_get("heartbeat_at")?,
                    agent_rss_bytes: rss.and_then(|v| u64::try_from(v).ok()),
                    metrics: metrics
                        .map(|m| json_text(&m, "nodes.metrics"))
                        .transpose()?,
                    apps: json_column(&row, "apps", "nodes.apps")?,
                    heartbeat_interval_secs: interval.and_then(|v| u64::try_from(v).ok()),
                    cert_expires_at: row.try_get("cert_expires_at")?,
                })
            })
            .collect()
    }

    /// Stores a new API token.
    pub async fn insert_api_token(
        &self,
        id: &str,
        secret_hash: &str,
        scopes: &[String],
        created_at: i64,
        created: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO api_tokens (id, secret_hash, scopes, created_at) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(id)
        .bind(secret_hash)
        .bind(serde_json::Value::from(scopes.to_vec()).to_string())
        .bind(created_at)
        .execute(&mut *tx)
        .await?;
        insert_audit(&mut tx, created, created_at).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Loads an API token by id.
    pub async fn api_token(&self, id: &str) -> Result<Option<ApiTokenRow>, StoreError> {
        let row =
            sqlx::query("SELECT id, secret_hash, scopes, revoked_at FROM api_tokens WHERE id = ?1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        row.map(|row| {
            Ok(ApiTokenRow {
                id: row.try_get("id")?,
                secret_hash: row.try_get("secret_hash")?,
                scopes: json_column(&row, "scopes", "api_tokens.scopes")?,
                revoked_at: row.try_get("revoked_at")?,
            })
        })
        .transpose()
    }

    /// Every API token, oldest first (ids and scopes only).
    pub async fn api_tokens(&self) -> Result<Vec<ApiTokenInfo>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, scopes, created_at, revoked_at FROM api_tokens ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(ApiTokenInfo {
                    id: row.try_get("id")?,
                    scopes: json_column(&row, "scopes", "api_tokens.scopes")?,
                    created_at: row.try_get("created_at")?,
                    revoked_at: row.try_get("revoked_at")?,
                })
            })
            .collect()
    }

    /// Revokes an API token and audits it, together. `Ok(None)`: no such
    /// token; `Ok(Some(false))`: it was already revoked (nothing audited).
    pub async fn revoke_api_token(
        &self,
        id: &str,
        event: &AuditEvent,
        now: i64,
    ) -> Result<Option<bool>, StoreError> {
        let mut tx = self.begin().await?;
        let exists: Option<Option<i64>> =
            sqlx::query_scalar("SELECT revoked_at FROM api_tokens WHERE id = ?1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(revoked_at) = exists else {
            return Ok(None);
        };
        if revoked_at.is_some() {
            return Ok(Some(false));
        }
        sqlx::query("UPDATE api_tokens SET revoked_at = ?1 WHERE id = ?2")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        insert_audit(&mut tx, event, now).await?;
        tx.commit().await?;
        Ok(Some(true))
    }

    /// Stores a new operator certificate and its creation audit event.
    pub async fn insert_operator(
        &self,
        operator: &OperatorRow,
        event: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO operators (id, name, cert_fingerprint, scopes, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(&operator.id)
        .bind(&operator.name)
        .bind(&operator.cert_fingerprint)
        .bind(serde_json::Value::from(operator.scopes.clone()).to_string())
        .bind(operator.created_at)
        .bind(operator.expires_at)
        .execute(&mut *tx)
        .await?;
        insert_audit(&mut tx, event, operator.created_at).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The operator whose certificate has this sha256, if any.
    pub async fn operator_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Option<OperatorRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {OPERATOR_COLUMNS} FROM operators WHERE cert_fingerprint = ?1"
        ))
        .bind(fingerprint)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(operator_row).transpose()
    }

    /// Every operator certificate, oldest first.
    pub async fn operators(&self) -> Result<Vec<OperatorRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {OPERATOR_COLUMNS} FROM operators ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(operator_row).collect()
    }

    /// Revokes an operator certificate and audits it, together; false if it
    /// already was revoked (nothing audited).
    pub async fn revoke_operator(
        &self,
        id: &str,
        event: &AuditEvent,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE operators SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        insert_audit(&mut tx, event, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records a deployment (status running), its pending per-node rows and
    /// the start audit event, together; refused with
    /// [`StoreError::AppBusy`] while another deployment of the app runs
    /// (checked in the same write transaction, so two requests racing
    /// cannot both start).
    pub async fn insert_deployment(
        &self,
        deployment: &NewDeployment<'_>,
        started: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let running = sqlx::query(
            "SELECT id, kind, actor, started_at FROM deployments
             WHERE app = ?1 AND status = 'running' ORDER BY started_at LIMIT 1",
        )
        .bind(deployment.app)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = running {
            let started_at: i64 = row.try_get("started_at")?;
            let started = crate::rfc3339(started_at);
            return Err(StoreError::AppBusy {
                app: deployment.app.to_owned(),
                deployment_id: row.try_get("id")?,
                kind: row.try_get("kind")?,
                actor: row.try_get("actor")?,
                started,
            });
        }
        sqlx::query(
            "INSERT INTO deployments (id, kind, app, release_id, artifact_sha256, actor,
                                      selector, rollout, status, started_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'running', ?9)",
        )
        .bind(deployment.id)
        .bind(deployment.kind)
        .bind(deployment.app)
        .bind(deployment.release_id)
        .bind(deployment.artifact_sha256)
        .bind(deployment.actor)
        .bind(deployment.selector.to_string())
        .bind(deployment.rollout.to_string())
        .bind(deployment.started_at)
        .execute(&mut *tx)
        .await?;
        for node in deployment.nodes {
            sqlx::query(
                "INSERT INTO deployment_nodes (deployment_id, node_id, command_id, outcome,
                                               batch, prior_release)
                 VALUES (?1, ?2, ?3, 'pending', ?4, ?5)",
            )
            .bind(deployment.id)
            .bind(node.node_id)
            .bind(node.command_id)
            .bind(i64::from(node.batch))
            .bind(node.prior_release)
            .execute(&mut *tx)
            .await?;
        }
        insert_audit(&mut tx, started, deployment.started_at).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The release each node last switched `app` to through this
    /// controller (a succeeded deploy or rollback), with when: node id →
    /// (release id, finished at).
    pub async fn last_switched_releases(
        &self,
        app: &str,
    ) -> Result<std::collections::HashMap<String, (String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT n.node_id, n.release_id, n.finished_at
             FROM deployment_nodes n JOIN deployments d ON d.id = n.deployment_id
             WHERE d.app = ?1 AND n.outcome = 'succeeded' AND n.release_id != ''
                   AND n.finished_at IS NOT NULL
             ORDER BY n.finished_at, n.rowid",
        )
        .bind(app)
        .fetch_all(&self.pool)
        .await?;
        let mut out = std::collections::HashMap::new();
        for row in rows {
            // Later rows replace earlier ones: the newest wins.
            out.insert(
                row.try_get("node_id")?,
                (row.try_get("release_id")?, row.try_get("finished_at")?),
            );
        }
        Ok(out)
    }

    /// Marks every deployment still `running` failed ("controller
    /// restarted"), with its unanswered nodes, and records its final audit
    /// event: run at start-up, when no deployment of this process can be
    /// running, so an interrupted one never blocks its app. Returns the ids.
    pub async fn abandon_running_deployments(&self, now: i64) -> Result<Vec<String>, StoreError> {
        const WHY: &str = "controller restarted before the deployment finished";
        let mut tx = self.begin().await?;
        let rows = sqlx::query(
            "SELECT id, kind, app, release_id, actor FROM deployments WHERE status = 'running'
             ORDER BY started_at, rowid",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut ids = Vec::new();
        for row in rows {
            let id: String = row.try_get("id")?;
            let kind: String = row.try_get("kind")?;
            let app: String = row.try_get("app")?;
            let release_id: String = row.try_get("release_id")?;
            let actor: String = row.try_get("actor")?;
            let unanswered: Vec<String> = sqlx::query_scalar(
                "SELECT node_id FROM deployment_nodes
                 WHERE deployment_id = ?1 AND outcome = 'pending' ORDER BY rowid",
            )
            .bind(&id)
            .fetch_all(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE deployment_nodes SET outcome = 'failed', message = ?1, finished_at = ?2
                 WHERE deployment_id = ?3 AND outcome = 'pending'",
            )
            .bind("controller restarted before the node's result")
            .bind(now)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE deployments SET status = 'failed', message = ?1, stop_reason = ?1,
                        finished_at = ?2
                 WHERE id = ?3",
            )
            .bind(WHY)
            .bind(now)
            .bind(&id)
            .execute(&mut *tx)
            .await?;
            let event_type = match kind.as_str() {
                "rollback" => crate::audit::ROLLBACK_FAILED,
                "restart" => crate::audit::RESTART_FAILED,
                "prune" => crate::audit::PRUNE_FAILED,
                _ => crate::audit::DEPLOY_FAILED,
            };
            let event = AuditEvent::error(
                event_type,
                &actor,
                "deployment",
                &id,
                serde_json::json!({
                    "deployment_id": id,
                    "app": app,
                    "release_id": release_id,
                    "stop_reason": WHY,
                    "unanswered_nodes": unanswered,
                }),
                WHY,
            );
            insert_audit(&mut tx, &event, now).await?;
            ids.push(id);
        }
        tx.commit().await?;
        Ok(ids)
    }

    /// Records how one node of a deployment ended.
    pub async fn record_node_result(
        &self,
        command_id: &str,
        outcome: &str,
        release_id: &str,
        message: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE deployment_nodes SET outcome = ?1, release_id = ?2, message = ?3,
                    finished_at = ?4
             WHERE command_id = ?5",
        )
        .bind(outcome)
        .bind(release_id)
        .bind(message)
        .bind(now)
        .bind(command_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Marks a deployment finished and records the final audit event, together.
    /// `stop_reason` says why a rollout stopped early ('' if it did not).
    pub async fn finish_deployment(
        &self,
        id: &str,
        status: &str,
        message: &str,
        stop_reason: &str,
        finished: &AuditEvent,
        now: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "UPDATE deployments SET status = ?1, message = ?2, stop_reason = ?5, finished_at = ?3
             WHERE id = ?4",
        )
        .bind(status)
        .bind(message)
        .bind(now)
        .bind(id)
        .bind(stop_reason)
        .execute(&mut *tx)
        .await?;
        insert_audit(&mut tx, finished, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Per-node rows of a deployment: (node id, outcome, message), by node.
    pub async fn deployment_nodes(
        &self,
        deployment_id: &str,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT node_id, outcome, message FROM deployment_nodes
             WHERE deployment_id = ?1 ORDER BY node_id",
        )
        .bind(deployment_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok((
                    row.try_get("node_id")?,
                    row.try_get("outcome")?,
                    row.try_get("message")?,
                ))
            })
            .collect()
    }

    /// The latest deployment of each app (of `app` only, if given), by app
    /// name, with its per-node results.
    pub async fn last_deployments(
        &self,
        app: Option<&str>,
    ) -> Result<Vec<DeploymentRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT d.id, d.kind, d.app, d.release_id, d.actor, d.status, d.started_at,
                    d.finished_at, d.message
             FROM deployments d
             WHERE d.rowid = (SELECT d2.rowid FROM deployments d2 WHERE d2.app = d.app
                              ORDER BY d2.started_at DESC, d2.rowid DESC LIMIT 1)
               AND (?1 IS NULL OR d.app = ?1)
             ORDER BY d.app",
        )
        .bind(app)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get("id")?;
            let nodes = sqlx::query(
                "SELECT dn.node_id, COALESCE(n.name, '') AS node_name, dn.outcome,
                        dn.release_id, dn.message, dn.finished_at
                 FROM deployment_nodes dn LEFT JOIN nodes n ON n.id = dn.node_id
                 WHERE dn.deployment_id = ?1 ORDER BY node_name, dn.node_id",
            )
            .bind(&id)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(|n| {
                Ok(DeploymentNodeRecord {
                    node_id: n.try_get("node_id")?,
                    node_name: n.try_get("node_name")?,
                    outcome: n.try_get("outcome")?,
                    release_id: n.try_get("release_id")?,
                    message: n.try_get("message")?,
                    finished_at: n.try_get("finished_at")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
            out.push(DeploymentRecord {
                id,
                kind: row.try_get("kind")?,
                app: row.try_get("app")?,
                release_id: row.try_get("release_id")?,
                actor: row.try_get("actor")?,
                status: row.try_get("status")?,
                started_at: row.try_get("started_at")?,
                finished_at: row.try_get("finished_at")?,
                message: row.try_get("message")?,
                nodes,
            });
        }
        Ok(out)
    }

    /// Finds a node by id, or else the live node of that name (names are
    /// unique among live nodes; revoked nodes are found by id only).
    pub async fn find_node(&self, id_or_name: &str) -> Result<Vec<NodeRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, cert_fingerprint, revoked_at, last_seen_at FROM nodes
             WHERE id = ?1
                OR (name = ?1 AND revoked_at IS NULL
                    AND NOT EXISTS (SELECT 1 FROM nodes WHERE id = ?1))",
        )
        .bind(id_or_name)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(node_row).collect()
    }
}

/// Inserts an audit event on `conn` (a pooled connection or a transaction).
pub async fn insert_audit(
    conn: &mut SqliteConnection,
    event: &AuditEvent,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_events (id, created_at, event_type, actor, resource_type,
                                   resource_id, details, status, error_message)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )
    .bind(crypto::random_uuid()?)
    .bind(now)
    .bind(event.event_type)
    .bind(&event.actor)
    .bind(event.resource_type)
    .bind(&event.resource_id)
    .bind(event.details.to_string())
    .bind(event.status)
    .bind(&event.error_message)
    .execute(conn)
    .await?;
    Ok(())
}

/// Loads a join token by id on `conn`.
pub async fn join_token(
    conn: &mut SqliteConnection,
    id: &str,
) -> Result<Option<JoinTokenRow>, StoreError> {
    let row = sqlx::query(
        "SELECT id, secret_hash, tags, expires_at, used_at FROM join_tokens WHERE id = ?1",
    )
    .bind(id)
    .fetch_optional(conn)
    .await?;
    row.map(|row| {
        Ok(JoinTokenRow {
            id: row.try_get("id")?,
            secret_hash: row.try_get("secret_hash")?,
            tags: json_column(&row, "tags", "join_tokens.tags")?,
            expires_at: row.try_get("expires_at")?,
            used_at: row.try_get("used_at")?,
        })
    })
    .transpose()
}

/// Marks a token used if (and only if) it is still unused and unexpired.
/// Returns false when another enrollment won the race or it just expired:
/// the `WHERE` makes check-and-set one atomic statement.
pub async fn use_join_token(
    conn: &mut SqliteConnection,
    id: &str,
    node_id: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE join_tokens SET used_at = ?1, used_by = ?2
         WHERE id = ?3 AND used_at IS NULL AND expires_at > ?1",
    )
    .bind(now)
    .bind(node_id)
    .bind(id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records a newly enrolled node on `conn`.
pub async fn insert_node(
    conn: &mut SqliteConnection,
    node: &NewNode<'_>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO nodes (id, name, cert_serial, cert_fingerprint, cert_expires_at, labels,
                            agent_version, enrolled_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
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
    insert_node_cert(
        conn,
        node.id,
        node.cert_fingerprint,
        node.cert_serial,
        node.enrolled_at,
        node.cert_expires_at,
    )
    .await
}

/// Adds a live certificate of `node_id` (enrollment or renewal); the node's
/// other certificates stay valid.
pub async fn insert_node_cert(
    conn: &mut SqliteConnection,
    node_id: &str,
    fingerprint: &str,
    serial: &str,
    issued_at: i64,
    expires_at: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO node_certs (fingerprint, node_id, serial, issued_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )
    .bind(fingerprint)
    .bind(node_id)
    .bind(serial)
    .bind(issued_at)
    .bind(expires_at)
    .execute(conn)
    .await?;
    Ok(())
}

/// After a renewal: makes the new certificate the node's newest and drops
/// its certificates that have expired (TLS refuses them anyway). False if
/// the node was revoked meanwhile.
pub async fn set_newest_cert(
    conn: &mut SqliteConnection,
    node_id: &str,
    fingerprint: &str,
    serial: &str,
    expires_at: i64,
    now: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE nodes SET cert_fingerprint = ?1, cert_serial = ?2, cert_expires_at = ?3
         WHERE id = ?4 AND revoked_at IS NULL",
    )
    .bind(fingerprint)
    .bind(serial)
    .bind(expires_at)
    .bind(node_id)
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM node_certs WHERE node_id = ?1 AND expires_at <= ?2")
        .bind(node_id)
        .bind(now)
        .execute(&mut *conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

/// The id and enrollment time of the live (non-revoked) node named `name`,
/// if any, on `conn`.
pub async fn live_node_named(
    conn: &mut SqliteConnection,
    name: &str,
) -> Result<Option<(String, i64)>, StoreError> {
    let row =
        sqlx::query("SELECT id, enrolled_at FROM nodes WHERE name = ?1 AND revoked_at IS NULL")
            .bind(name)
            .fetch_optional(conn)
            .await?;
    row.map(|row| Ok((row.try_get("id")?, row.try_get("enrolled_at")?)))
        .transpose()
}

/// Marks a node revoked; false if it already was.
pub async fn revoke_node(
    conn: &mut SqliteConnection,
    node_id: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query("UPDATE nodes SET revoked_at = ?1 WHERE id = ?2 AND revoked_at IS NULL")
        .bind(now)
        .bind(node_id)
        .execute(conn)
        .await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{self, AuditEvent};

    #[tokio::test]
    async fn migrates_once_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        store
            .audit(
                &AuditEvent::success(
                    audit::TOKEN_CREATED,
                    "operator",
                    "join_token",
                    "t1",
                    serde_json::json!({"ttl_secs": 3600}),
                ),
                10,
            )
            .await
            .unwrap();
        drop(store);

        let store = Store::open(dir.path()).await.unwrap();
        let events = store.audit_events().await.unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].event_type, "TOKEN_CREATED");
        assert_eq!(events[0].details["ttl_secs"], 3600);
        assert_eq!(events[0].status, "success");
    }

    #[tokio::test]
    async fn version_1_nodes_keep_their_certificate_after_migrating() {
        let dir = tempfile::tempdir().unwrap();
        {
            let options = SqliteConnectOptions::new()
                .filename(dir.path().join(DB_FILE))
                .create_if_missing(true);
            let pool = SqlitePool::connect_with(options).await.unwrap();
            let mut conn = pool.acquire().await.unwrap();
            conn.execute(MIGRATIONS[0]).await.unwrap();
            conn.execute("PRAGMA user_version = 1").await.unwrap();
            conn.execute(
                "INSERT INTO nodes (id, name, cert_serial, cert_fingerprint, cert_expires_at,
                                    enrolled_at)
                 VALUES ('n-1', 'web-1', '01', 'fp1', 2000, 1000)",
            )
            .await
            .unwrap();
            drop(conn);
            pool.close().await;
        }
        let store = Store::open(dir.path()).await.unwrap();
        let peer = store.peer_cert("fp1").await.unwrap().unwrap();
        assert_eq!(peer.node.id, "n-1");
        assert_eq!((peer.issued_at, peer.expires_at), (1000, 2000));
        let fleet = store.fleet().await.unwrap();
        assert_eq!(fleet[0].apps, []);
        assert_eq!(fleet[0].metrics, None);
        assert_eq!(store.controller_start().await.unwrap(), None);
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }

    fn new_deployment<'a>(
        id: &'a str,
        app: &'a str,
        nodes: &'a [NewDeploymentNode<'a>],
        json: &'a serde_json::Value,
    ) -> NewDeployment<'a> {
        NewDeployment {
            id,
            kind: "deploy",
            app,
            release_id: "v1",
            artifact_sha256: "",
            actor: "tok-1",
            selector: json,
            rollout: json,
            started_at: 1_000,
            nodes,
        }
    }

    #[tokio::test]
    async fn one_running_deployment_per_app_until_a_restart_abandons_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let json = serde_json::json!({});
        let nodes = [NewDeploymentNode {
            node_id: "n-1",
            command_id: "d-1.n-1",
            batch: 1,
            prior_release: "v0",
        }];
        let started = AuditEvent::success(
            audit::DEPLOY_STARTED,
            "tok-1",
            "deployment",
            "d-1",
            json.clone(),
        );
        store
            .insert_deployment(&new_deployment("d-1", "web", &nodes, &json), &started)
            .await
            .unwrap();
        // Another app is not blocked.
        store
            .insert_deployment(&new_deployment("d-2", "api", &[], &json), &started)
            .await
            .unwrap();
        let err = store
            .insert_deployment(&new_deployment("d-3", "web", &[], &json), &started)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::AppBusy { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "app web has a deploy running: deployment d-1, started by tok-1 at \
             1970-01-01T00:16:40Z; wait for it to finish (slipway audit shows it)"
        );

        let abandoned = store.abandon_running_deployments(2_000).await.unwrap();
        assert_eq!(abandoned, vec!["d-1".to_owned(), "d-2".to_owned()]);
        let (status, stop_reason): (String, String) =
            sqlx::query_as("SELECT status, stop_reason FROM deployments WHERE id = 'd-1'")
                .fetch_one(&store.pool)
                .await
                .unwrap();
        assert_eq!(status, "failed");
        assert!(
            stop_reason.contains("controller restarted"),
            "{stop_reason}"
        );
        let rows = store.deployment_nodes("d-1").await.unwrap();
        assert_eq!(rows[0].1, "failed");
        let failed = store.audit_events().await.unwrap();
        assert!(failed
            .iter()
            .any(|e| e.event_type == "DEPLOY_FAILED" && e.resource_id == "d-1"));
        store
            .insert_deployment(&new_deployment("d-4", "web", &[], &json), &started)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn last_deployments_are_the_newest_per_app_with_node_results() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let mut conn = store.pool.acquire().await.unwrap();
        insert_node(
            &mut conn,
            &NewNode {
                id: "n-1",
                name: "web-1",
                cert_serial: "01",
                cert_fingerprint: "fp1",
                cert_expires_at: 2000,
                labels: &serde_json::json!({}),
                agent_version: "1.0",
                enrolled_at: 1,
            },
        )
        .await
        .unwrap();
        drop(conn);
        let record = |id: &'static str, kind: &'static str, app: &'static str, at: i64| {
            let store = store.clone();
            async move {
                let commands = [format!("{id}.n-1"), format!("{id}.n-gone")];
                let nodes = [
                    NewDeploymentNode {
                        node_id: "n-1",
                        command_id: &commands[0],
                        batch: 1,
                        prior_release: "",
                    },
                    NewDeploymentNode {
                        node_id: "n-gone",
                        command_id: &commands[1],
                        batch: 1,
                        prior_release: "",
                    },
                ];
                store
                    .insert_deployment(
                        &NewDeployment {
                            id,
                            kind,
                            app,
                            release_id: "",
                            artifact_sha256: "",
                            actor: "t",
                            selector: &serde_json::json!({}),
                            rollout: &serde_json::json!({}),
                            started_at: at,
                            nodes: &nodes,
                        },
                        &AuditEvent::success(
                            audit::RESTART_STARTED,
                            "t",
                            "deployment",
                            id,
                            serde_json::json!({}),
                        ),
                    )
                    .await
                    .unwrap();
            }
        };
        let finish = |id: &'static str, at: i64| {
            let store = store.clone();
            async move {
                let ev = AuditEvent::success(
                    audit::RESTART_COMPLETED,
                    "t",
                    "deployment",
                    id,
                    serde_json::json!({}),
                );
                store
                    .finish_deployment(id, "failed", "1 of 2 nodes failed", "", &ev, at)
                    .await
                    .unwrap();
            }
        };
        // One running deployment per app: each ends before the next.
        record("d-1", "deploy", "web", 10).await;
        finish("d-1", 11).await;
        record("d-2", "prune", "web", 20).await;
        finish("d-2", 20).await;
        // Same second as d-2: the later insert wins.
        record("d-3", "restart", "web", 20).await;
        store
            .record_node_result("d-3.n-1", "succeeded", "v3", "restarted", 21)
            .await
            .unwrap();
        finish("d-3", 22).await;
        record("d-4", "deploy", "api", 5).await;

        let all = store.last_deployments(None).await.unwrap();
        let ids: Vec<(&str, &str)> = all
            .iter()
            .map(|d| (d.app.as_str(), d.id.as_str()))
            .collect();
        assert_eq!(ids, [("api", "d-4"), ("web", "d-3")]);
        let web = &all[1];
        assert_eq!(web.kind, "restart");
        assert_eq!(web.status, "failed");
        assert_eq!(web.finished_at, Some(22));
        assert_eq!(web.message, "1 of 2 nodes failed");
        // Unknown nodes sort first (no name), then by name.
        assert_eq!(web.nodes.len(), 2);
        assert_eq!(web.nodes[0].node_id, "n-gone");
        assert_eq!(web.nodes[0].node_name, "");
        assert_eq!(web.nodes[0].outcome, "pending");
        assert_eq!(web.nodes[1].node_name, "web-1");
        assert_eq!(web.nodes[1].outcome, "succeeded");
        assert_eq!(web.nodes[1].release_id, "v3");
        assert_eq!(web.nodes[1].finished_at, Some(21));
        let api = store.last_deployments(Some("api")).await.unwrap();
        assert_eq!(api.len(), 1);
        assert_eq!(api[0].id, "d-4");
        assert!(store.last_deployments(Some("db")).await.unwrap().is_empty());
    }

    fn created(id: &str) -> AuditEvent {
        AuditEvent::success(
            audit::TOKEN_CREATED,
            "operator",
            "join_token",
            id,
            serde_json::json!({}),
        )
    }

    #[tokio::test]
    async fn a_token_is_used_once_and_never_after_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        store
            .insert_join_token(
                "a",
                "h",
                &["env:production".to_owned()],
                0,
                100,
                &created("a"),
            )
            .await
            .unwrap();
        store
            .insert_join_token("b", "h", &[], 0, 100, &created("b"))
            .await
            .unwrap();
        let mut conn = store.pool.acquire().await.unwrap();

        assert!(use_join_token(&mut conn, "a", "n1", 50).await.unwrap());
        assert!(!use_join_token(&mut conn, "a", "n2", 51).await.unwrap());
        assert!(!use_join_token(&mut conn, "b", "n3", 100).await.unwrap());
        let a = join_token(&mut conn, "a").await.unwrap().unwrap();
        assert_eq!(a.used_at, Some(50));
        assert_eq!(a.tags, vec!["env:production".to_owned()]);
    }
}
