//! Contract tests of the GitHub client and the status queue (issue 13)
//! against a local API that validates every request and answer against
//! the official description (support::gh_api). Each test ends by asserting
//! that the server saw nothing the description does not allow.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use slipway_controller::github::api::{NewDeployment, NewStatus};
use slipway_controller::github::client::Sink;
use slipway_controller::github::{
    AppKey, Auth, Client, GhError, GithubConfig, Repo, RetryPolicy, Secret, Settings,
};
use slipway_controller::rollout::{Note, Observer};
use slipway_controller::store::Store;
use tokio_util::sync::CancellationToken;

use crate::support::gh_api::{app_key, GhApi, APP_ID, GH_TOKEN, INSTALLATION_ID};

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

fn quick() -> RetryPolicy {
    RetryPolicy {
        max_retries: 3,
        min_wait: Duration::from_millis(10),
        max_wait: Duration::from_millis(1500),
    }
}

fn client(api: &GhApi, auth: Auth) -> Client {
    Client::new(Settings {
        api_url: api.base.clone(),
        auth,
        retry: quick(),
        timeout: Duration::from_secs(20),
    })
    .unwrap()
}

fn token() -> Auth {
    Auth::Token(Secret::new(GH_TOKEN, "the token").unwrap())
}

fn repo() -> Repo {
    Repo::parse("acme/web").unwrap()
}

fn new_deployment() -> NewDeployment {
    NewDeployment {
        git_ref: SHA.into(),
        environment: "production".into(),
        description: "test".into(),
        auto_merge: false,
        required_contexts: vec![],
        payload: json!({ "slipway_deployment_id": "d-1" }),
        production_environment: true,
    }
}

fn statuses_of(log: &[serde_json::Value], path: &str) -> Vec<u64> {
    log.iter()
        .filter(|e| e["path"] == path)
        .map(|e| e["status"].as_u64().unwrap())
        .collect()
}

#[tokio::test]
async fn an_app_jwt_buys_an_installation_token_that_is_cached_and_renewed() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = app_key(dir.path());
    let api = GhApi::start(Some(&key_path)).await;
    let key = AppKey::from_pem(&std::fs::read(&key_path).unwrap(), "test").unwrap();
    // Tokens live 4 s here, renewed 2 s before they expire.
    api.control(
        "POST",
        "/_test/config",
        Some(json!({ "token_lifetime": 4 })),
    )
    .await;
    let auth = Auth::app(APP_ID, INSTALLATION_ID, key, Duration::from_secs(2));
    let client = client(&api, auth);
    let id = client
        .create_deployment(&repo(), &new_deployment())
        .await
        .unwrap();
    client
        .create_deployment_status(
            &repo(),
            id,
            &NewStatus {
                state: "queued",
                description: "q".into(),
                log_url: None,
                environment: "production".into(),
                auto_inactive: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(api.minted().await, 1, "one token for both calls");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    client
        .create_deployment(&repo(), &new_deployment())
        .await
        .unwrap();
    assert_eq!(api.minted().await, 2, "renewed before it expired");
    let log = api.log().await;
    let auths: Vec<&str> = log.iter().map(|e| e["auth"].as_str().unwrap()).collect();
    assert_eq!(
        auths,
        [
            "app-jwt",
            "installation",
            "installation",
            "app-jwt",
            "installation"
        ],
        "{log:#?}"
    );
    assert!(log.iter().all(|e| e["api_version"] == "2022-11-28"));
    api.assert_no_violations().await;
}

#[tokio::test]
async fn a_wrong_app_key_is_refused_with_githubs_message() {
    let dir = tempfile::tempdir().unwrap();
    let key_path = app_key(dir.path());
    let api = GhApi::start(Some(&key_path)).await;
    let other_dir = tempfile::tempdir().unwrap();
    let other = app_key(other_dir.path());
    let key = AppKey::from_pem(&std::fs::read(other).unwrap(), "test").unwrap();
    let client = client(
        &api,
        Auth::app(APP_ID, INSTALLATION_ID, key, Duration::from_secs(60)),
    );
    let err = client
        .create_deployment(&repo(), &new_deployment())
        .await
        .unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(401), "{err}");
    let shown = err.to_string();
    assert!(shown.contains("bad JWT signature"), "{shown}");
    assert!(shown.contains("x-github-request-id"), "{shown}");
    assert_eq!(api.minted().await, 0);
    api.assert_no_violations().await;
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out() {
    let api = GhApi::start(None).await;
    api.faults(
        json!([{ "method": "POST", "path_prefix": "/repos/acme/web/deployments",
                        "status": 429, "retry_after": 1, "count": 1 }]),
    )
    .await;
    let started = Instant::now();
    client(&api, token())
        .create_deployment(&repo(), &new_deployment())
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(1),
        "retry-after: 1 not waited ({took:?})"
    );
    assert_eq!(
        statuses_of(&api.log().await, "/repos/acme/web/deployments"),
        [429, 201]
    );
    api.assert_no_violations().await;
}

