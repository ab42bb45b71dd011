//! Command line of `slipway-controller`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The Slipway controller: fleet state, enrollment CA and the agent link.
///
/// Exit codes: 0 success, 64 bad configuration or arguments, 1 any other
/// failure.
#[derive(Debug, Parser)]
#[command(version = env!("SLIPWAY_BUILD_VERSION"))]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// The store, for every command that opens it: unset for SQLite in the
    /// data dir (the default), or postgres://USER:PASSWORD@HOST:PORT/DB
    /// (config: database_url). Prefer the environment variable: a flag is
    /// visible to every user of the machine in the process list.
    #[arg(
        long,
        global = true,
        env = "SLIPWAY_DATABASE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub database_url: Option<String>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller (enrollment and agent links on one TLS port).
    Serve(ServeArgs),
    /// Manage join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Show the fleet: state, last heartbeat, agent version and RSS, host
    /// metrics and apps of every node (works while `serve` runs).
    Nodes(NodesArgs),
    /// Print the fleet's Prometheus metrics from the database (for
    /// node_exporter's textfile collector; works while `serve` runs). A
    /// running `serve` also answers /metrics with its sessions, its own
    /// CPU and memory, and the deployment durations it saw.
    Metrics(MetricsArgs),
    /// Act on one node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Manage operator client certificates for the `slipway` CLI.
    #[command(subcommand)]
    Operator(OperatorCommand),
    /// Write an encrypted backup of the data dir (database snapshot, CA,
    /// server certificate) while `serve` runs.
    Backup(BackupArgs),
    /// Make a new data dir from a backup: a controller started on it is the
    /// same controller to every agent (same CA and server names).
    Restore(RestoreArgs),
    /// The CA: rotate it in phases while `serve` runs.
    #[command(subcommand)]
    Ca(CaCommand),
    /// The DigitalOcean fleet: droplets of the `[digitalocean]` fleet tags.
    #[command(subcommand)]
    Droplets(crate::digitalocean::commands::DropletsCommand),
    /// DNS records that follow the fleet (DigitalOcean domains).
    #[command(subcommand)]
    Dns(crate::digitalocean::commands::DnsCommand),
    /// The fleet firewall at DigitalOcean.
    #[command(subcommand)]
    Firewall(crate::digitalocean::commands::FirewallCommand),
    /// Check the config file and the credentials it names (the
    /// DigitalOcean token, against the API): one ✓/✗ line each.
    Validate(crate::digitalocean::commands::ValidateArgs),
}

/// `ca` subcommands.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Rotate the CA: `start` trusts a new CA beside the old one and sends
    /// it to every agent, which renew onto it; `finish` drops the old CA.
    #[command(subcommand)]
    Rotate(RotateCommand),
}

/// `ca rotate` subcommands.
#[derive(Debug, Subcommand)]
pub enum RotateCommand {
    /// Make a new CA, trusted beside the current one; new node and operator
    /// certificates come from it, agents get the bundle and renew onto it.
    Start(RotateStartArgs),
    /// Drop the old CA: its certificates are refused from then on; the
    /// server certificate moves to the new CA.
    Finish(RotateFinishArgs),
}

/// `ca rotate start` flags.
#[derive(Debug, Args)]
pub struct RotateStartArgs {
    /// The controller's data directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Agents renew onto the new CA as soon as they have it, instead of at
    /// their next renewal.
    #[arg(long)]
    pub now: bool,
}

/// `ca rotate finish` flags.
#[derive(Debug, Args)]
pub struct RotateFinishArgs {
    /// The controller's data directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Finish even though some live nodes are still on the old CA (they
    /// will need `slipway-agent enroll --replace`).
    #[arg(long)]
    pub force: bool,
}

/// `backup` flags.
#[derive(Debug, Args)]
pub struct BackupArgs {
    /// The controller's data directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The backup file to write (replaced atomically if it exists).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Encrypt to the passphrase on the first line of FILE (at least 8
    /// characters; never give it on the command line).
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Encrypt to this age public key (age1...): only the holder of its
    /// identity can restore.
    #[arg(long, value_name = "AGE_PUBLIC_KEY")]
    pub recipient: Option<String>,
    /// Print what was written as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `restore` flags.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup file.
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
    /// The new data directory: must not exist, or be empty.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Decrypt with the passphrase on the first line of FILE.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Decrypt with this age identity file (from `age-keygen`).
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
}

/// `operator` subcommands.
#[derive(Debug, Subcommand)]
pub enum OperatorCommand {
    /// Issue a client certificate for the `slipway` CLI (`--cert`/`--key`)
    /// with scopes, like an API token's. Writes NAME.pem (and NAME.key,
    /// mode 0600, unless --csr gives a key made elsewhere) into --out.
    Create(OperatorCreateArgs),
    /// List operator certificates.
    List(ListArgs),
    /// Revoke an operator certificate: calls with it are refused from the
    /// next one on.
    Revoke(RevokeArgs),
}

