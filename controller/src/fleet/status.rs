//! The fleet summary of `slipway status`, pure: from the fleet view, the
//! sessions, the refresh answers and the last deployments, which nodes and
//! apps are fine, and the problems and notes about the rest.

use slipway_proto::view::bytes;

use super::certs::{CertHealth, SystemCertHealth};
use super::nodes::NodeView;
use crate::link::liveness::NodeState;
use crate::store::{self, App};

/// How a node answered the StatusRequest of a refreshed `slipway status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefreshAnswer {
    /// It sent a fresh heartbeat (stored before this summary was made).
    Answered,
    /// It holds no session with the controller, so it was not asked.
    NoSession,
    /// Its session ended before it answered.
    Disconnected,
    /// No answer within the refresh wait.
    TimedOut,
}

impl RefreshAnswer {
    /// Why the node did not answer, or `None` if it did.
    pub fn failure(self) -> Option<&'static str> {
        match self {
            Self::Answered => None,
            Self::NoSession => Some("no session with the controller"),
            Self::Disconnected => Some("its session ended"),
            Self::TimedOut => Some("timed out"),
        }
    }
}

/// One node in the fleet summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// Node id.
    pub id: String,
    /// Node name.
    pub name: String,
    /// online / unreachable / unknown / revoked, from its last contact.
    pub state: NodeState,
    /// Holds a session with the controller right now.
    pub connected: bool,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_secs: Option<i64>,
    /// Agent version last reported.
    pub agent_version: String,
    /// Agent RSS last reported, bytes.
    pub agent_rss_bytes: Option<u64>,
    /// Its answer to the refresh, if one was asked for.
    pub refresh: Option<RefreshAnswer>,
}

/// Nodes on which one release of an app is current.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleaseNodes {
    /// Release id; "" = nothing activated yet.
    pub release: String,
    /// How many nodes.
    pub count: usize,
    /// Their names.
    pub nodes: Vec<String>,
}

/// An app that is not healthy on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnhealthyApp {
    /// Node id.
    pub node_id: String,
    /// Node name.
    pub node_name: String,
    /// Release current there.
    pub release: String,
    /// The verdict as the agent reported it ("unhealthy: …", "error: …").
    pub health: String,
    /// The failing check's last output (the verdict without its prefix).
    pub output: String,
}

/// One app across the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppSummary {
    /// App name.
    pub app: String,
    /// Which release is current on how many nodes, most nodes first.
    pub releases: Vec<ReleaseNodes>,
    /// Nodes where the app's last health verdict is not healthy.
    pub unhealthy: Vec<UnhealthyApp>,
    /// Nodes where a deploy, rollback or prune holds the app's lock.
    pub busy: Vec<String>,
    /// The app's latest deployment (any kind) with its per-node results.
    pub last_deployment: Option<store::DeploymentRecord>,
    /// Per node (by name): the app's public address and the release that
    /// receives new connections, from agents that report it.
    pub public: Vec<(String, store::Public)>,
}

/// Nodes whose agent runs one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionNodes {
    /// Agent version.
    pub version: String,
    /// How many nodes.
    pub count: usize,
    /// Their names.
    pub nodes: Vec<String>,
}

/// Agent versions in use and agents whose memory stands out.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AgentSummary {
    /// Versions reported, most nodes first.
    pub versions: Vec<VersionNodes>,
    /// Median agent RSS over the nodes that reported one.
    pub rss_median_bytes: Option<u64>,
    /// Nodes whose agent RSS is above [`RSS_OUTLIER_FACTOR`] × the median
    /// (and more than [`RSS_OUTLIER_MIN_EXCESS`] above it): (name, bytes).
    pub rss_outliers: Vec<(String, u64)>,
}

/// An agent counts as an RSS outlier above this multiple of the median...
pub const RSS_OUTLIER_FACTOR: u64 = 2;
/// ...and this far above it (small agents vary by a few MiB).
pub const RSS_OUTLIER_MIN_EXCESS: u64 = 16 * 1024 * 1024;