#[tokio::test]
async fn a_403_with_the_quota_used_up_waits_for_the_reset() {
    let api = GhApi::start(None).await;
    api.faults(
        json!([{ "method": "POST", "path_prefix": "/repos/acme/web/deployments",
                        "status": 403, "ratelimit_remaining": 0, "reset_in": 1, "count": 1,
                        "message": "API rate limit exceeded" }]),
    )
    .await;
    client(&api, token())
        .create_deployment(&repo(), &new_deployment())
        .await
        .unwrap();
    assert_eq!(
        statuses_of(&api.log().await, "/repos/acme/web/deployments"),
        [403, 201]
    );
    api.assert_no_violations().await;
}

#[tokio::test]
async fn server_errors_are_retried_for_reads_and_given_up_with_githubs_message() {
    let api = GhApi::start(None).await;
    api.add_commit("v1.0.0", SHA).await;
    api.faults(
        json!([{ "method": "GET", "path_prefix": "/repos/acme/web/commits/",
                        "status": 502, "count": 2 }]),
    )
    .await;
    let c = client(&api, token());
    assert_eq!(c.commit_sha(&repo(), "v1.0.0").await.unwrap(), SHA);
    assert_eq!(
        statuses_of(&api.log().await, "/repos/acme/web/commits/v1.0.0"),
        [502, 502, 200]
    );
    api.faults(
        json!([{ "method": "GET", "path_prefix": "/repos/acme/web/commits/",
                        "status": 500, "count": 100, "message": "GitHub is down" }]),
    )
    .await;
    let err = c.commit_sha(&repo(), "v1.0.0").await.unwrap_err();
    assert!(matches!(err, GhError::GaveUp { attempts: 4, .. }), "{err}");
    assert!(err.is_transient());
    let shown = err.to_string();
    assert!(
        shown.contains("GitHub is down") && shown.contains("HTTP 500"),
        "{shown}"
    );
    api.control("DELETE", "/_test/faults", None).await;
    // A 5xx to a create is not sent again by the client (GitHub may have
    // acted); it is transient, for the status queue to retry.
    api.faults(
        json!([{ "method": "POST", "path_prefix": "/repos/acme/web/deployments",
                        "status": 502, "count": 1 }]),
    )
    .await;
    let err = c
        .create_deployment(&repo(), &new_deployment())
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert_eq!(
        statuses_of(&api.log().await, "/repos/acme/web/deployments"),
        [502]
    );
    // A 422 (no such commit) answers the same each time: not retried.
    let err = c.commit_sha(&repo(), "v9.9.9").await.unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(422), "{err}");
    assert!(err.to_string().contains("No commit found"), "{err}");
    assert_eq!(
        statuses_of(&api.log().await, "/repos/acme/web/commits/v9.9.9"),
        [422]
    );
    api.assert_no_violations().await;
}

struct Memory(Vec<u8>);

impl Sink for Memory {
    async fn write(&mut self, data: &[u8]) -> Result<(), String> {
        self.0.extend_from_slice(data);
        Ok(())
    }
}

#[tokio::test]
async fn a_release_asset_follows_the_redirect_without_the_token() {
    let api = GhApi::start(None).await;
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let asset = api.add_asset("web.tar.gz", &data).await;
    let id = asset["id"].as_u64().unwrap();
    let c = client(&api, token());
    let mut sink = Memory(Vec::new());
    let n = c
        .download_release_asset(&repo(), id, data.len() as u64, &mut sink)
        .await
        .unwrap();
    assert_eq!(n, data.len() as u64);
    assert_eq!(sink.0, data);
    let cdn = api.cdn_log().await;
    assert_eq!(cdn.len(), 1, "{cdn:#?}");
    assert!(cdn[0]["authorization"].is_null(), "token sent to the CDN");
    // More than expected is refused.
    let mut small = Memory(Vec::new());
    let err = c
        .download_release_asset(&repo(), id, 1000, &mut small)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("1000 bytes"), "{err}");
    // Served directly (200 with the bytes) works too.
    api.control(
        "POST",
        "/_test/config",
        Some(json!({ "asset_mode": "direct" })),
    )
    .await;
    let mut direct = Memory(Vec::new());
    c.download_release_asset(&repo(), id, data.len() as u64, &mut direct)
        .await
        .unwrap();
    assert_eq!(direct.0, data);
    api.assert_no_violations().await;
}

