//! The transport of the DigitalOcean client: one HTTP/1.1 request at a
//! time over tokio-rustls (plain http only to a loopback address, for
//! tests), retried as DigitalOcean's own Go client does, and pagination.
//!
//! Retries ([`RetryPolicy`], default up to 4 retries, waits 1–30 s): a 429
//! and any 5xx are retried for every method (DO answers 429 before doing
//! anything); a connection failure or timeout only for GET, PUT and DELETE,
//! so a create is never sent twice after an answer that was lost. The wait
//! is `retry-after` when the answer has one, else the time until
//! `ratelimit-reset` when `ratelimit-remaining` is 0, else an exponential
//! backoff with jitter; every wait is clamped to the policy's bounds. The
//! last rate-limit headers seen are kept ([`Client::rate_limit`]); a
//! request made while they say the quota is used up waits for the reset
//! first (bounded by the policy's longest wait).
//!
//! What the receiver checks: a body over [`MAX_BODY`] is refused, an error
//! body is read for DO's `id`, `message` and `request_id` (each cut to a
//! bounded length), a `links.pages.next` that leaves the configured API
//! origin is refused, and a listing stops with an error past [`MAX_PAGES`].

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, Method, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The real API; tests point [`Settings::api_url`] at a local server.
pub const DEFAULT_API_URL: &str = "https://api.digitalocean.com";
/// The environment variable the token is read from when no file is named
/// (the name DigitalOcean's own `doctl` reads).
pub const TOKEN_ENV: &str = "DIGITALOCEAN_ACCESS_TOKEN";
/// Largest response body read: a page of 200 droplets is ~1 MiB.
pub const MAX_BODY: usize = 8 << 20;
/// Pages followed in one listing before giving up (200 per page: 100,000
/// items, far past any fleet, but a server linking pages in a loop stops).
pub const MAX_PAGES: usize = 500;
/// Items asked for per page by default (DO's maximum).
pub const PER_PAGE: u32 = 200;
/// Longest token accepted (DO's are 71 characters).
const MAX_TOKEN: usize = 512;
/// Longest error `id`/`message`/`request_id` kept from an error body.
const MAX_ERROR_FIELD: usize = 1024;
/// Sent as `User-Agent`, so DO's logs say who called.
const USER_AGENT: &str = concat!("slipway-controller/", env!("CARGO_PKG_VERSION"));

/// Why a call to the DigitalOcean API failed.
#[derive(Debug, thiserror::Error)]
pub enum DoError {
    /// The client's settings are unusable (URL, token, TLS roots).
    #[error("digitalocean: {0}")]
    Config(String),
    #[error("digitalocean: cannot connect to {authority} for {method} {path}: {source}")]
    Connect {
        method: Method,
        path: String,
        authority: String,
        source: std::io::Error,
    },
    #[error("digitalocean: timed out after {after:?} {during} for {method} {path}")]
    Timeout {
        method: Method,
        path: String,
        during: &'static str,
        after: Duration,
    },
    #[error("digitalocean: HTTP exchange for {method} {path} failed: {reason}")]
    Http {
        method: Method,
        path: String,
        reason: String,
    },
    /// DigitalOcean answered with an error status and (usually) its error body.
    #[error(
        "digitalocean: {method} {path} answered HTTP {status} {id}: {message}{}",
        request_id.as_deref().map(|r| format!(" (request_id {r})")).unwrap_or_default()
    )]
    Api {
        method: Method,
        path: String,
        status: StatusCode,
        /// DO's error id, e.g. `not_found`, `unauthorized`, `too_many_requests`.
        id: String,
        message: String,
        request_id: Option<String>,
    },
    /// The answer is not what the API description says (bad JSON, a
    /// missing field, a value past a limit, a foreign next-page link).
    #[error("digitalocean: unexpected answer to {method} {path}: {reason}")]
    Invalid {
        method: Method,
        path: String,
        reason: String,
    },
    #[error("digitalocean: giving up after {attempts} attempts: {last}")]
    GaveUp { attempts: u32, last: Box<DoError> },
}

impl DoError {
    /// The HTTP status of an API error (also inside [`DoError::GaveUp`]).
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Api { status, .. } => Some(*status),
            Self::GaveUp { last, .. } => last.status(),
            _ => None,
        }
    }

    /// True for a 404: the droplet, record or action is gone.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }
}

