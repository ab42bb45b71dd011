//! The Control service: the controller API the `slipway` CLI calls, on the
//! same TLS port as the agents. The caller is an API token in
//! `authorization: Bearer …` metadata (see [`crate::auth::apitoken`]) or, without
//! one, an operator client certificate presented in the TLS handshake (see
//! [`crate::auth::operator`]); both carry scopes.
//!
//! Every refused call (no or unknown token or certificate, a scope that does
//! not cover the app, an upload whose bytes do not match its digest) is
//! audited as API_CALL_REFUSED with the token or operator id (never the
//! secret) as actor.

use slipway_proto::limits;
use slipway_proto::v1::control_server::Control;
use slipway_proto::v1::{
    controller_message, AgentUpgradeRequest, ChangeEnvRequest, ControllerMessage,
    EnvHistoryRequest, EnvHistoryResponse, FleetStatusRequest, FleetStatusResponse, GetEnvRequest,
    GetEnvResponse, ListEnvRequest, ListEnvResponse, PruneRequest, RestartRequest, StartRequest,
    StatusRequest, StopRequest, WatchDeploymentRequest,
};
use slipway_proto::v1::{
    selector, AuditEntry, DeployEvent, DeployRequest, ListAuditRequest, ListAuditResponse,
    ListNodesRequest, ListNodesResponse, RollbackRequest, Selector, UploadArtifactResponse,
    UploadChunk,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::artifacts::{self, ArtifactError, Artifacts};
use crate::audit::{self, AuditEvent};
use crate::auth::apitoken::{self, Caller};
use crate::auth::oidc::{self, Oidc, OidcError};
use crate::auth::operator::{self, OperatorError};
use crate::fleet;
use crate::link::commands::{Answer, Commands};
use crate::link::registry::Sessions;
use crate::rollout::{self, Action, Plan, Target};
use crate::store::{Store, StoreError};

mod env;
mod error;
pub mod live;
pub mod watch;

use error::validated;
pub use error::ApiError;
pub(crate) use error::DATABASE_UNAVAILABLE;

/// How long a refreshed FleetStatus waits for the nodes' fresh heartbeats.
pub const REFRESH_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// How long each upgraded agent has to reconnect when the request does not
/// say: a start and a handshake take seconds; a minute covers a slow droplet.
pub const DEFAULT_COMMIT_DEADLINE_SECS: u32 = 60;
/// Largest `keep` a Prune accepts (0 = each node's configured `keep`).
pub const MAX_PRUNE_KEEP: u32 = 1000;

/// The Control gRPC service.
/// What an upload stores, for its audit event and log line.
#[derive(Debug)]
struct UploadKind {
    audit_kind: &'static str,
    target_kind: &'static str,
    noun: &'static str,
}

const ARTIFACT_UPLOAD: UploadKind = UploadKind {
    audit_kind: audit::ARTIFACT_UPLOADED,
    target_kind: "artifact",
    noun: "artifact",
};

const AGENT_BINARY_UPLOAD: UploadKind = UploadKind {
    audit_kind: audit::AGENT_BINARY_UPLOADED,
    target_kind: "agent_binary",
    noun: "agent binary",
};

#[derive(Debug, Clone)]
pub struct ControlService {
    store: Store,
    sessions: Sessions,
    commands: Commands,
    artifacts: Artifacts,
    /// The data dir: the CA and server certificate whose health status shows.
    data_dir: std::path::PathBuf,
    /// Every deployment started here, for followers by id.
    live: live::Live,
    /// The GitHub Actions OIDC verifier, when `[oidc]` is configured.
    oidc: Option<std::sync::Arc<Oidc>>,
    /// Told how each deployment goes (the GitHub statuses), if set.
    observer: Option<rollout::Observer>,
    /// Opens and seals apps' environments.
    secrets: crate::secrets::Secrets,
    /// `snapshot_before_deploy` apps and the DigitalOcean client.
    snapshots: Option<std::sync::Arc<crate::digitalocean::snapshot::SnapshotPolicy>>,
    /// The controller has a `[digitalocean]` table: the fleet views show
    /// the droplets too.
    digitalocean: bool,
    /// Cancelled when the server begins to shut down: deployment
    /// followers' streams ([`watch`]) end then, so the graceful shutdown
    /// does not wait for them.
    stopping: tokio_util::sync::CancellationToken,
    /// The deployment followers served here, within their limits.
    followers: watch::Followers,
}

/// A deployment that has started: its id and its events.
#[derive(Debug)]
pub struct Started {
    /// `d-…`.
    pub deployment_id: String,
    /// Its events, the first being `Started`; the deployment runs on if
    /// this is dropped.
    pub events: tokio::sync::mpsc::Receiver<DeployEvent>,
    /// The env version an env change delivers (0 for other kinds).
    pub env_version: u64,
}

fn bearer<T>(request: &Request<T>) -> Option<String> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))?;
    Some(token.trim().to_owned())
}

