//! Every field a peer sends is checked by the controller: enrollment,
//! the agent link and the Control API answer a field over its limit or
//! outside its rule with INVALID_ARGUMENT naming the field (never an
//! internal error, a transport error or a panic), and the fleet views still
//! render afterwards. Fixed cases at, just under and over each limit, then a
//! property test with arbitrary strings and sizes in every field.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use crate::support::{authed, Controller, TEST_TIMEOUT};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use slipway_controller::auth::apitoken::Scope;
use slipway_controller::pki::crypto;
use slipway_controller::proto::client;
use slipway_controller::proto::limits;
use slipway_controller::proto::v1::enrollment_client::EnrollmentClient;
use slipway_controller::proto::v1::{
    agent_message, AppStatus, CommandResult, DeployRequest, DiskUsage, EnrollRequest,
    FetchArtifactRequest, FleetStatusRequest, Heartbeat, ListAuditRequest, ListNodesRequest,
    NodeMetrics, Progress, PruneRequest, ReleaseInfo, RestartRequest, RollbackRequest, Selector,
    StartRequest, StopRequest, UploadChunk, WatchDeploymentRequest,
};
use slipway_controller::proto::view;
use tonic::Code;

/// Codes that are a clear answer to a bad or unlucky request (OUT_OF_RANGE:
/// tonic's own "decoded message length too large", for a message over the
/// 4 MiB limit). Anything else (INTERNAL, UNKNOWN, RESOURCE_EXHAUSTED from
/// a header blown up by an echoed value, UNAVAILABLE from a crash) fails.
const CLEAR: [Code; 8] = [
    Code::OutOfRange,
    Code::InvalidArgument,
    Code::NotFound,
    Code::FailedPrecondition,
    Code::PermissionDenied,
    Code::AlreadyExists,
    Code::Unauthenticated,
    Code::Ok,
];

fn assert_clear<T: std::fmt::Debug>(what: &str, result: &Result<T, tonic::Status>) {
    if let Err(status) = result {
        if status.code() == Code::OutOfRange {
            assert!(status.message().contains("too large"), "{what}: {status:?}");
        }
        assert!(
            CLEAR.contains(&status.code()),
            "{what}: unclear answer {:?}: {}",
            status.code(),
            limits::shown(status.message())
        );
        // The message travels in a header: it must stay small.
        assert!(
            status.message().len() < 4096,
            "{what}: {} byte error message",
            status.message().len()
        );
    }
}

async fn enrollment(controller: &Controller) -> EnrollmentClient<tonic::transport::Channel> {
    let roots = client::load_ca(&controller.data_dir.path().join("ca.pem")).unwrap();
    EnrollmentClient::new(
        client::connect(&controller.addr.to_string(), roots)
            .await
            .unwrap(),
    )
}

fn csr(name: &str) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.serialize_request(&key).unwrap().pem().unwrap()
}

/// The fleet views render whatever is stored: nodes, status and audit.
async fn views_render(controller: &Controller, read: &str) {
    let mut control = controller.control().await;
    let nodes = control
        .list_nodes(authed(ListNodesRequest {}, read))
        .await
        .unwrap()
        .into_inner();
    let views = nodes.nodes;
    let table = view::render_table(&views);
    assert_eq!(table.lines().count(), views.len() + 1, "one line per node");
    let status = control
        .fleet_status(authed(FleetStatusRequest::default(), read))
        .await
        .unwrap()
        .into_inner();
    view::render_status(&status.status.unwrap());
    control
        .list_audit(authed(ListAuditRequest { since_unix: 0 }, read))
        .await
        .unwrap();
}

