//! Following any deployment by id on any replica: the Control service's
//! `WatchDeployment` and the HTTP API's `/api/v1/deployments/{id}/events`.
//!
//! The replica that runs the deployment (it started it, or took it over)
//! has its events in [`Live`]: they are replayed, then the live ones
//! follow. Any other replica (or one whose follower fell behind) rebuilds
//! the same events from the store: `Started` from the record, a
//! `NodeResult` per recorded node result (after the steps the node
//! reported, recorded with it, as `Progress`), and, while the deployment runs,
//! polls the record every [`POLL_EVERY`] for new results, ending with the
//! `Finished` event its replica sent (same outcome fields) once the
//! record says it ended. A running node's steps exist only live.
//!
//! A node's results are sent once per outcome (a node that succeeded and
//! was then rolled back gets both, as from its replica), so a replica
//! that took a deployment over (its live events start at the takeover)
//! still shows the results recorded before.
//!
//! Each follower holds a slot of this replica's [`Followers`] for as long
//! as its stream runs: at most [`FollowerLimits::total`] in all and
//! [`FollowerLimits::per_caller`] per caller (token); past either, a new
//! follower is refused ([`TooManyFollowers`]) until one ends.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use slipway_proto::v1::{
    deploy_event, rollout, DeployEvent, DeployFinished, DeployStarted, NodeProgress, NodeResult,
    Outcome, TargetNode,
};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::live::{Followed, Live};
use crate::store::{DeploymentNodeRecord, DeploymentRecord, DeploymentShape, Store, StoreError};

/// How often a deployment another replica runs is read again: a node
/// result shows within half a second, at two small queries per follower.
pub const POLL_EVERY: Duration = Duration::from_millis(500);
/// Longest a follower is served from the store: far past any deployment
/// (a batch times out after [`crate::rollout::COMMAND_TIMEOUT`]); a
/// record stuck `running` longer does not hold a stream open for ever.
pub const MAX_WATCH: Duration = Duration::from_secs(24 * 60 * 60);
/// Events buffered towards one follower.
const WATCH_QUEUE: usize = 64;
/// Default [`FollowerLimits::total`].
pub const DEFAULT_MAX_FOLLOWERS: usize = 256;
/// Default [`FollowerLimits::per_caller`].
pub const DEFAULT_MAX_FOLLOWERS_PER_CALLER: usize = 16;

/// How many deployment followers one replica serves at once
/// (`max_followers`, `max_followers_per_caller` in the controller config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FollowerLimits {
    /// In all.
    pub total: usize,
    /// Per caller identity (API token, or operator).
    pub per_caller: usize,
}

impl Default for FollowerLimits {
    fn default() -> Self {
        Self {
            total: DEFAULT_MAX_FOLLOWERS,
            per_caller: DEFAULT_MAX_FOLLOWERS_PER_CALLER,
        }
    }
}

/// A follower refused: the limit it hit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TooManyFollowers {
    /// The replica serves its most followers.
    #[error(
        "this controller replica already serves {limit} deployment followers, its limit \
         (max_followers); try again once one ends, or follow through another replica"
    )]
    Total {
        /// The limit.
        limit: usize,
    },
    /// The caller has its most followers open here.
    #[error(
        "caller {caller} already follows {limit} deployments on this controller replica, the limit \
         per caller (max_followers_per_caller); end one of those streams first"
    )]
    PerCaller {
        /// The caller (token id).
        caller: String,
        /// The limit.
        limit: usize,
    },
}

/// The deployment followers of this replica, counted against
/// [`FollowerLimits`]; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Followers {
    inner: Arc<FollowersInner>,
}

#[derive(Debug, Default)]
struct FollowersInner {
    limits: FollowerLimits,
    /// Followers in all, and per caller (callers with none are removed).
    counts: Mutex<(usize, HashMap<String, usize>)>,
}

impl Followers {
    /// Followers counted against `limits`.
    pub fn new(limits: FollowerLimits) -> Self {
        Self {
            inner: Arc::new(FollowersInner {
                limits,
                counts: Mutex::default(),
            }),
        }
    }

    /// A slot for a follower of `caller`, held until the slot is dropped;
    /// refused past a limit.
    pub fn admit(&self, caller: &str) -> Result<FollowerSlot, TooManyFollowers> {
        let limits = self.inner.limits;
        // Counts change in one step under the lock: consistent after a
        // panic elsewhere.
        let mut counts = self
            .inner
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (total, by_caller) = &mut *counts;
        if *total >= limits.total {
            return Err(TooManyFollowers::Total {
                limit: limits.total,
            });
        }
        let mine = by_caller.entry(caller.to_owned()).or_insert(0);
        if *mine >= limits.per_caller {
            return Err(TooManyFollowers::PerCaller {
                caller: slipway_proto::limits::shown(caller).to_string(),
                limit: limits.per_caller,
            });
        }
        *mine += 1;
        *total += 1;
        Ok(FollowerSlot {
            followers: self.clone(),
            caller: caller.to_owned(),
        })
    }

