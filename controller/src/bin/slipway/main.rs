//! `slipway`: the CLI for CI jobs and people. Talks to the controller's
//! Control API over TLS (trusting only `--ca`) with an API token, a GitHub
//! Actions OIDC token (`--oidc`) or an operator client certificate. Depends on `slipway-proto` (the API, its
//! client and the fleet views), not on the controller library.
//!
//! Exit codes: 0 success; 1 a node failed (the output says which and why)
//! or any other error; 64 bad arguments. `slipway status` exits 1 when a
//! node is not online or an app not healthy, naming each.
//!
//! Modules: [`api`] (the connection and its credentials), [`deploy`]
//! (deploy, rollback, restart, prune, upload), [`oidc`] (the GitHub
//! Actions token), [`progress`] (following a deployment live),
//! [`agent_upgrade`] (the fleet's agents replaced), [`env`] (apps'
//! environments), [`fleet`] (nodes, releases, status), [`audit`].

mod agent_upgrade;
mod api;
mod audit;
mod deploy;
mod env;
mod fleet;
mod oidc;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use slipway_proto::cli::{error_text, EXIT_USAGE};

use crate::agent_upgrade::AgentUpgradeArgs;
use crate::audit::AuditArgs;
use crate::deploy::{DeployArgs, PruneArgs, RestartArgs, RollbackArgs, StopStartArgs, WatchArgs};
use crate::fleet::{ReadArgs, ReleasesArgs, StatusArgs};

/// Slipway: deploy to and inspect a fleet through its controller.
///
/// Exit codes: 0 success; 1 a node failed (the output says which and why)
/// or another error; 64 bad arguments.
#[derive(Debug, Parser)]
#[command(name = "slipway", version = env!("SLIPWAY_BUILD_VERSION"))]
pub(crate) struct Cli {
    /// Controller address, HOST:PORT.
    #[arg(
        long,
        env = "SLIPWAY_CONTROLLER",
        global = true,
        value_name = "HOST:PORT"
    )]
    pub(crate) controller: Option<String>,
    /// The controller's CA certificate (ca.pem in its data dir; `serve`
    /// logs the path).
    #[arg(long, env = "SLIPWAY_CA", global = true, value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,
    /// API token (`slipway-controller token api`).
    #[arg(long, env = "SLIPWAY_TOKEN", global = true, hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// Operator client certificate (`slipway-controller operator create`),
    /// used instead of a token; needs --key.
    #[arg(
        long,
        env = "SLIPWAY_CERT",
        global = true,
        value_name = "FILE",
        requires = "key"
    )]
    pub(crate) cert: Option<PathBuf>,
    /// Private key of --cert.
    #[arg(
        long,
        env = "SLIPWAY_KEY",
        global = true,
        value_name = "FILE",
        requires = "cert"
    )]
    pub(crate) key: Option<PathBuf>,
    /// Authenticate with a GitHub Actions OIDC token instead of an API
    /// token: asked for from the Actions runtime (the job needs
    /// `permissions: id-token: write`). Used without this flag too when
    /// ACTIONS_ID_TOKEN_REQUEST_URL and _TOKEN are set and no --token or
    /// --cert is given.
    #[arg(
        long,
        env = "SLIPWAY_OIDC",
        global = true,
        conflicts_with_all = ["token", "cert"]
    )]
    pub(crate) oidc: bool,
    /// The audience (`aud`) of the OIDC token: what the controller's
    /// `[oidc] audience` says.
    #[arg(
        long,
        env = "SLIPWAY_OIDC_AUDIENCE",
        global = true,
        value_name = "AUDIENCE",
        default_value = "slipway"
    )]
    pub(crate) oidc_audience: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Upload ARTIFACT (streamed; skipped if the controller has it), or
    /// name an https --url, and deploy it to the selected nodes following
    /// --strategy. Returns once the deployment started; --wait follows it
    /// to the end (live per node) and exits 1 if any node did not succeed.
    Deploy(DeployArgs),
    /// Roll the selected nodes back (to their previous release, or --to);
    /// --wait and the rollout flags as for deploy.
    Rollback(RollbackArgs),
    /// Follow any deployment (deploy, rollback, restart, ...) by id to its
    /// end, whoever started it and whichever controller replica runs it,
    /// with the output of `deploy --wait`; exits 0 if every node
    /// succeeded, 1 naming those that did not. A deployment that ended
    /// shows its recorded results at once.
    Watch(WatchArgs),
    /// Show the fleet.
    Nodes(ReadArgs),
    /// An app's releases on every node (from the nodes' last heartbeats):
    /// which is current, which failed or was rolled away from.
    Releases(ReleasesArgs),
    /// Show audit events.
    Audit(AuditArgs),
    /// Fleet summary: nodes by state, releases current per app, unhealthy
    /// apps with their check's output, agent drift, last deployments.
    /// Exits 0 when every node is online and every app healthy, 1 naming
    /// what is not (for watch(1) and monitoring).
    #[command(visible_alias = "fleet")]
    Status(StatusArgs),
    /// Restart an app's current release on the selected nodes (behind its
    /// health gate), all at once or rolling (--strategy), following it to
    /// the end like `deploy --wait`. A stopped rolling restart skips the
    /// nodes not yet restarted.
    Restart(RestartArgs),
    /// Delete an app's old releases on the selected nodes (never the
    /// current one or the rollback target), following it to the end like
    /// `deploy --wait`.
    Prune(PruneArgs),
    /// Stop an app on purpose on the selected nodes: each agent stops it
    /// and records the stop, and repairs or restarts nothing of it until
    /// `slipway start`.
    Stop(StopStartArgs),
    /// Start an app stopped on purpose (or crashlooping) on the selected
    /// nodes, behind its health gate.
    Start(StopStartArgs),
    /// Upgrade the fleet's agents to a new slipway-agent binary (needs the
    /// agent-upgrade scope).
    AgentUpgrade(AgentUpgradeArgs),
    /// An app's environment (`shared/.env` on every node), kept sealed and
    /// versioned by the controller: set, unset, import, list, get,
    /// history, rollback.
    #[command(subcommand)]
    Env(env::EnvCommand),
}

