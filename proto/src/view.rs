//! The fleet views of the Control API as people and scripts see them: the
//! node table and the status summary as text, and their `--json` shapes.
//! Shared by `slipway` (over the API) and `slipway-controller nodes` (from
//! the database), so both print the same table and the same JSON.
//!
//! Every value that came from outside (node names, labels, health output,
//! messages) is printed on one line with control characters escaped
//! ([`limits::one_line`]), so a hostile value cannot forge a row or a line.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::limits;
use crate::span;
use crate::v1::{
    AppStatus, CertificateHealth, Deployment, DeploymentNode, FleetStatus, NodeMetrics, NodeState,
    NodeStatus, NodeView, PublicAddress, RefreshAnswer, ReleaseInfo, ReleaseNodes, UnhealthyApp,
    VersionNodes,
};

/// Widest table column: a longer value (a label list, a hostile name from
/// an old database) is cut with `…` so one row cannot widen every other.
const MAX_COLUMN: usize = 80;

/// The state's name in tables and JSON: `online`, `unreachable`, `unknown`,
/// `revoked`, `disconnected`.
pub fn state_name(state: NodeState) -> &'static str {
    match state {
        NodeState::Online => "online",
        NodeState::Unreachable => "unreachable",
        NodeState::Unknown => "unknown",
        NodeState::Revoked => "revoked",
        NodeState::Disconnected => "disconnected",
        NodeState::Unspecified => "unspecified",
    }
}

/// The answer's name in JSON (`answered`, `no_session`, `disconnected`,
/// `timed_out`), `None` when no refresh was asked.
pub fn refresh_name(answer: RefreshAnswer) -> Option<&'static str> {
    match answer {
        RefreshAnswer::Unspecified => None,
        RefreshAnswer::Answered => Some("answered"),
        RefreshAnswer::NoSession => Some("no_session"),
        RefreshAnswer::Disconnected => Some("disconnected"),
        RefreshAnswer::TimedOut => Some("timed_out"),
    }
}

/// Why a node did not answer the refresh, or `None` if it did (or was not
/// asked).
pub fn refresh_failure(answer: RefreshAnswer) -> Option<&'static str> {
    match answer {
        RefreshAnswer::Unspecified | RefreshAnswer::Answered => None,
        RefreshAnswer::NoSession => Some("no session with the controller"),
        RefreshAnswer::Disconnected => Some("its session ended"),
        RefreshAnswer::TimedOut => Some("timed out"),
    }
}

/// Bytes in binary units with one decimal: `512.0M`, `1.9G`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    #[allow(clippy::cast_precision_loss)] // display only
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{value:.1}{}", UNITS[unit])
    }
}

/// How long a node's certificate has left at `now`: "6d", "5h", "expired
/// 2d ago"; "-" when unknown.
pub fn cert_left(expires_at: i64, now: i64) -> String {
    if expires_at <= 0 {
        return "-".to_owned();
    }
    let span = |secs: i64| {
        if secs >= 86_400 {
            format!("{}d", secs / 86_400)
        } else if secs >= 3_600 {
            format!("{}h", secs / 3_600)
        } else {
            format!("{}m", (secs / 60).max(1))
        }
    };
    let left = expires_at - now;
    if left > 0 {
        span(left)
    } else {
        format!("expired {} ago", span(-left))
    }
}

/// The fleet as a text table, one node per line (CERT: what the node's
/// certificate has left).
pub fn render_table(nodes: &[NodeView]) -> String {
    let header = [
        "ID",
        "NAME",
        "LABELS",
        "STATE",
        "HEARTBEAT",
        "VERSION",
        "RSS",
        "CPU",
        "MEM",
        "LOAD",
        "CERT",
        "APPS",
    ];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let mut rows: Vec<[String; 12]> = vec![header.map(str::to_owned)];
    for node in nodes {
        let labels = node
            .labels
            .iter()
            .map(|(k, v)| {
                if v.is_empty() {
                    k.clone()
                } else {
                    format!("{k}={v}")
                }
            })
            .collect::<Vec<_>>()
            .join(",");
        let dash = || "-".to_owned();
        let (cpu, mem, load) = node.metrics.as_ref().map_or_else(
            || (dash(), dash(), dash()),
            |m| {
                (
                    format!("{:.0}%", m.cpu_percent),
                    format!("{}/{}", bytes(m.mem_used_bytes), bytes(m.mem_total_bytes)),
                    format!("{:.2}", m.load1),
                )
            },
        );
        let apps = node
            .apps
            .iter()
            .map(|a| {
                let release = if a.current_release.is_empty() {
                    "-"
                } else {
                    &a.current_release
                };
                let health = if a.health.is_empty() { "?" } else { &a.health };
                let public = a
                    .public
                    .as_ref()
                    .filter(|p| !p.address.is_empty())
                    .map_or_else(String::new, |p| format!(" {}", public_short(p)));
                format!("{}@{release} ({health}){public}", a.app)
            })
            .collect::<Vec<_>>()
            .join(", ");
        rows.push([
            node.id.clone(),
            node.name.clone(),
            if labels.is_empty() { dash() } else { labels },
            state_name(node.state()).to_owned(),
            node.heartbeat_age_secs
                .map_or_else(dash, |age| format!("{age}s ago")),
            if node.agent_version.is_empty() {
                dash()
            } else {
                node.agent_version.clone()
            },
            node.agent_rss_bytes.map_or_else(dash, bytes),
            cpu,
            mem,
            load,
            cert_left(node.cert_expires_at, now),
            if apps.is_empty() { dash() } else { apps },
        ]);
    }
    table(rows)
}

