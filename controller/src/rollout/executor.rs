//! The executor: records a deployment, sends each batch's commands over
//! the nodes' sessions, follows their answers (timeouts, lost
//! connections), stops and rolls back as [`next_step`] decides, and
//! records and streams every node's result and the outcome.
//!
//! While the database does not answer, the rollout waits: a node's result
//! is written again until it is recorded (up to [`RESULT_RETRY_FOR`]),
//! before anything else is started, so the record stays complete for a
//! replica that may take the deployment over; the answers of other nodes
//! wait in memory meanwhile. A result still not recorded past that stops
//! the rollout, failed, naming why; the end is written again for longer
//! ([`END_RETRY_FOR`]).

use std::collections::HashMap;
use std::time::Duration;

use slipway_proto::v1::{
    deploy_event, BatchStarted, ControllerMessage, DeployEvent, DeployFinished, DeployStarted,
    NodeProgress, NodeResult, Outcome, TargetNode,
};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::observer::{Note, Observer};
use super::plan::{Action, Plan, Target};
use super::policy::{next_step, outcome_text, stop_reason, summarize, Batch, NodeState, Step};
use crate::audit::AuditEvent;
use crate::link::commands::{Commands, NodeEvent};
use crate::link::registry::Sessions;
use crate::store::{
    while_unavailable, DeploymentStep, NewDeployment, NewDeploymentNode, OrphanedDeployment, Store,
    StoreError,
};

/// Longest a node may take to answer a command.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// After a node's session ends mid-command, how long its result may still
/// arrive (the agent reconnects and reports) before the node is failed.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(30);
/// How long a command may wait for room in a node's outbound queue.
const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Events buffered for a slow CLI; the deployment never waits on it.
const EVENT_QUEUE: usize = 256;
/// How long a deployment's end is tried again while the database does not
/// answer, and the pause between tries: an end not recorded would leave
/// the deployment "running" and its app blocked.
const END_RETRY_FOR: Duration = Duration::from_secs(10 * 60);
const END_RETRY_EVERY: Duration = Duration::from_secs(2);
/// How long a node's result is tried again while the database does not
/// answer. The rollout waits meanwhile (the next batch starts only once
/// the result is recorded; results of other nodes wait in memory), so a
/// replica that takes it over later finds every result; past this the
/// rollout stops, failed, naming why.
const RESULT_RETRY_FOR: Duration = Duration::from_secs(5 * 60);

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
            let app = row.apps.iter().find(|a| a.app == plan.app)?;
            Some((
                row.id,
                (app.current_release.clone(), row.last_seen_at.unwrap_or(0)),
            ))
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
    start_observed(store, sessions, commands, plan, None).await
}

