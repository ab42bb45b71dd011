//! A GitHub Actions OIDC token in place of an API token: in a job with
//! `permissions: id-token: write`, the runner sets
//! `ACTIONS_ID_TOKEN_REQUEST_URL` and `ACTIONS_ID_TOKEN_REQUEST_TOKEN`; a GET
//! of that URL with `&audience=AUD` and `Authorization: bearer <request
//! token>` answers `{"value": "<JWT>"}`, a token signed by GitHub that says
//! which repository, branch, environment and workflow runs the job. The
//! controller checks it against its `[oidc]` grants. Nothing is stored in
//! the repository, and the token expires within minutes.

use std::time::Duration;

use serde::Deserialize;

use crate::Usage;

/// Where the runner says to ask for a token.
pub(crate) const REQUEST_URL_ENV: &str = "ACTIONS_ID_TOKEN_REQUEST_URL";
/// The runner's credential for asking.
pub(crate) const REQUEST_TOKEN_ENV: &str = "ACTIONS_ID_TOKEN_REQUEST_TOKEN";
/// Longest answer read (a token is ~1.5 KiB).
const MAX_BODY: usize = 64 * 1024;
/// Longest token accepted (the controller's limit too).
const MAX_TOKEN: usize = 8 * 1024;
/// Each attempt must end within this.
const ATTEMPT_DEADLINE: Duration = Duration::from_secs(20);
/// Attempts in all; the runtime service has brief hiccups.
const ATTEMPTS: u32 = 3;
/// The first wait between attempts, doubled after each.
const FIRST_WAIT: Duration = Duration::from_secs(1);

/// True when the job can ask for a token (both variables set).
pub(crate) fn available() -> bool {
    [REQUEST_URL_ENV, REQUEST_TOKEN_ENV]
        .iter()
        .all(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

#[derive(Deserialize)]
struct Answer {
    value: String,
}

/// The request URL with `audience` added to its query.
fn request_url(base: &str, audience: &str) -> String {
    let query = serde_urlencoded::to_string([("audience", audience)]).unwrap_or_default();
    let join = if base.contains('?') { '&' } else { '?' };
    format!("{base}{join}{query}")
}

/// Asks the Actions runtime for a token for `audience`.
pub(crate) async fn fetch_token(audience: &str) -> anyhow::Result<String> {
    let (Ok(base), Ok(secret)) = (
        std::env::var(REQUEST_URL_ENV),
        std::env::var(REQUEST_TOKEN_ENV),
    ) else {
        return Err(Usage(format!(
            "--oidc needs {REQUEST_URL_ENV} and {REQUEST_TOKEN_ENV}: run it in a GitHub Actions job with `permissions: id-token: write`"
        ))
        .into());
    };
    if audience.is_empty() || audience.len() > 256 {
        return Err(Usage("--oidc-audience must be 1 to 256 characters".into()).into());
    }
    let url = request_url(&base, audience);
    let headers = [
        (http::header::AUTHORIZATION, format!("bearer {secret}")),
        (http::header::ACCEPT, "application/json".to_owned()),
    ];
    let mut wait = FIRST_WAIT;
    let mut attempt = 1;
    let answer = loop {
        let result = slipway_proto::https::get(
            &url,
            &headers,
            slipway_proto::https::system_roots(),
            MAX_BODY,
            ATTEMPT_DEADLINE,
        )
        .await;
        let retry = match &result {
            Err(slipway_proto::https::HttpsError::Url { .. }) => false,
            Err(_) => true,
            Ok(a) => a.status.is_server_error() || a.status.as_u16() == 429,
        };
        if !retry || attempt >= ATTEMPTS {
            break result.map_err(|e| anyhow::anyhow!("cannot get an OIDC token: {e}"))?;
        }
        attempt += 1;
        tokio::time::sleep(wait).await;
        wait *= 2;
    };
    if !answer.status.is_success() {
        let body = String::from_utf8_lossy(&answer.body);
        let body: String = body.chars().take(300).collect();
        anyhow::bail!(
            "cannot get an OIDC token: the Actions runtime answered HTTP {}: {body} (does the job have `permissions: id-token: write`?)",
            answer.status
        );
    }
    let Answer { value } = serde_json::from_slice(&answer.body).map_err(|e| {
        anyhow::anyhow!(
            "cannot get an OIDC token: the answer is not {{\"value\": \"<token>\"}}: {e}"
        )
    })?;
    let shaped = value.split('.').count() == 3
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !shaped || value.len() > MAX_TOKEN {
        anyhow::bail!(
            "cannot get an OIDC token: the Actions runtime answered something that is not a JWT of at most {MAX_TOKEN} bytes"
        );
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audience_joins_the_query() {
        assert_eq!(
            request_url(
                "https://r.example/t?api-version=2.0",
                "https://ctl.example.com"
            ),
            "https://r.example/t?api-version=2.0&audience=https%3A%2F%2Fctl.example.com"
        );
        assert_eq!(
            request_url("https://r.example/t", "slipway"),
            "https://r.example/t?audience=slipway"
        );
    }
}
