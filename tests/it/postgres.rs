//! The controller on PostgreSQL (`--database-url`, here through
//! `SLIPWAY_DATABASE_URL`): enrollment and a deploy through the real
//! binaries against a private PostgreSQL server of this test process, two
//! controllers migrating one empty database at once, two replicas with
//! data dirs of their own sharing artifacts (in the database or an
//! `artifact_dir`), the errors of a bad or unreachable `database_url`
//! (never showing its password), and replicas on it: sessions seen through
//! any replica, a replica starting mid-rollout leaving it alone, a dead
//! replica's rollout failed by another once the liveness window has
//! passed; commands through a replica without the nodes' sessions reaching
//! them through the one that holds them; and PostgreSQL crashed for 20 s
//! under two replicas and their agents: apps serving throughout, the CLI
//! failing promptly naming the database, both replicas recovering on their
//! own; and for 20 s in the middle of a rolling deploy: it waits for the
//! database and completes, each node deployed once, its record and audit
//! log complete, no takeover.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::process::Command;
use std::time::Duration;

use crate::replicas::{
    commands_reach_the_nodes_through_the_holder, deployment_events, ended_deployment_events,
    start_rolling,
};
use crate::support::{
    artifact, bin, free_port, sha256_file, text, wait_until, Agent, Controller, APP,
};
use crate::test_postgres;

/// A fresh database of the test server; panics (failing the test) when
/// PostgreSQL cannot run here, `None` when `SLIPWAY_TEST_NO_POSTGRES=1`.
fn database() -> Option<String> {
    if test_postgres::skipped() {
        eprintln!("{}=1: PostgreSQL test skipped", test_postgres::SKIP_ENV);
        return None;
    }
    Some(test_postgres::database_url().unwrap_or_else(|e| panic!("test PostgreSQL: {e}")))
}

#[test]
fn a_controller_on_postgres_enrolls_agents_and_deploys() {
    let Some(url) = database() else { return };
    let http = tempfile::tempdir().unwrap();
    let http_ready = http.path().join("http-ready");
    let mut controller = Controller::start_postgres(
        &url,
        &[
            "--http-listen",
            "127.0.0.1:0",
            "--http-ready-file",
            http_ready.to_str().unwrap(),
        ],
    );
    let mut agents = Agent::enroll_all(&controller, &["p1", "p2"]);
    for a in &mut agents {
        a.run();
    }
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    controller.wait_online(&reader, 2, Duration::from_secs(30));

    let work = tempfile::tempdir().unwrap();
    let out = controller.deploy_version(
        &deployer,
        work.path(),
        "v1",
        crate::support::APP,
        &["--wait"],
    );
    assert!(out.status.success(), "{}", text(&out));
    for a in &agents {
        assert_eq!(
            a.get().as_deref(),
            Some("v1"),
            "{} does not serve v1",
            a.name
        );
    }
    // Ready: the database answers and its schema is this build's.
    let addr = fs::read_to_string(&http_ready).unwrap();
    let (code, body) =
        crate::http::curl(&controller, &[&format!("https://{}/readyz", addr.trim())]);
    assert_eq!(code, 200, "{body}");
    // The store is the PostgreSQL database: no SQLite file was made.
    assert!(!controller.data_dir().join("controller.db").exists());

    // A restart finds the nodes, their identities and the history there.
    controller.restart();
    controller.wait_online(&reader, 2, Duration::from_secs(30));
    let kinds: Vec<String> = controller
        .audit(&reader)
        .iter()
        .map(|e| e["event_type"].as_str().unwrap_or_default().to_owned())
        .collect();
    for kind in ["NODE_ENROLLED", "DEPLOY_STARTED", "DEPLOY_COMPLETED"] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {kinds:?}");
    }

    // `backup` covers the SQLite store only, and says what to do instead.
    let pass = work.path().join("passphrase");
    fs::write(&pass, "correct horse battery\n").unwrap();
    let out = controller.cli(&[
        "backup",
        "--out",
        work.path().join("b.age").to_str().unwrap(),
        "--passphrase-file",
        pass.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("pg_dump"), "{}", text(&out));
}

#[test]
fn an_artifact_uploaded_to_one_replica_is_deployed_through_another() {
    let Some(url) = database() else { return };
    // The artifacts go to the database.
    let shared = upload_to_one_replica_deploy_through_another(&url, &[]);
    assert!(shared.is_none());
}

