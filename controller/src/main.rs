//! `slipway-controller`: parse flags, set up logging, run. Everything else
//! lives in the library.

use std::process::ExitCode;

use anyhow::Context as _;
use slipway_controller::auth::{apitoken, operator, token};
use slipway_controller::cli::{
    Cli, Command, ListArgs, NodeCommand, NodeRevokeArgs, NodesArgs, OperatorCommand,
    OperatorCreateArgs, RevokeArgs, ServeArgs, TokenApiArgs, TokenCommand, TokenCreateArgs,
};
use slipway_controller::config::{ConfigError, RawConfig, ServeConfig};
use slipway_controller::pki::ca::Ca;
use slipway_controller::pki::crypto;
use slipway_controller::store::Store;
use slipway_controller::{fleet, server};

use slipway_proto::cli::EXIT_USAGE;

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

    let runtime = match slipway_proto::cli::runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", slipway_proto::cli::error_text(err.as_ref()));
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
                    || matches!(
                        e.downcast_ref(),
                        Some(
                            operator::OperatorError::Name(_)
                                | operator::OperatorError::Scope(_)
                                | operator::OperatorError::NotFound(_)
                                | operator::OperatorError::Ambiguous { .. }
                        )
                    )
                    || matches!(e.downcast_ref(), Some(apitoken::ApiTokenError::NotFound(_)))
            });
            if usage {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Token(TokenCommand::Create(args)) => token_create(args).await,
        Command::Token(TokenCommand::Api(args)) => token_api(args).await,
        Command::Token(TokenCommand::List(args)) => token_list(args).await,
        Command::Token(TokenCommand::Revoke(args)) => token_revoke(args).await,
        Command::Operator(OperatorCommand::Create(args)) => operator_create(args).await,
        Command::Operator(OperatorCommand::List(args)) => operator_list(args).await,
        Command::Operator(OperatorCommand::Revoke(args)) => operator_revoke(args).await,
        Command::Nodes(args) => nodes(args).await,
        Command::Node(NodeCommand::Revoke(args)) => node_revoke(args).await,
    }
}

async fn nodes(args: NodesArgs) -> anyhow::Result<()> {
    let store = open_store(&args.data_dir).await?;
    let nodes = fleet::nodes(&store, now()).await?;
    let nodes: Vec<slipway_proto::v1::NodeView> = nodes.iter().map(Into::into).collect();
    if args.json {
        println!("{}", slipway_proto::view::nodes_json(&nodes)?);
    } else {
        print!("{}", slipway_proto::view::render_table(&nodes));
    }
    Ok(())
}

async fn node_revoke(args: NodeRevokeArgs) -> anyhow::Result<()> {
    let store = open_store(&args.data_dir).await?;
    let revoked = fleet::revoke(&store, &args.node, "operator", now()).await?;
    print_revoked("node", &revoked.node_id, revoked.newly);
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
        server_names: Some(args.server_names),
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
    let store = open_store(&args.data_dir).await?;
    let token = token::create(&store, &ca.fingerprint(), ttl, &args.tags, now()).await?;
    println!("{token}");
    Ok(())
}

async fn token_api(args: TokenApiArgs) -> anyhow::Result<()> {
    let scopes = apitoken::parse_scopes(&args.scopes)?;
    let store = open_store(&args.data_dir).await?;
    println!("{}", apitoken::create(&store, &scopes, now()).await?);
    Ok(())
}

async fn open_store(data_dir: &std::path::Path) -> anyhow::Result<Store> {
    Store::open(data_dir)
        .await
        .context("opening the controller database")
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// A unix time as `YYYY-MM-DDTHH:MM:SSZ`, or "-" for none.
fn when(unix: Option<i64>) -> String {
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    unix.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| t.format(&format).ok())
        .unwrap_or_else(|| "-".to_owned())
}

async fn token_list(args: ListArgs) -> anyhow::Result<()> {
    let tokens = open_store(&args.data_dir).await?.api_tokens().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&tokens)?);
        return Ok(());
    }
    println!("{:<18} {:<21} {:<21} SCOPES", "ID", "CREATED", "REVOKED");
    for t in tokens {
        println!(
            "{:<18} {:<21} {:<21} {}",
            t.id,
            when(Some(t.created_at)),
            when(t.revoked_at),
            t.scopes.join(",")
        );
    }
    Ok(())
}

