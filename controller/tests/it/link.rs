//! Enrollment, agent sessions, heartbeats, certificate renewal and
//! revocation over real TLS: a controller on 127.0.0.1:0, the agent side
//! from node-agent/src/link.rs, certificates made in the test.

// Tests unwrap freely: a panic with its message is the failure report.
#![allow(clippy::unwrap_used)]

// The agent side of the link, as the agent binary uses it.
use crate::support::{Controller, TEST_TIMEOUT};
use slipway_agent::link;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use slipway_controller::fleet;
use slipway_controller::link::liveness::NodeState;
use slipway_controller::pki::ca::Ca;
use slipway_controller::pki::crypto;
use slipway_controller::proto::v1::agent_link_client::AgentLinkClient;
use slipway_controller::proto::v1::{
    agent_message, AgentMessage, AppStatus, Heartbeat, Hello, NodeMetrics, RenewRequest,
};
use slipway_controller::server::{self};
use tempfile::TempDir;
use time::OffsetDateTime;
use tokio::net::TcpStream;
use tonic::transport::{Endpoint, Uri};

/// Writes an agent state dir holding a key and a certificate for it issued
/// by `issuer` with the given validity, plus the controller's real CA.
fn forged_state(
    controller: &Controller,
    issuer: &Ca,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> TempDir {
    let state = tempfile::tempdir().unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let cert = issuer
        .sign_node_csr_between(&csr, "n-forged", not_before, not_after)
        .unwrap();
    let dir = state.path();
    std::fs::write(dir.join(link::KEY_FILE), key.serialize_pem()).unwrap();
    std::fs::write(dir.join(link::CERT_FILE), cert.pem).unwrap();
    std::fs::write(dir.join(link::CA_FILE), controller.ca.cert_pem()).unwrap();
    std::fs::write(dir.join(link::NODE_ID_FILE), "n-forged").unwrap();
    state
}

#[tokio::test]
async fn enrollment_then_mtls_session() {
    let controller = Controller::start().await;
    let state = tempfile::tempdir().unwrap();
    let token = controller.token().await;

    let enrolled = controller
        .try_enroll(&token, state.path(), "web-1")
        .await
        .unwrap();
    assert!(enrolled.node_id.starts_with("n-"), "{}", enrolled.node_id);
    let week = 7 * 24 * 3600;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    assert!((enrolled.expires_at_unix - now - week).abs() < 60);
    use std::os::unix::fs::PermissionsExt as _;
    let key_mode = std::fs::metadata(state.path().join(link::KEY_FILE))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);

    let mut session = controller.try_connect(state.path(), "").await.unwrap();
    assert_eq!(session.welcome.node_id, enrolled.node_id);
    assert_eq!(session.welcome.heartbeat_interval_secs, 5);

    // The node is recorded (found by its certificate) and was seen just now.
    use rustls::pki_types::pem::PemObject as _;
    let cert_pem = std::fs::read(state.path().join(link::CERT_FILE)).unwrap();
    let cert = CertificateDer::from_pem_slice(&cert_pem).unwrap();
    let node = controller
        .store()
        .await
        .node_by_fingerprint(&crypto::sha256_hex(&cert))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(node.id, enrolled.node_id);
    assert_eq!(node.name, "web-1");
    assert!(node.last_seen_at.unwrap() >= now);

    let events = controller.audit().await;
    let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["TOKEN_CREATED", "NODE_ENROLLED"]);
    let enrolled_event = &events[1];
    assert_eq!(enrolled_event.status, "success");
    assert_eq!(enrolled_event.resource_id, enrolled.node_id);
    assert_eq!(enrolled_event.details["labels"]["env"], "production");

    // Closing our side ends the session cleanly.
    drop(session.outbound);
    assert!(session.inbound.message().await.unwrap().is_none());
    controller.stop().await;
}

