//! The one rustls crypto backend of every Slipway TLS connection: ring.
//!
//! Exactly one backend: ring, the one tonic's `tls-ring` feature already
//! links. rustls' own default would pull in aws-lc-rs (a C/cmake build) and,
//! with two backends linked, `ServerConfig::builder()` panics at run time
//! because it cannot choose. Configs are built with [`provider`] explicitly.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The rustls backend; built once, so every TLS config and random id
/// shares it.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Installs [`provider`] as the process default, for any library code that
/// builds a rustls config without naming a provider. Called once at start-up
/// by a binary; a second call (tests starting several servers) is harmless.
pub fn install_default_provider() {
    // Err only means a default is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
