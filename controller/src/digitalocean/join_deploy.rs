//! A droplet made by `droplets create` comes up running each app's current
//! release by itself: once the node that enrolled with the droplet's bound
//! join token is online, the controller deploys to it, for each app the
//! agent reports, the app's current release (its last succeeded deploy, see
//! [`Store::current_release`]), through the normal rollout code, so it is
//! recorded and audited like any deployment (actor `controller`, selector
//! naming the node and why). Done once per token (`take_join_deploy`).

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::artifacts::Artifacts;
use crate::audit::{self, AuditEvent};
use crate::link::commands::Commands;
use crate::link::registry::Sessions;
use crate::rollout::{self, Action, Plan, Rollout, Target};
use crate::store::{Store, StoreError};

/// How often the store is looked at for nodes that joined.
const POLL: Duration = Duration::from_secs(2);
/// While another deployment of the app runs, how often to try again.
const BUSY_RETRY: Duration = Duration::from_secs(5);
/// How long to keep trying while the app is busy.
const BUSY_LIMIT: Duration = Duration::from_secs(30 * 60);

/// Runs until `stop`: sends joined droplets their apps' current releases.
pub async fn run(
    store: Store,
    sessions: Sessions,
    commands: Commands,
    artifacts: Artifacts,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(POLL) => {}
        }
        if let Err(err) = once(&store, &sessions, &commands, &artifacts).await {
            tracing::warn!(%err, "could not deploy current releases to joined droplets");
        }
    }
}

/// One look: every online node due gets its deployments started.
pub async fn once(
    store: &Store,
    sessions: &Sessions,
    commands: &Commands,
    artifacts: &Artifacts,
) -> Result<(), StoreError> {
    let due = store.join_deploys_due().await?;
    if due.is_empty() {
        return Ok(());
    }
    let fleet = store.fleet().await?;
    for (node_id, token_id) in due {
        if !sessions.contains(&node_id) {
            continue;
        }
        let Some(node) = fleet.iter().find(|r| r.id == node_id) else {
            continue;
        };
        let now = crate::now_unix();
        if !store.take_join_deploy(&token_id, now).await? {
            continue;
        }
        let mut plans = Vec::new();
        let mut skipped = Vec::new();
        for app in node.apps.iter() {
            let Some((release_id, sha256)) = store.current_release(&app.app).await? else {
                continue;
            };
            if app.current_release == release_id {
                continue;
            }
            if !artifacts.contains(&sha256).await.unwrap_or(false) {
                skipped.push(serde_json::json!({
                    "app": app.app, "release_id": release_id,
                    "why": "its artifact is no longer in the controller's store",
                }));
                continue;
            }
            plans.push(Plan {
                app: app.app.clone(),
                action: Action::Deploy {
                    release_id,
                    sha256,
                    git_sha: String::new(),
                    artifact_url: String::new(),
                },
                targets: vec![Target {
                    node_id: node.id.clone(),
                    name: node.name.clone(),
                }],
                actor: "controller".to_owned(),
                selector: serde_json::json!({
                    "node": node.name,
                    "reason": "droplet joined: current release",
                }),
                rollout: Rollout::default(),
                snapshots: Vec::new(),
            });
        }
        let event = AuditEvent::success(
            audit::JOIN_DEPLOY,
            "controller",
            "node",
            &node.id,
            serde_json::json!({
                "name": node.name,
                "join_token": token_id,
                "apps": plans.iter().map(|p| serde_json::json!({
                    "app": p.app, "release_id": p.action.release_id(),
                })).collect::<Vec<_>>(),
                "skipped": skipped,
            }),
        );
        store.audit(&event, now).await?;
        tracing::info!(node = %node.name, apps = plans.len(), "deploying current releases to a joined droplet");
        for plan in plans {
            tokio::spawn(start_when_free(
                store.clone(),
                sessions.clone(),
                commands.clone(),
                plan,
            ));
        }
    }
    Ok(())
}

/// Starts the deployment, waiting while another one of the app runs.
async fn start_when_free(store: Store, sessions: Sessions, commands: Commands, plan: Plan) {
    let deadline = tokio::time::Instant::now() + BUSY_LIMIT;
    loop {
        match rollout::start(&store, &sessions, &commands, plan.clone()).await {
            Ok(mut events) => {
                // The deployment runs by itself; its events have no reader.
                while events.recv().await.is_some() {}
                return;
            }
            Err(StoreError::AppBusy { .. }) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(BUSY_RETRY).await;
            }
            Err(err) => {
                tracing::warn!(app = %plan.app, %err, "could not deploy the current release to a joined droplet");
                let event = AuditEvent::error(
                    audit::JOIN_DEPLOY,
                    "controller",
                    "node",
                    plan.targets
                        .first()
                        .map(|t| t.node_id.as_str())
                        .unwrap_or(""),
                    serde_json::json!({ "app": plan.app, "release_id": plan.action.release_id() }),
                    format!(
                        "deploying the current release of {} failed to start: {err}",
                        plan.app
                    ),
                );
                if let Err(audit_err) = store.audit(&event, crate::now_unix()).await {
                    tracing::error!(%audit_err, "could not record audit event");
                }
                return;
            }
        }
    }
}
