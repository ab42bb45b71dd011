//! Audit events in the seeds' `AUDIT_EVENTS` shape: who did what to which
//! resource, whether it worked, and why not. Written by [`crate::store`].

use serde_json::Value;

/// A join token was created (`slipway-controller token create`).
pub const TOKEN_CREATED: &str = "TOKEN_CREATED";
/// A node traded a join token and a CSR for its first certificate.
pub const NODE_ENROLLED: &str = "NODE_ENROLLED";
/// An enrollment was refused (bad, expired or reused token, bad CSR).
pub const NODE_ENROLL_REFUSED: &str = "NODE_ENROLL_REFUSED";
/// An AgentLink session was refused after the TLS handshake (no client
/// certificate, unknown or revoked certificate, Hello for another node).
pub const NODE_CONNECT_REFUSED: &str = "NODE_CONNECT_REFUSED";
/// A TLS handshake failed because the client certificate was not acceptable
/// (signed by another CA, expired, not yet valid...).
pub const CLIENT_CERT_REFUSED: &str = "CLIENT_CERT_REFUSED";

/// A node renewed its certificate over mTLS (the old one stays valid
/// until it expires).
pub const CERT_RENEWED: &str = "CERT_RENEWED";
/// A certificate renewal was refused (revoked node, bad CSR).
/// A backup of the data dir was written (by `backup` or on schedule).
pub const BACKUP_CREATED: &str = "BACKUP_CREATED";
/// A scheduled backup failed.
pub const BACKUP_FAILED: &str = "BACKUP_FAILED";
/// The controller renewed its own TLS server certificate.
pub const SERVER_CERT_RENEWED: &str = "SERVER_CERT_RENEWED";
/// `ca rotate start`: a new CA is trusted and signs client certificates.
pub const CA_ROTATION_STARTED: &str = "CA_ROTATION_STARTED";
/// `ca rotate finish`: the old CA is no longer trusted.
pub const CA_ROTATION_FINISHED: &str = "CA_ROTATION_FINISHED";
/// Renewing the controller's TLS server certificate failed (retried).
pub const SERVER_CERT_RENEW_FAILED: &str = "SERVER_CERT_RENEW_FAILED";
/// See [`CERT_RENEWED`].
pub const CERT_RENEW_REFUSED: &str = "CERT_RENEW_REFUSED";
/// An operator revoked a node (`node revoke`): its certificates are refused
/// and its stream closed.
pub const NODE_REVOKED: &str = "NODE_REVOKED";
/// A node enrolled with `--replace` under the name of a live node, which
/// was revoked in the same step (actor: the new node).
pub const NODE_REPLACED: &str = "NODE_REPLACED";

/// An agent's Hello reported a DigitalOcean droplet id another live node
/// already claims; it was not recorded (issue 14).
pub const DROPLET_CLAIM_REFUSED: &str = "DROPLET_CLAIM_REFUSED";

/// A message on an agent's session broke a field's rule or limit; the
/// session was ended (the error names the field).
pub const AGENT_MESSAGE_REFUSED: &str = "AGENT_MESSAGE_REFUSED";
/// An agent's FetchArtifact was refused (no or unknown certificate,
/// revoked node, unknown digest).
pub const ARTIFACT_FETCH_REFUSED: &str = "ARTIFACT_FETCH_REFUSED";

