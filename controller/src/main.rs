//! `slipway-controller`: parse flags, set up logging, run. Everything else
//! lives in the library.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use slipway_controller::ca::Ca;
use slipway_controller::cli::{
    Cli, Command, NodeCommand, NodeRevokeArgs, NodesArgs, ServeArgs, TokenApiArgs, TokenCommand,
    TokenCreateArgs,
};
use slipway_controller::config::{ConfigError, RawConfig, ServeConfig};
use slipway_controller::store::Store;
use slipway_controller::{apitoken, crypto, fleet, server, token};

/// EX_USAGE: bad configuration or arguments.
const EXIT_USAGE: u8 = 64;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    crypto::install_default_provider();

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", error_text(&err));
            let usage = err.chain().any(|e| {
                e.is::<ConfigError>()
                    || matches!(
                        e.downcast_ref(),
                        Some(token::TokenError::Ttl(_) | token::TokenError::Tag(_))
                    )
                    || matches!(
                        e.downcast_ref(),
                        Some(apitoken::ApiTokenError::Scope(_) | apitoken::ApiTokenError::NoScope)
                    )
            });
            if usage {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

/// The error and its causes on one line, skipping causes whose text the
/// previous messages already include (our errors embed their source).
fn error_text(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Token(TokenCommand::Create(args)) => token_create(args).await,
        Command::Token(TokenCommand::Api(args)) => token_api(args).await,
        Command::Nodes(args) => nodes(args).await,
        Command::Node(NodeCommand::Revoke(args)) => node_revoke(args).await,
    }
}

async fn nodes(args: NodesArgs) -> anyhow::Result<()> {
    let store = Store::open(&args.data_dir)
        .await
        .context("opening the controller database")?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let nodes = fleet::nodes(&store, now).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
    } else {
        print!("{}", fleet::render_table(&nodes));
    }
    Ok(())
}

async fn node_revoke(args: NodeRevokeArgs) -> anyhow::Result<()> {
    let store = Store::open(&args.data_dir)
        .await
        .context("opening the controller database")?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let revoked = fleet::revoke(&store, &args.node, "operator", now).await?;
    if revoked.newly {
        println!("revoked node {}", revoked.node_id);
    } else {
        println!("node {} was already revoked", revoked.node_id);
    }
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let file = args
        .config
        .as_deref()
        .map(RawConfig::from_file)
        .transpose()?;
    let flags = RawConfig {
        data_dir: args.data_dir,
        listen: args.listen,
        ..RawConfig::default()
    };
    let config = ServeConfig::new(flags, file)?;
    server::run(config, shutdown_signal()).await?;
    Ok(())
}

async fn token_create(args: TokenCreateArgs) -> anyhow::Result<()> {
    let ttl = token::parse_ttl(&args.ttl)?;
    for tag in &args.tags {
        token::check_tag(tag)?;
    }
    let ca = Ca::load_or_create(&args.data_dir).context("loading the controller CA")?;
    let store = Store::open(&args.data_dir)
        .await
        .context("opening the controller database")?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token = token::create(&store, &ca.fingerprint(), ttl, &args.tags, now).await?;
    println!("{token}");
    Ok(())
}

async fn token_api(args: TokenApiArgs) -> anyhow::Result<()> {
    let scopes = apitoken::parse_scopes(&args.scopes)?;
    let store = Store::open(&args.data_dir)
        .await
        .context("opening the controller database")?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    println!("{}", apitoken::create(&store, &scopes, now).await?);
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        // Without a SIGTERM handler, Ctrl-C still works.
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
