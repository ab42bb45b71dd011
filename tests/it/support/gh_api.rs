//! The local GitHub API (tests/fixtures/gh_api.py: every request and
//! answer validated against tests/api-specs/github-rest.json, or the
//! description in `$SLIPWAY_API_SPECS`; installation tokens of a test App;
//! release assets behind a redirect to another origin; webhook payloads
//! made and validated from the described schemas), for the end-to-end
//! tests of the GitHub integration. Loopback only.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// The fine-grained token the local API accepts.
pub const GH_TOKEN: &str = "github_pat_e2e_test_token";
/// The App and installation the local API knows.
pub const APP_ID: u64 = 424242;
pub const INSTALLATION_ID: u64 = 777;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A fresh App private key (PKCS#1 PEM, as GitHub hands them out).
pub fn app_key(dir: &Path) -> PathBuf {
    let path = dir.join("github-app.pem");
    let out = Command::new("openssl")
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
    child: Child,
    _stdin: ChildStdin,
}

impl GhApi {
    /// Accepts [`GH_TOKEN`], and installation tokens of App [`APP_ID`]
    /// signed with `app_key`.
    pub fn start(app_key: &Path) -> Self {
        let specs = std::env::var_os("SLIPWAY_API_SPECS")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("tests/api-specs"));
        let mut child = Command::new("python3")
            .arg(repo_root().join("tests/fixtures/gh_api.py"))
            .arg("--spec")
            .arg(specs.join("github-rest.json"))
            .arg("--token")
            .arg(GH_TOKEN)
            .arg("--app-id")
            .arg(APP_ID.to_string())
            .arg("--installation-id")
            .arg(INSTALLATION_ID.to_string())
            .arg("--app-key")
            .arg(app_key)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 tests/fixtures/gh_api.py (pip install openapi-core cryptography)");
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("gh_api.py said {line:?}"))
            .to_owned();
        let port = base.rsplit(':').next().unwrap().parse().unwrap();
        Self {
            base,
            port,
            child,
            _stdin: stdin,
        }
    }

    /// A `/_test/` control request; panics unless 2xx.
    pub fn control(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
        assert!((200..300).contains(&status), "{method} {path}: {answer}");
        serde_json::from_str(body).unwrap()
    }

    /// Adds a release asset; `{id, name, size, sha256}`.
    pub fn add_asset(&self, name: &str, data: &[u8]) -> Value {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(data);
        self.control(
            "POST",
            "/_test/assets",
            Some(serde_json::json!({ "name": name, "data_base64": b64 })),
        )
    }

    /// Serves `data` at `{base}/_test/files/{name}` (not GitHub's API: a
    /// checksums file a URL template names).
    pub fn add_file(&self, name: &str, data: &[u8]) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(data);
        self.control(
            "POST",
            &format!("/_test/files/{name}"),
            Some(serde_json::json!({ "data_base64": b64 })),
        );
        format!("{}/_test/files/{name}", self.base)
    }

    /// Makes the tag `git_ref` point at commit `sha`.
    pub fn add_commit(&self, git_ref: &str, sha: &str) {
        self.control(
            "POST",
            "/_test/commits",
            Some(serde_json::json!({ "ref": git_ref, "sha": sha })),
        );
    }

    /// Queues faults: `{method?, path_prefix, status, count, ...}`.
    pub fn faults(&self, faults: Value) {
        self.control("POST", "/_test/faults", Some(faults));
    }

    /// Deployments made: `[{id, request, statuses: [request bodies]}]`.
    pub fn deployments(&self) -> Vec<Value> {
        self.control("GET", "/_test/deployments", None)
            .as_array()
            .unwrap()
            .clone()
    }

    /// The API requests received so far.
    pub fn log(&self) -> Vec<Value> {
        self.control("GET", "/_test/log", None)
            .as_array()
            .unwrap()
            .clone()
    }

    /// Requests that reached the asset CDN (another origin).
    pub fn cdn_log(&self) -> Vec<Value> {
        self.control("GET", "/_test/cdn_log", None)
            .as_array()
            .unwrap()
            .clone()
    }

    /// Commit statuses set.
    pub fn commit_statuses(&self) -> Vec<Value> {
        self.control("GET", "/_test/commit_statuses", None)
            .as_array()
            .unwrap()
            .clone()
    }

    /// A whole webhook payload of `name` (as under x-webhooks) with
    /// `fields`, validated against the described schema.
    pub fn webhook(&self, name: &str, fields: Value) -> Value {
        self.control("POST", &format!("/_test/webhook/{name}"), Some(fields))
    }

    /// Fails the test on any request or answer outside the description.
    pub fn assert_no_violations(&self) {
        let v = self.control("GET", "/_test/violations", None);
        assert_eq!(v, serde_json::json!([]), "outside the API description");
    }
}

impl Drop for GhApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
