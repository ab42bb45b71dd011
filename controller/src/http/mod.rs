//! The controller's HTTP face (axum): health checks, browser login, the
//! JSON API under `/api/v1/`, and room for the metrics and pages.
//!
//! `slipway-controller serve --http-listen ADDR` (config `http_listen`)
//! serves it over TLS with the controller's own server certificate, through
//! the same hot-swapped resolver ([`crate::pki::tls::ServerCert`]) the gRPC
//! side presents, so a renewal covers both. Plain HTTP only with
//! `--http-plain` on a loopback address (checked by [`crate::config`], and
//! logged at start).
//!
//! # Modules
//!
//! ```text
//! error    AppError: one status code and {"error", "field"} JSON per error
//! session  browser login/logout, server-side sessions, the CSRF layer
//! auth     Principal: the authenticated caller (bearer token or session)
//! api      the JSON API (/api/v1/...) and its OpenAPI description
//! metrics  /metrics, the Prometheus scrape (crate::metrics renders it)
//! pages    the web pages: fleet, app (with its actions), deployment, audit
//! hooks    POST /hooks/github: GitHub webhook deliveries (crate::github)
//! ```
//!
//! # Adding routes (for the metrics and pages modules)
//!
//! Write a `fn routes() -> Router<HttpState>` in your module and merge it in
//! [`router`]. Handlers get the shared state with `State(state):
//! State<HttpState>` ([`HttpState::store`], [`HttpState::sessions`] (the
//! live agent sessions), [`HttpState::control`] (the same code the gRPC
//! Control API runs, for deployments), [`HttpState::shutdown`]).
//!
//! A handler that takes a [`Principal`] argument is closed to anonymous
//! callers: the extractor answers 401 (audited as API_CALL_REFUSED) before
//! the handler runs. Then check the scope the action needs:
//!
//! ```ignore
//! async fn page(State(state): State<HttpState>, who: Principal) -> Result<Html<String>, AppError> {
//!     who.require(&state, "read the fleet", Caller::can_read).await?;   // 403 + audit if not
//!     let csrf = who.csrf_token();     // Some(..) for a browser session
//!     let field = csrf.map(session::csrf_field); // <input type=hidden name=_csrf ...>
//!     ...
//! }
//! ```
//!
//! For a page that should send a browser to the login form instead of a
//! 401, take `Result<Principal, AppError>` and answer
//! `Redirect::to("/login")` on `Err`.
//!
//! Every state-changing request (POST, PUT, PATCH, DELETE) of a browser
//! session is refused (403, audited) by [`session::layer`] unless it carries
//! the session's CSRF token (form field `_csrf` or header `X-CSRF-Token`),
//! before any handler runs: a page author only has to put
//! [`session::csrf_field`] in each form. Bearer-token requests need none.
//!
//! Errors: return `Result<_, AppError>`; [`AppError`] is the one place
//! errors become status codes.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt as _;
use axum::{Json, Router};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::api::ControlService;
use crate::link::registry::Sessions;
use crate::pki::crypto;
use crate::pki::tls::{self, ServerCert, TlsError};
use crate::store::Store;

pub mod api;
pub mod auth;
pub mod error;
pub mod fresh;
pub mod hooks;
pub mod metrics;
pub mod pages;
pub mod session;

pub use auth::{Principal, Via};
pub use error::AppError;

/// On shutdown, how long open requests (an SSE stream ends at once) may
/// take to finish before the server stops anyway.
const DRAIN: Duration = Duration::from_secs(5);

/// What every handler shares; cheap to clone.
#[derive(Debug, Clone)]
pub struct HttpState(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    store: Store,
    sessions: Sessions,
    control: ControlService,
    shutdown: CancellationToken,
    /// `/metrics`, when this server shows it.
    metrics: Option<MetricsScrape>,
    /// The `/api/v1/nodes` body (see [`api::NODES_FRESH`]).
    nodes_json: fresh::Fresh<axum::body::Bytes>,
    /// The fleet's nodes as the pages show them.
    fleet: fresh::Fresh<Arc<Vec<crate::fleet::NodeView>>>,
    /// `POST /hooks/github`, when `[github]` is configured.
    github: std::sync::OnceLock<crate::github::Hooks>,
}