/// The API token. Its `Debug` never shows it and nothing logs it.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// A token given as text; surrounding whitespace is dropped.
    pub fn new(text: &str) -> Result<Self, DoError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(DoError::Config("the API token is empty".into()));
        }
        if text.len() > MAX_TOKEN {
            return Err(DoError::Config(format!(
                "the API token is {} bytes long, more than the limit of {MAX_TOKEN}",
                text.len()
            )));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(DoError::Config(
                "the API token has characters other than printable ASCII".into(),
            ));
        }
        Ok(Self(text.into()))
    }

    /// The token in `path` (its first line).
    pub fn from_file(path: &Path) -> Result<Self, DoError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            DoError::Config(format!(
                "cannot read the token file {}: {e}",
                path.display()
            ))
        })?;
        Self::new(text.lines().next().unwrap_or("")).map_err(|e| match e {
            DoError::Config(m) => DoError::Config(format!("{m} (in {})", path.display())),
            other => other,
        })
    }

    /// The token in the environment variable `var`.
    pub fn from_env(var: &str) -> Result<Self, DoError> {
        let text = std::env::var(var)
            .map_err(|_| DoError::Config(format!("${var} is not set (or not UTF-8)")))?;
        Self::new(&text).map_err(|e| match e {
            DoError::Config(m) => DoError::Config(format!("{m} (in ${var})")),
            other => other,
        })
    }

    fn bearer(&self) -> String {
        format!("Bearer {}", self.0)
    }
}

pub use crate::webapi::RetryPolicy;

/// How 429 and 5xx answers (and lost connections) are retried unless the
/// config says otherwise: 4 retries, as DO's own Go client.
pub const DEFAULT_RETRY: RetryPolicy = RetryPolicy::with_retries(4);

/// What the client is built from.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `https://api.digitalocean.com`, or `http://127.0.0.1:PORT` in tests.
    pub api_url: String,
    pub token: Token,
    pub retry: RetryPolicy,
    /// Connecting, the TLS handshake, and waiting for an answer, each.
    pub timeout: Duration,
    /// Items per page of a listing, 1 to [`PER_PAGE`] (tests use small pages).
    pub page_size: u32,
}

impl Settings {
    /// The real API with the default retries and a 30 s timeout.
    pub fn new(token: Token) -> Self {
        Self {
            api_url: DEFAULT_API_URL.to_owned(),
            token,
            retry: DEFAULT_RETRY,
            timeout: Duration::from_secs(30),
            page_size: PER_PAGE,
        }
    }
}

/// The rate-limit headers of the last answer that had them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: u64,
    pub remaining: u64,
    /// Unix seconds when the oldest counted request expires.
    pub reset: u64,
}

use crate::webapi::Origin;

/// A DigitalOcean API client. Cheap to clone; clones share the rate-limit
/// state.
#[derive(Debug, Clone)]
pub struct Client {
    origin: Arc<Origin>,
    token: Token,
    retry: RetryPolicy,
    timeout: Duration,
    page_size: u32,
    tls: Option<Arc<ClientConfig>>,
    rate: Arc<Mutex<Option<RateLimit>>>,
}

/// One answer: status, headers and the whole (bounded) body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) body: Bytes,
}

impl Client {
    /// Checks the settings: an absolute `https://` URL, or `http://` to a
    /// loopback address only (tests); the system roots for https.
    pub fn new(settings: Settings) -> Result<Self, DoError> {
        let origin = parse_origin(&settings.api_url)?;
        let tls = if origin.tls {
            Some(Arc::new(client_config()?))
        } else {
            None
        };
        if settings.timeout.is_zero() {
            return Err(DoError::Config("the request timeout must not be 0".into()));
        }
        if !(1..=PER_PAGE).contains(&settings.page_size) {
            return Err(DoError::Config(format!(
                "page size {} is not within 1..={PER_PAGE}",
                settings.page_size
            )));
        }
        Ok(Self {
            origin: Arc::new(origin),
            token: settings.token,
            retry: settings.retry,
            timeout: settings.timeout,
            page_size: settings.page_size,
            tls,
            rate: Arc::new(Mutex::new(None)),
        })
    }

