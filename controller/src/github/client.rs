//! The transport of the GitHub client: one HTTP/1.1 exchange per request
//! over tokio-rustls (plain http only to a loopback address, for tests),
//! authenticated as [`super::auth::Auth`] says, retried, and downloads that
//! follow a redirect without taking the token to another host.
//!
//! Retries ([`RetryPolicy`]): a 429 and a 403 that says the rate limit is
//! used up (`x-ratelimit-remaining: 0`, or a `retry-after`) for every method
//! (GitHub answers them before doing anything); a 5xx and a lost connection
//! only for GET, so a create is never sent twice from here (the status
//! queue retries those, looking for an earlier create first). The wait is
//! `retry-after` when the answer has one, else the time until
//! `x-ratelimit-reset` when `x-ratelimit-remaining` is 0, else an
//! exponential backoff with jitter; every wait is clamped to the policy.
//! The last rate-limit headers seen are kept; a request made while they say
//! the quota is used up waits for the reset first (bounded by the policy).
//! A 401 while authenticated as an App drops the cached installation token
//! and tries once more with a new one (a revoked or rotated token).
//!
//! What the receiver checks: a JSON body over [`MAX_BODY`] is refused, a
//! download over its declared limit is cut off, an error body is read for
//! GitHub's `message` (bounded) and the `x-github-request-id` header, and a
//! redirect is followed at most [`MAX_REDIRECTS`] times, to https only (or
//! loopback http in tests), carrying the token only back to the API's own
//! origin.

use std::fmt;
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

use super::auth::Auth;

/// The real API; tests point [`Settings::api_url`] at a local server.
pub const DEFAULT_API_URL: &str = "https://api.github.com";
/// Largest JSON body read (a release with many assets is ~100 KiB).
pub const MAX_BODY: usize = 4 << 20;
/// Redirects followed by one download (GitHub answers one, to its CDN).
pub const MAX_REDIRECTS: usize = 3;
/// Longest error `message` / request id kept from an answer.
const MAX_ERROR_FIELD: usize = 1024;
/// GitHub's current REST API version, sent on every call.
pub const API_VERSION: &str = "2022-11-28";
/// Sent as `User-Agent` (GitHub refuses requests without one).
const USER_AGENT: &str = concat!("slipway-controller/", env!("CARGO_PKG_VERSION"));

/// Why a call to GitHub failed.
#[derive(Debug, thiserror::Error)]
pub enum GhError {
    /// The client's settings or secrets are unusable.
    #[error("github: {0}")]
    Config(String),
    #[error("github: cannot connect to {authority} for {method} {path}: {source}")]
    Connect {
        method: Method,
        path: String,
        authority: String,
        source: std::io::Error,
    },
    #[error("github: timed out after {after:?} {during} for {method} {path}")]
    Timeout {
        method: Method,
        path: String,
        during: &'static str,
        after: Duration,
    },
    #[error("github: HTTP exchange for {method} {path} failed: {reason}")]
    Http {
        method: Method,
        path: String,
        reason: String,
    },
    /// GitHub answered with an error status and (usually) its message.
    #[error(
        "github: {method} {path} answered HTTP {status}: {message}{}",
        request_id.as_deref().map(|r| format!(" (x-github-request-id {r})")).unwrap_or_default()
    )]
    Api {
        method: Method,
        path: String,
        status: StatusCode,
        message: String,
        request_id: Option<String>,
        /// How long GitHub asked us to wait (retry-after or the rate-limit
        /// reset), when it said.
        retry_after: Option<Duration>,
    },
    /// The answer is not what the API description says.
    #[error("github: unexpected answer to {method} {path}: {reason}")]
    Invalid {
        method: Method,
        path: String,
        reason: String,
    },
    #[error("github: giving up after {attempts} attempts: {last}")]
    GaveUp { attempts: u32, last: Box<GhError> },
}