/// What `/metrics` needs: the scraper and who may scrape without a token.
#[derive(Debug, Clone)]
pub struct MetricsScrape {
    /// Gathers and renders the figures.
    pub scraper: crate::metrics::Scraper,
    /// Callers on a loopback address need no token (`metrics_loopback_no_auth`).
    pub loopback_no_auth: bool,
}

impl HttpState {
    /// The state of one server: the controller's store, its live agent
    /// sessions, its Control service (deployments go through it), and a
    /// token cancelled when the server stops (long-lived responses such as
    /// event streams end on it).
    pub fn new(
        store: Store,
        sessions: Sessions,
        control: ControlService,
        shutdown: CancellationToken,
    ) -> Self {
        Self::with_metrics(store, sessions, control, shutdown, None)
    }

    /// [`HttpState::new`], serving `/metrics` with `metrics` when given.
    pub fn with_metrics(
        store: Store,
        sessions: Sessions,
        control: ControlService,
        shutdown: CancellationToken,
        metrics: Option<MetricsScrape>,
    ) -> Self {
        Self(Arc::new(Inner {
            store,
            sessions,
            control,
            shutdown,
            metrics,
            nodes_json: fresh::Fresh::new(api::NODES_FRESH, api::NODES_STALE),
            fleet: fresh::Fresh::new(api::NODES_FRESH, api::NODES_STALE),
            github: std::sync::OnceLock::new(),
        }))
    }

    /// Serves `POST /hooks/github` with `hooks` (set once, before serving).
    #[must_use]
    pub fn with_github(self, hooks: crate::github::Hooks) -> Self {
        let _ = self.0.github.set(hooks);
        self
    }

    /// [`HttpState::with_github`] when `hooks` is given.
    #[must_use]
    pub fn with_github_if(self, hooks: Option<crate::github::Hooks>) -> Self {
        match hooks {
            Some(hooks) => self.with_github(hooks),
            None => self,
        }
    }

    /// The GitHub webhooks, when configured.
    pub fn github(&self) -> Option<&crate::github::Hooks> {
        self.0.github.get()
    }

    /// The `/api/v1/nodes` body, shared for [`api::NODES_FRESH`].
    pub(crate) fn nodes_json(&self) -> &fresh::Fresh<axum::body::Bytes> {
        &self.0.nodes_json
    }

    /// The fleet's nodes (sessions applied), shared for [`api::NODES_FRESH`].
    pub(crate) async fn fleet_views(
        &self,
    ) -> Result<Arc<Vec<crate::fleet::NodeView>>, crate::store::StoreError> {
        self.0
            .fleet
            .get(|| async {
                let mut views = crate::fleet::nodes(self.store(), crate::now_unix()).await?;
                let online = self.sessions().online().await;
                crate::fleet::apply_sessions(&mut views, |id| online.contains(id));
                Ok(Arc::new(views))
            })
            .await
    }

    /// `/metrics`' scraper, if this server shows metrics.
    pub fn metrics(&self) -> Option<&MetricsScrape> {
        self.0.metrics.as_ref()
    }

    /// The database (and audit log: [`Store::audit`]).
    pub fn store(&self) -> &Store {
        &self.0.store
    }

    /// The agents' live sessions.
    pub fn sessions(&self) -> &Sessions {
        &self.0.sessions
    }

    /// The Control service: deploy, rollback, restart, prune and the fleet
    /// status run the same code for HTTP as for gRPC.
    pub fn control(&self) -> &ControlService {
        &self.0.control
    }

    /// Cancelled when the server shuts down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.0.shutdown
    }
}

/// Every route.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/login", get(session::login_form).post(session::login))
        .route("/logout", post(session::logout))
        .merge(api::routes())
        .merge(metrics::routes())
        .merge(pages::routes())
        .merge(hooks::routes())
        // Unknown paths answer in the API's JSON shape (the pages may set
        // their own fallback).
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            session::layer,
        ))
        .with_state(state)
}

/// Any path no route takes: 404 with a JSON error.
async fn not_found(uri: axum::http::Uri) -> AppError {
    let path = uri.path();
    let path = if path.len() > 200 { &path[..200] } else { path };
    AppError::NotFound(format!("no route for {}", path.escape_default()))
}

