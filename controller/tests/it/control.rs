//! The Control API (what the `slipway` CLI calls) and artifact transfer,
//! over real TLS: API-token scopes, uploads, FetchArtifact, and a deploy
//! driven through agent sessions that answer like the agent does.

// Tests unwrap freely: a panic with its message is the failure report.
#![allow(clippy::unwrap_used)]

// The agent side of the link, as the agent binary uses it.
use crate::support::{
    audited, authed, collect, finished_of, next_command, node_results, on_node, send, send_result,
    Controller, TEST_TIMEOUT,
};
use slipway_agent::link;

use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use slipway_controller::audit::AuditRecord;
use slipway_controller::auth::apitoken::{self, Scope};
use slipway_controller::pki::crypto;
use slipway_controller::proto::client;
use slipway_controller::proto::v1::agent_link_client::AgentLinkClient;
use slipway_controller::proto::v1::control_client::ControlClient;
use slipway_controller::proto::v1::{
    agent_message, controller_message, deploy_event, selector, AgentMessage, DeployRequest,
    FetchArtifactRequest, Hello, ListAuditRequest, ListNodesRequest, Outcome, Progress, Selector,
    UploadChunk,
};
use tokio::net::TcpStream;
use tonic::transport::Channel;
use tonic::Code;

/// Uploads `data` declaring `sha256`, in small pieces.
async fn upload(
    control: &mut ControlClient<Channel>,
    token: &str,
    sha256: &str,
    data: &[u8],
) -> Result<slipway_controller::proto::v1::UploadArtifactResponse, tonic::Status> {
    upload_as(control, token, sha256, data, false).await
}

