//! The web pages: server-rendered HTML (maud: every value from agents or
//! users is escaped), readable on a laptop and a phone, working without
//! JavaScript; a few lines of it follow a running deployment by SSE.
//!
//! - `GET /`: the fleet: nodes by state with last heartbeat, agent version,
//!   CPU, memory and disks; the apps × nodes matrix of current release and
//!   health, drift (a release other than the app's most common one) and
//!   bad health highlighted; the last deployments; each app's environment
//!   (as on the app page).
//! - `GET /apps/{app}`: releases per node, the app's environment (version,
//!   layers, each name with its layer, who changed it and when — never a
//!   value — and the nodes whose env version lags), the last deployments,
//!   and forms
//!   to deploy by URL, roll back and restart. They need `deploy:<app>`:
//!   for other tokens they are shown disabled, with why. Each POST shows a
//!   confirmation page first (`confirm=yes` starts it), carries the
//!   session's CSRF token (checked by [`super::session::layer`]), and ends
//!   on the deployment's page.
//! - `GET /deployments/{id}`: batches and per-node steps, live while it
//!   runs (`/api/v1/deployments/{id}/events`), each node's result with the
//!   failing check's output, and the deployment's audit trail.
//! - `GET /audit`: the audit log, filtered by kind, app and age.
//!
//! A caller without a session or token is sent to `/login`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde::Deserialize;
use slipway_proto::limits::{self, Validate as _};
use slipway_proto::v1;

use super::{AppError, HttpState, Principal};
use crate::auth::apitoken::Caller;
use crate::fleet::NodeView;
use crate::link::liveness::NodeState;
use crate::rollout::Action;
use crate::store::{AuditFilter, DeploymentRecord};

/// Deployments listed on the fleet and app pages.
const RECENT_DEPLOYMENTS: u32 = 15;
/// Audit events on one page.
const AUDIT_PAGE: u32 = 200;
/// Longest event type in the audit filter.
const MAX_KIND: usize = 64;
/// Largest `hours` of the audit filter (a year).
const MAX_HOURS: i64 = 24 * 366;
/// Largest batch size or tolerated failures the deploy form takes.
const MAX_ROLLOUT_NUMBER: u32 = 100_000;

/// The pages' routes.
pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/", get(fleet_page))
        .route("/apps/{app}", get(app_page))
        .route("/apps/{app}/deploy", post(deploy))
        .route("/apps/{app}/rollback", post(rollback))
        .route("/apps/{app}/restart", post(restart))
        .route("/deployments/{id}", get(deployment_page))
        .route("/audit", get(audit_page))
}

/// The caller; `None` for a browser without a session (sent to the login
/// form).
fn signed_in(who: Result<Principal, AppError>) -> Result<Option<Principal>, AppError> {
    match who {
        Ok(p) => Ok(Some(p)),
        Err(AppError::Unauthenticated(_)) => Ok(None),
        Err(e) => Err(e),
    }
}

fn to_login() -> Response {
    Redirect::to("/login").into_response()
}

