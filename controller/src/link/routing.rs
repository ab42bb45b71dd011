//! Commands for nodes whose agent session another replica holds. A
//! replica sending a command to such a node queues it in the store
//! (`node_commands`) addressed to the live replica holding the session
//! ([`Router::send`], behind [`Sessions::send`]); that replica claims it,
//! sends it on the session and writes the agent's Progress and
//! CommandResult for it back (`node_command_events`); the sender reads
//! those and hands them to its [`Commands`] as if a local session had
//! reported them. The holder claims what waits in one statement, the
//! answers go back many rows per insert and the sender reads and deletes
//! them in one statement. On PostgreSQL queuing a command wakes its holder
//! and writing answers wakes their sender (`NOTIFY`, [`RoutingWake`]); the
//! poll (every [`POLL_EVERY`]; on SQLite every [`BUSY_POLL_EVERY`] while
//! commands are in flight) catches what a lost notification left. Every
//! [`POLL_EVERY`] each replica also checks the
//! commands it waits on: a node that moved to another replica (or to this
//! one) gets them again there, with a Reconnected; one no live replica
//! holds is reported Disconnected to its waiters; a row its holder did not
//! claim within [`PICKUP_TIMEOUT`] of a store that answers (the holder
//! died; not while the database was down and nobody could claim) is withdrawn and
//! counts as a lost connection. Everything read from the tables was
//! written by another process and is checked like a message from a peer.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use prost::Message as _;
use slipway_proto::limits::{Validate, MAX_COMMAND_ID, MAX_ENV_CONTENT, MAX_NODE_ID};
use slipway_proto::v1::{controller_message, CommandResult, ControllerMessage, Progress};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::commands::{Commands, NodeEvent};
use super::registry::Sessions;
use super::replicas::Replica;
use crate::store::{NewCommandEvent, RoutingWake, StoreError};

/// How often a replica claims the commands queued for it and reads the
/// answers to those it queued. On PostgreSQL the replica queuing a
/// command or writing an answer also wakes its peer at once (NOTIFY): this
/// poll then only catches a notification that was lost.
pub const POLL_EVERY: Duration = Duration::from_millis(150);
/// The poll on SQLite (no notifications) while this replica waits on
/// answers to commands it queued or relays commands for another.
pub const BUSY_POLL_EVERY: Duration = Duration::from_millis(25);
/// The pause before listening again after the notification connection
/// failed (PostgreSQL down): the poll carries on meanwhile.
const LISTEN_RETRY_EVERY: Duration = Duration::from_secs(1);
/// Most answers written back in one go.
const MAX_ANSWERS_WRITTEN: usize = 1024;
/// A queued command its holder did not claim within this is withdrawn:
/// the holder is taken for gone.
pub const PICKUP_TIMEOUT: Duration = Duration::from_secs(3);
/// Rows older than this go, whoever wrote them (long past any wait).
const FORGET_AFTER: Duration = Duration::from_secs(3600);
/// How often the old rows are swept.
const SWEEP_EVERY: Duration = Duration::from_secs(60);
/// Largest encoded command read from the queue: an env file at its limit
/// and the rest of a message.
pub const MAX_ROUTED_MESSAGE: usize = MAX_ENV_CONTENT + 64 * 1024;
/// Largest encoded Progress or CommandResult read back.
pub const MAX_ROUTED_EVENT: usize = 64 * 1024;
/// Most commands claimed at once.
const CLAIM_BATCH: i64 = 64;
/// How long an answer for the sender of a routed command is written again
/// while the database does not answer, and the pause between tries: a
/// node's result that came in during a short outage still reaches the
/// deployment, rather than its command timing out.
const ANSWER_RETRY_FOR: Duration = Duration::from_secs(120);
const ANSWER_RETRY_EVERY: Duration = Duration::from_secs(2);

/// Event kinds in `node_command_events`.
const KIND_PROGRESS: &str = "progress";
const KIND_RESULT: &str = "result";
/// The holder could not deliver the command or lost the node's session.
const KIND_GONE: &str = "gone";

