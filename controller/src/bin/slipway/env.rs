//! `env`: an app's environment, kept by the controller (sealed, versioned)
//! and delivered to its nodes like a deploy. Values come on the command
//! line, from stdin (`KEY=-`) or from files, so they need not sit in shell
//! history or CI logs; they are printed only by `env get`.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use slipway_proto::client;
use slipway_proto::limits::{self, Validate as _};
use slipway_proto::v1::{
    selector, ChangeEnvRequest, EnvHistoryRequest, EnvVar, GetEnvRequest, ListEnvRequest, Selector,
};

use crate::api::{status_error, Api};
use crate::deploy::{follow_or_return, RolloutArgs, WaitArgs};
use crate::Usage;

/// `env` subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum EnvCommand {
    /// Set variables (KEY=VALUE; KEY=- reads the value from stdin;
    /// --value-file KEY=PATH from a file) as a new version, and deliver it
    /// to the app's nodes, each behind its health gate.
    Set(SetArgs),
    /// Remove variables as a new version, and deliver it.
    Unset(UnsetArgs),
    /// Replace the whole environment with a .env file (--file PATH, or -
    /// for stdin) as one new version, and deliver it.
    Import(ImportArgs),
    /// The names of the app's environment, with the version that last set
    /// each, who and when. Never values.
    List(ReadEnvArgs),
    /// Print one value (needs the secrets:APP scope; audited).
    Get(GetArgs),
    /// Every version: who, when, which names changed.
    History(ReadEnvArgs),
    /// Make the content of an earlier version the new current version, and
    /// deliver it.
    Rollback(RollbackEnvArgs),
}

/// Delivery: which layer, which nodes, how, and whether to follow it.
#[derive(Debug, Args)]
pub(crate) struct Delivery {
    /// Change the override layer of the nodes carrying this tag
    /// (`env:staging`; a label or a synced DigitalOcean tag, as `deploy
    /// --tag` selects) instead of the app's base environment. Only nodes
    /// whose effective environment changes receive it.
    #[arg(long, value_name = "TAG")]
    tag: Option<String>,
    /// Deliver to this node only (by id or name); the others get the
    /// change when they reconnect or with the next one.
    #[arg(long)]
    node: Option<String>,
    #[command(flatten)]
    rollout: RolloutArgs,
    #[command(flatten)]
    wait: WaitArgs,
}

#[derive(Debug, Args)]
pub(crate) struct SetArgs {
    /// App name.
    app: String,
    /// KEY=VALUE pairs; KEY=- reads VALUE from stdin (one key at most; a
    /// final newline is dropped).
    vars: Vec<String>,
    /// KEY=PATH: the value is the file's content (a final newline is
    /// dropped). May be repeated.
    #[arg(long, value_name = "KEY=PATH")]
    value_file: Vec<String>,
    #[command(flatten)]
    delivery: Delivery,
}

#[derive(Debug, Args)]
pub(crate) struct UnsetArgs {
    /// App name.
    app: String,
    /// Names to remove.
    #[arg(required = true, value_name = "KEY")]
    keys: Vec<String>,
    #[command(flatten)]
    delivery: Delivery,
}

#[derive(Debug, Args)]
pub(crate) struct ImportArgs {
    /// App name.
    app: String,
    /// The .env file; - reads stdin.
    #[arg(long, value_name = "PATH")]
    file: PathBuf,
    #[command(flatten)]
    delivery: Delivery,
}

