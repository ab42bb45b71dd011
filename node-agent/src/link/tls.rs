//! Dialling the controller: TCP, TLS (rustls, ring) and HTTP/2 for tonic.
//!
//! At enrollment the agent has no certificate yet and trusts the controller
//! only through the CA fingerprint pinned in the join token
//! (`pinned_config`): the TLS chain it presents must contain that exact
//! CA, and its server certificate must chain to it. There is no
//! trust-on-first-use. After enrollment every dial is mTLS with the stored
//! CA as the only root and the enrolled identity as the client
//! (`mtls_channel`). Every connection sends HTTP/2 keepalive pings, so a
//! controller that vanished (host gone, network cut) is noticed even when
//! the stream is quiet, instead of a call waiting on it forever.

use std::fs;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

use super::{identity, LinkError, CA_FILE};
use crate::digest::Sha256;
use crate::error::error_chain;

/// Give up on a TCP/TLS connect after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// An HTTP/2 PING goes out on a connection this often, busy or idle...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// ...and the connection is dropped (every call on it failing) when the
/// answer takes longer than this: the controller or the path to it is gone.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Dials `controller` over mTLS with the identity enrolled in `state_dir`
/// (its CA as the only root, its certificate and key as the client).
pub(super) async fn mtls_channel(controller: &str, state_dir: &Path) -> Result<Channel, LinkError> {
    let target = Target::parse(controller)?;
    let ca_pem = read_file(&state_dir.join(CA_FILE))?;
    // Both through one look at the identity link: never one of each pair.
    let pair = identity::load(state_dir)?;
    let config = mtls_config(&ca_pem, &pair.cert_pem, &pair.key_pem)?;
    connect_channel(&target, config).await
}

/// Where the controller is: what to dial and what name its certificate
/// must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    /// `host:port` to dial.
    pub(super) authority: String,
    /// Host part, checked against the server certificate.
    pub(super) host: String,
}

impl Target {
    /// `host[:port]` or `https://host[:port]`, checked as the agent's
    /// config checks `[controller]` ([`crate::config::controller_address`]).
    pub(super) fn parse(text: &str) -> Result<Self, LinkError> {
        let addr = crate::config::controller_address(text)
            .map_err(|_| LinkError::Address(text.to_owned()))?;
        Ok(Self {
            authority: addr.authority,
            host: addr.host,
        })
    }
}

/// Dials `target` over TLS with `config` and sets up HTTP/2 for tonic.
///
/// tonic's own `ClientTlsConfig` cannot take a custom rustls config (the
/// pinned verifier), so TLS is done here by a connector and tonic sees a
/// plain `http://` endpoint over the already encrypted stream.
pub(super) async fn connect_channel(
    target: &Target,
    config: Arc<ClientConfig>,
) -> Result<Channel, LinkError> {
    let connect_err = |message: String| LinkError::Connect {
        addr: target.authority.clone(),
        message,
    };
    let server_name = ServerName::try_from(target.host.clone())
        .map_err(|_| LinkError::Address(target.host.clone()))?;
    let tls = TlsConnector::from(config);
    let authority = target.authority.clone();
    let connector = tower::service_fn(move |_: Uri| {
        let tls = tls.clone();
        let server_name = server_name.clone();
        let authority = authority.clone();
        async move {
            let tcp = TcpStream::connect(&authority).await?;
            // Small gRPC frames (heartbeats) should go out at once.
            tcp.set_nodelay(true)?;
            let stream = tls.connect(server_name, tcp).await?;
            Ok::<_, io::Error>(TokioIo::new(stream))
        }
    });
    Endpoint::from_shared(format!("http://{}", target.authority))
        .map_err(|err| connect_err(error_chain(&err)))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await
        .map_err(|err| connect_err(error_chain(&err)))
}

/// The one rustls backend: ring (as tonic's `tls-ring`); named explicitly so
/// this never depends on a process-wide default being installed.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Client config for enrollment: no client certificate (we have none yet);
/// the server is trusted only through the pinned CA.
pub(super) fn pinned_config(ca_sha256: &str) -> Result<Arc<ClientConfig>, LinkError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCaVerifier {
        ca_sha256: ca_sha256.to_owned(),
        provider: provider.clone(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Client config for the session: the stored CA is the only root, and our
/// enrolled certificate is the client identity.
fn mtls_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<Arc<ClientConfig>, LinkError> {
    // Every CA of the stored bundle: two during a CA rotation.
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.map_err(|_| LinkError::BadPem("CA certificate"))?)?;
    }
    if roots.is_empty() {
        return Err(LinkError::BadPem("CA certificate"));
    }
    let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map_err(|_| LinkError::BadPem("client certificate"))?];
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|_| LinkError::BadPem("private key"))?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Trusts a server only if the chain it presents contains the CA whose
/// sha256 the join token pins, and its certificate verifies against that CA
/// (validity, server name, signatures) like any webpki check.
#[derive(Debug)]
struct PinnedCaVerifier {
    ca_sha256: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .iter()
            .find(|cert| sha256_hex(cert) == self.ca_sha256)
            .ok_or_else(|| {
                rustls::Error::General(format!(
                    "controller does not present the CA pinned in the join token (sha256 {})",
                    self.ca_sha256
                ))
            })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let webpki =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|err| rustls::Error::General(err.to_string()))?;
        webpki.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The sha256 of a DER certificate, as the join token pins it.
pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::of_bytes(bytes).into_string()
}

/// A state file's contents.
pub(super) fn read_file(path: &Path) -> Result<String, LinkError> {
    fs::read_to_string(path).map_err(|source| LinkError::Io {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_addresses() {
        let t = Target::parse("https://ctl.example.com:8443/").unwrap();
        assert_eq!(t.authority, "ctl.example.com:8443");
        assert_eq!(t.host, "ctl.example.com");
        assert_eq!(
            Target::parse("10.0.0.5").unwrap().authority,
            "10.0.0.5:7443"
        );
        let v6 = Target::parse("[::1]:9000").unwrap();
        assert_eq!(
            (v6.authority.as_str(), v6.host.as_str()),
            ("[::1]:9000", "::1")
        );
        for bad in ["", "http://x:1", "x:port", "x:1/path", ":1"] {
            assert!(Target::parse(bad).is_err(), "{bad:?}");
        }
    }
}