/// The fleet summary of `slipway status` (the FleetStatus API's answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetStatus {
    /// When it was made (seconds since the epoch).
    pub generated_at: i64,
    /// The app filter, if any (then only nodes reporting the app count).
    pub app: Option<String>,
    /// Whether nodes were asked for a fresh heartbeat first.
    pub refreshed: bool,
    /// Nodes by state (every state, zeros included).
    pub counts: std::collections::BTreeMap<String, usize>,
    /// The nodes, by name.
    pub nodes: Vec<NodeStatus>,
    /// The apps, by name.
    pub apps: Vec<AppSummary>,
    /// Agent versions and RSS.
    pub agents: AgentSummary,
    /// What is not online and healthy, one line each; empty = all is well.
    pub problems: Vec<String>,
    /// Worth knowing but not a problem (revoked nodes, release or version
    /// drift, memory outliers, failed or running deployments).
    pub notes: Vec<String>,
    /// Every certificate in use, soonest expiry first (empty when the
    /// caller gathered none).
    pub certificates: Vec<CertHealth>,
}

impl FleetStatus {
    /// True when nothing is wrong (`slipway status` exits 0).
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The inputs of [`summarize_status`] besides the fleet view.
#[derive(Debug, Clone, Default)]
pub struct StatusInputs<'a> {
    /// Only this app.
    pub app: Option<&'a str>,
    /// Ids of the nodes holding a session now.
    pub connected: &'a [String],
    /// Answers to the refresh by node id; `None` = no refresh was asked.
    pub refresh: Option<&'a std::collections::HashMap<String, RefreshAnswer>>,
    /// The latest deployment of each app.
    pub deployments: &'a [store::DeploymentRecord],
    /// Now (seconds since the epoch).
    pub now: i64,
    /// The certificate health of the system: a failing certificate is a
    /// problem, one that warns a note.
    pub certs: Option<&'a SystemCertHealth>,
}

/// Groups `(key, name)` pairs: most names first, then by key.
fn grouped<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<ReleaseNodes> {
    let mut groups: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
    for (key, name) in pairs {
        groups.entry(key).or_default().push(name.to_owned());
    }
    let mut out: Vec<ReleaseNodes> = groups
        .into_iter()
        .map(|(key, nodes)| ReleaseNodes {
            release: key.to_owned(),
            count: nodes.len(),
            nodes,
        })
        .collect();
    out.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.release.cmp(&b.release))
    });
    out
}