/// [`start`], telling `observer` (when given) how the deployment goes,
/// without ever waiting for it ([`Observer::note`]).
pub async fn start_observed(
    store: &Store,
    sessions: &Sessions,
    commands: &Commands,
    plan: Plan,
    observer: Option<Observer>,
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
    // What the release goes live with: the app's env version now.
    let env_version = match &plan.action {
        Action::Env { version, .. } => Some(*version),
        Action::Deploy { .. } => store.env_latest(&plan.app).await?.map(|r| r.version),
        _ => None,
    };
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
    if let Action::Env { version, .. } = &plan.action {
        details["env_version"] = serde_json::Value::from(*version);
    }
    if !plan.snapshots.is_empty() {
        details["snapshots"] = serde_json::Value::from(plan.snapshots.clone());
    }
    if let Action::Prune { keep } = &plan.action {
        details["keep"] = serde_json::Value::from(*keep);
    }
    if let Action::AgentUpgrade {
        size,
        commit_deadline_secs,
        ..
    } = &plan.action
    {
        details["agent_binary_size"] = serde_json::Value::from(*size);
        details["commit_deadline_secs"] = serde_json::Value::from(*commit_deadline_secs);
    }
    let (sha, url) = match &plan.action {
        Action::Deploy {
            sha256,
            artifact_url,
            ..
        } => (sha256.as_str(), artifact_url.as_str()),
        Action::AgentUpgrade { sha256, .. } => (sha256.as_str(), ""),
        Action::Rollback { .. }
        | Action::Restart
        | Action::Stop
        | Action::Start
        | Action::Prune { .. }
        | Action::Env { .. } => ("", ""),
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
                snapshots: &plan.snapshots,
                started_at: now,
                nodes: &nodes,
                env_version,
                plan: Some(&plan.to_record()),
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

    if let Some(observer) = &observer {
        let git_sha = match &plan.action {
            Action::Deploy { git_sha, .. } => git_sha.clone(),
            _ => String::new(),
        };
        observer.note(Note::Started {
            deployment_id: deployment_id.clone(),
            app: plan.app.clone(),
            kind: plan.action.kind(),
            release_id: plan.action.release_id().to_owned(),
            git_sha,
            nodes: plan.targets.len(),
            actor: plan.actor.clone(),
        });
    }
    let (out_tx, out_rx) = mpsc::channel(EVENT_QUEUE);
    let _ = out_tx.try_send(event(deploy_event::Kind::Started(DeployStarted {
        deployment_id: deployment_id.clone(),
        app: plan.app.clone(),
        release_id: plan.action.release_id().to_owned(),
        nodes: plan.targets.iter().map(target_node).collect(),
        rollout: Some(plan.rollout.to_proto()),
        actor: plan.actor.clone(),
        env_version: plan.action.env_version(),
    })));
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let n_targets = plan.targets.len();
    let run = Run {
        store: store.clone(),
        sessions: sessions.clone(),
        commands: commands.clone(),
        deployment_id,
        started: Instant::now(),
        plan,
        batches,
        command_ids,
        prior,
        out: out_tx,
        events_tx: ev_tx,
        steps: std::sync::Mutex::new(vec![Vec::new(); n_targets]),
        observer,
        finished_nodes: std::sync::Mutex::new(HashMap::new()),
        resumed: false,
        lost: std::sync::atomic::AtomicBool::new(false),
        halted: std::sync::Mutex::new(None),
    };
    tokio::spawn(run.execute(ev_rx, Progress::fresh(n_targets)));
    Ok(out_rx)
}

/// How a dead replica's deployment went for this replica
/// ([`take_over`]).
#[derive(Debug)]
pub enum TakeOver {
    /// This replica carries it on: its events from here (`first`, a
    /// [`DeployStarted`] that re-announces it, then `events`), for
    /// whoever follows it on this replica ([`crate::api::live::Live`]).
    Resumed {
        /// The re-announcement.
        first: DeployEvent,
        /// The rest, up to its end.
        events: mpsc::Receiver<DeployEvent>,
    },
    /// It cannot be carried on: failed, naming why.
    Failed(String),
    /// Another replica took it first (or it ended meanwhile).
    Lost,
}

/// Takes over `orphan`, a running deployment of a dead replica, for the
/// replica `store` writes for: rebuilds its run from the recorded plan
/// and per-node rows and carries it on (nodes with a result keep it;
/// nodes of a started batch without one are sent their command again
/// under the same id, which the agent answers from its record or
/// finishes; later batches follow as planned; the rollout's failure policy
/// applies as it would have). A deployment whose plan cannot be rebuilt
/// is failed, naming why.
pub async fn take_over(
    store: &Store,
    sessions: &Sessions,
    commands: &Commands,
    orphan: &OrphanedDeployment,
    observer: Option<&Observer>,
) -> Result<TakeOver, StoreError> {
    let me = store.replica_id().ok_or(StoreError::NoReplica)?.to_owned();
    let dead = orphan.owner.as_deref();
    let dead_shown = dead.unwrap_or("(none recorded)");
    let fail = |why: String| async move {
        let now = crate::now_unix();
        if store
            .fail_orphaned_deployment(&orphan.id, dead, &why, now)
            .await?
        {
            Ok(TakeOver::Failed(why))
        } else {
            Ok(TakeOver::Lost)
        }
    };
    let plan = match orphan.plan.as_deref().map(Plan::from_record) {
        Some(Ok(plan)) => plan,
        Some(Err(err)) => {
            return fail(format!(
                "controller replica {dead_shown} that ran the deployment is gone and {err}"
            ))
            .await
        }
        None => {
            return fail(format!(
                "controller replica {dead_shown} that ran the deployment is gone and it was \
                 recorded without its plan (by an older controller): it cannot be carried on"
            ))
            .await
        }
    };
    let details = serde_json::json!({
        "deployment_id": orphan.id,
        "app": plan.app,
        "kind": plan.action.kind(),
        "release_id": plan.action.release_id(),
        "from_replica": dead,
        "to_replica": me,
    });
    let taken_over = AuditEvent::success(
        crate::audit::DEPLOY_TAKEN_OVER,
        &plan.actor,
        "deployment",
        &orphan.id,
        details,
    );
    let Some(rows) = store
        .take_over_deployment(&orphan.id, dead, &taken_over, crate::now_unix())
        .await?
    else {
        return Ok(TakeOver::Lost);
    };
    let batches = plan.rollout.batches(plan.targets.len());
    // Rows written by another replica: each must be the target's, under
    // the command id this deployment gives it, with a valid release.
    let consistent = rows.len() == plan.targets.len()
        && rows.iter().zip(&plan.targets).all(|(row, t)| {
            row.node_id == t.node_id
                && row.command_id == format!("{}.{}", orphan.id, t.node_id)
                && (row.prior_release.is_empty()
                    || slipway_proto::limits::check_release_id("prior_release", &row.prior_release)
                        .is_ok())
        });
    if !consistent {
        let why = format!(
            "controller replica {dead_shown} that ran the deployment is gone and its recorded \
             nodes do not match its recorded plan ({} rows for {} targets, or a row with another \
             node, command id or an invalid release): it cannot be carried on",
            rows.len(),
            plan.targets.len()
        );
        let failed = store
            .fail_orphaned_deployment(&orphan.id, Some(&me), &why, crate::now_unix())
            .await?;
        return Ok(if failed {
            TakeOver::Failed(why)
        } else {
            TakeOver::Lost
        });
    }
    let n = plan.targets.len();
    let mut progress = Progress::fresh(n);
    let mut finished = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let outcome = match row.outcome.as_str() {
            "succeeded" => Some(Outcome::Succeeded),
            // Rolled back after succeeding: the undo is sent again (same
            // id: answered from the agent's record) if the rollout stops.
            "rolled_back" => Some(Outcome::RolledBack),
            "failed" => Some(Outcome::Failed),
            // Skipped and pending: nothing ran on the node for this
            // deployment yet, or its command is sent again.
            _ => None,
        };
        let Some(outcome) = outcome else { continue };
        let state = if outcome == Outcome::Failed {
            progress.failed_in_order.push(i);
            NodeState::Failed
        } else {
            NodeState::Succeeded
        };
        progress.states[i] = state;
        let target = &plan.targets[i];
        progress.results[i] = Some(NodeResult {
            node_id: target.node_id.clone(),
            node_name: target.name.clone(),
            outcome: outcome as i32,
            release_id: row.release_id.clone(),
            message: row.message.clone(),
        });
        finished.push(i);
    }
    // The nodes of a batch partly done when the owner died: their
    // commands may be out already; sent again under the same id.
    for batch in &batches {
        let started = batch.nodes.clone().any(|i| progress.results[i].is_some());
        if started {
            progress.resend.extend(
                batch
                    .nodes
                    .clone()
                    .filter(|&i| progress.results[i].is_none()),
            );
        }
    }
    tracing::warn!(
        deployment_id = %orphan.id, from_replica = %dead_shown, to_replica = %me,
        done = finished.len(), nodes = n, "taking over the deployment of a dead replica"
    );
    let (out_tx, out_rx) = mpsc::channel(EVENT_QUEUE);
    let first = event(deploy_event::Kind::Started(DeployStarted {
        deployment_id: orphan.id.clone(),
        app: plan.app.clone(),
        release_id: plan.action.release_id().to_owned(),
        nodes: plan.targets.iter().map(target_node).collect(),
        rollout: Some(plan.rollout.to_proto()),
        actor: plan.actor.clone(),
        env_version: plan.action.env_version(),
    }));
    if let Some(observer) = observer {
        let git_sha = match &plan.action {
            Action::Deploy { git_sha, .. } => git_sha.clone(),
            _ => String::new(),
        };
        observer.note(Note::Resumed {
            deployment_id: orphan.id.clone(),
            app: plan.app.clone(),
            kind: plan.action.kind(),
            release_id: plan.action.release_id().to_owned(),
            git_sha,
            nodes: n,
            done: finished.len(),
            failed: finished
                .iter()
                .filter(|&&i| progress.states[i] == NodeState::Failed)
                .count(),
            from_replica: dead_shown.to_owned(),
        });
    }
    let (ev_tx, ev_rx) = mpsc::unbounded_channel();
    let run = Run {
        store: store.clone(),
        sessions: sessions.clone(),
        commands: commands.clone(),
        deployment_id: orphan.id.clone(),
        started: Instant::now(),
        command_ids: rows.iter().map(|r| r.command_id.clone()).collect(),
        prior: rows.iter().map(|r| r.prior_release.clone()).collect(),
        plan,
        batches,
        out: out_tx,
        events_tx: ev_tx,
        steps: std::sync::Mutex::new(vec![Vec::new(); n]),
        observer: observer.cloned(),
        finished_nodes: std::sync::Mutex::new(
            finished
                .iter()
                .map(|&i| (i, progress.states[i] == NodeState::Failed))
                .collect(),
        ),
        resumed: true,
        lost: std::sync::atomic::AtomicBool::new(false),
        halted: std::sync::Mutex::new(None),
    };
    tokio::spawn(run.execute(ev_rx, progress));
    Ok(TakeOver::Resumed {
        first,
        events: out_rx,
    })
}

