//! Deploy and rollback orchestration: a rollout plan (all at once, rolling
//! batches, canary then the rest), one command per node over its live
//! session, progress and results routed back by command id, the outcome
//! recorded per node and for the whole deployment.
//!
//! # State machine of one deployment
//!
//! ```text
//! started ──▶ next_step(rollout, batches, node states):
//!   Start(batch) ──▶ every node of the batch: online? ── no ──▶ FAILED "unreachable"
//!                        │ yes
//!                        ▼
//!           command sent ──▶ Progress* ──▶ CommandResult ──▶ node done
//!                        │
//!                        ├─ session ends, no result within RECONNECT_GRACE
//!                        │  ──▶ FAILED "connection lost" (a node that
//!                        │  reconnects gets the command again; the agent
//!                        │  answers a known id from its record)
//!                        └─ no result within COMMAND_TIMEOUT ──▶ FAILED "timed out"
//!   Wait        ──▶ a node of the running batch has not answered yet
//!   Stop        ──▶ (rolling / canary) a batch ended with more than
//!                   max_unavailable failed nodes: nodes never started are
//!                   SKIPPED; nodes this deployment switched are sent a
//!                   Rollback to the release current on them before
//!                   ──▶ ROLLED_BACK "deployment stopped after web-2 failed"
//!   Done        ──▶ every batch ran
//! finished ──▶ succeeded (every node SUCCEEDED) or failed
//!              audit DEPLOY_COMPLETED / DEPLOY_FAILED
//!                    (ROLLBACK_…, RESTART_…, PRUNE_… likewise)
//! ```
//!
//! [`next_step`] and [`Rollout::batches`] are pure: the whole rollout
//! policy is there, tested without processes.
//!
//! Command ids are `<deployment id>.<node id>` (`d-<16 hex>.n-…`), and
//! `<deployment id>.<node id>.undo` for the controller's rollback of a node
//! when the rollout stops: unique per node, and they name the deployment in
//! the agent's logs. An agent's Progress and CommandResult reach the
//! deployment only when they come from the node the command was sent to
//! ([`Commands`]).
//!
//! One deployment per app runs at a time: [`Store::insert_deployment`]
//! refuses a second one while the first is `running`
//! ([`StoreError::AppBusy`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use slipway_proto::v1::{
    controller_message, deploy_event, rollout, BatchStarted, CommandResult, ControllerMessage,
    DeployEvent, DeployFinished, DeployStarted, NodeProgress, NodeResult, Outcome, Progress,
    TargetNode,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::audit::{self, AuditEvent};
use crate::link::registry::Sessions;
use crate::store::{NewDeployment, NewDeploymentNode, Store, StoreError};

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
    /// Set when a new session of the node got the command again.
    resent: bool,
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
                resent: false,
            },
        );
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

    fn forget(&self, command_id: &str) {
        self.lock().remove(command_id);
    }

    /// After sending `command_id` failed: forgets it unless the node
    /// reconnected meanwhile and its new session got it (then it is out
    /// after all: true, and it stays pending).
    fn forget_unless_resent(&self, command_id: &str) -> bool {
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
    /// Deploy a release from an artifact.
    Deploy {
        /// Release id on every node.
        release_id: String,
        /// Artifact digest.
        sha256: String,
        /// Git commit (display).
        git_sha: String,
        /// An https URL every agent downloads the artifact from itself;
        /// empty: agents fetch it from the controller by digest.
        artifact_url: String,
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

    /// Whether it makes nodes run another release, so that a stopped
    /// rollout sends the nodes it switched back (restart and prune keep the
    /// current release: nothing to undo).
    fn switches_release(&self) -> bool {
        matches!(self, Self::Deploy { .. } | Self::Rollback { .. })
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
                artifact_url,
            } => controller_message::Kind::Deploy(slipway_proto::v1::Deploy {
                command_id: command_id.to_owned(),
                app: app.to_owned(),
                release_id: release_id.clone(),
                // Empty: the agent fetches it with AgentLink.FetchArtifact.
                artifact_url: artifact_url.clone(),
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
    /// Selected nodes (not empty), in rollout order.
    pub targets: Vec<Target>,
    /// API token or operator id asking.
    pub actor: String,
    /// Selector as given, for the record.
    pub selector: serde_json::Value,
    /// How the targets are taken through it.
    pub rollout: Rollout,
}

/// The shape of a rollout (control.proto `Rollout.Strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Every node at once; the controller stops and undoes nothing.
    #[default]
    AllAtOnce,
    /// Batches of `max_parallel` nodes, one after the other.
    Rolling,
    /// `canary` nodes first, then the rest in batches of `max_parallel`.
    Canary,
}

impl Strategy {
    /// The name in records and output: `all_at_once`, `rolling`, `canary`.
    pub fn name(self) -> &'static str {
        match self {
            Self::AllAtOnce => "all_at_once",
            Self::Rolling => "rolling",
            Self::Canary => "canary",
        }
    }
}

/// A rollout as the controller runs it: the protocol's `Rollout`, checked,
/// with its defaults filled in (see control.proto for the semantics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Rollout {
    /// The shape.
    pub strategy: Strategy,
    /// Nodes per batch: ≥ 1 for rolling; for canary, after the canary
    /// batch, 0 meaning all the rest at once; 0 for all at once.
    pub max_parallel: u32,
    /// Node failures tolerated before the rollout stops (rolling, canary).
    pub max_unavailable: u32,
    /// Canary nodes: ≥ 1 for canary, else 0.
    pub canary: u32,
}

