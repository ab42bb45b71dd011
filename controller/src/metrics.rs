//! Prometheus metrics: what `/metrics` serves, in the text exposition
//! format 0.0.4 (`text/plain; version=0.0.4`).
//!
//! Two kinds of figures:
//! - read at each scrape ([`Scraper::render`]): the fleet from the store
//!   (nodes by state, heartbeat age, agent versions, apps by health, each
//!   node's last reported CPU, memory, load and disks, labelled by node so
//!   one scrape of the controller gives the fleet), deployments recorded by
//!   app, kind and status, open agent sessions, the controller's own CPU
//!   time and RSS, the store's latency for the queries the scrape made, and
//!   certificate expiry;
//! - observed while the controller runs ([`crate::observe`], filled by the
//!   rollout executor): deployment, per-node and per-step durations as
//!   histograms.
//!
//! Label values that come from agents (node names, versions, app names,
//! mounts, step names) are escaped by the encoder; the ones that could grow
//! without bound are folded into a fixed set ([`health_class`],
//! [`crate::observe`]'s step labels), so an agent cannot blow up the series
//! count.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus::{Encoder as _, GaugeVec, Opts, Registry};

use crate::fleet::{self, NodeView};
use crate::link::liveness::NodeState;
use crate::link::registry::Sessions;
use crate::store::{DeploymentCount, Store, StoreError};

/// The `Content-Type` of what [`Scraper::render`] returns.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every node state, so each has a series (zeros included).
const STATES: [NodeState; 5] = [
    NodeState::Online,
    NodeState::Disconnected,
    NodeState::Unreachable,
    NodeState::Unknown,
    NodeState::Revoked,
];

/// The class of an app's health verdict as agents report it: "healthy",
/// "unhealthy", "crashlooping", "error", "unknown", "no_check", "stopped",
/// or "other" (the output after the colon is not a label: unbounded).
pub fn health_class(health: &str) -> &'static str {
    let head = health.split(':').next().unwrap_or_default().trim();
    match head {
        "healthy" => "healthy",
        "unhealthy" => "unhealthy",
        "crashlooping" => "crashlooping",
        "error" => "error",
        "unknown" | "" => "unknown",
        "no check" => "no_check",
        "stopped" => "stopped",
        _ => "other",
    }
}

/// A certificate's expiry, for `slipway_certificate_expiry_timestamp_seconds`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertExpiry {
    /// Which: "ca", "server", "node", "operator".
    pub cert: String,
    /// Whose: the CA's common name, "controller", the node or operator name.
    pub name: String,
    /// The CA's sha256 fingerprint, the node or operator id; "" for the
    /// server certificate.
    pub id: String,
    /// Not after, seconds since the epoch.
    pub not_after: i64,
}

/// The controller's CA and server certificate expiries, read from the data
/// dir (a file that is missing or unreadable is left out).
///
/// The hook for certificate health: when `fleet::status` reports the
/// certificates' health itself, this is the one place to take it from.
pub fn controller_cert_expiry(data_dir: &Path) -> Vec<CertExpiry> {
    use crate::pki::ca::{validity_of, CA_CERT_FILE, SERVER_CERT_FILE};
    use rustls::pki_types::{pem::PemObject as _, CertificateDer};
    [("ca", CA_CERT_FILE), ("server", SERVER_CERT_FILE)]
        .into_iter()
        .filter_map(|(cert, file)| {
            let pem = std::fs::read(data_dir.join(file)).ok()?;
            let der = CertificateDer::from_pem_slice(&pem).ok()?;
            let (_, not_after) = validity_of(&der)?;
            Some(CertExpiry {
                cert: cert.to_owned(),
                name: String::new(),
                id: String::new(),
                not_after,
            })
        })
        .collect()
}

/// The controller process's own figures.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessStats {
    /// User + system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident memory, bytes.
    pub rss_bytes: u64,
    /// Start time, seconds since the epoch.
    pub start_time: u64,
}

