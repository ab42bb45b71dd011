//! How `slipway deploy --wait` / `rollback --wait` show a deployment's
//! events: live per-node spinners (indicatif) when stdout and stderr are
//! terminals, plain timestamped lines otherwise (CI logs), or one JSON
//! object at the end (`--json`). The exit code says whether every node
//! succeeded.

use std::collections::{HashMap, HashSet};
use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use slipway_proto::v1::{
    deploy_event, rollout, DeployEvent, DeployFinished, DeployStarted, NodeResult, Outcome,
    WatchDeploymentRequest,
};
use slipway_proto::{client, limits};

use crate::api::Api;

/// How often a live spinner moves.
const TICK: Duration = Duration::from_millis(120);

/// Where and how events are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Output {
    /// Spinners on a terminal.
    Live,
    /// Timestamped lines.
    Plain,
    /// One JSON object at the end.
    Json,
}

impl Output {
    /// Live on a terminal (stdout and stderr both), else plain; JSON when
    /// asked.
    pub(crate) fn detect(json: bool) -> Self {
        if json {
            Self::Json
        } else if std::io::stdout().is_terminal() && std::io::stderr().is_terminal() {
            Self::Live
        } else {
            Self::Plain
        }
    }
}

/// `SUCCEEDED`, `FAILED`, `ROLLED_BACK`, `SKIPPED`.
pub(crate) fn outcome_word(outcome: i32) -> &'static str {
    match Outcome::try_from(outcome) {
        Ok(Outcome::Succeeded) => "SUCCEEDED",
        Ok(Outcome::RolledBack) => "ROLLED_BACK",
        Ok(Outcome::Skipped) => "SKIPPED",
        _ => "FAILED",
    }
}

/// `all_at_once`, `rolling (max parallel 2, max unavailable 0)`, ...
pub(crate) fn rollout_text(started: &DeployStarted) -> String {
    let Some(r) = &started.rollout else {
        return "all_at_once".to_owned();
    };
    match rollout::Strategy::try_from(r.strategy) {
        Ok(rollout::Strategy::Rolling) => format!(
            "rolling, max parallel {}, max unavailable {}",
            r.max_parallel, r.max_unavailable
        ),
        Ok(rollout::Strategy::Canary) => format!(
            "canary {} then {}, max unavailable {}",
            r.canary,
            if r.max_parallel == 0 {
                "the rest".to_owned()
            } else {
                format!("batches of {}", r.max_parallel)
            },
            r.max_unavailable
        ),
        _ => "all_at_once".to_owned(),
    }
}

/// The first line about a started deployment.
pub(crate) fn started_line(what: &str, s: &DeployStarted) -> String {
    let names: Vec<&str> = s.nodes.iter().map(|n| n.node_name.as_str()).collect();
    let release = match (what, s.release_id.as_str()) {
        // They keep each node's current release.
        ("restart" | "prune" | "stop" | "start", _) => String::new(),
        ("env", _) => format!(" env v{}", s.env_version),
        // `slipway watch`: the kind is not known, nor what "" means.
        ("deployment", "") => String::new(),
        (_, "") => " release (previous)".to_owned(),
        (_, id) => format!(" release {id}"),
    };
    format!(
        "{what} {} of {}{release} to {} node(s) ({}): {}",
        s.deployment_id,
        s.app,
        s.nodes.len(),
        rollout_text(s),
        names.join(", ")
    )
}

fn result_text(r: &NodeResult) -> String {
    let release = if r.release_id.is_empty() {
        String::new()
    } else {
        format!(" (release {})", r.release_id)
    };
    let why = if r.message.is_empty() {
        String::new()
    } else {
        format!(": {}", r.message)
    };
    format!("{}{release}{why}", outcome_word(r.outcome))
}