    /// The rate-limit headers last seen, if any answer had them.
    pub fn rate_limit(&self) -> Option<RateLimit> {
        *self.rate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `GET path` decoded as `T`.
    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, DoError> {
        let answer = self.call(Method::GET, path, None).await?;
        decode(&Method::GET, path, &answer.body)
    }

    /// `method path` with a JSON body, the answer decoded as `T`.
    pub(crate) async fn send<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, DoError> {
        let json = serde_json::to_vec(body).map_err(|e| DoError::Invalid {
            method: method.clone(),
            path: path.to_owned(),
            reason: format!("cannot encode the request: {e}"),
        })?;
        let answer = self.call(method.clone(), path, Some(json)).await?;
        decode(&method, path, &answer.body)
    }

    /// `DELETE path`, expecting 204.
    pub(crate) async fn delete(&self, path: &str) -> Result<(), DoError> {
        self.call(Method::DELETE, path, None).await.map(drop)
    }

    /// Every item of a paginated listing: `key` is the array's name
    /// (`droplets`, `domain_records`, `firewalls`). `path` may have a query.
    pub(crate) async fn list<T: DeserializeOwned>(
        &self,
        path: &str,
        key: &str,
    ) -> Result<Vec<T>, DoError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut next = Some(format!("{path}{sep}page=1&per_page={}", self.page_size));
        let mut items = Vec::new();
        let mut pages = 0;
        while let Some(here) = next.take() {
            pages += 1;
            if pages > MAX_PAGES {
                return Err(DoError::Invalid {
                    method: Method::GET,
                    path: path.to_owned(),
                    reason: format!("more than {MAX_PAGES} pages"),
                });
            }
            let answer = self.call(Method::GET, &here, None).await?;
            let page: Page = decode(&Method::GET, &here, &answer.body)?;
            let invalid = |reason: String| DoError::Invalid {
                method: Method::GET,
                path: here.clone(),
                reason,
            };
            let list = page
                .items
                .get(key)
                .ok_or_else(|| invalid(format!("no {key:?} array")))?;
            let batch: Vec<T> =
                serde_json::from_value(list.clone()).map_err(|e| invalid(format!("{key}: {e}")))?;
            items.extend(batch);
            if let Some(link) = page
                .links
                .and_then(|l| l.pages)
                .and_then(|p| p.next)
                .filter(|n| !n.is_empty())
            {
                next = Some(self.same_origin(&link).map_err(invalid)?);
            }
        }
        Ok(items)
    }

    /// The path and query of a next-page link, if it points into the
    /// configured API (a page must not send the token elsewhere).
    fn same_origin(&self, link: &str) -> Result<String, String> {
        let uri: Uri = link
            .parse()
            .map_err(|e| format!("links.pages.next {link:?} is not a URL: {e}"))?;
        let scheme_ok = uri.scheme_str() == Some(if self.origin.tls { "https" } else { "http" });
        let authority_ok = uri
            .authority()
            .is_some_and(|a| a.as_str().eq_ignore_ascii_case(&self.origin.authority));
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        if !scheme_ok || !authority_ok || !path.starts_with(&self.origin.prefix) {
            return Err(format!(
                "links.pages.next {link:?} leaves the API at {}",
                self.origin.authority
            ));
        }
        Ok(path[self.origin.prefix.len()..].to_owned())
    }

    /// One request with the retries of the module docs. `path` starts with
    /// `/v2/`. Non-2xx answers become [`DoError::Api`].
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, DoError> {
        let idempotent = matches!(method, Method::GET | Method::PUT | Method::DELETE);
        let mut retry = 0;
        loop {
            self.wait_for_quota().await;
            let outcome = self.once(&method, path, body.clone()).await;
            let (error, wait) = match outcome {
                Ok((answer, headers)) => {
                    if answer.status.is_success() {
                        return Ok(answer);
                    }
                    let error = api_error(&method, path, &answer);
                    let retryable = answer.status == StatusCode::TOO_MANY_REQUESTS
                        || answer.status.is_server_error();
                    if !retryable {
                        return Err(error);
                    }
                    (error, self.wait_after(&headers, retry))
                }
                Err(
                    e @ (DoError::Connect { .. } | DoError::Timeout { .. } | DoError::Http { .. }),
                ) if idempotent => (e, self.retry.backoff(retry)),
                Err(e) => return Err(e),
            };
            if retry >= self.retry.max_retries {
                return Err(if retry == 0 {
                    error
                } else {
                    DoError::GaveUp {
                        attempts: retry + 1,
                        last: Box::new(error),
                    }
                });
            }
            tracing::warn!(%method, path, error = %error, ?wait, "digitalocean: retrying");
            tokio::time::sleep(wait).await;
            retry += 1;
        }
    }

