//! GitHub end to end (issue 13): a local GitHub API that checks every
//! request against the official description (tests/fixtures/gh_api.py), a
//! controller (`serve` with `[github]` as a GitHub App, and its HTTP face),
//! and real agents (`slipway-agent run`). A signed `release` delivery to
//! `POST /hooks/github` deploys the release asset to the agents, and the
//! local GitHub sees the Deployment and each of its statuses; a bad
//! signature is refused, a replayed delivery ignored, a `ping` answered; a
//! CLI deploy with `--git-sha` while GitHub answers 500 still succeeds, and
//! its statuses reach GitHub once it is back.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::{json, Value};

use crate::deploy::HttpsFiles;
use crate::support::gh_api::{app_key, GhApi, APP_ID, GH_TOKEN, INSTALLATION_ID};
use crate::support::{artifact, sha256_file, text, wait_until, Agent, Controller, APP};

const SECRET: &str = "webhook secret of the e2e test";
const SHA1: &str = "1111111111111111111111111111111111111111";
const SHA2: &str = "2222222222222222222222222222222222222222";
const SHA3: &str = "3333333333333333333333333333333333333333";

/// `X-Hub-Signature-256` of `body`, as GitHub computes it.
fn sign(body: &[u8], secret: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
}

/// Posts a delivery to the controller's plain-HTTP face; status and body.
fn deliver(http: &str, event: &str, delivery: &str, body: &[u8], signature: &str) -> (u16, Value) {
    let mut s = TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "POST /hooks/github HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nUser-Agent: GitHub-Hookshot/e2e\r\n\
         X-GitHub-Event: {event}\r\nX-GitHub-Delivery: {delivery}\r\n\
         X-Hub-Signature-256: {signature}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, rest) = answer.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(rest).unwrap_or(Value::Null))
}

/// A plain HTTP/1.1 request to the controller's HTTP face.
fn http_call(
    http: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Value) {
    let mut s = TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // A server may answer (413) before reading a large body.
    let _ = s.write_all(body);
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    let (head, rest) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, serde_json::from_str(rest).unwrap_or(Value::Null))
}

