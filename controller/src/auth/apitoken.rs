//! API tokens for the `slipway` CLI: `slwa1.<id>.<secret>`, printed once,
//! stored as the sha256 of the secret, with scopes that say what the token
//! may do: `read` (list nodes and audit events), `deploy:<app>` (upload,
//! deploy and roll back that app, change its environment, and read),
//! `secrets:<app>` (read the values of that app's environment, and read) or
//! `agent-upgrade` (upload agent binaries and upgrade the fleet's agents,
//! and read).

use std::fmt;

use crate::audit::{self, AuditEvent};
use crate::pki::crypto::{self, CryptoError};
use crate::store::{Store, StoreError};

/// Prefix of every API token, so a leaked one is recognisable (and told
/// apart from a join token, `slw1.`).
const PREFIX: &str = "slwa1";

/// Errors from creating or checking API tokens.
#[derive(Debug, thiserror::Error)]
pub enum ApiTokenError {
    /// A `--scope` value that is not `read`, `deploy:<app>` or `agent-upgrade`.
    #[error("invalid scope {0:?}: expected read, deploy:APP, secrets:APP (APP of letters, digits, . _ -) or agent-upgrade")]
    Scope(String),
    /// No scope given.
    #[error("an API token needs at least one scope (--scope read or --scope deploy:APP)")]
    NoScope,
    /// The token is not in the `slwa1.<id>.<secret>` format.
    #[error("malformed API token")]
    Malformed,
    /// Unknown id, wrong secret or revoked.
    #[error("unknown or revoked API token")]
    Unknown,
    /// `token revoke` named no stored token.
    #[error("no API token with id {0:?} (slipway-controller token list shows them)")]
    NotFound(String),
    /// Storing or loading failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No randomness for the secret.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl ApiTokenError {
    /// A bad `--scope`, or a token id that names nothing (exit 64).
    pub fn is_usage(&self) -> bool {
        matches!(self, Self::Scope(_) | Self::NoScope | Self::NotFound(_))
    }
}

/// What a token may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// List nodes, audit events.
    Read,
    /// Upload, deploy and roll back this app (implies read).
    Deploy(String),
    /// Upload agent binaries and upgrade the fleet's agents (implies read).
    AgentUpgrade,
    /// Read the values of this app's environment (`env get`; implies read).
    Secrets(String),
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Read => f.write_str("read"),
            Self::Deploy(app) => write!(f, "deploy:{app}"),
            Self::AgentUpgrade => f.write_str("agent-upgrade"),
            Self::Secrets(app) => write!(f, "secrets:{app}"),
        }
    }
}

/// True if `app` is a usable app name: the agent makes it a directory.
pub use slipway_proto::limits::is_app_name;

impl std::str::FromStr for Scope {
    type Err = ApiTokenError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once(':') {
            None if text == "read" => Ok(Self::Read),
            None if text == "agent-upgrade" => Ok(Self::AgentUpgrade),
            Some(("deploy", app)) if is_app_name(app) => Ok(Self::Deploy(app.to_owned())),
            Some(("secrets", app)) if is_app_name(app) => Ok(Self::Secrets(app.to_owned())),
            _ => Err(ApiTokenError::Scope(text.to_owned())),
        }
    }
}

/// Parses `--scope` values, each possibly a comma-separated list.
pub fn parse_scopes(values: &[String]) -> Result<Vec<Scope>, ApiTokenError> {
    let scopes = values
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::parse)
        .collect::<Result<Vec<Scope>, _>>()?;
    if scopes.is_empty() {
        return Err(ApiTokenError::NoScope);
    }
    Ok(scopes)
}

/// An authenticated API caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Token id: the actor in audit events.
    pub token_id: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
}

impl Caller {
    /// Any scope allows reading.
    pub fn can_read(&self) -> bool {
        !self.scopes.is_empty()
    }

    /// True if the token may deploy (and roll back) `app`.
    pub fn can_deploy(&self, app: &str) -> bool {
        self.scopes
            .iter()
            .any(|s| matches!(s, Scope::Deploy(a) if a == app))
    }

    /// True if the token may read the values of `app`'s environment.
    pub fn can_read_secrets(&self, app: &str) -> bool {
        self.scopes
            .iter()
            .any(|s| matches!(s, Scope::Secrets(a) if a == app))
    }

    /// True if the token may upload agent binaries and upgrade agents.
    pub fn can_upgrade_agents(&self) -> bool {
        self.scopes.iter().any(|s| matches!(s, Scope::AgentUpgrade))
    }

    /// True if the token may deploy some app (uploads need this).
    pub fn can_deploy_any(&self) -> bool {
        self.scopes.iter().any(|s| matches!(s, Scope::Deploy(_)))
    }
}

/// Creates a token, audits TOKEN_CREATED, and returns its text (shown once).
pub async fn create(store: &Store, scopes: &[Scope], now: i64) -> Result<String, ApiTokenError> {
    if scopes.is_empty() {
        return Err(ApiTokenError::NoScope);
    }
    let id = crypto::random_hex::<8>()?;
    let secret = crypto::random_hex::<32>()?;
    let scopes: Vec<String> = scopes.iter().map(ToString::to_string).collect();
    let created = AuditEvent::success(
        audit::TOKEN_CREATED,
        "operator",
        "api_token",
        &id,
        serde_json::json!({ "scopes": scopes }),
    );
    // The token and its audit event are written together.
    store
        .insert_api_token(
            &id,
            &crate::auth::token::secret_hash(&secret),
            &scopes,
            now,
            &created,
        )
        .await?;
    Ok(format!("{PREFIX}.{id}.{secret}"))
}