#[derive(Debug, Args)]
pub(crate) struct ReadEnvArgs {
    /// App name.
    app: String,
    /// list: the names a node carrying this tag sees, each from its layer;
    /// history: this tag layer's versions only.
    #[arg(long, value_name = "TAG")]
    tag: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct GetArgs {
    /// App name.
    app: String,
    /// The variable.
    #[arg(value_name = "KEY")]
    name: String,
    /// The value a node carrying this tag sees (its layer's, else the
    /// base's).
    #[arg(long, value_name = "TAG")]
    tag: Option<String>,
    /// Print JSON ({"key", "value", "version"}).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct RollbackEnvArgs {
    /// App name.
    app: String,
    /// The version whose content comes back (slipway env history lists
    /// them).
    #[arg(long, value_name = "VERSION")]
    to: u64,
    #[command(flatten)]
    delivery: Delivery,
}

/// `text` without one final newline (`\n` or `\r\n`).
fn chomp(mut text: String) -> String {
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    text
}

fn read_stdin(what: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .map_err(|e| Usage(format!("cannot read {what} from stdin: {e}")))?;
    Ok(text)
}

/// The variables of `env set`, in order.
fn set_vars(args: &SetArgs) -> anyhow::Result<Vec<EnvVar>> {
    let mut vars = Vec::new();
    let mut stdin_used = false;
    for pair in &args.vars {
        let Some((key, value)) = pair.split_once('=') else {
            // The argument may be a value typed by mistake: not shown.
            return Err(Usage(format!(
                "argument {} of env set is not KEY=VALUE",
                vars.len() + 1
            ))
            .into());
        };
        let value = if value == "-" {
            if stdin_used {
                return Err(Usage("only one KEY=- may read stdin".to_owned()).into());
            }
            stdin_used = true;
            chomp(read_stdin(&format!("the value of {key}"))?)
        } else {
            value.to_owned()
        };
        vars.push(EnvVar {
            key: key.to_owned(),
            value,
        });
    }
    for pair in &args.value_file {
        let Some((key, path)) = pair.split_once('=') else {
            return Err(Usage(format!("--value-file {pair:?} is not KEY=PATH")).into());
        };
        let value = std::fs::read_to_string(path)
            .map_err(|e| Usage(format!("--value-file {key}: cannot read {path}: {e}")))?;
        vars.push(EnvVar {
            key: key.to_owned(),
            value: chomp(value),
        });
    }
    if vars.is_empty() {
        return Err(Usage("env set needs at least one KEY=VALUE".to_owned()).into());
    }
    Ok(vars)
}

async fn change(
    api: &mut Api,
    mut request: ChangeEnvRequest,
    delivery: &Delivery,
) -> anyhow::Result<ExitCode> {
    request.selector = delivery.node.as_ref().map(|node| Selector {
        target: Some(selector::Target::Node(node.clone())),
    });
    request.tag = delivery.tag.clone().unwrap_or_default();
    request.rollout = delivery.rollout.to_proto()?;
    // The controller checks too; here the mistake is named before
    // anything is sent.
    request.validate().map_err(|e| Usage(format!("env: {e}")))?;
    let stream = api
        .client
        .change_env(client::authed(request, &api.token))
        .await
        .map_err(|s| status_error("env change refused", s))?
        .into_inner();
    follow_or_return(api, stream, "env", &delivery.wait).await
}

pub(crate) async fn env(api: &mut Api, command: &EnvCommand) -> anyhow::Result<ExitCode> {
    match command {
        EnvCommand::Set(args) => {
            let set = set_vars(args)?;
            let request = ChangeEnvRequest {
                app: args.app.clone(),
                set,
                ..ChangeEnvRequest::default()
            };
            change(api, request, &args.delivery).await
        }
        EnvCommand::Unset(args) => {
            let request = ChangeEnvRequest {
                app: args.app.clone(),
                unset: args.keys.clone(),
                ..ChangeEnvRequest::default()
            };
            change(api, request, &args.delivery).await
        }
        EnvCommand::Import(args) => {
            let text = if args.file.as_os_str() == "-" {
                read_stdin("the .env file")?
            } else {
                std::fs::read_to_string(&args.file)
                    .map_err(|e| Usage(format!("cannot read {}: {e}", args.file.display())))?
            };
            let vars = slipway_proto::dotenv::parse(&text)
                .map_err(|e| Usage(format!("{}: {e}", args.file.display())))?;
            let request = ChangeEnvRequest {
                app: args.app.clone(),
                set: vars
                    .into_iter()
                    .map(|(key, value)| EnvVar { key, value })
                    .collect(),
                replace: true,
                ..ChangeEnvRequest::default()
            };
            change(api, request, &args.delivery).await
        }
        EnvCommand::Rollback(args) => {
            if args.to == 0 {
                return Err(Usage("--to must be a version of 1 or more".to_owned()).into());
            }
            let request = ChangeEnvRequest {
                app: args.app.clone(),
                rollback_to: args.to,
                ..ChangeEnvRequest::default()
            };
            change(api, request, &args.delivery).await
        }
        EnvCommand::List(args) => list(api, args).await,
        EnvCommand::History(args) => history(api, args).await,
        EnvCommand::Get(args) => get(api, args).await,
    }
}

fn when(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

async fn list(api: &mut Api, args: &ReadEnvArgs) -> anyhow::Result<ExitCode> {
    limits::check_app_name("app", &args.app).map_err(|e| Usage(e.to_string()))?;
    limits::check_env_layer("--tag", args.tag.as_deref().unwrap_or(""))
        .map_err(|e| Usage(e.to_string()))?;
    let list = api
        .client
        .list_env(client::authed(
            ListEnvRequest {
                app: args.app.clone(),
                tag: args.tag.clone().unwrap_or_default(),
            },
            &api.token,
        ))
        .await
        .map_err(|s| status_error("listing env names", s))?
        .into_inner();
    if args.json {
        let out = serde_json::json!({
            "app": args.app,
            "version": list.version,
            "variables": list.entries.iter().map(|e| serde_json::json!({
                "key": e.key,
                "layer": (!e.layer.is_empty()).then_some(&e.layer),
                "overridden": e.overridden,
                "version": e.version,
                "changed_by": e.actor,
                "changed_at": e.changed_at,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    if list.version == 0 {
        println!(
            "app {} has no env on the controller yet (slipway env set / import)",
            args.app
        );
        return Ok(ExitCode::SUCCESS);
    }
    let layers: std::collections::BTreeSet<&str> =
        list.entries.iter().map(|e| e.layer.as_str()).collect();
    println!(
        "app {} env version {}: {} name(s) in {} layer(s)",
        args.app,
        list.version,
        list.entries.len(),
        layers.len()
    );
    for e in &list.entries {
        let layer = if e.layer.is_empty() {
            "base".to_owned()
        } else {
            e.layer.clone()
        };
        println!(
            "{:<32} {:<20} v{:<5} {} {}{}",
            e.key,
            layer,
            e.version,
            e.actor,
            when(e.changed_at),
            if e.overridden {
                " (overridden by a tag layer)"
            } else {
                ""
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn history(api: &mut Api, args: &ReadEnvArgs) -> anyhow::Result<ExitCode> {
    limits::check_app_name("app", &args.app).map_err(|e| Usage(e.to_string()))?;
    limits::check_env_layer("--tag", args.tag.as_deref().unwrap_or(""))
        .map_err(|e| Usage(e.to_string()))?;
    let history = api
        .client
        .env_history(client::authed(
            EnvHistoryRequest {
                app: args.app.clone(),
                tag: args.tag.clone().unwrap_or_default(),
            },
            &api.token,
        ))
        .await
        .map_err(|s| status_error("reading env history", s))?
        .into_inner();
    if args.json {
        let out: Vec<serde_json::Value> = history
            .versions
            .iter()
            .map(|v| {
                serde_json::json!({
                    "version": v.version,
                    "layer": (!v.layer.is_empty()).then_some(&v.layer),
                    "changed_by": v.actor,
                    "created_at": v.created_at,
                    "change": v.change,
                    "set": v.set,
                    "unset": v.unset,
                    "rollback_to": (v.rollback_to != 0).then_some(v.rollback_to),
                    "count": v.count,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    for v in &history.versions {
        let mut what = String::new();
        if v.rollback_to != 0 {
            what.push_str(&format!(" content of v{}", v.rollback_to));
        }
        if !v.set.is_empty() {
            what.push_str(&format!(" set {}", v.set.join(",")));
        }
        if !v.unset.is_empty() {
            what.push_str(&format!(" unset {}", v.unset.join(",")));
        }
        println!(
            "v{:<5} {:<20} {} {} {}:{what} ({} variable(s))",
            v.version,
            if v.layer.is_empty() { "base" } else { &v.layer },
            when(v.created_at),
            v.actor,
            v.change,
            v.count
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn get(api: &mut Api, args: &GetArgs) -> anyhow::Result<ExitCode> {
    let request = GetEnvRequest {
        app: args.app.clone(),
        key: args.name.clone(),
        tag: args.tag.clone().unwrap_or_default(),
    };
    request
        .validate()
        .map_err(|e| Usage(format!("env get: {e}")))?;
    let got = api
        .client
        .get_env(client::authed(request, &api.token))
        .await
        .map_err(|s| status_error("env get refused", s))?
        .into_inner();
    if args.json {
        let out = serde_json::json!({
            "key": args.name,
            "value": got.value,
            "version": got.version,
            "layer": (!got.layer.is_empty()).then_some(&got.layer),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("{}", got.value);
    }
    Ok(ExitCode::SUCCESS)
}
