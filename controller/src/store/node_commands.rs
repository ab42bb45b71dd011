//! Commands routed between controller replicas (`node_commands`) and the
//! agents' answers flowing back (`node_command_events`). The sender queues
//! a command addressed to the replica holding the node's session; that
//! replica claims it exactly once, sends it on the session and appends the
//! agent's reports as events, which the sender reads (in order) and
//! deletes. What the rows hold is the callers' to check (`crate::link::
//! routing`); the store only moves bytes.

use sqlx::Row as _;

use super::{Backend, ReplicaRow, Store, StoreError};

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
pub const MAX_EVENTS_READ: usize = 1024;

/// Rows written by one multi-row INSERT, and values in one `IN` list:
/// well under both engines' limit on bound parameters (SQLite 32,766,
/// PostgreSQL 65,535).
const ROWS_PER_STATEMENT: usize = 200;

/// The PostgreSQL channel replicas wake each other on
/// ([`Store::notify_replica`], [`Store::routing_listener`]).
pub const ROUTING_CHANNEL: &str = "slipway_routing";

/// What a notification on [`ROUTING_CHANNEL`] tells its replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RoutingWake {
    /// Commands were queued for it: claim them.
    Commands,
    /// Answers were written for commands it queued: read them.
    Answers,
}

impl RoutingWake {
    fn tag(self) -> char {
        match self {
            Self::Commands => 'c',
            Self::Answers => 'e',
        }
    }

    /// The payload telling `replica` this.
    pub fn payload(self, replica: &str) -> String {
        format!("{}:{replica}", self.tag())
    }

    /// What `payload` tells `replica`; None if it is for another replica
    /// (or not a payload of [`RoutingWake::payload`]).
    pub fn parse(payload: &str, replica: &str) -> Option<Self> {
        let (tag, to) = payload.split_once(':')?;
        if to != replica {
            return None;
        }
        match tag {
            "c" => Some(Self::Commands),
            "e" => Some(Self::Answers),
            _ => None,
        }
    }
}

/// One report of the agent to write for a routed command's sender
/// ([`Store::add_node_command_events`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewCommandEvent {
    /// The command's row.
    pub command_row: String,
    /// Order within the row, from 1.
    pub seq: i64,
    /// `progress`, `result` or `gone`.
    pub kind: &'static str,
    /// The Progress or CommandResult, protobuf-encoded.
    pub payload: Vec<u8>,
}

fn event_row(row: &sqlx::any::AnyRow) -> Result<CommandEventRow, StoreError> {
    Ok(CommandEventRow {
        command_row: row.try_get("command_row")?,
        seq: row.try_get("seq")?,
        kind: row.try_get("kind")?,
        payload: row.try_get("payload")?,
    })
}

