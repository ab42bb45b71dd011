//! The JSON API under `/api/v1/`, described by the OpenAPI 3.1 document
//! [`ApiDoc`] served at `/api/v1/openapi.json` (generated from these
//! handlers' annotations and types by utoipa).
//!
//! Reads need any scope (`read` included); deploy, rollback, restart and
//! prune need `deploy:<app>` and run the same code as the gRPC Control API
//! ([`crate::api::ControlService::deploy_for`] and its siblings): the same
//! rollout options, the same one-deployment-per-app rule (409 while one
//! runs). They answer 202 with the deployment's id as soon as it has
//! started; its progress is at `/api/v1/deployments/{id}/events` (Server-Sent
//! Events) and its outcome at `/api/v1/deployments/{id}`.
//!
//! Every input is checked here, with its limit, before use: path segments,
//! query parameters (unknown ones refused) and JSON bodies (at most
//! [`MAX_BODY`] bytes, unknown fields refused). A bad one gets 400 and
//! `{"error": "...", "field": "..."}` naming it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use slipway_proto::limits::{self, Validate as _};
use slipway_proto::v1::{self, deploy_event, DeployEvent};
use tokio_stream::wrappers::ReceiverStream;
use utoipa::{IntoParams, OpenApi, ToSchema};

use super::error::ErrorBody;
use super::{AppError, HttpState, Principal};
use crate::api::{Started, MAX_PRUNE_KEEP};
use crate::auth::apitoken::Caller;
use crate::fleet;
use crate::rollout::{self, Action};
use crate::store::{AuditFilter, DeploymentRecord};

/// Largest JSON body accepted (a deploy request is well under 4 KiB).
pub const MAX_BODY: usize = 64 * 1024;
/// Default and largest `limit` of list queries.
const DEFAULT_LIMIT: u32 = 100;
/// See [`DEFAULT_LIMIT`].
const MAX_LIMIT: u32 = 1000;
/// Largest timestamp accepted in a query (9999-12-31T23:59:59Z).
const MAX_UNIX: i64 = 253_402_300_799;
/// Longest event type in an audit filter.
const MAX_KIND: usize = 64;
/// An SSE comment this often keeps proxies from closing a quiet stream.
const SSE_KEEP_ALIVE: Duration = Duration::from_secs(15);
/// Events queued towards one SSE client.
const SSE_QUEUE: usize = 64;

/// The OpenAPI description of this API.
#[derive(OpenApi)]
#[openapi(
    info(title = "Slipway controller HTTP API", version = "1"),
    paths(
        nodes, droplets, apps, app_releases, deployments, deployment, deployment_events, audit, status,
        deploy, rollback, restart, prune, upload_artifact, session_info,
        list_env, env_history, get_env_value, change_env
    ),
    components(schemas(
        ErrorBody, NodeOut, AppOut, AppNodeOut, PublicOut, ReleasesOut, NodeReleasesOut, DeploymentOut,
        DeploymentNodeOut, AuditOut, StartedOut, DeployBody, RollbackBody, RollbackStartedOut, RestartBody,
        PruneBody, SelectorBody, RolloutBody, Strategy, UploadedOut, SessionOut,
        EnvListOut, EnvEntryOut, EnvHistoryOut, EnvVersionOut, EnvValueOut, EnvChangeBody,
        EnvStartedOut
    )),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
#[derive(Debug)]
pub struct ApiDoc;

/// Declares the `bearer` security scheme (an API token).
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("slwa1.<id>.<secret>")
                    .build(),
            ),
        );
    }
}

/// The API's routes.
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/nodes", get(nodes))
        .route("/api/v1/droplets", get(droplets))
        .route("/api/v1/apps", get(apps))
        .route("/api/v1/apps/{app}/releases", get(app_releases))
        .route("/api/v1/apps/{app}/deploy", post(deploy))
        .route("/api/v1/apps/{app}/rollback", post(rollback))
        .route("/api/v1/apps/{app}/restart", post(restart))
        .route("/api/v1/apps/{app}/prune", post(prune))
        .route("/api/v1/apps/{app}/env", get(list_env).post(change_env))
        .route("/api/v1/apps/{app}/env/history", get(env_history))
        .route("/api/v1/apps/{app}/env/values/{key}", get(get_env_value))
        .route("/api/v1/deployments", get(deployments))
        .route("/api/v1/deployments/{id}", get(deployment))
        .route("/api/v1/deployments/{id}/events", get(deployment_events))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/status", get(status))
        .route("/api/v1/session", get(session_info))
        .route(
            "/api/v1/artifacts/{sha256}",
            axum::routing::put(upload_artifact),
        )
}

/// `GET /api/v1/openapi.json`: this API's OpenAPI 3.1 description (no
/// authentication: it holds no data).
async fn openapi() -> Response {
    match ApiDoc::openapi().to_json() {
        Ok(text) => json_text(StatusCode::OK, text),
        Err(err) => AppError::Internal(err.to_string()).into_response(),
    }
}

/// How old a `/api/v1/nodes` answer may be: with 1,000 nodes, building it
/// (1,000 rows and their JSON) costs milliseconds of CPU, and heartbeats
/// come every few seconds to a minute, so callers polling it together
/// share one answer per second (the token is still checked on each call).
pub const NODES_FRESH: Duration = Duration::from_secs(1);

/// How old an answer callers may get while one of them rebuilds it (see
/// [`super::fresh`]).
pub const NODES_STALE: Duration = Duration::from_secs(5);

/// A JSON body already serialized, as bytes.
fn json_bytes(body: axum::body::Bytes) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// A JSON body already serialized.
fn json_text(status: StatusCode, text: String) -> Response {
    (
        status,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        text,
    )
        .into_response()
}

// ---- inputs -------------------------------------------------------------

/// A path segment, its rejection an [`AppError`] (JSON) like the rest.
struct Segment(String);

impl FromRequestParts<HttpState> for Segment {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &HttpState,
    ) -> Result<Self, Self::Rejection> {
        let Path(value) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| AppError::field("path", e.body_text()))?;
        Ok(Self(value))
    }
}

/// The `{app}` of a path, checked as the CLI's app names are.
fn app_name(segment: Segment) -> Result<String, AppError> {
    let app = segment.0;
    limits::check_app_name("app", &app)
        .map_err(|e| AppError::field(e.field.clone(), e.to_string()))?;
    Ok(app)
}

/// The `{id}` of a deployment path: `d-` and 16 hex digits.
fn deployment_id(segment: Segment) -> Result<String, AppError> {
    let id = segment.0;
    let ok =
        id.len() == 18 && id.starts_with("d-") && id[2..].chars().all(|c| c.is_ascii_hexdigit());
    if !ok {
        return Err(AppError::field(
            "id",
            format!(
                "deployment id {} is not d- and 16 hex digits",
                limits::shown(&id)
            ),
        ));
    }
    Ok(id)
}

/// Parses a query string into `T` (unknown parameters refused).
fn query<T: DeserializeOwned + Default>(raw: Option<String>) -> Result<T, AppError> {
    let Some(raw) = raw.filter(|r| !r.is_empty()) else {
        return Ok(T::default());
    };
    serde_urlencoded::from_str(&raw).map_err(|e| {
        let text = e.to_string();
        // serde names the parameter in backquotes ("unknown field `x`").
        let field = text.split('`').nth(1).unwrap_or("query").to_owned();
        AppError::field(field, format!("query string: {text}"))
    })
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes into `T`; an error
/// names the field (`rollout.max_parallel`) where it is.
async fn json_body<T: DeserializeOwned>(body: Body) -> Result<T, AppError> {
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| AppError::TooLarge(format!("the request body is over {MAX_BODY} bytes")))?;
    let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
        // No body: as `{}`.
        axum::body::Bytes::from_static(b"{}")
    } else {
        bytes
    };
    let mut de = serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let field = if path == "." { "body".to_owned() } else { path };
        AppError::field(field.clone(), format!("{field}: {}", e.inner()))
    })
}

