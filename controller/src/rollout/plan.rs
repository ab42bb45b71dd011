//! What a deployment is asked to do: the action, its targets and rollout.

use std::time::Duration;

use slipway_proto::v1::{controller_message, ControllerMessage};

use super::policy::{Rollout, Strategy};
use crate::audit;

/// A node a deployment targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Node id.
    pub node_id: String,
    /// Node name.
    pub name: String,
}

/// The `.env` text an env change sends. Its `Debug` shows the size only:
/// plans are logged, values never are.
#[derive(Clone, PartialEq, Eq)]
pub struct EnvText(pub String);

impl std::fmt::Debug for EnvText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EnvText({} bytes)", self.0.len())
    }
}

/// What to run on each node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Deploy a release from an artifact.
    Deploy {
        /// Release id on every node.
        release_id: String,
        /// Artifact digest.
        sha256: String,
        /// Git commit (display).
        git_sha: String,
        /// An https URL every agent downloads the artifact from itself;
        /// empty: agents fetch it from the controller by digest.
        artifact_url: String,
    },
    /// Roll back, to a release or ('' ) each node's previous one.
    Rollback {
        /// Target release.
        to_release_id: String,
    },
    /// Restart the app's current release (driver restart, health gate).
    Restart,
    /// Stop the app on purpose (the agents leave it stopped until Start).
    Stop,
    /// Start an app stopped on purpose (health gate).
    Start,
    /// Delete old releases (never the current one or the rollback target).
    Prune {
        /// Releases to keep; 0 = the app's `keep` setting on each node.
        keep: u32,
    },
    /// Replace the agent's own binary (the plan's app is [`AGENT_APP`]).
    AgentUpgrade {
        /// Digest of the uploaded agent binary.
        sha256: String,
        /// Its size.
        size: u64,
        /// The version the CLI read from it ('' if it could not).
        version: String,
        /// Seconds each new agent has to reconnect before its guard
        /// restores the old binary.
        commit_deadline_secs: u32,
    },
    /// Write a version of the app's environment as `shared/.env` and
    /// restart the app behind its health gate (nodes whose file already
    /// holds it are not touched).
    Env {
        /// The env version of the change (recorded on the deployment).
        version: u64,
        /// What each target (by node id) is sent: with tag layers, nodes
        /// carrying different tags get different environments.
        payloads: std::collections::BTreeMap<String, EnvPayload>,
    },
}

/// One node's environment in an env change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvPayload {
    /// The version the node's environment stands at (the newest change
    /// that altered it).
    pub version: u64,
    /// The rendered `.env` text.
    pub text: EnvText,
    /// Its sha256 (hex), checked by the agent.
    pub sha256: String,
}

impl EnvPayload {
    /// The payload of `text` at `version`.
    pub fn new(version: u64, text: String) -> Self {
        let sha256 = crate::pki::crypto::sha256_hex(text.as_bytes());
        Self {
            version,
            text: EnvText(text),
            sha256,
        }
    }
}

/// The "app" an agent upgrade is recorded under: not a valid app name (it
/// starts with `@`), so no app's deployments can be confused with it, and
/// one agent upgrade runs at a time like one deployment per app.
pub const AGENT_APP: &str = "@agent";

/// After a node's session ends mid-upgrade (the agent restarting itself),
/// how long beyond its commit deadline the controller waits for the node
/// to come back (its guard's rollback and restart included).
const UPGRADE_GRACE_MARGIN: Duration = Duration::from_secs(30);

