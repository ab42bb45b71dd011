//! `GET /metrics`: the Prometheus scrape ([`crate::metrics`]).
//!
//! Auth: an API token with read scope (`Authorization: Bearer …`, in
//! Prometheus' `authorization: { credentials_file: … }`), as every read of
//! the HTTP API. With `metrics_loopback_no_auth` (`serve
//! --metrics-loopback-no-auth`) a caller on a loopback address (a
//! Prometheus or node agent on the controller's own machine) may scrape
//! without a token; every other caller still needs one.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts as _, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::{AppError, HttpState, Principal};
use crate::auth::apitoken::Caller;

/// The `/metrics` route.
pub fn routes() -> Router<HttpState> {
    Router::new().route("/metrics", get(metrics))
}

async fn metrics(State(state): State<HttpState>, request: Request) -> Result<Response, AppError> {
    let Some(scrape) = state.metrics() else {
        return Err(AppError::NotFound(
            "metrics are not served by this server".to_owned(),
        ));
    };
    let loopback = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .is_some_and(|c| c.0.ip().is_loopback());
    if !(scrape.loopback_no_auth && loopback) {
        let (mut parts, _) = request.into_parts();
        let who = Principal::from_request_parts(&mut parts, &state).await?;
        who.require(&state, "read metrics", Caller::can_read)
            .await?;
    }
    let text = scrape.scraper.render().await?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}
