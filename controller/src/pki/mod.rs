//! The controller's PKI: the CA that issues node and operator certificates,
//! the one rustls backend, and the TLS listener.

pub mod ca;
pub mod crypto;
pub mod rotation;
pub mod tls;
