//! Slipway controller.
//!
//! The controller owns the fleet view, rollouts, the enrollment CA and the
//! integrations (GitHub, DigitalOcean). It speaks to agents only through the
//! protocol in `slipway-proto`.
//!
//! # Layout
//!
//! - [`cli`] / [`config`]: flags and the TOML file, checked into
//!   [`config::ServeConfig`].
//! - [`server`]: `serve` wires everything: loads the [`ca`], opens the
//!   [`store`], builds the [`tls`] listener and mounts the three services
//!   ([`enroll`], [`session`], [`api`]).
//! - [`ca`]: the CA (rcgen) in the data dir; server certificate; signs node
//!   CSRs. [`crypto`]: the one rustls backend (ring), randomness, fingerprints.
//! - [`tls`]: accepts TLS (client certificate optional, verified against the
//!   CA when present) and audits refused client certificates.
//! - [`enroll`]: Enrollment service: [`token`] + CSR → node + certificate.
//! - [`session`]: AgentLink service: identifies the node by its verified
//!   certificate, checks the Hello, answers with a Welcome, stores
//!   heartbeats; renews certificates. [`registry`]: the live sessions
//!   (closed on revocation, replacement, shutdown). [`liveness`]: pure rules
//!   for the heartbeat interval and a node's state.
//! - [`api`]: Control service for the `slipway` CLI (API tokens from
//!   [`apitoken`], or client certificates from [`operator`]): nodes, audit, artifact upload, deploy and rollback.
//!   [`deploy`]: runs the rollout (all at once, rolling, canary: pure
//!   batch planning and `next_step`), sends one command per node through
//!   the [`registry`], routes the agents' progress and results back by
//!   command id, stops and rolls back on too many failures, records
//!   per-node results and the outcome (one deployment per app at a time). [`artifacts`]: the
//!   content-addressed artifact store (upload, and FetchArtifact for agents).
//!   [`client`]: the CLI's TLS channel (`src/bin/slipway.rs`).
//! - [`fleet`]: the fleet view (`nodes`) and `node revoke`, from the
//!   database only, so they work from another process while `serve` runs.
//! - [`store`]: SQLite through sqlx (nodes and their certificates, join
//!   tokens, the controller's start record, audit events);
//!   [`audit`]: the audit event shape and types.
//! - [`proto`]: the agent ⇄ controller protocol, re-exported so that the
//!   controller and its tests name one set of message types.
//!
//! Data flow: agent ─TLS─▶ [`tls::incoming`] ─▶ tonic ─▶ [`enroll`] /
//! [`session`] ─▶ [`store`] (every refusal also becomes an audit event).
//! CLI ─TLS─▶ [`api`] ─▶ [`deploy`] ─▶ [`registry`] ─▶ agent sessions;
//! their Progress / CommandResult ─▶ [`session`] ─▶ [`deploy::Commands`] ─▶
//! the CLI's event stream and [`store`].

pub use slipway_proto as proto;

pub mod admin;
pub mod api;
pub mod artifacts;
pub mod audit;
pub mod auth;
pub mod cli;
pub mod config;
mod error;
pub mod fleet;
pub mod link;
pub mod pki;
pub mod rollout;
pub mod server;
pub mod store;

pub use error::Error;

/// Seconds since the Unix epoch, the unit of every stored timestamp.
pub(crate) fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A stored timestamp as RFC 3339 (UTC), or the number if out of range.
pub(crate) fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

/// The caller's address as text ("unknown" if tonic has none): the actor of
/// audit events written before the caller is identified.
pub(crate) fn peer_addr<T>(request: &tonic::Request<T>) -> String {
    request
        .remote_addr()
        .map_or_else(|| "unknown".to_owned(), |a| a.to_string())
}