/// Everything one scrape shows besides the observed histograms: gathered
/// first (async), then encoded (pure, see [`encode`]).
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The fleet view, sessions applied.
    pub nodes: Vec<NodeView>,
    /// Deployments recorded, by app, kind and status.
    pub deployments: Vec<DeploymentCount>,
    /// Open agent sessions (`None`: not the serving process).
    pub sessions: Option<usize>,
    /// The controller process, if it could be read.
    pub process: Option<ProcessStats>,
    /// Certificate expiries.
    pub certs: Vec<CertExpiry>,
    /// Seconds each store query of this scrape took, by query name.
    pub store_seconds: Vec<(&'static str, f64)>,
}

/// Gathers and renders `/metrics`. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct Scraper {
    store: Store,
    /// The running controller's sessions; `None` from another process
    /// (then node states come from the database alone, and the process
    /// figures, which would be that process's, are left out).
    sessions: Option<Sessions>,
    data_dir: PathBuf,
    /// Kept between scrapes: sysinfo reads /proc for the one process.
    system: Arc<Mutex<sysinfo::System>>,
}

impl Scraper {
    /// A scraper of this controller's store, sessions and data dir.
    pub fn new(store: Store, sessions: Sessions, data_dir: &Path) -> Self {
        Self {
            store,
            sessions: Some(sessions),
            data_dir: data_dir.to_owned(),
            system: Arc::new(Mutex::new(sysinfo::System::new())),
        }
    }

    /// A scraper of the store alone, from a process other than `serve`.
    pub fn offline(store: Store, data_dir: &Path) -> Self {
        Self {
            store,
            sessions: None,
            data_dir: data_dir.to_owned(),
            system: Arc::new(Mutex::new(sysinfo::System::new())),
        }
    }

    /// Reads what a scrape shows, now.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let now = crate::now_unix();
        let t = Instant::now();
        let mut views = fleet::nodes(&self.store, now).await?;
        let fleet_secs = t.elapsed().as_secs_f64();
        if let Some(sessions) = &self.sessions {
            let online = sessions.online().await;
            fleet::apply_sessions(&mut views, |id| online.contains(id));
        }
        let t = Instant::now();
        let deployments = self.store.deployment_counts().await?;
        let deployments_secs = t.elapsed().as_secs_f64();
        let (system, data_dir) = (self.system.clone(), self.data_dir.clone());
        let ours = self.sessions.is_some();
        // /proc: a blocking read, off the runtime.
        let process =
            tokio::task::spawn_blocking(move || if ours { process_stats(&system) } else { None })
                .await
                .unwrap_or(None);
        // Every certificate `slipway status` judges (the CA or both CAs of a
        // rotation, the server, each live node, each operator); the
        // controller's own files alone if the store cannot say.
        let certs = match fleet::certs::system_cert_health(&data_dir, &self.store, now).await {
            Ok(health) => health
                .certs
                .into_iter()
                .map(|c| CertExpiry {
                    cert: c.kind.as_str().to_owned(),
                    name: c.name,
                    id: c.id,
                    not_after: c.not_after,
                })
                .collect(),
            Err(err) => {
                tracing::warn!(%err, "certificate health for /metrics");
                let dir = data_dir.clone();
                tokio::task::spawn_blocking(move || controller_cert_expiry(&dir))
                    .await
                    .unwrap_or_default()
            }
        };
        Ok(Snapshot {
            nodes: views,
            deployments,
            sessions: self.sessions.as_ref().map(Sessions::len),
            process,
            certs,
            store_seconds: vec![
                ("fleet", fleet_secs),
                ("deployment_counts", deployments_secs),
            ],
        })
    }

    /// The text `/metrics` answers with.
    pub async fn render(&self) -> Result<String, StoreError> {
        Ok(encode(&self.snapshot().await?))
    }
}

fn process_stats(system: &Mutex<sysinfo::System>) -> Option<ProcessStats> {
    use sysinfo::{ProcessRefreshKind, ProcessesToUpdate};
    let pid = sysinfo::get_current_pid().ok()?;
    let mut system = system.lock().ok()?;
    system.refresh_processes_specifics(
        ProcessesToUpdate::Some(&[pid]),
        true,
        ProcessRefreshKind::nothing().with_cpu().with_memory(),
    );
    let p = system.process(pid)?;
    Some(ProcessStats {
        cpu_seconds: p.accumulated_cpu_time() as f64 / 1000.0,
        rss_bytes: p.memory(),
        start_time: p.start_time(),
    })
}