fn print_revoked(what: &str, id: &str, newly: bool) {
    if newly {
        println!("revoked {what} {id}");
    } else {
        println!("{what} {id} was already revoked");
    }
}

async fn token_revoke(args: RevokeArgs) -> anyhow::Result<()> {
    let store = open_store(&args.data_dir).await?;
    let (id, newly) = apitoken::revoke(&store, args.id.trim(), now()).await?;
    print_revoked("API token", &id, newly);
    Ok(())
}

async fn operator_create(args: OperatorCreateArgs) -> anyhow::Result<()> {
    let scopes = apitoken::parse_scopes(&args.scopes).map_err(operator::OperatorError::from)?;
    let validity = token::parse_ttl(&args.ttl)?;
    let csr = args
        .csr
        .as_deref()
        .map(|path| {
            std::fs::read_to_string(path)
                .with_context(|| format!("reading the CSR {}", path.display()))
        })
        .transpose()?;
    // Checked before anything is issued, so a bad name leaves no record.
    if !apitoken::is_app_name(&args.name) {
        return Err(operator::OperatorError::Name(args.name).into());
    }
    let cert_path = args.out.join(format!("{}.pem", args.name));
    let key_path = args.out.join(format!("{}.key", args.name));
    for path in [&cert_path, &key_path] {
        if path.exists() {
            anyhow::bail!(
                "{} already exists; remove it or choose another --out",
                path.display()
            );
        }
    }
    // 0700 whatever the umask: the directory holds a private key.
    std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
        .create(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let ca = Ca::load_or_create(&args.data_dir).context("loading the controller CA")?;
    let store = open_store(&args.data_dir).await?;
    let issued = operator::create(
        &store,
        &ca,
        &args.name,
        &scopes,
        validity,
        csr.as_deref(),
        now(),
    )
    .await?;
    let key_written = issued.key_pem.as_ref().map_or(Ok(false), |key| {
        write_new(&key_path, key, 0o600).map(|()| true)
    });
    let written = key_written.and_then(|key_written| {
        write_new(&cert_path, &issued.cert_pem, 0o644).inspect_err(|_| {
            if key_written {
                let _ = std::fs::remove_file(&key_path);
            }
        })
    });
    if let Err(err) = written {
        // Nobody holds a usable copy: do not leave a live certificate behind.
        operator::revoke(&store, &issued.operator.id, now()).await?;
        return Err(err.context(format!(
            "operator {} was revoked again because its files could not be written",
            issued.operator.id
        )));
    }
    println!(
        "operator {} ({}), scopes {}, valid until {}",
        issued.operator.id,
        issued.operator.name,
        issued.operator.scopes.join(","),
        when(Some(issued.operator.expires_at))
    );
    println!("certificate: {}", cert_path.display());
    if issued.key_pem.is_some() {
        println!("key:         {}", key_path.display());
    }
    Ok(())
}

/// Writes a file that must not exist yet, with `mode`, synced.
fn write_new(path: &std::path::Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

async fn operator_list(args: ListArgs) -> anyhow::Result<()> {
    let operators = open_store(&args.data_dir).await?.operators().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&operators)?);
        return Ok(());
    }
    println!(
        "{:<20} {:<16} {:<21} {:<21} SCOPES",
        "ID", "NAME", "EXPIRES", "REVOKED"
    );
    for o in operators {
        println!(
            "{:<20} {:<16} {:<21} {:<21} {}",
            o.id,
            o.name,
            when(Some(o.expires_at)),
            when(o.revoked_at),
            o.scopes.join(",")
        );
    }
    Ok(())
}

async fn operator_revoke(args: RevokeArgs) -> anyhow::Result<()> {
    let store = open_store(&args.data_dir).await?;
    let (id, newly) = operator::revoke(&store, args.id.trim(), now()).await?;
    print_revoked("operator", &id, newly);
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
