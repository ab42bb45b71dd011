//! Commands routed between controller replicas (`node_commands`) and the
//! agents' answers flowing back (`node_command_events`). The sender queues
//! a command addressed to the replica holding the node's session; that
//! replica claims it exactly once, sends it on the session and appends the
//! agent's reports as events, which the sender reads (in order) and
//! deletes. What the rows hold is the callers' to check (`crate::link::
//! routing`); the store only moves bytes.

use sqlx::Row as _;

use super::{Backend, Store, StoreError};

/// A command queued for another replica, as that replica claimed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedCommand {
    /// The row's id (events refer to it).
    pub id: String,
    /// The command id inside the message.
    pub command_id: String,
    /// The node it is for.
    pub node_id: String,
    /// The replica waiting for the answers.
    pub sender_replica: String,
    /// The ControllerMessage, protobuf-encoded (unchecked).
    pub message: Vec<u8>,
}

/// One report of the agent on a routed command, for its sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandEventRow {
    /// The command's row.
    pub command_row: String,
    /// Order within the row, from 1.
    pub seq: i64,
    /// `progress`, `result` or `gone` (the holder could not deliver).
    pub kind: String,
    /// The Progress or CommandResult, protobuf-encoded (unchecked).
    pub payload: Vec<u8>,
}

/// Whether a queued command was claimed yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCommandState {
    /// The row's id.
    pub id: String,
    /// When its holder claimed it, if it did.
    pub picked_at: Option<i64>,
}

/// The most events read at once (the rest come on the next read).
const MAX_EVENTS_READ: i64 = 1024;

