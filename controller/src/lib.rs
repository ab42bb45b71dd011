//! Slipway controller: enrolls agents and holds their sessions, keeps the
//! fleet's state, runs rollouts across it, and serves the Control API the
//! `slipway` CLI calls. It speaks to agents and the CLI only through the
//! protocol in `slipway-proto`.
//!
//! # Layout
//!
//! Rooms (folders) and modules, in layers: each imports only from the
//! layers below it (and, inside a room, its own lower modules), so no two
//! rooms import each other.
//!
//! ```text
//! L0  audit      event shapes and types
//!     observe    the executor's duration histograms (process-wide)
//!     cli        the flags of `slipway-controller` (clap)
//!     pki/       crypto (the rustls backend, random ids, fingerprints) <
//!                ca (the CA(s) in the data dir; node, operator and server
//!                certificates) < rotation (CA rotation as data dir files)
//!                < tls (the listener; client trust and server certificate
//!                replaceable while serving; a refused client certificate
//!                goes to a callback, naming an expired one's subject)
//! L1  store/     the only code that speaks SQL, on SQLite (default) or
//!                PostgreSQL (`database_url`): one file per table family
//!                (nodes, join_tokens, api_tokens, operators, deployments,
//!                audit, controller_state); transactions stay inside its
//!                methods; the heartbeat shapes it stores (Metrics, App)
//!     artifacts  the content-addressed artifacts: the data dir, or for
//!                replicas the data dir caching `artifact_dir` or the
//!                store's chunks (uses store); digest checked on every read
//!     backup     encrypted backups of the data dir, restore, schedule
//!     secrets    the key file, the sealed data key, apps' environments and their tag layers
//!                sealed per version (AES-256-GCM) and rendered as `.env`
//! L2  auth/      token (join tokens) < apitoken (API tokens, the caller and
//!                its scopes) < operator (operator certificates) · oidc
//!                (GitHub Actions OIDC tokens: jwt < jwks < grants, the
//!                verifier; callers with the granted scopes)
//! L3  link/      liveness (heartbeat rules, pure) · replicas (this
//!                controller replica's record, liveness of the others, the
//!                sweep of dead replicas' deployments) < registry (live
//!                sessions, recorded per replica) < commands (routes answers to whoever sent the
//!                command) · routing (commands for nodes another replica
//!                holds, through the store; behind registry's `send`)
//!                < enroll, session (the Enrollment and AgentLink
//!                services; `enroll --replace` re-keys a node) · rotation
//!                (follows a CA rotation while serving: trust, server
//!                certificate, the bundle to every agent)
//! L4  fleet/     nodes (the fleet view, node revocation) · certs (the
//!                certificate health of the whole system) < status (the
//!                summary, pure) < wire (both as API messages)
//!     rollout/   policy (batches, next_step: pure) < plan < executor
//! L5  api/       the Control service: authorization, selection, streams;
//!                live (running deployments' events) < watch (following
//!                any deployment by id: live, else from the store)
//!     metrics    /metrics: the fleet, deployments and the controller in
//!                the Prometheus text format, with observe's histograms
//!     http/      axum: health, browser sessions, the JSON API (uses api/),
//!                /metrics (uses metrics), the web page
//!     digitalocean/  client (transport, retries, pages) < api (typed
//!                operations, checked answers) < config ([digitalocean]) <
//!                inventory (sync, retire, the droplets view), dns,
//!                firewall, create (join token + user data); its `commands`
//!                (the `droplets`/`dns`/`firewall`/`validate` commands) sit
//!                at L6 beside admin
//!     github/    client (transport, retries, Secret) < auth (App JWT →
//!                installation token, or a token) < api (typed operations)
//!                < config ([github], links, triggers) < webhook (pure:
//!                signature, events, matching) < status (the queue task the
//!                rollout's observer feeds) < hooks (a matched delivery →
//!                a deployment through api/); http/ serves /hooks/github
//! L6  config     checked ServeConfig · server (wires it all and serves) ·
//!     admin      token, operator, nodes, node revoke · Error (is_usage)
//! ```
//!
//! `main.rs` parses and dispatches; the `slipway` CLI (`src/bin/slipway/`)
//! uses `slipway-proto` only (its `client`, `view` and `cli` modules), not
//! this library.
//!
//! Data flow: agent ─TLS─▶ [`pki::tls::incoming`] ─▶ tonic ─▶
//! [`link::enroll`] / [`link::session`] ─▶ [`store`] (every refusal also
//! becomes an audit event). CLI ─TLS─▶ [`api`] ─▶ [`rollout`] ─▶
//! [`link::registry`] ─▶ agent sessions; their Progress / CommandResult ─▶
//! [`link::session`] ─▶ [`link::commands`] ─▶ the deployment, which records
//! results in the [`store`] and streams them to the CLI. Views ([`fleet`])
//! are read from the [`store`], so `slipway-controller nodes` works from
//! another process while `serve` runs.

/// The agent ⇄ controller protocol, re-exported so that the controller and
/// its tests name one set of message types.
pub use slipway_proto as proto;

pub mod admin;
pub mod api;
pub mod artifacts;
pub mod audit;
pub mod auth;
pub mod backup;
pub mod cli;
pub mod config;
pub mod digitalocean;
mod error;
pub mod fleet;
pub mod github;
pub mod http;
pub mod link;
pub mod metrics;
pub mod observe;
pub mod pki;
pub mod rollout;
pub mod secrets;
pub mod server;
pub mod store;
pub mod webapi;

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