const STYLE: &str = r#"
:root{--fg:#1b1f24;--mut:#57606a;--bg:#fff;--line:#d0d7de;--ok:#1a7f37;--bad:#cf222e;--warn:#9a6700;--drift:#fff8c5;--badbg:#ffebe9}
*{box-sizing:border-box}body{font:15px/1.45 system-ui,sans-serif;color:var(--fg);background:var(--bg);margin:0}
header{display:flex;flex-wrap:wrap;gap:.4rem 1.2rem;align-items:center;padding:.6rem 1rem;border-bottom:1px solid var(--line)}
header b{font-size:1.1rem}header a{color:var(--fg)}header form{margin-left:auto}header .who{color:var(--mut);font-size:.85rem}
main{padding:0 1rem 2rem;max-width:80rem;margin:auto}h1{font-size:1.3rem}h2{font-size:1.1rem;margin-top:1.6rem}
.scroll{overflow-x:auto}table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{border-bottom:1px solid var(--line);padding:.3rem .5rem;text-align:left;vertical-align:top;white-space:nowrap}
td.wrap{white-space:normal;min-width:12rem}pre{white-space:pre-wrap;margin:.2rem 0;font-size:.8rem;max-height:12rem;overflow:auto}
.st{display:inline-block;padding:0 .4rem;border-radius:.6rem;font-size:.8rem;border:1px solid var(--line)}
.online,.succeeded,.healthy{color:var(--ok)}.unreachable,.failed,.unhealthy,.crashlooping,.error,.revoked{color:var(--bad)}
.disconnected,.unknown,.running,.rolled_back,.skipped,.pending{color:var(--warn)}
td.drift{background:var(--drift)}td.bad{background:var(--badbg)}.mut{color:var(--mut);font-size:.85rem}
.counts span{margin-right:1rem}form.act{border:1px solid var(--line);padding:.6rem;margin:.6rem 0;border-radius:.4rem}
form.act input[type=text]{width:100%;max-width:40rem}button{padding:.3rem .9rem}button[disabled]{opacity:.55}
.refused{color:var(--bad);font-size:.85rem}ul.steps{margin:0;padding-left:1rem}
"#;

/// A page: header with the nav and the caller, then `body`.
fn page(title: &str, who: &Principal, body: Markup) -> Html<String> {
    let scopes = crate::api::scopes_text(&who.caller);
    Html(
        html! {
            (DOCTYPE)
            html lang="en" {
                head {
                    meta charset="utf-8";
                    meta name="viewport" content="width=device-width, initial-scale=1";
                    title { (title) " · Slipway" }
                    style { (PreEscaped(STYLE)) }
                }
                body {
                    header {
                        b { "Slipway" }
                        a href="/" { "Fleet" }
                        a href="/audit" { "Audit" }
                        span.who { "token " (who.caller.token_id) " (" (scopes) ")" }
                        @if let Some(csrf) = who.csrf_token() {
                            form method="post" action="/logout" {
                                input type="hidden" name=(super::session::CSRF_FIELD) value=(csrf);
                                button type="submit" { "Log out" }
                            }
                        }
                    }
                    main { (body) }
                }
            }
        }
        .into_string(),
    )
}

fn state_badge(state: &str) -> Markup {
    html! { span class={"st " (state)} { (state) } }
}

fn ago(now: i64, at: Option<i64>) -> String {
    match at {
        None => "never".to_owned(),
        Some(t) => {
            let s = now.saturating_sub(t).max(0);
            match s {
                0..=119 => format!("{s} s ago"),
                120..=7199 => format!("{} min ago", s / 60),
                7200..=172_799 => format!("{} h ago", s / 3600),
                _ => format!("{} d ago", s / 86_400),
            }
        }
    }
}

fn mib(bytes: u64) -> String {
    if bytes >= 10 * 1024 * 1024 * 1024 {
        format!("{} GiB", bytes / (1024 * 1024 * 1024))
    } else {
        format!("{} MiB", bytes / (1024 * 1024))
    }
}

fn percent(used: u64, total: u64) -> String {
    if total == 0 {
        return "–".to_owned();
    }
    format!("{:.0}%", used as f64 * 100.0 / total as f64)
}

async fn views(state: &HttpState) -> Result<Arc<Vec<NodeView>>, AppError> {
    Ok(state.fleet_views().await?)
}

fn deployments_table(deployments: &[DeploymentRecord], now: i64) -> Markup {
    html! {
        @if deployments.is_empty() {
            p.mut { "No deployments yet." }
        } @else {
            div.scroll { table {
                tr { th { "Deployment" } th { "App" } th { "Kind" } th { "Release" } th { "Status" } th { "By" } th { "Started" } th { "Result" } }
                @for d in deployments {
                    tr {
                        td { a href={"/deployments/" (d.id)} { (d.id) } }
                        td { a href={"/apps/" (d.app)} { (d.app) } }
                        td { (d.kind) }
                        td { (d.release_id) }
                        td { (state_badge(&d.status)) }
                        td { (d.actor) }
                        td { (ago(now, Some(d.started_at))) }
                        td.wrap { (d.message) }
                    }
                }
            } }
        }
    }
}

/// The app's most common current release over the nodes reporting it.
fn majority(views: &[NodeView], app: &str) -> Option<String> {
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for v in views.iter().filter(|v| v.state != NodeState::Revoked) {
        for a in v.apps.iter().filter(|a| a.app == app) {
            *count.entry(a.current_release.as_str()).or_default() += 1;
        }
    }
    count
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(a.0)))
        .map(|(r, _)| r.to_owned())
}

/// An app's environment as the pages show it: its version, each layer
/// with its newest version, every name with its layer, the version that
/// last set it, who and when — never a value — and the nodes whose env
/// version lags.
async fn env_section(
    state: &HttpState,
    views: &[NodeView],
    app: &str,
    now: i64,
) -> Result<Markup, AppError> {
    let control = state.control();
    let list = control.list_env_for(app, "").await?;
    if list.version == 0 {
        return Ok(html! {
            p.mut #env { "No environment on the controller yet (slipway env set " (app) " KEY=VALUE)." }
        });
    }
    let history = control.env_history_for(app, "").await?;
    let mut layers: BTreeMap<String, u64> = BTreeMap::new();
    for v in &history.versions {
        let newest = layers.entry(v.layer.clone()).or_default();
        *newest = (*newest).max(v.version);
    }
    let lag = control.env_lag(views, Some(app)).await?;
    Ok(html! {
        div #env {
            p {
                "Version v" (list.version) ". Layers: "
                @for (i, (layer, version)) in layers.iter().enumerate() {
                    @if i > 0 { ", " }
                    @if layer.is_empty() { "base" } @else { code { (layer) } }
                    " (v" (version) ")"
                }
                "."
            }
            div.scroll { table #env-names {
                tr { th { "Name" } th { "Layer" } th { "Set in" } th { "Changed by" } th { "When" } }
                @for e in &list.entries {
                    tr {
                        td { code { (e.key) } }
                        td {
                            @if e.layer.is_empty() { "base" } @else { (e.layer) }
                            @if e.overridden { " " span.mut { "(overridden by a tag layer)" } }
                        }
                        td { "v" (e.version) }
                        td { (e.actor) }
                        td { (ago(now, Some(e.changed_at))) }
                    }
                }
            } }
            @if lag.is_empty() {
                p.mut { "Every node running " (app) " holds its env version." }
            } @else {
                @for line in &lag { p { span.problem { (line) } } }
            }
        }
    })
}

