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

use crate::support::{artifact, sha256_file, stdout, text, wait_until, Agent, Controller};

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
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split(' ').nth(1)?.parse().ok()?;
    Some((status, text.split("\r\n\r\n").nth(1)?.to_owned()))
}

/// The environment the app on `port` runs with.
pub(crate) fn app_env(port: u16) -> serde_json::Map<String, Value> {
    let (status, body) = http_get(port, "/env").expect("the app answers /env");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// An exec-driver node running ENV_APP as `web`.
fn exec_node(controller: &Controller, name: &str) -> Agent {
    let node = name.to_owned();
    let agent = Agent::enroll_with(controller, name, "web", |root, port| {
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
fn slipway_stdin(controller: &Controller, token: &str, args: &[&str], input: &str) -> std::process::Output {
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
            "env", "set", "web", "GREETING=hello", "DB_PASSWORD=-",
            "--value-file", &value_file_arg, "--wait",
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
        assert_eq!(env["DB_PASSWORD"], SECRET, "the final newline of stdin is dropped");
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
    let out = controller.slipway(&deployer, &["env", "set", "web", "GREETING=hello", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stdout(&out).contains("unchanged"), "{}", text(&out));
    let after: Vec<_> = agents.iter().map(Agent::app_pid).collect();
    assert_eq!(pids, after, "an unchanged env restarted the app");

    // Unset: the variable is gone from the app's environment.
    let out = controller.slipway(&deployer, &["env", "unset", "web", "GREETING", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    for a in &agents {
        let env = app_env(a.port);
        assert!(!env.contains_key("GREETING"), "{} still sees GREETING", a.name);
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
        &["env", "import", "web", "--file", dotenv.to_str().unwrap(), "--wait", "--strategy", "rolling"],
    );
    assert!(out.status.success(), "{}", text(&out));
    for a in &agents {
        let env = app_env(a.port);
        assert_eq!(env["MODE"], "blue green");
        assert_eq!(env["DB_PASSWORD"], SECRET);
        assert!(!env.contains_key("API_KEY"), "import keeps only the file's variables");
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
    assert_eq!(fs::read(agents[1].root.join("shared/.env")).unwrap(), before_n2);

    // Status names n2 as lagging (v3 of v4).
    let out = controller.slipway(&reader, &["status", "--refresh", "--json"]);
    let status_text = stdout(&out);
    assert!(status_text.contains("env v4 is not on 1 node(s): n2 (has v3)"), "{}", text(&out));

    // An offline node catches up when it reconnects.
    agents[1].stop_run();
    let out = controller.slipway(&deployer, &["env", "set", "web", "BREAK_ON=nobody", "--wait"]);
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
    let out = controller.slipway(&deployer, &["env", "rollback", "web", "--to", "2", "--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    for a in &agents {
        let env = app_env(a.port);
        assert_eq!(env["API_KEY"], SECRET_FROM_FILE);
        assert!(!env.contains_key("MODE"));
    }
    let out = controller.slipway(&reader, &["env", "list", "web", "--json"]);
    assert_eq!(serde_json::from_slice::<Value>(&out.stdout).unwrap()["version"], 6);

    // Audit: names and versions; a value read is recorded with its name.
    let audit = controller.audit(&reader);
    let changed: Vec<&Value> = audit.iter().filter(|e| e["event_type"] == "ENV_CHANGED").collect();
    assert_eq!(changed.len(), 6, "{changed:?}");
    assert!(audit
        .iter()
        .any(|e| e["event_type"] == "ENV_VALUE_READ" && e["details"]["key"] == "DB_PASSWORD"));
    assert!(audit.iter().any(|e| e["event_type"] == "ENV_DELIVERY_FAILED"));

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
