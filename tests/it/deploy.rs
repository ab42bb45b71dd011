//! Push deploys from the `slipway` CLI: a controller and three agent
//! processes over real mTLS; the artifact is uploaded once to the
//! controller and fetched by every agent over its link.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::time::Duration;

use crate::support::{artifact, sha256_file, text, wait_until, Agent, Controller, APP};

/// An app that dies at once: its health gate fails and the agent rolls back.
const BROKEN_APP: &str = "import sys\nsys.exit(3)\n";

#[test]
fn slipway_deploy_reaches_three_agents_and_reports_a_failing_node() {
    let controller = Controller::start();
    let mut agents = Agent::enroll_all(&controller, &["n1", "n2", "n3"]);
    for a in &mut agents {
        a.run();
    }
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    controller.wait_online(&reader, 3, Duration::from_secs(30));

    // A read token cannot deploy.
    let work = tempfile::tempdir().unwrap();
    let v1 = artifact(work.path(), "v1", APP);
    let sha1 = sha256_file(&v1);
    let refused = controller.deploy_web(&reader, &v1, &sha1, "v1", &["--wait"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("PermissionDenied"),
        "{}",
        text(&refused)
    );

    // Upload once, deploy everywhere.
    let out = controller.deploy_web(&deployer, &v1, &sha1, "v1", &["--wait"]);
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("uploaded artifact"), "{stdout}");
    for a in &agents {
        assert!(
            stdout.contains(&format!("[{}] SUCCEEDED", a.name)),
            "{stdout}"
        );
        assert!(stdout.contains(&format!("[{}] fetch", a.name)), "{stdout}");
        assert_eq!(
            a.get().as_deref(),
            Some("v1"),
            "{} does not serve v1",
            a.name
        );
    }

    // A release that fails its health gate, sent to n2 only: n2 rolls back
    // to v1, the CLI exits non-zero and says which node and why.
    let out = controller.deploy_version(
        &deployer,
        work.path(),
        "v2",
        BROKEN_APP,
        &["--wait", "--node", "n2"],
    );
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("1 of 1 nodes failed: n2 (rolled back"),
        "{}",
        text(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("[n2] ROLLED_BACK"));
    for a in &agents {
        assert_eq!(
            a.get().as_deref(),
            Some("v1"),
            "{} does not serve v1",
            a.name
        );
    }

    // The same artifact again is not uploaded twice.
    let again = controller.deploy_web(&deployer, &v1, &sha1, "v1", &["--wait", "--node", "n1"]);
    assert!(again.status.success(), "{}", text(&again));
    assert!(String::from_utf8_lossy(&again.stdout).contains("already on the controller"));

    // Roll one node forward to v3, then back through the controller.
    let out = controller.deploy_version(
        &deployer,
        work.path(),
        "v3",
        APP,
        &["--wait", "--node", "n3"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(agents[2].get().as_deref(), Some("v3"));
    let out = controller.slipway(
        &deployer,
        &["rollback", "web", "--node", "n3", "--to", "v1", "--wait"],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("[n3] SUCCEEDED"),
        "{}",
        text(&out)
    );
    assert_eq!(agents[2].get().as_deref(), Some("v1"));
    // A read token cannot roll back.
    let out = controller.slipway(&reader, &["rollback", "web", "--node", "n3"]);
    assert!(!out.status.success(), "{}", text(&out));

    let audit = controller.slipway(&reader, &["audit", "--since", "1h", "--json"]);
    assert!(audit.status.success(), "{}", text(&audit));
    let events: Vec<serde_json::Value> = serde_json::from_slice(&audit.stdout).unwrap();
    let count = |t: &str| events.iter().filter(|e| e["event_type"] == t).count();
    assert_eq!(count("DEPLOY_STARTED"), 4);
    assert_eq!(count("DEPLOY_COMPLETED"), 3);
    assert_eq!(count("ROLLBACK_COMPLETED"), 1);
    assert_eq!(count("DEPLOY_FAILED"), 1);
    assert_eq!(count("API_CALL_REFUSED"), 2);
    let failed = events
        .iter()
        .find(|e| e["event_type"] == "DEPLOY_FAILED")
        .unwrap();
    assert_eq!(failed["details"]["failed_nodes"][0]["node_name"], "n2");
    let _ = fs::remove_dir_all(work.path());
}

/// An HTTPS file server (Python's, with TLS) on 127.0.0.1 serving `dir`,
/// with a certificate for 127.0.0.1 from a CA made here; logs each request
/// path to `<dir>/../hits`.
pub(crate) struct HttpsFiles {
    child: std::process::Child,
    port: u16,
    pub(crate) ca_pem: std::path::PathBuf,
    hits: std::path::PathBuf,
}

const HTTPS_SERVER: &str = r#"import http.server, ssl, sys
root, cert, key, port_file, hits = sys.argv[1:6]
class H(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **k):
        super().__init__(*a, directory=root, **k)
    def log_message(self, fmt, *a):
        with open(hits, "a") as f:
            f.write(self.path + "\n")
httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
with open(port_file + ".tmp", "w") as f:
    f.write(str(httpd.server_address[1]))
import os
os.rename(port_file + ".tmp", port_file)
httpd.serve_forever()
"#;

impl HttpsFiles {
    pub(crate) fn start(work: &std::path::Path, files: &std::path::Path) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A name of its own: with rcgen's default name on both, OpenSSL
        // (curl) takes the server certificate for a self-signed one.
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "slipway test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&ca_params, &ca_key);
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let ca_pem = work.join("artifact-ca.pem");
        fs::write(&ca_pem, ca_cert.pem()).unwrap();
        fs::write(work.join("https.pem"), cert.pem()).unwrap();
        fs::write(work.join("https.key"), key.serialize_pem()).unwrap();
        fs::write(work.join("https.py"), HTTPS_SERVER).unwrap();
        let port_file = work.join("https.port");
        let hits = work.join("hits");
        let child = std::process::Command::new("python3")
            .arg(work.join("https.py"))
            .arg(files)
            .arg(work.join("https.pem"))
            .arg(work.join("https.key"))
            .arg(&port_file)
            .arg(&hits)
            .spawn()
            .unwrap();
        wait_until("the HTTPS server", Duration::from_secs(20), || {
            port_file.exists()
        });
        let port = fs::read_to_string(&port_file).unwrap().parse().unwrap();
        Self {
            child,
            port,
            ca_pem,
            hits,
        }
    }

    pub(crate) fn url(&self, name: &str) -> String {
        format!("https://127.0.0.1:{}/{name}", self.port)
    }

    pub(crate) fn hits(&self) -> usize {
        fs::read_to_string(&self.hits)
            .unwrap_or_default()
            .lines()
            .count()
    }
}

impl Drop for HttpsFiles {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn slipway_deploy_url_has_every_agent_download_and_check_the_artifact_itself() {
    let controller = Controller::start();
    let work = tempfile::tempdir().unwrap();
    let files = work.path().join("files");
    fs::create_dir_all(&files).unwrap();
    let v1 = artifact(&files, "v1", APP);
    let sha1 = sha256_file(&v1);
    let other = artifact(work.path(), "v2", APP);
    let wrong = sha256_file(&other);
    let server = HttpsFiles::start(work.path(), &files);

    let mut agents = Agent::enroll_all(&controller, &["n1", "n2"]);
    for a in &mut agents {
        // The artifact server's CA, as a droplet would trust its own.
        let mut config = fs::read_to_string(&a.config).unwrap();
        config.push_str(&format!(
            "\n[artifacts]\nca_file = \"{}\"\n",
            server.ca_pem.display()
        ));
        fs::write(&a.config, config).unwrap();
        a.run();
    }
    let reader = controller.api_token("read");
    let deployer = controller.api_token("deploy:web");
    controller.wait_online(&reader, 2, Duration::from_secs(30));

    let url = server.url("v1.tar.gz");
    let out = controller.slipway(
        &deployer,
        &[
            "deploy", "web", "--url", &url, "--sha256", &sha1, "--id", "v1", "--wait",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("2 of 2 nodes succeeded"),
        "{}",
        text(&out)
    );
    for a in &agents {
        assert_eq!(a.get().as_deref(), Some("v1"), "{}", a.name);
    }
    // Each agent fetched it itself; the controller never had it.
    assert_eq!(server.hits(), 2);
    let uploaded = controller.data_dir().join("artifacts").join(&sha1);
    assert!(!uploaded.exists());

    // A digest that does not match what the URL serves: every node refuses
    // it and keeps serving v1.
    let out = controller.slipway(
        &deployer,
        &[
            "deploy", "web", "--url", &url, "--sha256", &wrong, "--id", "v2", "--wait",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains("2 of 2 nodes failed"), "{said}");
    assert!(
        said.contains(&format!("has sha256 {sha1}, expected {wrong}")),
        "{said}"
    );
    for a in &agents {
        assert_eq!(a.get().as_deref(), Some("v1"), "{}", a.name);
        assert!(!a.root.join("releases/v2").exists(), "{}", a.name);
    }
}
