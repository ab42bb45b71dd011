//! The controller's TLS listener.
//!
//! One port serves both services. Client certificates are *optional* at the
//! TLS layer (`allow_unauthenticated`) because an enrolling node has none
//! yet; but any certificate that *is* presented must chain to our CA and be
//! within its validity, or the handshake fails. The AgentLink handlers then
//! refuse every request whose connection carries no verified certificate
//! (see [`crate::link::session`]). A second port just for enrollment would also
//! work, but would double the firewall rules and cloud-init settings for
//! every droplet.
//!
//! We accept TLS ourselves (tokio-rustls) rather than through tonic's
//! `ServerTlsConfig` so that a refused client certificate is reported (the
//! server audits it): tonic would drop the failed connection silently.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::pki::ca::{Ca, ServerIdentity};
use crate::pki::crypto;

/// A client that has not finished its handshake by then is dropped, so idle
/// sockets cannot pile up.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after a failed `accept` (e.g. out of file descriptors) before trying
/// again, instead of spinning.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Handshaken connections waiting for tonic to pick them up.
const ACCEPTED_QUEUE: usize = 64;

/// Errors building the TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the certificates or key.
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The server certificate every new handshake presents, replaceable while
/// serving: a renewed certificate is [`ServerCert::set`] here and the next
/// handshake uses it, while connections already made keep theirs.
#[derive(Clone)]
pub struct ServerCert(Arc<RwLock<Arc<CertifiedKey>>>);

impl std::fmt::Debug for ServerCert {
    // Hand-written so the private key never ends up in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert").finish_non_exhaustive()
    }
}

impl ServerCert {
    /// Holds `identity`.
    pub fn new(identity: &ServerIdentity) -> Result<Self, TlsError> {
        Ok(Self(Arc::new(RwLock::new(certified(identity)?))))
    }

    /// Presents `identity` from the next handshake on.
    pub fn set(&self, identity: &ServerIdentity) -> Result<(), TlsError> {
        let key = certified(identity)?;
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = key;
        Ok(())
    }
}

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.0.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

fn certified(identity: &ServerIdentity) -> Result<Arc<CertifiedKey>, TlsError> {
    let key = crypto::provider()
        .key_provider
        .load_private_key(identity.key())?;
    let certified = CertifiedKey::new(identity.chain.clone(), key);
    // The key must be the certificate's, as with_single_cert would check.
    certified.keys_match()?;
    Ok(Arc::new(certified))
}

/// The rustls server configuration: our chain (from `cert`, which may be
/// renewed while serving), optional client certificates verified against
/// our CA, HTTP/2 only.
pub fn server_config(ca: &Ca, cert: ServerCert) -> Result<Arc<ServerConfig>, TlsError> {
    Ok(server_config_with_trust(ca, cert)?.0)
}

/// [`server_config`], and the handle that changes which CAs its client
/// certificates may chain to while it serves (a CA rotation).
pub fn server_config_with_trust(
    ca: &Ca,
    cert: ServerCert,
) -> Result<(Arc<ServerConfig>, ClientTrust), TlsError> {
    let provider = crypto::provider();
    let trust = ClientTrust(Arc::new(RwLock::new(client_verifier(&ca.trusted())?)));
    let verifier = Arc::new(NamingVerifier(trust.clone()));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(cert));
    // gRPC is HTTP/2; without ALPN some clients would try HTTP/1.1.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(config), trust))
}

fn client_verifier(
    cas: &[CertificateDer<'static>],
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone())?;
    }
    Ok(
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crypto::provider())
            .allow_unauthenticated()
            .build()?,
    )
}

/// The CAs client certificates may chain to, replaceable while serving:
/// from the next handshake on; connections already made are not touched.
#[derive(Clone)]
pub struct ClientTrust(Arc<RwLock<Arc<dyn ClientCertVerifier>>>);

impl std::fmt::Debug for ClientTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTrust").finish_non_exhaustive()
    }
}

