//! The client side of the Control API, for the `slipway` CLI: a TLS channel
//! that trusts only the controller's CA (`--ca`), optionally presenting an
//! operator client certificate (`--cert`/`--key`), and the API token added
//! to every request when one is given.

use std::path::Path;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::crypto;

/// Errors setting up the connection.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// `--controller` is not HOST:PORT.
    #[error("invalid controller address {0:?}: expected HOST:PORT (e.g. 10.0.0.5:7443)")]
    Address(String),
    /// The CA file could not be read or holds no certificate.
    #[error("CA file {path}: {why}")]
    Ca {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// The client certificate or key file is unusable.
    #[error("{path}: {why}")]
    Identity {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
    /// rustls refused the client configuration (the backend lacks the
    /// protocol versions).
    #[error("client TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The API token cannot be sent as metadata.
    #[error("the API token contains characters not allowed in a header")]
    Token,
    /// Connecting failed.
    #[error("cannot connect to the controller at {addr}: {source}")]
    Connect {
        /// HOST:PORT.
        addr: String,
        /// Why.
        source: tonic::transport::Error,
    },
}

/// Splits `HOST:PORT` (an `https://` prefix is allowed) into host and port.
pub fn parse_address(text: &str) -> Result<(String, u16), ClientError> {
    let err = || ClientError::Address(text.to_owned());
    let bare = text
        .strip_prefix("https://")
        .unwrap_or(text)
        .trim_end_matches('/');
    let (host, port) = bare.rsplit_once(':').ok_or_else(err)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| err())?;
    if host.is_empty() {
        return Err(err());
    }
    Ok((host.to_owned(), port))
}

/// Reads the CA certificate(s) the controller's server certificate must
/// chain to.
pub fn load_ca(path: &Path) -> Result<RootCertStore, ClientError> {
    let ca_err = |why: String| ClientError::Ca {
        path: path.display().to_string(),
        why,
    };
    let pem = std::fs::read(path).map_err(|e| ca_err(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| ca_err(e.to_string()))?;
        roots.add(cert).map_err(|e| ca_err(e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(ca_err("no PEM certificate in it".to_owned()));
    }
    Ok(roots)
}

/// An operator's client certificate chain and key (`slipway --cert --key`).
pub struct ClientIdentity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl std::fmt::Debug for ClientIdentity {
    // Hand-written so the private key never ends up in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientIdentity")
            .field("certificates", &self.chain.len())
            .finish_non_exhaustive()
    }
}

/// Reads a PEM certificate chain and its PEM private key.
pub fn load_identity(cert: &Path, key: &Path) -> Result<ClientIdentity, ClientError> {
    let err = |path: &Path, why: String| ClientError::Identity {
        path: path.display().to_string(),
        why,
    };
    let cert_pem = std::fs::read(cert).map_err(|e| err(cert, e.to_string()))?;
    let key_pem = std::fs::read(key).map_err(|e| err(key, e.to_string()))?;
    identity_from_pem(&cert_pem, &key_pem)
        .map_err(|(is_key, why)| err(if is_key { key } else { cert }, why))
}

/// Parses a PEM certificate chain and PEM private key; on error says
/// whether the key (true) or the certificate was at fault, and why.
pub fn identity_from_pem(
    cert_pem: &[u8],
    key_pem: &[u8],
) -> Result<ClientIdentity, (bool, String)> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| (false, e.to_string()))?;
    if chain.is_empty() {
        return Err((false, "no PEM certificate in it".to_owned()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| (true, format!("no usable PEM private key in it ({e})")))?;
    Ok(ClientIdentity { chain, key })
}

/// While a call is open, the channel pings the controller this often
/// (HTTP/2 PING)...
pub const KEEPALIVE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
/// ...and drops the connection when a ping is not answered within this: a
/// controller whose machine went silent (no reset, no close) ends a
/// `deploy --wait` stream within ~20 s, so the CLI can re-attach through
/// another replica, instead of waiting for ever.
pub const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A TLS channel to the controller at `address`, verified against `roots`.
pub async fn connect(address: &str, roots: RootCertStore) -> Result<Channel, ClientError> {
    connect_as(address, roots, None).await
}

/// Like [`connect`], presenting `identity` as the TLS client certificate.
pub async fn connect_as(
    address: &str,
    roots: RootCertStore,
    identity: Option<ClientIdentity>,
) -> Result<Channel, ClientError> {
    let (host, port) = parse_address(address)?;
    let server_name =
        ServerName::try_from(host.clone()).map_err(|_| ClientError::Address(address.to_owned()))?;
    let config = ClientConfig::builder_with_provider(crypto::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => config.with_no_client_auth(),
        Some(identity) => config
            .with_client_auth_cert(identity.chain, identity.key)
            .map_err(|e| ClientError::Identity {
                path: "--cert/--key".to_owned(),
                why: format!("the certificate and key do not go together: {e}"),
            })?,
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
    let target = format!("{host}:{port}");
    let dial = target.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let tls = tls.clone();
        let server_name = server_name.clone();
        let dial = dial.clone();
        async move {
            let tcp = TcpStream::connect(dial).await?;
            let _ = tcp.set_nodelay(true);
            Ok::<_, std::io::Error>(TokioIo::new(tls.connect(server_name, tcp).await?))
        }
    });
    // The URI only names the authority; the connector above does the TLS.
    Endpoint::from_shared(format!("http://{target}"))
        .map_err(|_| ClientError::Address(address.to_owned()))?
        .http2_keep_alive_interval(KEEPALIVE_EVERY)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .connect_with_connector(connector)
        .await
        .map_err(|source| ClientError::Connect {
            addr: target,
            source,
        })
}

/// The `authorization` metadata value for a token.
pub fn bearer(token: &str) -> Result<MetadataValue<tonic::metadata::Ascii>, ClientError> {
    format!("Bearer {token}")
        .parse()
        .map_err(|_| ClientError::Token)
}

/// What a request carries to say who is calling: an API token
/// (`authorization` metadata), or nothing when the channel presents an
/// operator certificate.
pub trait Authorization {
    /// Adds the caller's metadata to `request`.
    fn apply(&self, metadata: &mut tonic::metadata::MetadataMap);
}

impl Authorization for MetadataValue<tonic::metadata::Ascii> {
    fn apply(&self, metadata: &mut tonic::metadata::MetadataMap) {
        metadata.insert("authorization", self.clone());
    }
}

impl Authorization for Option<MetadataValue<tonic::metadata::Ascii>> {
    fn apply(&self, metadata: &mut tonic::metadata::MetadataMap) {
        if let Some(token) = self {
            token.apply(metadata);
        }
    }
}

/// Wraps `message` in a request carrying the token, if any.
pub fn authed<T>(message: T, token: &impl Authorization) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    token.apply(request.metadata_mut());
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_address("127.0.0.1:7443").unwrap(),
            ("127.0.0.1".to_owned(), 7443)
        );
        assert_eq!(
            parse_address("https://ctl.example:1/").unwrap(),
            ("ctl.example".to_owned(), 1)
        );
        assert_eq!(parse_address("[::1]:9").unwrap(), ("::1".to_owned(), 9));
        for bad in ["", "host", ":1", "host:x"] {
            assert!(parse_address(bad).is_err(), "{bad}");
        }
    }
}
