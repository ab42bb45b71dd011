//! The issuer's signing keys (its JWKS, RFC 7517): fetched over HTTPS when
//! first needed, cached, fetched again when older than [`MAX_AGE`] or when a
//! token names a key id the cache does not hold (the issuer rotated its
//! keys) — but never more often than the configured refetch interval, so a
//! flood of tokens with made-up key ids costs the issuer one request per
//! interval, not one per token.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use rustls::RootCertStore;
use serde::Deserialize;

use super::jwt::RsaKey;
use super::OidcError;

/// A key set older than this is fetched again before use (GitHub publishes
/// a new key well before signing with it).
pub const MAX_AGE: Duration = Duration::from_secs(60 * 60);
/// Longest JWKS document read (GitHub's is ~2 KiB).
const MAX_BODY: usize = 256 * 1024;
/// Most keys kept from one document.
const MAX_KEYS: usize = 64;
/// The whole fetch (connect, TLS, answer) must end within this.
const FETCH_DEADLINE: Duration = Duration::from_secs(10);

/// One JWK as published; only RSA signing keys are kept.
#[derive(Debug, Deserialize)]
struct Jwk {
    kty: Option<String>,
    kid: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    alg: Option<String>,
    n: Option<String>,
    e: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Document {
    keys: Vec<Jwk>,
}

/// The usable keys of a JWKS document, by key id. Keys of another type or
/// use, or without an id, are skipped; a document with none usable is an
/// error.
pub fn parse(body: &[u8]) -> Result<HashMap<String, Arc<RsaKey>>, String> {
    let doc: Document =
        serde_json::from_slice(body).map_err(|e| format!("not a JWKS document: {e}"))?;
    let mut keys = HashMap::new();
    for jwk in doc.keys.into_iter().take(MAX_KEYS) {
        let usable = jwk.kty.as_deref() == Some("RSA")
            && jwk.use_.as_deref().is_none_or(|u| u == "sig")
            && jwk
                .alg
                .as_deref()
                .is_none_or(|a| a == super::jwt::ALGORITHM);
        let (true, Some(kid), Some(n), Some(e)) = (usable, jwk.kid, jwk.n, jwk.e) else {
            continue;
        };
        let (Ok(n), Ok(e)) = (URL_SAFE_NO_PAD.decode(n), URL_SAFE_NO_PAD.decode(e)) else {
            return Err(format!("key {kid:?}: n or e is not base64url"));
        };
        keys.insert(kid, Arc::new(RsaKey { n, e }));
    }
    if keys.is_empty() {
        return Err("no RSA signing key in the document".into());
    }
    Ok(keys)
}

/// The cache and when it was filled.
#[derive(Debug, Default)]
struct State {
    keys: HashMap<String, Arc<RsaKey>>,
    /// When `keys` were fetched.
    fetched_at: Option<Instant>,
    /// When a fetch was last tried (success or not): the rate limit.
    tried_at: Option<Instant>,
    /// Fetches made, for the log and tests' sake.
    fetches: u64,
}

/// The issuer's keys, shared by every request.
#[derive(Debug)]
pub struct KeySet {
    url: String,
    roots: RootCertStore,
    /// Shortest time between two fetches.
    refetch_interval: Duration,
    /// One fetch at a time: concurrent requests for an unknown key wait for
    /// it rather than each asking the issuer.
    state: tokio::sync::Mutex<State>,
}

impl KeySet {
    /// Keys fetched from `url`, whose server certificate must chain to `roots`.
    pub fn new(url: String, roots: RootCertStore, refetch_interval: Duration) -> Self {
        Self {
            url,
            roots,
            refetch_interval,
            state: tokio::sync::Mutex::new(State::default()),
        }
    }

    /// The key `kid`, fetching the key set when it is unknown or the set is
    /// old and the last fetch is at least the refetch interval ago.
    pub async fn key(&self, kid: &str) -> Result<Arc<RsaKey>, OidcError> {
        let mut state = self.state.lock().await;
        let fresh = state.fetched_at.is_some_and(|t| t.elapsed() < MAX_AGE);
        let known = state.keys.get(kid).cloned();
        if let (true, Some(key)) = (fresh, &known) {
            return Ok(key.clone());
        }
        if let Some(tried) = state.tried_at {
            let since = tried.elapsed();
            if since < self.refetch_interval {
                // An old key set still verifies until the next fetch.
                return known.ok_or_else(|| OidcError::UnknownKey {
                    kid: super::jwt::cut(kid),
                    fetched_ago: since.as_secs(),
                });
            }
        }
        state.tried_at = Some(Instant::now());
        state.fetches += 1;
        match self.fetch().await {
            Ok(keys) => {
                tracing::info!(url = %self.url, keys = keys.len(), fetches = state.fetches, "fetched the OIDC issuer's keys");
                state.keys = keys;
                state.fetched_at = Some(Instant::now());
            }
            Err(why) => {
                tracing::warn!(url = %self.url, %why, "cannot fetch the OIDC issuer's keys");
                // Keep what was known: the issuer being down for a while
                // does not stop tokens signed with a known key.
                return known.ok_or(OidcError::Keys(why));
            }
        }
        state
            .keys
            .get(kid)
            .cloned()
            .ok_or_else(|| OidcError::UnknownKey {
                kid: super::jwt::cut(kid),
                fetched_ago: 0,
            })
    }

    async fn fetch(&self) -> Result<HashMap<String, Arc<RsaKey>>, String> {
        let answer = slipway_proto::https::get(
            &self.url,
            &[(http::header::ACCEPT, "application/json".to_owned())],
            self.roots.clone(),
            MAX_BODY,
            FETCH_DEADLINE,
        )
        .await
        .map_err(|e| e.to_string())?;
        if !answer.status.is_success() {
            return Err(format!("GET {} answered HTTP {}", self.url, answer.status));
        }
        parse(&answer.body).map_err(|e| format!("{}: {e}", self.url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_rsa_signing_keys_are_kept() {
        let doc = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "a", "use": "sig", "alg": "RS256", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "kid": "b", "n": "AQAB", "e": "AQAB"},
            {"kty": "EC", "kid": "c", "crv": "P-256", "x": "AA", "y": "AA"},
            {"kty": "RSA", "kid": "d", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "kid": "e", "alg": "RS512", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
        ]});
        let keys = parse(doc.to_string().as_bytes()).unwrap();
        let mut ids: Vec<&str> = keys.keys().map(String::as_str).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(keys["a"].e, [1, 0, 1]);
        assert!(parse(b"{\"keys\": []}").is_err());
        assert!(parse(b"[]").is_err());
        let bad = serde_json::json!({"keys": [{"kty": "RSA", "kid": "a", "n": "!", "e": "AQAB"}]});
        assert!(parse(bad.to_string().as_bytes()).is_err());
    }
}
