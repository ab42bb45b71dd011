//! Artifacts the agent downloads itself from an HTTPS URL, against
//! a real TLS server on 127.0.0.1 whose CA and certificate are made here
//! with rcgen; the agent trusts that CA through `[artifacts] ca_file`.
//! Deploys go through the real `slipway-agent deploy --url` binary, and once
//! through the controller-command handler with a Deploy carrying
//! `artifact_url`.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{
    exec_python_web, free_port, http_get, tar_of, targz, wait_until, Node, Run, SAMPLE_APP,
};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// `[artifacts] max_size` in these tests: test artifacts are a few KiB.
const LIMIT: u64 = 65_536;

/// A CA and a server certificate for `localhost` and `127.0.0.1` it signed.
struct Pki {
    /// Holds `ca_file`; removed with the Pki.
    _dir: tempfile::TempDir,
    /// The CA certificate (PEM), for `[artifacts] ca_file`.
    ca_file: PathBuf,
    server: Arc<ServerConfig>,
}

fn pki(name: &str) -> Pki {
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    fs::write(&ca_file, ca.pem()).unwrap();
    let server =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
    Pki {
        _dir: dir,
        ca_file,
        server: Arc::new(server),
    }
}

/// What the test server answers to one request.
#[derive(Clone)]
enum Reply {
    /// 200 with Content-Length.
    Body(Vec<u8>),
    /// 200 with a chunked body (no length known up front).
    Chunked(Vec<u8>),
    /// 200 announcing this Content-Length, then closing.
    Length(u64),
    Status(u16),
    /// 302 to this Location.
    Redirect(String),
    /// 200 with Content-Length: the first `first` bytes at once, the rest
    /// only once `gate` is notified (a slow download the test controls).
    Trickle {
        body: Vec<u8>,
        first: usize,
        gate: Arc<tokio::sync::Notify>,
    },
}

/// Decides the reply from the path and how often that path was asked before.
type Handler = Arc<dyn Fn(&str, usize) -> Reply + Send + Sync>;

