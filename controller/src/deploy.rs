//! Deploy and rollback orchestration: one command per selected node over
//! its live session, progress and results routed back by command id, the
//! outcome recorded per node and for the whole deployment.
//!
//! # State machine of one deployment (all at once)
//!
//! ```text
//! started ──▶ every target: online? ── no ──▶ FAILED "unreachable"
//!                              │ yes
//!                              ▼
//!                 command sent ──▶ Progress* ──▶ CommandResult ──▶ node done
//!                              │
//!                              ├─ session ends, no result within
//!                              │  RECONNECT_GRACE ──▶ FAILED "connection lost"
//!                              │  (a node that reconnects gets the command
//!                              │  again; the agent answers a known id from
//!                              │  its record instead of running it twice)
//!                              └─ no result within COMMAND_TIMEOUT ──▶ FAILED "timed out"
//! all nodes done ──▶ succeeded (every node SUCCEEDED) or failed
//!                    audit DEPLOY_COMPLETED / DEPLOY_FAILED
//!                          (ROLLBACK_COMPLETED / ROLLBACK_FAILED)
//! ```
//!
//! Command ids are `<deployment id>.<node id>` (`d-<16 hex>.n-…`): unique per
//! node, and they name the deployment in the agent's logs. An agent's
//! Progress and CommandResult reach the deployment only when they come from
//! the node the command was sent to ([`Commands`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use slipway_proto::v1::{
    controller_message, deploy_event, CommandResult, ControllerMessage, DeployEvent,
    DeployFinished, DeployStarted, NodeProgress, NodeResult, Outcome, Progress, TargetNode,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::audit::{self, AuditEvent};
use crate::registry::Sessions;
use crate::store::{NewDeployment, Store, StoreError};

/// Longest a node may take to answer a command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// After a node's session ends mid-command, how long its result may still
/// arrive (the agent reconnects and reports) before the node is failed.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(30);
/// How long a command may wait for room in a node's outbound queue.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Events buffered for a slow CLI; the deployment never waits on it.
const EVENT_QUEUE: usize = 256;

/// What a session reports for a command.
#[derive(Debug)]
enum NodeEvent {
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

    fn register(
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
            },
        );
    }

    /// The commands still waiting on `node_id`'s answer, to send again on
    /// its new session; their deployments learn the node is back.
    pub fn reconnected(&self, node_id: &str) -> Vec<ControllerMessage> {
        let live = self.lock();
        live.iter()
            .filter(|(_, p)| p.node_id == node_id)
            .map(|(command_id, p)| {
                let _ = p.events.send((command_id.clone(), NodeEvent::Reconnected));
                p.message.clone()
            })
            .collect()
    }

    fn forget(&self, command_id: &str) {
        self.lock().remove(command_id);
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
}

/// A node a deployment targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Node id.
    pub node_id: String,
    /// Node name.
    pub name: String,
}

/// What to run on each node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Deploy a release from a stored artifact.
    Deploy {
        /// Release id on every node.
        release_id: String,
        /// Artifact digest.
        sha256: String,
        /// Git commit (display).
        git_sha: String,
    },
    /// Roll back, to a release or ('' ) each node's previous one.
    Rollback {
        /// Target release.
        to_release_id: String,
    },
    /// Restart the app's current release (driver restart, health gate).
    Restart,
    /// Delete old releases (never the current one or the rollback target).
    Prune {
        /// Releases to keep; 0 = the app's `keep` setting on each node.
        keep: u32,
    },
}