fn check_limit(limit: Option<u32>) -> Result<u32, AppError> {
    match limit.unwrap_or(DEFAULT_LIMIT) {
        n @ 1..=MAX_LIMIT => Ok(n),
        n => Err(AppError::field(
            "limit",
            format!("limit {n} is out of range 1..={MAX_LIMIT}"),
        )),
    }
}

fn check_unix(field: &str, value: Option<i64>) -> Result<Option<i64>, AppError> {
    match value {
        Some(t) if !(0..=MAX_UNIX).contains(&t) => Err(AppError::field(
            field,
            format!("{field} {t} is out of range 0..={MAX_UNIX} (seconds since the epoch)"),
        )),
        other => Ok(other),
    }
}

fn check_optional_app(app: Option<String>) -> Result<Option<String>, AppError> {
    match app {
        Some(app) => {
            limits::check_app_name("app", &app)
                .map_err(|e| AppError::field(e.field.clone(), e.to_string()))?;
            Ok(Some(app))
        }
        None => Ok(None),
    }
}

// ---- reads --------------------------------------------------------------

/// A node as the API shows it (the same fields as `slipway nodes --json`).
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeOut {
    /// Node id (`n-…`).
    id: String,
    /// Node name.
    name: String,
    /// Labels from its join token's tags.
    #[schema(value_type = Object)]
    labels: serde_json::Value,
    /// online, unreachable, unknown, disconnected or revoked.
    state: String,
    /// Last Hello or heartbeat (seconds since the epoch).
    last_seen_at: Option<i64>,
    /// Seconds since the last heartbeat.
    heartbeat_age_secs: Option<i64>,
    /// Agent version last reported.
    agent_version: String,
    /// Agent RSS, bytes.
    agent_rss_bytes: Option<u64>,
    /// Host metrics of the last heartbeat.
    #[schema(value_type = Option<Object>)]
    metrics: Option<crate::store::Metrics>,
    /// Apps of the last heartbeat, with their releases and (`public`)
    /// their public address: `address`, `mode`, `release`, `backend`,
    /// `draining`, `forwarding` as in `/api/v1/apps`.
    #[schema(value_type = Vec<Object>)]
    apps: Vec<crate::store::App>,
    /// When the node was revoked.
    revoked_at: Option<i64>,
    /// Expiry of its newest certificate.
    cert_expires_at: i64,
}

/// The fleet as of now, with live sessions applied.
async fn fleet_views(state: &HttpState) -> Result<Arc<Vec<fleet::NodeView>>, AppError> {
    Ok(state.fleet_views().await?)
}

fn to_value<T: Serialize>(value: &T) -> Result<serde_json::Value, AppError> {
    serde_json::to_value(value).map_err(|e| AppError::Internal(e.to_string()))
}

/// A node state as the CLI names it.
fn state_name(state: crate::link::liveness::NodeState) -> String {
    slipway_proto::view::state_name(v1::NodeState::from(state)).to_owned()
}

/// The nodes, by name.
#[utoipa::path(get, path = "/api/v1/nodes", tag = "fleet",
    responses(
        (status = 200, description = "Every enrolled node", body = [NodeOut]),
        (status = 401, description = "No or unknown token", body = ErrorBody),
    ))]
async fn nodes(State(state): State<HttpState>, who: Principal) -> Result<Response, AppError> {
    who.require(&state, "list nodes", Caller::can_read).await?;
    let body = state
        .nodes_json()
        .get(|| async {
            let views = state.fleet_views().await?;
            let out: Vec<NodeOut> = views
                .iter()
                .map(|v| NodeOut {
                    state: state_name(v.state),
                    id: v.id.clone(),
                    name: v.name.clone(),
                    labels: (*v.labels).clone(),
                    last_seen_at: v.last_seen_at,
                    heartbeat_age_secs: v.heartbeat_age_secs,
                    agent_version: v.agent_version.clone(),
                    agent_rss_bytes: v.agent_rss_bytes,
                    metrics: v.metrics.as_deref().cloned(),
                    apps: v.apps.to_vec(),
                    revoked_at: v.revoked_at,
                    cert_expires_at: v.cert_expires_at,
                })
                .collect();
            let body = serde_json::to_vec(&out).map_err(|e| AppError::Internal(e.to_string()))?;
            Ok::<_, AppError>(axum::body::Bytes::from(body))
        })
        .await?;
    Ok(json_bytes(body))
}

/// DigitalOcean's side of the fleet (droplets as last synced): each
/// droplet under the fleet's tags with its node, or none ("expected, not
/// enrolled"); droplets gone (their nodes retired); live nodes matched to
/// no current droplet.
#[utoipa::path(get, path = "/api/v1/droplets", tag = "fleet",
    responses(
        (status = 200, description = "`droplets`, `gone` and `agents_without_droplet`",
         body = Object),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 404, description = "DigitalOcean is not configured", body = ErrorBody),
    ))]
async fn droplets(State(state): State<HttpState>, who: Principal) -> Result<Response, AppError> {
    who.require(&state, "list droplets", Caller::can_read)
        .await?;
    let view = state.control().droplets_view().await?.ok_or_else(|| {
        AppError::NotFound(
            "DigitalOcean is not configured on this controller (no [digitalocean] table)"
                .to_owned(),
        )
    })?;
    Ok(axum::Json(to_value(&view)?).into_response())
}

/// One app across the fleet.
#[derive(Debug, Serialize, ToSchema)]
pub struct AppOut {
    /// App name.
    app: String,
    /// Distinct current releases (more than one: drift).
    releases: Vec<String>,
    /// True when its nodes do not all run the same release.
    drift: bool,
    /// Nodes reporting it, by name.
    nodes: Vec<AppNodeOut>,
}

/// One app on one node.
#[derive(Debug, Serialize, ToSchema)]
pub struct AppNodeOut {
    /// Node id.
    node_id: String,
    /// Node name.
    node_name: String,
    /// The node's state.
    node_state: String,
    /// Release `current` points at.
    current_release: String,
    /// Last health verdict.
    health: String,
    /// A deploy, rollback or prune holds the app's lock.
    in_progress: bool,
    /// Its public address and the release receiving new connections;
    /// absent when the node's agent does not report it.
    public: Option<PublicOut>,
}

/// An app's public address on a node (`listen`) and the release that
/// receives its new connections.
#[derive(Debug, Serialize, ToSchema)]
pub struct PublicOut {
    /// `listen` ("0.0.0.0:3000", "[::]:80" or a unix socket path); null
    /// when the app has none.
    address: Option<String>,
    /// socket_handover (exec), agent_proxy (docker, PM2 fork mode),
    /// pm2_cluster or none (the app's own port).
    mode: String,
    /// The release new connections go to; null when the address is not
    /// held right now.
    release: Option<String>,
    /// agent_proxy: the loopback backend new connections go to.
    backend: Option<String>,
    /// Connections still finishing on earlier backends.
    draining: u64,
    /// agent_proxy in TCP mode on IPv4: whether the kernel forwards the
    /// node's own clients to the backend, or why not; null otherwise.
    forwarding: Option<String>,
}

