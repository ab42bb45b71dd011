//! The fleet as last read, brought up to date with only the node rows that
//! changed since.
//!
//! `slipway status`, the fleet page, `/metrics`, a deploy's target check:
//! each needs every node with its last heartbeat. Reading and decoding
//! 10,000 rows (their apps and metrics JSON) on every call took hundreds of
//! milliseconds of a replica's CPU, while in any second only a few percent
//! of the nodes change (a heartbeat every 30 s each). So each `nodes` row
//! carries `changed`, set by a trigger on every insert and update
//! (migrations SQLite 0019, PostgreSQL 0007), and a read asks only for the
//! rows whose `changed` is past what this process has seen:
//!
//! - **SQLite**: `changed` is a counter bumped in the writing transaction;
//!   one writer at a time means numbers are taken in commit order, so
//!   "above the highest number seen" is exact.
//! - **PostgreSQL**: `changed` is the server's clock in microseconds;
//!   writers run at once (replicas, heartbeats), so a row stamped just
//!   before a read may commit just after it. A read therefore looks again
//!   at the rows stamped [`OVERLAP_US`] before the previous read's clock
//!   (a write that stays uncommitted longer than that after changing a
//!   node row is not one this store makes): their ids and stamps first,
//!   then in full only those whose stamp it has not read; and it reads
//!   everything again when the server's clock went backwards.
//!
//! Either way everything is read again every [`FULL_EVERY`] and whenever a
//! read fails half-way, so nothing can stay wrong for long. Rows are never
//! deleted from `nodes` (revoked nodes stay), so updates are all there is.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::Row as _;

use super::nodes::{FleetRow, NodeCert};
use super::{json_column, json_text, Backend, Store, StoreError};

/// PostgreSQL: how far before the previous read's clock a read looks
/// again, in microseconds.
pub(super) const OVERLAP_US: i64 = 5_000_000;

/// Rows read in full by id per query.
const BY_ID_CHUNK: usize = 500;

/// Everything is read again at least this often.
pub(super) const FULL_EVERY: Duration = Duration::from_secs(300);

/// One node as read: its fleet row and its current certificate.
#[derive(Debug, Clone)]
struct Entry {
    row: FleetRow,
    /// Its `changed` as read.
    changed: i64,
    /// The row of `node_certs` its `cert_fingerprint` names (`None`: no
    /// such row, which the store never writes).
    cert: Option<CertInfo>,
}

#[derive(Debug, Clone)]
struct CertInfo {
    issued_at: i64,
    expires_at: i64,
    ca_sha256: Option<String>,
}

/// The nodes by id and how far they are known.
#[derive(Debug)]
struct Known {
    nodes: HashMap<String, Arc<Entry>>,
    /// Every entry sorted by name then id, made again only after a read
    /// that brought a change (most reads bring none, or a few).
    sorted: Option<Arc<[Arc<Entry>]>>,
    /// SQLite: the highest `changed` seen. PostgreSQL: the server's clock
    /// (µs) taken just before the last read.
    mark: i64,
    /// When everything was last read.
    full_at: Instant,
}

/// See the module doc. One per store (shared by its clones).
#[derive(Debug, Default)]
pub(super) struct FleetCache {
    known: tokio::sync::Mutex<Option<Known>>,
}

/// The columns every read selects.
const SELECT: &str = "SELECT n.id, n.name, n.labels, n.agent_version, n.enrolled_at, n.revoked_at,
        n.last_seen_at, n.heartbeat_at, n.agent_rss_bytes, n.metrics, n.apps,
        n.heartbeat_interval_secs, n.cert_expires_at, n.changed,
        c.issued_at AS cert_issued_at, c.expires_at AS cert_not_after,
        c.ca_sha256 AS cert_ca_sha256
   FROM nodes n LEFT JOIN node_certs c ON c.fingerprint = n.cert_fingerprint";

/// The PostgreSQL server's clock, in microseconds since the epoch (as the
/// trigger of migration 0007 stamps rows).
const PG_CLOCK: &str = "SELECT CAST(extract(epoch FROM clock_timestamp()) * 1000000 AS BIGINT)";

