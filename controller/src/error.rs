//! The crate error: what a `slipway-controller` command can fail with, each
//! module's error gathered, and [`Error::is_usage`] for the exit code.

use std::io;
use std::path::PathBuf;

use crate::auth::apitoken::ApiTokenError;
use crate::auth::operator::OperatorError;
use crate::auth::token::TokenError;
use crate::config::ConfigError;
use crate::fleet::RevokeError;
use crate::pki::ca::CaError;
use crate::server::ServeError;
use crate::store::StoreError;

/// Why a `slipway-controller` command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad `serve` flags or configuration file.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `serve` could not start or stopped with an error.
    #[error(transparent)]
    Serve(#[from] ServeError),
    /// A join token could not be made (or a bad `--ttl` / `--tag`).
    #[error(transparent)]
    Token(#[from] TokenError),
    /// An API token could not be made or revoked (or a bad `--scope`).
    #[error(transparent)]
    ApiToken(#[from] ApiTokenError),
    /// An operator certificate could not be made or revoked (boxed: the
    /// largest of these errors).
    #[error(transparent)]
    Operator(Box<OperatorError>),
    /// A node could not be revoked.
    #[error(transparent)]
    Revoke(#[from] RevokeError),
    /// The data dir's database could not be opened.
    #[error("opening the controller database: {0}")]
    OpenStore(#[source] StoreError),
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The data dir's CA could not be loaded or created.
    #[error("loading the controller CA: {0}")]
    LoadCa(#[source] CaError),
    /// A file or directory could not be read, created or written.
    #[error("{what} {}: {source}", path.display())]
    File {
        /// "reading the CSR", "creating", "writing".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// `operator create` would overwrite a file.
    #[error("{} already exists; remove it or choose another --out", .0.display())]
    Exists(PathBuf),
    /// An operator certificate was issued, its files could not be written,
    /// and it was revoked again (nobody holds a usable copy).
    #[error("operator {id} was revoked again because its files could not be written: {source}")]
    Unwritten {
        /// The operator.
        id: String,
        /// Why the files could not be written.
        source: Box<Error>,
    },
    /// A backup or restore failed.
    #[error(transparent)]
    Backup(#[from] crate::backup::BackupError),
    /// A CA rotation step was refused or failed.
    #[error(transparent)]
    Rotation(#[from] crate::pki::rotation::RotationError),
    /// `ca rotate finish` while live nodes are still on the old CA.
    #[error(
        "{} live node(s) are still on the old CA: {}; wait for them to renew (`ca rotate start \
         --now` makes them renew at once), or finish with --force (they will need \
         `slipway-agent enroll --replace`)",
        .0.len(),
        .0.join(", ")
    )]
    Lagging(Vec<String>),
    /// `--json` output could not be encoded.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// A DigitalOcean command failed (API, token, sync); boxed: large.
    #[error(transparent)]
    DigitalOcean(Box<crate::digitalocean::commands::DoCommandError>),
}

impl From<crate::digitalocean::commands::DoCommandError> for Error {
    fn from(err: crate::digitalocean::commands::DoCommandError) -> Self {
        Self::DigitalOcean(Box::new(err))
    }
}

impl From<OperatorError> for Error {
    fn from(err: OperatorError) -> Self {
        Self::Operator(Box::new(err))
    }
}

impl Error {
    /// Whether the command was used wrongly (bad flags, names, scopes or
    /// configuration, an id that names nothing): the binary exits 64
    /// (EX_USAGE), else 1.
    pub fn is_usage(&self) -> bool {
        match self {
            Self::Config(err) => err.is_usage(),
            Self::Token(err) => err.is_usage(),
            Self::ApiToken(err) => err.is_usage(),
            Self::Operator(err) => err.is_usage(),
            Self::DigitalOcean(err) => err.is_usage(),
            Self::Backup(err) => matches!(
                err,
                crate::backup::BackupError::Usage(_) | crate::backup::BackupError::NotEmpty(_)
            ),
            Self::Rotation(err) => err.is_usage(),
            Self::Lagging(_) => true,
            Self::Serve(_)
            | Self::Revoke(_)
            | Self::OpenStore(_)
            | Self::Store(_)
            | Self::LoadCa(_)
            | Self::File { .. }
            | Self::Exists(_)
            | Self::Unwritten { .. }
            | Self::Json(_) => false,
        }
    }
}
