//! How the controller authenticates to GitHub: as a GitHub App (its id and
//! private key sign a short RS256 JWT, exchanged for an installation access
//! token that is cached and renewed [`DEFAULT_RENEW_BEFORE`] before it
//! expires), or with a fine-grained personal access token.
//!
//! The installation token endpoint (`POST /app/installations/{id}/access_tokens`)
//! is not in the cut API description; its shape is GitHub's documented one:
//! `201 {"token": "ghs_…", "expires_at": "2026-01-01T00:00:00Z"}`.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use http::Method;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::PrivateKeyDer;
use serde::Deserialize;

use super::client::{decode, now_unix, Client, Credential, GhError, Secret};

/// An installation token is renewed this long before it expires (they live
/// an hour), so no request goes out with one about to lapse.
pub const DEFAULT_RENEW_BEFORE: Duration = Duration::from_secs(5 * 60);
/// The App JWT's lifetime: GitHub allows at most 10 minutes.
const JWT_LIFETIME: u64 = 9 * 60;
/// The JWT's `iat` is set this far in the past, for clock drift (GitHub's
/// advice).
const JWT_BACKDATE: u64 = 60;
/// Largest private key file read.
const MAX_KEY_PEM: usize = 16 * 1024;

/// The App's RSA private key. Never shown.
#[derive(Clone)]
pub struct AppKey(Arc<RsaKeyPair>);

impl fmt::Debug for AppKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AppKey(<redacted>)")
    }
}

impl AppKey {
    /// A PEM private key: PKCS#1 (`BEGIN RSA PRIVATE KEY`, what GitHub
    /// hands out) or PKCS#8. `origin` names where it came from in errors.
    pub fn from_pem(pem: &[u8], origin: &str) -> Result<Self, GhError> {
        if pem.len() > MAX_KEY_PEM {
            return Err(GhError::Config(format!(
                "the App private key in {origin} is over {MAX_KEY_PEM} bytes"
            )));
        }
        let der = PrivateKeyDer::from_pem_slice(pem).map_err(|e| {
            GhError::Config(format!(
                "the App private key in {origin} is not a PEM private key: {e}"
            ))
        })?;
        let pair = match &der {
            PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
            PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
            _ => {
                return Err(GhError::Config(format!(
                    "the App private key in {origin} is not an RSA key"
                )))
            }
        }
        .map_err(|e| {
            GhError::Config(format!(
                "the App private key in {origin} is not a usable RSA key: {e}"
            ))
        })?;
        Ok(Self(Arc::new(pair)))
    }

    /// An RS256 JWT for App `app_id`, issued at `now` (Unix seconds).
    pub fn jwt(&self, app_id: u64, now: u64) -> Result<String, GhError> {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let claims = serde_json::json!({
            "iat": now.saturating_sub(JWT_BACKDATE),
            "exp": now + JWT_LIFETIME,
            "iss": app_id.to_string(),
        });
        let claims = b64.encode(claims.to_string());
        let message = format!("{header}.{claims}");
        let mut signature = vec![0; self.0.public().modulus_len()];
        let rng = ring::rand::SystemRandom::new();
        self.0
            .sign(&RSA_PKCS1_SHA256, &rng, message.as_bytes(), &mut signature)
            .map_err(|_| GhError::Config("signing the App JWT failed".into()))?;
        Ok(format!("{message}.{}", b64.encode(signature)))
    }
}

/// A GitHub App installation.
#[derive(Debug)]
pub struct App {
    pub app_id: u64,
    pub installation_id: u64,
    key: AppKey,
    renew_before: Duration,
    /// The installation token and when it expires (Unix seconds).
    cached: Mutex<Option<(Secret, u64)>>,
    /// One mint at a time: callers that find the token stale wait for the
    /// one being minted instead of each minting their own.
    minting: tokio::sync::Mutex<()>,
}

/// The credentials of a [`Client`].
#[derive(Debug, Clone)]
pub enum Auth {
    /// A fine-grained personal access token.
    Token(Secret),
    /// A GitHub App installation.
    App(Arc<App>),
}

#[derive(Deserialize)]
struct InstallationToken {
    token: String,
    expires_at: String,
}

impl Auth {
    /// App credentials; the installation token is minted on first use.
    pub fn app(app_id: u64, installation_id: u64, key: AppKey, renew_before: Duration) -> Self {
        Self::App(Arc::new(App {
            app_id,
            installation_id,
            key,
            renew_before,
            cached: Mutex::new(None),
            minting: tokio::sync::Mutex::new(()),
        }))
    }

    pub(crate) fn is_app(&self) -> bool {
        matches!(self, Self::App(_))
    }

