//! The live agent sessions of this controller process: node id → a handle
//! that closes the session. Used to count connected nodes (heartbeat
//! interval), to close a revoked node's stream, to replace a stale session
//! when a node reconnects, and to end every stream at shutdown (graceful
//! HTTP/2 shutdown otherwise waits for long-lived streams forever).
//!
//! With a [`Replica`] it also records each session in the store, so that
//! any replica tells a node online when any live replica holds its session
//! ([`Sessions::online`]); with a [`Router`] a command for such a node goes
//! to that replica through the store ([`Sessions::send`]).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use slipway_proto::v1::ControllerMessage;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::replicas::Replica;
use super::routing::Router;
use crate::store::ReplicaRow;

/// The outbound half of a session: what the controller sends to the agent.
pub type Outbound = mpsc::Sender<Result<ControllerMessage, tonic::Status>>;

/// Why the controller closed a session; becomes the gRPC status the agent sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The node was revoked (`node revoke`).
    Revoked,
    /// The same node opened a newer session (e.g. after a network change the
    /// old TCP connection was not yet noticed dead).
    Replaced,
    /// The controller is shutting down.
    Shutdown,
}

/// Closes one session: cancellation plus the first reason given.
#[derive(Debug, Default)]
struct Closer {
    token: CancellationToken,
    reason: OnceLock<CloseReason>,
}

impl Closer {
    fn close(&self, reason: CloseReason) {
        // The first reason wins; later ones describe the same close.
        let _ = self.reason.set(reason);
        self.token.cancel();
    }
}

#[derive(Debug)]
struct Entry {
    /// Tells this session apart from a newer one of the same node.
    session_id: u64,
    closer: Arc<Closer>,
    /// Where commands for this node go; set once the Welcome is queued
    /// ([`SessionHandle::accept_commands`]), so it is always sent first.
    outbound: Option<Outbound>,
}

/// The registry; cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Sessions {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    live: Mutex<HashMap<String, Entry>>,
    next_id: AtomicU64,
    /// This replica, when sessions are recorded in the store.
    replica: Option<Replica>,
    /// Routes commands for nodes other replicas hold (set once at start).
    router: OnceLock<Router>,
}

/// The nodes online as of one look: this replica's sessions and those
/// other live replicas hold.
#[derive(Debug, Default)]
pub struct Online {
    local: HashSet<String>,
    remote: HashMap<String, Arc<ReplicaRow>>,
}

impl Online {
    /// True if some live replica holds `node_id`'s session.
    pub fn contains(&self, node_id: &str) -> bool {
        self.local.contains(node_id) || self.remote.contains_key(node_id)
    }
}

/// Held by a running session; dropping it unregisters the session.
#[derive(Debug)]
pub struct SessionHandle {
    sessions: Sessions,
    node_id: String,
    session_id: u64,
    closer: Arc<Closer>,
}

impl SessionHandle {
    /// Tells this session apart from another of the same node.
    pub fn session_id(&self) -> u64 {
        self.session_id
    }

    /// Resolves when the controller closes this session, with the reason.
    pub async fn closed(&self) -> CloseReason {
        self.closer.token.cancelled().await;
        self.closer
            .reason
            .get()
            .copied()
            .unwrap_or(CloseReason::Shutdown)
    }

    /// From now on [`Sessions::send`] queues commands on `outbound` (unless
    /// a newer session of the node replaced this one).
    pub fn accept_commands(&self, outbound: Outbound) {
        let mut live = self.sessions.lock();
        if let Some(entry) = live
            .get_mut(&self.node_id)
            .filter(|e| e.session_id == self.session_id)
        {
            entry.outbound = Some(outbound);
        }
    }
}

impl Drop for SessionHandle {
    fn drop(&mut self) {
        let mut live = self.sessions.lock();
        // Only remove our own entry: a newer session may have replaced it.
        if live
            .get(&self.node_id)
            .is_some_and(|e| e.session_id == self.session_id)
        {
            live.remove(&self.node_id);
        }
    }
}

impl Sessions {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty registry of `replica`, recording sessions in its store.
    pub fn for_replica(replica: Replica) -> Self {
        Self {
            inner: Arc::new(Inner {
                replica: Some(replica),
                ..Inner::default()
            }),
        }
    }

    /// From now on commands for nodes whose session another live replica
    /// holds go through `router` (once; a second router is ignored).
    pub fn route_through(&self, router: Router) {
        if self.inner.router.set(router).is_err() {
            tracing::warn!("commands are routed already; a second router is ignored");
        }
    }

    /// Records in the store that this replica holds `node_id`'s session
    /// `session_id` (nothing without a replica).
    pub async fn record_open(
        &self,
        node_id: &str,
        session_id: u64,
    ) -> Result<(), crate::store::StoreError> {
        match &self.inner.replica {
            Some(replica) => {
                replica
                    .store()
                    .open_agent_session(node_id, replica.id(), session_id, crate::now_unix())
                    .await
            }
            None => Ok(()),
        }
    }

