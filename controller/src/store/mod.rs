//! Persistent controller state through sqlx: nodes (with their
//! certificates and latest heartbeat), join tokens, the controller's start
//! record, API tokens, deployments with their per-node results, and the
//! audit log. On SQLite (the default: one file, `<data-dir>/controller.db`,
//! WAL mode) or on PostgreSQL (`database_url`, [`PostgresUrl`]), behind the
//! same methods.
//!
//! Queries are checked at run time (no `query!` macros), so building needs no
//! `DATABASE_URL`. They go through sqlx's `Any` driver in the dialect both
//! engines speak (`$N` parameters, `ON CONFLICT`, `COALESCE`); the few
//! places where the engines differ branch on [`Backend`] next to the query.
//! One copy of every query, rather than one implementation per engine: the
//! two would have to be kept equal by hand, and the tests running every
//! store test on both engines check that the one copy means the same.
//! Migrations are embedded SQL files per engine applied in order at
//! start-up: SQLite tracks its version in `PRAGMA user_version`,
//! PostgreSQL in the table `slipway_schema`, under an advisory lock so
//! replicas starting together migrate one at a time.
//!
//! The only code that speaks SQL. One file per table family (`nodes`,
//! `join_tokens`, `api_tokens`, `operators`, `deployments`, `audit`,
//! `controller_state`), each adding methods to [`Store`]. Steps that must
//! happen together (enrolling a node with its token, a renewal, a revoke
//! with its audit event, a deployment and its nodes) are one method that
//! runs its transaction inside: callers never see a connection or a
//! transaction.

use std::path::Path;
use std::str::FromStr as _;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{AnyConnection, AnyPool, ConnectOptions as _, Connection as _, Executor as _, Row as _};

use crate::pki::crypto::CryptoError;

mod api_tokens;
mod artifacts;
mod audit;
mod controller_state;
mod database_url;
mod deployments;
mod droplets;
mod env;
mod fleet_cache;
mod github;
mod join_tokens;
mod node_commands;
mod nodes;
mod operators;
mod replicas;
mod web_sessions;

#[cfg(test)]
pub(crate) mod testing;

pub use api_tokens::{ApiTokenInfo, ApiTokenRow};
pub use artifacts::StoredArtifact;
use audit::insert_audit;
pub use audit::AuditFilter;
pub use controller_state::ControllerStart;
pub use database_url::{redact, PostgresUrl};
pub use deployments::{
    DeploymentCount, DeploymentNodeRecord, DeploymentRecord, DeploymentShape, DeploymentStep,
    NewDeployment, NewDeploymentNode, OrphanedDeployment, RecordedNode,
};
pub use droplets::{DropletClaim, DropletRow, DropletSync};
pub use env::EnvVersionRow;
pub use github::GithubDeploymentRow;
pub use join_tokens::JoinTokenRow;
pub use node_commands::{
    ClaimedCommand, CommandEventRow, NewCommandEvent, NodeCommandState, RoutingWake,
    MAX_EVENTS_READ, ROUTING_CHANNEL,
};
pub use nodes::{
    App, Disk, Enrolled, FleetRow, Metrics, NewCert, NewEnrollment, NewNode, NodeCert, NodeRow,
    PeerCert, Public, Release,
};
pub use operators::OperatorRow;
pub use replicas::{ReplicaRow, SessionHolder};
pub use web_sessions::WebSessionRow;

/// File name of the database inside the data dir.
pub const DB_FILE: &str = "controller.db";

/// Embedded SQLite migrations; entry `i` moves the schema from version `i`
/// to `i + 1`.
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
    include_str!("../../migrations/0015_artifact_chunks.sql"),
    include_str!("../../migrations/0016_replicas.sql"),
    include_str!("../../migrations/0017_node_commands.sql"),
    include_str!("../../migrations/0018_deployment_plans.sql"),
    include_str!("../../migrations/0019_fleet_changes.sql"),
];

/// Embedded PostgreSQL migrations, numbered on their own: 0001 is the
/// SQLite schema as of its 0013. A schema change adds a file to both lists
/// (every store test runs on both engines, so one missing fails them).
const POSTGRES_MIGRATIONS: &[&str] = &[
    include_str!("../../migrations-postgres/0001_init.sql"),
    include_str!("../../migrations-postgres/0002_cert_issuer.sql"),
    include_str!("../../migrations-postgres/0003_artifact_chunks.sql"),
    include_str!("../../migrations-postgres/0004_replicas.sql"),
    include_str!("../../migrations-postgres/0005_node_commands.sql"),
    include_str!("../../migrations-postgres/0006_deployment_plans.sql"),
    include_str!("../../migrations-postgres/0007_fleet_changes.sql"),
];

