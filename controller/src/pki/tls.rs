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

use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
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
    let provider = crypto::provider();
    let mut roots = RootCertStore::empty();
    roots.add(ca.cert_der().clone())?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(cert));
    // gRPC is HTTP/2; without ALPN some clients would try HTTP/1.1.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
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
    R: Fn(SocketAddr, String) -> F + Clone + Send + 'static,
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
                        Some(message) => {
                            tracing::warn!(%peer, "{message}");
                            refused(peer, message).await;
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
fn refused_certificate(err: &io::Error) -> Option<String> {
    let rustls_err = err
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    let Some(rustls::Error::InvalidCertificate(reason)) = rustls_err else {
        return None;
    };
    Some(format!("client certificate refused: {reason:?}"))
}