/// The states a GitHub deployment went through, repeats folded.
fn states(deployment: &Value) -> Vec<String> {
    let mut out: Vec<String> = deployment["statuses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["state"].as_str().unwrap().to_owned())
        .collect();
    out.dedup();
    out
}

#[test]
fn webhook_deploys_reach_real_agents_and_github_sees_every_status() {
    let work = tempfile::tempdir().unwrap();
    let key = app_key(work.path());
    let api = GhApi::start(&key);

    // The release: its asset (a real artifact), a checksums asset, its tag.
    let art = artifact(work.path(), "v1", APP);
    let bytes = fs::read(&art).unwrap();
    let digest = sha256_file(&art);
    let asset = api.add_asset("web-v1.0.0.tar.gz", &bytes);
    let sums = api.add_asset(
        "SHA256SUMS",
        format!("{digest}  web-v1.0.0.tar.gz\n").as_bytes(),
    );
    api.add_commit("v1.0.0", SHA1);

    let secret_file = work.path().join("webhook-secret");
    fs::write(&secret_file, format!("{SECRET}\n")).unwrap();
    let config = work.path().join("controller.toml");
    fs::write(
        &config,
        format!(
            "[github]\napi_url = \"{}\"\napp_id = {APP_ID}\ninstallation_id = {INSTALLATION_ID}\n\
             private_key_file = \"{}\"\nwebhook_secret_file = \"{}\"\n\
             retry_min_wait = \"50ms\"\nretry_max_wait = \"300ms\"\n\
             [github.apps.web]\nrepo = \"acme/web\"\ncommit_status = true\n\
             [github.apps.web.trigger]\nrelease = true\n\
             [github.apps.web.artifact]\nrelease_asset = \"web-{{tag}}.tar.gz\"\n\
             checksums_asset = \"SHA256SUMS\"\n",
            api.base,
            key.display(),
            secret_file.display()
        ),
    )
    .unwrap();
    let http_ready = work.path().join("http-ready");
    let controller = Controller::start_with(&[
        "--config",
        config.to_str().unwrap(),
        "--http-listen",
        "127.0.0.1:0",
        "--http-plain",
        "--http-ready-file",
        http_ready.to_str().unwrap(),
    ]);
    let http = fs::read_to_string(&http_ready).unwrap().trim().to_owned();
    let mut agents = vec![
        Agent::enroll(&controller, "web-1"),
        Agent::enroll(&controller, "web-2"),
    ];
    for a in &mut agents {
        a.run();
    }
    let reader = controller.api_token("read");
    controller.wait_online(&reader, 2, Duration::from_secs(30));

    // ping is answered.
    let ping = api.webhook(
        "ping",
        json!({ "zen": "Design for failure.", "hook_id": 7 }),
    );
    let body = serde_json::to_vec(&ping).unwrap();
    let (status, answer) = deliver(
        &http,
        "ping",
        "d0000000-0000-4000-8000-000000000001",
        &body,
        &sign(&body, SECRET),
    );
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("pong")),
        "{answer}"
    );

    // The release delivery, signed with the wrong secret: refused, audited.
    let release = api.webhook(
        "release-published",
        json!({
            "action": "published",
            "release": {
                "tag_name": "v1.0.0", "draft": false, "prerelease": false,
                "assets": [
                    { "id": asset["id"], "name": "web-v1.0.0.tar.gz", "size": asset["size"], "state": "uploaded" },
                    { "id": sums["id"], "name": "SHA256SUMS", "size": sums["size"], "state": "uploaded" },
                ],
            },
            "repository": { "full_name": "acme/web", "name": "web" },
        }),
    );
    let body = serde_json::to_vec(&release).unwrap();
    let delivery = "72d3162e-cc78-11e3-81ab-4c9367dc0958";
    let (status, answer) = deliver(
        &http,
        "release",
        delivery,
        &body,
        &sign(&body, "not the secret"),
    );
    assert_eq!(status, 401, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("does not match"),
        "{answer}"
    );
    // Nothing started.
    std::thread::sleep(Duration::from_millis(500));
    assert!(api.deployments().is_empty());

    // Signed right: accepted, deployed to both agents from the release asset.
    let (status, answer) = deliver(&http, "release", delivery, &body, &sign(&body, SECRET));
    assert_eq!(status, 202, "{answer}");
    assert_eq!(answer["apps"], json!(["web"]));
    wait_until("both agents on v1", Duration::from_secs(60), || {
        agents.iter().all(|a| a.get().as_deref() == Some("v1"))
    });
    // The asset came through the redirect, without the token.
    let cdn = api.cdn_log();
    assert!(
        !cdn.is_empty() && cdn.iter().all(|e| e["authorization"].is_null()),
        "{cdn:#?}"
    );

    // GitHub saw the deployment of the tag's commit and each status.
    wait_until(
        "the GitHub deployment's success",
        Duration::from_secs(30),
        || {
            api.deployments()
                .first()
                .is_some_and(|d| states(d).last().map(String::as_str) == Some("success"))
        },
    );
    let deployments = api.deployments();
    assert_eq!(deployments.len(), 1, "{deployments:#?}");
    let first = &deployments[0];
    assert_eq!(first["request"]["ref"], SHA1);
    assert_eq!(first["request"]["auto_merge"], false);
    assert_eq!(first["request"]["environment"], "production");
    assert_eq!(
        states(first),
        ["queued", "in_progress", "success"],
        "{first:#}"
    );
    let slipway_id = first["request"]["payload"]["slipway_deployment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let log_url = first["statuses"][0]["log_url"].as_str().unwrap();
    assert!(
        log_url.ends_with(&format!("/deployments/{slipway_id}")),
        "{log_url}"
    );
    let progress: Vec<&str> = first["statuses"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "in_progress")
        .map(|s| s["description"].as_str().unwrap())
        .collect();
    assert!(
        progress
            .last()
            .unwrap()
            .starts_with("2/2 nodes done, 0 failed"),
        "{progress:?}"
    );
    // The commit status is the update queued after the deployment's own.
    let commit_states = || -> Vec<String> {
        api.commit_statuses()
            .iter()
            .map(|c| {
                format!(
                    "{} {}",
                    c["sha"].as_str().unwrap(),
                    c["state"].as_str().unwrap()
                )
            })
            .collect()
    };
    wait_until(
        "the commit's success status",
        Duration::from_secs(30),
        || commit_states().len() >= 2,
    );
    let commits = commit_states();
    assert_eq!(
        commits,
        [format!("{SHA1} pending"), format!("{SHA1} success")]
    );

    // The audit log names the delivery that started it, and the digest.
    let events = controller.audit(&reader);
    let started: Vec<&Value> = events
        .iter()
        .filter(|e| e["event_type"] == "DEPLOY_STARTED")
        .collect();
    assert_eq!(started.len(), 1);
    assert_eq!(started[0]["actor"], format!("github-delivery:{delivery}"));
    assert_eq!(started[0]["resource_id"], slipway_id.as_str());
    let hook = events
        .iter()
        .find(|e| e["event_type"] == "GITHUB_WEBHOOK_DEPLOY")
        .unwrap();
    assert_eq!(hook["details"]["delivery"], delivery);
    assert_eq!(hook["details"]["artifact_sha256"], digest.as_str());
    assert_eq!(hook["details"]["sha"], SHA1);
    assert!(events
        .iter()
        .any(|e| e["event_type"] == "GITHUB_WEBHOOK_REFUSED" && e["resource_id"] == delivery));

    // The same delivery again: ignored, nothing deployed.
    let (status, answer) = deliver(&http, "release", delivery, &body, &sign(&body, SECRET));
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("ignored")),
        "{answer}"
    );
    // An event no trigger names: acknowledged, ignored.
    let push = api.webhook(
        "push",
        json!({ "ref": "refs/heads/main", "after": SHA2, "deleted": false,
                "repository": { "full_name": "acme/web", "name": "web" } }),
    );
    let push_body = serde_json::to_vec(&push).unwrap();
    let (status, answer) = deliver(
        &http,
        "push",
        "d0000000-0000-4000-8000-000000000002",
        &push_body,
        &sign(&push_body, SECRET),
    );
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("ignored")),
        "{answer}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        api.deployments().len(),
        1,
        "a replay or an unmatched event deployed"
    );

    // GitHub answers 500 for a while: a CLI deploy of v2 (with its commit)
    // is not held back and succeeds; GitHub gets its statuses once it is
    // back, and v1's deployment goes inactive.
    api.faults(json!([{ "path_prefix": "/repos/acme/web/", "status": 500, "count": 8 }]));
    let deployer = controller.api_token("deploy:web");
    let out = controller.deploy_version(
        &deployer,
        work.path(),
        "v2",
        APP,
        &["--wait", "--git-sha", SHA2],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(agents.iter().all(|a| a.get().as_deref() == Some("v2")));
    wait_until(
        "v2's statuses after GitHub came back",
        Duration::from_secs(60),
        || {
            let d = api.deployments();
            d.len() == 2
                && states(&d[1]).last().map(String::as_str) == Some("success")
                && states(&d[0]).last().map(String::as_str) == Some("inactive")
        },
    );
    let deployments = api.deployments();
    assert_eq!(deployments[1]["request"]["ref"], SHA2);
    assert_eq!(
        states(&deployments[1]),
        ["queued", "in_progress", "success"]
    );
    assert_eq!(
        states(&deployments[0]),
        ["queued", "in_progress", "success", "inactive"]
    );
    let failed_calls = api.log().iter().filter(|e| e["status"] == 500).count();
    assert_eq!(failed_calls, 8, "the 500s were met and retried");
    api.assert_no_violations();
}