    /// How long to wait before retry `retry` after an answer with `headers`.
    fn wait_after(&self, headers: &HeaderMap, retry: u32) -> Duration {
        if let Some(secs) = header_u64(headers, "retry-after") {
            return self.retry.clamp(Duration::from_secs(secs));
        }
        if let Some(rate) = self.rate_limit() {
            if rate.remaining == 0 {
                let now = now_unix();
                if rate.reset > now {
                    return self.retry.clamp(Duration::from_secs(rate.reset - now));
                }
            }
        }
        self.retry.backoff(retry)
    }

    /// Waits for `ratelimit-reset` when the last answer said no requests
    /// remain (bounded by the policy's longest wait).
    async fn wait_for_quota(&self) {
        let Some(rate) = self.rate_limit() else {
            return;
        };
        let now = now_unix();
        if rate.remaining == 0 && rate.reset > now {
            let wait = self.retry.clamp(Duration::from_secs(rate.reset - now));
            tracing::warn!(
                ?wait,
                "digitalocean: rate limit used up; waiting for its reset"
            );
            tokio::time::sleep(wait).await;
            // Whatever the next answer says replaces this.
            *self.rate.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// One exchange over a fresh connection.
    async fn once(
        &self,
        method: &Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(Answer, HeaderMap), DoError> {
        let origin = &*self.origin;
        let timeout = |during| DoError::Timeout {
            method: method.clone(),
            path: path.to_owned(),
            during,
            after: self.timeout,
        };
        let http_err = |e: hyper::Error| DoError::Http {
            method: method.clone(),
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let tcp = tokio::time::timeout(
            self.timeout,
            TcpStream::connect((origin.host.as_str(), origin.port)),
        )
        .await
        .map_err(|_| timeout("connecting"))?
        .map_err(|source| DoError::Connect {
            method: method.clone(),
            path: path.to_owned(),
            authority: origin.authority.clone(),
            source,
        })?;
        let _ = tcp.set_nodelay(true);
        let mut sender = match &self.tls {
            Some(tls) => {
                let name = ServerName::try_from(origin.host.clone())
                    .map_err(|e| DoError::Config(format!("host {:?}: {e}", origin.host)))?;
                let stream = tokio::time::timeout(
                    self.timeout,
                    TlsConnector::from(Arc::clone(tls)).connect(name, tcp),
                )
                .await
                .map_err(|_| timeout("in the TLS handshake"))?
                .map_err(|source| DoError::Connect {
                    method: method.clone(),
                    path: path.to_owned(),
                    authority: origin.authority.clone(),
                    source,
                })?;
                handshake(TokioIo::new(stream)).await.map_err(http_err)?
            }
            None => handshake(TokioIo::new(tcp)).await.map_err(http_err)?,
        };
        let mut request = hyper::Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", origin.prefix))
            .header(http::header::HOST, origin.authority.as_str())
            .header(http::header::USER_AGENT, USER_AGENT)
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::AUTHORIZATION, self.token.bearer());
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| DoError::Invalid {
                method: method.clone(),
                path: path.to_owned(),
                reason: format!("cannot build the request: {e}"),
            })?;
        let response = tokio::time::timeout(self.timeout, sender.send_request(request))
            .await
            .map_err(|_| timeout("waiting for the answer"))?
            .map_err(http_err)?;
        let status = response.status();
        let headers = response.headers().clone();
        self.note_rate_limit(&headers);
        let body = tokio::time::timeout(
            self.timeout,
            Limited::new(response.into_body(), MAX_BODY).collect(),
        )
        .await
        .map_err(|_| timeout("reading the answer"))?
        .map_err(|e| DoError::Invalid {
            method: method.clone(),
            path: path.to_owned(),
            reason: format!("body not read (over {MAX_BODY} bytes?): {e}"),
        })?
        .to_bytes();
        Ok((Answer { status, body }, headers))
    }

    fn note_rate_limit(&self, headers: &HeaderMap) {
        let (Some(limit), Some(remaining), Some(reset)) = (
            header_u64(headers, "ratelimit-limit"),
            header_u64(headers, "ratelimit-remaining"),
            header_u64(headers, "ratelimit-reset"),
        ) else {
            return;
        };
        *self.rate.lock().unwrap_or_else(|p| p.into_inner()) = Some(RateLimit {
            limit,
            remaining,
            reset,
        });
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// The HTTP/1 handshake; the connection task ends with the exchange.
async fn handshake<T>(io: T) -> Result<Sender, hyper::Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "digitalocean connection ended");
        }
    });
    Ok(sender)
}

