//! The local DigitalOcean API of the contract tests: `tests/fixtures/do_api.py`
//! (openapi-core validating every request and answer against the official
//! description) as a child process on a free loopback port, and its
//! `/_test/` control routes. The description is found through
//! `$SLIPWAY_API_SPECS` (a folder holding `digitalocean-v2.json`), else the
//! copy vendored in the repo's `tests/api-specs/`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The token the server accepts.
pub const DO_TOKEN: &str = "dop_v1_contract_test_token";

/// The repository's root (the controller crate's parent).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// The API description the server validates against.
pub fn spec_path() -> PathBuf {
    let dir = std::env::var_os("SLIPWAY_API_SPECS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("tests/api-specs"));
    let spec = dir.join("digitalocean-v2.json");
    assert!(spec.is_file(), "no API description at {}", spec.display());
    spec
}

/// A running local DigitalOcean API.
pub struct DoApi {
    pub base: String,
    port: u16,
    // Killed on drop; its stdin closing also stops it.
    _child: Child,
}

impl DoApi {
    pub async fn start() -> Self {
        let mut child = Command::new("python3")
            .arg(repo_root().join("tests/fixtures/do_api.py"))
            .arg("--spec")
            .arg(spec_path())
            .arg("--token")
            .arg(DO_TOKEN)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs tests/fixtures/do_api.py (pip install openapi-core)");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(60),
            BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .expect("do_api.py did not start within 60 s")
        .unwrap();
        let base = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("do_api.py said {line:?}, not 'listening URL'"))
            .to_owned();
        let port = base.rsplit(':').next().unwrap().parse().unwrap();
        Self {
            base,
            port,
            _child: child,
        }
    }

    /// One request to the server (control routes or raw API calls).
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&Value>,
    ) -> (u16, Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nContent-Length: {}\r\n",
            self.port,
            body.len()
        );
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(&body);
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
            .await
            .expect("do_api.py answered within 20 s")
            .unwrap();
        let text = String::from_utf8(answer).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap()
        };
        (status, value)
    }

    /// A control route; panics unless it answers 2xx.
    pub async fn control(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, value) = self.raw(method, path, &[], body.as_ref()).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {value}"
        );
        value
    }

    /// Adds a droplet behind the client's back (as the DO console would).
    pub async fn seed_droplet(&self, name: &str, tags: &[&str]) -> Value {
        self.control(
            "POST",
            "/_test/droplets",
            Some(serde_json::json!({ "name": name, "tags": tags })),
        )
        .await
    }

    /// Queues faults: each `{method?, path_prefix, status, count, retry_after?, ratelimit_remaining?}`.
    pub async fn faults(&self, faults: Value) {
        self.control("POST", "/_test/faults", Some(faults)).await;
    }

    /// The API requests received so far: `{method, path, query, status}`.
    pub async fn log(&self) -> Vec<Value> {
        self.control("GET", "/_test/log", None)
            .await
            .as_array()
            .unwrap()
            .clone()
    }

    /// Every request or answer the description does not allow.
    pub async fn violations(&self) -> Vec<String> {
        serde_json::from_value(self.control("GET", "/_test/violations", None).await).unwrap()
    }

    /// Fails the test on any contract violation.
    pub async fn assert_no_violations(&self) {
        let v = self.violations().await;
        assert!(
            v.is_empty(),
            "requests or answers outside the API description: {v:#?}"
        );
    }
}
