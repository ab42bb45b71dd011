//! The fleet environment (issue 20): `slipway env` changes an app's
//! environment on the controller (sealed, versioned) and every node gets
//! it as `shared/.env`, the app restarted behind its health gate. Real
//! controller, agents and apps that print their environment.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;

use crate::support::{
    artifact, free_ports, sha256_file, stdout, text, wait_until, Agent, Controller,
};

/// The exec test app: prints its environment on /env.
const ENV_APP: &str = include_str!("../fixtures/envapp.py");

/// A value that must never show anywhere but `shared/.env`, the app and
/// `env get`.
const SECRET: &str = "s3cr3t-Zq8v-never-logged-7Kp";
/// Another one, given through --value-file.
const SECRET_FROM_FILE: &str = "file-borne-secret-Y2mW-41";

/// GET `path` on 127.0.0.1:`port`: (status, body).
pub(crate) fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    // busybox httpd may reset the connection after a CGI answer: keep
    // what came before the reset.
    let mut bytes = Vec::new();
    let _ = s.read_to_end(&mut bytes);
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    // A CGI answer (busybox httpd) passes the script's own "\n\n" on.
    let body = match (text.find("\r\n\r\n"), text.find("\n\n")) {
        (Some(a), Some(b)) if b < a => &text[b + 2..],
        (Some(a), _) => &text[a + 4..],
        (None, Some(b)) => &text[b + 2..],
        (None, None) => return None,
    };
    Some((status, body.to_owned()))
}

/// The environment the app on `port` runs with.
pub(crate) fn app_env(port: u16) -> serde_json::Map<String, Value> {
    let (status, body) = http_get(port, "/env").expect("the app answers /env");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// An exec-driver node running ENV_APP as `web`.
fn exec_node(controller: &Controller, name: &str) -> Agent {
    tagged_exec_node(controller, name, &[])
}

/// Every file under `dir` (recursively) whose bytes contain `needle`,
/// except those `allowed` says may hold it.
pub(crate) fn files_containing(
    dir: &Path,
    needle: &str,
    allowed: &dyn Fn(&Path) -> bool,
) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return found;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            found.extend(files_containing(&path, needle, allowed));
        } else if meta.is_file() && !allowed(&path) {
            if let Ok(bytes) = fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle.as_bytes()) {
                    found.push(path.display().to_string());
                }
            }
        }
    }
    found
}