/// A `[github]` config for the queue: a token file, `acme/web` linked as
/// app `web` with commit statuses, quick retries, `give_up_after`.
fn config(api: &GhApi, dir: &std::path::Path, give_up_after: &str) -> Arc<GithubConfig> {
    let token = dir.join("gh-token");
    std::fs::write(&token, format!("{GH_TOKEN}\n")).unwrap();
    let raw = toml::from_str(&format!(
        "api_url = \"{}\"\ntoken_file = \"{}\"\npublic_url = \"https://ctl.example.com:8443\"\n\
         give_up_after = \"{give_up_after}\"\nretry_min_wait = \"20ms\"\nretry_max_wait = \"200ms\"\n\
         [apps.web]\nrepo = \"acme/web\"\ncommit_status = true\n",
        api.base,
        token.display()
    ))
    .unwrap();
    Arc::new(GithubConfig::new(raw).unwrap())
}

fn started(id: &str, nodes: usize) -> Note {
    Note::Started {
        deployment_id: id.into(),
        app: "web".into(),
        kind: "deploy",
        release_id: format!("r-{id}"),
        git_sha: SHA.into(),
        nodes,
        actor: "test".into(),
    }
}

fn progress(id: &str, done: usize, nodes: usize) -> Note {
    Note::Progress {
        deployment_id: id.into(),
        app: "web".into(),
        done,
        failed: 0,
        nodes,
        node: format!("web-{done}"),
        outcome: "SUCCEEDED".into(),
    }
}

fn finished(id: &str, succeeded: bool) -> Note {
    Note::Finished {
        deployment_id: id.into(),
        app: "web".into(),
        succeeded,
        message: if succeeded {
            "2 nodes succeeded".into()
        } else {
            "web-1 failed".into()
        },
    }
}