/// A deploy was recorded and its commands sent to the selected nodes.
pub const DEPLOY_STARTED: &str = "DEPLOY_STARTED";
/// Every node of a deploy succeeded.
pub const DEPLOY_COMPLETED: &str = "DEPLOY_COMPLETED";
/// At least one node of a deploy failed (details name them and why).
pub const DEPLOY_FAILED: &str = "DEPLOY_FAILED";
/// A running deployment (any kind) whose controller replica died was taken
/// over by another replica, which carries it on from its recorded state
/// (details name both replicas and the nodes already done).
pub const DEPLOY_TAKEN_OVER: &str = "DEPLOY_TAKEN_OVER";
/// A rollback was recorded and its commands sent.
pub const ROLLBACK_STARTED: &str = "ROLLBACK_STARTED";
/// Every node of a rollback succeeded.
pub const ROLLBACK_COMPLETED: &str = "ROLLBACK_COMPLETED";
/// At least one node of a rollback failed.
pub const ROLLBACK_FAILED: &str = "ROLLBACK_FAILED";
/// A restart was recorded and its commands sent.
pub const RESTART_STARTED: &str = "RESTART_STARTED";
/// Every node of a restart restarted its app and passed the health gate.
pub const RESTART_COMPLETED: &str = "RESTART_COMPLETED";
/// At least one node of a restart failed (details name them and why).
pub const RESTART_FAILED: &str = "RESTART_FAILED";
/// A stop on purpose was recorded and its commands sent (`slipway stop`).
pub const STOP_STARTED: &str = "STOP_STARTED";
/// Every node stopped the app and recorded the stop.
pub const STOP_COMPLETED: &str = "STOP_COMPLETED";
/// At least one node could not stop the app.
pub const STOP_FAILED: &str = "STOP_FAILED";
/// A start was recorded and its commands sent (`slipway start`).
pub const START_STARTED: &str = "START_STARTED";
/// Every node started the app and it passed the health gate.
pub const START_COMPLETED: &str = "START_COMPLETED";
/// At least one node could not start the app.
pub const START_FAILED: &str = "START_FAILED";
/// A node repaired an app by itself: started its current release again
/// after drift or liveness failures (actor: the node; details: the cause).
pub const APP_RESTORED: &str = "APP_RESTORED";
/// Someone deployed on a node with `slipway-agent deploy` (actor:
/// `node:user`; details: release, outcome). Reported by the node's agent at
/// once or when it next connects, recorded once.
pub const NODE_LOCAL_DEPLOY: &str = "NODE_LOCAL_DEPLOY";
/// Someone rolled back on a node with `slipway-agent rollback`, marking the
/// release rolled back from bad there (actor: `node:user`).
pub const NODE_LOCAL_ROLLBACK: &str = "NODE_LOCAL_ROLLBACK";
/// A node stopped restarting a crashlooping app.
pub const APP_CRASHLOOPING: &str = "APP_CRASHLOOPING";
/// A prune was recorded and its commands sent.
pub const PRUNE_STARTED: &str = "PRUNE_STARTED";
/// Every node of a prune removed its old releases.
pub const PRUNE_COMPLETED: &str = "PRUNE_COMPLETED";
/// At least one node of a prune failed (details name them and why).
pub const PRUNE_FAILED: &str = "PRUNE_FAILED";
/// An artifact was uploaded (or re-uploaded) through the controller API.
pub const ARTIFACT_UPLOADED: &str = "ARTIFACT_UPLOADED";
/// An agent binary was uploaded for agent upgrades.
pub const AGENT_BINARY_UPLOADED: &str = "AGENT_BINARY_UPLOADED";
/// A fleet agent upgrade started.
pub const AGENT_UPGRADE_STARTED: &str = "AGENT_UPGRADE_STARTED";
/// Every node of an agent upgrade came back on the new version.
pub const AGENT_UPGRADE_COMPLETED: &str = "AGENT_UPGRADE_COMPLETED";
/// A node of an agent upgrade failed or rolled back (or was skipped).
pub const AGENT_UPGRADE_FAILED: &str = "AGENT_UPGRADE_FAILED";
/// An API token was revoked (`slipway-controller token revoke`).
pub const TOKEN_REVOKED: &str = "TOKEN_REVOKED";
/// The controller took on deploying the current releases to a node that
/// joined from a droplet `droplets create` made (or failed to start one).
pub const JOIN_DEPLOY: &str = "JOIN_DEPLOY";
/// The DigitalOcean snapshots before a deploy (snapshot_before_deploy)
/// failed or timed out: the deploy was not started.
pub const DEPLOY_SNAPSHOT_FAILED: &str = "DEPLOY_SNAPSHOT_FAILED";
/// An operator client certificate was issued (`operator create`).
pub const OPERATOR_CREATED: &str = "OPERATOR_CREATED";
/// An operator client certificate was revoked (`operator revoke`).
pub const OPERATOR_REVOKED: &str = "OPERATOR_REVOKED";
/// A new version of an app's environment was stored (names and version
/// only, never values).
pub const ENV_CHANGED: &str = "ENV_CHANGED";
/// A value of an app's environment was read (`env get`; the name only).
pub const ENV_VALUE_READ: &str = "ENV_VALUE_READ";
/// An env change was delivered to the nodes (kind "env").
pub const ENV_DELIVERY_STARTED: &str = "ENV_DELIVERY_STARTED";
/// Every node took the env change.
pub const ENV_DELIVERY_COMPLETED: &str = "ENV_DELIVERY_COMPLETED";
/// A node did not take the env change (its gate failed: it went back).
pub const ENV_DELIVERY_FAILED: &str = "ENV_DELIVERY_FAILED";
/// A controller API call was refused: no, unknown or out-of-scope token,
/// or an upload whose bytes did not match the declared digest.
pub const API_CALL_REFUSED: &str = "API_CALL_REFUSED";
/// A GitHub Actions OIDC token was accepted: its claims and the scopes the
/// grants gave.
pub const OIDC_TOKEN_ACCEPTED: &str = "OIDC_TOKEN_ACCEPTED";
/// A GitHub Actions OIDC token was refused (bad signature, audience,
/// expiry, or no grant matched: the reason names the claim).
pub const OIDC_TOKEN_REFUSED: &str = "OIDC_TOKEN_REFUSED";

