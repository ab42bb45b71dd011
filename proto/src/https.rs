//! One bounded HTTPS GET, for the two small fetches of GitHub Actions OIDC:
//! the `slipway` CLI asking the Actions runtime for a token, and the
//! controller reading the token issuer's keys (JWKS). HTTP/1.1 over
//! tokio-rustls (ring), a fresh connection per call, a deadline on the whole
//! exchange and a limit on the body; https only, so a token or a key set
//! never travels in the clear.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::crypto;

/// Why a GET failed. The messages carry the URL without its query (the
/// Actions runtime puts nothing secret there, but a URL in a log line
/// stays short).
#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    /// The URL is not `https://HOST[:PORT]/…`.
    #[error("invalid URL {url:?}: {why}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong.
        why: String,
    },
    /// No trusted root to verify the server with.
    #[error("no trusted CA certificates to verify {0}")]
    NoRoots(String),
    /// TCP, TLS or HTTP failed.
    #[error("GET {url}: {why}")]
    Exchange {
        /// The URL without its query.
        url: String,
        /// Why.
        why: String,
    },
    /// The whole exchange took longer than the deadline.
    #[error("GET {url}: no complete answer within {after:?}")]
    Timeout {
        /// The URL without its query.
        url: String,
        /// The deadline.
        after: Duration,
    },
    /// The body is longer than the caller's limit.
    #[error("GET {url}: the answer is longer than {limit} bytes")]
    TooLarge {
        /// The URL without its query.
        url: String,
        /// The limit.
        limit: usize,
    },
}

/// A status and a body read in full (within the limit).
#[derive(Debug)]
pub struct Answer {
    /// The HTTP status.
    pub status: http::StatusCode,
    /// The body.
    pub body: Bytes,
}

/// The system's trusted roots (`SSL_CERT_FILE` / `SSL_CERT_DIR` when set,
/// as rustls-native-certs reads them).
pub fn system_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    roots
}

/// `url` without its query, for messages.
fn shown(url: &str) -> String {
    url.split('?').next().unwrap_or(url).to_owned()
}

/// GETs `url` (https only) trusting `roots`, with `headers` added, and reads
/// the body up to `max_body` bytes; the whole exchange must end within
/// `deadline`. Any status is returned: the caller judges it.
pub async fn get(
    url: &str,
    headers: &[(http::HeaderName, String)],
    roots: RootCertStore,
    max_body: usize,
    deadline: Duration,
) -> Result<Answer, HttpsError> {
    match tokio::time::timeout(deadline, exchange(url, headers, roots, max_body)).await {
        Ok(answer) => answer,
        Err(_) => Err(HttpsError::Timeout {
            url: shown(url),
            after: deadline,
        }),
    }
}

async fn exchange(
    url: &str,
    headers: &[(http::HeaderName, String)],
    roots: RootCertStore,
    max_body: usize,
) -> Result<Answer, HttpsError> {
    let bad = |why: &str| HttpsError::Url {
        url: shown(url),
        why: why.to_owned(),
    };
    let uri: http::Uri = url.parse().map_err(|e| bad(&format!("not a URL: {e}")))?;
    if uri.scheme_str() != Some("https") {
        return Err(bad("must start with https://"));
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?.clone();
    if authority.as_str().contains('@') {
        return Err(bad("credentials in the URL are not supported"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = authority.port_u16().unwrap_or(443);
    if roots.is_empty() {
        return Err(HttpsError::NoRoots(shown(url)));
    }
    let failed = |why: String| HttpsError::Exchange {
        url: shown(url),
        why,
    };
    let mut config = ClientConfig::builder_with_provider(crypto::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| failed(format!("TLS setup: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = ServerName::try_from(host.clone()).map_err(|e| bad(&format!("host: {e}")))?;
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| failed(format!("cannot connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| failed(format!("TLS: {e}")))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| failed(e.to_string()))?;
    // The connection task ends with the exchange (or with `get`'s deadline,
    // when the sender is dropped).
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let mut request = hyper::Request::get(path)
        .header(http::header::HOST, authority.as_str())
        .header(
            http::header::USER_AGENT,
            concat!("slipway/", env!("CARGO_PKG_VERSION")),
        );
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| failed(format!("cannot build the request: {e}")))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), max_body)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                HttpsError::TooLarge {
                    url: shown(url),
                    limit: max_body,
                }
            } else {
                failed(format!("reading the answer: {e}"))
            }
        })?
        .to_bytes();
    Ok(Answer { status, body })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_https_urls() {
        for (url, want) in [
            ("http://127.0.0.1:1/x", "https://"),
            ("ftp://h/x", "https://"),
            ("https://user:pw@h/x", "credentials"),
            ("not a url", "not a URL"),
        ] {
            let err = get(url, &[], system_roots(), 10, Duration::from_secs(1))
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{url}: {err}");
        }
    }
}
