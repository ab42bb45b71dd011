//! The controller's start record (`controller_state`).

use sqlx::Row as _;

use super::{Store, StoreError};

/// What `serve` recorded at its last start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControllerStart {
    /// Seconds since the epoch.
    pub started_at: i64,
    /// Missed heartbeat intervals before a node is unreachable.
    pub unreachable_after: u32,
}

impl Store {
    /// Records that `serve` started now, with its liveness setting.
    pub async fn record_controller_start(
        &self,
        started_at: i64,
        unreachable_after: u32,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO controller_state (id, started_at, unreachable_after_intervals)
             VALUES (1, $1, $2)
             ON CONFLICT (id) DO UPDATE SET started_at = $1, unreachable_after_intervals = $2",
        )
        .bind(started_at)
        .bind(i64::from(unreachable_after))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// When `serve` last started and its unreachable-after setting, if it
    /// ever ran on this data dir.
    pub async fn controller_start(&self) -> Result<Option<ControllerStart>, StoreError> {
        let row = sqlx::query(
            "SELECT started_at, unreachable_after_intervals FROM controller_state WHERE id = 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            let after: i64 = row.try_get("unreachable_after_intervals")?;
            Ok(ControllerStart {
                started_at: row.try_get("started_at")?,
                unreachable_after: u32::try_from(after).unwrap_or(u32::MAX),
            })
        })
        .transpose()
    }
}