fn entry(row: &sqlx::any::AnyRow) -> Result<Entry, StoreError> {
    let metrics: Option<String> = row.try_get("metrics")?;
    let rss: Option<i64> = row.try_get("agent_rss_bytes")?;
    let interval: Option<i64> = row.try_get("heartbeat_interval_secs")?;
    let issued_at: Option<i64> = row.try_get("cert_issued_at")?;
    let not_after: Option<i64> = row.try_get("cert_not_after")?;
    let cert = match (issued_at, not_after) {
        (Some(issued_at), Some(expires_at)) => Some(CertInfo {
            issued_at,
            expires_at,
            ca_sha256: row.try_get("cert_ca_sha256")?,
        }),
        _ => None,
    };
    let fleet = FleetRow {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        labels: json_column(row, "labels", "nodes.labels")?,
        agent_version: row.try_get("agent_version")?,
        enrolled_at: row.try_get("enrolled_at")?,
        revoked_at: row.try_get("revoked_at")?,
        last_seen_at: row.try_get("last_seen_at")?,
        heartbeat_at: row.try_get("heartbeat_at")?,
        agent_rss_bytes: rss.and_then(|v| u64::try_from(v).ok()),
        metrics: metrics
            .map(|m| json_text(&m, "nodes.metrics"))
            .transpose()?,
        apps: json_column(row, "apps", "nodes.apps")?,
        heartbeat_interval_secs: interval.and_then(|v| u64::try_from(v).ok()),
        cert_expires_at: row.try_get("cert_expires_at")?,
    };
    Ok(Entry {
        row: fleet,
        changed: row.try_get("changed")?,
        cert,
    })
}

impl Store {
    /// Every node as of now, sorted by name then id: the rows changed since
    /// this process last looked are read, the rest come from memory (see
    /// the module doc).
    async fn fleet_entries(&self) -> Result<Arc<[Arc<Entry>]>, StoreError> {
        let mut known = self.fleet.known.lock().await;
        // Taken out while reading: a read that fails half-way leaves
        // nothing behind, and the next one reads everything.
        let current = known.take();
        let mut fresh = match current {
            Some(current) if current.full_at.elapsed() < FULL_EVERY => {
                self.fleet_changes(current).await?
            }
            _ => self.fleet_everything().await?,
        };
        let sorted = match &fresh.sorted {
            Some(sorted) => sorted.clone(),
            None => {
                let mut entries: Vec<Arc<Entry>> = fresh.nodes.values().cloned().collect();
                entries.sort_by(|a, b| (&a.row.name, &a.row.id).cmp(&(&b.row.name, &b.row.id)));
                let sorted: Arc<[Arc<Entry>]> = entries.into();
                fresh.sorted = Some(sorted.clone());
                sorted
            }
        };
        *known = Some(fresh);
        Ok(sorted)
    }