/// `GET /`: the fleet.
async fn fleet_page(
    State(state): State<HttpState>,
    who: Result<Principal, AppError>,
) -> Result<Response, AppError> {
    let Some(who) = signed_in(who)? else {
        return Ok(to_login());
    };
    who.require(&state, "read the fleet", Caller::can_read)
        .await?;
    let now = crate::now_unix();
    let views = views(&state).await?;
    let deployments = state
        .store()
        .deployments(None, None, RECENT_DEPLOYMENTS)
        .await?;
    let droplets = state.control().droplets_view().await?;
    let mut envs = Vec::new();
    for app in state.store().env_apps().await? {
        let section = env_section(&state, &views, &app, now).await?;
        envs.push((app, section));
    }
    let body = html! {
        (fleet_body(&views, &deployments, now))
        @if !envs.is_empty() {
            h2 { "Environments" }
            @for (app, section) in &envs {
                h3 { a href={"/apps/" (app)} { (app) } }
                (section)
            }
        }
        @if let Some(view) = &droplets { (droplets_section(view)) }
    };
    Ok(page("Fleet", &who, body).into_response())
}

/// DigitalOcean's side of the fleet (when configured): droplets without an
/// agent, agents without a droplet, gone droplets and their retired nodes.
fn droplets_section(view: &crate::digitalocean::inventory::DropletsView) -> Markup {
    html! {
        h2 { "DigitalOcean droplets" }
        table.droplets {
            thead { tr { th { "Droplet" } th { "ID" } th { "Region" } th { "Public IPv4" } th { "Tags" } th { "Node" } } }
            tbody {
                @for d in &view.droplets {
                    tr {
                        td { (d.name) }
                        td { (d.id) }
                        td { (d.region) }
                        td { (d.public_ipv4.as_deref().unwrap_or("-")) }
                        td { (d.tags.join(", ")) }
                        td {
                            @match (&d.node_name, &d.node_id) {
                                (Some(name), Some(id)) => { (name) " (" (id) ")" }
                                _ => { span.problem { "expected, not enrolled" } }
                            }
                        }
                    }
                }
            }
        }
        @if !view.agents_without_droplet.is_empty() {
            h3 { "Agents without a droplet" }
            ul.agents-without-droplet {
                @for a in &view.agents_without_droplet {
                    li {
                        (a.name) " (" (a.node_id) "): "
                        @match a.reported_droplet_id {
                            Some(id) => { "reports droplet " (id) ", not in the fleet" }
                            None => { "no droplet id reported" }
                        }
                    }
                }
            }
        }
        @if !view.gone.is_empty() {
            h3 { "Gone droplets (their nodes retired)" }
            ul.gone-droplets {
                @for d in &view.gone {
                    li {
                        (d.name) " (" (d.id) ")"
                        @if let Some(name) = &d.node_name { ", node " (name) " retired" }
                    }
                }
            }
        }
    }
}

