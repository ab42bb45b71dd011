//! The fleet environment (`env_data_key`, `env_versions`): sealed blobs
//! and the names around them. Sealing and opening is
//! [`crate::secrets`]'s; this module never sees a value.

use sqlx::Row as _;

use super::{insert_audit, json_text, Store, StoreError};
use crate::audit::AuditEvent;

/// One stored version of an app's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvVersionRow {
    /// The app.
    pub app: String,
    /// The layer: '' for the app's base, else the tag whose nodes it
    /// overrides the base on (`env:staging`).
    pub layer: String,
    /// 1 and up, one sequence per app across its layers.
    pub version: u64,
    /// Who (API token or operator id).
    pub actor: String,
    /// When (seconds since the epoch).
    pub created_at: i64,
    /// "set", "unset", "import" or "rollback".
    pub change: String,
    /// Names set or changed.
    pub set_keys: Vec<String>,
    /// Names removed.
    pub unset_keys: Vec<String>,
    /// For a rollback: the version whose content it restored.
    pub rollback_to: Option<u64>,
    /// Variables after it.
    pub var_count: u64,
    /// The sealed variables (see [`crate::secrets`]).
    pub sealed: Vec<u8>,
}

fn version_of(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Integrity(format!("env version {v} is negative")))
}

fn row_to_version(row: &sqlx::any::AnyRow) -> Result<EnvVersionRow, StoreError> {
    let set: String = row.try_get("set_keys")?;
    let unset: String = row.try_get("unset_keys")?;
    let rollback_to: Option<i64> = row.try_get("rollback_to")?;
    Ok(EnvVersionRow {
        app: row.try_get("app")?,
        layer: row.try_get("layer")?,
        version: version_of(row.try_get("version")?)?,
        actor: row.try_get("actor")?,
        created_at: row.try_get("created_at")?,
        change: row.try_get("change")?,
        set_keys: json_text(&set, "set_keys")?,
        unset_keys: json_text(&unset, "unset_keys")?,
        rollback_to: rollback_to.map(version_of).transpose()?,
        var_count: version_of(row.try_get("var_count")?)?,
        sealed: row.try_get("sealed")?,
    })
}

const COLUMNS: &str = "app, version, actor, created_at, change, set_keys, unset_keys, \
                       rollback_to, var_count, sealed, layer";

