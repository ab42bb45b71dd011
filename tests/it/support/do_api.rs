//! The local DigitalOcean API (tests/fixtures/do_api.py, every request and
//! answer validated against tests/api-specs/digitalocean-v2.json, or the
//! description in `$SLIPWAY_API_SPECS`) and droplet metadata services, for
//! the end-to-end tests of the DigitalOcean fleet. Loopback only.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

/// The token the local API accepts.
pub const DO_TOKEN: &str = "dop_v1_e2e_test_token";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A running local DigitalOcean API.
pub struct DoApi {
    pub base: String,
    port: u16,
    child: Child,
    // Held open: the server stops when it closes.
    _stdin: ChildStdin,
}

impl DoApi {
    pub fn start() -> Self {
        let specs = std::env::var_os("SLIPWAY_API_SPECS")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo_root().join("tests/api-specs"));
        let mut child = Command::new("python3")
            .arg(repo_root().join("tests/fixtures/do_api.py"))
            .arg("--spec")
            .arg(specs.join("digitalocean-v2.json"))
            .arg("--token")
            .arg(DO_TOKEN)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 tests/fixtures/do_api.py (pip install openapi-core)");
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("do_api.py said {line:?}"))
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

    /// Adds a droplet as the DO console would; returns its id.
    pub fn add_droplet(&self, name: &str, tags: &[&str]) -> u64 {
        let d = self.control(
            "POST",
            "/_test/droplets",
            Some(serde_json::json!({ "name": name, "tags": tags })),
        );
        d["id"].as_u64().unwrap()
    }

    pub fn destroy_droplet(&self, id: u64) {
        self.control("DELETE", &format!("/_test/droplets/{id}"), None);
    }

    pub fn set_tags(&self, id: u64, tags: &[&str]) {
        self.control(
            "PUT",
            &format!("/_test/droplets/{id}/tags"),
            Some(serde_json::json!(tags)),
        );
    }

    /// A controller config in `dir` for this API: the fleet is
    /// `env:production`, no periodic sync (tests run `droplets sync`).
    pub fn controller_config(&self, dir: &std::path::Path) -> PathBuf {
        let token_file = dir.join("do-token");
        std::fs::write(&token_file, DO_TOKEN).unwrap();
        let config = dir.join("controller.toml");
        std::fs::write(
            &config,
            format!(
                "[digitalocean]\ntoken_file = \"{}\"\nfleet_tags = [\"env:production\"]\napi_url = \"{}\"\nsync_every = \"0s\"\n",
                token_file.display(),
                self.base
            ),
        )
        .unwrap();
        config
    }

    /// The droplet named `name`, once a create made it (30 s at most).
    pub fn wait_droplet(&self, name: &str) -> Value {
        let mut made = Value::Null;
        crate::support::wait_until("the droplet to be created", Duration::from_secs(30), || {
            made = self
                .control("GET", "/_test/droplets", None)
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["name"] == name)
                .cloned()
                .unwrap_or(Value::Null);
            !made.is_null()
        });
        made
    }

    /// The user data droplet `id` was created with.
    pub fn user_data(&self, id: u64) -> String {
        self.control("GET", &format!("/_test/droplets/{id}/user_data"), None)["user_data"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// Fails the test on any request or answer outside the description.
    pub fn assert_no_violations(&self) {
        let v = self.control("GET", "/_test/violations", None);
        assert_eq!(v, serde_json::json!([]), "outside the API description");
    }
}

impl Drop for DoApi {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A droplet's metadata service on a loopback port: answers
/// `/metadata/v1/id` with `droplet_id`. Lives as long as the test process.
pub fn metadata_service(droplet_id: u64) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut request = [0u8; 2048];
            let n = stream.read(&mut request).unwrap_or(0);
            let text = String::from_utf8_lossy(&request[..n]);
            let (status, body) = if text.starts_with("GET /metadata/v1/id ") {
                ("200 OK", droplet_id.to_string())
            } else {
                ("404 Not Found", "not found".to_owned())
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    url
}
