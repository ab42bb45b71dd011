//! The `droplets` table (DigitalOcean droplets of the fleet's tags, as last
//! synced) and `nodes.droplet_id` (the droplet an agent says it runs on,
//! read from its metadata service).

use std::collections::{BTreeSet, HashMap};

use sqlx::Row as _;

use super::{json_column, Store, StoreError};

/// A droplet as stored, with the live node matched to it (by droplet id).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DropletRow {
    pub id: u64,
    pub name: String,
    pub region: String,
    pub size: String,
    pub public_ipv4: Option<String>,
    pub private_ipv4: Option<String>,
    pub tags: Vec<String>,
    pub status: String,
    pub first_seen_at: i64,
    pub synced_at: i64,
    /// When a sync stopped finding it (destroyed or untagged).
    pub gone_at: Option<i64>,
    /// The live node whose agent reported this droplet id.
    pub node_id: Option<String>,
    pub node_name: Option<String>,
}

/// What one sync changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DropletSync {
    /// Seen for the first time (or back after being gone).
    pub added: Vec<DropletRow>,
    /// Tags changed: the droplet and its tags before.
    pub retagged: Vec<(DropletRow, Vec<String>)>,
    /// No longer found under the fleet's tags.
    pub gone: Vec<DropletRow>,
}

/// The result of recording the droplet id an agent reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DropletClaim {
    /// Recorded (new or changed).
    Recorded,
    /// The node already had this droplet id.
    Unchanged,
    /// Another live node already claims that droplet: not recorded.
    Conflict { other_node: String },
}

/// An id as SQLite's signed integer (DO ids are far below 2^63).
fn sql_id(id: u64) -> i64 {
    i64::try_from(id).unwrap_or(i64::MAX)
}

fn row_to_droplet(row: &sqlx::any::AnyRow) -> Result<DropletRow, StoreError> {
    let id: i64 = row.try_get("id")?;
    Ok(DropletRow {
        id: u64::try_from(id).unwrap_or_default(),
        name: row.try_get("name")?,
        region: row.try_get("region")?,
        size: row.try_get("size")?,
        public_ipv4: row.try_get("public_ipv4")?,
        private_ipv4: row.try_get("private_ipv4")?,
        tags: json_column(row, "tags", "droplets.tags")?,
        status: row.try_get("status")?,
        first_seen_at: row.try_get("first_seen_at")?,
        synced_at: row.try_get("synced_at")?,
        gone_at: row.try_get("gone_at")?,
        node_id: row.try_get("node_id")?,
        node_name: row.try_get("node_name")?,
    })
}

const SELECT: &str = "SELECT d.id, d.name, d.region, d.size, d.public_ipv4, d.private_ipv4,
        d.tags, d.status, d.first_seen_at, d.synced_at, d.gone_at,
        n.id AS node_id, n.name AS node_name
   FROM droplets d
   LEFT JOIN nodes n ON n.droplet_id = d.id AND n.revoked_at IS NULL";

impl Store {
    /// The latest node (revoked ones included) that reported each droplet
    /// id: droplet id → (node id, node name); for showing the retired node
    /// of a gone droplet.
    pub async fn nodes_of_droplets(
        &self,
    ) -> Result<std::collections::HashMap<u64, (String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, droplet_id FROM nodes WHERE droplet_id IS NOT NULL
             ORDER BY enrolled_at, rowid",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = std::collections::HashMap::new();
        for row in rows {
            let droplet: i64 = row.try_get("droplet_id")?;
            if let Ok(droplet) = u64::try_from(droplet) {
                out.insert(droplet, (row.try_get("id")?, row.try_get("name")?));
            }
        }
        Ok(out)
    }

    /// Every droplet ever synced (gone ones too), by name.
    pub async fn droplets(&self) -> Result<Vec<DropletRow>, StoreError> {
        let rows = sqlx::query(&format!("{SELECT} ORDER BY d.name, d.id"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(row_to_droplet).collect()
    }

    /// Records what a sync saw (`seen`: every droplet of the fleet's tags,
    /// node fields ignored), in one transaction: new ones inserted, known
    /// ones updated, known ones not seen marked gone.
    pub async fn sync_droplets(
        &self,
        seen: &[DropletRow],
        now: i64,
    ) -> Result<DropletSync, StoreError> {
        let mut tx = self.begin().await?;
        let before: HashMap<u64, DropletRow> = sqlx::query(SELECT)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| row_to_droplet(r).map(|d| (d.id, d)))
            .collect::<Result<_, _>>()?;
        let mut changes = DropletSync::default();
        let mut seen_ids = BTreeSet::new();
        for d in seen {
            seen_ids.insert(d.id);
            let tags = serde_json::to_string(&d.tags).unwrap_or_else(|_| "[]".into());
            sqlx::query(
                "INSERT INTO droplets (id, name, region, size, public_ipv4, private_ipv4, tags,
                                       status, first_seen_at, synced_at, gone_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, NULL)
                 ON CONFLICT (id) DO UPDATE SET name = $2, region = $3, size = $4,
                     public_ipv4 = $5, private_ipv4 = $6, tags = $7, status = $8,
                     synced_at = $9, gone_at = NULL",
            )
            .bind(sql_id(d.id))
            .bind(&d.name)
            .bind(&d.region)
            .bind(&d.size)
            .bind(&d.public_ipv4)
            .bind(&d.private_ipv4)
            .bind(tags)
            .bind(&d.status)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            match before.get(&d.id) {
                None => changes.added.push(d.clone()),
                Some(old) if old.gone_at.is_some() => changes.added.push(d.clone()),
                Some(old) if old.tags != d.tags => {
                    changes.retagged.push((d.clone(), old.tags.clone()));
                }
                Some(_) => {}
            }
        }
        for (id, old) in &before {
            if old.gone_at.is_none() && !seen_ids.contains(id) {
                sqlx::query("UPDATE droplets SET gone_at = $1 WHERE id = $2")
                    .bind(now)
                    .bind(sql_id(*id))
                    .execute(&mut *tx)
                    .await?;
                changes.gone.push(old.clone());
            }
        }
        tx.commit().await?;
        changes.gone.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(changes)
    }

