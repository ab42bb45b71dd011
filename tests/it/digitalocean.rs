//! The DigitalOcean fleet end to end (issue 14): a local DigitalOcean API
//! that checks every request against the official description, a
//! controller (`serve` with `[digitalocean]`, and the `droplets` commands),
//! and real agents (`slipway-agent run`) whose metadata service is a local
//! server answering their droplet id. Droplets are added, re-tagged and
//! destroyed behind the controller's back, as in the DO console.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::time::Duration;

use serde_json::Value;

use crate::support::do_api::{metadata_service, DoApi, DO_TOKEN};
use crate::support::{bin, text, wait_until, Agent, Controller, APP};

fn droplets_cli(
    controller: &Controller,
    config: &std::path::Path,
    args: &[&str],
) -> std::process::Output {
    std::process::Command::new(bin("slipway-controller"))
        .arg("droplets")
        .args(args)
        .arg("--config")
        .arg(config)
        .arg("--data-dir")
        .arg(controller.data_dir())
        .output()
        .unwrap()
}

fn list(controller: &Controller, config: &std::path::Path) -> Value {
    let out = droplets_cli(controller, config, &["list", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The node name each current droplet is matched to (None: expected, not enrolled).
fn matches(view: &Value) -> Vec<(String, Option<String>)> {
    view["droplets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_owned(),
                d["node_name"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// The id of node web-1 in `slipway-controller nodes --json`.
fn web1_node_id(nodes: &[Value]) -> String {
    nodes
        .iter()
        .find(|n| n["name"] == "web-1")
        .and_then(|n| n["id"].as_str())
        .unwrap()
        .to_owned()
}

fn with_metadata(agent: &Agent, droplet_id: u64) {
    let url = metadata_service(droplet_id);
    let mut config = fs::read_to_string(&agent.config).unwrap();
    config.push_str(&format!("\n[digitalocean]\nmetadata_url = \"{url}\"\n"));
    fs::write(&agent.config, config).unwrap();
}

#[test]
fn the_fleet_follows_droplet_tags() {
    let api = DoApi::start();
    let web1 = api.add_droplet("web-1", &["env:production"]);
    let web2 = api.add_droplet("web-2", &["env:production"]);
    api.add_droplet("web-3", &["env:production"]);
    let staging = api.add_droplet("stage-1", &["env:staging"]);

    let work = tempfile::tempdir().unwrap();
    let token_file = work.path().join("do-token");
    fs::write(&token_file, format!("{DO_TOKEN}\n")).unwrap();
    let config = work.path().join("controller.toml");
    fs::write(
        &config,
        format!(
            "[digitalocean]\ntoken_file = \"{}\"\nfleet_tags = [\"env:production\"]\napi_url = \"{}\"\n\
             sync_every = \"10s\"\nretry_min_wait = \"10ms\"\nretry_max_wait = \"200ms\"\n",
            token_file.display(),
            api.base
        ),
    )
    .unwrap();
    let controller = Controller::start_http_with(&["--config", config.to_str().unwrap()]);

    // Real agents; their join tokens carry no tags, so only the droplets'
    // DigitalOcean tags can select them. "stray" runs on the staging droplet.
    let mut agents = Vec::new();
    for (name, droplet) in [("web-1", web1), ("web-2", web2), ("stray", staging)] {
        let agent = Agent::enroll(&controller, name);
        with_metadata(&agent, droplet);
        agents.push(agent);
    }
    for a in &mut agents {
        a.run();
    }
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    controller.wait_online(&reader, 3, Duration::from_secs(30));

    let out = droplets_cli(&controller, &config, &["sync"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("3 droplet(s) under env:production"),
        "{}",
        text(&out)
    );
    let view = list(&controller, &config);
    assert_eq!(
        matches(&view),
        [
            ("web-1".to_owned(), Some("web-1".to_owned())),
            ("web-2".to_owned(), Some("web-2".to_owned())),
            ("web-3".to_owned(), None),
        ],
        "{view:#}"
    );
    let strays = view["agents_without_droplet"].as_array().unwrap();
    assert_eq!(strays.len(), 1, "{view:#}");
    assert_eq!(strays[0]["name"], "stray");
    assert_eq!(strays[0]["reported_droplet_id"], staging);
    let table = droplets_cli(&controller, &config, &["list"]);
    let table = String::from_utf8_lossy(&table.stdout).into_owned();
    let web3_line = table.lines().find(|l| l.starts_with("web-3")).unwrap();
    assert!(web3_line.contains("expected, not enrolled"), "{table}");
    assert!(table.contains("agents without a droplet"), "{table}");

    // `--tag env:production` means the droplets DO shows under that tag.
    let out = controller.deploy_version(
        &deployer,
        work.path(),
        "v1",
        APP,
        &["--wait", "--tag", "env:production"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("[web-1] SUCCEEDED") && stdout.contains("[web-2] SUCCEEDED"),
        "{stdout}"
    );
    assert!(!stdout.contains("[stray]"), "{stdout}");
    assert_eq!(agents[2].get(), None, "stray got no deploy");

    // Re-tag web-1 in DO: after a sync, `--tag product:shop` selects it alone.
    api.set_tags(web1, &["env:production", "product:shop"]);
    let out = droplets_cli(&controller, &config, &["sync"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 retagged"),
        "{}",
        text(&out)
    );
    let out = controller.deploy_version(
        &deployer,
        work.path(),
        "v2",
        APP,
        &["--wait", "--tag", "product:shop"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(agents[0].get().as_deref(), Some("v2"));
    assert_eq!(agents[1].get().as_deref(), Some("v1"));

    // An env layer of a DigitalOcean tag: the droplets under it as last
    // synced (web-1 alone) get it; web-2's .env is not touched.
    let web2_env = fs::read(agents[1].root.join("shared/.env")).unwrap();
    let port = format!("PORT={}", agents[0].port);
    let out = controller.slipway(
        &deployer,
        &[
            "env",
            "set",
            "web",
            &port,
            "SHOP=on",
            "--tag",
            "product:shop",
            "--wait",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.contains("[web-1] SUCCEEDED"), "{said}");
    assert!(
        !said.contains("[web-2]") && !said.contains("[stray]"),
        "{said}"
    );
    let web1_env = fs::read_to_string(agents[0].root.join("shared/.env")).unwrap();
    assert!(web1_env.contains("SHOP=\"on\""), "{web1_env}");
    assert_eq!(
        fs::read(agents[1].root.join("shared/.env")).unwrap(),
        web2_env
    );
    assert_eq!(
        agents[0].get().as_deref(),
        Some("v2"),
        "web-1 serves after its env change"
    );

    // Destroy web-2 in DO: its node is retired (revoked) and audited.
    api.destroy_droplet(web2);
    let out = droplets_cli(&controller, &config, &["sync"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        said.contains("1 gone, 1 node(s) retired") && said.contains("retired node web-2"),
        "{said}"
    );
    let view = list(&controller, &config);
    assert_eq!(view["gone"][0]["name"], "web-2", "{view:#}");
    let nodes = controller.cli(&["nodes", "--json"]);
    let nodes: Vec<Value> = serde_json::from_slice(&nodes.stdout).unwrap();
    let web2_node = nodes.iter().find(|n| n["name"] == "web-2").unwrap();
    assert_eq!(web2_node["state"], "revoked", "{web2_node:#}");
    let events = controller.audit(&reader);
    let of = |t: &str| -> Vec<&Value> { events.iter().filter(|e| e["event_type"] == t).collect() };
    assert!(!of("DROPLET_ADDED").is_empty());
    assert_eq!(of("DROPLET_RETAGGED").len(), 1, "{events:#?}");
    assert_eq!(of("DROPLET_GONE").len(), 1);
    let retired = of("NODE_RETIRED");
    assert_eq!(retired.len(), 1);
    assert_eq!(retired[0]["resource_id"], web2_node["id"]);

    // The fleet views show DigitalOcean's side: web-3 expected, not
    // enrolled; stray, an agent without a droplet; web-2 gone, its node
    // retired. `slipway nodes`, `slipway status --json`, /api/v1/droplets.
    let out = controller.slipway(&reader, &["nodes"]);
    assert!(out.status.success(), "{}", text(&out));
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = |name: &str| {
        table
            .lines()
            .find(|l| l.starts_with(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no line for {name}: {table}"))
            .to_owned()
    };
    assert!(table.contains("DigitalOcean droplets:"), "{table}");
    assert!(line("web-3").contains("expected, not enrolled"), "{table}");
    assert!(
        line("web-1").contains(web1_node_id(&nodes).as_str()),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "stray ({}): reports droplet {staging}, not in the fleet",
            strays[0]["node_id"].as_str().unwrap()
        )),
        "{table}"
    );
    assert!(
        table.contains(&format!("web-2 ({web2}), node web-2 retired")),
        "{table}"
    );
    let out = controller.slipway(&reader, &["status", "--json"]);
    let status: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    let from_status = &status["droplets"];
    let (code, from_http) = crate::http::get(&controller, &reader, "/api/v1/droplets");
    assert_eq!(code, 200, "{from_http}");
    for view in [from_status, &from_http] {
        let by_name = |list: &str, name: &str| {
            view[list]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["name"] == name)
                .cloned()
                .unwrap_or_else(|| panic!("{name} not in {list}: {view:#}"))
        };
        assert_eq!(
            by_name("droplets", "web-3")["node_id"],
            Value::Null,
            "{view:#}"
        );
        assert_eq!(
            by_name("droplets", "web-1")["node_name"],
            "web-1",
            "{view:#}"
        );
        assert_eq!(by_name("gone", "web-2")["node_name"], "web-2", "{view:#}");
        assert_eq!(
            by_name("gone", "web-2")["node_id"],
            web2_node["id"],
            "{view:#}"
        );
        assert_eq!(
            by_name("agents_without_droplet", "stray")["reported_droplet_id"],
            staging,
            "{view:#}"
        );
    }
    let out = controller.slipway(&reader, &["status"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.contains("DigitalOcean droplets:") && said.contains("expected, not enrolled"),
        "{said}"
    );
    // A deploy to env:production now reaches web-1 only.
    let out = controller.deploy_version(
        &deployer,
        work.path(),
        "v3",
        APP,
        &["--wait", "--tag", "env:production"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("[web-2]"),
        "{}",
        text(&out)
    );

    // Retire web-1 and destroy its droplet: node revoked, droplet gone at DO.
    let out = droplets_cli(&controller, &config, &["retire", "web-1", "--destroy"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        said.contains("retired node web-1") && said.contains("destroyed droplet web-1"),
        "{said}"
    );
    let left = api.control("GET", "/_test/droplets", None);
    assert!(
        left.as_array().unwrap().iter().all(|d| d["id"] != web1),
        "{left:#}"
    );
    let nodes = controller.cli(&["nodes", "--json"]);
    let nodes: Vec<Value> = serde_json::from_slice(&nodes.stdout).unwrap();
    let web1_node = nodes.iter().find(|n| n["name"] == "web-1").unwrap();
    assert_eq!(web1_node["state"], "revoked", "{web1_node:#}");
    let events = controller.audit(&reader);
    let count = |t: &str| events.iter().filter(|e| e["event_type"] == t).count();
    assert_eq!((count("NODE_RETIRED"), count("DROPLET_DESTROYED")), (2, 1));
    let out = droplets_cli(&controller, &config, &["retire", "nope"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        text(&out).contains("no droplet named \"nope\""),
        "{}",
        text(&out)
    );

    // A droplet added in DO shows up by serve's own periodic sync.
    api.add_droplet("web-5", &["env:production"]);
    wait_until(
        "serve's periodic sync to see web-5",
        Duration::from_secs(30),
        || matches(&list(&controller, &config)).contains(&("web-5".to_owned(), None)),
    );

    api.assert_no_violations();
}

#[test]
fn validate_checks_the_digitalocean_token() {
    let api = DoApi::start();
    api.add_droplet("web-1", &["env:production"]);
    api.add_droplet("web-2", &["env:production"]);
    let work = tempfile::tempdir().unwrap();
    let token_file = work.path().join("do-token");
    let config = work.path().join("controller.toml");
    fs::write(
        &config,
        format!(
            "data_dir = \"{}\"\n[digitalocean]\ntoken_file = \"{}\"\nfleet_tags = [\"env:production\"]\n\
             api_url = \"{}\"\nretry_min_wait = \"10ms\"\nretry_max_wait = \"100ms\"\n",
            work.path().join("data").display(),
            token_file.display(),
            api.base
        ),
    )
    .unwrap();
    let validate = || {
        std::process::Command::new(bin("slipway-controller"))
            .args(["validate", "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };

    fs::write(&token_file, format!("{DO_TOKEN}\n")).unwrap();
    let out = validate();
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text(&out));
    assert!(said.contains("✓ config:"), "{said}");
    assert!(
        said.contains("✓ digitalocean: token accepted")
            && said.contains("2 droplet(s) under env:production"),
        "{said}"
    );

    fs::write(&token_file, "dop_v1_revoked_secret\n").unwrap();
    let out = validate();
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(
        said.contains("✗ digitalocean:") && said.contains("401") && said.contains("unauthorized"),
        "{said}"
    );
    assert!(
        !said.contains("revoked_secret"),
        "the token is never printed: {said}"
    );

    fs::remove_file(&token_file).unwrap();
    let out = validate();
    assert!(
        text(&out).contains("✗ digitalocean: cannot read the token file"),
        "{}",
        text(&out)
    );
    api.assert_no_violations();
}

#[test]
fn dns_point_follows_the_tagged_droplets() {
    let api = DoApi::start();
    let ip_of = |id: u64| -> String {
        let all = api.control("GET", "/_test/droplets", None);
        let d = all
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id)
            .unwrap()
            .clone();
        d["networks"]["v4"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["type"] == "public")
            .unwrap()["ip_address"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let web1 = ip_of(api.add_droplet("web-1", &["env:production"]));
    let web2 = ip_of(api.add_droplet("web-2", &["env:production"]));
    let stage = ip_of(api.add_droplet("stage-1", &["env:staging"]));
    api.control(
        "POST",
        "/_test/domains",
        Some(serde_json::json!({ "name": "example.com" })),
    );
    let controller = Controller::start();
    let work = tempfile::tempdir().unwrap();
    let token_file = work.path().join("do-token");
    fs::write(&token_file, DO_TOKEN).unwrap();
    let config = work.path().join("controller.toml");
    fs::write(
        &config,
        format!(
            "[digitalocean]\ntoken_file = \"{}\"\nfleet_tags = [\"env:production\"]\napi_url = \"{}\"\n",
            token_file.display(),
            api.base
        ),
    )
    .unwrap();
    let dns = |args: &[&str]| {
        std::process::Command::new(bin("slipway-controller"))
            .args(["dns", "point", "app.example.com"])
            .args(args)
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(controller.data_dir())
            .output()
            .unwrap()
    };
    let records = || -> Vec<(String, u64)> {
        let mut r: Vec<(String, u64)> = api
            .control("GET", "/_test/records/example.com", None)
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["data"].as_str().unwrap().to_owned(),
                    r["ttl"].as_u64().unwrap(),
                )
            })
            .collect();
        r.sort();
        r
    };

    // Point at staging first, for real.
    let out = dns(&["--tag", "env:staging", "--apply", "--ttl", "60"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(records(), [(stage.clone(), 60)]);

    // Production, dry run: the diff is printed, nothing changes.
    let out = dns(&["--tag", "env:production"]);
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        said.contains(&format!("- A app.example.com {stage}")),
        "{said}"
    );
    assert!(
        said.contains(&format!("+ A app.example.com {web1}")),
        "{said}"
    );
    assert!(
        said.contains(&format!("+ A app.example.com {web2}")),
        "{said}"
    );
    assert!(said.contains("dry run: 3 change(s)"), "{said}");
    assert_eq!(records(), [(stage.clone(), 60)]);

    // Applied: exactly the production addresses, with the default TTL.
    let out = dns(&["--tag", "env:production", "--apply"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut want = vec![(web1.clone(), 300), (web2.clone(), 300)];
    want.sort();
    assert_eq!(records(), want);
    let out = dns(&["--tag", "env:production", "--apply"]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("already points at 2 address(es)"),
        "{}",
        text(&out)
    );

    // Refusals: a tag with no droplets would empty the name; a TTL too short.
    let out = dns(&["--tag", "env:nothing", "--apply"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("--allow-empty"), "{}", text(&out));
    let out = dns(&["--tag", "env:production", "--ttl", "10"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert_eq!(records(), want);

    let events = controller.audit(&controller.api_token("read"));
    let changed: Vec<&Value> = events
        .iter()
        .filter(|e| e["event_type"] == "DNS_RECORDS_CHANGED")
        .collect();
    assert_eq!(
        changed.len(),
        2,
        "one per applied run that changed something"
    );
    api.assert_no_violations();
}

#[test]
fn the_fleet_firewall_is_kept_in_sync() {
    let api = DoApi::start();
    let controller = Controller::start();
    let work = tempfile::tempdir().unwrap();
    let token_file = work.path().join("do-token");
    fs::write(&token_file, DO_TOKEN).unwrap();
    let config = work.path().join("controller.toml");
    let write_config = |ports: &str| {
        fs::write(
            &config,
            format!(
                "[digitalocean]\ntoken_file = \"{}\"\nfleet_tags = [\"env:production\"]\napi_url = \"{}\"\n\n\
                 [digitalocean.firewall]\ninbound_ports = [{ports}]\nssh_from = [\"192.0.2.0/24\"]\n",
                token_file.display(),
                api.base
            ),
        )
        .unwrap();
    };
    let sync = |args: &[&str]| {
        let out = std::process::Command::new(bin("slipway-controller"))
            .args(["firewall", "sync"])
            .args(args)
            .arg("--config")
            .arg(&config)
            .arg("--data-dir")
            .arg(controller.data_dir())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let firewalls = || api.control("GET", "/_test/firewalls", None);

    write_config("\"443\"");
    let said = sync(&[]);
    assert!(said.contains("+ firewall slipway-fleet"), "{said}");
    assert!(
        said.contains("+ inbound tcp 22 addresses=[192.0.2.0/24]"),
        "{said}"
    );
    assert!(
        said.contains("+ inbound tcp 443 addresses=[0.0.0.0/0,::/0]"),
        "{said}"
    );
    assert!(
        said.contains("+ tag env:production") && said.contains("dry run"),
        "{said}"
    );
    assert_eq!(
        firewalls(),
        serde_json::json!([]),
        "a dry run changes nothing"
    );

    let said = sync(&["--apply"]);
    assert!(said.contains("applied"), "{said}");
    let made = firewalls();
    assert_eq!(made[0]["name"], "slipway-fleet");
    assert_eq!(made[0]["tags"], serde_json::json!(["env:production"]));
    let ports: Vec<&str> = made[0]["inbound_rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["ports"].as_str().unwrap())
        .collect();
    assert_eq!(
        ports,
        ["443", "22"],
        "only the configured ports and SSH; nothing for the agent"
    );
    assert!(sync(&[]).contains("is in sync"));

    write_config("\"443\", \"8000-9000\"");
    let said = sync(&[]);
    assert!(
        said.contains("+ inbound tcp 8000-9000") && !said.contains("- inbound"),
        "{said}"
    );
    sync(&["--apply"]);
    assert_eq!(firewalls()[0]["inbound_rules"].as_array().unwrap().len(), 3);
    assert_eq!(
        firewalls().as_array().unwrap().len(),
        1,
        "replaced, not a second one"
    );
    assert!(sync(&[]).contains("is in sync"));

    let events = controller.audit(&controller.api_token("read"));
    assert_eq!(
        events
            .iter()
            .filter(|e| e["event_type"] == "FIREWALL_CHANGED")
            .count(),
        2
    );
    api.assert_no_violations();
}

/// `droplets create --wait`: the droplet is created with the fleet tags and
/// user data that `cloud-init schema` accepts and that carries a one-time
/// join token; a real agent enrolled with that token (as install.sh on the
/// new droplet would) and reading the new droplet's id joins the fleet as
/// that droplet. (The boot from the user data is played in a Debian root by
/// `install::a_droplet_created_by_the_controller_boots_from_its_user_data_and_joins`.)
#[test]
fn a_created_droplet_joins_with_its_user_data_token() {
    let api = DoApi::start();
    let work = tempfile::tempdir().unwrap();
    let config = api.controller_config(work.path());
    let controller = Controller::start_with(&["--config", config.to_str().unwrap()]);
    // `create --wait` runs while the droplet "boots".
    let create = std::process::Command::new(bin("slipway-controller"))
        .args([
            "droplets",
            "create",
            "--name",
            "web-4",
            "--region",
            "fra1",
            "--size",
            "s-1vcpu-1gb",
            "--image",
            "debian-12-x64",
            "--controller",
            &controller.url(),
            "--base-url",
            "https://dl.example.com/slipway",
            "--token-ttl",
            "10m",
            "--wait",
            "--wait-timeout",
            "2m",
        ])
        .arg("--config")
        .arg(&config)
        .arg("--data-dir")
        .arg(controller.data_dir())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let made = api.wait_droplet("web-4");
    let id = made["id"].as_u64().unwrap();
    assert_eq!(made["tags"], serde_json::json!(["env:production"]));
    let user_data = api.user_data(id);
    let file = work.path().join("user-data");
    fs::write(&file, &user_data).unwrap();
    let schema = std::process::Command::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(&file)
        .output()
        .expect("cloud-init (scripts/test.sh installs it)");
    assert!(schema.status.success(), "{}\n{user_data}", text(&schema));
    assert!(
        user_data.contains(&format!("--controller '{}'", controller.url())),
        "{user_data}"
    );
    assert!(
        user_data.contains("metadata_url = \"http://169.254.169.254\""),
        "{user_data}"
    );
    let join = user_data
        .split("SLIPWAY_JOIN_TOKEN='")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap()
        .to_owned();

    // The "booting droplet": enrolls with the token from its user data.
    let mut agent = Agent::enroll(&controller, "placeholder");
    let state = agent.dir.path().join("web-4-state");
    let enroll_as = |name: &str, state: &std::path::Path| {
        std::process::Command::new(bin("slipway-agent"))
            .args([
                "enroll",
                "--controller",
                &controller.url(),
                "--token",
                &join,
                "--name",
                name,
            ])
            .arg("--state-dir")
            .arg(state)
            .output()
            .unwrap()
    };
    let enroll = |state: &std::path::Path| enroll_as("web-4", state);
    // The token is bound to the droplet's name: under another name it is
    // refused (naming both), audited, and not spent.
    let stolen = enroll_as("intruder", &agent.dir.path().join("intruder-state"));
    assert!(!stolen.status.success(), "{}", text(&stolen));
    assert!(
        text(&stolen).contains("bound to node name \"web-4\"")
            && text(&stolen).contains("\"intruder\""),
        "{}",
        text(&stolen)
    );
    let reader = controller.api_token("read");
    let refused = controller
        .audit(&reader)
        .into_iter()
        .find(|e| e["event_type"] == "NODE_ENROLL_REFUSED")
        .expect("the refusal is audited");
    assert!(
        refused.to_string().contains("intruder") && refused.to_string().contains("web-4"),
        "{refused}"
    );
    // An ordinary join token still enrolls any name: web-1, which gets
    // release v1 of web, the app's current release.
    let mut web1 = Agent::enroll(&controller, "web-1");
    web1.run();
    let deployer = controller.api_token("deploy:web");
    let out = controller.deploy_version(
        &deployer,
        work.path(),
        "v1",
        APP,
        &["--wait", "--node", "web-1"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = enroll(&state);
    assert!(out.status.success(), "{}", text(&out));
    let again = enroll(&agent.dir.path().join("other-state"));
    assert!(
        !again.status.success(),
        "the token is one-time: {}",
        text(&again)
    );
    let cfg = fs::read_to_string(&agent.config).unwrap();
    let old_state = cfg
        .split("state_dir = \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    fs::write(
        &agent.config,
        cfg.replace(&old_state, state.to_str().unwrap()),
    )
    .unwrap();
    with_metadata(&agent, id);
    agent.run();
    let created = create.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&created.stdout).into_owned();
    assert!(created.status.success(), "{}", text(&created));
    assert!(
        said.contains("created droplet web-4") && said.contains("node web-4"),
        "{said}"
    );
    assert!(said.contains("is online"), "{said}");
    // The controller deployed web's current release to the new droplet by
    // itself, as a deployment of its own, and --wait followed it.
    assert!(
        said.contains("node web-4 runs web release v1 (the current release)"),
        "{said}"
    );
    let out = controller.slipway(&reader, &["nodes", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let nodes: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let web4 = nodes.iter().find(|n| n["name"] == "web-4").unwrap();
    assert_eq!(web4["apps"][0]["current_release"], "v1", "{web4}");
    let events = controller.audit(&reader);
    let joined = events
        .iter()
        .find(|e| e["event_type"] == "JOIN_DEPLOY")
        .expect("the join deploy is audited");
    assert_eq!(joined["details"]["apps"][0]["release_id"], "v1", "{joined}");
    let deployed = events
        .iter()
        .filter(|e| e["event_type"] == "DEPLOY_COMPLETED" && e["actor"] == "controller")
        .count();
    assert_eq!(deployed, 1, "one deployment by the controller");

    // A droplet that never boots: --wait gives up, exit 1, saying why.
    let out = droplets_cli(
        &controller,
        &config,
        &[
            "create",
            "--name",
            "web-5",
            "--region",
            "fra1",
            "--size",
            "s-1vcpu-1gb",
            "--image",
            "debian-12-x64",
            "--controller",
            &controller.url(),
            "--base-url",
            "https://dl.example.com/slipway",
            "--wait",
            "--wait-timeout",
            "1s",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("no online node reported it"),
        "{}",
        text(&out)
    );

    let out = droplets_cli(&controller, &config, &["sync"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        matches(&list(&controller, &config)),
        [
            ("web-4".to_owned(), Some("web-4".to_owned())),
            ("web-5".to_owned(), None)
        ]
    );
    api.assert_no_violations();
}

/// `snapshot_before_deploy = true` for web: each deploy of web, by the CLI
/// or the HTTP API, first snapshots the target nodes that are droplets
/// (POST /v2/droplets/{id}/actions, checked against the description), waits
/// for the actions, and records their ids on the deployment; an action that
/// errors or outlasts `snapshot_timeout` refuses the deploy before any node
/// is touched, audited.
#[test]
fn deploys_wait_for_droplet_snapshots() {
    use crate::http::{get, post, upload, wait_done};
    let api = DoApi::start();
    let web1 = api.add_droplet("web-1", &["env:production"]);
    let web2 = api.add_droplet("web-2", &["env:production"]);
    let work = tempfile::tempdir().unwrap();
    let token_file = work.path().join("do-token");
    fs::write(&token_file, DO_TOKEN).unwrap();
    let config = work.path().join("controller.toml");
    fs::write(
        &config,
        format!(
            "[digitalocean]\ntoken_file = \"{}\"\nfleet_tags = [\"env:production\"]\napi_url = \"{}\"\n\
             sync_every = \"0s\"\nretry_min_wait = \"10ms\"\nretry_max_wait = \"100ms\"\n\
             snapshot_timeout = \"2s\"\nsnapshot_poll = \"20ms\"\n\
             [digitalocean.apps.web]\nsnapshot_before_deploy = true\n",
            token_file.display(),
            api.base
        ),
    )
    .unwrap();
    let controller = Controller::start_http_with(&["--config", config.to_str().unwrap()]);
    let mut agents = Vec::new();
    for (name, droplet) in [
        ("web-1", Some(web1)),
        ("web-2", Some(web2)),
        ("plain", None),
    ] {
        let agent = Agent::enroll(&controller, name);
        if let Some(droplet) = droplet {
            with_metadata(&agent, droplet);
        }
        agents.push(agent);
    }
    for a in &mut agents {
        a.run();
    }
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    controller.wait_online(&reader, 3, Duration::from_secs(30));
    let snapshot_posts = || {
        api.control("GET", "/_test/log", None)
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| {
                e["method"] == "POST"
                    && e["path"].as_str().unwrap().ends_with("/actions")
                    && e["path"].as_str().unwrap().starts_with("/v2/droplets/")
            })
            .map(|e| e["path"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let last_deployment = || {
        let (code, list) = get(&controller, &reader, "/api/v1/deployments?app=web&limit=1");
        assert_eq!(code, 200, "{list}");
        let id = list[0]["id"].as_str().unwrap().to_owned();
        get(&controller, &reader, &format!("/api/v1/deployments/{id}")).1
    };
    let snapshot_droplets = |record: &Value| {
        let mut ids: Vec<u64> = record["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                assert!(s["action_id"].as_u64().unwrap() > 0, "{s}");
                assert_eq!(s["status"], "completed", "{s}");
                s["droplet_id"].as_u64().unwrap()
            })
            .collect();
        ids.sort_unstable();
        ids
    };

    // The CLI: v1 to all three nodes; the two droplets are snapshotted
    // first ("plain" is no droplet).
    let out = controller.deploy_version(&deployer, work.path(), "v1", APP, &["--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let mut posted = snapshot_posts();
    posted.sort();
    assert_eq!(
        posted,
        [
            format!("/v2/droplets/{web1}/actions"),
            format!("/v2/droplets/{web2}/actions")
        ]
    );
    let record = last_deployment();
    assert_eq!(record["status"], "succeeded", "{record}");
    assert_eq!(snapshot_droplets(&record), [web1, web2], "{record}");
    let events = controller.audit(&reader);
    let started = events
        .iter()
        .find(|e| e["event_type"] == "DEPLOY_STARTED")
        .unwrap();
    assert_eq!(
        started["details"]["snapshots"], record["snapshots"],
        "{started}"
    );

    // The HTTP API: a snapshot that errors refuses the deploy, naming the
    // action; no node is touched.
    let v2 = crate::support::artifact(work.path(), "v2", APP);
    let (code, body) = upload(&controller, &deployer, &v2);
    assert_eq!(code, 201, "{body}");
    api.control(
        "POST",
        "/_test/config",
        Some(serde_json::json!({ "action_outcome": "errored" })),
    );
    let deploy_v2 = format!(
        r#"{{"sha256":"{}","release_id":"v2"}}"#,
        crate::support::sha256_file(&v2)
    );
    let (code, body) = post(
        &controller,
        &deployer,
        "/api/v1/apps/web/deploy",
        &deploy_v2,
    );
    assert_eq!(code, 409, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("snapshot before deploying web failed")
            && error.contains("errored")
            && error.contains("no node was touched"),
        "{body}"
    );
    for a in &agents {
        assert_eq!(a.current().as_deref(), Some("v1"), "{}", a.name);
    }
    assert_eq!(
        last_deployment()["id"],
        record["id"],
        "no deployment started"
    );
    let failed: Vec<Value> = controller
        .audit(&reader)
        .into_iter()
        .filter(|e| e["event_type"] == "DEPLOY_SNAPSHOT_FAILED")
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(
        failed[0]["details"]["snapshots"].as_array().unwrap().len(),
        2
    );

    // The CLI: a snapshot that outlasts snapshot_timeout (2s) likewise.
    api.control(
        "POST",
        "/_test/config",
        Some(serde_json::json!({ "action_outcome": "completed", "polls_to_complete": 100000 })),
    );
    let out = controller.deploy_version(&deployer, work.path(), "v2", APP, &["--wait"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("did not finish within 2s") && text(&out).contains("snapshot_timeout"),
        "{}",
        text(&out)
    );
    for a in &agents {
        assert_eq!(a.current().as_deref(), Some("v1"), "{}", a.name);
    }

    // The HTTP API: snapshots that complete; v2 deployed, ids recorded.
    api.control(
        "POST",
        "/_test/config",
        Some(serde_json::json!({ "polls_to_complete": 2 })),
    );
    let (code, started) = post(
        &controller,
        &deployer,
        "/api/v1/apps/web/deploy",
        &deploy_v2,
    );
    assert_eq!(code, 202, "{started}");
    let id = started["deployment_id"].as_str().unwrap().to_owned();
    let done = wait_done(&controller, &reader, &id);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(snapshot_droplets(&done), [web1, web2], "{done}");
    for a in &agents {
        assert_eq!(a.current().as_deref(), Some("v2"), "{}", a.name);
    }
    api.assert_no_violations();
}

/// Without `[digitalocean]`, the fleet views have no droplets part and
/// `/api/v1/droplets` says DigitalOcean is not configured (404).
#[test]
fn without_digitalocean_the_fleet_views_show_no_droplets() {
    let controller = Controller::start_http();
    let mut agent = Agent::enroll(&controller, "web-1");
    agent.run();
    let reader = controller.api_token("read");
    controller.wait_online(&reader, 1, Duration::from_secs(30));
    let out = controller.slipway(&reader, &["nodes"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("DigitalOcean"), "{}", text(&out));
    let out = controller.slipway(&reader, &["status", "--json"]);
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(status.get("droplets").is_none(), "{status:#}");
    let (code, body) = crate::http::get(&controller, &reader, "/api/v1/droplets");
    assert_eq!(code, 404, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("DigitalOcean is not configured"),
        "{body}"
    );
}