    /// Followers served now: in all, and `caller`'s.
    pub fn count(&self, caller: &str) -> (usize, usize) {
        let counts = self
            .inner
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (counts.0, counts.1.get(caller).copied().unwrap_or(0))
    }
}

/// One follower's place among [`Followers`]; freed when dropped (with the
/// follower's task, when its stream ends or its client goes away).
#[derive(Debug)]
pub struct FollowerSlot {
    followers: Followers,
    caller: String,
}

impl Drop for FollowerSlot {
    fn drop(&mut self) {
        let mut counts = self
            .followers
            .inner
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let (total, by_caller) = &mut *counts;
        *total = total.saturating_sub(1);
        if let Some(mine) = by_caller.get_mut(&self.caller) {
            *mine = mine.saturating_sub(1);
            if *mine == 0 {
                by_caller.remove(&self.caller);
            }
        }
    }
}

/// `Outcome` of a recorded node outcome; None while it is pending.
fn outcome_of(text: &str) -> Option<Outcome> {
    match text {
        "succeeded" => Some(Outcome::Succeeded),
        "failed" => Some(Outcome::Failed),
        "rolled_back" => Some(Outcome::RolledBack),
        "skipped" => Some(Outcome::Skipped),
        _ => None,
    }
}

/// The recorded rollout (`{"strategy": "rolling", …}`) as the protocol's,
/// None if it is not one the controller writes.
fn rollout_of(json: &serde_json::Value) -> Option<slipway_proto::v1::Rollout> {
    let strategy = match json.get("strategy")?.as_str()? {
        "all_at_once" => rollout::Strategy::AllAtOnce,
        "rolling" => rollout::Strategy::Rolling,
        "canary" => rollout::Strategy::Canary,
        _ => return None,
    };
    let number = |key: &str| {
        json.get(key)
            .and_then(serde_json::Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0)
    };
    Some(slipway_proto::v1::Rollout {
        strategy: strategy as i32,
        max_parallel: number("max_parallel"),
        max_unavailable: number("max_unavailable"),
        canary: number("canary"),
    })
}

/// The `Started` event of a recorded deployment: its targets in rollout
/// order (those the record no longer names, last).
pub fn started_event(record: &DeploymentRecord, shape: &DeploymentShape) -> DeployEvent {
    let mut nodes: Vec<&DeploymentNodeRecord> = record.nodes.iter().collect();
    nodes.sort_by_key(|n| {
        shape
            .order
            .iter()
            .position(|id| *id == n.node_id)
            .unwrap_or(usize::MAX)
    });
    DeployEvent {
        kind: Some(deploy_event::Kind::Started(DeployStarted {
            deployment_id: record.id.clone(),
            app: record.app.clone(),
            release_id: record.release_id.clone(),
            nodes: nodes
                .iter()
                .map(|n| TargetNode {
                    node_id: n.node_id.clone(),
                    node_name: n.node_name.clone(),
                })
                .collect(),
            rollout: rollout_of(&shape.rollout),
            actor: record.actor.clone(),
            env_version: shape.env_version.unwrap_or(0),
        })),
    }
}

/// A recorded node result as its `NodeResult`; None while it is pending.
pub fn node_result(node: &DeploymentNodeRecord) -> Option<NodeResult> {
    Some(NodeResult {
        node_id: node.node_id.clone(),
        node_name: node.node_name.clone(),
        outcome: outcome_of(&node.outcome)? as i32,
        release_id: node.release_id.clone(),
        message: node.message.clone(),
    })
}

/// The `Finished` event of a recorded deployment that ended (None while
/// it runs), with the fields its replica sent: the node whose failure
/// stopped it is found by the recorded stop reason
/// ([`crate::rollout::stop_reason`]).
pub fn finished_event(record: &DeploymentRecord, shape: &DeploymentShape) -> Option<DeployEvent> {
    if record.status == "running" {
        return None;
    }
    let failed = record
        .nodes
        .iter()
        .filter(|n| n.outcome != "succeeded")
        .count();
    let stopped_by = record
        .nodes
        .iter()
        .find(|n| {
            !n.node_name.is_empty()
                && shape.stop_reason == crate::rollout::stop_reason(&n.node_name)
        })
        .map(|n| n.node_name.clone())
        .unwrap_or_default();
    Some(DeployEvent {
        kind: Some(deploy_event::Kind::Finished(DeployFinished {
            deployment_id: record.id.clone(),
            succeeded: record.status == "succeeded",
            failed_nodes: u32::try_from(failed).unwrap_or(u32::MAX),
            message: record.message.clone(),
            stop_reason: shape.stop_reason.clone(),
            stopped_by,
        })),
    })
}

