//! `deploy`, `rollback`, `restart` and `prune`: the request from the
//! flags (rollout, target nodes), the artifact hashed and uploaded, and the
//! deployment followed or left running.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;
use slipway_proto::client;
use slipway_proto::limits::{self, Validate as _};
use slipway_proto::v1::{
    deploy_event, rollout, selector, DeployEvent, DeployRequest, PruneRequest, RestartRequest,
    RollbackRequest, Rollout, Selector, StartRequest, StopRequest, UploadChunk,
    WatchDeploymentRequest,
};
use tokio::io::AsyncReadExt as _;

use crate::api::{status_error, Api};
use crate::progress;
use crate::Usage;

/// Upload message size: well under gRPC's 4 MiB limit.
const UPLOAD_CHUNK: usize = 256 * 1024;
/// Upload messages read ahead of the network.
const UPLOAD_AHEAD: usize = 4;

/// `restart` arguments.
#[derive(Debug, Args)]
pub(crate) struct RestartArgs {
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

/// `stop` and `start` arguments.
#[derive(Debug, Args)]
pub(crate) struct StopStartArgs {
    /// App name.
    app: String,
    #[command(flatten)]
    target: Target,
    /// Print every node's outcome as JSON at the end.
    #[arg(long)]
    json: bool,
}

/// `prune` arguments.
#[derive(Debug, Args)]
pub(crate) struct PruneArgs {
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
pub(crate) struct Target {
    /// Nodes with this label, `key:value` (e.g. env:production).
    #[arg(long)]
    tag: Option<String>,
    /// One node, by id or name.
    #[arg(long)]
    node: Option<String>,
}

impl Target {
    pub(crate) fn selector(&self) -> Option<Selector> {
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
pub(crate) struct DeployArgs {
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
pub(crate) struct RolloutArgs {
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
    pub(crate) fn to_proto(&self) -> Result<Option<Rollout>, Usage> {
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
pub(crate) struct WaitArgs {
    /// Follow the deployment until every node finished (live on a
    /// terminal, plain lines otherwise); exit 1 naming every node that
    /// failed, was skipped or rolled back, and why. If the controller
    /// replica it follows dies, it connects to --controller again (with
    /// several replicas, a load balancer in front of them) and re-attaches
    /// to the deployment another replica carries on, for up to 2 minutes,
    /// saying so in one line; nothing is shown twice and the exit code is
    /// the deployment's.
    #[arg(long)]
    wait: bool,
    /// Print JSON: the deployment id and target nodes, or with --wait the
    /// outcome of every node.
    #[arg(long)]
    pub(crate) json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RollbackArgs {
    /// App name.
    app: String,
    #[command(flatten)]
    target: Target,
    /// Release to go back to [default: each node's previous release].
    #[arg(long)]
    to: Option<String>,
    /// Also bring back the env version the release went live with (as a
    /// new env version, delivered to the same nodes once the rollback
    /// succeeded; implies --wait). Without it the current env stays
    /// (rotated secrets stay rotated).
    #[arg(long, requires = "to")]
    with_env: bool,
    #[command(flatten)]
    rollout: RolloutArgs,
    #[command(flatten)]
    wait: WaitArgs,
}

/// Hash-read size: large reads keep hashing at disk speed.
const HASH_BUFFER: usize = 1024 * 1024;

/// The sha256 (lowercase hex) and size of the file at `path`.
pub(crate) async fn hash_file(path: &Path) -> anyhow::Result<(String, u64)> {
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

/// What an upload is: an app artifact, or an agent binary (stored apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum UploadKind {
    Artifact,
    AgentBinary,
}

impl UploadKind {
    fn noun(self) -> &'static str {
        match self {
            Self::Artifact => "artifact",
            Self::AgentBinary => "agent binary",
        }
    }
}

/// Uploads `path`, whose sha256 is `sha256` and size `size` (as hashed
/// here); `quiet` (--json) prints nothing.
pub(crate) async fn upload(
    api: &mut Api,
    path: &Path,
    sha256: &str,
    size: u64,
    quiet: bool,
    kind: UploadKind,
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
    let response = match kind {
        UploadKind::Artifact => api.client.upload_artifact(request).await,
        UploadKind::AgentBinary => api.client.upload_agent_binary(request).await,
    };
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
            "{} {} already on the controller ({} bytes)",
            kind.noun(),
            response.sha256,
            response.size
        );
    } else {
        println!(
            "uploaded {} {} ({} bytes)",
            kind.noun(),
            response.sha256,
            response.size
        );
    }
    Ok(())
}

pub(crate) async fn deploy(api: &mut Api, args: &DeployArgs) -> anyhow::Result<ExitCode> {
    let given = args.sha.as_deref().map(str::to_ascii_lowercase);
    if let Some(sha) = &given {
        if limits::check_sha256("--sha", sha).is_err() {
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
        upload(api, path, &sha, size, args.wait.json, UploadKind::Artifact).await?;
    }
    let stream = api
        .client
        .deploy(client::authed(request, &api.token))
        .await
        .map_err(|s| status_error("deploy refused", s))?
        .into_inner();
    follow_or_return(api, stream, "deploy", &args.wait).await
}

pub(crate) async fn rollback(api: &mut Api, args: &RollbackArgs) -> anyhow::Result<ExitCode> {
    if args.with_env {
        return rollback_with_env(api, args).await;
    }
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
    follow_or_return(api, stream, "rollback", &args.wait).await
}

/// `rollback --with-env`: the env version release `--to` went live with
/// (from `slipway releases`' record), the rollback followed to its end,
/// then that env version's content delivered as a new version.
async fn rollback_with_env(api: &mut Api, args: &RollbackArgs) -> anyhow::Result<ExitCode> {
    let to = args.to.clone().unwrap_or_default();
    let nodes = api
        .client
        .list_nodes(client::authed(
            slipway_proto::v1::ListNodesRequest {},
            &api.token,
        ))
        .await
        .map_err(|s| status_error("listing nodes", s))?
        .into_inner()
        .nodes;
    let env_version = nodes
        .iter()
        .flat_map(|n| n.apps.iter().filter(|a| a.app == args.app))
        .flat_map(|a| a.releases.iter().filter(|r| r.id == to))
        .map(|r| r.env_version)
        .find(|v| *v != 0)
        .ok_or_else(|| {
            Usage(format!(
                "release {to} of {} has no recorded env version (deployed before the \
                 controller kept its env, or not deployed through it): roll back without --with-env",
                args.app
            ))
        })?;
    let request = RollbackRequest {
        app: args.app.clone(),
        to_release_id: to.clone(),
        selector: args.target.selector(),
        rollout: args.rollout.to_proto()?,
    };
    let output = progress::Output::detect(args.wait.json);
    let stream = api
        .client
        .rollback(client::authed(request, &api.token))
        .await
        .map_err(|s| status_error("rollback refused", s))?
        .into_inner();
    let code = progress::follow(api, stream, "rollback", output).await?;
    if code != ExitCode::SUCCESS {
        bail!("the rollback to {to} did not succeed everywhere; env v{env_version} not restored");
    }
    let request = slipway_proto::v1::ChangeEnvRequest {
        app: args.app.clone(),
        rollback_to: env_version,
        // The base layer as it stood at that version (tag layers stay).
        rollback_as_of: true,
        selector: args.target.selector(),
        rollout: args.rollout.to_proto()?,
        ..Default::default()
    };
    let stream = api
        .client
        .change_env(client::authed(request, &api.token))
        .await
        .map_err(|s| status_error("env rollback refused", s))?
        .into_inner();
    progress::follow(api, stream, "env", progress::Output::detect(args.wait.json)).await
}

/// With --wait, follows the deployment to its end; else returns once the
/// controller reported it started (it runs on regardless).
pub(crate) async fn follow_or_return(
    api: &Api,
    mut stream: tonic::Streaming<DeployEvent>,
    what: &str,
    wait: &WaitArgs,
) -> anyhow::Result<ExitCode> {
    if wait.wait {
        return progress::follow(api, stream, what, progress::Output::detect(wait.json)).await;
    }
    let first = stream
        .message()
        .await
        .map_err(|s| status_error(&format!("{what} stream"), s))?;
    let Some(deploy_event::Kind::Started(started)) = first.and_then(|e| e.kind) else {
        bail!("the controller did not confirm the {what}; check `slipway audit`");
    };
    if wait.json {
        let mut out = serde_json::json!({
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
        if started.env_version != 0 {
            out["env_version"] = serde_json::Value::from(started.env_version);
        }
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

pub(crate) async fn restart(api: &mut Api, args: &RestartArgs) -> anyhow::Result<ExitCode> {
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
    progress::follow(api, stream, "restart", progress::Output::detect(args.json)).await
}

pub(crate) async fn stop(api: &mut Api, args: &StopStartArgs) -> anyhow::Result<ExitCode> {
    let request = StopRequest {
        app: args.app.clone(),
        selector: args.target.selector(),
    };
    let stream = api
        .client
        .stop(client::authed(request, &api.token))
        .await
        .map_err(|s| status_error("stop refused", s))?
        .into_inner();
    progress::follow(api, stream, "stop", progress::Output::detect(args.json)).await
}

pub(crate) async fn start(api: &mut Api, args: &StopStartArgs) -> anyhow::Result<ExitCode> {
    let request = StartRequest {
        app: args.app.clone(),
        selector: args.target.selector(),
    };
    let stream = api
        .client
        .start(client::authed(request, &api.token))
        .await
        .map_err(|s| status_error("start refused", s))?
        .into_inner();
    progress::follow(api, stream, "start", progress::Output::detect(args.json)).await
}

pub(crate) async fn prune(api: &mut Api, args: &PruneArgs) -> anyhow::Result<ExitCode> {
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
    progress::follow(api, stream, "prune", progress::Output::detect(args.json)).await
}

/// `slipway watch`.
#[derive(Debug, Args)]
pub(crate) struct WatchArgs {
    /// Deployment id (d- and 16 hex digits), as `deploy` printed it.
    id: String,
    /// Print one JSON object at the end: the outcome of every node.
    #[arg(long)]
    json: bool,
}

/// Follows any deployment by id to its end, like `deploy --wait`; the exit
/// code is the deployment's.
pub(crate) async fn watch(api: &mut Api, args: &WatchArgs) -> anyhow::Result<ExitCode> {
    let request = WatchDeploymentRequest {
        deployment_id: args.id.clone(),
    };
    request.validate().map_err(|e| Usage(e.to_string()))?;
    let stream = api
        .client
        .watch_deployment(client::authed(request, &api.token))
        .await
        .map_err(|s| status_error("watch refused", s))?
        .into_inner();
    progress::follow_deployment(
        api,
        stream,
        "deployment",
        progress::Output::detect(args.json),
        Some(&args.id),
    )
    .await
}
