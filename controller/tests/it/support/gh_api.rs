//! The local GitHub API of the contract tests: `tests/fixtures/gh_api.py`
//! (openapi-core validating every request and answer against the official
//! description, the installation-token endpoint checked by hand, a second
//! origin for release asset downloads) as a child process on a free
//! loopback port, and its `/_test/` control routes. The description is
//! found through `$SLIPWAY_API_SPECS` (a folder holding `github-rest.json`),
//! else the copy vendored in the repo's `tests/api-specs/`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use super::do_api::repo_root;

/// The fine-grained token the server accepts.
pub const GH_TOKEN: &str = "github_pat_contract_test_token";
/// The App and installation the server knows.
pub const APP_ID: u64 = 424242;
pub const INSTALLATION_ID: u64 = 777;

/// The API description the server validates against.
pub fn spec_path() -> PathBuf {
    let dir = std::env::var_os("SLIPWAY_API_SPECS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("tests/api-specs"));
    let spec = dir.join("github-rest.json");
    assert!(spec.is_file(), "no API description at {}", spec.display());
    spec
}

/// A fresh App private key (PKCS#1 PEM, as GitHub hands them out) in `dir`.
pub fn app_key(dir: &Path) -> PathBuf {
    let path = dir.join("github-app.pem");
    let out = std::process::Command::new("openssl")
        .args(["genrsa", "-traditional", "-out"])
        .arg(&path)
        .arg("2048")
        .output()
        .expect("openssl");
    assert!(out.status.success(), "{out:?}");
    path
}

/// A running local GitHub API.
pub struct GhApi {
    pub base: String,
    port: u16,
    _child: Child,
}

impl GhApi {
    /// A server that accepts [`GH_TOKEN`] and, when `app_key` is given,
    /// installation tokens of App [`APP_ID`] signed with that key.
    pub async fn start(app_key: Option<&Path>) -> Self {
        let mut command = Command::new("python3");
        command
            .arg(repo_root().join("tests/fixtures/gh_api.py"))
            .arg("--spec")
            .arg(spec_path())
            .arg("--token")
            .arg(GH_TOKEN);
        if let Some(key) = app_key {
            command
                .arg("--app-id")
                .arg(APP_ID.to_string())
                .arg("--installation-id")
                .arg(INSTALLATION_ID.to_string())
                .arg("--app-key")
                .arg(key);
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect(
                "python3 runs tests/fixtures/gh_api.py (pip install openapi-core cryptography)",
            );
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        tokio::time::timeout(
            Duration::from_secs(60),
            BufReader::new(stdout).read_line(&mut line),
        )
        .await
        .expect("gh_api.py did not start within 60 s")
        .unwrap();
        let base = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("gh_api.py said {line:?}, not 'listening URL'"))
            .to_owned();
        let port = base.rsplit(':').next().unwrap().parse().unwrap();
        Self {
            base,
            port,
            _child: child,
        }
    }

    /// One request to the server.
    pub async fn raw(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            self.port,
            body.len()
        );
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer))
            .await
            .expect("gh_api.py answered within 20 s")
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
        let (status, value) = self.raw(method, path, body.as_ref()).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {value}"
        );
        value
    }

    /// Queues faults: each `{method?, path_prefix, status, count,
    /// retry_after?, ratelimit_remaining?, reset_in?}`.
    pub async fn faults(&self, faults: Value) {
        self.control("POST", "/_test/faults", Some(faults)).await;
    }

    /// The API requests received so far.
    pub async fn log(&self) -> Vec<Value> {
        self.control("GET", "/_test/log", None)
            .await
            .as_array()
            .unwrap()
            .clone()
    }

    /// Deployments made: `[{id, request, statuses: [request bodies]}]`.
    pub async fn deployments(&self) -> Vec<Value> {
        self.control("GET", "/_test/deployments", None)
            .await
            .as_array()
            .unwrap()
            .clone()
    }

    /// Commit statuses set: `[{sha, state, ...}]`.
    pub async fn commit_statuses(&self) -> Vec<Value> {
        self.control("GET", "/_test/commit_statuses", None)
            .await
            .as_array()
            .unwrap()
            .clone()
    }

    /// Installation tokens minted so far.
    pub async fn minted(&self) -> u64 {
        self.control("GET", "/_test/stats", None).await["minted"]
            .as_u64()
            .unwrap()
    }

    /// Adds a release asset; `{id, name, size, sha256}`.
    pub async fn add_asset(&self, name: &str, data: &[u8]) -> Value {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(data);
        self.control(
            "POST",
            "/_test/assets",
            Some(serde_json::json!({ "name": name, "data_base64": b64 })),
        )
        .await
    }

    /// Makes `git_ref` (a tag) point at `sha`.
    pub async fn add_commit(&self, git_ref: &str, sha: &str) {
        self.control(
            "POST",
            "/_test/commits",
            Some(serde_json::json!({ "ref": git_ref, "sha": sha })),
        )
        .await;
    }

    /// Requests that reached the asset CDN (another origin).
    pub async fn cdn_log(&self) -> Vec<Value> {
        self.control("GET", "/_test/cdn_log", None)
            .await
            .as_array()
            .unwrap()
            .clone()
    }

    /// A whole webhook payload of `name` (as under x-webhooks) with the
    /// fields in `fields`, validated against the described schema.
    pub async fn webhook(&self, name: &str, fields: Value) -> Value {
        self.control("POST", &format!("/_test/webhook/{name}"), Some(fields))
            .await
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