/// An HTTPS server on 127.0.0.1 in its own thread, recording request paths.
struct Server {
    port: u16,
    hits: Arc<Mutex<Vec<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(pki: &Pki, handler: impl Fn(&str, usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = StdListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
        let handler: Handler = Arc::new(handler);
        let seen = hits.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let (tcp, _) = tokio::select! {
                        _ = &mut stopped => return,
                        a = listener.accept() => a.unwrap(),
                    };
                    let (acceptor, handler, seen) =
                        (acceptor.clone(), handler.clone(), seen.clone());
                    tokio::spawn(async move {
                        // A client refusing our certificate ends here.
                        let Ok(mut tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let Some(path) = read_request_path(&mut tls).await else {
                            return;
                        };
                        let before = {
                            let mut s = seen.lock().unwrap();
                            let n = s.iter().filter(|p| **p == path).count();
                            s.push(path.clone());
                            n
                        };
                        let reply = handler(&path, before);
                        let _ = write_reply(&mut tls, reply).await;
                        let _ = tls.shutdown().await;
                    });
                }
            });
        });
        Self {
            port,
            hits,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    fn hits(&self) -> Vec<String> {
        self.hits.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads a request head (bounded) and returns the path of its first line.
async fn read_request_path<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > 16 << 10 {
            return None;
        }
        let n = s.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    let line = text.lines().next()?;
    line.split(' ').nth(1).map(str::to_owned)
}

async fn write_reply<S: tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    reply: Reply,
) -> std::io::Result<()> {
    let head = |status: &str, extra: &str| {
        format!("HTTP/1.1 {status}\r\nConnection: close\r\n{extra}\r\n").into_bytes()
    };
    match reply {
        Reply::Body(body) => {
            s.write_all(&head(
                "200 OK",
                &format!("Content-Length: {}\r\n", body.len()),
            ))
            .await?;
            s.write_all(&body).await?;
        }
        Reply::Chunked(body) => {
            s.write_all(&head("200 OK", "Transfer-Encoding: chunked\r\n"))
                .await?;
            for chunk in body.chunks(8192) {
                s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                    .await?;
                s.write_all(chunk).await?;
                s.write_all(b"\r\n").await?;
            }
            s.write_all(b"0\r\n\r\n").await?;
        }
        Reply::Length(n) => {
            s.write_all(&head("200 OK", &format!("Content-Length: {n}\r\n")))
                .await?;
        }
        Reply::Status(code) => {
            let body = format!("status {code}\n");
            s.write_all(&head(
                &format!("{code} Test"),
                &format!("Content-Length: {}\r\n", body.len()),
            ))
            .await?;
            s.write_all(body.as_bytes()).await?;
        }
        Reply::Trickle { body, first, gate } => {
            s.write_all(&head(
                "200 OK",
                &format!("Content-Length: {}\r\n", body.len()),
            ))
            .await?;
            s.write_all(&body[..first]).await?;
            s.flush().await?;
            gate.notified().await;
            s.write_all(&body[first..]).await?;
        }
        Reply::Redirect(to) => {
            s.write_all(&head(
                "302 Found",
                &format!("Location: {to}\r\nContent-Length: 0\r\n"),
            ))
            .await?;
        }
    }
    s.flush().await
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// An artifact whose VERSION file says `version`.
fn artifact(version: &str) -> Vec<u8> {
    targz(&tar_of(&[("VERSION", version), ("index.html", "hello\n")]))
}

/// A files-only node trusting `ca_file` for downloads.
fn node(ca_file: &Path) -> Node {
    Node::new(&format!(
        "\n[artifacts]\nca_file = \"{}\"\nmax_size = {LIMIT}\nconnect_timeout = \"5s\"\nread_timeout = \"5s\"\n",
        ca_file.display()
    ))
}

fn deploy_url(node: &Node, url: &str, sha: &str, id: &str) -> Run {
    node.run(&[
        "deploy", "--app", "web", "--url", url, "--sha256", sha, "--id", id,
    ])
}

/// File names in the app's artifact cache (downloads land there).
fn cache(node: &Node) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(node.root.join(".slipway/cache"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Nothing deployed and nothing left behind by a refused download.
#[track_caller]
fn nothing_left(node: &Node) {
    assert!(node.dirs_on_disk().is_empty(), "{:?}", node.dirs_on_disk());
    assert_eq!(node.current(), None);
    assert!(cache(node).is_empty(), "cache: {:?}", cache(node));
    assert!(node.staging_is_empty());
    let releases = node.releases();
    assert_eq!(
        releases["releases"].as_array().unwrap().len(),
        0,
        "{releases:#}"
    );
}

#[test]
fn a_url_deploy_serves_and_the_same_digest_is_not_downloaded_twice() {
    let pki = pki("good");
    let port = free_port();
    // A real app behind the health gate: the exec driver runs the sample
    // app from the downloaded release.
    let node = Node::new(&format!(
        r#"{}interval = "100ms"
successes = 1
deadline = "15s"

[artifacts]
ca_file = "{}"
max_size = {LIMIT}
"#,
        exec_python_web(&format!("http://127.0.0.1:{port}/")),
        pki.ca_file.display()
    ));
    fs::write(node.root.join("shared/.env"), format!("PORT={port}\n")).unwrap();
    struct Stop<'a>(&'a Node);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = self.0.run(&["stop", "--app", "web"]);
        }
    }
    let _stop = Stop(&node);
    let v1 = targz(&tar_of(&[
        ("server.py", SAMPLE_APP),
        ("VERSION", "v1-from-https"),
    ]));
    let sha = sha256(&v1);
    let body = v1.clone();
    let server = Server::start(&pki, move |path, _| match path {
        "/v1.tar.gz" => Reply::Body(body.clone()),
        _ => Reply::Status(404),
    });
    let url = server.url("/v1.tar.gz");

    let run = node
        .run(&[
            "deploy", "--app", "web", "--url", &url, "--sha256", &sha, "--id", "v1", "--json",
        ])
        .ok();
    let report = run.json();
    assert_eq!(report["outcome"], "succeeded", "{report:#}");
    assert_eq!(node.current().as_deref(), Some("v1"));
    assert_eq!(http_get(port, "/").unwrap().1, "v1-from-https");
    assert_eq!(server.hits(), vec!["/v1.tar.gz".to_owned()]);
    // The download sits in the app's cache under its digest, no temp file.
    assert_eq!(cache(&node), vec![sha.clone()]);

    // The same digest again (a new release id): served from the cache.
    let run = deploy_url(&node, &url, &sha.to_uppercase(), "v1-again").ok();
    assert!(run.stderr.contains("already cached"), "{run:#?}");
    assert_eq!(node.current().as_deref(), Some("v1-again"));
    assert_eq!(server.hits().len(), 1, "{:?}", server.hits());
    wait_until("v1-again to serve", Duration::from_secs(10), || {
        http_get(port, "/").is_some_and(|(code, body)| code == 200 && body == "v1-from-https")
    });
}

