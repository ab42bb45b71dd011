//! A CA rotation seen by the running controller: `ca rotate` changes the
//! CA files of the data dir (see [`crate::pki::rotation`]); this watches
//! them, makes the TLS listener trust what they say from the next
//! handshake on, reissues the server certificate when the signing CA
//! changed (`finish`), and sends every connected agent the trust bundle
//! over its session (authenticated by the CA it already trusts). No
//! session is dropped: connections already made keep their handshake.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// How often a connected node that still lags on the old CA during a
/// `start --now` rotation is sent the bundle again.
pub const LAG_RESEND: Duration = Duration::from_secs(10);

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
        // What each connected node was last sent, and when. A node gets the
        // bundle again when it changes (the files moved on, `renew_now`
        // appeared) and, while it still lags on the old CA, every
        // [`LAG_RESEND`]: a bundle lost with a session that was closing,
        // or a renewal that failed, is not the end of it.
        let mut sent: HashMap<String, (TrustBundle, Instant)> = HashMap::new();
        // Bundles go out during a rotation, and after one finished on this
        // run; otherwise agents already hold what they were enrolled with.
        let mut finished_here = false;
        // When this run began signing with a new CA (its files appeared),
        // until the rotation's state records it.
        let mut signing_began: Option<i64> = None;
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
                    finished_here = true;
                    signing_began = self
                        .ca
                        .next_fingerprint()
                        .map(|_| signing_began.unwrap_or_else(crate::now_unix));
                    self.changed(&before).await;
                }
                Err(err) => {
                    tracing::warn!(%err, "cannot read the CA files (a rotation step half done?)");
                    continue;
                }
            }
            let rotation = crate::pki::rotation::current(&self.data_dir).ok().flatten();
            if self.ca.next_fingerprint().is_some() && rotation.is_none() {
                // `start` writes its state file last: a new CA without it
                // is a start half written. Its bundle would go out without
                // `renew_now`; wait for the state.
                continue;
            }
            if let (Some(r), Some(at)) = (&rotation, signing_began) {
                if r.signing_since.is_none() {
                    let dir = self.data_dir.clone();
                    let marked = tokio::task::spawn_blocking(move || {
                        crate::pki::rotation::mark_signing(&dir, at)
                    })
                    .await;
                    if matches!(marked, Ok(Ok(()))) {
                        signing_began = None;
                    } else {
                        tracing::warn!("cannot record when the new CA began signing (retrying)");
                    }
                } else {
                    signing_began = None;
                }
            }
            if rotation.is_none() && !finished_here {
                continue;
            }
            let renew_now = rotation.as_ref().is_some_and(|r| r.renew_now);
            let bundle = TrustBundle {
                ca_pem: self.ca.cert_pem(),
                renew_now,
                signing_ca_sha256: self
                    .ca
                    .next_fingerprint()
                    .unwrap_or_else(|| self.ca.fingerprint()),
            };
            let lagging: HashSet<String> = match &rotation {
                Some(r) if r.renew_now => {
                    match crate::fleet::certs::node_ids_on_old_ca(&self.store, r).await {
                        Ok(ids) => ids.into_iter().collect(),
                        Err(err) => {
                            tracing::warn!(%err, "cannot tell which nodes lag on the old CA");
                            HashSet::new()
                        }
                    }
                }
                _ => HashSet::new(),
            };
            let live = self.sessions.node_ids();
            for node in &live {
                let due = match sent.get(node) {
                    None => true,
                    Some((last, at)) => {
                        *last != bundle || (lagging.contains(node) && at.elapsed() >= LAG_RESEND)
                    }
                };
                if !due {
                    continue;
                }
                let message = ControllerMessage {
                    kind: Some(controller_message::Kind::TrustBundle(bundle.clone())),
                };
                if self.sessions.send(node, message).await {
                    sent.insert(node.clone(), (bundle.clone(), Instant::now()));
                }
            }
            // Forget nodes without a session: a new one gets the bundle.
            let live: HashSet<String> = live.into_iter().collect();
            sent.retain(|n, _| live.contains(n));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::rotation::ROTATION_FILE;
    use tokio::sync::mpsc;

    crate::store::testing::store_tests!(a_start_read_half_written_still_asks_every_node_to_renew);

    /// `start` writes the new CA's files first and its state file last: a
    /// watch that reads the files in between must not send the bundle
    /// without `renew_now` and then consider the node served.
    async fn a_start_read_half_written_still_asks_every_node_to_renew(store: Store) {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(Ca::load_or_create(dir.path()).unwrap());
        let hosts = vec!["localhost".to_owned()];
        let validity = Duration::from_secs(3600);
        let identity = ca.server_identity(dir.path(), &hosts, validity).unwrap();
        let server = ServerCert::new(&identity).unwrap();
        let (_, trust) = crate::pki::tls::server_config_with_trust(&ca, server.clone()).unwrap();
        let sessions = Sessions::new();
        let handle = sessions.register("n1");
        let (tx, mut rx) = mpsc::channel(8);
        handle.accept_commands(tx);

        // The new CA's files are there, its state file not yet.
        crate::pki::rotation::start(dir.path(), true, crate::now_unix()).unwrap();
        let state = dir.path().join(ROTATION_FILE);
        let written = std::fs::read(&state).unwrap();
        std::fs::remove_file(&state).unwrap();

        let stop = CancellationToken::new();
        let watch = RotationWatch {
            data_dir: dir.path().to_owned(),
            ca: ca.clone(),
            trust,
            server,
            hosts,
            validity,
            sessions: sessions.clone(),
            store,
        };
        let task = tokio::spawn(watch.run(stop.clone()));
        // The watch reads the new files (it trusts the new CA)…
        let waited = std::time::Instant::now();
        while ca.next_fingerprint().is_none() {
            assert!(
                waited.elapsed() < Duration::from_secs(20),
                "the watch never read the CA files"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(ROTATION_POLL).await;
        // …and sends nothing while the start is half written.
        assert!(
            rx.try_recv().is_err(),
            "a bundle went out before the state file"
        );
        // The state lands: the bundle asks for the renewal.
        std::fs::write(&state, written).unwrap();
        let message = tokio::time::timeout(ROTATION_POLL * 5, rx.recv())
            .await
            .expect("no bundle within five polls")
            .unwrap()
            .unwrap();
        let Some(controller_message::Kind::TrustBundle(bundle)) = message.kind else {
            panic!("not a trust bundle: {message:?}");
        };
        assert!(bundle.renew_now, "{bundle:?}");
        assert_eq!(Some(bundle.signing_ca_sha256), ca.next_fingerprint());
        // When this controller began signing with it is recorded.
        let recorded = crate::pki::rotation::current(dir.path()).unwrap().unwrap();
        assert!(recorded.signing_since.is_some(), "{recorded:?}");
        stop.cancel();
        task.await.unwrap();
        drop(handle);
    }
}
