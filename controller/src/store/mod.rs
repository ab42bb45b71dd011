//! Persistent controller state in one SQLite file (`<data-dir>/controller.db`,
//! WAL mode) through sqlx: nodes (with their certificates and latest
//! heartbeat), join tokens, the controller's start record, API tokens,
//! deployments with their per-node results, and the audit log.
//!
//! Queries are checked at run time (no `query!` macros), so building needs no
//! `DATABASE_URL`. Migrations are embedded SQL files applied in order at
//! start-up and tracked with SQLite's `PRAGMA user_version`.
//!
//! The only code that speaks SQL. One file per table family (`nodes`,
//! `join_tokens`, `api_tokens`, `operators`, `deployments`, `audit`,
//! `controller_state`), each adding methods to [`Store`]. Steps that must
//! happen together (enrolling a node with its token, a renewal, a revoke
//! with its audit event, a deployment and its nodes) are one method that
//! runs its transaction inside: callers never see a connection or a
//! transaction, so another engine (PostgreSQL) can sit behind the same
//! methods.

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Executor as _, Row as _};

use crate::pki::crypto::CryptoError;

mod api_tokens;
mod audit;
mod controller_state;
mod deployments;
mod droplets;
mod env;
mod github;
mod join_tokens;
mod nodes;
mod operators;
mod web_sessions;

pub use api_tokens::{ApiTokenInfo, ApiTokenRow};
use audit::insert_audit;
pub use audit::AuditFilter;
pub use controller_state::ControllerStart;
pub use deployments::{
    DeploymentCount, DeploymentNodeRecord, DeploymentRecord, DeploymentStep, NewDeployment,
    NewDeploymentNode,
};
pub use droplets::{DropletClaim, DropletRow, DropletSync};
pub use env::EnvVersionRow;
pub use github::GithubDeploymentRow;
pub use join_tokens::JoinTokenRow;
pub use nodes::{
    App, Disk, Enrolled, FleetRow, Metrics, NewCert, NewEnrollment, NewNode, NodeCert, NodeRow,
    PeerCert, Public, Release,
};
pub use operators::OperatorRow;
pub use web_sessions::WebSessionRow;

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
    include_str!("../../migrations/0007_droplets.sql"),
    include_str!("../../migrations/0008_web_sessions.sql"),
    include_str!("../../migrations/0009_env.sql"),
    include_str!("../../migrations/0010_github.sql"),
    include_str!("../../migrations/0011_deployment_steps.sql"),
    include_str!("../../migrations/0012_join_token_node_name.sql"),
    include_str!("../../migrations/0013_env_layers.sql"),
    include_str!("../../migrations/0014_cert_issuer.sql"),
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
    /// `PRAGMA integrity_check` found a problem.
    #[error("the database fails its integrity check: {0}")]
    Integrity(String),
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
    /// Another change stored this env version of the app first.
    #[error("env of app {app} changed while this change was made (version {version} is taken); try again")]
    EnvConflict {
        /// The app.
        app: String,
        /// The version both wanted.
        version: u64,
    },
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

    /// Writes a consistent copy of the whole database to `path` (which must
    /// not exist) with `VACUUM INTO`: one read transaction, so writers in
    /// this or another process go on meanwhile (WAL).
    pub async fn snapshot_into(&self, path: &Path) -> Result<(), StoreError> {
        let target = path.to_string_lossy().into_owned();
        sqlx::query("VACUUM INTO ?")
            .bind(target)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// SQLite's `PRAGMA integrity_check`: fails naming the first problem.
    pub async fn integrity_check(&self) -> Result<(), StoreError> {
        let result: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&self.pool)
            .await?;
        if result == "ok" {
            Ok(())
        } else {
            Err(StoreError::Integrity(result))
        }
    }

    /// Closes every connection (the WAL is checkpointed into the file).
    pub async fn close(self) {
        self.pool.close().await;
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

    /// Starts a transaction, for steps that must happen together (using a
    /// token and recording the node it enrolled). Only the store's own
    /// methods use transactions: callers see one method per step.
    ///
    /// IMMEDIATE: the transaction reads then writes; a deferred one would
    /// fail at once (SQLITE_BUSY, no busy wait) if another writer got in
    /// between, instead of waiting its turn.
    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
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
}
