//! Prometheus metrics of a real fleet: a controller and three agent
//! processes over real mTLS, a rolling deploy pushed by the controller,
//! then the metrics checked by `promtool check metrics` (Debian's
//! prometheus package, installed by scripts/test.sh) and against the fleet
//! view, through both doors: `GET /metrics` of `serve --http-listen`
//! (HTTPS, an API token with read scope; or no token from loopback with
//! `--metrics-loopback-no-auth`) and `slipway-controller metrics` (the
//! database's view, for node_exporter's textfile collector).

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{text, wait_until, Agent, Controller, APP};

/// `promtool check metrics` on `exposition`: its exit status and output.
pub(crate) fn promtool_check(exposition: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; scripts/test.sh installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), text(&out))
}

/// The value of the sample `series` (name and labels, exactly as
/// written) in `exposition`.
pub(crate) fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A controller serving HTTP too (`--http-listen 127.0.0.1:0` plus
/// `extra`), and the base URL of its HTTP listener.
pub(crate) fn controller_with_http(extra: &[&str]) -> (Controller, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("http-ready");
    let mut args = vec![
        "--http-listen",
        "127.0.0.1:0",
        "--http-ready-file",
        ready.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let controller = Controller::start_with(&args);
    let mut addr = String::new();
    wait_until("the HTTP ready file", Duration::from_secs(30), || {
        addr = std::fs::read_to_string(&ready).unwrap_or_default();
        addr.ends_with('\n')
    });
    let scheme = if extra.contains(&"--http-plain") {
        "http"
    } else {
        "https"
    };
    (controller, format!("{scheme}://{}", addr.trim()), dir)
}

/// `curl` GET of `url` (trusting the controller's CA) with `token` if
/// given: (HTTP status, Content-Type, body).
pub(crate) fn get(
    controller: &Controller,
    url: &str,
    token: Option<&str>,
) -> (u16, String, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "30",
        "-o",
        "-",
        "-w",
        "\n%{http_code} %{content_type}",
    ])
    .arg("--cacert")
    .arg(controller.ca_pem());
    if let Some(token) = token {
        cmd.arg("-H").arg(format!("Authorization: Bearer {token}"));
    }
    let out = cmd.arg(url).output().unwrap();
    assert!(out.status.success(), "curl {url}: {}", text(&out));
    let all = String::from_utf8(out.stdout).unwrap();
    let (body, tail) = all.rsplit_once('\n').unwrap();
    let (code, content_type) = tail.split_once(' ').unwrap_or((tail, ""));
    (
        code.parse().unwrap(),
        content_type.to_owned(),
        body.to_owned(),
    )
}

