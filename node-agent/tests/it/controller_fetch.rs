//! Deploys whose artifact the agent fetches from the controller
//! (AgentLink.FetchArtifact), over the real mTLS link, against a fake
//! controller made here: its CA, server certificate and the node's client
//! certificate come from rcgen, and each test scripts what the controller
//! streams — one that goes quiet mid-artifact, one the test holds back.
//! The commands go through the agent's real command runner.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::{free_port, tar_of, targz, Node};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use sha2::{Digest as _, Sha256};
use slipway_agent::config::{Config, ControllerConfig};
use slipway_agent::link::commands::Commands;
use slipway_proto::v1::agent_link_server::{AgentLink, AgentLinkServer};
use slipway_proto::v1::{
    agent_message, controller_message, AgentMessage, ArtifactChunk, CommandResult,
    ControllerMessage, Deploy, FetchArtifactRequest, Outcome, RenewRequest, RenewResponse,
};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// The agent's `[artifacts] read_timeout` in these tests.
const READ_TIMEOUT: &str = "1s";
/// How long a test waits for something that takes well under a second.
const PATIENCE: Duration = Duration::from_secs(30);

/// The fake controller's TLS config, and the node's enrolled identity
/// written into a state dir as `slipway-agent enroll` leaves it.
struct Pki {
    server: Arc<ServerConfig>,
    state: tempfile::TempDir,
}

fn pki() -> Pki {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fake controller CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);

    let server_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = params.signed_by(&server_key, &issuer).unwrap();

    let node_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "node-1");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let node_cert = params.signed_by(&node_key, &issuer).unwrap();

    let state = tempfile::tempdir().unwrap();
    fs::write(state.path().join("ca.pem"), ca.pem()).unwrap();
    fs::write(state.path().join("node.pem"), node_cert.pem()).unwrap();
    fs::write(state.path().join("node.key"), node_key.serialize_pem()).unwrap();
    fs::write(state.path().join("node-id"), "node-1").unwrap();

    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.der().to_vec())).unwrap();
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .unwrap();
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(server_cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        )
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec()];
    Pki {
        server: Arc::new(server),
        state,
    }
}

/// One thing the fake controller does while streaming an artifact.
enum Step {
    Send(ArtifactChunk),
    /// Wait until the test notifies, then go on.
    Hold(Arc<Notify>),
    /// Send nothing more but keep the stream open, as a controller that
    /// vanished behind a dead network would, until the agent hangs up.
    Stall,
    /// As the first step: answer the request with this status instead of
    /// a stream (the controller refusing it).
    Refuse(Status),
}

type Script = Box<dyn Fn(&FetchArtifactRequest) -> Vec<Step> + Send + Sync>;

struct FakeController {
    script: Script,
}

#[tonic::async_trait]
impl AgentLink for FakeController {
    type ConnectStream = ReceiverStream<Result<ControllerMessage, Status>>;

    async fn connect(
        &self,
        _: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    async fn renew(&self, _: Request<RenewRequest>) -> Result<Response<RenewResponse>, Status> {
        Err(Status::unimplemented("not used by these tests"))
    }

    type FetchArtifactStream = ReceiverStream<Result<ArtifactChunk, Status>>;

    async fn fetch_artifact(
        &self,
        request: Request<FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let mut steps = (self.script)(request.get_ref());
        if let Some(Step::Refuse(_)) = steps.first() {
            let Step::Refuse(status) = steps.remove(0) else {
                unreachable!()
            };
            return Err(status);
        }
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            for step in steps {
                match step {
                    Step::Send(chunk) => {
                        if tx.send(Ok(chunk)).await.is_err() {
                            return;
                        }
                    }
                    Step::Hold(gate) => gate.notified().await,
                    Step::Stall => {
                        tx.closed().await;
                        return;
                    }
                    Step::Refuse(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Serves `fake` with mTLS on 127.0.0.1 (port 0) until the test ends;
/// returns its address.
async fn start(pki: &Pki, fake: FakeController) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                }
            });
        }
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(AgentLinkServer::new(fake))
            .serve_with_incoming(ReceiverStream::new(rx)),
    );
    addr
}