/// Where mode names are shown to people.
pub fn public_mode_name(mode: &str) -> &str {
    match mode {
        "socket_handover" => "socket handover",
        "agent_proxy" => "agent proxy",
        "pm2_cluster" => "pm2 cluster",
        "none" => "own port",
        other => other,
    }
}

/// `0.0.0.0:3000→v7`, or `0.0.0.0:3000 (not held)` when nothing holds the
/// address right now: for a table cell.
pub fn public_short(p: &PublicAddress) -> String {
    if p.release.is_empty() {
        format!("{} (not held)", esc(&p.address))
    } else {
        format!("{}→{}", esc(&p.address), esc(&p.release))
    }
}

/// One line on an app's public address: `0.0.0.0:3000 (agent proxy):
/// new connections go to v7 on 127.0.0.1:8081; 2 draining`.
pub fn public_line(p: &PublicAddress) -> String {
    let mode = public_mode_name(&p.mode);
    if p.address.is_empty() {
        return format!("no public address held by the agent ({})", esc(mode));
    }
    let mut line = format!("{} ({})", esc(&p.address), esc(mode));
    if p.release.is_empty() {
        line.push_str(": not held right now (the next deploy or start takes it up)");
        return line;
    }
    let _ = write!(line, ": new connections go to {}", esc(&p.release));
    if !p.backend.is_empty() {
        let _ = write!(line, " on {}", esc(&p.backend));
    }
    if p.draining > 0 {
        let _ = write!(line, "; {} draining", p.draining);
    }
    if !p.forwarding.is_empty() {
        let _ = write!(
            line,
            "; {}",
            limits::one_line(&p.forwarding, limits::MAX_FORWARDING)
        );
    }
    line
}

/// `slipway status` as text: node counts and table, apps, notes, problems.
pub fn render_status(status: &FleetStatus) -> String {
    let mut out = String::new();
    let counts: Vec<String> = status
        .counts
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(state, n)| format!("{n} {state}"))
        .collect();
    let scope = status
        .app
        .as_ref()
        .map_or_else(String::new, |a| format!(" reporting app {}", esc(a)));
    let _ = writeln!(
        out,
        "nodes{scope}: {} ({})",
        status.nodes.len(),
        if counts.is_empty() {
            "none".to_owned()
        } else {
            counts.join(", ")
        }
    );
    if !status.nodes.is_empty() {
        let mut rows = vec![[
            "NAME",
            "STATE",
            "SESSION",
            "HEARTBEAT",
            "VERSION",
            "RSS",
            "REFRESH",
        ]
        .map(str::to_owned)];
        for n in &status.nodes {
            rows.push([
                n.name.clone(),
                state_name(n.state()).to_owned(),
                if n.connected { "yes" } else { "no" }.to_owned(),
                n.heartbeat_age_secs
                    .map_or_else(|| "-".to_owned(), |age| format!("{age}s ago")),
                if n.agent_version.is_empty() {
                    "-".to_owned()
                } else {
                    n.agent_version.clone()
                },
                n.agent_rss_bytes.map_or_else(|| "-".to_owned(), bytes),
                match n.refresh() {
                    RefreshAnswer::Unspecified => "-".to_owned(),
                    RefreshAnswer::Answered => "answered".to_owned(),
                    answer => format!(
                        "did not answer ({})",
                        refresh_failure(answer).unwrap_or_default()
                    ),
                },
            ]);
        }
        out.push_str(&table(rows));
    }
    for app in &status.apps {
        let _ = writeln!(out, "\napp {}", esc(&app.app));
        for r in &app.releases {
            let release = if r.release.is_empty() {
                "(none)".to_owned()
            } else {
                esc(&r.release)
            };
            let _ = writeln!(
                out,
                "  {release} current on {} node(s): {}",
                r.count,
                esc_list(&r.nodes)
            );
        }
        for p in &app.public {
            if let Some(public) = &p.public {
                let _ = writeln!(
                    out,
                    "  public on {}: {}",
                    esc(&p.node_name),
                    public_line(public)
                );
            }
        }
        for u in &app.unhealthy {
            let _ = writeln!(
                out,
                "  UNHEALTHY on {} ({}): {}",
                esc(&u.node_name),
                esc(&u.release),
                limits::one_line(&u.output, limits::MAX_HEALTH)
            );
        }
        if !app.busy.is_empty() {
            let _ = writeln!(out, "  busy on: {}", esc_list(&app.busy));
        }
        if let Some(d) = &app.last_deployment {
            let release = if d.release_id.is_empty() {
                String::new()
            } else {
                format!(" of {}", esc(&d.release_id))
            };
            let _ = writeln!(
                out,
                "  last {} {}{release}: {} ({}s ago){}",
                esc(&d.kind),
                esc(&d.id),
                esc(&d.status),
                status.generated_at.saturating_sub(d.started_at).max(0),
                // With node lines below, they give each node's reason once.
                if d.message.is_empty() || !d.nodes.is_empty() {
                    String::new()
                } else {
                    format!(": {}", limits::one_line(&d.message, limits::MAX_MESSAGE))
                }
            );
            for n in &d.nodes {
                let name = if n.node_name.is_empty() {
                    &n.node_id
                } else {
                    &n.node_name
                };
                let _ = writeln!(
                    out,
                    "    [{}] {}{}",
                    esc(name),
                    esc(&n.outcome),
                    if n.message.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", limits::one_line(&n.message, limits::MAX_MESSAGE))
                    }
                );
            }
        }
    }
    if let Some(agents) = status.agents.as_ref().filter(|a| !a.versions.is_empty()) {
        let versions: Vec<String> = agents
            .versions
            .iter()
            .map(|v| format!("{} on {}", esc(&v.version), esc_list(&v.nodes)))
            .collect();
        let _ = writeln!(
            out,
            "\nagents: {}; RSS median {}",
            versions.join("; "),
            agents
                .rss_median_bytes
                .map_or_else(|| "-".to_owned(), bytes)
        );
    }
    render_certificates(&mut out, &status.certificates);
    if let Some(r) = &status.ca_rotation {
        let _ = writeln!(
            out,
            "\nCA rotation {} (new CA sha256 {}): {}",
            esc(&r.phase),
            esc(&r.new_ca_sha256),
            if r.lagging_nodes.is_empty() {
                "every node is on the new CA (finish it with `slipway-controller ca rotate finish`)"
                    .to_owned()
            } else {
                format!(
                    "{} node(s) still on the old CA: {}",
                    r.lagging_nodes.len(),
                    esc_list(&r.lagging_nodes)
                )
            }
        );
    }
    if !status.notes.is_empty() {
        out.push_str("\nnotes:\n");
        for n in &status.notes {
            let _ = writeln!(out, "  - {}", limits::one_line(n, limits::MAX_MESSAGE));
        }
    }
    if !status.problems.is_empty() {
        out.push_str("\nproblems:\n");
        for p in &status.problems {
            let _ = writeln!(out, "  - {}", limits::one_line(p, limits::MAX_MESSAGE));
        }
    }
    out
}

