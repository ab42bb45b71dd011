//! Following any deployment by id on any replica: the Control service's
//! `WatchDeployment` and the HTTP API's `/api/v1/deployments/{id}/events`.
//!
//! The replica that runs the deployment (it started it, or took it over)
//! has its events in [`Live`]: they are replayed, then the live ones
//! follow. Any other replica (or one whose follower fell behind) rebuilds
//! the same events from the store: `Started` from the record, a
//! `NodeResult` per recorded node result, and, while the deployment runs,
//! polls the record every [`POLL_EVERY`] for new results, ending with the
//! `Finished` event its replica sent (same outcome fields) once the
//! record says it ended. Per-node progress lines exist only live.
//!
//! A node's results are sent once per outcome (a node that succeeded and
//! was then rolled back gets both, as from its replica), so a replica
//! that took a deployment over (its live events start at the takeover)
//! still shows the results recorded before.

use std::collections::HashSet;
use std::time::Duration;

use slipway_proto::v1::{
    deploy_event, rollout, DeployEvent, DeployFinished, DeployStarted, NodeResult, Outcome,
    TargetNode,
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
/// order they were recorded.
fn new_results(record: &DeploymentRecord, sent: &HashSet<(String, i32)>) -> Vec<DeployEvent> {
    let mut done: Vec<&DeploymentNodeRecord> = record
        .nodes
        .iter()
        .filter(|n| outcome_of(&n.outcome).is_some())
        .collect();
    done.sort_by_key(|n| n.finished_at);
    done.into_iter()
        .filter_map(node_result)
        .filter(|r| !sent.contains(&(r.node_id.clone(), r.outcome)))
        .map(|r| DeployEvent {
            kind: Some(deploy_event::Kind::NodeResult(r)),
        })
        .collect()
}

/// Follows deployment `id`: its events so far, then the rest as they come,
/// until its `Finished` event (see the module doc). None if there is no
/// such deployment. The stream also ends when the receiver is dropped,
/// `stop` is cancelled (the server shuts down), after [`MAX_WATCH`], or
/// if the deployment's record disappears.
pub async fn watch(
    store: &Store,
    live: &Live,
    id: &str,
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
        id: id.to_owned(),
        tx,
        stop,
        sent: HashSet::new(),
    };
    tokio::spawn(async move {
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
    id: String,
    tx: mpsc::Sender<DeployEvent>,
    stop: CancellationToken,
    /// (node id, outcome) of every NodeResult sent.
    sent: HashSet<(String, i32)>,
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
    async fn send(&mut self, event: DeployEvent) -> bool {
        if let Some(deploy_event::Kind::NodeResult(r)) = &event.kind {
            if !self.sent.insert((r.node_id.clone(), r.outcome)) {
                return true;
            }
        }
        self.tx.send(event).await.is_ok()
    }

    async fn run(
        mut self,
        record: DeploymentRecord,
        shape: DeploymentShape,
        followed: Option<Followed>,
    ) {
        let started = match followed {
            Some(followed) => match self.live(&record, followed).await {
                End::Finished | End::Gone => return,
                End::FromStore => true,
            },
            None => false,
        };
        if !started && !self.send(started_event(&record, &shape)).await {
            return;
        }
        self.poll(record, shape).await;
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
        before.retain(|e| match &e.kind {
            Some(deploy_event::Kind::NodeResult(r)) => !live_results.contains(r.node_id.as_str()),
            _ => false,
        });
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
    /// record says the deployment ended.
    async fn poll(mut self, mut record: DeploymentRecord, mut shape: DeploymentShape) {
        loop {
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