impl From<&crate::store::Public> for PublicOut {
    fn from(p: &crate::store::Public) -> Self {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_owned());
        Self {
            address: some(&p.address),
            mode: p.mode.clone(),
            release: some(&p.release),
            backend: some(&p.backend),
            draining: p.draining,
            forwarding: some(&p.forwarding),
        }
    }
}

/// The apps the nodes report, by name, each with its nodes.
#[utoipa::path(get, path = "/api/v1/apps", tag = "fleet",
    responses(
        (status = 200, description = "Apps and where they run", body = [AppOut]),
        (status = 401, description = "No or unknown token", body = ErrorBody),
    ))]
async fn apps(
    State(state): State<HttpState>,
    who: Principal,
) -> Result<Json<Vec<AppOut>>, AppError> {
    who.require(&state, "list apps", Caller::can_read).await?;
    let views = fleet_views(&state).await?;
    let mut by_app: BTreeMap<String, Vec<AppNodeOut>> = BTreeMap::new();
    for v in views.iter() {
        let node_state = slipway_proto::view::state_name(v1::NodeView::from(v).state()).to_owned();
        for a in v.apps.iter() {
            by_app.entry(a.app.clone()).or_default().push(AppNodeOut {
                node_id: v.id.clone(),
                node_name: v.name.clone(),
                node_state: node_state.clone(),
                current_release: a.current_release.clone(),
                health: a.health.clone(),
                in_progress: a.in_progress,
                public: a.public.as_ref().map(PublicOut::from),
            });
        }
    }
    Ok(Json(
        by_app
            .into_iter()
            .map(|(app, nodes)| {
                let mut releases: Vec<String> =
                    nodes.iter().map(|n| n.current_release.clone()).collect();
                releases.sort();
                releases.dedup();
                AppOut {
                    app,
                    drift: releases.len() > 1,
                    releases,
                    nodes,
                }
            })
            .collect(),
    ))
}

/// The releases of one app on each node that reports it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReleasesOut {
    /// App name.
    app: String,
    /// Per node, by name.
    nodes: Vec<NodeReleasesOut>,
}

/// One node's releases of an app.
#[derive(Debug, Serialize, ToSchema)]
pub struct NodeReleasesOut {
    /// Node id.
    node_id: String,
    /// Node name.
    node_name: String,
    /// Release `current` points at.
    current_release: String,
    /// Releases kept on disk (id, status, created_at_unix, artifact_sha256).
    #[schema(value_type = Vec<Object>)]
    releases: Vec<serde_json::Value>,
}

/// Releases of an app per node (from the nodes' last heartbeats).
#[utoipa::path(get, path = "/api/v1/apps/{app}/releases", tag = "fleet",
    params(("app" = String, Path, description = "App name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")),
    responses(
        (status = 200, description = "Releases per node", body = ReleasesOut),
        (status = 400, description = "Invalid app name", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 404, description = "No node reports the app", body = ErrorBody),
    ))]
async fn app_releases(
    State(state): State<HttpState>,
    who: Principal,
    app: Segment,
) -> Result<Json<ReleasesOut>, AppError> {
    let app = app_name(app)?;
    who.require(&state, "list releases", Caller::can_read)
        .await?;
    let views = fleet_views(&state).await?;
    let mut nodes = Vec::new();
    for v in views.iter() {
        if let Some(a) = v.apps.iter().find(|a| a.app == app) {
            nodes.push(NodeReleasesOut {
                node_id: v.id.clone(),
                node_name: v.name.clone(),
                current_release: a.current_release.clone(),
                releases: a.releases.iter().map(to_value).collect::<Result<_, _>>()?,
            });
        }
    }
    if nodes.is_empty() {
        return Err(AppError::NotFound(format!("no node reports app {app:?}")));
    }
    Ok(Json(ReleasesOut { app, nodes }))
}

/// A deployment (deploy, rollback, restart, prune, ...).
#[derive(Debug, Serialize, ToSchema)]
pub struct DeploymentOut {
    /// `d-` and 16 hex digits.
    id: String,
    /// deploy, rollback, restart, stop, start, prune or agent-upgrade.
    kind: String,
    /// The app.
    app: String,
    /// Release deployed or rolled back to ("" when none was named).
    release_id: String,
    /// API token or operator id that asked for it.
    actor: String,
    /// running, succeeded or failed.
    status: String,
    /// Seconds since the epoch.
    started_at: i64,
    /// When it ended.
    finished_at: Option<i64>,
    /// One-line summary.
    message: String,
    /// Per node (only on `/api/v1/deployments/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    nodes: Option<Vec<DeploymentNodeOut>>,
    /// DigitalOcean snapshots taken before it (`snapshot_before_deploy`):
    /// `node_id`, `node_name`, `droplet_id`, `action_id`, `status` each.
    #[schema(value_type = Vec<Object>)]
    snapshots: Vec<serde_json::Value>,
}

/// One node of a deployment.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeploymentNodeOut {
    /// Node id.
    node_id: String,
    /// Node name.
    node_name: String,
    /// pending, succeeded, failed, rolled_back or skipped.
    outcome: String,
    /// Release current on the node afterwards.
    release_id: String,
    /// Why, especially on failure.
    message: String,
    /// When its result came.
    finished_at: Option<i64>,
    /// Its steps (fetch, verify, unpack, activate, health, ...): those
    /// reported so far while it runs, then as recorded with its result.
    steps: Vec<StepOut>,
}

/// One step a node reported.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct StepOut {
    /// Step name.
    step: String,
    /// Its message.
    message: String,
    /// When (seconds since the epoch).
    unix_time: i64,
}

fn deployment_out(d: DeploymentRecord, with_nodes: bool) -> DeploymentOut {
    DeploymentOut {
        id: d.id,
        kind: d.kind,
        app: d.app,
        release_id: d.release_id,
        actor: d.actor,
        status: d.status,
        started_at: d.started_at,
        finished_at: d.finished_at,
        message: d.message,
        snapshots: d.snapshots,
        nodes: with_nodes.then(|| {
            d.nodes
                .into_iter()
                .map(|n| DeploymentNodeOut {
                    node_id: n.node_id,
                    node_name: n.node_name,
                    outcome: n.outcome,
                    release_id: n.release_id,
                    message: n.message,
                    finished_at: n.finished_at,
                    steps: n
                        .steps
                        .into_iter()
                        .map(|s| StepOut {
                            step: s.step,
                            message: s.message,
                            unix_time: s.unix_time,
                        })
                        .collect(),
                })
                .collect()
        }),
    }
}

/// `GET /api/v1/deployments` parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeploymentsQuery {
    /// Only this app's.
    #[param(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    app: Option<String>,
    /// Only those started before this (seconds since the epoch): the next page.
    #[param(minimum = 0, maximum = 253_402_300_799_i64)]
    before: Option<i64>,
    /// At most this many (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// Deployments, newest first.
#[utoipa::path(get, path = "/api/v1/deployments", tag = "deployments",
    params(DeploymentsQuery),
    responses(
        (status = 200, description = "Deployments, newest first", body = [DeploymentOut]),
        (status = 400, description = "A bad parameter", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
    ))]