impl Action {
    /// The kind as recorded: `deploy`, `rollback`, `restart`, `prune`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Deploy { .. } => "deploy",
            Self::Rollback { .. } => "rollback",
            Self::Restart => "restart",
            Self::Stop => "stop",
            Self::Start => "start",
            Self::Prune { .. } => "prune",
            Self::AgentUpgrade { .. } => "agent-upgrade",
            Self::Env { .. } => "env",
        }
    }

    /// How long a node that lost its session during the command may take
    /// to come back with its result: an agent upgrade restarts the agent
    /// on purpose, and its guard may take the commit deadline to restore
    /// the old one.
    pub fn reconnect_grace(&self, default: Duration) -> Duration {
        match self {
            Self::AgentUpgrade {
                commit_deadline_secs,
                ..
            } => default
                .max(Duration::from_secs(u64::from(*commit_deadline_secs)) + UPGRADE_GRACE_MARGIN),
            _ => default,
        }
    }

    /// The env version an env change delivers (0 for the other actions).
    pub fn env_version(&self) -> u64 {
        match self {
            Self::Env { version, .. } => *version,
            _ => 0,
        }
    }

    /// The release deployed or rolled back to ('' if none is named).
    pub fn release_id(&self) -> &str {
        match self {
            Self::Deploy { release_id, .. } => release_id,
            Self::Rollback { to_release_id } => to_release_id,
            Self::Restart | Self::Stop | Self::Start | Self::Prune { .. } | Self::Env { .. } => "",
            // The version the CLI read: what every node should come up on.
            Self::AgentUpgrade { version, .. } => version,
        }
    }

    /// Whether it makes nodes run another release, so that a stopped
    /// rollout sends the nodes it switched back (restart and prune keep the
    /// current release: nothing to undo).
    pub fn switches_release(&self) -> bool {
        matches!(self, Self::Deploy { .. } | Self::Rollback { .. })
    }

    /// The audit event type recorded when the deployment starts.
    pub fn started_event(&self) -> &'static str {
        match self {
            Self::Deploy { .. } => audit::DEPLOY_STARTED,
            Self::Rollback { .. } => audit::ROLLBACK_STARTED,
            Self::Restart => audit::RESTART_STARTED,
            Self::Stop => audit::STOP_STARTED,
            Self::Start => audit::START_STARTED,
            Self::Prune { .. } => audit::PRUNE_STARTED,
            Self::AgentUpgrade { .. } => audit::AGENT_UPGRADE_STARTED,
            Self::Env { .. } => audit::ENV_DELIVERY_STARTED,
        }
    }

    /// The audit event type recorded when it ends.
    pub fn finished_event(&self, succeeded: bool) -> &'static str {
        match (self, succeeded) {
            (Self::Deploy { .. }, true) => audit::DEPLOY_COMPLETED,
            (Self::Deploy { .. }, false) => audit::DEPLOY_FAILED,
            (Self::Rollback { .. }, true) => audit::ROLLBACK_COMPLETED,
            (Self::Rollback { .. }, false) => audit::ROLLBACK_FAILED,
            (Self::Restart, true) => audit::RESTART_COMPLETED,
            (Self::Restart, false) => audit::RESTART_FAILED,
            (Self::Stop, true) => audit::STOP_COMPLETED,
            (Self::Stop, false) => audit::STOP_FAILED,
            (Self::Start, true) => audit::START_COMPLETED,
            (Self::Start, false) => audit::START_FAILED,
            (Self::Prune { .. }, true) => audit::PRUNE_COMPLETED,
            (Self::Prune { .. }, false) => audit::PRUNE_FAILED,
            (Self::AgentUpgrade { .. }, true) => audit::AGENT_UPGRADE_COMPLETED,
            (Self::AgentUpgrade { .. }, false) => audit::AGENT_UPGRADE_FAILED,
            (Self::Env { .. }, true) => audit::ENV_DELIVERY_COMPLETED,
            (Self::Env { .. }, false) => audit::ENV_DELIVERY_FAILED,
        }
    }

    /// The command for one node.
    pub fn message(&self, command_id: &str, app: &str, node_id: &str) -> ControllerMessage {
        let kind = match self {
            Self::Deploy {
                release_id,
                sha256,
                git_sha,
                artifact_url,
            } => controller_message::Kind::Deploy(slipway_proto::v1::Deploy {
                command_id: command_id.to_owned(),
                app: app.to_owned(),
                release_id: release_id.clone(),
                // Empty: the agent fetches it with AgentLink.FetchArtifact.
                artifact_url: artifact_url.clone(),
                artifact_sha256: sha256.clone(),
                git_sha: git_sha.clone(),
            }),
            Self::Rollback { to_release_id } => {
                controller_message::Kind::Rollback(slipway_proto::v1::Rollback {
                    command_id: command_id.to_owned(),
                    app: app.to_owned(),
                    to_release_id: to_release_id.clone(),
                })
            }
            Self::Restart => controller_message::Kind::Restart(slipway_proto::v1::Restart {
                command_id: command_id.to_owned(),
                app: app.to_owned(),
            }),
            Self::Stop => controller_message::Kind::StopApp(slipway_proto::v1::StopApp {
                command_id: command_id.to_owned(),
                app: app.to_owned(),
            }),
            Self::Start => controller_message::Kind::StartApp(slipway_proto::v1::StartApp {
                command_id: command_id.to_owned(),
                app: app.to_owned(),
            }),
            Self::Prune { keep } => controller_message::Kind::Prune(slipway_proto::v1::Prune {
                command_id: command_id.to_owned(),
                app: app.to_owned(),
                keep: *keep,
            }),
            Self::AgentUpgrade {
                sha256,
                size,
                version,
                commit_deadline_secs,
            } => controller_message::Kind::AgentUpgrade(slipway_proto::v1::AgentUpgrade {
                command_id: command_id.to_owned(),
                sha256: sha256.clone(),
                size: *size,
                version: version.clone(),
                commit_deadline_secs: *commit_deadline_secs,
            }),
            Self::Env { version, payloads } => {
                // A plan's targets are its payloads' keys (the API builds
                // both from one list). Were one missing, version 0 is sent:
                // the agent refuses it (versions start at 1), so the node
                // fails visibly instead of getting an empty environment.
                let payload = payloads.get(node_id).cloned().unwrap_or_else(|| {
                    tracing::error!(%node_id, version, "env change without a payload for a target");
                    EnvPayload::new(0, String::new())
                });
                controller_message::Kind::SetEnv(slipway_proto::v1::SetEnv {
                    command_id: command_id.to_owned(),
                    app: app.to_owned(),
                    version: payload.version,
                    content: payload.text.0,
                    sha256: payload.sha256,
                })
            }
        };
        ControllerMessage { kind: Some(kind) }
    }
}