/// Text of a caller's scopes, comma separated.
pub(crate) fn scopes_text(caller: &Caller) -> String {
    caller
        .scopes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

fn selector_json(selector: Option<&Selector>) -> serde_json::Value {
    match selector.and_then(|s| s.target.as_ref()) {
        Some(selector::Target::Tag(tag)) => serde_json::json!({ "tag": tag }),
        Some(selector::Target::Node(node)) => serde_json::json!({ "node": node }),
        None => serde_json::json!({}),
    }
}

/// The best name a refused call's audit event has for its caller: the token
/// or operator, else the peer address.
pub(crate) fn refusal_actor(err: &ApiError, token: Option<&str>, peer: &str) -> String {
    match err {
        ApiError::Scope { token, .. } => Some(token.clone()),
        ApiError::Oidc(oidc) => oidc.actor().map(ToOwned::to_owned),
        ApiError::Operator(op) => match &**op {
            OperatorError::Revoked(id) => Some(id.clone()),
            _ => None,
        },
        _ => None,
    }
    .or_else(|| token.and_then(apitoken::token_id).map(ToOwned::to_owned))
    .unwrap_or_else(|| peer.to_owned())
}

/// Logs and audits a refused call as API_CALL_REFUSED (every front door,
/// gRPC and HTTP, refuses through here).
pub(crate) async fn record_refusal(
    store: &Store,
    actor: &str,
    peer: &str,
    what: &str,
    err: &ApiError,
) {
    tracing::warn!(%actor, %peer, %err, "api call refused");
    let event = AuditEvent::error(
        audit::API_CALL_REFUSED,
        actor,
        "api",
        what,
        serde_json::json!({ "peer": peer, "call": what }),
        err.to_string(),
    );
    if let Err(err) = store.audit(&event, crate::now_unix()).await {
        tracing::error!(%err, "could not record audit event");
    }
}

impl ControlService {
    /// The service.
    pub fn new(
        store: Store,
        sessions: Sessions,
        commands: Commands,
        artifacts: Artifacts,
        data_dir: std::path::PathBuf,
        secrets: crate::secrets::Secrets,
    ) -> Self {
        Self {
            store,
            sessions,
            commands,
            artifacts,
            data_dir,
            live: live::Live::default(),
            oidc: None,
            observer: None,
            secrets,
            snapshots: None,
            digitalocean: false,
            stopping: tokio_util::sync::CancellationToken::new(),
            followers: watch::Followers::default(),
        }
    }

    /// The service whose deployment followers stop when `stopping` is
    /// cancelled (the server's shutdown).
    #[must_use]
    pub fn with_stopping(mut self, stopping: tokio_util::sync::CancellationToken) -> Self {
        self.stopping = stopping;
        self
    }

    /// The service following at most `limits` deployments at once
    /// ([`watch::Followers`]).
    #[must_use]
    pub fn with_followers(mut self, limits: watch::FollowerLimits) -> Self {
        self.followers = watch::Followers::new(limits);
        self
    }

    /// The service accepting GitHub Actions OIDC tokens checked by `oidc`.
    #[must_use]
    pub fn with_oidc(mut self, oidc: Option<std::sync::Arc<Oidc>>) -> Self {
        self.oidc = oidc;
        self
    }

    /// Checks a bearer token: an OIDC token (a JWT) when `[oidc]` is
    /// configured, else an API token. Refusals of OIDC tokens are audited
    /// (OIDC_TOKEN_REFUSED) by the verifier; the caller audits the refused
    /// call.
    pub(crate) async fn authenticate_bearer(
        &self,
        token: &str,
        peer: &str,
    ) -> Result<Caller, ApiError> {
        if oidc::looks_like_jwt(token) {
            return match &self.oidc {
                Some(verifier) => Ok(verifier.authenticate(&self.store, token, peer).await?),
                None => Err(OidcError::NotConfigured.into()),
            };
        }
        Ok(apitoken::authenticate(&self.store, token).await?)
    }

    /// The service, telling `observer` how every deployment goes.
    #[must_use]
    pub fn with_observer(mut self, observer: rollout::Observer) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Opens and seals apps' environments.
    pub fn secrets(&self) -> &crate::secrets::Secrets {
        &self.secrets
    }

    /// The artifact store deployments are served from.
    pub fn artifacts(&self) -> &Artifacts {
        &self.artifacts
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The fleet views show DigitalOcean's side (droplets as last synced).
    #[must_use]
    pub fn with_droplets(mut self, configured: bool) -> Self {
        self.digitalocean = configured;
        self
    }

    /// Whether the fleet views show droplets.
    pub fn shows_droplets(&self) -> bool {
        self.digitalocean
    }

    /// The droplets view, when DigitalOcean is configured.
    pub async fn droplets_view(
        &self,
    ) -> Result<Option<crate::digitalocean::inventory::DropletsView>, StoreError> {
        if !self.digitalocean {
            return Ok(None);
        }
        Ok(Some(
            crate::digitalocean::inventory::view(&self.store).await?,
        ))
    }

    /// Snapshots the droplets of the apps `policy` names before each of
    /// their deploys.
    #[must_use]
    pub fn with_snapshots(
        mut self,
        policy: Option<crate::digitalocean::snapshot::SnapshotPolicy>,
    ) -> Self {
        self.snapshots = policy.map(std::sync::Arc::new);
        self
    }

    /// Who watches deployments from outside (GitHub's status queue), if
    /// anyone.
    pub fn observer(&self) -> Option<&rollout::Observer> {
        self.observer.as_ref()
    }

    /// Running deployments' events, by deployment id.
    pub fn live(&self) -> &live::Live {
        &self.live
    }

    /// Follows deployment `id` whichever replica runs it (see [`watch`]),
    /// until its end or `stop`; NOT_FOUND if there is no such deployment.
    pub async fn watch_for(
        &self,
        id: &str,
        caller: &Caller,
        stop: tokio_util::sync::CancellationToken,
    ) -> Result<tokio::sync::mpsc::Receiver<DeployEvent>, ApiError> {
        let slot = self.followers.admit(&caller.token_id).inspect_err(|err| {
            tracing::warn!(deployment_id = %id, caller = %caller.token_id, %err, "deployment follower refused");
        })?;
        watch::watch(&self.store, &self.live, id, slot, stop)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("no deployment {id}")))
    }

    /// Authenticates the call and checks `allowed`; on refusal records
    /// API_CALL_REFUSED.
    async fn authorize<T>(
        &self,
        request: &Request<T>,
        what: &str,
        allowed: impl FnOnce(&Caller) -> bool,
    ) -> Result<Caller, Status> {
        let token = bearer(request);
        // The verified client certificate, if the handshake had one.
        let leaf = request
            .peer_certs()
            .and_then(|certs| certs.first().map(|c| c.as_ref().to_vec()));
        let peer = crate::peer_addr(request);
        let authenticated = match (token.as_deref(), leaf.as_deref()) {
            (Some(token), _) => self.authenticate_bearer(token, &peer).await,
            (None, Some(leaf)) => operator::authenticate(&self.store, leaf)
                .await
                .map_err(ApiError::from),
            (None, None) => Err(ApiError::NoToken),
        };
        let checked = match authenticated {
            Ok(caller) if allowed(&caller) => Ok(caller),
            Ok(caller) => Err(ApiError::Scope {
                token: caller.token_id.clone(),
                what: what.to_owned(),
                scopes: scopes_text(&caller),
            }),
            Err(err) => Err(err),
        };
        match checked {
            Ok(caller) => Ok(caller),
            Err(err) => {
                let actor = refusal_actor(&err, token.as_deref(), &peer);
                self.refused(&actor, &peer, what, &err).await;
                Err(err.into())
            }
        }
    }

    async fn refused(&self, actor: &str, peer: &str, what: &str, err: &ApiError) {
        record_refusal(&self.store, actor, peer, what, err).await;
    }

    /// The enrolled, non-revoked nodes a selector names. For a command to
    /// `app`, the whole fleet or a tag means the nodes that run it: a node
    /// whose agent last reported apps, none of them `app`, is left out (a
    /// fleet of web and worker droplets deploys `web` to the web ones); a
    /// node named with `--node` is taken as named, and one that reported
    /// no app (or never connected) is kept: its agent refuses what it
    /// does not declare.
    async fn select(
        &self,
        selector: Option<&Selector>,
        app: Option<&str>,
    ) -> Result<Vec<Target>, ApiError> {
        let targets: Vec<Target> = match selector.and_then(|s| s.target.as_ref()) {
            None => self.live_targets(None, app).await?,
            // `key:value`, or `key` for a label without a value.
            Some(selector::Target::Tag(tag)) => {
                let label = tag.split_once(':').unwrap_or((tag.as_str(), ""));
                self.live_targets(Some(label), app).await?
            }
            Some(selector::Target::Node(node)) => self
                .store
                .find_node(node)
                .await?
                .into_iter()
                .filter(|n| n.revoked_at.is_none())
                .map(|n| Target {
                    node_id: n.id,
                    name: n.name,
                })
                .collect(),
        };
        if targets.is_empty() {
            let what = selector_json(selector).to_string();
            return Err(ApiError::NoNodes(match app {
                Some(app) => format!("{what} and runs app {app:?}"),
                None => what,
            }));
        }
        Ok(targets)
    }

    /// The non-revoked nodes, all of them or those with `label` (key, value).
    ///
    /// A node matched to a synced DigitalOcean droplet is selected by the
    /// droplet's tags as last synced (`env:production` means the droplets
    /// the DO console shows under it), any other node by its labels.
    async fn live_targets(
        &self,
        label: Option<(&str, &str)>,
        app: Option<&str>,
    ) -> Result<Vec<Target>, ApiError> {
        let droplet_tags = match label {
            Some(_) => self.store.droplet_tags_by_node().await?,
            None => std::collections::HashMap::new(),
        };
        Ok(self
            .store
            .fleet()
            .await?
            .into_iter()
            .filter(|r| r.revoked_at.is_none())
            .filter(|r| app.is_none_or(|app| runs_app(r, app)))
            .filter(|r| {
                label.is_none_or(|(key, value)| match droplet_tags.get(&r.id) {
                    Some(tags) => tags
                        .iter()
                        .any(|t| t.split_once(':').unwrap_or((t.as_str(), "")) == (key, value)),
                    None => r.labels.get(key).and_then(|v| v.as_str()) == Some(value),
                })
            })
            .map(|r| Target {
                node_id: r.id,
                name: r.name,
            })
            .collect())
    }

    /// The non-revoked nodes with the tags env layers apply by: a node
    /// matched to a synced DigitalOcean droplet carries the droplet's tags
    /// as last synced, any other node its labels (`key:value`, or `key` for
    /// an empty value) — the same tags `--tag` selects by.
    pub(crate) async fn node_tags(
        &self,
    ) -> Result<Vec<(Target, std::collections::BTreeSet<String>)>, ApiError> {
        let droplet_tags = self.store.droplet_tags_by_node().await?;
        Ok(self
            .store
            .fleet()
            .await?
            .into_iter()
            .filter(|r| r.revoked_at.is_none())
            .map(|r| {
                let tags = match droplet_tags.get(&r.id) {
                    Some(tags) => tags
                        .iter()
                        .map(|t| crate::secrets::canonical_tag(t))
                        .collect(),
                    None => r
                        .labels
                        .as_object()
                        .into_iter()
                        .flatten()
                        .filter_map(|(k, v)| {
                            v.as_str()
                                .map(|v| crate::secrets::canonical_tag(&format!("{k}:{v}")))
                        })
                        .collect(),
                };
                (
                    Target {
                        node_id: r.id,
                        name: r.name,
                    },
                    tags,
                )
            })
            .collect())
    }

    /// Starts `plan` (one deployment per app: [`StoreError::AppBusy`]) and
    /// registers its events with [`Self::live`].
    async fn start_plan(&self, plan: Plan) -> Result<Started, ApiError> {
        let mut events = rollout::start_observed(
            &self.store,
            &self.sessions,
            &self.commands,
            plan,
            self.observer.clone(),
        )
        .await?;
        let first = events.recv().await;
        let (deployment_id, env_version) = match first.as_ref().and_then(|e| e.kind.as_ref()) {
            Some(slipway_proto::v1::deploy_event::Kind::Started(started)) => {
                (started.deployment_id.clone(), started.env_version)
            }
            _ => {
                return Err(ApiError::Store(StoreError::Integrity(
                    "a deployment's first event was not Started".to_owned(),
                )))
            }
        };
        let Some(first) = first else {
            return Err(ApiError::Store(StoreError::Integrity(
                "a deployment sent no event".to_owned(),
            )));
        };
        let events = self.live.follow(&deployment_id, first, events);
        Ok(Started {
            deployment_id,
            events,
            env_version,
        })
    }

    async fn run_plan(
        &self,
        plan: Plan,
    ) -> Result<ReceiverStream<Result<DeployEvent, Status>>, Status> {
        Ok(forward(self.start_plan(plan).await?.events))
    }

    /// Restart and Prune: checks the app name and rollout, then the token's
    /// `deploy:<app>` scope, selects the nodes and starts the deployment.
    async fn run_command<T>(
        &self,
        request: &Request<T>,
        app: &str,
        verb: &str,
        selector: Option<&Selector>,
        action: Action,
        rollout: Option<&slipway_proto::v1::Rollout>,
    ) -> Result<ReceiverStream<Result<DeployEvent, Status>>, Status> {
        rollout::Rollout::from_proto(rollout).map_err(ApiError::from)?;
        let what = format!("{verb} app {app}");
        let caller = self
            .authorize(request, &what, |c| c.can_deploy(app))
            .await?;
        let started = self
            .command_for(&caller, app, selector, action, rollout)
            .await?;
        Ok(forward(started.events))
    }

    /// Restart, stop, start or prune `app` for `caller`, whose
    /// `deploy:<app>` scope was checked: selects the nodes and starts the
    /// deployment. (The gRPC and HTTP APIs both call this.)
    pub async fn command_for(
        &self,
        caller: &Caller,
        app: &str,
        selector: Option<&Selector>,
        action: Action,
        rollout: Option<&slipway_proto::v1::Rollout>,
    ) -> Result<Started, ApiError> {
        let rollout = rollout::Rollout::from_proto(rollout)?;
        let targets = self.select(selector, Some(app)).await?;
        let plan = Plan {
            app: app.to_owned(),
            action,
            targets,
            actor: caller.token_id.clone(),
            selector: selector_json(selector),
            rollout,
            snapshots: Vec::new(),
        };
        self.start_plan(plan).await
    }

    /// Deploy for `caller`, whose `deploy:<app>` scope was checked and whose
    /// request passed [`validated`]: checks the artifact (uploaded, or an
    /// https URL), the rollout and the selector, then starts it.
    pub async fn deploy_for(
        &self,
        caller: &Caller,
        req: DeployRequest,
    ) -> Result<Started, ApiError> {
        if req.artifact_url.is_empty() {
            if !self.artifacts.contains(&req.sha256).await? {
                return Err(ApiError::NoArtifact(req.sha256.clone()));
            }
        } else {
            check_artifact_url(&req.artifact_url)?;
        }
        let rollout = rollout::Rollout::from_proto(req.rollout.as_ref())?;
        let release_id = if req.release_id.is_empty() {
            rollout::default_release_id(&req.sha256, time::OffsetDateTime::now_utc())
        } else {
            req.release_id.clone()
        };
        let targets = self.select(req.selector.as_ref(), Some(&req.app)).await?;
        let snapshots = self
            .snapshot_before(&caller.token_id, &req.app, &release_id, &targets)
            .await?;
        let plan = Plan {
            app: req.app,
            action: Action::Deploy {
                release_id,
                sha256: req.sha256,
                git_sha: req.git_sha,
                artifact_url: req.artifact_url,
            },
            targets,
            actor: caller.token_id.clone(),
            selector: selector_json(req.selector.as_ref()),
            rollout,
            snapshots,
        };
        self.start_plan(plan).await
    }

    /// `snapshot_before_deploy`: snapshots the target droplets and waits
    /// for them; a failure refuses the deploy (audited DEPLOY_SNAPSHOT_FAILED
    /// with the action ids started) before any node is touched.
    async fn snapshot_before(
        &self,
        actor: &str,
        app: &str,
        release_id: &str,
        targets: &[Target],
    ) -> Result<Vec<serde_json::Value>, ApiError> {
        let Some(policy) = &self.snapshots else {
            return Ok(Vec::new());
        };
        let mut taken = Vec::new();
        let done = policy
            .before_deploy(&self.store, app, release_id, targets, &mut taken)
            .await;
        let taken: Vec<serde_json::Value> = taken
            .iter()
            .map(|s| serde_json::to_value(s).unwrap_or_default())
            .collect();
        match done {
            Ok(()) => Ok(taken),
            Err(crate::digitalocean::snapshot::SnapshotError::Store(err)) => Err(err.into()),
            Err(err) => {
                let message = err.to_string();
                tracing::warn!(%app, "{message}");
                let event = AuditEvent::error(
                    audit::DEPLOY_SNAPSHOT_FAILED,
                    actor,
                    "app",
                    app,
                    serde_json::json!({
                        "app": app,
                        "release_id": release_id,
                        "nodes": targets.iter().map(|t| &t.node_id).collect::<Vec<_>>(),
                        "snapshots": taken,
                    }),
                    message.clone(),
                );
                self.store.audit(&event, crate::now_unix()).await?;
                Err(ApiError::Snapshot(message))
            }
        }
    }

    /// Rollback for `caller` (scope checked, request validated).
    pub async fn rollback_for(
        &self,
        caller: &Caller,
        req: RollbackRequest,
    ) -> Result<Started, ApiError> {
        let rollout = rollout::Rollout::from_proto(req.rollout.as_ref())?;
        let targets = self.select(req.selector.as_ref(), Some(&req.app)).await?;
        let plan = Plan {
            app: req.app,
            action: Action::Rollback {
                to_release_id: req.to_release_id,
            },
            targets,
            actor: caller.token_id.clone(),
            selector: selector_json(req.selector.as_ref()),
            rollout,
            snapshots: Vec::new(),
        };
        self.start_plan(plan).await
    }

    /// The fleet summary `slipway status` and `GET /api/v1/status` show:
    /// nodes, apps, deployments, certificate health and a CA rotation in
    /// progress (`refresh`: every node asked for a fresh heartbeat first).
    pub async fn fleet_status_for(
        &self,
        app: Option<&str>,
        refresh: bool,
    ) -> Result<slipway_proto::v1::FleetStatus, ApiError> {
        let refresh = if refresh {
            Some(self.refresh().await?)
        } else {
            None
        };
        let now = crate::now_unix();
        let (mut views, node_certs) = fleet::nodes_and_certs(&self.store, now).await?;
        let online = self.sessions.online().await;
        fleet::apply_sessions(&mut views, |id| online.contains(id));
        let connected: Vec<String> = views
            .iter()
            .filter(|v| online.contains(&v.id))
            .map(|v| v.id.clone())
            .collect();
        let deployments = self.store.last_deployments(app).await?;
        // A certificate that cannot be read is a problem status shows, not
        // a failed call: the rest of the summary still helps.
        let (certs, unreadable) = match fleet::certs::system_cert_health_with(
            &self.data_dir,
            &self.store,
            node_certs,
            now,
        )
        .await
        {
            Ok(certs) => (Some(certs), None),
            Err(err) => (None, Some(format!("certificate health unknown: {err}"))),
        };
        let mut status = fleet::summarize_status(
            &views,
            &fleet::StatusInputs {
                app,
                connected: &connected,
                refresh: refresh.as_ref(),
                deployments: &deployments,
                now,
                certs: certs.as_ref(),
            },
        );
        status.problems.extend(unreadable);
        status.problems.extend(self.env_lag(&views, app).await?);
        let rotation = self.ca_rotation().await;
        if let Some(r) = &rotation {
            status.notes.push(format!(
                "CA rotation started {}: {}",
                crate::rfc3339(r.started_at),
                if r.lagging_nodes.is_empty() {
                    "every live node is on the new CA (slipway-controller ca rotate finish)"
                        .to_owned()
                } else {
                    format!("still on the old CA: {}", r.lagging_nodes.join(", "))
                }
            ));
        }
        let mut wire: slipway_proto::v1::FleetStatus = status.into();
        wire.ca_rotation = rotation;
        Ok(wire)
    }

    /// Asks every enrolled, non-revoked node for a fresh heartbeat (a
    /// StatusRequest), all at once, waiting at most [`REFRESH_WAIT`]; the
    /// answers by node id. A node's session stores its heartbeat before it
    /// hands over the result, so the store is current once this returns.
    async fn refresh(
        &self,
    ) -> Result<std::collections::HashMap<String, fleet::RefreshAnswer>, ApiError> {
        let prefix = format!(
            "s-{}",
            crate::pki::crypto::random_hex::<8>().map_err(StoreError::from)?
        );
        let mut asks = tokio::task::JoinSet::new();
        for node_id in self.store.live_node_ids().await? {
            let commands = self.commands.clone();
            let sessions = self.sessions.clone();
            let command_id = format!("{prefix}.{node_id}");
            asks.spawn(async move {
                let message = ControllerMessage {
                    kind: Some(controller_message::Kind::StatusRequest(StatusRequest {
                        command_id: command_id.clone(),
                    })),
                };
                let answer = commands
                    .ask(&sessions, &node_id, &command_id, message, REFRESH_WAIT)
                    .await;
                let answer = match answer {
                    Answer::Result(_) => fleet::RefreshAnswer::Answered,
                    Answer::NoSession => fleet::RefreshAnswer::NoSession,
                    Answer::Disconnected => fleet::RefreshAnswer::Disconnected,
                    Answer::TimedOut => fleet::RefreshAnswer::TimedOut,
                };
                (node_id, answer)
            });
        }
        let mut answers = std::collections::HashMap::new();
        while let Some(done) = asks.join_next().await {
            match done {
                Ok((node_id, answer)) => {
                    answers.insert(node_id, answer);
                }
                // A node missing from the answers counts as not answering.
                Err(err) => tracing::error!(%err, "a status request task failed"),
            }
        }
        Ok(answers)
    }

    /// Receive an upload into `store`, then audit and log it as `kind`
    /// says; a refused upload is audited as a refused call.
    async fn upload(
        &self,
        caller: &Caller,
        request: Request<Streaming<UploadChunk>>,
        store: &Artifacts,
        kind: &UploadKind,
    ) -> Result<Response<UploadArtifactResponse>, Status> {
        let peer = crate::peer_addr(&request);
        let received = self.try_upload(store, request.into_inner()).await;
        Ok(Response::new(
            self.uploaded(caller, &peer, received, kind).await?,
        ))
    }

    async fn try_upload(
        &self,
        store: &Artifacts,
        mut inbound: Streaming<UploadChunk>,
    ) -> Result<UploadArtifactResponse, ApiError> {
        let first = inbound
            .message()
            .await
            .map_err(|s| ApiError::Invalid(format!("upload stream: {}", s.message())))?
            .ok_or_else(|| ApiError::Invalid("empty upload".to_owned()))?;
        let rest = futures_util::stream::unfold(inbound, |mut inbound| async move {
            match inbound.message().await {
                Ok(Some(chunk)) => Some((Ok(chunk.data), inbound)),
                Ok(None) => None,
                Err(s) => Some((
                    Err(ApiError::Invalid(format!("upload stream: {}", s.message()))),
                    inbound,
                )),
            }
        });
        receive_upload(store, first.sha256, first.size, first.data, rest).await
    }

    /// An artifact upload over HTTP by `caller` (who may deploy some app,
    /// checked by the caller): the same checks and store as UploadArtifact,
    /// audited ARTIFACT_UPLOADED, or API_CALL_REFUSED when refused.
    pub async fn upload_for<S>(
        &self,
        caller: &Caller,
        peer: &str,
        sha256: String,
        size: u64,
        chunks: S,
    ) -> Result<UploadArtifactResponse, ApiError>
    where
        S: futures_util::Stream<Item = Result<Vec<u8>, ApiError>> + Send,
    {
        let received = receive_upload(&self.artifacts, sha256, size, Vec::new(), chunks).await;
        self.uploaded(caller, peer, received, &ARTIFACT_UPLOAD)
            .await
    }

    /// Audits and logs an upload's outcome as `kind` says; a refused
    /// upload is audited as a refused call.
    async fn uploaded(
        &self,
        caller: &Caller,
        peer: &str,
        received: Result<UploadArtifactResponse, ApiError>,
        kind: &UploadKind,
    ) -> Result<UploadArtifactResponse, ApiError> {
        match received {
            Ok(done) => {
                let event = AuditEvent::success(
                    kind.audit_kind,
                    &caller.token_id,
                    kind.target_kind,
                    &done.sha256,
                    serde_json::json!({ "size": done.size, "already_present": done.already_present }),
                );
                if let Err(err) = self.store.audit(&event, crate::now_unix()).await {
                    tracing::error!(%err, "could not record audit event");
                }
                tracing::info!(sha256 = %done.sha256, size = done.size, "{} uploaded", kind.noun);
                Ok(done)
            }
            Err(err) => {
                let what = format!("upload {}", kind.noun);
                self.refused(&caller.token_id, peer, &what, &err).await;
                Err(err)
            }
        }
    }
}

