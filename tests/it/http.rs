//! The controller's HTTP API end to end: a real `slipway-controller serve
//! --http-listen` (HTTPS with its own server certificate, checked by curl
//! against the CA), real `slipway-agent run` agents over mTLS, and `curl`
//! as the client: upload and deploy over HTTP to three agents, follow a
//! rolling deploy's per-node steps as Server-Sent Events while it runs,
//! roll back, restart, prune; a `read` token refused (and audited); browser
//! sessions with their cookie and CSRF token; schemathesis against the
//! OpenAPI description.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::{artifact, sha256_file, wait_until, Agent, Controller, APP};

/// Bound on each curl call (an SSE stream gets its own).
const CURL_TIMEOUT: &str = "60";

/// `curl` against the controller's HTTP API with its CA; returns the status
/// code and the body.
pub(crate) fn curl(controller: &Controller, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", CURL_TIMEOUT, "--cacert"])
        .arg(controller.ca_pem())
        .args(["-w", "\n%{http_code}"])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    let code = code.trim().parse().unwrap_or_else(|_| {
        panic!(
            "curl {args:?}: no status ({}): {text}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, body.to_owned())
}

/// GET `path` with `token`; status and JSON body.
pub(crate) fn get(controller: &Controller, token: &str, path: &str) -> (u16, Value) {
    let url = format!("{}{path}", controller.http_url());
    let auth = format!("Authorization: Bearer {token}");
    let (code, body) = curl(controller, &["-H", &auth, &url]);
    (
        code,
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}")),
    )
}

/// POST `body` (JSON) to `path` with `token`; status and JSON body.
pub(crate) fn post(controller: &Controller, token: &str, path: &str, body: &str) -> (u16, Value) {
    let url = format!("{}{path}", controller.http_url());
    let auth = format!("Authorization: Bearer {token}");
    let (code, text) = curl(
        controller,
        &[
            "-H",
            &auth,
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
            &url,
        ],
    );
    (
        code,
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}")),
    )
}

/// PUT the artifact at `art` under its digest; status and JSON body.
pub(crate) fn upload(controller: &Controller, token: &str, art: &Path) -> (u16, Value) {
    let url = format!(
        "{}/api/v1/artifacts/{}",
        controller.http_url(),
        sha256_file(art)
    );
    let auth = format!("Authorization: Bearer {token}");
    let (code, text) = curl(
        controller,
        &["-H", &auth, "-T", art.to_str().unwrap(), &url],
    );
    (code, serde_json::from_str(&text).unwrap())
}

/// Waits until deployment `id` is no longer running; its record.
pub(crate) fn wait_done(controller: &Controller, token: &str, id: &str) -> Value {
    let mut record = Value::Null;
    wait_until(
        &format!("deployment {id} to finish"),
        Duration::from_secs(120),
        || {
            let (code, body) = get(controller, token, &format!("/api/v1/deployments/{id}"));
            assert_eq!(code, 200, "{body}");
            record = body;
            record["status"] != "running"
        },
    );
    record
}

/// The (event, data) pairs of an SSE stream's text.
pub(crate) fn sse_events(text: &str) -> Vec<(String, Value)> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = Some(n.to_owned());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            Some((name?, serde_json::from_str(&data).ok()?))
        })
        .collect()
}

/// The test app, slow to come up, so a rolling deploy takes a while.
fn slow_app() -> String {
    format!("import time\ntime.sleep(3)\n{APP}")
}

