//! Slipway agent: the program on every droplet.
//!
//! It keeps each app's releases on disk and switches between them
//! atomically, runs the app (PM2, Docker, or a process it supervises),
//! holds each release to a health gate, and — when a controller is
//! configured — reports to it and runs its commands; with or without one.
//!
//! # Layout
//!
//! One room per concept, in layers: a module imports only from the layers
//! below it (and, within its own layer, from rooms that do not import it
//! back), so data flows one way, from the command line and the controller
//! down to files and processes. `tests/it/layers.rs` holds the table and fails
//! on an import that goes up or round in a circle.
//!
//! **L4 — entry points**
//! - [`cli`]: the `slipway-agent` command line: [`cli::args`] (what clap
//!   parses), each command run through the layers below, [`cli::demo`] (the
//!   walk-through behind `slipway-agent demo`) and the printing.
//!
//! **L3 — the long-running agent and its controller**
//! - [`link`]: the controller: dialling and TLS, enrollment and renewal, the
//!   node's identity on disk, the controller replicas (`urls`) and the one
//!   the session is on, the session `run` keeps up (a random replica first,
//!   the next one on failure, backoff and jitter), heartbeats, the controller's commands and their
//!   ledger, inotify on each app's state, and the agent's upgrade of its own
//!   binary with the guard that restores the old one.
//! - [`daemon`]: `slipway-agent run`: liveness checks, housekeeping (log
//!   rotation, disk pressure) and the controller session, until shutdown.
//!
//! **L2 — the pipeline**
//! - [`deploy`]: deploy, rollback, restart and prune of one app: the release
//!   store + its driver + the health gate + its logs. Every caller goes
//!   through a [`deploy::Deployer`].
//! - [`artifact`]: packing a directory into an artifact, and the app's
//!   artifact cache with its one verified writer, fed from a file, an HTTPS
//!   download or the controller.
//!
//! **L1 — the pieces of an app**
//! - [`release`]: the release store: paths, ids, journal, manifests, the
//!   content store, unpacking, shared links, hooks, the `current` switch,
//!   verify and prune, each step recorded in the journal; crash recovery.
//!   It knows nothing of drivers: undoing a deploy that went live asks a
//!   [`release::Service`], which [`deploy`] provides.
//! - [`driver`]: what runs the release `current` points at (PM2, Docker,
//!   exec).
//! - [`front`]: the agent's TCP proxy on an app's public address (docker,
//!   PM2 fork mode): a detached process per app, switched by a journalled
//!   target file once the new release is healthy, draining the old one.
//! - [`public`]: where an app is reached and which release receives its
//!   new connections (socket handover, agent proxy, PM2 cluster or its own
//!   port), from what holds the address now; for `status` and heartbeats.
//! - [`health`]: HTTP/TCP/exec probes, the readiness gate, liveness records.
//! - [`logs`]: rotation, compression and retention of the app's logs.
//! - [`metrics`]: node cpu, memory, load and disks (sysinfo) for `status`.
//! - [`supervise`]: the process the exec driver leaves running.
//! - [`upkeep`]: what `run` keeps about keeping each app running: a stop
//!   on purpose, the restarts it made (crash loops), and the node events
//!   (`APP_RESTORED`…) on their way to the controller.
//!
//! **L0 — foundations** (no calls upward)
//! - [`config`]: `agent.toml`, checked once into runtime values (an
//!   [`config::AppConfig`] per app, the `[artifacts]` CA certificates).
//! - [`durable`]: temp + fsync + rename writes every state file goes through.
//! - [`digest`]: sha256: one [`digest::Sha256`] type, file hashing, a hashing
//!   writer.
//! - [`listen`]: an app's public address (`listen`), checked, and the
//!   listening socket the agent binds for it.
//! - [`lock`]: `flock(2)`: one operation per app, the artifact cache pin.
//! - [`proc`]: runs a command with a deadline, bounded output and a kill
//!   policy for its whole process group (hooks, exec checks, `pm2`).
//! - [`bridge`]: how blocking code (a driver on a `spawn_blocking` thread)
//!   blocks on an async client: the daemon's runtime handle, or one runtime
//!   a one-shot command owns; handed down from whoever starts the work.
//! - [`envfile`]: `shared/.env` parsing (values never leave the node).
//! - [`error`]: an error and its causes on one line.
//! - [`fault`]: crash points for the crash-safety tests (`fault-injection`).
//! - [`version`]: the version and git commit of the build (`--version`, and
//!   what the agent reports to the controller; in test builds only, the
//!   trailer that gives a copy of the binary another one).

// L4
pub mod cli;

// L3
pub mod daemon;
pub mod link;

// L2
pub mod artifact;
pub mod deploy;

// L1
pub mod driver;
pub mod front;
pub mod health;
pub mod logs;
pub mod metrics;
pub mod public;
pub mod release;
pub mod supervise;
pub mod upkeep;

// L0
pub mod bridge;
pub mod config;
pub mod digest;
pub mod durable;
pub mod envfile;
pub mod error;
pub mod fault;
pub mod listen;
pub mod lock;
pub mod proc;
pub mod version;

/// The node identity ([`link::identity`]) at its older path, which the
/// controller's tests use.
pub use link::identity;
