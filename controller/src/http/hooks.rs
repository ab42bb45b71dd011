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
        let e = AppError::field(
            "X-GitHub-Event",
            "X-GitHub-Event is missing or not an event name (lowercase letters and _)",
        );
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::Request as HttpRequest;
    use tokio_util::sync::CancellationToken;
    use tower::ServiceExt as _;

    use super::*;
    use crate::api::ControlService;
    use crate::artifacts::Artifacts;
    use crate::link::commands::Commands;
    use crate::link::registry::Sessions;
    use crate::store::Store;

    crate::store::testing::store_tests!(
        every_bad_delivery_is_refused_with_what_was_wrong,
        without_github_the_hook_is_not_there
    );

    const SECRET: &str = "It's a Secret to Everybody";

    /// The router over `store` (its files in `dir`) with `[github]` (a token, the webhook secret, `acme/web`
    /// linked with a push trigger) when `github`, else without it.
    async fn app(dir: &std::path::Path, store: Store, github: bool) -> (Router, Store) {
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
        let mut state = HttpState::new(
            store.clone(),
            sessions,
            control.clone(),
            CancellationToken::new(),
        );
        if github {
            std::fs::write(dir.join("token"), "github_pat_x").unwrap();
            std::fs::write(dir.join("secret"), SECRET).unwrap();
            let raw = toml::from_str(&format!(
                "api_url = \"http://127.0.0.1:9\"\ntoken_file = \"{}\"\nwebhook_secret_file = \"{}\"\n\
                 [apps.web]\nrepo = \"acme/web\"\n[apps.web.trigger]\npush = [\"main\"]\n\
                 [apps.web.artifact]\nurl = \"https://dl.example.com/{{sha}}.tar.gz\"\n\
                 checksums_url = \"https://dl.example.com/{{sha}}.sums\"\n",
                dir.join("token").display(),
                dir.join("secret").display()
            ))
            .unwrap();
            let config = Arc::new(crate::github::GithubConfig::new(raw).unwrap());
            let client = config.client().unwrap();
            state = state.with_github(crate::github::Hooks::new(config, client, control));
        }
        (super::super::router(state), store)
    }

    fn sign(body: &[u8]) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, SECRET.as_bytes());
        format!(
            "sha256={}",
            hex::encode(ring::hmac::sign(&key, body).as_ref())
        )
    }

    fn delivery(event: &str, id: &str, body: &[u8], signature: Option<&str>) -> HttpRequest<Body> {
        let mut r = HttpRequest::post("/hooks/github")
            .header("content-type", "application/json")
            .header("x-github-event", event)
            .header("x-github-delivery", id);
        if let Some(s) = signature {
            r = r.header("x-hub-signature-256", s);
        }
        r.body(Body::from(body.to_vec())).unwrap()
    }

    async fn call(app: &Router, request: HttpRequest<Body>) -> (StatusCode, serde_json::Value) {
        let response = app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    // The payloads here are cut to the fields the controller reads, or
    // broken on purpose; whole payloads as the description shapes them
    // are sent by the integration and end-to-end tests (tests/fixtures/
    // gh_api.py makes and validates them).
    async fn every_bad_delivery_is_refused_with_what_was_wrong(store: Store) {
        let dir = tempfile::tempdir().unwrap();
        let (app, store) = app(dir.path(), store, true).await;
        let ping = br#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
        // Signed right: pong; the same id again: ignored.
        let (status, body) = call(&app, delivery("ping", "a-1", ping, Some(&sign(ping)))).await;
        assert_eq!(
            (status, body["status"].as_str()),
            (StatusCode::OK, Some("pong"))
        );
        let (status, body) = call(&app, delivery("ping", "a-1", ping, Some(&sign(ping)))).await;
        assert_eq!(
            (status, body["status"].as_str()),
            (StatusCode::OK, Some("ignored"))
        );
        for (request, want_status, want) in [
            (
                delivery("ping", "a-2", ping, None),
                StatusCode::UNAUTHORIZED,
                "no X-Hub-Signature-256",
            ),
            (
                delivery("ping", "a-3", ping, Some("sha256=00")),
                StatusCode::UNAUTHORIZED,
                "not sha256=",
            ),
            (
                delivery("ping", "a-4", b"{}", Some(&sign(ping))),
                StatusCode::UNAUTHORIZED,
                "does not match",
            ),
            (
                delivery("ping", "../etc", ping, Some(&sign(ping))),
                StatusCode::BAD_REQUEST,
                "X-GitHub-Delivery",
            ),
            (
                delivery("Push!", "a-5", ping, Some(&sign(ping))),
                StatusCode::BAD_REQUEST,
                "X-GitHub-Event",
            ),
            (
                delivery("push", "a-6", b"{\"ref\":1}", Some(&sign(b"{\"ref\":1}"))),
                StatusCode::BAD_REQUEST,
                "push payload",
            ),
        ] {
            let (status, body) = call(&app, request).await;
            assert_eq!(status, want_status, "{body}");
            assert!(
                body["error"].as_str().unwrap().contains(want),
                "{want}: {body}"
            );
        }
        let refused = store
            .audit_events()
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.event_type == audit::GITHUB_WEBHOOK_REFUSED)
            .count();
        assert_eq!(refused, 6);
        // A malformed delivery was not remembered: fixed and sent again, it counts.
        let push = format!(
            r#"{{"ref":"refs/heads/dev","after":"{}","deleted":false,"repository":{{"full_name":"acme/web"}}}}"#,
            "a".repeat(40)
        );
        let (status, body) = call(
            &app,
            delivery("push", "a-6", push.as_bytes(), Some(&sign(push.as_bytes()))),
        )
        .await;
        assert_eq!(
            (status, body["status"].as_str()),
            (StatusCode::OK, Some("ignored")),
            "{body}"
        );
        assert!(
            body["reason"]
                .as_str()
                .unwrap()
                .contains("no app's trigger"),
            "{body}"
        );
    }

    async fn without_github_the_hook_is_not_there(store: Store) {
        let dir = tempfile::tempdir().unwrap();
        let (app, _) = app(dir.path(), store, false).await;
        let (status, body) = call(&app, delivery("ping", "a-1", b"{}", Some("sha256=00"))).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    }
}