/// Receives an upload of `size` bytes with digest `sha256` into `store`:
/// `first` then the `rest` of the bytes. Already stored with that size:
/// nothing is written (`already_present`); another size: refused.
async fn receive_upload<S>(
    store: &Artifacts,
    sha256: String,
    size: u64,
    first: Vec<u8>,
    rest: S,
) -> Result<UploadArtifactResponse, ApiError>
where
    S: futures_util::Stream<Item = Result<Vec<u8>, ApiError>>,
{
    use futures_util::StreamExt as _;
    artifacts::check_digest(&sha256)?;
    // One stat answers both "is it there?" and its size. The stored copy
    // was verified against its digest when it came; a client whose file
    // has another size does not hold that artifact (its CLI hashes the
    // file before it asks, so this catches a client that did not).
    match store.size(&sha256).await {
        Ok(stored) if stored == size => {
            return Ok(UploadArtifactResponse {
                sha256,
                size: stored,
                already_present: true,
            })
        }
        Ok(stored) => {
            return Err(ArtifactError::NotThatArtifact {
                sha256,
                stored,
                declared: size,
            }
            .into())
        }
        Err(ArtifactError::NotFound(_)) => {}
        Err(err) => return Err(err.into()),
    }
    let mut upload = store.upload(&sha256, size).await?;
    upload.write(&first).await?;
    let mut rest = std::pin::pin!(rest);
    while let Some(chunk) = rest.next().await {
        upload.write(&chunk?).await?;
    }
    let size = upload.finish().await?;
    Ok(UploadArtifactResponse {
        sha256,
        size,
        already_present: false,
    })
}