/// The id part of a token, if it is well formed (for audit events about a
/// refused token; the secret is never logged).
pub fn token_id(token: &str) -> Option<&str> {
    let mut parts = token.splitn(3, '.');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(PREFIX), Some(id), Some(_)) if !id.is_empty() => Some(id),
        _ => None,
    }
}

/// Revokes the token `id_or_token` (its id, or the whole token text) and
/// audits TOKEN_REVOKED; returns the id and whether it was newly revoked.
/// Calls with it fail from then on (each call checks the store).
pub async fn revoke(
    store: &Store,
    id_or_token: &str,
    now: i64,
) -> Result<(String, bool), ApiTokenError> {
    let id = token_id(id_or_token).unwrap_or(id_or_token).to_owned();
    let event = AuditEvent::success(
        audit::TOKEN_REVOKED,
        "operator",
        "api_token",
        &id,
        serde_json::json!({}),
    );
    match store.revoke_api_token(&id, &event, now).await? {
        None => Err(ApiTokenError::NotFound(id)),
        Some(newly) => Ok((id, newly)),
    }
}

/// Checks a token against the store.
pub async fn authenticate(store: &Store, token: &str) -> Result<Caller, ApiTokenError> {
    let mut parts = token.splitn(3, '.');
    let (Some(PREFIX), Some(id), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(ApiTokenError::Malformed);
    };
    let row = store.api_token(id).await?.ok_or(ApiTokenError::Unknown)?;
    // Both sides are hex sha256 of 256-bit secrets: comparing hashes leaks
    // nothing useful through timing.
    if row.revoked_at.is_some() || row.secret_hash != crate::auth::token::secret_hash(secret) {
        return Err(ApiTokenError::Unknown);
    }
    let scopes = row
        .scopes
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<Scope>, _>>()?;
    Ok(Caller {
        token_id: row.id,
        scopes,
    })
}

/// The caller a stored, non-revoked token `id` makes (a browser session
/// acts for the token it was opened with; its secret was checked at login).
pub async fn caller_by_id(store: &Store, id: &str) -> Result<Caller, ApiTokenError> {
    let row = store.api_token(id).await?.ok_or(ApiTokenError::Unknown)?;
    if row.revoked_at.is_some() {
        return Err(ApiTokenError::Unknown);
    }
    let scopes = row
        .scopes
        .iter()
        .map(|s| s.parse())
        .collect::<Result<Vec<Scope>, _>>()?;
    Ok(Caller {
        token_id: row.id,
        scopes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::store::testing::store_tests!(
        created_token_authenticates_with_its_scopes,
        a_revoked_token_no_longer_authenticates
    );

    #[test]
    fn scopes_parse() {
        let scopes =
            parse_scopes(&["read".to_owned(), "deploy:web,deploy:api".to_owned()]).unwrap();
        assert_eq!(
            scopes,
            [
                Scope::Read,
                Scope::Deploy("web".to_owned()),
                Scope::Deploy("api".to_owned())
            ]
        );
        for bad in ["write", "deploy:", "deploy:a/b", "deploy:..", "read:x"] {
            assert!(parse_scopes(&[bad.to_owned()]).is_err(), "{bad}");
        }
        assert!(parse_scopes(&[]).is_err());
    }

    async fn created_token_authenticates_with_its_scopes(store: Store) {
        let token = create(&store, &[Scope::Deploy("web".to_owned())], 10)
            .await
            .unwrap();
        let caller = authenticate(&store, &token).await.unwrap();
        assert!(caller.can_deploy("web") && !caller.can_deploy("api") && caller.can_read());
        assert_eq!(token_id(&token), Some(caller.token_id.as_str()));
        let forged = format!("{}x", &token[..token.len() - 1]);
        assert!(matches!(
            authenticate(&store, &forged).await,
            Err(ApiTokenError::Unknown)
        ));
        assert!(matches!(
            authenticate(&store, "nope").await,
            Err(ApiTokenError::Malformed)
        ));
    }

    async fn a_revoked_token_no_longer_authenticates(store: Store) {
        let token = create(&store, &[Scope::Read], 10).await.unwrap();
        let other = create(&store, &[Scope::Read], 11).await.unwrap();
        // By the whole token text, as an operator may paste it.
        let (id, newly) = revoke(&store, &token, 20).await.unwrap();
        assert!(newly);
        assert_eq!(Some(id.as_str()), token_id(&token));
        assert!(matches!(
            authenticate(&store, &token).await,
            Err(ApiTokenError::Unknown)
        ));
        assert!(authenticate(&store, &other).await.is_ok());
        // Again: not an error, but nothing new.
        assert!(!revoke(&store, &id, 30).await.unwrap().1);
        assert!(matches!(
            revoke(&store, "0011223344556677", 30).await,
            Err(ApiTokenError::NotFound(_))
        ));
        let listed = store.api_tokens().await.unwrap();
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0].revoked_at, Some(20));
        assert_eq!(listed[1].revoked_at, None);
        let events = store.audit_events().await.unwrap();
        let revoked: Vec<_> = events
            .iter()
            .filter(|e| e.event_type == audit::TOKEN_REVOKED)
            .collect();
        assert_eq!(revoked.len(), 1);
        assert_eq!(revoked[0].resource_id, id);
    }
}
