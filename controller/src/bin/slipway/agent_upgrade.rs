//! `agent-upgrade`: the new agent binary hashed, its version read here
//! (`--version`), uploaded into the controller's store of agent binaries,
//! and every selected node's agent upgraded through the rollout machinery
//! of `deploy` (all at once, rolling, canary; a rolling upgrade stops at the
//! first node that fails or rolls back).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::Args;
use slipway_proto::client;
use slipway_proto::limits;
use slipway_proto::v1::AgentUpgradeRequest;

use crate::api::{status_error, Api};
use crate::deploy::{self, RolloutArgs, Target, UploadKind, WaitArgs};
use crate::Usage;

/// How long the binary's `--version` may take here.
const VERSION_TIMEOUT: Duration = Duration::from_secs(10);

/// `agent-upgrade` arguments.
#[derive(Debug, Args)]
pub(crate) struct AgentUpgradeArgs {
    /// The new slipway-agent binary. Its `--version` is run here and every
    /// agent checks the binary reports the same version.
    #[arg(long, value_name = "FILE")]
    version_file: PathBuf,
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    rollout: RolloutArgs,
    /// Seconds each new agent has to reconnect to the controller before its
    /// node puts the old binary back by itself [default: 60].
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u32).range(5..=3600))]
    commit_deadline: Option<u32>,
    /// Do not run the binary here (a CLI on another architecture or OS):
    /// no version is sent, and each agent still runs `--version` itself.
    #[arg(long)]
    no_version_check: bool,
    #[command(flatten)]
    wait: WaitArgs,
}

/// Runs `binary --version` and returns the version after `slipway-agent`.
async fn read_version(binary: &Path) -> anyhow::Result<String> {
    let run = tokio::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(VERSION_TIMEOUT, run)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "{} --version did not answer within {VERSION_TIMEOUT:?}",
                binary.display()
            )
        })?
        .with_context(|| {
            format!(
                "cannot run {} --version (a binary for another machine? see --no-version-check)",
                binary.display()
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "{} --version failed ({}): {}",
            binary.display(),
            out.status,
            limits::one_line(&String::from_utf8_lossy(&out.stderr), 200)
        );
    }
    let mut words = text.lines().next().unwrap_or("").split_whitespace();
    match (words.next(), words.next()) {
        (Some("slipway-agent"), Some(v)) if limits::check_version("version", v).is_ok() => {
            Ok(v.to_owned())
        }
        _ => bail!(
            "{} --version printed {:?}: not a slipway-agent binary",
            binary.display(),
            limits::one_line(&text, 200)
        ),
    }
}

pub(crate) async fn agent_upgrade(
    api: &mut Api,
    args: &AgentUpgradeArgs,
) -> anyhow::Result<ExitCode> {
    let path = &args.version_file;
    if !path.is_file() {
        bail!(Usage(format!(
            "--version-file {} is not a file",
            path.display()
        )));
    }
    let rollout = args.rollout.to_proto()?;
    let version = if args.no_version_check {
        String::new()
    } else {
        read_version(path).await?
    };
    let (sha, size) = deploy::hash_file(path).await?;
    if size == 0 || size > limits::MAX_AGENT_BINARY {
        bail!(Usage(format!(
            "{} has {size} bytes: an agent binary has 1 to {} bytes",
            path.display(),
            limits::MAX_AGENT_BINARY
        )));
    }
    if !args.wait.json {
        let shown = if version.is_empty() {
            "version not checked here".to_owned()
        } else {
            format!("version {version}")
        };
        println!(
            "agent binary {} ({shown}, {size} bytes, sha256 {sha})",
            path.display()
        );
    }
    deploy::upload(
        api,
        path,
        &sha,
        size,
        args.wait.json,
        UploadKind::AgentBinary,
    )
    .await?;
    let request = AgentUpgradeRequest {
        sha256: sha,
        version,
        selector: args.target.selector(),
        rollout,
        commit_deadline_secs: args.commit_deadline.unwrap_or(0),
    };
    let stream = api
        .client
        .agent_upgrade(client::authed(request, &api.token))
        .await
        .map_err(|s| status_error("agent upgrade refused", s))?
        .into_inner();
    deploy::follow_or_return(api, stream, "agent upgrade", &args.wait).await
}