fn metrics_cli(controller: &Controller) -> String {
    let out = controller.cli(&["metrics"]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn metrics_of_a_real_fleet_pass_promtool_and_match_the_fleet() {
    let (controller, http, _http_dir) = controller_with_http(&[]);
    let mut agents = Agent::enroll_all(&controller, &["m1", "m2", "m3"]);
    for a in &mut agents {
        a.set_start_period("1s");
        a.run();
    }
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    controller.wait_online(&reader, 3, Duration::from_secs(60));
    let work = tempfile::tempdir().unwrap();
    let out = controller.deploy_version(
        &deployer,
        work.path(),
        "v1",
        APP,
        &["--strategy", "rolling", "--max-parallel", "1", "--wait"],
    );
    assert!(out.status.success(), "{}", text(&out));

    // Heartbeats after the deploy carry the app's health and release.
    let mut exposition = String::new();
    wait_until(
        "three healthy web apps in /metrics",
        Duration::from_secs(60),
        || {
            exposition = metrics_cli(&controller);
            sample(&exposition, r#"slipway_apps{app="web",health="healthy"}"#) == Some(3.0)
        },
    );
    let (ok, report) = promtool_check(&exposition);
    assert!(ok, "promtool check metrics: {report}\n{exposition}");

    assert_eq!(
        sample(&exposition, r#"slipway_nodes{state="online"}"#),
        Some(3.0)
    );
    assert_eq!(
        sample(&exposition, r#"slipway_nodes{state="revoked"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &exposition,
            r#"slipway_deployments{app="web",kind="deploy",status="succeeded"}"#
        ),
        Some(1.0),
        "{exposition}"
    );
    let nodes: Vec<serde_json::Value> =
        serde_json::from_slice(&controller.cli(&["nodes", "--json"]).stdout).unwrap();
    assert_eq!(nodes.len(), 3);
    let version = nodes[0]["agent_version"].as_str().unwrap();
    assert_eq!(
        sample(
            &exposition,
            &format!(r#"slipway_agent_versions{{version="{version}"}}"#)
        ),
        Some(3.0),
        "{exposition}"
    );
    // Each node's host figures are the ones its heartbeat stored.
    for n in &nodes {
        let (name, id) = (n["name"].as_str().unwrap(), n["id"].as_str().unwrap());
        let labels = format!(r#"node="{name}",node_id="{id}""#);
        let total = n["metrics"]["mem_total_bytes"].as_u64().unwrap();
        assert!(total > 0);
        assert_eq!(
            sample(
                &exposition,
                &format!("slipway_node_memory_total_bytes{{{labels}}}")
            ),
            Some(total as f64),
            "{name}: {exposition}"
        );
        for d in n["metrics"]["disks"].as_array().unwrap() {
            let mount = d["mount"].as_str().unwrap();
            assert_eq!(
                sample(
                    &exposition,
                    &format!(r#"slipway_node_disk_size_bytes{{mount="{mount}",{labels}}}"#)
                ),
                Some(d["total_bytes"].as_u64().unwrap() as f64),
                "{name} {mount}"
            );
        }
        let age = sample(
            &exposition,
            &format!("slipway_node_heartbeat_age_seconds{{{labels}}}"),
        )
        .unwrap();
        assert!((0.0..60.0).contains(&age), "heartbeat age {age}");
        assert_eq!(
            sample(
                &exposition,
                &format!(r#"slipway_app_health{{app="web",health="healthy",{labels}}}"#)
            ),
            Some(1.0)
        );
    }
    // The controller's certificates: a CA for years, a server certificate
    // for days to a year.
    let now = time::OffsetDateTime::now_utc().unix_timestamp() as f64;
    // Every certificate of the system, by kind, name and id.
    let days_left = |cert: &str| {
        let prefix = format!(r#"slipway_certificate_expiry_timestamp_seconds{{cert="{cert}","#);
        let line = exposition
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {prefix} in\n{exposition}"));
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        (value - now) / 86_400.0
    };
    let (ca_days, server_days) = (days_left("ca"), days_left("server"));
    // Each node's certificate (7 days, renewed at two thirds).
    let node_days = days_left("node");
    assert!(node_days > 0.0 && node_days <= 7.0, "node {node_days}");
    assert!(ca_days > 365.0, "ca {ca_days}");
    assert!(
        server_days > 0.0 && server_days < ca_days,
        "server {server_days}"
    );

    // The serving controller's own door: HTTPS, a read token.
    let url = format!("{http}/metrics");
    let (status, _, body) = get(&controller, &url, None);
    assert_eq!(status, 401, "no token: {body}");
    let (status, content_type, served) = get(&controller, &url, Some(&reader));
    assert_eq!(status, 200, "{served}");
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let (ok, report) = promtool_check(&served);
    assert!(ok, "promtool check metrics: {report}\n{served}");
    // It knows what only the serving process knows: its sessions, its own
    // memory, and the durations of the deployment it ran.
    assert_eq!(
        sample(&served, "slipway_controller_sessions"),
        Some(3.0),
        "{served}"
    );
    assert_eq!(
        sample(&served, r#"slipway_nodes{state="online"}"#),
        Some(3.0)
    );
    let rss = sample(&served, "process_resident_memory_bytes").unwrap();
    let pid = controller.pid().unwrap();
    let status_file = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let vm_rss_kib: f64 = status_file
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        rss > vm_rss_kib * 1024.0 / 2.0 && rss < vm_rss_kib * 1024.0 * 2.0,
        "rss {rss} vs VmRSS {vm_rss_kib} KiB"
    );
    assert_eq!(
        sample(
            &served,
            r#"slipway_deployment_duration_seconds_count{kind="deploy",outcome="succeeded"}"#
        ),
        Some(1.0),
        "{served}"
    );
    assert_eq!(
        sample(
            &served,
            r#"slipway_deployment_node_duration_seconds_count{kind="deploy",outcome="succeeded"}"#
        ),
        Some(3.0),
        "{served}"
    );
    let fetches = sample(
        &served,
        r#"slipway_deployment_step_duration_seconds_count{kind="deploy",step="fetch"}"#,
    );
    assert_eq!(fetches, Some(3.0), "one fetch step per node: {served}");

    // Every series the example Grafana dashboard queries is served.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../packaging/grafana/slipway-fleet.json"),
    )
    .unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    let mut queried = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("slipway_") || word.starts_with("process_") {
                    queried += 1;
                    assert!(
                        served.contains(&format!("\n{word}{{"))
                            || served.contains(&format!("\n{word} ")),
                        "panel {:?} queries {word}, which /metrics does not serve",
                        panel["title"]
                    );
                }
            }
        }
    }
    assert!(queried > 15, "{queried} series queried");

    // A revoked node moves from online to revoked at once.
    let out = controller.cli(&["node", "revoke", "m3"]);
    assert!(out.status.success(), "{}", text(&out));
    let exposition = metrics_cli(&controller);
    assert_eq!(
        sample(&exposition, r#"slipway_nodes{state="online"}"#),
        Some(2.0)
    );
    assert_eq!(
        sample(&exposition, r#"slipway_nodes{state="revoked"}"#),
        Some(1.0)
    );
    let (ok, report) = promtool_check(&exposition);
    assert!(ok, "promtool check metrics: {report}\n{exposition}");
}

#[test]
fn metrics_on_loopback_need_no_token_only_when_configured() {
    // Plain HTTP on loopback with the switch: a local Prometheus scrapes
    // without a token.
    let (open, http, _dir) = controller_with_http(&["--http-plain", "--metrics-loopback-no-auth"]);
    let (status, _, body) = get(&open, &format!("{http}/metrics"), None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(sample(&body, r#"slipway_nodes{state="online"}"#), Some(0.0));
    assert_eq!(sample(&body, "slipway_controller_sessions"), Some(0.0));
    // The rest of the API is not opened by it.
    let (status, _, _) = get(&open, &format!("{http}/api/v1/nodes"), None);
    assert_eq!(status, 401);

    // Without the switch, loopback or not, a token is needed.
    let (closed, http, _dir) = controller_with_http(&["--http-plain"]);
    let (status, _, body) = get(&closed, &format!("{http}/metrics"), None);
    assert_eq!(status, 401, "{body}");

    // The switch without an HTTP listener is a configuration error (64).
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(crate::support::bin("slipway-controller"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics-loopback-no-auth",
            "--data-dir",
        ])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("metrics_loopback_no_auth"),
        "{}",
        text(&out)
    );
}