#[test]
fn deploy_over_http_to_real_agents_with_live_steps_and_a_refused_read_token() {
    let mut controller = Controller::start_http();
    let names = ["h1", "h2", "h3"];
    let mut agents = Agent::enroll_all(&controller, &names);
    for a in &mut agents {
        a.set_start_period("8s");
        a.run();
    }
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    controller.wait_online(&reader, 3, Duration::from_secs(60));

    // No authentication for the health checks; the API wants a token.
    let base = controller.http_url();
    let (code, body) = curl(&controller, &[&format!("{base}/healthz")]);
    assert_eq!((code, body.contains("ok")), (200, true), "{body}");
    let (code, body) = curl(&controller, &[&format!("{base}/readyz")]);
    assert_eq!(code, 200, "{body}");
    let (code, body) = curl(&controller, &[&format!("{base}/api/v1/nodes")]);
    assert_eq!(code, 401, "{body}");

    // Nodes, as the CLI sees them.
    let (code, nodes) = get(&controller, &reader, "/api/v1/nodes");
    assert_eq!(code, 200, "{nodes}");
    let mut online: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["state"] == "online")
        .map(|n| n["name"].as_str().unwrap())
        .collect();
    online.sort_unstable();
    assert_eq!(online, names, "{nodes}");

    // Upload two releases over HTTP; a read token may not.
    let work = tempfile::tempdir().unwrap();
    let v1 = artifact(work.path(), "v1", APP);
    let v2 = artifact(work.path(), "v2", &slow_app());
    let (code, body) = upload(&controller, &reader, &v1);
    assert_eq!(code, 403, "{body}");
    for art in [&v1, &v2] {
        let (code, body) = upload(&controller, &deployer, art);
        assert_eq!(code, 201, "{body}");
        assert_eq!(body["sha256"], sha256_file(art).as_str());
    }
    let (code, body) = upload(&controller, &deployer, &v1);
    assert_eq!((code, &body["already_present"]), (200, &Value::Bool(true)));

    // A read token sees everything and changes nothing: its deploy is
    // refused and audited.
    let deploy_v1 = format!(r#"{{"sha256":"{}","release_id":"v1"}}"#, sha256_file(&v1));
    let (code, body) = post(&controller, &reader, "/api/v1/apps/web/deploy", &deploy_v1);
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("may not deploy app web"),
        "{body}"
    );
    let (_, me) = get(&controller, &reader, "/api/v1/session");
    let reader_id = me["token_id"].as_str().unwrap().to_owned();
    let (code, refused) = get(
        &controller,
        &reader,
        "/api/v1/audit?kind=API_CALL_REFUSED&limit=10",
    );
    assert_eq!(code, 200, "{refused}");
    assert!(
        refused
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["actor"] == reader_id.as_str() && e["resource_id"] == "deploy app web"),
        "{refused}"
    );

    // Bad input: a clear error naming the field.
    let (code, body) = post(
        &controller,
        &deployer,
        "/api/v1/apps/web/deploy",
        r#"{"sha256":"abc"}"#,
    );
    assert_eq!(
        (code, &body["field"]),
        (400, &Value::from("sha256")),
        "{body}"
    );
    let (code, body) = post(
        &controller,
        &deployer,
        "/api/v1/apps/web/deploy",
        &format!(
            r#"{{"sha256":"{}","rollout":{{"strategy":"rolling","max_paralel":1}}}}"#,
            sha256_file(&v1)
        ),
    );
    assert_eq!(code, 400, "{body}");
    assert!(
        body["field"].as_str().unwrap().starts_with("rollout"),
        "{body}"
    );

    // v1 everywhere at once.
    let (code, started) = post(
        &controller,
        &deployer,
        "/api/v1/apps/web/deploy",
        &deploy_v1,
    );
    assert_eq!(code, 202, "{started}");
    let id1 = started["deployment_id"].as_str().unwrap().to_owned();
    let done = wait_done(&controller, &reader, &id1);
    assert_eq!(done["status"], "succeeded", "{done}");
    for a in &agents {
        assert_eq!(a.current().as_deref(), Some("v1"), "{}", a.name);
    }

    // v2 rolling, one node at a time, followed as Server-Sent Events.
    let body = format!(
        r#"{{"sha256":"{}","release_id":"v2","rollout":{{"strategy":"rolling","max_parallel":1}}}}"#,
        sha256_file(&v2)
    );
    let (code, started) = post(&controller, &deployer, "/api/v1/apps/web/deploy", &body);
    assert_eq!(code, 202, "{started}");
    let id2 = started["deployment_id"].as_str().unwrap().to_owned();
    let events_path = work.path().join("events.txt");
    let mut follower = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "150", "--cacert"])
        .arg(controller.ca_pem())
        .args(["-H", &format!("Authorization: Bearer {reader}")])
        .arg(format!("{base}{}", started["events_url"].as_str().unwrap()))
        .stdout(Stdio::from(std::fs::File::create(&events_path).unwrap()))
        .spawn()
        .unwrap();
    // One deployment per app: a second one is refused while it runs.
    let (code, body) = post(
        &controller,
        &deployer,
        "/api/v1/apps/web/deploy",
        &deploy_v1,
    );
    assert_eq!(code, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains(&id2), "{body}");
    // The stream shows steps while the deployment still runs.
    wait_until("a step on the stream", Duration::from_secs(60), || {
        std::fs::read_to_string(&events_path)
            .unwrap_or_default()
            .contains("event: progress")
    });
    let (_, running) = get(&controller, &reader, &format!("/api/v1/deployments/{id2}"));
    assert_eq!(running["status"], "running", "{running}");
    let status = follower.wait().unwrap();
    assert!(status.success(), "curl -N ended with {status}");
    let events = sse_events(&std::fs::read_to_string(&events_path).unwrap());
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(kinds.first(), Some(&"started"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"finished"), "{kinds:?}");
    assert_eq!(events.last().unwrap().1["succeeded"], true, "{events:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "batch").count(),
        3,
        "{kinds:?}"
    );
    for name in names {
        let steps: Vec<&str> = events
            .iter()
            .filter(|(k, d)| k == "progress" && d["node_name"] == name)
            .map(|(_, d)| d["step"].as_str().unwrap())
            .collect();
        assert!(steps.len() >= 2, "{name}: {steps:?}");
        let result = events
            .iter()
            .find(|(k, d)| k == "node_result" && d["node_name"] == name)
            .unwrap_or_else(|| panic!("no node_result for {name}: {events:?}"));
        assert_eq!(result.1["outcome"], "succeeded", "{result:?}");
    }
    // Rolling: a node's first step comes after the previous node's result.
    let first_step = |name: &str| {
        events
            .iter()
            .position(|(k, d)| k == "progress" && d["node_name"] == name)
            .unwrap()
    };
    let result_of = |name: &str| {
        events
            .iter()
            .position(|(k, d)| k == "node_result" && d["node_name"] == name)
            .unwrap()
    };
    let mut order: Vec<&str> = names.to_vec();
    order.sort_by_key(|n| first_step(n));
    assert!(result_of(order[0]) < first_step(order[1]), "{kinds:?}");
    assert!(result_of(order[1]) < first_step(order[2]), "{kinds:?}");
    let done = wait_done(&controller, &reader, &id2);
    let v2_done = done.clone();
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["nodes"].as_array().unwrap().len(), 3, "{done}");
    assert!(
        done["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["outcome"] == "succeeded" && !n["steps"].as_array().unwrap().is_empty()),
        "{done}"
    );
    for a in &agents {
        assert_eq!(a.current().as_deref(), Some("v2"), "{}", a.name);
    }

    // The lists and filters see it.
    let (_, list) = get(&controller, &reader, "/api/v1/deployments?app=web&limit=1");
    assert_eq!(list[0]["id"], id2.as_str(), "{list}");
    let (_, completed) = get(
        &controller,
        &reader,
        "/api/v1/audit?kind=DEPLOY_COMPLETED&app=web",
    );
    assert_eq!(completed.as_array().unwrap().len(), 2, "{completed}");
    let (_, apps) = get(&controller, &reader, "/api/v1/apps");
    wait_until("v2 reported by every node", Duration::from_secs(30), || {
        let (_, apps) = get(&controller, &reader, "/api/v1/apps");
        apps[0]["releases"] == serde_json::json!(["v2"])
    });
    assert_eq!(apps[0]["app"], "web", "{apps}");
    let (code, releases) = get(&controller, &reader, "/api/v1/apps/web/releases");
    assert_eq!(code, 200, "{releases}");
    assert_eq!(releases["nodes"].as_array().unwrap().len(), 3, "{releases}");

    // Roll back (to v1 everywhere), restart, prune: each through HTTP.
    let (code, started) = post(&controller, &deployer, "/api/v1/apps/web/rollback", "{}");
    assert_eq!(code, 202, "{started}");
    let done = wait_done(
        &controller,
        &reader,
        started["deployment_id"].as_str().unwrap(),
    );
    assert_eq!(done["status"], "succeeded", "{done}");
    for a in &agents {
        assert_eq!(a.current().as_deref(), Some("v1"), "{}", a.name);
    }
    let (code, started) = post(
        &controller,
        &deployer,
        "/api/v1/apps/web/restart",
        r#"{"selector":{"node":"h2"}}"#,
    );
    assert_eq!(code, 202, "{started}");
    let done = wait_done(
        &controller,
        &reader,
        started["deployment_id"].as_str().unwrap(),
    );
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["nodes"].as_array().unwrap().len(), 1, "{done}");
    let (code, started) = post(
        &controller,
        &deployer,
        "/api/v1/apps/web/prune",
        r#"{"keep":1}"#,
    );
    assert_eq!(code, 202, "{started}");
    let done = wait_done(
        &controller,
        &reader,
        started["deployment_id"].as_str().unwrap(),
    );
    assert_eq!(done["status"], "succeeded", "{done}");

    // All healthy: the status is 200, as `slipway status` exits 0.
    wait_until("status 200", Duration::from_secs(60), || {
        get(&controller, &reader, "/api/v1/status").0 == 200
    });
    // A node gone: 503, naming it.
    agents[2].stop_run();
    wait_until("status 503", Duration::from_secs(60), || {
        let (code, body) = get(&controller, &reader, "/api/v1/status?refresh=true");
        code == 503 && body["problems"].to_string().contains("h3")
    });
    // The steps are kept with each node's result: a restarted controller
    // (nothing left in memory) shows the v2 deployment's steps as before.
    controller.restart();
    let (code, again) = get(&controller, &reader, &format!("/api/v1/deployments/{id2}"));
    assert_eq!(code, 200, "{again}");
    for (before, after) in v2_done["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .zip(again["nodes"].as_array().unwrap())
    {
        assert_eq!(after["steps"], before["steps"], "{again}");
        let steps: Vec<&str> = after["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["step"].as_str().unwrap())
            .collect();
        assert!(
            steps.contains(&"fetch") && steps.contains(&"deploy"),
            "{steps:?}"
        );
    }
}

/// Logs in with `token`; the cookie jar file and the Set-Cookie line.
fn login(controller: &Controller, jar: &Path, token: &str) -> (u16, String) {
    let url = format!("{}/login", controller.http_url());
    let (code, _) = curl(
        controller,
        &[
            "-c",
            jar.to_str().unwrap(),
            "-D",
            jar.with_extension("headers").to_str().unwrap(),
            "--data-urlencode",
            &format!("token={token}"),
            &url,
        ],
    );
    let headers = std::fs::read_to_string(jar.with_extension("headers")).unwrap_or_default();
    let cookie = headers
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_default()
        .to_owned();
    (code, cookie)
}

/// A request with the session cookie of `jar` and `extra` curl arguments.
fn with_session(controller: &Controller, jar: &Path, path: &str, extra: &[&str]) -> (u16, Value) {
    let url = format!("{}{path}", controller.http_url());
    let mut args = vec!["-b", jar.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.push(&url);
    let (code, text) = curl(controller, &args);
    (
        code,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[test]
fn browser_sessions_set_a_strict_cookie_check_csrf_and_end_with_the_token() {
    let controller = Controller::start_http();
    let work = tempfile::tempdir().unwrap();
    let deployer = controller.api_token("deploy:web");
    let reader = controller.api_token("read");

    // A wrong token: 401, audited.
    let jar = work.path().join("bad.jar");
    let (code, _) = login(&controller, &jar, "slwa1.0011223344556677.nope");
    assert_eq!(code, 401);
    let (_, refused) = get(&controller, &reader, "/api/v1/audit?kind=API_CALL_REFUSED");
    assert!(
        refused
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["resource_id"] == "log in" && e["actor"] == "0011223344556677"),
        "{refused}"
    );

    // Login sets a Secure, HttpOnly, SameSite=Strict cookie.
    let jar = work.path().join("deployer.jar");
    let (code, cookie) = login(&controller, &jar, &deployer);
    assert_eq!(code, 303, "{cookie}");
    for attribute in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(cookie.contains(attribute), "{attribute}: {cookie}");
    }
    // Logging in again from a browser that has a session works too.
    let (code, _) = with_session(&controller, &jar, "/api/v1/session", &[]);
    assert_eq!(code, 200);
    let url = format!("{}/login", controller.http_url());
    let again = format!("token={deployer}");
    let (code, _) = curl(
        &controller,
        &[
            "-b",
            jar.to_str().unwrap(),
            "-c",
            jar.to_str().unwrap(),
            "--data-urlencode",
            &again,
            &url,
        ],
    );
    assert_eq!(code, 303);
    let (code, me) = with_session(&controller, &jar, "/api/v1/session", &[]);
    assert_eq!(code, 200, "{me}");
    assert_eq!(me["via"], "session", "{me}");
    let csrf = me["csrf_token"].as_str().unwrap().to_owned();
    let (code, _) = with_session(&controller, &jar, "/api/v1/nodes", &[]);
    assert_eq!(code, 200);

    // A state change without the CSRF token, with a wrong one, or from
    // another origin is refused before it runs; with it, it runs (and
    // fails only because no node is enrolled).
    let deploy = format!(r#"{{"sha256":"{}"}}"#, "a".repeat(64));
    let json = [
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &deploy,
    ];
    let (code, body) = with_session(&controller, &jar, "/api/v1/apps/web/deploy", &json);
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("X-CSRF-Token"),
        "{body}"
    );
    let wrong = [
        "-H",
        "X-CSRF-Token: 00",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &deploy,
    ];
    let (code, body) = with_session(&controller, &jar, "/api/v1/apps/web/deploy", &wrong);
    assert_eq!(code, 403, "{body}");
    let header = format!("X-CSRF-Token: {csrf}");
    let other_site = [
        "-H",
        &header,
        "-H",
        "Origin: https://evil.example",
        "--data-binary",
        &deploy,
    ];
    let (code, body) = with_session(&controller, &jar, "/api/v1/apps/web/deploy", &other_site);
    assert_eq!(code, 403, "{body}");
    let right = [
        "-H",
        &header,
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &deploy,
    ];
    let (code, body) = with_session(&controller, &jar, "/api/v1/apps/web/deploy", &right);
    assert_eq!(code, 409, "{body}");
    // A form carries it as _csrf.
    let form = format!("_csrf={csrf}&sha256=x");
    let (code, body) = with_session(
        &controller,
        &jar,
        "/api/v1/apps/web/prune",
        &["--data", &form],
    );
    // Past the CSRF check: the JSON API then refuses the form body.
    assert_eq!(code, 400, "{body}");
    let (_, refused) = get(&controller, &reader, "/api/v1/audit?kind=API_CALL_REFUSED");
    assert!(
        refused.as_array().unwrap().iter().any(|e| e["resource_id"]
            == "POST /api/v1/apps/web/deploy"
            && e["error_message"]
                .as_str()
                .unwrap()
                .contains("X-CSRF-Token")),
        "{refused}"
    );

    // A read session sees and changes nothing.
    let read_jar = work.path().join("reader.jar");
    assert_eq!(login(&controller, &read_jar, &reader).0, 303);
    let (_, me) = with_session(&controller, &read_jar, "/api/v1/session", &[]);
    let read_csrf = format!("X-CSRF-Token: {}", me["csrf_token"].as_str().unwrap());
    let (code, body) = with_session(
        &controller,
        &read_jar,
        "/api/v1/apps/web/deploy",
        &["-H", &read_csrf, "--data-binary", &deploy],
    );
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("may not deploy"),
        "{body}"
    );

    // Logout ends the session.
    let (code, _) = with_session(
        &controller,
        &read_jar,
        "/logout",
        &["-H", &read_csrf, "-X", "POST"],
    );
    assert_eq!(code, 303);
    let (code, _) = with_session(&controller, &read_jar, "/api/v1/nodes", &[]);
    assert_eq!(code, 401);

    // Revoking the token ends its sessions.
    let deployer_id = deployer.split('.').nth(1).unwrap();
    let out = controller.cli(&["token", "revoke", deployer_id]);
    assert!(out.status.success(), "{out:?}");
    let (code, _) = with_session(&controller, &jar, "/api/v1/nodes", &[]);
    assert_eq!(code, 401);
}

#[test]
fn plain_http_only_on_loopback() {
    let out = Command::new(crate::support::bin("slipway-controller"))
        .args([
            "serve",
            "--data-dir",
            "/nonexistent-never-created",
            "--http-listen",
            "0.0.0.0:0",
            "--http-plain",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("only on a loopback address"), "{stderr}");

    // On loopback it serves, and says so.
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("http-ready");
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = Command::new(crate::support::bin("slipway-controller"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--http-listen",
            "127.0.0.1:0",
            "--http-plain",
            "--http-ready-file",
        ])
        .arg(&ready)
        .stderr(Stdio::from(log))
        .spawn()
        .unwrap();
    wait_until("the http ready file", Duration::from_secs(30), || {
        std::fs::read_to_string(&ready).is_ok_and(|a| !a.is_empty())
    });
    let addr = std::fs::read_to_string(&ready).unwrap();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .arg(format!("http://{}/healthz", addr.trim()))
        .output()
        .unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok"),
        "{out:?}"
    );
    let log = std::fs::read_to_string(dir.path().join("log")).unwrap();
    assert!(log.contains("WITHOUT TLS"), "{log}");
}

/// Runs schemathesis (`st`, pinned in scripts/test.sh) against the running
/// controller's OpenAPI description with `token`, `args` added; panics with
/// its report unless every check passed.
fn schemathesis(controller: &Controller, token: &str, args: &[&str]) {
    let url = format!("{}/api/v1/openapi.json", controller.http_url());
    // Bounded: a fixed seed and number of cases per operation, no stored
    // examples, and `timeout` around the whole run.
    // In a temp dir: schemathesis keeps a cache where it runs.
    let cwd = tempfile::tempdir().unwrap();
    let out = Command::new("timeout")
        .current_dir(cwd.path())
        .args(["600", "st", "run", &url, "--tls-verify"])
        .arg(controller.ca_pem())
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args([
            "--seed",
            "1",
            "--max-examples",
            "30",
            "--generation-database",
            "none",
        ])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!("schemathesis (`st`) is not installed: {e}; scripts/test.sh installs it")
        });
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(report.contains("passed"), "{report}");
}

#[test]
fn schemathesis_every_documented_response_validates_and_no_5xx() {
    let controller = Controller::start_http();
    // Deeper than a refusal: this token may deploy `web` (which then has
    // no node to go to) and uploads are allowed.
    let token = controller.api_token("read,deploy:web");
    // Every operation but the status: every response as documented, no 5xx.
    schemathesis(
        &controller,
        &token,
        &[
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--exclude-path",
            "/api/v1/status",
        ],
    );
    // The status answers 503 by design while something is wrong (here: no
    // node is enrolled), so only its conformance is checked.
    schemathesis(
        &controller,
        &token,
        &[
            "--checks",
            "status_code_conformance,content_type_conformance,response_schema_conformance",
            "--include-path",
            "/api/v1/status",
        ],
    );
    // Whatever it was sent, the controller still serves.
    let (code, _) = get(&controller, &token, "/api/v1/nodes");
    assert_eq!(code, 200);
}
