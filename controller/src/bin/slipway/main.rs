//! `slipway`: the CLI for CI jobs and people. Talks to the controller's
//! Control API over TLS (trusting only `--ca`) with an API token or an
//! operator client certificate.
//!
//! Exit codes: 0 success; 1 a node failed (the output says which and why)
//! or any other error; 64 bad arguments. `slipway status` exits 1 when a
//! node is not online or an app not healthy, naming each.

mod progress;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};
use slipway_controller::client;
use slipway_controller::fleet::{self, NodeView};
use slipway_controller::proto::limits::{self, Validate as _};
use slipway_controller::proto::v1::control_client::ControlClient;
use slipway_controller::proto::v1::{
    deploy_event, rollout, selector, DeployEvent, DeployRequest, ListAuditRequest,
    ListNodesRequest, RollbackRequest, Rollout, Selector, UploadChunk,
};
use slipway_controller::proto::v1::{FleetStatusRequest, PruneRequest, RestartRequest};
use tokio::io::AsyncReadExt as _;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

use slipway_controller::cli::EXIT_USAGE;
/// Upload message size: well under gRPC's 4 MiB limit.
const UPLOAD_CHUNK: usize = 256 * 1024;
/// Upload messages read ahead of the network.
const UPLOAD_AHEAD: usize = 4;

/// Slipway: deploy to and inspect a fleet through its controller.
///
/// Exit codes: 0 success; 1 a node failed (the output says which and why)
/// or another error; 64 bad arguments.
#[derive(Debug, Parser)]
#[command(name = "slipway", version)]
struct Cli {
    /// Controller address, HOST:PORT.
    #[arg(
        long,
        env = "SLIPWAY_CONTROLLER",
        global = true,
        value_name = "HOST:PORT"
    )]
    controller: Option<String>,
    /// The controller's CA certificate (ca.pem in its data dir; `serve`
    /// logs the path).
    #[arg(long, env = "SLIPWAY_CA", global = true, value_name = "FILE")]
    ca: Option<PathBuf>,
    /// API token (`slipway-controller token api`).
    #[arg(long, env = "SLIPWAY_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Operator client certificate (`slipway-controller operator create`),
    /// used instead of a token; needs --key.
    #[arg(
        long,
        env = "SLIPWAY_CERT",
        global = true,
        value_name = "FILE",
        requires = "key"
    )]
    cert: Option<PathBuf>,
    /// Private key of --cert.
    #[arg(
        long,
        env = "SLIPWAY_KEY",
        global = true,
        value_name = "FILE",
        requires = "cert"
    )]
    key: Option<PathBuf>,
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
    /// what is not (for `watch` and monitoring).
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
}

/// `status` arguments.
#[derive(Debug, Args)]
struct StatusArgs {
    /// Only this app (and the nodes that report it).
    #[arg(long)]
    app: Option<String>,
    /// Ask every connected node for a fresh heartbeat first (waits at most
    /// 10 s; a node that does not answer is a problem).
    #[arg(long)]
    refresh: bool,
    /// Print JSON (same exit code).
    #[arg(long)]
    json: bool,
}

/// `restart` arguments.
#[derive(Debug, Args)]
struct RestartArgs {
    /// App name.
    app: String,
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    rollout: RolloutArgs,
    /// Print every node's outcome as JSON at the end.
    #[arg(long)]
    json: bool,
}

/// `prune` arguments.
#[derive(Debug, Args)]
struct PruneArgs {
    /// App name.
    app: String,
    /// Releases to keep on each node (1-1000) [default: the app's `keep`
    /// in each node's agent.toml]. The current release and the rollback
    /// target are always kept.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1000))]
    keep: Option<u32>,
    #[command(flatten)]
    target: Target,
    /// Print every node's outcome as JSON at the end.
    #[arg(long)]
    json: bool,
}

/// Which nodes; none means every enrolled node.
#[derive(Debug, Args)]
#[group(multiple = false)]
struct Target {
    /// Nodes with this label, `key:value` (e.g. env:production).
    #[arg(long)]
    tag: Option<String>,
    /// One node, by id or name.
    #[arg(long)]
    node: Option<String>,
}

impl Target {
    fn selector(&self) -> Option<Selector> {
        let target = match (&self.tag, &self.node) {
            (Some(tag), _) => selector::Target::Tag(tag.clone()),
            (None, Some(node)) => selector::Target::Node(node.clone()),
            (None, None) => return None,
        };
        Some(Selector {
            target: Some(target),
        })
    }
}