async fn deployments(
    State(state): State<HttpState>,
    who: Principal,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<DeploymentOut>>, AppError> {
    let q: DeploymentsQuery = query(raw)?;
    let app = check_optional_app(q.app)?;
    let before = check_unix("before", q.before)?;
    let limit = check_limit(q.limit)?;
    who.require(&state, "list deployments", Caller::can_read)
        .await?;
    let list = state
        .store()
        .deployments(app.as_deref(), before, limit)
        .await?;
    Ok(Json(
        list.into_iter().map(|d| deployment_out(d, false)).collect(),
    ))
}

/// One deployment with its nodes and their steps.
#[utoipa::path(get, path = "/api/v1/deployments/{id}", tag = "deployments",
    params(("id" = String, Path, description = "Deployment id (d-…)", pattern = r"^d-[0-9a-f]{16}$")),
    responses(
        (status = 200, description = "The deployment", body = DeploymentOut),
        (status = 400, description = "Not a deployment id", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 404, description = "No such deployment", body = ErrorBody),
    ))]
async fn deployment(
    State(state): State<HttpState>,
    who: Principal,
    id: Segment,
) -> Result<Json<DeploymentOut>, AppError> {
    let id = deployment_id(id)?;
    who.require(&state, "read a deployment", Caller::can_read)
        .await?;
    let record = state
        .store()
        .deployment(&id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no deployment {id}")))?;
    let mut out = deployment_out(record, true);
    if let (Some(followed), Some(nodes)) =
        (state.control().live().subscribe(&id), out.nodes.as_mut())
    {
        for event in &followed.past {
            if let Some(deploy_event::Kind::Progress(p)) = &event.kind {
                // Nodes with a recorded result have their steps already.
                let running = nodes
                    .iter_mut()
                    .find(|n| n.node_id == p.node_id && n.finished_at.is_none());
                if let Some(node) = running {
                    node.steps.push(StepOut {
                        step: p.step.clone(),
                        message: p.message.clone(),
                        unix_time: p.unix_time,
                    });
                }
            }
        }
    }
    Ok(Json(out))
}

/// One deployment event as SSE: its kind as the event name, JSON data.
fn sse_event(event: &DeployEvent) -> Option<Event> {
    let (name, data) = match event.kind.as_ref()? {
        deploy_event::Kind::Started(s) => (
            "started",
            serde_json::json!({
                "deployment_id": s.deployment_id,
                "app": s.app,
                "release_id": s.release_id,
                "actor": s.actor,
                "nodes": s.nodes.iter().map(|n| serde_json::json!({"node_id": n.node_id, "node_name": n.node_name})).collect::<Vec<_>>(),
                "strategy": s.rollout.as_ref().map(|r| r.strategy().as_str_name()),
            }),
        ),
        deploy_event::Kind::Batch(b) => (
            "batch",
            serde_json::json!({
                "index": b.index,
                "count": b.count,
                "canary": b.canary,
                "nodes": b.nodes.iter().map(|n| serde_json::json!({"node_id": n.node_id, "node_name": n.node_name})).collect::<Vec<_>>(),
            }),
        ),
        deploy_event::Kind::Progress(p) => (
            "progress",
            serde_json::json!({
                "node_id": p.node_id,
                "node_name": p.node_name,
                "step": p.step,
                "message": p.message,
                "unix_time": p.unix_time,
            }),
        ),
        deploy_event::Kind::NodeResult(r) => (
            "node_result",
            serde_json::json!({
                "node_id": r.node_id,
                "node_name": r.node_name,
                "outcome": outcome_name(r.outcome()),
                "release_id": r.release_id,
                "message": r.message,
            }),
        ),
        deploy_event::Kind::Finished(f) => (
            "finished",
            serde_json::json!({
                "deployment_id": f.deployment_id,
                "succeeded": f.succeeded,
                "failed_nodes": f.failed_nodes,
                "message": f.message,
                "stop_reason": f.stop_reason,
                "stopped_by": f.stopped_by,
            }),
        ),
    };
    Some(Event::default().event(name).data(data.to_string()))
}

fn outcome_name(outcome: v1::Outcome) -> &'static str {
    match outcome {
        v1::Outcome::Succeeded => "succeeded",
        v1::Outcome::Failed => "failed",
        v1::Outcome::RolledBack => "rolled_back",
        v1::Outcome::Skipped => "skipped",
        _ => "unspecified",
    }
}

/// Live progress of a deployment as Server-Sent Events: `started`,
/// `batch`, `progress` (a node's step), `node_result`, `finished`, each
/// with JSON data; the stream ends after `finished`. Any replica follows
/// a running deployment: the one running it sends its events as they
/// come; another rebuilds them from the database (`started`, then each
/// `node_result` as it is recorded, after that node's recorded steps as
/// `progress`, then `finished`). A
/// deployment that ended more than a minute before (or on another
/// replica) gets one `snapshot` event (its record) and the stream ends.
#[utoipa::path(get, path = "/api/v1/deployments/{id}/events", tag = "deployments",
    params(("id" = String, Path, description = "Deployment id (d-…)", pattern = r"^d-[0-9a-f]{16}$")),
    responses(
        (status = 200, description = "The event stream", content_type = "text/event-stream", body = String),
        (status = 400, description = "Not a deployment id", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 404, description = "No such deployment", body = ErrorBody),
        (status = 503, description = "This replica follows as many deployments as it may (in all, or for this token: the error says which limit); try again after Retry-After seconds", body = ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait before trying again"))),
    ))]
async fn deployment_events(
    State(state): State<HttpState>,
    who: Principal,
    id: Segment,
) -> Result<Response, AppError> {
    let id = deployment_id(id)?;
    who.require(&state, "follow a deployment", Caller::can_read)
        .await?;
    let snapshot = match state.control().live().subscribe(&id) {
        Some(_) => None,
        None => Some(
            state
                .store()
                .deployment(&id)
                .await?
                .ok_or_else(|| AppError::NotFound(format!("no deployment {id}")))?,
        ),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(SSE_QUEUE);
    match snapshot.filter(|record| record.status != "running") {
        Some(record) => {
            let data = serde_json::to_string(&deployment_out(record, true)).unwrap_or_default();
            let _ = tx
                .send(Ok(Event::default().event("snapshot").data(data)))
                .await;
        }
        None => {
            // Here or on another replica: followed (live or from the
            // record) until `finished`, the client leaving, or shutdown.
            let mut events = state
                .control()
                .watch_for(&id, &who.caller, state.shutdown().clone())
                .await?;
            tokio::spawn(async move {
                loop {
                    let next = tokio::select! {
                        () = tx.closed() => return,
                        next = events.recv() => next,
                    };
                    let Some(event) = next else { return };
                    if let Some(e) = sse_event(&event) {
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    }
    Ok(Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(SSE_KEEP_ALIVE))
        .into_response())
}

/// `GET /api/v1/audit` parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// At or after (seconds since the epoch).
    #[param(minimum = 0, maximum = 253_402_300_799_i64)]
    since: Option<i64>,
    /// Before (seconds since the epoch).
    #[param(minimum = 0, maximum = 253_402_300_799_i64)]
    until: Option<i64>,
    /// Event type, e.g. DEPLOY_FAILED (upper-case letters and `_`).
    #[param(pattern = r"^[A-Z_]{1,64}$")]
    kind: Option<String>,
    /// Events about this app.
    #[param(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    app: Option<String>,
    /// At most this many, the newest (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
}

/// One audit event.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditOut {
    /// UUID.
    id: String,
    /// Seconds since the epoch.
    created_at: i64,
    /// The same, RFC 3339 UTC.
    time: String,
    /// Event type (DEPLOY_STARTED, API_CALL_REFUSED, ...).
    event_type: String,
    /// Who acted: token, operator or node id, or a peer address.
    actor: String,
    /// Kind of thing acted on.
    resource_type: String,
    /// Which one.
    resource_id: String,
    /// Details, by event type.
    #[schema(value_type = Object)]
    details: serde_json::Value,
    /// success or error.
    status: String,
    /// Why it failed or was refused.
    error_message: Option<String>,
}

/// Audit events, newest first, filtered by time, kind and app.
#[utoipa::path(get, path = "/api/v1/audit", tag = "audit",
    params(AuditQuery),
    responses(
        (status = 200, description = "Matching events, newest first", body = [AuditOut]),
        (status = 400, description = "A bad parameter", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
    ))]
async fn audit(
    State(state): State<HttpState>,
    who: Principal,
    RawQuery(raw): RawQuery,
) -> Result<Json<Vec<AuditOut>>, AppError> {
    let q: AuditQuery = query(raw)?;
    let since = check_unix("since", q.since)?;
    let until = check_unix("until", q.until)?;
    let app = check_optional_app(q.app)?;
    let limit = check_limit(q.limit)?;
    if let Some(kind) = &q.kind {
        if kind.is_empty()
            || kind.len() > MAX_KIND
            || !kind.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        {
            return Err(AppError::field(
                "kind",
                format!(
                    "kind {} is not an event type (1 to {MAX_KIND} upper-case letters and _, e.g. DEPLOY_FAILED)",
                    limits::shown(kind)
                ),
            ));
        }
    }
    who.require(&state, "list audit events", Caller::can_read)
        .await?;
    let events = state
        .store()
        .audit_events_filtered(&AuditFilter {
            since,
            until,
            kind: q.kind,
            app,
            limit,
        })
        .await?;
    Ok(Json(
        events
            .into_iter()
            .map(|e| AuditOut {
                time: crate::rfc3339(e.created_at),
                id: e.id,
                created_at: e.created_at,
                event_type: e.event_type,
                actor: e.actor,
                resource_type: e.resource_type,
                resource_id: e.resource_id,
                details: e.details,
                status: e.status,
                error_message: e.error_message,
            })
            .collect(),
    ))
}

/// `GET /api/v1/status` parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StatusQuery {
    /// Only nodes reporting this app count.
    #[param(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    app: Option<String>,
    /// Ask every node for a fresh heartbeat first (waits up to 10 s).
    refresh: Option<bool>,
}

/// The fleet summary of `slipway status --json`; 200 when all is well,
/// 503 when anything is wrong (an uptime check can watch it).
#[utoipa::path(get, path = "/api/v1/status", tag = "fleet",
    params(StatusQuery),
    responses(
        (status = 200, description = "All nodes online and healthy (slipway status --json)", body = Object),
        (status = 503, description = "Something is wrong: see `problems`", body = Object),
        (status = 400, description = "A bad parameter", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
    ))]