impl Action {
    fn kind(&self) -> &'static str {
        match self {
            Self::Deploy { .. } => "deploy",
            Self::Rollback { .. } => "rollback",
            Self::Restart => "restart",
            Self::Prune { .. } => "prune",
        }
    }

    fn release_id(&self) -> &str {
        match self {
            Self::Deploy { release_id, .. } => release_id,
            Self::Rollback { to_release_id } => to_release_id,
            Self::Restart | Self::Prune { .. } => "",
        }
    }

    /// The audit event type recorded when the deployment starts.
    fn started_event(&self) -> &'static str {
        match self {
            Self::Deploy { .. } => audit::DEPLOY_STARTED,
            Self::Rollback { .. } => audit::ROLLBACK_STARTED,
            Self::Restart => audit::RESTART_STARTED,
            Self::Prune { .. } => audit::PRUNE_STARTED,
        }
    }

    /// The audit event type recorded when it ends.
    fn finished_event(&self, succeeded: bool) -> &'static str {
        match (self, succeeded) {
            (Self::Deploy { .. }, true) => audit::DEPLOY_COMPLETED,
            (Self::Deploy { .. }, false) => audit::DEPLOY_FAILED,
            (Self::Rollback { .. }, true) => audit::ROLLBACK_COMPLETED,
            (Self::Rollback { .. }, false) => audit::ROLLBACK_FAILED,
            (Self::Restart, true) => audit::RESTART_COMPLETED,
            (Self::Restart, false) => audit::RESTART_FAILED,
            (Self::Prune { .. }, true) => audit::PRUNE_COMPLETED,
            (Self::Prune { .. }, false) => audit::PRUNE_FAILED,
        }
    }

    fn message(&self, command_id: &str, app: &str) -> ControllerMessage {
        let kind = match self {
            Self::Deploy {
                release_id,
                sha256,
                git_sha,
            } => controller_message::Kind::Deploy(slipway_proto::v1::Deploy {
                command_id: command_id.to_owned(),
                app: app.to_owned(),
                release_id: release_id.clone(),
                // Empty: the agent fetches it with AgentLink.FetchArtifact.
                artifact_url: String::new(),
                artifact_sha256: sha256.clone(),
                git_sha: git_sha.clone(),
            }),
            Self::Rollback { to_release_id } => {
                controller_message::Kind::Rollback(slipway_proto::v1::Rollback {
                    command_id: command_id.to_owned(),
                    app: app.to_owned(),
                    to_release_id: to_release_id.clone(),
                })
            }
            Self::Restart => controller_message::Kind::Restart(slipway_proto::v1::Restart {
                command_id: command_id.to_owned(),
                app: app.to_owned(),
            }),
            Self::Prune { keep } => controller_message::Kind::Prune(slipway_proto::v1::Prune {
                command_id: command_id.to_owned(),
                app: app.to_owned(),
                keep: *keep,
            }),
        };
        ControllerMessage { kind: Some(kind) }
    }
}

/// A deployment to start.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The app.
    pub app: String,
    /// What to do.
    pub action: Action,
    /// Selected nodes (not empty).
    pub targets: Vec<Target>,
    /// API token id asking.
    pub actor: String,
    /// Selector as given, for the record.
    pub selector: serde_json::Value,
}

/// The default release id: `<UTC yyyymmddThhmmssZ>-<sha256[..12]>`, sortable
/// by time and traceable to the artifact.
pub fn default_release_id(sha256: &str, now: time::OffsetDateTime) -> String {
    let format = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    let stamp = now
        .format(&format)
        .unwrap_or_else(|_| now.unix_timestamp().to_string());
    format!("{stamp}-{}", &sha256[..sha256.len().min(12)])
}

/// The summary of a finished deployment: success only if every node
/// succeeded; the message names each failed node and why.
pub fn summarize(results: &[NodeResult]) -> (bool, u32, String) {
    let failed: Vec<&NodeResult> = results
        .iter()
        .filter(|r| r.outcome != Outcome::Succeeded as i32)
        .collect();
    if failed.is_empty() {
        let n = results.len();
        return (true, 0, format!("{n} of {n} nodes succeeded"));
    }
    let reasons: Vec<String> = failed
        .iter()
        .map(|r| {
            let outcome = match Outcome::try_from(r.outcome) {
                Ok(Outcome::RolledBack) => "rolled back: ",
                _ => "",
            };
            format!("{} ({outcome}{})", r.node_name, r.message)
        })
        .collect();
    let count = u32::try_from(failed.len()).unwrap_or(u32::MAX);
    let message = format!(
        "{count} of {} nodes failed: {}",
        results.len(),
        reasons.join(", ")
    );
    (false, count, message)
}