fn sha256(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn chunk(offset: usize, data: &[u8], last: bool) -> Step {
    Step::Send(ArtifactChunk {
        command_id: String::new(),
        offset: offset as u64,
        data: data.to_vec(),
        last,
    })
}

/// A files-only node whose artifact limits are short, and the runner that
/// takes the controller's commands for it.
fn node_and_commands(pki: &Pki, controller: &str) -> (Node, Commands) {
    node_and_replicas(pki, &[controller])
}

/// [`node_and_commands`] with the controller replicas `urls`.
fn node_and_replicas(pki: &Pki, urls: &[&str]) -> (Node, Commands) {
    let node = Node::new(&format!(
        "\n[artifacts]\nmax_size = 65536\nconnect_timeout = \"5s\"\nread_timeout = \"{READ_TIMEOUT}\"\n"
    ));
    let config = Config::load(&node.config).unwrap();
    let ctl = ControllerConfig {
        urls: urls.iter().map(|u| (*u).to_owned()).collect(),
        state_dir: pki.state.path().to_owned(),
    };
    (node, Commands::new(config, ctl))
}

/// A fake controller that counts the fetches it is asked for and answers
/// each with `steps`.
fn counting(
    asked: &Arc<AtomicUsize>,
    steps: impl Fn() -> Vec<Step> + Send + Sync + 'static,
) -> FakeController {
    let asked = asked.clone();
    FakeController {
        script: Box::new(move |_| {
            asked.fetch_add(1, Ordering::SeqCst);
            steps()
        }),
    }
}

/// With controller replicas (`[controller] urls`), the artifact comes from
/// the replica the session is on; when that one cannot be reached or goes
/// quiet, from the next ones in the list, each asked once. None of them is
/// the list's first address by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_artifact_comes_from_the_session_replica_else_from_the_next_ones() {
    let pki = pki();
    let body = targz(&tar_of(&[("VERSION", "v1")]));
    let sha = sha256(&body);
    let (quiet_asked, good_asked) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let quiet = start(&pki, counting(&quiet_asked, || vec![Step::Stall])).await;
    let good = {
        let body = body.clone();
        start(
            &pki,
            counting(&good_asked, move || vec![chunk(0, &body, true)]),
        )
        .await
    };
    // Nothing listens there (free a moment ago, below the ephemeral range).
    let dead = format!("127.0.0.1:{}", free_port());

    // The session is on the good replica (the last in the list): only it
    // is asked.
    let (node, commands) = node_and_replicas(&pki, &[&dead, &quiet, &good]);
    commands.replicas().connected(2);
    let (result, progress) = run(&commands, deploy("c-1", &sha, "v1")).await;
    assert_eq!(
        result.outcome,
        Outcome::Succeeded as i32,
        "{result:?} {progress:?}"
    );
    assert_eq!(node.current().as_deref(), Some("v1"));
    assert_eq!(
        (
            quiet_asked.load(Ordering::SeqCst),
            good_asked.load(Ordering::SeqCst)
        ),
        (0, 1)
    );

    // The session is down, about to dial the dead one: the dead one, then
    // the quiet one (for its read_timeout), then the good one.
    let (node, commands) = node_and_replicas(&pki, &[&quiet, &good, &dead]);
    commands.replicas().dialling(2);
    let (result, progress) =
        tokio::time::timeout(PATIENCE, run(&commands, deploy("c-2", &sha, "v1")))
            .await
            .expect("the fetch still waits on a replica");
    assert_eq!(
        result.outcome,
        Outcome::Succeeded as i32,
        "{result:?} {progress:?}"
    );
    assert_eq!(node.current().as_deref(), Some("v1"));
    assert_eq!(
        (
            quiet_asked.load(Ordering::SeqCst),
            good_asked.load(Ordering::SeqCst)
        ),
        (1, 2)
    );

    // No replica answers: the deploy fails with the last one's error, after
    // one try each.
    let (node, commands) = node_and_replicas(&pki, &[&dead, &quiet]);
    let (result, _) = tokio::time::timeout(PATIENCE, run(&commands, deploy("c-3", &sha, "v1")))
        .await
        .expect("the fetch still waits on a replica");
    assert_eq!(result.outcome, Outcome::Failed as i32, "{result:?}");
    assert!(
        result
            .message
            .contains(&format!("controller {quiet} sent nothing for 1s")),
        "{}",
        result.message
    );
    assert_eq!(quiet_asked.load(Ordering::SeqCst), 2);
    assert_eq!(node.current(), None);
}