/// Where a run starts from: nothing done (a new deployment), or the
/// recorded state of one taken over.
#[derive(Debug)]
struct Progress {
    states: Vec<NodeState>,
    results: Vec<Option<NodeResult>>,
    /// Failed targets, in the order they failed.
    failed_in_order: Vec<usize>,
    /// Targets whose command is sent (again) before anything else.
    resend: Vec<usize>,
}

impl Progress {
    fn fresh(n: usize) -> Self {
        Self {
            states: vec![NodeState::Pending; n],
            results: vec![None; n],
            failed_in_order: Vec::new(),
            resend: Vec::new(),
        }
    }
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
    /// The step the node last reported and since when (for /metrics).
    step: Option<(String, Instant)>,
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
    /// When it started (its duration on /metrics).
    started: Instant,
    plan: Plan,
    batches: Vec<Batch>,
    /// Command id per target.
    command_ids: Vec<String>,
    /// Release current per target before the deployment ('' unknown).
    prior: Vec<String>,
    out: mpsc::Sender<DeployEvent>,
    /// Handed to [`Commands`] with each command sent.
    events_tx: mpsc::UnboundedSender<(String, NodeEvent)>,
    /// Steps reported per target, recorded with its result.
    steps: std::sync::Mutex<Vec<Vec<DeploymentStep>>>,
    /// Told of the start, each node's result and the end, if anyone watches.
    observer: Option<Observer>,
    /// Whether each node that has a result failed (its latest result), for
    /// the observer's progress counts.
    finished_nodes: std::sync::Mutex<HashMap<usize, bool>>,
    /// Taken over from a dead replica: the nodes' sessions may still be
    /// on their way here, so a command that finds no session waits for
    /// the node to connect (up to the reconnect grace) instead of failing
    /// it at once.
    resumed: bool,
    /// Set when a write was refused because another replica took the
    /// deployment over: this run stops, writing nothing more.
    lost: std::sync::atomic::AtomicBool,
    /// Why the rollout cannot be carried on, once a node's result could
    /// not be recorded or its command not sent for the database not
    /// answering ([`RESULT_RETRY_FOR`]): it starts nothing more and ends
    /// failed with this reason.
    halted: std::sync::Mutex<Option<String>>,
}

/// Steps kept per node of a deployment (a node sends about ten; a
/// misbehaving one cannot grow the record without bound).
const MAX_STEPS: usize = 100;
/// Characters kept of a step's message.
const MAX_STEP_MESSAGE: usize = 1_000;

