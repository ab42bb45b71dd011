//! The agent's link to the controller: enrollment and the mTLS session.
//!
//! Enrollment: the agent generates its key pair locally (the private key never
//! leaves the node), sends a CSR with the one-time join token, and stores the
//! returned client certificate and the controller's CA in the state dir.
//! Before the token (a secret) is sent, the controller is authenticated
//! against the CA fingerprint pinned in the token: the TLS chain it presents
//! must contain that exact CA, and its server certificate must chain to it.
//! There is no trust-on-first-use.
//!
//! Session: [`connect`] dials the controller with the client certificate,
//! opens the AgentLink stream, sends Hello and waits for the Welcome.
//! [`renew`] and [`fetch_artifact`] dial the same way, each on a connection
//! of its own. Every connection sends HTTP/2 keepalive pings, so a
//! controller that vanished (host gone, network cut) is noticed even when
//! the stream is quiet, instead of a call waiting on it forever.
//!
//! An artifact fetched from the controller gets the limits of an HTTPS
//! download (`[artifacts]`): `connect_timeout` here, the rest where it is
//! received ([`crate::artifact::controller`]).
//!
//! Key and certificate live in [`crate::link::identity`], which switches them as
//! one pair: enrollment and renewal hand it the new pair, every dial loads
//! the pair in use from it.

pub mod commands;
pub mod identity;
pub mod session;
pub mod watch;

use std::fs;
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use slipway_proto::join_token::{JoinToken, ParseJoinTokenError};
use slipway_proto::v1::agent_link_client::AgentLinkClient;
use slipway_proto::v1::enrollment_client::EnrollmentClient;
use slipway_proto::v1::{
    agent_message, controller_message, AgentMessage, ControllerMessage, EnrollRequest, Hello,
    Welcome,
};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::Streaming;

use self::identity::{IdentityError, Pair};
use crate::artifact::{self, cache::Fetched, controller::FetchError};
use crate::config::ArtifactsConfig;
use crate::digest::Sha256;
use crate::durable;
use crate::error::{error_chain, status_text};

/// The node's private key (mode 0600): a link into the identity in use
/// ([`crate::link::identity`]), or a plain file in an older agent's layout.
pub const KEY_FILE: &str = identity::KEY_FILE;
/// The node's client certificate (as [`KEY_FILE`]).
pub const CERT_FILE: &str = identity::CERT_FILE;
/// The controller CA, verified against the join token's pin at enrollment.
pub const CA_FILE: &str = "ca.pem";
/// The node id the controller assigned (also the certificate's CN).
pub const NODE_ID_FILE: &str = "node-id";