    /// Marks a droplet gone now (destroyed by `droplets retire --destroy`).
    pub async fn mark_droplet_gone(&self, id: u64, now: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE droplets SET gone_at = $1 WHERE id = $2 AND gone_at IS NULL")
            .bind(now)
            .bind(sql_id(id))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records the droplet id a node's agent reported, unless another live
    /// node already claims it.
    pub async fn claim_droplet(
        &self,
        node_id: &str,
        droplet_id: u64,
    ) -> Result<DropletClaim, StoreError> {
        let mut tx = self.begin().await?;
        let other: Option<String> = sqlx::query_scalar(
            "SELECT id FROM nodes WHERE droplet_id = $1 AND revoked_at IS NULL AND id != $2",
        )
        .bind(sql_id(droplet_id))
        .bind(node_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(other_node) = other {
            return Ok(DropletClaim::Conflict { other_node });
        }
        let done = sqlx::query(
            "UPDATE nodes SET droplet_id = $1
              WHERE id = $2 AND (droplet_id IS NULL OR droplet_id != $1)",
        )
        .bind(sql_id(droplet_id))
        .bind(node_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(if done.rows_affected() == 1 {
            DropletClaim::Recorded
        } else {
            DropletClaim::Unchanged
        })
    }

    /// The droplet id each live node reported (None: none reported).
    pub async fn node_droplet_ids(&self) -> Result<Vec<(String, String, Option<u64>)>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, name, droplet_id FROM nodes WHERE revoked_at IS NULL ORDER BY name, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let d: Option<i64> = r.try_get("droplet_id")?;
                Ok((
                    r.try_get("id")?,
                    r.try_get("name")?,
                    d.and_then(|d| u64::try_from(d).ok()),
                ))
            })
            .collect()
    }

    /// The synced tags of the droplet of each live node matched to a
    /// droplet that is not gone: what `--tag` selects on for those nodes.
    pub async fn droplet_tags_by_node(&self) -> Result<HashMap<String, Vec<String>>, StoreError> {
        let rows = sqlx::query(&format!(
            "{SELECT} WHERE d.gone_at IS NULL AND n.id IS NOT NULL"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let d = row_to_droplet(r)?;
                Ok((d.node_id.unwrap_or_default(), d.tags))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::store::testing::store_tests!(synced_droplets_and_the_nodes_on_them);

    fn droplet(id: u64, name: &str, tags: &[&str]) -> DropletRow {
        DropletRow {
            id,
            name: name.into(),
            region: "fra1".into(),
            size: "s-1vcpu-1gb".into(),
            public_ipv4: Some("203.0.113.7".into()),
            private_ipv4: None,
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            status: "active".into(),
            first_seen_at: 0,
            synced_at: 0,
            gone_at: None,
            node_id: None,
            node_name: None,
        }
    }

    async fn synced_droplets_and_the_nodes_on_them(store: Store) {
        let big = u64::try_from(i64::MAX).unwrap();
        let first = [
            droplet(7, "web-b", &["pf-core"]),
            droplet(big, "web-a", &["pf-core"]),
        ];
        let sync = store.sync_droplets(&first, 10).await.unwrap();
        assert_eq!(sync.added.len(), 2);
        for (id, name) in [("n-1", "node-1"), ("n-2", "node-2")] {
            sqlx::query(
                "INSERT INTO nodes (id, name, cert_serial, cert_fingerprint, cert_expires_at,
                                    enrolled_at) VALUES ($1, $2, '01', $1, 100, 1)",
            )
            .bind(id)
            .bind(name)
            .execute(&store.pool)
            .await
            .unwrap();
        }
        assert_eq!(
            store.claim_droplet("n-1", 7).await.unwrap(),
            DropletClaim::Recorded
        );
        assert_eq!(
            store.claim_droplet("n-1", 7).await.unwrap(),
            DropletClaim::Unchanged
        );
        assert_eq!(
            store.claim_droplet("n-2", 7).await.unwrap(),
            DropletClaim::Conflict {
                other_node: "n-1".into()
            }
        );
        let droplets = store.droplets().await.unwrap();
        let names: Vec<&str> = droplets.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["web-a", "web-b"]);
        assert_eq!(droplets[0].id, big);
        assert_eq!(droplets[1].node_name.as_deref(), Some("node-1"));
        assert_eq!(
            store.droplet_tags_by_node().await.unwrap()["n-1"],
            ["pf-core"]
        );

        // Retagged and gone.
        let second = [droplet(7, "web-b", &["pf-core", "env:production"])];
        let sync = store.sync_droplets(&second, 20).await.unwrap();
        assert_eq!((sync.retagged.len(), sync.gone.len()), (1, 1));
        assert_eq!(sync.gone[0].id, big);
        let gone = store.droplets().await.unwrap();
        assert_eq!(gone[0].gone_at, Some(20));
        assert_eq!(
            store.nodes_of_droplets().await.unwrap()[&7],
            ("n-1".to_owned(), "node-1".to_owned())
        );
        let ids = store.node_droplet_ids().await.unwrap();
        assert_eq!(ids[0], ("n-1".into(), "node-1".into(), Some(7)));
        assert_eq!(ids[1], ("n-2".into(), "node-2".into(), None));
    }
}