/// How long a writer waits for another process (e.g. `token create` while
/// `serve` runs) to release the database before giving up.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// SQLite allows one writer at a time; a few connections serve concurrent reads.
const MAX_CONNECTIONS: u32 = 4;

/// PostgreSQL serves many sessions; this bounds one replica's share.
const POSTGRES_MAX_CONNECTIONS: u32 = 10;

/// How long opening a PostgreSQL store waits for the server before failing.
const POSTGRES_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a query waits for a pooled PostgreSQL connection (reconnecting
/// while the server is down) before failing with [`StoreError::is_unavailable`]:
/// a request that needs two lookups (its credentials, then its data) still
/// fails within seconds, not minutes, while the database is down.
const POSTGRES_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// `pg_advisory_xact_lock` key held while migrating: replicas starting at
/// once migrate one after the other (the later ones find nothing to do).
/// Arbitrary but fixed; "slipway1" in ASCII.
const MIGRATE_LOCK: i64 = 0x736c_6970_7761_7931;

/// `pg_advisory_xact_lock` key every store transaction holds: they run one
/// at a time, as SQLite's `BEGIN IMMEDIATE` makes them, so a check and the
/// write that depends on it (one running deployment per app, the next env
/// version) cannot interleave with another replica's. "slipway2".
const WRITE_LOCK: i64 = 0x736c_6970_7761_7932;

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
    /// The PostgreSQL server could not be reached or refused us; the
    /// message shows the URL without its password.
    #[error("database {0}")]
    Connect(String),
    /// Something only the SQLite store does was asked of a PostgreSQL one.
    #[error("{0} is for the SQLite store only; back up a PostgreSQL database with pg_dump")]
    SqliteOnly(&'static str),
    /// `PRAGMA integrity_check` found a problem.
    #[error("the database fails its integrity check: {0}")]
    Integrity(String),
    /// An artifact's chunks do not add up to the size and count its
    /// writer declares: the row that makes it visible is not written.
    #[error(
        "artifact {kind}/{sha256} in the database has {found_chunks} chunks of {found_bytes} \
         bytes in all, expected {chunks} chunks of {size} bytes"
    )]
    ArtifactIncomplete {
        /// Which store (`artifacts`, `agent-binaries`).
        kind: String,
        /// The artifact's digest.
        sha256: String,
        /// Chunks declared.
        chunks: i64,
        /// Bytes declared.
        size: i64,
        /// Chunks found.
        found_chunks: i64,
        /// Bytes found in them.
        found_bytes: i64,
    },
    /// A write that needs an owning replica through a handle of none.
    #[error("this store handle writes for no controller replica: it cannot own a deployment")]
    NoReplica,
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

/// Which engine a [`Store`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The file in the data dir (the default).
    Sqlite,
    /// A PostgreSQL database (`database_url`).
    Postgres,
}

impl Backend {
    /// The engine behind `conn`.
    fn of(conn: &AnyConnection) -> Self {
        if conn.backend_name() == "PostgreSQL" {
            Self::Postgres
        } else {
            Self::Sqlite
        }
    }

    /// This engine's migrations.
    fn migrations(self) -> &'static [&'static str] {
        match self {
            Self::Sqlite => MIGRATIONS,
            Self::Postgres => POSTGRES_MIGRATIONS,
        }
    }
}

/// Handle to the database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// The replica this handle writes for ([`Store::for_replica`]): the
    /// owner recorded on the deployments it starts.
    replica: Option<std::sync::Arc<str>>,
    /// Which engine: for the few queries that differ between them.
    backend: Backend,
    /// The PostgreSQL database's URL (None on SQLite): a connection of its
    /// own listens for notifications ([`Store::routing_listener`]).
    postgres_url: Option<std::sync::Arc<PostgresUrl>>,
    /// The fleet as last read, brought up to date with the rows changed
    /// since ([`Store::fleet`]); shared by every clone.
    fleet: std::sync::Arc<fleet_cache::FleetCache>,
}

