//! The client side of the Control API, for the `slipway` CLI: a TLS channel
//! that trusts only the controller's CA (`--ca`), and the API token added
//! to every request.

use std::path::Path;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
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

/// A TLS channel to the controller at `address`, verified against `roots`.
pub async fn connect(address: &str, roots: RootCertStore) -> Result<Channel, ClientError> {
    let (host, port) = parse_address(address)?;
    let server_name =
        ServerName::try_from(host.clone()).map_err(|_| ClientError::Address(address.to_owned()))?;
    let mut config = ClientConfig::builder_with_provider(crypto::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Ca {
            path: String::new(),
            why: e.to_string(),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
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

/// Wraps `message` in a request carrying the token.
pub fn authed<T>(message: T, token: &MetadataValue<tonic::metadata::Ascii>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("authorization", token.clone());
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