/// A deployment to start.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The app.
    pub app: String,
    /// What to do.
    pub action: Action,
    /// Selected nodes (not empty), in rollout order.
    pub targets: Vec<Target>,
    /// API token or operator id asking.
    pub actor: String,
    /// Selector as given, for the record.
    pub selector: serde_json::Value,
    /// How the targets are taken through it.
    pub rollout: Rollout,
    /// DigitalOcean snapshots taken before it (a JSON array; empty when
    /// none), recorded on the deployment.
    pub snapshots: Vec<serde_json::Value>,
}

/// The plan version [`Plan::to_record`] writes.
const PLAN_RECORD_VERSION: u32 = 1;
/// Targets a recorded plan may name (a fleet is far smaller).
const MAX_RECORDED_TARGETS: usize = 100_000;
/// Longest string a recorded plan may hold (ids, names, URLs).
const MAX_RECORDED_TEXT: usize = 8_192;

/// A deployment's plan as recorded in `deployments.plan`, so another
/// replica can carry it on if the one running it dies (see
/// [`super::executor::take_over`]). An env delivery's `.env` texts are
/// never written there (they hold secrets): such a plan cannot be resumed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct PlanRecord {
    /// [`PLAN_RECORD_VERSION`].
    version: u32,
    app: String,
    action: ActionRecord,
    /// (node id, node name), in rollout order.
    targets: Vec<(String, String)>,
    actor: String,
    selector: serde_json::Value,
    rollout: RolloutRecord,
    snapshots: Vec<serde_json::Value>,
}

