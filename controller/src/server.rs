//! `serve`: load the CA, open the store, and run both gRPC services on one
//! TLS listener until `shutdown` resolves.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use slipway_proto::v1::agent_link_server::AgentLinkServer;
use slipway_proto::v1::enrollment_server::EnrollmentServer;
use tokio::net::TcpListener;

use crate::ca::{Ca, CaError, NODE_CERT_VALIDITY};
use crate::config::ServeConfig;
use crate::enroll::EnrollmentService;
use crate::session::{AgentLinkService, DEFAULT_HEARTBEAT_INTERVAL};
use crate::store::{Store, StoreError};
use crate::tls::{self, TlsError};

/// Errors that stop the server from starting or running (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding the listen address failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The CA or server certificate could not be loaded or created.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The database could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The TLS configuration was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Binds `config.listen` and serves until `shutdown` resolves.
pub async fn run(
    config: ServeConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    serve(&config, listener, shutdown).await
}

/// Serves on an already bound listener (tests bind `127.0.0.1:0`).
pub async fn serve(
    config: &ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let ca = Arc::new(Ca::load_or_create(&config.data_dir)?);
    let identity = ca.server_identity(&config.data_dir, &[config.listen.ip().to_string()])?;
    let store = Store::open(&config.data_dir).await?;
    let tls_config = tls::server_config(&ca, &identity)?;
    let local = listener.local_addr().ok();
    tracing::info!(addr = ?local, ca_sha256 = %ca.fingerprint(), "controller listening");

    let enrollment = EnrollmentService::new(ca.clone(), store.clone(), NODE_CERT_VALIDITY);
    let link = AgentLinkService::new(store.clone(), DEFAULT_HEARTBEAT_INTERVAL);
    tonic::transport::Server::builder()
        .add_service(EnrollmentServer::new(enrollment))
        .add_service(AgentLinkServer::new(link))
        .serve_with_incoming_shutdown(tls::incoming(listener, tls_config, store), shutdown)
        .await?;
    Ok(())
}