    /// The App JWT (only an App has one).
    pub(crate) fn app_jwt(&self) -> Result<String, GhError> {
        match self {
            Self::App(app) => app.key.jwt(app.app_id, now_unix()),
            Self::Token(_) => Err(GhError::Config(
                "a JWT was asked for, but the controller authenticates with a token, not as an App"
                    .into(),
            )),
        }
    }

    /// Drops a cached installation token (GitHub refused it).
    pub(crate) fn forget_installation_token(&self) {
        if let Self::App(app) = self {
            *app.cached.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
    }

    fn cached(app: &App) -> Option<Secret> {
        let cached = app.cached.lock().unwrap_or_else(|p| p.into_inner());
        let (token, expires_at) = cached.as_ref()?;
        let fresh_until = expires_at.saturating_sub(app.renew_before.as_secs());
        (now_unix() < fresh_until).then(|| token.clone())
    }

    /// The token to send: the fine-grained token, or a fresh installation
    /// token (minted with the App JWT when the cached one is near expiry).
    pub(crate) async fn token(&self, client: &Client) -> Result<Secret, GhError> {
        let app = match self {
            Self::Token(token) => return Ok(token.clone()),
            Self::App(app) => app,
        };
        if let Some(token) = Self::cached(app) {
            return Ok(token);
        }
        let _one = app.minting.lock().await;
        if let Some(token) = Self::cached(app) {
            return Ok(token);
        }
        let path = format!("/app/installations/{}/access_tokens", app.installation_id);
        // Boxed: minting is a call of the client that asked for the token.
        let answer = Box::pin(client.call_as(
            Credential::AppJwt,
            Method::POST,
            &path,
            None,
            "application/vnd.github+json",
        ))
        .await?;
        let minted: InstallationToken = decode(&Method::POST, &path, &answer.body)?;
        let invalid = |reason: String| GhError::Invalid {
            method: Method::POST,
            path: path.clone(),
            reason,
        };
        let expires_at = time::OffsetDateTime::parse(
            &minted.expires_at,
            &time::format_description::well_known::Rfc3339,
        )
        .map_err(|e| invalid(format!("expires_at {:?}: {e}", minted.expires_at)))?
        .unix_timestamp();
        let expires_at = u64::try_from(expires_at).unwrap_or(0);
        if expires_at <= now_unix() {
            return Err(invalid(format!(
                "the installation token expires at {}, already past",
                minted.expires_at
            )));
        }
        let token = Secret::new(&minted.token, "the installation token")
            .map_err(|e| invalid(e.to_string()))?;
        tracing::info!(
            installation_id = app.installation_id,
            expires_at = %minted.expires_at,
            "github: minted an installation token"
        );
        *app.cached.lock().unwrap_or_else(|p| p.into_inner()) = Some((token.clone(), expires_at));
        Ok(token)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh 2048-bit RSA key in PKCS#1 PEM, as GitHub hands them out
    /// (`openssl genrsa -traditional`; ring cannot generate RSA keys).
    pub(crate) fn test_key_pem() -> Vec<u8> {
        let out = std::process::Command::new("openssl")
            .args(["genrsa", "-traditional", "2048"])
            .output()
            .expect("openssl (apt-get install openssl)");
        assert!(out.status.success(), "{out:?}");
        out.stdout
    }

    #[test]
    fn a_jwt_is_rs256_signed_with_the_app_id_and_a_short_life() {
        let pem = test_key_pem();
        assert!(String::from_utf8_lossy(&pem).contains("BEGIN RSA PRIVATE KEY"));
        let key = AppKey::from_pem(&pem, "test").unwrap();
        let jwt = key.jwt(12345, 1_700_000_000).unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header: serde_json::Value =
            serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header["alg"], "RS256");
        let claims: serde_json::Value =
            serde_json::from_slice(&b64.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["iss"], "12345");
        assert_eq!(claims["iat"], 1_700_000_000 - 60);
        assert_eq!(claims["exp"], 1_700_000_000 + 540);
        use ring::signature::KeyPair as _;
        let public = ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            key.0.public_key().as_ref().to_vec(),
        );
        let signed = format!("{}.{}", parts[0], parts[1]);
        let signature = b64.decode(parts[2]).unwrap();
        public.verify(signed.as_bytes(), &signature).unwrap();
        assert!(public.verify(b"tampered", &signature).is_err());
        assert!(format!("{key:?}").contains("redacted"));
    }

    #[test]
    fn bad_keys_say_where_they_came_from() {
        let e = AppKey::from_pem(b"not a key", "/etc/slipway/gh.pem").unwrap_err();
        assert!(e.to_string().contains("/etc/slipway/gh.pem"), "{e}");
    }
}
