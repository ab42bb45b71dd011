//! Browser sessions of the HTTP pages (`web_sessions`), each acting for
//! the API token it was opened with.

use sqlx::Row as _;

use super::{Store, StoreError};

/// A live session as a request finds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebSessionRow {
    /// The API token it acts for.
    pub token_id: String,
    /// Its CSRF token.
    pub csrf: String,
    /// When it ends (seconds since the epoch).
    pub expires_at: i64,
}

impl Store {
    /// Stores a new session, dropping the sessions that expired by `now`.
    pub async fn insert_web_session(
        &self,
        id_hash: &str,
        token_id: &str,
        csrf: &str,
        now: i64,
        expires_at: i64,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM web_sessions WHERE expires_at <= $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO web_sessions (id_hash, token_id, csrf, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(id_hash)
        .bind(token_id)
        .bind(csrf)
        .bind(now)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// The session with this id hash, if it has not expired by `now` and
    /// its token is not revoked.
    pub async fn web_session(
        &self,
        id_hash: &str,
        now: i64,
    ) -> Result<Option<WebSessionRow>, StoreError> {
        let row = sqlx::query(
            "SELECT s.token_id, s.csrf, s.expires_at FROM web_sessions s
             JOIN api_tokens t ON t.id = s.token_id
             WHERE s.id_hash = $1 AND s.expires_at > $2 AND t.revoked_at IS NULL",
        )
        .bind(id_hash)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(WebSessionRow {
                token_id: row.try_get("token_id")?,
                csrf: row.try_get("csrf")?,
                expires_at: row.try_get("expires_at")?,
            })
        })
        .transpose()
    }

    /// Ends a session (logout); false if there was none.
    pub async fn delete_web_session(&self, id_hash: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM web_sessions WHERE id_hash = $1")
            .bind(id_hash)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// True if the schema is at the version this build migrates to (the
    /// HTTP `/readyz` check: the database answers and is migrated).
    pub async fn schema_ready(&self) -> Result<bool, StoreError> {
        let version = self.schema_version().await?;
        Ok(version == self.backend.migrations().len() as i64)
    }
}

#[cfg(test)]
mod tests {
    use crate::audit::{self, AuditEvent};
    use crate::store::Store;

    crate::store::testing::store_tests!(a_session_ends_at_expiry_logout_or_token_revocation);

    async fn a_session_ends_at_expiry_logout_or_token_revocation(store: Store) {
        let created = AuditEvent::success(
            audit::TOKEN_CREATED,
            "operator",
            "api_token",
            "t1",
            serde_json::json!({}),
        );
        store
            .insert_api_token("t1", "hash", &["read".to_owned()], 10, &created)
            .await
            .unwrap();
        store
            .insert_web_session("s1", "t1", "c1", 100, 200)
            .await
            .unwrap();
        store
            .insert_web_session("s2", "t1", "c2", 100, 300)
            .await
            .unwrap();
        let found = store.web_session("s1", 150).await.unwrap().unwrap();
        assert_eq!((found.token_id.as_str(), found.csrf.as_str()), ("t1", "c1"));
        // Expired.
        assert_eq!(store.web_session("s1", 200).await.unwrap(), None);
        // A new login sweeps the expired ones away.
        store
            .insert_web_session("s3", "t1", "c3", 250, 400)
            .await
            .unwrap();
        assert_eq!(store.web_session("s1", 150).await.unwrap(), None);
        // Logout.
        assert!(store.delete_web_session("s3").await.unwrap());
        assert!(!store.delete_web_session("s3").await.unwrap());
        // Revoking the token ends the rest.
        assert!(store.web_session("s2", 260).await.unwrap().is_some());
        let revoked = AuditEvent::success(
            audit::TOKEN_REVOKED,
            "operator",
            "api_token",
            "t1",
            serde_json::json!({}),
        );
        store.revoke_api_token("t1", &revoked, 270).await.unwrap();
        assert_eq!(store.web_session("s2", 280).await.unwrap(), None);
        assert!(store.schema_ready().await.unwrap());
    }
}
