//! Join tokens: one-time, expiring secrets that let a fresh node enroll.
//! The format lives in [`slipway_proto::join_token`]; this module creates
//! tokens and parses `--ttl` / `--tag` values.

use std::time::Duration;

use slipway_proto::join_token::JoinToken;

use crate::audit::{self, AuditEvent};
use crate::pki::crypto::{self, CryptoError};
use crate::store::{Store, StoreError};

/// Default lifetime of a join token: long enough to boot a droplet and run
/// install.sh, short enough that a leaked cloud-init file is soon useless.
pub const DEFAULT_TTL: Duration = Duration::from_secs(60 * 60);

/// Errors from creating tokens or parsing their options.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// `--ttl` is not like `90s`, `30m`, `1h` or `7d`.
    #[error("invalid TTL {0:?}: expected a positive number with unit s, m, h or d (e.g. 1h)")]
    Ttl(String),
    /// `--tag` breaks the label rule (see [`slipway_proto::limits::check_tag`]).
    #[error("invalid tag: {0}")]
    Tag(slipway_proto::limits::FieldError),
    /// The node name a token is bound to breaks the node name rule.
    #[error("invalid node name: {0}")]
    NodeName(slipway_proto::limits::FieldError),
    /// Storing the token failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No randomness for the secret.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl TokenError {
    /// A bad `--ttl` or `--tag` (exit 64).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Ttl(_) | Self::Tag(_) | Self::NodeName(_))
    }
}

/// Parses a TTL such as `90s`, `30m`, `1h`, `7d`.
pub fn parse_ttl(text: &str) -> Result<Duration, TokenError> {
    slipway_proto::cli::parse_duration(text).ok_or_else(|| TokenError::Ttl(text.to_owned()))
}

/// Checks a `--tag` value (`env:production`, `pf-core`).
pub fn check_tag(tag: &str) -> Result<(), TokenError> {
    slipway_proto::limits::check_tag("--tag", tag).map_err(TokenError::Tag)
}

/// Creates and stores a token good for any node name, audits
/// TOKEN_CREATED, and returns the token, whose text is shown to the operator
/// once and never stored.
pub async fn create(
    store: &Store,
    ca_sha256: &str,
    ttl: Duration,
    tags: &[String],
    now: i64,
) -> Result<JoinToken, TokenError> {
    create_bound(store, ca_sha256, ttl, tags, None, now).await
}

/// Like [`create`]; with `node_name`, the token enrolls only a node of that
/// name (`droplets create` binds it to the droplet's name, so a token read
/// from one droplet's user data cannot enroll a node under another name).
pub async fn create_bound(
    store: &Store,
    ca_sha256: &str,
    ttl: Duration,
    tags: &[String],
    node_name: Option<&str>,
    now: i64,
) -> Result<JoinToken, TokenError> {
    for tag in tags {
        check_tag(tag)?;
    }
    if let Some(name) = node_name {
        slipway_proto::limits::check_node_name("node name", name).map_err(TokenError::NodeName)?;
    }
    let token = JoinToken {
        id: crypto::random_hex::<8>()?,
        secret: crypto::random_hex::<32>()?,
        ca_sha256: ca_sha256.to_owned(),
    };
    let ttl_secs = i64::try_from(ttl.as_secs()).map_err(|_| TokenError::Ttl(format!("{ttl:?}")))?;
    let expires_at = now.saturating_add(ttl_secs);
    let created = AuditEvent::success(
        audit::TOKEN_CREATED,
        "operator",
        "join_token",
        &token.id,
        serde_json::json!({ "expires_at": expires_at, "tags": tags, "node_name": node_name }),
    );
    // The token and its audit event are written together.
    store
        .insert_join_token(
            &token.id,
            &secret_hash(&token.secret),
            tags,
            node_name,
            now,
            expires_at,
            &created,
        )
        .await?;
    Ok(token)
}

/// What is stored for a secret. A plain sha256 is enough: the secret is 256
/// random bits, so there is nothing for a slow password hash to protect.
pub fn secret_hash(secret: &str) -> String {
    crypto::sha256_hex(secret.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("1h").unwrap(), DEFAULT_TTL);
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(604_800));
        for bad in ["", "h", "1", "0h", "1w", "-1h", "1.5h"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tags() {
        check_tag("env:production").unwrap();
        check_tag("pf-core").unwrap();
        for bad in ["", "a b", ":x"] {
            assert!(check_tag(bad).is_err(), "{bad:?}");
        }
    }
}