/// The certificates section of `slipway status`: the CA(s), the server
/// certificate and operator certificates each on a line, node certificates
/// as one line (how many, the soonest to expire) plus a line for each that
/// is not ok.
fn render_certificates(out: &mut String, certs: &[CertificateHealth]) {
    if certs.is_empty() {
        return;
    }
    let days = |c: &CertificateHealth| {
        if c.days_left < 0 {
            format!("expired {} ago", span(c.days_left.saturating_mul(86_400)))
        } else {
            format!("{} days left", c.days_left)
        }
    };
    let mut rows = vec![["CERTIFICATE", "NAME", "NOT AFTER", "LEFT", "LEVEL"].map(str::to_owned)];
    let nodes: Vec<&CertificateHealth> = certs.iter().filter(|c| c.kind == "node").collect();
    for c in certs.iter().filter(|c| c.kind != "node" || c.level != "ok") {
        rows.push([
            c.kind.clone(),
            c.name.clone(),
            c.not_after_rfc3339.clone(),
            days(c),
            c.level.clone(),
        ]);
    }
    out.push_str("\ncertificates:\n");
    out.push_str(&table(rows));
    // Soonest first, as the controller sends them.
    if let Some(first) = nodes.first() {
        let _ = writeln!(
            out,
            "node certificates: {} (soonest: {} on {}, {})",
            nodes.len(),
            esc(&first.not_after_rfc3339),
            esc(&first.name),
            days(first)
        );
    }
}

/// A value from outside on one line of text output: control characters
/// escaped (a newline in a name cannot forge a line), cut at a name's length.
fn esc(value: &str) -> String {
    limits::one_line(value, limits::MAX_NODE_NAME)
}

/// Names joined with ", " as [`esc`] shows them: only as many as can be
/// shown are joined (a release on 10,000 nodes is one cut line).
fn esc_list(names: &[String]) -> String {
    // Characters are at most 4 bytes: past this, the line is cut anyway.
    let enough = limits::MAX_NODE_NAME.saturating_mul(4).saturating_add(1);
    let mut joined = String::new();
    for (i, name) in names.iter().enumerate() {
        if joined.len() > enough {
            break;
        }
        if i > 0 {
            joined.push_str(", ");
        }
        joined.push_str(name);
    }
    esc(&joined)
}

