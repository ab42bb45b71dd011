//! The one place HTTP handlers' errors become responses: a status code and
//! a JSON body `{"error": "...", "field": "..."}` (`field` only when one
//! request field is at fault).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::api::ApiError;
use crate::artifacts::ArtifactError;
use crate::auth::apitoken::ApiTokenError;
use crate::store::StoreError;

/// The JSON body of every error answer.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// What was wrong, for people.
    pub error: String,
    /// The request field at fault (`app`, `rollout.max_parallel`, `since`...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Errors of HTTP handlers; each maps to one status code.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// No credentials, or ones that are not (or no longer) valid: 401.
    #[error("{0}")]
    Unauthenticated(String),
    /// Authenticated, but the scopes do not allow it: 403.
    #[error("{0}")]
    Forbidden(String),
    /// A state-changing browser request without the right CSRF token: 403.
    #[error("{0}")]
    Csrf(String),
    /// A request field (or the body as a whole) is invalid: 400 (422 for a
    /// body that is well-formed JSON of the wrong shape is not used: one
    /// code for every bad input keeps clients simple).
    #[error("{message}")]
    Invalid {
        /// The field at fault, if one.
        field: Option<String>,
        /// What was wrong.
        message: String,
    },
    /// Nothing with that id: 404.
    #[error("{0}")]
    NotFound(String),
    /// The request cannot run now (app busy, no node matches, artifact
    /// missing): 409.
    #[error("{0}")]
    Conflict(String),
    /// An upload without `Content-Length`: 411.
    #[error("an upload needs a Content-Length header (its size in bytes)")]
    LengthRequired,
    /// The body is larger than the route accepts: 413.
    #[error("{0}")]
    TooLarge(String),
    /// The controller's database does not answer (down, restarting,
    /// unreachable): 503 with `Retry-After`, the caller may try again.
    #[error("{}", crate::api::DATABASE_UNAVAILABLE)]
    Unavailable,
    /// The controller serves as much of this as it may now (a limit on
    /// open streams): 503 with `Retry-After`; the message names the limit.
    #[error("{0}")]
    Busy(String),
    /// The controller failed; details are in its log: 500.
    #[error("the controller failed; see its log")]
    Internal(String),
}

/// Seconds a client is asked to wait before trying again after a 503.
const RETRY_AFTER_SECS: &str = "5";

impl AppError {
    /// A bad request field.
    pub fn field(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// The status code of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) | Self::Csrf(_) => StatusCode::FORBIDDEN,
            Self::Invalid { .. } => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::LengthRequired => StatusCode::LENGTH_REQUIRED,
            Self::Unavailable | Self::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) = &self {
            tracing::error!(%detail, "http api");
        }
        let status = self.status();
        let field = match &self {
            Self::Invalid { field, .. } => field.clone(),
            _ => None,
        };
        let mut response = (
            status,
            Json(ErrorBody {
                error: self.to_string(),
                field,
            }),
        )
            .into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}

impl From<StoreError> for AppError {
    fn from(err: StoreError) -> Self {
        if err.is_unavailable() {
            tracing::warn!(error = %err, "http api: the database does not answer");
            return Self::Unavailable;
        }
        match err {
            StoreError::AppBusy { .. } | StoreError::EnvConflict { .. } => {
                Self::Conflict(err.to_string())
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<ApiError> for AppError {
    fn from(err: ApiError) -> Self {
        // Also while checking the caller's token or certificate: a caller
        // is not told "unauthenticated" because the database is down.
        if err.store_unavailable() {
            tracing::warn!(error = %err, "http api: the database does not answer");
            return Self::Unavailable;
        }
        match err {
            ApiError::NoToken
            | ApiError::Token(ApiTokenError::Malformed | ApiTokenError::Unknown) => {
                Self::Unauthenticated(err.to_string())
            }
            ApiError::Operator(_) => Self::Unauthenticated(err.to_string()),
            ApiError::Oidc(ref oidc) if oidc.is_unavailable() => Self::Internal(err.to_string()),
            ApiError::Oidc(ref oidc) if oidc.is_forbidden() => Self::Forbidden(err.to_string()),
            ApiError::Oidc(_) => Self::Unauthenticated(err.to_string()),
            ApiError::Scope { .. } => Self::Forbidden(err.to_string()),
            ApiError::Invalid(message) => {
                // Field errors of the shared checks read "field: why".
                let field = message
                    .split_once(": ")
                    .map(|(f, _)| f)
                    .filter(|f| {
                        !f.is_empty()
                            && f.chars()
                                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.'))
                    })
                    .map(ToOwned::to_owned);
                Self::Invalid { field, message }
            }
            ApiError::NoNodes(_) | ApiError::NoArtifact(_) | ApiError::Snapshot(_) => {
                Self::Conflict(err.to_string())
            }
            ApiError::Artifact(artifact) => match artifact {
                ArtifactError::BadDigest(_)
                | ArtifactError::Mismatch { .. }
                | ArtifactError::SizeMismatch { .. } => Self::field("body", artifact.to_string()),
                ArtifactError::TooLarge(_) => Self::TooLarge(artifact.to_string()),
                ArtifactError::NotThatArtifact { .. } => Self::Conflict(artifact.to_string()),
                ArtifactError::NotFound(_) => Self::NotFound(artifact.to_string()),
                ArtifactError::Corrupt { .. } => Self::Conflict(artifact.to_string()),
                ArtifactError::Io { .. } | ArtifactError::Store(_) => {
                    Self::Internal(artifact.to_string())
                }
            },
            ApiError::Store(store) => store.into(),
            ApiError::NotFound(what) => Self::NotFound(what),
            ApiError::TooManyFollowers(_) => Self::Busy(err.to_string()),
            ApiError::NotDelivered { .. } | ApiError::LayerConflict(_) => {
                Self::Conflict(err.to_string())
            }
            ApiError::Token(_) | ApiError::Secrets(_) => Self::Internal(err.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_that_does_not_answer_is_a_503_to_try_again_not_a_500_or_a_401() {
        let down = || StoreError::Db(sqlx::Error::PoolTimedOut);
        for err in [
            AppError::from(down()),
            AppError::from(ApiError::Store(down())),
            AppError::from(ApiError::Token(ApiTokenError::Store(down()))),
        ] {
            let response = err.into_response();
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(response.headers()[axum::http::header::RETRY_AFTER], "5");
        }
        assert_eq!(
            AppError::Unavailable.to_string(),
            crate::api::DATABASE_UNAVAILABLE
        );
        // A query the database refused is still the controller's failure.
        let refused = StoreError::Db(sqlx::Error::RowNotFound);
        assert_eq!(
            AppError::from(refused).status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }
}