/// Builds the gauges of one scrape. Every name and label list here is a
/// constant; a failure to register is a bug the unit tests catch, so it is
/// logged and the family left out rather than failing the scrape.
struct Families {
    registry: Registry,
}

impl Families {
    fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
        let vec = match GaugeVec::new(Opts::new(name, help), labels) {
            Ok(v) => v,
            Err(e) => unreachable!("gauge {name}: {e}"),
        };
        if let Err(e) = self.registry.register(Box::new(vec.clone())) {
            tracing::error!(%e, name, "metric family not registered");
        }
        vec
    }

    /// A gauge without labels.
    fn plain(&self, name: &str, help: &str) -> prometheus::Gauge {
        let gauge = match prometheus::Gauge::new(name, help) {
            Ok(g) => g,
            Err(e) => unreachable!("gauge {name}: {e}"),
        };
        if let Err(e) = self.registry.register(Box::new(gauge.clone())) {
            tracing::error!(%e, name, "metric family not registered");
        }
        gauge
    }

    /// A counter that starts at what the process already counted.
    fn counter(&self, name: &str, help: &str) -> prometheus::Counter {
        let counter = match prometheus::Counter::new(name, help) {
            Ok(c) => c,
            Err(e) => unreachable!("counter {name}: {e}"),
        };
        if let Err(e) = self.registry.register(Box::new(counter.clone())) {
            tracing::error!(%e, name, "metric family not registered");
        }
        counter
    }
}