/// A download in progress does not hold the app's lock: a node-local
/// rollback and a prune meanwhile succeed (before, both failed with "deploy
/// in progress" until the download and the deploy were over), the prune
/// leaves the download's temp file alone, and the deploy completes once the
/// rest of the bytes arrive.
#[test]
fn a_rollback_and_a_prune_work_during_a_long_download() {
    let pki = pki("good");
    let v3 = artifact("v3");
    let sha = sha256(&v3);
    let gate = Arc::new(tokio::sync::Notify::new());
    let (body, held) = (v3.clone(), gate.clone());
    let server = Server::start(&pki, move |path, _| match path {
        "/v3.tar.gz" => Reply::Trickle {
            body: body.clone(),
            first: 100,
            gate: held.clone(),
        },
        _ => Reply::Status(404),
    });
    // A read timeout far longer than the test waits with the bytes held.
    let node = Node::new(&format!(
        "\n[artifacts]\nca_file = \"{}\"\nmax_size = {LIMIT}\nread_timeout = \"120s\"\n",
        pki.ca_file.display()
    ));
    node.deploy(&node.artifact("v1.tar.gz", &[("VERSION", "v1")]), "v1")
        .ok();
    node.deploy(&node.artifact("v2.tar.gz", &[("VERSION", "v2")]), "v2")
        .ok();

    let url = server.url("/v3.tar.gz");
    let download = node
        .cmd(&[
            "deploy", "--app", "web", "--url", &url, "--sha256", &sha, "--id", "v3",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first bytes are in the cache's temp file: the download is under way.
    let part = || {
        cache(&node)
            .into_iter()
            .find(|n| n.contains(".part-"))
            .filter(|n| {
                fs::metadata(node.root.join(".slipway/cache").join(n)).is_ok_and(|m| m.len() >= 100)
            })
    };
    wait_until(
        "the download to be under way",
        Duration::from_secs(30),
        || part().is_some(),
    );
    let temp = part().unwrap();

    let run = node.run(&["rollback", "--app", "web"]).ok();
    assert_eq!(node.current().as_deref(), Some("v1"), "{run:#?}");
    let run = node
        .run(&["prune", "--app", "web", "--keep", "1", "--json"])
        .ok();
    let report = run.json();
    assert_eq!(report["cached_artifacts_removed"], 0, "{report:#}");
    assert!(cache(&node).contains(&temp), "{:?}", cache(&node));

    gate.notify_one();
    let out = download.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(node.current().as_deref(), Some("v3"));
    assert_eq!(server.hits(), vec!["/v3.tar.gz".to_owned()]);
    assert!(!cache(&node).iter().any(|n| n.contains(".part-")));
}

#[test]
fn a_digest_mismatch_deploys_nothing_and_leaves_nothing() {
    let pki = pki("good");
    let served = artifact("v1");
    let server = Server::start(&pki, move |_, _| Reply::Body(served.clone()));
    let node = node(&pki.ca_file);
    let wrong = sha256(&artifact("v2"));
    let url = server.url("/v1.tar.gz");
    let run = deploy_url(&node, &url, &wrong, "v1").fails(1);
    let actual = sha256(&artifact("v1"));
    assert!(
        run.stderr.contains(&url) && run.stderr.contains(&wrong) && run.stderr.contains(&actual),
        "{run:#?}"
    );
    // Not retried: the same bytes would come again.
    assert_eq!(server.hits().len(), 1);
    nothing_left(&node);
}

#[test]
fn http_errors_name_the_status_and_the_url_and_4xx_is_not_retried() {
    let pki = pki("good");
    let server = Server::start(&pki, |_, _| Reply::Status(404));
    let node = node(&pki.ca_file);
    let url = server.url("/missing.tar.gz");
    let run = deploy_url(&node, &url, &sha256(b"x"), "v1").fails(1);
    assert!(
        run.stderr.contains("HTTP 404") && run.stderr.contains(&url),
        "{run:#?}"
    );
    assert_eq!(server.hits().len(), 1);
    nothing_left(&node);
}

#[test]
fn plain_http_and_bad_arguments_are_refused_before_anything_is_fetched() {
    let pki = pki("good");
    let node = node(&pki.ca_file);
    let sha = sha256(b"x");
    let url = "http://127.0.0.1:9/app.tar.gz";
    let run = deploy_url(&node, url, &sha, "v1").fails(64);
    assert!(
        run.stderr.contains("only https://") && run.stderr.contains(url),
        "{run:#?}"
    );
    let run = deploy_url(&node, "https://127.0.0.1:9/a.tar.gz", "abc", "v1").fails(64);
    assert!(run.stderr.contains("64 hexadecimal"), "{run:#?}");
    // --url needs --sha256, and excludes --artifact.
    let run = node
        .run(&["deploy", "--app", "web", "--url", "https://127.0.0.1:9/a"])
        .fails(64);
    assert!(run.stderr.contains("--sha256"), "{run:#?}");
    let run = node
        .run(&[
            "deploy",
            "--app",
            "web",
            "--url",
            "https://127.0.0.1:9/a",
            "--sha256",
            &sha,
            "--artifact",
            "/dev/null",
        ])
        .fails(64);
    assert!(run.stderr.contains("cannot be used with"), "{run:#?}");
    nothing_left(&node);
}

#[test]
fn a_server_certificate_from_another_ca_is_refused() {
    let trusted = pki("trusted");
    let other = pki("other");
    let body = artifact("v1");
    let sha = sha256(&body);
    let server = Server::start(&other, move |_, _| Reply::Body(body.clone()));
    let node = node(&trusted.ca_file);
    let url = server.url("/v1.tar.gz");
    let run = deploy_url(&node, &url, &sha, "v1").fails(1);
    assert!(
        run.stderr.contains("TLS handshake")
            && run.stderr.contains(&url)
            && run.stderr.contains("UnknownIssuer"),
        "{run:#?}"
    );
    assert!(server.hits().is_empty());
    nothing_left(&node);
}

#[test]
fn redirects_are_followed_to_https_only() {
    let pki = pki("good");
    let body = artifact("v1");
    let sha = sha256(&body);
    let port = Arc::new(Mutex::new(0u16));
    let p = port.clone();
    let server = Server::start(&pki, move |path, _| {
        let port = *p.lock().unwrap();
        match path {
            "/a/old.tar.gz" => Reply::Redirect("new.tar.gz".into()),
            "/a/new.tar.gz" => Reply::Redirect(format!("https://localhost:{port}/final.tar.gz")),
            "/final.tar.gz" => Reply::Body(body.clone()),
            "/insecure.tar.gz" => Reply::Redirect(format!("http://127.0.0.1:{port}/final.tar.gz")),
            "/loop" => Reply::Redirect("/loop".into()),
            _ => Reply::Status(404),
        }
    });
    *port.lock().unwrap() = server.port;
    let node = node(&pki.ca_file);

    deploy_url(&node, &server.url("/a/old.tar.gz"), &sha, "v1").ok();
    assert_eq!(node.current().as_deref(), Some("v1"));
    assert_eq!(
        server.hits(),
        vec!["/a/old.tar.gz", "/a/new.tar.gz", "/final.tar.gz"]
    );

    let fresh = self::node(&pki.ca_file);
    let run = deploy_url(&fresh, &server.url("/insecure.tar.gz"), &sha, "v1").fails(1);
    assert!(
        run.stderr.contains("refusing the redirect")
            && run
                .stderr
                .contains(&format!("http://127.0.0.1:{}/final.tar.gz", server.port)),
        "{run:#?}"
    );
    let run = deploy_url(&fresh, &server.url("/loop"), &sha, "v1").fails(1);
    assert!(run.stderr.contains("more than 5 redirects"), "{run:#?}");
    assert_eq!(server.hits().iter().filter(|p| *p == "/loop").count(), 6);
    nothing_left(&fresh);
}

#[test]
fn bodies_over_the_limit_are_refused_with_nothing_left() {
    let pki = pki("good");
    let big: Vec<u8> = (0..LIMIT + 4096).map(|i| (i * 7 % 251) as u8).collect();
    let sha = sha256(&big);
    let server = Server::start(&pki, move |path, _| match path {
        "/announced" => Reply::Length(LIMIT + 1),
        "/chunked" => Reply::Chunked(big.clone()),
        _ => Reply::Status(404),
    });
    let node = node(&pki.ca_file);
    let run = deploy_url(&node, &server.url("/announced"), &sha, "v1").fails(1);
    assert!(
        run.stderr
            .contains(&format!("Content-Length is {}", LIMIT + 1))
            && run.stderr.contains(&format!("limit of {LIMIT} bytes")),
        "{run:#?}"
    );
    let run = deploy_url(&node, &server.url("/chunked"), &sha, "v1").fails(1);
    assert!(
        run.stderr
            .contains(&format!("more than {LIMIT} bytes were sent"))
            && run.stderr.contains(&server.url("/chunked")),
        "{run:#?}"
    );
    assert_eq!(server.hits().len(), 2, "not retried: {:?}", server.hits());
    nothing_left(&node);
}

#[test]
fn a_server_error_is_retried() {
    let pki = pki("good");
    let body = artifact("v1");
    let sha = sha256(&body);
    let server = Server::start(&pki, move |_, before| {
        if before == 0 {
            Reply::Status(503)
        } else {
            Reply::Body(body.clone())
        }
    });
    let node = node(&pki.ca_file);
    let run = deploy_url(&node, &server.url("/v1.tar.gz"), &sha, "v1").ok();
    assert!(
        run.stderr.contains("HTTP 503") && run.stderr.contains("retrying"),
        "{run:#?}"
    );
    assert_eq!(server.hits().len(), 2);
    assert_eq!(node.current().as_deref(), Some("v1"));
    assert_eq!(cache(&node), vec![sha]);

    // A server that keeps failing is given up on after the attempts.
    let failing = Server::start(&pki, |_, _| Reply::Status(502));
    let fresh = self::node(&pki.ca_file);
    let run = deploy_url(&fresh, &failing.url("/v1.tar.gz"), &sha256(b"y"), "v1").fails(1);
    assert!(
        run.stderr.contains("giving up after 3 attempts") && run.stderr.contains("HTTP 502"),
        "{run:#?}"
    );
    assert_eq!(failing.hits().len(), 3);
    nothing_left(&fresh);
}

#[test]
fn a_bad_ca_file_is_a_config_error_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("ca.pem");
    fs::write(&not_pem, "hello\n").unwrap();
    let node = Node::new(&format!(
        "\n[artifacts]\nca_file = \"{}\"\nmax_size = \"lots\"\n",
        not_pem.display()
    ));
    let run = node.run(&["releases", "--app", "web"]).fails(64);
    let config = node.config.display().to_string();
    assert!(
        run.stderr
            .contains(&format!("{config}:7: artifacts.ca_file"))
            && run.stderr.contains("no PEM certificate")
            && run
                .stderr
                .contains(&format!("{config}:8: artifacts.max_size")),
        "{run:#?}"
    );
    let node = Node::new("\n[artifacts]\nca_file = \"relative/ca.pem\"\n");
    let run = node.run(&["releases", "--app", "web"]).fails(64);
    assert!(run.stderr.contains("must be an absolute path"), "{run:#?}");
}

/// The controller's Deploy command with `artifact_url`: downloaded by the
/// agent, deployed, progress and result reported on the session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_deploy_with_an_artifact_url_downloads_and_deploys() {
    use slipway_agent::config::{Config, ControllerConfig};
    use slipway_agent::link::commands::Commands;
    use slipway_proto::v1::{
        agent_message, controller_message, ControllerMessage, Deploy, Outcome,
    };

    let pki = pki("good");
    let body = artifact("v7");
    let sha = sha256(&body);
    let served = body.clone();
    let server = Server::start(&pki, move |path, _| match path {
        "/v7.tar.gz" => Reply::Body(served.clone()),
        _ => Reply::Status(404),
    });
    let node = node(&pki.ca_file);
    let config = Config::load(&node.config).unwrap();
    let state = tempfile::tempdir().unwrap();
    let ctl = ControllerConfig {
        // Never dialled: the artifact comes from the URL, not the controller.
        urls: vec!["127.0.0.1:1".into()],
        state_dir: state.path().to_owned(),
    };
    let command = |id: &str, url: &str, sha: &str, release: &str| ControllerMessage {
        kind: Some(controller_message::Kind::Deploy(Deploy {
            command_id: id.into(),
            app: "web".into(),
            release_id: release.into(),
            artifact_url: url.into(),
            artifact_sha256: sha.into(),
            ..Default::default()
        })),
    };
    let commands = Commands::new(config, ctl);
    let run = |msg: ControllerMessage| {
        let commands = commands.clone();
        async move {
            let (tx, mut rx) = tokio::sync::mpsc::channel(64);
            commands.attach(tx);
            commands.execute(msg).await;
            let mut progress = Vec::new();
            let mut result = None;
            while let Ok(m) = rx.try_recv() {
                match m.kind {
                    Some(agent_message::Kind::Progress(p)) => progress.push(p.message),
                    Some(agent_message::Kind::Result(r)) => result = Some(r),
                    _ => {}
                }
            }
            (progress, result.unwrap())
        }
    };

    let (progress, result) = run(command("c-1", &server.url("/v7.tar.gz"), &sha, "r7")).await;
    assert_eq!(
        result.outcome,
        Outcome::Succeeded as i32,
        "{result:?} {progress:?}"
    );
    assert_eq!(result.release_id, "r7");
    assert!(
        progress.iter().any(|p| p.contains("sha256 verified")),
        "{progress:?}"
    );
    assert_eq!(node.current().as_deref(), Some("r7"));
    assert_eq!(server.hits(), vec!["/v7.tar.gz".to_owned()]);
    let version = fs::read_to_string(node.root.join("current/VERSION")).unwrap();
    assert_eq!(version, "v7");

    // A wrong digest fails the command with the URL and both digests.
    let wrong = sha256(b"not it");
    let (_, result) = run(command("c-2", &server.url("/v7.tar.gz"), &wrong, "r8")).await;
    assert_eq!(result.outcome, Outcome::Failed as i32);
    assert!(
        result.message.contains(&wrong) && result.message.contains(&sha),
        "{}",
        result.message
    );
    // And a 404 with its status.
    let (_, result) = run(command("c-3", &server.url("/nope"), &sha256(b"z"), "r9")).await;
    assert!(result.message.contains("HTTP 404"), "{}", result.message);
    assert_eq!(node.current().as_deref(), Some("r7"));
    assert_eq!(cache(&node), vec![sha]);
}
