//! Browser sessions: log in with an API token, get a cookie.
//!
//! - `GET /login` shows a form that takes a token; `POST /login` checks it
//!   (a refusal is audited like any refused call), stores a session (the
//!   sha256 of a 256-bit random id, the token id, a CSRF token, an expiry
//!   [`SESSION_TTL`] away) and sets the cookie
//!   `slipway_session=<id>; Path=/; Secure; HttpOnly; SameSite=Strict`.
//! - A session acts with its token's scopes; it ends at expiry, at
//!   `POST /logout`, or when the token is revoked (`token revoke` deletes
//!   its sessions, and each lookup checks the token again).
//! - [`layer`] runs before every route: it finds the session of a request
//!   that has no `Authorization` header and, for a state-changing method
//!   (anything but GET/HEAD/OPTIONS), checks its CSRF token — the
//!   `X-CSRF-Token` header, or the `_csrf` field of a form body — and an
//!   `Origin` header, if sent, against `Host`. A page puts the token in its
//!   forms with [`csrf_field`] (or reads [`super::Principal::csrf_token`]).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};

use super::auth::{is_safe, peer_of};
use super::error::AppError;
use super::HttpState;
use crate::api::{self, ApiError};
use crate::auth::apitoken::{self, Caller};
use crate::pki::crypto;

/// Name of the session cookie.
pub const COOKIE: &str = "slipway_session";
/// How long a session lasts after login: a working day.
pub const SESSION_TTL: std::time::Duration = std::time::Duration::from_secs(12 * 60 * 60);
/// Largest form body the CSRF check reads to find `_csrf` (pages' forms
/// are a few fields); a bigger form must send `X-CSRF-Token`.
const MAX_FORM: usize = 64 * 1024;
/// Longest cookie value or CSRF header looked at (ours are 64 hex
/// characters).
const MAX_COOKIE_VALUE: usize = 128;
/// Longest token accepted by the login form (a real one is ~90 bytes).
const MAX_LOGIN_TOKEN: usize = 256;
/// Name of the form field and header carrying the CSRF token.
pub const CSRF_FIELD: &str = "_csrf";
/// See [`CSRF_FIELD`].
pub const CSRF_HEADER: &str = "x-csrf-token";

/// The session a request carries, put in its extensions by [`layer`].
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// sha256 of the cookie value (the stored key).
    pub id_hash: String,
    /// The API token it acts for.
    pub token_id: String,
    /// Its CSRF token.
    pub csrf: String,
}

/// A hidden form field with the session's CSRF token, for every form that
/// POSTs: `<input type="hidden" name="_csrf" value="...">`.
pub fn csrf_field(csrf: &str) -> String {
    // The token is hex; nothing to escape.
    format!(r#"<input type="hidden" name="{CSRF_FIELD}" value="{csrf}">"#)
}

/// The caller a session acts for: its token, checked again (revoked since?).
pub(crate) async fn caller(state: &HttpState, info: &SessionInfo) -> Result<Caller, ApiError> {
    Ok(apitoken::caller_by_id(state.store(), &info.token_id).await?)
}

/// The session cookie's value, if the request has one of a sane size.
fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|v| !v.is_empty() && v.len() <= MAX_COOKIE_VALUE)
}

/// True if an `Origin` header, when present, names the host asked.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let (Ok(origin), Some(Ok(host))) = (
        origin.to_str(),
        headers.get(header::HOST).map(HeaderValue::to_str),
    ) else {
        return false;
    };
    let origin_host = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"))
        .unwrap_or("");
    origin_host == host
}

/// Compares two secrets by their hashes, so timing tells nothing.
fn secrets_match(given: &str, expected: &str) -> bool {
    crypto::sha256_hex(given.as_bytes()) == crypto::sha256_hex(expected.as_bytes())
}

/// Runs before every route: finds the request's session and checks the
/// CSRF token (and `Origin`) of a state-changing one.
pub(crate) async fn layer(
    State(state): State<HttpState>,
    request: Request,
    next: Next,
) -> Result<Response, AppError> {
    if request.headers().contains_key(header::AUTHORIZATION) {
        // A token caller: no cookie involved, no CSRF possible.
        return Ok(next.run(request).await);
    }
    let (mut parts, body) = request.into_parts();
    let Some(value) = cookie_value(&parts.headers) else {
        return Ok(next.run(Request::from_parts(parts, body)).await);
    };
    let id_hash = crypto::sha256_hex(value.as_bytes());
    let Some(row) = state
        .store()
        .web_session(&id_hash, crate::now_unix())
        .await?
    else {
        // Expired, logged out or revoked: as if there were no cookie.
        return Ok(next.run(Request::from_parts(parts, body)).await);
    };
    let info = SessionInfo {
        id_hash,
        token_id: row.token_id,
        csrf: row.csrf,
    };
    let mut body = body;
    // Logging in again from a browser that has a session: the login form
    // carries no CSRF token (it checks the Origin itself).
    let login = parts.uri.path() == "/login";
    if !is_safe(&parts.method) && !login {
        let what = format!("{} {}", parts.method, parts.uri.path().escape_default());
        let refuse = |message: &str| {
            let err = ApiError::Invalid(message.to_owned());
            (err, AppError::Csrf(message.to_owned()))
        };
        let header_token = parts
            .headers
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(ToOwned::to_owned);
        let checked = if !same_origin(&parts.headers) {
            Err(refuse(
                "the Origin header names another site; state-changing requests must come from this one",
            ))
        } else if let Some(given) = header_token {
            if given.len() > MAX_COOKIE_VALUE {
                Err(refuse(
                    "the X-CSRF-Token header is longer than a CSRF token",
                ))
            } else if secrets_match(&given, &info.csrf) {
                Ok(())
            } else {
                Err(refuse(
                    "the X-CSRF-Token header does not match this session",
                ))
            }
        } else if is_form(&parts.headers) {
            let bytes = axum::body::to_bytes(body, MAX_FORM).await.map_err(|_| {
                AppError::TooLarge(format!(
                    "a form body over {MAX_FORM} bytes must carry its CSRF token in the X-CSRF-Token header"
                ))
            })?;
            let given = serde_urlencoded::from_bytes::<CsrfOnly>(&bytes)
                .ok()
                .and_then(|f| f.csrf);
            body = Body::from(bytes);
            match given {
                Some(given) if secrets_match(&given, &info.csrf) => Ok(()),
                Some(_) => Err(refuse("the form's _csrf field does not match this session")),
                None => Err(refuse(
                    "the form has no _csrf field (state-changing requests of a browser session need the CSRF token)",
                )),
            }
        } else {
            Err(refuse(
                "state-changing requests of a browser session need the X-CSRF-Token header",
            ))
        };
        if let Err((err, refusal)) = checked {
            let peer = peer_of(&parts);
            api::record_refusal(state.store(), &info.token_id, &peer, &what, &err).await;
            return Err(refusal);
        }
    }
    parts.extensions.insert(info);
    Ok(next.run(Request::from_parts(parts, body)).await)
}