#[tonic::async_trait]
impl Control for ControlService {
    type DeployStream = ReceiverStream<Result<DeployEvent, Status>>;
    type RollbackStream = ReceiverStream<Result<DeployEvent, Status>>;
    type RestartStream = ReceiverStream<Result<DeployEvent, Status>>;
    type StopStream = ReceiverStream<Result<DeployEvent, Status>>;
    type StartStream = ReceiverStream<Result<DeployEvent, Status>>;
    type PruneStream = ReceiverStream<Result<DeployEvent, Status>>;
    type AgentUpgradeStream = ReceiverStream<Result<DeployEvent, Status>>;
    type ChangeEnvStream = ReceiverStream<Result<DeployEvent, Status>>;
    type WatchDeploymentStream = ReceiverStream<Result<DeployEvent, Status>>;

    async fn watch_deployment(
        &self,
        request: Request<WatchDeploymentRequest>,
    ) -> Result<Response<Self::WatchDeploymentStream>, Status> {
        validated(request.get_ref())?;
        let caller = self
            .authorize(&request, "follow a deployment", Caller::can_read)
            .await?;
        let id = request.into_inner().deployment_id;
        let events = self.watch_for(&id, &caller, self.stopping.clone()).await?;
        Ok(Response::new(forward(events)))
    }

