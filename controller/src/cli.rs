//! Command line of `slipway-controller`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The Slipway controller: fleet state, enrollment CA and the agent link.
///
/// Exit codes: 0 success, 64 bad configuration or arguments, 1 any other
/// failure.
#[derive(Debug, Parser)]
#[command(version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller (enrollment and agent links on one TLS port).
    Serve(ServeArgs),
    /// Manage join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
}

/// `serve` flags; each may instead come from the `--config` file.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML file with the same keys (data_dir, listen); flags win over it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory for the CA, keys and database (created mode 0700).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7443].
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
}

/// `token` subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a one-time join token for `slipway-agent enroll`.
    Create(TokenCreateArgs),
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
