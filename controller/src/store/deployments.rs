//! Deployments and their per-node results (`deployments`, `deployment_nodes`).

use sqlx::Row as _;

use super::{insert_audit, Store, StoreError};
use crate::audit::AuditEvent;

/// A deployment to record, with the nodes it targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeployment<'a> {
    /// `d-…`.
    pub id: &'a str,
    /// "deploy", "rollback", "restart" or "prune".
    pub kind: &'a str,
    /// The app.
    pub app: &'a str,
    /// Release deployed or rolled back to.
    pub release_id: &'a str,
    /// Artifact digest ("" for a rollback).
    pub artifact_sha256: &'a str,
    /// API token or operator id.
    pub actor: &'a str,
    /// Selector as JSON.
    pub selector: &'a serde_json::Value,
    /// Rollout (strategy and its settings) as JSON.
    pub rollout: &'a serde_json::Value,
    /// DigitalOcean snapshots taken before it (JSON array).
    pub snapshots: &'a [serde_json::Value],
    /// Now.
    pub started_at: i64,
    /// Every target, in rollout order.
    pub nodes: &'a [NewDeploymentNode<'a>],
    /// The env version it goes live with (deploys and env deliveries).
    pub env_version: Option<u64>,
    /// Its whole plan, for another replica to carry it on
    /// ([`crate::rollout::Plan::to_record`]); None: it cannot be.
    pub plan: Option<&'a serde_json::Value>,
}

/// One target of a deployment to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDeploymentNode<'a> {
    /// The node.
    pub node_id: &'a str,
    /// The command sent to it (unique).
    pub command_id: &'a str,
    /// 1-based batch of the rollout it is in.
    pub batch: u32,
    /// Release current on it before ('' unknown): where the controller
    /// sends it back if the rollout stops.
    pub prior_release: &'a str,
}

/// A recorded deployment (deploy, rollback, restart or prune) with its
/// per-node results, for `slipway status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentRecord {
    /// `d-…`.
    pub id: String,
    /// "deploy", "rollback", "restart" or "prune".
    pub kind: String,
    /// The app.
    pub app: String,
    /// Release deployed or rolled back to ("" when none was named).
    pub release_id: String,
    /// API token or operator id that asked for it.
    pub actor: String,
    /// "running", "succeeded" or "failed".
    pub status: String,
    /// Seconds since the epoch.
    pub started_at: i64,
    /// When the last node answered.
    pub finished_at: Option<i64>,
    /// The one-line summary ("2 of 3 nodes failed: …").
    pub message: String,
    /// One entry per target node, by node name.
    pub nodes: Vec<DeploymentNodeRecord>,
    /// DigitalOcean snapshots taken before it (`snapshot_before_deploy`):
    /// node, droplet and action ids.
    pub snapshots: Vec<serde_json::Value>,
}

/// How one node of a recorded deployment ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentNodeRecord {
    /// Node id.
    pub node_id: String,
    /// Node name ("" if the node is gone from the database).
    pub node_name: String,
    /// "pending", "succeeded", "failed", "rolled_back" or "skipped".
    pub outcome: String,
    /// Release current on the node afterwards, if it said.
    pub release_id: String,
    /// Why, especially on failure.
    pub message: String,
    /// When the node's result was recorded.
    pub finished_at: Option<i64>,
    /// The steps it reported, in order (recorded with its result).
    pub steps: Vec<DeploymentStep>,
}

/// One step a node reported during a deployment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeploymentStep {
    /// Step name (fetch, verify, unpack, activate, health, rollback, ...).
    pub step: String,
    /// What it said.
    pub message: String,
    /// When (seconds since the epoch).
    pub unix_time: i64,
}

/// A running deployment whose replica is dead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrphanedDeployment {
    /// `d-…`.
    pub id: String,
    /// The dead replica that ran it (None: started before replicas were
    /// recorded).
    pub owner: Option<String>,
    /// Its plan as recorded (None: recorded by an older controller).
    pub plan: Option<String>,
}

/// One target's row of a running deployment, as recorded, to carry the
/// deployment on from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedNode {
    /// The node.
    pub node_id: String,
    /// The command sent (or to send) to it.
    pub command_id: String,
    /// 1-based batch.
    pub batch: u32,
    /// Release current on it before ('' unknown).
    pub prior_release: String,
    /// "pending", "succeeded", "failed", "rolled_back" or "skipped".
    pub outcome: String,
    /// Release it reported.
    pub release_id: String,
    /// Why.
    pub message: String,
}

/// What a follower of a deployment needs beside its [`DeploymentRecord`]
/// to rebuild the events its replica sent
/// ([`crate::api::watch`]): the rollout, the env version, why the
/// rollout stopped, and the targets in rollout order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentShape {
    /// The rollout as recorded (`{"strategy": "rolling", "max_parallel": …}`).
    pub rollout: serde_json::Value,
    /// The env version it goes live with (deploys and env deliveries).
    pub env_version: Option<u64>,
    /// Why the rollout stopped early ('' if it did not, or still runs).
    pub stop_reason: String,
    /// The target node ids in rollout order (as recorded).
    pub order: Vec<String>,
}

/// How many deployments of one app, kind and status are recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeploymentCount {
    /// The app.
    pub app: String,
    /// "deploy", "rollback", "restart", "prune", ...
    pub kind: String,
    /// "running", "succeeded" or "failed".
    pub status: String,
    /// How many.
    pub count: u64,
}

