//! `slipway-controller droplets …`: the DigitalOcean commands. They read
//! `[digitalocean]` (and `data_dir`) from the controller's config file and
//! work while `serve` runs (the store is SQLite in WAL mode, or PostgreSQL).

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::client::DoError;
use super::config::DoConfig;
use super::inventory::{self, SyncError};
use crate::config::{ConfigError, RawConfig};
use crate::store::{PostgresUrl, Store, StoreError};

/// `droplets` subcommands.
#[derive(Debug, Subcommand)]
pub enum DropletsCommand {
    /// List the droplets of the fleet's tags now and reconcile: new ones
    /// become expected nodes, gone ones have their nodes retired (certificates
    /// revoked), every change audited.
    Sync(SyncArgs),
    /// The fleet as DigitalOcean and the agents see it: each droplet with
    /// its node or "expected, not enrolled", gone droplets, agents without a
    /// droplet (as of the last sync).
    List(DropletsArgs),
    /// Create a droplet that joins by itself: a one-time join token (1h by
    /// default) and cloud-init user data that runs install.sh with it.
    Create(Box<CreateArgs>),
    /// Retire a droplet's node: no longer selected, its certificates
    /// refused (audited); with --destroy, destroy the droplet too.
    Retire(RetireArgs),
}

/// `droplets create` flags.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The droplet's name (also the node's: install.sh uses the host name).
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub region: String,
    #[arg(long)]
    pub size: String,
    #[arg(long)]
    pub image: String,
    /// Tags of the droplet (repeat); default: the fleet tags.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// SSH key ids or fingerprints (repeat).
    #[arg(long = "ssh-key")]
    pub ssh_keys: Vec<String>,
    /// host:port of the controller, as the droplet dials it.
    #[arg(long)]
    pub controller: String,
    /// Where install.sh and the agent binaries are served (https://).
    #[arg(long)]
    pub base_url: String,
    /// The agent version to install; default: this controller's.
    #[arg(long, default_value = env!("CARGO_PKG_VERSION"))]
    pub version: String,
    /// Lifetime of the join token.
    #[arg(long, default_value = "1h")]
    pub token_ttl: String,
    /// Then wait until the droplet's agent has enrolled, reported this
    /// droplet's id and is online, and the controller has deployed to it
    /// each app's current release (bounded by --wait-timeout).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, e.g. 10m.
    #[arg(long, default_value = "10m")]
    pub wait_timeout: String,
    #[command(flatten)]
    pub common: DropletsArgs,
}

/// `droplets retire` flags.
#[derive(Debug, Args)]
pub struct RetireArgs {
    /// The droplet's name (as synced).
    pub name: String,
    /// Destroy the droplet at DigitalOcean after revoking its node.
    #[arg(long)]
    pub destroy: bool,
    #[command(flatten)]
    pub common: DropletsArgs,
}

/// Flags shared by the `droplets` commands.
#[derive(Debug, Args)]
pub struct DropletsArgs {
    /// The controller's config file (its `[digitalocean]` table and data_dir).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The data dir, if not the config file's.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Why a `droplets` command failed.
#[derive(Debug, thiserror::Error)]
pub enum DoCommandError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}: no [digitalocean] table (fleet_tags, token_file, ...)")]
    NotConfigured(String),
    /// Boxed, as is `Sync`: both are large.
    #[error(transparent)]
    Api(Box<DoError>),
    #[error(transparent)]
    Sync(Box<SyncError>),
    #[error(transparent)]
    Retire(Box<inventory::RetireError>),
    #[error("opening the controller database: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    /// `--wait` ran out of time.
    #[error("{0}")]
    Timeout(String),
    /// A bad argument (the message says which).
    #[error("{0}")]
    Usage(String),
    /// `validate` printed this many ✗ lines.
    #[error("{0} check(s) failed")]
    Invalid(usize),
}

impl From<DoError> for DoCommandError {
    fn from(err: DoError) -> Self {
        Self::Api(Box::new(err))
    }
}

impl From<SyncError> for DoCommandError {
    fn from(err: SyncError) -> Self {
        Self::Sync(Box::new(err))
    }
}

impl From<inventory::RetireError> for DoCommandError {
    fn from(err: inventory::RetireError) -> Self {
        Self::Retire(Box::new(err))
    }
}