/// A GitHub deployment status (or the Deployment itself, or a commit
/// status) GitHub did not take before the deadline, or refused: dropped.
pub const GITHUB_UPDATE_GAVE_UP: &str = "GITHUB_UPDATE_GAVE_UP";
/// A webhook delivery refused: bad signature, too large, malformed.
pub const GITHUB_WEBHOOK_REFUSED: &str = "GITHUB_WEBHOOK_REFUSED";
/// A webhook delivery started a deployment (the delivery id, the event,
/// the artifact and its digest); or, with status error, could not.
pub const GITHUB_WEBHOOK_DEPLOY: &str = "GITHUB_WEBHOOK_DEPLOY";

/// `status` of an event that worked.
pub const STATUS_SUCCESS: &str = "success";
/// `status` of an event that was refused or failed (the seeds query this).
pub const STATUS_ERROR: &str = "error";

/// One audit event to record; `id` and `created_at` are set when stored.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    /// One of the constants in this module.
    pub event_type: &'static str,
    /// Who acted: "operator", a node id, or a peer address before we know more.
    pub actor: String,
    /// Kind of thing acted on: "node", "join_token", "connection".
    pub resource_type: &'static str,
    /// Which one (node id, token id, peer address).
    pub resource_id: String,
    /// Event-specific facts as a JSON object.
    pub details: Value,
    /// [`STATUS_SUCCESS`] or [`STATUS_ERROR`].
    pub status: &'static str,
    /// Why it failed, for `status = error`.
    pub error_message: Option<String>,
}

impl AuditEvent {
    /// A successful event.
    pub fn success(
        event_type: &'static str,
        actor: impl Into<String>,
        resource_type: &'static str,
        resource_id: impl Into<String>,
        details: Value,
    ) -> Self {
        Self {
            event_type,
            actor: actor.into(),
            resource_type,
            resource_id: resource_id.into(),
            details,
            status: STATUS_SUCCESS,
            error_message: None,
        }
    }

    /// A refused or failed event carrying the reason.
    pub fn error(
        event_type: &'static str,
        actor: impl Into<String>,
        resource_type: &'static str,
        resource_id: impl Into<String>,
        details: Value,
        error_message: impl Into<String>,
    ) -> Self {
        Self {
            status: STATUS_ERROR,
            error_message: Some(error_message.into()),
            ..Self::success(event_type, actor, resource_type, resource_id, details)
        }
    }
}

/// An audit event as stored, for `slipway audit` and tests.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditRecord {
    /// UUID v4.
    pub id: String,
    /// Seconds since the Unix epoch.
    pub created_at: i64,
    /// See [`AuditEvent::event_type`].
    pub event_type: String,
    /// See [`AuditEvent::actor`].
    pub actor: String,
    /// See [`AuditEvent::resource_type`].
    pub resource_type: String,
    /// See [`AuditEvent::resource_id`].
    pub resource_id: String,
    /// See [`AuditEvent::details`].
    pub details: Value,
    /// See [`AuditEvent::status`].
    pub status: String,
    /// See [`AuditEvent::error_message`].
    pub error_message: Option<String>,
}
