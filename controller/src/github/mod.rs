//! The GitHub side of push deploys (issue 13): a small typed client of the
//! GitHub REST API, a GitHub Deployment with statuses for every rollout of
//! a linked app, and webhook deliveries that start deployments.
//!
//! Why our own client: `octocrab` (the usual choice) brings reqwest or its
//! own hyper stack with a second TLS setup, and its retry layer does not
//! read `x-ratelimit-reset`; the dozen calls used here sit on the hyper +
//! tokio-rustls stack the controller already builds, as the DigitalOcean
//! client does (`crate::digitalocean`).
//!
//! # Layout
//!
//! ```text
//! client   transport: base URL, one HTTP/1 request with retries (429, 5xx,
//!          403 rate limits; retry-after, x-ratelimit-*), downloads that
//!          follow a redirect without the token, errors carrying GitHub's
//!          message and x-github-request-id; Secret (never shown)
//! auth     a GitHub App (RS256 JWT → installation token, cached, renewed
//!          before expiry) or a fine-grained token  (client < auth: the
//!          client asks auth for the header, auth mints through the client)
//! api      typed operations: deployments, deployment and commit statuses,
//!          commit of a ref, release asset download; Repo
//! config   [github]: credentials, webhook secret, per-app links, triggers,
//!          artifact sources
//! webhook  pure: signature (HMAC-SHA256, constant time), events, which
//!          apps an event starts, templates, sha256sum files
//! status   the queue task: rollout notes → GitHub calls, retried until a
//!          deadline, given up with an audit event; never blocks a rollout
//! hooks    a matched event → artifact → a deployment through the Control
//!          service, audited with its delivery id
//! ```
//!
//! The HTTP endpoint (`POST /hooks/github`) is in [`crate::http`].

pub mod api;
pub mod auth;
pub mod client;
pub mod config;
pub mod hooks;
pub mod status;
pub mod webhook;

pub use api::Repo;
pub use auth::{AppKey, Auth};
pub use client::{Client, GhError, RetryPolicy, Secret, Settings};
pub use config::GithubConfig;
pub use hooks::Hooks;
