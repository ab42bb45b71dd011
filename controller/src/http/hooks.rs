//! `POST /hooks/github`: GitHub webhook deliveries.
//!
//! In order: the body is read up to [`webhook::MAX_BODY`] (413 past it);
//! `X-Hub-Signature-256` must be HMAC-SHA256 of the body with the webhook
//! secret (401, audited `GITHUB_WEBHOOK_REFUSED`); `X-GitHub-Event` and
//! `X-GitHub-Delivery` must be there and well-formed, and the payload must
//! read as its event says (400, audited); a delivery id already received is
//! answered 200 `ignored` (a replay starts nothing); `ping` is answered
//! `pong`; an event that matches no app's trigger is answered 200
//! `ignored`; otherwise 202 `accepted` with the apps, and each deployment
//! starts in the background (fetching a release asset may take longer than
//! GitHub waits for an answer), audited `GITHUB_WEBHOOK_DEPLOY` with the
//! delivery id. No `[github]` (or no webhook secret): 404.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

use super::{AppError, HttpState};
use crate::audit::{self, AuditEvent};
use crate::github::webhook::{self, Event};

/// Deliveries remembered for replay detection (GitHub redelivers within
/// days; at a delivery a minute this is a week).
pub const KEEP_DELIVERIES: u32 = 10_000;

pub fn routes() -> Router<HttpState> {
    Router::new().route("/hooks/github", post(github))
}

fn header<'a>(request: &'a Request, name: &str) -> Option<&'a str> {
    request.headers().get(name).and_then(|v| v.to_str().ok())
}

async fn refuse(state: &HttpState, peer: &str, delivery: &str, error: AppError) -> Response {
    let event = AuditEvent::error(
        audit::GITHUB_WEBHOOK_REFUSED,
        peer,
        "webhook",
        if delivery.is_empty() {
            "unknown"
        } else {
            delivery
        },
        serde_json::json!({ "peer": peer, "delivery": delivery }),
        error.to_string(),
    );
    if let Err(err) = state.store().audit(&event, crate::now_unix()).await {
        tracing::error!(%err, "could not record audit event");
    }
    tracing::warn!(%peer, %delivery, %error, "github webhook refused");
    error.into_response()
}

async fn github(State(state): State<HttpState>, request: Request) -> Response {
    let Some(hooks) = state.github().cloned() else {
        return AppError::NotFound("GitHub webhooks are not configured ([github])".into())
            .into_response();
    };
    let Some(secret) = hooks.secret().cloned() else {
        return AppError::NotFound(
            "GitHub webhooks are not configured (github.webhook_secret_file)".into(),
        )
        .into_response();
    };
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |c| c.0.to_string());
    let event_name = header(&request, "x-github-event").unwrap_or("").to_owned();
    let delivery = header(&request, "x-github-delivery")
        .unwrap_or("")
        .to_owned();
    let signature = header(&request, "x-hub-signature-256").map(str::to_owned);
    let shown_delivery: String = delivery.chars().take(webhook::MAX_DELIVERY_ID).collect();
    let body = match axum::body::to_bytes(request.into_body(), webhook::MAX_BODY).await {
        Ok(body) => body,
        Err(_) => {
            let e = AppError::TooLarge(format!(
                "a webhook delivery is at most {} bytes",
                webhook::MAX_BODY
            ));
            return refuse(&state, &peer, &shown_delivery, e).await;
        }
    };
    if let Err(e) = webhook::verify_signature(&secret, &body, signature.as_deref()) {
        let e = AppError::Unauthenticated(e.to_string());
        return refuse(&state, &peer, &shown_delivery, e).await;
    }
    if let Err(e) = webhook::check_delivery_id(&delivery) {
        return refuse(
            &state,
            &peer,
            &shown_delivery,
            AppError::field("X-GitHub-Delivery", e),
        )
        .await;
    }
    if event_name.is_empty()
        || event_name.len() > 64
        || !event_name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'_')
    {
        let e = AppError::field("X-GitHub-Event", "missing or not an event name");
        return refuse(&state, &peer, &delivery, e).await;
    }
    let event = match webhook::parse(&event_name, &body) {
        Ok(event) => event,
        Err(why) => {
            let e = AppError::field("body", format!("{event_name} payload: {why}"));
            return refuse(&state, &peer, &delivery, e).await;
        }
    };
    match hooks
        .store()
        .remember_delivery(&delivery, &event_name, crate::now_unix(), KEEP_DELIVERIES)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            tracing::info!(%delivery, event = %event_name, "github: replayed delivery ignored");
            return Json(serde_json::json!({
                "status": "ignored",
                "reason": format!("delivery {delivery} was already received"),
            }))
            .into_response();
        }
        Err(err) => return AppError::from(err).into_response(),
    }
    if let Event::Ping { zen, hook_id } = &event {
        return Json(serde_json::json!({ "status": "pong", "zen": zen, "hook_id": hook_id }))
            .into_response();
    }
    let starts = webhook::matches(hooks.links(), &event);
    if starts.is_empty() {
        return Json(serde_json::json!({
            "status": "ignored",
            "reason": format!("no app's trigger matches this {event_name} event"),
        }))
        .into_response();
    }
    let apps: Vec<String> = starts.iter().map(|s| s.app.clone()).collect();
    for start in starts {
        let hooks = hooks.clone();
        let (delivery, event_name) = (delivery.clone(), event_name.clone());
        tokio::spawn(async move {
            let _ = hooks.deploy(&delivery, &event_name, &start).await;
        });
    }
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "status": "accepted", "apps": apps, "delivery": delivery })),
    )
        .into_response()
}
