//! The fleet view and status summary as the Control API sends them
//! (`slipway_proto::v1::NodeView`, `FleetStatus`), converted once here;
//! `slipway_proto::view` shows them as text and JSON.

use slipway_proto::v1;

use super::certs::CertHealth;
use super::nodes::NodeView;
use super::status::{AppSummary, FleetStatus, NodeStatus, RefreshAnswer};
use crate::link::liveness::NodeState;
use crate::store::{DeploymentNodeRecord, DeploymentRecord};

impl From<NodeState> for v1::NodeState {
    fn from(state: NodeState) -> Self {
        match state {
            NodeState::Online => Self::Online,
            NodeState::Unreachable => Self::Unreachable,
            NodeState::Unknown => Self::Unknown,
            NodeState::Revoked => Self::Revoked,
            NodeState::Disconnected => Self::Disconnected,
        }
    }
}

impl From<RefreshAnswer> for v1::RefreshAnswer {
    fn from(answer: RefreshAnswer) -> Self {
        match answer {
            RefreshAnswer::Answered => Self::Answered,
            RefreshAnswer::NoSession => Self::NoSession,
            RefreshAnswer::Disconnected => Self::Disconnected,
            RefreshAnswer::TimedOut => Self::TimedOut,
        }
    }
}

impl From<&NodeView> for v1::NodeView {
    fn from(v: &NodeView) -> Self {
        // Labels are stored as a JSON object of strings.
        let labels = v
            .labels
            .as_object()
            .map(|labels| {
                labels
                    .iter()
                    .map(|(k, value)| {
                        let value = value
                            .as_str()
                            .map_or_else(|| value.to_string(), ToOwned::to_owned);
                        (k.clone(), value)
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            id: v.id.clone(),
            name: v.name.clone(),
            labels,
            state: v1::NodeState::from(v.state).into(),
            last_seen_at: v.last_seen_at,
            heartbeat_age_secs: v.heartbeat_age_secs,
            agent_version: v.agent_version.clone(),
            agent_rss_bytes: v.agent_rss_bytes,
            metrics: v.metrics.as_deref().map(Into::into),
            apps: v.apps.iter().map(Into::into).collect(),
            revoked_at: v.revoked_at,
            cert_expires_at: v.cert_expires_at,
        }
    }
}

/// By value: a status of 10,000 nodes is moved into its message, not
/// copied string by string.
impl From<FleetStatus> for v1::FleetStatus {
    fn from(s: FleetStatus) -> Self {
        let now = s.generated_at;
        Self {
            generated_at: s.generated_at,
            app: s.app,
            refreshed: s.refreshed,
            counts: s
                .counts
                .into_iter()
                .map(|(state, n)| (state, count(n)))
                .collect(),
            nodes: s.nodes.into_iter().map(node_status).collect(),
            apps: s.apps.iter().map(app_summary).collect(),
            agents: Some(v1::AgentSummary {
                versions: s
                    .agents
                    .versions
                    .into_iter()
                    .map(|v| v1::VersionNodes {
                        version: v.version,
                        count: count(v.count),
                        nodes: v.nodes,
                    })
                    .collect(),
                rss_median_bytes: s.agents.rss_median_bytes,
                rss_outliers: s
                    .agents
                    .rss_outliers
                    .into_iter()
                    .map(|(node, rss_bytes)| v1::RssOutlier { node, rss_bytes })
                    .collect(),
            }),
            problems: s.problems,
            notes: s.notes,
            certificates: s
                .certificates
                .into_iter()
                .map(|c| certificate(c, now))
                .collect(),
            ca_rotation: None,
        }
    }
}

fn certificate(c: CertHealth, now: i64) -> v1::CertificateHealth {
    v1::CertificateHealth {
        kind: c.kind.as_str().to_owned(),
        days_left: c.days_left(now),
        level: c.level(now).as_str().to_owned(),
        renewed_automatically: c.renewed_automatically(),
        not_after_rfc3339: crate::rfc3339(c.not_after),
        not_before: c.not_before,
        not_after: c.not_after,
        name: c.name,
        id: c.id,
    }
}

fn count(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

fn node_status(n: NodeStatus) -> v1::NodeStatus {
    v1::NodeStatus {
        id: n.id,
        name: n.name,
        state: v1::NodeState::from(n.state).into(),
        connected: n.connected,
        heartbeat_age_secs: n.heartbeat_age_secs,
        agent_version: n.agent_version,
        agent_rss_bytes: n.agent_rss_bytes,
        refresh: n
            .refresh
            .map_or(v1::RefreshAnswer::Unspecified, Into::into)
            .into(),
    }
}

fn app_summary(a: &AppSummary) -> v1::AppSummary {
    v1::AppSummary {
        app: a.app.clone(),
        releases: a
            .releases
            .iter()
            .map(|r| v1::ReleaseNodes {
                release: r.release.clone(),
                count: count(r.count),
                nodes: r.nodes.clone(),
            })
            .collect(),
        unhealthy: a
            .unhealthy
            .iter()
            .map(|u| v1::UnhealthyApp {
                node_id: u.node_id.clone(),
                node_name: u.node_name.clone(),
                release: u.release.clone(),
                health: u.health.clone(),
                output: u.output.clone(),
            })
            .collect(),
        busy: a.busy.clone(),
        last_deployment: a.last_deployment.as_ref().map(deployment),
        public: a
            .public
            .iter()
            .map(|(node, p)| v1::PublicOnNode {
                node_name: node.clone(),
                public: Some(p.into()),
            })
            .collect(),
    }
}

fn deployment(d: &DeploymentRecord) -> v1::Deployment {
    v1::Deployment {
        id: d.id.clone(),
        kind: d.kind.clone(),
        app: d.app.clone(),
        release_id: d.release_id.clone(),
        actor: d.actor.clone(),
        status: d.status.clone(),
        started_at: d.started_at,
        finished_at: d.finished_at,
        message: d.message.clone(),
        nodes: d.nodes.iter().map(deployment_node).collect(),
    }
}

fn deployment_node(n: &DeploymentNodeRecord) -> v1::DeploymentNode {
    v1::DeploymentNode {
        node_id: n.node_id.clone(),
        node_name: n.node_name.clone(),
        outcome: n.outcome.clone(),
        release_id: n.release_id.clone(),
        message: n.message.clone(),
        finished_at: n.finished_at,
    }
}

#[cfg(test)]
mod tests {
    use slipway_proto::view;

    use super::*;

    #[test]
    fn the_words_shown_are_the_controllers() {
        for state in [
            NodeState::Online,
            NodeState::Unreachable,
            NodeState::Unknown,
            NodeState::Revoked,
            NodeState::Disconnected,
        ] {
            assert_eq!(view::state_name(state.into()), state.as_str());
        }
        for answer in [
            RefreshAnswer::Answered,
            RefreshAnswer::NoSession,
            RefreshAnswer::Disconnected,
            RefreshAnswer::TimedOut,
        ] {
            assert_eq!(view::refresh_failure(answer.into()), answer.failure());
        }
    }
}