/// A failure the user must fix in the arguments (exit 64).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Usage(pub(crate) String);

/// The width of `term` in columns when it is a terminal.
pub(crate) fn terminal_width(term: &console::Term) -> Option<usize> {
    term.size_checked().map(|(_rows, cols)| usize::from(cols))
}

fn main() -> ExitCode {
    let cli: Cli = match slipway_proto::cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    slipway_proto::crypto::install_default_provider();
    let runtime = match slipway_proto::cli::runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", error_text(err.as_ref()));
            if err.chain().any(|e| e.is::<Usage>()) {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut api = api::connect(&cli).await?;
    match &cli.command {
        Command::Deploy(args) => deploy::deploy(&mut api, args).await,
        Command::Rollback(args) => deploy::rollback(&mut api, args).await,
        Command::Watch(args) => deploy::watch(&mut api, args).await,
        Command::Nodes(args) => fleet::nodes(&mut api, args).await,
        Command::Releases(args) => fleet::releases(&mut api, args).await,
        Command::Audit(args) => audit::audit(&mut api, args).await,
        Command::Status(args) => fleet::status(&mut api, args).await,
        Command::Restart(args) => deploy::restart(&mut api, args).await,
        Command::Prune(args) => deploy::prune(&mut api, args).await,
        Command::Stop(args) => deploy::stop(&mut api, args).await,
        Command::Start(args) => deploy::start(&mut api, args).await,
        Command::AgentUpgrade(args) => agent_upgrade::agent_upgrade(&mut api, args).await,
        Command::Env(command) => env::env(&mut api, command).await,
    }
}
