//! Command routing: the commands sent to nodes and not answered yet, by
//! command id, so that an agent's Progress and CommandResult reach the
//! deployment (or one-off ask) that sent the command, and only when they
//! come from the node it was sent to.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use slipway_proto::v1::{CommandResult, ControllerMessage, Progress};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::link::registry::Sessions;

/// What a session reports for a command.
#[derive(Debug)]
pub(crate) enum NodeEvent {
    Progress(Progress),
    Result(CommandResult),
    /// The node's session ended.
    Disconnected,
    /// The node opened a new session; the command was sent again.
    Reconnected,
}

#[derive(Debug)]
struct Pending {
    node_id: String,
    events: mpsc::UnboundedSender<(String, NodeEvent)>,
    /// The command, sent again when the node reconnects (the agent answers
    /// a command id it already ran with its recorded result).
    message: ControllerMessage,
    /// Set when a new session of the node got the command again.
    resent: bool,
    /// Sent for another replica (`super::routing`): its answers go back
    /// there, and this replica never routes it on.
    relay: bool,
}

/// Routes agents' Progress and CommandResult to the deployment waiting for
/// them, by command id; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Commands {
    pending: Arc<Mutex<HashMap<String, Pending>>>,
}

impl Commands {
    /// No commands in flight.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        // Single inserts and removes: consistent even after a panic.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn register(
        &self,
        command_id: &str,
        node_id: &str,
        events: mpsc::UnboundedSender<(String, NodeEvent)>,
        message: ControllerMessage,
    ) {
        self.lock().insert(
            command_id.to_owned(),
            Pending {
                node_id: node_id.to_owned(),
                events,
                message,
                resent: false,
                relay: false,
            },
        );
    }

    /// Registers a command another replica routed here to `node_id`'s
    /// session: its reports go to `events`, for that replica.
    pub(crate) fn register_relay(
        &self,
        command_id: &str,
        node_id: &str,
        events: mpsc::UnboundedSender<(String, NodeEvent)>,
        message: ControllerMessage,
    ) {
        self.lock().insert(
            command_id.to_owned(),
            Pending {
                node_id: node_id.to_owned(),
                events,
                message,
                resent: false,
                relay: true,
            },
        );
    }

    /// The commands this replica waits on (not those relayed for
    /// another): command id and node id.
    pub(crate) fn routable(&self) -> Vec<(String, String)> {
        self.lock()
            .iter()
            .filter(|(_, p)| !p.relay)
            .map(|(command_id, p)| (command_id.clone(), p.node_id.clone()))
            .collect()
    }

    /// The message of the pending command `command_id`.
    pub(crate) fn message(&self, command_id: &str) -> Option<ControllerMessage> {
        self.lock().get(command_id).map(|p| p.message.clone())
    }

    /// Tells the waiter of `command_id` about its node's session (a
    /// [`NodeEvent::Disconnected`] or [`NodeEvent::Reconnected`] seen
    /// through another replica).
    pub(crate) fn notify(&self, command_id: &str, event: NodeEvent) {
        let mut live = self.lock();
        if let Some(pending) = live.get_mut(command_id) {
            if matches!(event, NodeEvent::Reconnected) {
                pending.resent = true;
            }
            let _ = pending.events.send((command_id.to_owned(), event));
        }
    }

    /// The commands still waiting on `node_id`'s answer, to send again on
    /// its new session; their deployments learn the node is back.
    pub fn reconnected(&self, node_id: &str) -> Vec<ControllerMessage> {
        let mut live = self.lock();
        live.iter_mut()
            .filter(|(_, p)| p.node_id == node_id)
            .map(|(command_id, p)| {
                p.resent = true;
                let _ = p.events.send((command_id.clone(), NodeEvent::Reconnected));
                p.message.clone()
            })
            .collect()
    }

    pub(crate) fn forget(&self, command_id: &str) {
        self.lock().remove(command_id);
    }

    /// After sending `command_id` failed: forgets it unless the node
    /// reconnected meanwhile and its new session got it (then it is out
    /// after all: true, and it stays pending).
    pub(crate) fn forget_unless_resent(&self, command_id: &str) -> bool {
        let mut live = self.lock();
        if live.get(command_id).is_some_and(|p| p.resent) {
            return true;
        }
        live.remove(command_id);
        false
    }

    /// Hands a Progress from `node_id`'s session to its deployment.
    pub fn progress(&self, node_id: &str, progress: Progress) {
        let id = progress.command_id.clone();
        self.deliver(node_id, &id, NodeEvent::Progress(progress));
    }

    /// Hands a CommandResult from `node_id`'s session to its deployment.
    pub fn result(&self, node_id: &str, result: CommandResult) {
        let id = result.command_id.clone();
        self.deliver(node_id, &id, NodeEvent::Result(result));
    }

    /// Tells the deployments waiting on `node_id` that its session ended.
    pub fn disconnected(&self, node_id: &str) {
        for (command_id, pending) in self.lock().iter() {
            if pending.node_id == node_id {
                let _ = pending
                    .events
                    .send((command_id.clone(), NodeEvent::Disconnected));
            }
        }
    }

    fn deliver(&self, node_id: &str, command_id: &str, event: NodeEvent) {
        let live = self.lock();
        match live.get(command_id) {
            // A node answers only for its own commands.
            Some(pending) if pending.node_id == node_id => {
                let _ = pending.events.send((command_id.to_owned(), event));
            }
            Some(pending) => tracing::warn!(
                %node_id, owner = %pending.node_id, %command_id,
                "node reported on another node's command; ignored"
            ),
            None => tracing::debug!(%node_id, %command_id, "report for no pending command"),
        }
    }

    /// Sends `message` (whose command id is `command_id`) to `node_id` and
    /// waits at most `wait` for the node's CommandResult. Nothing is recorded
    /// in the database: for commands such as StatusRequest whose only effect
    /// is the answer (a heartbeat the session stores before the result).
    pub async fn ask(
        &self,
        sessions: &Sessions,
        node_id: &str,
        command_id: &str,
        message: ControllerMessage,
        wait: Duration,
    ) -> Answer {
        let deadline = Instant::now() + wait;
        let (tx, mut rx) = mpsc::unbounded_channel();
        // Registered before sending, so a fast answer is never lost.
        self.register(command_id, node_id, tx, message.clone());
        let answer = async {
            match tokio::time::timeout_at(deadline, sessions.send(node_id, message)).await {
                Ok(true) => {}
                Ok(false) => return Answer::NoSession,
                Err(_) => return Answer::TimedOut,
            }
            loop {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some((_, NodeEvent::Result(result)))) => return Answer::Result(result),
                    Ok(Some((_, NodeEvent::Disconnected))) => return Answer::Disconnected,
                    Ok(Some((_, NodeEvent::Progress(_) | NodeEvent::Reconnected))) => {}
                    // The sender lives in the registration until `forget`.
                    Ok(None) | Err(_) => return Answer::TimedOut,
                }
            }
        }
        .await;
        self.forget(command_id);
        answer
    }
}