/// A JSON column parsed into `T`.
fn json_column<T: serde::de::DeserializeOwned>(
    row: &sqlx::any::AnyRow,
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

/// `$1, $2, …, $n`: the placeholders of an `IN (…)` list of `n` values
/// (both engines number their parameters so through the Any driver).
fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `query` with each of `values` bound, in order (an `IN` list made with
/// [`placeholders`]).
fn bind_all<'q>(
    mut query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    values: &'q [String],
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    for value in values {
        query = query.bind(value.as_str());
    }
    query
}

/// SQLITE_BUSY (5) or SQLITE_LOCKED (6), with or without extended bits.
fn is_busy(code: Option<&str>) -> bool {
    code.and_then(|c| c.parse::<i32>().ok())
        .is_some_and(|c| matches!(c & 0xff, 5 | 6))
}

impl StoreError {
    /// True if the database could not be reached (down, restarting,
    /// unreachable, every connection busy past the acquire timeout) rather
    /// than refusing the query: the caller may try again later.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Connect(_) => true,
            Self::Db(err) => match err {
                sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::Io(_)
                | sqlx::Error::Tls(_) => true,
                // SQLSTATE class 08 (connection exception) and 57P
                // (the server shutting down, crashed or starting).
                sqlx::Error::Database(db) => db
                    .code()
                    .is_some_and(|code| code.starts_with("08") || code.starts_with("57P")),
                _ => false,
            },
            _ => false,
        }
    }
}

/// Runs `write` again while it fails with the database not answering
/// ([`StoreError::is_unavailable`]), every `every` for up to `limit`; the
/// last outcome.
pub async fn while_unavailable<T, F, Fut>(
    limit: Duration,
    every: Duration,
    mut write: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let started = tokio::time::Instant::now();
    loop {
        match write().await {
            Err(err) if err.is_unavailable() && started.elapsed() + every <= limit => {
                tracing::warn!(%err, "the database does not answer; trying again");
                tokio::time::sleep(every).await;
            }
            other => return other,
        }
    }
}

/// What a client (the CLI, the HTTP API, an agent) is told while the
/// store does not answer ([`StoreError::is_unavailable`]).
pub const DATABASE_UNAVAILABLE: &str =
    "the controller's database does not answer (down or unreachable); try again once it is back";

impl Store {
    /// The store `database_url` names: PostgreSQL when it is set, else the
    /// SQLite file in `data_dir` ([`Store::open`]).
    pub async fn open_at(
        data_dir: &Path,
        database_url: Option<&PostgresUrl>,
    ) -> Result<Self, StoreError> {
        match database_url {
            Some(url) => Self::open_postgres(url).await,
            None => Self::open(data_dir).await,
        }
    }

