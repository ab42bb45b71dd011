//! `snapshot_before_deploy = true` (per app, `[digitalocean.apps.APP]`):
//! before a deploy of the app, a snapshot droplet action for each target
//! node that is a droplet (matched by the droplet id its agent reported),
//! all started together, then polled until each completed. An action that
//! errors or does not finish by the deadline (`snapshot_timeout`) fails the
//! deploy before any node is touched; the action ids go on the deployment
//! (its record and its DEPLOY_STARTED audit details).

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::client::{Client, DoError};
use crate::rollout::Target;
use crate::store::{Store, StoreError};

/// Default `snapshot_timeout`: a droplet snapshot takes minutes per GB.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Default `snapshot_poll`.
pub const DEFAULT_POLL: Duration = Duration::from_secs(10);

/// One snapshot taken for a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The node.
    pub node_id: String,
    /// Its name.
    pub node_name: String,
    /// Its droplet.
    pub droplet_id: u64,
    /// The snapshot droplet action.
    pub action_id: u64,
    /// `completed` (or what it ended as).
    pub status: String,
}

/// Which apps are snapshotted, and how.
#[derive(Debug, Clone)]
pub struct SnapshotPolicy {
    /// The DigitalOcean client.
    pub client: Client,
    /// Apps with `snapshot_before_deploy = true`.
    pub apps: BTreeSet<String>,
    /// How long the snapshots may take together.
    pub timeout: Duration,
    /// How often each action is polled.
    pub poll: Duration,
}

/// Why the snapshots before a deploy failed; the deploy is not started.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// An action ended `errored`.
    #[error(
        "snapshot before deploying {app} failed: droplet action {action_id} (snapshot of \
         droplet {droplet_id}, node {node}) errored; the deploy was not started, no node was touched"
    )]
    Errored {
        /// The app.
        app: String,
        /// The node.
        node: String,
        /// Its droplet.
        droplet_id: u64,
        /// The action.
        action_id: u64,
    },
    /// Not done by the deadline.
    #[error(
        "snapshot before deploying {app} did not finish within {timeout:?}: droplet action(s) \
         {pending} still in progress (digitalocean.snapshot_timeout); the deploy was not \
         started, no node was touched"
    )]
    Timeout {
        /// The app.
        app: String,
        /// The deadline.
        timeout: Duration,
        /// The action ids not done, comma-separated.
        pending: String,
    },
    /// The API refused or failed.
    #[error("snapshot before deploying {app}: {source}; the deploy was not started, no node was touched")]
    Api {
        /// The app.
        app: String,
        /// What DigitalOcean said.
        source: DoError,
    },
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SnapshotPolicy {
    /// Snapshots the droplets among `targets` if `app` asks for it, and
    /// waits for them; the snapshots taken (empty when not asked or no
    /// target is a droplet). `started` gets each action as it is started,
    /// so a failure can still name them.
    pub async fn before_deploy(
        &self,
        store: &Store,
        app: &str,
        release_id: &str,
        targets: &[Target],
        started: &mut Vec<Snapshot>,
    ) -> Result<(), SnapshotError> {
        if !self.apps.contains(app) {
            return Ok(());
        }
        let droplets: HashMap<String, u64> = store
            .node_droplet_ids()
            .await?
            .into_iter()
            .filter_map(|(id, _, droplet)| Some((id, droplet?)))
            .collect();
        let api = |source| SnapshotError::Api {
            app: app.to_owned(),
            source,
        };
        let stamp = crate::now_unix();
        for target in targets {
            let Some(&droplet_id) = droplets.get(&target.node_id) else {
                continue;
            };
            let name = format!("slipway-{app}-{release_id}-{}-{stamp}", target.name);
            let name: String = name.chars().take(200).collect();
            let action = self.client.snapshot(droplet_id, &name).await.map_err(api)?;
            started.push(Snapshot {
                node_id: target.node_id.clone(),
                node_name: target.name.clone(),
                droplet_id,
                action_id: action.id,
                status: action.status,
            });
        }
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            for snap in started.iter_mut().filter(|s| s.status == "in-progress") {
                let action = self.client.action(snap.action_id).await.map_err(api)?;
                snap.status = action.status;
                if snap.status == "errored" {
                    return Err(SnapshotError::Errored {
                        app: app.to_owned(),
                        node: snap.node_name.clone(),
                        droplet_id: snap.droplet_id,
                        action_id: snap.action_id,
                    });
                }
            }
            let pending: Vec<String> = started
                .iter()
                .filter(|s| s.status != "completed")
                .map(|s| s.action_id.to_string())
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(SnapshotError::Timeout {
                    app: app.to_owned(),
                    timeout: self.timeout,
                    pending: pending.join(", "),
                });
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}