/// Left-aligned columns, two spaces apart, the last one unpadded. Every
/// cell is shown on one line (control characters escaped) and all but the
/// last cut at [`MAX_COLUMN`] characters.
///
/// Rows are taken by value: a cell already fit to show (most are: short,
/// one line) is used as it is, so 10,000 rows cost no copy of each cell.
fn table<const N: usize>(mut rows: Vec<[String; N]>) -> String {
    let mut widths = [0usize; N];
    for row in &mut rows {
        for (i, (cell, width)) in row.iter_mut().zip(widths.iter_mut()).enumerate() {
            let max = if i + 1 == N {
                limits::MAX_MESSAGE
            } else {
                MAX_COLUMN
            };
            // Bytes bound characters: a cell of at most `max` bytes with
            // no control character is shown as it is.
            if cell.len() > max || cell.chars().any(char::is_control) {
                *cell = limits::one_line(cell, max);
            }
            let chars = if cell.is_ascii() {
                cell.len()
            } else {
                cell.chars().count()
            };
            *width = (*width).max(chars);
        }
    }
    let line_width: usize = widths.iter().map(|w| w + 2).sum();
    let mut out = String::with_capacity(rows.len().saturating_mul(line_width));
    for row in &rows {
        let start = out.len();
        for (i, (cell, width)) in row.iter().zip(widths).enumerate() {
            out.push_str(cell);
            if i + 1 < N {
                let chars = if cell.is_ascii() {
                    cell.len()
                } else {
                    cell.chars().count()
                };
                out.extend(std::iter::repeat_n(' ', width - chars + 2));
            }
        }
        // No trailing blanks (an empty last cell leaves the padding).
        let end = out[start..].trim_end().len() + start;
        out.truncate(end);
        out.push('\n');
    }
    out
}

/// The fleet view as `--json` prints it: an array of nodes.
pub fn nodes_json(nodes: &[NodeView]) -> Result<String, serde_json::Error> {
    serde_json::to_string_pretty(&nodes.iter().map(NodeJson::from).collect::<Vec<_>>())
}

/// The fleet summary as `slipway status --json` prints it.
pub fn status_json(status: &FleetStatus) -> Result<String, serde_json::Error> {
    serde_json::to_string_pretty(&StatusJson::from(status))
}

/// One node in JSON.
#[derive(Debug, Serialize)]
struct NodeJson<'a> {
    id: &'a str,
    name: &'a str,
    labels: &'a BTreeMap<String, String>,
    state: &'static str,
    last_seen_at: Option<i64>,
    heartbeat_age_secs: Option<i64>,
    agent_version: &'a str,
    agent_rss_bytes: Option<u64>,
    metrics: Option<MetricsJson<'a>>,
    apps: Vec<AppJson<'a>>,
    revoked_at: Option<i64>,
    cert_expires_at: i64,
}

impl<'a> From<&'a NodeView> for NodeJson<'a> {
    fn from(n: &'a NodeView) -> Self {
        Self {
            id: &n.id,
            name: &n.name,
            labels: &n.labels,
            state: state_name(n.state()),
            last_seen_at: n.last_seen_at,
            heartbeat_age_secs: n.heartbeat_age_secs,
            agent_version: &n.agent_version,
            agent_rss_bytes: n.agent_rss_bytes,
            metrics: n.metrics.as_ref().map(MetricsJson::from),
            apps: n.apps.iter().map(AppJson::from).collect(),
            revoked_at: n.revoked_at,
            cert_expires_at: n.cert_expires_at,
        }
    }
}

/// Host metrics in JSON.
#[derive(Debug, Serialize)]
struct MetricsJson<'a> {
    cpu_percent: f64,
    mem_used_bytes: u64,
    mem_total_bytes: u64,
    load1: f64,
    load5: f64,
    load15: f64,
    disks: Vec<DiskJson<'a>>,
}

impl<'a> From<&'a NodeMetrics> for MetricsJson<'a> {
    fn from(m: &'a NodeMetrics) -> Self {
        Self {
            cpu_percent: m.cpu_percent,
            mem_used_bytes: m.mem_used_bytes,
            mem_total_bytes: m.mem_total_bytes,
            load1: m.load1,
            load5: m.load5,
            load15: m.load15,
            disks: m
                .disks
                .iter()
                .map(|d| DiskJson {
                    mount: &d.mount,
                    used_bytes: d.used_bytes,
                    total_bytes: d.total_bytes,
                })
                .collect(),
        }
    }
}

/// One filesystem in JSON.
#[derive(Debug, Serialize)]
struct DiskJson<'a> {
    mount: &'a str,
    used_bytes: u64,
    total_bytes: u64,
}

/// One app on a node in JSON.
#[derive(Debug, Serialize)]
struct AppJson<'a> {
    app: &'a str,
    current_release: &'a str,
    health: &'a str,
    in_progress: bool,
    releases: Vec<ReleaseJson<'a>>,
    /// Absent from agents that do not report it.
    public: Option<PublicJson<'a>>,
}

/// An app's public address on a node in JSON.
#[derive(Debug, Serialize)]
struct PublicJson<'a> {
    /// `listen`, or null without one.
    address: Option<&'a str>,
    mode: &'a str,
    /// The release new connections go to; null when not held.
    release: Option<&'a str>,
    backend: Option<&'a str>,
    draining: u64,
    /// Kernel forwarding of the node's own clients, or why not; null
    /// when the agent did not say.
    forwarding: Option<&'a str>,
}