/// The node results of `record` not in `sent` (node id, outcome), in the
/// order they were recorded, each after the steps the node reported
/// (recorded with its result) as `Progress` events, as its replica
/// streamed them.
fn new_results(record: &DeploymentRecord, sent: &HashSet<(String, i32)>) -> Vec<DeployEvent> {
    let mut done: Vec<&DeploymentNodeRecord> = record
        .nodes
        .iter()
        .filter(|n| outcome_of(&n.outcome).is_some())
        .collect();
    done.sort_by_key(|n| n.finished_at);
    let mut events = Vec::new();
    for node in done {
        let Some(result) = node_result(node) else {
            continue;
        };
        if sent.contains(&(result.node_id.clone(), result.outcome)) {
            continue;
        }
        events.extend(node.steps.iter().map(|s| DeployEvent {
            kind: Some(deploy_event::Kind::Progress(NodeProgress {
                node_id: node.node_id.clone(),
                node_name: node.node_name.clone(),
                step: s.step.clone(),
                message: s.message.clone(),
                unix_time: s.unix_time,
            })),
        }));
        events.push(DeployEvent {
            kind: Some(deploy_event::Kind::NodeResult(result)),
        });
    }
    events
}

/// The node an event is about (progress and results).
fn node_of(event: &DeployEvent) -> Option<&str> {
    match &event.kind {
        Some(deploy_event::Kind::NodeResult(r)) => Some(&r.node_id),
        Some(deploy_event::Kind::Progress(p)) => Some(&p.node_id),
        _ => None,
    }
}

/// Follows deployment `id`: its events so far, then the rest as they come,
/// until its `Finished` event (see the module doc). None if there is no
/// such deployment. The stream also ends when the receiver is dropped,
/// `stop` is cancelled (the server shuts down), after [`MAX_WATCH`], or
/// if the deployment's record disappears; `slot` is freed then.
pub async fn watch(
    store: &Store,
    live: &Live,
    id: &str,
    slot: FollowerSlot,
    stop: CancellationToken,
) -> Result<Option<mpsc::Receiver<DeployEvent>>, StoreError> {
    // The record is read before subscribing: a result recorded in between
    // is then in the live events, never lost between the two.
    let Some(record) = store.deployment(id).await? else {
        return Ok(None);
    };
    let Some(shape) = store.deployment_shape(id).await? else {
        return Ok(None);
    };
    let followed = live.subscribe(id);
    let (tx, rx) = mpsc::channel(WATCH_QUEUE);
    let follower = Follower {
        store: store.clone(),
        live: live.clone(),
        id: id.to_owned(),
        tx,
        stop,
        started: false,
        sent: HashSet::new(),
        steps: HashSet::new(),
    };
    tokio::spawn(async move {
        let _slot = slot;
        let deadline = tokio::time::Instant::now() + MAX_WATCH;
        let watched = tokio::time::timeout_at(deadline, follower.run(record, shape, followed));
        if watched.await.is_err() {
            tracing::info!("a deployment follower reached its longest time; its stream ends");
        }
    });
    Ok(Some(rx))
}

/// One follower's state.
struct Follower {
    store: Store,
    /// This replica's running deployments: followed from the record, the
    /// deployment may be taken over here, and its live events (progress
    /// too) are then followed instead.
    live: Live,
    id: String,
    tx: mpsc::Sender<DeployEvent>,
    stop: CancellationToken,
    /// `Started` was sent (a replay after a switch to the live events
    /// does not send it again).
    started: bool,
    /// (node id, outcome) of every NodeResult sent.
    sent: HashSet<(String, i32)>,
    /// (node id, step, message, time) of every Progress sent: a step
    /// streamed live is not sent again from the record.
    steps: HashSet<(String, String, String, i64)>,
}

/// Why the follower stopped sending.
enum End {
    /// It sent the deployment's `Finished` event.
    Finished,
    /// The receiver went away or the server shuts down.
    Gone,
    /// The live events ended early (the follower lagged): go on from the
    /// store.
    FromStore,
}