    async fn pg_clock(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar(PG_CLOCK).fetch_one(&self.pool).await?)
    }

    async fn fleet_everything(&self) -> Result<Known, StoreError> {
        let clock = match self.backend {
            Backend::Postgres => Some(self.pg_clock().await?),
            Backend::Sqlite => None,
        };
        let rows = sqlx::query(SELECT).fetch_all(&self.pool).await?;
        let mut nodes = HashMap::with_capacity(rows.len());
        let mut highest = 0;
        for row in &rows {
            let entry = entry(row)?;
            highest = highest.max(entry.changed);
            nodes.insert(entry.row.id.clone(), Arc::new(entry));
        }
        Ok(Known {
            nodes,
            sorted: None,
            mark: clock.unwrap_or(highest),
            full_at: Instant::now(),
        })
    }

    async fn fleet_changes(&self, mut known: Known) -> Result<Known, StoreError> {
        let rows = match self.backend {
            Backend::Sqlite => {
                sqlx::query(&format!("{SELECT} WHERE n.changed > $1"))
                    .bind(known.mark)
                    .fetch_all(&self.pool)
                    .await?
            }
            Backend::Postgres => {
                let clock = self.pg_clock().await?;
                if clock < known.mark {
                    // The server's clock went back: stamps mean nothing.
                    return self.fleet_everything().await;
                }
                let stamps = sqlx::query("SELECT id, changed FROM nodes WHERE changed >= $1")
                    .bind(known.mark.saturating_sub(OVERLAP_US))
                    .fetch_all(&self.pool)
                    .await?;
                let mut unread = Vec::new();
                for row in &stamps {
                    let id: String = row.try_get("id")?;
                    let changed: i64 = row.try_get("changed")?;
                    if known.nodes.get(&id).is_none_or(|e| e.changed != changed) {
                        unread.push(id);
                    }
                }
                let mut rows = Vec::with_capacity(unread.len());
                for ids in unread.chunks(BY_ID_CHUNK) {
                    let sql = format!(
                        "{SELECT} WHERE n.id IN ({})",
                        super::placeholders(ids.len())
                    );
                    rows.extend(
                        super::bind_all(sqlx::query(&sql), ids)
                            .fetch_all(&self.pool)
                            .await?,
                    );
                }
                known.mark = clock;
                rows
            }
        };
        for row in &rows {
            let entry = entry(row)?;
            if self.backend == Backend::Sqlite {
                known.mark = known.mark.max(entry.changed);
            }
            known.nodes.insert(entry.row.id.clone(), Arc::new(entry));
            known.sorted = None;
        }
        Ok(known)
    }

    /// Every node with its latest heartbeat, sorted by name then id (metrics
    /// and apps in the shapes they were stored in, [`super::Metrics`] and
    /// [`super::App`]).
    pub async fn fleet(&self) -> Result<Vec<FleetRow>, StoreError> {
        Ok(self
            .fleet_entries()
            .await?
            .iter()
            .map(|e| e.row.clone())
            .collect())
    }

    /// The newest certificate of every live (not revoked) node, sorted by
    /// node name then id.
    pub async fn live_node_certs(&self) -> Result<Vec<NodeCert>, StoreError> {
        Ok(self.fleet_and_certs().await?.1)
    }

    /// [`Store::fleet`] and [`Store::live_node_certs`] from one read (a
    /// status call needs both).
    pub async fn fleet_and_certs(&self) -> Result<(Vec<FleetRow>, Vec<NodeCert>), StoreError> {
        let entries = self.fleet_entries().await?;
        let mut rows = Vec::with_capacity(entries.len());
        let mut certs = Vec::with_capacity(entries.len());
        for e in entries.iter() {
            if e.row.revoked_at.is_none() {
                if let Some(cert) = &e.cert {
                    certs.push(NodeCert {
                        id: e.row.id.clone(),
                        name: e.row.name.clone(),
                        issued_at: cert.issued_at,
                        expires_at: cert.expires_at,
                        ca_sha256: cert.ca_sha256.clone(),
                    });
                }
            }
            rows.push(e.row.clone());
        }
        Ok((rows, certs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slipway_proto::v1::{AppStatus, Heartbeat};

    crate::store::testing::store_tests!(
        a_read_sees_every_change_since_the_last_one_made_through_any_handle,
    );

    /// Another process on the same database: the same pool, a cache of
    /// its own.
    fn other_process(store: &Store) -> Store {
        Store {
            fleet: std::sync::Arc::default(),
            ..store.clone()
        }
    }

    async fn add_node(store: &Store, i: usize) {
        let mut tx = store.pool.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO nodes (id, name, cert_serial, cert_fingerprint, cert_expires_at,
                                labels, enrolled_at)
             VALUES ($1, $2, $3, $4, 1000, '{}', 10)",
        )
        .bind(format!("n{i:02}"))
        .bind(format!("web-{i:02}"))
        .bind(format!("s{i}"))
        .bind(format!("f{i}"))
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO node_certs (fingerprint, node_id, serial, issued_at, expires_at, ca_sha256)
             VALUES ($1, $2, $3, 10, 1000, 'ca')",
        )
        .bind(format!("f{i}"))
        .bind(format!("n{i:02}"))
        .bind(format!("s{i}"))
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
    }

    fn beat(release: &str) -> Heartbeat {
        Heartbeat {
            agent_version: "1.2".into(),
            apps: vec![AppStatus {
                app: "web".into(),
                current_release: release.into(),
                health: "healthy".into(),
                ..AppStatus::default()
            }],
            ..Heartbeat::default()
        }
    }

    /// What this handle knows equals what a full read of the database says.
    async fn agrees(store: &Store) {
        let everything = other_process(store);
        assert_eq!(
            store.fleet().await.unwrap(),
            everything.fleet().await.unwrap()
        );
        assert_eq!(
            store.live_node_certs().await.unwrap(),
            everything.live_node_certs().await.unwrap()
        );
    }

    async fn a_read_sees_every_change_since_the_last_one_made_through_any_handle(store: Store) {
        for i in 0..20 {
            add_node(&store, i).await;
        }
        let fleet = store.fleet().await.unwrap();
        assert_eq!(fleet.len(), 20);
        assert_eq!(fleet[0].name, "web-00");
        assert_eq!(fleet[19].name, "web-19");

        // Changes through another process: a heartbeat, a new node, a
        // renewed certificate, a revocation, a rename.
        let other = other_process(&store);
        assert!(other
            .record_heartbeat("n07", 50, &beat("r2"))
            .await
            .unwrap());
        add_node(&other, 20).await;
        sqlx::query(
            "INSERT INTO node_certs (fingerprint, node_id, serial, issued_at, expires_at, ca_sha256)
             VALUES ('f3b', 'n03', 's3b', 60, 2000, 'ca-new')",
        )
        .execute(&other.pool)
        .await
        .unwrap();
        sqlx::query(
            "UPDATE nodes SET cert_fingerprint = 'f3b', cert_expires_at = 2000 WHERE id = 'n03'",
        )
        .execute(&other.pool)
        .await
        .unwrap();
        sqlx::query("UPDATE nodes SET revoked_at = 70 WHERE id = 'n05'")
            .execute(&other.pool)
            .await
            .unwrap();
        sqlx::query("UPDATE nodes SET name = 'api-11' WHERE id = 'n11'")
            .execute(&other.pool)
            .await
            .unwrap();
        let fleet = store.fleet().await.unwrap();
        assert_eq!(fleet.len(), 21);
        let node = |id: &str| fleet.iter().find(|r| r.id == id).unwrap().clone();
        assert_eq!(node("n07").heartbeat_at, Some(50));
        assert_eq!(node("n07").apps[0].current_release, "r2");
        assert_eq!(node("n03").cert_expires_at, 2000);
        assert_eq!(node("n05").revoked_at, Some(70));
        // Sorted by name: the renamed node first.
        assert_eq!(fleet[0].id, "n11");
        let certs = store.live_node_certs().await.unwrap();
        assert_eq!(certs.len(), 20, "the revoked node has none");
        let n03 = certs.iter().find(|c| c.id == "n03").unwrap();
        assert_eq!(
            (n03.issued_at, n03.ca_sha256.as_deref()),
            (60, Some("ca-new"))
        );
        agrees(&store).await;

        // A change whose transaction commits after a read began (on
        // PostgreSQL stamped before that read's clock): seen by the next.
        let mut late = other.pool.begin().await.unwrap();
        sqlx::query("UPDATE nodes SET agent_version = 'late' WHERE id = 'n13'")
            .execute(&mut *late)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let before = store.fleet().await.unwrap();
        assert_ne!(
            before.iter().find(|r| r.id == "n13").unwrap().agent_version,
            "late",
            "an uncommitted change was read"
        );
        late.commit().await.unwrap();
        let after = store.fleet().await.unwrap();
        assert_eq!(
            after.iter().find(|r| r.id == "n13").unwrap().agent_version,
            "late",
            "a change committed after a read began was never read"
        );
        agrees(&store).await;
    }
}