impl GhError {
    /// The HTTP status of an API error (also inside [`GhError::GaveUp`]).
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            Self::Api { status, .. } => Some(*status),
            Self::GaveUp { last, .. } => last.status(),
            _ => None,
        }
    }

    /// Whether trying again later may work: rate limits, 5xx, connection
    /// trouble. A 4xx other than a rate limit will answer the same.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Api {
                status,
                retry_after,
                ..
            } => {
                status.is_server_error()
                    || *status == StatusCode::TOO_MANY_REQUESTS
                    || (*status == StatusCode::FORBIDDEN && retry_after.is_some())
            }
            Self::GaveUp { last, .. } => last.is_transient(),
            Self::Connect { .. } | Self::Timeout { .. } | Self::Http { .. } => true,
            Self::Config(_) | Self::Invalid { .. } => false,
        }
    }

    /// How long GitHub asked to wait before the next try, if it said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Api { retry_after, .. } => *retry_after,
            Self::GaveUp { last, .. } => last.retry_after(),
            _ => None,
        }
    }
}

/// A secret (token, installation token, webhook secret). Its `Debug` never
/// shows it and nothing logs it.
#[derive(Clone)]
pub struct Secret(Arc<str>);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Longest secret accepted (GitHub's tokens are ~40-100 characters; a PEM
/// key goes through [`super::auth::AppKey`], not this).
const MAX_SECRET: usize = 1024;

impl Secret {
    /// A secret given as text; surrounding whitespace is dropped. `what`
    /// names it in errors ("the token", "the webhook secret").
    pub fn new(text: &str, what: &str) -> Result<Self, GhError> {
        let text = text.trim();
        if text.is_empty() {
            return Err(GhError::Config(format!("{what} is empty")));
        }
        if text.len() > MAX_SECRET {
            return Err(GhError::Config(format!(
                "{what} is {} bytes long, more than the limit of {MAX_SECRET}",
                text.len()
            )));
        }
        if !text.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
            return Err(GhError::Config(format!(
                "{what} has characters other than printable ASCII"
            )));
        }
        Ok(Self(text.into()))
    }

    /// The secret in `path` (its first line), or in `$env` when no file is
    /// named.
    pub fn load(file: Option<&std::path::Path>, env: &str, what: &str) -> Result<Self, GhError> {
        match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    GhError::Config(format!("cannot read {what} from {}: {e}", path.display()))
                })?;
                Self::new(text.lines().next().unwrap_or(""), what).map_err(|e| match e {
                    GhError::Config(m) => GhError::Config(format!("{m} (in {})", path.display())),
                    other => other,
                })
            }
            None => {
                let text = std::env::var(env).map_err(|_| {
                    GhError::Config(format!("{what}: ${env} is not set (or not UTF-8)"))
                })?;
                Self::new(&text, what).map_err(|e| match e {
                    GhError::Config(m) => GhError::Config(format!("{m} (in ${env})")),
                    other => other,
                })
            }
        }
    }

    /// The secret's bytes (for the HMAC key or a header value).
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

pub use crate::webapi::RetryPolicy;

/// How 429/5xx answers (and lost connections) are retried inside one call
/// unless the config says otherwise.
pub const DEFAULT_RETRY: RetryPolicy = RetryPolicy::with_retries(3);

/// What the client is built from.
#[derive(Debug, Clone)]
pub struct Settings {
    /// `https://api.github.com`, or `http://127.0.0.1:PORT` in tests.
    pub api_url: String,
    pub auth: Auth,
    pub retry: RetryPolicy,
    /// Connecting, the TLS handshake, and waiting for an answer, each.
    pub timeout: Duration,
}

/// The rate-limit headers of the last answer that had them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub remaining: u64,
    /// Unix seconds when the quota comes back.
    pub reset: u64,
}

pub(crate) use crate::webapi::Origin;

/// A GitHub API client. Cheap to clone; clones share the rate-limit state
/// and the installation token.
#[derive(Debug, Clone)]
pub struct Client {
    origin: Arc<Origin>,
    auth: Auth,
    retry: RetryPolicy,
    timeout: Duration,
    tls: Option<Arc<ClientConfig>>,
    rate: Arc<Mutex<Option<RateLimit>>>,
}

/// One answer: status, headers and the whole (bounded) body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