/// Why a row read from the queue was refused.
#[derive(Debug, thiserror::Error)]
pub enum RoutedError {
    /// Larger than allowed.
    #[error("routed {what} of row {row}: {len} bytes; at most {max}")]
    TooLarge {
        /// What it was.
        what: &'static str,
        /// The row.
        row: String,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not a valid protobuf message.
    #[error("routed {what} of row {row} does not decode: {source}")]
    Decode {
        /// What it was.
        what: &'static str,
        /// The row.
        row: String,
        /// Why.
        source: prost::DecodeError,
    },
    /// A field breaks its limit.
    #[error("routed {what} of row {row}: {source}")]
    Invalid {
        /// What it was.
        what: &'static str,
        /// The row.
        row: String,
        /// The field.
        source: slipway_proto::limits::FieldError,
    },
    /// Its command id or node is not the row's.
    #[error("routed {what} of row {row}: {why}")]
    Mismatch {
        /// What it was.
        what: &'static str,
        /// The row.
        row: String,
        /// What differs.
        why: String,
    },
}

/// The command id a message carries, if it is a command.
pub fn command_id_of(message: &ControllerMessage) -> Option<&str> {
    use controller_message::Kind;
    let id = match message.kind.as_ref()? {
        Kind::Deploy(c) => &c.command_id,
        Kind::Rollback(c) => &c.command_id,
        Kind::Prune(c) => &c.command_id,
        Kind::StatusRequest(c) => &c.command_id,
        Kind::Restart(c) => &c.command_id,
        Kind::StopApp(c) => &c.command_id,
        Kind::StartApp(c) => &c.command_id,
        Kind::AgentUpgrade(c) => &c.command_id,
        Kind::SetEnv(c) => &c.command_id,
        Kind::ArtifactChunk(_)
        | Kind::Welcome(_)
        | Kind::NodeEventAck(_)
        | Kind::TrustBundle(_) => return None,
    };
    (!id.is_empty()).then_some(id.as_str())
}

/// Decodes and checks a queued command: within limits, and carrying the
/// row's command id for the row's node.
pub fn decode_command(
    row: &str,
    command_id: &str,
    node_id: &str,
    bytes: &[u8],
) -> Result<ControllerMessage, RoutedError> {
    let what = "command";
    if bytes.len() > MAX_ROUTED_MESSAGE {
        return Err(RoutedError::TooLarge {
            what,
            row: row.to_owned(),
            len: bytes.len(),
            max: MAX_ROUTED_MESSAGE,
        });
    }
    let message = ControllerMessage::decode(bytes).map_err(|source| RoutedError::Decode {
        what,
        row: row.to_owned(),
        source,
    })?;
    message.validate().map_err(|source| RoutedError::Invalid {
        what,
        row: row.to_owned(),
        source,
    })?;
    let mismatch = |why: String| RoutedError::Mismatch {
        what,
        row: row.to_owned(),
        why,
    };
    if node_id.is_empty() || node_id.len() > MAX_NODE_ID {
        return Err(mismatch(format!(
            "node id of {} bytes; 1 to {MAX_NODE_ID} expected",
            node_id.len()
        )));
    }
    match command_id_of(&message) {
        Some(id) if id == command_id && id.len() <= MAX_COMMAND_ID => Ok(message),
        Some(id) => Err(mismatch(format!(
            "carries command id {}, the row says {}",
            slipway_proto::limits::shown(id),
            slipway_proto::limits::shown(command_id)
        ))),
        None => Err(mismatch("is not a command".to_owned())),
    }
}

/// An answer read back for a routed command.
#[derive(Debug, PartialEq)]
pub enum RoutedEvent {
    /// The agent's Progress.
    Progress(Progress),
    /// The agent's CommandResult.
    Result(CommandResult),
    /// The holder lost the node (or never reached it).
    Gone,
}

/// Decodes and checks an answer to the command `command_id` of row `row`.
pub fn decode_event(
    row: &str,
    command_id: &str,
    kind: &str,
    bytes: &[u8],
) -> Result<RoutedEvent, RoutedError> {
    let what = "answer";
    if bytes.len() > MAX_ROUTED_EVENT {
        return Err(RoutedError::TooLarge {
            what,
            row: row.to_owned(),
            len: bytes.len(),
            max: MAX_ROUTED_EVENT,
        });
    }
    let decode_error = |source| RoutedError::Decode {
        what,
        row: row.to_owned(),
        source,
    };
    let invalid = |source| RoutedError::Invalid {
        what,
        row: row.to_owned(),
        source,
    };
    let (event, id) = match kind {
        KIND_PROGRESS => {
            let p = Progress::decode(bytes).map_err(decode_error)?;
            p.validate().map_err(invalid)?;
            let id = p.command_id.clone();
            (RoutedEvent::Progress(p), id)
        }
        KIND_RESULT => {
            let r = CommandResult::decode(bytes).map_err(decode_error)?;
            r.validate().map_err(invalid)?;
            let id = r.command_id.clone();
            (RoutedEvent::Result(r), id)
        }
        KIND_GONE => return Ok(RoutedEvent::Gone),
        other => {
            return Err(RoutedError::Mismatch {
                what,
                row: row.to_owned(),
                why: format!("unknown kind {}", slipway_proto::limits::shown(other)),
            })
        }
    };
    if id != command_id {
        return Err(RoutedError::Mismatch {
            what,
            row: row.to_owned(),
            why: format!(
                "answers command {}, the row holds {}",
                slipway_proto::limits::shown(&id),
                slipway_proto::limits::shown(command_id)
            ),
        });
    }
    Ok(event)
}

/// A command this replica queued for another.
#[derive(Debug, Clone)]
struct Sent {
    node_id: String,
    /// The row in `node_commands`.
    row: String,
    /// The replica and session it was addressed to.
    replica: String,
    session: i64,
    queued_at: Instant,
    picked: bool,
    /// The holder lost it (or never claimed it): it goes out again only
    /// once the node holds another session.
    lost: bool,
    /// The last answer read.
    seq: i64,
}

/// A command another replica queued, sent on this replica's session.
#[derive(Debug)]
struct Relayed {
    row: String,
    /// The replica that queued it (woken when answers are written).
    sender: String,
    /// The last answer written.
    seq: i64,
    since: Instant,
}

/// Routes commands through the store; cheap to clone.
#[derive(Debug, Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    replica: Replica,
    commands: Commands,
    /// Command id → where this replica queued it. An async lock: sending
    /// and the periodic check decide one at a time (no command queued
    /// twice by both).
    sent: tokio::sync::Mutex<HashMap<String, Sent>>,
    /// Command id → the row of a command relayed for another replica.
    relayed: Mutex<HashMap<String, Relayed>>,
    /// Where this replica's [`Commands`] report on relayed commands.
    relay_tx: mpsc::UnboundedSender<(String, NodeEvent)>,
    relay_rx: Mutex<Option<mpsc::UnboundedReceiver<(String, NodeEvent)>>>,
    /// Since when the store has answered this replica without a failure:
    /// a holder is given [`PICKUP_TIMEOUT`] of a working store to claim a
    /// command (it cannot claim while the database does not answer).
    answered_since: Mutex<Instant>,
    /// Woken when commands were queued for this replica (PostgreSQL
    /// notification).
    claim_wake: tokio::sync::Notify,
    /// Woken when answers to this replica's commands were written.
    answers_wake: tokio::sync::Notify,
    /// True while notifications are received: the poll stays at
    /// [`POLL_EVERY`] then.
    listening: std::sync::atomic::AtomicBool,
}

