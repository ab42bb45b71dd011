//! What a deployment tells whoever watches it from outside the rollout
//! (the GitHub deployment statuses): a [`Note`] at its start, after each
//! node's result, and at its end — and when another replica takes it over
//! from a dead one, a note saying so, so that the watcher follows it on. Notes go into a bounded channel with
//! `try_send`: the rollout never waits for an observer, and an observer
//! that falls behind loses progress notes, never the rollout's pace.

use tokio::sync::mpsc;

/// Notes buffered for an observer: a deployment of N nodes sends N + 2.
pub const OBSERVER_QUEUE: usize = 4096;

/// One thing that happened to a deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    /// The deployment was recorded and starts.
    Started {
        deployment_id: String,
        app: String,
        /// `deploy`, `rollback`, ….
        kind: &'static str,
        release_id: String,
        /// The git commit, when the deploy named one.
        git_sha: String,
        nodes: usize,
        actor: String,
    },
    /// A node finished (its latest result).
    Progress {
        deployment_id: String,
        app: String,
        done: usize,
        failed: usize,
        nodes: usize,
        /// The node that just finished and how.
        node: String,
        outcome: String,
    },
    /// Another replica took the deployment over from a dead one and
    /// carries it on; `done` and `failed` nodes had results before.
    Resumed {
        deployment_id: String,
        app: String,
        kind: &'static str,
        release_id: String,
        git_sha: String,
        nodes: usize,
        done: usize,
        failed: usize,
        /// The replica that ran it before.
        from_replica: String,
    },
    /// The deployment ended.
    Finished {
        deployment_id: String,
        app: String,
        succeeded: bool,
        message: String,
    },
}

/// The sending side; cheap to clone.
#[derive(Debug, Clone)]
pub struct Observer(mpsc::Sender<Note>);

impl Observer {
    /// An observer and the notes it receives.
    pub fn channel() -> (Self, mpsc::Receiver<Note>) {
        let (tx, rx) = mpsc::channel(OBSERVER_QUEUE);
        (Self(tx), rx)
    }

    /// Hands `note` over without waiting; a full queue drops it (logged).
    pub fn note(&self, note: Note) {
        match self.0.try_send(note) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => {}
            Err(mpsc::error::TrySendError::Full(note)) => {
                tracing::warn!(?note, "deployment observer is behind; a note was dropped");
            }
        }
    }
}