async fn status(
    State(state): State<HttpState>,
    who: Principal,
    RawQuery(raw): RawQuery,
) -> Result<Response, AppError> {
    let q: StatusQuery = query(raw)?;
    let app = check_optional_app(q.app)?;
    who.require(&state, "read the fleet status", Caller::can_read)
        .await?;
    let summary = state
        .control()
        .fleet_status_for(app.as_deref(), q.refresh.unwrap_or(false))
        .await?;
    let code = if summary.problems.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let text = slipway_proto::view::status_json(&summary)
        .map_err(|e| AppError::Internal(e.to_string()))?;
    Ok(json_text(code, text))
}

// ---- changes ------------------------------------------------------------

/// Which nodes: a label or one node; neither = every node.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SelectorBody {
    /// A label, `key:value` or a bare `key`.
    #[schema(max_length = 319)]
    tag: Option<String>,
    /// A node id (n-…) or a name only one node has.
    #[schema(max_length = 253)]
    node: Option<String>,
}

/// Rollout strategy, as `slipway deploy --strategy` names it.
#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Every node at once.
    AllAtOnce,
    /// Batches of max_parallel.
    Rolling,
    /// `canary` nodes first, then the rest.
    Canary,
}

/// How the nodes are taken through it (default: all at once).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutBody {
    /// The strategy.
    strategy: Option<Strategy>,
    /// Nodes per batch (rolling, canary).
    #[schema(minimum = 0, maximum = 100_000)]
    max_parallel: Option<u32>,
    /// Node failures tolerated before the rollout stops (rolling, canary).
    #[schema(minimum = 0, maximum = 100_000)]
    max_unavailable: Option<u32>,
    /// Canary nodes (canary).
    #[schema(minimum = 0, maximum = 100_000)]
    canary: Option<u32>,
}

/// Largest node count a rollout setting may name.
const MAX_ROLLOUT_NUMBER: u32 = 100_000;

fn selector(body: Option<SelectorBody>) -> Result<Option<v1::Selector>, AppError> {
    let Some(body) = body else { return Ok(None) };
    let target = match (body.tag, body.node) {
        (Some(_), Some(_)) => {
            return Err(AppError::field(
                "selector",
                "selector: give tag or node, not both",
            ))
        }
        (Some(tag), None) => Some(v1::selector::Target::Tag(tag)),
        (None, Some(node)) => Some(v1::selector::Target::Node(node)),
        (None, None) => None,
    };
    Ok(target.map(|t| v1::Selector { target: Some(t) }))
}

/// The rollout as the gRPC API takes it, checked with the same rules.
fn rollout_proto(body: Option<RolloutBody>) -> Result<Option<v1::Rollout>, AppError> {
    let Some(body) = body else { return Ok(None) };
    for (field, value) in [
        ("rollout.max_parallel", body.max_parallel),
        ("rollout.max_unavailable", body.max_unavailable),
        ("rollout.canary", body.canary),
    ] {
        if value.is_some_and(|v| v > MAX_ROLLOUT_NUMBER) {
            return Err(AppError::field(
                field,
                format!("{field} is out of range 0..={MAX_ROLLOUT_NUMBER}"),
            ));
        }
    }
    let strategy = match body.strategy.unwrap_or(Strategy::AllAtOnce) {
        Strategy::AllAtOnce => v1::rollout::Strategy::AllAtOnce,
        Strategy::Rolling => v1::rollout::Strategy::Rolling,
        Strategy::Canary => v1::rollout::Strategy::Canary,
    };
    let proto = v1::Rollout {
        strategy: strategy.into(),
        max_parallel: body.max_parallel.unwrap_or(0),
        max_unavailable: body.max_unavailable.unwrap_or(0),
        canary: body.canary.unwrap_or(0),
    };
    rollout::Rollout::from_proto(Some(&proto))
        .map_err(|e| AppError::field("rollout", e.to_string()))?;
    Ok(Some(proto))
}

fn field_error(e: limits::FieldError) -> AppError {
    AppError::field(e.field.clone(), e.to_string())
}

/// A deployment that started.
#[derive(Debug, Serialize, ToSchema)]
pub struct StartedOut {
    /// Its id.
    deployment_id: String,
    /// The app.
    app: String,
    /// deploy, rollback, restart or prune.
    kind: String,
    /// Where its record is.
    url: String,
    /// Where its live progress is (Server-Sent Events).
    events_url: String,
}

fn started(app: String, kind: &str, started: Started) -> Response {
    let id = started.deployment_id;
    // Dropping the events does not stop it: followers use the events URL.
    drop(started.events);
    (
        StatusCode::ACCEPTED,
        Json(StartedOut {
            url: format!("/api/v1/deployments/{id}"),
            events_url: format!("/api/v1/deployments/{id}/events"),
            deployment_id: id,
            app,
            kind: kind.to_owned(),
        }),
    )
        .into_response()
}