#[tokio::test]
async fn enrollment_fields_at_and_over_their_limits() {
    let controller = Controller::start().await;
    let mut enroll = enrollment(&controller).await;
    let request = |token: String, name: &str, labels: HashMap<String, String>| EnrollRequest {
        join_token: token,
        node_name: name.to_owned(),
        csr_pem: csr("n"),
        agent_version: "0.1.0".to_owned(),
        labels,
        replace: false,
    };
    let full = |value_len: usize, count: usize| -> HashMap<String, String> {
        (0..count)
            .map(|i| (format!("k{i}"), "v".repeat(value_len)))
            .collect()
    };

    // At the limits: accepted, and the table still renders one line a node.
    let name = "n".repeat(limits::MAX_NODE_NAME);
    enroll
        .enroll(request(
            controller.token().await,
            &name,
            full(limits::MAX_LABEL_VALUE, limits::MAX_LABELS),
        ))
        .await
        .unwrap();
    enroll
        .enroll(request(
            controller.token().await,
            "under",
            full(limits::MAX_LABEL_VALUE - 1, limits::MAX_LABELS - 1),
        ))
        .await
        .unwrap();

    // Over: refused naming the field and the limit; the token is not used.
    let cases: Vec<(EnrollRequest, &str)> = vec![
        (
            request(
                controller.token().await,
                &"n".repeat(limits::MAX_NODE_NAME + 1),
                HashMap::new(),
            ),
            "node_name: invalid node name",
        ),
        (
            request(
                controller.token().await,
                "big",
                full(limits::MAX_LABEL_VALUE + 1, 1),
            ),
            "labels[k0]: 256 bytes is over the limit of 255",
        ),
        (
            request(
                controller.token().await,
                "many",
                full(1, limits::MAX_LABELS + 1),
            ),
            "labels: 65 entries is over the limit of 64",
        ),
        (
            request(controller.token().await, "huge", full(65_536, 1)),
            "labels[k0]: 65536 bytes is over the limit of 255",
        ),
        (
            request(controller.token().await, "lots", full(100, 1000)),
            "labels: 1000 entries is over the limit of 64",
        ),
        (
            request(
                controller.token().await,
                "n1\nFAKE LOG LINE",
                HashMap::new(),
            ),
            r#"node_name: invalid node name "n1\nFAKE LOG LINE""#,
        ),
        (
            request(controller.token().await, "../../etc", HashMap::new()),
            "invalid node name",
        ),
        (
            request(controller.token().await, "<script>", HashMap::new()),
            "invalid node name",
        ),
        (
            request(controller.token().await, "a/b", HashMap::new()),
            "invalid node name",
        ),
    ];
    for (req, expected) in cases {
        let token = req.join_token.clone();
        let err = enroll.enroll(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{expected}: {err:?}");
        assert!(
            err.message().contains(expected),
            "{expected}: {}",
            err.message()
        );
        // The refused token still works for a good request.
        enroll
            .enroll(request(
                token,
                &format!("ok-{}", crypto::random_hex::<4>().unwrap()),
                HashMap::new(),
            ))
            .await
            .unwrap();
    }
    let read = controller.api_token(&[Scope::Read]).await;
    views_render(&controller, &read).await;
    controller.stop().await;
}

#[tokio::test]
async fn a_name_belongs_to_one_live_node_until_replaced() {
    let controller = Controller::start().await;
    let (first_state, first) = controller.enroll("n1").await;
    let state = tempfile::tempdir().unwrap();
    let err = controller
        .try_enroll(&controller.token().await, state.path(), "n1")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("AlreadyExists"), "{text}");
    assert!(
        text.contains(&format!("node name n1 is taken by node {first}")),
        "{text}"
    );
    assert!(text.contains("--replace"), "{text}");

    let replaced = controller
        .try_enroll_with(&controller.token().await, state.path(), "n1", true)
        .await
        .unwrap();
    // The same node, re-keyed: its id stays, nothing is revoked.
    assert_eq!(replaced.node_id, first);
    let audit = controller.audit().await;
    assert!(crate::support::audited(&audit, "NODE_REPLACED", |e| {
        e.resource_id == first && e.actor == first
    }));
    // The selector finds the one live node of that name, whose only
    // certificate is the new one.
    let store = controller.store().await;
    let found = store.find_node("n1").await.unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].id, first);
    assert!(found[0].revoked_at.is_none());
    assert_eq!(store.live_node_certs().await.unwrap().len(), 1);
    // The old key opens no session any more; the new one does.
    let err = controller
        .try_connect(first_state.path(), "")
        .await
        .unwrap_err();
    assert!(
        matches!(err, slipway_agent::link::LinkError::SessionRefused(_)),
        "{err}"
    );
    controller.try_connect(state.path(), "").await.unwrap();
    controller.stop().await;
}