#[tokio::test]
async fn agent_link_without_client_cert_is_refused() {
    let controller = Controller::start().await;
    // TLS that trusts the controller but presents no client certificate,
    // as an enrolling node does.
    let mut roots = RootCertStore::empty();
    roots.add(controller.ca.cert_der().clone()).unwrap();
    let mut config = ClientConfig::builder_with_provider(crypto::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
    let addr = controller.addr;
    let connector = tower::service_fn(move |_: Uri| {
        let tls = tls.clone();
        async move {
            let tcp = TcpStream::connect(addr).await?;
            let name = ServerName::try_from("127.0.0.1").unwrap();
            Ok::<_, std::io::Error>(TokioIo::new(tls.connect(name, tcp).await?))
        }
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(connector)
        .await
        .unwrap();
    let hello = AgentMessage {
        kind: Some(agent_message::Kind::Hello(Hello {
            node_id: "n-anyone".to_owned(),
            ..Hello::default()
        })),
    };
    let status = AgentLinkClient::new(channel)
        .connect(tokio_stream::iter(vec![hello]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(
        status.message().contains("client certificate"),
        "{status:?}"
    );

    let event = controller.wait_for_event("NODE_CONNECT_REFUSED").await;
    assert_eq!(event.status, "error");
    assert!(event.error_message.unwrap().contains("client certificate"),);
    controller.stop().await;
}

#[tokio::test]
async fn cert_from_another_ca_is_refused() {
    let controller = Controller::start().await;
    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = Ca::load_or_create(other_dir.path()).unwrap();
    let now = OffsetDateTime::now_utc();
    let state = forged_state(
        &controller,
        &other_ca,
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    );

    let err = controller.try_connect(state.path(), "").await.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(
            err,
            link::LinkError::Connect { .. } | link::LinkError::SessionRefused(_)
        ),
        "{text}"
    );

    let event = controller.wait_for_event("CLIENT_CERT_REFUSED").await;
    assert_eq!(event.status, "error");
    let reason = event.error_message.unwrap();
    // UnknownIssuer (named, as the certificate claims); BadSignature if
    // the other CA happened to share our name.
    assert!(
        reason.contains("(claiming to be n-forged) is not from a CA this controller trusts")
            || reason.contains("BadSignature"),
        "{reason}"
    );
    controller.stop().await;
}

#[tokio::test]
async fn expired_cert_is_refused() {
    let controller = Controller::start().await;
    let now = OffsetDateTime::now_utc();
    let state = forged_state(
        &controller,
        &controller.ca,
        now - time::Duration::days(8),
        now - time::Duration::days(1),
    );

    let err = controller.try_connect(state.path(), "").await.unwrap_err();
    assert!(
        matches!(
            err,
            link::LinkError::Connect { .. } | link::LinkError::SessionRefused(_)
        ),
        "{err}"
    );

    let event = controller.wait_for_event("CLIENT_CERT_REFUSED").await;
    // Named, with how long ago (no node has that id: the message is the
    // certificate's own).
    let reason = event.error_message.unwrap();
    assert!(
        reason.starts_with("client certificate of n-forged expired 1 day ago"),
        "{reason}"
    );
    controller.stop().await;
}

#[tokio::test]
async fn expired_join_token_is_refused() {
    let controller = Controller::start().await;
    // Made two hours ago with a one-hour TTL.
    let token = controller.token_at(-2 * 3600).await;
    let state = tempfile::tempdir().unwrap();

    let err = controller
        .try_enroll(&token, state.path(), "web-1")
        .await
        .unwrap_err();
    assert!(matches!(err, link::LinkError::EnrollRefused(_)), "{err}");
    assert!(err.to_string().contains("expired"), "{err}");
    assert!(!state.path().join(link::CERT_FILE).exists());

    let event = controller.wait_for_event("NODE_ENROLL_REFUSED").await;
    assert_eq!(event.status, "error");
    assert!(event.error_message.unwrap().contains("expired"));
    controller.stop().await;
}

#[tokio::test]
async fn reused_join_token_is_refused() {
    let controller = Controller::start().await;
    let token = controller.token().await;
    let first = tempfile::tempdir().unwrap();
    controller
        .try_enroll(&token, first.path(), "web-1")
        .await
        .unwrap();

    let second = tempfile::tempdir().unwrap();
    let err = controller
        .try_enroll(&token, second.path(), "web-1")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already used"), "{err}");

    let event = controller.wait_for_event("NODE_ENROLL_REFUSED").await;
    assert!(event.error_message.unwrap().contains("already used"));
    assert_eq!(
        controller
            .audit()
            .await
            .iter()
            .filter(|e| e.event_type == "NODE_ENROLLED")
            .count(),
        1
    );
    controller.stop().await;
}

#[tokio::test]
async fn token_pinning_another_ca_is_refused_by_the_agent() {
    let controller = Controller::start().await;
    let token = controller.token().await;
    // Same token, but pinning some other CA: as if the agent were talking to
    // an impostor controller.
    let (head, _pin) = token.rsplit_once('.').unwrap();
    let wrong = format!("{head}.{}", "ab".repeat(32));
    let state = tempfile::tempdir().unwrap();

    let err = controller
        .try_enroll(&wrong, state.path(), "web-1")
        .await
        .unwrap_err();
    assert!(matches!(err, link::LinkError::Connect { .. }), "{err}");
    assert!(
        err.to_string().contains("pinned in the join token"),
        "{err}"
    );

    // The agent stopped before sending the secret: the controller saw no
    // enrollment attempt, and the real token still works.
    assert!(controller
        .audit()
        .await
        .iter()
        .all(|e| e.event_type == "TOKEN_CREATED"));
    controller
        .try_enroll(&token, state.path(), "web-1")
        .await
        .unwrap();
    controller.stop().await;
}

#[tokio::test]
async fn hello_for_another_node_is_refused() {
    let controller = Controller::start().await;
    let (a, _) = controller.enroll("web-1").await;
    let (_b, node_b) = controller.enroll("web-2").await;

    // Node A's certificate, claiming to be node B.
    let err = controller.try_connect(a.path(), &node_b).await.unwrap_err();
    assert!(matches!(err, link::LinkError::SessionRefused(_)), "{err}");
    assert!(err.to_string().contains("PermissionDenied"), "{err}");
    assert!(err.to_string().contains(&node_b), "{err}");

    let event = controller.wait_for_event("NODE_CONNECT_REFUSED").await;
    assert!(event.error_message.unwrap().contains("claims node"));
    assert_ne!(event.actor, node_b);
    controller.stop().await;
}

/// Calls Renew with the identity in `state`; on success returns the new
/// key and certificate PEMs.
async fn renew(
    controller: &Controller,
    state: &Path,
) -> Result<(String, String, i64), tonic::Status> {
    let cert = std::fs::read_to_string(state.join(link::CERT_FILE)).unwrap();
    let key = std::fs::read_to_string(state.join(link::KEY_FILE)).unwrap();
    let channel = controller
        .mtls_channel(cert.as_bytes(), key.as_bytes())
        .await;
    let new_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr_pem = CertificateParams::default()
        .serialize_request(&new_key)
        .unwrap()
        .pem()
        .unwrap();
    let response = tokio::time::timeout(
        TEST_TIMEOUT,
        AgentLinkClient::new(channel).renew(RenewRequest { csr_pem }),
    )
    .await
    .unwrap()?
    .into_inner();
    Ok((
        new_key.serialize_pem(),
        response.cert_pem,
        response.expires_at_unix,
    ))
}

/// The fleet view of one node, as `slipway-controller nodes` shows it.
async fn node_view(controller: &Controller, node_id: &str) -> fleet::NodeView {
    let now = OffsetDateTime::now_utc().unix_timestamp();
    fleet::nodes(&controller.store().await, now)
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.id == node_id)
        .unwrap()
}

#[tokio::test]
async fn heartbeat_is_stored_and_shown_in_nodes() {
    let controller = Controller::start().await;
    let (state, node_id) = controller.enroll("web-1").await;
    // The store-only view reads a Hello in the controller start's own
    // second as heard by an earlier controller (whole-second clock); only
    // the controller's own views, which know its sessions, call it online.
    // So the Hello comes in a later second.
    let started_at = controller
        .store()
        .await
        .controller_start()
        .await
        .unwrap()
        .unwrap()
        .started_at;
    while OffsetDateTime::now_utc().unix_timestamp() <= started_at {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut session = controller.try_connect(state.path(), "").await.unwrap();
    let now = OffsetDateTime::now_utc().unix_timestamp();
    // Renewal is due two thirds into the week-long certificate.
    let due = session.welcome.renew_cert_after_unix - now;
    assert!((due - 7 * 24 * 3600 * 2 / 3).abs() < 60, "{due}");

    // Before any heartbeat: online (the Hello counts), no heartbeat yet.
    let before = node_view(&controller, &node_id).await;
    assert_eq!(before.state, NodeState::Online);
    assert_eq!(before.heartbeat_age_secs, None);

    let heartbeat = Heartbeat {
        unix_time: now,
        metrics: Some(NodeMetrics {
            cpu_percent: 42.0,
            mem_used_bytes: 512 * 1024 * 1024,
            mem_total_bytes: 2 * 1024 * 1024 * 1024,
            load1: 0.5,
            load5: 0.25,
            load15: 0.125,
            disks: Vec::new(),
        }),
        apps: vec![AppStatus {
            app: "web".to_owned(),
            current_release: "r-abc123".to_owned(),
            health: "healthy".to_owned(),
            ..AppStatus::default()
        }],
        agent_version: "9.9.9".to_owned(),
        agent_rss_bytes: 24 * 1024 * 1024,
    };
    session
        .outbound
        .send(AgentMessage {
            kind: Some(agent_message::Kind::Heartbeat(heartbeat)),
        })
        .await
        .unwrap();

    let deadline = tokio::time::Instant::now() + TEST_TIMEOUT;
    let view = loop {
        let view = node_view(&controller, &node_id).await;
        if view.heartbeat_age_secs.is_some() {
            break view;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "heartbeat not stored"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(view.state, NodeState::Online);
    assert_eq!(view.agent_version, "9.9.9");
    assert_eq!(view.agent_rss_bytes, Some(24 * 1024 * 1024));
    let metrics = view.metrics.clone().unwrap();
    assert!((metrics.cpu_percent - 42.0).abs() < f64::EPSILON);
    assert_eq!(metrics.mem_total_bytes, 2 * 1024 * 1024 * 1024);
    assert_eq!(view.apps.len(), 1);
    assert_eq!(view.apps[0].current_release, "r-abc123");
    assert_eq!(view.apps[0].health, "healthy");
    assert_eq!(view.labels["env"], "production");

    let wire = slipway_controller::proto::v1::NodeView::from(&view);
    let table = slipway_controller::proto::view::render_table(std::slice::from_ref(&wire));
    for expected in [
        node_id.as_str(),
        "web-1",
        "env=production",
        "online",
        "9.9.9",
        "24.0M",
        "42%",
        "512.0M/2.0G",
        "web@r-abc123 (healthy)",
    ] {
        assert!(
            table.contains(expected),
            "{expected:?} missing from\n{table}"
        );
    }
    let json = slipway_controller::proto::view::nodes_json(&[wire]).unwrap();
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json[0]["state"], "online");
    assert_eq!(json[0]["agent_rss_bytes"], 24 * 1024 * 1024);

    drop(session.outbound);
    assert!(session.inbound.message().await.unwrap().is_none());
    controller.stop().await;
}

#[tokio::test]
async fn renewed_cert_works_and_the_old_one_still_does() {
    let controller = Controller::start().await;
    let (old, node_id) = controller.enroll("web-1").await;

    let (key_pem, cert_pem, expires_at) = renew(&controller, old.path()).await.unwrap();
    let now = OffsetDateTime::now_utc().unix_timestamp();
    assert!((expires_at - now - 7 * 24 * 3600).abs() < 60);

    // A state dir holding only the new key and certificate.
    let new = tempfile::tempdir().unwrap();
    for file in [link::CA_FILE, link::NODE_ID_FILE] {
        std::fs::copy(old.path().join(file), new.path().join(file)).unwrap();
    }
    std::fs::write(new.path().join(link::KEY_FILE), &key_pem).unwrap();
    std::fs::write(new.path().join(link::CERT_FILE), &cert_pem).unwrap();

    let with_new = controller.try_connect(new.path(), "").await.unwrap();
    assert_eq!(with_new.welcome.node_id, node_id);
    // The old certificate keeps working until it expires (the agent may
    // not have switched yet); its session replaces the newer one.
    let with_old = controller.try_connect(old.path(), "").await.unwrap();
    assert_eq!(with_old.welcome.node_id, node_id);

    // The store's newest certificate is the renewed one.
    use rustls::pki_types::pem::PemObject as _;
    let new_der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap();
    let node = controller
        .store()
        .await
        .node_by_fingerprint(&crypto::sha256_hex(&new_der))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(node.cert_fingerprint, crypto::sha256_hex(&new_der));

    let event = controller.wait_for_event("CERT_RENEWED").await;
    assert_eq!(event.status, "success");
    assert_eq!(event.resource_id, node_id);
    assert_eq!(event.actor, node_id);
    assert_eq!(event.details["cert_expires_at"], expires_at);

    // Renewing with the new certificate works too.
    renew(&controller, new.path()).await.unwrap();
    drop(with_new);
    drop(with_old);
    controller.stop().await;
}

#[tokio::test]
async fn renew_needs_a_client_certificate_of_a_known_node() {
    let controller = Controller::start().await;
    // Signed by our CA but never enrolled: no node owns it.
    let now = OffsetDateTime::now_utc();
    let state = forged_state(
        &controller,
        &controller.ca,
        now - time::Duration::hours(1),
        now + time::Duration::days(1),
    );
    let status = renew(&controller, state.path()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unauthenticated, "{status:?}");
    let event = controller.wait_for_event("CERT_RENEW_REFUSED").await;
    assert!(event.error_message.unwrap().contains("no enrolled node"));
    controller.stop().await;
}

#[tokio::test]
async fn revoke_closes_the_live_stream_and_refuses_the_next_connection() {
    let controller = Controller::start().await;
    let (state, node_id) = controller.enroll("web-1").await;
    let mut session = controller.try_connect(state.path(), "").await.unwrap();

    // As `slipway-controller node revoke` does, from "another process"
    // (a separate connection pool on the same database file).
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let revoked_at = tokio::time::Instant::now();
    let revoked = fleet::revoke(&controller.store().await, "web-1", "operator", now)
        .await
        .unwrap();
    assert_eq!(revoked.node_id, node_id);
    assert!(revoked.newly);

    // The agent sends nothing: the server's poll must close the stream.
    let limit = server::REVOCATION_POLL + Duration::from_secs(2);
    let ended = tokio::time::timeout(limit, session.inbound.message())
        .await
        .expect("the revoked node's stream stayed open");
    let status = ended.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("revoked"), "{status:?}");
    assert!(revoked_at.elapsed() <= limit);

    let err = controller.try_connect(state.path(), "").await.unwrap_err();
    assert!(matches!(err, link::LinkError::SessionRefused(_)), "{err}");
    assert!(err.to_string().contains("revoked"), "{err}");
    let status = renew(&controller, state.path()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");

    let events = controller.audit().await;
    let revoke_event = events
        .iter()
        .find(|e| e.event_type == "NODE_REVOKED")
        .unwrap();
    assert_eq!(revoke_event.resource_id, node_id);
    assert_eq!(revoke_event.actor, "operator");
    let refused = controller.wait_for_event("NODE_CONNECT_REFUSED").await;
    assert!(refused.error_message.unwrap().contains("revoked"));
    controller.wait_for_event("CERT_RENEW_REFUSED").await;

    assert_eq!(
        node_view(&controller, &node_id).await.state,
        NodeState::Revoked
    );
    // Revoking again changes nothing and records nothing.
    let again = fleet::revoke(&controller.store().await, &node_id, "operator", now)
        .await
        .unwrap();
    assert!(!again.newly);
    assert_eq!(
        controller
            .audit()
            .await
            .iter()
            .filter(|e| e.event_type == "NODE_REVOKED")
            .count(),
        1
    );
    drop(session.outbound);
    controller.stop().await;
}

#[tokio::test]
async fn a_heartbeat_from_a_revoked_node_closes_its_stream_at_once() {
    let controller = Controller::start().await;
    let (state, _) = controller.enroll("web-1").await;
    let mut session = controller.try_connect(state.path(), "").await.unwrap();
    let now = OffsetDateTime::now_utc().unix_timestamp();
    fleet::revoke(&controller.store().await, "web-1", "operator", now)
        .await
        .unwrap();
    session
        .outbound
        .send(AgentMessage {
            kind: Some(agent_message::Kind::Heartbeat(Heartbeat::default())),
        })
        .await
        .unwrap();
    let status = tokio::time::timeout(TEST_TIMEOUT, session.inbound.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    controller.stop().await;
}

#[tokio::test]
async fn stopping_the_controller_ends_live_sessions() {
    let controller = Controller::start().await;
    let (state, _) = controller.enroll("web-1").await;
    let mut session = controller.try_connect(state.path(), "").await.unwrap();
    // Would hang if graceful shutdown waited for the open stream.
    controller.stop().await;
    let ended = tokio::time::timeout(TEST_TIMEOUT, session.inbound.message())
        .await
        .unwrap();
    match ended {
        Ok(None) => {}
        Ok(Some(message)) => panic!("unexpected {message:?}"),
        Err(status) => assert!(
            matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown
            ),
            "{status:?}"
        ),
    }
}

#[tokio::test]
async fn the_agent_renews_in_place_and_reconnects_with_the_new_certificate() {
    let controller = Controller::start().await;
    let state = tempfile::tempdir().unwrap();
    let token = controller.token().await;
    controller
        .try_enroll(&token, state.path(), "web-1")
        .await
        .unwrap();
    let old_cert = std::fs::read_to_string(state.path().join(link::CERT_FILE)).unwrap();
    let old_key = std::fs::read_to_string(state.path().join(link::KEY_FILE)).unwrap();

    // An open session is not disturbed by the renewal.
    let session = controller.try_connect(state.path(), "").await.unwrap();
    let beat = || AgentMessage {
        kind: Some(agent_message::Kind::Heartbeat(Heartbeat::default())),
    };
    let expiry = tokio::time::timeout(TEST_TIMEOUT, link::renew(&controller.url(), state.path()))
        .await
        .unwrap()
        .unwrap();
    let week = 7 * 24 * 3600;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    assert!((expiry - now - week).abs() < 60);
    let new_cert = std::fs::read_to_string(state.path().join(link::CERT_FILE)).unwrap();
    let new_key = std::fs::read_to_string(state.path().join(link::KEY_FILE)).unwrap();
    assert_ne!(old_cert, new_cert);
    assert_ne!(old_key, new_key, "a new key pair is made for the renewal");
    assert!(session.outbound.send(beat()).await.is_ok());

    // The next connection uses the new pair; the previous one is kept
    // aside (a reader that resolved the identity link just before the
    // switch still finds its files), nothing older.
    controller.try_connect(state.path(), "").await.unwrap();
    let previous = state.path().join("identity-1");
    assert_eq!(
        std::fs::read_to_string(previous.join(link::CERT_FILE)).unwrap(),
        old_cert
    );
    assert_eq!(
        std::fs::read_link(state.path().join(slipway_agent::identity::LINK)).unwrap(),
        Path::new("identity-2")
    );
    let events = controller.store().await.audit_events().await.unwrap();
    assert!(
        events.iter().any(|e| e.event_type == "CERT_RENEWED"),
        "{events:?}"
    );
    controller.stop().await;
}
