//! What the controller's clients of outside HTTP APIs (GitHub,
//! DigitalOcean) share: the API origin checked once, the TLS setup, the
//! retry policy and the headers they read. Each client keeps its own error
//! type, auth and paging; the strings here become its configuration errors.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, Uri};
use rustls::{ClientConfig, RootCertStore};

/// How 429 and 5xx answers (and lost connections) are retried inside one
/// call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// The first backoff, and the shortest wait.
    pub min_wait: Duration,
    /// The longest wait, whatever `retry-after` or the rate-limit reset say.
    pub max_wait: Duration,
}

impl RetryPolicy {
    /// `max_retries` retries, waiting 1 to 30 s.
    pub const fn with_retries(max_retries: u32) -> Self {
        Self {
            max_retries,
            min_wait: Duration::from_secs(1),
            max_wait: Duration::from_secs(30),
        }
    }

    /// The exponential backoff before retry `n` (0-based), with up to 25 %
    /// jitter so that many controllers do not retry in step.
    pub fn backoff(&self, n: u32) -> Duration {
        let base = self
            .min_wait
            .saturating_mul(1u32.checked_shl(n.min(16)).unwrap_or(u32::MAX));
        let jitter = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
            % 250;
        self.clamp(base + base.mul_f64(f64::from(jitter) / 1000.0))
    }

    /// `wait` within the policy's bounds.
    pub fn clamp(&self, wait: Duration) -> Duration {
        wait.clamp(self.min_wait, self.max_wait.max(self.min_wait))
    }
}

/// An origin (scheme, host, port) and a path prefix, split once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// https (else plain http, to loopback only).
    pub tls: bool,
    /// `host:port` as written.
    pub authority: String,
    /// The host, without IPv6 brackets.
    pub host: String,
    /// The port (443 or 80 when not written).
    pub port: u16,
    /// A path prefix the API lives under (empty for the real APIs).
    pub prefix: String,
}

impl Origin {
    /// Same scheme, host and port (where a credential may be sent).
    pub fn same_origin(&self, other: &Origin) -> bool {
        self.tls == other.tls
            && self.host.eq_ignore_ascii_case(&other.host)
            && self.port == other.port
    }
}

/// Splits `url` (named `what` in errors): https, or plain http to a
/// loopback address only (tests); no credentials in it.
pub fn parse_origin(url: &str, what: &str) -> Result<Origin, String> {
    let bad = |why: &str| format!("{what} {url:?}: {why}");
    let uri: Uri = url.parse().map_err(|e| bad(&format!("not a URL: {e}")))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad("must start with https://")),
    };
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad("credentials in the URL are not supported"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.is_empty() {
        return Err(bad("no host"));
    }
    if !tls {
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return Err(bad(
                "plain http:// is allowed only to a loopback address (tests); use https://",
            ));
        }
    }
    Ok(Origin {
        tls,
        authority: authority.as_str().to_owned(),
        port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
        host,
        prefix: uri.path().trim_end_matches('/').to_owned(),
    })
}

/// TLS to an outside API: the system's roots, ring, HTTP/1.1 only. `whose`
/// names the certificate in the error when the system has no roots.
pub fn client_config(whose: &str) -> Result<ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
    if roots.is_empty() {
        return Err(format!(
            "no trusted roots on this system to verify {whose} certificate"
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// A header holding a whole number.
pub fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.trim().parse().ok()
}

/// Seconds since the epoch (rate-limit resets are given that way).
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_https_or_loopback_http_without_credentials() {
        let o = parse_origin("https://api.example.com/v3/", "api_url").unwrap();
        assert_eq!(
            (o.tls, o.host.as_str(), o.port, o.prefix.as_str()),
            (true, "api.example.com", 443, "/v3")
        );
        let o = parse_origin("http://[::1]:8080", "api_url").unwrap();
        assert_eq!((o.tls, o.host.as_str(), o.port), (false, "::1", 8080));
        for (url, why) in [
            ("http://api.example.com", "only to a loopback address"),
            ("ftp://x", "must start with https://"),
            ("https://user:pw@x.example", "credentials"),
            ("not a url", "not a URL"),
        ] {
            let err = parse_origin(url, "github.api_url").unwrap_err();
            assert!(err.starts_with("github.api_url"), "{err}");
            assert!(err.contains(why), "{url}: {err}");
        }
        let a = parse_origin("https://API.example.com", "x").unwrap();
        let b = parse_origin("https://api.example.com:443/other", "x").unwrap();
        assert!(a.same_origin(&b));
        assert!(!a.same_origin(&parse_origin("https://api.example.com:8443", "x").unwrap()));
    }

    #[test]
    fn backoff_grows_and_stays_within_bounds() {
        let p = RetryPolicy::with_retries(4);
        assert!(p.backoff(0) >= Duration::from_secs(1));
        assert!(p.backoff(1) >= Duration::from_secs(2));
        assert_eq!(p.backoff(20), Duration::from_secs(30));
        assert_eq!(p.clamp(Duration::ZERO), Duration::from_secs(1));
    }
}