#[test]
fn a_push_deploys_the_url_template_checked_against_its_checksums_and_the_http_api_reports_too() {
    let work = tempfile::tempdir().unwrap();
    let key = app_key(work.path());
    let api = GhApi::start(&key);
    // CI put the artifact of the pushed commit on an HTTPS server, and its
    // checksums file beside (here: on the local API's file route).
    let files = work.path().join("files");
    fs::create_dir_all(&files).unwrap();
    let v2 = artifact(work.path(), "v2", APP);
    fs::copy(&v2, files.join(format!("web-{SHA2}.tar.gz"))).unwrap();
    let digest = sha256_file(&v2);
    let server = HttpsFiles::start(work.path(), &files);
    let sums_url = api.add_file(
        &format!("SHA256SUMS-{SHA2}"),
        format!(
            "{}  other.tar.gz\n{digest}  web-{SHA2}.tar.gz\n",
            "0".repeat(64)
        )
        .as_bytes(),
    );
    let sums_template = sums_url.replace(SHA2, "{sha}");
    let url_template = server.url("web-{sha}.tar.gz");

    let token_file = work.path().join("github-token");
    fs::write(&token_file, format!("{GH_TOKEN}\n")).unwrap();
    let secret_file = work.path().join("webhook-secret");
    fs::write(&secret_file, SECRET).unwrap();
    let config = work.path().join("controller.toml");
    fs::write(
        &config,
        format!(
            "[github]\napi_url = \"{}\"\ntoken_file = \"{}\"\nwebhook_secret_file = \"{}\"\n\
             retry_min_wait = \"50ms\"\nretry_max_wait = \"300ms\"\n\
             public_url = \"https://ctl.example.com\"\n\
             [github.apps.web]\nrepo = \"acme/web\"\nenvironment = \"staging\"\n\
             [github.apps.web.trigger]\npush = [\"main\"]\n\
             [github.apps.web.artifact]\nurl = \"{url_template}\"\nchecksums_url = \"{sums_template}\"\n",
            api.base,
            token_file.display(),
            secret_file.display(),
        ),
    )
    .unwrap();
    // `validate` checks the token against the linked repository.
    let out = std::process::Command::new(crate::support::bin("slipway-controller"))
        .args(["validate", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("✓ github: acme/web (web): deployments readable"),
        "{said}"
    );
    assert!(!said.contains(GH_TOKEN), "{said}");
    // The secrets from the environment instead of files.
    let from_env = work.path().join("from-env.toml");
    let kept: String = fs::read_to_string(&config)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("token_file") && !l.starts_with("webhook_secret_file"))
        .map(|l| format!("{l}\n"))
        .collect();
    fs::write(&from_env, kept).unwrap();
    let validate_env = |vars: &[(&str, &str)]| {
        let mut c = std::process::Command::new(crate::support::bin("slipway-controller"));
        c.args(["validate", "--config"])
            .arg(&from_env)
            .env_remove("SLIPWAY_GITHUB_TOKEN")
            .env_remove("SLIPWAY_GITHUB_WEBHOOK_SECRET");
        for (k, v) in vars {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let out = validate_env(&[
        ("SLIPWAY_GITHUB_TOKEN", GH_TOKEN),
        ("SLIPWAY_GITHUB_WEBHOOK_SECRET", SECRET),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("credentials from token $SLIPWAY_GITHUB_TOKEN"),
        "{}",
        text(&out)
    );
    let out = validate_env(&[("SLIPWAY_GITHUB_WEBHOOK_SECRET", SECRET)]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("✗ github: github.token_file")
            && said.contains("$SLIPWAY_GITHUB_TOKEN is not set"),
        "{said}"
    );
    let http_ready = work.path().join("http-ready");
    let controller = Controller::start_with(&[
        "--config",
        config.to_str().unwrap(),
        "--http-listen",
        "127.0.0.1:0",
        "--http-plain",
        "--http-ready-file",
        http_ready.to_str().unwrap(),
    ]);
    let http = fs::read_to_string(&http_ready).unwrap().trim().to_owned();
    let mut agents = vec![
        Agent::enroll(&controller, "web-1"),
        Agent::enroll(&controller, "web-2"),
    ];
    for a in &mut agents {
        let mut c = fs::read_to_string(&a.config).unwrap();
        c.push_str(&format!(
            "\n[artifacts]\nca_file = \"{}\"\n",
            server.ca_pem.display()
        ));
        fs::write(&a.config, c).unwrap();
        a.run();
    }
    let reader = controller.api_token("read");
    controller.wait_online(&reader, 2, Duration::from_secs(30));

    // A body over the limit is refused before anything is read into use.
    let big = vec![b' '; 6 << 20];
    let (status, _) = http_call(
        &http,
        "POST",
        "/hooks/github",
        &[
            ("X-GitHub-Event", "push"),
            ("X-GitHub-Delivery", "big-1"),
            ("X-Hub-Signature-256", &sign(&big, SECRET)),
        ],
        &big,
    );
    assert_eq!(status, 413);

    // A push to another branch: ignored; to main: deployed.
    let push = |branch: &str| {
        api.webhook(
            "push",
            json!({ "ref": format!("refs/heads/{branch}"), "after": SHA2, "deleted": false,
                    "repository": { "full_name": "acme/web", "name": "web" } }),
        )
    };
    let dev = serde_json::to_vec(&push("dev")).unwrap();
    let (status, answer) = deliver(&http, "push", "p-1", &dev, &sign(&dev, SECRET));
    assert_eq!(
        (status, answer["status"].as_str()),
        (200, Some("ignored")),
        "{answer}"
    );
    let main = serde_json::to_vec(&push("main")).unwrap();
    let (status, answer) = deliver(&http, "push", "p-2", &main, &sign(&main, SECRET));
    assert_eq!(status, 202, "{answer}");
    wait_until("both agents on v2", Duration::from_secs(60), || {
        agents.iter().all(|a| a.get().as_deref() == Some("v2"))
    });
    wait_until(
        "the push deployment's success on GitHub",
        Duration::from_secs(30),
        || {
            api.deployments()
                .first()
                .is_some_and(|d| states(d).last().map(String::as_str) == Some("success"))
        },
    );
    let first = &api.deployments()[0];
    assert_eq!(first["request"]["ref"], SHA2);
    assert_eq!(first["request"]["environment"], "staging");
    assert_eq!(first["request"]["production_environment"], false);
    assert_eq!(states(first), ["queued", "in_progress", "success"]);
    let events = controller.audit(&reader);
    let hook = events
        .iter()
        .find(|e| e["event_type"] == "GITHUB_WEBHOOK_DEPLOY")
        .unwrap();
    assert_eq!(hook["details"]["delivery"], "p-2");
    assert_eq!(hook["details"]["artifact_sha256"], digest.as_str());
    assert_eq!(
        hook["details"]["artifact"],
        server.url(&format!("web-{SHA2}.tar.gz")).as_str()
    );

    // The HTTP API's deploy with a git_sha: a GitHub deployment too.
    let v3 = artifact(work.path(), "v3", APP);
    fs::copy(&v3, files.join("web-v3.tar.gz")).unwrap();
    let deployer = controller.api_token("deploy:web");
    let body = json!({ "sha256": sha256_file(&v3), "artifact_url": server.url("web-v3.tar.gz"),
                       "git_sha": SHA3, "release_id": "v3" })
    .to_string();
    let (status, answer) = http_call(
        &http,
        "POST",
        "/api/v1/apps/web/deploy",
        &[
            ("Authorization", &format!("Bearer {deployer}")),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    );
    assert_eq!(status, 202, "{answer}");
    wait_until("both agents on v3", Duration::from_secs(60), || {
        agents.iter().all(|a| a.get().as_deref() == Some("v3"))
    });
    wait_until("v3 on GitHub, v2 inactive", Duration::from_secs(30), || {
        let d = api.deployments();
        d.len() == 2
            && states(&d[1]).last().map(String::as_str) == Some("success")
            && states(&d[0]).last().map(String::as_str) == Some("inactive")
    });
    let second = &api.deployments()[1];
    assert_eq!(second["request"]["ref"], SHA3);
    let id = answer["deployment_id"].as_str().unwrap();
    assert_eq!(second["request"]["payload"]["slipway_deployment_id"], id);
    assert_eq!(
        second["statuses"][0]["log_url"],
        format!("https://ctl.example.com/deployments/{id}")
    );
    // Token auth: no installation token was minted.
    assert!(api.log().iter().all(|e| e["auth"] != "app-jwt"));
    api.assert_no_violations();
}

#[test]
fn a_deploy_the_restarted_controller_carries_on_ends_on_github_too() {
    let work = tempfile::tempdir().unwrap();
    let key = app_key(work.path());
    let api = GhApi::start(&key);
    api.add_commit("v2", SHA2);
    let config = work.path().join("controller.toml");
    fs::write(
        &config,
        format!(
            "[github]\napi_url = \"{}\"\napp_id = {APP_ID}\ninstallation_id = {INSTALLATION_ID}\n\
             private_key_file = \"{}\"\nretry_min_wait = \"50ms\"\nretry_max_wait = \"300ms\"\n\
             [github.apps.web]\nrepo = \"acme/web\"\n",
            api.base,
            key.display(),
        ),
    )
    .unwrap();
    let mut controller = Controller::start_with(&["--config", config.to_str().unwrap()]);
    let mut agents = vec![
        Agent::enroll(&controller, "web-1"),
        Agent::enroll(&controller, "web-2"),
    ];
    for a in &mut agents {
        a.set_start_period("8s");
        a.run();
    }
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    controller.wait_online(&reader, 2, Duration::from_secs(30));

    // A slow rolling deploy of a known commit; GitHub hears of it, then the
    // controller is stopped in the middle and started again.
    let slow = format!("import time\ntime.sleep(4)\n{APP}");
    let out = controller.deploy_version(
        &deployer,
        work.path(),
        "c1",
        &slow,
        &[
            "--git-sha",
            SHA2,
            "--strategy",
            "rolling",
            "--max-parallel",
            "1",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    wait_until(
        "the GitHub deployment in progress",
        Duration::from_secs(30),
        || {
            api.deployments()
                .first()
                .is_some_and(|d| states(d).iter().any(|s| s == "in_progress"))
        },
    );
    controller.restart();

    // The restarted controller carries the deployment on, and GitHub's
    // deployment says so, then ends in success: not left in progress.
    wait_until(
        "the GitHub deployment's success",
        Duration::from_secs(90),
        || {
            api.deployments()
                .first()
                .is_some_and(|d| states(d).last().map(String::as_str) == Some("success"))
        },
    );
    let deployments = api.deployments();
    assert_eq!(deployments.len(), 1, "{deployments:#?}");
    let carried = deployments[0]["statuses"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| {
            s["state"] == "in_progress"
                && s["description"]
                    .as_str()
                    .is_some_and(|d| d.contains("carried on by another controller replica"))
        });
    assert!(carried, "{:#}", deployments[0]);
    for a in &agents {
        assert_eq!(a.current().as_deref(), Some("c1"), "{}", a.name);
    }
}
