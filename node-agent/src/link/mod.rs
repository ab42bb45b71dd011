//! The agent's link to the controller: enrollment, the mTLS session kept
//! up by `slipway-agent run`, the commands that come on it and the
//! heartbeats that go back.
//!
//! - [`tls`]: dialling the controller — the pinned CA at enrollment, the
//!   enrolled identity (mTLS) after; HTTP/2 keepalive on every connection.
//! - [`enroll`](mod@enroll): enrollment with a join token, certificate renewal.
//! - [`identity`]: the node's key and certificate on disk, switched as one
//!   pair atomically; recovery and migration of older layouts at start.
//! - [`replicas`]: the controller replicas (`[controller] url` or `urls`),
//!   the one the session is on, and the order every other call to the
//!   controller tries them in; the session's state for `status`.
//! - [`session`]: the AgentLink stream ([`connect`]) and the loop that keeps
//!   it up (a random replica first, the next one on failure, backoff and
//!   jitter; heartbeats, renewal).
//! - [`commands`]: deploy, rollback, prune, restart, stop, start and status
//!   commands from the controller, recorded in the [`ledger`] so each runs
//!   once.
//! - node events (repairs, crash loops, automatic rollbacks that `run`
//!   made, kept in each app's `.slipway/events.json` by
//!   [`crate::upkeep`]) go out on every session until the controller
//!   acknowledges them ([`session`]).
//! - [`heartbeat`]: the node's metrics and every app's state, for the
//!   controller.
//! - [`upgrade`]: the agent replacing its own binary for the controller
//!   (`AgentUpgrade`), and the guard that restores the old one.
//! - [`watch`]: inotify on each app's `current` and journal, so a
//!   node-local deploy or rollback is heartbeated at once.
//!
//! Data flows one way: `session` hands controller messages to `commands`,
//! which run them through the deploy pipeline ([`crate::deploy`]); nothing
//! here is below it.

pub mod commands;
pub mod enroll;
pub mod heartbeat;
pub mod identity;
pub mod ledger;
pub mod metadata;
pub mod replicas;
pub mod session;
pub mod tls;
pub mod upgrade;
pub mod watch;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use slipway_proto::join_token::ParseJoinTokenError;

use self::identity::IdentityError;
use crate::artifact::controller::FetchError;

pub use enroll::{enroll, renew, Enrolled};
pub use session::{connect, Session};

/// The node's private key (mode 0600): a link into the identity in use
/// ([`identity`]), or a plain file in an older agent's layout.
pub const KEY_FILE: &str = identity::KEY_FILE;
/// The node's client certificate (as [`KEY_FILE`]).
pub const CERT_FILE: &str = identity::CERT_FILE;
/// The controller CA, verified against the join token's pin at enrollment.
pub const CA_FILE: &str = "ca.pem";
/// The node id the controller assigned (also the certificate's CN).
pub const NODE_ID_FILE: &str = "node-id";
/// Port used when the controller address has none.
pub const DEFAULT_PORT: u16 = crate::config::DEFAULT_CONTROLLER_PORT;

/// Errors from enrolling or connecting.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The join token is malformed.
    #[error(transparent)]
    Token(#[from] ParseJoinTokenError),
    /// `[controller]` names no address to try (the config checks refuse
    /// such a file; a caller that built its own config may not).
    #[error("no controller address is configured")]
    NoController,
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