async fn wait_for<F, Fut>(what: &str, limit: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn states(deployment: &serde_json::Value) -> Vec<String> {
    let mut out: Vec<String> = deployment["statuses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap().to_owned())
        .collect();
    out.dedup();
    out
}

#[tokio::test]
async fn rollout_notes_become_a_deployment_with_statuses_and_the_replaced_one_goes_inactive() {
    let api = GhApi::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let cfg = config(&api, dir.path(), "30s");
    let (observer, notes) = Observer::channel();
    let stop = CancellationToken::new();
    let task = slipway_controller::github::status::spawn(
        cfg.clone(),
        cfg.client().unwrap(),
        store.clone(),
        notes,
        Vec::new(),
        tokio::sync::mpsc::unbounded_channel().1,
        stop.clone(),
    );
    for note in [
        started("d-1", 2),
        progress("d-1", 1, 2),
        progress("d-1", 2, 2),
        finished("d-1", true),
    ] {
        observer.note(note);
    }
    wait_for("d-1's success", Duration::from_secs(20), || async {
        api.deployments()
            .await
            .first()
            .is_some_and(|d| states(d).last().map(String::as_str) == Some("success"))
    })
    .await;
    observer.note(started("d-2", 2));
    observer.note(finished("d-2", true));
    wait_for("d-1 inactive", Duration::from_secs(20), || async {
        api.deployments()
            .await
            .first()
            .is_some_and(|d| states(d).last().map(String::as_str) == Some("inactive"))
    })
    .await;
    let deployments = api.deployments().await;
    assert_eq!(deployments.len(), 2);
    let first = &deployments[0];
    let request = &first["request"];
    assert_eq!(request["ref"], SHA);
    assert_eq!(request["auto_merge"], false);
    assert_eq!(request["required_contexts"], json!([]));
    assert_eq!(request["environment"], "production");
    assert_eq!(request["payload"]["slipway_deployment_id"], "d-1");
    assert_eq!(
        states(first),
        ["queued", "in_progress", "success", "inactive"],
        "{first:#}"
    );
    let statuses = first["statuses"].as_array().unwrap();
    assert_eq!(
        statuses[0]["log_url"],
        "https://ctl.example.com:8443/deployments/d-1"
    );
    let last_progress = statuses
        .iter()
        .rfind(|s| s["state"] == "in_progress")
        .unwrap();
    assert!(
        last_progress["description"]
            .as_str()
            .unwrap()
            .starts_with("2/2 nodes done"),
        "{last_progress:#}"
    );
    assert_eq!(
        states(&deployments[1]),
        ["queued", "in_progress", "success"]
    );
    let commits: Vec<String> = api
        .commit_statuses()
        .await
        .iter()
        .map(|c| {
            format!(
                "{} {}",
                c["state"].as_str().unwrap(),
                c["context"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        commits,
        [
            "pending slipway/web",
            "success slipway/web",
            "pending slipway/web",
            "success slipway/web"
        ]
    );
    // A failed rollout: failure, and the one it would have replaced stays.
    observer.note(started("d-3", 2));
    observer.note(progress("d-3", 1, 2));
    observer.note(finished("d-3", false));
    wait_for("d-3's failure", Duration::from_secs(20), || async {
        api.deployments()
            .await
            .get(2)
            .is_some_and(|d| states(d).last().map(String::as_str) == Some("failure"))
    })
    .await;
    let deployments = api.deployments().await;
    assert_eq!(
        states(&deployments[2]),
        ["queued", "in_progress", "failure"]
    );
    assert_eq!(
        deployments[2]["statuses"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()["description"],
        "web-1 failed"
    );
    assert_eq!(
        states(&deployments[1]),
        ["queued", "in_progress", "success"]
    );
    stop.cancel();
    task.await.unwrap();
    api.assert_no_violations().await;
}

#[tokio::test]
async fn github_down_gives_up_after_the_deadline_with_an_audit_event_and_never_blocks() {
    let api = GhApi::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let cfg = config(&api, dir.path(), "1s");
    api.faults(json!([{ "path_prefix": "/repos/acme/web/", "status": 503, "count": 100000 }]))
        .await;
    let (observer, notes) = Observer::channel();
    let stop = CancellationToken::new();
    let task = slipway_controller::github::status::spawn(
        cfg.clone(),
        cfg.client().unwrap(),
        store.clone(),
        notes,
        Vec::new(),
        tokio::sync::mpsc::unbounded_channel().1,
        stop.clone(),
    );
    // Handing notes over never waits, however GitHub is: `note` is not
    // async (a full queue drops a progress note instead).
    for _ in 0..3 {
        observer.note(started("d-9", 1));
        observer.note(progress("d-9", 1, 1));
        observer.note(finished("d-9", false));
    }
    let gave_up = || async {
        store
            .audit_events()
            .await
            .unwrap()
            .into_iter()
            .filter(|e| e.event_type == "GITHUB_UPDATE_GAVE_UP")
            .collect::<Vec<_>>()
    };
    wait_for("GITHUB_UPDATE_GAVE_UP", Duration::from_secs(30), || async {
        !gave_up().await.is_empty()
    })
    .await;
    let event = &gave_up().await[0];
    assert_eq!(event.resource_id, "d-9");
    assert_eq!(event.details["update"], "create the deployment");
    assert!(
        event.details["attempts"].as_u64().unwrap() >= 2,
        "{event:?}"
    );
    let message = event.error_message.clone().unwrap();
    assert!(message.contains("HTTP 503"), "{message}");
    stop.cancel();
    task.await.unwrap();
    api.assert_no_violations().await;
}

#[tokio::test]
async fn a_rollout_cut_short_by_a_restart_gets_error_on_github() {
    let api = GhApi::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let cfg = config(&api, dir.path(), "30s");
    // Before the restart: a deployment created and in progress.
    let id = cfg
        .client()
        .unwrap()
        .create_deployment(&repo(), &new_deployment())
        .await
        .unwrap();
    store
        .record_github_deployment("d-7", "web", "acme/web", "production", id as i64, SHA, 1)
        .await
        .unwrap();
    store
        .set_github_deployment_state("d-7", "in_progress", 2)
        .await
        .unwrap();
    let (_observer, notes) = Observer::channel();
    let stop = CancellationToken::new();
    let (later_tx, later_rx) = tokio::sync::mpsc::unbounded_channel();
    let task = slipway_controller::github::status::spawn(
        cfg.clone(),
        cfg.client().unwrap(),
        store.clone(),
        notes,
        vec!["d-unknown".to_owned()],
        later_rx,
        stop.clone(),
    );
    // Found later (a dead replica's deployment failed by this one): the
    // same error status.
    later_tx.send(vec!["d-7".to_owned()]).unwrap();
    wait_for("the error status", Duration::from_secs(20), || async {
        api.deployments()
            .await
            .first()
            .is_some_and(|d| states(d) == ["error"])
    })
    .await;
    let d = &api.deployments().await[0];
    assert!(d["statuses"][0]["description"]
        .as_str()
        .unwrap()
        .contains("controller restarted"));
    wait_for("the commit status", Duration::from_secs(20), || async {
        api.commit_statuses().await.len() == 1
    })
    .await;
    assert_eq!(api.commit_statuses().await[0]["state"], "error");
    stop.cancel();
    task.await.unwrap();
    api.assert_no_violations().await;
}

#[tokio::test]
async fn described_webhook_payloads_are_read_and_matched() {
    use slipway_controller::github::webhook::{matches, parse, Event};
    let api = GhApi::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("t");
    std::fs::write(&token, GH_TOKEN).unwrap();
    let secret = dir.path().join("s");
    std::fs::write(&secret, "s3cret").unwrap();
    let cfg = GithubConfig::new(
        toml::from_str(&format!(
            "token_file = \"{}\"\nwebhook_secret_file = \"{}\"\n\
             [apps.api]\nrepo = \"acme/web\"\n[apps.api.trigger]\nworkflow_run = [\"build\"]\n\
             workflow_branches = [\"main\"]\n[apps.api.artifact]\nurl = \"https://dl.example.com/{{sha}}.tar.gz\"\n\
             checksums_url = \"https://dl.example.com/{{sha}}.sums\"\n",
            token.display(),
            secret.display()
        ))
        .unwrap(),
    )
    .unwrap();
    // A completed successful run of `build` on main, as the description
    // shapes it: starts a deployment of its head commit.
    let run = api
        .webhook(
            "workflow-run-completed",
            json!({ "action": "completed",
                    "workflow_run": { "name": "build", "conclusion": "success",
                                      "head_branch": "main", "head_sha": SHA },
                    "repository": { "full_name": "acme/web" } }),
        )
        .await;
    let event = parse("workflow_run", run.to_string().as_bytes()).unwrap();
    assert!(matches!(event, Event::WorkflowRun { .. }), "{event:?}");
    let starts = matches(cfg.links.values(), &event);
    assert_eq!(starts.len(), 1);
    assert_eq!(starts[0].sha.as_deref(), Some(SHA));
    assert_eq!(starts[0].branch.as_deref(), Some("main"));
    let failed = api
        .webhook(
            "workflow-run-completed",
            json!({ "action": "completed",
                    "workflow_run": { "name": "build", "conclusion": "failure",
                                      "head_branch": "main", "head_sha": SHA },
                    "repository": { "full_name": "acme/web" } }),
        )
        .await;
    let event = parse("workflow_run", failed.to_string().as_bytes()).unwrap();
    assert!(matches(cfg.links.values(), &event).is_empty());
    // The described ping is answered as a ping.
    let ping = api
        .webhook(
            "ping",
            json!({ "zen": "Half measures are as bad as nothing at all." }),
        )
        .await;
    assert!(matches!(
        parse("ping", ping.to_string().as_bytes()).unwrap(),
        Event::Ping { .. }
    ));
    api.assert_no_violations().await;
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_is_not_made_twice() {
    let api = GhApi::start(None).await;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    let cfg = config(&api, dir.path(), "30s");
    // GitHub creates the deployment, but the answer is a 502.
    api.faults(
        json!([{ "method": "POST", "path_prefix": "/repos/acme/web/deployments",
                        "status": 502, "count": 4, "after_route": true }]),
    )
    .await;
    let (observer, notes) = Observer::channel();
    let stop = CancellationToken::new();
    let task = slipway_controller::github::status::spawn(
        cfg.clone(),
        cfg.client().unwrap(),
        store.clone(),
        notes,
        Vec::new(),
        tokio::sync::mpsc::unbounded_channel().1,
        stop.clone(),
    );
    observer.note(started("d-4", 1));
    observer.note(finished("d-4", true));
    wait_for("d-4's success", Duration::from_secs(30), || async {
        api.deployments()
            .await
            .iter()
            .any(|d| states(d).last().map(String::as_str) == Some("success"))
    })
    .await;
    let deployments = api.deployments().await;
    // One deployment: the queue's next try found the one its payload
    // names instead of creating another.
    assert_eq!(deployments.len(), 1, "{deployments:#?}");
    assert_eq!(
        states(&deployments[0]),
        ["queued", "in_progress", "success"]
    );
    let posts = api
        .log()
        .await
        .iter()
        .filter(|e| e["method"] == "POST" && e["path"] == "/repos/acme/web/deployments")
        .count();
    assert_eq!(posts, 1);
    let log = api.log().await;
    assert!(log
        .iter()
        .any(|e| e["method"] == "GET" && e["path"] == "/repos/acme/web/deployments"));
    stop.cancel();
    task.await.unwrap();
    api.assert_no_violations().await;
}