impl Store {
    /// The env version each release of `app` went live with: the newest
    /// successful-or-not deploy of each release id that recorded one.
    pub async fn release_env_versions(
        &self,
        app: &str,
    ) -> Result<std::collections::HashMap<String, u64>, StoreError> {
        let rows = sqlx::query(
            "SELECT release_id, env_version FROM deployments
             WHERE app = $1 AND kind = 'deploy' AND env_version IS NOT NULL
             ORDER BY started_at",
        )
        .bind(app)
        .fetch_all(&self.pool)
        .await?;
        let mut out = std::collections::HashMap::new();
        for row in rows {
            let id: String = row.try_get("release_id")?;
            let v: i64 = row.try_get("env_version")?;
            if let Ok(v) = u64::try_from(v) {
                out.insert(id, v);
            }
        }
        Ok(out)
    }

    /// Records a deployment (status running), its pending per-node rows and
    /// the start audit event, together; refused with
    /// [`StoreError::AppBusy`] while another deployment of the app runs
    /// (checked in the same write transaction, so two requests racing
    /// cannot both start).
    pub async fn insert_deployment(
        &self,
        deployment: &NewDeployment<'_>,
        started: &AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        let running = sqlx::query(
            "SELECT id, kind, actor, started_at FROM deployments
             WHERE app = $1 AND status = 'running' ORDER BY started_at LIMIT 1",
        )
        .bind(deployment.app)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = running {
            let started_at: i64 = row.try_get("started_at")?;
            let started = crate::rfc3339(started_at);
            return Err(StoreError::AppBusy {
                app: deployment.app.to_owned(),
                deployment_id: row.try_get("id")?,
                kind: row.try_get("kind")?,
                actor: row.try_get("actor")?,
                started,
            });
        }
        sqlx::query(
            "INSERT INTO deployments (id, kind, app, release_id, artifact_sha256, actor,
                                      selector, rollout, status, started_at, env_version,
                                      snapshots, owner_replica, plan)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'running', $9, $10, $11, $12, $13)",
        )
        .bind(deployment.id)
        .bind(deployment.kind)
        .bind(deployment.app)
        .bind(deployment.release_id)
        .bind(deployment.artifact_sha256)
        .bind(deployment.actor)
        .bind(deployment.selector.to_string())
        .bind(deployment.rollout.to_string())
        .bind(deployment.started_at)
        .bind(deployment.env_version.and_then(|v| i64::try_from(v).ok()))
        .bind(serde_json::Value::from(deployment.snapshots.to_vec()).to_string())
        .bind(self.replica.as_deref())
        .bind(deployment.plan.map(serde_json::Value::to_string))
        .execute(&mut *tx)
        .await?;
        for node in deployment.nodes {
            sqlx::query(
                "INSERT INTO deployment_nodes (deployment_id, node_id, command_id, outcome,
                                               batch, prior_release)
                 VALUES ($1, $2, $3, 'pending', $4, $5)",
            )
            .bind(deployment.id)
            .bind(node.node_id)
            .bind(node.command_id)
            .bind(i64::from(node.batch))
            .bind(node.prior_release)
            .execute(&mut *tx)
            .await?;
        }
        insert_audit(&mut tx, started, deployment.started_at).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The release each node last switched `app` to through this
    /// controller (a succeeded deploy or rollback), with when: node id →
    /// (release id, finished at).
    pub async fn last_switched_releases(
        &self,
        app: &str,
    ) -> Result<std::collections::HashMap<String, (String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT n.node_id, n.release_id, n.finished_at
             FROM deployment_nodes n JOIN deployments d ON d.id = n.deployment_id
             WHERE d.app = $1 AND n.outcome = 'succeeded' AND n.release_id != ''
                   AND n.finished_at IS NOT NULL
             ORDER BY n.finished_at, n.rowid",
        )
        .bind(app)
        .fetch_all(&self.pool)
        .await?;
        let mut out = std::collections::HashMap::new();
        for row in rows {
            // Later rows replace earlier ones: the newest wins.
            out.insert(
                row.try_get("node_id")?,
                (row.try_get("release_id")?, row.try_get("finished_at")?),
            );
        }
        Ok(out)
    }

    /// The app's current release as this controller knows it: the release
    /// id and artifact digest of its last succeeded deploy (not a rollback
    /// to an older release after it: see [`Self::last_deployments`]).
    pub async fn current_release(&self, app: &str) -> Result<Option<(String, String)>, StoreError> {
        let row = sqlx::query(
            "SELECT release_id, artifact_sha256 FROM deployments
             WHERE app = $1 AND kind = 'deploy' AND status = 'succeeded'
                   AND artifact_sha256 != ''
             ORDER BY started_at DESC, rowid DESC LIMIT 1",
        )
        .bind(app)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .transpose()
    }

    /// Marks every deployment still `running` failed ("controller
    /// restarted"), with its unanswered nodes, and records its final audit
    /// event — except those owned by a replica in `live` (their replica
    /// still drives them) and those with a recorded plan (another replica
    /// takes them over: [`Self::take_over_deployment`]). Run at start-up
    /// and periodically, so a deployment cut short by its controller's end
    /// never blocks its app. Returns the ids.
    pub async fn abandon_running_deployments(
        &self,
        now: i64,
        live: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let mut tx = self.begin().await?;
        let rows = sqlx::query(
            "SELECT id, owner_replica FROM deployments
             WHERE status = 'running' AND plan IS NULL ORDER BY started_at, rowid",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut ids = Vec::new();
        for row in rows {
            let owner: Option<String> = row.try_get("owner_replica")?;
            if owner.as_ref().is_some_and(|o| live.contains(o)) {
                continue;
            }
            // Without an owner: started before replicas were recorded.
            let why = match &owner {
                Some(owner) => format!(
                    "controller restarted before the deployment finished (replica {owner} \
                     that ran it is gone; the deployment was recorded without its plan, by an \
                     older controller, so no replica can carry it on)"
                ),
                None => "controller restarted before the deployment finished".to_owned(),
            };
            let id: String = row.try_get("id")?;
            fail_running_in(&mut tx, &id, &why, now).await?;
            ids.push(id);
        }
        tx.commit().await?;
        Ok(ids)
    }

    /// The running deployments whose owner is not in `live` (their replica
    /// is dead), oldest first, with their recorded plans.
    pub async fn orphaned_deployments(
        &self,
        live: &[String],
    ) -> Result<Vec<OrphanedDeployment>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, owner_replica, plan FROM deployments
             WHERE status = 'running' ORDER BY started_at, rowid",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for row in rows {
            let owner: Option<String> = row.try_get("owner_replica")?;
            if owner.as_ref().is_some_and(|o| live.contains(o)) {
                continue;
            }
            out.push(OrphanedDeployment {
                id: row.try_get("id")?,
                owner,
                plan: row.try_get("plan")?,
            });
        }
        Ok(out)
    }

    /// Takes deployment `id` over from its dead owner `dead` for this
    /// handle's replica: a conditional update, so among replicas racing
    /// for it exactly one wins; the winner records `taken_over` in the
    /// audit log in the same transaction and gets the per-node rows (in
    /// rollout order) to carry it on from. None: another replica won, or
    /// the deployment ended or changed owner meanwhile.
    pub async fn take_over_deployment(
        &self,
        id: &str,
        dead: Option<&str>,
        taken_over: &AuditEvent,
        now: i64,
    ) -> Result<Option<Vec<RecordedNode>>, StoreError> {
        let me = self.replica.as_deref().ok_or(StoreError::NoReplica)?;
        let mut tx = self.begin().await?;
        let claimed = match dead {
            Some(dead) => {
                sqlx::query(
                    "UPDATE deployments SET owner_replica = $1
                     WHERE id = $2 AND status = 'running' AND owner_replica = $3",
                )
                .bind(me)
                .bind(id)
                .bind(dead)
                .execute(&mut *tx)
                .await?
            }
            None => {
                sqlx::query(
                    "UPDATE deployments SET owner_replica = $1
                     WHERE id = $2 AND status = 'running' AND owner_replica IS NULL",
                )
                .bind(me)
                .bind(id)
                .execute(&mut *tx)
                .await?
            }
        };
        if claimed.rows_affected() == 0 {
            return Ok(None);
        }
        let rows = sqlx::query(
            "SELECT node_id, command_id, batch, prior_release, outcome, release_id, message
             FROM deployment_nodes WHERE deployment_id = $1 ORDER BY rowid",
        )
        .bind(id)
        .fetch_all(&mut *tx)
        .await?;
        let nodes = rows
            .iter()
            .map(|row| {
                let batch: i64 = row.try_get("batch")?;
                Ok(RecordedNode {
                    node_id: row.try_get("node_id")?,
                    command_id: row.try_get("command_id")?,
                    batch: u32::try_from(batch).unwrap_or(u32::MAX),
                    prior_release: row.try_get("prior_release")?,
                    outcome: row.try_get("outcome")?,
                    release_id: row.try_get("release_id")?,
                    message: row.try_get("message")?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        insert_audit(&mut tx, taken_over, now).await?;
        tx.commit().await?;
        Ok(Some(nodes))
    }

    /// Fails running deployment `id` owned by `owner` (a dead replica, or
    /// this one after taking it over) because it cannot be carried on
    /// (`why`), with its final audit event; false if it is not running
    /// under that owner any more (another replica got to it).
    pub async fn fail_orphaned_deployment(
        &self,
        id: &str,
        owner: Option<&str>,
        why: &str,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let current: Option<Option<String>> = sqlx::query_scalar(
            "SELECT owner_replica FROM deployments WHERE id = $1 AND status = 'running'",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if current.as_ref().is_none_or(|o| o.as_deref() != owner) {
            return Ok(false);
        }
        let done = fail_running_in(&mut tx, id, why, now).await?;
        tx.commit().await?;
        Ok(done)
    }

    /// Records how one node of a deployment ended, with the steps it
    /// reported on the way. A handle of a replica writes only while its
    /// replica owns the running deployment: false (nothing written) once
    /// another replica took it over (fencing a replica that was only slow).
    pub async fn record_node_result(
        &self,
        command_id: &str,
        outcome: &str,
        release_id: &str,
        message: &str,
        steps: &[DeploymentStep],
        now: i64,
    ) -> Result<bool, StoreError> {
        let steps = serde_json::to_string(steps).map_err(|source| StoreError::Json {
            column: "deployment_nodes.steps",
            source,
        })?;
        let done = sqlx::query(
            "UPDATE deployment_nodes SET outcome = $1, release_id = $2, message = $3,
                    finished_at = $4, steps = $5
             WHERE command_id = $6
               AND EXISTS (SELECT 1 FROM deployments d
                           WHERE d.id = deployment_nodes.deployment_id AND d.status = 'running'
                             AND ($7 IS NULL OR d.owner_replica = $7))",
        )
        .bind(outcome)
        .bind(release_id)
        .bind(message)
        .bind(now)
        .bind(steps)
        .bind(command_id)
        .bind(self.replica.as_deref())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Marks a deployment finished and records the final audit event, together.
    /// `stop_reason` says why a rollout stopped early ('' if it did not).
    /// Only a running deployment owned by this handle's replica (any, for
    /// a handle of none): false (nothing written) if it was marked failed
    /// or taken over meanwhile (its replica taken for dead by another), so
    /// the audit log never tells two ends of one deployment.
    pub async fn finish_deployment(
        &self,
        id: &str,
        status: &str,
        message: &str,
        stop_reason: &str,
        finished: &AuditEvent,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE deployments SET status = $1, message = $2, stop_reason = $5, finished_at = $3
             WHERE id = $4 AND status = 'running' AND ($6 IS NULL OR owner_replica = $6)",
        )
        .bind(status)
        .bind(message)
        .bind(now)
        .bind(id)
        .bind(stop_reason)
        .bind(self.replica.as_deref())
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Ok(false);
        }
        insert_audit(&mut tx, finished, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Per-node rows of a deployment: (node id, outcome, message), by node.
    pub async fn deployment_nodes(
        &self,
        deployment_id: &str,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT node_id, outcome, message FROM deployment_nodes
             WHERE deployment_id = $1 ORDER BY node_id",
        )
        .bind(deployment_id)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok((
                    row.try_get("node_id")?,
                    row.try_get("outcome")?,
                    row.try_get("message")?,
                ))
            })
            .collect()
    }

    /// How many deployments are recorded, by app, kind and status
    /// ("running", "succeeded", "failed"), for /metrics.
    pub async fn deployment_counts(&self) -> Result<Vec<DeploymentCount>, StoreError> {
        let rows = sqlx::query(
            "SELECT app, kind, status, COUNT(*) AS n FROM deployments
             GROUP BY app, kind, status ORDER BY app, kind, status",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|row| {
                let n: i64 = row.try_get("n")?;
                Ok(DeploymentCount {
                    app: row.try_get("app")?,
                    kind: row.try_get("kind")?,
                    status: row.try_get("status")?,
                    count: u64::try_from(n).unwrap_or(0),
                })
            })
            .collect()
    }

    /// The latest deployment of each app (of `app` only, if given), by app
    /// name, with its per-node results.
    pub async fn last_deployments(
        &self,
        app: Option<&str>,
    ) -> Result<Vec<DeploymentRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT d.id, d.kind, d.app, d.release_id, d.actor, d.status, d.started_at,
                    d.finished_at, d.message, d.snapshots
             FROM deployments d
             WHERE d.rowid = (SELECT d2.rowid FROM deployments d2 WHERE d2.app = d.app
                              ORDER BY d2.started_at DESC, d2.rowid DESC LIMIT 1)
               AND ($1 IS NULL OR d.app = $1)
             ORDER BY d.app",
        )
        .bind(app)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.try_get("id")?;
            let nodes = self.deployment_node_records(&id).await?;
            out.push(deployment_record(&row, id, nodes)?);
        }
        Ok(out)
    }

    /// The per-node rows of a deployment, by node name.
    async fn deployment_node_records(
        &self,
        id: &str,
    ) -> Result<Vec<DeploymentNodeRecord>, StoreError> {
        sqlx::query(
            "SELECT dn.node_id, COALESCE(n.name, '') AS node_name, dn.outcome,
                        dn.release_id, dn.message, dn.finished_at, dn.steps
                 FROM deployment_nodes dn LEFT JOIN nodes n ON n.id = dn.node_id
                 WHERE dn.deployment_id = $1 ORDER BY node_name, dn.node_id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|n| {
            Ok(DeploymentNodeRecord {
                node_id: n.try_get("node_id")?,
                node_name: n.try_get("node_name")?,
                outcome: n.try_get("outcome")?,
                release_id: n.try_get("release_id")?,
                message: n.try_get("message")?,
                finished_at: n.try_get("finished_at")?,
                steps: serde_json::from_str(n.try_get::<&str, _>("steps")?).map_err(|source| {
                    StoreError::Json {
                        column: "deployment_nodes.steps",
                        source,
                    }
                })?,
            })
        })
        .collect()
    }

    /// Deployments, newest first, of `app` only if given, started before
    /// `before` (seconds; paging), at most `limit`; without their nodes.
    pub async fn deployments(
        &self,
        app: Option<&str>,
        before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<DeploymentRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, kind, app, release_id, actor, status, started_at, finished_at, message,
                    snapshots
             FROM deployments
             WHERE ($1 IS NULL OR app = $1) AND ($2 IS NULL OR started_at < $2)
             ORDER BY started_at DESC, rowid DESC LIMIT $3",
        )
        .bind(app)
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| deployment_record(row, row.try_get("id")?, Vec::new()))
            .collect()
    }

    /// The rollout, env version, stop reason and target order of
    /// deployment `id`; None if there is no such deployment.
    pub async fn deployment_shape(&self, id: &str) -> Result<Option<DeploymentShape>, StoreError> {
        let Some(row) =
            sqlx::query("SELECT rollout, env_version, stop_reason FROM deployments WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?
        else {
            return Ok(None);
        };
        let rollout =
            serde_json::from_str(row.try_get::<&str, _>("rollout")?).map_err(|source| {
                StoreError::Json {
                    column: "deployments.rollout",
                    source,
                }
            })?;
        let env_version: Option<i64> = row.try_get("env_version")?;
        let order: Vec<String> = sqlx::query_scalar(
            "SELECT node_id FROM deployment_nodes WHERE deployment_id = $1 ORDER BY rowid",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        Ok(Some(DeploymentShape {
            rollout,
            env_version: env_version.and_then(|v| u64::try_from(v).ok()),
            stop_reason: row.try_get("stop_reason")?,
            order,
        }))
    }

    /// One deployment with its per-node results.
    pub async fn deployment(&self, id: &str) -> Result<Option<DeploymentRecord>, StoreError> {
        let row = sqlx::query(
            "SELECT id, kind, app, release_id, actor, status, started_at, finished_at, message,
                    snapshots
             FROM deployments WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let nodes = self.deployment_node_records(id).await?;
        Ok(Some(deployment_record(&row, id.to_owned(), nodes)?))
    }
}

/// Marks running deployment `id` failed (`why`) with its unanswered nodes
/// and records its final audit event, in `tx`; false if it was not running.
async fn fail_running_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: &str,
    why: &str,
    now: i64,
) -> Result<bool, StoreError> {
    let Some(row) = sqlx::query(
        "SELECT kind, app, release_id, actor FROM deployments
         WHERE id = $1 AND status = 'running'",
    )
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?
    else {
        return Ok(false);
    };
    let kind: String = row.try_get("kind")?;
    let app: String = row.try_get("app")?;
    let release_id: String = row.try_get("release_id")?;
    let actor: String = row.try_get("actor")?;
    let unanswered: Vec<String> = sqlx::query_scalar(
        "SELECT node_id FROM deployment_nodes
         WHERE deployment_id = $1 AND outcome = 'pending' ORDER BY rowid",
    )
    .bind(id)
    .fetch_all(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE deployment_nodes SET outcome = 'failed', message = $1, finished_at = $2
         WHERE deployment_id = $3 AND outcome = 'pending'",
    )
    .bind("controller restarted before the node's result")
    .bind(now)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "UPDATE deployments SET status = 'failed', message = $1, stop_reason = $1,
                finished_at = $2
         WHERE id = $3",
    )
    .bind(why)
    .bind(now)
    .bind(id)
    .execute(&mut **tx)
    .await?;
    let event_type = match kind.as_str() {
        "rollback" => crate::audit::ROLLBACK_FAILED,
        "restart" => crate::audit::RESTART_FAILED,
        "stop" => crate::audit::STOP_FAILED,
        "start" => crate::audit::START_FAILED,
        "prune" => crate::audit::PRUNE_FAILED,
        "agent-upgrade" => crate::audit::AGENT_UPGRADE_FAILED,
        "env" => crate::audit::ENV_DELIVERY_FAILED,
        _ => crate::audit::DEPLOY_FAILED,
    };
    let event = AuditEvent::error(
        event_type,
        &actor,
        "deployment",
        id,
        serde_json::json!({
            "deployment_id": id,
            "app": app,
            "release_id": release_id,
            "stop_reason": why,
            "unanswered_nodes": unanswered,
        }),
        why,
    );
    insert_audit(tx, &event, now).await?;
    Ok(true)
}

