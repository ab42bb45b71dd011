//! Prometheus metrics of a real fleet: a controller and three agent
//! processes over real mTLS, a rolling deploy pushed by the controller,
//! then the metrics checked by `promtool check metrics` (Debian's
//! prometheus package, installed by scripts/test.sh) and against the fleet
//! view. The door here is `slipway-controller metrics` (the database's
//! view, for node_exporter's textfile collector).

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{text, wait_until, Agent, Controller, APP};

/// `promtool check metrics` on `exposition`: its exit status and output.
pub fn promtool_check(exposition: &str) -> (bool, String) {
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
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn metrics_cli(controller: &Controller) -> String {
    let out = controller.cli(&["metrics"]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn metrics_of_a_real_fleet_pass_promtool_and_match_the_fleet() {
    let controller = Controller::start();
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
    let days_left = |cert: &str| {
        let series = format!(r#"slipway_certificate_expiry_timestamp_seconds{{cert="{cert}"}}"#);
        (sample(&exposition, &series).unwrap() - now) / 86_400.0
    };
    let (ca_days, server_days) = (days_left("ca"), days_left("server"));
    assert!(ca_days > 365.0, "ca {ca_days}");
    assert!(
        server_days > 0.0 && server_days < ca_days,
        "server {server_days}"
    );

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
