//! Running deployments' events, for anyone who wants to follow one by id
//! (the HTTP API's `/api/v1/deployments/{id}/events`), whoever started it
//! (the CLI over gRPC, or HTTP).
//!
//! Every deployment the Control service starts passes its event stream
//! through [`Live::follow`]: each event is kept (a late subscriber gets them
//! all first) and broadcast, and the stream goes on to its starter
//! unchanged. A finished deployment is forgotten [`KEEP_FINISHED`] later;
//! its outcome stays in the store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use slipway_proto::v1::DeployEvent;
use tokio::sync::{broadcast, mpsc};

/// A finished deployment's events stay this long (a follower that connects
/// just after the end still sees every step).
pub const KEEP_FINISHED: Duration = Duration::from_secs(60);
/// Events buffered per follower; one that falls further behind is told it
/// lagged and the stream ends (it can reload the deployment).
const FOLLOWER_QUEUE: usize = 1024;
/// Events kept per deployment: a deployment of N nodes sends about ten
/// per node; past this the oldest progress lines are not replayed.
const MAX_KEPT: usize = 20_000;
/// Events buffered towards the starter (as the executor's own queue).
const STARTER_QUEUE: usize = 256;

#[derive(Debug)]
struct Entry {
    events: Vec<DeployEvent>,
    tx: broadcast::Sender<DeployEvent>,
    finished: bool,
}

/// The running (and just finished) deployments' events; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Live(Arc<Mutex<HashMap<String, Entry>>>);

/// What a follower gets: the events so far, then the live ones (`None`
/// once the deployment has finished).
#[derive(Debug)]
pub struct Followed {
    /// Every event sent before the subscription.
    pub past: Vec<DeployEvent>,
    /// The rest, as they come; `None` when it has already finished.
    pub rest: Option<broadcast::Receiver<DeployEvent>>,
}

impl Live {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tees the events of deployment `id` (`first`, already taken from it,
    /// then the rest of the stream [`crate::rollout::start`] returned) into
    /// the registry; returns the whole stream for its starter.
    pub fn follow(
        &self,
        id: &str,
        first: DeployEvent,
        mut events: mpsc::Receiver<DeployEvent>,
    ) -> mpsc::Receiver<DeployEvent> {
        let (tx, _) = broadcast::channel(FOLLOWER_QUEUE);
        self.lock().insert(
            id.to_owned(),
            Entry {
                events: Vec::new(),
                tx,
                finished: false,
            },
        );
        let (out_tx, out_rx) = mpsc::channel(STARTER_QUEUE);
        let live = self.clone();
        let id = id.to_owned();
        tokio::spawn(async move {
            let mut starter = Some(out_tx);
            let mut next = Some(first);
            loop {
                let event = match next.take() {
                    Some(event) => event,
                    None => match events.recv().await {
                        Some(event) => event,
                        None => break,
                    },
                };
                {
                    let mut map = live.lock();
                    if let Some(entry) = map.get_mut(&id) {
                        if entry.events.len() < MAX_KEPT {
                            entry.events.push(event.clone());
                        }
                        let _ = entry.tx.send(event.clone());
                    }
                }
                // The starter may stop listening; the deployment goes on.
                if let Some(tx) = &starter {
                    if tx.send(event).await.is_err() {
                        starter = None;
                    }
                }
            }
            if let Some(entry) = live.lock().get_mut(&id) {
                entry.finished = true;
                // Dropping the sender ends every follower's stream.
                let (closed, _) = broadcast::channel(1);
                entry.tx = closed;
            }
            // The starter's stream ends with the deployment's.
            drop(starter);
            tokio::time::sleep(KEEP_FINISHED).await;
            live.lock().remove(&id);
        });
        out_rx
    }

    /// The events of deployment `id` so far and a receiver of the rest, or
    /// `None` if it is neither running nor just finished.
    pub fn subscribe(&self, id: &str) -> Option<Followed> {
        let map = self.lock();
        let entry = map.get(id)?;
        Some(Followed {
            past: entry.events.clone(),
            rest: (!entry.finished).then(|| entry.tx.subscribe()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slipway_proto::v1::{deploy_event, DeployFinished, DeployStarted, NodeProgress};

    fn progress(step: &str) -> DeployEvent {
        DeployEvent {
            kind: Some(deploy_event::Kind::Progress(NodeProgress {
                step: step.to_owned(),
                ..NodeProgress::default()
            })),
        }
    }

    #[tokio::test]
    async fn followers_get_past_and_live_events_and_every_stream_ends_with_the_deployment() {
        let live = Live::default();
        let (tx, rx) = mpsc::channel(8);
        let first = DeployEvent {
            kind: Some(deploy_event::Kind::Started(DeployStarted {
                deployment_id: "d-1".to_owned(),
                ..DeployStarted::default()
            })),
        };
        let mut starter = live.follow("d-1", first, rx);
        tx.send(progress("fetch")).await.unwrap();
        // The starter sees both; then a follower joins.
        assert!(starter.recv().await.is_some());
        assert!(starter.recv().await.is_some());
        let followed = live.subscribe("d-1").unwrap();
        assert_eq!(followed.past.len(), 2);
        let mut rest = followed.rest.unwrap();
        tx.send(progress("unpack")).await.unwrap();
        tx.send(DeployEvent {
            kind: Some(deploy_event::Kind::Finished(DeployFinished::default())),
        })
        .await
        .unwrap();
        drop(tx);
        assert_eq!(rest.recv().await.unwrap(), progress("unpack"));
        assert!(rest.recv().await.is_ok());
        assert!(rest.recv().await.is_err(), "the follower's stream ends");
        assert_eq!(starter.recv().await.unwrap(), progress("unpack"));
        assert!(starter.recv().await.is_some());
        assert!(starter.recv().await.is_none(), "the starter's stream ends");
        // Kept for a late follower, without a live part.
        let late = live.subscribe("d-1").unwrap();
        assert_eq!(late.past.len(), 4);
        assert!(late.rest.is_none());
        assert!(live.subscribe("d-2").is_none());
    }
}