/// A controller whose database does not answer for a moment answers the
/// fetch `Unavailable`: the agent asks again a little later and the deploy
/// succeeds, telling the controller why it waited. Any other refusal is
/// not asked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_the_controller_cannot_serve_now_is_asked_again_and_succeeds() {
    let pki = pki();
    let body = targz(&tar_of(&[("VERSION", "v1")]));
    let sha = sha256(&body);
    let asked = Arc::new(AtomicUsize::new(0));
    let down = {
        let (asked, body) = (asked.clone(), body.clone());
        FakeController {
            script: Box::new(move |_| {
                if asked.fetch_add(1, Ordering::SeqCst) < 2 {
                    vec![Step::Refuse(Status::unavailable(
                        "the controller's database does not answer (down or unreachable); \
                         try again once it is back",
                    ))]
                } else {
                    vec![chunk(0, &body, true)]
                }
            }),
        }
    };
    let addr = start(&pki, down).await;
    let (node, commands) = node_and_commands(&pki, &addr);
    let (result, progress) =
        tokio::time::timeout(PATIENCE, run(&commands, deploy("u-1", &sha, "v1")))
            .await
            .expect("the fetch is still asked again");
    assert_eq!(
        result.outcome,
        Outcome::Succeeded as i32,
        "{result:?} {progress:?}"
    );
    assert_eq!(node.current().as_deref(), Some("v1"));
    assert_eq!(asked.load(Ordering::SeqCst), 3);
    let waited = progress
        .iter()
        .filter(|p| {
            p.contains("cannot serve the artifact now") && p.contains("database does not answer")
        })
        .count();
    assert_eq!(waited, 2, "{progress:?}");

    // Refused otherwise: failed at once, asked once.
    let asked = Arc::new(AtomicUsize::new(0));
    let refusing = counting(&asked, || {
        vec![Step::Refuse(Status::internal(
            "session failed inside the controller; see its log",
        ))]
    });
    let addr = start(&pki, refusing).await;
    let (node, commands) = node_and_commands(&pki, &addr);
    let (result, _) = tokio::time::timeout(PATIENCE, run(&commands, deploy("u-2", &sha, "v1")))
        .await
        .expect("a refused fetch is not asked again");
    assert_eq!(result.outcome, Outcome::Failed as i32, "{result:?}");
    assert!(
        result.message.contains("session failed inside"),
        "{}",
        result.message
    );
    assert_eq!(asked.load(Ordering::SeqCst), 1);
    assert_eq!(node.current(), None);
}

fn deploy(id: &str, sha: &str, release: &str) -> ControllerMessage {
    ControllerMessage {
        kind: Some(controller_message::Kind::Deploy(Deploy {
            command_id: id.into(),
            app: "web".into(),
            release_id: release.into(),
            artifact_sha256: sha.into(),
            ..Default::default()
        })),
    }
}

/// Runs one command and returns its result and progress lines.
async fn run(commands: &Commands, msg: ControllerMessage) -> (CommandResult, Vec<String>) {
    let (tx, mut rx) = mpsc::channel(64);
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
    (result.unwrap(), progress)
}

