//! Artifacts the agent downloads itself from an HTTPS URL + sha256.
//!
//! The download lands in the app's artifact cache (`.slipway/cache/`,
//! [`super::cache`]), the same content-addressed cache every deploy copies
//! its artifact into, under its sha256. A digest already cached (and still intact) is therefore never
//! downloaded again, and the deploy that follows finds the artifact where it
//! looks first. The download runs without the app's lock (a node-local
//! rollback meanwhile must work); the caller pins the cache instead
//! ([`crate::release::Store::pin_cache`]) until its deploy holds the lock,
//! so a concurrent prune removes neither the temp file nor the result, and
//! the deploy verifies the cached file's digest again under the lock.
//!
//! What is refused, each with an error naming the URL: any scheme but
//! `https`, a server certificate that does not verify against the system
//! roots plus the optional `[artifacts] ca_file`, a redirect to anything but
//! `https` or more than [`MAX_REDIRECTS`] of them, a non-2xx status, a body
//! over `[artifacts] max_size` (by `Content-Length` or as streamed), and a
//! body whose sha256 is not the expected one. The body is streamed into the
//! cache through its one writer ([`super::cache::Incoming`]) while hashed,
//! never held in memory: it takes the name `<sha256>` only when the digest
//! matches and is removed otherwise (also when the download is cancelled).
//!
//! Connection errors, timeouts and 5xx statuses are retried
//! ([`ATTEMPTS`] in all, with a growing pause); 4xx, TLS verification
//! failures, size and digest errors are not: trying again cannot fix them.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::cache::{self, CacheError, Fetched, Incoming};
use crate::config::{ArtifactsConfig, CaFile};
use crate::digest::{self, Sha256};

/// Redirects followed before giving up (each must stay on https).
pub const MAX_REDIRECTS: usize = 5;
/// Attempts in all for an error worth retrying (connection, timeout, 5xx).
pub const ATTEMPTS: u32 = 3;
/// Pause before the second attempt; doubled before each later one.
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(500);
/// How often a running download reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(3);
/// Sent as `User-Agent`, so a server's logs say who downloaded.
const USER_AGENT: &str = concat!("slipway-agent/", env!("CARGO_PKG_VERSION"));

/// Why an artifact could not be downloaded.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("refusing artifact URL {url}: only https:// URLs are accepted")]
    NotHttps { url: String },
    #[error("artifact URL {url} is not usable: {reason}")]
    BadUrl { url: String, reason: String },
    #[error(transparent)]
    BadSha256(#[from] digest::BadSha256),
    #[error("cannot read the artifacts CA file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
    #[error("cannot set up TLS for {url}: {reason}")]
    TlsSetup { url: String, reason: String },
    #[error("no trusted roots to verify {url} against: the system has none and no [artifacts] ca_file is set")]
    NoRoots { url: String },
    #[error("cannot connect to {authority} for {url}: {source}")]
    Connect {
        url: String,
        authority: String,
        source: io::Error,
    },
    #[error("TLS handshake with {authority} failed for {url}: {source}")]
    Tls {
        url: String,
        authority: String,
        source: io::Error,
    },
    #[error("timed out after {after:?} {during} for {url}")]
    Timeout {
        url: String,
        during: &'static str,
        after: Duration,
    },
    #[error("HTTP exchange with {url} failed: {source}")]
    Http { url: String, source: hyper::Error },
    #[error("{url} answered HTTP {status}")]
    Status { url: String, status: StatusCode },
    #[error("{url} redirected with HTTP {status} but without a usable Location ({location:?})")]
    BadRedirect {
        url: String,
        status: StatusCode,
        location: String,
    },
    #[error("refusing the redirect from {from} to {to}: only https:// is followed")]
    InsecureRedirect { from: String, to: String },
    #[error("more than {MAX_REDIRECTS} redirects, starting at {url}")]
    TooManyRedirects { url: String },
    #[error("artifact at {url} is larger than the limit of {limit} bytes ({what})")]
    TooLarge {
        url: String,
        limit: u64,
        what: String,
    },
    #[error("artifact from {url} has sha256 {actual}, expected {expected}")]
    Digest {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("giving up after {attempts} attempts: {last}")]
    GaveUp {
        attempts: u32,
        last: Box<DownloadError>,
    },
}

