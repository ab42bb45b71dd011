//! A CA rotation seen by the running controller: `ca rotate` changes the
//! CA files of the data dir (see [`crate::pki::rotation`]); this watches
//! them, makes the TLS listener trust what they say from the next
//! handshake on, reissues the server certificate when the signing CA
//! changed (`finish`), and sends every connected agent the trust bundle
//! over its session (authenticated by the CA it already trusts). No
//! session is dropped: connections already made keep their handshake.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use slipway_proto::v1::{controller_message, ControllerMessage, TrustBundle};
use tokio_util::sync::CancellationToken;

use super::registry::Sessions;
use crate::audit::{self, AuditEvent};
use crate::pki::ca::Ca;
use crate::pki::tls::{ClientTrust, ServerCert};
use crate::store::Store;

/// How often the CA files are looked at: the longest a rotation step waits
/// before the running controller acts on it.
pub const ROTATION_POLL: Duration = Duration::from_secs(2);

/// What following a rotation while serving needs.
#[derive(Debug)]
pub struct RotationWatch {
    /// The data dir.
    pub data_dir: PathBuf,
    /// The CA the services sign with (reloaded here).
    pub ca: Arc<Ca>,
    /// The listener's client certificate trust.
    pub trust: ClientTrust,
    /// The listener's server certificate.
    pub server: ServerCert,
    /// Names of the server certificate.
    pub hosts: Vec<String>,
    /// Its lifetime.
    pub validity: Duration,
    /// The live sessions the bundle goes to.
    pub sessions: Sessions,
    /// For the audit log.
    pub store: Store,
}

impl RotationWatch {
    /// Follows the CA files until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        // Nodes that have the current bundle (sent on this run).
        let mut sent: HashSet<String> = HashSet::new();
        // Bundles go out during a rotation, and after one finished on this
        // run; otherwise agents already hold what they were enrolled with.
        let mut finished_here = false;
        let mut tick = tokio::time::interval(ROTATION_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let before = self.ca.fingerprint();
            match self.ca.reload(&self.data_dir) {
                Ok(false) => {}
                Ok(true) => {
                    sent.clear();
                    finished_here = true;
                    if self.ca.next_fingerprint().is_some() {
                        let (dir, now) = (self.data_dir.clone(), crate::now_unix());
                        let marked = tokio::task::spawn_blocking(move || {
                            crate::pki::rotation::mark_signing(&dir, now)
                        })
                        .await;
                        if !matches!(marked, Ok(Ok(()))) {
                            tracing::warn!("cannot record when the new CA began signing");
                        }
                    }
                    self.changed(&before).await;
                }
                Err(err) => {
                    tracing::warn!(%err, "cannot read the CA files (a rotation step half done?)");
                    continue;
                }
            }
            let rotation = crate::pki::rotation::current(&self.data_dir).ok().flatten();
            if rotation.is_none() && !finished_here {
                continue;
            }
            let renew_now = rotation.is_some_and(|r| r.renew_now);
            let bundle = TrustBundle {
                ca_pem: self.ca.cert_pem(),
                renew_now,
                signing_ca_sha256: self
                    .ca
                    .next_fingerprint()
                    .unwrap_or_else(|| self.ca.fingerprint()),
            };
            for node in self.sessions.node_ids() {
                if sent.contains(&node) {
                    continue;
                }
                let message = ControllerMessage {
                    kind: Some(controller_message::Kind::TrustBundle(bundle.clone())),
                };
                if self.sessions.send(&node, message).await {
                    sent.insert(node);
                }
            }
            // Forget nodes without a session: a new one gets the bundle.
            let live: HashSet<String> = self.sessions.node_ids().into_iter().collect();
            sent.retain(|n| live.contains(n));
        }
    }

    /// The CA files changed: trust what they say, and move the server
    /// certificate when its CA changed (`before` was its fingerprint).
    async fn changed(&self, before: &str) {
        if let Err(err) = self.trust.set(&self.ca.trusted()) {
            tracing::error!(%err, "cannot trust the CA bundle");
            return;
        }
        tracing::info!(
            trusted = self.ca.trusted().len(),
            signing = %self.ca.next_fingerprint().unwrap_or_else(|| self.ca.fingerprint()),
            "the CA bundle changed (CA rotation); trusting it from the next handshake"
        );
        if self.ca.fingerprint() == before {
            return;
        }
        let (ca, dir, hosts, validity) = (
            self.ca.clone(),
            self.data_dir.clone(),
            self.hosts.clone(),
            self.validity,
        );
        let issued =
            tokio::task::spawn_blocking(move || ca.issue_server(&dir, &hosts, validity)).await;
        let event = match issued {
            Ok(Ok(identity)) => match self.server.set(&identity) {
                Ok(()) => {
                    tracing::info!(ca_sha256 = %self.ca.fingerprint(), "the server certificate moved to the new CA");
                    AuditEvent::success(
                        audit::SERVER_CERT_RENEWED,
                        "controller",
                        "server_certificate",
                        self.hosts.join(" "),
                        serde_json::json!({
                            "reason": "CA rotation finished",
                            "ca_sha256": self.ca.fingerprint(),
                            "not_after": crate::rfc3339(identity.not_after),
                        }),
                    )
                }
                Err(err) => self.failed(err.to_string()),
            },
            Ok(Err(err)) => self.failed(err.to_string()),
            Err(err) => self.failed(err.to_string()),
        };
        if let Err(err) = self.store.audit(&event, crate::now_unix()).await {
            tracing::error!(%err, "could not record audit event");
        }
    }

    fn failed(&self, message: String) -> AuditEvent {
        tracing::error!(%message, "cannot move the server certificate to the new CA");
        AuditEvent::error(
            audit::SERVER_CERT_RENEW_FAILED,
            "controller",
            "server_certificate",
            self.hosts.join(" "),
            serde_json::json!({ "reason": "CA rotation finished" }),
            message,
        )
    }
}