/// Where the bytes of a download go.
pub trait Sink: Send {
    /// Takes the next piece.
    fn write(
        &mut self,
        data: &[u8],
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

/// Which credentials a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Credential {
    /// The installation token or the fine-grained token.
    Token,
    /// The App's JWT (only for minting installation tokens).
    AppJwt,
}

impl Client {
    /// Checks the settings: an absolute `https://` URL, or `http://` to a
    /// loopback address only (tests); the system roots for https.
    pub fn new(settings: Settings) -> Result<Self, GhError> {
        let origin = parse_origin(&settings.api_url, "api_url")?;
        if settings.timeout.is_zero() {
            return Err(GhError::Config("the request timeout must not be 0".into()));
        }
        Ok(Self {
            tls: Some(Arc::new(client_config()?)).filter(|_| origin.tls),
            origin: Arc::new(origin),
            auth: settings.auth,
            retry: settings.retry,
            timeout: settings.timeout,
            rate: Arc::new(Mutex::new(None)),
        })
    }

    /// The rate-limit headers last seen, if any answer had them.
    pub fn rate_limit(&self) -> Option<RateLimit> {
        *self.rate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The credentials this client uses.
    pub fn auth(&self) -> &Auth {
        &self.auth
    }

    /// `GET path` decoded as `T`.
    pub(crate) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, GhError> {
        let answer = self
            .call(Method::GET, path, None, "application/vnd.github+json")
            .await?;
        decode(&Method::GET, path, &answer.body)
    }

    /// `method path` with a JSON body, the answer decoded as `T`.
    pub(crate) async fn send<B: serde::Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<T, GhError> {
        let json = serde_json::to_vec(body).map_err(|e| GhError::Invalid {
            method: method.clone(),
            path: path.to_owned(),
            reason: format!("cannot encode the request: {e}"),
        })?;
        let answer = self
            .call(
                method.clone(),
                path,
                Some(json),
                "application/vnd.github+json",
            )
            .await?;
        decode(&method, path, &answer.body)
    }

    /// One request with the retries of the module docs, authenticated with
    /// the token. Non-2xx answers become [`GhError::Api`].
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        accept: &str,
    ) -> Result<Answer, GhError> {
        self.call_as(Credential::Token, method, path, body, accept)
            .await
    }

    pub(crate) async fn call_as(
        &self,
        credential: Credential,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        accept: &str,
    ) -> Result<Answer, GhError> {
        let mut retry = 0;
        let mut renewed = false;
        loop {
            self.wait_for_quota().await;
            let authorization = self.authorization(credential).await?;
            let origin = Arc::clone(&self.origin);
            let outcome = self
                .once(
                    &origin,
                    &method,
                    path,
                    body.clone(),
                    accept,
                    authorization.as_deref(),
                )
                .await;
            let (error, wait) = match outcome {
                Ok(answer) if answer.status.is_success() => return Ok(answer),
                Ok(answer) => {
                    let error = self.api_error(&method, path, &answer);
                    if answer.status == StatusCode::UNAUTHORIZED
                        && credential == Credential::Token
                        && self.auth.is_app()
                        && !renewed
                    {
                        // A revoked installation token: mint another once.
                        tracing::warn!(%method, path, "github: 401; renewing the installation token");
                        self.auth.forget_installation_token();
                        renewed = true;
                        continue;
                    }
                    // A 5xx to a POST may come after GitHub acted: not
                    // sent again here (the status queue retries a create
                    // only after looking for it). Rate limits are answered
                    // before anything is done, so they are waited out.
                    let rate_limited = error.retry_after().is_some()
                        || answer.status == StatusCode::TOO_MANY_REQUESTS;
                    if !error.is_transient() || (method != Method::GET && !rate_limited) {
                        return Err(error);
                    }
                    let wait = error
                        .retry_after()
                        .map_or_else(|| self.retry.backoff(retry), |w| self.retry.clamp(w));
                    (error, wait)
                }
                Err(
                    e @ (GhError::Connect { .. } | GhError::Timeout { .. } | GhError::Http { .. }),
                ) if method == Method::GET => (e, self.retry.backoff(retry)),
                Err(e) => return Err(e),
            };
            if retry >= self.retry.max_retries {
                return Err(if retry == 0 {
                    error
                } else {
                    GhError::GaveUp {
                        attempts: retry + 1,
                        last: Box::new(error),
                    }
                });
            }
            tracing::warn!(%method, path, error = %error, ?wait, "github: retrying");
            tokio::time::sleep(wait).await;
            retry += 1;
        }
    }