/// The one field of a form the CSRF check reads (others are ignored).
#[derive(Debug, serde::Deserialize)]
struct CsrfOnly {
    #[serde(rename = "_csrf")]
    csrf: Option<String>,
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"))
}

/// `GET /login`: the login form.
pub(crate) async fn login_form() -> Html<&'static str> {
    Html(LOGIN_PAGE)
}

const LOGIN_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Slipway: log in</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 28rem; margin: 3rem auto; padding: 0 1rem">
<h1>Slipway</h1>
<form method="post" action="/login">
<label for="token">API token</label><br>
<input id="token" name="token" type="password" autocomplete="off" required maxlength="256" style="width: 100%">
<p><button type="submit">Log in</button></p>
</form>
<p>Make a token with <code>slipway-controller token api --scope read</code>.</p>
</body></html>
"#;

/// The login form's fields.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Login {
    token: String,
}

/// `POST /login`: checks the token, opens a session, sets the cookie and
/// sends the browser to `/`.
pub(crate) async fn login(
    State(state): State<HttpState>,
    request: Request,
) -> Result<Response, AppError> {
    let (parts, body) = request.into_parts();
    let peer = peer_of(&parts);
    if !same_origin(&parts.headers) {
        return Err(AppError::Csrf(
            "the Origin header names another site; log in from this one".to_owned(),
        ));
    }
    let bytes = axum::body::to_bytes(body, MAX_FORM)
        .await
        .map_err(|_| AppError::TooLarge(format!("the login form is over {MAX_FORM} bytes")))?;
    let login: Login = serde_urlencoded::from_bytes(&bytes)
        .map_err(|e| AppError::field("token", format!("the login form: {e}")))?;
    let token = login.token.trim();
    if token.is_empty() || token.len() > MAX_LOGIN_TOKEN {
        return Err(AppError::field(
            "token",
            format!("the token must be 1 to {MAX_LOGIN_TOKEN} bytes"),
        ));
    }
    let caller = match apitoken::authenticate(state.store(), token).await {
        Ok(caller) => caller,
        Err(err) => {
            let err = ApiError::from(err);
            let actor = api::refusal_actor(&err, Some(token), &peer);
            api::record_refusal(state.store(), &actor, &peer, "log in", &err).await;
            return Err(err.into());
        }
    };
    let id = crypto::random_hex::<32>().map_err(|e| AppError::Internal(e.to_string()))?;
    let csrf = crypto::random_hex::<32>().map_err(|e| AppError::Internal(e.to_string()))?;
    let now = crate::now_unix();
    let ttl = i64::try_from(SESSION_TTL.as_secs()).unwrap_or(i64::MAX);
    state
        .store()
        .insert_web_session(
            &crypto::sha256_hex(id.as_bytes()),
            &caller.token_id,
            &csrf,
            now,
            now.saturating_add(ttl),
        )
        .await?;
    tracing::info!(token = %caller.token_id, %peer, "browser session opened");
    let cookie = format!("{COOKIE}={id}; Path=/; Max-Age={ttl}; Secure; HttpOnly; SameSite=Strict");
    let mut response = Redirect::to("/").into_response();
    *response.status_mut() = StatusCode::SEE_OTHER;
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|e| AppError::Internal(e.to_string()))?,
    );
    Ok(response)
}

/// `POST /logout` (CSRF-checked like any state change): ends the session
/// and clears the cookie.
pub(crate) async fn logout(
    State(state): State<HttpState>,
    request: Request,
) -> Result<Response, AppError> {
    if let Some(info) = request.extensions().get::<SessionInfo>() {
        state.store().delete_web_session(&info.id_hash).await?;
    }
    let cookie = format!("{COOKIE}=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Strict");
    let mut response = Redirect::to("/login").into_response();
    *response.status_mut() = StatusCode::SEE_OTHER;
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|e| AppError::Internal(e.to_string()))?,
    );
    Ok(response)
}