impl DoCommandError {
    /// Bad configuration or token: exit 64.
    pub fn is_usage(&self) -> bool {
        match self {
            Self::Config(_) | Self::NotConfigured(_) | Self::Usage(_) => true,
            Self::Api(e) => matches!(**e, DoError::Config(_)),
            Self::Sync(e) => matches!(**e, SyncError::Api(DoError::Config(_))),
            Self::Retire(e) => matches!(**e, inventory::RetireError::NotFound(_)),
            Self::Store(_) | Self::Json(_) | Self::Invalid(_) | Self::Timeout(_) => false,
        }
    }
}

/// `dns` subcommands.
#[derive(Debug, Subcommand)]
pub enum DnsCommand {
    /// Make the A records of NAME the public IPv4 addresses of the droplets
    /// with --tag: created, re-timed or removed to match. A dry run (the
    /// diff printed) unless --apply.
    Point(DnsPointArgs),
}

/// `dns point` flags.
#[derive(Debug, Args)]
pub struct DnsPointArgs {
    /// The name, e.g. app.example.com.
    pub name: String,
    /// The droplets whose public addresses the name gets.
    #[arg(long)]
    pub tag: String,
    /// The DigitalOcean domain (zone); default: NAME without its first label.
    #[arg(long)]
    pub domain: Option<String>,
    /// TTL of the records, seconds (at least 30).
    #[arg(long, default_value_t = super::dns::DEFAULT_TTL)]
    pub ttl: u32,
    /// Make the changes (default: only print them).
    #[arg(long)]
    pub apply: bool,
    /// Allow removing every record when no droplet has the tag.
    #[arg(long)]
    pub allow_empty: bool,
    #[command(flatten)]
    pub common: DropletsArgs,
}

/// Runs a `dns` command.
pub async fn dns(command: DnsCommand, db: Option<&PostgresUrl>) -> Result<(), crate::Error> {
    let DnsCommand::Point(args) = command;
    let run = async {
        let (config, data_dir, db) = load(&args.common, db)?;
        let client = config.client()?;
        let store = Store::open_at(&data_dir, db.as_ref()).await?;
        let pointed = super::dns::point(
            &client,
            &store,
            &args.name,
            args.domain.as_deref(),
            &args.tag,
            args.ttl,
            args.apply,
            args.allow_empty,
            "operator",
            crate::now_unix(),
        )
        .await
        .map_err(|e| match e {
            super::dns::DnsError::Usage(m) => DoCommandError::Usage(m),
            super::dns::DnsError::Api(e) => e.into(),
            super::dns::DnsError::Store(e) => e.into(),
        })?;
        if args.common.json {
            println!("{}", serde_json::to_string_pretty(&pointed)?);
        } else {
            print!("{}", super::dns::render(&pointed));
        }
        Ok::<(), DoCommandError>(())
    };
    Ok(run.await?)
}

/// `firewall` subcommands.
#[derive(Debug, Subcommand)]
pub enum FirewallCommand {
    /// Compare the fleet firewall (`[digitalocean.firewall]`, on the fleet
    /// tags) with DigitalOcean's and print the diff; --apply creates or
    /// replaces it.
    Sync(FirewallSyncArgs),
}

/// `firewall sync` flags.
#[derive(Debug, Args)]
pub struct FirewallSyncArgs {
    /// Make the change (default: only print the diff).
    #[arg(long)]
    pub apply: bool,
    #[command(flatten)]
    pub common: DropletsArgs,
}

/// Runs a `firewall` command.
pub async fn firewall(
    command: FirewallCommand,
    db: Option<&PostgresUrl>,
) -> Result<(), crate::Error> {
    let FirewallCommand::Sync(args) = command;
    let run = async {
        let (config, data_dir, db) = load(&args.common, db)?;
        let Some(firewall) = &config.firewall else {
            return Err(DoCommandError::Usage(format!(
                "{}: no [digitalocean.firewall] table (inbound_ports, ssh_from)",
                args.common.config.display()
            )));
        };
        let client = config.client()?;
        let store = Store::open_at(&data_dir, db.as_ref()).await?;
        let synced = super::firewall::sync(
            &client,
            &store,
            firewall,
            &config.fleet_tags,
            args.apply,
            "operator",
            crate::now_unix(),
        )
        .await
        .map_err(|e| match e {
            super::firewall::FirewallError::Api(e) => e.into(),
            super::firewall::FirewallError::Store(e) => e.into(),
            other => DoCommandError::Usage(other.to_string()),
        })?;
        if args.common.json {
            println!("{}", serde_json::to_string_pretty(&synced)?);
        } else {
            for line in &synced.diff {
                println!("{line}");
            }
            println!(
                "{}",
                match (synced.diff.len(), synced.applied) {
                    (0, _) => format!("firewall {} is in sync", synced.name),
                    (n, true) => format!("applied {n} change(s) to firewall {}", synced.name),
                    (n, false) => format!(
                        "dry run: {n} change(s) to firewall {}; --apply to make them",
                        synced.name
                    ),
                }
            );
        }
        Ok(())
    };
    Ok(run.await?)
}