/// A `Rollout` request that makes no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RolloutError {
    /// A strategy number this controller does not know.
    #[error("unknown rollout strategy {0}")]
    UnknownStrategy(i32),
    /// A setting given for a strategy that does not use it.
    #[error(
        "rollout {field} = {value} does not apply to strategy {strategy} (only to {applies_to})"
    )]
    NotApplicable {
        /// The setting.
        field: &'static str,
        /// Its value.
        value: u32,
        /// The strategy asked for.
        strategy: &'static str,
        /// The strategies it applies to.
        applies_to: &'static str,
    },
}

/// One batch of a rollout: target indices, started together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Indices into [`Plan::targets`].
    pub nodes: std::ops::Range<usize>,
    /// The canary batch of a canary rollout.
    pub canary: bool,
}

impl Rollout {
    /// Checks the protocol's rollout (unset = all at once) and fills in its
    /// defaults.
    pub fn from_proto(rollout: Option<&slipway_proto::v1::Rollout>) -> Result<Self, RolloutError> {
        let Some(r) = rollout else {
            return Ok(Self::default());
        };
        let strategy = match rollout::Strategy::try_from(r.strategy) {
            Ok(rollout::Strategy::AllAtOnce) => Strategy::AllAtOnce,
            Ok(rollout::Strategy::Rolling) => Strategy::Rolling,
            Ok(rollout::Strategy::Canary) => Strategy::Canary,
            Err(_) => return Err(RolloutError::UnknownStrategy(r.strategy)),
        };
        let not_for = |field: &'static str, value: u32, applies_to: &'static str| {
            RolloutError::NotApplicable {
                field,
                value,
                strategy: strategy.name(),
                applies_to,
            }
        };
        match strategy {
            Strategy::AllAtOnce => {
                for (field, value) in [
                    ("max_parallel", r.max_parallel),
                    ("max_unavailable", r.max_unavailable),
                ] {
                    if value != 0 {
                        return Err(not_for(field, value, "rolling and canary"));
                    }
                }
                if r.canary != 0 {
                    return Err(not_for("canary", r.canary, "canary"));
                }
                Ok(Self::default())
            }
            Strategy::Rolling => {
                if r.canary != 0 {
                    return Err(not_for("canary", r.canary, "canary"));
                }
                Ok(Self {
                    strategy,
                    max_parallel: r.max_parallel.max(1),
                    max_unavailable: r.max_unavailable,
                    canary: 0,
                })
            }
            Strategy::Canary => Ok(Self {
                strategy,
                max_parallel: r.max_parallel,
                max_unavailable: r.max_unavailable,
                canary: r.canary.max(1),
            }),
        }
    }

    /// The protocol form (defaults filled in).
    pub fn to_proto(self) -> slipway_proto::v1::Rollout {
        let strategy = match self.strategy {
            Strategy::AllAtOnce => rollout::Strategy::AllAtOnce,
            Strategy::Rolling => rollout::Strategy::Rolling,
            Strategy::Canary => rollout::Strategy::Canary,
        };
        slipway_proto::v1::Rollout {
            strategy: strategy as i32,
            max_parallel: self.max_parallel,
            max_unavailable: self.max_unavailable,
            canary: self.canary,
        }
    }