/// `operator create` flags.
#[derive(Debug, Args)]
pub struct OperatorCreateArgs {
    /// The controller's data directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Who holds it, e.g. ci-github or alice (letters, digits, . _ -).
    pub name: String,
    /// What it may do: `read`, `deploy:APP` or `agent-upgrade`; repeatable or
    /// comma-separated.
    #[arg(long = "scope", value_name = "SCOPE", required = true)]
    pub scopes: Vec<String>,
    /// How long the certificate is valid: 12h, 30d, ...
    #[arg(long, default_value = "90d")]
    pub ttl: String,
    /// A PEM certificate signing request whose key stays with the operator;
    /// without it a key is made here and written next to the certificate.
    #[arg(long, value_name = "FILE")]
    pub csr: Option<PathBuf>,
    /// Directory to write NAME.pem (and NAME.key) into (created if missing).
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub out: PathBuf,
}

/// Flags of the `list` subcommands.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// The controller's data directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Flags of the `revoke` subcommands.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The controller's data directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Which one: its id (or, for operators, a name only one live operator
    /// has; for API tokens, the whole token text).
    pub id: String,
}

/// `nodes` flags.
#[derive(Debug, Args)]
pub struct NodesArgs {
    /// The controller's data directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Print JSON (an array of nodes) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `metrics` flags.
#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// The controller's data directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
}

/// `node` subcommands.
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// Revoke a node: its certificates are refused from now on and a running
    /// `serve` closes its stream within seconds. Cannot be undone; the
    /// droplet must enroll again with a new join token.
    Revoke(NodeRevokeArgs),
}

/// `node revoke` flags.
#[derive(Debug, Args)]
pub struct NodeRevokeArgs {
    /// The controller's data directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Node id (n-...), or its name if no other node has that name.
    pub node: String,
}

/// `serve` flags; each may instead come from the `--config` file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML file with the same keys (data_dir, listen) plus heartbeats_per_sec
    /// (fleet-wide target, default 50), unreachable_after_intervals
    /// (default 3), max_followers (deployment followers per replica, default
    /// 256) and max_followers_per_caller (default 16); flags win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for the CA, keys and database (created mode 0700).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7443].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// A DNS name or IP address agents and the CLI reach the controller by,
    /// put into its server certificate (repeatable; adds to the file's
    /// `server_names`). The listen address, or with 0.0.0.0 / [::] every
    /// local interface address and the host name, are always included.
    #[arg(long = "server-name", value_name = "NAME")]
    pub server_names: Vec<String>,
    /// Lifetime of the TLS server certificate [default: 365d]. It is renewed
    /// while serving at two thirds of it, and at start when past that.
    #[arg(long, value_name = "DURATION")]
    pub server_cert_validity: Option<String>,
    /// Lifetime of node certificates issued at enrollment and renewal
    /// [default: 7d]. Agents renew theirs at two thirds of it.
    #[arg(long, value_name = "DURATION")]
    pub node_cert_validity: Option<String>,
    /// Once it accepts connections, write the address it listens on (e.g.
    /// `127.0.0.1:40123`) to FILE, atomically: for scripts and tests that
    /// start it with `--listen 127.0.0.1:0` and need the port.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
    /// Also serve the HTTP API (and pages) on ADDR, over TLS with the
    /// controller's server certificate (config: http_listen). Off by default.
    #[arg(long, value_name = "ADDR")]
    pub http_listen: Option<SocketAddr>,
    /// Serve the HTTP API without TLS; only on a loopback --http-listen
    /// (config: http_plain).
    #[arg(long)]
    pub http_plain: bool,
    /// Let callers on a loopback address scrape /metrics without an API
    /// token (config: metrics_loopback_no_auth); others still need one.
    #[arg(long)]
    pub metrics_loopback_no_auth: bool,
    /// Like --ready-file, for the HTTP listener's address.
    #[arg(long, value_name = "FILE")]
    pub http_ready_file: Option<PathBuf>,
    /// The key file apps' environments are sealed under (config:
    /// secrets_key) [default: DATA_DIR/secrets.key, created 0600 on first
    /// start]. Keep a copy apart from backups of the data dir.
    #[arg(long, value_name = "FILE")]
    pub secrets_key: Option<PathBuf>,
    /// A directory every controller replica mounts, holding uploaded
    /// artifacts (config: artifact_dir) [default: the data dir, or with
    /// PostgreSQL the database]. The data dir caches them.
    #[arg(long, value_name = "DIR")]
    pub artifact_dir: Option<PathBuf>,
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a one-time join token for `slipway-agent enroll`.
    Create(TokenCreateArgs),
    /// Print an API token for the `slipway` CLI (shown once, stored hashed).
    Api(TokenApiArgs),
    /// List API tokens (ids and scopes; secrets are never stored).
    List(ListArgs),
    /// Revoke an API token: calls with it are refused from the next one on.
    Revoke(RevokeArgs),
}

/// `token api` flags.
#[derive(Debug, Args)]
pub struct TokenApiArgs {
    /// The controller's data directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// What the token may do: `read`, `deploy:APP` (deploy and roll back
    /// APP, and read) or `agent-upgrade` (upgrade the fleet's agents, and
    /// read); repeatable or comma-separated.
    #[arg(long = "scope", value_name = "SCOPE", required = true)]
    pub scopes: Vec<String>,
}

/// `token create` flags.
#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// The controller's data directory.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// How long the token stays usable: 90s, 30m, 1h, 7d.
    #[arg(long, default_value = "1h")]
    pub ttl: String,
    /// Tag for the enrolled node, e.g. env:production (repeatable).
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
}