/// "2 of 3 nodes failed: b (failed), c (rolled back)": who did not
/// succeed and how, without the reasons each node's line already gave;
/// `None` when no node reported (the controller's message says why then).
fn failed_summary(results: &[&NodeResult]) -> Option<String> {
    if results.is_empty() {
        return None;
    }
    let failed: Vec<String> = results
        .iter()
        .filter(|r| r.outcome != Outcome::Succeeded as i32)
        .map(|r| {
            format!(
                "{} ({})",
                r.node_name,
                outcome_word(r.outcome)
                    .to_ascii_lowercase()
                    .replace('_', " ")
            )
        })
        .collect();
    if failed.is_empty() {
        return None;
    }
    Some(format!(
        "{} of {} nodes failed: {}",
        failed.len(),
        results.len(),
        failed.join(", ")
    ))
}

fn stamp() -> String {
    let format = time::macros::format_description!("[hour]:[minute]:[second]");
    time::OffsetDateTime::now_utc()
        .format(&format)
        .unwrap_or_default()
}

/// The live display: one spinner per node.
struct Live {
    multi: MultiProgress,
    bars: HashMap<String, ProgressBar>,
    width: usize,
}

impl Live {
    fn new() -> Self {
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            bars: HashMap::new(),
            width: 0,
        }
    }

    fn running_style(&self) -> ProgressStyle {
        ProgressStyle::with_template(&format!(
            "{{spinner}} {{prefix:<{}}} {{wide_msg}}",
            self.width
        ))
        .unwrap_or_else(|_| ProgressStyle::default_spinner())
    }

    fn done_style(&self, mark: &str) -> ProgressStyle {
        ProgressStyle::with_template(&format!("{mark} {{prefix:<{}}} {{wide_msg}}", self.width))
            .unwrap_or_else(|_| ProgressStyle::default_spinner())
    }

    fn start(&mut self, s: &DeployStarted) {
        self.width = s.nodes.iter().map(|n| n.node_name.len()).max().unwrap_or(0);
        for n in &s.nodes {
            let bar = self.multi.add(ProgressBar::new_spinner());
            bar.set_style(self.running_style());
            bar.set_prefix(n.node_name.clone());
            bar.set_message("waiting for its batch");
            self.bars.insert(n.node_id.clone(), bar);
        }
    }

    fn bar(&self, node_id: &str) -> Option<&ProgressBar> {
        self.bars.get(node_id)
    }

    fn line(&self, text: &str) {
        let _ = self.multi.println(text);
    }

    fn finish(&self) {
        for bar in self.bars.values() {
            bar.finish();
        }
    }
}

/// How long a follower keeps trying to re-attach to a deployment after it
/// lost the controller replica it followed (the deployment goes on on
/// another replica): every try connects to `--controller` again (a load
/// balancer in front of the replicas sends it to a live one) and calls
/// WatchDeployment.
pub(crate) const REATTACH_FOR: Duration = Duration::from_secs(120);
/// The first wait before re-attaching; it doubles up to [`REATTACH_MAX_WAIT`].
const REATTACH_FIRST_WAIT: Duration = Duration::from_secs(1);
/// The longest wait between two tries.
const REATTACH_MAX_WAIT: Duration = Duration::from_secs(5);
/// One try (connect and call) that takes longer failed.
const REATTACH_TRY: Duration = Duration::from_secs(10);

/// Whether a failed stream lost its connection (the controller replica
/// died or went away) rather than being refused: only then is it worth
/// re-attaching elsewhere.
pub(crate) fn lost_connection(status: &tonic::Status) -> bool {
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Cancelled => true,
        // A transport error (a connection reset, an h2 error) comes as
        // Unknown with its source attached; the server never sends it.
        tonic::Code::Unknown => {
            let text = status.message().to_ascii_lowercase();
            std::error::Error::source(status).is_some()
                || [
                    "connection",
                    "h2 protocol",
                    "transport",
                    "broken pipe",
                    "reset",
                ]
                .iter()
                .any(|word| text.contains(word))
        }
        _ => false,
    }
}

/// What was shown already: after a re-attachment the controller replays
/// the deployment's events, and none is shown twice.
#[derive(Debug, Default)]
struct Seen {
    batches: HashSet<u32>,
    progress: HashSet<(String, String, String, i64)>,
    /// (node id, outcome): a node rolled back after it succeeded shows both.
    results: HashSet<(String, i32)>,
}