impl Follower {
    /// Sends `event` unless it was sent already (`Started`, a node's
    /// result with the same outcome); false once the receiver is gone.
    async fn send(&mut self, event: DeployEvent) -> bool {
        let again = match &event.kind {
            Some(deploy_event::Kind::NodeResult(r)) => {
                !self.sent.insert((r.node_id.clone(), r.outcome))
            }
            Some(deploy_event::Kind::Started(_)) => std::mem::replace(&mut self.started, true),
            Some(deploy_event::Kind::Progress(p)) => !self.steps.insert((
                p.node_id.clone(),
                p.step.clone(),
                p.message.clone(),
                p.unix_time,
            )),
            _ => false,
        };
        if again {
            return true;
        }
        self.tx.send(event).await.is_ok()
    }

    async fn run(
        mut self,
        record: DeploymentRecord,
        shape: DeploymentShape,
        followed: Option<Followed>,
    ) {
        let tried_live = followed.is_some();
        if let Some(followed) = followed {
            match self.live(&record, followed).await {
                End::Finished | End::Gone => return,
                End::FromStore => {}
            }
        }
        if !self.send(started_event(&record, &shape)).await {
            return;
        }
        self.poll(record, shape, tried_live).await;
    }

    /// The live events (past, then the rest), with the recorded results
    /// its past lacks (a deployment taken over here) right after `Started`.
    async fn live(&mut self, record: &DeploymentRecord, followed: Followed) -> End {
        let live_results: HashSet<&str> = followed
            .past
            .iter()
            .filter_map(|e| match &e.kind {
                Some(deploy_event::Kind::NodeResult(r)) => Some(r.node_id.as_str()),
                _ => None,
            })
            .collect();
        let mut before = new_results(record, &HashSet::new());
        before.retain(|e| node_of(e).is_some_and(|node| !live_results.contains(node)));
        let mut before = Some(before);
        for event in followed.past {
            let is_started = matches!(event.kind, Some(deploy_event::Kind::Started(_)));
            let is_finished = matches!(event.kind, Some(deploy_event::Kind::Finished(_)));
            if !self.send(event).await {
                return End::Gone;
            }
            if is_finished {
                return End::Finished;
            }
            if is_started {
                for recorded in before.take().unwrap_or_default() {
                    if !self.send(recorded).await {
                        return End::Gone;
                    }
                }
            }
        }
        let Some(mut rest) = followed.rest else {
            // Finished here without a `Finished` event kept: the record
            // has the end.
            return End::FromStore;
        };
        loop {
            let next = tokio::select! {
                () = self.stop.cancelled() => return End::Gone,
                () = self.tx.closed() => return End::Gone,
                next = rest.recv() => next,
            };
            match next {
                Ok(event) => {
                    let is_finished = matches!(event.kind, Some(deploy_event::Kind::Finished(_)));
                    if !self.send(event).await {
                        return End::Gone;
                    }
                    if is_finished {
                        return End::Finished;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::info!(
                        deployment_id = %self.id, missed,
                        "a deployment follower fell behind; following the record instead"
                    );
                    return End::FromStore;
                }
                Err(broadcast::error::RecvError::Closed) => return End::FromStore,
            }
        }
    }

    /// From the store: each new node result, then `Finished` once the
    /// record says the deployment ended. If this replica takes the
    /// deployment over meanwhile (and its live events were not followed
    /// yet), they are followed from then on.
    async fn poll(
        mut self,
        mut record: DeploymentRecord,
        mut shape: DeploymentShape,
        mut tried_live: bool,
    ) {
        loop {
            if !tried_live {
                if let Some(followed) = self.live.subscribe(&self.id) {
                    tried_live = true;
                    match self.live(&record, followed).await {
                        End::Finished | End::Gone => return,
                        End::FromStore => {}
                    }
                }
            }
            let ended = record.status != "running";
            if ended {
                // The stop reason is written with the end.
                match self.store.deployment_shape(&self.id).await {
                    Ok(Some(now)) => shape = now,
                    Ok(None) => return,
                    Err(err) => {
                        tracing::warn!(%err, deployment_id = %self.id, "cannot read a deployment's end; trying again");
                        if !self.pause().await {
                            return;
                        }
                        continue;
                    }
                }
            }
            for event in new_results(&record, &self.sent) {
                if !self.send(event).await {
                    return;
                }
            }
            if let Some(finished) = finished_event(&record, &shape).filter(|_| ended) {
                let _ = self.send(finished).await;
                return;
            }
            if !self.pause().await {
                return;
            }
            match self.store.deployment(&self.id).await {
                Ok(Some(now)) => record = now,
                Ok(None) => return,
                // A database that does not answer for a moment (a
                // PostgreSQL failover): the next poll tries again.
                Err(err) => {
                    tracing::warn!(%err, deployment_id = %self.id, "cannot read a followed deployment; trying again");
                }
            }
        }
    }

    /// Waits [`POLL_EVERY`]; false if the follower should stop instead.
    async fn pause(&self) -> bool {
        tokio::select! {
            () = self.stop.cancelled() => false,
            () = self.tx.closed() => false,
            () = tokio::time::sleep(POLL_EVERY) => true,
        }
    }
}

/// Tests elsewhere (the HTTP and gRPC doors) follow a deployment too.
#[cfg(test)]
pub(crate) mod test_support {
    use crate::store::{NewDeployment, NewDeploymentNode, Store};

