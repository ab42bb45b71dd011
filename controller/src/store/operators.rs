//! Operator client certificates (`operators`).

use sqlx::Row as _;

use super::{insert_audit, json_column, Store, StoreError};
use crate::audit::AuditEvent;

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

/// Columns of [`OperatorRow`], in [`operator_row`]'s order.
const OPERATOR_COLUMNS: &str =
    "id, name, cert_fingerprint, scopes, created_at, expires_at, revoked_at";

fn operator_row(row: &sqlx::any::AnyRow) -> Result<OperatorRow, StoreError> {
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

impl Store {
    /// Stores a new operator certificate and its creation audit event.
    pub async fn insert_operator(
        &self,
        operator: &OperatorRow,
        event: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO operators (id, name, cert_fingerprint, scopes, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6)",
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
            "SELECT {OPERATOR_COLUMNS} FROM operators WHERE cert_fingerprint = $1"
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
            "UPDATE operators SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL",
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
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::store::testing::store_tests!(operators_api_tokens_and_the_start_record);

    fn event(kind: &'static str, id: &str) -> AuditEvent {
        AuditEvent::success(kind, "operator", "operator", id, serde_json::json!({}))
    }

    async fn operators_api_tokens_and_the_start_record(store: Store) {
        for (id, created_at) in [("op-b", 5), ("op-a", 5), ("op-c", 1)] {
            let operator = OperatorRow {
                id: id.into(),
                name: format!("{id}-name"),
                cert_fingerprint: format!("fp-{id}"),
                scopes: vec!["read".into(), "deploy:web".into()],
                created_at,
                expires_at: 100,
                revoked_at: None,
            };
            store
                .insert_operator(&operator, &event(crate::audit::OPERATOR_CREATED, id))
                .await
                .unwrap();
        }
        let ids: Vec<String> = store
            .operators()
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.id)
            .collect();
        assert_eq!(ids, ["op-c", "op-a", "op-b"]);
        let revoked = event(crate::audit::OPERATOR_REVOKED, "op-a");
        assert!(store.revoke_operator("op-a", &revoked, 7).await.unwrap());
        assert!(!store.revoke_operator("op-a", &revoked, 8).await.unwrap());
        let a = store
            .operator_by_fingerprint("fp-op-a")
            .await
            .unwrap()
            .unwrap();
        assert_eq!((a.revoked_at, a.scopes.len()), (Some(7), 2));

        let created = event(crate::audit::TOKEN_CREATED, "tok-1");
        store
            .insert_api_token("tok-1", "hash", &["read".into()], 3, &created)
            .await
            .unwrap();
        let token = store.api_token("tok-1").await.unwrap().unwrap();
        assert_eq!(token.scopes, ["read"]);
        assert_eq!(
            store.revoke_api_token("tok-1", &created, 4).await.unwrap(),
            Some(true)
        );
        assert_eq!(
            store.revoke_api_token("tok-1", &created, 5).await.unwrap(),
            Some(false)
        );
        assert_eq!(
            store.revoke_api_token("nope", &created, 5).await.unwrap(),
            None
        );
        assert_eq!(store.api_tokens().await.unwrap()[0].revoked_at, Some(4));

        assert_eq!(store.controller_start().await.unwrap(), None);
        store.record_controller_start(100, 3).await.unwrap();
        store.record_controller_start(200, 5).await.unwrap();
        let start = store.controller_start().await.unwrap().unwrap();
        assert_eq!((start.started_at, start.unreachable_after), (200, 5));
    }
}