fn outcome_text(outcome: i32) -> &'static str {
    match Outcome::try_from(outcome) {
        Ok(Outcome::Succeeded) => "succeeded",
        Ok(Outcome::RolledBack) => "rolled_back",
        _ => "failed",
    }
}

fn event(kind: deploy_event::Kind) -> DeployEvent {
    DeployEvent { kind: Some(kind) }
}

/// Starts a deployment: records it, sends the commands, and returns the
/// stream of its events. The deployment runs to the end even if the caller
/// stops listening.
pub async fn start(
    store: &Store,
    sessions: &Sessions,
    commands: &Commands,
    plan: Plan,
) -> Result<mpsc::Receiver<DeployEvent>, StoreError> {
    let deployment_id = format!("d-{}", crate::crypto::random_hex::<8>()?);
    let command_ids: Vec<(String, String)> = plan
        .targets
        .iter()
        .map(|t| (t.node_id.clone(), format!("{deployment_id}.{}", t.node_id)))
        .collect();
    let now = crate::now_unix();
    let (started_type, resource) = (plan.action.started_event(), "deployment");
    let mut details = serde_json::json!({
        "deployment_id": deployment_id,
        "app": plan.app,
        "release_id": plan.action.release_id(),
        "selector": plan.selector,
        "nodes": plan.targets.iter().map(|t| &t.node_id).collect::<Vec<_>>(),
    });
    if let Action::Deploy { sha256, .. } = &plan.action {
        details["artifact_sha256"] = serde_json::Value::from(sha256.as_str());
    }
    if let Action::Prune { keep } = &plan.action {
        details["keep"] = serde_json::Value::from(*keep);
    }
    let sha = match &plan.action {
        Action::Deploy { sha256, .. } => sha256.as_str(),
        Action::Rollback { .. } | Action::Restart | Action::Prune { .. } => "",
    };
    store
        .insert_deployment(
            &NewDeployment {
                id: &deployment_id,
                kind: plan.action.kind(),
                app: &plan.app,
                release_id: plan.action.release_id(),
                artifact_sha256: sha,
                actor: &plan.actor,
                selector: &plan.selector,
                started_at: now,
                nodes: &command_ids,
            },
            &AuditEvent::success(started_type, &plan.actor, resource, &deployment_id, details),
        )
        .await?;
    tracing::info!(
        %deployment_id, app = %plan.app, kind = plan.action.kind(),
        nodes = plan.targets.len(), "deployment started"
    );

    let (out_tx, out_rx) = mpsc::channel(EVENT_QUEUE);
    let _ = out_tx.try_send(event(deploy_event::Kind::Started(DeployStarted {
        deployment_id: deployment_id.clone(),
        app: plan.app.clone(),
        release_id: plan.action.release_id().to_owned(),
        nodes: plan
            .targets
            .iter()
            .map(|t| TargetNode {
                node_id: t.node_id.clone(),
                node_name: t.name.clone(),
            })
            .collect(),
    })));

    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    // Registered before sending, so a fast answer is never lost.
    for (node_id, command_id) in &command_ids {
        let message = plan.action.message(command_id, &plan.app);
        commands.register(command_id, node_id, ev_tx.clone(), message);
    }
    let mut sent = HashMap::new();
    for (target, (_, command_id)) in plan.targets.iter().zip(&command_ids) {
        let message = plan.action.message(command_id, &plan.app);
        let ok = tokio::time::timeout(SEND_TIMEOUT, sessions.send(&target.node_id, message))
            .await
            .unwrap_or(false);
        sent.insert(command_id.clone(), ok);
    }
    drop(ev_tx);

    let run = Run {
        store: store.clone(),
        commands: commands.clone(),
        deployment_id,
        plan,
        command_ids,
        out: out_tx,
    };
    tokio::spawn(run.collect(ev_rx, sent));
    Ok(out_rx)
}

/// A running deployment collecting its nodes' answers.
#[derive(Debug)]
struct Run {
    store: Store,
    commands: Commands,
    deployment_id: String,
    plan: Plan,
    /// (node id, command id), in target order.
    command_ids: Vec<(String, String)>,
    out: mpsc::Sender<DeployEvent>,
}