    /// Records deployment `id` (two nodes, one per batch, no result yet)
    /// as running.
    pub(crate) async fn insert_running(store: &Store, id: &str) {
        let rollout = serde_json::json!({
            "strategy": "rolling", "max_parallel": 1, "max_unavailable": 0, "canary": 0
        });
        let (b, a) = (format!("{id}.n-b"), format!("{id}.n-a"));
        let nodes = [
            NewDeploymentNode {
                node_id: "n-b",
                command_id: &b,
                batch: 1,
                prior_release: "r1",
            },
            NewDeploymentNode {
                node_id: "n-a",
                command_id: &a,
                batch: 2,
                prior_release: "r1",
            },
        ];
        let started = crate::audit::AuditEvent::success(
            crate::audit::DEPLOY_STARTED,
            "t-1",
            "deployment",
            id,
            serde_json::json!({}),
        );
        store
            .insert_deployment(
                &NewDeployment {
                    id,
                    kind: "deploy",
                    app: "web",
                    release_id: "r2",
                    artifact_sha256: "",
                    actor: "t-1",
                    selector: &serde_json::json!({}),
                    rollout: &rollout,
                    snapshots: &[],
                    started_at: 100,
                    nodes: &nodes,
                    env_version: Some(3),
                    plan: None,
                },
                &started,
            )
            .await
            .unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, name: &str, outcome: &str, finished_at: Option<i64>) -> DeploymentNodeRecord {
        DeploymentNodeRecord {
            node_id: id.to_owned(),
            node_name: name.to_owned(),
            outcome: outcome.to_owned(),
            release_id: if outcome == "succeeded" { "r2" } else { "r1" }.to_owned(),
            message: format!("{name} {outcome}"),
            finished_at,
            steps: Vec::new(),
        }
    }

    fn record(status: &str, nodes: Vec<DeploymentNodeRecord>) -> DeploymentRecord {
        DeploymentRecord {
            id: "d-00000000000000ab".to_owned(),
            kind: "deploy".to_owned(),
            app: "web".to_owned(),
            release_id: "r2".to_owned(),
            actor: "t-1".to_owned(),
            status: status.to_owned(),
            started_at: 100,
            finished_at: (status != "running").then_some(200),
            message: "deployment stopped after b failed: 2 of 3 nodes failed".to_owned(),
            nodes,
            snapshots: Vec::new(),
        }
    }

    fn shape(stop_reason: &str) -> DeploymentShape {
        DeploymentShape {
            rollout: serde_json::json!({
                "strategy": "rolling", "max_parallel": 1, "max_unavailable": 0, "canary": 0
            }),
            env_version: Some(7),
            stop_reason: stop_reason.to_owned(),
            // Rollout order is not name order.
            order: vec!["n-c".to_owned(), "n-a".to_owned(), "n-b".to_owned()],
        }
    }

    fn result_of(event: &DeployEvent) -> &NodeResult {
        match &event.kind {
            Some(deploy_event::Kind::NodeResult(r)) => r,
            other => panic!("not a NodeResult: {other:?}"),
        }
    }