/// [`upload`], as an app artifact or (`agent_binary`) an agent binary.
async fn upload_as(
    control: &mut ControlClient<Channel>,
    token: &str,
    sha256: &str,
    data: &[u8],
    agent_binary: bool,
) -> Result<slipway_controller::proto::v1::UploadArtifactResponse, tonic::Status> {
    let mut chunks: Vec<UploadChunk> = data
        .chunks(100_000)
        .map(|d| UploadChunk {
            data: d.to_vec(),
            ..Default::default()
        })
        .collect();
    if chunks.is_empty() {
        chunks.push(UploadChunk::default());
    }
    chunks[0].sha256 = sha256.to_owned();
    chunks[0].size = data.len() as u64;
    let request = authed(tokio_stream::iter(chunks), token);
    if agent_binary {
        control.upload_agent_binary(request).await
    } else {
        control.upload_artifact(request).await
    }
    .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn agent_binaries_are_kept_apart_from_app_artifacts_and_need_their_scope() {
    let controller = Controller::start().await;
    let deploy = controller.deploy_token("web").await;
    let upgrade = controller.api_token(&[Scope::AgentUpgrade]).await;
    let mut control = controller.control().await;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let sha = crypto::sha256_hex(&data);

    // Each kind of upload needs its own scope.
    let err = upload_as(&mut control, &deploy, &sha, &data, true)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = upload_as(&mut control, &upgrade, &sha, &data, false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let done = upload_as(&mut control, &upgrade, &sha, &data, true)
        .await
        .unwrap();
    assert!(!done.already_present);
    assert!(controller
        .data_dir
        .path()
        .join("agent-binaries")
        .join(&sha)
        .is_file());

    // An app deploy cannot name it; an agent fetches it only as an agent
    // binary.
    let err = control
        .deploy(authed(deploy_request("web", &sha, None), &deploy))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let (state, _node_id) = controller.enroll("web-1").await;
    let mut agent = controller.agent_link(state.path()).await;
    let err = agent
        .fetch_artifact(FetchArtifactRequest {
            sha256: sha.clone(),
            command_id: "c-1".to_owned(),
            agent_binary: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let mut stream = agent
        .fetch_artifact(FetchArtifactRequest {
            sha256: sha.clone(),
            command_id: "c-2".to_owned(),
            agent_binary: true,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        got.extend_from_slice(&chunk.data);
    }
    assert_eq!(got, data);

    // An upgrade naming an unknown binary, or out of bounds, is refused.
    let unknown = slipway_controller::proto::v1::AgentUpgradeRequest {
        sha256: crypto::sha256_hex(b"never uploaded"),
        ..Default::default()
    };
    let err = control
        .agent_upgrade(authed(unknown, &upgrade))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    let too_short = slipway_controller::proto::v1::AgentUpgradeRequest {
        sha256: sha.clone(),
        commit_deadline_secs: 1,
        ..Default::default()
    };
    let err = control
        .agent_upgrade(authed(too_short, &upgrade))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("commit_deadline_secs"), "{err:?}");
    let err = control
        .agent_upgrade(authed(
            slipway_controller::proto::v1::AgentUpgradeRequest {
                sha256: sha.clone(),
                ..Default::default()
            },
            &deploy,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    controller.stop().await;
}

fn deploy_request(app: &str, sha256: &str, node: Option<&str>) -> DeployRequest {
    DeployRequest {
        app: app.to_owned(),
        sha256: sha256.to_owned(),
        release_id: String::new(),
        selector: node.and_then(on_node),
        git_sha: String::new(),
        ..DeployRequest::default()
    }
}

#[tokio::test]
async fn token_scopes_are_enforced_and_refusals_audited() {
    let controller = Controller::start().await;
    let read = controller.api_token(&[Scope::Read]).await;
    let web = controller.deploy_token("web").await;
    let mut control = controller.control().await;
    let data = b"artifact bytes".to_vec();
    let sha = crypto::sha256_hex(&data);

    // No token, or a forged one: UNAUTHENTICATED.
    let err = control.list_nodes(ListNodesRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    // Change the secret's last character (to one it is not: a token ending
    // in '0' must not be "forged" into itself).
    let last = if read.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &read[..read.len() - 1]);
    let err = control
        .list_nodes(authed(ListNodesRequest {}, &forged))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");

    // A read token reads, but cannot upload or deploy.
    let nodes = control
        .list_nodes(authed(ListNodesRequest {}, &read))
        .await
        .unwrap()
        .into_inner();
    assert!(nodes.nodes.is_empty(), "{:?}", nodes.nodes);
    let err = upload(&mut control, &read, &sha, &data).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let err = control
        .deploy(authed(deploy_request("web", &sha, None), &read))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");

    // deploy:web may upload and deploy web, not api.
    upload(&mut control, &web, &sha, &data).await.unwrap();
    let err = control
        .deploy(authed(deploy_request("api", &sha, None), &web))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("deploy app api"), "{err:?}");
    // For web it gets past the scope check (and fails for lack of nodes).
    let err = control
        .deploy(authed(deploy_request("web", &sha, None), &web))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let refused: Vec<AuditRecord> = controller
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event_type == "API_CALL_REFUSED")
        .collect();
    assert_eq!(refused.len(), 5, "{refused:#?}");
    assert!(refused.iter().all(|e| e.status == "error"));
    let web_id = apitoken::token_id(&web).unwrap();
    let api_refusal = refused.iter().find(|e| e.actor == web_id).unwrap();
    assert_eq!(api_refusal.resource_id, "deploy app api");
    // The claimed token id is the actor (the forged token claims the read
    // token's id: 1 + upload + deploy); no secret is stored.
    let read_id = apitoken::token_id(&read).unwrap();
    assert_eq!(refused.iter().filter(|e| e.actor == read_id).count(), 3);
    let all = serde_json::to_string(
        &controller
            .audit()
            .await
            .iter()
            .map(|e| e.details.clone())
            .collect::<Vec<_>>(),
    )
    .unwrap();
    assert!(!all.contains(read.rsplit('.').next().unwrap()));

    let audit = control
        .list_audit(authed(ListAuditRequest { since_unix: 0 }, &read))
        .await
        .unwrap()
        .into_inner();
    assert!(audit.events.iter().any(|e| e.event_type == "TOKEN_CREATED"));
    controller.stop().await;
}

#[tokio::test]
async fn upload_with_the_wrong_digest_is_refused_and_reupload_is_cheap() {
    let controller = Controller::start().await;
    let token = controller.deploy_token("web").await;
    let mut control = controller.control().await;
    let data: Vec<u8> = (0..700_000u32).map(|i| (i % 253) as u8).collect();
    let sha = crypto::sha256_hex(&data);

    let wrong = crypto::sha256_hex(b"something else");
    let err = upload(&mut control, &token, &wrong, &data)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("mismatch"), "{err:?}");
    let artifacts = controller.data_dir.path().join("artifacts");
    assert_eq!(std::fs::read_dir(&artifacts).unwrap().count(), 0);
    assert!(controller
        .audit()
        .await
        .iter()
        .any(|e| e.event_type == "API_CALL_REFUSED" && e.resource_id == "upload artifact"));

    let first = upload(&mut control, &token, &sha, &data).await.unwrap();
    assert_eq!((first.size, first.already_present), (700_000, false));
    assert_eq!(std::fs::read(artifacts.join(&sha)).unwrap(), data);
    // Again: answered from the store, bytes not needed.
    let again = upload(&mut control, &token, &sha, &data).await.unwrap();
    assert_eq!((again.size, again.already_present), (700_000, true));
    // A client whose file has another size does not hold that artifact,
    // whatever digest it names: refused, not "already present".
    let other = upload(&mut control, &token, &sha, &data[..10])
        .await
        .unwrap_err();
    assert_eq!(other.code(), Code::InvalidArgument, "{other:?}");
    assert!(
        other
            .message()
            .contains("declares 10 bytes: the file given is not the artifact of that digest"),
        "{other:?}"
    );
    controller.stop().await;
}

#[tokio::test]
async fn fetch_artifact_streams_known_digests_to_enrolled_nodes_only() {
    let controller = Controller::start().await;
    let token = controller.deploy_token("web").await;
    let mut control = controller.control().await;
    let data: Vec<u8> = (0..600_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let sha = crypto::sha256_hex(&data);
    upload(&mut control, &token, &sha, &data).await.unwrap();
    let (state, _node_id) = controller.enroll("web-1").await;
    let mut agent = controller.agent_link(state.path()).await;

    let mut stream = agent
        .fetch_artifact(FetchArtifactRequest {
            sha256: sha.clone(),
            command_id: "c-1".to_owned(),
            agent_binary: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let mut chunks = 0;
    let mut saw_last = false;
    while let Some(chunk) = stream.message().await.unwrap() {
        assert!(!saw_last, "chunk after the last one");
        assert_eq!(chunk.offset, got.len() as u64);
        assert_eq!(chunk.command_id, "c-1");
        assert!(chunk.data.len() <= 256 * 1024);
        got.extend_from_slice(&chunk.data);
        saw_last = chunk.last;
        chunks += 1;
    }
    assert!(saw_last);
    assert_eq!(chunks, 3);
    assert_eq!(got, data);

    let unknown = crypto::sha256_hex(b"never uploaded");
    let err = agent
        .fetch_artifact(FetchArtifactRequest {
            sha256: unknown,
            command_id: "c-2".to_owned(),
            agent_binary: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    let err = agent
        .fetch_artifact(FetchArtifactRequest {
            sha256: "../controller.db".to_owned(),
            command_id: "c-3".to_owned(),
            agent_binary: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Without a client certificate (the CLI's TLS): refused.
    let roots = client::load_ca(&controller.data_dir.path().join("ca.pem")).unwrap();
    let channel = client::connect(&controller.addr.to_string(), roots)
        .await
        .unwrap();
    let err = AgentLinkClient::new(channel)
        .fetch_artifact(FetchArtifactRequest {
            sha256: sha,
            command_id: "c-4".to_owned(),
            agent_binary: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    assert!(controller
        .audit()
        .await
        .iter()
        .any(|e| e.event_type == "ARTIFACT_FETCH_REFUSED"));
    controller.stop().await;
}

/// Plays the agent's part for one command on `session`: expects a Deploy,
/// sends two Progress and a CommandResult with `outcome`.
async fn answer_deploy(session: &mut link::Session, outcome: Outcome, message: &str) -> String {
    let command = next_command(session).await;
    let controller_message::Kind::Deploy(deploy) = command else {
        panic!("expected a Deploy, got {command:?}");
    };
    assert!(deploy.artifact_url.is_empty());
    assert_eq!(deploy.artifact_sha256.len(), 64);
    for step in ["fetch", "activate"] {
        send(
            session,
            agent_message::Kind::Progress(Progress {
                command_id: deploy.command_id.clone(),
                step: step.to_owned(),
                message: format!("{step} done"),
                unix_time: 1,
            }),
        )
        .await;
    }
    send_result(
        session,
        deploy.command_id.clone(),
        outcome,
        &deploy.release_id,
        message,
    )
    .await;
    deploy.command_id
}

#[tokio::test]
async fn deploy_reaches_online_nodes_and_reports_each_result() {
    let controller = Controller::start().await;
    let token = controller.deploy_token("web").await;
    let mut control = controller.control().await;
    let data = b"release".to_vec();
    let sha = crypto::sha256_hex(&data);
    upload(&mut control, &token, &sha, &data).await.unwrap();
    let (state_a, node_a) = controller.enroll("web-a").await;
    let (state_b, node_b) = controller.enroll("web-b").await;
    let (_state_c, node_c) = controller.enroll("web-c").await; // never connects
                                                               // Online but tagged otherwise: the tag selector must leave it out.
    let staging = tempfile::tempdir().unwrap();
    let join = controller.token_tagged(0, "env:staging").await;
    let node_s = controller
        .try_enroll(&join, staging.path(), "web-s")
        .await
        .unwrap()
        .node_id;
    let _s = controller.connect(staging.path(), &node_s).await;
    let mut a = controller.connect(state_a.path(), &node_a).await;
    let mut b = controller.connect(state_b.path(), &node_b).await;

    let mut request = deploy_request("web", &sha, None);
    request.selector = Some(Selector {
        target: Some(selector::Target::Tag("env:production".to_owned())),
    });
    let stream = control
        .deploy(authed(request, &token))
        .await
        .unwrap()
        .into_inner();
    let (command_a, command_b, events) = tokio::join!(
        answer_deploy(&mut a, Outcome::Succeeded, ""),
        answer_deploy(&mut b, Outcome::RolledBack, "health gate failed"),
        collect(stream),
    );
    assert_ne!(command_a, command_b);
    assert!(command_a.ends_with(&node_a), "{command_a}");

    let Some(deploy_event::Kind::Started(started)) = &events[0].kind else {
        panic!("{events:?}");
    };
    assert_eq!(started.nodes.len(), 3);
    assert!(
        started.nodes.iter().all(|n| n.node_id != node_s),
        "{started:?}"
    );
    assert!(started.release_id.ends_with(&sha[..12]), "{started:?}");
    let progress = events
        .iter()
        .filter(|e| matches!(e.kind, Some(deploy_event::Kind::Progress(_))))
        .count();
    assert_eq!(progress, 4);
    let results = node_results(&events);
    assert_eq!(results.len(), 3);
    let of = |id: &str| *results.iter().find(|r| r.node_id == id).unwrap();
    assert_eq!(of(&node_a).outcome, Outcome::Succeeded as i32);
    assert_eq!(of(&node_b).outcome, Outcome::RolledBack as i32);
    assert_eq!(of(&node_c).outcome, Outcome::Failed as i32);
    assert!(of(&node_c).message.contains("unreachable"));
    let finished = finished_of(&events);
    assert!(!finished.succeeded);
    assert_eq!(finished.failed_nodes, 2);
    assert!(finished
        .message
        .contains("web-b (rolled back: health gate failed)"));
    assert!(finished.message.contains("web-c (unreachable"));

    let audit = controller.audit().await;
    let started = audit
        .iter()
        .find(|e| e.event_type == "DEPLOY_STARTED")
        .unwrap();
    assert_eq!(started.actor, apitoken::token_id(&token).unwrap());
    let failed = audit
        .iter()
        .find(|e| e.event_type == "DEPLOY_FAILED")
        .unwrap();
    assert_eq!(failed.details["failed_nodes"].as_array().unwrap().len(), 2);
    let rows = controller
        .store()
        .await
        .deployment_nodes(&finished.deployment_id)
        .await
        .unwrap();
    let outcomes: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(outcomes.len(), 3);
    assert!(outcomes.contains(&"succeeded") && outcomes.contains(&"rolled_back"));

    // Only node a this time: it succeeds, so the deploy does.
    let stream = control
        .deploy(authed(deploy_request("web", &sha, Some("web-a")), &token))
        .await
        .unwrap()
        .into_inner();
    let (_, events) = tokio::join!(
        answer_deploy(&mut a, Outcome::Succeeded, ""),
        collect(stream)
    );
    let finished = finished_of(&events);
    assert!(finished.succeeded, "{finished:?}");
    assert!(controller
        .audit()
        .await
        .iter()
        .any(|e| e.event_type == "DEPLOY_COMPLETED"));
    drop(a);
    drop(b);
    controller.stop().await;
}

#[tokio::test]
async fn a_node_that_reconnects_mid_command_gets_it_again() {
    let controller = Controller::start().await;
    let token = controller.deploy_token("web").await;
    let mut control = controller.control().await;
    let data = b"release".to_vec();
    let sha = crypto::sha256_hex(&data);
    upload(&mut control, &token, &sha, &data).await.unwrap();
    let (state, node_id) = controller.enroll("web-a").await;
    let mut first = controller.connect(state.path(), &node_id).await;

    let stream = control
        .deploy(authed(deploy_request("web", &sha, Some("web-a")), &token))
        .await
        .unwrap()
        .into_inner();
    let command = next_command(&mut first).await;
    let controller_message::Kind::Deploy(sent) = command else {
        panic!("expected a Deploy, got {command:?}");
    };
    // The connection drops before the agent answers; it reconnects.
    drop(first);
    let mut second = controller.connect(state.path(), &node_id).await;
    let (command_id, events) = tokio::join!(
        answer_deploy(&mut second, Outcome::Succeeded, ""),
        collect(stream)
    );
    assert_eq!(command_id, sent.command_id);
    let finished = finished_of(&events);
    assert!(finished.succeeded, "{finished:?}");
    controller.stop().await;
}

/// Creates an operator as `operator create` does; returns its id,
/// certificate and key (PEM).
async fn operator(
    controller: &Controller,
    name: &str,
    scopes: &[Scope],
) -> (String, String, String) {
    let issued = slipway_controller::auth::operator::create(
        &controller.store().await,
        &controller.ca,
        name,
        scopes,
        slipway_controller::auth::operator::DEFAULT_VALIDITY,
        None,
        time::OffsetDateTime::now_utc().unix_timestamp(),
    )
    .await
    .unwrap();
    (issued.operator.id, issued.cert_pem, issued.key_pem.unwrap())
}

/// Lists nodes with no token: refused as UNAUTHENTICATED, saying `says`.
async fn list_nodes_refused(control: &mut ControlClient<Channel>, says: &str) {
    let refused = control
        .list_nodes(tonic::Request::new(ListNodesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    assert!(refused.message().contains(says), "{}", refused.message());
}

#[tokio::test]
async fn operator_certificates_call_the_api_within_their_scopes_until_revoked() {
    let controller = Controller::start().await;
    let (id, cert, key) = operator(&controller, "ci", &[Scope::Deploy("web".to_owned())]).await;
    let mut control = ControlClient::new(
        controller
            .mtls_channel(cert.as_bytes(), key.as_bytes())
            .await,
    );

    // No token: the certificate is the caller.
    control
        .list_nodes(tonic::Request::new(ListNodesRequest {}))
        .await
        .unwrap();
    let data = b"operator upload".to_vec();
    let sha = crypto::sha256_hex(&data);
    let chunk = UploadChunk {
        sha256: sha.clone(),
        size: data.len() as u64,
        data,
    };
    let uploaded = control
        .upload_artifact(tokio_stream::iter(vec![chunk]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(uploaded.sha256, sha);
    let denied = control
        .deploy(tonic::Request::new(deploy_request("api", &sha, None)))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{denied:?}");
    assert!(denied.message().contains(&id), "{}", denied.message());
    assert!(
        denied.message().contains("deploy:web"),
        "{}",
        denied.message()
    );

    // Revoked: refused at the next call, on the same connection.
    slipway_controller::auth::operator::revoke(&controller.store().await, &id, 0)
        .await
        .unwrap();
    list_nodes_refused(&mut control, "revoked").await;

    let audit = controller.audit().await;
    let refusals: Vec<_> = audit
        .iter()
        .filter(|e| e.event_type == "API_CALL_REFUSED")
        .collect();
    assert_eq!(refusals.len(), 2, "{refusals:?}");
    assert!(refusals.iter().all(|e| e.actor == id), "{refusals:?}");
    assert!(audited(&audit, "OPERATOR_CREATED", |e| e.resource_id == id));
    assert!(audited(&audit, "OPERATOR_REVOKED", |e| e.resource_id == id));
    controller.stop().await;
}

#[tokio::test]
async fn node_and_operator_certificates_stay_in_their_lanes() {
    let controller = Controller::start().await;
    // A node's certificate opens no API call...
    let (state, _node_id) = controller.enroll("web-1").await;
    let mut control = controller
        .control_as(
            &state.path().join(link::CERT_FILE),
            &state.path().join(link::KEY_FILE),
        )
        .await;
    list_nodes_refused(&mut control, "node certificate").await;

    // ...and an operator's certificate opens no agent link.
    let op_state = tempfile::tempdir().unwrap();
    let (_id, cert, key) = operator(&controller, "alice", &[Scope::Read]).await;
    std::fs::write(op_state.path().join(link::CERT_FILE), cert).unwrap();
    std::fs::write(op_state.path().join(link::KEY_FILE), key).unwrap();
    let mut agent_link = controller.agent_link(op_state.path()).await;
    let hello = AgentMessage {
        kind: Some(agent_message::Kind::Hello(Hello {
            node_id: "n-0000000000000000".to_owned(),
            ..Hello::default()
        })),
    };
    let refused = agent_link
        .connect(tokio_stream::iter(vec![hello]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    controller.stop().await;
}

#[tokio::test]
async fn a_revoked_api_token_is_refused_at_its_next_call() {
    let controller = Controller::start().await;
    let token = controller.api_token(&[Scope::Read]).await;
    let mut control = controller.control().await;
    control
        .list_nodes(authed(ListNodesRequest {}, &token))
        .await
        .unwrap();
    let (id, newly) = apitoken::revoke(&controller.store().await, &token, 0)
        .await
        .unwrap();
    assert!(newly);
    let refused = control
        .list_nodes(authed(ListNodesRequest {}, &token))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let audit = controller.audit().await;
    assert!(audited(&audit, "TOKEN_REVOKED", |e| e.resource_id == id));
    assert!(audited(&audit, "API_CALL_REFUSED", |e| e.actor == id));
    controller.stop().await;
}

#[tokio::test]
async fn the_server_certificate_covers_the_configured_server_names() {
    let controller = Controller::start_with(|config| {
        config.server_names = vec!["ctl.example.test".to_owned(), "192.0.2.10".to_owned()];
    })
    .await;
    let addr = controller.addr;
    let mut roots = RootCertStore::empty();
    roots.add(controller.ca.cert_der().clone()).unwrap();
    let tls = ClientConfig::builder_with_provider(crypto::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    // A real handshake, verifying the certificate for each name.
    let handshake = |name: &'static str| {
        let connector = connector.clone();
        async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = ServerName::try_from(name).unwrap();
            tokio::time::timeout(TEST_TIMEOUT, connector.connect(name, tcp))
                .await
                .unwrap()
        }
    };
    for good in ["ctl.example.test", "192.0.2.10", "127.0.0.1", "localhost"] {
        handshake(good)
            .await
            .unwrap_or_else(|e| panic!("{good}: {e}"));
    }
    let err = handshake("other.example.test").await.unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    controller.stop().await;
}