    async fn change_env(
        &self,
        request: Request<ChangeEnvRequest>,
    ) -> Result<Response<Self::ChangeEnvStream>, Status> {
        validated(request.get_ref())?;
        let app = request.get_ref().app.clone();
        let what = format!("change the env of app {app}");
        let caller = self
            .authorize(&request, &what, |c| c.can_deploy(&app))
            .await?;
        let started = self.change_env_for(&caller, request.into_inner()).await?;
        Ok(Response::new(forward(started.events)))
    }

    async fn list_env(
        &self,
        request: Request<ListEnvRequest>,
    ) -> Result<Response<ListEnvResponse>, Status> {
        validated(request.get_ref())?;
        let ListEnvRequest { app, tag } = request.get_ref().clone();
        self.authorize(&request, "list env names", Caller::can_read)
            .await?;
        Ok(Response::new(self.list_env_for(&app, &tag).await?))
    }

    async fn env_history(
        &self,
        request: Request<EnvHistoryRequest>,
    ) -> Result<Response<EnvHistoryResponse>, Status> {
        validated(request.get_ref())?;
        let EnvHistoryRequest { app, tag } = request.get_ref().clone();
        self.authorize(&request, "read env history", Caller::can_read)
            .await?;
        Ok(Response::new(self.env_history_for(&app, &tag).await?))
    }