impl Run {
    fn emit(&self, kind: deploy_event::Kind) {
        // A CLI that is gone or too slow misses events; the record in the
        // database and the audit log stay complete.
        let _ = self.out.try_send(event(kind));
    }

    async fn collect(
        self,
        mut events: mpsc::UnboundedReceiver<(String, NodeEvent)>,
        sent: HashMap<String, bool>,
    ) {
        let start = Instant::now();
        let mut deadlines: HashMap<String, Instant> = HashMap::new();
        let mut results: HashMap<String, NodeResult> = HashMap::new();
        let target_of: HashMap<&str, &crate::deploy::Target> = self
            .command_ids
            .iter()
            .zip(&self.plan.targets)
            .map(|((_, c), t)| (c.as_str(), t))
            .collect();

        for (_, command_id) in &self.command_ids {
            if sent.get(command_id).copied().unwrap_or(false) {
                deadlines.insert(command_id.clone(), start + COMMAND_TIMEOUT);
            } else {
                let result = self.failed(&target_of, command_id, "unreachable (no live session)");
                self.finish_node(result, &mut results).await;
            }
        }

        while !deadlines.is_empty() {
            let next = deadlines.values().min().copied().unwrap_or(start);
            tokio::select! {
                received = events.recv() => {
                    let Some((command_id, ev)) = received else { break };
                    if !deadlines.contains_key(&command_id) {
                        continue;
                    }
                    let Some(target) = target_of.get(command_id.as_str()) else { continue };
                    match ev {
                        NodeEvent::Progress(p) => self.emit(deploy_event::Kind::Progress(NodeProgress {
                            node_id: target.node_id.clone(),
                            node_name: target.name.clone(),
                            step: p.step,
                            message: p.message,
                            unix_time: p.unix_time,
                        })),
                        NodeEvent::Result(r) => {
                            deadlines.remove(&command_id);
                            let result = NodeResult {
                                node_id: target.node_id.clone(),
                                node_name: target.name.clone(),
                                outcome: r.outcome,
                                release_id: r.release_id,
                                message: r.message,
                            };
                            self.finish_node((command_id, result), &mut results).await;
                        }
                        NodeEvent::Disconnected => {
                            if let Some(deadline) = deadlines.get_mut(&command_id) {
                                *deadline = (*deadline).min(Instant::now() + RECONNECT_GRACE);
                            }
                        }
                        NodeEvent::Reconnected => {
                            if let Some(deadline) = deadlines.get_mut(&command_id) {
                                *deadline = start + COMMAND_TIMEOUT;
                            }
                        }
                    }
                }
                () = tokio::time::sleep_until(next) => {
                    let now = Instant::now();
                    let expired: Vec<String> = deadlines
                        .iter()
                        .filter(|(_, d)| **d <= now)
                        .map(|(c, _)| c.clone())
                        .collect();
                    for command_id in expired {
                        deadlines.remove(&command_id);
                        let why = if now >= start + COMMAND_TIMEOUT {
                            "timed out waiting for the node's result"
                        } else {
                            "connection lost during the command"
                        };
                        let result = self.failed(&target_of, &command_id, why);
                        self.finish_node(result, &mut results).await;
                    }
                }
            }
        }
        // Channel closed with commands outstanding cannot happen while we
        // hold the registrations, but fail them rather than hang.
        for command_id in deadlines.into_keys() {
            let result = self.failed(&target_of, &command_id, "controller lost the command");
            self.finish_node(result, &mut results).await;
        }
        self.finish(results).await;
    }

    fn failed(
        &self,
        target_of: &HashMap<&str, &Target>,
        command_id: &str,
        why: &str,
    ) -> (String, NodeResult) {
        let (node_id, node_name) = target_of
            .get(command_id)
            .map(|t| (t.node_id.clone(), t.name.clone()))
            .unwrap_or_default();
        (
            command_id.to_owned(),
            NodeResult {
                node_id,
                node_name,
                outcome: Outcome::Failed as i32,
                release_id: String::new(),
                message: why.to_owned(),
            },
        )
    }