    /// For the database and the audit log.
    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "strategy": self.strategy.name(),
            "max_parallel": self.max_parallel,
            "max_unavailable": self.max_unavailable,
            "canary": self.canary,
        })
    }

    /// Whether node failures stop the rollout (never all at once: every
    /// node has its command already).
    pub fn stops_on_failure(self) -> bool {
        self.strategy != Strategy::AllAtOnce
    }

    /// The batches for `n` targets, in target order; every target is in
    /// exactly one batch.
    pub fn batches(self, n: usize) -> Vec<Batch> {
        let size = |s: u32| usize::try_from(s).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        let mut at = 0;
        if self.strategy == Strategy::Canary && n > 0 {
            at = size(self.canary).clamp(1, n);
            out.push(Batch {
                nodes: 0..at,
                canary: true,
            });
        }
        let step = match self.strategy {
            Strategy::AllAtOnce => n,
            Strategy::Rolling => size(self.max_parallel).max(1),
            Strategy::Canary if self.max_parallel == 0 => n,
            Strategy::Canary => size(self.max_parallel),
        };
        while at < n {
            let end = at.saturating_add(step).min(n);
            out.push(Batch {
                nodes: at..end,
                canary: false,
            });
            at = end;
        }
        out
    }
}

/// Where one target of a running deployment is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeState {
    /// Its batch has not started.
    Pending,
    /// Its command is out, no answer yet.
    Running,
    /// It answered SUCCEEDED.
    Succeeded,
    /// Anything else: failed, rolled back by its health gate, unreachable,
    /// connection lost, timed out.
    Failed,
}

/// What a deployment does next ([`next_step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Send the commands of this batch (index into the batches).
    Start(usize),
    /// Wait for a running node to answer.
    Wait,
    /// Stop the rollout: this target's failure was one too many.
    Stop {
        /// Index of the target whose failure stopped it.
        stopped_by: usize,
    },
    /// Every batch ran.
    Done,
}

/// The rollout policy, as a pure decision: given the batches, each
/// target's state and the targets that failed (in the order they failed),
/// what happens next. A batch runs to its end before the failures are
/// judged; then more than `max_unavailable` failures stop a rolling or
/// canary rollout, else the next batch starts.
pub fn next_step(
    rollout: &Rollout,
    batches: &[Batch],
    states: &[NodeState],
    failed_in_order: &[usize],
) -> Step {
    if states.contains(&NodeState::Running) {
        return Step::Wait;
    }
    let tolerated = usize::try_from(rollout.max_unavailable).unwrap_or(usize::MAX);
    if rollout.stops_on_failure() {
        if let Some(&stopped_by) = failed_in_order.get(tolerated) {
            return Step::Stop { stopped_by };
        }
    }
    let pending = |b: &Batch| {
        b.nodes
            .clone()
            .all(|i| states.get(i) == Some(&NodeState::Pending))
    };
    match batches.iter().position(pending) {
        Some(index) => Step::Start(index),
        None => Step::Done,
    }
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
/// succeeded; the message names each node that did not and why.
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
                Ok(Outcome::Skipped) => "skipped: ",
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
        Ok(Outcome::Skipped) => "skipped",
        _ => "failed",
    }
}

fn event(kind: deploy_event::Kind) -> DeployEvent {
    DeployEvent { kind: Some(kind) }
}

fn target_node(t: &Target) -> TargetNode {
    TargetNode {
        node_id: t.node_id.clone(),
        node_name: t.name.clone(),
    }
}

/// The release current on each target before the deployment, for rolling
/// it back if the rollout stops ('' when unknown: the agent's previous).
/// The newer of the node's last report (Hello or heartbeat) and the last
/// release this controller saw it switch to.
async fn prior_releases(store: &Store, plan: &Plan) -> Result<Vec<String>, StoreError> {
    let reported: HashMap<String, (String, i64)> = store
        .fleet()
        .await?
        .into_iter()
        .filter_map(|row| {
            let app = row.apps.into_iter().find(|a| a.app == plan.app)?;
            Some((row.id, (app.current_release, row.last_seen_at.unwrap_or(0))))
        })
        .collect();
    let deployed = store.last_switched_releases(&plan.app).await?;
    Ok(plan
        .targets
        .iter()
        .map(|t| {
            let seen = reported.get(&t.node_id);
            let ours = deployed.get(&t.node_id);
            match (seen, ours) {
                (Some((_, seen_at)), Some((ours, at))) if at >= seen_at => ours.clone(),
                (Some((seen, _)), _) => seen.clone(),
                (None, Some((ours, _))) => ours.clone(),
                (None, None) => String::new(),
            }
        })
        .collect())
}