impl<'a> From<&'a PublicAddress> for PublicJson<'a> {
    fn from(p: &'a PublicAddress) -> Self {
        let some = |s: &'a str| (!s.is_empty()).then_some(s);
        Self {
            address: some(&p.address),
            mode: &p.mode,
            release: some(&p.release),
            backend: some(&p.backend),
            draining: p.draining,
            forwarding: some(&p.forwarding),
        }
    }
}

/// One node's public address of an app in `slipway status --json`.
#[derive(Debug, Serialize)]
struct PublicOnNodeJson<'a> {
    node: &'a str,
    #[serde(flatten)]
    public: PublicJson<'a>,
}

impl<'a> From<&'a AppStatus> for AppJson<'a> {
    fn from(a: &'a AppStatus) -> Self {
        Self {
            app: &a.app,
            current_release: &a.current_release,
            health: &a.health,
            in_progress: a.in_progress,
            releases: a.releases.iter().map(ReleaseJson::from).collect(),
            public: a.public.as_ref().map(PublicJson::from),
        }
    }
}

/// One release of an app in JSON (`slipway releases --json` too).
#[derive(Debug, Serialize)]
pub struct ReleaseJson<'a> {
    id: &'a str,
    status: &'a str,
    created_at_unix: i64,
    artifact_sha256: &'a str,
    /// Why failed or bad, and who marked it; "" otherwise.
    reason: &'a str,
    /// The env version it went live with (the controller's record);
    /// absent when unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    env_version: Option<u64>,
}

impl<'a> From<&'a ReleaseInfo> for ReleaseJson<'a> {
    fn from(r: &'a ReleaseInfo) -> Self {
        Self {
            id: &r.id,
            status: &r.status,
            created_at_unix: r.created_at_unix,
            artifact_sha256: &r.artifact_sha256,
            reason: &r.reason,
            env_version: (r.env_version != 0).then_some(r.env_version),
        }
    }
}

/// The fleet summary in JSON.
#[derive(Debug, Serialize)]
struct StatusJson<'a> {
    generated_at: i64,
    app: Option<&'a str>,
    refreshed: bool,
    counts: &'a BTreeMap<String, u64>,
    nodes: Vec<NodeStatusJson<'a>>,
    apps: Vec<AppSummaryJson<'a>>,
    agents: AgentsJson<'a>,
    problems: &'a [String],
    notes: &'a [String],
    certificates: Vec<CertificateJson<'a>>,
    ca_rotation: Option<RotationJson<'a>>,
}

/// A CA rotation in JSON.
#[derive(Debug, Serialize)]
struct RotationJson<'a> {
    phase: &'a str,
    started_at: i64,
    old_ca_sha256: &'a str,
    new_ca_sha256: &'a str,
    lagging_nodes: &'a [String],
}

/// One certificate's health in JSON.
#[derive(Debug, Serialize)]
struct CertificateJson<'a> {
    kind: &'a str,
    name: &'a str,
    id: &'a str,
    not_before: i64,
    not_after: i64,
    not_after_rfc3339: &'a str,
    days_left: i64,
    level: &'a str,
    renewed_automatically: bool,
}

impl<'a> From<&'a CertificateHealth> for CertificateJson<'a> {
    fn from(c: &'a CertificateHealth) -> Self {
        Self {
            kind: &c.kind,
            name: &c.name,
            id: &c.id,
            not_before: c.not_before,
            not_after: c.not_after,
            not_after_rfc3339: &c.not_after_rfc3339,
            days_left: c.days_left,
            level: &c.level,
            renewed_automatically: c.renewed_automatically,
        }
    }
}

impl<'a> From<&'a FleetStatus> for StatusJson<'a> {
    fn from(s: &'a FleetStatus) -> Self {
        let agents = s.agents.as_ref();
        Self {
            generated_at: s.generated_at,
            app: s.app.as_deref(),
            refreshed: s.refreshed,
            counts: &s.counts,
            nodes: s.nodes.iter().map(NodeStatusJson::from).collect(),
            apps: s
                .apps
                .iter()
                .map(|a| AppSummaryJson {
                    app: &a.app,
                    releases: a.releases.iter().map(ReleaseNodesJson::from).collect(),
                    unhealthy: a.unhealthy.iter().map(UnhealthyJson::from).collect(),
                    busy: &a.busy,
                    last_deployment: a.last_deployment.as_ref().map(DeploymentJson::from),
                    public: a
                        .public
                        .iter()
                        .filter_map(|p| {
                            p.public.as_ref().map(|public| PublicOnNodeJson {
                                node: &p.node_name,
                                public: PublicJson::from(public),
                            })
                        })
                        .collect(),
                })
                .collect(),
            agents: AgentsJson {
                versions: agents.map_or_else(Vec::new, |a| {
                    a.versions.iter().map(VersionNodesJson::from).collect()
                }),
                rss_median_bytes: agents.and_then(|a| a.rss_median_bytes),
                rss_outliers: agents.map_or_else(Vec::new, |a| {
                    a.rss_outliers
                        .iter()
                        .map(|o| (o.node.as_str(), o.rss_bytes))
                        .collect()
                }),
            },
            problems: &s.problems,
            notes: &s.notes,
            certificates: s.certificates.iter().map(CertificateJson::from).collect(),
            ca_rotation: s.ca_rotation.as_ref().map(|r| RotationJson {
                phase: &r.phase,
                started_at: r.started_at,
                old_ca_sha256: &r.old_ca_sha256,
                new_ca_sha256: &r.new_ca_sha256,
                lagging_nodes: &r.lagging_nodes,
            }),
        }
    }
}