#[tokio::test]
async fn control_api_fields_over_their_limits_are_named() {
    let controller = Controller::start().await;
    let token = controller
        .api_token(&[Scope::Read, Scope::Deploy("web".to_owned())])
        .await;
    let mut control = controller.control().await;
    let sha = "a".repeat(64);
    let deploy = |f: &dyn Fn(&mut DeployRequest)| {
        let mut req = DeployRequest {
            app: "web".to_owned(),
            sha256: sha.clone(),
            ..Default::default()
        };
        f(&mut req);
        req
    };
    let cases = [
        (
            deploy(&|r| r.release_id = "v".repeat(100_000)),
            "release_id: invalid release id",
        ),
        (
            deploy(&|r| r.release_id = "v".repeat(129)),
            "release_id: invalid release id",
        ),
        (deploy(&|r| r.git_sha = "a".repeat(1_000_000)), "git_sha: "),
        (
            deploy(&|r| r.git_sha = "zz".to_owned()),
            r#"git_sha: "zz" is not a git commit id"#,
        ),
        (
            deploy(&|r| r.app = "a\nb".to_owned()),
            r#"app: invalid app name "a\nb""#,
        ),
        (
            deploy(&|r| {
                r.selector = Some(Selector {
                    target: Some(slipway_controller::proto::v1::selector::Target::Node(
                        "../etc".to_owned(),
                    )),
                })
            }),
            "selector.node: invalid node name",
        ),
        (
            deploy(&|r| {
                r.selector = Some(Selector {
                    target: Some(slipway_controller::proto::v1::selector::Target::Tag(
                        "env:a b".to_owned(),
                    )),
                })
            }),
            "selector.tag: label value",
        ),
        (
            deploy(&|r| r.artifact_url = format!("https://x/{}", "a".repeat(5000))),
            "artifact_url",
        ),
    ];
    for (req, expected) in cases {
        let err = control.deploy(authed(req, &token)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{expected}: {err:?}");
        assert!(
            err.message().starts_with(expected),
            "{expected}: {}",
            err.message()
        );
        assert!(err.message().len() < 400, "{}", err.message());
    }
    // At the limits the fields pass (the deploy then finds no artifact).
    let err = control
        .deploy(authed(
            deploy(&|r| {
                r.release_id = "v".repeat(128);
                r.git_sha = "a".repeat(64);
            }),
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("is not on the controller"),
        "{err:?}"
    );
    // A deployment to follow: its id checked, then looked up.
    let watch = |id: String| WatchDeploymentRequest { deployment_id: id };
    for bad in ["d".repeat(1_000_000), "d-../../etc/pass".to_owned()] {
        let err = control
            .watch_deployment(authed(watch(bad), &token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(
            err.message().starts_with("deployment_id: deployment id ")
                && err.message().ends_with("is not d- and 16 hex digits"),
            "{}",
            err.message()
        );
        assert!(err.message().len() < 400, "{}", err.message());
    }
    let err = control
        .watch_deployment(authed(watch("d-0123456789abcdef".to_owned()), &token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert_eq!(err.message(), "no deployment d-0123456789abcdef");
    controller.stop().await;
}

#[tokio::test]
async fn an_agent_message_over_a_limit_ends_its_session_naming_the_field() {
    let controller = Controller::start().await;
    let (state, node_id) = controller.enroll("web-1").await;
    let mut session = controller.connect(state.path(), &node_id).await;
    // Just under the limits: stored.
    let app = |health: String| AppStatus {
        app: "web".to_owned(),
        health,
        releases: vec![ReleaseInfo {
            id: "v1".to_owned(),
            status: "active".to_owned(),
            ..Default::default()
        }],
        ..Default::default()
    };
    crate::support::send(
        &session,
        agent_message::Kind::Heartbeat(Heartbeat {
            apps: vec![app("h".repeat(limits::MAX_HEALTH))],
            ..Default::default()
        }),
    )
    .await;
    crate::support::send(
        &session,
        agent_message::Kind::Heartbeat(Heartbeat {
            apps: vec![app("h".repeat(limits::MAX_HEALTH + 1))],
            ..Default::default()
        }),
    )
    .await;
    let ended = tokio::time::timeout(TEST_TIMEOUT, session.inbound.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(ended.code(), Code::InvalidArgument, "{ended:?}");
    assert!(
        ended
            .message()
            .contains("heartbeat.apps[0].health: 4097 bytes is over the limit of 4096"),
        "{ended:?}"
    );
    let event = controller.wait_for_event("AGENT_MESSAGE_REFUSED").await;
    assert_eq!(event.actor, node_id);
    // The first heartbeat was stored; the refused one was not.
    let fleet = controller.store().await.fleet().await.unwrap();
    let health = fleet[0].apps[0].health.clone();
    assert_eq!(health.len(), limits::MAX_HEALTH);
    controller.stop().await;
}

#[tokio::test]
async fn a_public_address_claim_is_checked_stored_and_a_forged_one_refused() {
    use slipway_controller::proto::v1::PublicAddress;
    let controller = Controller::start().await;
    let (state, node_id) = controller.enroll("web-1").await;
    let mut session = controller.connect(state.path(), &node_id).await;
    let forwarding = "kernel-forwarded for local clients (nftables table ip slipway_front_0123456789ab); clients from other machines through the front";
    let app = |address: &str, backend: &str| AppStatus {
        app: "web".to_owned(),
        current_release: "v1".to_owned(),
        public: Some(PublicAddress {
            address: address.to_owned(),
            mode: "agent_proxy".to_owned(),
            release: "v1".to_owned(),
            backend: backend.to_owned(),
            draining: 0,
            forwarding: forwarding.to_owned(),
        }),
        ..Default::default()
    };
    crate::support::send(
        &session,
        agent_message::Kind::Heartbeat(Heartbeat {
            apps: vec![app("0.0.0.0:3000", "127.0.0.1:8081")],
            ..Default::default()
        }),
    )
    .await;
    // A backend off the node's loopback: not what the agent's front does.
    crate::support::send(
        &session,
        agent_message::Kind::Heartbeat(Heartbeat {
            apps: vec![app("0.0.0.0:3000", "10.0.0.9:80")],
            ..Default::default()
        }),
    )
    .await;
    let ended = tokio::time::timeout(TEST_TIMEOUT, session.inbound.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(ended.code(), Code::InvalidArgument, "{ended:?}");
    assert!(
        ended.message().contains(
            "heartbeat.apps[0].public.backend: \"10.0.0.9:80\" is not a loopback address and port"
        ),
        "{ended:?}"
    );
    controller.wait_for_event("AGENT_MESSAGE_REFUSED").await;
    // The first claim was stored as sent; the refused one was not.
    let fleet = controller.store().await.fleet().await.unwrap();
    let public = fleet[0].apps[0].public.clone().unwrap();
    assert_eq!(
        (
            public.address.as_str(),
            public.mode.as_str(),
            public.release.as_str(),
            public.backend.as_str()
        ),
        ("0.0.0.0:3000", "agent_proxy", "v1", "127.0.0.1:8081")
    );
    assert_eq!(public.forwarding, forwarding);
    controller.stop().await;
}

#[tokio::test]
async fn node_events_are_acknowledged_recorded_once_and_checked() {
    use slipway_controller::proto::v1::{controller_message, NodeEvent, NodeEventKind};
    let controller = Controller::start().await;
    let (state, node_id) = controller.enroll("web-1").await;
    let mut session = controller.connect(state.path(), &node_id).await;
    let event = |cause: String| NodeEvent {
        event_id: "web.1.0".to_owned(),
        kind: NodeEventKind::AppRestored as i32,
        app: "web".to_owned(),
        release_id: "v1".to_owned(),
        cause,
        outcome: "repaired".to_owned(),
        ok: true,
        ..Default::default()
    };
    // Sent twice (as after a reconnect before the acknowledgement): both
    // acknowledged, recorded once.
    for _ in 0..2 {
        crate::support::send(
            &session,
            agent_message::Kind::NodeEvent(event("gone".into())),
        )
        .await;
        let ack = tokio::time::timeout(TEST_TIMEOUT, session.inbound.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match ack.kind {
            Some(controller_message::Kind::NodeEventAck(a)) => {
                assert_eq!(a.event_ids, ["web.1.0"]);
            }
            other => panic!("expected an acknowledgement, got {other:?}"),
        }
    }
    let recorded: Vec<_> = controller
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event_type == "APP_RESTORED")
        .collect();
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0].actor, node_id);
    assert_eq!(recorded[0].resource_id, "web");
    assert_eq!(recorded[0].details["cause"], "gone");
    assert_eq!(recorded[0].details["node_name"], "web-1");
    // Over a limit: the session ends naming the field.
    crate::support::send(
        &session,
        agent_message::Kind::NodeEvent(event("c".repeat(limits::MAX_MESSAGE + 1))),
    )
    .await;
    let ended = tokio::time::timeout(TEST_TIMEOUT, session.inbound.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(ended.code(), Code::InvalidArgument, "{ended:?}");
    assert!(ended.message().contains("node_event.cause"), "{ended:?}");
    controller.stop().await;
}

// --- property test ----------------------------------------------------------

/// Strings of every kind: short printable, valid names, control characters,
/// unicode, and sizes up to past every limit.
fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("web".to_owned()),
        "[a-z0-9][a-z0-9._-]{0,20}",
        ".{0,40}",
        "[\\x00-\\x1f\\x7f]{0,8}",
        "\\PC{0,16}",
        (0usize..300_000).prop_map(|n| "x".repeat(n)),
        Just(String::new()),
    ]
}

#[derive(Debug, Clone)]
struct Fields {
    a: String,
    b: String,
    c: String,
    n: usize,
}

fn fields() -> impl Strategy<Value = Fields> {
    (any_text(), any_text(), any_text(), 0usize..2_000).prop_map(|(a, b, c, n)| Fields {
        a,
        b,
        c,
        n,
    })
}

/// One of every request the controller accepts, built from `f`, sent; each
/// answer must be clear.
async fn throw(
    controller: &Controller,
    token: &str,
    node: &(tempfile::TempDir, String),
    f: &Fields,
) {
    let mut control = controller.control().await;
    let selector = |s: &str, tag: bool| {
        Some(Selector {
            target: Some(if tag {
                slipway_controller::proto::v1::selector::Target::Tag(s.to_owned())
            } else {
                slipway_controller::proto::v1::selector::Target::Node(s.to_owned())
            }),
        })
    };
    let answer = control
        .deploy(authed(
            DeployRequest {
                app: f.a.clone(),
                sha256: f.b.clone(),
                release_id: f.c.clone(),
                selector: selector(&f.b, f.n.is_multiple_of(2)),
                git_sha: f.c.clone(),
                artifact_url: f.b.clone(),
                rollout: None,
            },
            token,
        ))
        .await;
    assert_clear("deploy", &answer);
    let answer = control
        .rollback(authed(
            RollbackRequest {
                app: f.a.clone(),
                to_release_id: f.b.clone(),
                selector: selector(&f.c, f.n.is_multiple_of(3)),
                rollout: None,
            },
            token,
        ))
        .await;
    assert_clear("rollback", &answer);
    let answer = control
        .restart(authed(
            RestartRequest {
                app: f.b.clone(),
                selector: selector(&f.a, false),
                rollout: None,
            },
            token,
        ))
        .await;
    assert_clear("restart", &answer);
    let answer = control
        .stop(authed(
            StopRequest {
                app: f.a.clone(),
                selector: selector(&f.b, false),
            },
            token,
        ))
        .await;
    assert_clear("stop", &answer);
    let answer = control
        .start(authed(
            StartRequest {
                app: f.c.clone(),
                selector: selector(&f.a, true),
            },
            token,
        ))
        .await;
    assert_clear("start", &answer);
    let answer = control
        .prune(authed(
            PruneRequest {
                app: f.c.clone(),
                keep: u32::try_from(f.n).unwrap(),
                selector: selector(&f.a, true),
            },
            token,
        ))
        .await;
    assert_clear("prune", &answer);
    let answer = control
        .fleet_status(authed(
            FleetStatusRequest {
                app: f.a.clone(),
                refresh: false,
            },
            token,
        ))
        .await;
    assert_clear("fleet status", &answer);
    let answer = control
        .watch_deployment(authed(
            WatchDeploymentRequest {
                deployment_id: f.a.clone(),
            },
            token,
        ))
        .await;
    assert_clear("watch deployment", &answer);
    let chunk = UploadChunk {
        sha256: f.a.clone(),
        data: f.b.clone().into_bytes(),
        size: f.n as u64,
    };
    let answer = control
        .upload_artifact(authed(tokio_stream::iter(vec![chunk]), token))
        .await;
    assert_clear("upload", &answer);

    let mut enroll = enrollment(controller).await;
    let labels: HashMap<String, String> = (0..f.n % 100)
        .map(|i| (format!("{}{i}", limits::truncate(&f.b, 80)), f.c.clone()))
        .collect();
    let answer = enroll
        .enroll(EnrollRequest {
            join_token: if f.n.is_multiple_of(4) {
                f.c.clone()
            } else {
                controller.token().await
            },
            node_name: f.a.clone(),
            csr_pem: if f.n.is_multiple_of(5) {
                f.b.clone()
            } else {
                csr("n")
            },
            agent_version: f.c.clone(),
            labels,
            replace: f.n.is_multiple_of(2),
        })
        .await;
    assert_clear("enroll", &answer);

    let mut link = controller.agent_link(node.0.path()).await;
    let answer = link
        .fetch_artifact(FetchArtifactRequest {
            sha256: f.a.clone(),
            command_id: f.b.clone(),
            agent_binary: false,
        })
        .await;
    assert_clear("fetch artifact", &answer);

    // The agent link: a session, one arbitrary message, then whatever the
    // controller says must be clear (the session may end, INVALID_ARGUMENT).
    let mut session = controller.connect(node.0.path(), &node.1).await;
    let kind = match f.n % 3 {
        0 => agent_message::Kind::Heartbeat(Heartbeat {
            unix_time: i64::try_from(f.n).unwrap(),
            metrics: Some(NodeMetrics {
                cpu_percent: f.n as f64 / 7.0,
                disks: (0..f.n % 300)
                    .map(|_| DiskUsage {
                        mount: f.a.clone(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            apps: vec![AppStatus {
                app: f.a.clone(),
                current_release: f.b.clone(),
                health: f.c.clone(),
                releases: (0..f.n % 50)
                    .map(|_| ReleaseInfo {
                        id: f.b.clone(),
                        status: f.c.clone(),
                        ..Default::default()
                    })
                    .collect(),
                in_progress: false,
                env_version: f.n as u64,
                public: None,
            }],
            agent_version: f.c.clone(),
            agent_rss_bytes: f.n as u64,
        }),
        1 => agent_message::Kind::Progress(Progress {
            command_id: f.a.clone(),
            step: f.b.clone(),
            message: f.c.clone(),
            unix_time: 0,
        }),
        _ => agent_message::Kind::Result(CommandResult {
            command_id: f.a.clone(),
            outcome: i32::try_from(f.n % 7).unwrap(),
            release_id: f.b.clone(),
            message: f.c.clone(),
        }),
    };
    crate::support::send(&session, kind).await;
    match tokio::time::timeout(Duration::from_millis(300), session.inbound.message()).await {
        Err(_) | Ok(Ok(_)) => {}
        Ok(Err(status)) => assert_clear("agent message", &Err::<(), _>(status)),
    }
}

#[test]
fn arbitrary_fields_get_a_clear_answer_and_the_views_still_render() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (controller, token, node) = runtime.block_on(async {
        let controller = Controller::start().await;
        let token = controller
            .api_token(&[Scope::Read, Scope::Deploy("web".to_owned())])
            .await;
        let node = controller.enroll("target").await;
        (controller, token, node)
    });
    // Bounded: a fixed number of cases, each a handful of calls.
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 48,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&fields(), |f| {
            runtime.block_on(async {
                tokio::time::timeout(
                    Duration::from_secs(60),
                    throw(&controller, &token, &node, &f),
                )
                .await
                .expect("no answer within 60 s");
            });
            Ok(())
        })
        .unwrap();
    runtime.block_on(async {
        views_render(&controller, &token).await;
        controller.stop().await;
    });
}