impl DownloadError {
    /// True for failures another attempt may not hit: connection trouble,
    /// timeouts and server errors.
    fn retryable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Timeout { .. } | Self::Http { .. } => true,
            Self::Status { status, .. } => status.is_server_error(),
            _ => false,
        }
    }

    /// True when the request itself was wrong (bad URL or digest), not the
    /// server or the network: the CLI exits with its usage code for these.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::NotHttps { .. } | Self::BadUrl { .. } | Self::BadSha256(_)
        )
    }

    /// What went wrong writing the body from `url` into the cache.
    fn cache(url: &str, e: CacheError) -> Self {
        match e {
            CacheError::TooLarge { limit } => Self::TooLarge {
                url: url.to_owned(),
                limit,
                what: format!("more than {limit} bytes were sent"),
            },
            CacheError::Digest { expected, actual } => Self::Digest {
                url: url.to_owned(),
                expected: expected.into_string(),
                actual: actual.into_string(),
            },
            CacheError::Io {
                action,
                path,
                source,
            } => Self::Io {
                action,
                path,
                source,
            },
        }
    }
}

/// Checks that `url` is an absolute https URL this client can fetch.
pub fn parse_url(url: &str) -> Result<Uri, DownloadError> {
    let bad = |reason: &str| DownloadError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    };
    if !url.contains("://") {
        return Err(bad("not an absolute URL (https://host/path)"));
    }
    let uri: Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("https") => {}
        Some(_) => {
            return Err(DownloadError::NotHttps {
                url: url.to_owned(),
            })
        }
        None => return Err(bad("not an absolute URL (https://host/path)")),
    }
    let Some(authority) = uri.authority() else {
        return Err(bad("no host"));
    };
    if authority.as_str().contains('@') {
        return Err(bad("credentials in the URL are not supported"));
    }
    if authority.host().is_empty() {
        return Err(bad("no host"));
    }
    Ok(uri)
}

/// Makes sure `<cache_dir>/<sha256>` holds the artifact at `url`: reuses an
/// intact cached copy, else downloads it (see the module docs for what is
/// checked and retried). `progress` gets a line now and then for the
/// operator (bytes so far, percent when the size is known).
pub async fn fetch(
    url: &str,
    expected: &Sha256,
    cache_dir: &Path,
    settings: &ArtifactsConfig,
    progress: &mut (dyn FnMut(String) + Send),
) -> Result<Fetched, DownloadError> {
    let uri = parse_url(url)?;
    // Hashing a cached file of up to `max_size` is blocking work.
    let hit = {
        let (dir, digest) = (cache_dir.to_owned(), expected.clone());
        tokio::task::spawn_blocking(move || cache::lookup(&dir, &digest))
            .await
            .map_err(|e| DownloadError::Io {
                action: "check the cache in",
                path: cache_dir.to_owned(),
                source: io::Error::other(e),
            })?
            .map_err(|e| DownloadError::cache(url, e))?
    };
    if let Some(hit) = hit {
        progress(format!(
            "artifact {expected} is already cached; not downloading {url}"
        ));
        return Ok(hit);
    }
    let tls = Arc::new(client_config(url, settings.ca_file.as_ref())?);
    let mut pause = FIRST_RETRY_PAUSE;
    let mut attempt = 1;
    loop {
        match attempt_once(&uri, url, expected, cache_dir, settings, &tls, progress).await {
            Ok(fetched) => return Ok(fetched),
            Err(e) if e.retryable() && attempt < ATTEMPTS => {
                progress(format!(
                    "attempt {attempt} of {ATTEMPTS} failed ({e}); retrying in {pause:?}"
                ));
                tokio::time::sleep(pause).await;
                pause *= 2;
                attempt += 1;
            }
            Err(e) if e.retryable() => {
                return Err(DownloadError::GaveUp {
                    attempts: attempt,
                    last: Box::new(e),
                })
            }
            Err(e) => return Err(e),
        }
    }
}