impl ClientTrust {
    /// Trusts exactly `cas` from the next handshake on.
    pub fn set(&self, cas: &[CertificateDer<'static>]) -> Result<(), TlsError> {
        let verifier = client_verifier(cas)?;
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = verifier;
        Ok(())
    }

    fn get(&self) -> Arc<dyn ClientCertVerifier> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Why a client certificate that names someone was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertProblem {
    /// Past its not-after.
    Expired,
    /// Not from a CA the controller trusts (one a CA rotation dropped).
    UntrustedIssuer,
}

/// A client certificate refused because it has expired or comes from a CA
/// no longer trusted: whose, so the refusal can say who must re-enroll.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedClientCert {
    /// Why.
    pub problem: ClientCertProblem,
    /// The certificate's common name: a node id (`n-…`) or an operator id
    /// (`op-…`); "" if it has none. Its own claim unless `verified`.
    pub subject: String,
    /// The certificate chains to a CA the controller trusts (an expired
    /// certificate checked as of its last valid second): the subject is
    /// the CA's word, not the peer's.
    pub verified: bool,
    /// Its not-after (seconds since the epoch).
    pub not_after: i64,
    /// When it was refused (seconds since the epoch).
    pub refused_at: i64,
}

impl std::fmt::Display for RefusedClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown =
            slipway_proto::limits::one_line(&self.subject, slipway_proto::limits::MAX_NODE_NAME);
        let subject = if self.subject.is_empty() {
            "(no name)".to_owned()
        } else if self.verified {
            shown.clone()
        } else {
            format!("(claiming to be {shown})")
        };
        match self.problem {
            ClientCertProblem::Expired => write!(
                f,
                "client certificate of {subject} expired {} ago (not after {})",
                slipway_proto::span(self.refused_at - self.not_after),
                crate::rfc3339(self.not_after)
            ),
            ClientCertProblem::UntrustedIssuer => write!(
                f,
                "client certificate {subject} is not from a CA this controller trusts \
                 (one a CA rotation dropped?)"
            ),
        }
    }
}

impl std::error::Error for RefusedClientCert {}

/// A refused client certificate: the message, and the expiry details when
/// that is why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Why, as rustls or [`ExpiredClientCert`] says it.
    pub message: String,
    /// Set when the certificate had expired or came from a CA no longer
    /// trusted.
    pub named: Option<RefusedClientCert>,
}

/// The WebPKI client verifier, except that an expired certificate's error
/// names its subject (rustls' own says only when it expired), so the
/// controller can tell which node must re-enroll.
#[derive(Debug)]
struct NamingVerifier(ClientTrust);

impl ClientCertVerifier for NamingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.0.get().offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.get().client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        // No hints: clients present the one certificate they have.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .get()
            .verify_client_cert(end_entity, intermediates, now)
            .map_err(|err| {
                let problem = match &err {
                    rustls::Error::InvalidCertificate(
                        CertificateError::Expired | CertificateError::ExpiredContext { .. },
                    ) => ClientCertProblem::Expired,
                    rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                        ClientCertProblem::UntrustedIssuer
                    }
                    _ => return err,
                };
                let not_after =
                    crate::pki::ca::validity_of(end_entity).map_or(0, |(_, not_after)| not_after);
                // Expired, but ours? Checked as of its last valid second.
                let verified = problem == ClientCertProblem::Expired
                    && u64::try_from(not_after - 1).is_ok_and(|last| {
                        self.0
                            .get()
                            .verify_client_cert(
                                end_entity,
                                intermediates,
                                UnixTime::since_unix_epoch(Duration::from_secs(last)),
                            )
                            .is_ok()
                    });
                {
                    let expired = RefusedClientCert {
                        problem,
                        verified,
                        subject: crate::pki::ca::common_name_of(end_entity).unwrap_or_default(),
                        not_after,
                        refused_at: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
                    };
                    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(
                        Arc::new(expired),
                    )))
                }
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.get().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.get().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.get().supported_verify_schemes()
    }
}

/// Accepts TCP connections, runs the TLS handshakes concurrently, and yields
/// the finished ones to tonic. Stops when tonic drops the stream (shutdown).
///
/// A handshake that failed because of the client's certificate is passed
/// to `refused` (the peer and why, e.g. to audit it); other failures (port
/// scanners, plain HTTP) are only logged, so they cannot flood the audit log.
pub fn incoming<R, F>(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    refused: R,
) -> ReceiverStream<Result<TlsStream<TcpStream>, io::Error>>
where
    R: Fn(SocketAddr, Refusal) -> F + Clone + Send + 'static,
    F: Future<Output = ()> + Send,
{
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    let acceptor = TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            };
            // Small gRPC frames (heartbeats) should go out at once.
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let refused = refused.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(err)) => match refused_certificate(&err) {
                        Some(refusal) => {
                            tracing::warn!(%peer, "{}", refusal.message);
                            refused(peer, refusal).await;
                        }
                        None => tracing::debug!(%peer, %err, "tls handshake failed"),
                    },
                    Err(_) => tracing::debug!(%peer, "tls handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Why the client's certificate was refused, if that is why the handshake
/// failed.
fn refused_certificate(err: &io::Error) -> Option<Refusal> {
    let rustls_err = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let Some(rustls::Error::InvalidCertificate(reason)) = rustls_err else {
        return None;
    };
    if let CertificateError::Other(OtherError(other)) = reason {
        if let Some(named) = other.downcast_ref::<RefusedClientCert>() {
            return Some(Refusal {
                message: named.to_string(),
                named: Some(named.clone()),
            });
        }
    }
    Some(Refusal {
        message: format!("client certificate refused: {reason:?}"),
        named: None,
    })
}
