//! The errors of Control API calls and the one place they become gRPC
//! statuses.

use slipway_proto::limits::{self, Validate};
use tonic::Status;

use crate::artifacts::ArtifactError;
use crate::auth::apitoken::ApiTokenError;
use crate::auth::oidc::OidcError;
use crate::auth::operator::OperatorError;
use crate::rollout;
use crate::store::StoreError;

/// Errors of API calls; each maps to one gRPC status.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No `authorization: Bearer` metadata and no client certificate.
    #[error(
        "an API token (slipway --token or SLIPWAY_TOKEN) or an operator certificate (slipway --cert and --key) is required"
    )]
    NoToken,
    /// The client certificate is not a live operator's.
    #[error(transparent)]
    Operator(Box<OperatorError>),
    /// The token is malformed, unknown or revoked.
    #[error(transparent)]
    Token(#[from] ApiTokenError),
    /// A GitHub Actions OIDC token was refused or could not be checked.
    #[error(transparent)]
    Oidc(#[from] OidcError),
    /// The token's scopes do not allow this call.
    #[error("token {token} may not {what} (scopes: {scopes})")]
    Scope {
        /// Token id.
        token: String,
        /// What was asked, e.g. "deploy app api".
        what: String,
        /// What the token has.
        scopes: String,
    },
    /// A request field is invalid.
    #[error("{0}")]
    Invalid(String),
    /// The selector matches no node.
    #[error("no enrolled node matches {0}")]
    NoNodes(String),
    /// The artifact to deploy was never uploaded.
    #[error("artifact {0} is not on the controller; upload it first (slipway deploy does)")]
    NoArtifact(String),
    /// Artifact store.
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// The DigitalOcean snapshots before a deploy failed (not started).
    #[error("{0}")]
    Snapshot(String),
    /// Database.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A named env variable or version that is not there.
    #[error("{0}")]
    NotFound(String),
    /// Sealing or opening an environment.
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
    /// An env change of a tag layer would make two layers of one node set
    /// the same name (nothing stored).
    #[error("{0}")]
    LayerConflict(String),
    /// An env version was stored, then could not be sent to the nodes.
    #[error("env version {version} of app {app} is stored, but was not delivered: {reason}")]
    NotDelivered {
        /// The app.
        app: String,
        /// The version stored.
        version: u64,
        /// Why it was not sent.
        reason: Box<ApiError>,
    },
    /// This replica follows as many deployments as it may (in all, or for
    /// this caller).
    #[error(transparent)]
    TooManyFollowers(#[from] crate::api::watch::TooManyFollowers),
}

impl From<OperatorError> for ApiError {
    fn from(err: OperatorError) -> Self {
        Self::Operator(Box::new(err))
    }
}

impl From<rollout::RolloutError> for ApiError {
    fn from(err: rollout::RolloutError) -> Self {
        Self::Invalid(err.to_string())
    }
}

impl From<limits::FieldError> for ApiError {
    fn from(err: limits::FieldError) -> Self {
        Self::Invalid(err.to_string())
    }
}

/// Refuses a request with a field outside its rule or limit, before
/// anything (authorization included) uses it.
pub(crate) fn validated<M: Validate>(message: &M) -> Result<(), ApiError> {
    Ok(message.validate()?)
}

/// What a client is told while the store does not answer.
pub(crate) use crate::store::DATABASE_UNAVAILABLE;

impl ApiError {
    /// True if this is the store failing to reach its database, directly
    /// or while checking the caller's token or certificate.
    pub(crate) fn store_unavailable(&self) -> bool {
        match self {
            Self::Store(err) | Self::Token(ApiTokenError::Store(err)) => err.is_unavailable(),
            Self::Operator(op) => {
                matches!(&**op, OperatorError::Store(err) if err.is_unavailable())
            }
            _ => false,
        }
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Self {
        match err {
            ApiError::NoToken
            | ApiError::Token(ApiTokenError::Malformed | ApiTokenError::Unknown) => {
                Status::unauthenticated(err.to_string())
            }
            ApiError::Operator(ref op)
                if matches!(
                    **op,
                    OperatorError::NodeCert
                        | OperatorError::UnknownCert(_)
                        | OperatorError::Revoked(_)
                ) =>
            {
                Status::unauthenticated(err.to_string())
            }
            ApiError::Oidc(ref oidc) if oidc.is_unavailable() => {
                Status::unavailable(err.to_string())
            }
            ApiError::Oidc(ref oidc) if oidc.is_forbidden() => {
                Status::permission_denied(err.to_string())
            }
            ApiError::Oidc(_) => Status::unauthenticated(err.to_string()),
            ApiError::Scope { .. } => Status::permission_denied(err.to_string()),
            ApiError::Invalid(_) => Status::invalid_argument(err.to_string()),
            ApiError::NoNodes(_) | ApiError::NoArtifact(_) | ApiError::Snapshot(_) => {
                Status::failed_precondition(err.to_string())
            }
            ApiError::Artifact(err) => err.into(),
            // One deployment per app at a time.
            ApiError::Store(StoreError::AppBusy { .. }) => {
                Status::failed_precondition(err.to_string())
            }
            ApiError::NotFound(_) => Status::not_found(err.to_string()),
            ApiError::TooManyFollowers(_) => Status::resource_exhausted(err.to_string()),
            ApiError::NotDelivered { .. } | ApiError::LayerConflict(_) => {
                Status::failed_precondition(err.to_string())
            }
            ApiError::Store(StoreError::EnvConflict { .. }) => Status::aborted(err.to_string()),
            _ if err.store_unavailable() => {
                tracing::warn!(%err, "controller api: the database is unavailable");
                Status::unavailable(DATABASE_UNAVAILABLE)
            }
            ApiError::Token(_)
            | ApiError::Operator(_)
            | ApiError::Store(_)
            | ApiError::Secrets(_) => {
                tracing::error!(%err, "controller api");
                Status::internal("the controller failed; see its log")
            }
        }
    }
}