    /// The `Authorization` header value for `credential`.
    async fn authorization(&self, credential: Credential) -> Result<Option<String>, GhError> {
        match credential {
            Credential::AppJwt => Ok(Some(format!("Bearer {}", self.auth.app_jwt()?))),
            Credential::Token => {
                let token = self.auth.token(self).await?;
                Ok(Some(format!("Bearer {}", token.expose())))
            }
        }
    }

    /// `GET path` with `Accept: application/octet-stream`, its bytes into
    /// `sink`, at most `max` of them. A redirect is followed (see the module
    /// docs); the token goes along only to the API's own origin. Returns
    /// the number of bytes written. Retried like [`Client::call`] until the
    /// first byte reaches the sink.
    pub(crate) async fn download<S: Sink>(
        &self,
        path: &str,
        max: u64,
        sink: &mut S,
    ) -> Result<u64, GhError> {
        let mut retry = 0;
        loop {
            match self.download_once(path, max, sink).await {
                Ok(Ok(n)) => return Ok(n),
                // Bytes already went to the sink: not retried here.
                Ok(Err(e)) => return Err(e),
                Err(e) if e.is_transient() && retry < self.retry.max_retries => {
                    let wait = e
                        .retry_after()
                        .map_or_else(|| self.retry.backoff(retry), |w| self.retry.clamp(w));
                    tracing::warn!(path, error = %e, ?wait, "github: retrying the download");
                    tokio::time::sleep(wait).await;
                    retry += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// One download: `Err` when nothing was written yet (retryable),
    /// `Ok(Err)` when it failed after writing.
    async fn download_once<S: Sink>(
        &self,
        path: &str,
        max: u64,
        sink: &mut S,
    ) -> Result<Result<u64, GhError>, GhError> {
        self.wait_for_quota().await;
        let mut origin = Arc::clone(&self.origin);
        let mut here = path.to_owned();
        let mut authorization = self.authorization(Credential::Token).await?;
        for _ in 0..=MAX_REDIRECTS {
            let (status, headers, body) = self
                .exchange(
                    &origin,
                    &Method::GET,
                    &here,
                    None,
                    "application/octet-stream",
                    authorization.as_deref(),
                )
                .await?;
            if status.is_redirection() {
                let location = headers
                    .get(http::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| GhError::Invalid {
                        method: Method::GET,
                        path: here.clone(),
                        reason: format!("HTTP {status} without a Location"),
                    })?
                    .to_owned();
                let (next, next_path) =
                    redirect_target(&origin, &location).map_err(|reason| GhError::Invalid {
                        method: Method::GET,
                        path: here.clone(),
                        reason,
                    })?;
                if !next.same_origin(&self.origin) {
                    // The token never leaves the API's origin: the CDN's
                    // URL carries its own short-lived signature.
                    authorization = None;
                }
                tracing::debug!(from = %here, to = %next.authority, "github: following a redirect");
                origin = Arc::new(next);
                here = next_path;
                continue;
            }
            if !status.is_success() {
                let body = self.collect(&Method::GET, &here, body, MAX_BODY).await?;
                return Err(self.api_error(
                    &Method::GET,
                    &here,
                    &Answer {
                        status,
                        headers,
                        body,
                    },
                ));
            }
            if let Some(len) = header_u64(&headers, "content-length") {
                if len > max {
                    return Err(GhError::Invalid {
                        method: Method::GET,
                        path: here,
                        reason: format!(
                            "content-length {len} is more than the {max} bytes expected"
                        ),
                    });
                }
            }
            // From here bytes reach the sink: errors are not retried.
            let mut body = body;
            let mut written = 0_u64;
            let failed = |reason: String| {
                Ok(Err(GhError::Invalid {
                    method: Method::GET,
                    path: here.clone(),
                    reason,
                }))
            };
            loop {
                let frame = match tokio::time::timeout(self.timeout, body.frame()).await {
                    Err(_) => return failed(format!("no data for {:?}", self.timeout)),
                    Ok(None) => break,
                    Ok(Some(Err(e))) => return failed(format!("reading the body: {e}")),
                    Ok(Some(Ok(frame))) => frame,
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                written += data.len() as u64;
                if written > max {
                    return failed(format!("more than the {max} bytes expected"));
                }
                if let Err(reason) = sink.write(&data).await {
                    return failed(reason);
                }
            }
            return Ok(Ok(written));
        }
        Err(GhError::Invalid {
            method: Method::GET,
            path: path.to_owned(),
            reason: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    /// `GET url` of any https origin (loopback http in tests) without
    /// credentials, at most `max` bytes: a checksums file named by a URL
    /// template.
    pub(crate) async fn fetch_public(&self, url: &str, max: usize) -> Result<Bytes, GhError> {
        let origin = parse_origin(url, "url")?;
        let uri: Uri = url
            .parse()
            .map_err(|e| GhError::Config(format!("url {url:?}: {e}")))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let origin = Origin {
            prefix: String::new(),
            ..origin
        };
        let mut retry = 0;
        loop {
            let answer = self
                .once(&origin, &Method::GET, &path, None, "*/*", None)
                .await;
            let error = match answer {
                Ok(a) if a.status.is_success() => {
                    if a.body.len() > max {
                        return Err(GhError::Invalid {
                            method: Method::GET,
                            path: url.to_owned(),
                            reason: format!("{} bytes, more than {max}", a.body.len()),
                        });
                    }
                    return Ok(a.body);
                }
                Ok(a) => self.api_error(&Method::GET, url, &a),
                Err(e) => e,
            };
            if !error.is_transient() || retry >= self.retry.max_retries {
                return Err(error);
            }
            tokio::time::sleep(self.retry.backoff(retry)).await;
            retry += 1;
        }
    }

    /// Waits for `x-ratelimit-reset` when the last answer said no requests
    /// remain (bounded by the policy's longest wait).
    async fn wait_for_quota(&self) {
        let Some(rate) = self.rate_limit() else {
            return;
        };
        let now = now_unix();
        if rate.remaining == 0 && rate.reset > now {
            let wait = self.retry.clamp(Duration::from_secs(rate.reset - now));
            tracing::warn!(?wait, "github: rate limit used up; waiting for its reset");
            tokio::time::sleep(wait).await;
            *self.rate.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    /// One exchange over a fresh connection to `origin`, the body read
    /// whole (at most [`MAX_BODY`]).
    async fn once(
        &self,
        origin: &Origin,
        method: &Method,
        path: &str,
        body: Option<Vec<u8>>,
        accept: &str,
        authorization: Option<&str>,
    ) -> Result<Answer, GhError> {
        let (status, headers, body) = self
            .exchange(origin, method, path, body, accept, authorization)
            .await?;
        let body = self.collect(method, path, body, MAX_BODY).await?;
        Ok(Answer {
            status,
            headers,
            body,
        })
    }

    async fn collect(
        &self,
        method: &Method,
        path: &str,
        body: hyper::body::Incoming,
        limit: usize,
    ) -> Result<Bytes, GhError> {
        Ok(
            tokio::time::timeout(self.timeout, Limited::new(body, limit).collect())
                .await
                .map_err(|_| GhError::Timeout {
                    method: method.clone(),
                    path: path.to_owned(),
                    during: "reading the answer",
                    after: self.timeout,
                })?
                .map_err(|e| GhError::Invalid {
                    method: method.clone(),
                    path: path.to_owned(),
                    reason: format!("body not read (over {limit} bytes?): {e}"),
                })?
                .to_bytes(),
        )
    }

    /// Sends one request over a fresh connection to `origin`; the answer's
    /// body is left to the caller.
    async fn exchange(
        &self,
        origin: &Origin,
        method: &Method,
        path: &str,
        body: Option<Vec<u8>>,
        accept: &str,
        authorization: Option<&str>,
    ) -> Result<(StatusCode, HeaderMap, hyper::body::Incoming), GhError> {
        let timeout = |during| GhError::Timeout {
            method: method.clone(),
            path: path.to_owned(),
            during,
            after: self.timeout,
        };
        let http_err = |e: hyper::Error| GhError::Http {
            method: method.clone(),
            path: path.to_owned(),
            reason: e.to_string(),
        };
        let connect_err = |source| GhError::Connect {
            method: method.clone(),
            path: path.to_owned(),
            authority: origin.authority.clone(),
            source,
        };
        let tcp = tokio::time::timeout(
            self.timeout,
            TcpStream::connect((origin.host.as_str(), origin.port)),
        )
        .await
        .map_err(|_| timeout("connecting"))?
        .map_err(connect_err)?;
        let _ = tcp.set_nodelay(true);
        let mut sender = if origin.tls {
            let tls = match &self.tls {
                Some(tls) => Arc::clone(tls),
                None => Arc::new(client_config()?),
            };
            let name = ServerName::try_from(origin.host.clone())
                .map_err(|e| GhError::Config(format!("host {:?}: {e}", origin.host)))?;
            let stream =
                tokio::time::timeout(self.timeout, TlsConnector::from(tls).connect(name, tcp))
                    .await
                    .map_err(|_| timeout("in the TLS handshake"))?
                    .map_err(connect_err)?;
            handshake(TokioIo::new(stream)).await.map_err(http_err)?
        } else {
            handshake(TokioIo::new(tcp)).await.map_err(http_err)?
        };
        let mut request = hyper::Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", origin.prefix))
            .header(http::header::HOST, origin.authority.as_str())
            .header(http::header::USER_AGENT, USER_AGENT)
            .header(http::header::ACCEPT, accept)
            .header("x-github-api-version", API_VERSION);
        if let Some(value) = authorization {
            request = request.header(http::header::AUTHORIZATION, value);
        }
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| GhError::Invalid {
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
        if origin.same_origin(&self.origin) {
            self.note_rate_limit(&headers);
        }
        Ok((status, headers, response.into_body()))
    }

    fn note_rate_limit(&self, headers: &HeaderMap) {
        let (Some(remaining), Some(reset)) = (
            header_u64(headers, "x-ratelimit-remaining"),
            header_u64(headers, "x-ratelimit-reset"),
        ) else {
            return;
        };
        *self.rate.lock().unwrap_or_else(|p| p.into_inner()) = Some(RateLimit { remaining, reset });
    }

    /// The error of a non-2xx answer: GitHub's message, its request id, and
    /// how long it asked to wait (retry-after, or the reset of a used-up
    /// quota).
    fn api_error(&self, method: &Method, path: &str, answer: &Answer) -> GhError {
        #[derive(Deserialize)]
        struct ErrorBody {
            message: Option<String>,
        }
        let message = serde_json::from_slice::<ErrorBody>(&answer.body)
            .ok()
            .and_then(|b| b.message)
            .unwrap_or_else(|| format!("no GitHub error message ({} bytes)", answer.body.len()));
        let retry_after = header_u64(&answer.headers, "retry-after")
            .map(Duration::from_secs)
            .or_else(|| {
                (header_u64(&answer.headers, "x-ratelimit-remaining") == Some(0)).then(|| {
                    let reset = header_u64(&answer.headers, "x-ratelimit-reset").unwrap_or(0);
                    Duration::from_secs(reset.saturating_sub(now_unix()))
                })
            })
            .filter(|_| {
                answer.status == StatusCode::TOO_MANY_REQUESTS
                    || answer.status == StatusCode::FORBIDDEN
                    || answer.status.is_server_error()
            });
        GhError::Api {
            method: method.clone(),
            path: path.to_owned(),
            status: answer.status,
            message: cut(&message),
            request_id: answer
                .headers
                .get("x-github-request-id")
                .and_then(|v| v.to_str().ok())
                .map(cut),
            retry_after,
        }
    }
}

/// A string without control characters, at most [`MAX_ERROR_FIELD`] bytes.
fn cut(s: &str) -> String {
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
            tracing::debug!(error = %e, "github connection ended");
        }
    });
    Ok(sender)
}

/// Where a `Location` leads: an absolute URL (https, or loopback http), or
/// a path on the same origin.
fn redirect_target(from: &Origin, location: &str) -> Result<(Origin, String), String> {
    if location.starts_with('/') && !location.starts_with("//") {
        return Ok((
            Origin {
                prefix: String::new(),
                ..from.clone()
            },
            location.to_owned(),
        ));
    }
    let origin = parse_origin(location, "Location").map_err(|e| e.to_string())?;
    let uri: Uri = location
        .parse()
        .map_err(|e| format!("Location {location:?}: {e}"))?;
    if from.tls && !origin.tls {
        return Err(format!(
            "redirect from https to plain http ({location:?}) refused"
        ));
    }
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    Ok((
        Origin {
            prefix: String::new(),
            ..origin
        },
        path,
    ))
}

/// Checks an API URL as [`Client::new`] would (https, or http to loopback).
pub(crate) fn check_api_url(url: &str) -> Result<(), GhError> {
    parse_origin(url, "api_url").map(drop)
}

pub(crate) fn parse_origin(url: &str, what: &str) -> Result<Origin, GhError> {
    crate::webapi::parse_origin(url, what).map_err(GhError::Config)
}

/// System roots, ring, HTTP/1.1 only.
fn client_config() -> Result<ClientConfig, GhError> {
    crate::webapi::client_config("GitHub's").map_err(GhError::Config)
}

pub(crate) fn decode<T: DeserializeOwned>(
    method: &Method,
    path: &str,
    body: &[u8],
) -> Result<T, GhError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| GhError::Invalid {
        method: method.clone(),
        path: path.to_owned(),
        reason: format!("at {}: {}", e.path(), e.inner()),
    })
}

use crate::webapi::header_u64;
pub(crate) use crate::webapi::now_unix;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug() {
        let s = Secret::new("ghp_verysecret", "the token").unwrap();
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        assert!(Secret::new(" ", "the token")
            .unwrap_err()
            .to_string()
            .contains("the token is empty"));
    }

    #[test]
    fn redirects_to_other_hosts_and_downgrades() {
        let api = parse_origin("https://api.github.com", "api_url").unwrap();
        let (o, p) = redirect_target(
            &api,
            "https://objects.githubusercontent.com/x/y?sig=abc&X-Amz=1",
        )
        .unwrap();
        assert!(!o.same_origin(&api));
        assert_eq!(p, "/x/y?sig=abc&X-Amz=1");
        let (o, p) = redirect_target(&api, "/repos/a/b/releases/assets/1").unwrap();
        assert!(o.same_origin(&api));
        assert_eq!(p, "/repos/a/b/releases/assets/1");
        assert!(redirect_target(&api, "http://127.0.0.1:1/x")
            .unwrap_err()
            .contains("plain http"));
        assert!(redirect_target(&api, "http://example.com/x").is_err());
        let local = parse_origin("http://127.0.0.1:80", "api_url").unwrap();
        let other = parse_origin("http://127.0.0.1:81", "api_url").unwrap();
        assert!(!local.same_origin(&other));
    }

    #[test]
    fn only_transient_errors_are_retried() {
        let api = |status: u16, retry_after: Option<Duration>| GhError::Api {
            method: Method::POST,
            path: "/x".into(),
            status: StatusCode::from_u16(status).unwrap(),
            message: "m".into(),
            request_id: Some("ABCD:1234".into()),
            retry_after,
        };
        assert!(api(500, None).is_transient());
        assert!(api(429, None).is_transient());
        assert!(api(403, Some(Duration::from_secs(3))).is_transient());
        assert!(!api(403, None).is_transient());
        assert!(!api(422, None).is_transient());
        let shown = api(422, None).to_string();
        assert!(
            shown.contains("HTTP 422") && shown.contains("ABCD:1234"),
            "{shown}"
        );
    }
}