/// One node of the summary in JSON.
#[derive(Debug, Serialize)]
struct NodeStatusJson<'a> {
    id: &'a str,
    name: &'a str,
    state: &'static str,
    connected: bool,
    heartbeat_age_secs: Option<i64>,
    agent_version: &'a str,
    agent_rss_bytes: Option<u64>,
    refresh: Option<&'static str>,
}

impl<'a> From<&'a NodeStatus> for NodeStatusJson<'a> {
    fn from(n: &'a NodeStatus) -> Self {
        Self {
            id: &n.id,
            name: &n.name,
            state: state_name(n.state()),
            connected: n.connected,
            heartbeat_age_secs: n.heartbeat_age_secs,
            agent_version: &n.agent_version,
            agent_rss_bytes: n.agent_rss_bytes,
            refresh: refresh_name(n.refresh()),
        }
    }
}

/// One app of the summary in JSON.
#[derive(Debug, Serialize)]
struct AppSummaryJson<'a> {
    app: &'a str,
    releases: Vec<ReleaseNodesJson<'a>>,
    unhealthy: Vec<UnhealthyJson<'a>>,
    busy: &'a [String],
    last_deployment: Option<DeploymentJson<'a>>,
    public: Vec<PublicOnNodeJson<'a>>,
}

/// A release and the nodes it is current on, in JSON.
#[derive(Debug, Serialize)]
struct ReleaseNodesJson<'a> {
    release: &'a str,
    count: u64,
    nodes: &'a [String],
}

impl<'a> From<&'a ReleaseNodes> for ReleaseNodesJson<'a> {
    fn from(r: &'a ReleaseNodes) -> Self {
        Self {
            release: &r.release,
            count: r.count,
            nodes: &r.nodes,
        }
    }
}

/// An unhealthy app on a node, in JSON.
#[derive(Debug, Serialize)]
struct UnhealthyJson<'a> {
    node_id: &'a str,
    node_name: &'a str,
    release: &'a str,
    health: &'a str,
    output: &'a str,
}

impl<'a> From<&'a UnhealthyApp> for UnhealthyJson<'a> {
    fn from(u: &'a UnhealthyApp) -> Self {
        Self {
            node_id: &u.node_id,
            node_name: &u.node_name,
            release: &u.release,
            health: &u.health,
            output: &u.output,
        }
    }
}

/// A recorded deployment in JSON.
#[derive(Debug, Serialize)]
struct DeploymentJson<'a> {
    id: &'a str,
    kind: &'a str,
    app: &'a str,
    release_id: &'a str,
    actor: &'a str,
    status: &'a str,
    started_at: i64,
    finished_at: Option<i64>,
    message: &'a str,
    nodes: Vec<DeploymentNodeJson<'a>>,
}

impl<'a> From<&'a Deployment> for DeploymentJson<'a> {
    fn from(d: &'a Deployment) -> Self {
        Self {
            id: &d.id,
            kind: &d.kind,
            app: &d.app,
            release_id: &d.release_id,
            actor: &d.actor,
            status: &d.status,
            started_at: d.started_at,
            finished_at: d.finished_at,
            message: &d.message,
            nodes: d.nodes.iter().map(DeploymentNodeJson::from).collect(),
        }
    }
}

/// One node of a recorded deployment in JSON.
#[derive(Debug, Serialize)]
struct DeploymentNodeJson<'a> {
    node_id: &'a str,
    node_name: &'a str,
    outcome: &'a str,
    release_id: &'a str,
    message: &'a str,
    finished_at: Option<i64>,
}

impl<'a> From<&'a DeploymentNode> for DeploymentNodeJson<'a> {
    fn from(n: &'a DeploymentNode) -> Self {
        Self {
            node_id: &n.node_id,
            node_name: &n.node_name,
            outcome: &n.outcome,
            release_id: &n.release_id,
            message: &n.message,
            finished_at: n.finished_at,
        }
    }
}

/// Agent versions and RSS in JSON; outliers as `[name, bytes]` pairs.
#[derive(Debug, Serialize)]
struct AgentsJson<'a> {
    versions: Vec<VersionNodesJson<'a>>,
    rss_median_bytes: Option<u64>,
    rss_outliers: Vec<(&'a str, u64)>,
}

/// An agent version and its nodes, in JSON.
#[derive(Debug, Serialize)]
struct VersionNodesJson<'a> {
    version: &'a str,
    count: u64,
    nodes: &'a [String],
}