/// Deploy an artifact: by `artifact_url` (https; every agent downloads it
/// and checks `sha256`) or, without a URL, one already uploaded to the
/// controller under `sha256`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployBody {
    /// sha256 of the artifact, 64 lowercase hex digits.
    #[schema(pattern = r"^[0-9a-f]{64}$")]
    sha256: String,
    /// An https:// URL the agents download it from.
    #[schema(max_length = 2048, pattern = r"^https://[^/?#@:\s][^\s]*$")]
    artifact_url: Option<String>,
    /// Release id (default `<UTC time>-<sha256[..12]>`).
    #[schema(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
    release_id: Option<String>,
    /// Git commit it was built from (shown only): hex.
    #[schema(pattern = r"^([0-9a-fA-F]{7,64})?$")]
    git_sha: Option<String>,
    /// Which nodes (default every node).
    selector: Option<SelectorBody>,
    /// How (default all at once).
    rollout: Option<RolloutBody>,
}

/// Deploy a release of the app (needs `deploy:<app>`).
#[utoipa::path(post, path = "/api/v1/apps/{app}/deploy", tag = "deployments",
    params(("app" = String, Path, description = "App name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")),
    request_body = DeployBody,
    responses(
        (status = 202, description = "Started; follow events_url", body = StartedOut),
        (status = 400, description = "A bad field", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "The token may not deploy this app", body = ErrorBody),
        (status = 409, description = "A deployment of the app runs, no node matches, or the artifact is not uploaded", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ))]
async fn deploy(
    State(state): State<HttpState>,
    who: Principal,
    app: Segment,
    body: Body,
) -> Result<Response, AppError> {
    let app = app_name(app)?;
    let body: DeployBody = json_body(body).await?;
    let request = v1::DeployRequest {
        app: app.clone(),
        sha256: body.sha256,
        release_id: body.release_id.unwrap_or_default(),
        selector: selector(body.selector)?,
        git_sha: body.git_sha.unwrap_or_default(),
        artifact_url: body.artifact_url.unwrap_or_default(),
        rollout: rollout_proto(body.rollout)?,
    };
    request.validate().map_err(field_error)?;
    if !request.artifact_url.is_empty() {
        crate::api::check_artifact_url(&request.artifact_url)
            .map_err(|e| AppError::field("artifact_url", e.to_string()))?;
    }
    who.require(&state, &format!("deploy app {app}"), |c| c.can_deploy(&app))
        .await?;
    let run = state.control().deploy_for(&who.caller, request).await?;
    Ok(started(app, "deploy", run))
}

/// Roll back (needs `deploy:<app>`).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// Release to go back to (default each node's previous).
    #[schema(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
    to_release_id: Option<String>,
    /// Also bring back the environment `to_release_id` went live with (as
    /// `slipway rollback --with-env`): once the rollback succeeded on every
    /// node, the base layer's content as of that env version becomes a new
    /// version, delivered as an env deployment (listed under
    /// `/api/v1/deployments?app=…`). Needs `to_release_id`. Default false:
    /// the current environment stays (rotated secrets stay rotated).
    with_env: Option<bool>,
    /// Which nodes (default every node).
    selector: Option<SelectorBody>,
    /// How (default all at once).
    rollout: Option<RolloutBody>,
}

/// A rollback that started; with `with_env`, the env version that comes
/// back once it succeeded.
#[derive(Debug, Serialize, ToSchema)]
pub struct RollbackStartedOut {
    /// With `with_env`: the env version whose base content is restored
    /// after the rollback succeeded (a new version, delivered as an env
    /// deployment of the app).
    #[serde(skip_serializing_if = "Option::is_none")]
    restores_env_version: Option<u64>,
    /// The rollback.
    #[serde(flatten)]
    started: StartedOut,
}

/// Roll the app back (needs `deploy:<app>`).
#[utoipa::path(post, path = "/api/v1/apps/{app}/rollback", tag = "deployments",
    params(("app" = String, Path, description = "App name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")),
    request_body = RollbackBody,
    responses(
        (status = 202, description = "Started; follow events_url", body = RollbackStartedOut),
        (status = 400, description = "A bad field", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "The token may not deploy this app", body = ErrorBody),
        (status = 409, description = "A deployment of the app runs, or no node matches", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ))]
async fn rollback(
    State(state): State<HttpState>,
    who: Principal,
    app: Segment,
    body: Body,
) -> Result<Response, AppError> {
    let app = app_name(app)?;
    let body: RollbackBody = json_body(body).await?;
    let request = v1::RollbackRequest {
        app: app.clone(),
        to_release_id: body.to_release_id.unwrap_or_default(),
        selector: selector(body.selector)?,
        rollout: rollout_proto(body.rollout)?,
    };
    request.validate().map_err(field_error)?;
    let with_env = body.with_env.unwrap_or(false);
    if with_env && request.to_release_id.is_empty() {
        return Err(AppError::field(
            "with_env",
            "with_env: needs to_release_id (the release whose env comes back)",
        ));
    }
    who.require(&state, &format!("roll back app {app}"), |c| {
        c.can_deploy(&app)
    })
    .await?;
    if !with_env {
        return Ok(started(
            app,
            "rollback",
            state.control().rollback_for(&who.caller, request).await?,
        ));
    }
    let (run, env_version) = state
        .control()
        .rollback_with_env_for(&who.caller, request)
        .await?;
    let id = run.deployment_id;
    drop(run.events);
    Ok((
        StatusCode::ACCEPTED,
        Json(RollbackStartedOut {
            restores_env_version: Some(env_version),
            started: StartedOut {
                url: format!("/api/v1/deployments/{id}"),
                events_url: format!("/api/v1/deployments/{id}/events"),
                deployment_id: id,
                app,
                kind: "rollback".to_owned(),
            },
        }),
    )
        .into_response())
}

/// Restart (needs `deploy:<app>`).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestartBody {
    /// Which nodes (default every node).
    selector: Option<SelectorBody>,
    /// How (default all at once).
    rollout: Option<RolloutBody>,
}

/// Restart the app and pass its health gate again (needs `deploy:<app>`).
#[utoipa::path(post, path = "/api/v1/apps/{app}/restart", tag = "deployments",
    params(("app" = String, Path, description = "App name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")),
    request_body = RestartBody,
    responses(
        (status = 202, description = "Started; follow events_url", body = StartedOut),
        (status = 400, description = "A bad field", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "The token may not deploy this app", body = ErrorBody),
        (status = 409, description = "A deployment of the app runs, or no node matches", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ))]
async fn restart(
    State(state): State<HttpState>,
    who: Principal,
    app: Segment,
    body: Body,
) -> Result<Response, AppError> {
    let app = app_name(app)?;
    let body: RestartBody = json_body(body).await?;
    let request = v1::RestartRequest {
        app: app.clone(),
        selector: selector(body.selector)?,
        rollout: rollout_proto(body.rollout)?,
    };
    request.validate().map_err(field_error)?;
    who.require(&state, &format!("restart app {app}"), |c| {
        c.can_deploy(&app)
    })
    .await?;
    let run = state
        .control()
        .command_for(
            &who.caller,
            &app,
            request.selector.as_ref(),
            Action::Restart,
            request.rollout.as_ref(),
        )
        .await?;
    Ok(started(app, "restart", run))
}

/// Prune (needs `deploy:<app>`).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneBody {
    /// Releases to keep (default each node's configured keep).
    #[schema(minimum = 1, maximum = 1000)]
    keep: Option<u32>,
    /// Which nodes (default every node).
    selector: Option<SelectorBody>,
}