impl Router {
    /// A router of `replica`, handing answers to `commands`.
    pub fn new(replica: Replica, commands: Commands) -> Self {
        let (relay_tx, relay_rx) = mpsc::unbounded_channel();
        Self {
            inner: Arc::new(Inner {
                replica,
                commands,
                sent: tokio::sync::Mutex::new(HashMap::new()),
                relayed: Mutex::new(HashMap::new()),
                relay_tx,
                relay_rx: Mutex::new(Some(relay_rx)),
                answered_since: Mutex::new(Instant::now()),
                claim_wake: tokio::sync::Notify::new(),
                answers_wake: tokio::sync::Notify::new(),
                listening: std::sync::atomic::AtomicBool::new(false),
            }),
        }
    }

    /// Notes that a store call failed ([`Inner::answered_since`]).
    fn store_failed(&self) {
        *self
            .inner
            .answered_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    /// When a command queued at `queued_at` is overdue for pickup: after
    /// [`PICKUP_TIMEOUT`] of a working store.
    fn pickup_overdue(&self, queued_at: Instant) -> bool {
        let since = *self
            .inner
            .answered_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        queued_at.max(since).elapsed() >= PICKUP_TIMEOUT
    }

    fn relayed(&self) -> std::sync::MutexGuard<'_, HashMap<String, Relayed>> {
        // Single inserts and removes: consistent even after a panic.
        self.inner
            .relayed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Node id → (replica, session) of each of `nodes` whose session a live
    /// replica other than this one holds.
    async fn remote_sessions(
        &self,
        nodes: &[String],
    ) -> Result<HashMap<String, (String, i64)>, StoreError> {
        if nodes.is_empty() {
            return Ok(HashMap::new());
        }
        let replica = &self.inner.replica;
        let now = crate::now_unix();
        // Each replica judged once (on SQLite that opens its lock file).
        let mut judged: HashMap<String, bool> = HashMap::new();
        let mut remote = HashMap::new();
        for (node, session, holder) in replica.store().agent_sessions_of(nodes).await? {
            if holder.id == replica.id() {
                continue;
            }
            let alive = *judged
                .entry(holder.id.clone())
                .or_insert_with(|| replica.is_alive(&holder, now));
            if alive {
                remote.insert(node, (holder.id, session));
            }
        }
        Ok(remote)
    }

    /// Queues `message` for `node_id` to the live replica holding its
    /// session; false if it is no command, no live replica holds the
    /// node, or the store fails (logged).
    pub async fn send(&self, node_id: &str, message: ControllerMessage) -> bool {
        let Some(command_id) = command_id_of(&message).map(str::to_owned) else {
            return false;
        };
        let mut sent = self.inner.sent.lock().await;
        let holders = match self.remote_sessions(&[node_id.to_owned()]).await {
            Ok(holders) => holders,
            Err(err) => {
                tracing::warn!(%node_id, %err, "cannot read which replica holds the node");
                return false;
            }
        };
        let Some((replica, session)) = holders.get(node_id) else {
            return false;
        };
        if let Some(s) = sent.get(&command_id) {
            // The periodic check queued it already (it raced this send).
            if s.node_id == node_id && s.replica == *replica && s.session == *session && !s.lost {
                return true;
            }
        }
        self.queue(&mut sent, &command_id, node_id, replica, *session, &message)
            .await
    }

    /// Queues `message` (`command_id`) for `node_id` to `replica`'s
    /// session `session`, replacing any earlier row of the command.
    async fn queue(
        &self,
        sent: &mut HashMap<String, Sent>,
        command_id: &str,
        node_id: &str,
        replica: &str,
        session: i64,
        message: &ControllerMessage,
    ) -> bool {
        let store = self.inner.replica.store();
        if let Some(old) = sent.remove(command_id) {
            if let Err(err) = store.delete_node_command(&old.row).await {
                tracing::warn!(%command_id, %err, "cannot delete a routed command's old row");
            }
        }
        // Queuing wakes the holder (PostgreSQL): it claims at once rather
        // than at its poll.
        let row = match crate::pki::crypto::random_hex::<12>() {
            Ok(row) => row,
            Err(err) => {
                tracing::warn!(%err, "cannot draw a routed command's id");
                return false;
            }
        };
        let bytes = message.encode_to_vec();
        if let Err(err) = store
            .enqueue_node_command(
                &row,
                command_id,
                node_id,
                self.inner.replica.id(),
                replica,
                &bytes,
                crate::now_unix(),
            )
            .await
        {
            tracing::warn!(%node_id, %command_id, %err, "cannot queue a command for another replica");
            return false;
        }
        tracing::debug!(%node_id, %command_id, %replica, %row, "command queued for the replica holding the node");
        sent.insert(
            command_id.to_owned(),
            Sent {
                node_id: node_id.to_owned(),
                row,
                replica: replica.to_owned(),
                session,
                queued_at: Instant::now(),
                picked: false,
                lost: false,
                seq: 0,
            },
        );
        true
    }

    /// Claims the commands queued for this replica and sends them on the
    /// local sessions; passes their answers back; reads the answers to
    /// the commands this replica queued and re-routes those whose node
    /// moved. At once when woken (PostgreSQL notifications), else every
    /// [`POLL_EVERY`] ([`BUSY_POLL_EVERY`] on SQLite while commands are in
    /// flight), until `stop`.
    pub async fn run(self, sessions: Sessions, stop: CancellationToken) {
        let taken = self
            .inner
            .relay_rx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(mut relay_rx) = taken else {
            tracing::error!("the command router runs twice; the second stops");
            return;
        };
        let listener = tokio::spawn(self.clone().listen(stop.clone()));
        let mut next_poll = Instant::now();
        let mut last_sweep = Instant::now();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                received = relay_rx.recv() => {
                    let Some(first) = received else { break };
                    // What else came meanwhile goes in the same write.
                    let mut answers = vec![first];
                    while answers.len() < MAX_ANSWERS_WRITTEN {
                        match relay_rx.try_recv() {
                            Ok(more) => answers.push(more),
                            Err(_) => break,
                        }
                    }
                    let events: Vec<(NewCommandEvent, String)> = answers
                        .into_iter()
                        .filter_map(|(command_id, event)| self.relay_answer(&command_id, event))
                        .collect();
                    // Written again while the database does not answer; a
                    // shutdown does not wait for it.
                    tokio::select! {
                        () = self.write_events(events) => {}
                        () = stop.cancelled() => break,
                    }
                    continue;
                }
                () = self.inner.claim_wake.notified() => {
                    self.claim(&sessions).await;
                    continue;
                }
                () = self.inner.answers_wake.notified() => {
                    self.answers().await;
                    continue;
                }
                () = tokio::time::sleep_until(next_poll) => {}
            }
            self.claim(&sessions).await;
            self.check(&sessions).await;
            if last_sweep.elapsed() >= SWEEP_EVERY {
                last_sweep = Instant::now();
                self.sweep().await;
            }
            next_poll = Instant::now() + self.poll_every().await;
        }
        listener.abort();
    }

    /// The pause until the next poll ([`Router::run`]).
    async fn poll_every(&self) -> Duration {
        use std::sync::atomic::Ordering;
        if self.inner.listening.load(Ordering::Relaxed) {
            return POLL_EVERY;
        }
        let waiting = !self.inner.sent.lock().await.is_empty();
        if waiting || !self.relayed().is_empty() {
            BUSY_POLL_EVERY
        } else {
            POLL_EVERY
        }
    }

    /// PostgreSQL: receives the notifications for this replica and wakes
    /// [`Router::run`]; listens again after a lost connection (a
    /// notification sent meanwhile is lost: the poll catches up). Returns
    /// at once on SQLite.
    async fn listen(self, stop: CancellationToken) {
        use std::sync::atomic::Ordering;
        let store = self.inner.replica.store().clone();
        let me = self.inner.replica.id().to_owned();
        let mut failing = false;
        let mut listener = loop {
            match store.routing_listener().await {
                Ok(Some(listener)) => break listener,
                Ok(None) => return,
                Err(err) => {
                    if !failing {
                        tracing::warn!(%err, "cannot listen for routed commands; polling meanwhile");
                        failing = true;
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(LISTEN_RETRY_EVERY) => {}
            }
        };
        self.inner.listening.store(true, Ordering::Relaxed);
        loop {
            let received = tokio::select! {
                () = stop.cancelled() => return,
                received = listener.recv() => received,
            };
            match received {
                Ok(notification) => {
                    if failing {
                        failing = false;
                        self.inner.listening.store(true, Ordering::Relaxed);
                        tracing::info!("listening for routed commands again");
                    }
                    match RoutingWake::parse(notification.payload(), &me) {
                        Some(RoutingWake::Commands) => self.inner.claim_wake.notify_one(),
                        Some(RoutingWake::Answers) => self.inner.answers_wake.notify_one(),
                        None => {}
                    }
                }
                Err(err) => {
                    // The listener connects again on the next receive.
                    if !failing {
                        failing = true;
                        self.inner.listening.store(false, Ordering::Relaxed);
                        tracing::warn!(%err, "lost the notifications of routed commands; polling meanwhile");
                    }
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(LISTEN_RETRY_EVERY) => {}
                    }
                }
            }
        }
    }

    /// Holder side: claims the commands queued for this replica and sends
    /// each on its node's session here.
    async fn claim(&self, sessions: &Sessions) {
        let replica = &self.inner.replica;
        let claimed = match replica
            .store()
            .claim_node_commands(replica.id(), crate::now_unix(), CLAIM_BATCH)
            .await
        {
            Ok(claimed) => claimed,
            Err(err) => {
                self.store_failed();
                tracing::warn!(%err, "cannot claim commands routed to this replica");
                return;
            }
        };
        if claimed.len() >= usize::try_from(CLAIM_BATCH).unwrap_or(usize::MAX) {
            // More may wait: claimed on the next turn of the loop.
            self.inner.claim_wake.notify_one();
        }
        let mut refused = Vec::new();
        for c in claimed {
            let message = match decode_command(&c.id, &c.command_id, &c.node_id, &c.message) {
                Ok(message) => message,
                Err(err) => {
                    tracing::warn!(sender = %slipway_proto::limits::shown(&c.sender_replica), %err, "refused a routed command");
                    refused.push((
                        NewCommandEvent {
                            command_row: c.id.clone(),
                            seq: 1,
                            kind: KIND_GONE,
                            payload: Vec::new(),
                        },
                        c.sender_replica.clone(),
                    ));
                    continue;
                }
            };
            // Registered before sending, so a fast answer is never lost.
            self.relayed().insert(
                c.command_id.clone(),
                Relayed {
                    row: c.id.clone(),
                    sender: c.sender_replica.clone(),
                    seq: 0,
                    since: Instant::now(),
                },
            );
            self.inner.commands.register_relay(
                &c.command_id,
                &c.node_id,
                self.inner.relay_tx.clone(),
                message.clone(),
            );
            tracing::debug!(node_id = %c.node_id, command_id = %c.command_id, sender = %c.sender_replica, "relaying a routed command");
            if !sessions.send_local(&c.node_id, message).await {
                // Written with the other answers by the loop.
                let _ = self
                    .inner
                    .relay_tx
                    .send((c.command_id.clone(), NodeEvent::Disconnected));
            }
        }
        self.write_events(refused).await;
    }

    /// Holder side: the row to write back for the sender of a relayed
    /// command, with that sender; None if there is nothing to write.
    fn relay_answer(
        &self,
        command_id: &str,
        event: NodeEvent,
    ) -> Option<(NewCommandEvent, String)> {
        let (kind, payload, last) = match event {
            NodeEvent::Progress(p) => (KIND_PROGRESS, p.encode_to_vec(), false),
            NodeEvent::Result(r) => (KIND_RESULT, r.encode_to_vec(), true),
            NodeEvent::Disconnected => (KIND_GONE, Vec::new(), true),
            // Sent again on the node's new session here: answers follow.
            NodeEvent::Reconnected => return None,
        };
        let (row, seq, sender) = {
            let mut relayed = self.relayed();
            let entry = relayed.get_mut(command_id)?;
            entry.seq += 1;
            let next = (entry.row.clone(), entry.seq, entry.sender.clone());
            if last {
                relayed.remove(command_id);
            }
            next
        };
        if last {
            self.inner.commands.forget(command_id);
        }
        Some((
            NewCommandEvent {
                command_row: row,
                seq,
                kind,
                payload,
            },
            sender,
        ))
    }

    /// Holder side: writes `events` back (one statement for many), trying
    /// again while the database does not answer, and wakes their senders.
    async fn write_events(&self, events: Vec<(NewCommandEvent, String)>) {
        if events.is_empty() {
            return;
        }
        let store = self.inner.replica.store();
        let senders: HashSet<String> = events.iter().map(|(_, s)| s.clone()).collect();
        let rows: Vec<NewCommandEvent> = events.into_iter().map(|(e, _)| e).collect();
        let written = crate::store::while_unavailable(ANSWER_RETRY_FOR, ANSWER_RETRY_EVERY, || {
            store.add_node_command_events(&rows, crate::now_unix())
        })
        .await;
        if let Err(err) = written {
            tracing::warn!(rows = rows.len(), %err, "cannot pass nodes' answers back to the replicas that sent the commands");
            return;
        }
        for sender in senders {
            if let Err(err) = store.notify_replica(&sender, RoutingWake::Answers).await {
                // Its poll reads the answers a little later.
                tracing::debug!(%sender, %err, "cannot wake the replica waiting on answers");
            }
        }
    }

    /// Sender side, when woken: reads the answers to the commands this
    /// replica queued and forgets those nobody waits on any more.
    async fn answers(&self) {
        let mut sent = self.inner.sent.lock().await;
        if sent.is_empty() {
            return;
        }
        // Read under the lock: a command in `sent` was registered before
        // it was queued, so it is among these while it is waited on.
        let pending = self.inner.commands.routable();
        self.read_answers(&mut sent).await;
        self.forget_done(&mut sent, &pending).await;
    }

    /// Deletes the rows of the commands in `sent` nobody waits on any more
    /// (answered, timed out): not among `pending`.
    async fn forget_done(&self, sent: &mut HashMap<String, Sent>, pending: &[(String, String)]) {
        let waiting: HashSet<&str> = pending.iter().map(|(c, _)| c.as_str()).collect();
        let done: Vec<String> = sent
            .keys()
            .filter(|c| !waiting.contains(c.as_str()))
            .cloned()
            .collect();
        let rows: Vec<String> = done
            .iter()
            .filter_map(|c| sent.remove(c))
            .map(|s| s.row)
            .collect();
        if let Err(err) = self.inner.replica.store().delete_node_commands(&rows).await {
            tracing::warn!(rows = rows.len(), %err, "cannot delete routed commands");
        }
    }

    /// Sender side: reads the answers to the commands this replica queued
    /// and hands them on; routes again the commands whose node moved;
    /// reports those whose node is gone; forgets those nobody waits on.
    async fn check(&self, sessions: &Sessions) {
        let commands = &self.inner.commands;
        let mut sent = self.inner.sent.lock().await;
        // Read under the lock (see `answers`).
        let pending = commands.routable();
        let away: Vec<String> = pending
            .iter()
            .filter(|(_, node)| !sessions.contains(node))
            .map(|(_, node)| node.clone())
            .collect();
        if sent.is_empty() && away.is_empty() {
            return;
        }
        let store = self.inner.replica.store().clone();
        self.read_answers(&mut sent).await;
        self.forget_done(&mut sent, &pending).await;

        // Rows not claimed in time: their holder is taken for gone.
        if sent
            .values()
            .any(|s| !s.picked && !s.lost && self.pickup_overdue(s.queued_at))
        {
            match store.node_command_states(self.inner.replica.id()).await {
                Ok(states) => {
                    let picked: HashSet<String> = states
                        .into_iter()
                        .filter(|s| s.picked_at.is_some())
                        .map(|s| s.id)
                        .collect();
                    for (command_id, s) in sent.iter_mut() {
                        if s.picked || s.lost {
                            continue;
                        }
                        if picked.contains(&s.row) {
                            s.picked = true;
                        } else if self.pickup_overdue(s.queued_at) {
                            match store.withdraw_node_command(&s.row).await {
                                Ok(true) => {
                                    tracing::warn!(
                                        node_id = %s.node_id, %command_id, replica = %s.replica,
                                        "the replica holding the node did not take the command; taken for gone"
                                    );
                                    s.lost = true;
                                    commands.notify(command_id, NodeEvent::Disconnected);
                                }
                                Ok(false) => s.picked = true,
                                Err(err) => {
                                    self.store_failed();
                                    tracing::warn!(%err, "cannot withdraw a routed command");
                                }
                            }
                        }
                    }
                }
                Err(err) => {
                    self.store_failed();
                    tracing::warn!(%err, "cannot read the routed commands' state");
                }
            }
        }

        // Where the nodes away from this replica are now.
        let holders = match self.remote_sessions(&away).await {
            Ok(holders) => holders,
            Err(err) => {
                self.store_failed();
                tracing::warn!(%err, "cannot read which replicas hold the nodes");
                return;
            }
        };
        let mut back = Vec::new();
        for (command_id, node_id) in &pending {
            if sessions.contains(node_id) {
                // Back on this replica: its session got the command again.
                if let Some(s) = sent.remove(command_id) {
                    back.push(s.row);
                }
                continue;
            }
            let current = sent.get(command_id).cloned();
            match (current, holders.get(node_id)) {
                (Some(s), Some((replica, session)))
                    if s.replica == *replica && s.session == *session =>
                {
                    // Same session: still on its way, or lost with a holder
                    // that still looks alive (then the node must move).
                }
                (_, Some((replica, session))) => {
                    let Some(message) = commands.message(command_id) else {
                        continue;
                    };
                    tracing::info!(%node_id, %command_id, %replica, "node moved: sending the command again to the replica now holding it");
                    if self
                        .queue(&mut sent, command_id, node_id, replica, *session, &message)
                        .await
                    {
                        commands.notify(command_id, NodeEvent::Reconnected);
                    }
                }
                (Some(s), None) if !s.lost => {
                    if let Some(s) = sent.get_mut(command_id) {
                        s.lost = true;
                    }
                    commands.notify(command_id, NodeEvent::Disconnected);
                }
                (_, None) => {}
            }
        }
        if let Err(err) = store.delete_node_commands(&back).await {
            tracing::warn!(rows = back.len(), %err, "cannot delete routed commands");
        }
    }

    /// Reads (and deletes, in the same statement) the answers to this
    /// replica's routed commands and hands them to [`Commands`].
    async fn read_answers(&self, sent: &mut HashMap<String, Sent>) {
        let store = self.inner.replica.store();
        let by_row: HashMap<String, String> = sent
            .iter()
            .map(|(c, s)| (s.row.clone(), c.clone()))
            .collect();
        // A full read leaves more: read on (a bounded number of times).
        for _ in 0..8 {
            let events = match store
                .take_node_command_events(self.inner.replica.id())
                .await
            {
                Ok(events) => events,
                Err(err) => {
                    self.store_failed();
                    tracing::warn!(%err, "cannot read the answers to routed commands");
                    return;
                }
            };
            let full = events.len() >= crate::store::MAX_EVENTS_READ;
            self.hand_on(sent, &by_row, events);
            if !full {
                break;
            }
        }
    }

    /// Hands the answers `events` to [`Commands`] (each once, in order);
    /// `by_row` maps `sent`'s rows to their command ids.
    fn hand_on(
        &self,
        sent: &mut HashMap<String, Sent>,
        by_row: &HashMap<String, String>,
        events: Vec<crate::store::CommandEventRow>,
    ) {
        for e in events {
            let Some(command_id) = by_row.get(&e.command_row) else {
                continue;
            };
            let Some(s) = sent.get_mut(command_id) else {
                continue;
            };
            if e.seq <= s.seq {
                continue;
            }
            s.seq = e.seq;
            s.picked = true;
            let commands = &self.inner.commands;
            match decode_event(&e.command_row, command_id, &e.kind, &e.payload) {
                // `Commands` checks the node is the one the command is for.
                Ok(RoutedEvent::Progress(p)) => commands.progress(&s.node_id, p),
                Ok(RoutedEvent::Result(r)) => commands.result(&s.node_id, r),
                Ok(RoutedEvent::Gone) => {
                    if !s.lost {
                        s.lost = true;
                        commands.notify(command_id, NodeEvent::Disconnected);
                    }
                }
                Err(err) => {
                    tracing::warn!(replica = %s.replica, %err, "refused an answer from another replica")
                }
            }
        }
    }

    /// Deletes rows past [`FORGET_AFTER`] and forgets relayed commands
    /// as old (their sender waits no more).
    async fn sweep(&self) {
        let cutoff = crate::now_unix()
            .saturating_sub(i64::try_from(FORGET_AFTER.as_secs()).unwrap_or(i64::MAX));
        match self
            .inner
            .replica
            .store()
            .delete_node_commands_before(cutoff)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "deleted old routed commands"),
            Err(err) => tracing::warn!(%err, "cannot delete old routed commands"),
        }
        let old: Vec<String> = self
            .relayed()
            .iter()
            .filter(|(_, r)| r.since.elapsed() >= FORGET_AFTER)
            .map(|(c, _)| c.clone())
            .collect();
        for command_id in old {
            self.relayed().remove(&command_id);
            self.inner.commands.forget(&command_id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::commands::Answer;
    use crate::store::Store;
    use slipway_proto::v1::{Deploy, StatusRequest, TrustBundle};

    /// One replica of a test, routing through its own router. Keep
    /// `replica` bound to the end of the test: it holds the lock that says
    /// the replica lives.
    struct Side {
        replica: Replica,
        commands: Commands,
        sessions: Sessions,
        router: Router,
    }

    /// Starts a replica on `store` serving `grpc` (a name only: nothing
    /// listens), with its sessions routed through its router.
    async fn side(store: &Store, dir: &std::path::Path, grpc: &str) -> Side {
        let replica = Replica::start(store, dir, grpc.into(), None).await.unwrap();
        let commands = Commands::new();
        let sessions = Sessions::for_replica(replica.clone());
        let router = Router::new(replica.clone(), commands.clone());
        sessions.route_through(router.clone());
        Side {
            replica,
            commands,
            sessions,
            router,
        }
    }

    /// Replica `a` asks node n-1, whose session replica `b` holds (a real
    /// SQLite store, both routers running): b's session gets the command,
    /// the agent's answer reaches a's waiter, a report of another node is
    /// not passed on, and the rows are gone after. Then b stops claiming
    /// (it still looks alive): a's next ask hears Disconnected once the
    /// row was not claimed within the pickup timeout.
    #[tokio::test]
    async fn a_command_goes_to_the_holder_and_its_answer_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let Side {
            replica: a,
            commands: a_commands,
            sessions: a_sessions,
            router: a_router,
        } = side(&store, dir.path(), "127.0.0.1:1").await;
        let Side {
            replica: _b,
            commands: b_commands,
            sessions: b_sessions,
            router: b_router,
        } = side(&store, dir.path(), "127.0.0.1:2").await;
        let handle = b_sessions.register("n-1");
        let (out, mut agent) = mpsc::channel(8);
        handle.accept_commands(out);
        b_sessions
            .record_open("n-1", handle.session_id())
            .await
            .unwrap();
        let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
        let a_task = tokio::spawn(a_router.run(a_sessions.clone(), stop_a.clone()));
        let b_task = tokio::spawn(b_router.run(b_sessions.clone(), stop_b.clone()));

        let ask = |id: &'static str| {
            let (commands, sessions) = (a_commands.clone(), a_sessions.clone());
            tokio::spawn(async move {
                commands
                    .ask(&sessions, "n-1", id, status(id), Duration::from_secs(10))
                    .await
            })
        };
        let asking = ask("s-1.n-1");
        let got = tokio::time::timeout(Duration::from_secs(5), agent.recv())
            .await
            .expect("the command reached b's session")
            .unwrap()
            .unwrap();
        assert_eq!(got, status("s-1.n-1"));
        let result = |message: &str| CommandResult {
            command_id: "s-1.n-1".to_owned(),
            message: message.to_owned(),
            ..CommandResult::default()
        };
        b_commands.result("n-2", result("not n-1's word"));
        b_commands.progress(
            "n-1",
            Progress {
                command_id: "s-1.n-1".to_owned(),
                step: "status".to_owned(),
                ..Progress::default()
            },
        );
        b_commands.result("n-1", result("fine"));
        assert_eq!(asking.await.unwrap(), Answer::Result(result("fine")));
        let mut cleaned = false;
        for _ in 0..50 {
            if store.node_command_states(a.id()).await.unwrap().is_empty() {
                cleaned = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(cleaned, "the answered command's row is deleted");
        assert!(store.node_command_events(a.id()).await.unwrap().is_empty());

        stop_b.cancel();
        b_task.await.unwrap();
        let started = Instant::now();
        let answer = ask("s-2.n-1").await.unwrap();
        assert_eq!(answer, Answer::Disconnected);
        let waited = started.elapsed();
        assert!(
            waited >= PICKUP_TIMEOUT && waited < PICKUP_TIMEOUT + Duration::from_secs(2),
            "{waited:?}"
        );
        assert!(store.node_command_states(a.id()).await.unwrap().is_empty());
        // A node no live replica holds cannot be sent to at all.
        assert!(!a_sessions.send("n-9", status("s-3.n-9")).await);
        stop_a.cancel();
        a_task.await.unwrap();
    }

    /// On PostgreSQL the replicas wake each other (LISTEN/NOTIFY): asks
    /// routed one after the other are each answered in a few round trips
    /// of the database, not after the holder's and then the sender's poll
    /// (about [`POLL_EVERY`] an ask, on average).
    #[tokio::test]
    async fn on_postgres_routed_asks_do_not_wait_for_the_poll() {
        let Some(store) = crate::store::testing::postgres_store().await else {
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let a = side(&store, dir.path(), "127.0.0.1:1").await;
        let b = side(&store, dir.path(), "127.0.0.1:2").await;
        let handle = b.sessions.register("n-1");
        let (out, mut agent) = mpsc::channel(8);
        handle.accept_commands(out);
        b.sessions
            .record_open("n-1", handle.session_id())
            .await
            .unwrap();
        let stop = CancellationToken::new();
        let a_task = tokio::spawn(a.router.clone().run(a.sessions.clone(), stop.clone()));
        let b_task = tokio::spawn(b.router.clone().run(b.sessions.clone(), stop.clone()));
        // The agent answers each command at once, through b.
        let b_commands = b.commands.clone();
        let agent_task = tokio::spawn(async move {
            while let Some(Ok(message)) = agent.recv().await {
                let command_id = command_id_of(&message).unwrap().to_owned();
                b_commands.result(
                    "n-1",
                    CommandResult {
                        command_id,
                        message: "fine".to_owned(),
                        ..CommandResult::default()
                    },
                );
            }
        });
        for router in [&a.router, &b.router] {
            let mut listening = false;
            for _ in 0..50 {
                if router
                    .inner
                    .listening
                    .load(std::sync::atomic::Ordering::Relaxed)
                {
                    listening = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(listening, "each router listens for notifications");
        }
        const ASKS: u32 = 30;
        let started = Instant::now();
        for i in 0..ASKS {
            let id = format!("s-{i}.n-1");
            let answer = a
                .commands
                .ask(
                    &a.sessions,
                    "n-1",
                    &id,
                    status(&id),
                    Duration::from_secs(10),
                )
                .await;
            match answer {
                Answer::Result(r) => assert_eq!(r.command_id, id),
                other => panic!("{other:?}"),
            }
        }
        let took = started.elapsed();
        assert!(
            took < POLL_EVERY * ASKS / 2,
            "{ASKS} routed asks took {took:?}: woken, each takes far less than a poll"
        );
        stop.cancel();
        a_task.await.unwrap();
        b_task.await.unwrap();
        drop(handle);
        agent_task.abort();
    }

    fn status(id: &str) -> ControllerMessage {
        ControllerMessage {
            kind: Some(controller_message::Kind::StatusRequest(StatusRequest {
                command_id: id.to_owned(),
            })),
        }
    }

    /// A node whose session was on replica a (the command's sender) moves
    /// to replica b mid-command: a's waiter hears Disconnected, then
    /// Reconnected when b's session got the command again through the
    /// store; b's answer reaches a.
    #[tokio::test]
    async fn a_node_that_moves_to_another_replica_gets_its_command_again_there() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let Side {
            replica: _a,
            commands: a_commands,
            sessions: a_sessions,
            router: a_router,
        } = side(&store, dir.path(), "127.0.0.1:1").await;
        let Side {
            replica: _b,
            commands: b_commands,
            sessions: b_sessions,
            router: b_router,
        } = side(&store, dir.path(), "127.0.0.1:2").await;
        let stop = CancellationToken::new();
        let a_task = tokio::spawn(a_router.run(a_sessions.clone(), stop.clone()));
        let b_task = tokio::spawn(b_router.run(b_sessions.clone(), stop.clone()));

        // On a first: the command goes out on a's own session.
        let on_a = a_sessions.register("n-1");
        let (out, mut agent_a) = mpsc::channel(8);
        on_a.accept_commands(out);
        a_sessions
            .record_open("n-1", on_a.session_id())
            .await
            .unwrap();
        let (tx, mut events) = mpsc::unbounded_channel();
        let message = status("d-1.n-1");
        a_commands.register("d-1.n-1", "n-1", tx, message.clone());
        assert!(a_sessions.send("n-1", message.clone()).await);
        assert_eq!(agent_a.recv().await.unwrap().unwrap(), message);

        // The session ends on a (as session.rs does it) and opens on b.
        let session = on_a.session_id();
        drop(on_a);
        a_sessions.record_closed("n-1", session).await;
        a_commands.disconnected("n-1");
        assert!(matches!(
            events.recv().await,
            Some((_, NodeEvent::Disconnected))
        ));
        let on_b = b_sessions.register("n-1");
        let (out, mut agent_b) = mpsc::channel(8);
        on_b.accept_commands(out);
        b_sessions
            .record_open("n-1", on_b.session_id())
            .await
            .unwrap();
        let again = tokio::time::timeout(Duration::from_secs(5), agent_b.recv())
            .await
            .expect("b's session got the command again")
            .unwrap()
            .unwrap();
        assert_eq!(again, message);
        assert!(matches!(
            events.recv().await,
            Some((_, NodeEvent::Reconnected))
        ));
        let result = CommandResult {
            command_id: "d-1.n-1".to_owned(),
            message: "done on b".to_owned(),
            ..CommandResult::default()
        };
        b_commands.result("n-1", result.clone());
        let answer = tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .expect("b's answer reached a");
        match answer {
            Some((id, NodeEvent::Result(r))) => {
                assert_eq!(id, "d-1.n-1");
                assert_eq!(r, result);
            }
            other => panic!("{other:?}"),
        }
        stop.cancel();
        a_task.await.unwrap();
        b_task.await.unwrap();
    }

    #[test]
    fn only_commands_with_an_id_are_routed() {
        assert_eq!(command_id_of(&status("s-1.n-a")), Some("s-1.n-a"));
        assert_eq!(command_id_of(&status("")), None);
        let bundle = ControllerMessage {
            kind: Some(controller_message::Kind::TrustBundle(TrustBundle::default())),
        };
        assert_eq!(command_id_of(&bundle), None);
        assert_eq!(command_id_of(&ControllerMessage::default()), None);
    }

    #[test]
    fn queued_commands_are_checked_before_they_go_out() {
        let bytes = status("s-1.n-a").encode_to_vec();
        assert_eq!(
            decode_command("r", "s-1.n-a", "n-a", &bytes).unwrap(),
            status("s-1.n-a")
        );
        let err = decode_command("r", "s-2.n-a", "n-a", &bytes).unwrap_err();
        assert!(err.to_string().contains("carries command id"), "{err}");
        let err = decode_command("r", "s-1.n-a", "", &bytes).unwrap_err();
        assert!(err.to_string().contains("node id"), "{err}");
        let err = decode_command("r", "s-1.n-a", "n-a", &[0xff, 0xff, 0xff]).unwrap_err();
        assert!(err.to_string().contains("does not decode"), "{err}");
        let big = vec![0; MAX_ROUTED_MESSAGE + 1];
        let err = decode_command("r", "s-1.n-a", "n-a", &big).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
        // A message breaking a field's limit is refused as from an agent.
        let bad = ControllerMessage {
            kind: Some(controller_message::Kind::Deploy(Deploy {
                command_id: "d-1.n-a".to_owned(),
                app: "no spaces allowed".to_owned(),
                ..Deploy::default()
            })),
        };
        let err = decode_command("r", "d-1.n-a", "n-a", &bad.encode_to_vec()).unwrap_err();
        assert!(err.to_string().contains("app"), "{err}");
    }

    #[test]
    fn answers_are_checked_and_must_be_for_the_rows_command() {
        let result = CommandResult {
            command_id: "d-1.n-a".to_owned(),
            message: "ok".to_owned(),
            ..CommandResult::default()
        };
        let bytes = result.encode_to_vec();
        assert_eq!(
            decode_event("r", "d-1.n-a", KIND_RESULT, &bytes).unwrap(),
            RoutedEvent::Result(result)
        );
        let err = decode_event("r", "d-1.n-b", KIND_RESULT, &bytes).unwrap_err();
        assert!(err.to_string().contains("answers command"), "{err}");
        let err = decode_event("r", "d-1.n-a", "other", &bytes).unwrap_err();
        assert!(err.to_string().contains("unknown kind"), "{err}");
        let long = Progress {
            command_id: "d-1.n-a".to_owned(),
            message: "x".repeat(slipway_proto::limits::MAX_MESSAGE + 1),
            ..Progress::default()
        };
        let err = decode_event("r", "d-1.n-a", KIND_PROGRESS, &long.encode_to_vec()).unwrap_err();
        assert!(err.to_string().contains("message"), "{err}");
        assert_eq!(
            decode_event("r", "d-1.n-a", KIND_GONE, &[]).unwrap(),
            RoutedEvent::Gone
        );
    }
}