/// Starts a deployment: records it (refused with [`StoreError::AppBusy`]
/// while another deployment of the app runs), starts its first batch, and
/// returns the stream of its events. The deployment runs to the end even
/// if the caller stops listening.
pub async fn start(
    store: &Store,
    sessions: &Sessions,
    commands: &Commands,
    plan: Plan,
) -> Result<mpsc::Receiver<DeployEvent>, StoreError> {
    let deployment_id = format!("d-{}", crate::pki::crypto::random_hex::<8>()?);
    let batches = plan.rollout.batches(plan.targets.len());
    let command_ids: Vec<String> = plan
        .targets
        .iter()
        .map(|t| format!("{deployment_id}.{}", t.node_id))
        .collect();
    let prior = prior_releases(store, &plan).await?;
    let mut batch_of = vec![0_u32; plan.targets.len()];
    for (number, batch) in (1_u32..).zip(&batches) {
        for i in batch.nodes.clone() {
            batch_of[i] = number;
        }
    }
    let nodes: Vec<NewDeploymentNode<'_>> = plan
        .targets
        .iter()
        .enumerate()
        .map(|(i, t)| NewDeploymentNode {
            node_id: &t.node_id,
            command_id: &command_ids[i],
            batch: batch_of[i],
            prior_release: &prior[i],
        })
        .collect();
    let now = crate::now_unix();
    let started_type = plan.action.started_event();
    let rollout_json = plan.rollout.to_json();
    let mut details = serde_json::json!({
        "deployment_id": deployment_id,
        "app": plan.app,
        "release_id": plan.action.release_id(),
        "selector": plan.selector,
        "nodes": plan.targets.iter().map(|t| &t.node_id).collect::<Vec<_>>(),
        "strategy": plan.rollout.strategy.name(),
        "rollout": rollout_json,
    });
    if let Action::Prune { keep } = &plan.action {
        details["keep"] = serde_json::Value::from(*keep);
    }
    let (sha, url) = match &plan.action {
        Action::Deploy {
            sha256,
            artifact_url,
            ..
        } => (sha256.as_str(), artifact_url.as_str()),
        Action::Rollback { .. } | Action::Restart | Action::Prune { .. } => ("", ""),
    };
    if !sha.is_empty() {
        details["artifact_sha256"] = serde_json::Value::from(sha);
    }
    if !url.is_empty() {
        details["artifact_url"] = serde_json::Value::from(url);
    }
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
                rollout: &rollout_json,
                started_at: now,
                nodes: &nodes,
            },
            &AuditEvent::success(
                started_type,
                &plan.actor,
                "deployment",
                &deployment_id,
                details,
            ),
        )
        .await?;
    drop(nodes);
    tracing::info!(
        %deployment_id, app = %plan.app, kind = plan.action.kind(),
        strategy = plan.rollout.strategy.name(), nodes = plan.targets.len(),
        batches = batches.len(), "deployment started"
    );

    let (out_tx, out_rx) = mpsc::channel(EVENT_QUEUE);
    let _ = out_tx.try_send(event(deploy_event::Kind::Started(DeployStarted {
        deployment_id: deployment_id.clone(),
        app: plan.app.clone(),
        release_id: plan.action.release_id().to_owned(),
        nodes: plan.targets.iter().map(target_node).collect(),
        rollout: Some(plan.rollout.to_proto()),
        actor: plan.actor.clone(),
    })));
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let run = Run {
        store: store.clone(),
        sessions: sessions.clone(),
        commands: commands.clone(),
        deployment_id,
        plan,
        batches,
        command_ids,
        prior,
        out: out_tx,
        events_tx: ev_tx,
    };
    tokio::spawn(run.execute(ev_rx));
    Ok(out_rx)
}

/// A command sent and not answered yet.
#[derive(Debug)]
struct InFlight {
    /// Index of its target.
    index: usize,
    /// When it was sent: the command timeout counts from here.
    sent_at: Instant,
    /// When the node is failed if it has not answered.
    deadline: Instant,
}

/// How a stopped rollout ended for the nodes it had not finished.
#[derive(Debug)]
struct Stopped {
    /// "deployment stopped after web-2 failed".
    reason: String,
    /// The target whose failure stopped it.
    by: usize,
    /// Targets the controller sent back to their earlier release.
    rolled_back: Vec<usize>,
    /// Targets never started.
    skipped: Vec<usize>,
}

/// A running deployment: batches, the nodes' answers, the end.
#[derive(Debug)]
struct Run {
    store: Store,
    sessions: Sessions,
    commands: Commands,
    deployment_id: String,
    plan: Plan,
    batches: Vec<Batch>,
    /// Command id per target.
    command_ids: Vec<String>,
    /// Release current per target before the deployment ('' unknown).
    prior: Vec<String>,
    out: mpsc::Sender<DeployEvent>,
    /// Handed to [`Commands`] with each command sent.
    events_tx: mpsc::UnboundedSender<(String, NodeEvent)>,
}

type Events = mpsc::UnboundedReceiver<(String, NodeEvent)>;