/// Names in the app's artifact cache.
fn cache(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(root.join(".slipway/cache"))
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Waits (without blocking the runtime) until `f` holds.
async fn until(what: &str, mut f: impl FnMut() -> bool) {
    tokio::time::timeout(PATIENCE, async {
        while !f() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out after {PATIENCE:?} waiting for {what}"));
}

/// A controller that sends part of the artifact and then nothing (the
/// connection stays open, as behind a dead network) fails the deploy after
/// `[artifacts] read_timeout` of silence, leaving nothing behind. Before,
/// the fetch waited forever — holding the app's lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_that_goes_quiet_mid_artifact_fails_the_deploy_in_read_timeout() {
    let pki = pki();
    let body = targz(&tar_of(&[("VERSION", "v1")]));
    let sha = sha256(&body);
    let head = body[..body.len() / 2].to_vec();
    let addr = start(
        &pki,
        FakeController {
            script: Box::new(move |_| vec![chunk(0, &head, false), Step::Stall]),
        },
    )
    .await;
    let (node, commands) = node_and_commands(&pki, &addr);
    let (result, progress) =
        tokio::time::timeout(PATIENCE, run(&commands, deploy("c-1", &sha, "v1")))
            .await
            .expect("the deploy still waits on a controller that went quiet");
    assert_eq!(result.outcome, Outcome::Failed as i32, "{result:?}");
    assert!(
        result
            .message
            .contains(&format!("controller {addr} sent nothing for 1s"))
            && result.message.contains("in the middle of the artifact"),
        "{} {progress:?}",
        result.message
    );
    assert!(cache(&node.root).is_empty(), "{:?}", cache(&node.root));
    assert_eq!(node.current(), None);
}

/// A deploy fetching from the controller does not hold the app's lock: a
/// node-local rollback meanwhile succeeds (before, it failed with "deploy
/// in progress"), and the deploy completes once the controller sends the
/// rest of the artifact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_during_a_controller_fetch_succeeds_and_the_deploy_then_completes() {
    let pki = pki();
    let body = targz(&tar_of(&[("VERSION", "v3"), ("index.html", "hello\n")]));
    let sha = sha256(&body);
    let gate = Arc::new(Notify::new());
    let asked = Arc::new(Mutex::new(Vec::new()));
    let script: Script = {
        let (gate, asked, body) = (gate.clone(), asked.clone(), body.clone());
        Box::new(move |req| {
            asked.lock().unwrap().push(req.sha256.clone());
            let half = body.len() / 2;
            vec![
                chunk(0, &body[..half], false),
                Step::Hold(gate.clone()),
                chunk(half, &body[half..], true),
            ]
        })
    };
    let addr = start(&pki, FakeController { script }).await;
    let (node, commands) = node_and_commands(&pki, &addr);
    // Two releases deployed on the node, so there is one to roll back to.
    let node = Arc::new(node);
    tokio::task::spawn_blocking({
        let node = node.clone();
        move || {
            node.deploy(&node.artifact("v1.tar.gz", &[("VERSION", "v1")]), "v1")
                .ok();
            node.deploy(&node.artifact("v2.tar.gz", &[("VERSION", "v2")]), "v2")
                .ok();
        }
    })
    .await
    .unwrap();

    let deploying = tokio::spawn({
        let commands = commands.clone();
        let sha = sha.clone();
        async move { run(&commands, deploy("c-3", &sha, "v3")).await }
    });
    // Half the artifact is in the cache's temp file: the fetch is under way.
    let root = node.root.clone();
    until("the fetch to be under way", || {
        cache(&root).iter().any(|n| {
            n.contains(".part-")
                && fs::metadata(root.join(".slipway/cache").join(n))
                    .is_ok_and(|m| m.len() >= (body.len() / 2) as u64)
        })
    })
    .await;

    let rolled = tokio::task::spawn_blocking({
        let node = node.clone();
        move || (node.run(&["rollback", "--app", "web"]), node.current())
    })
    .await
    .unwrap();
    assert_eq!(rolled.0.code, Some(0), "{:#?}", rolled.0);
    assert_eq!(rolled.1.as_deref(), Some("v1"));
    assert!(!deploying.is_finished());

    gate.notify_one();
    let (result, progress) = tokio::time::timeout(PATIENCE, deploying)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        result.outcome,
        Outcome::Succeeded as i32,
        "{result:?} {progress:?}"
    );
    assert_eq!(node.current().as_deref(), Some("v3"));
    assert_eq!(*asked.lock().unwrap(), vec![sha.clone()]);
    let version = fs::read_to_string(node.root.join("current/VERSION")).unwrap();
    assert_eq!(version, "v3");
    assert!(!cache(&node.root).iter().any(|n| n.contains(".part-")));
}