/// Checks an API URL as [`Client::new`] would (https, or http to loopback).
pub(crate) fn check_api_url(url: &str) -> Result<(), DoError> {
    parse_origin(url).map(drop)
}

fn parse_origin(url: &str) -> Result<Origin, DoError> {
    let origin = crate::webapi::parse_origin(url, "api_url").map_err(DoError::Config)?;
    if url.parse::<http::Uri>().is_ok_and(|u| u.query().is_some()) {
        return Err(DoError::Config(format!(
            "api_url {url:?}: must not have a query"
        )));
    }
    Ok(origin)
}

/// System roots, ring, HTTP/1.1 only.
fn client_config() -> Result<ClientConfig, DoError> {
    crate::webapi::client_config("the API's").map_err(DoError::Config)
}

/// A listing page: the array under its key, and the links.
#[derive(Debug, Deserialize)]
struct Page {
    links: Option<Links>,
    #[serde(flatten)]
    items: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct Links {
    pages: Option<Pages>,
}

#[derive(Debug, Deserialize)]
struct Pages {
    next: Option<String>,
}

/// DO's error body.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    id: Option<String>,
    message: Option<String>,
    request_id: Option<String>,
}

fn api_error(method: &Method, path: &str, answer: &Answer) -> DoError {
    let body: Option<ErrorBody> = serde_json::from_slice(&answer.body).ok();
    let cut = |s: String| -> String {
        let s: String = s.chars().filter(|c| !c.is_control()).collect();
        if s.len() > MAX_ERROR_FIELD {
            let mut end = MAX_ERROR_FIELD;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}…", &s[..end])
        } else {
            s
        }
    };
    let (id, message, request_id) = match body {
        Some(b) => (b.id, b.message, b.request_id),
        None => (None, None, None),
    };
    DoError::Api {
        method: method.clone(),
        path: path.to_owned(),
        status: answer.status,
        id: cut(id.unwrap_or_else(|| "no_error_body".into())),
        message: cut(message.unwrap_or_else(|| {
            format!("no DigitalOcean error body ({} bytes)", answer.body.len())
        })),
        request_id: request_id.map(cut),
    }
}

fn decode<T: DeserializeOwned>(method: &Method, path: &str, body: &[u8]) -> Result<T, DoError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| DoError::Invalid {
        method: method.clone(),
        path: path.to_owned(),
        reason: format!("at {}: {}", e.path(), e.inner()),
    })
}

use crate::webapi::{header_u64, now_unix};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_never_shows_in_debug() {
        let token = Token::new("dop_v1_secret").unwrap();
        let settings = Settings::new(token);
        let shown = format!("{settings:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn bad_tokens_are_refused_with_the_reason() {
        assert!(Token::new("  ").unwrap_err().to_string().contains("empty"));
        assert!(Token::new("a b")
            .unwrap_err()
            .to_string()
            .contains("printable"));
        let long = "a".repeat(MAX_TOKEN + 1);
        assert!(Token::new(&long).unwrap_err().to_string().contains("limit"));
    }

    #[test]
    fn plain_http_only_to_loopback() {
        assert!(parse_origin("http://127.0.0.1:8080").is_ok());
        assert!(parse_origin("http://[::1]:8080").is_ok());
        assert!(parse_origin("http://localhost:1").is_ok());
        let e = parse_origin("http://api.digitalocean.com").unwrap_err();
        assert!(e.to_string().contains("loopback"), "{e}");
        let e = parse_origin("ftp://x").unwrap_err();
        assert!(e.to_string().contains("https://"), "{e}");
        let o = parse_origin("https://api.example/prefix/").unwrap();
        assert_eq!((o.port, o.prefix.as_str()), (443, "/prefix"));
    }

    #[test]
    fn waits_stay_within_the_policy() {
        let p = RetryPolicy {
            max_retries: 4,
            min_wait: Duration::from_millis(10),
            max_wait: Duration::from_millis(50),
        };
        for n in 0..40 {
            let w = p.backoff(n);
            assert!(w >= p.min_wait && w <= p.max_wait, "{n}: {w:?}");
        }
        assert!(p.backoff(0) < Duration::from_millis(13));
    }
}