type Events = mpsc::UnboundedReceiver<(String, NodeEvent)>;

impl Run {
    fn emit(&self, kind: deploy_event::Kind) {
        if let deploy_event::Kind::Progress(p) = &kind {
            self.keep_step(p);
        }
        // A CLI that is gone or too slow misses events; the record in the
        // database and the audit log stay complete.
        let _ = self.out.try_send(event(kind));
    }

    /// Keeps a node's step for its record (see [`MAX_STEPS`]).
    fn keep_step(&self, p: &NodeProgress) {
        let Some(index) = self
            .plan
            .targets
            .iter()
            .position(|t| t.node_id == p.node_id)
        else {
            return;
        };
        let mut steps = self
            .steps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(node) = steps.get_mut(index) else {
            return;
        };
        if node.len() < MAX_STEPS {
            node.push(DeploymentStep {
                step: p.step.chars().take(MAX_STEP_MESSAGE).collect(),
                message: p.message.chars().take(MAX_STEP_MESSAGE).collect(),
                unix_time: p.unix_time,
            });
        }
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
        let now = Instant::now();
        if !sent && self.resumed {
            // Still registered: sent when the node's session opens here
            // ([`Commands::reconnected`]).
            let grace = self.plan.action.reconnect_grace(RECONNECT_GRACE);
            inflight.insert(
                command_id,
                InFlight {
                    index,
                    sent_at: now,
                    deadline: now + grace,
                    step: None,
                },
            );
            return true;
        }
        if !sent && !self.commands.forget_unless_resent(&command_id) {
            return false;
        }
        inflight.insert(
            command_id,
            InFlight {
                index,
                sent_at: now,
                deadline: now + COMMAND_TIMEOUT,
                step: None,
            },
        );
        true
    }

