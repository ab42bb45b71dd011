//! A Docker app behind the agent's front (`listen`), pushed through the
//! controller to `slipway-agent run`, under a bounded load loop: ten
//! deploys, a `slipway restart`, a restart of the agent process and a
//! release that fails its gate lose no request, the public address never
//! changes, every answer comes from a deployed release; and the fleet view
//! (`slipway status`, `slipway nodes`, `/api/v1/apps`, the web page) names
//! the public address and the release receiving new connections, as the
//! agent reported it.
//!
//! Images are made with `docker import` of Debian's static busybox (nothing
//! is pulled), as in `docker.rs`, whose [`Cleanup`] removes the test's
//! containers and images whatever happens.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use crate::docker::{artifact, engine_unreachable, Cleanup};
use crate::docker_image::{busybox_image, docker_cli as docker};
use crate::http::{curl, get};
use crate::load::{Load, ANSWER_WITHIN};
use crate::support::{free_ports, sha256_file, stdout, text, Agent, Controller};

#[test]
fn pushed_docker_deploys_behind_the_front_under_load_lose_nothing() {
    const DEPLOYS: usize = 10;
    if let Some(why) = engine_unreachable() {
        eprintln!(
            "SKIPPED pushed_docker_deploys_behind_the_front_under_load_lose_nothing: no docker \
             engine ({why}); run scripts/setup-docker.sh to run it"
        );
        return;
    }
    let app = format!("fd{}", std::process::id());
    let mut cleanup = Cleanup {
        app: app.clone(),
        images: Vec::new(),
    };
    let [a, b] = free_ports::<2>();
    let controller = Controller::start_http();
    // The public address is the agent's (`agent.port`); the containers
    // take turns on the loopback pair `a`, `b`.
    let mut agent = Agent::enroll_with(&controller, "d1", &app, |root, _| {
        format!(
            r#"[apps.{app}]
root = "{root}"
keep_failed = 0

[apps.{app}.run]
driver = "docker"
image_archive = "image.tar"
container_port = 3000
ports = [{a}, {b}]
memory = "64MiB"
stop_grace = "2s"

[apps.{app}.health]
check = "http"
url = "http://127.0.0.1:{{port}}/api/health"
interval = "100ms"
successes = 2
retries = 2
start_period = "500ms"
deadline = "20s"
"#,
            root = root.display(),
        )
    });
    // `listen` goes in its app table (Agent::enroll_with picks the port).
    let config = std::fs::read_to_string(&agent.config).unwrap();
    let config = config.replacen(
        "keep_failed = 0\n",
        &format!("keep_failed = 0\nlisten = \"127.0.0.1:{}\"\n", agent.port),
        1,
    );
    std::fs::write(&agent.config, config).unwrap();
    let public = format!("127.0.0.1:{}", agent.port);
    agent.run();
    let reader = controller.api_token("read");
    let deployer = controller.api_token(&format!("deploy:{app}"));
    controller.wait_online(&reader, 1, Duration::from_secs(30));

    let work = tempfile::tempdir().unwrap();
    let mut artifacts = HashMap::new();
    let versions: Vec<(String, bool)> = (0..=DEPLOYS)
        .map(|i| (format!("v{i}"), true))
        .chain([("sick".to_owned(), false)])
        .collect();
    for (version, healthy) in &versions {
        let tag = format!("slipway-e2e-{app}:{version}");
        cleanup.images.push(tag.clone());
        busybox_image(work.path(), &tag, version, *healthy);
        artifacts.insert(version.clone(), artifact(work.path(), &tag, version));
        docker(&["rmi", &tag]);
    }
    let deploy = |version: &str| {
        let art = &artifacts[version];
        controller.slipway(
            &deployer,
            &[
                "deploy",
                &app,
                art.to_str().unwrap(),
                "--sha",
                &sha256_file(art),
                "--id",
                version,
                "--wait",
            ],
        )
    };
    let out = deploy("v0");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(agent.get().as_deref().map(str::trim), Some("v0"));
    // The container's own port is on loopback only.
    let bound = docker(&[
        "ps",
        "--filter",
        &format!("label=slipway.app={app}"),
        "--format",
        "{{.Ports}}",
    ]);
    assert!(bound.starts_with("127.0.0.1:"), "{bound}");

    // Bounded: 3 threads of new connections and 1 of keep-alive ones, at
    // most 5 min or 200,000 requests each, all to the one public address.
    let load = Load::start(agent.port, "/", 3, 1, Duration::from_secs(300), 200_000);
    let mut deployed = BTreeSet::from(["v0".to_owned()]);
    // The load loop's clock, for the timeline printed with --nocapture.
    let t0 = std::time::Instant::now();
    let at = || format!("{:.3}s", t0.elapsed().as_secs_f64());
    for i in 1..=DEPLOYS {
        let v = format!("v{i}");
        eprintln!("{}: deploying {v}", at());
        let out = deploy(&v);
        assert!(out.status.success(), "deploy {v}: {}", text(&out));
        assert!(
            stdout(&out).contains(&format!("[d1] SUCCEEDED (release {v})")),
            "{}",
            text(&out)
        );
        deployed.insert(v.clone());
        match i {
            3 => {
                eprintln!("{}: restarting {v}", at());
                // `slipway restart`: a new container of the same release,
                // switched to like a deploy.
                let out = controller.slipway(&deployer, &["restart", &app]);
                assert!(out.status.success(), "restart: {}", text(&out));
                assert!(
                    stdout(&out).contains(&format!("[d1] SUCCEEDED (release {v})")),
                    "{}",
                    text(&out)
                );
            }
            5 => {
                eprintln!("{}: restarting the agent", at());
                // The agent process goes away and comes back; the front
                // (a process of its own) keeps the address.
                agent.stop_run();
                std::thread::sleep(Duration::from_millis(500));
                agent.run();
                controller.wait_online(&reader, 1, Duration::from_secs(30));
            }
            7 => {
                eprintln!("{}: deploying sick", at());
                // A release that fails its gate: the old one keeps all
                // traffic and the deployment is reported failed.
                let out = deploy("sick");
                assert_eq!(out.status.code(), Some(1), "{}", text(&out));
                assert!(stdout(&out).contains("[d1] ROLLED_BACK"), "{}", text(&out));
                assert_eq!(agent.current().as_deref(), Some(v.as_str()));
                let (code, deployments) = get(
                    &controller,
                    &reader,
                    &format!("/api/v1/deployments?app={app}&limit=1"),
                );
                assert_eq!(code, 200, "{deployments:#}");
                assert_eq!(deployments[0]["release_id"], "sick", "{deployments:#}");
                assert_eq!(deployments[0]["status"], "failed", "{deployments:#}");
            }
            _ => {}
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let report = load.stop();
    eprintln!(
        "{DEPLOYS} pushed docker deploys behind the front, a restart, an agent restart and a failed gate under load: {}",
        report.summary()
    );
    assert_eq!(
        report.failures(),
        0,
        "requests not answered within {ANSWER_WITHIN:?}: {}\nfront log:\n{}\nagent log:\n{}",
        report.summary(),
        std::fs::read_to_string(agent.root.join(".slipway/run/front.log")).unwrap_or_default(),
        std::fs::read_to_string(agent.dir.path().join("agent.log")).unwrap_or_default()
    );
    assert!(report.ok > 500, "too little load: {}", report.summary());
    let seen: BTreeSet<String> = report.bodies.iter().map(|b| b.trim().to_owned()).collect();
    assert!(
        seen.is_subset(&deployed),
        "answers from a release never deployed (or failed): {seen:?}"
    );
    let last = format!("v{DEPLOYS}");
    assert_eq!(agent.current().as_deref(), Some(last.as_str()));
    assert_eq!(agent.get().as_deref().map(str::trim), Some(last.as_str()));

    // The fleet view: what the agent reports (a fresh heartbeat first).
    let out = controller.slipway(&reader, &["status", "--refresh", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let summary = status["apps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["app"] == app.as_str())
        .unwrap();
    let on = &summary["public"][0];
    assert_eq!(on["node"], "d1", "{status:#}");
    assert_eq!(on["address"], public.as_str(), "{status:#}");
    assert_eq!(on["mode"], "agent_proxy", "{status:#}");
    assert_eq!(on["release"], last.as_str(), "{status:#}");
    let backend = on["backend"].as_str().unwrap();
    assert!(
        [format!("127.0.0.1:{a}"), format!("127.0.0.1:{b}")].contains(&backend.to_owned()),
        "{status:#}"
    );
    // These agents' fronts have no `nft` (support::NO_NFT): the agent says
    // why, and the fleet view carries it.
    let forwarding = on["forwarding"].as_str().unwrap_or_default().to_owned();
    assert!(
        forwarding.starts_with("not kernel-forwarded: ") && forwarding.contains("nft"),
        "{status:#}"
    );
    let out = controller.slipway(&reader, &["status"]);
    assert!(
        stdout(&out).contains(&format!(
            "public on d1: {public} (agent proxy): new connections go to {last} on {backend}"
        )) && stdout(&out).contains(&forwarding),
        "{}",
        text(&out)
    );
    let out = controller.slipway(&reader, &["nodes", "--json"]);
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(nodes[0]["apps"][0]["public"]["address"], public.as_str());
    assert_eq!(nodes[0]["apps"][0]["public"]["release"], last.as_str());
    let out = controller.slipway(&reader, &["nodes"]);
    assert!(
        stdout(&out).contains(&format!("{public}→{last}")),
        "{}",
        text(&out)
    );
    let (code, apps) = get(&controller, &reader, "/api/v1/apps");
    assert_eq!(code, 200, "{apps:#}");
    let node = &apps[0]["nodes"][0];
    assert_eq!(node["public"]["address"], public.as_str(), "{apps:#}");
    assert_eq!(node["public"]["mode"], "agent_proxy", "{apps:#}");
    assert_eq!(node["public"]["release"], last.as_str(), "{apps:#}");
    assert_eq!(
        node["public"]["forwarding"],
        forwarding.as_str(),
        "{apps:#}"
    );
    let (code, nodes) = get(&controller, &reader, "/api/v1/nodes");
    assert_eq!(code, 200, "{nodes:#}");
    assert_eq!(nodes[0]["apps"][0]["public"]["release"], last.as_str());
    // The fleet page, as a browser with the read token's session sees it.
    let jar = work.path().join("jar");
    let login = format!("{}/login", controller.http_url());
    let (code, _) = curl(
        &controller,
        &[
            "-c",
            jar.to_str().unwrap(),
            "--data-urlencode",
            &format!("token={reader}"),
            &login,
        ],
    );
    assert!((200..400).contains(&code), "login: {code}");
    let (code, page) = curl(
        &controller,
        &[
            "-b",
            jar.to_str().unwrap(),
            &format!("{}/", controller.http_url()),
        ],
    );
    assert_eq!(code, 200, "{page}");
    assert!(page.contains(&format!("{public} → {last}")), "{page}");
    let (code, page) = curl(
        &controller,
        &[
            "-b",
            jar.to_str().unwrap(),
            &format!("{}/apps/{app}", controller.http_url()),
        ],
    );
    assert_eq!(code, 200, "{page}");
    assert!(
        page.contains(&format!(
            "{public} (agent proxy): new connections go to {last}"
        )),
        "{page}"
    );

    agent.stop_run();
    drop(agent);
    drop(cleanup);
}
