//! Slipway agent: the program on every droplet.
//!
//! It keeps each app's releases on disk and switches between them atomically,
//! with or without a controller. Later modules run the app (PM2, Docker),
//! check its health and talk to the controller.
//!
//! # Layout
//!
//! - [`config`]: `agent.toml`, checked into an [`config::AppConfig`] per app
//!   (release settings, `[run]` driver, `[health]` check).
//! - [`release`]: the release store. A [`release::Store`] gives a locked
//!   [`release::Session`] (after crash recovery) that deploys, rolls back and
//!   prunes; its submodules are the pieces of a deploy, in order: `unpack`
//!   (artifact → staging, with `objects` as the content store and `manifest`
//!   as the record), `shared` (links), `hooks`, `activate` (the symlink
//!   switch), all recorded step by step in `journal` under `lock`.
//! - [`driver`]: runs the release `current` points at (PM2, Docker, exec);
//!   the deploy calls it after the switch and [`health`] gates the result.
//! - [`health`]: HTTP/TCP/exec probes, the readiness gate, liveness records.
//! - [`supervise`]: the process the exec driver leaves running.
//! - [`link`]: the controller session: enroll (join token + a key made here
//!   → client certificate), mTLS connect, certificate renewal.
//! - [`identity`]: the node's key and certificate on disk, switched as one
//!   pair atomically; recovery and migration of older layouts at start.
//! - [`liveness`]: `slipway-agent run`, the long-running loop.
//! - [`logs`]: rotation, compression and retention of the app's logs.
//! - [`commands`]: deploy, rollback, prune, restart and status commands
//!   from the controller, idempotent per command id.
//! - [`uplink`]: the session `run` keeps with the controller (heartbeats,
//!   reconnect with backoff and jitter).
//! - [`state_watch`]: inotify on each app's `current` and journal, so
//!   `uplink` heartbeats at once after a node-local deploy or rollback.
//! - [`metrics`]: node cpu, memory, load and disks (sysinfo) for `status`.
//! - [`envfile`]: `shared/.env` parsing (values never leave the node).
//! - [`durable`]: temp + fsync + rename writes every state file goes through.
//! - [`bridge`]: how blocking code (a driver on a `spawn_blocking` thread)
//!   blocks on an async client: the daemon's runtime handle, or one runtime
//!   a one-shot command owns; handed down from whoever starts the work.
//! - [`proc`]: runs a command with a deadline, bounded output and a kill
//!   policy for its whole process group (exec health checks, hooks, `pm2`).
//! - [`artifact`]: packing a directory into a reproducible artifact.
//! - [`download`]: artifacts fetched from an HTTPS URL + sha256 into the
//!   app's artifact cache (deploy by URL, from the CLI or the controller).
//! - [`cli`]: the `slipway-agent` command line over the modules above.
//! - [`demo`]: the self-contained walk-through behind `slipway-agent demo`.
//! - [`fault`]: crash points for the crash-safety tests.

pub mod artifact;
pub mod bridge;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod deploy;
pub mod digest;
pub mod driver;
pub mod durable;
pub mod envfile;
pub mod error;
pub mod fault;
pub mod health;
pub mod link;
pub mod lock;
pub mod logs;
pub mod metrics;
pub mod proc;
pub mod release;
pub mod supervise;

/// The node identity keeps its old path for the controller's tests.
pub use link::identity;