/// The client TLS config: system roots plus the configured extra CA, ring.
fn client_config(url: &str, ca_file: Option<&CaFile>) -> Result<ClientConfig, DownloadError> {
    let mut roots = RootCertStore::empty();
    // Unreadable system certificates are skipped, as every TLS client does;
    // an empty result is caught below.
    let system = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(system.certs);
    if let Some(ca) = ca_file {
        for cert in &ca.certs {
            roots.add(cert.clone()).map_err(|e| DownloadError::CaFile {
                path: ca.path.clone(),
                reason: e.to_string(),
            })?;
        }
    }
    if roots.is_empty() {
        return Err(DownloadError::NoRoots {
            url: url.to_owned(),
        });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| DownloadError::TlsSetup {
            url: url.to_owned(),
            reason: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// One attempt: follows redirects, streams the body into a temp file in the
/// cache, checks size and digest, names it `<cache_dir>/<sha256>`.
async fn attempt_once(
    start: &Uri,
    url: &str,
    expected: &Sha256,
    cache_dir: &Path,
    settings: &ArtifactsConfig,
    tls: &Arc<ClientConfig>,
    progress: &mut (dyn FnMut(String) + Send),
) -> Result<Fetched, DownloadError> {
    let mut uri = start.clone();
    let mut redirects = 0;
    let response = loop {
        let here = uri.to_string();
        let response = get(&uri, &here, settings, tls).await?;
        let status = response.status();
        if status.is_redirection() && status != StatusCode::NOT_MODIFIED {
            let location = response
                .headers()
                .get(http::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            let next = resolve(&uri, &location).ok_or_else(|| DownloadError::BadRedirect {
                url: here.clone(),
                status,
                location: location.clone(),
            })?;
            if next.scheme_str() != Some("https") {
                return Err(DownloadError::InsecureRedirect {
                    from: here,
                    to: location,
                });
            }
            redirects += 1;
            if redirects > MAX_REDIRECTS {
                return Err(DownloadError::TooManyRedirects {
                    url: url.to_owned(),
                });
            }
            progress(format!("{here} redirects to {next}"));
            uri = next;
            continue;
        }
        if !status.is_success() {
            return Err(DownloadError::Status { url: here, status });
        }
        break response;
    };
    let here = uri.to_string();
    let limit = settings.max_size;
    let total = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = total {
        if n > limit {
            return Err(DownloadError::TooLarge {
                url: here,
                limit,
                what: format!("Content-Length is {n}"),
            });
        }
    }
    let mut incoming = Incoming::create_async(cache_dir, Some(expected), limit)
        .await
        .map_err(|e| DownloadError::cache(&here, e))?;
    let mut body = response.into_body();
    let mut last_report = Instant::now();
    loop {
        let frame = tokio::time::timeout(settings.read_timeout, body.frame())
            .await
            .map_err(|_| DownloadError::Timeout {
                url: here.clone(),
                during: "waiting for the body",
                after: settings.read_timeout,
            })?;
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|source| DownloadError::Http {
            url: here.clone(),
            source,
        })?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        incoming
            .write(&data)
            .await
            .map_err(|e| DownloadError::cache(&here, e))?;
        let received = incoming.received();
        if last_report.elapsed() >= PROGRESS_EVERY {
            last_report = Instant::now();
            progress(match total {
                Some(t) if t > 0 => format!(
                    "downloaded {received} of {t} bytes ({}%)",
                    received * 100 / t
                ),
                _ => format!("downloaded {received} bytes"),
            });
        }
    }
    let fetched = incoming
        .finish()
        .await
        .map_err(|e| DownloadError::cache(&here, e))?;
    progress(format!(
        "downloaded {} bytes from {here}; sha256 verified",
        fetched.bytes
    ));
    Ok(fetched)
}

/// One GET over a fresh connection (an artifact is one big request; no pool
/// needed). Returns the response with its body still to be read.
async fn get(
    uri: &Uri,
    url: &str,
    settings: &ArtifactsConfig,
    tls: &Arc<ClientConfig>,
) -> Result<hyper::Response<hyper::body::Incoming>, DownloadError> {
    let authority = uri
        .authority()
        .ok_or_else(|| DownloadError::BadUrl {
            url: url.to_owned(),
            reason: "no host".into(),
        })?
        .clone();
    // `host()` keeps an IPv6 literal's brackets; the socket and the
    // certificate check want the bare address.
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = authority.port_u16().unwrap_or(443);
    let timeout = |during| DownloadError::Timeout {
        url: url.to_owned(),
        during,
        after: settings.connect_timeout,
    };
    let tcp = tokio::time::timeout(
        settings.connect_timeout,
        TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| timeout("connecting"))?
    .map_err(|source| DownloadError::Connect {
        url: url.to_owned(),
        authority: authority.to_string(),
        source,
    })?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from(host.clone()).map_err(|e| DownloadError::BadUrl {
        url: url.to_owned(),
        reason: format!("host {host:?}: {e}"),
    })?;
    let stream = tokio::time::timeout(
        settings.connect_timeout,
        TlsConnector::from(Arc::clone(tls)).connect(name, tcp),
    )
    .await
    .map_err(|_| timeout("in the TLS handshake"))?
    .map_err(|source| DownloadError::Tls {
        url: url.to_owned(),
        authority: authority.to_string(),
        source,
    })?;
    let http_err = |source| DownloadError::Http {
        url: url.to_owned(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http_err)?;
    // The connection task ends when the response body is read or dropped.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "artifact download connection ended");
        }
    });
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = hyper::Request::get(path)
        .header(http::header::HOST, authority.as_str())
        .header(http::header::USER_AGENT, USER_AGENT)
        .header(http::header::ACCEPT_ENCODING, "identity")
        .body(Empty::<Bytes>::new())
        .map_err(|e| DownloadError::BadUrl {
            url: url.to_owned(),
            reason: e.to_string(),
        })?;
    tokio::time::timeout(settings.read_timeout, sender.send_request(request))
        .await
        .map_err(|_| DownloadError::Timeout {
            url: url.to_owned(),
            during: "waiting for the response",
            after: settings.read_timeout,
        })?
        .map_err(http_err)
}

/// Resolves a `Location` against the URL that answered with it (absolute,
/// scheme-relative, absolute-path and relative-path references).
fn resolve(base: &Uri, location: &str) -> Option<Uri> {
    let location = location.trim();
    if location.is_empty() {
        return None;
    }
    if location.contains("://") {
        return location.parse().ok();
    }
    let scheme = base.scheme_str()?;
    if let Some(rest) = location.strip_prefix("//") {
        return format!("{scheme}://{rest}").parse().ok();
    }
    let authority = base.authority()?;
    if location.starts_with('/') {
        return format!("{scheme}://{authority}{location}").parse().ok();
    }
    let dir = base.path().rsplit_once('/').map_or("", |(dir, _)| dir);
    format!("{scheme}://{authority}{dir}/{location}")
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_absolute_https_urls_are_accepted() {
        assert!(parse_url("https://example.com/a.tar.gz").is_ok());
        assert!(parse_url("https://[::1]:8443/a").is_ok());
        for (url, want) in [
            ("http://example.com/a.tar.gz", "only https://"),
            ("ftp://example.com/a", "only https://"),
            ("example.com/a", "not an absolute URL"),
            ("https://user:pw@example.com/a", "credentials"),
            ("https://exa mple.com/a", "not usable"),
        ] {
            let e = parse_url(url).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains(url), "{url}: {e}");
        }
    }

    #[test]
    fn redirect_locations_resolve_against_the_current_url() {
        let base: Uri = "https://a.example:8443/dir/file.tar.gz?x=1"
            .parse()
            .unwrap();
        let r = |l: &str| resolve(&base, l).map(|u| u.to_string());
        assert_eq!(r("https://b.example/x").unwrap(), "https://b.example/x");
        assert_eq!(r("http://b.example/x").unwrap(), "http://b.example/x");
        assert_eq!(r("//c.example/y").unwrap(), "https://c.example/y");
        assert_eq!(r("/z?q=2").unwrap(), "https://a.example:8443/z?q=2");
        assert_eq!(
            r("other.tar.gz").unwrap(),
            "https://a.example:8443/dir/other.tar.gz"
        );
        assert_eq!(r(""), None);
    }
}