#[derive(Debug, Args)]
struct DeployArgs {
    /// App name.
    app: String,
    /// The artifact (.tar.gz / .tar.zst) to upload (not with --url).
    #[arg(required_unless_present = "url", conflicts_with = "url")]
    artifact: Option<PathBuf>,
    /// sha256 (hex) of the artifact; the controller and every agent check
    /// it. Required with --url; with ARTIFACT the file is hashed here and
    /// a --sha that does not match it is refused before anything is sent.
    #[arg(
        long,
        visible_alias = "sha256",
        value_name = "DIGEST",
        required_unless_present = "artifact"
    )]
    sha: Option<String>,
    /// Nothing is uploaded: every agent downloads the artifact from this
    /// https:// URL itself and checks it against --sha256.
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    #[command(flatten)]
    target: Target,
    /// Release id [default: <UTC time>-<sha[..12]>].
    #[arg(long)]
    id: Option<String>,
    /// Git commit the artifact was built from (shown with the release).
    #[arg(long)]
    git_sha: Option<String>,
    #[command(flatten)]
    rollout: RolloutArgs,
    #[command(flatten)]
    wait: WaitArgs,
}

/// `--strategy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StrategyArg {
    /// Every node at once.
    All,
    /// Batches of --max-parallel nodes, one after the other.
    Rolling,
    /// --canary nodes first, then the rest in batches of --max-parallel.
    Canary,
}

/// How the selected nodes are taken through a deploy or rollback.
#[derive(Debug, Args)]
struct RolloutArgs {
    /// all: every node at once. rolling / canary: in batches; when more
    /// than --max-unavailable nodes fail, the rollout stops, the nodes not
    /// started are skipped and the ones a deploy or rollback already
    /// switched are rolled back.
    #[arg(long, value_enum, default_value_t = StrategyArg::All)]
    strategy: StrategyArg,
    /// Nodes per batch (rolling: default 1; canary: after the canary
    /// batch, default all the rest at once).
    #[arg(long, value_name = "N")]
    max_parallel: Option<u32>,
    /// Node failures tolerated before the rollout stops [default: 0].
    #[arg(long, value_name = "N")]
    max_unavailable: Option<u32>,
    /// Canary nodes, deployed first on their own (--strategy canary only)
    /// [default: 1].
    #[arg(long, value_name = "N")]
    canary: Option<u32>,
}

impl RolloutArgs {
    /// The request's rollout; a flag that does not fit the strategy is a
    /// usage error.
    fn to_proto(&self) -> Result<Option<Rollout>, Usage> {
        let usage = |text: &str| Err(Usage(text.to_owned()));
        if self.canary.is_some() && self.strategy != StrategyArg::Canary {
            return usage("--canary N needs --strategy canary");
        }
        let strategy = match self.strategy {
            StrategyArg::All => {
                if self.max_parallel.is_some() || self.max_unavailable.is_some() {
                    return usage(
                        "--max-parallel and --max-unavailable need --strategy rolling or canary",
                    );
                }
                return Ok(None);
            }
            StrategyArg::Rolling => rollout::Strategy::Rolling,
            StrategyArg::Canary => rollout::Strategy::Canary,
        };
        if self.max_parallel == Some(0) {
            return usage("--max-parallel must be at least 1");
        }
        if self.canary == Some(0) {
            return usage("--canary must be at least 1");
        }
        Ok(Some(Rollout {
            strategy: strategy as i32,
            max_parallel: self.max_parallel.unwrap_or(0),
            max_unavailable: self.max_unavailable.unwrap_or(0),
            canary: self.canary.unwrap_or(0),
        }))
    }
}

/// Follow the deployment or not.
#[derive(Debug, Args)]
struct WaitArgs {
    /// Follow the deployment until every node finished (live on a
    /// terminal, plain lines otherwise); exit 1 naming every node that
    /// failed, was skipped or rolled back, and why.
    #[arg(long)]
    wait: bool,
    /// Print JSON: the deployment id and target nodes, or with --wait the
    /// outcome of every node.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct RollbackArgs {
    /// App name.
    app: String,
    #[command(flatten)]
    target: Target,
    /// Release to go back to [default: each node's previous release].
    #[arg(long)]
    to: Option<String>,
    #[command(flatten)]
    rollout: RolloutArgs,
    #[command(flatten)]
    wait: WaitArgs,
}

