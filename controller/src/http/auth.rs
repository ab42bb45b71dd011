//! Who is calling: the [`Principal`] extractor.
//!
//! A request is authenticated by `Authorization: Bearer <API token>` or
//! `Bearer <GitHub Actions OIDC token>` (the same tokens, checked by the same
//! [`crate::api::ControlService::authenticate_bearer`], as the gRPC Control
//! API) or by a browser session cookie (see [`super::session`]).
//! Every refusal (no or unknown token, expired session, a scope that does
//! not cover the request) is audited as API_CALL_REFUSED through
//! [`crate::api::record_refusal`], exactly as a refused gRPC call is.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, Method};

use super::error::AppError;
use super::session::{self, SessionInfo};
use super::HttpState;
use crate::api::{self, ApiError};
use crate::auth::apitoken::Caller;

/// Longest `Authorization` header value looked at: an API token is ~90
/// bytes, an OIDC token up to [`crate::auth::oidc::MAX_TOKEN`].
const MAX_AUTHORIZATION: usize = crate::auth::oidc::MAX_TOKEN + 64;

/// How the caller proved who it is.
#[derive(Debug, Clone)]
pub enum Via {
    /// `Authorization: Bearer <API token>`: scripts and CI.
    Token,
    /// The browser session cookie; state-changing requests carried its
    /// CSRF token (checked before the handler runs, see [`super::session`]).
    Session(SessionInfo),
}

/// An authenticated caller: the token (its id names it in audit events) and
/// its scopes, where it called from, and how it proved itself.
///
/// Any handler that takes a `Principal` argument is closed to anonymous
/// callers; the extractor answers 401 (audited) before the handler runs.
/// Each handler then checks the scope its action needs with
/// [`Principal::require`].
#[derive(Debug, Clone)]
pub struct Principal {
    /// The API token behind the request (directly or through a session).
    pub caller: Caller,
    /// Peer address, for audit events.
    pub peer: String,
    /// Token or session.
    pub via: Via,
}

impl Principal {
    /// Checks that the caller may do `what` (e.g. "deploy app web"),
    /// auditing a refusal as API_CALL_REFUSED; 403 when not allowed.
    pub async fn require(
        &self,
        state: &HttpState,
        what: &str,
        allowed: impl FnOnce(&Caller) -> bool,
    ) -> Result<(), AppError> {
        if allowed(&self.caller) {
            return Ok(());
        }
        let err = ApiError::Scope {
            token: self.caller.token_id.clone(),
            what: what.to_owned(),
            scopes: api::scopes_text(&self.caller),
        };
        api::record_refusal(state.store(), &self.caller.token_id, &self.peer, what, &err).await;
        Err(err.into())
    }

    /// The CSRF token to put in forms (`<input type="hidden" name="_csrf">`)
    /// or the `X-CSRF-Token` header; `None` for bearer-token callers, who
    /// need none (a browser never adds an `Authorization` header by itself).
    pub fn csrf_token(&self) -> Option<&str> {
        match &self.via {
            Via::Session(info) => Some(&info.csrf),
            Via::Token => None,
        }
    }
}

/// The peer address hyper saw ("unknown" without one).
pub(crate) fn peer_of(parts: &Parts) -> String {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |c| c.0.to_string())
}

/// The token of `Authorization: Bearer <token>`, if the header has one.
fn bearer(parts: &Parts) -> Result<Option<String>, String> {
    let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    if value.len() > MAX_AUTHORIZATION {
        return Err(format!(
            "the Authorization header is longer than {MAX_AUTHORIZATION} bytes"
        ));
    }
    let text = value
        .to_str()
        .map_err(|_| "the Authorization header is not ASCII text".to_owned())?;
    let token = text
        .strip_prefix("Bearer ")
        .or_else(|| text.strip_prefix("bearer "))
        .ok_or_else(|| "the Authorization header must be `Bearer <API token>`".to_owned())?;
    Ok(Some(token.trim().to_owned()))
}

/// What the request asks, as audit events name it: "GET /api/v1/nodes".
fn what_of(parts: &Parts) -> String {
    let path = parts.uri.path();
    // A path is bounded by hyper's header limits, but keep events short.
    let path = if path.len() > 200 { &path[..200] } else { path };
    format!("{} {}", parts.method, path.escape_default())
}

impl FromRequestParts<HttpState> for Principal {
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &HttpState,
    ) -> Result<Self, Self::Rejection> {
        let peer = peer_of(parts);
        let what = what_of(parts);
        let token = match bearer(parts) {
            Ok(token) => token,
            Err(message) => {
                let err = ApiError::Invalid(message.clone());
                api::record_refusal(state.store(), &peer, &peer, &what, &err).await;
                return Err(AppError::Unauthenticated(message));
            }
        };
        let found = match &token {
            Some(token) => state
                .control()
                .authenticate_bearer(token, &peer)
                .await
                .map(|caller| (caller, Via::Token)),
            None => match parts.extensions.get::<SessionInfo>() {
                // Looked up (and its CSRF token checked) by the session layer.
                Some(info) => session::caller(state, info)
                    .await
                    .map(|caller| (caller, Via::Session(info.clone()))),
                None => Err(ApiError::NoToken),
            },
        };
        match found {
            Ok((caller, via)) => Ok(Self { caller, peer, via }),
            Err(err) => {
                let actor = api::refusal_actor(&err, token.as_deref(), &peer);
                api::record_refusal(state.store(), &actor, &peer, &what, &err).await;
                Err(match err {
                    ApiError::NoToken => AppError::Unauthenticated(
                        "log in, or send `Authorization: Bearer <API token>` (slipway-controller token api makes one)"
                            .to_owned(),
                    ),
                    other => other.into(),
                })
            }
        }
    }
}

/// True for methods that change nothing (no CSRF token needed).
pub(crate) fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}