    async fn get_env(
        &self,
        request: Request<GetEnvRequest>,
    ) -> Result<Response<GetEnvResponse>, Status> {
        validated(request.get_ref())?;
        let GetEnvRequest { app, key, tag } = request.get_ref().clone();
        let what = format!("read env values of app {app}");
        let caller = self
            .authorize(&request, &what, |c| c.can_read_secrets(&app))
            .await?;
        Ok(Response::new(
            self.get_env_for(&caller, &app, &key, &tag).await?,
        ))
    }

    async fn list_nodes(
        &self,
        request: Request<ListNodesRequest>,
    ) -> Result<Response<ListNodesResponse>, Status> {
        self.authorize(&request, "list nodes", Caller::can_read)
            .await?;
        let mut nodes = fleet::nodes(&self.store, crate::now_unix())
            .await
            .map_err(ApiError::from)?;
        let online = self.sessions.online().await;
        fleet::apply_sessions(&mut nodes, |id| online.contains(id));
        let mut nodes: Vec<slipway_proto::v1::NodeView> = nodes.iter().map(Into::into).collect();
        // Each release's env version, from the controller's deployments.
        let mut by_app = std::collections::HashMap::new();
        for node in &mut nodes {
            for app in &mut node.apps {
                if !by_app.contains_key(&app.app) {
                    let versions = self
                        .store
                        .release_env_versions(&app.app)
                        .await
                        .map_err(ApiError::from)?;
                    by_app.insert(app.app.clone(), versions);
                }
                let versions = &by_app[&app.app];
                for release in &mut app.releases {
                    release.env_version = versions.get(&release.id).copied().unwrap_or(0);
                }
            }
        }
        let droplets = self.droplets_view().await.map_err(ApiError::from)?;
        Ok(Response::new(ListNodesResponse {
            nodes,
            droplets: droplets.as_ref().map(Into::into),
        }))
    }

