//! `nodes`, `releases` and `status`: the fleet views, as a table or text
//! (`slipway_proto::view`, as `slipway-controller nodes` prints them) or
//! `--json`.

use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::Args;
use slipway_proto::v1::{AppStatus, FleetStatusRequest, ListNodesRequest, NodeView};
use slipway_proto::view;
use slipway_proto::{client, limits};

use crate::api::{status_error, Api};

/// `status` arguments.
#[derive(Debug, Args)]
pub(crate) struct StatusArgs {
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

#[derive(Debug, Args)]
pub(crate) struct ReadArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `releases` arguments.
#[derive(Debug, Args)]
pub(crate) struct ReleasesArgs {
    /// The app.
    app: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// The fleet view, as `slipway-controller nodes` shows it.
async fn fetch_nodes(api: &mut Api) -> anyhow::Result<Vec<NodeView>> {
    Ok(fetch_fleet(api).await?.nodes)
}

async fn fetch_fleet(api: &mut Api) -> anyhow::Result<slipway_proto::v1::ListNodesResponse> {
    Ok(api
        .client
        .list_nodes(client::authed(ListNodesRequest {}, &api.token))
        .await
        .map_err(|s| status_error("listing nodes", s))?
        .into_inner())
}

/// `nodes`: the table and, when the controller has DigitalOcean, its
/// droplets after it; `--json`: the array of nodes (the droplets are in
/// `slipway status --json`).
pub(crate) async fn nodes(api: &mut Api, args: &ReadArgs) -> anyhow::Result<ExitCode> {
    let fleet = fetch_fleet(api).await?;
    if args.json {
        println!("{}", view::nodes_json(&fleet.nodes)?);
    } else {
        print!("{}", view::render_table(&fleet.nodes));
        if let Some(droplets) = &fleet.droplets {
            print!("{}", view::render_droplets(droplets));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn releases(api: &mut Api, args: &ReleasesArgs) -> anyhow::Result<ExitCode> {
    let nodes = fetch_nodes(api).await?;
    // (node, its state of the app) for every node that has the app.
    let rows: Vec<(&NodeView, &AppStatus)> = nodes
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
                    "state": view::state_name(n.state()),
                    "current_release": a.current_release,
                    "health": a.health,
                    "releases": a.releases.iter().map(view::ReleaseJson::from).collect::<Vec<_>>(),
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    for (n, a) in rows {
        println!(
            "{} ({}): current {} — {}",
            n.name,
            view::state_name(n.state()),
            a.current_release,
            a.health
        );
        for r in a.releases.iter().rev() {
            let mark = if r.id == a.current_release { "*" } else { " " };
            // A failed or bad release says why and who marked it.
            let why = if r.reason.is_empty() {
                String::new()
            } else {
                format!(
                    " — {}",
                    limits::one_line(&r.reason, limits::MAX_RELEASE_REASON)
                )
            };
            let env = if r.env_version == 0 {
                String::new()
            } else {
                format!(" (env v{})", r.env_version)
            };
            println!("  {mark} {:<32} {}{env}{why}", r.id, r.status);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn status(api: &mut Api, args: &StatusArgs) -> anyhow::Result<ExitCode> {
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
    let status = response
        .status
        .clone()
        .context("the controller answered without a fleet status")?;
    if args.json {
        match &response.droplets {
            None => println!("{}", view::status_json(&status)?),
            Some(droplets) => {
                let mut json: serde_json::Value =
                    serde_json::from_str(&view::status_json(&status)?)?;
                json["droplets"] = view::droplets_value(droplets);
                println!("{}", serde_json::to_string_pretty(&json)?);
            }
        }
    } else {
        let mut text = view::render_status(&status);
        if let Some(droplets) = &response.droplets {
            text.push_str(&view::render_droplets(droplets));
        }
        // On a terminal, long lines (health output, failure reasons) are
        // cut to its width; `--json` has the full text.
        match crate::terminal_width(&console::Term::stdout()) {
            Some(width) => print!("{}", view::fit(&text, width)),
            None => print!("{text}"),
        }
    }
    if status.problems.is_empty() {
        if !args.json {
            println!("\n{}", view::ok_headline(&status));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let count = status.problems.len();
    let problems = if count == 1 { "problem" } else { "problems" };
    if args.json {
        eprintln!("status: {count} {problems}: {}", status.problems.join("; "));
    } else {
        // Each is listed once, under "problems:" above.
        eprintln!("status: {count} {problems} (listed above)");
    }
    Ok(ExitCode::FAILURE)
}