    #[test]
    fn a_record_gives_the_events_its_replica_sent() {
        let running = record(
            "running",
            vec![
                node("n-a", "a", "succeeded", Some(120)),
                node("n-b", "b", "pending", None),
                node("n-c", "c", "succeeded", Some(110)),
            ],
        );
        let Some(deploy_event::Kind::Started(started)) = started_event(&running, &shape("")).kind
        else {
            panic!("not Started");
        };
        assert_eq!(started.deployment_id, "d-00000000000000ab");
        assert_eq!(
            (started.app.as_str(), started.release_id.as_str()),
            ("web", "r2")
        );
        assert_eq!(started.actor, "t-1");
        assert_eq!(started.env_version, 7);
        let order: Vec<&str> = started.nodes.iter().map(|n| n.node_name.as_str()).collect();
        assert_eq!(order, ["c", "a", "b"]);
        let rollout = started.rollout.unwrap();
        assert_eq!(rollout.strategy, rollout::Strategy::Rolling as i32);
        assert_eq!(rollout.max_parallel, 1);
        assert!(finished_event(&running, &shape("")).is_none(), "it runs");

        // Results in the order they were recorded, pending ones left out,
        // and only those not sent yet.
        let mut sent = HashSet::new();
        let results = new_results(&running, &sent);
        let names: Vec<&str> = results
            .iter()
            .map(|e| result_of(e).node_name.as_str())
            .collect();
        assert_eq!(names, ["c", "a"]);
        let c = result_of(&results[0]);
        assert_eq!(c.outcome, Outcome::Succeeded as i32);
        assert_eq!(
            (c.release_id.as_str(), c.message.as_str()),
            ("r2", "c succeeded")
        );
        sent.insert(("n-c".to_owned(), Outcome::Succeeded as i32));
        assert_eq!(new_results(&running, &sent).len(), 1);

        // Stopped after b failed: a rolled back, c skipped.
        let ended = record(
            "failed",
            vec![
                node("n-a", "a", "rolled_back", Some(150)),
                node("n-b", "b", "failed", Some(140)),
                node("n-c", "c", "succeeded", Some(110)),
            ],
        );
        let reason = crate::rollout::stop_reason("b");
        // A node that succeeded, then was rolled back, gets its second
        // result: the last one is its outcome.
        sent.insert(("n-a".to_owned(), Outcome::Succeeded as i32));
        let later: Vec<(String, i32)> = new_results(&ended, &sent)
            .iter()
            .map(|e| (result_of(e).node_name.clone(), result_of(e).outcome))
            .collect();
        assert_eq!(
            later,
            [
                ("b".to_owned(), Outcome::Failed as i32),
                ("a".to_owned(), Outcome::RolledBack as i32)
            ]
        );
        let Some(deploy_event::Kind::Finished(f)) =
            finished_event(&ended, &shape(&reason)).and_then(|e| e.kind)
        else {
            panic!("not Finished");
        };
        assert_eq!(f.deployment_id, "d-00000000000000ab");
        assert!(!f.succeeded);
        assert_eq!(f.failed_nodes, 2);
        assert_eq!(f.message, ended.message);
        assert_eq!(f.stop_reason, "deployment stopped after b failed");
        assert_eq!(f.stopped_by, "b");

        let done = record("succeeded", vec![node("n-a", "a", "succeeded", Some(120))]);
        let Some(deploy_event::Kind::Finished(f)) =
            finished_event(&done, &shape("")).and_then(|e| e.kind)
        else {
            panic!("not Finished");
        };
        assert!(f.succeeded);
        assert_eq!((f.failed_nodes, f.stopped_by.as_str()), (0, ""));
    }

    #[test]
    fn an_unknown_recorded_rollout_is_left_unset() {
        assert_eq!(
            rollout_of(&serde_json::json!({"strategy": "sideways"})),
            None
        );
        assert_eq!(rollout_of(&serde_json::json!("rolling")), None);
        let all = rollout_of(&serde_json::json!({"strategy": "all_at_once"})).unwrap();
        assert_eq!(all.strategy, rollout::Strategy::AllAtOnce as i32);
    }

    /// A store holding running deployment `ID` of nodes n-a, n-b (rolling).
    /// A follower's slot of a replica without other followers.
    fn slot() -> FollowerSlot {
        Followers::default().admit("t-test").unwrap()
    }

    async fn store_with_running() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        test_support::insert_running(&store, ID).await;
        (dir, store)
    }

    #[test]
    fn followers_are_capped_in_all_and_per_caller_and_freed_when_dropped() {
        let followers = Followers::new(FollowerLimits {
            total: 3,
            per_caller: 2,
        });
        let a1 = followers.admit("t-a").unwrap();
        let _a2 = followers.admit("t-a").unwrap();
        let err = followers.admit("t-a").unwrap_err();
        assert_eq!(
            err,
            TooManyFollowers::PerCaller {
                caller: "\"t-a\"".to_owned(),
                limit: 2
            }
        );
        assert!(
            err.to_string().contains("max_followers_per_caller"),
            "{err}"
        );
        let b1 = followers.admit("t-b").unwrap();
        let err = followers.admit("t-c").unwrap_err();
        assert_eq!(err, TooManyFollowers::Total { limit: 3 });
        assert!(err.to_string().contains("(max_followers)"), "{err}");
        assert_eq!(followers.count("t-a"), (3, 2));
        drop(a1);
        assert_eq!(followers.count("t-a"), (2, 1));
        let _c1 = followers.admit("t-c").unwrap();
        drop(b1);
        assert_eq!(followers.count("t-b"), (2, 0));
        let _a3 = followers.admit("t-a").unwrap();
        assert_eq!(followers.count("t-a"), (3, 2));
    }