/// How a one-off command sent with [`Commands::ask`] ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// The node's CommandResult.
    Result(CommandResult),
    /// The node holds no session with this controller.
    NoSession,
    /// Its session ended before it answered.
    Disconnected,
    /// No answer within the wait.
    TimedOut,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wait of `ask` on tokio's paused clock: a node that holds a
    /// session but never answers times out exactly at the deadline, one
    /// that answers in time is heard, one without a session is not waited on.
    #[tokio::test(start_paused = true)]
    async fn ask_waits_exactly_its_deadline() {
        let commands = Commands::new();
        let sessions = Sessions::new();
        let handle = sessions.register("n-a");
        let (out, mut sent) = mpsc::channel(4);
        handle.accept_commands(out);
        let wait = Duration::from_secs(10);

        let started = tokio::time::Instant::now();
        let answer = commands
            .ask(
                &sessions,
                "n-a",
                "s-1.n-a",
                ControllerMessage::default(),
                wait,
            )
            .await;
        assert_eq!(answer, Answer::TimedOut);
        assert_eq!(started.elapsed(), wait);
        assert!(sent.recv().await.is_some(), "the command went out");

        let answering = {
            let commands = commands.clone();
            async move {
                tokio::time::sleep(Duration::from_secs(3)).await;
                commands.result(
                    "n-a",
                    CommandResult {
                        command_id: "s-2.n-a".to_owned(),
                        ..CommandResult::default()
                    },
                );
            }
        };
        let started = tokio::time::Instant::now();
        let (answer, ()) = tokio::join!(
            commands.ask(
                &sessions,
                "n-a",
                "s-2.n-a",
                ControllerMessage::default(),
                wait
            ),
            answering
        );
        assert!(matches!(answer, Answer::Result(_)), "{answer:?}");
        assert_eq!(started.elapsed(), Duration::from_secs(3));

        let started = tokio::time::Instant::now();
        let answer = commands
            .ask(
                &sessions,
                "n-b",
                "s-3.n-b",
                ControllerMessage::default(),
                wait,
            )
            .await;
        assert_eq!(answer, Answer::NoSession);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[test]
    fn a_node_cannot_answer_for_another() {
        let commands = Commands::new();
        let (tx, mut rx) = mpsc::unbounded_channel();
        commands.register("d-1.n-a", "n-a", tx, ControllerMessage::default());
        assert_eq!(commands.reconnected("n-b").len(), 0);
        assert_eq!(commands.reconnected("n-a").len(), 1);
        assert!(matches!(rx.try_recv(), Ok((_, NodeEvent::Reconnected))));
        commands.result(
            "n-b",
            CommandResult {
                command_id: "d-1.n-a".to_owned(),
                ..CommandResult::default()
            },
        );
        assert!(rx.try_recv().is_err());
        commands.result(
            "n-a",
            CommandResult {
                command_id: "d-1.n-a".to_owned(),
                ..CommandResult::default()
            },
        );
        assert!(matches!(rx.try_recv(), Ok((_, NodeEvent::Result(_)))));
    }

    #[test]
    fn a_failed_send_is_forgotten_unless_a_new_session_got_it() {
        let commands = Commands::new();
        let (tx, _rx) = mpsc::unbounded_channel();
        commands.register("d-1.n-a", "n-a", tx.clone(), ControllerMessage::default());
        assert!(!commands.forget_unless_resent("d-1.n-a"));
        assert_eq!(commands.reconnected("n-a").len(), 0, "forgotten");
        commands.register("d-2.n-a", "n-a", tx, ControllerMessage::default());
        assert_eq!(commands.reconnected("n-a").len(), 1);
        assert!(commands.forget_unless_resent("d-2.n-a"));
        assert_eq!(commands.reconnected("n-a").len(), 1, "still pending");
    }
}