/// `slipway-controller validate` flags.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The controller's config file.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
}

/// `validate`: one ✓/✗ line per check (the config file, the DigitalOcean
/// token against the API, the GitHub credentials against each linked
/// repository); fails if any check fails.
pub async fn validate(args: ValidateArgs) -> Result<(), crate::Error> {
    let mut failed = 0;
    let mut line = |ok: bool, text: String| {
        println!("{} {text}", if ok { "✓" } else { "✗" });
        if !ok {
            failed += 1;
        }
    };
    let raw = match RawConfig::from_file(&args.config) {
        Ok(raw) => raw,
        Err(e) => {
            line(false, format!("config: {e}"));
            return Err(DoCommandError::Invalid(failed).into());
        }
    };
    line(true, format!("config: {} parses", args.config.display()));
    match raw.digitalocean.map(DoConfig::new) {
        None => line(
            true,
            "digitalocean: not configured (no [digitalocean] table)".into(),
        ),
        Some(Err(e)) => line(false, format!("digitalocean: {e}")),
        Some(Ok(config)) => {
            let tag = &config.fleet_tags[0];
            let checked = match config.client() {
                Ok(client) => client
                    .count_by_tag(tag)
                    .await
                    .map(|n| (n, client.rate_limit())),
                Err(e) => Err(e),
            };
            match checked {
                Ok((n, rate)) => line(
                    true,
                    format!(
                        "digitalocean: token accepted by {}; {n} droplet(s) under {tag}{}",
                        config.api_url,
                        rate.map(|r| format!("; {} of {} requests left", r.remaining, r.limit))
                            .unwrap_or_default()
                    ),
                ),
                // DoError's text starts with "digitalocean:".
                Err(e) => line(false, e.to_string()),
            }
        }
    }
    match raw.github.map(crate::github::GithubConfig::new) {
        None => line(true, "github: not configured (no [github] table)".into()),
        Some(Err(e)) => line(false, format!("github: {e}")),
        Some(Ok(config)) => {
            let client = config.client();
            line(
                client.is_ok(),
                match &client {
                    Ok(_) => format!(
                        "github: credentials from {}; {} linked app(s); webhooks {}",
                        config.sources(),
                        config.links.len(),
                        if config.credentials.webhook_secret.is_some() {
                            "on"
                        } else {
                            "off"
                        }
                    ),
                    Err(e) => e.to_string(),
                },
            );
            if let Ok(client) = client {
                for link in config.links.values() {
                    match client.check_repo(&link.repo).await {
                        Ok(()) => line(
                            true,
                            format!("github: {} ({}): deployments readable", link.repo, link.app),
                        ),
                        Err(e) => line(false, format!("{} ({}): {e}", link.repo, link.app)),
                    }
                }
            }
        }
    }
    if failed > 0 {
        return Err(DoCommandError::Invalid(failed).into());
    }
    Ok(())
}

