//! Join tokens (`join_tokens`): one-time enrollment secrets, stored hashed.

use sqlx::AnyConnection;
use sqlx::Row as _;

use super::{insert_audit, json_column, Store, StoreError};
use crate::audit::AuditEvent;

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
    /// The only node name it enrolls, when bound (`droplets create`).
    pub node_name: Option<String>,
}

impl Store {
    /// Stores a new join token, bound to `node_name` when given.
    #[allow(clippy::too_many_arguments)]
    pub async fn insert_join_token(
        &self,
        id: &str,
        secret_hash: &str,
        tags: &[String],
        node_name: Option<&str>,
        created_at: i64,
        expires_at: i64,
        created: &AuditEvent,
    ) -> Result<(), StoreError> {
        let tags = serde_json::Value::from(tags.to_vec()).to_string();
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO join_tokens (id, secret_hash, tags, created_at, expires_at, node_name)
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(id)
        .bind(secret_hash)
        .bind(tags)
        .bind(created_at)
        .bind(expires_at)
        .bind(node_name)
        .execute(&mut *tx)
        .await?;
        insert_audit(&mut tx, created, created_at).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Loads a join token by id.
    pub async fn join_token(&self, id: &str) -> Result<Option<JoinTokenRow>, StoreError> {
        let row = sqlx::query(
            "SELECT id, secret_hash, tags, expires_at, used_at, node_name FROM join_tokens
             WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(JoinTokenRow {
                id: row.try_get("id")?,
                secret_hash: row.try_get("secret_hash")?,
                tags: json_column(&row, "tags", "join_tokens.tags")?,
                expires_at: row.try_get("expires_at")?,
                used_at: row.try_get("used_at")?,
                node_name: row.try_get("node_name")?,
            })
        })
        .transpose()
    }
}

impl Store {
    /// Nodes that enrolled with a bound join token (`droplets create`) and
    /// have not yet been sent the apps' current releases: (node id, token id).
    pub async fn join_deploys_due(&self) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT t.used_by, t.id FROM join_tokens t JOIN nodes n ON n.id = t.used_by
             WHERE t.node_name IS NOT NULL AND t.used_by IS NOT NULL
                   AND t.current_deployed_at IS NULL AND n.revoked_at IS NULL",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }

    /// Takes on sending the current releases to the node of token `id`:
    /// true for exactly one caller.
    pub async fn take_join_deploy(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "UPDATE join_tokens SET current_deployed_at = $1
             WHERE id = $2 AND current_deployed_at IS NULL",
        )
        .bind(now)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Whether the node enrolled with a bound join token whose current
    /// releases the controller has taken on sending (`Some(false)`: not
    /// yet; `None`: not such a node).
    pub async fn join_deploy_taken(&self, node_id: &str) -> Result<Option<bool>, StoreError> {
        let row = sqlx::query(
            "SELECT current_deployed_at FROM join_tokens
             WHERE used_by = $1 AND node_name IS NOT NULL
             ORDER BY used_at DESC LIMIT 1",
        )
        .bind(node_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| Ok(row.try_get::<Option<i64>, _>(0)?.is_some()))
            .transpose()
    }
}

/// Marks a token used if (and only if) it is still unused and unexpired.
/// Returns false when another enrollment won the race or it just expired:
/// the `WHERE` makes check-and-set one atomic statement.
pub(super) async fn use_join_token(
    conn: &mut AnyConnection,
    id: &str,
    node_id: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let done = sqlx::query(
        "UPDATE join_tokens SET used_at = $1, used_by = $2
         WHERE id = $3 AND used_at IS NULL AND expires_at > $1",
    )
    .bind(now)
    .bind(node_id)
    .bind(id)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{self, AuditEvent};
    use crate::store::Store;

    crate::store::testing::store_tests!(a_token_is_used_once_and_never_after_expiry);

    fn created(id: &str) -> AuditEvent {
        AuditEvent::success(
            audit::TOKEN_CREATED,
            "operator",
            "join_token",
            id,
            serde_json::json!({}),
        )
    }

    async fn a_token_is_used_once_and_never_after_expiry(store: Store) {
        store
            .insert_join_token(
                "a",
                "h",
                &["env:production".to_owned()],
                Some("web-4"),
                0,
                100,
                &created("a"),
            )
            .await
            .unwrap();
        store
            .insert_join_token("b", "h", &[], None, 0, 100, &created("b"))
            .await
            .unwrap();
        let mut conn = store.pool.acquire().await.unwrap();

        assert!(use_join_token(&mut conn, "a", "n1", 50).await.unwrap());
        assert!(!use_join_token(&mut conn, "a", "n2", 51).await.unwrap());
        assert!(!use_join_token(&mut conn, "b", "n3", 100).await.unwrap());
        let a = store.join_token("a").await.unwrap().unwrap();
        assert_eq!(a.used_at, Some(50));
        assert_eq!(a.tags, vec!["env:production".to_owned()]);
        assert_eq!(a.node_name.as_deref(), Some("web-4"));
        let b = store.join_token("b").await.unwrap().unwrap();
        assert_eq!(b.node_name, None);
    }
}