    /// After a command to target `index` found no way to its node: if
    /// that is because the database does not answer (another replica's
    /// session is found through it), waits until it answers again (up to
    /// [`RESULT_RETRY_FOR`], else the rollout halts) and returns true, so
    /// the command is sent again. False when the database answers.
    async fn waited_for_the_store(&self, index: usize) -> bool {
        if self.halted().is_some() {
            return false;
        }
        let probe = || self.store.schema_version();
        match probe().await {
            Err(err) if err.is_unavailable() => {
                let target = &self.plan.targets[index];
                tracing::warn!(
                    deployment_id = %self.deployment_id, node_id = %target.node_id, %err,
                    "the database does not answer: the command waits for it to find the node's session"
                );
                self.emit(deploy_event::Kind::Progress(NodeProgress {
                    node_id: target.node_id.clone(),
                    node_name: target.name.clone(),
                    step: "send".to_owned(),
                    message: format!(
                        "no session of the node here and the controller's database does not \
                         answer: the command waits for it (up to {} s)",
                        RESULT_RETRY_FOR.as_secs()
                    ),
                    unix_time: crate::now_unix(),
                }));
                match while_unavailable(RESULT_RETRY_FOR, END_RETRY_EVERY, probe).await {
                    Ok(_) => true,
                    Err(err) => {
                        self.halt(format!(
                            "the controller's database did not answer for {} s: the command \
                             for node {} could not be sent ({err}), so the rollout was stopped",
                            RESULT_RETRY_FOR.as_secs(),
                            target.name
                        ));
                        false
                    }
                }
            }
            _ => false,
        }
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
                            let kind = self.plan.action.kind();
                            match &flight.step {
                                Some((step, _)) if *step == p.step => {}
                                _ => {
                                    let next = (p.step.clone(), Instant::now());
                                    if let Some((step, since)) = flight.step.replace(next) {
                                        crate::observe::observe_step(kind, &step, since.elapsed());
                                    }
                                }
                            }
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
                            let kind = self.plan.action.kind();
                            if let Some((step, since)) = flight.step.take() {
                                crate::observe::observe_step(kind, &step, since.elapsed());
                            }
                            crate::observe::observe_node(kind, outcome_text(r.outcome), flight.sent_at.elapsed());
                            inflight.remove(&command_id);
                            self.commands.forget(&command_id);
                            let mut result = self.result(index, Outcome::Failed, &r.release_id, &r.message);
                            result.outcome = r.outcome;
                            self.agent_upgrade_result(&mut result).await;
                            return (command_id, index, result);
                        }
                        NodeEvent::Disconnected => {
                            let grace = self.plan.action.reconnect_grace(RECONNECT_GRACE);
                            flight.deadline = flight.deadline.min(Instant::now() + grace);
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

    /// For an agent upgrade, the node's result carries the version its
    /// session reported (Hello, heartbeats), not the agent's word in the
    /// result: "upgraded to X" is what the controller itself saw. A node
    /// that claims success but reports another version than the binary's
    /// is failed.
    async fn agent_upgrade_result(&self, result: &mut NodeResult) {
        let Action::AgentUpgrade { version, .. } = &self.plan.action else {
            return;
        };
        // The database may be down a moment (the node's version is read
        // from it): waited for as a result's write is.
        let fleet = while_unavailable(RESULT_RETRY_FOR, END_RETRY_EVERY, || self.store.fleet());
        let reported = match fleet.await {
            Ok(rows) => rows
                .into_iter()
                .find(|r| r.id == result.node_id)
                .map(|r| r.agent_version)
                .unwrap_or_default(),
            Err(err) => {
                tracing::error!(%err, "cannot read the node's agent version");
                String::new()
            }
        };
        if result.outcome == Outcome::Succeeded as i32 {
            if !version.is_empty() && reported != *version {
                result.outcome = Outcome::Failed as i32;
                result.message = format!(
                    "the node reports agent version {} after the upgrade, not {version}: {}",
                    slipway_proto::limits::shown(&reported),
                    result.message
                );
            } else {
                result.message =
                    format!("upgraded to agent version {reported}: {}", result.message);
            }
        }
        result.release_id = reported;
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
        let steps = self
            .steps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(index)
            .cloned()
            .unwrap_or_default();
        tracing::info!(
            deployment_id = %self.deployment_id, node_id = %result.node_id,
            outcome = outcome_text(result.outcome), message = %result.message, "node finished"
        );
        if self.halted().is_some() {
            // The database did not answer for long; nothing more is written
            // but the end. The node's result is in the end's details.
            self.emit(deploy_event::Kind::NodeResult(result.clone()));
            return;
        }
        let write = || {
            self.store.record_node_result(
                command_id,
                outcome_text(result.outcome),
                &result.release_id,
                &result.message,
                &steps,
                crate::now_unix(),
            )
        };
        let written = match write().await {
            Err(err) if err.is_unavailable() => {
                tracing::warn!(
                    deployment_id = %self.deployment_id, node_id = %result.node_id, %err,
                    "the database does not answer: the rollout waits until the node's result \
                     is recorded"
                );
                let target = &self.plan.targets[index];
                self.emit(deploy_event::Kind::Progress(NodeProgress {
                    node_id: target.node_id.clone(),
                    node_name: target.name.clone(),
                    step: "record".to_owned(),
                    message: format!(
                        "{} on the node; the controller's database does not answer: the rollout \
                         waits until the result is recorded (up to {} s)",
                        outcome_text(result.outcome),
                        RESULT_RETRY_FOR.as_secs()
                    ),
                    unix_time: crate::now_unix(),
                }));
                while_unavailable(RESULT_RETRY_FOR, END_RETRY_EVERY, write).await
            }
            other => other,
        };
        match written {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    deployment_id = %self.deployment_id, %command_id,
                    "the deployment is no longer this replica's (taken over by another, or \
                     ended): this replica stops running it"
                );
                self.lost.store(true, std::sync::atomic::Ordering::SeqCst);
                return;
            }
            Err(err) => {
                let why = if err.is_unavailable() {
                    format!(
                        "the controller's database did not answer for {} s: the result of node \
                         {} could not be recorded, so the rollout was stopped",
                        RESULT_RETRY_FOR.as_secs(),
                        result.node_name
                    )
                } else {
                    format!(
                        "the result of node {} could not be recorded ({err}), so the rollout \
                         was stopped",
                        result.node_name
                    )
                };
                tracing::error!(%err, %command_id, deployment_id = %self.deployment_id, "{why}");
                self.halt(why);
            }
        }
        self.emit(deploy_event::Kind::NodeResult(result.clone()));
        if let Some(observer) = &self.observer {
            let (done, failed) = {
                let mut finished = self
                    .finished_nodes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                finished.insert(index, result.outcome != Outcome::Succeeded as i32);
                (finished.len(), finished.values().filter(|f| **f).count())
            };
            observer.note(Note::Progress {
                deployment_id: self.deployment_id.clone(),
                app: self.plan.app.clone(),
                done,
                failed,
                nodes: self.plan.targets.len(),
                node: result.node_name.clone(),
                outcome: outcome_text(result.outcome).to_owned(),
            });
        }
    }

    /// Why the rollout was stopped for a write it could not make (or a
    /// command it could not send), if it was.
    fn halted(&self) -> Option<String> {
        self.halted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Stops the rollout for `why` (the first reason is kept).
    fn halt(&self, why: String) {
        self.halted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get_or_insert(why);
    }

    /// True once another replica owns the deployment.
    fn lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Forgets the commands still awaited (a run that lost its lease).
    fn abandon(&self, inflight: &HashMap<String, InFlight>) {
        for command_id in inflight.keys() {
            self.commands.forget(command_id);
        }
        tracing::warn!(deployment_id = %self.deployment_id, "stopped running a deployment this replica no longer owns");
    }

    async fn execute(self, mut events: Events, from: Progress) {
        let Progress {
            mut states,
            mut results,
            mut failed_in_order,
            resend,
        } = from;
        let mut inflight: HashMap<String, InFlight> = HashMap::new();
        for i in resend {
            let command_id = self.command_ids[i].clone();
            let message = self.plan.action.message(
                &command_id,
                &self.plan.app,
                &self.plan.targets[i].node_id,
            );
            // A resumed run keeps every command (see `send`).
            if self.send(i, command_id, message, &mut inflight).await {
                states[i] = NodeState::Running;
            }
        }
        let batch_count = u32::try_from(self.batches.len()).unwrap_or(u32::MAX);
        let stopped_by = loop {
            if self.lost() {
                self.abandon(&inflight);
                return;
            }
            if let Some(why) = self.halted() {
                self.halt_here(&why, &mut states, &mut results, &inflight);
                break None;
            }
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
                        if self.halted().is_some() {
                            // The rest stay pending: skipped at the halt.
                            break;
                        }
                        let command_id = self.command_ids[i].clone();
                        let message = self.plan.action.message(
                            &command_id,
                            &self.plan.app,
                            &self.plan.targets[i].node_id,
                        );
                        let mut sent = self
                            .send(i, command_id.clone(), message.clone(), &mut inflight)
                            .await;
                        if !sent && self.waited_for_the_store(i).await {
                            sent = self.send(i, command_id, message, &mut inflight).await;
                        }
                        if sent {
                            states[i] = NodeState::Running;
                        } else {
                            let why = self
                                .sessions
                                .unreachable(&self.plan.targets[i].node_id)
                                .await;
                            let result = self.result(i, Outcome::Failed, "", &why);
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
        if let Some(why) = self.halted() {
            // Halted while stopping: what was not done yet is left as is.
            self.halt_here(&why, &mut states, &mut results, &HashMap::new());
        }
        if self.lost() {
            self.abandon(&inflight);
            return;
        }
        self.finish(results, stopped).await;
    }

    /// The rollout cannot be carried on ([`Self::halted`]): the commands
    /// still awaited are no longer followed (their nodes failed, naming
    /// why), the targets never started are skipped. Nothing is written;
    /// the end carries it all.
    fn halt_here(
        &self,
        why: &str,
        states: &mut [NodeState],
        results: &mut [Option<NodeResult>],
        inflight: &HashMap<String, InFlight>,
    ) {
        for command_id in inflight.keys() {
            self.commands.forget(command_id);
        }
        for (i, state) in states.iter_mut().enumerate() {
            let result = match state {
                NodeState::Pending => self.result(i, Outcome::Skipped, "", why),
                NodeState::Running => self.result(
                    i,
                    Outcome::Failed,
                    "",
                    &format!("its result was not awaited: {why}"),
                ),
                NodeState::Succeeded | NodeState::Failed => continue,
            };
            if results[i].is_none() {
                self.emit(deploy_event::Kind::NodeResult(result.clone()));
                results[i] = Some(result);
            }
            *state = NodeState::Failed;
        }
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
        let reason = stop_reason(&self.plan.targets[by].name);
        tracing::warn!(deployment_id = %self.deployment_id, %reason, "rollout stopped");
        let mut skipped = Vec::new();
        let mut rolled_back = Vec::new();
        let mut inflight: HashMap<String, InFlight> = HashMap::new();
        for (i, state) in states.iter().enumerate() {
            if self.lost() || self.halted().is_some() {
                // Another replica owns it now and stops it itself, or the
                // database does not answer: nothing more is started.
                break;
            }
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
                    let message = undo.message(&undo_id, &self.plan.app, &target.node_id);
                    if !self.send(i, undo_id, message, &mut inflight).await {
                        let unreachable = self.sessions.unreachable(&target.node_id).await;
                        let why = format!("{reason}; could not roll it back: {unreachable}");
                        let result = self.result(i, Outcome::Failed, &switched_to, &why);
                        self.record(i, &result).await;
                        results[i] = Some(result);
                    }
                }
                NodeState::Failed | NodeState::Running => {}
            }
        }
        while !inflight.is_empty() && !self.lost() && self.halted().is_none() {
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
        // Lost to another replica: its undo commands are not awaited here.
        for command_id in inflight.keys() {
            self.commands.forget(command_id);
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
        // A result that could not be recorded fails the deployment, even
        // when every node succeeded: its record is not complete.
        let halted = self.halted();
        let succeeded = succeeded && halted.is_none();
        let message = match (&halted, &stopped) {
            (Some(why), _) => format!("{why}: {summary}"),
            (None, Some(s)) => format!("{}: {summary}", s.reason),
            (None, None) => summary,
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
        if let Some(why) = &halted {
            details["stop_reason"] = serde_json::Value::from(why.as_str());
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
        crate::observe::observe_deployment(
            self.plan.action.kind(),
            succeeded,
            self.started.elapsed(),
        );
        let stop_reason = match (&halted, &stopped) {
            (Some(why), _) => why.as_str(),
            (None, Some(s)) => s.reason.as_str(),
            (None, None) => "",
        };
        let ended = while_unavailable(END_RETRY_FOR, END_RETRY_EVERY, || {
            self.store.finish_deployment(
                &self.deployment_id,
                status,
                &message,
                stop_reason,
                &audit_event,
                crate::now_unix(),
            )
        })
        .await;
        match ended {
            Ok(true) => {}
            Ok(false) => match self.store.deployment(&self.deployment_id).await {
                // An earlier try was committed but its answer lost (the
                // database went away in between): recorded.
                Ok(Some(d)) if d.status == status && d.message == message => {}
                _ => tracing::warn!(
                    deployment_id = %self.deployment_id, %status,
                    "the deployment was already marked failed (another replica took this one \
                     for dead); its end is not recorded again"
                ),
            },
            Err(err) => {
                tracing::error!(%err, deployment_id = %self.deployment_id, "could not record the end");
            }
        }
        tracing::info!(deployment_id = %self.deployment_id, ?message, "deployment finished");
        if let Some(observer) = &self.observer {
            observer.note(Note::Finished {
                deployment_id: self.deployment_id.clone(),
                app: self.plan.app.clone(),
                succeeded,
                message: message.clone(),
            });
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn an_end_is_written_again_while_the_database_does_not_answer_and_only_then() {
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let every = Duration::from_secs(2);
        // Down twice, then it answers: three writes, the last one kept.
        let got = while_unavailable(Duration::from_secs(60), every, || {
            let n = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                if n < 2 {
                    Err(StoreError::Db(sqlx::Error::PoolTimedOut))
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(got.ok(), Some(2));
        // Any other failure is not tried again.
        calls.store(0, std::sync::atomic::Ordering::SeqCst);
        let got: Result<(), _> = while_unavailable(Duration::from_secs(60), every, || {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Err(StoreError::Db(sqlx::Error::RowNotFound)) }
        })
        .await;
        assert!(got.is_err());
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Down for good: given up once the limit is reached.
        calls.store(0, std::sync::atomic::Ordering::SeqCst);
        let got: Result<(), _> = while_unavailable(Duration::from_secs(10), every, || {
            calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Err(StoreError::Db(sqlx::Error::PoolClosed)) }
        })
        .await;
        assert!(got.is_err_and(|e| e.is_unavailable()));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 6);
    }
    use crate::rollout::{EnvPayload, Rollout, Strategy};

    crate::store::testing::store_tests!(
        a_takeover_fails_what_cannot_be_carried_on_and_finishes_what_is_done,
        a_result_that_cannot_be_recorded_stops_the_rollout_failed_naming_why,
        a_command_that_cannot_be_sent_for_the_database_waits_then_stops_the_rollout,
    );

    /// The events up to the end, and the end.
    async fn until_finished(
        events: &mut mpsc::Receiver<DeployEvent>,
    ) -> (Vec<deploy_event::Kind>, DeployFinished) {
        let mut seen = Vec::new();
        loop {
            let Some(ev) = events.recv().await else {
                panic!("no end in {seen:#?}");
            };
            match ev.kind {
                Some(deploy_event::Kind::Finished(f)) => return (seen, f),
                Some(kind) => seen.push(kind),
                None => {}
            }
        }
    }

    fn plan(action: Action) -> Plan {
        Plan {
            app: "web".to_owned(),
            action,
            targets: vec![Target {
                node_id: "n-1".to_owned(),
                name: "web-1".to_owned(),
            }],
            actor: "tok-1".to_owned(),
            selector: serde_json::json!({}),
            rollout: Rollout {
                strategy: Strategy::Rolling,
                max_parallel: 1,
                max_unavailable: 0,
                canary: 0,
            },
            snapshots: Vec::new(),
        }
    }

    /// Records deployment `id` of `plan` as replica `a`'s, its one node
    /// with result `outcome` ("pending": none).
    async fn record(store: &Store, id: &str, plan: &Plan, outcome: &str) {
        let a = store.clone().for_replica("a");
        let command_id = format!("{id}.n-1");
        let nodes = [NewDeploymentNode {
            node_id: "n-1",
            command_id: &command_id,
            batch: 1,
            prior_release: "v0",
        }];
        let record = plan.to_record();
        a.insert_deployment(
            &NewDeployment {
                id,
                kind: plan.action.kind(),
                app: &plan.app,
                release_id: plan.action.release_id(),
                artifact_sha256: "",
                actor: &plan.actor,
                selector: &plan.selector,
                rollout: &plan.rollout.to_json(),
                snapshots: &[],
                started_at: 1_000,
                nodes: &nodes,
                env_version: None,
                plan: Some(&record),
            },
            &AuditEvent::success(
                plan.action.started_event(),
                &plan.actor,
                "deployment",
                id,
                serde_json::json!({}),
            ),
        )
        .await
        .unwrap();
        if outcome != "pending" {
            assert!(a
                .record_node_result(&command_id, outcome, "v1", "done", &[], 1_001)
                .await
                .unwrap());
        }
    }

    /// A rollout whose node result cannot be written (the database stays
    /// unreachable past [`RESULT_RETRY_FOR`]) starts nothing more and
    /// ends failed, saying why, and its CLI is told meanwhile.
    async fn a_result_that_cannot_be_recorded_stops_the_rollout_failed_naming_why(store: Store) {
        // Two nodes, one at a time; the first done when its owner died.
        let mut two = plan(Action::Deploy {
            release_id: "v1".to_owned(),
            sha256: "ab".repeat(32),
            git_sha: String::new(),
            artifact_url: String::new(),
        });
        two.targets.push(Target {
            node_id: "n-2".to_owned(),
            name: "web-2".to_owned(),
        });
        let a = store.clone().for_replica("a");
        let nodes: Vec<(String, String, u32)> = (1..=2)
            .map(|i| (format!("n-{i}"), format!("d-1.n-{i}"), i))
            .collect();
        let rows: Vec<NewDeploymentNode<'_>> = nodes
            .iter()
            .map(|(node, command, batch)| NewDeploymentNode {
                node_id: node,
                command_id: command,
                batch: *batch,
                prior_release: "v0",
            })
            .collect();
        let record = two.to_record();
        a.insert_deployment(
            &NewDeployment {
                id: "d-1",
                kind: "deploy",
                app: "web",
                release_id: "v1",
                artifact_sha256: "",
                actor: "tok-1",
                selector: &two.selector,
                rollout: &two.rollout.to_json(),
                snapshots: &[],
                started_at: 1_000,
                nodes: &rows,
                env_version: None,
                plan: Some(&record),
            },
            &AuditEvent::success(
                "DEPLOY_STARTED",
                "tok-1",
                "deployment",
                "d-1",
                serde_json::json!({}),
            ),
        )
        .await
        .unwrap();
        assert!(a
            .record_node_result("d-1.n-1", "succeeded", "v1", "done", &[], 1_001)
            .await
            .unwrap());
        let b = store.clone().for_replica("b");
        let orphans = b.orphaned_deployments(&["b".to_owned()]).await.unwrap();
        let (sessions, commands) = (Sessions::new(), Commands::new());
        let outcome = take_over(&b, &sessions, &commands, &orphans[0], None)
            .await
            .unwrap();
        let TakeOver::Resumed { mut events, .. } = outcome else {
            panic!("not resumed: {outcome:?}");
        };
        // The database goes away for good: every write fails at once as
        // unavailable. Time runs on by itself from here (the reconnect
        // grace of web-2, which never connects, the retries).
        store.close().await;
        tokio::time::pause();
        let (seen, finished) = until_finished(&mut events).await;
        // The CLI heard why it waited, then web-2's result.
        let waited = seen.iter().any(|k| {
            matches!(k, deploy_event::Kind::Progress(p)
                if p.node_name == "web-2" && p.step == "record"
                    && p.message.contains("database does not answer"))
        });
        assert!(waited, "{seen:#?}");
        assert!(!finished.succeeded, "{finished:?}");
        assert!(
            finished
                .stop_reason
                .contains("database did not answer for 300 s: the result of node web-2"),
            "{finished:?}"
        );
        assert!(
            finished.message.starts_with(&finished.stop_reason),
            "{finished:?}"
        );
    }

    /// A command for a node with no session here, while the database (the
    /// way to another replica's session) does not answer: the rollout
    /// waits for it, telling the CLI, and past [`RESULT_RETRY_FOR`] stops
    /// failed, naming why — not "unreachable" at once.
    async fn a_command_that_cannot_be_sent_for_the_database_waits_then_stops_the_rollout(
        store: Store,
    ) {
        let one = plan(Action::Deploy {
            release_id: "v1".to_owned(),
            sha256: "ab".repeat(32),
            git_sha: String::new(),
            artifact_url: String::new(),
        });
        let (sessions, commands) = (Sessions::new(), Commands::new());
        let mut events = start(&store, &sessions, &commands, one).await.unwrap();
        // Gone before the run sends anything (it runs once this test
        // waits); time runs on by itself from here.
        store.close().await;
        tokio::time::pause();
        let (seen, finished) = until_finished(&mut events).await;
        let waited = seen.iter().any(|k| {
            matches!(k, deploy_event::Kind::Progress(p)
                if p.node_name == "web-1" && p.step == "send"
                    && p.message.contains("database does not answer"))
        });
        assert!(waited, "{seen:#?}");
        assert!(!finished.succeeded, "{finished:?}");
        assert!(
            finished.stop_reason.contains(
                "database did not answer for 300 s: the command for node web-1 could not be sent"
            ),
            "{finished:?}"
        );
    }

    async fn a_takeover_fails_what_cannot_be_carried_on_and_finishes_what_is_done(store: Store) {
        let env = plan(Action::Env {
            version: 2,
            payloads: [("n-1".to_owned(), EnvPayload::new(2, "A=1\n".to_owned()))].into(),
        });
        let mut done = plan(Action::Deploy {
            release_id: "v1".to_owned(),
            sha256: "ab".repeat(32),
            git_sha: String::new(),
            artifact_url: String::new(),
        });
        done.app = "api".to_owned();
        record(&store, "d-env", &env, "pending").await;
        record(&store, "d-done", &done, "succeeded").await;
        let b = store.clone().for_replica("b");
        let (sessions, commands) = (Sessions::new(), Commands::new());
        let orphans = b.orphaned_deployments(&["b".to_owned()]).await.unwrap();
        assert_eq!(orphans.len(), 2);

        // The env delivery's texts are not recorded: failed, naming why.
        let outcome = take_over(&b, &sessions, &commands, &orphans[0], None)
            .await
            .unwrap();
        let TakeOver::Failed(why) = outcome else {
            panic!("not failed: {outcome:?}");
        };
        assert!(
            why.contains("replica a that ran the deployment is gone"),
            "{why}"
        );
        assert!(why.contains("env deployment cannot be carried on"), "{why}");
        let record = store.deployment("d-env").await.unwrap().unwrap();
        assert_eq!(record.status, "failed");
        assert_eq!(record.message, why);

        // Every node done when its owner died: the taker records the end.
        let outcome = take_over(&b, &sessions, &commands, &orphans[1], None)
            .await
            .unwrap();
        assert!(matches!(outcome, TakeOver::Resumed { .. }), "{outcome:?}");
        // A second taker finds it taken.
        let c = store.clone().for_replica("c");
        let again = take_over(&c, &sessions, &commands, &orphans[1], None)
            .await
            .unwrap();
        assert!(matches!(again, TakeOver::Lost), "{again:?}");
        let mut status = String::new();
        for _ in 0..100 {
            status = store.deployment("d-done").await.unwrap().unwrap().status;
            if status != "running" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(status, "succeeded");
        let kinds: Vec<(String, String)> = store
            .audit_events()
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.resource_id.starts_with("d-"))
            .map(|e| (e.resource_id, e.event_type))
            .collect();
        let of = |id: &str| -> Vec<&str> {
            kinds
                .iter()
                .filter(|(r, _)| r == id)
                .map(|(_, k)| k.as_str())
                .collect()
        };
        assert_eq!(of("d-env"), ["ENV_DELIVERY_STARTED", "ENV_DELIVERY_FAILED"]);
        assert_eq!(
            of("d-done"),
            ["DEPLOY_STARTED", "DEPLOY_TAKEN_OVER", "DEPLOY_COMPLETED"]
        );
    }
}