    /// Opens (creating if needed) `<data_dir>/controller.db` and migrates it.
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        // Opening while another process (or pool) is in the middle of its
        // first transaction can fail at once with "database is locked"
        // (switching to WAL does not wait): retry until the busy timeout.
        let deadline = tokio::time::Instant::now() + BUSY_TIMEOUT;
        loop {
            match Self::open_sqlite_once(data_dir).await {
                Err(StoreError::Db(sqlx::Error::Database(e)))
                    if is_busy(e.code().as_deref()) && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(std::time::Duration::from_millis(25)).await;
                }
                other => return other,
            }
        }
    }

    /// Connects to the PostgreSQL database at `url` and migrates it (one
    /// replica at a time).
    pub async fn open_postgres(url: &PostgresUrl) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let options = AnyConnectOptions::from_str(url.secret())
            .map_err(|e| StoreError::Connect(format!("{url}: {e}")))?;
        // One connection first: the pool would retry a refused connection
        // until its timeout and then say only that it timed out.
        let first = tokio::time::timeout(POSTGRES_CONNECT_TIMEOUT, options.connect())
            .await
            .map_err(|_| {
                StoreError::Connect(format!(
                    "{url}: no answer within {POSTGRES_CONNECT_TIMEOUT:?}"
                ))
            })?
            .map_err(|e| StoreError::Connect(format!("{url}: {e}")))?;
        first.close().await?;
        let pool = AnyPoolOptions::new()
            .max_connections(POSTGRES_MAX_CONNECTIONS)
            .acquire_timeout(POSTGRES_ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Connect(format!("{url}: {e}")))?;
        let store = Self {
            pool,
            replica: None,
            backend: Backend::Postgres,
            postgres_url: Some(std::sync::Arc::new(url.clone())),
            fleet: std::sync::Arc::default(),
        };
        store.migrate_postgres().await?;
        Ok(store)
    }

    /// Which engine this store runs on.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Writes a consistent copy of the whole database to `path` (which must
    /// not exist) with `VACUUM INTO`: one read transaction, so writers in
    /// this or another process go on meanwhile (WAL). SQLite only: a
    /// PostgreSQL database is backed up with its own tools (`pg_dump`).
    pub async fn snapshot_into(&self, path: &Path) -> Result<(), StoreError> {
        self.sqlite_only("a snapshot (VACUUM INTO)")?;
        let target = path.to_string_lossy().into_owned();
        sqlx::query("VACUUM INTO $1")
            .bind(target)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// SQLite's `PRAGMA integrity_check`: fails naming the first problem.
    pub async fn integrity_check(&self) -> Result<(), StoreError> {
        self.sqlite_only("an integrity check")?;
        let result: String = sqlx::query_scalar("PRAGMA integrity_check")
            .fetch_one(&self.pool)
            .await?;
        if result == "ok" {
            Ok(())
        } else {
            Err(StoreError::Integrity(result))
        }
    }

    /// Closes every connection (on SQLite the WAL is checkpointed into the
    /// file).
    pub async fn close(self) {
        self.pool.close().await;
    }

    /// The schema version the database is at (its engine's numbering).
    pub(crate) async fn schema_version(&self) -> Result<i64, StoreError> {
        let sql = match self.backend {
            Backend::Sqlite => "PRAGMA user_version",
            Backend::Postgres => "SELECT version FROM slipway_schema",
        };
        Ok(sqlx::query_scalar(sql).fetch_one(&self.pool).await?)
    }

    fn sqlite_only(&self, what: &'static str) -> Result<(), StoreError> {
        match self.backend {
            Backend::Sqlite => Ok(()),
            Backend::Postgres => Err(StoreError::SqliteOnly(what)),
        }
    }

    async fn open_sqlite_once(data_dir: &Path) -> Result<Self, StoreError> {
        let url = SqliteConnectOptions::new()
            .filename(data_dir.join(DB_FILE))
            .create_if_missing(true)
            .to_url_lossy();
        let pool = AnyPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    // The busy timeout first, so that switching to WAL waits
                    // for another process's transaction. WAL: readers never
                    // block the writer, and `token create` can write while
                    // `serve` runs. NORMAL is durable across process crashes
                    // in WAL mode; only a power loss can drop the last
                    // commits.
                    conn.execute(
                        format!(
                            "PRAGMA busy_timeout = {}; PRAGMA journal_mode = WAL; \
                             PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;",
                            BUSY_TIMEOUT.as_millis()
                        )
                        .as_str(),
                    )
                    .await?;
                    Ok(())
                })
            })
            .connect_with(AnyConnectOptions::from_url(&url)?)
            .await?;
        let store = Self {
            pool,
            replica: None,
            backend: Backend::Sqlite,
            postgres_url: None,
            fleet: std::sync::Arc::default(),
        };
        store.migrate_sqlite().await?;
        Ok(store)
    }

    async fn migrate_sqlite(&self) -> Result<(), StoreError> {
        // IMMEDIATE takes the write lock before reading the version, so two
        // processes starting on a fresh file (`serve` and `token create`)
        // cannot both apply the same migration; the second waits, then sees
        // the new version. Schema change and version bump commit together.
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let conn: &mut AnyConnection = &mut tx;
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&mut *conn)
            .await?;
        let start = check_version(version, MIGRATIONS)?;
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

    async fn migrate_postgres(&self) -> Result<(), StoreError> {
        // One transaction holding an advisory lock: a replica starting
        // while another migrates waits here, then finds the version bumped.
        // PostgreSQL's DDL is transactional, so a failed migration leaves
        // the database as it was.
        let mut tx = self.pool.begin().await?;
        let conn: &mut AnyConnection = &mut tx;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATE_LOCK)
            .execute(&mut *conn)
            .await?;
        // Quiet: the notice that the table exists would be logged at every
        // start.
        conn.execute("SET LOCAL client_min_messages = warning")
            .await?;
        conn.execute("CREATE TABLE IF NOT EXISTS slipway_schema (version BIGINT NOT NULL)")
            .await?;
        let version: Option<i64> = sqlx::query_scalar("SELECT version FROM slipway_schema")
            .fetch_optional(&mut *conn)
            .await?;
        let version = match version {
            Some(version) => version,
            None => {
                conn.execute("INSERT INTO slipway_schema (version) VALUES (0)")
                    .await?;
                0
            }
        };
        let start = check_version(version, POSTGRES_MIGRATIONS)?;
        for (index, sql) in POSTGRES_MIGRATIONS.iter().enumerate().skip(start) {
            // A plain `&str` goes as a simple query: every statement in it.
            conn.execute(*sql).await?;
            sqlx::query("UPDATE slipway_schema SET version = $1")
                .bind(i64::try_from(index + 1).unwrap_or(i64::MAX))
                .execute(&mut *conn)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Starts a transaction, for steps that must happen together (using a
    /// token and recording the node it enrolled). Only the store's own
    /// methods use transactions: callers see one method per step.
    ///
    /// On SQLite IMMEDIATE: the transaction reads then writes; a deferred
    /// one would fail at once (SQLITE_BUSY, no busy wait) if another writer
    /// got in between, instead of waiting its turn. On PostgreSQL the same
    /// one-at-a-time order comes from [`WRITE_LOCK`].
    async fn begin(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        match self.backend {
            Backend::Sqlite => Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?),
            Backend::Postgres => {
                let mut tx = self.pool.begin().await?;
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(WRITE_LOCK)
                    .execute(&mut *tx)
                    .await?;
                Ok(tx)
            }
        }
    }

    /// [`Self::begin`] without [`WRITE_LOCK`] on PostgreSQL, for writes
    /// that touch only rows of their own (inserts of new rows, deletes of
    /// the caller's rows) and need no one-at-a-time order there; SQLite
    /// still takes its write lock at once (IMMEDIATE).
    async fn begin_unlocked(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, StoreError> {
        match self.backend {
            Backend::Sqlite => Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?),
            Backend::Postgres => Ok(self.pool.begin().await?),
        }
    }
}