impl<'a> From<&'a VersionNodes> for VersionNodesJson<'a> {
    fn from(v: &'a VersionNodes) -> Self {
        Self {
            version: &v.version,
            count: v.count,
            nodes: &v.nodes,
        }
    }
}

/// `text` with every line longer than `width` characters cut to it, the
/// last kept character replaced by `…` (for a terminal; `--json` and the
/// audit log keep the full text).
pub fn fit(text: &str, width: usize) -> String {
    let width = width.max(8);
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let (body, end) = match line.strip_suffix('\n') {
            Some(body) => (body, "\n"),
            None => (line, ""),
        };
        if body.chars().count() > width {
            out.extend(body.chars().take(width - 1));
            out.push('…');
        } else {
            out.push_str(body);
        }
        out.push_str(end);
    }
    out
}

/// The closing line of `slipway status` when nothing is a problem: what is
/// online and healthy, and how many notes were listed above it, so "OK"
/// never reads as "nothing to see".
pub fn ok_headline(status: &FleetStatus) -> String {
    let online = status.counts.get("online").copied().unwrap_or(0);
    let nodes = if online == 1 { "node" } else { "nodes" };
    let apps = match status.apps.len() {
        0 => "no apps reported".to_owned(),
        1 => "1 app healthy".to_owned(),
        n => format!("all {n} apps healthy"),
    };
    let mut line = format!("OK: {online} {nodes} online, {apps}");
    let notes = status.notes.len();
    if notes > 0 {
        let shown: Vec<String> = status
            .notes
            .iter()
            .take(3)
            .map(|n| limits::one_line(n, 60))
            .collect();
        let more = if notes > 3 { "; …" } else { "" };
        let _ = write!(
            line,
            " — {notes} note{}: {}{more}",
            if notes == 1 { "" } else { "s" },
            shown.join("; ")
        );
    }
    line
}

/// DigitalOcean's side of the fleet, as `slipway nodes` and `slipway
/// status` print it after the nodes: droplets without an agent ("expected,
/// not enrolled"), agents without a droplet, and gone droplets (their nodes
/// retired). Every value the controller sent is cut to one line of its limit.
pub fn render_droplets(view: &crate::v1::DropletsView) -> String {
    let name = |s: &str| limits::one_line(s, limits::MAX_NODE_NAME);
    let mut out = String::from("\nDigitalOcean droplets:\n");
    let _ = writeln!(
        out,
        "{:<24} {:>12} {:<8} {:<15} NODE",
        "DROPLET", "ID", "REGION", "PUBLIC IPV4"
    );
    for d in &view.droplets {
        let node = if d.node_id.is_empty() {
            "expected, not enrolled".to_owned()
        } else {
            format!("{} ({})", name(&d.node_name), name(&d.node_id))
        };
        let ip = if d.public_ipv4.is_empty() {
            "-"
        } else {
            d.public_ipv4.as_str()
        };
        let _ = writeln!(
            out,
            "{:<24} {:>12} {:<8} {:<15} {node}",
            name(&d.name),
            d.id,
            name(&d.region),
            name(ip)
        );
    }
    if !view.agents_without_droplet.is_empty() {
        out.push_str("agents without a droplet:\n");
        for a in &view.agents_without_droplet {
            let reported = if a.reported_droplet_id == 0 {
                "no droplet id reported".to_owned()
            } else {
                format!(
                    "reports droplet {}, not in the fleet",
                    a.reported_droplet_id
                )
            };
            let _ = writeln!(
                out,
                "  {} ({}): {reported}",
                name(&a.node_name),
                name(&a.node_id)
            );
        }
    }
    if !view.gone.is_empty() {
        out.push_str("gone droplets (their nodes retired):\n");
        for d in &view.gone {
            let node = if d.node_name.is_empty() {
                String::new()
            } else {
                format!(", node {} retired", name(&d.node_name))
            };
            let _ = writeln!(out, "  {} ({}){node}", name(&d.name), d.id);
        }
    }
    out
}

