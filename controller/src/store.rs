//! Persistent controller state in one SQLite file (`<data-dir>/controller.db`,
//! WAL mode) through sqlx: nodes, join tokens and the audit log.
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
use crate::crypto::{self, CryptoError};

/// File name of the database inside the data dir.
pub const DB_FILE: &str = "controller.db";

/// Embedded migrations; entry `i` moves the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[include_str!("../migrations/0001_init.sql")];

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

impl Store {
    /// Opens (creating if needed) `<data_dir>/controller.db` and migrates it.
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
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
    ) -> Result<(), StoreError> {
        let tags = serde_json::Value::from(tags.to_vec()).to_string();
        sqlx::query(
            "INSERT INTO join_tokens (id, secret_hash, tags, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(id)
        .bind(secret_hash)
        .bind(tags)
        .bind(created_at)
        .bind(expires_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Every audit event, oldest first.
    pub async fn audit_events(&self) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, created_at, event_type, actor, resource_type, resource_id, details,
                    status, error_message
             FROM audit_events ORDER BY created_at, rowid",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let details: String = row.try_get("details")?;
                Ok(AuditRecord {
                    id: row.try_get("id")?,
                    created_at: row.try_get("created_at")?,
                    event_type: row.try_get("event_type")?,
                    actor: row.try_get("actor")?,
                    resource_type: row.try_get("resource_type")?,
                    resource_id: row.try_get("resource_id")?,
                    details: serde_json::from_str(&details).map_err(|source| StoreError::Json {
                        column: "audit_events.details",
                        source,
                    })?,
                    status: row.try_get("status")?,
                    error_message: row.try_get("error_message")?,
                })
            })
            .collect()
    }

    /// The node holding the certificate with this fingerprint, if any.
    pub async fn node_by_fingerprint(
        &self,
        fingerprint: &str,
    ) -> Result<Option<NodeRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, cert_fingerprint, revoked_at, last_seen_at
             FROM nodes WHERE cert_fingerprint = ?1",
        )
        .bind(fingerprint)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(NodeRow {
                id: row.try_get("id")?,
                name: row.try_get("name")?,
                cert_fingerprint: row.try_get("cert_fingerprint")?,
                revoked_at: row.try_get("revoked_at")?,
                last_seen_at: row.try_get("last_seen_at")?,
            })
        })
        .transpose()
    }

    /// Records that the node was just heard from.
    pub async fn touch_node(&self, node_id: &str, now: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE nodes SET last_seen_at = ?1 WHERE id = ?2")
            .bind(now)
            .bind(node_id)
            .execute(&self.pool)
            .await?;
        Ok(())
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
        let tags: String = row.try_get("tags")?;
        Ok(JoinTokenRow {
            id: row.try_get("id")?,
            secret_hash: row.try_get("secret_hash")?,
            tags: serde_json::from_str(&tags).map_err(|source| StoreError::Json {
                column: "join_tokens.tags",
                source,
            })?,
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
    .execute(conn)
    .await?;
    Ok(())
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
    async fn a_token_is_used_once_and_never_after_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        store
            .insert_join_token("a", "h", &["env:production".to_owned()], 0, 100)
            .await
            .unwrap();
        store
            .insert_join_token("b", "h", &[], 0, 100)
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
