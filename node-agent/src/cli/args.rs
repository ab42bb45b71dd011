//! The command line as clap parses it: [`Cli`] and its [`Command`]s.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;

#[derive(Debug, Parser)]
#[command(
    name = "slipway-agent",
    version,
    about = "Slipway node agent: atomic releases with node-local rollback",
    after_help = "Exit codes: 0 success, 1 operation failed, 64 bad usage or configuration."
)]
pub struct Cli {
    /// Agent configuration file.
    #[arg(long, global = true, env = "SLIPWAY_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// More log output on stderr (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Deploy an artifact (.tar.gz, .tar.zst or .tar) as a new release, from
    /// a local file (--artifact) or downloaded from an https:// URL (--url,
    /// which needs --sha256; see `[artifacts]` in agent.toml).
    Deploy {
        #[arg(long)]
        app: String,
        #[arg(long, required_unless_present = "url")]
        artifact: Option<PathBuf>,
        /// Download the artifact from this https:// URL into the app's
        /// artifact cache (not again when its sha256 is already cached).
        #[arg(long, conflicts_with = "artifact", requires = "sha256")]
        url: Option<String>,
        /// Expected sha256 of the artifact; the deploy is refused on mismatch.
        #[arg(long)]
        sha256: Option<String>,
        /// Release id (default: UTC timestamp + short artifact hash).
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Switch back to the previous good release, or to --to ID.
    Rollback {
        #[arg(long)]
        app: String,
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List an app's releases.
    Releases {
        #[arg(long)]
        app: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove old releases, keeping N good ones (default: the app's `keep`).
    Prune {
        #[arg(long)]
        app: String,
        #[arg(long)]
        keep: Option<usize>,
        /// Instead: free space as under disk pressure (images of releases
        /// gone, rotated logs past retention, cached artifacts, store
        /// objects) until free space is above the app's disk_pressure_free.
        #[arg(long, conflicts_with = "keep")]
        pressure: bool,
        #[arg(long)]
        json: bool,
    },
    /// The app's log files and their rotation state; --rotate rotates the
    /// ones that are due (--force: every non-empty one).
    Logs {
        #[arg(long)]
        app: String,
        #[arg(long)]
        rotate: bool,
        #[arg(long, requires = "rotate")]
        force: bool,
        #[arg(long)]
        json: bool,
    },
    /// Re-hash a release (default: current) against its manifest.
    Verify {
        #[arg(long)]
        app: String,
        #[arg(long)]
        id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Every app's state on this node: releases, processes, health, and the
    /// node's cpu, memory, load and disks.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Restart the current release through the app's driver, then run the
    /// health gate.
    Restart {
        #[arg(long)]
        app: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop the app's processes on purpose (the release files stay):
    /// `run` leaves it stopped — no repair, no restart — until `start`.
    Stop {
        #[arg(long)]
        app: String,
    },
    /// Run an app stopped on purpose (or crashlooping) again: clears the
    /// stop and the restart record, restarts the current release through
    /// its driver and runs the health gate.
    Start {
        #[arg(long)]
        app: String,
        #[arg(long)]
        json: bool,
    },
    /// Run the agent: liveness checks, log rotation and disk-pressure
    /// pruning for every app, until SIGTERM.
    Run {
        /// Once every app's logs are watched (and the first housekeeping
        /// pass is done), write `ready` to FILE, atomically: for scripts and
        /// tests that must not act before the agent does.
        #[arg(long, value_name = "FILE")]
        ready_file: Option<PathBuf>,
    },
    /// Enroll this node with a controller using a one-time join token (from
    /// `slipway-controller token create`). The key is made here and never
    /// leaves the node.
    Enroll {
        /// host:port or https://host:port of the controller.
        #[arg(long, env = "SLIPWAY_CONTROLLER")]
        controller: String,
        #[arg(long, env = "SLIPWAY_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// Where the key, certificate and CA are kept.
        #[arg(long, default_value = "/var/lib/slipway-agent")]
        state_dir: PathBuf,
        /// This node's name (default: the host name): 1 to 253 letters,
        /// digits, . _ - starting with a letter or digit, unique among the
        /// controller's live nodes.
        #[arg(long)]
        name: Option<String>,
        /// Take the name over from the live node that has it (e.g. this
        /// droplet rebuilt): that node is revoked, and the controller audits
        /// it as NODE_REPLACED.
        #[arg(long)]
        replace: bool,
    },
    /// Pack a directory into an artifact (.tar.gz, or .tar.zst by extension)
    /// and print its sha256.
    Pack {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Run an app's command and keep it running (started by the exec driver).
    #[command(hide = true)]
    Supervise {
        /// The app root (its `current/` is the working directory).
        #[arg(long)]
        root: PathBuf,
        /// Milliseconds between SIGTERM and SIGKILL when stopping.
        #[arg(long, default_value_t = 10_000)]
        grace_ms: u64,
        /// Hold this public address and hand it to each child (socket
        /// activation); a new release starts beside the old one.
        #[arg(long)]
        listen: Option<String>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Hold an app's public address and forward it to the live release
    /// (started by a deploy of a docker or pm2 fork app with listen).
    #[command(hide = true)]
    Front {
        #[arg(long)]
        root: PathBuf,
        #[arg(long)]
        listen: String,
    },
    /// Exec COMMAND with stdin and stdout as socket-activation fds 3 and 4
    /// (started by the supervisor for each child).
    #[command(hide = true)]
    SocketExec {
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Guard an agent upgrade (started by the agent from its old binary):
    /// wait for the new agent's commit, else restore the old binary and
    /// restart the agent.
    #[command(hide = true)]
    UpgradeGuard {
        /// The agent's controller state dir (its `upgrade/` record).
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Walk through deploy, releases, rollback and prune in a scratch directory.
    Demo {
        /// Directory to work in (default: a new temp dir, kept afterwards).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// What runs the sample app.
        #[arg(long, value_enum, default_value = "auto")]
        driver: DemoDriver,
    },
}

/// Which driver runs the demo app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoDriver {
    /// PM2 if `pm2` is on PATH, else exec.
    Auto,
    Pm2,
    Exec,
}