/// The fleet page's content.
fn fleet_body(views: &[NodeView], deployments: &[DeploymentRecord], now: i64) -> Markup {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in views {
        *counts.entry(v.state.as_str()).or_default() += 1;
    }
    let live: Vec<&NodeView> = views
        .iter()
        .filter(|v| v.state != NodeState::Revoked)
        .collect();
    let apps: BTreeSet<&str> = live
        .iter()
        .flat_map(|v| v.apps.iter().map(|a| a.app.as_str()))
        .collect();
    let majorities: BTreeMap<&str, Option<String>> =
        apps.iter().map(|a| (*a, majority(views, a))).collect();
    html! {
        h1 { "Fleet" }
        p.counts {
            @for (state, n) in &counts { span { (state_badge(state)) " " (n) } }
            @if views.is_empty() { span.mut { "No node has enrolled yet." } }
        }
        h2 { "Nodes" }
        div.scroll { table #nodes {
            tr { th { "Node" } th { "State" } th { "Last heartbeat" } th { "Agent" } th { "CPU" } th { "Memory" } th { "Disk" } }
            @for v in views {
                tr data-node=(v.name) {
                    td { (v.name) br; span.mut { (v.id) } }
                    td { (state_badge(v.state.as_str())) }
                    td { (ago(now, v.last_seen_at)) }
                    td { (v.agent_version) }
                    @if let Some(m) = &v.metrics {
                        td { (format!("{:.0}%", m.cpu_percent)) br; span.mut { "load " (format!("{:.2}", m.load1)) } }
                        td { (percent(m.mem_used_bytes, m.mem_total_bytes)) br; span.mut { (mib(m.mem_used_bytes)) " / " (mib(m.mem_total_bytes)) } }
                        td {
                            @for d in &m.disks {
                                span { (d.mount) " " (percent(d.used_bytes, d.total_bytes)) } br;
                            }
                        }
                    } @else {
                        td.mut { "–" } td.mut { "–" } td.mut { "–" }
                    }
                }
            }
        } }
        h2 { "Apps × nodes" }
        @if apps.is_empty() {
            p.mut { "No node reports an app yet." }
        } @else {
            p.mut { "Yellow: a release other than the app's most common one (drift). Red: not healthy." }
            div.scroll { table #matrix {
                tr { th { "App" } @for v in &live { th { (v.name) } } }
                @for app in &apps {
                    tr {
                        td { a href={"/apps/" (app)} { (app) } }
                        @for v in &live {
                            @match v.apps.iter().find(|a| a.app == *app) {
                                None => td.mut { "–" },
                                Some(a) => {
                                    @let class = crate::metrics::health_class(&a.health);
                                    @let drift = majorities.get(app).and_then(|m| m.as_deref()) != Some(a.current_release.as_str());
                                    td class=(if matches!(class, "unhealthy" | "crashlooping" | "error") { "bad" } else if drift { "drift" } else { "" }) {
                                        (if a.current_release.is_empty() { "(none)" } else { &a.current_release })
                                        br; span class={"st " (class)} { (class) }
                                        @if a.in_progress { " " span.st.running { "busy" } }
                                        @if let Some(p) = a.public.as_ref().filter(|p| !p.address.is_empty()) {
                                            br; span.mut.public { (public_short(p)) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            } }
        }
        h2 { "Last deployments" }
        (deployments_table(deployments, now))
    }
}

/// `0.0.0.0:3000 → v7` for a cell of the fleet matrix.
fn public_short(p: &crate::store::Public) -> String {
    if p.release.is_empty() {
        format!("{} (not held)", p.address)
    } else {
        format!("{} → {}", p.address, p.release)
    }
}

/// The app page's public address cell: the address, the mode, and where
/// new connections go.
fn public_long(p: &crate::store::Public) -> String {
    let v1 = slipway_proto::v1::PublicAddress::from(p);
    slipway_proto::view::public_line(&v1)
}

fn check_app(app: &str) -> Result<(), AppError> {
    limits::check_app_name("app", app).map_err(|e| AppError::field(e.field.clone(), e.to_string()))
}

/// `GET /apps/{app}`.
async fn app_page(
    State(state): State<HttpState>,
    who: Result<Principal, AppError>,
    Path(app): Path<String>,
) -> Result<Response, AppError> {
    let Some(who) = signed_in(who)? else {
        return Ok(to_login());
    };
    check_app(&app)?;
    who.require(&state, "read the fleet", Caller::can_read)
        .await?;
    let now = crate::now_unix();
    let views = views(&state).await?;
    let deployments = state
        .store()
        .deployments(Some(&app), None, RECENT_DEPLOYMENTS)
        .await?;
    let may = who.caller.can_deploy(&app);
    let scopes = crate::api::scopes_text(&who.caller);
    let csrf = who.csrf_token().unwrap_or_default().to_owned();
    let majority = majority(&views, &app);
    let env = env_section(&state, &views, &app, now).await?;
    let refused = html! {
        @if !may {
            p.refused { "Your token (" (scopes) ") may not deploy " (app) ": these need the deploy:" (app) " scope." }
        }
    };
    let body = html! {
        h1 { "App " (app) }
        h2 { "Releases per node" }
        div.scroll { table #releases {
            tr { th { "Node" } th { "State" } th { "Current" } th { "Public address" } th { "Health" } th { "Releases kept" } }
            @for v in views.iter().filter(|v| v.apps.iter().any(|a| a.app == app)) {
                @if let Some(a) = v.apps.iter().find(|a| a.app == app) {
                    @let class = crate::metrics::health_class(&a.health);
                    tr {
                        td { (v.name) }
                        td { (state_badge(v.state.as_str())) }
                        td class=(if majority.as_deref() != Some(a.current_release.as_str()) { "drift" } else { "" }) { (a.current_release) }
                        td.wrap.public { (a.public.as_ref().map_or_else(|| "–".to_owned(), public_long)) }
                        td.wrap { span class={"st " (class)} { (class) } @if class != "healthy" { pre { (a.health) } } }
                        td.wrap { @for r in &a.releases { span { (r.id) " " span.mut { (r.status) } } br; } }
                    }
                }
            }
        } }
        h2 { "Environment" }
        (env)
        h2 { "Deploy, roll back, restart" }
        (refused)
        form.act method="post" action={"/apps/" (app) "/deploy"} {
            input type="hidden" name="_csrf" value=(csrf);
            b { "Deploy by URL" } br;
            label { "Artifact https:// URL" br; input type="text" name="artifact_url" required maxlength="2048" disabled[!may]; } br;
            label { "sha256" br; input type="text" name="sha256" required minlength="64" maxlength="64" pattern="[0-9a-fA-F]{64}" disabled[!may]; } br;
            label { "Release id (optional)" br; input type="text" name="release_id" maxlength="128" disabled[!may]; } br;
            label { "Strategy " select name="strategy" disabled[!may] {
                option value="all_at_once" { "all at once" }
                option value="rolling" { "rolling" }
                option value="canary" { "canary" }
            } }
            " "
            label { "batch size " input type="number" name="max_parallel" min="0" max="100000" value="1" style="width:5rem" disabled[!may]; }
            p { button type="submit" disabled[!may] { "Deploy…" } }
        }
        form.act method="post" action={"/apps/" (app) "/rollback"} {
            input type="hidden" name="_csrf" value=(csrf);
            b { "Roll back" } " "
            label { "to release (default: each node's previous) " input type="text" name="to_release_id" maxlength="128" style="max-width:16rem" disabled[!may]; }
            " " button type="submit" disabled[!may] { "Roll back…" }
        }
        form.act method="post" action={"/apps/" (app) "/restart"} {
            input type="hidden" name="_csrf" value=(csrf);
            b { "Restart" } " the app on every node and pass its health gate again. "
            button type="submit" disabled[!may] { "Restart…" }
        }
        h2 { "Last deployments" }
        (deployments_table(&deployments, now))
    };
    Ok(page(&format!("App {app}"), &who, body).into_response())
}

/// The deploy form's fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeployForm {
    #[serde(rename = "_csrf")]
    _csrf: Option<String>,
    artifact_url: String,
    sha256: String,
    #[serde(default)]
    release_id: String,
    #[serde(default)]
    strategy: String,
    max_parallel: Option<String>,
    confirm: Option<String>,
}

/// The rollback form's fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackForm {
    #[serde(rename = "_csrf")]
    _csrf: Option<String>,
    #[serde(default)]
    to_release_id: String,
    confirm: Option<String>,
}

/// The restart form's fields.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestartForm {
    #[serde(rename = "_csrf")]
    _csrf: Option<String>,
    confirm: Option<String>,
}

fn confirmed(confirm: Option<&str>) -> bool {
    confirm == Some("yes")
}

/// The confirmation page: what will happen, and the same form again with
/// `confirm=yes`.
fn confirm_page(
    who: &Principal,
    app: &str,
    action: &str,
    what: Markup,
    fields: &[(&str, &str)],
) -> Response {
    let csrf = who.csrf_token().unwrap_or_default();
    let body = html! {
        h1 { "Confirm: " (action) " " (app) }
        (what)
        form.act method="post" action={"/apps/" (app) "/" (action)} {
            input type="hidden" name="_csrf" value=(csrf);
            @for (name, value) in fields { input type="hidden" name=(name) value=(value); }
            input type="hidden" name="confirm" value="yes";
            button #confirm type="submit" { "Yes, " (action) " " (app) }
            " " a href={"/apps/" (app)} { "Cancel" }
        }
    };
    page(&format!("Confirm {action}"), who, body).into_response()
}

fn to_deployment(id: &str) -> Response {
    let mut r = Redirect::to(&format!("/deployments/{id}")).into_response();
    *r.status_mut() = StatusCode::SEE_OTHER;
    r
}

fn rollout_of(strategy: &str, max_parallel: Option<&str>) -> Result<v1::Rollout, AppError> {
    let strategy = match strategy {
        "" | "all_at_once" => v1::rollout::Strategy::AllAtOnce,
        "rolling" => v1::rollout::Strategy::Rolling,
        "canary" => v1::rollout::Strategy::Canary,
        other => {
            return Err(AppError::field(
                "strategy",
                format!(
                    "strategy {} is not all_at_once, rolling or canary",
                    limits::shown(other)
                ),
            ))
        }
    };
    let max_parallel = match max_parallel.map(str::trim).filter(|s| !s.is_empty()) {
        None => 0,
        Some(text) => match text.parse::<u32>() {
            Ok(n) if n <= MAX_ROLLOUT_NUMBER => n,
            _ => {
                return Err(AppError::field(
                    "max_parallel",
                    format!(
                        "batch size {} is not a number in 0..={MAX_ROLLOUT_NUMBER}",
                        limits::shown(text)
                    ),
                ))
            }
        },
    };
    let proto = v1::Rollout {
        strategy: strategy.into(),
        max_parallel,
        max_unavailable: 0,
        canary: u32::from(strategy == v1::rollout::Strategy::Canary),
    };
    crate::rollout::Rollout::from_proto(Some(&proto))
        .map_err(|e| AppError::field("rollout", e.to_string()))?;
    Ok(proto)
}

fn field_error(e: limits::FieldError) -> AppError {
    AppError::field(e.field.clone(), e.to_string())
}

/// `POST /apps/{app}/deploy`.
async fn deploy(
    State(state): State<HttpState>,
    who: Principal,
    Path(app): Path<String>,
    Form(form): Form<DeployForm>,
) -> Result<Response, AppError> {
    check_app(&app)?;
    let rollout = rollout_of(&form.strategy, form.max_parallel.as_deref())?;
    let request = v1::DeployRequest {
        app: app.clone(),
        sha256: form.sha256.trim().to_ascii_lowercase(),
        release_id: form.release_id.trim().to_owned(),
        selector: None,
        git_sha: String::new(),
        artifact_url: form.artifact_url.trim().to_owned(),
        rollout: Some(rollout),
    };
    request.validate().map_err(field_error)?;
    if request.artifact_url.is_empty() {
        return Err(AppError::field("artifact_url", "the artifact URL is empty"));
    }
    crate::api::check_artifact_url(&request.artifact_url)
        .map_err(|e| AppError::field("artifact_url", e.to_string()))?;
    who.require(&state, &format!("deploy app {app}"), |c| c.can_deploy(&app))
        .await?;
    if !confirmed(form.confirm.as_deref()) {
        let max_parallel = form.max_parallel.clone().unwrap_or_default();
        let what = html! {
            p { "Deploy " code { (request.artifact_url) } " (sha256 " code { (request.sha256) } ")"
                @if !request.release_id.is_empty() { " as release " code { (request.release_id) } }
                " to every node that runs " (app) ", " (form.strategy.replace('_', " ")) "." }
        };
        return Ok(confirm_page(
            &who,
            &app,
            "deploy",
            what,
            &[
                ("artifact_url", &request.artifact_url),
                ("sha256", &request.sha256),
                ("release_id", &request.release_id),
                ("strategy", &form.strategy),
                ("max_parallel", &max_parallel),
            ],
        ));
    }
    let run = state.control().deploy_for(&who.caller, request).await?;
    Ok(to_deployment(&run.deployment_id))
}

/// `POST /apps/{app}/rollback`.
async fn rollback(
    State(state): State<HttpState>,
    who: Principal,
    Path(app): Path<String>,
    Form(form): Form<RollbackForm>,
) -> Result<Response, AppError> {
    check_app(&app)?;
    let request = v1::RollbackRequest {
        app: app.clone(),
        to_release_id: form.to_release_id.trim().to_owned(),
        selector: None,
        rollout: None,
    };
    request.validate().map_err(field_error)?;
    who.require(&state, &format!("roll back app {app}"), |c| {
        c.can_deploy(&app)
    })
    .await?;
    if !confirmed(form.confirm.as_deref()) {
        let what = html! {
            p { "Roll " (app) " back on every node that runs it, to "
                @if request.to_release_id.is_empty() { "each node's previous release" } @else { code { (request.to_release_id) } }
                "." }
        };
        return Ok(confirm_page(
            &who,
            &app,
            "rollback",
            what,
            &[("to_release_id", &request.to_release_id)],
        ));
    }
    let run = state.control().rollback_for(&who.caller, request).await?;
    Ok(to_deployment(&run.deployment_id))
}

/// `POST /apps/{app}/restart`.
async fn restart(
    State(state): State<HttpState>,
    who: Principal,
    Path(app): Path<String>,
    Form(form): Form<RestartForm>,
) -> Result<Response, AppError> {
    check_app(&app)?;
    who.require(&state, &format!("restart app {app}"), |c| {
        c.can_deploy(&app)
    })
    .await?;
    if !confirmed(form.confirm.as_deref()) {
        let what = html! { p { "Restart " (app) " on every node that runs it; each passes its health gate again." } };
        return Ok(confirm_page(&who, &app, "restart", what, &[]));
    }
    let run = state
        .control()
        .command_for(&who.caller, &app, None, Action::Restart, None)
        .await?;
    Ok(to_deployment(&run.deployment_id))
}

/// Follows the deployment's events and updates the page; text is set with
/// textContent (nothing from the events is parsed as HTML).
const LIVE_JS: &str = r#"
(function(){
  var main=document.getElementById('deployment'); if(!main||main.dataset.status!=='running')return;
  var es=new EventSource('/api/v1/deployments/'+encodeURIComponent(main.dataset.id)+'/events');
  function row(id){return document.querySelector('tr[data-node-id="'+CSS.escape(id)+'"]');}
  function cell(id,name){var r=row(id);return r&&r.querySelector('[data-cell="'+name+'"]');}
  // The stream replays the deployment from its start: drop what the server rendered.
  es.onopen=function(){document.getElementById('batches').textContent='';
    document.querySelectorAll('[data-cell=steps]').forEach(function(ul){ul.textContent='';});};
  es.addEventListener('batch',function(e){var d=JSON.parse(e.data);var li=document.createElement('li');
    li.textContent='batch '+d.index+' of '+d.count+(d.canary?' (canary)':'')+': '+d.nodes.map(function(n){return n.node_name;}).join(', ');
    document.getElementById('batches').appendChild(li);});
  es.addEventListener('progress',function(e){var d=JSON.parse(e.data);var ul=cell(d.node_id,'steps');if(!ul)return;
    var li=document.createElement('li');li.textContent=d.step+': '+d.message;ul.appendChild(li);
    var o=cell(d.node_id,'outcome');if(o){o.textContent=d.step;o.className='st running';}});
  es.addEventListener('node_result',function(e){var d=JSON.parse(e.data);var o=cell(d.node_id,'outcome');
    if(o){o.textContent=d.outcome;o.className='st '+d.outcome;}
    var m=cell(d.node_id,'message');if(m){m.textContent=d.message;}
    var r=cell(d.node_id,'release');if(r){r.textContent=d.release_id;}});
  es.addEventListener('finished',function(e){var d=JSON.parse(e.data);var s=document.getElementById('status');
    s.textContent=d.succeeded?'succeeded':'failed';s.className='st '+s.textContent;
    document.getElementById('summary').textContent=d.message;es.close();});
  es.addEventListener('snapshot',function(){es.close();location.reload();});
  es.onerror=function(){document.getElementById('live').textContent='live updates stopped; reload for the latest';};
})();
"#;

/// `GET /deployments/{id}`.
async fn deployment_page(
    State(state): State<HttpState>,
    who: Result<Principal, AppError>,
    Path(id): Path<String>,
) -> Result<Response, AppError> {
    let Some(who) = signed_in(who)? else {
        return Ok(to_login());
    };
    let ok =
        id.len() == 18 && id.starts_with("d-") && id[2..].chars().all(|c| c.is_ascii_hexdigit());
    if !ok {
        return Err(AppError::field(
            "id",
            format!(
                "deployment id {} is not d- and 16 hex digits",
                limits::shown(&id)
            ),
        ));
    }
    who.require(&state, "read a deployment", Caller::can_read)
        .await?;
    let d = state
        .store()
        .deployment(&id)
        .await?
        .ok_or_else(|| AppError::NotFound(format!("no deployment {id}")))?;
    // Steps: recorded with each node's result; for a node still running,
    // those seen so far.
    let mut steps: BTreeMap<String, Vec<(String, String)>> = d
        .nodes
        .iter()
        .filter(|n| !n.steps.is_empty())
        .map(|n| {
            let kept = n.steps.iter().map(|s| (s.step.clone(), s.message.clone()));
            (n.node_id.clone(), kept.collect())
        })
        .collect();
    let recorded: BTreeSet<String> = steps.keys().cloned().collect();
    let mut batches: Vec<String> = Vec::new();
    if let Some(followed) = state.control().live().subscribe(&id) {
        for event in &followed.past {
            match &event.kind {
                Some(v1::deploy_event::Kind::Progress(p)) if !recorded.contains(&p.node_id) => {
                    steps
                        .entry(p.node_id.clone())
                        .or_default()
                        .push((p.step.clone(), p.message.clone()));
                }
                Some(v1::deploy_event::Kind::Batch(b)) => batches.push(format!(
                    "batch {} of {}{}: {}",
                    b.index,
                    b.count,
                    if b.canary { " (canary)" } else { "" },
                    b.nodes
                        .iter()
                        .map(|n| n.node_name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
                _ => {}
            }
        }
    }
    let trail: Vec<_> = state
        .store()
        .audit_events_filtered(&AuditFilter {
            since: Some(d.started_at.saturating_sub(1)),
            until: None,
            kind: None,
            app: Some(d.app.clone()),
            limit: AUDIT_PAGE,
        })
        .await?
        .into_iter()
        .filter(|e| e.resource_id == id || e.details["deployment_id"] == id.as_str())
        .collect();
    let now = crate::now_unix();
    let body = html! {
        div #deployment data-id=(d.id) data-status=(d.status) {
            h1 { (d.kind) " " a href={"/apps/" (d.app)} { (d.app) } @if !d.release_id.is_empty() { " → " (d.release_id) } }
            p { span #status class={"st " (d.status)} { (d.status) } " " span #summary { (d.message) } }
            p.mut { (d.id) " · by " (d.actor) " · started " (ago(now, Some(d.started_at)))
                @if let Some(f) = d.finished_at { " · took " (f.saturating_sub(d.started_at)) " s" }
                " " span #live {} }
            h2 { "Batches" }
            ul #batches { @for b in &batches { li { (b) } } }
            h2 { "Nodes" }
            div.scroll { table #nodes {
                tr { th { "Node" } th { "Outcome" } th { "Release" } th { "Steps" } th { "Result" } }
                @for n in &d.nodes {
                    tr data-node-id=(n.node_id) {
                        td { (if n.node_name.is_empty() { &n.node_id } else { &n.node_name }) }
                        td { span data-cell="outcome" class={"st " (n.outcome)} { (n.outcome) } }
                        td data-cell="release" { (n.release_id) }
                        td.wrap { ul.steps data-cell="steps" {
                            @for (step, message) in steps.get(&n.node_id).map(Vec::as_slice).unwrap_or_default() {
                                li { (step) ": " (message) }
                            }
                        } }
                        td.wrap { pre data-cell="message" { (n.message) } }
                    }
                }
            } }
            h2 { "Audit trail" }
            (audit_table(&trail))
        }
        script { (PreEscaped(LIVE_JS)) }
    };
    Ok(page(&format!("Deployment {id}"), &who, body).into_response())
}

fn audit_table(events: &[crate::audit::AuditRecord]) -> Markup {
    html! {
        @if events.is_empty() {
            p.mut { "No events." }
        } @else {
            div.scroll { table #audit {
                tr { th { "Time (UTC)" } th { "Event" } th { "Actor" } th { "On" } th { "Status" } th { "Details" } }
                @for e in events {
                    tr {
                        td { (crate::rfc3339(e.created_at)) }
                        td { (e.event_type) }
                        td { (e.actor) }
                        td { (e.resource_type) " " (e.resource_id) }
                        td { span class={"st " (if e.status == "success" { "succeeded" } else { "failed" })} { (e.status) } }
                        td.wrap {
                            @if let Some(m) = &e.error_message { pre { (m) } }
                            span.mut { (limits::one_line(&e.details.to_string(), 300)) }
                        }
                    }
                }
            } }
        }
    }
}

/// `GET /audit` filters.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    kind: Option<String>,
    app: Option<String>,
    hours: Option<String>,
}

/// `GET /audit`.
async fn audit_page(
    State(state): State<HttpState>,
    who: Result<Principal, AppError>,
    RawQuery(raw): RawQuery,
) -> Result<Response, AppError> {
    let Some(who) = signed_in(who)? else {
        return Ok(to_login());
    };
    let q: AuditQuery = match raw.filter(|r| !r.is_empty()) {
        None => AuditQuery::default(),
        Some(raw) => serde_urlencoded::from_str(&raw).map_err(|e| {
            let text = e.to_string();
            let field = text.split('`').nth(1).unwrap_or("query").to_owned();
            AppError::field(field, format!("query string: {text}"))
        })?,
    };
    let kind = q.kind.filter(|k| !k.is_empty());
    if let Some(kind) = &kind {
        if kind.len() > MAX_KIND || !kind.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            return Err(AppError::field(
                "kind",
                format!(
                    "kind {} is not an event type (1 to {MAX_KIND} upper-case letters and _, e.g. DEPLOY_FAILED)",
                    limits::shown(kind)
                ),
            ));
        }
    }
    let app = q.app.filter(|a| !a.is_empty());
    if let Some(app) = &app {
        check_app(app)?;
    }
    let hours = match q.hours.as_deref().map(str::trim).filter(|h| !h.is_empty()) {
        None => None,
        Some(text) => match text.parse::<i64>() {
            Ok(h) if (1..=MAX_HOURS).contains(&h) => Some(h),
            _ => {
                return Err(AppError::field(
                    "hours",
                    format!(
                        "hours {} is not a number in 1..={MAX_HOURS}",
                        limits::shown(text)
                    ),
                ))
            }
        },
    };
    who.require(&state, "list audit events", Caller::can_read)
        .await?;
    let events = state
        .store()
        .audit_events_filtered(&AuditFilter {
            since: hours.map(|h| crate::now_unix() - h * 3600),
            until: None,
            kind: kind.clone(),
            app: app.clone(),
            limit: AUDIT_PAGE,
        })
        .await?;
    let body = html! {
        h1 { "Audit log" }
        form method="get" action="/audit" {
            label { "Kind " input type="text" name="kind" value=[kind.as_deref()] placeholder="DEPLOY_FAILED" maxlength="64" style="width:12rem"; }
            " "
            label { "App " input type="text" name="app" value=[app.as_deref()] maxlength="64" style="width:8rem"; }
            " "
            label { "Last hours " input type="number" name="hours" value=[hours] min="1" max=(MAX_HOURS) style="width:6rem"; }
            " " button type="submit" { "Filter" }
        }
        p.mut { "Newest first, at most " (AUDIT_PAGE) "." }
        (audit_table(&events))
    };
    Ok(page("Audit", &who, body).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_droplets_section_names_each_kind() {
        use crate::digitalocean::inventory::{AgentWithoutDroplet, DropletsView};
        let droplet =
            |id: u64, name: &str, node: Option<&str>, gone: Option<i64>| crate::store::DropletRow {
                id,
                name: name.to_owned(),
                region: "fra1".to_owned(),
                size: "s-1vcpu-1gb".to_owned(),
                public_ipv4: Some("203.0.113.1".to_owned()),
                private_ipv4: None,
                tags: vec!["env:production".to_owned()],
                status: "active".to_owned(),
                first_seen_at: 0,
                synced_at: 0,
                gone_at: gone,
                node_id: node.map(|n| format!("n-{n}")),
                node_name: node.map(str::to_owned),
            };
        let view = DropletsView {
            droplets: vec![
                droplet(1, "web-1", Some("web-1"), None),
                droplet(3, "web-3", None, None),
            ],
            gone: vec![droplet(2, "web-2", Some("web-2"), Some(5))],
            agents_without_droplet: vec![AgentWithoutDroplet {
                node_id: "n-stray".to_owned(),
                name: "stray<b>".to_owned(),
                reported_droplet_id: Some(9),
            }],
        };
        let html = droplets_section(&view).into_string();
        assert!(html.contains("web-1 (n-web-1)"), "{html}");
        assert!(html.contains("expected, not enrolled"), "{html}");
        assert!(html.contains("web-2 (2), node web-2 retired"), "{html}");
        assert!(
            html.contains("stray&lt;b&gt; (n-stray): reports droplet 9, not in the fleet"),
            "{html}"
        );
    }

    #[test]
    fn rollout_fields_are_checked() {
        assert!(rollout_of("rolling", Some("1")).is_ok());
        assert!(rollout_of("", None).is_ok());
        let e = rollout_of("sideways", None).unwrap_err().to_string();
        assert!(e.contains("sideways"), "{e}");
        let e = rollout_of("rolling", Some("-3")).unwrap_err().to_string();
        assert!(e.contains("batch size"), "{e}");
        assert!(rollout_of("rolling", Some("100001")).is_err());
    }

    fn node(name: &str, release: &str, health: &str) -> NodeView {
        NodeView {
            id: format!("n-{name}"),
            name: name.to_owned(),
            labels: serde_json::json!({}).into(),
            state: NodeState::Online,
            last_seen_at: Some(990),
            heartbeat_age_secs: Some(10),
            agent_version: "0.1.0".to_owned(),
            agent_rss_bytes: None,
            metrics: None,
            apps: vec![crate::store::App {
                app: "web".to_owned(),
                current_release: release.to_owned(),
                health: health.to_owned(),
                in_progress: false,
                env_version: 0,
                releases: Vec::new(),
                public: None,
            }]
            .into(),
            revoked_at: None,
            cert_expires_at: 0,
        }
    }

    #[test]
    fn the_fleet_page_escapes_what_agents_send_and_marks_drift() {
        let views = [
            node("a", "v1", "healthy"),
            node("b", "v1", "healthy"),
            node(
                "c<script>alert(1)</script>",
                "v2\"><img src=x onerror=alert(2)>",
                "unhealthy: <b>500</b>",
            ),
        ];
        let html = fleet_body(&views, &[], 1_000).into_string();
        assert!(!html.contains("<script>alert"), "{html}");
        assert!(!html.contains("<img"), "{html}");
        assert!(
            html.contains("c&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{html}"
        );
        // The unhealthy node's cell is marked bad (bad wins over drift).
        assert_eq!(html.matches(r#"class="bad""#).count(), 1, "{html}");
        let drifted = [
            node("a", "v1", "healthy"),
            node("b", "v1", "healthy"),
            node("d", "v0", "healthy"),
        ];
        let html = fleet_body(&drifted, &[], 1_000).into_string();
        assert_eq!(html.matches(r#"class="drift""#).count(), 1, "{html}");
    }

    #[test]
    fn ages_read_as_people_say_them() {
        assert_eq!(ago(1_000, Some(990)), "10 s ago");
        assert_eq!(ago(10_000, Some(10_000 - 600)), "10 min ago");
        assert_eq!(ago(1_000, None), "never");
    }
}