    async fn finish_node(
        &self,
        (command_id, result): (String, NodeResult),
        results: &mut HashMap<String, NodeResult>,
    ) {
        self.commands.forget(&command_id);
        tracing::info!(
            deployment_id = %self.deployment_id, node_id = %result.node_id,
            outcome = outcome_text(result.outcome), message = %result.message, "node finished"
        );
        if let Err(err) = self
            .store
            .record_node_result(
                &command_id,
                outcome_text(result.outcome),
                &result.release_id,
                &result.message,
                crate::now_unix(),
            )
            .await
        {
            tracing::error!(%err, %command_id, "could not record a node result");
        }
        self.emit(deploy_event::Kind::NodeResult(result.clone()));
        results.insert(command_id, result);
    }

    async fn finish(self, mut results: HashMap<String, NodeResult>) {
        let ordered: Vec<NodeResult> = self
            .command_ids
            .iter()
            .filter_map(|(_, c)| results.remove(c))
            .collect();
        let (succeeded, failed_nodes, message) = summarize(&ordered);
        let event_type = self.plan.action.finished_event(succeeded);
        let failed: Vec<serde_json::Value> = ordered
            .iter()
            .filter(|r| r.outcome != Outcome::Succeeded as i32)
            .map(|r| {
                serde_json::json!({
                    "node_id": r.node_id,
                    "node_name": r.node_name,
                    "outcome": outcome_text(r.outcome),
                    "message": r.message,
                })
            })
            .collect();
        let details = serde_json::json!({
            "deployment_id": self.deployment_id,
            "app": self.plan.app,
            "release_id": self.plan.action.release_id(),
            "nodes": ordered.len(),
            "failed_nodes": failed,
        });
        let audit_event = if succeeded {
            AuditEvent::success(
                event_type,
                &self.plan.actor,
                "deployment",
                &self.deployment_id,
                details,
            )
        } else {
            AuditEvent::error(
                event_type,
                &self.plan.actor,
                "deployment",
                &self.deployment_id,
                details,
                &message,
            )
        };
        let status = if succeeded { "succeeded" } else { "failed" };
        if let Err(err) = self
            .store
            .finish_deployment(
                &self.deployment_id,
                status,
                &message,
                &audit_event,
                crate::now_unix(),
            )
            .await
        {
            tracing::error!(%err, deployment_id = %self.deployment_id, "could not record the end");
        }
        tracing::info!(deployment_id = %self.deployment_id, %message, "deployment finished");
        // The last event waits for room: it is the one the CLI needs most.
        let _ = self
            .out
            .send(event(deploy_event::Kind::Finished(DeployFinished {
                deployment_id: self.deployment_id.clone(),
                succeeded,
                failed_nodes,
                message,
            })))
            .await;
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

impl Commands {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, outcome: Outcome, message: &str) -> NodeResult {
        NodeResult {
            node_id: format!("n-{name}"),
            node_name: name.to_owned(),
            outcome: outcome as i32,
            release_id: String::new(),
            message: message.to_owned(),
        }
    }

    #[test]
    fn summary_names_failed_nodes_and_why() {
        let ok = [result("a", Outcome::Succeeded, "")];
        assert_eq!(
            summarize(&ok),
            (true, 0, "1 of 1 nodes succeeded".to_owned())
        );
        let mixed = [
            result("a", Outcome::Succeeded, ""),
            result("b", Outcome::Failed, "unreachable (no live session)"),
            result("c", Outcome::RolledBack, "health gate failed"),
        ];
        let (ok, failed, message) = summarize(&mixed);
        assert!(!ok);
        assert_eq!(failed, 2);
        assert_eq!(
            message,
            "2 of 3 nodes failed: b (unreachable (no live session)), c (rolled back: health gate failed)"
        );
    }

    #[test]
    fn default_release_id_is_time_then_digest() {
        let now = time::macros::datetime!(2026-01-02 03:04:05 UTC);
        assert_eq!(
            default_release_id(&"ab".repeat(32), now),
            "20260102T030405Z-abababababab"
        );
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
}
