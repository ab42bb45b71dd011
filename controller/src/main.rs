//! `slipway-controller`: parse flags, set up logging, dispatch. `serve` is
//! [`server::run`]; the other commands are in [`admin`].
//!
//! Exit codes: 0 success, 64 bad configuration or arguments
//! ([`Error::is_usage`]), 1 any other failure.

use std::process::ExitCode;

use slipway_controller::cli::{
    CaCommand, Cli, Command, NodeCommand, OperatorCommand, RotateCommand, TokenCommand,
};
use slipway_controller::config::{self, ServeConfig};
use slipway_controller::pki::crypto;
use slipway_controller::{admin, server, Error};
use slipway_proto::cli::{error_text, EXIT_USAGE};
use slipway_proto::notify::Notifier;

fn main() -> ExitCode {
    let cli: Cli = match slipway_proto::cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    crypto::install_default_provider();
    // Before the runtime's threads start: it edits the environment.
    let notifier = match &cli.command {
        Command::Serve(_) => Notifier::take_from_env(),
        _ => Notifier::none(),
    };
    let runtime = match slipway_proto::cli::runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(run(cli, notifier)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", error_text(&err));
            if err.is_usage() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: Cli, notifier: Notifier) -> Result<(), Error> {
    // `serve` also reads it from its config file; the other commands from
    // the flag (or its environment variable) alone.
    let db = match (&cli.command, &cli.database_url) {
        (Command::Serve(_), _) | (_, None) => None,
        (_, Some(text)) => Some(config::database_url(text)?),
    };
    let db = db.as_ref();
    match cli.command {
        Command::Serve(args) => {
            let config = ServeConfig::from_args(args, cli.database_url)?;
            Ok(server::run(config, notifier, server::shutdown_signal()).await?)
        }
        Command::Token(TokenCommand::Create(args)) => admin::token_create(args, db).await,
        Command::Token(TokenCommand::Api(args)) => admin::token_api(args, db).await,
        Command::Token(TokenCommand::List(args)) => admin::token_list(args, db).await,
        Command::Token(TokenCommand::Revoke(args)) => admin::token_revoke(args, db).await,
        Command::Operator(OperatorCommand::Create(args)) => admin::operator_create(args, db).await,
        Command::Operator(OperatorCommand::List(args)) => admin::operator_list(args, db).await,
        Command::Operator(OperatorCommand::Revoke(args)) => admin::operator_revoke(args, db).await,
        Command::Nodes(args) => admin::nodes(args, db).await,
        Command::Metrics(args) => admin::metrics(args, db).await,
        Command::Node(NodeCommand::Revoke(args)) => admin::node_revoke(args, db).await,
        Command::Backup(args) => admin::backup(args, db).await,
        Command::Restore(args) => admin::restore(args, db).await,
        Command::Ca(CaCommand::Rotate(RotateCommand::Start(args))) => {
            admin::ca_rotate_start(args, db).await
        }
        Command::Ca(CaCommand::Rotate(RotateCommand::Finish(args))) => {
            admin::ca_rotate_finish(args, db).await
        }
        Command::Droplets(command) => {
            slipway_controller::digitalocean::commands::run(command, db).await
        }
        Command::Dns(command) => slipway_controller::digitalocean::commands::dns(command, db).await,
        Command::Firewall(command) => {
            slipway_controller::digitalocean::commands::firewall(command, db).await
        }
        Command::Validate(args) => slipway_controller::digitalocean::commands::validate(args).await,
    }
}