/// A `deployments` row (id, kind, app, release_id, actor, status,
/// started_at, finished_at, message) with its nodes.
fn deployment_record(
    row: &sqlx::any::AnyRow,
    id: String,
    nodes: Vec<DeploymentNodeRecord>,
) -> Result<DeploymentRecord, StoreError> {
    Ok(DeploymentRecord {
        id,
        kind: row.try_get("kind")?,
        app: row.try_get("app")?,
        release_id: row.try_get("release_id")?,
        actor: row.try_get("actor")?,
        status: row.try_get("status")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        message: row.try_get("message")?,
        nodes,
        snapshots: serde_json::from_str(row.try_get::<&str, _>("snapshots")?).map_err(
            |source| StoreError::Json {
                column: "deployments.snapshots",
                source,
            },
        )?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{self, AuditEvent};
    use crate::store::nodes::insert_node;
    use crate::store::{NewNode, Store};

    crate::store::testing::store_tests!(
        one_running_deployment_per_app_until_a_restart_abandons_it,
        last_deployments_are_the_newest_per_app_with_node_results,
        a_dead_replicas_deployment_is_taken_over_by_one_replica_and_its_old_owner_fenced,
        one_deployment_per_app_holds_across_replicas_racing,
        a_deployments_shape_is_its_rollout_env_version_stop_reason_and_target_order
    );

    async fn a_deployments_shape_is_its_rollout_env_version_stop_reason_and_target_order(
        store: Store,
    ) {
        let rollout = serde_json::json!({"strategy": "rolling", "max_parallel": 1});
        // Targets in rollout order, not id order.
        let nodes = [
            NewDeploymentNode {
                node_id: "n-2",
                command_id: "d-1.n-2",
                batch: 1,
                prior_release: "",
            },
            NewDeploymentNode {
                node_id: "n-1",
                command_id: "d-1.n-1",
                batch: 2,
                prior_release: "",
            },
        ];
        let mut deployment = new_deployment("d-1", "web", &nodes, &rollout);
        deployment.env_version = Some(4);
        let started = AuditEvent::success(
            audit::DEPLOY_STARTED,
            "tok-1",
            "deployment",
            "d-1",
            serde_json::json!({}),
        );
        store
            .insert_deployment(&deployment, &started)
            .await
            .unwrap();
        let shape = store.deployment_shape("d-1").await.unwrap().unwrap();
        assert_eq!(shape.rollout, rollout);
        assert_eq!(shape.env_version, Some(4));
        assert_eq!(shape.stop_reason, "");
        assert_eq!(shape.order, ["n-2", "n-1"]);
        let end = AuditEvent::error(
            audit::DEPLOY_FAILED,
            "tok-1",
            "deployment",
            "d-1",
            serde_json::json!({}),
            "stopped",
        );
        let stop = crate::rollout::stop_reason("web-2");
        assert!(store
            .finish_deployment("d-1", "failed", "stopped", &stop, &end, 2_000)
            .await
            .unwrap());
        let shape = store.deployment_shape("d-1").await.unwrap().unwrap();
        assert_eq!(shape.stop_reason, "deployment stopped after web-2 failed");
        assert_eq!(store.deployment_shape("d-2").await.unwrap(), None);
    }

    fn new_deployment<'a>(
        id: &'a str,
        app: &'a str,
        nodes: &'a [NewDeploymentNode<'a>],
        json: &'a serde_json::Value,
    ) -> NewDeployment<'a> {
        NewDeployment {
            id,
            kind: "deploy",
            app,
            release_id: "v1",
            artifact_sha256: "",
            actor: "tok-1",
            selector: json,
            rollout: json,
            snapshots: &[],
            started_at: 1_000,
            nodes,
            env_version: None,
            plan: None,
        }
    }

    async fn one_running_deployment_per_app_until_a_restart_abandons_it(store: Store) {
        let json = serde_json::json!({});
        let nodes = [NewDeploymentNode {
            node_id: "n-1",
            command_id: "d-1.n-1",
            batch: 1,
            prior_release: "v0",
        }];
        let started = AuditEvent::success(
            audit::DEPLOY_STARTED,
            "tok-1",
            "deployment",
            "d-1",
            json.clone(),
        );
        store
            .insert_deployment(&new_deployment("d-1", "web", &nodes, &json), &started)
            .await
            .unwrap();
        // Another app is not blocked.
        store
            .insert_deployment(&new_deployment("d-2", "api", &[], &json), &started)
            .await
            .unwrap();
        let err = store
            .insert_deployment(&new_deployment("d-3", "web", &[], &json), &started)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::AppBusy { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "app web has a deploy running: deployment d-1, started by tok-1 at \
             1970-01-01T00:16:40Z; wait for it to finish (slipway audit shows it)"
        );

        let abandoned = store.abandon_running_deployments(2_000, &[]).await.unwrap();
        assert_eq!(abandoned, vec!["d-1".to_owned(), "d-2".to_owned()]);
        let (status, stop_reason): (String, String) =
            sqlx::query_as("SELECT status, stop_reason FROM deployments WHERE id = 'd-1'")
                .fetch_one(&store.pool)
                .await
                .unwrap();
        assert_eq!(status, "failed");
        assert!(
            stop_reason.contains("controller restarted"),
            "{stop_reason}"
        );
        let rows = store.deployment_nodes("d-1").await.unwrap();
        assert_eq!(rows[0].1, "failed");
        let failed = store.audit_events().await.unwrap();
        assert!(failed
            .iter()
            .any(|e| e.event_type == "DEPLOY_FAILED" && e.resource_id == "d-1"));
        store
            .insert_deployment(&new_deployment("d-4", "web", &[], &json), &started)
            .await
            .unwrap();
    }

    async fn last_deployments_are_the_newest_per_app_with_node_results(store: Store) {
        let mut conn = store.pool.acquire().await.unwrap();
        insert_node(
            &mut conn,
            &NewNode {
                id: "n-1",
                name: "web-1",
                cert_serial: "01",
                cert_fingerprint: "fp1",
                cert_ca_sha256: "ca1",
                cert_expires_at: 2000,
                labels: &serde_json::json!({}),
                agent_version: "1.0",
                enrolled_at: 1,
            },
        )
        .await
        .unwrap();
        drop(conn);
        let record = |id: &'static str, kind: &'static str, app: &'static str, at: i64| {
            let store = store.clone();
            async move {
                let commands = [format!("{id}.n-1"), format!("{id}.n-gone")];
                let nodes = [
                    NewDeploymentNode {
                        node_id: "n-1",
                        command_id: &commands[0],
                        batch: 1,
                        prior_release: "",
                    },
                    NewDeploymentNode {
                        node_id: "n-gone",
                        command_id: &commands[1],
                        batch: 1,
                        prior_release: "",
                    },
                ];
                store
                    .insert_deployment(
                        &NewDeployment {
                            id,
                            kind,
                            app,
                            release_id: "",
                            artifact_sha256: "",
                            actor: "t",
                            selector: &serde_json::json!({}),
                            rollout: &serde_json::json!({}),
                            snapshots: &[],
                            started_at: at,
                            nodes: &nodes,
                            env_version: None,
                            plan: None,
                        },
                        &AuditEvent::success(
                            audit::RESTART_STARTED,
                            "t",
                            "deployment",
                            id,
                            serde_json::json!({}),
                        ),
                    )
                    .await
                    .unwrap();
            }
        };
        let finish = |id: &'static str, at: i64| {
            let store = store.clone();
            async move {
                let ev = AuditEvent::success(
                    audit::RESTART_COMPLETED,
                    "t",
                    "deployment",
                    id,
                    serde_json::json!({}),
                );
                assert!(store
                    .finish_deployment(id, "failed", "1 of 2 nodes failed", "", &ev, at)
                    .await
                    .unwrap());
            }
        };
        // One running deployment per app: each ends before the next.
        record("d-1", "deploy", "web", 10).await;
        finish("d-1", 11).await;
        record("d-2", "prune", "web", 20).await;
        finish("d-2", 20).await;
        // Same second as d-2: the later insert wins.
        record("d-3", "restart", "web", 20).await;
        let steps = [
            DeploymentStep {
                step: "restart".to_owned(),
                message: "restarting web".to_owned(),
                unix_time: 20,
            },
            DeploymentStep {
                step: "health".to_owned(),
                message: "healthy after 1 check".to_owned(),
                unix_time: 21,
            },
        ];
        store
            .record_node_result("d-3.n-1", "succeeded", "v3", "restarted", &steps, 21)
            .await
            .unwrap();
        finish("d-3", 22).await;
        record("d-4", "deploy", "api", 5).await;

        let all = store.last_deployments(None).await.unwrap();
        let ids: Vec<(&str, &str)> = all
            .iter()
            .map(|d| (d.app.as_str(), d.id.as_str()))
            .collect();
        assert_eq!(ids, [("api", "d-4"), ("web", "d-3")]);
        let web = &all[1];
        assert_eq!(web.kind, "restart");
        assert_eq!(web.status, "failed");
        assert_eq!(web.finished_at, Some(22));
        assert_eq!(web.message, "1 of 2 nodes failed");
        // Unknown nodes sort first (no name), then by name.
        assert_eq!(web.nodes.len(), 2);
        assert_eq!(web.nodes[0].node_id, "n-gone");
        assert_eq!(web.nodes[0].node_name, "");
        assert_eq!(web.nodes[0].outcome, "pending");
        assert_eq!(web.nodes[1].node_name, "web-1");
        assert_eq!(web.nodes[1].outcome, "succeeded");
        assert_eq!(web.nodes[1].release_id, "v3");
        assert_eq!(web.nodes[1].finished_at, Some(21));
        // Its steps are kept with its result; a pending node has none.
        assert_eq!(web.nodes[1].steps, steps);
        assert!(web.nodes[0].steps.is_empty());
        let api = store.last_deployments(Some("api")).await.unwrap();
        assert_eq!(api.len(), 1);
        assert_eq!(api[0].id, "d-4");
        assert!(store.last_deployments(Some("db")).await.unwrap().is_empty());
    }

    async fn a_dead_replicas_deployment_is_taken_over_by_one_replica_and_its_old_owner_fenced(
        store: Store,
    ) {
        let json = serde_json::json!({});
        let plan = serde_json::json!({"version": 1, "app": "web"});
        let nodes = [
            NewDeploymentNode {
                node_id: "n-1",
                command_id: "d-1.n-1",
                batch: 1,
                prior_release: "v0",
            },
            NewDeploymentNode {
                node_id: "n-2",
                command_id: "d-1.n-2",
                batch: 2,
                prior_release: "",
            },
        ];
        let a = store.clone().for_replica("a");
        let started = AuditEvent::success(
            audit::DEPLOY_STARTED,
            "tok-1",
            "deployment",
            "d-1",
            json.clone(),
        );
        a.insert_deployment(
            &NewDeployment {
                plan: Some(&plan),
                ..new_deployment("d-1", "web", &nodes, &json)
            },
            &started,
        )
        .await
        .unwrap();
        assert!(a
            .record_node_result("d-1.n-1", "succeeded", "v1", "ok", &[], 1_001)
            .await
            .unwrap());
        // a is alive: nothing is orphaned.
        assert!(store
            .orphaned_deployments(&["a".to_owned()])
            .await
            .unwrap()
            .is_empty());
        // a is dead: the deployment is orphaned, with its plan; a sweep
        // does not fail it (it can be carried on).
        let live = ["b".to_owned(), "c".to_owned()];
        let orphans = store.orphaned_deployments(&live).await.unwrap();
        assert_eq!(
            orphans,
            [OrphanedDeployment {
                id: "d-1".to_owned(),
                owner: Some("a".to_owned()),
                plan: Some(plan.to_string()),
            }]
        );
        assert!(store
            .abandon_running_deployments(1_002, &live)
            .await
            .unwrap()
            .is_empty());
        // b and c race for it: exactly one wins.
        let claim = |replica: &'static str| {
            let store = store.clone().for_replica(replica);
            async move {
                let event = AuditEvent::success(
                    audit::DEPLOY_TAKEN_OVER,
                    "tok-1",
                    "deployment",
                    "d-1",
                    serde_json::json!({ "to_replica": replica }),
                );
                store
                    .take_over_deployment("d-1", Some("a"), &event, 1_003)
                    .await
                    .unwrap()
                    .map(|nodes| (replica, nodes))
            }
        };
        let (by_b, by_c) = tokio::join!(claim("b"), claim("c"));
        let (winner, rows) = match (by_b, by_c) {
            (Some(won), None) | (None, Some(won)) => won,
            other => panic!("not exactly one winner: {other:?}"),
        };
        let loser = if winner == "b" { "c" } else { "b" };
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (
                rows[0].node_id.as_str(),
                rows[0].outcome.as_str(),
                rows[0].release_id.as_str()
            ),
            ("n-1", "succeeded", "v1")
        );
        assert_eq!(
            (
                rows[1].command_id.as_str(),
                rows[1].batch,
                rows[1].outcome.as_str()
            ),
            ("d-1.n-2", 2, "pending")
        );
        assert_eq!(rows[0].prior_release, "v0");
        // Claiming again from the dead owner: nobody wins any more.
        assert!(claim(loser).await.is_none());
        // Failing it as a's (it is not a's any more) does nothing.
        assert!(!store
            .fail_orphaned_deployment("d-1", Some("a"), "no", 1_004)
            .await
            .unwrap());

        // Fencing: a (only slow, say) writes nothing any more.
        assert!(!a
            .record_node_result("d-1.n-2", "failed", "", "late", &[], 1_005)
            .await
            .unwrap());
        let ended = |by: &str| {
            AuditEvent::success(
                audit::DEPLOY_COMPLETED,
                "tok-1",
                "deployment",
                "d-1",
                serde_json::json!({ "by": by }),
            )
        };
        assert!(!a
            .finish_deployment("d-1", "failed", "late", "", &ended("a"), 1_005)
            .await
            .unwrap());
        let loser_store = store.clone().for_replica(loser);
        assert!(!loser_store
            .record_node_result("d-1.n-2", "failed", "", "loser", &[], 1_005)
            .await
            .unwrap());
        // The winner's writes go through.
        let owner = store.clone().for_replica(winner);
        assert!(owner
            .record_node_result("d-1.n-2", "succeeded", "v1", "ok", &[], 1_006)
            .await
            .unwrap());
        assert!(owner
            .finish_deployment(
                "d-1",
                "succeeded",
                "2 of 2 nodes succeeded",
                "",
                &ended(winner),
                1_007
            )
            .await
            .unwrap());
        let nodes = store.deployment_nodes("d-1").await.unwrap();
        assert_eq!(
            nodes[1],
            ("n-2".to_owned(), "succeeded".to_owned(), "ok".to_owned())
        );
        // A finished deployment takes no more node results, from anyone.
        assert!(!owner
            .record_node_result("d-1.n-2", "failed", "", "after the end", &[], 1_008)
            .await
            .unwrap());
        let events: Vec<(String, serde_json::Value)> = store
            .audit_events()
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.resource_id == "d-1")
            .map(|e| (e.event_type, e.details))
            .collect();
        let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            kinds,
            ["DEPLOY_STARTED", "DEPLOY_TAKEN_OVER", "DEPLOY_COMPLETED"]
        );
        assert_eq!(events[1].1["to_replica"], winner);
        assert_eq!(events[2].1["by"], winner);
        // A handle of no replica cannot take a deployment over.
        let err = store
            .take_over_deployment("d-1", Some("a"), &ended("x"), 1_009)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::NoReplica), "{err}");
    }

    async fn one_deployment_per_app_holds_across_replicas_racing(store: Store) {
        let json = serde_json::json!({});
        let started = AuditEvent::success(
            audit::DEPLOY_STARTED,
            "tok-1",
            "deployment",
            "d",
            json.clone(),
        );
        let insert = |replica: &'static str, id: &'static str| {
            let store = store.clone().for_replica(replica);
            let json = json.clone();
            let started = started.clone();
            async move {
                store
                    .insert_deployment(&new_deployment(id, "web", &[], &json), &started)
                    .await
            }
        };
        for round in 0..5 {
            let ids: [&'static str; 3] = match round {
                0 => ["r0-a", "r0-b", "r0-c"],
                1 => ["r1-a", "r1-b", "r1-c"],
                2 => ["r2-a", "r2-b", "r2-c"],
                3 => ["r3-a", "r3-b", "r3-c"],
                _ => ["r4-a", "r4-b", "r4-c"],
            };
            let (a, b, c) = tokio::join!(
                insert("a", ids[0]),
                insert("b", ids[1]),
                insert("c", ids[2])
            );
            let results = [a, b, c];
            let won: Vec<usize> = (0..3).filter(|&i| results[i].is_ok()).collect();
            assert_eq!(won.len(), 1, "round {round}: {results:?}");
            for r in &results {
                if let Err(err) = r {
                    assert!(matches!(err, StoreError::AppBusy { .. }), "{err}");
                }
            }
            let running: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM deployments WHERE app = 'web' AND status = 'running'",
            )
            .fetch_one(&store.pool)
            .await
            .unwrap();
            assert_eq!(running, 1);
            let ev = AuditEvent::success(
                audit::DEPLOY_COMPLETED,
                "tok-1",
                "deployment",
                ids[won[0]],
                json.clone(),
            );
            let owner = store.clone().for_replica(["a", "b", "c"][won[0]]);
            assert!(owner
                .finish_deployment(ids[won[0]], "succeeded", "", "", &ev, 1_001)
                .await
                .unwrap());
        }
    }
}