/// The droplets view in JSON (the `droplets` key of `slipway status --json`).
pub fn droplets_value(view: &crate::v1::DropletsView) -> serde_json::Value {
    let entry = |d: &crate::v1::DropletEntry| {
        serde_json::json!({
            "id": d.id,
            "name": d.name,
            "region": d.region,
            "size": d.size,
            "public_ipv4": (!d.public_ipv4.is_empty()).then_some(&d.public_ipv4),
            "tags": d.tags,
            "node_id": (!d.node_id.is_empty()).then_some(&d.node_id),
            "node_name": (!d.node_name.is_empty()).then_some(&d.node_name),
            "gone_at": (d.gone_at_unix != 0).then_some(d.gone_at_unix),
        })
    };
    serde_json::json!({
        "droplets": view.droplets.iter().map(entry).collect::<Vec<_>>(),
        "gone": view.gone.iter().map(entry).collect::<Vec<_>>(),
        "agents_without_droplet": view.agents_without_droplet.iter().map(|a| serde_json::json!({
            "node_id": a.node_id,
            "name": a.node_name,
            "reported_droplet_id": (a.reported_droplet_id != 0).then_some(a.reported_droplet_id),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn fit_cuts_long_lines_only() {
        let text = "short\nthis line is longer than twenty characters\n\nlast";
        assert_eq!(fit(text, 20), "short\nthis line is longer…\n\nlast");
        assert_eq!(fit("ééééé\n", 4), "ééééé\n", "the width is at least 8");
        assert_eq!(fit("ééééééééé", 8), "ééééééé…");
    }

    #[test]
    fn cert_left_reads_in_days_hours_or_expired() {
        let now = 1_000_000;
        assert_eq!(cert_left(0, now), "-");
        assert_eq!(cert_left(now + 6 * 86_400 + 5, now), "6d");
        assert_eq!(cert_left(now + 5 * 3_600, now), "5h");
        assert_eq!(cert_left(now + 30, now), "1m");
        assert_eq!(cert_left(now - 2 * 86_400, now), "expired 2d ago");
    }

    #[test]
    fn the_ok_headline_counts_the_notes() {
        let mut status = FleetStatus::default();
        status.counts.insert("online".into(), 3);
        status.apps = vec![Default::default(), Default::default()];
        assert_eq!(
            ok_headline(&status),
            "OK: 3 nodes online, all 2 apps healthy"
        );
        status.notes = vec![
            "releases differ for app web".into(),
            format!("deployment d-4 of web failed: {}", "x".repeat(200)),
        ];
        let line = ok_headline(&status);
        assert!(
            line.starts_with("OK: 3 nodes online, all 2 apps healthy — 2 notes: releases differ for app web; deployment d-4"),
            "{line}"
        );
        assert!(line.len() < 200, "a long note is shortened: {line}");
        status.counts.insert("online".into(), 1);
        status.apps.truncate(1);
        status.notes.truncate(1);
        assert_eq!(
            ok_headline(&status),
            "OK: 1 node online, 1 app healthy — 1 note: releases differ for app web"
        );
    }

    use super::*;

    const MIB: u64 = 1024 * 1024;

    fn node(name: &str, version: &str, rss_mib: u64, apps: Vec<AppStatus>) -> NodeView {
        NodeView {
            id: format!("n-{name}"),
            name: name.to_owned(),
            state: NodeState::Online as i32,
            last_seen_at: Some(100),
            heartbeat_age_secs: Some(3),
            agent_version: version.to_owned(),
            agent_rss_bytes: Some(rss_mib * MIB),
            apps,
            ..NodeView::default()
        }
    }

    fn app(name: &str, release: &str, health: &str) -> AppStatus {
        AppStatus {
            app: name.to_owned(),
            current_release: release.to_owned(),
            health: health.to_owned(),
            ..AppStatus::default()
        }
    }

    #[test]
    fn hostile_values_cannot_split_rows_or_widen_the_table() {
        let mut evil = node(
            "n1\nFAKE ROW online",
            "0.1\u{1b}[31m",
            10,
            vec![app("web", "v1", "unhealthy: line one\nline two")],
        );
        // 1,000 labels of 100 characters, and one of 70,000: the cell is cut.
        evil.labels = (0..1000)
            .map(|i| (format!("k{i}"), "v".repeat(100)))
            .chain([("big".to_owned(), "x".repeat(70_000))])
            .collect();
        let nodes = [evil, node("n2", "0.1", 10, vec![])];
        let table = render_table(&nodes);
        assert_eq!(table.lines().count(), 3, "{table}");
        assert!(table.lines().all(|l| l.chars().count() < 1500), "{table}");
        assert!(table.contains("n1\\nFAKE ROW online"), "{table}");
        assert!(!table.contains('\u{1b}'), "{table}");
    }

    #[test]
    fn byte_units() {
        assert_eq!(bytes(512), "512B");
        assert_eq!(bytes(24 * 1024 * 1024), "24.0M");
        assert_eq!(bytes(2 * 1024 * 1024 * 1024), "2.0G");
    }

    #[test]
    fn json_keeps_the_field_order_and_names() {
        let mut n = node("a", "1.0", 20, vec![app("web", "v1", "healthy")]);
        n.labels = [("env".to_owned(), "production".to_owned())].into();
        let json: serde_json::Value = serde_json::from_str(&nodes_json(&[n]).unwrap()).unwrap();
        assert_eq!(json[0]["state"], "online");
        assert_eq!(json[0]["labels"]["env"], "production");
        assert_eq!(json[0]["metrics"], serde_json::Value::Null);
        assert_eq!(json[0]["apps"][0]["current_release"], "v1");
        let text = nodes_json(&[node("b", "1.0", 1, vec![])]).unwrap();
        let keys: Vec<&str> = text
            .lines()
            .filter_map(|l| l.trim().strip_prefix('"')?.split('"').next())
            .collect();
        assert_eq!(
            keys,
            [
                "id",
                "name",
                "labels",
                "state",
                "last_seen_at",
                "heartbeat_age_secs",
                "agent_version",
                "agent_rss_bytes",
                "metrics",
                "apps",
                "revoked_at",
                "cert_expires_at"
            ]
        );
    }
}