#[test]
fn replicas_share_artifacts_through_artifact_dir() {
    let Some(url) = database() else { return };
    let dir = tempfile::tempdir().unwrap();
    let shared_dir = dir.path().join("shared");
    let flags = ["--artifact-dir", shared_dir.to_str().unwrap()];
    let sha = upload_to_one_replica_deploy_through_another(&url, &flags).unwrap();
    // There, whole and under its digest; no temp file left.
    let stored = shared_dir.join("artifacts").join(&sha);
    assert_eq!(sha256_file(&stored), sha);
    assert_eq!(
        fs::read_dir(shared_dir.join("artifacts")).unwrap().count(),
        1
    );
}

/// Two replicas (`serve_args`) with data dirs of their own on the database
/// at `url`, each caching the shared artifacts: an artifact uploaded
/// through one is deployed through the other. The artifact's sha256 when
/// `serve_args` name an `--artifact-dir`.
fn upload_to_one_replica_deploy_through_another(url: &str, serve_args: &[&str]) -> Option<String> {
    let a = Controller::start_postgres(url, serve_args);
    let b = a.postgres_replica(serve_args);
    assert_ne!(a.data_dir(), b.data_dir());
    let mut agents = Agent::enroll_all(&b, &["r1", "r2"]);
    for agent in &mut agents {
        agent.run();
    }
    let reader = b.api_token("read");
    let deployer = b.api_token("deploy:web");
    b.wait_online(&reader, 2, Duration::from_secs(30));

    let work = tempfile::tempdir().unwrap();
    let art = artifact(work.path(), "v1", APP);
    let sha = sha256_file(&art);
    let cached = |c: &Controller| c.data_dir().join("artifacts").join(&sha);
    // Uploaded through A, selecting no node: A stores the artifact and
    // refuses to start a deployment of nothing.
    let out = a.deploy_web(&deployer, &art, &sha, "v1", &["--tag", "env:nowhere"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("uploaded"), "{}", text(&out));
    assert!(cached(&a).exists());
    assert!(!cached(&b).exists());
    // Deployed through B, which finds it stored (the CLI sends no bytes)
    // and, when the agent asks, fetches it from the database into its
    // cache, checking the digest.
    let out = b.deploy_web(&deployer, &art, &sha, "v1", &["--node", "r1", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("already on the controller"),
        "{}",
        text(&out)
    );
    assert_eq!(agents[0].get().as_deref(), Some("v1"));
    assert_eq!(sha256_file(&cached(&b)), sha);

    assert_eq!(agents[1].get(), None);

    // B's cached copy corrupted on disk: the next agent to fetch it (r2,
    // which has no copy of its own) is never sent it; B drops it and
    // fetches it from the database again.
    let mut bytes = fs::read(cached(&b)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(cached(&b), &bytes).unwrap();
    let out = b.deploy_web(&deployer, &art, &sha, "v1", &["--node", "r2", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(agents[1].get().as_deref(), Some("v1"));
    assert_eq!(sha256_file(&cached(&b)), sha);
    let log = fs::read_to_string(b.dir.path().join("controller.log")).unwrap();
    assert!(
        log.contains("cached artifact does not match its digest"),
        "{log}"
    );
    serve_args.contains(&"--artifact-dir").then_some(sha)
}

#[test]
fn two_controllers_on_one_empty_database_both_start() {
    let Some(url) = database() else { return };
    // Replicas share the key file environments are sealed under.
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("secrets.key");
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&key)
        .unwrap()
        .write_all(format!("{}\n", "ab".repeat(32)).as_bytes())
        .unwrap();
    let key = key.to_str().unwrap().to_owned();
    let controllers: Vec<Controller> = std::thread::scope(|scope| {
        let starts: Vec<_> = (0..2)
            .map(|_| scope.spawn(|| Controller::start_postgres(&url, &["--secrets-key", &key])))
            .collect();
        starts.into_iter().map(|s| s.join().unwrap()).collect()
    });
    // Both answer, from the one database.
    let token = controllers[0].api_token("read");
    for c in &controllers {
        let out = c.slipway(&token, &["nodes", "--json"]);
        assert!(out.status.success(), "{}", text(&out));
    }
}

#[test]
fn a_bad_database_url_is_refused_naming_the_setting_and_hiding_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let serve = |extra: &[&str]| {
        Command::new(bin("slipway-controller"))
            .arg("serve")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(extra)
            .output()
            .unwrap()
    };
    let out = serve(&["--database-url", "mysql://slipway:hunter2@db/slipway"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let err = text(&out);
    assert!(err.contains("database_url"), "{err}");
    assert!(err.contains("expected postgres://"), "{err}");
    assert!(err.contains("slipway:***@db"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");

    let config = dir.path().join("controller.toml");
    fs::write(
        &config,
        "database_url = \"postgres://slipway:hunter2@db:notaport/x\"\n",
    )
    .unwrap();
    let out = serve(&["--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let err = text(&out);
    assert!(
        err.contains("database_url") && err.contains("not a PostgreSQL URL"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");

    // Well formed but nothing answers: a start failure (1), password hidden.
    let port = free_port();
    let out = Command::new(bin("slipway-controller"))
        .args(["token", "list", "--data-dir"])
        .arg(dir.path().join("data"))
        .env(
            "SLIPWAY_DATABASE_URL",
            format!("postgres://slipway:hunter2@127.0.0.1:{port}/slipway"),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = text(&out);
    assert!(
        err.contains(&format!("slipway:***@127.0.0.1:{port}")),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn replicas_on_postgres_share_sessions_and_take_over_only_a_dead_replicas_rollout() {
    let Some(url) = database() else { return };
    let mut a = Controller::start_postgres(&url, &[]);
    let b = a.replica();
    let reader = a.api_token("read");
    let deployer = a.api_token("deploy:web");
    // Both agents know replica a only.
    let mut agents = Agent::enroll_all(&a, &["q1", "q2"]);
    for agent in &mut agents {
        agent.set_start_period("8s");
        agent.run();
    }
    a.wait_online(&reader, 2, Duration::from_secs(60));
    b.wait_online(&reader, 2, Duration::from_secs(10));

    // A replica starting mid-rollout leaves it to a: it completes.
    let work = tempfile::tempdir().unwrap();
    let first = start_rolling(&a, &deployer, work.path(), "p1");
    let c = a.replica();
    let events = ended_deployment_events(&c, &reader, &first);
    assert!(
        events.iter().any(|e| e["event_type"] == "DEPLOY_COMPLETED")
            && !events.iter().any(|e| e["event_type"] == "DEPLOY_FAILED"),
        "{events:#?}"
    );

    // a dies mid-rollout (kill -9): once it is unseen past the liveness
    // window (15 s), another replica takes its deployment over, naming it.
    // The agents know only a: the node in flight never answers the new
    // owner and is failed after the reconnect grace; the rollout stops.
    let second = start_rolling(&a, &deployer, work.path(), "p2");
    std::thread::sleep(Duration::from_secs(1));
    a.kill();
    let killed = std::time::Instant::now();
    let mut taken = None;
    wait_until(
        "the dead replica's deploy to be taken over",
        Duration::from_secs(60),
        || {
            taken = deployment_events(&b, &reader, &second)
                .into_iter()
                .find(|e| e["event_type"] == "DEPLOY_TAKEN_OVER");
            taken.is_some()
        },
    );
    let waited = killed.elapsed();
    // Not before the window: a live replica's rollout is never taken.
    assert!(waited >= Duration::from_secs(9), "taken after {waited:?}");
    let taken = taken.unwrap();
    assert_ne!(
        taken["details"]["from_replica"], taken["details"]["to_replica"],
        "{taken:#}"
    );
    let mut failed = None;
    wait_until(
        "the taken-over deploy to fail on its unreachable node",
        Duration::from_secs(60),
        || {
            failed = deployment_events(&b, &reader, &second)
                .into_iter()
                .find(|e| e["event_type"] == "DEPLOY_FAILED");
            failed.is_some()
        },
    );
    let failed = failed.unwrap();
    let why = failed["error_message"].as_str().unwrap_or_default();
    assert!(
        why.contains("connection lost during the command"),
        "{failed:#}"
    );
    // Its nodes show offline through b once a is dead.
    b.wait_online(&reader, 0, Duration::from_secs(10));
}

#[test]
fn commands_through_a_postgres_replica_without_the_sessions_reach_the_nodes() {
    let Some(url) = database() else { return };
    let a = Controller::start_postgres(&url, &[]);
    let b = a.replica();
    commands_reach_the_nodes_through_the_holder(&a, b);
}

/// `--http-listen` on a port the kernel picks, written to `ready`.
fn http_flags(ready: &std::path::Path) -> [String; 4] {
    [
        "--http-listen".to_owned(),
        "127.0.0.1:0".to_owned(),
        "--http-ready-file".to_owned(),
        ready.to_str().unwrap().to_owned(),
    ]
}

/// The HTTP status of `/readyz` on the listener written to `ready`.
fn readyz(controller: &Controller, ready: &std::path::Path) -> u16 {
    let addr = fs::read_to_string(ready).unwrap();
    crate::http::curl(controller, &[&format!("https://{}/readyz", addr.trim())]).0
}

/// What the outage tests start with: a PostgreSQL server of the test's
/// own and two replicas on it, each with its HTTP API (`ready_a`,
/// `ready_b` its ready files), and a read and a `deploy:web` token.
struct OutageSetup {
    pg: test_postgres::OwnServer,
    _ready: tempfile::TempDir,
    ready_a: std::path::PathBuf,
    ready_b: std::path::PathBuf,
    a: Controller,
    b: Controller,
    reader: String,
    deployer: String,
}

fn outage_setup() -> OutageSetup {
    // A server of the test's own: the others' keeps running. Commits
    // acknowledged before a crash must survive it, as on a real server:
    // the test servers' `synchronous_commit=off` loses the last few
    // hundred milliseconds (e.g. the end of a deploy just before the
    // crash, leaving it "running" and the app blocked).
    let pg = test_postgres::OwnServer::start(&[("synchronous_commit", "on")])
        .unwrap_or_else(|e| panic!("test PostgreSQL: {e}"));
    let url = pg.database_url().unwrap();
    let ready = tempfile::tempdir().unwrap();
    let (ready_a, ready_b) = (ready.path().join("a"), ready.path().join("b"));
    let flags_a = http_flags(&ready_a);
    let flags_b = http_flags(&ready_b);
    let a = Controller::start_postgres(&url, &flags_a.each_ref().map(String::as_str));
    let b = a.postgres_replica(&flags_b.each_ref().map(String::as_str));
    let reader = a.api_token("read");
    let deployer = a.api_token("deploy:web");
    OutageSetup {
        pg,
        _ready: ready,
        ready_a,
        ready_b,
        a,
        b,
        reader,
        deployer,
    }
}

#[test]
fn a_postgres_outage_keeps_apps_serving_and_the_replicas_recover_on_their_own() {
    use std::time::Instant;
    if test_postgres::skipped() {
        eprintln!("{}=1: PostgreSQL test skipped", test_postgres::SKIP_ENV);
        return;
    }
    let OutageSetup {
        mut pg,
        _ready,
        ready_a,
        ready_b,
        a,
        b,
        reader,
        deployer,
    } = outage_setup();
    // One agent enrolled through each replica, both listing both.
    let mut agents = vec![Agent::enroll(&a, "o1"), Agent::enroll(&b, "o2")];
    let urls = [a.https_url(), b.https_url()];
    agents[0].set_controller_urls(&urls);
    agents[1].set_controller_urls(&[urls[1].clone(), urls[0].clone()]);
    for agent in &mut agents {
        agent.run();
    }
    a.wait_online(&reader, 2, Duration::from_secs(60));
    b.wait_online(&reader, 2, Duration::from_secs(10));
    // Each deployed through the replica holding its session (agents pick
    // one of their list).
    let holder = |agent: &Agent| {
        let on = crate::replicas::connected_to(agent, Duration::from_secs(30));
        if on == urls[0] {
            &a
        } else {
            &b
        }
    };
    let work = tempfile::tempdir().unwrap();
    // Deploys `version` to each agent through the replica holding its
    // session; on a failure the replicas' last log lines come first.
    let deploy_each = |version: &str| {
        for agent in &agents {
            let out = holder(agent).deploy_version(
                &deployer,
                work.path(),
                version,
                APP,
                &["--node", &agent.name, "--wait"],
            );
            if !out.status.success() {
                for c in [&a, &b] {
                    let log = fs::read_to_string(c.dir.path().join("controller.log")).unwrap();
                    let tail: Vec<&str> = log.lines().rev().take(60).collect();
                    let tail: Vec<&str> = tail.into_iter().rev().collect();
                    eprintln!(
                        "---- the last lines of a replica's log\n{}",
                        tail.join("\n")
                    );
                }
            }
            assert!(out.status.success(), "{}", text(&out));
            assert_eq!(agent.get().as_deref(), Some(version), "{}", agent.name);
        }
    };
    deploy_each("v1");
    for agent in &agents {
        assert_eq!(agent.get().as_deref(), Some("v1"), "{}", agent.name);
    }
    assert_eq!(readyz(&a, &ready_a), 200);
    assert_eq!(readyz(&b, &ready_b), 200);

    let connects = |agent: &Agent| {
        fs::read_to_string(agent.dir.path().join("agent.log"))
            .unwrap_or_default()
            .matches("connected to the controller")
            .count()
    };
    let connects_before: Vec<usize> = agents.iter().map(connects).collect();
    let v3 = artifact(work.path(), "v3", APP);
    let v3_sha = sha256_file(&v3);

    // PostgreSQL stops as by a crash, for 20 s.
    pg.crash().unwrap();
    let down = Instant::now();
    // The apps answer the whole time, probed while the CLI, in another
    // thread, fails promptly naming the database (no panic, no hang) and
    // /readyz says not ready.
    let mut probes = 0;
    let mut failures = Vec::new();
    std::thread::scope(|scope| {
        let cli = scope.spawn(|| {
            let checks: [(&Controller, &str, Vec<&str>); 2] = [
                (&a, &reader, vec!["status"]),
                (
                    &b,
                    &deployer,
                    vec![
                        "deploy",
                        "web",
                        v3.to_str().unwrap(),
                        "--sha",
                        &v3_sha,
                        "--id",
                        "v3",
                        "--node",
                        "o2",
                    ],
                ),
            ];
            for (c, token, args) in &checks {
                let t = Instant::now();
                let out = c.slipway(token, args);
                let took = t.elapsed();
                let said = text(&out);
                eprintln!(
                    "`slipway {}` with PostgreSQL down ({took:?}): {said}",
                    args.join(" ")
                );
                assert!(!out.status.success(), "{said}");
                assert!(took < Duration::from_secs(15), "took {took:?}: {said}");
                assert!(said.contains("database does not answer"), "{said}");
                assert!(!said.contains("panicked"), "{said}");
            }
            assert_eq!(readyz(&a, &ready_a), 503, "/readyz with the database down");
            // The HTTP API: 503 naming the database, with Retry-After (not
            // a 500, nor a 401 from the token check that could not run).
            let t = Instant::now();
            let addr = fs::read_to_string(&ready_b).unwrap();
            let (code, body) = crate::http::curl(
                &a,
                &[
                    "-H",
                    &format!("Authorization: Bearer {reader}"),
                    "-D",
                    "-",
                    &format!("https://{}/api/v1/nodes", addr.trim()),
                ],
            );
            eprintln!(
                "GET /api/v1/nodes with PostgreSQL down ({:?}): {code} {body}",
                t.elapsed()
            );
            assert_eq!(code, 503, "{body}");
            assert!(body.contains("database does not answer"), "{body}");
            assert!(
                body.to_ascii_lowercase().contains("retry-after: 5"),
                "{body}"
            );
            assert!(
                t.elapsed() < Duration::from_secs(15),
                "took {:?}",
                t.elapsed()
            );
        });
        while down.elapsed() < Duration::from_secs(20) {
            for agent in &agents {
                probes += 1;
                let got = agent.get();
                if got.as_deref() != Some("v1") {
                    failures.push(format!("{} at {:?}: {got:?}", agent.name, down.elapsed()));
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        cli.join().unwrap();
    });
    pg.resume().unwrap();
    let outage = down.elapsed();
    assert!(probes >= 40, "only {probes} probes in {outage:?}");
    assert!(
        failures.is_empty(),
        "{} of {probes} probes failed: {failures:#?}",
        failures.len()
    );

    // Both replicas recover without a restart.
    for (c, ready) in [(&a, &ready_a), (&b, &ready_b)] {
        wait_until("/readyz OK again", Duration::from_secs(30), || {
            readyz(c, ready) == 200
        });
        wait_until(
            "`slipway status` to work again",
            Duration::from_secs(30),
            || c.slipway(&reader, &["status"]).status.success(),
        );
    }
    // The agents kept their sessions or came back.
    a.wait_online(&reader, 2, Duration::from_secs(60));
    b.wait_online(&reader, 2, Duration::from_secs(10));
    for (agent, before) in agents.iter().zip(&connects_before) {
        let link = agent.link();
        assert!(link["connected_to"].is_string(), "{}: {link}", agent.name);
        eprintln!(
            "{}: {} new session(s) since the outage began",
            agent.name,
            connects(agent) - before
        );
    }
    // Deploys work again, through either replica.
    deploy_each("v2");
    // Neither took the other for dead because its record went stale while
    // the database was down.
    for c in [&a, &b] {
        let log = fs::read_to_string(c.dir.path().join("controller.log")).unwrap();
        assert!(!log.contains("controller replica that is gone"), "{log}");
        assert!(log.contains("judging no other replica dead"), "{log}");
    }
}

/// A rolling deploy (one node at a time, seconds each) through replica a
/// while PostgreSQL crashes for 20 s after the first node's result: the
/// rollout waits until it can record the results that came in meanwhile,
/// then carries on; it succeeds as it would have, each agent runs its
/// command once, the record and the audit log are complete and in order,
/// and replica b never takes it over.
#[test]
fn a_rolling_deploy_running_through_a_postgres_outage_completes_once_per_node() {
    use std::time::Instant;
    if test_postgres::skipped() {
        eprintln!("{}=1: PostgreSQL test skipped", test_postgres::SKIP_ENV);
        return;
    }
    let OutageSetup {
        mut pg,
        _ready,
        ready_a,
        ready_b,
        a,
        b,
        reader,
        deployer,
    } = outage_setup();
    // Four agents, every other one on replica b: a runs the rollout and
    // reaches b's through the database (routed commands and answers); b is
    // also the replica that would take the rollout over if it judged a
    // dead.
    let mut agents: Vec<Agent> = ["u1", "u2", "u3", "u4"]
        .iter()
        .enumerate()
        .map(|(i, name)| Agent::enroll(if i % 2 == 0 { &a } else { &b }, name))
        .collect();
    for agent in &mut agents {
        agent.set_start_period("8s");
        agent.run();
    }
    a.wait_online(&reader, 4, Duration::from_secs(60));
    b.wait_online(&reader, 4, Duration::from_secs(10));

    // One node at a time, each taking seconds to come up: the rollout
    // spans the outage. Followed to its end by the CLI, in the background.
    let work = tempfile::tempdir().unwrap();
    let slow = crate::replicas::slow_app();
    let started = Instant::now();
    let (out, outage) = std::thread::scope(|scope| {
        let cli = scope.spawn(|| {
            a.deploy_version(
                &deployer,
                work.path(),
                "v1",
                &slow,
                &[
                    "--strategy",
                    "rolling",
                    "--max-parallel",
                    "1",
                    "--wait",
                    "--json",
                ],
            )
        });
        // The first node's result in: PostgreSQL stops as by a crash, for
        // 20 s, while the next nodes deploy: the next node's result comes
        // in well within it (about 5 s), and its write waits 5 s for a
        // connection and fails (or, the crash a moment before that node
        // fetched its artifact, the fetch is refused Unavailable).
        wait_until("the first node's result", Duration::from_secs(60), || {
            agents.iter().any(|agent| {
                fs::read_to_string(agent.state_dir().join("commands.json"))
                    .is_ok_and(|t| t.contains("\"command_id\""))
            })
        });
        pg.crash().unwrap();
        let down = Instant::now();
        eprintln!("PostgreSQL down {:?} into the deploy", started.elapsed());
        assert!(!cli.is_finished(), "the deploy ended before the outage");
        std::thread::sleep(Duration::from_secs(20));
        // Three nodes of about 5 s each were left: without waiting for the
        // database the rollout would have ended by now (or failed).
        let ended_without_the_database = cli.is_finished();
        pg.resume().unwrap();
        let outage = down.elapsed();
        let out = cli.join().unwrap();
        assert!(
            !ended_without_the_database,
            "the deploy ended while PostgreSQL was down: {}",
            text(&out)
        );
        (out, outage)
    });
    eprintln!(
        "the deploy took {:?} (PostgreSQL down for {outage:?}): {}",
        started.elapsed(),
        text(&out)
    );
    let dump_logs = || {
        for c in [&a, &b] {
            let log = fs::read_to_string(c.dir.path().join("controller.log")).unwrap();
            let tail: Vec<&str> = log.lines().rev().take(150).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!("---- a replica's log, last lines\n{}", tail.join("\n"));
        }
    };
    if !out.status.success() {
        dump_logs();
    }
    assert!(out.status.success(), "{}", text(&out));
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["succeeded"], true, "{done:#}");
    let id = done["deployment_id"].as_str().unwrap().to_owned();

    // The audit log: started, completed, in order; never taken over
    // (neither replica died) nor failed.
    let events =
        crate::replicas::in_order(crate::replicas::ended_deployment_events(&b, &reader, &id));
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(kinds, ["DEPLOY_STARTED", "DEPLOY_COMPLETED"], "{events:#?}");
    assert_eq!(
        events[1]["details"]["failed_nodes"],
        serde_json::json!([]),
        "{events:#?}"
    );
    // Every node ran the deployment's command once and serves v1.
    for agent in &agents {
        let commands = crate::replicas::ledger_commands_of(agent, &id);
        assert_eq!(commands.len(), 1, "{}: {commands:?}", agent.name);
        assert_eq!(
            crate::replicas::ledger_runs(agent, &commands[0]),
            1,
            "{} ran {} more than once",
            agent.name,
            commands[0]
        );
        assert_eq!(agent.current().as_deref(), Some("v1"), "{}", agent.name);
        assert_eq!(agent.get().as_deref(), Some("v1"), "{}", agent.name);
    }
    // The record shows every node's result, also those that came in while
    // the database was down.
    wait_until(
        "`slipway status` to work again",
        Duration::from_secs(30),
        || b.slipway(&reader, &["status"]).status.success(),
    );
    let status = b.slipway(&reader, &["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    let last = &status["apps"][0]["last_deployment"];
    assert_eq!(last["id"], id.as_str(), "{status:#}");
    assert_eq!(last["status"], "succeeded", "{status:#}");
    let outcomes: Vec<&str> = last["nodes"]
        .as_array()
        .unwrap_or_else(|| panic!("no nodes in {status:#}"))
        .iter()
        .map(|n| n["outcome"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(outcomes, ["succeeded"; 4], "{status:#}");
    // Where the outage met the rollout (it depends on the moment): a's
    // write of a node's result, a's command for a node of b (found through
    // the database), b's write of the answer of such a node for a (when
    // its router was not itself waiting), an agent's artifact fetch
    // (answered Unavailable and asked again).
    let log_a = fs::read_to_string(a.dir.path().join("controller.log")).unwrap();
    let log_b = fs::read_to_string(b.dir.path().join("controller.log")).unwrap();
    let waits = [
        (
            "a waited to record a result",
            log_a.contains("the rollout waits until the node's result is recorded"),
        ),
        (
            "a's command waited to find b's session",
            log_a.contains("the command waits for it to find the node's session"),
        ),
        (
            "b wrote a routed answer again",
            log_b.contains("the database does not answer; trying again"),
        ),
        (
            "a fetch was asked again",
            log_a.contains("agent request not served: the database does not answer")
                || log_b.contains("agent request not served: the database does not answer"),
        ),
    ];
    eprintln!("where the rollout waited for the database: {waits:?}");
    // Both replicas ready again; neither took the other for dead.
    for (c, ready) in [(&a, &ready_a), (&b, &ready_b)] {
        wait_until("/readyz OK again", Duration::from_secs(30), || {
            readyz(c, ready) == 200
        });
        let log = fs::read_to_string(c.dir.path().join("controller.log")).unwrap();
        assert!(!log.contains("controller replica that is gone"), "{log}");
        assert!(
            !log.contains("took over a dead replica's deployment"),
            "{log}"
        );
        // Because each, renewing its record after the gap, judged no
        // other replica dead for one liveness window.
        assert!(log.contains("judging no other replica dead"), "{log}");
    }
    // The next deploy works as usual.
    let out = b.deploy_version(&deployer, work.path(), "v2", APP, &["--wait"]);
    if !out.status.success() {
        dump_logs();
    }
    assert!(out.status.success(), "{}", text(&out));
}