impl Store {
    /// Queues `message` (command `command_id` for `node_id`) from
    /// `sender` to `target` under the row id `id`.
    #[allow(clippy::too_many_arguments)]
    pub async fn enqueue_node_command(
        &self,
        id: &str,
        command_id: &str,
        node_id: &str,
        sender: &str,
        target: &str,
        message: &[u8],
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO node_commands
               (id, command_id, node_id, sender_replica, target_replica, message, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(command_id)
        .bind(node_id)
        .bind(sender)
        .bind(target)
        .bind(message.to_vec())
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Claims at most `limit` unclaimed commands addressed to `target`,
    /// oldest first: each row is handed out once, whoever else claims at
    /// the same time.
    pub async fn claim_node_commands(
        &self,
        target: &str,
        now: i64,
        limit: i64,
    ) -> Result<Vec<ClaimedCommand>, StoreError> {
        let select = match self.backend {
            // One writer at a time (BEGIN IMMEDIATE): nobody claims between
            // the read and the update.
            Backend::Sqlite => {
                "SELECT id, command_id, node_id, sender_replica, message FROM node_commands
                 WHERE target_replica = $1 AND picked_at IS NULL
                 ORDER BY created_at, id LIMIT $2"
            }
            Backend::Postgres => {
                "SELECT id, command_id, node_id, sender_replica, message FROM node_commands
                 WHERE target_replica = $1 AND picked_at IS NULL
                 ORDER BY created_at, id LIMIT $2
                 FOR UPDATE SKIP LOCKED"
            }
        };
        // Most polls find nothing: a plain read first, so they never take
        // the write lock.
        let waiting = sqlx::query(
            "SELECT id FROM node_commands WHERE target_replica = $1 AND picked_at IS NULL LIMIT 1",
        )
        .bind(target)
        .fetch_optional(&self.pool)
        .await?;
        if waiting.is_none() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        let rows = sqlx::query(select)
            .bind(target)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
        let mut claimed = Vec::with_capacity(rows.len());
        for row in &rows {
            let command = ClaimedCommand {
                id: row.try_get("id")?,
                command_id: row.try_get("command_id")?,
                node_id: row.try_get("node_id")?,
                sender_replica: row.try_get("sender_replica")?,
                message: row.try_get("message")?,
            };
            let done = sqlx::query(
                "UPDATE node_commands SET picked_at = $1 WHERE id = $2 AND picked_at IS NULL",
            )
            .bind(now)
            .bind(&command.id)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 1 {
                claimed.push(command);
            }
        }
        tx.commit().await?;
        Ok(claimed)
    }

    /// Appends the agent's report `seq` (`kind`, `payload`) to the command
    /// in row `command_row`.
    pub async fn add_node_command_event(
        &self,
        command_row: &str,
        seq: i64,
        kind: &str,
        payload: &[u8],
        now: i64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO node_command_events (command_row, seq, kind, payload, at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(command_row)
        .bind(seq)
        .bind(kind)
        .bind(payload.to_vec())
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The reports on the commands `sender` queued, by row and in order.
    pub async fn node_command_events(
        &self,
        sender: &str,
    ) -> Result<Vec<CommandEventRow>, StoreError> {
        let rows = sqlx::query(
            "SELECT e.command_row, e.seq, e.kind, e.payload
             FROM node_command_events e JOIN node_commands c ON c.id = e.command_row
             WHERE c.sender_replica = $1
             ORDER BY e.command_row, e.seq LIMIT $2",
        )
        .bind(sender)
        .bind(MAX_EVENTS_READ)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(CommandEventRow {
                    command_row: row.try_get("command_row")?,
                    seq: row.try_get("seq")?,
                    kind: row.try_get("kind")?,
                    payload: row.try_get("payload")?,
                })
            })
            .collect()
    }

    /// Deletes the reports of row `command_row` up to `seq` (read).
    pub async fn delete_node_command_events(
        &self,
        command_row: &str,
        seq: i64,
    ) -> Result<(), StoreError> {
        sqlx::query("DELETE FROM node_command_events WHERE command_row = $1 AND seq <= $2")
            .bind(command_row)
            .bind(seq)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Whether each command `sender` queued was claimed.
    pub async fn node_command_states(
        &self,
        sender: &str,
    ) -> Result<Vec<NodeCommandState>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, picked_at FROM node_commands WHERE sender_replica = $1 ORDER BY id",
        )
        .bind(sender)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(NodeCommandState {
                    id: row.try_get("id")?,
                    picked_at: row.try_get("picked_at")?,
                })
            })
            .collect()
    }

    /// Withdraws row `id` if nobody claimed it yet; true if it did.
    pub async fn withdraw_node_command(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM node_commands WHERE id = $1 AND picked_at IS NULL")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Deletes row `id` and its reports (its sender waits no more).
    pub async fn delete_node_command(&self, id: &str) -> Result<(), StoreError> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM node_command_events WHERE command_row = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM node_commands WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Deletes the commands queued and the reports written before
    /// `cutoff` (whatever their state: long past any wait); returns how
    /// many rows went.
    pub async fn delete_node_commands_before(&self, cutoff: i64) -> Result<u64, StoreError> {
        let mut tx = self.begin().await?;
        let events = sqlx::query(
            "DELETE FROM node_command_events
             WHERE at < $1 OR command_row IN (SELECT id FROM node_commands WHERE created_at < $1)",
        )
        .bind(cutoff)
        .execute(&mut *tx)
        .await?;
        let commands = sqlx::query("DELETE FROM node_commands WHERE created_at < $1")
            .bind(cutoff)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(events.rows_affected() + commands.rows_affected())
    }

    /// Deletes the commands queued by replicas not in `live` and the
    /// reports written for them (nobody waits for those any more: a dead
    /// sender's deployment is carried on by another replica, which sends
    /// its own); returns how many rows went. Nothing goes when `live` is
    /// empty.
    pub async fn delete_node_commands_of_senders_not_in(
        &self,
        live: &[String],
    ) -> Result<u64, StoreError> {
        if live.is_empty() {
            return Ok(0);
        }
        let list = super::placeholders(live.len());
        let mut tx = self.begin().await?;
        let sql = format!(
            "DELETE FROM node_command_events WHERE command_row IN
               (SELECT id FROM node_commands WHERE sender_replica NOT IN ({list}))"
        );
        let events = super::bind_all(sqlx::query(&sql), live)
            .execute(&mut *tx)
            .await?;
        let sql = format!("DELETE FROM node_commands WHERE sender_replica NOT IN ({list})");
        let commands = super::bind_all(sqlx::query(&sql), live)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(events.rows_affected() + commands.rows_affected())
    }

    /// Every recorded agent session: node id, holding replica, session id.
    pub async fn agent_session_records(&self) -> Result<Vec<(String, String, i64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT node_id, replica_id, session_id FROM agent_sessions ORDER BY node_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.try_get("node_id")?,
                    row.try_get("replica_id")?,
                    row.try_get("session_id")?,
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::store::testing::store_tests!(
        routed_commands_are_claimed_once_and_answered_in_order,
        routed_commands_are_withdrawn_and_cleaned_up,
        a_dead_senders_commands_go_with_their_answers,
    );

    async fn a_dead_senders_commands_go_with_their_answers(store: Store) {
        for (id, sender) in [("r-a", "a"), ("r-x1", "x"), ("r-x2", "x")] {
            store
                .enqueue_node_command(id, &format!("d-1.{id}"), "n-1", sender, "b", b"m", 100)
                .await
                .unwrap();
        }
        store
            .add_node_command_event("r-x1", 1, "result", b"r", 110)
            .await
            .unwrap();
        store
            .add_node_command_event("r-a", 1, "progress", b"p", 110)
            .await
            .unwrap();
        // No live replica known: nothing goes.
        assert_eq!(
            store
                .delete_node_commands_of_senders_not_in(&[])
                .await
                .unwrap(),
            0
        );
        let live = ["a".to_owned(), "b".to_owned()];
        assert_eq!(
            store
                .delete_node_commands_of_senders_not_in(&live)
                .await
                .unwrap(),
            3,
            "x's two commands and the answer to one"
        );
        assert!(store.node_command_states("x").await.unwrap().is_empty());
        assert_eq!(store.node_command_states("a").await.unwrap().len(), 1);
        assert_eq!(store.node_command_events("a").await.unwrap().len(), 1);
    }

    async fn routed_commands_are_claimed_once_and_answered_in_order(store: Store) {
        for i in 0..20 {
            store
                .enqueue_node_command(
                    &format!("r-{i:02}"),
                    &format!("d-1.n-{i}"),
                    &format!("n-{i}"),
                    "a",
                    "b",
                    &[0, 1, 2, u8::try_from(i).unwrap(), 255],
                    100 + i,
                )
                .await
                .unwrap();
        }
        store
            .enqueue_node_command("r-c", "d-1.n-c", "n-c", "a", "c", b"x", 100)
            .await
            .unwrap();
        // Two claimers of b at once, a few rows at a time: every row once.
        let claimer = |store: Store| async move {
            let mut got = Vec::new();
            for _ in 0..30 {
                let batch = store.claim_node_commands("b", 200, 3).await.unwrap();
                got.extend(batch.into_iter().map(|c| c.id));
                tokio::task::yield_now().await;
            }
            got
        };
        let (first, second) = tokio::join!(
            tokio::spawn(claimer(store.clone())),
            tokio::spawn(claimer(store.clone()))
        );
        let mut all: Vec<String> = first.unwrap().into_iter().chain(second.unwrap()).collect();
        all.sort();
        let expected: Vec<String> = (0..20).map(|i| format!("r-{i:02}")).collect();
        assert_eq!(all, expected, "each row claimed exactly once");
        assert!(store
            .claim_node_commands("b", 201, 10)
            .await
            .unwrap()
            .is_empty());
        // c's row is c's alone, with its bytes intact.
        let c = store.claim_node_commands("c", 201, 10).await.unwrap();
        assert_eq!(
            c,
            [ClaimedCommand {
                id: "r-c".into(),
                command_id: "d-1.n-c".into(),
                node_id: "n-c".into(),
                sender_replica: "a".into(),
                message: b"x".to_vec(),
            }]
        );

        // Events come back in order, only to the sender, and go once read.
        for seq in [2, 1, 3] {
            store
                .add_node_command_event("r-03", seq, "progress", &[u8::try_from(seq).unwrap()], 300)
                .await
                .unwrap();
        }
        store
            .add_node_command_event("r-01", 1, "result", &[0, 255], 300)
            .await
            .unwrap();
        assert!(store.node_command_events("b").await.unwrap().is_empty());
        let events = store.node_command_events("a").await.unwrap();
        let seen: Vec<(&str, i64, &str)> = events
            .iter()
            .map(|e| (e.command_row.as_str(), e.seq, e.kind.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                ("r-01", 1, "result"),
                ("r-03", 1, "progress"),
                ("r-03", 2, "progress"),
                ("r-03", 3, "progress"),
            ]
        );
        assert_eq!(events[0].payload, [0, 255]);
        store.delete_node_command_events("r-03", 2).await.unwrap();
        let left: Vec<i64> = store
            .node_command_events("a")
            .await
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(left, [1, 3]);
        // A finished command goes with its events.
        store.delete_node_command("r-03").await.unwrap();
        let left = store.node_command_events("a").await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].command_row, "r-01");
        assert_eq!(store.node_command_states("a").await.unwrap().len(), 20);
    }

    async fn routed_commands_are_withdrawn_and_cleaned_up(store: Store) {
        store
            .enqueue_node_command("r-1", "d-1.n-1", "n-1", "a", "b", b"m1", 100)
            .await
            .unwrap();
        store
            .enqueue_node_command("r-2", "d-1.n-2", "n-2", "a", "b", b"m2", 5_000)
            .await
            .unwrap();
        let states = store.node_command_states("a").await.unwrap();
        assert_eq!(
            states,
            [
                NodeCommandState {
                    id: "r-1".into(),
                    picked_at: None
                },
                NodeCommandState {
                    id: "r-2".into(),
                    picked_at: None
                },
            ]
        );
        // r-2 is claimed: it can no longer be withdrawn; r-1 can, once.
        let claimed = store.claim_node_commands("b", 5_001, 1).await.unwrap();
        assert_eq!(claimed.len(), 1);
        assert_eq!(claimed[0].id, "r-1", "oldest first");
        assert!(!store.withdraw_node_command("r-1").await.unwrap());
        store
            .enqueue_node_command("r-3", "d-1.n-3", "n-3", "a", "b", b"m3", 5_002)
            .await
            .unwrap();
        assert!(store.withdraw_node_command("r-3").await.unwrap());
        assert!(!store.withdraw_node_command("r-3").await.unwrap());
        let picked: Vec<Option<i64>> = store
            .node_command_states("a")
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.picked_at)
            .collect();
        assert_eq!(picked, [Some(5_001), None]);

        // Old rows go, whatever their state, with their events and orphans.
        store
            .add_node_command_event("r-1", 1, "progress", b"p", 150)
            .await
            .unwrap();
        store
            .add_node_command_event("gone", 1, "result", b"r", 150)
            .await
            .unwrap();
        store
            .add_node_command_event("r-2", 1, "progress", b"p", 5_100)
            .await
            .unwrap();
        assert_eq!(store.delete_node_commands_before(1_000).await.unwrap(), 3);
        let ids: Vec<String> = store
            .node_command_states("a")
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, ["r-2"]);
        assert_eq!(store.node_command_events("a").await.unwrap().len(), 1);
        assert_eq!(store.delete_node_commands_before(1_000).await.unwrap(), 0);

        store
            .open_agent_session("n-2", "b", 7, 5_000)
            .await
            .unwrap();
        assert_eq!(
            store.agent_session_records().await.unwrap(),
            [("n-2".to_owned(), "b".to_owned(), 7)]
        );
    }
}
