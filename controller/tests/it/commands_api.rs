//! The Control API's Restart, Prune and FleetStatus over real TLS, with
//! agent sessions simulated by the agent's own link module: input checks
//! and scopes, a refresh that a silent node does not answer, and a restart
//! re-sent with the same command id after a reconnect.

// Tests unwrap freely: a panic with its message is the failure report.
#![allow(clippy::unwrap_used)]

use crate::support::{
    authed, collect, finished_of, next_command, node_results, on_node, send, send_result,
    Controller,
};
use slipway_agent::link;

use slipway_controller::auth::apitoken::Scope;
use slipway_controller::proto::v1::control_client::ControlClient;
use slipway_controller::proto::v1::{
    agent_message, controller_message, rollout, AppStatus, FleetStatus, FleetStatusRequest,
    Heartbeat, Outcome, PruneRequest, RefreshAnswer, RestartRequest, Rollout, Selector,
};
use tonic::transport::Channel;
use tonic::Code;

async fn fleet_status(
    control: &mut ControlClient<Channel>,
    token: &str,
    app: &str,
    refresh: bool,
) -> Result<FleetStatus, tonic::Status> {
    let response = control
        .fleet_status(authed(
            FleetStatusRequest {
                app: app.to_owned(),
                refresh,
            },
            token,
        ))
        .await?
        .into_inner();
    Ok(response.status.unwrap())
}

/// A restart of `app` on the nodes `selector` picks, rolled out by `rollout`.
fn restart_request(
    app: &str,
    selector: Option<Selector>,
    rollout: Option<Rollout>,
) -> RestartRequest {
    RestartRequest {
        app: app.to_owned(),
        selector,
        rollout,
    }
}

/// A prune of `app` keeping `keep` releases (0: the app's own `keep`)
/// on the nodes `selector` picks.
fn prune_request(app: &str, keep: u32, selector: Option<Selector>) -> PruneRequest {
    PruneRequest {
        app: app.to_owned(),
        keep,
        selector,
    }
}

/// A rollout of `strategy` in batches of `max_parallel` nodes, tolerating
/// no failure.
fn in_batches(strategy: rollout::Strategy, max_parallel: u32) -> Option<Rollout> {
    Some(Rollout {
        strategy: strategy as i32,
        max_parallel,
        max_unavailable: 0,
        canary: 0,
    })
}