/// `/healthz`: the process is up and serving.
async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// `/readyz`: the store answers and its schema is migrated (503 if not).
async fn readyz(State(state): State<HttpState>) -> Response {
    match state.store().schema_ready().await {
        Ok(true) => Json(serde_json::json!({ "status": "ready" })).into_response(),
        Ok(false) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "not ready", "error": "the database schema is not at this build's version" })),
        )
            .into_response(),
        Err(err) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "not ready", "error": format!("the store does not answer: {err}") })),
        )
            .into_response(),
    }
}

/// The rustls configuration of the HTTPS listener: the controller's server
/// certificate from `cert` (renewals included), no client certificates
/// (callers show API tokens), HTTP/1.1.
pub fn tls_config(cert: ServerCert) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut config = rustls::ServerConfig::builder_with_provider(crypto::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(cert));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Handshaken TLS connections as an axum listener.
struct TlsListener {
    accepted: ReceiverStream<Result<TlsStream<TcpStream>, io::Error>>,
    local: SocketAddr,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.accepted.next().await {
                Some(Ok(stream)) => {
                    let Ok(peer) = stream.get_ref().0.peer_addr() else {
                        continue;
                    };
                    return (stream, peer);
                }
                Some(Err(err)) => tracing::debug!(%err, "https accept failed"),
                // The acceptor task ended: nothing more will come.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

/// Serves [`router`] on `listener` until `shutdown` resolves: over TLS with
/// `tls` (the controller's server certificate), or plain HTTP when `tls`
/// is `None` (the caller checked the address is loopback). Cancels the
/// state's shutdown token when stopping, then gives open requests
/// [`DRAIN`] to finish.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let local = listener.local_addr()?;
    let stopping = state.shutdown().clone();
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    let signal = {
        let stopping = stopping.clone();
        async move {
            shutdown.await;
            stopping.cancel();
        }
    };
    let served = async move {
        match tls {
            Some(config) => {
                // No client certificates are asked for, so none is refused.
                let accepted = tls::incoming(listener, config, |_, _| async {});
                let listener = TlsListener { accepted, local }.tap_io(|_| {});
                axum::serve(listener, app)
                    .with_graceful_shutdown(signal)
                    .await
            }
            None => {
                axum::serve(listener.tap_io(|_| {}), app)
                    .with_graceful_shutdown(signal)
                    .await
            }
        }
    };
    tokio::pin!(served);
    tokio::select! {
        result = &mut served => result,
        () = async {
            stopping.cancelled().await;
            tokio::time::sleep(DRAIN).await;
        } => {
            tracing::warn!(?DRAIN, "http: open requests did not finish in time; stopping anyway");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt as _;

    use super::*;
    use crate::artifacts::Artifacts;
    use crate::auth::apitoken::{self, Scope};
    use crate::link::commands::Commands;

    crate::store::testing::store_tests!(health_open_api_closed_and_every_error_is_json);

    /// Deployment followers are capped per replica through both doors
    /// alike (HTTP: 503 with Retry-After and a JSON error; gRPC:
    /// ResourceExhausted), each saying which limit; a follower that goes
    /// away frees its place.
    #[tokio::test]
    async fn deployment_followers_are_capped_through_http_and_grpc() {
        use slipway_proto::v1::control_server::Control as _;
        use slipway_proto::v1::WatchDeploymentRequest;

        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        const ID: &str = "d-00000000000000cd";
        crate::api::watch::test_support::insert_running(&store, ID).await;
        let control = ControlService::new(
            store.clone(),
            Sessions::new(),
            Commands::new(),
            Artifacts::new(dir.path()),
            dir.path().to_path_buf(),
            crate::secrets::Secrets::open(&store, &dir.path().join("secrets.key"))
                .await
                .unwrap(),
        )
        .with_followers(crate::api::watch::FollowerLimits {
            total: 3,
            per_caller: 2,
        });
        let state = HttpState::new(
            store.clone(),
            Sessions::new(),
            control.clone(),
            CancellationToken::new(),
        );
        let app = router(state);
        let one = apitoken::create(&store, &[Scope::Read], 1).await.unwrap();
        let two = apitoken::create(&store, &[Scope::Read], 1).await.unwrap();
        let sse = |token: &str| {
            Request::get(format!("/api/v1/deployments/{ID}/events"))
                .header("authorization", format!("Bearer {token}"))
                .body(Body::empty())
                .unwrap()
        };
        let grpc = |token: &str| {
            let mut request = tonic::Request::new(WatchDeploymentRequest {
                deployment_id: ID.to_owned(),
            });
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            request
        };

        // Two streams of token one over HTTP: its own limit.
        let first = app.clone().oneshot(sse(&one)).await.unwrap();
        assert_eq!(first.status(), StatusCode::OK);
        let second = app.clone().oneshot(sse(&one)).await.unwrap();
        assert_eq!(second.status(), StatusCode::OK);
        let refused = app.clone().oneshot(sse(&one)).await.unwrap();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(refused.headers()[axum::http::header::RETRY_AFTER], "5");
        let bytes = axum::body::to_bytes(refused.into_body(), 1 << 20)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let message = body["error"].as_str().unwrap();
        assert!(
            message.contains("already follows 2 deployments")
                && message.contains("(max_followers_per_caller)"),
            "{body}"
        );
        // A third over gRPC (token two): the replica's limit is reached.
        let third = control.watch_deployment(grpc(&two)).await.unwrap();
        let status = control.watch_deployment(grpc(&two)).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(
            status.message().contains("3 deployment followers")
                && status.message().contains("(max_followers)"),
            "{}",
            status.message()
        );
        let (status, body) = call(&app, sse(&two)).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body["error"].as_str().unwrap().contains("(max_followers)"),
            "{body}"
        );

        // An HTTP client goes away: its place is free again, for gRPC.
        drop(first);
        let again = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                match control.watch_deployment(grpc(&two)).await {
                    Ok(stream) => break stream,
                    Err(status) => {
                        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                }
            }
        })
        .await
        .expect("a place freed by the HTTP client that left");
        // A gRPC client goes away: its place is free again, for HTTP.
        drop(third);
        let back = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                let response = app.clone().oneshot(sse(&one)).await.unwrap();
                if response.status() == StatusCode::OK {
                    break response;
                }
                assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("a place freed by the gRPC client that left");
        drop((second, again, back));

        // The API description lists the answer.
        let (status, doc) = call(
            &app,
            Request::get("/api/v1/openapi.json")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let busy = &doc["paths"]["/api/v1/deployments/{id}/events"]["get"]["responses"]["503"];
        assert!(busy["headers"]["Retry-After"].is_object(), "{busy}");
        assert!(
            busy["content"]["application/json"]["schema"].is_object(),
            "{busy}"
        );
    }

    /// The router over `store`, with its files (artifacts, key file) in
    /// `dir`.
    async fn app(dir: &std::path::Path, store: Store) -> (Router, Store) {
        let sessions = Sessions::new();
        let control = ControlService::new(
            store.clone(),
            sessions.clone(),
            Commands::new(),
            Artifacts::new(dir),
            dir.to_path_buf(),
            crate::secrets::Secrets::open(&store, &dir.join("secrets.key"))
                .await
                .unwrap(),
        );
        let state = HttpState::new(store.clone(), sessions, control, CancellationToken::new());
        (router(state), store)
    }

    async fn call(app: &Router, request: Request<Body>) -> (StatusCode, serde_json::Value) {
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    async fn health_open_api_closed_and_every_error_is_json(store: Store) {
        let dir = tempfile::tempdir().unwrap();
        let (app, store) = app(dir.path(), store).await;
        let get = |uri: &str| Request::get(uri).body(Body::empty()).unwrap();
        assert_eq!(call(&app, get("/healthz")).await.0, StatusCode::OK);
        assert_eq!(call(&app, get("/readyz")).await.0, StatusCode::OK);
        let (status, body) = call(&app, get("/nope")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(body["error"].as_str().unwrap().contains("/nope"), "{body}");

        let (status, body) = call(&app, get("/api/v1/nodes")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        let bad = Request::get("/api/v1/nodes")
            .header("authorization", "Basic eDp5")
            .body(Body::empty())
            .unwrap();
        let (status, body) = call(&app, bad).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert!(body["error"].as_str().unwrap().contains("Bearer"), "{body}");
        let refused = store
            .audit_events()
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.event_type == crate::audit::API_CALL_REFUSED)
            .count();
        assert_eq!(refused, 2);

        let token = apitoken::create(&store, &[Scope::Read], 1).await.unwrap();
        let ok = Request::get("/api/v1/nodes")
            .header("authorization", format!("Bearer {token}"))
            .body(Body::empty())
            .unwrap();
        let (status, body) = call(&app, ok).await;
        assert_eq!((status, body), (StatusCode::OK, serde_json::json!([])));
    }
}
