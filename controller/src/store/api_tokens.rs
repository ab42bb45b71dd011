//! API tokens (`api_tokens`) of the `slipway` CLI, stored hashed.

use sqlx::Row as _;

use super::{insert_audit, json_column, Store, StoreError};
use crate::audit::AuditEvent;

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

impl Store {
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
            "INSERT INTO api_tokens (id, secret_hash, scopes, created_at) VALUES ($1, $2, $3, $4)",
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
            sqlx::query("SELECT id, secret_hash, scopes, revoked_at FROM api_tokens WHERE id = $1")
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
            sqlx::query_scalar("SELECT revoked_at FROM api_tokens WHERE id = $1")
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(revoked_at) = exists else {
            return Ok(None);
        };
        if revoked_at.is_some() {
            return Ok(Some(false));
        }
        sqlx::query("UPDATE api_tokens SET revoked_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        // Its browser sessions end with it.
        sqlx::query("DELETE FROM web_sessions WHERE token_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        insert_audit(&mut tx, event, now).await?;
        tx.commit().await?;
        Ok(Some(true))
    }
}
