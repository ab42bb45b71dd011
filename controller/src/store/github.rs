//! GitHub: webhook deliveries seen (`github_deliveries`, bounded) and the
//! GitHub Deployment of each rollout of a linked app (`github_deployments`).

use sqlx::Row as _;

use super::{Store, StoreError};

/// A GitHub Deployment as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GithubDeploymentRow {
    /// The Slipway deployment.
    pub deployment_id: String,
    pub app: String,
    /// GitHub's id.
    pub github_id: i64,
    pub sha: String,
    pub state: String,
}

impl Store {
    /// Records delivery `id`; false if it was already recorded (a replay).
    /// Keeps the newest `keep` deliveries.
    pub async fn remember_delivery(
        &self,
        id: &str,
        event: &str,
        now: i64,
        keep: u32,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let new = sqlx::query(
            "INSERT INTO github_deliveries (id, event, received_at) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(event)
        .bind(now)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if new {
            sqlx::query(
                "DELETE FROM github_deliveries WHERE id NOT IN (
                     SELECT id FROM github_deliveries
                     ORDER BY received_at DESC, rowid DESC LIMIT $1)",
            )
            .bind(i64::from(keep))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(new)
    }

    /// How many deliveries are remembered.
    pub async fn delivery_count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query("SELECT COUNT(*) AS n FROM github_deliveries")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?)
    }

    /// Records the GitHub Deployment made for `deployment_id`.
    #[allow(clippy::too_many_arguments)]
    pub async fn record_github_deployment(
        &self,
        deployment_id: &str,
        app: &str,
        repo: &str,
        environment: &str,
        github_id: i64,
        sha: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO github_deployments
             (deployment_id, app, repo, environment, github_id, sha, state, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, 'created', $7, $7)
             ON CONFLICT (deployment_id) DO UPDATE SET
                 app = excluded.app, repo = excluded.repo, environment = excluded.environment,
                 github_id = excluded.github_id, sha = excluded.sha, state = excluded.state,
                 created_at = excluded.created_at, updated_at = excluded.updated_at",
        )
        .bind(deployment_id)
        .bind(app)
        .bind(repo)
        .bind(environment)
        .bind(github_id)
        .bind(sha)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The last state GitHub took for `deployment_id`'s deployment.
    pub async fn set_github_deployment_state(
        &self,
        deployment_id: &str,
        state: &str,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE github_deployments SET state = $2, updated_at = $3 WHERE deployment_id = $1",
        )
        .bind(deployment_id)
        .bind(state)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The GitHub Deployments of `repo`'s `environment` in state `success`
    /// other than `except`'s: the ones a new successful rollout replaces.
    pub async fn active_github_deployments(
        &self,
        repo: &str,
        environment: &str,
        except: &str,
    ) -> Result<Vec<GithubDeploymentRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT deployment_id, app, github_id, sha, state FROM github_deployments
             WHERE repo = $1 AND environment = $2 AND state = 'success' AND deployment_id != $3
             ORDER BY updated_at",
        )
        .bind(repo)
        .bind(environment)
        .bind(except)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(GithubDeploymentRow {
                    deployment_id: row.try_get("deployment_id")?,
                    app: row.try_get("app")?,
                    github_id: row.try_get("github_id")?,
                    sha: row.try_get("sha")?,
                    state: row.try_get("state")?,
                })
            })
            .collect()
    }
}

impl Store {
    /// The GitHub Deployment of Slipway deployment `deployment_id`, if one
    /// was made.
    pub async fn github_deployment(
        &self,
        deployment_id: &str,
    ) -> Result<Option<GithubDeploymentRow>, StoreError> {
        let row = sqlx::query(
            "SELECT deployment_id, app, github_id, sha, state FROM github_deployments
             WHERE deployment_id = $1",
        )
        .bind(deployment_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(GithubDeploymentRow {
                deployment_id: row.try_get("deployment_id")?,
                app: row.try_get("app")?,
                github_id: row.try_get("github_id")?,
                sha: row.try_get("sha")?,
                state: row.try_get("state")?,
            })
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::store::testing::store_tests!(
        replays_are_recognised_and_the_memory_is_bounded,
        the_replaced_deployment_is_found
    );

    async fn replays_are_recognised_and_the_memory_is_bounded(store: Store) {
        assert!(store.remember_delivery("a", "push", 1, 3).await.unwrap());
        assert!(!store.remember_delivery("a", "push", 2, 3).await.unwrap());
        for (i, id) in ["b", "c", "d"].iter().enumerate() {
            assert!(store
                .remember_delivery(id, "push", 10 + i as i64, 3)
                .await
                .unwrap());
        }
        assert_eq!(store.delivery_count().await.unwrap(), 3);
        // "a", the oldest, was forgotten.
        assert!(store.remember_delivery("a", "push", 20, 3).await.unwrap());
        assert!(!store.remember_delivery("d", "push", 21, 3).await.unwrap());
    }

    async fn the_replaced_deployment_is_found(store: Store) {
        store
            .record_github_deployment("d-1", "web", "acme/web", "production", 11, "s1", 1)
            .await
            .unwrap();
        store
            .set_github_deployment_state("d-1", "success", 2)
            .await
            .unwrap();
        store
            .record_github_deployment("d-2", "web", "acme/web", "production", 12, "s2", 3)
            .await
            .unwrap();
        let active = store
            .active_github_deployments("acme/web", "production", "d-2")
            .await
            .unwrap();
        assert_eq!(active.len(), 1);
        assert_eq!(active[0].github_id, 11);
        assert!(store
            .active_github_deployments("acme/web", "staging", "d-2")
            .await
            .unwrap()
            .is_empty());
    }
}