/// Follows a deployment's event stream to its end and shows it; exit code
/// 0 only if every node succeeded. If the stream's connection is lost after
/// the deployment started (its controller replica died), re-attaches
/// through `api`'s controller address with WatchDeployment for up to
/// [`REATTACH_FOR`], saying so in one line, and goes on as if nothing
/// happened.
pub(crate) async fn follow(
    api: &Api,
    stream: tonic::Streaming<DeployEvent>,
    what: &str,
    output: Output,
) -> anyhow::Result<ExitCode> {
    follow_deployment(api, stream, what, output, None).await
}

/// [`follow`] of a stream that must be of deployment `expect` (when
/// given): an event of another deployment is an error.
pub(crate) async fn follow_deployment(
    api: &Api,
    mut stream: tonic::Streaming<DeployEvent>,
    what: &str,
    output: Output,
    expect: Option<&str>,
) -> anyhow::Result<ExitCode> {
    let mut live = (output == Output::Live).then(Live::new);
    let mut started: Option<DeployStarted> = None;
    // The deployment followed: as asked for, else as Started named it.
    let mut id: Option<String> = expect.map(ToOwned::to_owned);
    // node id -> its last result (a node rolled back by the controller
    // after it succeeded gets a second one).
    let mut results: HashMap<String, NodeResult> = HashMap::new();
    let mut seen = Seen::default();
    // The connection of a re-attachment, kept while its stream is read.
    let mut _reattached: Option<Api> = None;
    let plain = |text: String| {
        if output == Output::Plain {
            println!("{} {text}", stamp());
        }
    };
    let stop_live = |live: &Option<Live>| {
        if let Some(live) = live {
            live.finish();
        }
    };
    loop {
        let event = match stream.message().await {
            Ok(Some(event)) => event,
            lost => {
                // The stream failed, or ended before the result.
                let (err, retry) = match lost {
                    Err(status) => {
                        let retry = lost_connection(&status);
                        (
                            crate::api::status_error(&format!("{what} stream"), status),
                            retry,
                        )
                    }
                    _ => (
                        anyhow!("the controller ended the {what} stream before the result"),
                        true,
                    ),
                };
                let Some(followed) = id.clone().filter(|_| retry) else {
                    stop_live(&live);
                    return Err(match &id {
                        Some(id) => err.context(format!(
                            "lost the controller following deployment {id}; if that controller \
                             replica died, another carries the deployment on: `slipway status` or \
                             GET /api/v1/deployments/{id} through any replica shows how it ends"
                        )),
                        None => err.context("check `slipway audit`"),
                    });
                };
                let why = slipway_proto::cli::error_text(err.as_ref());
                match reattach(api, &followed, err).await {
                    Ok((fresh, next)) => {
                        let line = format!(
                            "{what} {followed}: lost the controller replica it followed ({why}); \
                             re-attached through {}, following it on",
                            fresh.controller()
                        );
                        match &live {
                            Some(live) => live.line(&line),
                            None => eprintln!("{} {line}", stamp()),
                        }
                        stream = next;
                        _reattached = Some(fresh);
                        continue;
                    }
                    Err(err) => {
                        stop_live(&live);
                        return Err(err);
                    }
                }
            }
        };
        match event.kind {
            Some(deploy_event::Kind::Started(s)) => {
                if let Some(id) = &id {
                    if s.deployment_id != *id {
                        stop_live(&live);
                        bail!(
                            "the controller sent the events of deployment {} while following {id}",
                            limits::shown(&s.deployment_id)
                        );
                    }
                }
                if started.is_some() {
                    // Replayed after a re-attachment: shown already.
                    continue;
                }
                plain(started_line(what, &s));
                if let Some(live) = &mut live {
                    println!("{}", started_line(what, &s));
                    live.start(&s);
                    for bar in live.bars.values() {
                        bar.enable_steady_tick(TICK);
                    }
                }
                id = Some(s.deployment_id.clone());
                started = Some(s);
            }
            Some(deploy_event::Kind::Batch(b)) => {
                if !seen.batches.insert(b.index) {
                    continue;
                }
                let names: Vec<&str> = b.nodes.iter().map(|n| n.node_name.as_str()).collect();
                let text = format!(
                    "batch {}/{}{}: {}",
                    b.index,
                    b.count,
                    if b.canary { " (canary)" } else { "" },
                    names.join(", ")
                );
                plain(text.clone());
                if let Some(live) = &live {
                    live.line(&text);
                    for n in &b.nodes {
                        if let Some(bar) = live.bar(&n.node_id) {
                            bar.set_message("starting");
                        }
                    }
                }
            }
            Some(deploy_event::Kind::Progress(p)) => {
                let key = (
                    p.node_id.clone(),
                    p.step.clone(),
                    p.message.clone(),
                    p.unix_time,
                );
                if !seen.progress.insert(key) {
                    continue;
                }
                plain(format!("[{}] {}: {}", p.node_name, p.step, p.message));
                if let Some(bar) = live.as_ref().and_then(|l| l.bar(&p.node_id)) {
                    bar.set_message(format!("{}: {}", p.step, p.message));
                }
            }
            Some(deploy_event::Kind::NodeResult(r)) => {
                if let Some(s) = &started {
                    if !s.nodes.iter().any(|n| n.node_id == r.node_id) {
                        stop_live(&live);
                        bail!(
                            "the controller sent a result of node {} that deployment {} does not target",
                            limits::shown(&r.node_id),
                            s.deployment_id
                        );
                    }
                }
                if !seen.results.insert((r.node_id.clone(), r.outcome)) {
                    continue;
                }
                plain(format!("[{}] {}", r.node_name, result_text(&r)));
                if let Some(live) = &live {
                    if let Some(bar) = live.bar(&r.node_id) {
                        let mark = match Outcome::try_from(r.outcome) {
                            Ok(Outcome::Succeeded) => "✓",
                            Ok(Outcome::Skipped) => "-",
                            _ => "✗",
                        };
                        bar.disable_steady_tick();
                        bar.set_style(live.done_style(mark));
                        bar.set_message(result_text(&r));
                    }
                }
                results.insert(r.node_id.clone(), r);
            }
            Some(deploy_event::Kind::Finished(f)) => {
                stop_live(&live);
                if let Some(id) = &id {
                    if f.deployment_id != *id {
                        bail!(
                            "the controller sent the end of deployment {} while following {id}",
                            limits::shown(&f.deployment_id)
                        );
                    }
                }
                return Ok(finished(what, output, started.as_ref(), &results, &f));
            }
            None => {}
        }
    }
}