impl Run {
    fn emit(&self, kind: deploy_event::Kind) {
        // A CLI that is gone or too slow misses events; the record in the
        // database and the audit log stay complete.
        let _ = self.out.try_send(event(kind));
    }

    fn result(&self, index: usize, outcome: Outcome, release_id: &str, why: &str) -> NodeResult {
        let target = &self.plan.targets[index];
        NodeResult {
            node_id: target.node_id.clone(),
            node_name: target.name.clone(),
            outcome: outcome as i32,
            release_id: release_id.to_owned(),
            message: why.to_owned(),
        }
    }

    /// Registers and sends one command to target `index` and adds it to
    /// `inflight`; false (nothing pending) if the node has no live session.
    async fn send(
        &self,
        index: usize,
        command_id: String,
        message: ControllerMessage,
        inflight: &mut HashMap<String, InFlight>,
    ) -> bool {
        let node_id = &self.plan.targets[index].node_id;
        // Registered before sending, so a fast answer is never lost.
        self.commands.register(
            &command_id,
            node_id,
            self.events_tx.clone(),
            message.clone(),
        );
        let sent = tokio::time::timeout(SEND_TIMEOUT, self.sessions.send(node_id, message))
            .await
            .unwrap_or(false);
        if !sent && !self.commands.forget_unless_resent(&command_id) {
            return false;
        }
        let now = Instant::now();
        inflight.insert(
            command_id,
            InFlight {
                index,
                sent_at: now,
                deadline: now + COMMAND_TIMEOUT,
            },
        );
        true
    }

    /// Waits until one in-flight command ends (answer, timeout or lost
    /// connection), passing progress on meanwhile. `inflight` is not empty.
    async fn next_answer(
        &self,
        events: &mut Events,
        inflight: &mut HashMap<String, InFlight>,
    ) -> (String, usize, NodeResult) {
        loop {
            let now = Instant::now();
            let next = inflight.values().map(|f| f.deadline).min().unwrap_or(now);
            tokio::select! {
                received = events.recv() => {
                    let Some((command_id, ev)) = received else {
                        // Cannot happen while `events_tx` lives; fail the
                        // node rather than spin.
                        if let Some(command_id) = inflight.keys().next().cloned() {
                            return self.expire(inflight, &command_id, "controller lost the command");
                        }
                        continue;
                    };
                    let Some(flight) = inflight.get_mut(&command_id) else { continue };
                    let index = flight.index;
                    match ev {
                        NodeEvent::Progress(p) => {
                            let target = &self.plan.targets[index];
                            self.emit(deploy_event::Kind::Progress(NodeProgress {
                                node_id: target.node_id.clone(),
                                node_name: target.name.clone(),
                                step: p.step,
                                message: p.message,
                                unix_time: p.unix_time,
                            }));
                        }
                        NodeEvent::Result(r) => {
                            inflight.remove(&command_id);
                            self.commands.forget(&command_id);
                            let mut result = self.result(index, Outcome::Failed, &r.release_id, &r.message);
                            result.outcome = r.outcome;
                            return (command_id, index, result);
                        }
                        NodeEvent::Disconnected => {
                            flight.deadline = flight.deadline.min(Instant::now() + RECONNECT_GRACE);
                        }
                        NodeEvent::Reconnected => {
                            flight.deadline = flight.sent_at + COMMAND_TIMEOUT;
                        }
                    }
                }
                () = tokio::time::sleep_until(next) => {
                    let now = Instant::now();
                    let expired = inflight
                        .iter()
                        .find(|(_, f)| f.deadline <= now)
                        .map(|(c, f)| (c.clone(), now >= f.sent_at + COMMAND_TIMEOUT));
                    if let Some((command_id, timed_out)) = expired {
                        let why = if timed_out {
                            "timed out waiting for the node's result"
                        } else {
                            "connection lost during the command"
                        };
                        return self.expire(inflight, &command_id, why);
                    }
                }
            }
        }
    }

    fn expire(
        &self,
        inflight: &mut HashMap<String, InFlight>,
        command_id: &str,
        why: &str,
    ) -> (String, usize, NodeResult) {
        self.commands.forget(command_id);
        let index = inflight.remove(command_id).map_or(0, |f| f.index);
        (
            command_id.to_owned(),
            index,
            self.result(index, Outcome::Failed, "", why),
        )
    }

