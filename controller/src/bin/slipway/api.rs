//! The connection to the controller's Control API and the caller's
//! credentials: an API token, a GitHub Actions OIDC token (sent the same
//! way), or an operator certificate on the channel.

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
}

/// Connects to `--controller` with the credentials given; a missing or
/// unusable one is a usage error.
pub(crate) async fn connect(cli: &Cli) -> anyhow::Result<Api> {
    let controller = cli.controller.as_deref().ok_or_else(|| {
        Usage("no controller: give --controller HOST:PORT or set SLIPWAY_CONTROLLER".to_owned())
    })?;
    let ca = cli
        .ca
        .as_deref()
        .ok_or_else(|| Usage("no CA: give --ca FILE or set SLIPWAY_CA".to_owned()))?;
    let identity = match (&cli.cert, &cli.key) {
        (Some(cert), Some(key)) => {
            Some(client::load_identity(cert, key).map_err(|e| Usage(e.to_string()))?)
        }
        _ => None,
    };
    let token = match (cli.token.as_deref(), &identity) {
        (Some(token), _) => Some(client::bearer(token).map_err(|e| Usage(e.to_string()))?),
        (None, Some(_)) => None,
        (None, None) if cli.oidc || oidc::available() => {
            let token = oidc::fetch_token(&cli.oidc_audience).await?;
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
    })
}

/// gRPC errors as one readable line.
pub(crate) fn status_error(what: &str, status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {} ({:?})", status.message(), status.code())
}