/// Re-attaches to deployment `id` after losing the stream that followed it
/// (`lost`): connects to the controller address again and calls
/// WatchDeployment, waiting 1 s, then twice as long each time (at most
/// [`REATTACH_MAX_WAIT`]), for up to [`REATTACH_FOR`]. A refusal (the
/// token's scope, an unknown deployment) ends it at once.
async fn reattach(
    api: &Api,
    id: &str,
    lost: anyhow::Error,
) -> anyhow::Result<(Api, tonic::Streaming<DeployEvent>)> {
    let deadline = tokio::time::Instant::now() + REATTACH_FOR;
    let mut wait = REATTACH_FIRST_WAIT;
    let mut last = lost;
    loop {
        if tokio::time::Instant::now() + wait > deadline {
            return Err(last.context(format!(
                "lost the controller following deployment {id} and could not re-attach through \
                 {} for {} s; another replica may still carry it on: `slipway watch {id}` or \
                 `slipway status` shows how it ends",
                api.controller(),
                REATTACH_FOR.as_secs()
            )));
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(REATTACH_MAX_WAIT);
        let attempt = tokio::time::timeout(REATTACH_TRY, async {
            let mut fresh = api.reconnect().await.map_err(Err)?;
            let request = WatchDeploymentRequest {
                deployment_id: id.to_owned(),
            };
            match fresh
                .client
                .watch_deployment(client::authed(request, &fresh.token))
                .await
            {
                Ok(response) => Ok((fresh, response.into_inner())),
                Err(status) if lost_connection(&status) => {
                    Err(Err(crate::api::status_error("re-attaching", status)))
                }
                Err(status) => Err(Ok(status)),
            }
        })
        .await;
        match attempt {
            Ok(Ok(attached)) => return Ok(attached),
            // Refused: trying again cannot help.
            Ok(Err(Ok(status))) => {
                return Err(
                    crate::api::status_error("re-attaching refused", status).context(format!(
                        "lost the controller following deployment {id} and could not re-attach"
                    )),
                )
            }
            Ok(Err(Err(err))) => {
                if err.chain().any(|e| e.is::<crate::Usage>()) {
                    return Err(err);
                }
                last = err;
            }
            Err(_) => {
                last = anyhow!(
                    "re-attaching through {} took longer than {} s",
                    api.controller(),
                    REATTACH_TRY.as_secs()
                );
            }
        }
    }
}

/// Prints the end of a deployment; the exit code.
fn finished(
    what: &str,
    output: Output,
    started: Option<&DeployStarted>,
    results: &HashMap<String, NodeResult>,
    f: &DeployFinished,
) -> ExitCode {
    let in_order: Vec<&NodeResult> = match started {
        Some(s) => s
            .nodes
            .iter()
            .filter_map(|n| results.get(&n.node_id))
            .collect(),
        None => results.values().collect(),
    };
    if output == Output::Json {
        let nodes: Vec<serde_json::Value> = in_order
            .iter()
            .map(|r| {
                serde_json::json!({
                    "node_id": r.node_id,
                    "node_name": r.node_name,
                    "outcome": outcome_word(r.outcome).to_ascii_lowercase(),
                    "release_id": r.release_id,
                    "message": r.message,
                })
            })
            .collect();
        let out = serde_json::json!({
            "deployment_id": f.deployment_id,
            "app": started.map(|s| s.app.as_str()),
            "release_id": started.map(|s| s.release_id.as_str()),
            "succeeded": f.succeeded,
            "failed_nodes": f.failed_nodes,
            "message": f.message,
            "stop_reason": f.stop_reason,
            "stopped_by": f.stopped_by,
            "nodes": nodes,
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        // Each node's reason was shown once already, on its `[node]` line
        // or its finished spinner (cut to the terminal's width there; the
        // full text is in `--json` and `slipway audit`): the end names the
        // nodes only.
        let fit = |line: String| match (output, crate::terminal_width(&console::Term::stderr())) {
            (Output::Live, Some(width)) => slipway_proto::view::fit(&line, width),
            _ => line,
        };
        if !f.stop_reason.is_empty() {
            eprintln!(
                "{}",
                fit(format!("{what} {}: {}", f.deployment_id, f.stop_reason))
            );
        }
        if f.succeeded {
            println!("{what} {} succeeded: {}", f.deployment_id, f.message);
        } else {
            let summary = failed_summary(&in_order).unwrap_or_else(|| f.message.clone());
            eprintln!(
                "{}",
                fit(format!("{what} {} failed: {summary}", f.deployment_id))
            );
        }
    }
    if f.succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    #[test]
    fn only_a_lost_connection_is_worth_re_attaching() {
        for lost in [
            Status::unavailable("tcp connect error"),
            Status::cancelled("operation was canceled"),
            Status::unknown("h2 protocol error: error reading a body from connection"),
        ] {
            assert!(lost_connection(&lost), "{lost:?}");
        }
        for refused in [
            Status::permission_denied("token t-1 may not follow a deployment"),
            Status::invalid_argument("deployment_id: not d- and 16 hex digits"),
            Status::not_found("no deployment d-0123456789abcdef"),
            Status::unauthenticated("unknown token"),
            Status::new(Code::Unknown, "the app said no"),
        ] {
            assert!(!lost_connection(&refused), "{refused:?}");
        }
    }
}