    /// Records a node's (latest) result under its command id and reports it.
    async fn record(&self, index: usize, result: &NodeResult) {
        let command_id = &self.command_ids[index];
        tracing::info!(
            deployment_id = %self.deployment_id, node_id = %result.node_id,
            outcome = outcome_text(result.outcome), message = %result.message, "node finished"
        );
        if let Err(err) = self
            .store
            .record_node_result(
                command_id,
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
    }

    async fn execute(self, mut events: Events) {
        let n = self.plan.targets.len();
        let mut states = vec![NodeState::Pending; n];
        let mut results: Vec<Option<NodeResult>> = vec![None; n];
        let mut failed_in_order = Vec::new();
        let mut inflight: HashMap<String, InFlight> = HashMap::new();
        let batch_count = u32::try_from(self.batches.len()).unwrap_or(u32::MAX);
        let stopped_by = loop {
            match next_step(&self.plan.rollout, &self.batches, &states, &failed_in_order) {
                Step::Start(b) => {
                    let batch = self.batches[b].clone();
                    self.emit(deploy_event::Kind::Batch(BatchStarted {
                        index: u32::try_from(b + 1).unwrap_or(u32::MAX),
                        count: batch_count,
                        nodes: self.plan.targets[batch.nodes.clone()]
                            .iter()
                            .map(target_node)
                            .collect(),
                        canary: batch.canary,
                    }));
                    for i in batch.nodes {
                        let command_id = self.command_ids[i].clone();
                        let message = self.plan.action.message(&command_id, &self.plan.app);
                        if self.send(i, command_id, message, &mut inflight).await {
                            states[i] = NodeState::Running;
                        } else {
                            let result = self.result(
                                i,
                                Outcome::Failed,
                                "",
                                "unreachable (no live session)",
                            );
                            self.record(i, &result).await;
                            states[i] = NodeState::Failed;
                            failed_in_order.push(i);
                            results[i] = Some(result);
                        }
                    }
                }
                Step::Wait => {
                    let (_, i, result) = self.next_answer(&mut events, &mut inflight).await;
                    self.record(i, &result).await;
                    if result.outcome == Outcome::Succeeded as i32 {
                        states[i] = NodeState::Succeeded;
                    } else {
                        states[i] = NodeState::Failed;
                        failed_in_order.push(i);
                    }
                    results[i] = Some(result);
                }
                Step::Stop { stopped_by } => break Some(stopped_by),
                Step::Done => break None,
            }
        };
        let stopped = match stopped_by {
            Some(by) => Some(self.stop(by, &states, &mut results, &mut events).await),
            None => None,
        };
        self.finish(results, stopped).await;
    }

    /// The rollout stopped because of target `by`: skips the targets never
    /// started and rolls back those this deployment switched.
    async fn stop(
        &self,
        by: usize,
        states: &[NodeState],
        results: &mut [Option<NodeResult>],
        events: &mut Events,
    ) -> Stopped {
        let reason = format!(
            "deployment stopped after {} failed",
            self.plan.targets[by].name
        );
        tracing::warn!(deployment_id = %self.deployment_id, %reason, "rollout stopped");
        let mut skipped = Vec::new();
        let mut rolled_back = Vec::new();
        let mut inflight: HashMap<String, InFlight> = HashMap::new();
        for (i, state) in states.iter().enumerate() {
            match state {
                NodeState::Pending => {
                    let result = self.result(i, Outcome::Skipped, "", &reason);
                    self.record(i, &result).await;
                    results[i] = Some(result);
                    skipped.push(i);
                }
                NodeState::Succeeded if !self.plan.action.switches_release() => {}
                NodeState::Succeeded => {
                    let switched_to = results[i]
                        .as_ref()
                        .map(|r| r.release_id.clone())
                        .unwrap_or_default();
                    let to = self.prior[i].clone();
                    if !to.is_empty() && to == switched_to {
                        // It already ran that release: nothing changed.
                        continue;
                    }
                    let target = &self.plan.targets[i];
                    let shown = if to.is_empty() {
                        "its previous release"
                    } else {
                        &to
                    };
                    self.emit(deploy_event::Kind::Progress(NodeProgress {
                        node_id: target.node_id.clone(),
                        node_name: target.name.clone(),
                        step: "rollback".to_owned(),
                        message: format!("{reason}; rolling back to {shown}"),
                        unix_time: crate::now_unix(),
                    }));
                    let undo_id = format!("{}.undo", self.command_ids[i]);
                    let undo = Action::Rollback { to_release_id: to };
                    let message = undo.message(&undo_id, &self.plan.app);
                    if !self.send(i, undo_id, message, &mut inflight).await {
                        let why = format!(
                            "{reason}; could not roll it back: unreachable (no live session)"
                        );
                        let result = self.result(i, Outcome::Failed, &switched_to, &why);
                        self.record(i, &result).await;
                        results[i] = Some(result);
                    }
                }
                NodeState::Failed | NodeState::Running => {}
            }
        }
        while !inflight.is_empty() {
            let (_, i, answer) = self.next_answer(events, &mut inflight).await;
            let result = if answer.outcome == Outcome::Succeeded as i32 {
                rolled_back.push(i);
                let now_on = if answer.release_id.is_empty() {
                    "its previous release".to_owned()
                } else {
                    answer.release_id.clone()
                };
                self.result(
                    i,
                    Outcome::RolledBack,
                    &answer.release_id,
                    &format!("{reason}; rolled back to {now_on}"),
                )
            } else {
                self.result(
                    i,
                    Outcome::Failed,
                    &answer.release_id,
                    &format!("{reason}; rolling it back failed: {}", answer.message),
                )
            };
            self.record(i, &result).await;
            results[i] = Some(result);
        }
        Stopped {
            reason,
            by,
            rolled_back,
            skipped,
        }
    }

    async fn finish(self, results: Vec<Option<NodeResult>>, stopped: Option<Stopped>) {
        let ordered: Vec<NodeResult> = results
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                // Every target has a result by now; never report success
                // for one that somehow lacks it.
                r.unwrap_or_else(|| {
                    self.result(i, Outcome::Failed, "", "controller lost the command")
                })
            })
            .collect();
        let (succeeded, failed_nodes, summary) = summarize(&ordered);
        let message = match &stopped {
            Some(s) => format!("{}: {summary}", s.reason),
            None => summary,
        };
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
        let names = |indices: &[usize]| -> Vec<String> {
            indices
                .iter()
                .map(|&i| self.plan.targets[i].name.clone())
                .collect()
        };
        let mut details = serde_json::json!({
            "deployment_id": self.deployment_id,
            "app": self.plan.app,
            "release_id": self.plan.action.release_id(),
            "strategy": self.plan.rollout.strategy.name(),
            "rollout": self.plan.rollout.to_json(),
            "nodes": ordered.len(),
            "failed_nodes": failed,
        });
        if let Some(s) = &stopped {
            let by = &self.plan.targets[s.by];
            details["stop_reason"] = serde_json::Value::from(s.reason.as_str());
            details["stopped_by"] =
                serde_json::json!({ "node_id": by.node_id, "node_name": by.name });
            details["rolled_back_nodes"] = serde_json::json!(names(&s.rolled_back));
            details["skipped_nodes"] = serde_json::json!(names(&s.skipped));
        }
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
        let stop_reason = stopped.as_ref().map_or("", |s| s.reason.as_str());
        if let Err(err) = self
            .store
            .finish_deployment(
                &self.deployment_id,
                status,
                &message,
                stop_reason,
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
                stop_reason: stop_reason.to_owned(),
                stopped_by: stopped
                    .as_ref()
                    .map(|s| self.plan.targets[s.by].name.clone())
                    .unwrap_or_default(),
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
    fn summary_says_skipped() {
        let stopped = [
            result("a", Outcome::Failed, "unreachable (no live session)"),
            result("b", Outcome::Skipped, "deployment stopped after a failed"),
        ];
        assert_eq!(
            summarize(&stopped).2,
            "2 of 2 nodes failed: a (unreachable (no live session)), b (skipped: deployment stopped after a failed)"
        );
    }

    fn rollout(
        strategy: i32,
        max_parallel: u32,
        max_unavailable: u32,
        canary: u32,
    ) -> Result<Rollout, RolloutError> {
        Rollout::from_proto(Some(&slipway_proto::v1::Rollout {
            strategy,
            max_parallel,
            max_unavailable,
            canary,
        }))
    }

    fn ranges(batches: &[Batch]) -> Vec<(std::ops::Range<usize>, bool)> {
        batches
            .iter()
            .map(|b| (b.nodes.clone(), b.canary))
            .collect()
    }

    #[test]
    fn all_at_once_is_one_batch_and_the_default() {
        let all = Rollout::from_proto(None).unwrap();
        assert_eq!(all, Rollout::default());
        assert_eq!(ranges(&all.batches(3)), vec![(0..3, false)]);
        assert!(all.batches(0).is_empty());
        assert!(!all.stops_on_failure());
        assert_eq!(rollout(0, 0, 0, 0).unwrap(), all);
        let err = rollout(0, 2, 0, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "rollout max_parallel = 2 does not apply to strategy all_at_once (only to rolling and canary)"
        );
        assert!(rollout(0, 0, 1, 0).is_err());
        assert!(rollout(0, 0, 0, 1).is_err());
        assert_eq!(
            rollout(7, 0, 0, 0).unwrap_err(),
            RolloutError::UnknownStrategy(7)
        );
    }

    #[test]
    fn rolling_batches_of_max_parallel_in_target_order() {
        let r = rollout(1, 0, 0, 0).unwrap();
        assert_eq!(r.max_parallel, 1, "0 means 1 for rolling");
        assert_eq!(
            ranges(&r.batches(3)),
            vec![(0..1, false), (1..2, false), (2..3, false)]
        );
        let r = rollout(1, 2, 1, 0).unwrap();
        assert_eq!(
            ranges(&r.batches(5)),
            vec![(0..2, false), (2..4, false), (4..5, false)]
        );
        assert_eq!(ranges(&r.batches(1)), vec![(0..1, false)]);
        assert!(rollout(1, 2, 0, 1).is_err(), "canary is for canary only");
    }

    #[test]
    fn canary_first_then_the_rest() {
        let r = rollout(2, 0, 0, 0).unwrap();
        assert_eq!(r.canary, 1, "0 means 1 canary");
        assert_eq!(ranges(&r.batches(4)), vec![(0..1, true), (1..4, false)]);
        let r = rollout(2, 2, 0, 2).unwrap();
        assert_eq!(
            ranges(&r.batches(7)),
            vec![(0..2, true), (2..4, false), (4..6, false), (6..7, false)]
        );
        // More canaries than nodes: every node is a canary.
        let r = rollout(2, 0, 0, 5).unwrap();
        assert_eq!(ranges(&r.batches(2)), vec![(0..2, true)]);
    }

    #[test]
    fn next_step_runs_batches_and_stops_past_max_unavailable() {
        use NodeState::{Failed, Pending, Running, Succeeded};
        let r = rollout(1, 1, 0, 0).unwrap();
        let b = r.batches(3);
        assert_eq!(
            next_step(&r, &b, &[Pending, Pending, Pending], &[]),
            Step::Start(0)
        );
        assert_eq!(
            next_step(&r, &b, &[Running, Pending, Pending], &[]),
            Step::Wait
        );
        assert_eq!(
            next_step(&r, &b, &[Succeeded, Pending, Pending], &[]),
            Step::Start(1)
        );
        assert_eq!(
            next_step(&r, &b, &[Succeeded, Failed, Pending], &[1]),
            Step::Stop { stopped_by: 1 }
        );
        assert_eq!(
            next_step(&r, &b, &[Succeeded, Succeeded, Succeeded], &[]),
            Step::Done
        );

        // One failure tolerated: the rollout goes on; the second stops it.
        let r = rollout(1, 1, 1, 0).unwrap();
        assert_eq!(
            next_step(&r, &b, &[Succeeded, Failed, Pending], &[1]),
            Step::Start(2)
        );
        assert_eq!(
            next_step(&r, &b, &[Succeeded, Failed, Succeeded], &[1]),
            Step::Done
        );
        assert_eq!(
            next_step(&r, &b, &[Failed, Failed, Pending], &[1, 0]),
            Step::Stop { stopped_by: 0 }
        );

        // A batch runs to its end before the failures are judged.
        let r = rollout(1, 2, 0, 0).unwrap();
        let b = r.batches(3);
        assert_eq!(
            next_step(&r, &b, &[Failed, Running, Pending], &[0]),
            Step::Wait
        );

        // All at once: failures stop nothing.
        let all = Rollout::default();
        let b = all.batches(3);
        assert_eq!(
            next_step(&all, &b, &[Failed, Failed, Succeeded], &[0, 1]),
            Step::Done
        );

        // Canary failing: the rest never starts.
        let c = rollout(2, 0, 0, 1).unwrap();
        let b = c.batches(3);
        assert_eq!(
            next_step(&c, &b, &[Pending, Pending, Pending], &[]),
            Step::Start(0)
        );
        assert_eq!(
            next_step(&c, &b, &[Failed, Pending, Pending], &[0]),
            Step::Stop { stopped_by: 0 }
        );
        assert_eq!(
            next_step(&c, &b, &[Succeeded, Pending, Pending], &[]),
            Step::Start(1)
        );
    }

    #[test]
    fn deploy_message_carries_the_artifact_url() {
        let action = Action::Deploy {
            release_id: "v1".to_owned(),
            sha256: "ab".repeat(32),
            git_sha: String::new(),
            artifact_url: "https://example.com/web.tar.gz".to_owned(),
        };
        match action.message("d-1.n-a", "web").kind {
            Some(controller_message::Kind::Deploy(d)) => {
                assert_eq!(d.artifact_url, "https://example.com/web.tar.gz");
                assert_eq!(d.artifact_sha256, "ab".repeat(32));
                assert_eq!(d.command_id, "d-1.n-a");
            }
            other => panic!("not a deploy: {other:?}"),
        }
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