/// Port used when the controller address has none.
pub const DEFAULT_PORT: u16 = 7443;
/// Give up on a TCP/TLS connect after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Give up waiting for the controller's Welcome after this long.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(10);
/// Agent messages queued for sending before senders wait.
const OUTBOUND_QUEUE: usize = 16;
/// An HTTP/2 PING goes out on a connection this often, busy or idle...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
/// ...and the connection is dropped (every call on it failing) when the
/// answer takes longer than this: the controller or the path to it is gone.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors from enrolling or connecting.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The join token is malformed.
    #[error(transparent)]
    Token(#[from] ParseJoinTokenError),
    /// The controller address cannot be used.
    #[error("invalid controller address {0:?}: expected host:port or https://host:port")]
    Address(String),
    /// TCP, TLS or HTTP/2 setup failed (including a controller whose CA does
    /// not match the pin, or a client certificate the controller refused).
    #[error("cannot reach controller {addr}: {message}")]
    Connect {
        /// Controller address.
        addr: String,
        /// The whole error chain.
        message: String,
    },
    /// The controller answered enrollment with an error.
    #[error("controller refused enrollment: {0}")]
    EnrollRefused(String),
    /// The controller refused the session.
    #[error("controller refused the session: {0}")]
    SessionRefused(String),
    /// The CA the controller returned is not the one pinned in the token.
    #[error("controller CA sha256 {got} does not match {expected} pinned in the join token")]
    CaMismatch {
        /// From the token.
        expected: String,
        /// From the controller.
        got: String,
    },
    /// The controller sent something that is not PEM of the expected kind.
    #[error("controller sent an invalid {0}")]
    BadPem(&'static str),
    /// A state file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Generating the key or CSR failed.
    #[error("key generation: {0}")]
    Key(#[from] rcgen::Error),
    /// rustls refused our certificates or key.
    #[error("tls configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// The session ended before the controller's Welcome.
    #[error("controller closed the session before its Welcome")]
    NoWelcome,
    /// The first controller message was not a Welcome.
    #[error("expected Welcome from the controller, got {0}")]
    Unexpected(String),
    /// The controller could not be reached within `[artifacts]
    /// connect_timeout` for an artifact fetch.
    #[error("controller {addr} sent nothing for {after:?} {during}")]
    Idle {
        /// Controller address.
        addr: String,
        /// What the agent was waiting for.
        during: &'static str,
        /// The timeout that fired.
        after: Duration,
    },
    /// The artifact fetch failed once connected.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The key and certificate on disk cannot be read or switched.
    #[error("node identity: {0}")]
    Identity(#[from] IdentityError),
}

/// What enrollment stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enrolled {
    /// The node id the controller assigned.
    pub node_id: String,
    /// Certificate expiry (seconds since the Unix epoch).
    pub expires_at_unix: i64,
    /// Where the client certificate was written.
    pub cert_path: PathBuf,
}

/// An open AgentLink session.
#[derive(Debug)]
pub struct Session {
    /// The controller's answer to Hello.
    pub welcome: Welcome,
    /// Send heartbeats, progress and results here.
    pub outbound: mpsc::Sender<AgentMessage>,
    /// Commands from the controller.
    pub inbound: Streaming<ControllerMessage>,
}

/// Enrolls this node with the controller at `controller` using `token`, and
/// stores key, certificate, CA and node id in `state_dir`. `replace` takes
/// the name over from a live node that has it (which is then revoked);
/// without it the controller refuses a name in use.
pub async fn enroll(
    controller: &str,
    token: &str,
    state_dir: &Path,
    node_name: &str,
    replace: bool,
) -> Result<Enrolled, LinkError> {
    let token: JoinToken = token.parse()?;
    let target = Target::parse(controller)?;

    create_private_dir(state_dir)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    // The controller chooses the certificate's subject; the CN here only
    // helps a human reading the CSR.
    let csr_pem = csr_pem(&key, node_name)?;

    let config = pinned_config(&token.ca_sha256)?;
    let channel = connect_channel(&target, config).await?;
    let response = EnrollmentClient::new(channel)
        .enroll(EnrollRequest {
            join_token: token.to_string(),
            node_name: node_name.to_owned(),
            csr_pem,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            labels: Default::default(),
            replace,
        })
        .await
        .map_err(|status| LinkError::EnrollRefused(status_text(&status)))?
        .into_inner();

    // The TLS verifier already proved the server holds the pinned CA; check
    // that the CA we are told to trust from now on is that same one.
    let ca_der = CertificateDer::from_pem_slice(response.ca_pem.as_bytes())
        .map_err(|_| LinkError::BadPem("CA certificate"))?;
    let got = sha256_hex(&ca_der);
    if got != token.ca_sha256 {
        return Err(LinkError::CaMismatch {
            expected: token.ca_sha256,
            got,
        });
    }
    CertificateDer::from_pem_slice(response.cert_pem.as_bytes())
        .map_err(|_| LinkError::BadPem("client certificate"))?;

    write_file(&state_dir.join(CA_FILE), &response.ca_pem, 0o644)?;
    write_file(&state_dir.join(NODE_ID_FILE), &response.node_id, 0o644)?;
    // Key and certificate last, as one pair: the identity in place means
    // enrollment completed.
    identity::install(
        state_dir,
        &Pair {
            key_pem: key.serialize_pem(),
            cert_pem: response.cert_pem,
        },
    )?;
    let cert_path = state_dir.join(CERT_FILE);
    Ok(Enrolled {
        node_id: response.node_id,
        expires_at_unix: response.expires_at_unix,
        cert_path,
    })
}

/// Opens the AgentLink session with the identity enrolled in `state_dir`,
/// sends `hello` (an empty `node_id` is filled from the state dir) and waits
/// for the controller's Welcome.
pub async fn connect(
    controller: &str,
    state_dir: &Path,
    mut hello: Hello,
) -> Result<Session, LinkError> {
    if hello.node_id.is_empty() {
        hello.node_id = read_node_id(state_dir)?;
    }
    if hello.agent_version.is_empty() {
        hello.agent_version = env!("CARGO_PKG_VERSION").to_owned();
    }
    let channel = mtls_channel(controller, state_dir).await?;
    let (tx, rx) = mpsc::channel(OUTBOUND_QUEUE);
    // The queue is empty, so this cannot fail for lack of room.
    let _ = tx.try_send(AgentMessage {
        kind: Some(agent_message::Kind::Hello(hello)),
    });
    let mut inbound = AgentLinkClient::new(channel)
        .connect(ReceiverStream::new(rx))
        .await
        .map_err(|status| LinkError::SessionRefused(status_text(&status)))?
        .into_inner();
    let first = tokio::time::timeout(WELCOME_TIMEOUT, inbound.message())
        .await
        .map_err(|_| LinkError::NoWelcome)?
        .map_err(|status| LinkError::SessionRefused(status_text(&status)))?;
    match first {
        Some(ControllerMessage {
            kind: Some(controller_message::Kind::Welcome(welcome)),
        }) => Ok(Session {
            welcome,
            outbound: tx,
            inbound,
        }),
        Some(other) => Err(LinkError::Unexpected(format!("{:?}", other.kind))),
        None => Err(LinkError::NoWelcome),
    }
}

/// Renews this node's certificate over mTLS with a new key made here; the
/// new pair replaces the old one on disk in one atomic step
/// ([`identity::install`]: a crash leaves the old pair or the new one, never
/// a mix). The open session is not touched: the controller keeps the old
/// certificate valid until it expires. Returns the new expiry.
pub async fn renew(controller: &str, state_dir: &Path) -> Result<i64, LinkError> {
    let node_id = read_node_id(state_dir)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr_pem = csr_pem(&key, &node_id)?;
    let channel = mtls_channel(controller, state_dir).await?;
    let response = AgentLinkClient::new(channel)
        .renew(slipway_proto::v1::RenewRequest { csr_pem })
        .await
        .map_err(|status| LinkError::SessionRefused(status_text(&status)))?
        .into_inner();
    CertificateDer::from_pem_slice(response.cert_pem.as_bytes())
        .map_err(|_| LinkError::BadPem("client certificate"))?;
    let pair = Pair {
        key_pem: key.serialize_pem(),
        cert_pem: response.cert_pem,
    };
    let dir = state_dir.to_owned();
    // Files and fsyncs: off the runtime's workers.
    tokio::task::spawn_blocking(move || identity::install(&dir, &pair))
        .await
        .map_err(|e| LinkError::Unexpected(format!("identity install task failed: {e}")))??;
    Ok(response.expires_at_unix)
}

/// Fetches artifact `sha256` from the controller over mTLS into the app's
/// artifact cache `cache` ([`artifact::controller`]: the limits of
/// `limits`, everything checked before the file takes its name), on a
/// connection of its own.
pub async fn fetch_artifact(
    controller: &str,
    state_dir: &Path,
    sha256: &Sha256,
    command_id: &str,
    cache: &Path,
    limits: &ArtifactsConfig,
) -> Result<Fetched, LinkError> {
    let addr = Target::parse(controller)?.authority;
    let channel = tokio::time::timeout(limits.connect_timeout, mtls_channel(controller, state_dir))
        .await
        .map_err(|_| LinkError::Idle {
            addr: addr.clone(),
            during: "while connecting",
            after: limits.connect_timeout,
        })??;
    Ok(artifact::controller::fetch(channel, &addr, sha256, command_id, cache, limits).await?)
}

/// A CSR for `key` with `common_name` as its CN.
fn csr_pem(key: &KeyPair, common_name: &str) -> Result<String, LinkError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    Ok(params.serialize_request(key)?.pem()?)
}

/// The node id enrollment stored in `state_dir`.
fn read_node_id(state_dir: &Path) -> Result<String, LinkError> {
    Ok(read_file(&state_dir.join(NODE_ID_FILE))?.trim().to_owned())
}

/// Dials `controller` over mTLS with the identity enrolled in `state_dir`
/// (its CA as the only root, its certificate and key as the client).
async fn mtls_channel(controller: &str, state_dir: &Path) -> Result<Channel, LinkError> {
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
struct Target {
    /// `host:port` to dial.
    authority: String,
    /// Host part, checked against the server certificate.
    host: String,
}

impl Target {
    fn parse(text: &str) -> Result<Self, LinkError> {
        let bad = || LinkError::Address(text.to_owned());
        let rest = text.strip_prefix("https://").unwrap_or(text);
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains('/') || rest.contains("://") {
            return Err(bad());
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(bad)?;
            match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None if after.is_empty() => (host, None),
                None => return Err(bad()),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            }
        };
        let port: u16 = match port {
            Some(port) => port.parse().map_err(|_| bad())?,
            None => DEFAULT_PORT,
        };
        if host.is_empty() {
            return Err(bad());
        }
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Self {
            authority,
            host: host.to_owned(),
        })
    }
}