/// How often `--wait` looks at the store.
const WAIT_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// Waits until a live node reports `droplet_id` and is online; its (id, name).
async fn wait_online(
    store: &Store,
    droplet_id: u64,
    limit: std::time::Duration,
) -> Result<(String, String), DoCommandError> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut said_enrolled = false;
    loop {
        let claimed = store
            .node_droplet_ids()
            .await?
            .into_iter()
            .find(|(_, _, d)| *d == Some(droplet_id));
        if let Some((node_id, name, _)) = claimed {
            if !said_enrolled {
                println!("node {name} ({node_id}) enrolled from droplet {droplet_id}");
                said_enrolled = true;
            }
            let views = crate::fleet::nodes(store, crate::now_unix()).await?;
            if views
                .iter()
                .any(|v| v.id == node_id && v.state == crate::link::liveness::NodeState::Online)
            {
                return Ok((node_id, name));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DoCommandError::Timeout(format!(
                "droplet {droplet_id}: no online node reported it within {limit:?} (see /var/log/cloud-init-output.log on the droplet)"
            )));
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// Waits until the controller has deployed, to the node of a droplet
/// `droplets create` made, each app's current release (see
/// [`super::join_deploy`]); the apps and releases it runs.
async fn wait_current(
    store: &Store,
    artifacts: &crate::artifacts::Artifacts,
    node_id: &str,
    deadline: tokio::time::Instant,
) -> Result<Vec<(String, String)>, DoCommandError> {
    loop {
        let taken = store.join_deploy_taken(node_id).await?;
        if taken == Some(true) {
            let fleet = store.fleet().await?;
            let apps: Vec<String> = fleet
                .iter()
                .find(|r| r.id == node_id)
                .map(|r| r.apps.iter().map(|a| a.app.clone()).collect())
                .unwrap_or_default();
            let mut running = Vec::new();
            let mut pending = false;
            for app in apps {
                let Some((release, sha256)) = store.current_release(&app).await? else {
                    continue;
                };
                let switched = store.last_switched_releases(&app).await?;
                if switched.get(node_id).is_some_and(|(r, _)| *r == release) {
                    running.push((app, release));
                    continue;
                }
                let last = store.last_deployments(Some(&app)).await?;
                let deploying = last
                    .iter()
                    .any(|d| d.status == "running" && d.nodes.iter().any(|n| n.node_id == node_id));
                // The node's last deployment of the app, if it ended badly.
                let failed = last
                    .into_iter()
                    .filter(|d| d.status != "running")
                    .flat_map(|d| d.nodes)
                    .find(|n| n.node_id == node_id && n.outcome != "succeeded");
                if let Some(n) = failed {
                    return Err(DoCommandError::Timeout(format!(
                        "deploying {app} release {release} to node {} failed ({}): {}",
                        n.node_name, n.outcome, n.message
                    )));
                }
                let reported = fleet
                    .iter()
                    .find(|r| r.id == node_id)
                    .and_then(|r| r.apps.iter().find(|a| a.app == app))
                    .is_some_and(|a| a.current_release == release);
                // Already running it (nothing was deployed), or a deployment
                // is still finishing.
                if reported && !deploying {
                    running.push((app, release));
                } else if !deploying && !artifacts.contains(&sha256).await.unwrap_or(false) {
                    // The controller skipped it (see JOIN_DEPLOY): say so
                    // rather than wait for nothing.
                    return Err(DoCommandError::Timeout(format!(
                        "the current release of {app} ({release}) was deployed from a URL and its \
                         artifact is not on the controller, so it was not sent to node {node_id}: \
                         deploy it there yourself (slipway deploy {app} … --node {node_id})"
                    )));
                } else {
                    pending = true;
                }
            }
            if !pending {
                return Ok(running);
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(DoCommandError::Timeout(format!(
                "node {node_id} is online but does not run the apps' current releases yet \
                 (see `slipway deployments` and the controller's log)"
            )));
        }
        tokio::time::sleep(WAIT_POLL).await;
    }
}

/// `droplets sync` flags.
#[derive(Debug, Args)]
pub struct SyncArgs {
    #[command(flatten)]
    pub common: DropletsArgs,
    /// Accept a sync that retires more than half of the fleet's droplets at
    /// once (refused otherwise: a fleet tag renamed or removed looks like
    /// that).
    #[arg(long)]
    pub force: bool,
}

/// Reads `[digitalocean]`, the data dir and the store's `database_url`
/// (`db`, the `--database-url` flag, wins over the file's) from the config
/// file.
pub fn load(
    args: &DropletsArgs,
    db: Option<&PostgresUrl>,
) -> Result<(DoConfig, PathBuf, Option<PostgresUrl>), DoCommandError> {
    let raw = RawConfig::from_file(&args.config)?;
    let db = match (db, &raw.database_url) {
        (Some(db), _) => Some(db.clone()),
        (None, Some(text)) => Some(crate::config::database_url(text)?),
        (None, None) => None,
    };
    let data_dir = args
        .data_dir
        .clone()
        .or(raw.data_dir)
        .ok_or(ConfigError::Missing("data-dir"))?;
    let Some(table) = raw.digitalocean else {
        return Err(DoCommandError::NotConfigured(
            args.config.display().to_string(),
        ));
    };
    let config = DoConfig::new(table).map_err(ConfigError::DigitalOcean)?;
    Ok((config, data_dir, db))
}

/// Runs a `droplets` command.
pub async fn run(command: DropletsCommand, db: Option<&PostgresUrl>) -> Result<(), crate::Error> {
    Ok(run_inner(command, db).await?)
}

async fn run_inner(
    command: DropletsCommand,
    db: Option<&PostgresUrl>,
) -> Result<(), DoCommandError> {
    match command {
        DropletsCommand::Sync(SyncArgs {
            common: args,
            force,
        }) => {
            let (config, data_dir, db) = load(&args, db)?;
            let client = config.client()?;
            let store = Store::open_at(&data_dir, db.as_ref()).await?;
            let report =
                inventory::sync(&store, &client, &config, crate::now_unix(), force).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "{} droplet(s) under {}: {} added, {} retagged, {} gone, {} node(s) retired",
                    report.droplets,
                    config.fleet_tags.join(", "),
                    report.added.len(),
                    report.retagged.len(),
                    report.gone.len(),
                    report.retired.len()
                );
                for (id, name) in &report.retired {
                    println!("retired node {name} ({id}): its droplet is gone");
                }
            }
        }
        DropletsCommand::Create(args) => {
            let (config, data_dir, db) = load(&args.common, db)?;
            let ttl = crate::auth::token::parse_ttl(&args.token_ttl)
                .map_err(|e| DoCommandError::Usage(e.to_string()))?;
            let client = config.client()?;
            let ca = crate::pki::ca::Ca::load_or_create(&data_dir)
                .map_err(|e| DoCommandError::Usage(format!("loading the controller CA: {e}")))?;
            let store = Store::open_at(&data_dir, db.as_ref()).await?;
            let tags = if args.tags.is_empty() {
                config.fleet_tags.clone()
            } else {
                args.tags.clone()
            };
            let droplet = super::api::NewDroplet {
                name: args.name.clone(),
                region: args.region.clone(),
                size: args.size.clone(),
                image: args.image.clone(),
                ssh_keys: args.ssh_keys.clone(),
                tags,
                user_data: None,
            };
            let install = super::create::Install {
                controller: args.controller.clone(),
                base_url: args.base_url.clone(),
                version: args.version.clone(),
            };
            let wait_for = if args.wait {
                Some(
                    slipway_proto::cli::parse_duration(&args.wait_timeout).ok_or_else(|| {
                        DoCommandError::Usage(format!(
                            "--wait-timeout {:?} is not a duration like 10m",
                            args.wait_timeout
                        ))
                    })?,
                )
            } else {
                None
            };
            let made = super::create::create(
                &client,
                &store,
                &ca.fingerprint(),
                droplet,
                &install,
                ttl,
                crate::now_unix(),
            )
            .await
            .map_err(|e| match e {
                super::create::CreateError::Api(e) => e.into(),
                other => DoCommandError::Usage(other.to_string()),
            })?;
            if args.common.json {
                println!(
                    "{}",
                    serde_json::json!({ "id": made.id, "name": made.name, "status": made.status, "tags": made.tags })
                );
            } else {
                println!(
                    "created droplet {} ({}), status {}; it enrolls itself on first boot",
                    made.name, made.id, made.status
                );
            }
            if let Some(limit) = wait_for {
                let deadline = tokio::time::Instant::now() + limit;
                let (node_id, node_name) = wait_online(&store, made.id, limit).await?;
                println!(
                    "node {node_name} ({node_id}) of droplet {} is online",
                    made.name
                );
                // With PostgreSQL the artifacts replicas share are in the
                // database (this command knows no `artifact_dir`).
                let artifacts = crate::artifacts::Artifacts::for_serve(&data_dir, None, &store);
                let running = wait_current(&store, &artifacts, &node_id, deadline).await?;
                if running.is_empty() {
                    println!("no app of node {node_name} has a current release to deploy");
                }
                for (app, release) in running {
                    println!("node {node_name} runs {app} release {release} (the current release)");
                }
            }
        }
        DropletsCommand::Retire(args) => {
            let (config, data_dir, db) = load(&args.common, db)?;
            let client = if args.destroy {
                Some(config.client()?)
            } else {
                None
            };
            let store = Store::open_at(&data_dir, db.as_ref()).await?;
            let done = inventory::retire(
                &store,
                &args.name,
                client.as_ref(),
                "operator",
                crate::now_unix(),
            )
            .await?;
            if args.common.json {
                println!("{}", serde_json::to_string_pretty(&done)?);
            } else {
                match &done.node {
                    Some((id, name)) => println!("retired node {name} ({id}): revoked"),
                    None => println!("droplet {} has no live node to retire", done.droplet_name),
                }
                if done.destroyed {
                    println!(
                        "destroyed droplet {} ({})",
                        done.droplet_name, done.droplet_id
                    );
                }
            }
        }
        DropletsCommand::List(args) => {
            let (_, data_dir, db) = load(&args, db)?;
            let store = Store::open_at(&data_dir, db.as_ref()).await?;
            let view = inventory::view(&store).await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                print!("{}", inventory::render(&view));
            }
        }
    }
    Ok(())
}