/// Remove old releases, keeping `keep` (never the current or the rollback
/// target); every node at once (needs `deploy:<app>`).
#[utoipa::path(post, path = "/api/v1/apps/{app}/prune", tag = "deployments",
    params(("app" = String, Path, description = "App name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")),
    request_body = PruneBody,
    responses(
        (status = 202, description = "Started; follow events_url", body = StartedOut),
        (status = 400, description = "A bad field", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "The token may not deploy this app", body = ErrorBody),
        (status = 409, description = "A deployment of the app runs, or no node matches", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ))]
async fn prune(
    State(state): State<HttpState>,
    who: Principal,
    app: Segment,
    body: Body,
) -> Result<Response, AppError> {
    let app = app_name(app)?;
    let body: PruneBody = json_body(body).await?;
    let keep = match body.keep {
        None => 0,
        Some(n @ 1..=MAX_PRUNE_KEEP) => n,
        Some(n) => {
            return Err(AppError::field(
                "keep",
                format!("keep {n} is out of range 1..={MAX_PRUNE_KEEP} (leave it out for each node's configured keep)"),
            ))
        }
    };
    let request = v1::PruneRequest {
        app: app.clone(),
        selector: selector(body.selector)?,
        keep,
    };
    request.validate().map_err(field_error)?;
    who.require(&state, &format!("prune app {app}"), |c| c.can_deploy(&app))
        .await?;
    let run = state
        .control()
        .command_for(
            &who.caller,
            &app,
            request.selector.as_ref(),
            Action::Prune { keep },
            None,
        )
        .await?;
    Ok(started(app, "prune", run))
}

/// An artifact on the controller.
#[derive(Debug, Serialize, ToSchema)]
pub struct UploadedOut {
    /// Its digest.
    sha256: String,
    /// Its size, bytes.
    size: u64,
    /// It was there already (nothing written).
    already_present: bool,
}

/// Upload an artifact (the request body, `Content-Length` bytes) under its
/// sha256, to deploy it by digest; refused unless the bytes hash to it
/// (needs a `deploy:<app>` scope).
#[utoipa::path(put, path = "/api/v1/artifacts/{sha256}", tag = "deployments",
    params(("sha256" = String, Path, description = "sha256 of the bytes, 64 lowercase hex digits", pattern = r"^[0-9a-f]{64}$")),
    request_body(content = String, content_type = "application/octet-stream"),
    responses(
        (status = 201, description = "Stored", body = UploadedOut),
        (status = 200, description = "Already there", body = UploadedOut),
        (status = 400, description = "Bad digest, or the bytes do not match it", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "The token may not deploy any app", body = ErrorBody),
        (status = 409, description = "Stored with another size", body = ErrorBody),
        (status = 411, description = "No Content-Length", body = ErrorBody),
        (status = 413, description = "Larger than the artifact limit", body = ErrorBody),
    ))]
async fn upload_artifact(
    State(state): State<HttpState>,
    who: Principal,
    sha256: Segment,
    request: axum::extract::Request,
) -> Result<Response, AppError> {
    let sha256 = sha256.0;
    limits::check_sha256("sha256", &sha256).map_err(field_error)?;
    let size = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or(AppError::LengthRequired)?;
    if size > crate::artifacts::MAX_ARTIFACT_SIZE {
        return Err(AppError::TooLarge(format!(
            "the artifact has {size} bytes, over the limit of {}",
            crate::artifacts::MAX_ARTIFACT_SIZE
        )));
    }
    who.require(&state, "upload artifacts", Caller::can_deploy_any)
        .await?;
    use tokio_stream::StreamExt as _;
    let chunks = request.into_body().into_data_stream().map(|chunk| {
        chunk
            .map(|b| b.to_vec())
            .map_err(|e| crate::api::ApiError::Invalid(format!("upload body: {e}")))
    });
    let done = state
        .control()
        .upload_for(&who.caller, &who.peer, sha256, size, chunks)
        .await?;
    let code = if done.already_present {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((
        code,
        Json(UploadedOut {
            sha256: done.sha256,
            size: done.size,
            already_present: done.already_present,
        }),
    )
        .into_response())
}

/// Who the caller is.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionOut {
    /// The API token id (the actor in audit events).
    token_id: String,
    /// Its scopes.
    scopes: Vec<String>,
    /// "token" or "session".
    via: String,
    /// For a browser session: the CSRF token its state-changing requests
    /// carry (`X-CSRF-Token` header or `_csrf` form field).
    csrf_token: Option<String>,
}

/// The caller: token id, scopes and, for a browser session, its CSRF token.
#[utoipa::path(get, path = "/api/v1/session", tag = "session",
    responses(
        (status = 200, description = "The caller", body = SessionOut),
        (status = 401, description = "No or unknown token", body = ErrorBody),
    ))]
async fn session_info(who: Principal) -> Json<SessionOut> {
    Json(SessionOut {
        csrf_token: who.csrf_token().map(ToOwned::to_owned),
        via: match who.via {
            super::Via::Token => "token",
            super::Via::Session(_) => "session",
        }
        .to_owned(),
        token_id: who.caller.token_id,
        scopes: who.caller.scopes.iter().map(ToString::to_string).collect(),
    })
}

/// One name of an app's environment.
#[derive(Debug, Serialize, ToSchema)]
pub struct EnvEntryOut {
    /// The name.
    key: String,
    /// The version that last set it.
    version: u64,
    /// Who (API token or operator id).
    changed_by: String,
    /// When (seconds since the Unix epoch).
    changed_at: i64,
    /// The layer it is set in: null for the base, else the tag.
    layer: Option<String>,
    /// A base name that a tag layer also sets.
    overridden: bool,
}

/// `GET /api/v1/apps/{app}/env` and `.../env/history` parameters.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct EnvQuery {
    /// A tag layer (`env:staging`): list the names a node carrying it
    /// sees, each from its layer; history: that layer's versions only.
    #[param(max_length = 319)]
    tag: Option<String>,
}

fn env_tag(tag: Option<String>) -> Result<String, AppError> {
    let tag = tag.unwrap_or_default();
    limits::check_env_layer("tag", &tag).map_err(field_error)?;
    Ok(tag)
}

/// An app's environment: names only, never values.
#[derive(Debug, Serialize, ToSchema)]
pub struct EnvListOut {
    /// The app.
    app: String,
    /// The current version (0: never set).
    version: u64,
    /// Its names, sorted.
    variables: Vec<EnvEntryOut>,
}

/// The names of an app's current environment, each with its layer and the
/// version that last set it there (any scope; never values).
#[utoipa::path(get, path = "/api/v1/apps/{app}/env", tag = "env",
    params(("app" = String, Path, description = "App name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"), EnvQuery),
    responses(
        (status = 200, description = "The names", body = EnvListOut),
        (status = 400, description = "A bad app name", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
    ))]
async fn list_env(
    State(state): State<HttpState>,
    who: Principal,
    app: Segment,
    RawQuery(raw): RawQuery,
) -> Result<Json<EnvListOut>, AppError> {
    let app = app_name(app)?;
    let q: EnvQuery = query(raw)?;
    let tag = env_tag(q.tag)?;
    who.require(&state, "list env names", Caller::can_read)
        .await?;
    let list = state.control().list_env_for(&app, &tag).await?;
    Ok(Json(EnvListOut {
        app,
        version: list.version,
        variables: list
            .entries
            .into_iter()
            .map(|e| EnvEntryOut {
                key: e.key,
                version: e.version,
                changed_by: e.actor,
                changed_at: e.changed_at,
                layer: (!e.layer.is_empty()).then_some(e.layer),
                overridden: e.overridden,
            })
            .collect(),
    }))
}

