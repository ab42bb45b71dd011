//! The audit log (`audit_events`).

use sqlx::AnyConnection;
use sqlx::Row as _;

use super::{json_column, Backend, Store, StoreError};
use crate::audit::{AuditEvent, AuditRecord};
use crate::pki::crypto;

impl Store {
    /// Records an audit event on its own.
    pub async fn audit(&self, event: &AuditEvent, now: i64) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        insert_audit(&mut conn, event, now).await
    }

    /// Records `event` under an id derived from `key` unless an event with
    /// that key was recorded before (an agent resending a node event it
    /// kept until acknowledged). Returns whether it was new.
    pub async fn audit_once(
        &self,
        key: &str,
        event: &AuditEvent,
        now: i64,
    ) -> Result<bool, StoreError> {
        let h = crypto::sha256_hex(key.as_bytes());
        // UUID-shaped (version 5 style bits) so it reads like every other id.
        let id = format!(
            "{}-{}-5{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[13..16],
            &h[16..20],
            &h[20..32]
        );
        let done = sqlx::query(
            "INSERT INTO audit_events (id, created_at, event_type, actor, resource_type,
                                       resource_id, details, status, error_message)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(now)
        .bind(event.event_type)
        .bind(&event.actor)
        .bind(event.resource_type)
        .bind(&event.resource_id)
        .bind(event.details.to_string())
        .bind(event.status)
        .bind(&event.error_message)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
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
             FROM audit_events WHERE created_at >= $1 ORDER BY created_at, rowid",
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
}

/// Which audit events [`Store::audit_events_filtered`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// At or after (seconds since the epoch).
    pub since: Option<i64>,
    /// Before (seconds since the epoch).
    pub until: Option<i64>,
    /// Event type, e.g. DEPLOY_FAILED.
    pub kind: Option<String>,
    /// Events about this app (their details' `app`).
    pub app: Option<String>,
    /// At most this many, the newest.
    pub limit: u32,
}

impl Store {
    /// Audit events matching `filter`, newest first.
    pub async fn audit_events_filtered(
        &self,
        filter: &AuditFilter,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        // The details' `app`: the one place the two engines' JSON
        // functions differ.
        let app = match self.backend {
            Backend::Sqlite => "json_extract(details, '$.app')",
            Backend::Postgres => "(details::jsonb ->> 'app')",
        };
        let sql = format!(
            "SELECT id, created_at, event_type, actor, resource_type, resource_id, details,
                    status, error_message
             FROM audit_events
             WHERE ($1 IS NULL OR created_at >= $1) AND ($2 IS NULL OR created_at < $2)
               AND ($3 IS NULL OR event_type = $3)
               AND ($4 IS NULL OR {app} = $4)
             ORDER BY created_at DESC, rowid DESC LIMIT $5"
        );
        let rows = sqlx::query(&sql)
            .bind(filter.since)
            .bind(filter.until)
            .bind(filter.kind.as_deref())
            .bind(filter.app.as_deref())
            .bind(i64::from(filter.limit))
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
}

/// Inserts an audit event on `conn` (a pooled connection or a transaction).
pub(super) async fn insert_audit(
    conn: &mut AnyConnection,
    event: &AuditEvent,
    now: i64,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit_events (id, created_at, event_type, actor, resource_type,
                                   resource_id, details, status, error_message)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::DEPLOY_STARTED;

    crate::store::testing::store_tests!(events_filter_by_time_kind_and_app_newest_first);

    async fn events_filter_by_time_kind_and_app_newest_first(store: Store) {
        for (at, kind, app) in [
            (10, DEPLOY_STARTED, "web"),
            (20, crate::audit::DEPLOY_COMPLETED, "web"),
            (20, DEPLOY_STARTED, "api"),
            (30, DEPLOY_STARTED, "web"),
        ] {
            let details = serde_json::json!({ "app": app, "n": at });
            let event = AuditEvent::success(kind, "ci", "deployment", "d", details);
            store.audit(&event, at).await.unwrap();
        }
        let found = |filter: AuditFilter| {
            let store = store.clone();
            async move {
                store
                    .audit_events_filtered(&filter)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|e| (e.created_at, e.details["app"].as_str().unwrap().to_owned()))
                    .collect::<Vec<_>>()
            }
        };
        let all = AuditFilter {
            limit: 10,
            ..AuditFilter::default()
        };
        assert_eq!(
            found(all.clone()).await,
            [
                (30, "web".into()),
                (20, "api".into()),
                (20, "web".into()),
                (10, "web".into())
            ]
        );
        let web_starts = AuditFilter {
            kind: Some(DEPLOY_STARTED.into()),
            app: Some("web".into()),
            ..all.clone()
        };
        assert_eq!(
            found(web_starts).await,
            [(30, "web".into()), (10, "web".into())]
        );
        let window = AuditFilter {
            since: Some(20),
            until: Some(30),
            limit: 1,
            ..all.clone()
        };
        assert_eq!(found(window).await, [(20, "api".into())]);

        // An agent's resent event is recorded once.
        let event =
            AuditEvent::success(DEPLOY_STARTED, "n-1", "node", "n-1", serde_json::json!({}));
        assert!(store.audit_once("n-1/e-1", &event, 40).await.unwrap());
        assert!(!store.audit_once("n-1/e-1", &event, 41).await.unwrap());
        assert_eq!(store.audit_events_since(40).await.unwrap().len(), 1);
    }
}