#[tokio::test]
async fn restart_and_prune_check_input_and_scope() {
    let controller = Controller::start().await;
    let deployer = controller.deploy_token("web").await;
    let reader = controller.api_token(&[Scope::Read]).await;
    let mut control = controller.control().await;
    let (_state, node_id) = controller.enroll("web-a").await;

    let err = control
        .prune(authed(prune_request("web", 1001, None), &deployer))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message()
            .contains("keep 1001 is out of range: 1..=1000"),
        "{err:?}"
    );
    let err = control
        .restart(authed(restart_request("../web", None, None), &deployer))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("invalid app name \"../web\""),
        "{err:?}"
    );
    let err = fleet_status(&mut control, &reader, "a/b", false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // Scope: a read token, or a deploy token for another app, may not.
    for (token, app) in [(&reader, "web"), (&deployer, "api")] {
        let err = control
            .restart(authed(restart_request(app, None, None), token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
        assert!(
            err.message()
                .contains(&format!("may not restart app {app}")),
            "{err:?}"
        );
    }
    let err = control
        .prune(authed(prune_request("web", 2, None), &reader))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    let refused: Vec<String> = controller
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event_type == "API_CALL_REFUSED")
        .map(|e| e.resource_id)
        .collect();
    assert_eq!(
        refused,
        ["restart app web", "restart app api", "prune app web"]
    );

    // A node with no session: the prune is recorded and fails naming it.
    let stream = control
        .prune(authed(prune_request("web", 0, on_node("web-a")), &deployer))
        .await
        .unwrap()
        .into_inner();
    let events = collect(stream).await;
    let finished = finished_of(&events);
    assert!(!finished.succeeded);
    assert_eq!(
        finished.message,
        "1 of 1 nodes failed: web-a (unreachable (no live session))"
    );
    let last = controller.last_deployments("web").await;
    assert_eq!(last[0].kind, "prune");
    assert_eq!(last[0].nodes[0].node_id, node_id);
    let types = controller.audit_types("PRUNE").await;
    assert_eq!(types, ["PRUNE_STARTED", "PRUNE_FAILED"]);
    controller.stop().await;
}

#[tokio::test]
async fn a_refresh_waits_for_fresh_heartbeats_and_names_silent_nodes() {
    let controller = Controller::start().await;
    let reader = controller.api_token(&[Scope::Read]).await;
    let mut control = controller.control().await;
    let (state_a, id_a) = controller.enroll("web-a").await;
    let (state_b, id_b) = controller.enroll("web-b").await;
    let (_state_c, id_c) = controller.enroll("web-c").await;
    let mut a = controller.connect(state_a.path(), &id_a).await;
    let mut b = controller.connect(state_b.path(), &id_b).await;

    // web-a answers its StatusRequest with a heartbeat, then the result;
    // web-b receives it and says nothing; web-c never connected.
    let answer_a = async {
        let controller_message::Kind::StatusRequest(request) = next_command(&mut a).await else {
            panic!("expected a StatusRequest");
        };
        send(
            &a,
            agent_message::Kind::Heartbeat(Heartbeat {
                unix_time: 1,
                metrics: None,
                apps: vec![AppStatus {
                    app: "web".to_owned(),
                    current_release: "v7".to_owned(),
                    health: "unhealthy: HTTP 500: sick".to_owned(),
                    ..AppStatus::default()
                }],
                agent_version: "9.9.9".to_owned(),
                agent_rss_bytes: 1234,
            }),
        )
        .await;
        send_result(
            &a,
            request.command_id.clone(),
            Outcome::Succeeded,
            "",
            "status sent",
        )
        .await;
        request.command_id
    };
    let silent_b = async {
        let controller_message::Kind::StatusRequest(request) = next_command(&mut b).await else {
            panic!("expected a StatusRequest");
        };
        request.command_id
    };
    let (status, id_from_a, id_from_b) = tokio::join!(
        fleet_status(&mut control, &reader, "", true),
        answer_a,
        silent_b
    );
    let status = status.unwrap();
    assert!(id_from_a.ends_with(&format!(".{id_a}")), "{id_from_a}");
    assert!(id_from_b.ends_with(&format!(".{id_b}")), "{id_from_b}");
    assert!(status.refreshed);
    let answer = |id: &str| {
        status
            .nodes
            .iter()
            .find(|n| n.id == id)
            .map(|n| n.refresh())
    };
    assert_eq!(answer(&id_a), Some(RefreshAnswer::Answered));
    assert_eq!(answer(&id_b), Some(RefreshAnswer::TimedOut));
    assert_eq!(answer(&id_c), Some(RefreshAnswer::NoSession));
    // web-a's heartbeat was stored before its answer counted.
    let web = &status.apps[0];
    assert_eq!(web.releases[0].release, "v7");
    assert_eq!(web.releases[0].nodes, ["web-a"]);
    assert_eq!(web.unhealthy[0].output, "HTTP 500: sick");
    assert_eq!(
        status.problems,
        [
            "web-b did not answer the status request (timed out; last heartbeat never)",
            "web-c has not been heard from since the controller started",
            "web on web-a (v7) is not healthy: unhealthy: HTTP 500: sick",
        ]
    );
    // Without a refresh nobody is asked.
    let plain = fleet_status(&mut control, &reader, "web", false)
        .await
        .unwrap();
    assert!(!plain.refreshed);
    assert!(plain
        .nodes
        .iter()
        .all(|n| n.refresh() == RefreshAnswer::Unspecified));
    assert_eq!(plain.nodes.len(), 1);
    drop((a, b));
    controller.stop().await;
}

#[tokio::test]
async fn a_restart_is_resent_with_the_same_command_id_after_a_reconnect() {
    let controller = Controller::start().await;
    let token = controller.deploy_token("web").await;
    let mut control = controller.control().await;
    let (state, node_id) = controller.enroll("web-a").await;
    let mut first = controller.connect(state.path(), &node_id).await;

    let stream = control
        .restart(authed(
            restart_request("web", on_node(&node_id), None),
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let controller_message::Kind::Restart(sent) = next_command(&mut first).await else {
        panic!("expected a Restart");
    };
    assert_eq!(sent.app, "web");
    // The connection drops before the agent answers; on its new session the
    // same command id comes again (the agent's ledger answers a known id
    // from its record instead of restarting twice).
    drop(first);
    let mut second = controller.connect(state.path(), &node_id).await;
    let controller_message::Kind::Restart(again) = next_command(&mut second).await else {
        panic!("expected the Restart again");
    };
    assert_eq!(again.command_id, sent.command_id);
    send_result(
        &second,
        again.command_id.clone(),
        Outcome::Succeeded,
        "v3",
        "restarted",
    )
    .await;
    let events = collect(stream).await;
    let results = node_results(&events);
    assert_eq!(results.len(), 1, "{events:?}");
    assert_eq!(results[0].release_id, "v3");
    let finished = finished_of(&events);
    assert!(finished.succeeded, "{finished:?}");
    assert!(sent.command_id.starts_with(&finished.deployment_id));
    let types = controller.audit_types("RESTART").await;
    assert_eq!(types, ["RESTART_STARTED", "RESTART_COMPLETED"]);
    drop(second);
    controller.stop().await;
}

/// Answers the next command on `session`, which must be a Restart.
async fn answer_restart(session: &mut link::Session, outcome: Outcome, message: &str) {
    let controller_message::Kind::Restart(restart) = next_command(session).await else {
        panic!("expected a Restart");
    };
    send_result(session, restart.command_id, outcome, "v3", message).await;
}

#[tokio::test]
async fn a_rolling_restart_stops_at_a_failure_and_rolls_nothing_back() {
    let controller = Controller::start().await;
    let token = controller.deploy_token("web").await;
    let mut control = controller.control().await;
    let mut sessions = Vec::new();
    for name in ["web-a", "web-b", "web-c"] {
        let (state, id) = controller.enroll(name).await;
        let session = controller.connect(state.path(), &id).await;
        sessions.push((state, session));
    }
    // A rollout that makes no sense is refused before anything runs.
    let err = control
        .restart(authed(
            restart_request("web", None, in_batches(rollout::Strategy::AllAtOnce, 2)),
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // One node at a time, in name order: web-a restarts, web-b fails its
    // health gate, so web-c is skipped; web-a is left as it is (a restart
    // switched no release, there is nothing to roll back).
    let stream = control
        .restart(authed(
            restart_request("web", None, in_batches(rollout::Strategy::Rolling, 1)),
            &token,
        ))
        .await
        .unwrap()
        .into_inner();
    let [(_, a), (_, b), _] = &mut sessions[..] else {
        unreachable!()
    };
    let (events, ()) = tokio::join!(collect(stream), async {
        answer_restart(a, Outcome::Succeeded, "restarted").await;
        answer_restart(b, Outcome::Failed, "health gate failed: HTTP 500").await;
    });
    // Had the controller sent web-a a rollback, it would still be waiting
    // for web-a's answer instead of finishing.
    let results: Vec<(String, i32)> = node_results(&events)
        .into_iter()
        .map(|r| (r.node_name.clone(), r.outcome))
        .collect();
    assert_eq!(
        results,
        [
            ("web-a".to_owned(), Outcome::Succeeded as i32),
            ("web-b".to_owned(), Outcome::Failed as i32),
            ("web-c".to_owned(), Outcome::Skipped as i32),
        ],
        "{events:?}"
    );
    let finished = finished_of(&events);
    assert!(!finished.succeeded, "{finished:?}");
    assert_eq!(
        finished.stop_reason,
        "deployment stopped after web-b failed"
    );
    let last = controller.last_deployments("web").await;
    let outcomes: Vec<&str> = last[0].nodes.iter().map(|n| n.outcome.as_str()).collect();
    assert_eq!(outcomes, ["succeeded", "failed", "skipped"]);
    let failed = controller
        .audit()
        .await
        .into_iter()
        .find(|e| e.event_type == "RESTART_FAILED")
        .unwrap();
    assert_eq!(
        failed.details["strategy"], "rolling",
        "{:?}",
        failed.details
    );
    drop(sessions);
    controller.stop().await;
}