/// Dials `target` over TLS with `config` and sets up HTTP/2 for tonic.
///
/// tonic's own `ClientTlsConfig` cannot take a custom rustls config (the
/// pinned verifier), so TLS is done here by a connector and tonic sees a
/// plain `http://` endpoint over the already encrypted stream.
async fn connect_channel(target: &Target, config: Arc<ClientConfig>) -> Result<Channel, LinkError> {
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
fn pinned_config(ca_sha256: &str) -> Result<Arc<ClientConfig>, LinkError> {
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
    let mut roots = RootCertStore::empty();
    let ca = CertificateDer::from_pem_slice(ca_pem.as_bytes())
        .map_err(|_| LinkError::BadPem("CA certificate"))?;
    roots.add(ca)?;
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

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::of_bytes(bytes).into_string()
}

fn create_private_dir(dir: &Path) -> Result<(), LinkError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| LinkError::Io {
            path: dir.to_owned(),
            source,
        })
}

fn read_file(path: &Path) -> Result<String, LinkError> {
    fs::read_to_string(path).map_err(|source| LinkError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Temp file + fsync + rename + directory fsync (as [`durable::write_atomic`]),
/// with the mode set at creation so a key is never readable by others, even
/// for an instant. The temp file is removed on failure.
fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), LinkError> {
    let io_err = |source| LinkError::Io {
        path: path.to_owned(),
        source,
    };
    let tmp = durable::TempFile::new(durable::temp_sibling(path, "tmp"));
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp.path())
        .map_err(io_err)?;
    file.write_all(contents.as_bytes()).map_err(io_err)?;
    file.sync_all().map_err(io_err)?;
    tmp.persist(path).map_err(io_err)?;
    durable::fsync_parent(path).map_err(io_err)
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
