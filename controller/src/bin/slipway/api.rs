//! The connection to the controller's Control API and the caller's
//! credentials: an API token, a GitHub Actions OIDC token (sent the same
//! way), or an operator certificate on the channel.

use std::path::PathBuf;

use slipway_proto::client;
use slipway_proto::v1::control_client::ControlClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use crate::{oidc, Cli, Usage};

/// A Control API client and the caller's token, added to every request.
pub(crate) struct Api {
    pub(crate) client: ControlClient<Channel>,
    /// None when the caller is the operator certificate of the channel.
    pub(crate) token: Option<MetadataValue<Ascii>>,
    /// How it connected, to connect again ([`Api::reconnect`]).
    target: Target,
}

/// What the connection was made with: `--controller` (often a load
/// balancer in front of several controller replicas) and the credentials.
#[derive(Debug, Clone)]
struct Target {
    controller: Option<String>,
    ca: Option<PathBuf>,
    token: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    oidc: bool,
    oidc_audience: String,
}

impl From<&Cli> for Target {
    fn from(cli: &Cli) -> Self {
        Self {
            controller: cli.controller.clone(),
            ca: cli.ca.clone(),
            token: cli.token.clone(),
            cert: cli.cert.clone(),
            key: cli.key.clone(),
            oidc: cli.oidc,
            oidc_audience: cli.oidc_audience.clone(),
        }
    }
}

/// Connects to `--controller` with the credentials given; a missing or
/// unusable one is a usage error.
pub(crate) async fn connect(cli: &Cli) -> anyhow::Result<Api> {
    connect_to(Target::from(cli)).await
}

impl Api {
    /// A fresh connection to the same `--controller` with the same
    /// credentials (a GitHub Actions OIDC token is asked for again): through
    /// a load balancer, possibly another controller replica.
    pub(crate) async fn reconnect(&self) -> anyhow::Result<Api> {
        connect_to(self.target.clone()).await
    }

    /// The `--controller` address.
    pub(crate) fn controller(&self) -> &str {
        self.target.controller.as_deref().unwrap_or_default()
    }
}

async fn connect_to(target: Target) -> anyhow::Result<Api> {
    let controller = target.controller.as_deref().ok_or_else(|| {
        Usage("no controller: give --controller HOST:PORT or set SLIPWAY_CONTROLLER".to_owned())
    })?;
    let ca = target
        .ca
        .as_deref()
        .ok_or_else(|| Usage("no CA: give --ca FILE or set SLIPWAY_CA".to_owned()))?;
    let identity = match (&target.cert, &target.key) {
        (Some(cert), Some(key)) => {
            Some(client::load_identity(cert, key).map_err(|e| Usage(e.to_string()))?)
        }
        _ => None,
    };
    let token = match (target.token.as_deref(), &identity) {
        (Some(token), _) => Some(client::bearer(token).map_err(|e| Usage(e.to_string()))?),
        (None, Some(_)) => None,
        (None, None) if target.oidc || oidc::available() => {
            let token = oidc::fetch_token(&target.oidc_audience).await?;
            Some(client::bearer(&token).map_err(|e| Usage(e.to_string()))?)
        }
        (None, None) => {
            return Err(Usage(
                "no credentials: give --token (SLIPWAY_TOKEN), --cert and --key (SLIPWAY_CERT, SLIPWAY_KEY), or --oidc in a GitHub Actions job"
                    .to_owned(),
            )
            .into())
        }
    };
    let roots = client::load_ca(ca).map_err(|e| Usage(e.to_string()))?;
    let channel = client::connect_as(controller, roots, identity)
        .await
        .map_err(|e| match e {
            client::ClientError::Identity { .. } => anyhow::Error::from(Usage(e.to_string())),
            other => other.into(),
        })?;
    Ok(Api {
        // Large fleets' node lists can exceed the 4 MiB default.
        client: ControlClient::new(channel).max_decoding_message_size(64 * 1024 * 1024),
        token,
        target,
    })
}

/// gRPC errors as one readable line.
pub(crate) fn status_error(what: &str, status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {} ({:?})", status.message(), status.code())
}