/// The index of the first migration of `migrations` a database at
/// `version` still needs.
fn check_version(version: i64, migrations: &[&str]) -> Result<usize, StoreError> {
    if version > migrations.len() as i64 {
        return Err(StoreError::SchemaTooNew {
            found: version,
            known: migrations.len(),
        });
    }
    Ok(usize::try_from(version).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{self, AuditEvent};
    use sqlx::sqlite::SqlitePool;

    crate::store::testing::store_tests!(the_schema_is_at_the_newest_version);

    async fn the_schema_is_at_the_newest_version(store: Store) {
        assert!(store.schema_ready().await.unwrap());
        let newest = store.backend().migrations().len() as i64;
        assert_eq!(store.schema_version().await.unwrap(), newest);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_replicas_starting_together_migrate_one_at_a_time() {
        let Some(url) = crate::store::testing::postgres_url().await else {
            return;
        };
        // Without the advisory lock the second CREATE TABLE of the same
        // schema fails ("already exists") or the version is bumped twice.
        let opens: Vec<_> = (0..4)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move { Store::open_postgres(&url).await })
            })
            .collect();
        let mut stores = Vec::new();
        for open in opens {
            stores.push(open.await.unwrap().unwrap());
        }
        for store in &stores {
            assert!(store.schema_ready().await.unwrap());
        }
        let event = AuditEvent::success(
            audit::TOKEN_CREATED,
            "operator",
            "join_token",
            "t1",
            serde_json::json!({}),
        );
        stores[0].audit(&event, 10).await.unwrap();
        for store in stores {
            store.close().await;
        }
        let store = Store::open_postgres(&url).await.unwrap();
        assert_eq!(store.audit_events().await.unwrap().len(), 1);
        assert_eq!(
            store.schema_version().await.unwrap(),
            POSTGRES_MIGRATIONS.len() as i64
        );
        let dir = tempfile::tempdir().unwrap();
        let refused = store.snapshot_into(&dir.path().join("copy.db")).await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.to_string().contains("pg_dump")),
            "{refused:?}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_postgres_is_an_error_without_the_password() {
        // A port nothing listens on: bound, then released.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url =
            PostgresUrl::parse(&format!("postgres://slipway:s3cret@127.0.0.1:{port}/db")).unwrap();
        let err = Store::open_postgres(&url).await.unwrap_err().to_string();
        assert!(
            err.contains(&format!("postgres://slipway:***@127.0.0.1:{port}/db")),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[tokio::test]
    async fn sqlite_connections_are_wal_normal_with_foreign_keys_and_a_busy_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        // Every connection of the pool, not only the first.
        let mut conns = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            conns.push(store.pool.acquire().await.unwrap());
        }
        for conn in &mut conns {
            let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
                .fetch_one(&mut **conn)
                .await
                .unwrap();
            assert_eq!(mode, "wal");
            for (pragma, want) in [
                ("synchronous", 1),
                ("foreign_keys", 1),
                ("busy_timeout", BUSY_TIMEOUT.as_millis() as i64),
            ] {
                let got: i64 = sqlx::query_scalar(&format!("PRAGMA {pragma}"))
                    .fetch_one(&mut **conn)
                    .await
                    .unwrap();
                assert_eq!(got, want, "{pragma}");
            }
        }
    }

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
        assert!(fleet[0].apps.is_empty());
        assert_eq!(fleet[0].metrics, None);
        assert_eq!(store.controller_start().await.unwrap(), None);
        let version: i64 = sqlx::query_scalar("PRAGMA user_version")
            .fetch_one(&store.pool)
            .await
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
    }
}