/// `slipway --token TOKEN ARGS` with `input` on stdin.
fn slipway_stdin(
    controller: &Controller,
    token: &str,
    args: &[&str],
    input: &str,
) -> std::process::Output {
    let mut child = controller
        .slipway_command()
        .arg("--token")
        .arg(token)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn env_changes_reach_every_exec_node_exactly_and_a_breaking_value_rolls_back_there() {
    let controller = Controller::start();
    let mut agents = vec![exec_node(&controller, "n1"), exec_node(&controller, "n2")];
    for a in &mut agents {
        a.run();
    }
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    let secrets = controller.api_token("secrets:web");
    let other_app = controller.api_token("deploy:api,secrets:api");
    controller.wait_online(&reader, 2, Duration::from_secs(30));
    let work = tempfile::tempdir().unwrap();
    let art = artifact(work.path(), "v1", ENV_APP);
    let out = controller.deploy_web(&deployer, &art, &sha256_file(&art), "v1", &["--wait"]);
    assert!(out.status.success(), "{}", text(&out));

    // Set: one value on the command line, the secret from stdin, another
    // from a file. Every node gets it and the app sees it.
    let value_file = work.path().join("api-key.txt");
    fs::write(&value_file, format!("{SECRET_FROM_FILE}\n")).unwrap();
    let value_file_arg = format!("API_KEY={}", value_file.display());
    let out = slipway_stdin(
        &controller,
        &deployer,
        &[
            "env",
            "set",
            "web",
            "GREETING=hello",
            "DB_PASSWORD=-",
            "--value-file",
            &value_file_arg,
            "--wait",
        ],
        &format!("{SECRET}\n"),
    );
    assert!(out.status.success(), "{}", text(&out));
    let said = stdout(&out);
    assert!(said.contains("env v1"), "{said}");
    for a in &agents {
        assert!(said.contains(&format!("[{}] SUCCEEDED", a.name)), "{said}");
        let env = app_env(a.port);
        assert_eq!(env["GREETING"], "hello");
        assert_eq!(
            env["DB_PASSWORD"], SECRET,
            "the final newline of stdin is dropped"
        );
        assert_eq!(env["API_KEY"], SECRET_FROM_FILE);
        let env_file = a.root.join("shared/.env");
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(&env_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", env_file.display());
    }
    assert!(!said.contains(SECRET), "{said}");

    // The same value again: no new version, nodes untouched (the app
    // keeps its process).
    let pids: Vec<_> = agents.iter().map(Agent::app_pid).collect();
    let out = controller.slipway(
        &deployer,
        &["env", "set", "web", "GREETING=hello", "--wait"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains("unchanged"), "{}", text(&out));
    let after: Vec<_> = agents.iter().map(Agent::app_pid).collect();
    assert_eq!(pids, after, "an unchanged env restarted the app");

    // Unset: the variable is gone from the app's environment.
    let out = controller.slipway(&deployer, &["env", "unset", "web", "GREETING", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    for a in &agents {
        let env = app_env(a.port);
        assert!(
            !env.contains_key("GREETING"),
            "{} still sees GREETING",
            a.name
        );
        assert_eq!(env["DB_PASSWORD"], SECRET);
    }

    // Import: the whole file is the new environment (v3).
    let dotenv = work.path().join("prod.env");
    fs::write(
        &dotenv,
        format!("# production\nexport DB_PASSWORD='{SECRET}'\nMODE=\"blue green\"\n"),
    )
    .unwrap();
    let out = controller.slipway(
        &deployer,
        &[
            "env",
            "import",
            "web",
            "--file",
            dotenv.to_str().unwrap(),
            "--wait",
            "--strategy",
            "rolling",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    for a in &agents {
        let env = app_env(a.port);
        assert_eq!(env["MODE"], "blue green");
        assert_eq!(env["DB_PASSWORD"], SECRET);
        assert!(
            !env.contains_key("API_KEY"),
            "import keeps only the file's variables"
        );
    }

    // A value that breaks the app on n2: n2's gate fails, its previous
    // env comes back and the app runs with it; n1 takes it.
    let before_n2 = fs::read(agents[1].root.join("shared/.env")).unwrap();
    let out = controller.slipway(&deployer, &["env", "set", "web", "BREAK_ON=n2", "--wait"]);
    assert!(!out.status.success(), "{}", text(&out));
    let said = stdout(&out);
    assert!(said.contains("[n1] SUCCEEDED"), "{}", text(&out));
    assert!(said.contains("[n2] ROLLED_BACK"), "{}", text(&out));
    assert!(said.contains("env v4 failed"), "{}", text(&out));
    assert_eq!(app_env(agents[0].port)["BREAK_ON"], "n2");
    assert!(!app_env(agents[1].port).contains_key("BREAK_ON"));
    assert_eq!(http_get(agents[1].port, "/api/health").unwrap().0, 200);
    assert_eq!(
        fs::read(agents[1].root.join("shared/.env")).unwrap(),
        before_n2
    );

    // Status names n2 as lagging (v3 of v4).
    let out = controller.slipway(&reader, &["status", "--refresh", "--json"]);
    let status_text = stdout(&out);
    assert!(
        status_text.contains("env v4 is not on 1 node(s): n2 (has v3)"),
        "{}",
        text(&out)
    );

    // An offline node catches up when it reconnects.
    agents[1].stop_run();
    let out = controller.slipway(
        &deployer,
        &["env", "set", "web", "BREAK_ON=nobody", "--wait"],
    );
    assert!(!out.status.success(), "n2 is offline: {}", text(&out));
    assert_eq!(app_env(agents[0].port)["BREAK_ON"], "nobody");
    agents[1].run();
    wait_until("n2 to catch up to env v5", Duration::from_secs(60), || {
        http_get(agents[1].port, "/env")
            .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
            .is_some_and(|env| env["BREAK_ON"] == "nobody")
    });
    wait_until("status to show no env lag", Duration::from_secs(30), || {
        let out = controller.slipway(&reader, &["status", "--refresh", "--json"]);
        !stdout(&out).contains("env v5 is not on")
    });

    // list and history: names, versions, who; never values.
    let out = controller.slipway(&reader, &["env", "list", "web", "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list["version"], 5);
    let keys: Vec<&str> = list["variables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["BREAK_ON", "DB_PASSWORD", "MODE"]);
    let out = controller.slipway(&reader, &["env", "history", "web"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains("unset GREETING"), "{}", text(&out));
    assert!(stdout(&out).contains("import"), "{}", text(&out));

    // Scopes: read cannot get; deploy:web cannot get; secrets:api cannot
    // get web's; deploy:api cannot change web's; secrets:web gets it.
    for token in [&reader, &deployer, &other_app] {
        let out = controller.slipway(token, &["env", "get", "web", "DB_PASSWORD"]);
        assert!(!out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("PermissionDenied"), "{}", text(&out));
    }
    let out = controller.slipway(&other_app, &["env", "set", "web", "X=1"]);
    assert!(text(&out).contains("PermissionDenied"), "{}", text(&out));
    let out = controller.slipway(&secrets, &["env", "set", "web", "X=1"]);
    assert!(text(&out).contains("PermissionDenied"), "{}", text(&out));
    let out = controller.slipway(&secrets, &["env", "get", "web", "DB_PASSWORD"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout(&out).trim_end(), SECRET);

    // Rollback to v2 (GREETING unset, API_KEY set): a new version, v6.
    let out = controller.slipway(
        &deployer,
        &["env", "rollback", "web", "--to", "2", "--wait"],
    );
    assert!(out.status.success(), "{}", text(&out));
    for a in &agents {
        let env = app_env(a.port);
        assert_eq!(env["API_KEY"], SECRET_FROM_FILE);
        assert!(!env.contains_key("MODE"));
    }
    let out = controller.slipway(&reader, &["env", "list", "web", "--json"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["version"],
        6
    );

    // Each release records the env version it went live with. A release
    // rollback keeps the current env; --with-env brings the release's back.
    let deploy = |v: &str| {
        let art = artifact(work.path(), v, ENV_APP);
        let out = controller.deploy_web(&deployer, &art, &sha256_file(&art), v, &["--wait"]);
        assert!(out.status.success(), "{}", text(&out));
    };
    deploy("v2"); // with env v6
    let out = controller.slipway(&deployer, &["env", "set", "web", "COLOR=red", "--wait"]);
    assert!(out.status.success(), "{}", text(&out)); // v7
    deploy("v3"); // with env v7
    wait_until(
        "releases to show their env versions",
        Duration::from_secs(30),
        || {
            let out = controller.slipway(&reader, &["releases", "web"]);
            let said = stdout(&out);
            said.contains("(env v6)") && said.contains("(env v7)")
        },
    );
    let out = controller.slipway(&deployer, &["rollback", "web", "--to", "v2", "--with-env"]);
    assert!(out.status.success(), "{}", text(&out));
    for a in &agents {
        assert_eq!(http_get(a.port, "/").unwrap().1, "v2");
        assert!(
            !app_env(a.port).contains_key("COLOR"),
            "v2's env (v6) has no COLOR"
        );
    }
    let out = controller.slipway(&reader, &["env", "list", "web", "--json"]);
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap()["version"],
        8
    );
    // Back to v3 without --with-env: the current env (v8) stays.
    let out = controller.slipway(&deployer, &["rollback", "web", "--to", "v3", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    for a in &agents {
        assert_eq!(http_get(a.port, "/").unwrap().1, "v3");
        assert!(
            !app_env(a.port).contains_key("COLOR"),
            "the rollback changed the env"
        );
    }

    // Audit: names and versions; a value read is recorded with its name.
    let audit = controller.audit(&reader);
    let changed: Vec<&Value> = audit
        .iter()
        .filter(|e| e["event_type"] == "ENV_CHANGED")
        .collect();
    assert_eq!(changed.len(), 8, "{changed:?}");
    assert!(audit
        .iter()
        .any(|e| e["event_type"] == "ENV_VALUE_READ" && e["details"]["key"] == "DB_PASSWORD"));
    assert!(audit
        .iter()
        .any(|e| e["event_type"] == "ENV_DELIVERY_FAILED"));

    // Secrecy: nothing the controller wrote (database, WAL, log, backups
    // of its state) nor the agents (logs, ledgers, state) holds a value,
    // but the app's own .env.
    for needle in [SECRET, SECRET_FROM_FILE] {
        let leaks = files_containing(controller.dir.path(), needle, &|_| false);
        assert!(leaks.is_empty(), "controller files hold a value: {leaks:?}");
        for a in &agents {
            let leaks = files_containing(a.dir.path(), needle, &|p| p.ends_with("shared/.env"));
            assert!(leaks.is_empty(), "{} files hold a value: {leaks:?}", a.name);
        }
    }
    // The same grep finds what is stored in the clear (a name), so it
    // does look into the database and its WAL.
    let names = files_containing(&controller.data_dir(), "DB_PASSWORD", &|_| false);
    assert!(
        names.iter().any(|p| p.contains("controller.db")),
        "the names should be in the database: {names:?}"
    );
}

/// An exec-driver node running ENV_APP as `web`, whose join token gives
/// it `tags` (none: [`exec_node`]).
fn tagged_exec_node(controller: &Controller, name: &str, tags: &[&str]) -> Agent {
    let node = name.to_owned();
    let agent = Agent::enroll_tagged(controller, name, "web", tags, |root, port| {
        format!(
            r#"[apps.web]
root = "{root}"

[apps.web.run]
driver = "exec"
command = ["python3", "server.py", "{port}", "{node}"]
stop_grace = "2s"

[apps.web.health]
check = "http"
url = "http://127.0.0.1:{port}/api/health"
interval = "100ms"
successes = 2
start_period = "3s"
deadline = "10s"
liveness_interval = "500ms"
"#,
            root = root.display(),
        )
    });
    fs::create_dir_all(agent.root.join("shared")).unwrap();
    agent
}

/// A value set only in the staging layer.
const STAGING_SECRET: &str = "staging-only-Wq3r-secret-88Jd";

/// The `env list --json` entries as (key, layer or "base", overridden).
fn listed(controller: &Controller, token: &str, extra: &[&str]) -> Vec<(String, String, bool)> {
    let mut args = vec!["env", "list", "web", "--json"];
    args.extend_from_slice(extra);
    let out = controller.slipway(token, &args);
    assert!(out.status.success(), "{}", text(&out));
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    list["variables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["key"].as_str().unwrap().to_owned(),
                v["layer"].as_str().unwrap_or("base").to_owned(),
                v["overridden"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn tag_layers_override_the_base_on_their_nodes_only_and_clashes_are_refused() {
    let controller = Controller::start_http();
    let mut agents = vec![
        tagged_exec_node(&controller, "s1", &["env:staging"]),
        tagged_exec_node(&controller, "c1", &["env:staging", "role:canary"]),
        tagged_exec_node(&controller, "p1", &["env:production"]),
    ];
    for a in &mut agents {
        a.run();
    }
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    let secrets = controller.api_token("secrets:web");
    // The token's id (what pages and lists name as who changed it).
    let deployer_id = deployer.split('.').nth(1).unwrap().to_owned();
    controller.wait_online(&reader, 3, Duration::from_secs(30));
    let work = tempfile::tempdir().unwrap();
    let art = artifact(work.path(), "v1", ENV_APP);
    let out = controller.deploy_web(&deployer, &art, &sha256_file(&art), "v1", &["--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let (s1, c1, p1) = (&agents[0], &agents[1], &agents[2]);

    // v1: the base, everywhere.
    let out = slipway_stdin(
        &controller,
        &deployer,
        &[
            "env",
            "set",
            "web",
            "GREETING=base",
            "DB_PASSWORD=-",
            "--wait",
        ],
        SECRET,
    );
    assert!(out.status.success(), "{}", text(&out));
    for a in &agents {
        assert_eq!(app_env(a.port)["GREETING"], "base");
    }

    // v2: the staging layer reaches s1 and c1 only; p1 is not touched.
    let p1_pid = p1.app_pid();
    let out = slipway_stdin(
        &controller,
        &deployer,
        &[
            "env",
            "set",
            "web",
            "GREETING=staging",
            "STAGING_TOKEN=-",
            "--tag",
            "env:staging",
            "--wait",
        ],
        STAGING_SECRET,
    );
    assert!(out.status.success(), "{}", text(&out));
    let said = stdout(&out);
    assert!(said.contains("env v2"), "{said}");
    assert!(
        said.contains("[s1] SUCCEEDED") && said.contains("[c1] SUCCEEDED"),
        "{said}"
    );
    assert!(!said.contains("[p1]"), "p1 carries no env:staging: {said}");
    for a in [s1, c1] {
        let env = app_env(a.port);
        assert_eq!(env["GREETING"], "staging", "{}", a.name);
        assert_eq!(env["STAGING_TOKEN"], STAGING_SECRET);
        assert_eq!(env["DB_PASSWORD"], SECRET, "the base stays under the layer");
    }
    let env = app_env(p1.port);
    assert_eq!(env["GREETING"], "base");
    assert!(!env.contains_key("STAGING_TOKEN"));
    assert_eq!(p1.app_pid(), p1_pid, "p1 was restarted");

    // v3: a base change of a name the staging layer overrides reaches p1
    // only; the staging nodes' environment does not change.
    let s1_pid = s1.app_pid();
    let out = controller.slipway(
        &deployer,
        &["env", "set", "web", "GREETING=base3", "--wait"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let said = stdout(&out);
    assert!(said.contains("[p1] SUCCEEDED"), "{said}");
    assert!(!said.contains("[s1]") && !said.contains("[c1]"), "{said}");
    assert_eq!(app_env(p1.port)["GREETING"], "base3");
    assert_eq!(app_env(s1.port)["GREETING"], "staging");
    assert_eq!(s1.app_pid(), s1_pid, "s1 was restarted");

    // A role:canary layer setting GREETING would clash with env:staging on
    // c1: refused, naming the node, the name and both tags; nothing stored.
    let out = controller.slipway(
        &deployer,
        &[
            "env",
            "set",
            "web",
            "GREETING=canary",
            "--tag",
            "role:canary",
            "--wait",
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(
        said.contains("node c1 carries both env:staging and role:canary")
            && said.contains("would set GREETING")
            && said.contains("nothing was stored"),
        "{said}"
    );
    // A name no other layer of c1 sets is fine, and reaches c1 alone (v4).
    let out = controller.slipway(
        &deployer,
        &[
            "env",
            "set",
            "web",
            "FLAG=on",
            "--tag",
            "role:canary",
            "--wait",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let said = stdout(&out);
    assert!(
        said.contains("env v4") && said.contains("[c1] SUCCEEDED"),
        "{said}"
    );
    assert!(!said.contains("[s1]") && !said.contains("[p1]"), "{said}");
    assert_eq!(app_env(c1.port)["FLAG"], "on");
    assert!(!app_env(s1.port).contains_key("FLAG"));

    // list: every name with the layer it is set in; with --tag, what a
    // node of that tag sees, each name once from its layer. Never values.
    let all = listed(&controller, &reader, &[]);
    assert!(
        all.contains(&("GREETING".to_owned(), "base".to_owned(), true)),
        "{all:?}"
    );
    assert!(
        all.contains(&("GREETING".to_owned(), "env:staging".to_owned(), false)),
        "{all:?}"
    );
    assert!(
        all.contains(&("FLAG".to_owned(), "role:canary".to_owned(), false)),
        "{all:?}"
    );
    let staging = listed(&controller, &reader, &["--tag", "env:staging"]);
    assert_eq!(
        staging,
        vec![
            ("DB_PASSWORD".to_owned(), "base".to_owned(), false),
            ("GREETING".to_owned(), "env:staging".to_owned(), false),
            ("STAGING_TOKEN".to_owned(), "env:staging".to_owned(), false),
        ]
    );
    let out = controller.slipway(&reader, &["env", "list", "web"]);
    let said = stdout(&out);
    assert!(
        said.contains("env:staging") && said.contains("overridden"),
        "{said}"
    );
    // history --tag: that layer's versions only.
    let out = controller.slipway(
        &reader,
        &["env", "history", "web", "--tag", "env:staging", "--json"],
    );
    assert!(out.status.success(), "{}", text(&out));
    let versions: Vec<u64> = serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [2]);
    // get --tag: what a staging node sees; without, the base's.
    let out = controller.slipway(
        &secrets,
        &["env", "get", "web", "GREETING", "--tag", "env:staging"],
    );
    assert_eq!(stdout(&out).trim_end(), "staging", "{}", text(&out));
    let out = controller.slipway(&secrets, &["env", "get", "web", "GREETING"]);
    assert_eq!(stdout(&out).trim_end(), "base3", "{}", text(&out));

    // Unset in the layer: staging nodes fall back to the base (v5).
    let out = controller.slipway(
        &deployer,
        &[
            "env",
            "unset",
            "web",
            "GREETING",
            "--tag",
            "env:staging",
            "--wait",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    for a in [s1, c1] {
        assert_eq!(app_env(a.port)["GREETING"], "base3", "{}", a.name);
        assert_eq!(app_env(a.port)["STAGING_TOKEN"], STAGING_SECRET);
    }
    // Rollback within the layer (v6 = v2's content); a base version is
    // not one of the layer's.
    let out = controller.slipway(
        &deployer,
        &[
            "env",
            "rollback",
            "web",
            "--to",
            "3",
            "--tag",
            "env:staging",
        ],
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(
            "env version 3 of app web is a version of the base layer, not of layer env:staging"
        ),
        "{}",
        text(&out)
    );
    let out = controller.slipway(
        &deployer,
        &[
            "env",
            "rollback",
            "web",
            "--to",
            "2",
            "--tag",
            "env:staging",
            "--wait",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(!stdout(&out).contains("[p1]"), "{}", text(&out));
    assert_eq!(app_env(s1.port)["GREETING"], "staging");

    // An offline staging node catches up to its own environment (v7)
    // when it reconnects; status names it meanwhile, and only it.
    // (A fresh heartbeat of s1 first: the controller keeps its last.)
    let out = controller.slipway(&reader, &["status", "--refresh", "--json"]);
    assert!(!stdout(&out).contains("is not on"), "{}", text(&out));
    agents[0].stop_run();
    let out = controller.slipway(
        &deployer,
        &[
            "env",
            "set",
            "web",
            "GREETING=later",
            "--tag",
            "env:staging",
            "--wait",
        ],
    );
    assert!(!out.status.success(), "s1 is offline: {}", text(&out));
    assert_eq!(app_env(agents[1].port)["GREETING"], "later");
    let out = controller.slipway(&reader, &["status", "--refresh", "--json"]);
    let said = stdout(&out);
    assert!(
        said.contains("env v7 is not on 1 node(s): s1 (has v6)"),
        "{}",
        text(&out)
    );
    assert!(!said.contains("p1 (has"), "{said}");
    // The web pages: the app's env (version, layers, names with their
    // layer, who, when) and the lagging node; never a value.
    for path in ["/apps/web", "/"] {
        let page = http_page(&controller, &reader, path);
        for shown in [
            "Version v7",
            "env:staging</code> (v7)",
            "role:canary</code> (v4)",
            "STAGING_TOKEN",
            "DB_PASSWORD",
            "overridden by a tag layer",
            "env v7 is not on 1 node(s): s1 (has v6)",
        ] {
            assert!(page.contains(shown), "{path} lacks {shown:?}: {page}");
        }
        assert!(
            page.contains(&deployer_id),
            "{path} names no changer: {page}"
        );
        for value in [SECRET, STAGING_SECRET, "base3"] {
            assert!(!page.contains(value), "{path} shows a value ({value})");
        }
    }
    agents[0].run();
    wait_until("s1 to catch up to env v7", Duration::from_secs(60), || {
        http_get(agents[0].port, "/env")
            .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
            .is_some_and(|env| env["GREETING"] == "later")
    });
    wait_until("status to show no env lag", Duration::from_secs(30), || {
        let out = controller.slipway(&reader, &["status", "--refresh", "--json"]);
        !stdout(&out).contains("is not on")
    });
    assert_eq!(app_env(agents[2].port)["GREETING"], "base3");

    // Over HTTP: a layer change with its tag, the list per layer.
    let (code, started) = http_api(
        &controller,
        &deployer,
        "/api/v1/apps/web/env",
        Some(r#"{"set":{"REGION":"eu"},"tag":"env:production"}"#),
    );
    assert_eq!(code, 202, "{started}");
    assert_eq!(started["env_version"], 8);
    let record = http_wait_done(
        &controller,
        &reader,
        started["deployment_id"].as_str().unwrap(),
    );
    assert_eq!(record["status"], "succeeded", "{record}");
    assert_eq!(record["nodes"].as_array().unwrap().len(), 1, "{record}");
    assert_eq!(app_env(agents[2].port)["REGION"], "eu");
    assert!(!app_env(agents[0].port).contains_key("REGION"));
    let (code, list) = http_api(
        &controller,
        &reader,
        "/api/v1/apps/web/env?tag=env:production",
        None,
    );
    assert_eq!(code, 200, "{list}");
    let region = list["variables"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["key"] == "REGION")
        .unwrap();
    assert_eq!(region["layer"], "env:production", "{list}");
    let (code, got) = http_api(
        &controller,
        &secrets,
        "/api/v1/apps/web/env/values/GREETING?tag=env:staging",
        None,
    );
    assert_eq!(code, 200, "{got}");
    assert_eq!(
        (&got["value"], &got["layer"]),
        (&Value::from("later"), &Value::from("env:staging"))
    );
    let (code, refused) = http_api(
        &controller,
        &reader,
        "/api/v1/apps/web/env/values/GREETING?tag=env:staging",
        None,
    );
    assert_eq!(code, 403, "{refused}");
    let (code, bad) = http_api(
        &controller,
        &deployer,
        "/api/v1/apps/web/env",
        Some(r#"{"set":{"X":"1"},"tag":"env staging"}"#),
    );
    assert_eq!(code, 400, "{bad}");
    assert_eq!(bad["field"], "tag", "{bad}");
    let (code, bad) = http_api(&controller, &reader, "/api/v1/apps/web/env?layer=x", None);
    assert_eq!(code, 400, "{bad}");

    // HTTP rollback with_env: v2 went live with env v8; after the
    // rollback to v2 succeeded, the base comes back as of v8 (a new
    // version, v10, delivered as an env deployment).
    let deploy = |v: &str| {
        let art = artifact(work.path(), v, ENV_APP);
        let out = controller.deploy_web(&deployer, &art, &sha256_file(&art), v, &["--wait"]);
        assert!(out.status.success(), "{}", text(&out));
    };
    deploy("v2");
    let out = controller.slipway(&deployer, &["env", "set", "web", "GREETING=nine", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    deploy("v3");
    assert_eq!(app_env(agents[2].port)["GREETING"], "nine");
    let (code, bad) = http_api(
        &controller,
        &deployer,
        "/api/v1/apps/web/rollback",
        Some(r#"{"with_env":true}"#),
    );
    assert_eq!(code, 400, "{bad}");
    assert_eq!(bad["field"], "with_env", "{bad}");
    let (code, started) = http_api(
        &controller,
        &deployer,
        "/api/v1/apps/web/rollback",
        Some(r#"{"to_release_id":"v2","with_env":true}"#),
    );
    assert_eq!(code, 202, "{started}");
    assert_eq!(started["kind"], "rollback", "{started}");
    assert_eq!(started["restores_env_version"], 8, "{started}");
    let record = http_wait_done(
        &controller,
        &reader,
        started["deployment_id"].as_str().unwrap(),
    );
    assert_eq!(record["status"], "succeeded", "{record}");
    wait_until(
        "the env of release v2 to come back",
        Duration::from_secs(60),
        || {
            http_get(agents[2].port, "/env")
                .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
                .is_some_and(|env| env["GREETING"] == "base3")
        },
    );
    assert_eq!(http_get(agents[2].port, "/").unwrap().1, "v2");
    let (_, history) = http_api(&controller, &reader, "/api/v1/apps/web/env/history", None);
    assert_eq!(history["versions"][0]["version"], 10, "{history}");
    assert_eq!(history["versions"][0]["rollback_to"], 8, "{history}");
    let (code, doc) = http_api(&controller, &reader, "/api/v1/openapi.json", None);
    assert_eq!(code, 200);
    let rollback_props = &doc["components"]["schemas"]["RollbackBody"]["properties"];
    assert!(rollback_props.get("with_env").is_some(), "{rollback_props}");
    let env_props = &doc["components"]["schemas"]["EnvChangeBody"]["properties"];
    assert!(env_props.get("tag").is_some(), "{env_props}");
    // Let the env delivery end before the next change (one per app).
    wait_until("the env delivery to end", Duration::from_secs(60), || {
        let (_, list) = http_api(
            &controller,
            &reader,
            "/api/v1/deployments?app=web&limit=1",
            None,
        );
        list.to_string().contains("\"env\"") && !list.to_string().contains("\"running\"")
    });

    // The HTTP env body cap: 64 KiB exactly is taken, one byte more is
    // refused with 413 and a JSON error, before anything is stored.
    let cap = 64 * 1024;
    let body = |len: usize| {
        let value = "p".repeat(32 * 1024);
        let mut b = format!(r#"{{"set":{{"PAD":"{value}"}},"tag":"env:production"}}"#);
        b.push_str(&" ".repeat(len - b.len()));
        b
    };
    let (code, over) = http_api(
        &controller,
        &deployer,
        "/api/v1/apps/web/env",
        Some(&body(cap + 1)),
    );
    assert_eq!(code, 413, "{over}");
    assert!(
        over["error"].as_str().unwrap().contains("over 65536 bytes"),
        "{over}"
    );
    let (code, started) = http_api(
        &controller,
        &deployer,
        "/api/v1/apps/web/env",
        Some(&body(cap)),
    );
    assert_eq!(code, 202, "{started}");
    assert_eq!(
        started["env_version"], 11,
        "the refused body stored nothing: {started}"
    );
    let record = http_wait_done(
        &controller,
        &reader,
        started["deployment_id"].as_str().unwrap(),
    );
    assert_eq!(record["status"], "succeeded", "{record}");
    assert_eq!(
        app_env(agents[2].port)["PAD"].as_str().unwrap().len(),
        32 * 1024
    );

    // A layer no live node carries: stored (v12), said not delivered.
    let out = controller.slipway(
        &deployer,
        &["env", "set", "web", "X=1", "--tag", "env:nowhere", "--wait"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("env version 12 of app web is stored, but was not delivered: no live node carries tag env:nowhere"),
        "{}",
        text(&out)
    );

    // import --tag replaces that layer's whole content (v13): p1 alone.
    let layer_file = work.path().join("production.env");
    fs::write(&layer_file, "REGION=us\n").unwrap();
    let out = controller.slipway(
        &deployer,
        &[
            "env",
            "import",
            "web",
            "--file",
            layer_file.to_str().unwrap(),
            "--tag",
            "env:production",
            "--wait",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let said = stdout(&out);
    assert!(
        said.contains("env v13") && said.contains("[p1] SUCCEEDED"),
        "{said}"
    );
    assert!(!said.contains("[s1]") && !said.contains("[c1]"), "{said}");
    let env = app_env(agents[2].port);
    assert_eq!(env["REGION"], "us");
    assert!(
        !env.contains_key("PAD"),
        "import keeps only the file's variables"
    );
    assert_eq!(env["GREETING"], "base3", "the base stays under the layer");

    // Secrecy: no value in anything the controller or the agents wrote,
    // but the apps' .env files; nor in the audit.
    let audit = controller.audit(&reader);
    assert!(audit
        .iter()
        .any(|e| e["event_type"] == "ENV_CHANGED" && e["details"]["layer"] == "env:staging"));
    for needle in [SECRET, STAGING_SECRET] {
        assert!(!serde_json::to_string(&audit).unwrap().contains(needle));
        let leaks = files_containing(controller.dir.path(), needle, &|_| false);
        assert!(leaks.is_empty(), "controller files hold a value: {leaks:?}");
        for a in &agents {
            let leaks = files_containing(a.dir.path(), needle, &|p| p.ends_with("shared/.env"));
            assert!(leaks.is_empty(), "{} files hold a value: {leaks:?}", a.name);
        }
    }
    let leaks = files_containing(agents[2].dir.path(), STAGING_SECRET, &|_| false);
    assert!(
        leaks.is_empty(),
        "a production node got the staging layer: {leaks:?}"
    );
}

/// `curl` against the controller's HTTP API (its CA) with `token`:
/// status and JSON body. `body`: POST it as JSON.
fn http_api(controller: &Controller, token: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let url = format!("{}{path}", controller.http_url());
    let mut cmd = std::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "120", "--cacert"])
        .arg(controller.ca_pem())
        .args(["-w", "\n%{http_code}", "-H"])
        .arg(format!("Authorization: Bearer {token}"));
    if let Some(body) = body {
        cmd.args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            body,
        ]);
    }
    let out = cmd.arg(&url).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (
        code.trim().parse().unwrap(),
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {body}")),
    )
}

/// A page of the controller's web face fetched with `token`: its HTML.
fn http_page(controller: &Controller, token: &str, path: &str) -> String {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-f", "--max-time", "60", "--cacert"])
        .arg(controller.ca_pem())
        .arg("-H")
        .arg(format!("Authorization: Bearer {token}"))
        .arg(format!("{}{path}", controller.http_url()))
        .output()
        .unwrap();
    assert!(out.status.success(), "{path}: {}", text(&out));
    String::from_utf8(out.stdout).unwrap()
}

/// Waits for deployment `id` to end; its record.
fn http_wait_done(controller: &Controller, token: &str, id: &str) -> Value {
    let mut record = Value::Null;
    wait_until(
        &format!("deployment {id}"),
        Duration::from_secs(120),
        || {
            let (code, body) = http_api(
                controller,
                token,
                &format!("/api/v1/deployments/{id}"),
                None,
            );
            assert_eq!(code, 200, "{body}");
            record = body;
            record["status"] != "running"
        },
    );
    record
}

/// Kills this test's PM2 daemon, whatever happened.
struct Pm2Home(std::path::PathBuf);

impl Drop for Pm2Home {
    fn drop(&mut self) {
        let _ = std::process::Command::new("pm2")
            .arg("kill")
            .env("PM2_HOME", &self.0)
            .stdin(Stdio::null())
            .output();
    }
}

/// `<dir>/<version>.tar.gz` with the PM2 env app as server.js.
fn pm2_env_artifact(dir: &Path, version: &str) -> std::path::PathBuf {
    let art = dir.join(format!("{version}.tar.gz"));
    let body = include_str!("../fixtures/envapp.js").replace("__RELEASE__", version);
    let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
        fs::File::create(&art).unwrap(),
        flate2::Compression::fast(),
    ));
    let mut h = tar::Header::new_gnu();
    h.set_size(body.len() as u64);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "server.js", body.as_bytes()).unwrap();
    b.into_inner().unwrap().finish().unwrap();
    art
}

#[test]
fn env_over_http_reaches_a_pm2_app_exactly_and_an_unset_variable_disappears() {
    let controller = Controller::start_http();
    let pm2_home = tempfile::tempdir().unwrap();
    let _guard = Pm2Home(pm2_home.path().to_owned());
    let home = pm2_home.path().display().to_string();
    let mut agent = Agent::enroll_with(&controller, "p1", "web", |root, port| {
        format!(
            r#"[apps.web]
root = "{root}"

[apps.web.run]
driver = "pm2"
script = "server.js"
instances = 2
exec_mode = "cluster"
pm2_home = "{home}"

[apps.web.health]
check = "http"
url = "http://127.0.0.1:{port}/api/health"
interval = "100ms"
successes = 2
start_period = "200ms"
deadline = "10s"
"#,
            root = root.display(),
        )
    });
    fs::create_dir_all(agent.root.join("shared")).unwrap();
    agent.run();
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    let secrets = controller.api_token("secrets:web");
    let other = controller.api_token("deploy:api");
    controller.wait_online(&reader, 1, Duration::from_secs(30));

    // The environment is set before the first deploy: the node takes the
    // file (nothing runs yet), and the app starts with it.
    let port = agent.port.to_string();
    let body =
        serde_json::json!({ "set": { "PORT": port, "DB_PASSWORD": SECRET, "FEATURE": "on" } });
    let (code, started) = http_api(
        &controller,
        &deployer,
        "/api/v1/apps/web/env",
        Some(&body.to_string()),
    );
    assert_eq!(code, 202, "{started}");
    assert_eq!(started["env_version"], 1);
    assert_eq!(started["kind"], "env");
    let record = http_wait_done(
        &controller,
        &reader,
        started["deployment_id"].as_str().unwrap(),
    );
    assert_eq!(record["status"], "succeeded", "{record}");
    assert!(!record.to_string().contains(SECRET), "{record}");

    let work = tempfile::tempdir().unwrap();
    let art = pm2_env_artifact(work.path(), "v1");
    let out = controller.deploy_web(&deployer, &art, &sha256_file(&art), "v1", &["--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let env = app_env(agent.port);
    assert_eq!(env["DB_PASSWORD"], SECRET);
    assert_eq!(env["FEATURE"], "on");

    // Unset FEATURE: a PM2 reload would keep it; the process must not.
    let body = serde_json::json!({ "unset": ["FEATURE"] });
    let (code, started) = http_api(
        &controller,
        &deployer,
        "/api/v1/apps/web/env",
        Some(&body.to_string()),
    );
    assert_eq!(code, 202, "{started}");
    let record = http_wait_done(
        &controller,
        &reader,
        started["deployment_id"].as_str().unwrap(),
    );
    assert_eq!(record["status"], "succeeded", "{record}");
    let env = app_env(agent.port);
    assert!(!env.contains_key("FEATURE"), "PM2 kept a removed variable");
    assert_eq!(env["DB_PASSWORD"], SECRET);
    // Every worker of the cluster sees it (each answer comes from one).
    for _ in 0..6 {
        assert!(!app_env(agent.port).contains_key("FEATURE"));
    }

    // A value that breaks the app: the gate fails, the previous env comes
    // back and PM2 runs with it.
    let body = serde_json::json!({ "set": { "BREAK_ON": "all" } });
    let (code, started) = http_api(
        &controller,
        &deployer,
        "/api/v1/apps/web/env",
        Some(&body.to_string()),
    );
    assert_eq!(code, 202, "{started}");
    let record = http_wait_done(
        &controller,
        &reader,
        started["deployment_id"].as_str().unwrap(),
    );
    assert_eq!(record["status"], "failed", "{record}");
    assert_eq!(record["nodes"][0]["outcome"], "rolled_back", "{record}");
    let env = app_env(agent.port);
    assert!(!env.contains_key("BREAK_ON"));
    assert_eq!(http_get(agent.port, "/api/health").unwrap().0, 200);

    // Names over HTTP, values only with secrets:web; deploy:api may not
    // change web's env.
    let (code, list) = http_api(&controller, &reader, "/api/v1/apps/web/env", None);
    assert_eq!(code, 200, "{list}");
    assert_eq!(list["version"], 3);
    assert!(!list.to_string().contains(SECRET), "{list}");
    let (code, history) = http_api(&controller, &reader, "/api/v1/apps/web/env/history", None);
    assert_eq!(code, 200, "{history}");
    assert_eq!(history["versions"][1]["unset"][0], "FEATURE");
    let (code, refused) = http_api(
        &controller,
        &reader,
        "/api/v1/apps/web/env/values/DB_PASSWORD",
        None,
    );
    assert_eq!(code, 403, "{refused}");
    let (code, refused) = http_api(
        &controller,
        &deployer,
        "/api/v1/apps/web/env/values/DB_PASSWORD",
        None,
    );
    assert_eq!(code, 403, "{refused}");
    let (code, got) = http_api(
        &controller,
        &secrets,
        "/api/v1/apps/web/env/values/DB_PASSWORD",
        None,
    );
    assert_eq!(code, 200, "{got}");
    assert_eq!(got["value"], SECRET);
    let (code, refused) = http_api(
        &controller,
        &other,
        "/api/v1/apps/web/env",
        Some(r#"{"set":{"X":"1"}}"#),
    );
    assert_eq!(code, 403, "{refused}");
    let (code, bad) = http_api(
        &controller,
        &deployer,
        "/api/v1/apps/web/env",
        Some(r#"{"set":{"1BAD":"x"}}"#),
    );
    assert_eq!(code, 400, "{bad}");

    // Nothing the controller or the agent wrote holds the value, but the
    // app's .env and PM2's own files (its process file, its dump).
    let pm2_files = |p: &Path| {
        p.ends_with("shared/.env")
            || p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("pm2-"))
    };
    assert!(files_containing(controller.dir.path(), SECRET, &|_| false).is_empty());
    let leaks = files_containing(agent.dir.path(), SECRET, &pm2_files);
    assert!(leaks.is_empty(), "{leaks:?}");
}

/// Builds image `tag` (`docker import`, nothing pulled): a static busybox
/// whose httpd serves CGI scripts on port 3000: `/cgi-bin/env` prints the
/// container's environment (`NAME=value` lines), `/cgi-bin/health` answers
/// 500 while BREAK_ON is "all", else 200.
fn busybox_env_image(workdir: &Path, tag: &str) {
    const BUSYBOX: &str = "/bin/busybox";
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: run scripts/setup-docker.sh (installs busybox-static)"
    );
    use std::os::unix::fs::PermissionsExt as _;
    let rootfs = workdir.join("rootfs-env");
    fs::create_dir_all(rootfs.join("bin")).unwrap();
    fs::create_dir_all(rootfs.join("www/cgi-bin")).unwrap();
    fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
    let scripts = [
        ("env", "#!/bin/sh\necho 'Content-Type: text/plain'\necho\n/bin/busybox env\n"),
        (
            "health",
            "#!/bin/sh\nif [ \"$BREAK_ON\" = all ]; then echo 'Status: 500 Broken'; echo 'Content-Type: text/plain'; echo; echo broken; exit 0; fi\necho 'Content-Type: text/plain'\necho\necho ok\n",
        ),
    ];
    for (name, body) in scripts {
        let path = rootfs.join("www/cgi-bin").join(name);
        fs::write(&path, body).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let tarball = workdir.join("rootfs-env.tar");
    let mut builder = tar::Builder::new(fs::File::create(&tarball).unwrap());
    builder.follow_symlinks(false);
    builder.append_dir_all(".", &rootfs).unwrap();
    builder.into_inner().unwrap().sync_all().unwrap();
    crate::docker_image::docker_cli(&[
        "import",
        "--change",
        r#"CMD ["/bin/busybox","httpd","-f","-p","3000","-h","/www"]"#,
        tarball.to_str().unwrap(),
        tag,
    ]);
}

/// The `NAME=value` lines `/cgi-bin/env` prints on `port`, as a map.
fn container_env(port: u16) -> Option<std::collections::BTreeMap<String, String>> {
    let (status, body) = http_get(port, "/cgi-bin/env")?;
    (status == 200).then(|| {
        body.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    })
}

#[test]
fn env_changes_reach_a_docker_app_and_a_breaking_value_rolls_back() {
    if std::os::unix::net::UnixStream::connect("/var/run/docker.sock").is_err() {
        eprintln!("SKIPPED: no docker engine; run scripts/setup-docker.sh to run it");
        return;
    }
    let app = format!("dkenv{}", std::process::id());
    let tag = format!("slipway-e2e-{app}:v1");
    struct Cleanup(String, String);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let run = |args: &[&str]| {
                std::process::Command::new("docker")
                    .args(args)
                    .output()
                    .ok()
            };
            let label = format!("label=slipway.app={}", self.0);
            if let Some(out) = run(&["ps", "-aq", "--filter", &label]) {
                for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    run(&["rm", "-f", id]);
                }
            }
            let reference = format!("reference=slipway/{}:*", self.0);
            if let Some(out) = run(&["images", "-q", "--filter", &reference]) {
                for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    run(&["rmi", "-f", id]);
                }
            }
            run(&["rmi", "-f", &self.1]);
        }
    }
    let _cleanup = Cleanup(app.clone(), tag.clone());
    let ports: [u16; 2] = free_ports();
    let controller = Controller::start();
    let mut agent = Agent::enroll_with(&controller, "d1", &app, |root, _| {
        format!(
            r#"[apps.{app}]
root = "{root}"

[apps.{app}.run]
driver = "docker"
image_archive = "image.tar"
container_port = 3000
ports = [{p1}, {p2}]
host_ip = "127.0.0.1"
memory = "64MiB"
stop_grace = "1s"

[apps.{app}.health]
check = "http"
url = "http://127.0.0.1:{{port}}/cgi-bin/health"
interval = "100ms"
successes = 2
start_period = "500ms"
deadline = "8s"
"#,
            root = root.display(),
            p1 = ports[0],
            p2 = ports[1],
        )
    });
    fs::create_dir_all(agent.root.join("shared")).unwrap();
    agent.run();
    let reader = controller.api_token("read");
    let deployer = controller.api_token(&format!("deploy:{app}"));
    controller.wait_online(&reader, 1, Duration::from_secs(30));

    let work = tempfile::tempdir().unwrap();
    busybox_env_image(work.path(), &tag);
    let saved = work.path().join("image.tar");
    crate::docker_image::docker_cli(&["save", "-o", saved.to_str().unwrap(), &tag]);
    let art = work.path().join("v1.tar.gz");
    {
        let mut b = tar::Builder::new(flate2::write::GzEncoder::new(
            fs::File::create(&art).unwrap(),
            flate2::Compression::fast(),
        ));
        b.append_path_with_name(&saved, "image.tar").unwrap();
        b.into_inner().unwrap().finish().unwrap();
    }
    let env_of = || -> std::collections::BTreeMap<String, String> {
        ports
            .iter()
            .find_map(|p| container_env(*p))
            .unwrap_or_else(|| {
                panic!(
                    "no container serves /cgi-bin/env: {:?}",
                    ports.map(|p| http_get(p, "/cgi-bin/env"))
                )
            })
    };
    let sha = sha256_file(&art);
    let out = controller.slipway(
        &deployer,
        &[
            "deploy",
            &app,
            art.to_str().unwrap(),
            "--sha",
            &sha,
            "--id",
            "v1",
            "--wait",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));

    let out = slipway_stdin(
        &controller,
        &deployer,
        &["env", "set", &app, "TOKEN=-", "COLOR=blue", "--wait"],
        SECRET,
    );
    assert!(out.status.success(), "{}", text(&out));
    let env = env_of();
    assert_eq!(
        env.get("TOKEN").map(String::as_str),
        Some(SECRET),
        "{env:?}"
    );
    assert_eq!(env.get("COLOR").map(String::as_str), Some("blue"));

    let out = controller.slipway(&deployer, &["env", "unset", &app, "COLOR", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let env = env_of();
    assert!(!env.contains_key("COLOR"), "{env:?}");
    assert_eq!(env.get("TOKEN").map(String::as_str), Some(SECRET));

    // A value that breaks it: rolled back, the container with the
    // previous env serves.
    let out = controller.slipway(&deployer, &["env", "set", &app, "BREAK_ON=all", "--wait"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains("[d1] ROLLED_BACK"), "{}", text(&out));
    let env = env_of();
    assert!(!env.contains_key("BREAK_ON"), "{env:?}");
    let serving: Vec<u16> = ports
        .iter()
        .copied()
        .filter(|p| http_get(*p, "/cgi-bin/health").is_some_and(|(s, _)| s == 200))
        .collect();
    assert_eq!(
        serving.len(),
        1,
        "exactly one healthy container serves: {serving:?}"
    );

    let leaks = files_containing(controller.dir.path(), SECRET, &|_| false);
    assert!(leaks.is_empty(), "{leaks:?}");
    let leaks = files_containing(agent.dir.path(), SECRET, &|p| p.ends_with("shared/.env"));
    assert!(leaks.is_empty(), "{leaks:?}");
}