    /// Waits (up to 5 s) until no follower holds a slot of `followers`.
    async fn all_freed(followers: &Followers) {
        let freed = tokio::time::timeout(Duration::from_secs(5), async {
            while followers.count("").0 > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(freed.is_ok(), "every follower's slot is freed");
    }

    /// A follower served from the record holds its slot while it polls
    /// and frees it when its receiver goes away (not only at its next
    /// event), or when the deployment ends.
    #[tokio::test]
    async fn a_followers_slot_is_freed_when_its_receiver_goes_away() {
        let (_dir, store) = store_with_running().await;
        let live = Live::default();
        let followers = Followers::new(FollowerLimits {
            total: 1,
            per_caller: 1,
        });
        let stop = CancellationToken::new();
        let slot = followers.admit("t-a").unwrap();
        let mut rx = watch(&store, &live, ID, slot, stop.clone())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(
            next(&mut rx).await,
            deploy_event::Kind::Started(_)
        ));
        assert!(followers.admit("t-b").is_err(), "the one slot is taken");
        drop(rx);
        all_freed(&followers).await;
        // A follower that reaches the end frees its slot too.
        let slot = followers.admit("t-b").unwrap();
        finish(&store).await;
        let mut rx = watch(&store, &live, ID, slot, stop.clone())
            .await
            .unwrap()
            .unwrap();
        while rx.recv().await.is_some() {}
        all_freed(&followers).await;
        // No such deployment: the slot goes at once.
        let slot = followers.admit("t-b").unwrap();
        assert!(watch(&store, &live, "d-0000000000000000", slot, stop)
            .await
            .unwrap()
            .is_none());
        assert_eq!(followers.count("t-b"), (0, 0));
    }

    const ID: &str = "d-00000000000000ab";

    async fn record_result(store: &Store, node: &str, at: i64) {
        let steps = [crate::store::DeploymentStep {
            step: "fetch".to_owned(),
            message: format!("{node} fetched"),
            unix_time: at - 1,
        }];
        let recorded = store
            .record_node_result(&format!("{ID}.{node}"), "succeeded", "r2", "ok", &steps, at)
            .await
            .unwrap();
        assert!(recorded);
    }

    async fn finish(store: &Store) {
        let end = crate::audit::AuditEvent::success(
            crate::audit::DEPLOY_COMPLETED,
            "t-1",
            "deployment",
            ID,
            serde_json::json!({}),
        );
        let done = store
            .finish_deployment(ID, "succeeded", "2 of 2 nodes succeeded", "", &end, 300)
            .await
            .unwrap();
        assert!(done);
    }

    async fn next(rx: &mut mpsc::Receiver<DeployEvent>) -> deploy_event::Kind {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an event within 10 s")
            .expect("the stream goes on")
            .kind
            .expect("a kind")
    }

    #[tokio::test]
    async fn a_deployment_another_replica_runs_is_followed_from_the_record_to_its_end() {
        let (_dir, store) = store_with_running().await;
        let shape = store.deployment_shape(ID).await.unwrap().unwrap();
        assert_eq!(shape.order, ["n-b", "n-a"], "rollout order, not by id");
        assert_eq!(shape.env_version, Some(3));
        assert_eq!(shape.rollout["strategy"], "rolling");
        assert!(store
            .deployment_shape("d-0000000000000000")
            .await
            .unwrap()
            .is_none());
        record_result(&store, "n-b", 110).await;

        let live = Live::default();
        let stop = CancellationToken::new();
        assert!(
            watch(&store, &live, "d-0000000000000000", slot(), stop.clone())
                .await
                .unwrap()
                .is_none()
        );
        let mut rx = watch(&store, &live, ID, slot(), stop.clone())
            .await
            .unwrap()
            .unwrap();
        let deploy_event::Kind::Started(started) = next(&mut rx).await else {
            panic!("not Started");
        };
        assert_eq!(started.deployment_id, ID);
        assert_eq!(started.env_version, 3);
        // Its recorded steps, then its result.
        let deploy_event::Kind::Progress(step) = next(&mut rx).await else {
            panic!("not its step");
        };
        assert_eq!(
            (
                step.node_id.as_str(),
                step.step.as_str(),
                step.message.as_str()
            ),
            ("n-b", "fetch", "n-b fetched")
        );
        assert_eq!(step.unix_time, 109);
        let deploy_event::Kind::NodeResult(b) = next(&mut rx).await else {
            panic!("not a NodeResult");
        };
        assert_eq!(b.node_id, "n-b");
        // Recorded later, seen by the next poll; then the end.
        record_result(&store, "n-a", 120).await;
        finish(&store).await;
        assert!(matches!(
            next(&mut rx).await,
            deploy_event::Kind::Progress(_)
        ));
        let deploy_event::Kind::NodeResult(a) = next(&mut rx).await else {
            panic!("not a NodeResult");
        };
        assert_eq!(a.node_id, "n-a");
        let deploy_event::Kind::Finished(f) = next(&mut rx).await else {
            panic!("not Finished");
        };
        assert!(f.succeeded);
        assert_eq!(f.message, "2 of 2 nodes succeeded");
        assert!(rx.recv().await.is_none(), "the stream ends after Finished");

        // Stopping the server ends a follower of a running deployment.
        let (_dir, store) = store_with_running().await;
        let mut rx = watch(&store, &live, ID, slot(), stop.clone())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(
            next(&mut rx).await,
            deploy_event::Kind::Started(_)
        ));
        stop.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert!(matches!(ended, Ok(None)), "{ended:?}");
    }