/// The exposition text of `snapshot`, with the observed histograms.
pub fn encode(snapshot: &Snapshot) -> String {
    let f = Families {
        registry: Registry::new(),
    };
    for h in crate::observe::histograms() {
        if let Err(e) = f.registry.register(Box::new(h)) {
            tracing::error!(%e, "histogram not registered");
        }
    }

    // The fleet.
    let by_state = f.gauge(
        "slipway_nodes",
        "Enrolled nodes by state (online, disconnected, unreachable, unknown, revoked).",
        &["state"],
    );
    let mut counts: BTreeMap<&str, f64> = STATES.iter().map(|s| (s.as_str(), 0.0)).collect();
    for v in &snapshot.nodes {
        *counts.entry(v.state.as_str()).or_default() += 1.0;
    }
    for (state, n) in &counts {
        by_state.with_label_values(&[state]).set(*n);
    }
    let node_state = f.gauge(
        "slipway_node_state",
        "1 for each node's current state (one series per node).",
        &["node", "node_id", "state"],
    );
    let up = f.gauge(
        "slipway_node_up",
        "1 if the node is online (heard from in time and holding a session), else 0.",
        &["node", "node_id"],
    );
    let age = f.gauge(
        "slipway_node_heartbeat_age_seconds",
        "Seconds since the node's last heartbeat.",
        &["node", "node_id"],
    );
    let agent = f.gauge(
        "slipway_node_agent_version",
        "1 for the agent version each node last reported.",
        &["node", "node_id", "version"],
    );
    let versions = f.gauge(
        "slipway_agent_versions",
        "Non-revoked nodes by the agent version they last reported.",
        &["version"],
    );
    let agent_rss = f.gauge(
        "slipway_node_agent_resident_memory_bytes",
        "The agent's own resident memory, as last reported.",
        &["node", "node_id"],
    );
    let node_cert = f.gauge(
        "slipway_node_certificate_expiry_timestamp_seconds",
        "When the node's newest certificate expires (seconds since the epoch).",
        &["node", "node_id"],
    );
    let cpu = f.gauge(
        "slipway_node_cpu_usage_ratio",
        "Whole-host CPU usage, 0..1, as last reported by the node's agent.",
        &["node", "node_id"],
    );
    let mem_used = f.gauge(
        "slipway_node_memory_used_bytes",
        "Memory in use on the node, as last reported.",
        &["node", "node_id"],
    );
    let mem_total = f.gauge(
        "slipway_node_memory_total_bytes",
        "Installed memory of the node, as last reported.",
        &["node", "node_id"],
    );
    let load = f.gauge(
        "slipway_node_load",
        "Load average of the node over 1, 5 and 15 minutes, as last reported.",
        &["node", "node_id", "period"],
    );
    let disk_used = f.gauge(
        "slipway_node_disk_used_bytes",
        "Bytes used on a filesystem of the node (those holding its app roots), as last reported.",
        &["node", "node_id", "mount"],
    );
    let disk_total = f.gauge(
        "slipway_node_disk_size_bytes",
        "Size of a filesystem of the node, as last reported.",
        &["node", "node_id", "mount"],
    );
    let app_health = f.gauge(
        "slipway_app_health",
        "1 for each app's last health verdict class on each node.",
        &["app", "node", "node_id", "health"],
    );
    let apps = f.gauge(
        "slipway_apps",
        "App instances on non-revoked nodes, by app and health class.",
        &["app", "health"],
    );
    let app_busy = f.gauge(
        "slipway_app_in_progress",
        "1 if a deploy, rollback or prune holds the app's lock on the node.",
        &["app", "node", "node_id"],
    );
    let mut version_counts: BTreeMap<&str, f64> = BTreeMap::new();
    let mut app_counts: BTreeMap<(&str, &str), f64> = BTreeMap::new();
    for v in &snapshot.nodes {
        let ids = [v.name.as_str(), v.id.as_str()];
        node_state
            .with_label_values(&[&v.name, &v.id, v.state.as_str()])
            .set(1.0);
        node_cert
            .with_label_values(&ids)
            .set(v.cert_expires_at as f64);
        if v.state == NodeState::Revoked {
            continue;
        }
        up.with_label_values(&ids)
            .set(f64::from(u8::from(v.state == NodeState::Online)));
        if let Some(a) = v.heartbeat_age_secs {
            age.with_label_values(&ids).set(a as f64);
        }
        if !v.agent_version.is_empty() {
            agent
                .with_label_values(&[&v.name, &v.id, &v.agent_version])
                .set(1.0);
            *version_counts.entry(v.agent_version.as_str()).or_default() += 1.0;
        }
        if let Some(rss) = v.agent_rss_bytes {
            agent_rss.with_label_values(&ids).set(rss as f64);
        }
        if let Some(m) = &v.metrics {
            cpu.with_label_values(&ids)
                .set((m.cpu_percent / 100.0).clamp(0.0, 1.0));
            mem_used
                .with_label_values(&ids)
                .set(m.mem_used_bytes as f64);
            mem_total
                .with_label_values(&ids)
                .set(m.mem_total_bytes as f64);
            for (period, value) in [("1m", m.load1), ("5m", m.load5), ("15m", m.load15)] {
                load.with_label_values(&[&v.name, &v.id, period]).set(value);
            }
            for d in &m.disks {
                let labels = [v.name.as_str(), v.id.as_str(), d.mount.as_str()];
                disk_used
                    .with_label_values(&labels)
                    .set(d.used_bytes as f64);
                disk_total
                    .with_label_values(&labels)
                    .set(d.total_bytes as f64);
            }
        }
        for a in v.apps.iter() {
            let class = health_class(&a.health);
            app_health
                .with_label_values(&[&a.app, &v.name, &v.id, class])
                .set(1.0);
            app_busy
                .with_label_values(&[&a.app, &v.name, &v.id])
                .set(f64::from(u8::from(a.in_progress)));
            *app_counts.entry((a.app.as_str(), class)).or_default() += 1.0;
        }
    }
    for (version, n) in version_counts {
        versions.with_label_values(&[version]).set(n);
    }
    for ((app, class), n) in app_counts {
        apps.with_label_values(&[app, class]).set(n);
    }

    // Deployments.
    let deployments = f.gauge(
        "slipway_deployments",
        "Deployments recorded in the store, by app, kind and status (running, succeeded, failed).",
        &["app", "kind", "status"],
    );
    for d in &snapshot.deployments {
        deployments
            .with_label_values(&[&d.app, &d.kind, &d.status])
            .set(d.count as f64);
    }

    // The controller itself.
    if let Some(n) = snapshot.sessions {
        f.plain(
            "slipway_controller_sessions",
            "Agent sessions open with this controller.",
        )
        .set(n as f64);
    }
    if let Some(p) = snapshot.process {
        f.counter(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent by the controller, seconds.",
        )
        .inc_by(p.cpu_seconds);
        f.plain(
            "process_resident_memory_bytes",
            "Resident memory of the controller, bytes.",
        )
        .set(p.rss_bytes as f64);
        f.plain(
            "process_start_time_seconds",
            "Start time of the controller process since the epoch, seconds.",
        )
        .set(p.start_time as f64);
    }
    let store = f.gauge(
        "slipway_store_query_duration_seconds",
        "How long the store queries of this scrape took, by query.",
        &["query"],
    );
    for (query, secs) in &snapshot.store_seconds {
        store.with_label_values(&[query]).set(*secs);
    }
    // Days left is `(x - time()) / 86400` in a query: promtool's lint
    // wants base units, and a timestamp does not go stale between scrapes.
    let certs = f.gauge(
        "slipway_certificate_expiry_timestamp_seconds",
        "When each certificate of the system expires (seconds since the epoch): \
         cert = ca, server, node or operator.",
        &["cert", "name", "id"],
    );
    for c in &snapshot.certs {
        certs
            .with_label_values(&[&c.cert, &c.name, &c.id])
            .set(c.not_after as f64);
    }

    let mut out = Vec::new();
    if let Err(e) = prometheus::TextEncoder::new().encode(&f.registry.gather(), &mut out) {
        tracing::error!(%e, "encoding /metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{App, Disk, Metrics};

    fn node(id: &str, name: &str, state: NodeState, version: &str, apps: Vec<App>) -> NodeView {
        NodeView {
            id: id.to_owned(),
            name: name.to_owned(),
            labels: serde_json::json!({}).into(),
            state,
            last_seen_at: Some(990),
            heartbeat_age_secs: Some(10),
            agent_version: version.to_owned(),
            agent_rss_bytes: Some(7_000_000),
            metrics: Some(
                Metrics {
                    cpu_percent: 25.0,
                    mem_used_bytes: 1_000,
                    mem_total_bytes: 4_000,
                    load1: 0.5,
                    load5: 0.25,
                    load15: 0.125,
                    disks: vec![Disk {
                        mount: "/app".to_owned(),
                        used_bytes: 10,
                        total_bytes: 100,
                    }],
                }
                .into(),
            ),
            apps: apps.into(),
            revoked_at: None,
            cert_expires_at: 5_000,
        }
    }

    fn app(name: &str, health: &str) -> App {
        App {
            app: name.to_owned(),
            current_release: "r1".to_owned(),
            health: health.to_owned(),
            in_progress: false,
            env_version: 0,
            releases: Vec::new(),
            public: None,
        }
    }

    /// The value of the sample `series` (name and labels exactly) in `text`.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    #[test]
    fn health_verdicts_fold_into_classes() {
        assert_eq!(health_class("healthy"), "healthy");
        assert_eq!(health_class("unhealthy: HTTP 500"), "unhealthy");
        assert_eq!(health_class("crashlooping: 5 restarts"), "crashlooping");
        assert_eq!(health_class("error: no such app"), "error");
        assert_eq!(health_class("no check"), "no_check");
        assert_eq!(health_class(""), "unknown");
        assert_eq!(health_class("something new"), "other");
    }

    #[test]
    fn the_fleet_is_counted_and_labelled_by_node() {
        let quoted = "we\"b\\3\nx";
        let snapshot = Snapshot {
            nodes: vec![
                node(
                    "n-1",
                    "web-1",
                    NodeState::Online,
                    "0.1.0",
                    vec![app("shop", "healthy")],
                ),
                node(
                    "n-2",
                    "web-2",
                    NodeState::Online,
                    "0.1.0",
                    vec![app("shop", "unhealthy: HTTP 500 from /api/health")],
                ),
                node(
                    "n-3",
                    quoted,
                    NodeState::Unreachable,
                    "0.2.0",
                    vec![app("shop", "healthy")],
                ),
                node("n-4", "old", NodeState::Revoked, "0.0.9", vec![]),
            ],
            deployments: vec![DeploymentCount {
                app: "shop".to_owned(),
                kind: "deploy".to_owned(),
                status: "succeeded".to_owned(),
                count: 4,
            }],
            sessions: Some(2),
            process: Some(ProcessStats {
                cpu_seconds: 1.5,
                rss_bytes: 30_000_000,
                start_time: 900,
            }),
            certs: vec![CertExpiry {
                cert: "server".to_owned(),
                name: "controller".to_owned(),
                id: String::new(),
                not_after: 1_000 + 86_400 * 30,
            }],
            store_seconds: vec![("fleet", 0.001)],
        };
        crate::observe::observe_deployment(
            "metrics-test",
            false,
            std::time::Duration::from_secs(7),
        );
        let text = encode(&snapshot);
        assert_eq!(value(&text, r#"slipway_nodes{state="online"}"#), Some(2.0));
        assert_eq!(
            value(&text, r#"slipway_nodes{state="unreachable"}"#),
            Some(1.0)
        );
        assert_eq!(value(&text, r#"slipway_nodes{state="revoked"}"#), Some(1.0));
        assert_eq!(value(&text, r#"slipway_nodes{state="unknown"}"#), Some(0.0));
        assert_eq!(
            value(&text, r#"slipway_agent_versions{version="0.1.0"}"#),
            Some(2.0)
        );
        assert_eq!(
            value(&text, r#"slipway_agent_versions{version="0.2.0"}"#),
            Some(1.0)
        );
        assert_eq!(
            value(&text, r#"slipway_agent_versions{version="0.0.9"}"#),
            None,
            "revoked nodes are not counted"
        );
        assert_eq!(
            value(&text, r#"slipway_apps{app="shop",health="healthy"}"#),
            Some(2.0)
        );
        assert_eq!(
            value(&text, r#"slipway_apps{app="shop",health="unhealthy"}"#),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                r#"slipway_node_cpu_usage_ratio{node="web-1",node_id="n-1"}"#
            ),
            Some(0.25)
        );
        assert_eq!(
            value(
                &text,
                r#"slipway_node_disk_used_bytes{mount="/app",node="web-1",node_id="n-1"}"#
            ),
            Some(10.0)
        );
        assert_eq!(
            value(
                &text,
                r#"slipway_node_load{node="web-2",node_id="n-2",period="15m"}"#
            ),
            Some(0.125)
        );
        assert_eq!(
            value(
                &text,
                r#"slipway_node_up{node="we\"b\\3\nx",node_id="n-3"}"#
            ),
            Some(0.0),
            "label values from agents are escaped:\n{text}"
        );
        assert_eq!(
            value(
                &text,
                r#"slipway_deployments{app="shop",kind="deploy",status="succeeded"}"#
            ),
            Some(4.0)
        );
        assert_eq!(value(&text, "slipway_controller_sessions"), Some(2.0));
        assert_eq!(value(&text, "process_cpu_seconds_total"), Some(1.5));
        assert_eq!(
            value(
                &text,
                r#"slipway_certificate_expiry_timestamp_seconds{cert="server",id="",name="controller"}"#
            ),
            Some((1_000 + 86_400 * 30) as f64)
        );
        assert!(!text.contains("HTTP 500"), "health output is not a label");
        assert!(text.contains("# TYPE slipway_deployment_duration_seconds histogram"));
        assert!(
            value(
                &text,
                r#"slipway_deployment_duration_seconds_bucket{kind="metrics-test",outcome="failed",le="10"}"#
            ) >= Some(1.0),
            "{text}"
        );
    }
}