#[derive(Debug, Args)]
struct ReadArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `releases` arguments.
#[derive(Debug, Args)]
struct ReleasesArgs {
    /// The app.
    app: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct AuditArgs {
    /// Only events this recent (90s, 30m, 1h, 7d) or at or after this
    /// time (RFC 3339, e.g. 2026-01-02T03:04:05Z).
    #[arg(long)]
    since: Option<String>,
    /// Print JSON (an array of events).
    #[arg(long)]
    json: bool,
}

/// A failure the user must fix in the arguments (exit 64).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Usage(String);

fn main() -> ExitCode {
    let cli: Cli = match slipway_controller::cli::parse() {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    slipway_controller::pki::crypto::install_default_provider();
    let runtime = match slipway_controller::cli::runtime() {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", slipway_controller::cli::error_text(&err));
            if err.chain().any(|e| e.is::<Usage>()) {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

struct Api {
    client: ControlClient<Channel>,
    /// None when the caller is the operator certificate of the channel.
    token: Option<MetadataValue<Ascii>>,
}

async fn api(cli: &Cli) -> anyhow::Result<Api> {
    let controller = cli.controller.as_deref().ok_or_else(|| {
        Usage("no controller: give --controller HOST:PORT or set SLIPWAY_CONTROLLER".to_owned())
    })?;
    let ca = cli
        .ca
        .as_deref()
        .ok_or_else(|| Usage("no CA: give --ca FILE or set SLIPWAY_CA".to_owned()))?;
    let identity = match (&cli.cert, &cli.key) {
        (Some(cert), Some(key)) => {
            Some(client::load_identity(cert, key).map_err(|e| Usage(e.to_string()))?)
        }
        _ => None,
    };
    let token = match (cli.token.as_deref(), &identity) {
        (Some(token), _) => Some(client::bearer(token).map_err(|e| Usage(e.to_string()))?),
        (None, Some(_)) => None,
        (None, None) => {
            return Err(Usage(
                "no credentials: give --token (SLIPWAY_TOKEN), or --cert and --key (SLIPWAY_CERT, SLIPWAY_KEY)"
                    .to_owned(),
            )
            .into())
        }
    };
    let roots = client::load_ca(ca).map_err(|e| Usage(e.to_string()))?;
    let channel = client::connect_as(controller, roots, identity)
        .await
        .map_err(|e| match e {
            client::ClientError::Identity { .. } => anyhow::Error::from(Usage(e.to_string())),
            other => other.into(),
        })?;
    Ok(Api {
        // Large fleets' node lists can exceed the 4 MiB default.
        client: ControlClient::new(channel).max_decoding_message_size(64 * 1024 * 1024),
        token,
    })
}

/// gRPC errors as one readable line.
fn status_error(what: &str, status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{what}: {} ({:?})", status.message(), status.code())
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut api = api(&cli).await?;
    match &cli.command {
        Command::Deploy(args) => deploy(&mut api, args).await,
        Command::Rollback(args) => rollback(&mut api, args).await,
        Command::Nodes(args) => nodes(&mut api, args).await,
        Command::Releases(args) => releases(&mut api, args).await,
        Command::Audit(args) => audit(&mut api, args).await,
        Command::Status(args) => status(&mut api, args).await,
        Command::Restart(args) => restart(&mut api, args).await,
        Command::Prune(args) => prune(&mut api, args).await,
    }
}

/// Hash-read size: large reads keep hashing at disk speed.
const HASH_BUFFER: usize = 1024 * 1024;

/// The sha256 (lowercase hex) and size of the file at `path`.
async fn hash_file(path: &Path) -> anyhow::Result<(String, u64)> {
    use sha2::Digest as _;
    use std::io::Read as _;
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut file =
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        let mut hasher = sha2::Sha256::new();
        let mut buffer = vec![0u8; HASH_BUFFER];
        let mut size = 0u64;
        loop {
            let n = file
                .read(&mut buffer)
                .with_context(|| format!("reading {}", path.display()))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            hasher.update(&buffer[..n]);
        }
        Ok((hex::encode(hasher.finalize()), size))
    })
    .await
    .context("hashing the artifact")?
}

/// Uploads `path`, whose sha256 is `sha256` and size `size` (as hashed
/// here); `quiet` (--json) prints nothing.
async fn upload(
    api: &mut Api,
    path: &Path,
    sha256: &str,
    size: u64,
    quiet: bool,
) -> anyhow::Result<()> {
    let mut file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("opening {}", path.display()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(UPLOAD_AHEAD);
    let sha = sha256.to_owned();
    let display = path.display().to_string();
    let mut reader = tokio::spawn(async move {
        let mut first = true;
        loop {
            let mut data = Vec::with_capacity(UPLOAD_CHUNK);
            let n = (&mut file)
                .take(UPLOAD_CHUNK as u64)
                .read_to_end(&mut data)
                .await
                .with_context(|| format!("reading {display}"))?;
            if n == 0 && !first {
                break;
            }
            let chunk = if first {
                UploadChunk {
                    sha256: sha.clone(),
                    size,
                    data,
                }
            } else {
                UploadChunk {
                    data,
                    ..UploadChunk::default()
                }
            };
            first = false;
            // The controller may answer (already present) before reading
            // everything: then stop.
            if tx.send(chunk).await.is_err() || n == 0 {
                break;
            }
        }
        anyhow::Ok(())
    });
    let request = client::authed(tokio_stream::wrappers::ReceiverStream::new(rx), &api.token);
    let response = api.client.upload_artifact(request).await;
    // A read error ends the stream early; report it rather than the
    // digest mismatch the controller then sees.
    let read = tokio::time::timeout(Duration::from_secs(1), &mut reader).await;
    reader.abort();
    if let Ok(Ok(Err(err))) = read {
        return Err(err);
    }
    let response = response
        .map_err(|s| status_error("upload refused", s))?
        .into_inner();
    if quiet {
        return Ok(());
    }
    if response.already_present {
        println!(
            "artifact {} already on the controller ({} bytes)",
            response.sha256, response.size
        );
    } else {
        println!(
            "uploaded artifact {} ({} bytes)",
            response.sha256, response.size
        );
    }
    Ok(())
}

async fn deploy(api: &mut Api, args: &DeployArgs) -> anyhow::Result<ExitCode> {
    let given = args.sha.as_deref().map(str::to_ascii_lowercase);
    if let Some(sha) = &given {
        if slipway_controller::artifacts::check_digest(sha).is_err() {
            bail!(Usage(format!(
                "--sha {} is not a sha256 (64 hex characters)",
                limits::shown(sha)
            )));
        }
    }
    let rollout = args.rollout.to_proto()?;
    // The file given is what ships: hash it before asking the controller
    // anything, so a stale or mistyped --sha cannot deploy other bytes the
    // controller happens to hold under that digest.
    let uploading = match &args.artifact {
        Some(path) => {
            let (actual, size) = hash_file(path).await?;
            if let Some(sha) = given.as_deref().filter(|sha| *sha != actual) {
                bail!(Usage(format!(
                    "--sha {sha} does not match {} (its sha256 is {actual}, {size} bytes); \
                     nothing was deployed: check the digest, or leave out --sha",
                    path.display()
                )));
            }
            Some((path, actual, size))
        }
        None => None,
    };
    let sha = match (&uploading, given) {
        (Some((_, actual, _)), _) => actual.clone(),
        (None, Some(sha)) => sha,
        (None, None) => bail!(Usage("--sha is required with --url".to_owned())),
    };
    let request = DeployRequest {
        app: args.app.clone(),
        sha256: sha.clone(),
        release_id: args.id.clone().unwrap_or_default(),
        selector: args.target.selector(),
        git_sha: args.git_sha.clone().unwrap_or_default(),
        artifact_url: args.url.clone().unwrap_or_default(),
        rollout,
    };
    // The controller checks every field too; checked here, a bad one is a
    // usage error before anything is uploaded.
    request.validate().map_err(|e| Usage(e.to_string()))?;
    // The URL's scheme is the controller's to check (INVALID_ARGUMENT).
    if let Some((path, _, size)) = uploading {
        upload(api, path, &sha, size, args.wait.json).await?;
    }
    let stream = api
        .client
        .deploy(client::authed(request, &api.token))
        .await
        .map_err(|s| status_error("deploy refused", s))?
        .into_inner();
    follow_or_return(stream, "deploy", &args.wait).await
}

async fn rollback(api: &mut Api, args: &RollbackArgs) -> anyhow::Result<ExitCode> {
    let request = RollbackRequest {
        app: args.app.clone(),
        to_release_id: args.to.clone().unwrap_or_default(),
        selector: args.target.selector(),
        rollout: args.rollout.to_proto()?,
    };
    let stream = api
        .client
        .rollback(client::authed(request, &api.token))
        .await
        .map_err(|s| status_error("rollback refused", s))?
        .into_inner();
    follow_or_return(stream, "rollback", &args.wait).await
}

/// With --wait, follows the deployment to its end; else returns once the
/// controller reported it started (it runs on regardless).
async fn follow_or_return(
    mut stream: tonic::Streaming<DeployEvent>,
    what: &str,
    wait: &WaitArgs,
) -> anyhow::Result<ExitCode> {
    if wait.wait {
        return progress::follow(stream, what, progress::Output::detect(wait.json)).await;
    }
    let first = stream
        .message()
        .await
        .map_err(|s| status_error(&format!("{what} stream"), s))?;
    let Some(deploy_event::Kind::Started(started)) = first.and_then(|e| e.kind) else {
        bail!("the controller did not confirm the {what}; check `slipway audit`");
    };
    if wait.json {
        let out = serde_json::json!({
            "deployment_id": started.deployment_id,
            "app": started.app,
            "release_id": started.release_id,
            "rollout": progress::rollout_text(&started),
            "started_by": started.actor,
            "nodes": started
                .nodes
                .iter()
                .map(|n| serde_json::json!({ "node_id": n.node_id, "node_name": n.node_name }))
                .collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{}", progress::started_line(what, &started));
        println!(
            "{what} {} started; it goes on on the controller (--wait follows it; \
             `slipway releases {}` and `slipway audit` show how it went)",
            started.deployment_id, started.app
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The fleet view, as `slipway-controller nodes` shows it.
async fn fetch_nodes(api: &mut Api) -> anyhow::Result<Vec<NodeView>> {
    let response = api
        .client
        .list_nodes(client::authed(ListNodesRequest {}, &api.token))
        .await
        .map_err(|s| status_error("listing nodes", s))?
        .into_inner();
    serde_json::from_str(&response.nodes_json).context("decoding the fleet view")
}

async fn nodes(api: &mut Api, args: &ReadArgs) -> anyhow::Result<ExitCode> {
    let nodes = fetch_nodes(api).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&nodes)?);
    } else {
        print!("{}", fleet::render_table(&nodes));
    }
    Ok(ExitCode::SUCCESS)
}

async fn releases(api: &mut Api, args: &ReleasesArgs) -> anyhow::Result<ExitCode> {
    let nodes = fetch_nodes(api).await?;
    // (node, its state of the app) for every node that has the app.
    let rows: Vec<(&NodeView, &slipway_controller::store::App)> = nodes
        .iter()
        .filter_map(|n| n.apps.iter().find(|a| a.app == args.app).map(|a| (n, a)))
        .collect();
    if rows.is_empty() {
        bail!("no node reports an app named {:?}", args.app);
    }
    if args.json {
        let out: Vec<serde_json::Value> = rows
            .iter()
            .map(|(n, a)| {
                serde_json::json!({
                    "node": n.name,
                    "node_id": n.id,
                    "state": n.state,
                    "current_release": a.current_release,
                    "health": a.health,
                    "releases": a.releases,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    for (n, a) in rows {
        println!(
            "{} ({:?}): current {} — {}",
            n.name, n.state, a.current_release, a.health
        );
        for r in a.releases.iter().rev() {
            let mark = if r.id == a.current_release { "*" } else { " " };
            println!("  {mark} {:<32} {}", r.id, r.status);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn audit(api: &mut Api, args: &AuditArgs) -> anyhow::Result<ExitCode> {
    let since_unix = match &args.since {
        Some(since) => since_unix(since, time::OffsetDateTime::now_utc().unix_timestamp())?,
        None => 0,
    };
    let events = api
        .client
        .list_audit(client::authed(ListAuditRequest { since_unix }, &api.token))
        .await
        .map_err(|s| status_error("listing audit events", s))?
        .into_inner()
        .events;
    if args.json {
        let json: Vec<serde_json::Value> = events
            .iter()
            .map(|e| {
                serde_json::json!({
                    "id": e.id,
                    "created_at": e.created_at_unix,
                    "event_type": e.event_type,
                    "actor": e.actor,
                    "resource_type": e.resource_type,
                    "resource_id": e.resource_id,
                    "details": serde_json::from_str::<serde_json::Value>(&e.details_json)
                        .unwrap_or(serde_json::Value::Null),
                    "status": e.status,
                    "error_message": if e.error_message.is_empty() { None } else { Some(&e.error_message) },
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(ExitCode::SUCCESS);
    }
    let format = time::format_description::well_known::Rfc3339;
    for e in &events {
        let when = time::OffsetDateTime::from_unix_timestamp(e.created_at_unix)
            .ok()
            .and_then(|t| t.format(&format).ok())
            .unwrap_or_else(|| e.created_at_unix.to_string());
        // Actors, resources and errors can carry what a peer sent: one
        // line each, control characters escaped, so no row can be forged.
        let line = |text: &str| limits::one_line(text, limits::MAX_MESSAGE);
        let error = if e.error_message.is_empty() {
            String::new()
        } else {
            format!("  {}", line(&e.error_message))
        };
        println!(
            "{when}  {:<22} {:<7} {:<18} {}:{}{error}",
            line(&e.event_type),
            line(&e.status),
            line(&e.actor),
            line(&e.resource_type),
            line(&e.resource_id)
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `--since`: a duration back from `now` (`90s`, `30m`, `1h`, `7d`) or an
/// RFC 3339 time, as seconds since the epoch.
fn since_unix(since: &str, now: i64) -> Result<i64, Usage> {
    if let Ok(ago) = slipway_controller::auth::token::parse_ttl(since) {
        return Ok(now.saturating_sub(i64::try_from(ago.as_secs()).unwrap_or(i64::MAX)));
    }
    time::OffsetDateTime::parse(since, &time::format_description::well_known::Rfc3339)
        .map(time::OffsetDateTime::unix_timestamp)
        .map_err(|_| {
            Usage(format!(
                "--since {since:?} is neither a duration (90s, 30m, 1h, 7d) nor an RFC 3339 time (2026-01-02T03:04:05Z)"
            ))
        })
}

async fn status(api: &mut Api, args: &StatusArgs) -> anyhow::Result<ExitCode> {
    let request = FleetStatusRequest {
        app: args.app.clone().unwrap_or_default(),
        refresh: args.refresh,
    };
    let response = api
        .client
        .fleet_status(client::authed(request, &api.token))
        .await
        .map_err(|s| status_error("fleet status", s))?
        .into_inner();
    let status: fleet::FleetStatus =
        serde_json::from_str(&response.status_json).context("decoding the fleet status")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", fleet::render_status(&status));
    }
    if status.ok() {
        if !args.json {
            println!("\nOK: every node online, every app healthy");
        }
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!(
        "status: {} problem(s): {}",
        status.problems.len(),
        status.problems.join("; ")
    );
    Ok(ExitCode::FAILURE)
}

async fn restart(api: &mut Api, args: &RestartArgs) -> anyhow::Result<ExitCode> {
    let request = RestartRequest {
        app: args.app.clone(),
        selector: args.target.selector(),
        rollout: args.rollout.to_proto()?,
    };
    let stream = api
        .client
        .restart(client::authed(request, &api.token))
        .await
        .map_err(|s| status_error("restart refused", s))?
        .into_inner();
    progress::follow(stream, "restart", progress::Output::detect(args.json)).await
}

async fn prune(api: &mut Api, args: &PruneArgs) -> anyhow::Result<ExitCode> {
    let request = PruneRequest {
        app: args.app.clone(),
        keep: args.keep.unwrap_or(0),
        selector: args.target.selector(),
    };
    let stream = api
        .client
        .prune(client::authed(request, &api.token))
        .await
        .map_err(|s| status_error("prune refused", s))?
        .into_inner();
    progress::follow(stream, "prune", progress::Output::detect(args.json)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_duration_or_an_rfc3339_time() {
        assert_eq!(since_unix("1h", 10_000).unwrap(), 10_000 - 3600);
        assert_eq!(since_unix("90s", 100).unwrap(), 10);
        assert_eq!(
            since_unix("2026-01-02T03:04:05Z", 0).unwrap(),
            time::macros::datetime!(2026-01-02 03:04:05 UTC).unix_timestamp()
        );
        assert_eq!(
            since_unix("2026-01-02T04:04:05+01:00", 0).unwrap(),
            time::macros::datetime!(2026-01-02 03:04:05 UTC).unix_timestamp()
        );
        let err = since_unix("yesterday", 0).unwrap_err().to_string();
        assert!(err.contains("\"yesterday\" is neither"), "{err}");
    }
}