    #[tokio::test]
    async fn a_deployment_taken_over_here_shows_the_results_recorded_before_once() {
        let (_dir, store) = store_with_running().await;
        // Recorded by the replica that died.
        record_result(&store, "n-b", 110).await;
        // Taken over here: the live events start at the takeover.
        let live = Live::default();
        let (tx, events) = mpsc::channel(8);
        let record = store.deployment(ID).await.unwrap().unwrap();
        let shape = store.deployment_shape(ID).await.unwrap().unwrap();
        drop(live.follow(ID, started_event(&record, &shape), events));
        let mut rx = watch(&store, &live, ID, slot(), CancellationToken::new())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(
            next(&mut rx).await,
            deploy_event::Kind::Started(_)
        ));
        assert!(matches!(
            next(&mut rx).await,
            deploy_event::Kind::Progress(_)
        ));
        let deploy_event::Kind::NodeResult(b) = next(&mut rx).await else {
            panic!("not a NodeResult");
        };
        assert_eq!(b.node_id, "n-b");
        // The live stream sends n-b's result again (a command answered
        // from the agent's ledger): not shown twice.
        let result = |node: &str| DeployEvent {
            kind: Some(deploy_event::Kind::NodeResult(NodeResult {
                node_id: node.to_owned(),
                node_name: String::new(),
                outcome: Outcome::Succeeded as i32,
                release_id: "r2".to_owned(),
                message: "ok".to_owned(),
            })),
        };
        tx.send(result("n-b")).await.unwrap();
        tx.send(result("n-a")).await.unwrap();
        tx.send(DeployEvent {
            kind: Some(deploy_event::Kind::Finished(DeployFinished {
                deployment_id: ID.to_owned(),
                succeeded: true,
                ..DeployFinished::default()
            })),
        })
        .await
        .unwrap();
        let deploy_event::Kind::NodeResult(a) = next(&mut rx).await else {
            panic!("not a NodeResult");
        };
        assert_eq!(a.node_id, "n-a");
        assert!(matches!(
            next(&mut rx).await,
            deploy_event::Kind::Finished(_)
        ));
        assert!(rx.recv().await.is_none());
    }

    #[tokio::test]
    async fn a_follower_from_the_record_switches_to_the_live_events_once_taken_over_here() {
        let (_dir, store) = store_with_running().await;
        let live = Live::default();
        let mut rx = watch(&store, &live, ID, slot(), CancellationToken::new())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(
            next(&mut rx).await,
            deploy_event::Kind::Started(_)
        ));
        // This replica takes it over: progress lines (only live) follow.
        let (tx, events) = mpsc::channel(8);
        let record = store.deployment(ID).await.unwrap().unwrap();
        let shape = store.deployment_shape(ID).await.unwrap().unwrap();
        drop(live.follow(ID, started_event(&record, &shape), events));
        tx.send(DeployEvent {
            kind: Some(deploy_event::Kind::Progress(
                slipway_proto::v1::NodeProgress {
                    node_id: "n-a".to_owned(),
                    step: "fetch".to_owned(),
                    ..Default::default()
                },
            )),
        })
        .await
        .unwrap();
        let deploy_event::Kind::Progress(p) = next(&mut rx).await else {
            panic!("not the live Progress (Started is not sent again)");
        };
        assert_eq!(p.step, "fetch");
        tx.send(DeployEvent {
            kind: Some(deploy_event::Kind::Finished(DeployFinished::default())),
        })
        .await
        .unwrap();
        assert!(matches!(
            next(&mut rx).await,
            deploy_event::Kind::Finished(_)
        ));
        assert!(rx.recv().await.is_none());
    }
}