impl Store {
    /// The sealed data key, if one was made.
    pub async fn env_data_key(&self) -> Result<Option<Vec<u8>>, StoreError> {
        let row = sqlx::query("SELECT sealed FROM env_data_key WHERE id = 1")
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get("sealed")).transpose()?)
    }

    /// Stores `sealed` as the data key unless one is stored already, and
    /// returns the stored one (two starts racing keep the first).
    pub async fn init_env_data_key(&self, sealed: &[u8], now: i64) -> Result<Vec<u8>, StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO env_data_key (id, sealed, created_at) VALUES (1, $1, $2)
             ON CONFLICT DO NOTHING",
        )
        .bind(sealed)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let row = sqlx::query("SELECT sealed FROM env_data_key WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(row.try_get("sealed")?)
    }

    /// Whether any app has an env version.
    pub async fn has_env_versions(&self) -> Result<bool, StoreError> {
        let row = sqlx::query(
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM env_versions) THEN 1 ELSE 0 END AS found",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(row.try_get::<i64, _>("found")? != 0)
    }

    /// Forgets the data key; only while no env version is sealed under it
    /// (false, and nothing done, otherwise).
    pub async fn drop_unused_env_data_key(&self) -> Result<bool, StoreError> {
        let done =
            sqlx::query("DELETE FROM env_data_key WHERE NOT EXISTS (SELECT 1 FROM env_versions)")
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() > 0)
    }

    /// The newest version of `app`'s environment.
    pub async fn env_latest(&self, app: &str) -> Result<Option<EnvVersionRow>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM env_versions WHERE app = $1 ORDER BY version DESC LIMIT 1"
        ))
        .bind(app)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(row_to_version).transpose()
    }

    /// One version of `app`'s environment.
    pub async fn env_version(
        &self,
        app: &str,
        version: u64,
    ) -> Result<Option<EnvVersionRow>, StoreError> {
        let v = i64::try_from(version).unwrap_or(i64::MAX);
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM env_versions WHERE app = $1 AND version = $2"
        ))
        .bind(app)
        .bind(v)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(row_to_version).transpose()
    }

    /// Every version of `app`'s environment, oldest first.
    pub async fn env_history(&self, app: &str) -> Result<Vec<EnvVersionRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM env_versions WHERE app = $1 ORDER BY version"
        ))
        .bind(app)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row_to_version).collect()
    }

    /// Every app that has an environment, sorted.
    pub async fn env_apps(&self) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query("SELECT DISTINCT app FROM env_versions ORDER BY app")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| Ok(r.try_get("app")?)).collect()
    }

    /// Stores `row` as the next version of its app, with `event`, in one
    /// transaction. Fails with [`StoreError::EnvConflict`] when another
    /// change stored that version first.
    pub async fn insert_env_version(
        &self,
        row: &EnvVersionRow,
        event: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let latest: Option<i64> =
            sqlx::query("SELECT MAX(version) AS v FROM env_versions WHERE app = $1")
                .bind(&row.app)
                .fetch_one(&mut *tx)
                .await?
                .try_get("v")?;
        let expected = latest.map_or(Ok(1), |v| version_of(v).map(|v| v + 1))?;
        if expected != row.version {
            return Err(StoreError::EnvConflict {
                app: row.app.clone(),
                version: row.version,
            });
        }
        let as_i64 = |v: u64| {
            i64::try_from(v).map_err(|_| StoreError::Integrity(format!("env version {v} too big")))
        };
        sqlx::query(&format!(
            "INSERT INTO env_versions ({COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .bind(&row.app)
        .bind(as_i64(row.version)?)
        .bind(&row.actor)
        .bind(row.created_at)
        .bind(&row.change)
        .bind(serde_json::Value::from(row.set_keys.clone()).to_string())
        .bind(serde_json::Value::from(row.unset_keys.clone()).to_string())
        .bind(row.rollback_to.map(as_i64).transpose()?)
        .bind(as_i64(row.var_count)?)
        .bind(&row.sealed)
        .bind(&row.layer)
        .execute(&mut *tx)
        .await?;
        insert_audit(&mut tx, event, row.created_at).await?;
        tx.commit().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::store::testing::store_tests!(env_versions_follow_one_another_per_app);

    fn version(app: &str, version: u64, sealed: &[u8]) -> EnvVersionRow {
        EnvVersionRow {
            app: app.into(),
            layer: String::new(),
            version,
            actor: "ci".into(),
            created_at: 10 + version as i64,
            change: "set".into(),
            set_keys: vec!["A".into()],
            unset_keys: vec![],
            rollback_to: None,
            var_count: 1,
            sealed: sealed.to_vec(),
        }
    }

    async fn env_versions_follow_one_another_per_app(store: Store) {
        let event = AuditEvent::success("ENV_CHANGED", "ci", "app", "web", serde_json::json!({}));
        assert_eq!(store.env_data_key().await.unwrap(), None);
        assert_eq!(
            store.init_env_data_key(&[1, 2, 0, 255], 1).await.unwrap(),
            [1, 2, 0, 255]
        );
        // The first key stays.
        assert_eq!(
            store.init_env_data_key(&[9], 2).await.unwrap(),
            [1, 2, 0, 255]
        );
        assert!(!store.has_env_versions().await.unwrap());

        store
            .insert_env_version(&version("web", 1, b"one"), &event)
            .await
            .unwrap();
        store
            .insert_env_version(&version("web", 2, &[0, 1, 2]), &event)
            .await
            .unwrap();
        store
            .insert_env_version(&version("api", 1, b"x"), &event)
            .await
            .unwrap();
        let taken = store
            .insert_env_version(&version("web", 2, b"again"), &event)
            .await;
        assert!(
            matches!(taken, Err(StoreError::EnvConflict { version: 2, .. })),
            "{taken:?}"
        );

        assert!(store.has_env_versions().await.unwrap());
        assert!(!store.drop_unused_env_data_key().await.unwrap());
        assert_eq!(store.env_apps().await.unwrap(), ["api", "web"]);
        let latest = store.env_latest("web").await.unwrap().unwrap();
        assert_eq!(
            (latest.version, latest.sealed.as_slice()),
            (2, &[0u8, 1, 2][..])
        );
        assert_eq!(latest.set_keys, ["A"]);
        let history = store.env_history("web").await.unwrap();
        assert_eq!(
            history.iter().map(|v| v.version).collect::<Vec<_>>(),
            [1, 2]
        );
    }
}
