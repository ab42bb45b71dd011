//! Controller replicas sharing this database (`replicas`) and which of
//! them holds each node's agent session (`agent_sessions`). Whether a
//! replica is alive is the caller's judgement (`seen_at` against a window,
//! see `crate::link::replicas`); the store only records and lists.

use std::sync::Arc;

use sqlx::Row as _;

use super::{Store, StoreError};

/// One replica's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRow {
    /// Random id chosen at start.
    pub id: String,
    /// The gRPC address it serves (agents, CLI).
    pub grpc_addr: String,
    /// The HTTP address, when it serves HTTP.
    pub http_addr: Option<String>,
    /// Seconds since the epoch.
    pub started_at: i64,
    /// Last renewal, seconds since the epoch.
    pub seen_at: i64,
}

/// The replica recorded as holding a node's session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionHolder {
    /// The node.
    pub node_id: String,
    /// The replica (its `seen_at` tells whether it still lives).
    pub replica: ReplicaRow,
}

pub(super) fn replica_row(row: &sqlx::any::AnyRow) -> Result<ReplicaRow, StoreError> {
    Ok(ReplicaRow {
        id: row.try_get("id")?,
        grpc_addr: row.try_get("grpc_addr")?,
        http_addr: row.try_get("http_addr")?,
        started_at: row.try_get("started_at")?,
        seen_at: row.try_get("seen_at")?,
    })
}

impl Store {
    /// This handle, recording `replica` as the owner of the deployments it
    /// starts.
    pub fn for_replica(mut self, replica: &str) -> Self {
        self.replica = Some(Arc::from(replica));
        self
    }

    /// The replica this handle writes for, if any.
    pub fn replica_id(&self) -> Option<&str> {
        self.replica.as_deref()
    }

    /// Records `replica` (or replaces its record).
    pub async fn register_replica(&self, replica: &ReplicaRow) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO replicas (id, grpc_addr, http_addr, started_at, seen_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (id) DO UPDATE SET grpc_addr = $2, http_addr = $3, started_at = $4,
                                            seen_at = $5",
        )
        .bind(&replica.id)
        .bind(&replica.grpc_addr)
        .bind(replica.http_addr.as_deref())
        .bind(replica.started_at)
        .bind(replica.seen_at)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Renews `id`'s `seen_at`; false if it has no record (removed: the
    /// caller registers it again).
    pub async fn renew_replica(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE replicas SET seen_at = $1 WHERE id = $2")
            .bind(now)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Removes `id` and the sessions it held (a replica stopping cleanly,
    /// or a dead one swept away).
    pub async fn remove_replica(&self, id: &str) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM agent_sessions WHERE replica_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM replicas WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes the replicas unseen since before `cutoff`, with the
    /// sessions they held; returns how many.
    pub async fn remove_replicas_unseen_since(&self, cutoff: i64) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "DELETE FROM agent_sessions
             WHERE replica_id IN (SELECT id FROM replicas WHERE seen_at < $1)",
        )
        .bind(cutoff)
        .execute(&mut *tx)
        .await?;
        let done = sqlx::query("DELETE FROM replicas WHERE seen_at < $1")
            .bind(cutoff)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    /// Every recorded replica, oldest start first.
    pub async fn replicas(&self) -> Result<Vec<ReplicaRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, grpc_addr, http_addr, started_at, seen_at FROM replicas
             ORDER BY started_at, id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(replica_row).collect()
    }