impl Store {
    /// Queues `message` (command `command_id` for `node_id`) from
    /// `sender` to `target` under the row id `id`; on PostgreSQL the same
    /// statement wakes `target` ([`RoutingWake::Commands`]).
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
        let sql = match self.backend {
            Backend::Sqlite => {
                "INSERT INTO node_commands
                   (id, command_id, node_id, sender_replica, target_replica, message, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)"
            }
            // Delivered when the insert commits.
            Backend::Postgres => {
                "WITH queued AS (
                   INSERT INTO node_commands
                     (id, command_id, node_id, sender_replica, target_replica, message, created_at)
                   VALUES ($1, $2, $3, $4, $5, $6, $7)
                   RETURNING id)
                 SELECT pg_notify($8, $9) FROM queued"
            }
        };
        let mut query = sqlx::query(sql)
            .bind(id)
            .bind(command_id)
            .bind(node_id)
            .bind(sender)
            .bind(target)
            .bind(message.to_vec())
            .bind(now);
        if self.backend == Backend::Postgres {
            query = query
                .bind(ROUTING_CHANNEL)
                .bind(RoutingWake::Commands.payload(target));
        }
        query.execute(&self.pool).await?;
        Ok(())
    }

    /// Claims at most `limit` unclaimed commands addressed to `target`,
    /// oldest first, in one statement: each row is handed out once,
    /// whoever else claims at the same time (PostgreSQL: rows another
    /// claimer locked are skipped, not waited for; SQLite: one writer at a
    /// time).
    pub async fn claim_node_commands(
        &self,
        target: &str,
        now: i64,
        limit: i64,
    ) -> Result<Vec<ClaimedCommand>, StoreError> {
        let claim = match self.backend {
            Backend::Sqlite => {
                // Most polls find nothing: a plain read first, so they
                // never take the write lock.
                let waiting = sqlx::query(
                    "SELECT id FROM node_commands
                     WHERE target_replica = $1 AND picked_at IS NULL LIMIT 1",
                )
                .bind(target)
                .fetch_optional(&self.pool)
                .await?;
                if waiting.is_none() {
                    return Ok(Vec::new());
                }
                "UPDATE node_commands SET picked_at = $2
                 WHERE picked_at IS NULL AND id IN
                   (SELECT id FROM node_commands
                    WHERE target_replica = $1 AND picked_at IS NULL
                    ORDER BY created_at, id LIMIT $3)
                 RETURNING id, command_id, node_id, sender_replica, message, created_at"
            }
            Backend::Postgres => {
                "UPDATE node_commands SET picked_at = $2
                 WHERE picked_at IS NULL AND id IN
                   (SELECT id FROM node_commands
                    WHERE target_replica = $1 AND picked_at IS NULL
                    ORDER BY created_at, id LIMIT $3
                    FOR UPDATE SKIP LOCKED)
                 RETURNING id, command_id, node_id, sender_replica, message, created_at"
            }
        };
        let rows = sqlx::query(claim)
            .bind(target)
            .bind(now)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        let mut claimed = rows
            .iter()
            .map(|row| {
                let created_at: i64 = row.try_get("created_at")?;
                Ok((
                    created_at,
                    ClaimedCommand {
                        id: row.try_get("id")?,
                        command_id: row.try_get("command_id")?,
                        node_id: row.try_get("node_id")?,
                        sender_replica: row.try_get("sender_replica")?,
                        message: row.try_get("message")?,
                    },
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        // RETURNING gives no order.
        claimed.sort_by(|(a_at, a), (b_at, b)| (a_at, &a.id).cmp(&(b_at, &b.id)));
        Ok(claimed.into_iter().map(|(_, c)| c).collect())
    }

    /// Appends the agent's report `seq` (`kind`, `payload`) to the command
    /// in row `command_row`.
    pub async fn add_node_command_event(
        &self,
        command_row: &str,
        seq: i64,
        kind: &'static str,
        payload: &[u8],
        now: i64,
    ) -> Result<(), StoreError> {
        self.add_node_command_events(
            &[NewCommandEvent {
                command_row: command_row.to_owned(),
                seq,
                kind,
                payload: payload.to_vec(),
            }],
            now,
        )
        .await
    }

    /// Appends the agent's reports `events`, a few hundred rows per
    /// statement, in one transaction. Writing the same report (row and
    /// seq) again keeps the first: a write retried after its commit went
    /// through is harmless.
    pub async fn add_node_command_events(
        &self,
        events: &[NewCommandEvent],
        now: i64,
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        // Inserts only: rows of their own.
        let mut tx = self.begin_unlocked().await?;
        for chunk in events.chunks(ROWS_PER_STATEMENT) {
            let values = (0..chunk.len())
                .map(|i| {
                    let b = i * 5;
                    format!(
                        "(${}, ${}, ${}, ${}, ${})",
                        b + 1,
                        b + 2,
                        b + 3,
                        b + 4,
                        b + 5
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            let sql = format!(
                "INSERT INTO node_command_events (command_row, seq, kind, payload, at)
                 VALUES {values} ON CONFLICT (command_row, seq) DO NOTHING"
            );
            let mut query = sqlx::query(&sql);
            for e in chunk {
                query = query
                    .bind(e.command_row.as_str())
                    .bind(e.seq)
                    .bind(e.kind)
                    .bind(e.payload.clone())
                    .bind(now);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The reports on the commands `sender` queued, by row and in order
    /// (left in place: [`Store::take_node_command_events`] reads and
    /// deletes).
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
        .bind(i64::try_from(MAX_EVENTS_READ).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_row).collect()
    }

    /// Reads and deletes, in one statement, the reports on the commands
    /// `sender` queued (at most [`MAX_EVENTS_READ`]; the rest on the next
    /// call), by row and in order.
    pub async fn take_node_command_events(
        &self,
        sender: &str,
    ) -> Result<Vec<CommandEventRow>, StoreError> {
        let rows = sqlx::query(
            "DELETE FROM node_command_events WHERE (command_row, seq) IN
               (SELECT e.command_row, e.seq
                FROM node_command_events e JOIN node_commands c ON c.id = e.command_row
                WHERE c.sender_replica = $1
                ORDER BY e.command_row, e.seq LIMIT $2)
             RETURNING command_row, seq, kind, payload",
        )
        .bind(sender)
        .bind(i64::try_from(MAX_EVENTS_READ).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        let mut events = rows.iter().map(event_row).collect::<Result<Vec<_>, _>>()?;
        // RETURNING gives no order.
        events.sort_by(|a, b| (&a.command_row, a.seq).cmp(&(&b.command_row, b.seq)));
        Ok(events)
    }

    /// Wakes `replica` (PostgreSQL: a notification on [`ROUTING_CHANNEL`],
    /// delivered to its [`Store::routing_listener`]); nothing on SQLite,
    /// where replicas poll.
    pub async fn notify_replica(&self, replica: &str, wake: RoutingWake) -> Result<(), StoreError> {
        if self.backend != Backend::Postgres {
            return Ok(());
        }
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(ROUTING_CHANNEL)
            .bind(wake.payload(replica))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A connection of its own listening on [`ROUTING_CHANNEL`]
    /// (PostgreSQL); None on SQLite. It reconnects (and listens again) by
    /// itself on its next receive after a lost connection; notifications
    /// sent meanwhile are lost.
    pub async fn routing_listener(&self) -> Result<Option<sqlx::postgres::PgListener>, StoreError> {
        let Some(url) = &self.postgres_url else {
            return Ok(None);
        };
        let mut listener = sqlx::postgres::PgListener::connect(url.secret())
            .await
            .map_err(|e| StoreError::Connect(format!("{url}: {e}")))?;
        listener.listen(ROUTING_CHANNEL).await?;
        Ok(Some(listener))
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
        self.delete_node_commands(&[id.to_owned()]).await
    }

    /// Deletes rows `ids` and their reports (their sender waits no more),
    /// a few hundred per statement, in one transaction.
    pub async fn delete_node_commands(&self, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        // Deletes of the sender's own rows.
        let mut tx = self.begin_unlocked().await?;
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let list = super::placeholders(chunk.len());
            let sql = format!("DELETE FROM node_command_events WHERE command_row IN ({list})");
            super::bind_all(sqlx::query(&sql), chunk)
                .execute(&mut *tx)
                .await?;
            let sql = format!("DELETE FROM node_commands WHERE id IN ({list})");
            super::bind_all(sqlx::query(&sql), chunk)
                .execute(&mut *tx)
                .await?;
        }
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

    /// The recorded agent sessions of `nodes` (those that have one, held
    /// by a recorded replica): node id, session id and the holding
    /// replica's record (alive or not: the caller judges), by node; a few
    /// hundred nodes per statement.
    pub async fn agent_sessions_of(
        &self,
        nodes: &[String],
    ) -> Result<Vec<(String, i64, ReplicaRow)>, StoreError> {
        let mut sessions = Vec::new();
        for chunk in nodes.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "SELECT s.node_id, s.session_id,
                        r.id, r.grpc_addr, r.http_addr, r.started_at, r.seen_at
                 FROM agent_sessions s JOIN replicas r ON r.id = s.replica_id
                 WHERE s.node_id IN ({})",
                super::placeholders(chunk.len())
            );
            let rows = super::bind_all(sqlx::query(&sql), chunk)
                .fetch_all(&self.pool)
                .await?;
            for row in &rows {
                sessions.push((
                    row.try_get::<String, _>("node_id")?,
                    row.try_get("session_id")?,
                    super::replicas::replica_row(row)?,
                ));
            }
        }
        sessions.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(sessions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::store::testing::store_tests!(
        routed_commands_are_claimed_once_and_answered_in_order,
        routed_commands_are_withdrawn_and_cleaned_up,
        a_dead_senders_commands_go_with_their_answers,
        answers_are_written_many_at_once_and_taken_once_in_order,
        a_notification_wakes_the_replica_it_names,
    );

    async fn answers_are_written_many_at_once_and_taken_once_in_order(store: Store) {
        for (row, sender) in [("r-1", "a"), ("r-2", "a"), ("r-3", "b")] {
            store
                .enqueue_node_command(row, &format!("d-1.{row}"), "n-1", sender, "c", b"m", 100)
                .await
                .unwrap();
        }
        // More rows than one statement holds, out of order, one repeated.
        let mut events: Vec<NewCommandEvent> = (1..=450)
            .rev()
            .map(|seq| NewCommandEvent {
                command_row: "r-2".to_owned(),
                seq,
                kind: "progress",
                payload: seq.to_be_bytes().to_vec(),
            })
            .collect();
        events.push(NewCommandEvent {
            command_row: "r-1".to_owned(),
            seq: 1,
            kind: "result",
            payload: vec![0, 255],
        });
        events.push(NewCommandEvent {
            command_row: "r-3".to_owned(),
            seq: 1,
            kind: "gone",
            payload: Vec::new(),
        });
        store.add_node_command_events(&events, 200).await.unwrap();
        // Written again (a retry after a commit whose answer was lost):
        // the first write stands.
        let mut again = events[..2].to_vec();
        again[0].payload = b"other".to_vec();
        store.add_node_command_events(&again, 201).await.unwrap();
        store.add_node_command_events(&[], 201).await.unwrap();

        let taken = store.take_node_command_events("a").await.unwrap();
        let seen: Vec<(&str, i64)> = taken
            .iter()
            .map(|e| (e.command_row.as_str(), e.seq))
            .collect();
        let expected: Vec<(&str, i64)> = std::iter::once(("r-1", 1))
            .chain((1..=450).map(|seq| ("r-2", seq)))
            .collect();
        assert_eq!(seen, expected, "a's answers, by row and in order");
        assert_eq!(taken[0].kind, "result");
        assert_eq!(taken[0].payload, [0, 255]);
        assert_eq!(taken[450].payload, 450_i64.to_be_bytes());
        assert!(
            store
                .take_node_command_events("a")
                .await
                .unwrap()
                .is_empty(),
            "taken once"
        );
        let b = store.take_node_command_events("b").await.unwrap();
        assert_eq!(b.len(), 1);
        assert_eq!(
            (b[0].command_row.as_str(), b[0].kind.as_str()),
            ("r-3", "gone")
        );

        // Past one read's limit: the rest on the next, still in order.
        let many: Vec<NewCommandEvent> = (1..=i64::try_from(MAX_EVENTS_READ).unwrap() + 5)
            .map(|seq| NewCommandEvent {
                command_row: "r-2".to_owned(),
                seq: seq + 1_000,
                kind: "progress",
                payload: Vec::new(),
            })
            .collect();
        store.add_node_command_events(&many, 300).await.unwrap();
        let first = store.take_node_command_events("a").await.unwrap();
        assert_eq!(first.len(), MAX_EVENTS_READ);
        assert_eq!(first[0].seq, 1_001);
        let rest = store.take_node_command_events("a").await.unwrap();
        let rest: Vec<i64> = rest.iter().map(|e| e.seq).collect();
        let last = 1_000 + i64::try_from(MAX_EVENTS_READ).unwrap();
        assert_eq!(rest, ((last + 1)..=(last + 5)).collect::<Vec<_>>());

        // Finished commands go many at once, with their answers.
        store
            .add_node_command_event("r-1", 2, "progress", b"p", 400)
            .await
            .unwrap();
        store
            .delete_node_commands(&["r-1".to_owned(), "r-3".to_owned(), "none".to_owned()])
            .await
            .unwrap();
        store.delete_node_commands(&[]).await.unwrap();
        let ids: Vec<String> = store
            .node_command_states("a")
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, ["r-2"]);
        assert!(store.node_command_states("b").await.unwrap().is_empty());
        assert!(store.node_command_events("a").await.unwrap().is_empty());

        // The sessions of the nodes asked about, many per statement, with
        // their replica's record; one of a replica without a record is
        // left out.
        let b = replica_b();
        store.register_replica(&b).await.unwrap();
        for i in 0..250 {
            let holder = if i == 100 { "gone" } else { "b" };
            store
                .open_agent_session(&format!("n-{i:03}"), holder, i, 100)
                .await
                .unwrap();
        }
        let asked: Vec<String> = (0..260).step_by(2).map(|i| format!("n-{i:03}")).collect();
        let found = store.agent_sessions_of(&asked).await.unwrap();
        assert_eq!(
            found.len(),
            124,
            "the nodes 250 to 258 have none; n-100's holder is gone"
        );
        assert_eq!(found[0], ("n-000".to_owned(), 0, b.clone()));
        assert_eq!(found[123], ("n-248".to_owned(), 248, b));
        assert!(found.iter().all(|(node, _, _)| node != "n-100"));
        assert!(store.agent_sessions_of(&[]).await.unwrap().is_empty());
    }

    /// The record of replica `b`.
    fn replica_b() -> ReplicaRow {
        ReplicaRow {
            id: "b".to_owned(),
            grpc_addr: "127.0.0.1:2".to_owned(),
            http_addr: None,
            started_at: 10,
            seen_at: 20,
        }
    }

    async fn a_notification_wakes_the_replica_it_names(store: Store) {
        assert_eq!(
            RoutingWake::parse(&RoutingWake::Commands.payload("r-a"), "r-a"),
            Some(RoutingWake::Commands)
        );
        assert_eq!(
            RoutingWake::parse(&RoutingWake::Answers.payload("r-a"), "r-a"),
            Some(RoutingWake::Answers)
        );
        assert_eq!(
            RoutingWake::parse(&RoutingWake::Answers.payload("r-a"), "r-b"),
            None
        );
        assert_eq!(RoutingWake::parse("x:r-a", "r-a"), None);
        assert_eq!(RoutingWake::parse("r-a", "r-a"), None);
        let listener = store.routing_listener().await.unwrap();
        match store.backend() {
            Backend::Sqlite => {
                assert!(listener.is_none(), "SQLite polls");
                store
                    .notify_replica("r-a", RoutingWake::Commands)
                    .await
                    .unwrap();
            }
            Backend::Postgres => {
                let mut listener = listener.expect("PostgreSQL listens");
                store
                    .notify_replica("r-b", RoutingWake::Answers)
                    .await
                    .unwrap();
                store
                    .notify_replica("r-a", RoutingWake::Commands)
                    .await
                    .unwrap();
                // Queuing a command wakes its target in the same statement.
                store
                    .enqueue_node_command("r-1", "d-1.n-1", "n-1", "r-b", "r-c", b"m", 100)
                    .await
                    .unwrap();
                let mut got = Vec::new();
                for _ in 0..3 {
                    let n =
                        tokio::time::timeout(std::time::Duration::from_secs(5), listener.recv())
                            .await
                            .expect("a notification within 5 s")
                            .unwrap();
                    assert_eq!(n.channel(), ROUTING_CHANNEL);
                    got.push(n.payload().to_owned());
                }
                assert_eq!(got, ["e:r-b", "c:r-a", "c:r-c"], "in the order sent");
            }
        }
    }

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
        // A finished command goes with its events.
        store.delete_node_command("r-03").await.unwrap();
        let left = store.node_command_events("a").await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].command_row, "r-01");
        // Taken: read and gone in one go.
        let taken = store.take_node_command_events("a").await.unwrap();
        assert_eq!(taken, left);
        assert!(store.node_command_events("a").await.unwrap().is_empty());
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

        store.register_replica(&replica_b()).await.unwrap();
        store
            .open_agent_session("n-2", "b", 7, 5_000)
            .await
            .unwrap();
        assert_eq!(
            store
                .agent_sessions_of(&["n-2".to_owned(), "n-9".to_owned()])
                .await
                .unwrap(),
            [("n-2".to_owned(), 7, replica_b())]
        );
    }
}