/// One version of an environment.
#[derive(Debug, Serialize, ToSchema)]
pub struct EnvVersionOut {
    /// 1 and up.
    version: u64,
    /// Who.
    changed_by: String,
    /// When (seconds since the Unix epoch).
    created_at: i64,
    /// set, unset, import or rollback.
    change: String,
    /// Names set or changed.
    set: Vec<String>,
    /// Names removed.
    unset: Vec<String>,
    /// For a rollback: the version whose content it restored.
    rollback_to: Option<u64>,
    /// Variables after it.
    count: u64,
    /// The layer it changed: null for the base, else the tag.
    layer: Option<String>,
}

/// Every version of an app's environment, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct EnvHistoryOut {
    /// The app.
    app: String,
    /// The versions.
    versions: Vec<EnvVersionOut>,
}

/// Every version of an app's environment: who, when, which names (any
/// scope; never values).
#[utoipa::path(get, path = "/api/v1/apps/{app}/env/history", tag = "env",
    params(("app" = String, Path, description = "App name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"), EnvQuery),
    responses(
        (status = 200, description = "The versions, newest first", body = EnvHistoryOut),
        (status = 400, description = "A bad app name", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
    ))]
async fn env_history(
    State(state): State<HttpState>,
    who: Principal,
    app: Segment,
    RawQuery(raw): RawQuery,
) -> Result<Json<EnvHistoryOut>, AppError> {
    let app = app_name(app)?;
    let q: EnvQuery = query(raw)?;
    let tag = env_tag(q.tag)?;
    who.require(&state, "read env history", Caller::can_read)
        .await?;
    let history = state.control().env_history_for(&app, &tag).await?;
    Ok(Json(EnvHistoryOut {
        app,
        versions: history
            .versions
            .into_iter()
            .map(|v| EnvVersionOut {
                version: v.version,
                changed_by: v.actor,
                created_at: v.created_at,
                change: v.change,
                set: v.set,
                unset: v.unset,
                rollback_to: (v.rollback_to != 0).then_some(v.rollback_to),
                count: v.count,
                layer: (!v.layer.is_empty()).then_some(v.layer),
            })
            .collect(),
    }))
}

/// One value.
#[derive(Debug, Serialize, ToSchema)]
pub struct EnvValueOut {
    /// The name.
    key: String,
    /// The value.
    value: String,
    /// The version it comes from.
    version: u64,
    /// The layer it comes from: null for the base, else the tag.
    layer: Option<String>,
}

/// One value of an app's current environment (needs `secrets:<app>`;
/// audited as ENV_VALUE_READ with the name only).
#[utoipa::path(get, path = "/api/v1/apps/{app}/env/values/{key}", tag = "env",
    params(
        ("app" = String, Path, description = "App name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"),
        ("key" = String, Path, description = "Variable name", pattern = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"),
        EnvQuery,
    ),
    responses(
        (status = 200, description = "The value", body = EnvValueOut),
        (status = 400, description = "A bad app or variable name", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "The token may not read this app's values", body = ErrorBody),
        (status = 404, description = "No such variable", body = ErrorBody),
    ))]
async fn get_env_value(
    State(state): State<HttpState>,
    who: Principal,
    path: Result<Path<(String, String)>, axum::extract::rejection::PathRejection>,
    RawQuery(raw): RawQuery,
) -> Result<Json<EnvValueOut>, AppError> {
    let Path((app, key)) = path.map_err(|e| AppError::field("path", e.body_text()))?;
    let q: EnvQuery = query(raw)?;
    let request = v1::GetEnvRequest {
        app: app.clone(),
        key: key.clone(),
        tag: q.tag.unwrap_or_default(),
    };
    request.validate().map_err(field_error)?;
    who.require(&state, &format!("read env values of app {app}"), |c| {
        c.can_read_secrets(&app)
    })
    .await?;
    let got = state
        .control()
        .get_env_for(&who.caller, &app, &key, &request.tag)
        .await?;
    Ok(Json(EnvValueOut {
        key,
        value: got.value,
        version: got.version,
        layer: (!got.layer.is_empty()).then_some(got.layer),
    }))
}

/// Change an app's environment (needs `deploy:<app>`): set and unset
/// names, or `replace` it with `set` (import), or `rollback_to` an earlier
/// version's content; stored as a new version and delivered to the nodes.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnvChangeBody {
    /// Variables to set (name to value).
    set: Option<BTreeMap<String, String>>,
    /// Names to remove.
    unset: Option<Vec<String>>,
    /// `set` is the whole new environment.
    replace: Option<bool>,
    /// The version whose content becomes the new version.
    #[schema(minimum = 1)]
    rollback_to: Option<u64>,
    /// The layer changed: absent for the app's base, else a tag
    /// (`env:staging`) whose layer overrides the base on the nodes
    /// carrying it. Only nodes whose effective environment changes receive
    /// the change.
    #[schema(max_length = 319)]
    tag: Option<String>,
    /// Which nodes may receive it (default every node whose effective
    /// environment changes).
    selector: Option<SelectorBody>,
    /// How (default all at once).
    rollout: Option<RolloutBody>,
}

/// An env change that started its delivery.
#[derive(Debug, Serialize, ToSchema)]
pub struct EnvStartedOut {
    /// The version delivered.
    env_version: u64,
    /// Its delivery, a deployment of kind env.
    #[serde(flatten)]
    started: StartedOut,
}

/// Change an app's environment and deliver it to the nodes, each behind
/// its health gate; a node whose gate fails goes back to its previous
/// environment (needs `deploy:<app>`). Never echoes a value.
#[utoipa::path(post, path = "/api/v1/apps/{app}/env", tag = "env",
    params(("app" = String, Path, description = "App name", pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")),
    request_body = EnvChangeBody,
    responses(
        (status = 202, description = "Stored and started; follow events_url", body = EnvStartedOut),
        (status = 400, description = "A bad field", body = ErrorBody),
        (status = 401, description = "No or unknown token", body = ErrorBody),
        (status = 403, description = "The token may not change this app's env", body = ErrorBody),
        (status = 404, description = "No such version to roll back to", body = ErrorBody),
        (status = 409, description = "Stored but not delivered (a deployment of the app runs, or no node matches)", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
    ))]
async fn change_env(
    State(state): State<HttpState>,
    who: Principal,
    app: Segment,
    body: Body,
) -> Result<Response, AppError> {
    let app = app_name(app)?;
    let body: EnvChangeBody = json_body(body).await?;
    let request = v1::ChangeEnvRequest {
        app: app.clone(),
        set: body
            .set
            .unwrap_or_default()
            .into_iter()
            .map(|(key, value)| v1::EnvVar { key, value })
            .collect(),
        unset: body.unset.unwrap_or_default(),
        replace: body.replace.unwrap_or(false),
        rollback_to: body.rollback_to.unwrap_or(0),
        selector: selector(body.selector)?,
        rollout: rollout_proto(body.rollout)?,
        tag: body.tag.unwrap_or_default(),
        rollback_as_of: false,
    };
    request.validate().map_err(field_error)?;
    who.require(&state, &format!("change the env of app {app}"), |c| {
        c.can_deploy(&app)
    })
    .await?;
    let run = state.control().change_env_for(&who.caller, request).await?;
    let version = run.env_version;
    let id = run.deployment_id;
    drop(run.events);
    Ok((
        StatusCode::ACCEPTED,
        Json(EnvStartedOut {
            env_version: version,
            started: StartedOut {
                url: format!("/api/v1/deployments/{id}"),
                events_url: format!("/api/v1/deployments/{id}/events"),
                deployment_id: id,
                app,
                kind: "env".to_owned(),
            },
        }),
    )
        .into_response())
}