fn list(groups: &[ReleaseNodes]) -> String {
    groups
        .iter()
        .map(|g| {
            let what = if g.release.is_empty() {
                "nothing"
            } else {
                &g.release
            };
            format!("{what} on {}", g.nodes.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// The median of agent RSS values and the nodes well above it.
fn rss_summary(rss: &[(&str, u64)]) -> (Option<u64>, Vec<(String, u64)>) {
    let mut values: Vec<u64> = rss.iter().map(|(_, v)| *v).collect();
    if values.is_empty() {
        return (None, Vec::new());
    }
    values.sort_unstable();
    let mid = values.len() / 2;
    let median = if values.len().is_multiple_of(2) {
        values[mid - 1] / 2 + values[mid] / 2
    } else {
        values[mid]
    };
    let outliers = rss
        .iter()
        .filter(|(_, v)| {
            *v > median.saturating_mul(RSS_OUTLIER_FACTOR)
                && v.saturating_sub(median) > RSS_OUTLIER_MIN_EXCESS
        })
        .map(|(name, v)| ((*name).to_owned(), *v))
        .collect();
    (Some(median), outliers)
}

/// The fleet summary from the fleet view (pure: the caller gathers the
/// sessions, refresh answers and deployments).
///
/// Problems (exit 1 of `slipway status`): no node (reporting the app); a
/// node unreachable, or unknown since the controller started; a node that
/// did not answer a refresh; an app whose last health verdict is not
/// healthy ("unhealthy: …", "error: …") on a non-revoked node. Revoked
/// nodes, nodes between sessions, release drift, agent version drift, RSS
/// outliers, running or failed deployments and apps never deployed are notes.
pub fn summarize_status(views: &[NodeView], inputs: &StatusInputs<'_>) -> FleetStatus {
    let considered: Vec<&NodeView> = views
        .iter()
        .filter(|v| {
            inputs
                .app
                .is_none_or(|app| v.apps.iter().any(|a| a.app == app))
        })
        .collect();
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let mut counts: std::collections::BTreeMap<String, usize> = [
        NodeState::Online,
        NodeState::Unreachable,
        NodeState::Unknown,
        NodeState::Revoked,
        NodeState::Disconnected,
    ]
    .iter()
    .map(|s| (s.as_str().to_owned(), 0))
    .collect();
    match inputs.app {
        Some(app) if considered.is_empty() => problems.push(format!("no node reports app {app}")),
        None if considered.is_empty() => problems.push("no node is enrolled".to_owned()),
        _ => {}
    }
    // A set: with 10,000 nodes, a search of the list for each node was
    // most of a status call's time.
    let connected_ids: std::collections::HashSet<&str> =
        inputs.connected.iter().map(String::as_str).collect();
    let mut nodes = Vec::with_capacity(considered.len());
    for v in &considered {
        *counts.entry(v.state.as_str().to_owned()).or_default() += 1;
        let connected = connected_ids.contains(v.id.as_str());
        let refresh = inputs.refresh.map(|answers| {
            answers
                .get(&v.id)
                .copied()
                .unwrap_or(RefreshAnswer::NoSession)
        });
        // Made only for a node with something to say (most have nothing).
        let heard = || {
            v.heartbeat_age_secs
                .map_or_else(|| "never".to_owned(), |age| format!("{age}s ago"))
        };
        match v.state {
            NodeState::Unreachable => problems.push(format!(
                "{} is unreachable (last heartbeat {})",
                v.name,
                heard()
            )),
            NodeState::Unknown => problems.push(format!(
                "{} has not been heard from since the controller started",
                v.name
            )),
            NodeState::Revoked => notes.push(format!("{} is revoked", v.name)),
            NodeState::Disconnected => match refresh.and_then(RefreshAnswer::failure) {
                Some(why) => problems.push(format!(
                    "{} did not answer the status request ({why}; last heartbeat {})",
                    v.name,
                    heard()
                )),
                None => problems.push(format!(
                    "{} holds no session with the controller (last heartbeat {}): \
                     commands cannot reach it",
                    v.name,
                    heard()
                )),
            },
            NodeState::Online => match refresh.and_then(RefreshAnswer::failure) {
                Some(why) => problems.push(format!(
                    "{} did not answer the status request ({why}; last heartbeat {})",
                    v.name,
                    heard()
                )),
                None if !connected => notes.push(format!(
                    "{} holds no session right now (last heartbeat {})",
                    v.name,
                    heard()
                )),
                None => {}
            },
        }
        nodes.push(NodeStatus {
            id: v.id.clone(),
            name: v.name.clone(),
            state: v.state,
            connected,
            heartbeat_age_secs: v.heartbeat_age_secs,
            agent_version: v.agent_version.clone(),
            agent_rss_bytes: v.agent_rss_bytes,
            refresh,
        });
    }

    let live: Vec<&&NodeView> = considered
        .iter()
        .filter(|v| v.state != NodeState::Revoked)
        .collect();
    let mut app_names: std::collections::BTreeSet<&str> = live
        .iter()
        .flat_map(|v| v.apps.iter().map(|a| a.app.as_str()))
        .filter(|a| inputs.app.is_none_or(|f| f == *a))
        .collect();
    app_names.extend(
        inputs
            .deployments
            .iter()
            .map(|d| d.app.as_str())
            .filter(|a| inputs.app.is_none_or(|f| f == *a)),
    );
    let mut apps = Vec::with_capacity(app_names.len());
    for name in app_names {
        let on: Vec<(&NodeView, &App)> = live
            .iter()
            .filter_map(|v| v.apps.iter().find(|a| a.app == name).map(|a| (**v, a)))
            .collect();
        let releases = grouped(
            on.iter()
                .map(|(v, a)| (a.current_release.as_str(), v.name.as_str())),
        );
        if releases.len() > 1 {
            notes.push(format!("{name}: releases differ: {}", list(&releases)));
        }
        let mut unhealthy = Vec::new();
        let mut busy = Vec::new();
        for (v, a) in &on {
            if a.in_progress {
                busy.push(v.name.clone());
            }
            if a.current_release.is_empty() {
                notes.push(format!("{name} has no release on {}", v.name));
                continue;
            }
            if let Some(why) = a.health.strip_prefix("stopped:") {
                // Stopped on purpose: worth knowing, not a failure.
                notes.push(format!("{name} is stopped on {}:{why}", v.name));
                continue;
            }
            let crashlooping = a.health.starts_with("crashlooping:");
            let bad = a
                .health
                .strip_prefix("unhealthy:")
                .or_else(|| a.health.strip_prefix("crashlooping:"))
                .or_else(|| a.health.starts_with("error:").then_some(a.health.as_str()));
            if let Some(output) = bad {
                let output = output.trim().to_owned();
                problems.push(if crashlooping {
                    format!(
                        "{name} on {} ({}) is crashlooping: {output}",
                        v.name, a.current_release
                    )
                } else {
                    format!(
                        "{name} on {} ({}) is not healthy: {}",
                        v.name, a.current_release, a.health
                    )
                });
                unhealthy.push(UnhealthyApp {
                    node_id: v.id.clone(),
                    node_name: v.name.clone(),
                    release: a.current_release.clone(),
                    health: a.health.clone(),
                    output,
                });
            }
        }
        let last_deployment = inputs.deployments.iter().find(|d| d.app == name).cloned();
        if let Some(d) = &last_deployment {
            match d.status.as_str() {
                "succeeded" => {}
                "running" => notes.push(format!("{name}: {} {} is running", d.kind, d.id)),
                // The nodes' reasons are listed under the app; the note
                // names the nodes only.
                _ => {
                    let failed: Vec<String> = d
                        .nodes
                        .iter()
                        .filter(|n| n.outcome != "succeeded")
                        .map(|n| {
                            let who = if n.node_name.is_empty() {
                                &n.node_id
                            } else {
                                &n.node_name
                            };
                            format!("{who} ({})", n.outcome.replace('_', " "))
                        })
                        .collect();
                    let why = if failed.is_empty() {
                        format!(": {}", d.message)
                    } else {
                        format!(" on {}", failed.join(", "))
                    };
                    notes.push(format!("{name}: last {} {} failed{why}", d.kind, d.id));
                }
            }
        }
        apps.push(AppSummary {
            app: name.to_owned(),
            releases,
            unhealthy,
            busy,
            last_deployment,
            public: on
                .iter()
                .filter_map(|(v, a)| a.public.clone().map(|p| (v.name.clone(), p)))
                .collect(),
        });
    }

    let versions = grouped(
        live.iter()
            .filter(|v| !v.agent_version.is_empty())
            .map(|v| (v.agent_version.as_str(), v.name.as_str())),
    );
    if versions.len() > 1 {
        notes.push(format!("agent versions differ: {}", list(&versions)));
    }
    let rss: Vec<(&str, u64)> = live
        .iter()
        .filter_map(|v| v.agent_rss_bytes.map(|r| (v.name.as_str(), r)))
        .collect();
    let (rss_median_bytes, rss_outliers) = rss_summary(&rss);
    let versions = versions
        .into_iter()
        .map(|g| VersionNodes {
            version: g.release,
            count: g.count,
            nodes: g.nodes,
        })
        .collect();
    for (name, value) in &rss_outliers {
        notes.push(format!(
            "agent on {name} uses {} (fleet median {})",
            bytes(*value),
            bytes(rss_median_bytes.unwrap_or(0))
        ));
    }
    if let Some(certs) = inputs.certs {
        let (failing, warning) = certs.findings();
        problems.extend(failing);
        notes.extend(warning);
    }
    FleetStatus {
        generated_at: inputs.now,
        app: inputs.app.map(ToOwned::to_owned),
        refreshed: inputs.refresh.is_some(),
        counts,
        nodes,
        apps,
        agents: AgentSummary {
            versions,
            rss_median_bytes,
            rss_outliers,
        },
        problems,
        notes,
        certificates: inputs.certs.map(|c| c.certs.clone()).unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::apply_sessions;

    /// The summary as `slipway status` prints it.
    fn render_status(status: &FleetStatus) -> String {
        slipway_proto::view::render_status(&status.clone().into())
    }

    const MIB: u64 = 1024 * 1024;

    fn app(name: &str, release: &str, health: &str) -> App {
        App {
            app: name.to_owned(),
            current_release: release.to_owned(),
            health: health.to_owned(),
            in_progress: false,
            env_version: 0,
            releases: Vec::new(),
            public: None,
        }
    }

    fn node(name: &str, state: NodeState, version: &str, rss_mib: u64, apps: Vec<App>) -> NodeView {
        NodeView {
            id: format!("n-{name}"),
            name: name.to_owned(),
            labels: serde_json::json!({}).into(),
            state,
            last_seen_at: Some(100),
            heartbeat_age_secs: Some(3),
            agent_version: version.to_owned(),
            agent_rss_bytes: Some(rss_mib * MIB),
            metrics: None,
            apps: apps.into(),
            revoked_at: None,
            cert_expires_at: 0,
        }
    }

    fn deployment(app: &str, status: &str, message: &str) -> store::DeploymentRecord {
        store::DeploymentRecord {
            id: "d-1".to_owned(),
            kind: "restart".to_owned(),
            app: app.to_owned(),
            release_id: String::new(),
            actor: "t".to_owned(),
            status: status.to_owned(),
            started_at: 90,
            finished_at: Some(95),
            message: message.to_owned(),
            nodes: Vec::new(),
            snapshots: Vec::new(),
        }
    }

    #[test]
    fn a_healthy_fleet_has_no_problems() {
        let views = [
            node(
                "a",
                NodeState::Online,
                "1.0",
                20,
                vec![app("web", "v1", "healthy")],
            ),
            node(
                "b",
                NodeState::Online,
                "1.0",
                22,
                vec![app("web", "v1", "healthy")],
            ),
        ];
        let connected = ["n-a".to_owned(), "n-b".to_owned()];
        let answers: std::collections::HashMap<String, RefreshAnswer> = connected
            .iter()
            .map(|id| (id.clone(), RefreshAnswer::Answered))
            .collect();
        let deployments = [deployment("web", "succeeded", "2 of 2 nodes succeeded")];
        let status = summarize_status(
            &views,
            &StatusInputs {
                app: None,
                connected: &connected,
                refresh: Some(&answers),
                deployments: &deployments,
                now: 100,
                certs: None,
            },
        );
        assert!(status.ok(), "{:?}", status.problems);
        assert!(status.notes.is_empty(), "{:?}", status.notes);
        assert!(status.refreshed);
        assert_eq!(status.counts["online"], 2);
        assert_eq!(status.counts["unreachable"], 0);
        assert_eq!(
            status.apps[0].releases,
            [ReleaseNodes {
                release: "v1".to_owned(),
                count: 2,
                nodes: vec!["a".to_owned(), "b".to_owned()],
            }]
        );
        assert_eq!(status.apps[0].last_deployment.as_ref().unwrap().id, "d-1");
        assert_eq!(status.agents.rss_median_bytes, Some(21 * MIB));
        let text = render_status(&status);
        assert!(text.contains("v1 current on 2 node(s): a, b"), "{text}");
        assert!(!text.contains("problems"), "{text}");
    }

    #[test]
    fn problems_and_notes_name_the_node_and_why() {
        let views = [
            node(
                "a",
                NodeState::Online,
                "1.0",
                20,
                vec![app("web", "v2", "healthy")],
            ),
            node(
                "b",
                NodeState::Online,
                "1.0",
                20,
                vec![app("web", "v1", "unhealthy: HTTP 500: sick")],
            ),
            node(
                "c",
                NodeState::Unreachable,
                "1.0",
                20,
                vec![app("web", "v1", "healthy")],
            ),
            node(
                "d",
                NodeState::Unknown,
                "0.9",
                21,
                vec![app("web", "v1", "error: bad journal")],
            ),
            node(
                "e",
                NodeState::Revoked,
                "0.1",
                900,
                vec![app("web", "v0", "unhealthy: x")],
            ),
            node(
                "f",
                NodeState::Online,
                "1.0",
                200,
                vec![app("web", "v1", "unknown")],
            ),
            node(
                "g",
                NodeState::Online,
                "1.0",
                20,
                vec![app("web", "", "unknown")],
            ),
        ];
        // a answered; b timed out; f and g were not connected (g answered
        // nothing, f was between sessions before the refresh).
        let connected = ["n-a".to_owned(), "n-b".to_owned(), "n-g".to_owned()];
        let answers: std::collections::HashMap<String, RefreshAnswer> = [
            ("n-a", RefreshAnswer::Answered),
            ("n-b", RefreshAnswer::TimedOut),
            ("n-f", RefreshAnswer::NoSession),
            ("n-g", RefreshAnswer::Answered),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let mut failed = deployment("web", "failed", "1 of 1 nodes failed: c (unreachable)");
        failed.nodes.push(store::DeploymentNodeRecord {
            node_id: "n-c".to_owned(),
            node_name: "c".to_owned(),
            outcome: "rolled_back".to_owned(),
            release_id: String::new(),
            message: "unreachable".to_owned(),
            finished_at: Some(95),
            steps: Vec::new(),
        });
        let deployments = [failed];
        let status = summarize_status(
            &views,
            &StatusInputs {
                app: None,
                connected: &connected,
                refresh: Some(&answers),
                deployments: &deployments,
                now: 100,
                certs: None,
            },
        );
        assert_eq!(
            status.problems,
            [
                "b did not answer the status request (timed out; last heartbeat 3s ago)",
                "c is unreachable (last heartbeat 3s ago)",
                "d has not been heard from since the controller started",
                "f did not answer the status request (no session with the controller; last heartbeat 3s ago)",
                "web on b (v1) is not healthy: unhealthy: HTTP 500: sick",
                "web on d (v1) is not healthy: error: bad journal",
            ]
        );
        assert_eq!(
            status.notes,
            [
                "e is revoked",
                "web: releases differ: v1 on b, c, d, f; nothing on g; v2 on a",
                "web has no release on g",
                "web: last restart d-1 failed on c (rolled back)",
                "agent versions differ: 1.0 on a, b, c, f, g; 0.9 on d",
                "agent on f uses 200.0M (fleet median 20.0M)",
            ]
        );
        assert_eq!(status.counts["revoked"], 1);
        assert_eq!(status.counts["unknown"], 1);
        let unhealthy = &status.apps[0].unhealthy;
        assert_eq!(unhealthy.len(), 2);
        assert_eq!(unhealthy[0].node_name, "b");
        assert_eq!(unhealthy[0].output, "HTTP 500: sick");
        assert_eq!(unhealthy[1].output, "error: bad journal");
        assert_eq!(status.agents.rss_outliers, [("f".to_owned(), 200 * MIB)]);
        assert_eq!(
            status.nodes[1].refresh,
            Some(RefreshAnswer::TimedOut),
            "{:?}",
            status.nodes[1]
        );
        let text = render_status(&status);
        assert!(
            text.contains("UNHEALTHY on b (v1): HTTP 500: sick"),
            "{text}"
        );
        assert!(text.contains("did not answer (timed out)"), "{text}");
    }

    #[test]
    fn a_crashlooping_app_is_a_problem_and_a_stopped_one_a_note() {
        let views = [
            node(
                "a",
                NodeState::Online,
                "1.0",
                20,
                vec![app(
                    "web",
                    "v2",
                    "crashlooping: 5 restarts of v2 within the window; restarts stopped",
                )],
            ),
            node(
                "b",
                NodeState::Online,
                "1.0",
                20,
                vec![app(
                    "web",
                    "v2",
                    "stopped: on purpose by slipway-agent stop at 2026-12-01T00:00:00Z",
                )],
            ),
        ];
        let connected = ["n-a".to_owned(), "n-b".to_owned()];
        let status = summarize_status(
            &views,
            &StatusInputs {
                app: None,
                connected: &connected,
                refresh: None,
                deployments: &[],
                now: 100,
                certs: None,
            },
        );
        assert_eq!(
            status.problems,
            ["web on a (v2) is crashlooping: 5 restarts of v2 within the window; restarts stopped"]
        );
        assert_eq!(
            status.notes,
            ["web is stopped on b: on purpose by slipway-agent stop at 2026-12-01T00:00:00Z"]
        );
        assert_eq!(status.apps[0].unhealthy.len(), 1);
        assert!(!status.ok());
    }

    #[test]
    fn an_app_filter_keeps_the_nodes_reporting_it() {
        let views = [
            node(
                "a",
                NodeState::Online,
                "1.0",
                20,
                vec![app("web", "v1", "healthy")],
            ),
            node(
                "b",
                NodeState::Unreachable,
                "1.0",
                20,
                vec![app("api", "v7", "healthy")],
            ),
        ];
        let connected = ["n-a".to_owned()];
        let inputs = |app| StatusInputs {
            app,
            connected: &connected,
            refresh: None,
            deployments: &[],
            now: 100,
            certs: None,
        };
        let web = summarize_status(&views, &inputs(Some("web")));
        assert!(web.ok(), "{:?}", web.problems);
        assert_eq!(web.nodes.len(), 1);
        assert_eq!(web.apps.len(), 1);
        assert_eq!(web.nodes[0].refresh, None);
        let api = summarize_status(&views, &inputs(Some("api")));
        assert_eq!(api.problems, ["b is unreachable (last heartbeat 3s ago)"]);
        let none = summarize_status(&views, &inputs(Some("db")));
        assert_eq!(none.problems, ["no node reports app db"]);
        assert!(!summarize_status(&[], &inputs(None)).ok());
    }

    #[test]
    fn rss_outliers_are_well_above_the_median() {
        assert_eq!(rss_summary(&[]), (None, vec![]));
        const NAMES: [&str; 4] = ["n0", "n1", "n2", "n3"];
        let rss = |values: &[u64]| -> Vec<(&str, u64)> {
            values
                .iter()
                .enumerate()
                .map(|(i, v)| (NAMES[i], v * MIB))
                .collect()
        };
        // Even count: the mean of the middle two.
        assert_eq!(rss_summary(&rss(&[10, 20, 30, 40])).0, Some(25 * MIB));
        // Twice the median but only 10 MiB above it: not an outlier.
        assert_eq!(rss_summary(&rss(&[5, 5, 15])).1, vec![]);
        // Far above: an outlier; exactly twice: not.
        let (median, outliers) = rss_summary(&rss(&[20, 20, 40, 100]));
        assert_eq!(median, Some(30 * MIB));
        assert_eq!(outliers, vec![("n3".to_owned(), 100 * MIB)]);
    }

    #[test]
    fn hostile_values_cannot_forge_status_lines() {
        let evil = node(
            "n1\nFAKE ROW online",
            NodeState::Online,
            "0.1\u{1b}[31m",
            10,
            vec![app("web", "v1", "unhealthy: line one\nline two")],
        );
        let nodes = [evil, node("n2", NodeState::Online, "0.1", 10, vec![])];
        let status = summarize_status(
            &nodes,
            &StatusInputs {
                app: None,
                connected: &[],
                refresh: None,
                deployments: &[],
                now: 200,
                certs: None,
            },
        );
        let text = render_status(&status);
        assert!(!text.lines().any(|l| l.starts_with("FAKE")), "{text}");
        assert!(text.contains("line one\\nline two"), "{text}");
    }

    #[test]
    fn online_needs_a_session_in_the_controllers_views() {
        let mut views = vec![
            node("a", NodeState::Online, "0.1", 10, vec![]),
            node("b", NodeState::Online, "0.1", 10, vec![]),
            node("c", NodeState::Unreachable, "0.1", 10, vec![]),
        ];
        apply_sessions(&mut views, |id| id == "n-a");
        let states: Vec<NodeState> = views.iter().map(|v| v.state).collect();
        assert_eq!(
            states,
            [
                NodeState::Online,
                NodeState::Disconnected,
                NodeState::Unreachable
            ]
        );
        let connected = ["n-a".to_owned(), "n-d".to_owned()];
        let status = summarize_status(
            &views,
            &StatusInputs {
                app: None,
                connected: &connected,
                refresh: None,
                deployments: &[],
                now: 200,
                certs: None,
            },
        );
        assert!(!status.ok());
        assert!(
            status
                .problems
                .iter()
                .any(|p| p.starts_with("b holds no session with the controller")),
            "{:?}",
            status.problems
        );
    }
}