    /// Clears the store's record of `node_id`'s session `session_id`, if it
    /// is still this replica's.
    pub async fn record_closed(&self, node_id: &str, session_id: u64) {
        if let Some(replica) = &self.inner.replica {
            if let Err(err) = replica
                .store()
                .close_agent_session(node_id, replica.id(), session_id)
                .await
            {
                tracing::warn!(%node_id, %err, "cannot clear the session record");
            }
        }
    }

    /// The nodes online now: this replica's sessions and those of other
    /// live replicas. A store that cannot be read leaves this replica's
    /// own (logged).
    pub async fn online(&self) -> Online {
        let local: HashSet<String> = self.lock().keys().cloned().collect();
        let remote = match &self.inner.replica {
            Some(replica) => match replica.remote_holders(crate::now_unix()).await {
                Ok(remote) => remote,
                Err(err) => {
                    tracing::warn!(%err, "cannot read other replicas' sessions");
                    HashMap::new()
                }
            },
            None => HashMap::new(),
        };
        Online { local, remote }
    }

    /// Why no command reaches `node_id`: another live replica holds its
    /// session (named) but the command could not be routed there (no
    /// router, or the store failed), or no replica does.
    pub async fn unreachable(&self, node_id: &str) -> String {
        let mut online = self.online().await;
        match online.remote.remove(node_id) {
            Some(holder) => format!(
                "node {node_id}'s session is held by replica {} ({}); this replica cannot \
                 reach it",
                holder.id, holder.grpc_addr
            ),
            None => "unreachable (no live session)".to_owned(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // The map stays consistent even if a holder panicked (every change
        // is a single insert or remove), so a poisoned lock is still usable.
        self.inner
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a new session of `node_id`, closing any older one of the
    /// same node ([`CloseReason::Replaced`]): a node holds one stream.
    pub fn register(&self, node_id: &str) -> SessionHandle {
        let closer = Arc::new(Closer::default());
        let session_id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let old = self.lock().insert(
            node_id.to_owned(),
            Entry {
                session_id,
                closer: closer.clone(),
                outbound: None,
            },
        );
        if let Some(old) = old {
            old.closer.close(CloseReason::Replaced);
        }
        SessionHandle {
            sessions: self.clone(),
            node_id: node_id.to_owned(),
            session_id,
            closer,
        }
    }

    /// Number of nodes holding a session.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// True when no node holds a session.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ids of the nodes holding a session.
    pub fn node_ids(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// True if `node_id` holds a session.
    pub fn contains(&self, node_id: &str) -> bool {
        self.lock().contains_key(node_id)
    }

    /// Queues `message` on `node_id`'s session: this replica's, or, with a
    /// router, the one another live replica holds (through the store);
    /// false if no replica can reach the node.
    pub async fn send(&self, node_id: &str, message: ControllerMessage) -> bool {
        if self.contains(node_id) {
            return self.send_local(node_id, message).await;
        }
        match self.inner.router.get() {
            Some(router) => router.send(node_id, message).await,
            None => false,
        }
    }

    /// Queues `message` on `node_id`'s session with this replica; false if
    /// the node holds none here or it ended meanwhile.
    pub(crate) async fn send_local(&self, node_id: &str, message: ControllerMessage) -> bool {
        // Cloned out so the lock is not held across the await.
        let outbound = self.lock().get(node_id).and_then(|e| e.outbound.clone());
        match outbound {
            Some(outbound) => outbound.send(Ok(message)).await.is_ok(),
            None => false,
        }
    }

    /// Closes `node_id`'s session, if it has one; true if it had.
    pub fn close(&self, node_id: &str, reason: CloseReason) -> bool {
        let live = self.lock();
        match live.get(node_id) {
            Some(entry) => {
                entry.closer.close(reason);
                true
            }
            None => false,
        }
    }

    /// Closes every session (controller shutdown).
    pub fn close_all(&self, reason: CloseReason) {
        for entry in self.lock().values() {
            entry.closer.close(reason);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn commands_reach_a_session_only_once_it_accepts_them() {
        let sessions = Sessions::new();
        let handle = sessions.register("n-1");
        let msg = ControllerMessage::default();
        assert!(!sessions.send("n-1", msg.clone()).await);
        let (tx, mut rx) = mpsc::channel(1);
        handle.accept_commands(tx);
        assert!(sessions.send("n-1", msg.clone()).await);
        assert_eq!(rx.recv().await.unwrap().unwrap(), msg);
        assert!(!sessions.send("n-2", msg).await);
    }

    #[tokio::test]
    async fn newer_session_replaces_and_old_drop_keeps_it() {
        let sessions = Sessions::new();
        let first = sessions.register("n-1");
        let second = sessions.register("n-1");
        assert_eq!(first.closed().await, CloseReason::Replaced);
        drop(first);
        assert!(sessions.contains("n-1"));
        assert!(sessions.close("n-1", CloseReason::Revoked));
        assert_eq!(second.closed().await, CloseReason::Revoked);
        drop(second);
        assert!(sessions.is_empty());
        assert!(!sessions.close("n-1", CloseReason::Revoked));
    }
}