    async fn list_audit(
        &self,
        request: Request<ListAuditRequest>,
    ) -> Result<Response<ListAuditResponse>, Status> {
        self.authorize(&request, "list audit events", Caller::can_read)
            .await?;
        let since = request.get_ref().since_unix;
        let events = self
            .store
            .audit_events_since(since)
            .await
            .map_err(ApiError::from)?
            .into_iter()
            .map(|e| AuditEntry {
                id: e.id,
                created_at_unix: e.created_at,
                event_type: e.event_type,
                actor: e.actor,
                resource_type: e.resource_type,
                resource_id: e.resource_id,
                details_json: e.details.to_string(),
                status: e.status,
                error_message: e.error_message.unwrap_or_default(),
            })
            .collect();
        Ok(Response::new(ListAuditResponse { events }))
    }

    async fn upload_artifact(
        &self,
        request: Request<Streaming<UploadChunk>>,
    ) -> Result<Response<UploadArtifactResponse>, Status> {
        let caller = self
            .authorize(&request, "upload artifacts", Caller::can_deploy_any)
            .await?;
        let store = self.artifacts.clone();
        self.upload(&caller, request, &store, &ARTIFACT_UPLOAD)
            .await
    }

    async fn deploy(
        &self,
        request: Request<DeployRequest>,
    ) -> Result<Response<Self::DeployStream>, Status> {
        // Fields are checked first: an invalid name could never be in a
        // scope, and "invalid app name" says more than "may not".
        validated(request.get_ref())?;
        let app = request.get_ref().app.clone();
        let what = format!("deploy app {app}");
        let caller = self
            .authorize(&request, &what, |c| c.can_deploy(&app))
            .await?;
        let started = self.deploy_for(&caller, request.into_inner()).await?;
        Ok(Response::new(forward(started.events)))
    }

    async fn rollback(
        &self,
        request: Request<RollbackRequest>,
    ) -> Result<Response<Self::RollbackStream>, Status> {
        validated(request.get_ref())?;
        let app = request.get_ref().app.clone();
        let what = format!("roll back app {app}");
        let caller = self
            .authorize(&request, &what, |c| c.can_deploy(&app))
            .await?;
        let started = self.rollback_for(&caller, request.into_inner()).await?;
        Ok(Response::new(forward(started.events)))
    }

    async fn restart(
        &self,
        request: Request<RestartRequest>,
    ) -> Result<Response<Self::RestartStream>, Status> {
        let req = request.get_ref();
        validated(req)?;
        let stream = self
            .run_command(
                &request,
                &req.app,
                "restart",
                req.selector.as_ref(),
                Action::Restart,
                req.rollout.as_ref(),
            )
            .await?;
        Ok(Response::new(stream))
    }

    async fn stop(
        &self,
        request: Request<StopRequest>,
    ) -> Result<Response<Self::StopStream>, Status> {
        let req = request.get_ref();
        validated(req)?;
        let stream = self
            .run_command(
                &request,
                &req.app,
                "stop",
                req.selector.as_ref(),
                Action::Stop,
                None,
            )
            .await?;
        Ok(Response::new(stream))
    }

    async fn start(
        &self,
        request: Request<StartRequest>,
    ) -> Result<Response<Self::StartStream>, Status> {
        let req = request.get_ref();
        validated(req)?;
        let stream = self
            .run_command(
                &request,
                &req.app,
                "start",
                req.selector.as_ref(),
                Action::Start,
                None,
            )
            .await?;
        Ok(Response::new(stream))
    }

    async fn prune(
        &self,
        request: Request<PruneRequest>,
    ) -> Result<Response<Self::PruneStream>, Status> {
        let req = request.get_ref();
        validated(req)?;
        if req.keep > MAX_PRUNE_KEEP {
            return Err(ApiError::Invalid(format!(
                "keep {} is out of range: 1..={MAX_PRUNE_KEEP} releases, or 0 for each node's configured keep",
                req.keep
            ))
            .into());
        }
        let stream = self
            .run_command(
                &request,
                &req.app,
                "prune",
                req.selector.as_ref(),
                Action::Prune { keep: req.keep },
                // Pruning disturbs no app: every node at once.
                None,
            )
            .await?;
        Ok(Response::new(stream))
    }

    async fn upload_agent_binary(
        &self,
        request: Request<Streaming<UploadChunk>>,
    ) -> Result<Response<UploadArtifactResponse>, Status> {
        let caller = self
            .authorize(
                &request,
                "upload agent binaries",
                Caller::can_upgrade_agents,
            )
            .await?;
        let store = self.artifacts.agent_binaries();
        self.upload(&caller, request, &store, &AGENT_BINARY_UPLOAD)
            .await
    }

    async fn agent_upgrade(
        &self,
        request: Request<AgentUpgradeRequest>,
    ) -> Result<Response<Self::AgentUpgradeStream>, Status> {
        validated(request.get_ref())?;
        let caller = self
            .authorize(&request, "upgrade agents", Caller::can_upgrade_agents)
            .await?;
        let req = request.into_inner();
        let checked = async {
            let store = self.artifacts.agent_binaries();
            let size = match store.size(&req.sha256).await {
                Ok(size) => size,
                Err(ArtifactError::NotFound(_)) => {
                    return Err(ApiError::NoArtifact(format!(
                        "{} (no agent binary with that digest; `slipway agent-upgrade` uploads it)",
                        req.sha256
                    )))
                }
                Err(err) => return Err(err.into()),
            };
            if size == 0 || size > limits::MAX_AGENT_BINARY {
                return Err(ApiError::Invalid(format!(
                    "agent binary {} has {size} bytes (limit 1..={})",
                    req.sha256,
                    limits::MAX_AGENT_BINARY
                )));
            }
            let rollout = rollout::Rollout::from_proto(req.rollout.as_ref())?;
            let targets = self.select(req.selector.as_ref(), None).await?;
            Ok((size, targets, rollout))
        }
        .await;
        let (size, targets, rollout) = checked.map_err(Status::from)?;
        let commit_deadline_secs = match req.commit_deadline_secs {
            0 => DEFAULT_COMMIT_DEADLINE_SECS,
            n => n,
        };
        let plan = Plan {
            app: rollout::AGENT_APP.to_owned(),
            action: Action::AgentUpgrade {
                sha256: req.sha256,
                size,
                version: req.version,
                commit_deadline_secs,
            },
            targets,
            actor: caller.token_id,
            selector: selector_json(req.selector.as_ref()),
            rollout,
            snapshots: Vec::new(),
        };
        Ok(Response::new(self.run_plan(plan).await?))
    }