    /// Records that `replica` holds `node_id`'s session `session_id` (a
    /// node's latest session wins over any older one, wherever it was).
    pub async fn open_agent_session(
        &self,
        node_id: &str,
        replica: &str,
        session_id: u64,
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO agent_sessions (node_id, replica_id, session_id, opened_at)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (node_id) DO UPDATE SET replica_id = $2, session_id = $3,
                                                 opened_at = $4",
        )
        .bind(node_id)
        .bind(replica)
        .bind(i64::try_from(session_id).unwrap_or(i64::MAX))
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Clears `node_id`'s session record if it is still `replica`'s
    /// session `session_id` (not a newer one, here or on another replica).
    pub async fn close_agent_session(
        &self,
        node_id: &str,
        replica: &str,
        session_id: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "DELETE FROM agent_sessions
             WHERE node_id = $1 AND replica_id = $2 AND session_id = $3",
        )
        .bind(node_id)
        .bind(replica)
        .bind(i64::try_from(session_id).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The recorded sessions of every replica but `own`: node id and
    /// replica id (the replicas themselves are read once, with
    /// [`Store::replicas`]; at 10,000 nodes this is read on every fleet view).
    pub async fn sessions_not_of(&self, own: &str) -> Result<Vec<(String, String)>, StoreError> {
        let rows =
            sqlx::query("SELECT node_id, replica_id FROM agent_sessions WHERE replica_id <> $1")
                .bind(own)
                .fetch_all(&self.pool)
                .await?;
        rows.iter()
            .map(|row| Ok((row.try_get("node_id")?, row.try_get("replica_id")?)))
            .collect()
    }

    /// Every recorded session with the replica holding it (alive or not:
    /// the caller judges).
    pub async fn session_holders(&self) -> Result<Vec<SessionHolder>, StoreError> {
        let rows = sqlx::query(
            "SELECT s.node_id, r.id, r.grpc_addr, r.http_addr, r.started_at, r.seen_at
             FROM agent_sessions s JOIN replicas r ON r.id = s.replica_id
             ORDER BY s.node_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(SessionHolder {
                    node_id: row.try_get("node_id")?,
                    replica: replica_row(row)?,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{self, AuditEvent};
    use crate::store::{NewDeployment, NewDeploymentNode};

    crate::store::testing::store_tests!(
        replicas_register_renew_and_hold_sessions,
        only_deployments_of_replicas_not_live_are_abandoned,
    );

    fn replica(id: &str, seen_at: i64) -> ReplicaRow {
        ReplicaRow {
            id: id.to_owned(),
            grpc_addr: format!("127.0.0.1:{}", 7000 + id.len()),
            http_addr: (id == "a").then(|| "127.0.0.1:8080".to_owned()),
            started_at: 100,
            seen_at,
        }
    }

    async fn replicas_register_renew_and_hold_sessions(store: Store) {
        store.register_replica(&replica("a", 100)).await.unwrap();
        store.register_replica(&replica("bb", 100)).await.unwrap();
        assert!(store.renew_replica("a", 105).await.unwrap());
        assert!(!store.renew_replica("nope", 105).await.unwrap());
        let all = store.replicas().await.unwrap();
        assert_eq!(all, vec![replica("a", 105), replica("bb", 100)]);

        store.open_agent_session("n-1", "a", 1, 101).await.unwrap();
        store.open_agent_session("n-2", "bb", 1, 101).await.unwrap();
        // n-1 moves to bb: its latest session wins; a's late close of the
        // old one does not clear it.
        store.open_agent_session("n-1", "bb", 2, 102).await.unwrap();
        store.close_agent_session("n-1", "a", 1).await.unwrap();
        let holders = store.session_holders().await.unwrap();
        let pairs: Vec<(&str, &str)> = holders
            .iter()
            .map(|h| (h.node_id.as_str(), h.replica.id.as_str()))
            .collect();
        assert_eq!(pairs, [("n-1", "bb"), ("n-2", "bb")]);
        // A close of an older session of the same replica leaves it too.
        store.close_agent_session("n-2", "bb", 0).await.unwrap();
        store.close_agent_session("n-1", "bb", 2).await.unwrap();
        let holders = store.session_holders().await.unwrap();
        assert_eq!(holders.len(), 1);
        assert_eq!(holders[0].node_id, "n-2");
        assert_eq!(holders[0].replica, replica("bb", 100));

        // Replicas unseen long ago go with their sessions; others stay.
        store.open_agent_session("n-3", "a", 1, 103).await.unwrap();
        store.register_replica(&replica("old", 50)).await.unwrap();
        store.open_agent_session("n-4", "old", 1, 50).await.unwrap();
        assert_eq!(store.remove_replicas_unseen_since(100).await.unwrap(), 1);
        let nodes: Vec<String> = store
            .session_holders()
            .await
            .unwrap()
            .into_iter()
            .map(|h| h.node_id)
            .collect();
        assert_eq!(nodes, ["n-2", "n-3"]);
        store.close_agent_session("n-3", "a", 1).await.unwrap();

        // Removing a replica takes its sessions with it.
        store.remove_replica("bb").await.unwrap();
        assert!(store.session_holders().await.unwrap().is_empty());
        assert_eq!(store.replicas().await.unwrap(), vec![replica("a", 105)]);
    }

    async fn only_deployments_of_replicas_not_live_are_abandoned(store: Store) {
        let json = serde_json::json!({});
        let started = AuditEvent::success(
            audit::DEPLOY_STARTED,
            "tok-1",
            "deployment",
            "d",
            json.clone(),
        );
        let nodes = [NewDeploymentNode {
            node_id: "n-1",
            command_id: "c-1",
            batch: 0,
            prior_release: "v0",
        }];
        for (id, app, owner) in [
            ("d-a", "web", Some("a")),
            ("d-b", "api", Some("b")),
            ("d-old", "old", None),
        ] {
            let by = match owner {
                Some(owner) => store.clone().for_replica(owner),
                None => store.clone(),
            };
            by.insert_deployment(
                &NewDeployment {
                    id,
                    kind: "deploy",
                    app,
                    release_id: "v1",
                    artifact_sha256: "",
                    actor: "tok-1",
                    selector: &json,
                    rollout: &json,
                    snapshots: &[],
                    started_at: 1_000,
                    nodes: if id == "d-b" { &nodes } else { &[] },
                    env_version: None,
                    plan: None,
                },
                &started,
            )
            .await
            .unwrap();
        }
        // a and b live: only the one without an owner goes.
        let live = ["a".to_owned(), "b".to_owned()];
        let abandoned = store
            .abandon_running_deployments(2_000, &live)
            .await
            .unwrap();
        assert_eq!(abandoned, ["d-old"]);
        let again = store
            .abandon_running_deployments(2_001, &live)
            .await
            .unwrap();
        assert!(again.is_empty(), "{again:?}");
        // b dies: its deployment goes, named with the replica; a's stays.
        let abandoned = store
            .abandon_running_deployments(2_002, &live[..1])
            .await
            .unwrap();
        assert_eq!(abandoned, ["d-b"]);
        // b's late end (it was only slow) does not overwrite that, nor
        // add a second end to the audit log.
        let late = AuditEvent::success(
            audit::DEPLOY_COMPLETED,
            "tok-1",
            "deployment",
            "d-b",
            json.clone(),
        );
        let recorded = store
            .finish_deployment(
                "d-b",
                "succeeded",
                "1 of 1 nodes succeeded",
                "",
                &late,
                2_003,
            )
            .await
            .unwrap();
        assert!(!recorded);
        let events = store.audit_events().await.unwrap();
        let failed: Vec<_> = events
            .iter()
            .filter(|e| e.event_type == "DEPLOY_FAILED")
            .collect();
        assert_eq!(failed.len(), 2, "{failed:?}");
        assert!(!events.iter().any(|e| e.event_type == "DEPLOY_COMPLETED"));
        assert_eq!(failed[0].resource_id, "d-old");
        assert_eq!(
            failed[0].error_message.as_deref(),
            Some("controller restarted before the deployment finished")
        );
        assert_eq!(failed[1].resource_id, "d-b");
        let why = failed[1].error_message.as_deref().unwrap_or_default();
        assert!(why.contains("controller restarted"), "{why}");
        assert!(why.contains("replica b that ran it is gone"), "{why}");
        assert_eq!(
            failed[1].details["unanswered_nodes"],
            serde_json::json!(["n-1"])
        );
        // The app of the live replica's deployment is still busy.
        let err = store
            .insert_deployment(
                &NewDeployment {
                    id: "d-a2",
                    kind: "deploy",
                    app: "web",
                    release_id: "v2",
                    artifact_sha256: "",
                    actor: "tok-1",
                    selector: &json,
                    rollout: &json,
                    snapshots: &[],
                    started_at: 2_100,
                    nodes: &[],
                    env_version: None,
                    plan: None,
                },
                &started,
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("d-a"), "{err}");
    }
}