/// [`Action`] as recorded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum ActionRecord {
    Deploy {
        release_id: String,
        sha256: String,
        git_sha: String,
        artifact_url: String,
    },
    Rollback {
        to_release_id: String,
    },
    Restart,
    Stop,
    Start,
    Prune {
        keep: u32,
    },
    AgentUpgrade {
        sha256: String,
        size: u64,
        version: String,
        commit_deadline_secs: u32,
    },
    /// Its payloads are not recorded.
    Env {
        version: u64,
    },
}

/// [`Rollout`] as recorded.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct RolloutRecord {
    strategy: String,
    max_parallel: u32,
    max_unavailable: u32,
    canary: u32,
}

/// Why a recorded plan cannot be carried on.
#[derive(Debug, thiserror::Error)]
pub enum PlanRecordError {
    /// The column does not hold a plan this controller reads.
    #[error("its recorded plan is not readable: {0}")]
    Json(#[from] serde_json::Error),
    /// A plan version this controller does not know.
    #[error("its recorded plan has version {found}; this controller reads version {known}")]
    Version {
        /// In the record.
        found: u32,
        /// Known here.
        known: u32,
    },
    /// A value beyond the limits a plan can have.
    #[error("its recorded plan is out of bounds: {0}")]
    Limit(String),
    /// The action cannot be resumed from the record.
    #[error("a {0} deployment cannot be carried on by another replica: {1}")]
    NotResumable(&'static str, &'static str),
}

impl Plan {
    /// The plan as recorded on its deployment (see [`Self::from_record`]).
    pub fn to_record(&self) -> serde_json::Value {
        let action = match &self.action {
            Action::Deploy {
                release_id,
                sha256,
                git_sha,
                artifact_url,
            } => ActionRecord::Deploy {
                release_id: release_id.clone(),
                sha256: sha256.clone(),
                git_sha: git_sha.clone(),
                artifact_url: artifact_url.clone(),
            },
            Action::Rollback { to_release_id } => ActionRecord::Rollback {
                to_release_id: to_release_id.clone(),
            },
            Action::Restart => ActionRecord::Restart,
            Action::Stop => ActionRecord::Stop,
            Action::Start => ActionRecord::Start,
            Action::Prune { keep } => ActionRecord::Prune { keep: *keep },
            Action::AgentUpgrade {
                sha256,
                size,
                version,
                commit_deadline_secs,
            } => ActionRecord::AgentUpgrade {
                sha256: sha256.clone(),
                size: *size,
                version: version.clone(),
                commit_deadline_secs: *commit_deadline_secs,
            },
            Action::Env { version, .. } => ActionRecord::Env { version: *version },
        };
        let record = PlanRecord {
            version: PLAN_RECORD_VERSION,
            app: self.app.clone(),
            action,
            targets: self
                .targets
                .iter()
                .map(|t| (t.node_id.clone(), t.name.clone()))
                .collect(),
            actor: self.actor.clone(),
            selector: self.selector.clone(),
            rollout: RolloutRecord {
                strategy: self.rollout.strategy.name().to_owned(),
                max_parallel: self.rollout.max_parallel,
                max_unavailable: self.rollout.max_unavailable,
                canary: self.rollout.canary,
            },
            snapshots: self.snapshots.clone(),
        };
        serde_json::to_value(record).unwrap_or(serde_json::Value::Null)
    }