    async fn fleet_status(
        &self,
        request: Request<FleetStatusRequest>,
    ) -> Result<Response<FleetStatusResponse>, Status> {
        self.authorize(&request, "read the fleet status", Caller::can_read)
            .await?;
        let req = request.into_inner();
        validated(&req)?;
        let app = (!req.app.is_empty()).then_some(req.app.as_str());
        let status = self.fleet_status_for(app, req.refresh).await?;
        let droplets = self.droplets_view().await.map_err(ApiError::from)?;
        Ok(Response::new(FleetStatusResponse {
            status: Some(status),
            droplets: droplets.as_ref().map(Into::into),
        }))
    }
}

impl ControlService {
    /// The CA rotation in progress and the live nodes still on the old CA
    /// (newest certificate issued before it started); `None` when there is
    /// none or it cannot be read (logged).
    async fn ca_rotation(&self) -> Option<slipway_proto::v1::CaRotation> {
        let rotation = match crate::pki::rotation::current(&self.data_dir) {
            Ok(r) => r?,
            Err(err) => {
                tracing::warn!(%err, "cannot read the CA rotation state");
                return None;
            }
        };
        let lagging_nodes = match fleet::certs::nodes_on_old_ca(&self.store, &rotation).await {
            Ok(names) => names,
            Err(err) => {
                tracing::warn!(%err, "cannot list the nodes on the old CA");
                Vec::new()
            }
        };
        Some(slipway_proto::v1::CaRotation {
            phase: rotation.phase,
            started_at: rotation.started_at,
            old_ca_sha256: rotation.old_ca_sha256,
            new_ca_sha256: rotation.new_ca_sha256,
            lagging_nodes,
        })
    }
}

/// A deployment's events as the gRPC stream sends them.
fn forward(
    mut events: tokio::sync::mpsc::Receiver<DeployEvent>,
) -> ReceiverStream<Result<DeployEvent, Status>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            // A client that went away ends the stream at once (a
            // follower's slot is freed with it), not at the next event.
            let event = tokio::select! {
                () = tx.closed() => break,
                event = events.recv() => event,
            };
            let Some(event) = event else { break };
            if tx.send(Ok(event)).await.is_err() {
                break;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// An artifact URL agents can download from: `https://HOST/...`, no
/// whitespace or control characters, at most [`limits::MAX_URL`] bytes.
pub(crate) fn check_artifact_url(url: &str) -> Result<(), ApiError> {
    let invalid =
        |why: &str| ApiError::Invalid(format!("artifact_url {} {why}", limits::shown(url)));
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(invalid(
            "is not an https:// URL (agents download only over TLS)",
        ));
    };
    if url.len() > limits::MAX_URL {
        return Err(invalid(&format!(
            "is longer than {} bytes",
            limits::MAX_URL
        )));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("contains whitespace or control characters"));
    }
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    if host.is_empty() || host.starts_with(':') {
        return Err(invalid("has no host"));
    }
    Ok(())
}

/// Whether a node runs `app`, as far as the controller knows: its agent's
/// last report lists it, or names no app at all (never connected, or a
/// node not set up yet: it is not left out, and its agent says what it
/// lacks).
pub(crate) fn runs_app(node: &crate::store::FleetRow, app: &str) -> bool {
    node.last_seen_at.is_none() || node.apps.is_empty() || node.apps.iter().any(|a| a.app == app)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_names_and_release_ids_are_refused_with_the_rule() {
        let request = |app: &str, id: &str| DeployRequest {
            app: app.to_owned(),
            sha256: "a".repeat(64),
            release_id: id.to_owned(),
            ..Default::default()
        };
        validated(&request("web-1.x_y", "20260102T030405Z-abababababab")).unwrap();
        let err = validated(&request("../web", "")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("app: invalid app name \"../web\": 1 to 64 letters, digits"),
            "{err}"
        );
        for bad in ["-v1", ".v1", "a/b", "v 1", &"v".repeat(129)] {
            let err = validated(&request("web", bad)).unwrap_err();
            assert!(matches!(err, ApiError::Invalid(_)), "{bad:?}");
            assert!(
                err.to_string().starts_with(&format!(
                    "release_id: invalid release id {}: 1 to 128 letters, digits",
                    limits::shown(bad)
                )),
                "{err}"
            );
        }
        // A huge value is cut in the message: it travels in a gRPC header.
        let err = validated(&request("web", &"v".repeat(100_000))).unwrap_err();
        assert!(err.to_string().len() < 300, "{err}");
    }

    #[test]
    fn artifact_urls_must_be_https_with_a_host() {
        assert!(check_artifact_url("https://example.com/web.tar.gz").is_ok());
        assert!(check_artifact_url("https://10.0.0.5:8443/a?x=1").is_ok());
        for (url, why) in [
            ("http://example.com/web.tar.gz", "is not an https:// URL"),
            ("ftp://example.com/web.tar.gz", "is not an https:// URL"),
            ("example.com/web.tar.gz", "is not an https:// URL"),
            ("https:///web.tar.gz", "has no host"),
            ("https://:443/web.tar.gz", "has no host"),
            ("https://example.com/a b", "whitespace"),
        ] {
            let err = check_artifact_url(url).unwrap_err();
            assert!(matches!(err, ApiError::Invalid(_)), "{url}");
            assert!(err.to_string().contains(why), "{url}: {err}");
            assert!(
                matches!(Status::from(err).code(), tonic::Code::InvalidArgument),
                "{url}"
            );
        }
    }
}