    /// The plan recorded as `text` (written by this or another replica:
    /// checked), or why it cannot be carried on.
    pub fn from_record(text: &str) -> Result<Self, PlanRecordError> {
        let record: PlanRecord = serde_json::from_str(text)?;
        if record.version != PLAN_RECORD_VERSION {
            return Err(PlanRecordError::Version {
                found: record.version,
                known: PLAN_RECORD_VERSION,
            });
        }
        let limit = |what: &str| PlanRecordError::Limit(what.to_owned());
        if record.targets.is_empty() || record.targets.len() > MAX_RECORDED_TARGETS {
            return Err(limit(&format!("{} targets", record.targets.len())));
        }
        let long = |s: &str| s.len() > MAX_RECORDED_TEXT;
        if long(&record.app)
            || long(&record.actor)
            || record
                .targets
                .iter()
                .any(|(id, name)| id.is_empty() || long(id) || long(name))
        {
            return Err(limit("an empty or too long app, actor or target"));
        }
        let strategy = match record.rollout.strategy.as_str() {
            "all_at_once" => Strategy::AllAtOnce,
            "rolling" => Strategy::Rolling,
            "canary" => Strategy::Canary,
            other => {
                return Err(limit(&format!(
                    "unknown strategy {}",
                    slipway_proto::limits::shown(other)
                )))
            }
        };
        if strategy == Strategy::Rolling && record.rollout.max_parallel == 0 {
            return Err(limit("a rolling rollout with batches of 0 nodes"));
        }
        let rollout = Rollout {
            strategy,
            max_parallel: record.rollout.max_parallel,
            max_unavailable: record.rollout.max_unavailable,
            canary: record.rollout.canary,
        };
        let action = match record.action {
            ActionRecord::Deploy {
                release_id,
                sha256,
                git_sha,
                artifact_url,
            } => {
                if [&release_id, &sha256, &git_sha, &artifact_url]
                    .iter()
                    .any(|s| long(s))
                {
                    return Err(limit("a too long release id, digest or URL"));
                }
                Action::Deploy {
                    release_id,
                    sha256,
                    git_sha,
                    artifact_url,
                }
            }
            ActionRecord::Rollback { to_release_id } if !long(&to_release_id) => {
                Action::Rollback { to_release_id }
            }
            ActionRecord::Rollback { .. } => return Err(limit("a too long release id")),
            ActionRecord::Restart => Action::Restart,
            ActionRecord::Stop => Action::Stop,
            ActionRecord::Start => Action::Start,
            ActionRecord::Prune { keep } => Action::Prune { keep },
            ActionRecord::AgentUpgrade {
                sha256,
                size,
                version,
                commit_deadline_secs,
            } => {
                if long(&sha256) || long(&version) {
                    return Err(limit("a too long digest or version"));
                }
                Action::AgentUpgrade {
                    sha256,
                    size,
                    version,
                    commit_deadline_secs,
                }
            }
            ActionRecord::Env { .. } => {
                return Err(PlanRecordError::NotResumable(
                    "env",
                    "its environment texts hold secrets and are not recorded with it",
                ))
            }
        };
        Ok(Self {
            app: record.app,
            action,
            targets: record
                .targets
                .into_iter()
                .map(|(node_id, name)| Target { node_id, name })
                .collect(),
            actor: record.actor,
            selector: record.selector,
            rollout,
            snapshots: record.snapshots,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_messages_carry_each_nodes_own_environment() {
        let action = Action::Env {
            version: 5,
            payloads: [
                ("n-a".to_owned(), EnvPayload::new(5, "A=\"1\"\n".to_owned())),
                ("n-b".to_owned(), EnvPayload::new(3, "A=\"2\"\n".to_owned())),
            ]
            .into(),
        };
        let sent = |node: &str| match action.message("d-1.x", "web", node).kind {
            Some(controller_message::Kind::SetEnv(e)) => e,
            other => panic!("not a SetEnv: {other:?}"),
        };
        let (a, b) = (sent("n-a"), sent("n-b"));
        assert_eq!((a.version, a.content.as_str()), (5, "A=\"1\"\n"));
        assert_eq!((b.version, b.content.as_str()), (3, "A=\"2\"\n"));
        assert_eq!(b.sha256, crate::pki::crypto::sha256_hex(b"A=\"2\"\n"));
        // No payload for a node: version 0, which every agent refuses.
        assert_eq!(sent("n-c").version, 0);
        // Plans are logged: sizes, never the text.
        assert!(!format!("{action:?}").contains("A=\\\"1"), "{action:?}");
    }

    #[test]
    fn deploy_message_carries_the_artifact_url() {
        let action = Action::Deploy {
            release_id: "v1".to_owned(),
            sha256: "ab".repeat(32),
            git_sha: String::new(),
            artifact_url: "https://example.com/web.tar.gz".to_owned(),
        };
        match action.message("d-1.n-a", "web", "n-a").kind {
            Some(controller_message::Kind::Deploy(d)) => {
                assert_eq!(d.artifact_url, "https://example.com/web.tar.gz");
                assert_eq!(d.artifact_sha256, "ab".repeat(32));
                assert_eq!(d.command_id, "d-1.n-a");
            }
            other => panic!("not a deploy: {other:?}"),
        }
    }

    fn plan(action: Action) -> Plan {
        Plan {
            app: "web".to_owned(),
            action,
            targets: vec![
                Target {
                    node_id: "n-1".to_owned(),
                    name: "web-1".to_owned(),
                },
                Target {
                    node_id: "n-2".to_owned(),
                    name: "web-2".to_owned(),
                },
            ],
            actor: "tok-1".to_owned(),
            selector: serde_json::json!({"labels": {"role": "web"}}),
            rollout: Rollout {
                strategy: Strategy::Rolling,
                max_parallel: 1,
                max_unavailable: 0,
                canary: 0,
            },
            snapshots: vec![serde_json::json!({"node": "n-1", "action_id": 7})],
        }
    }

    #[test]
    fn a_recorded_plan_reads_back_the_same() {
        for action in [
            Action::Deploy {
                release_id: "v1".to_owned(),
                sha256: "ab".repeat(32),
                git_sha: "c0ffee".to_owned(),
                artifact_url: "https://example.com/a.tar.gz".to_owned(),
            },
            Action::Rollback {
                to_release_id: "v0".to_owned(),
            },
            Action::Restart,
            Action::Stop,
            Action::Start,
            Action::Prune { keep: 3 },
            Action::AgentUpgrade {
                sha256: "cd".repeat(32),
                size: 123,
                version: "1.2.3".to_owned(),
                commit_deadline_secs: 60,
            },
        ] {
            let p = plan(action);
            let back = Plan::from_record(&p.to_record().to_string()).unwrap();
            assert_eq!(back.app, p.app);
            assert_eq!(back.action, p.action);
            assert_eq!(back.targets, p.targets);
            assert_eq!(back.actor, p.actor);
            assert_eq!(back.selector, p.selector);
            assert_eq!(back.rollout, p.rollout);
            assert_eq!(back.snapshots, p.snapshots);
        }
    }

    #[test]
    fn a_plan_that_cannot_be_carried_on_says_why() {
        let env = plan(Action::Env {
            version: 4,
            payloads: [(
                "n-1".to_owned(),
                EnvPayload::new(4, "SECRET=1\n".to_owned()),
            )]
            .into(),
        });
        let text = env.to_record().to_string();
        assert!(!text.contains("SECRET"), "{text}");
        let err = Plan::from_record(&text).unwrap_err();
        assert!(
            err.to_string()
                .contains("env deployment cannot be carried on"),
            "{err}"
        );
        let mut record = plan(Action::Restart).to_record();
        record["version"] = serde_json::json!(9);
        let err = Plan::from_record(&record.to_string()).unwrap_err();
        assert!(err.to_string().contains("version 9"), "{err}");
        let mut record = plan(Action::Restart).to_record();
        record["targets"] = serde_json::json!([]);
        assert!(matches!(
            Plan::from_record(&record.to_string()),
            Err(PlanRecordError::Limit(_))
        ));
        assert!(matches!(
            Plan::from_record("{\"version\":1"),
            Err(PlanRecordError::Json(_))
        ));
    }
}
