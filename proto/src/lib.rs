//! The Slipway agent ⇄ controller protocol: protobuf messages and tonic gRPC
//! client and server stubs, generated at build time from
//! `proto/slipway/v1/agent.proto`.
//!
//! Droplets open no inbound port, so the agent always dials the controller:
//! it enrolls once with a join token ([`v1::enrollment_client`]), then holds a
//! single mTLS bidirectional stream ([`v1::agent_link_client`]) over which the
//! controller pushes commands ([`v1::ControllerMessage`]) and the agent sends
//! hello, heartbeats, progress and results ([`v1::AgentMessage`]).
//!
//! # Layout
//!
//! - `proto/slipway/v1/agent.proto` — the source of truth; the comments there
//!   explain why each message and field exists and become the rustdoc here.
//! - `proto/slipway/v1/control.proto` — the controller API the `slipway` CLI
//!   calls ([`v1::control_client`] / [`v1::control_server`]): the fleet
//!   views ([`v1::NodeView`], [`v1::FleetStatus`]), audit, artifact upload,
//!   deploy, rollback, restart and prune with streamed progress.
//! - [`limits`] — the name rules and the limit of every field a peer
//!   sends, checked by whoever receives it ([`limits::Validate`]).
//! - [`join_token`] — the `slw1.<id>.<secret>.<ca-sha256>` join token
//!   format, shared by the controller (prints tokens) and the agent (reads
//!   the pinned CA fingerprint before trusting the controller).
//! - [`crypto`] — the one rustls backend (ring) of every TLS connection.
//! - [`notify`] — `sd_notify` (READY, WATCHDOG, STOPPING, STATUS) for the
//!   agent's `run` and the controller's `serve` under systemd.
//! - With the `cli` feature, what the command-line binaries (`slipway`,
//!   `slipway-controller`) share: `client` (the Control API channel: TLS
//!   trusting the controller's CA, an API token or operator certificate),
//!   `view` (the fleet view and status summary as text and `--json`) and
//!   `cli` (flag parsing with exit code 64, the runtime, the `error:` line,
//!   durations like `7d`) and `https` (one bounded HTTPS GET: the GitHub
//!   Actions OIDC token, the token issuer's keys).
//! - `build.rs` — compiles the .proto with `protox` (pure Rust, no system
//!   `protoc`) and generates code with `tonic-prost-build`.
//! - [`v1`] — everything generated for package `slipway.v1`:
//!   - messages such as [`v1::AgentMessage`], [`v1::Heartbeat`],
//!     [`v1::Deploy`]; each `oneof` is an enum in a snake-case module named
//!     after its message, e.g. [`v1::agent_message::Kind`];
//!   - [`v1::enrollment_server`] / [`v1::agent_link_server`]: a trait to
//!     implement (controller side) and a `…Server` wrapper to mount on
//!     `tonic::transport::Server`;
//!   - [`v1::enrollment_client`] / [`v1::agent_link_client`]: clients built
//!     from a `tonic::transport::Channel` with `…Client::new(channel)`. There
//!     is deliberately no `…Client::connect(url)` shortcut: it would clash
//!     with the `Connect` rpc, and agents configure an mTLS `Endpoint` anyway.
//!
//! Changing the protocol: add fields and oneof cases with new numbers, never
//! renumber or reuse one; breaking changes go in a new `slipway.v2` package
//! next to `v1`.

#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "cli")]
pub mod client;
pub mod crypto;
pub mod dotenv;
#[cfg(feature = "cli")]
pub mod https;
pub mod join_token;
pub mod limits;
pub mod notify;
#[cfg(feature = "cli")]
pub mod view;

/// Generated code for protobuf package `slipway.v1` (messages, enums, and
/// the `Enrollment` / `AgentLink` clients and servers).
// The code below is written by tonic-prost-build, not by us, so lint findings
// in it cannot be fixed at the source. Generators have historically emitted
// private-but-`pub` helpers, Debug-less structs, elided lifetimes and clippy
// findings (tonic 0.14.9 happens to be clean), and a `cargo update` must not
// break `clippy -D warnings`; so these lints are silenced for this module only,
// and hand-written code elsewhere in the crate keeps them.
#[allow(
    unreachable_pub,
    missing_debug_implementations,
    rust_2018_idioms,
    clippy::all,
    clippy::pedantic
)]
pub mod v1 {
    tonic::include_proto!("slipway.v1");
}

/// A span of time in its largest whole unit, for people: `9 days`,
/// `1 day`, `5 hours`, `3 minutes`, `40 seconds` (negative spans count as
/// their size).
pub fn span(secs: i64) -> String {
    let secs = secs.unsigned_abs();
    let (n, unit) = match secs {
        s if s >= 86_400 => (s / 86_400, "day"),
        s if s >= 3_600 => (s / 3_600, "hour"),
        s if s >= 60 => (s / 60, "minute"),
        s => (s, "second"),
    };
    format!("{n} {unit}{}", if n == 1 { "" } else { "s" })
}

#[cfg(test)]
mod tests {
    #[test]
    fn spans_in_their_largest_unit() {
        assert_eq!(super::span(9 * 86_400 + 5), "9 days");
        assert_eq!(super::span(-86_400), "1 day");
        assert_eq!(super::span(7_200), "2 hours");
        assert_eq!(super::span(61), "1 minute");
        assert_eq!(super::span(40), "40 seconds");
    }

    use std::time::Duration;

    use prost::Message as _;
    use tokio::sync::{mpsc, oneshot};
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::transport::server::TcpIncoming;
    use tonic::transport::{Endpoint, Server};
    use tonic::{Request, Response, Status, Streaming};

    use crate::v1::agent_link_client::AgentLinkClient;
    use crate::v1::agent_link_server::{AgentLink, AgentLinkServer};
    use crate::v1::{
        agent_message, controller_message, AgentMessage, AppStatus, ArtifactChunk,
        ControllerMessage, DiskUsage, FetchArtifactRequest, Heartbeat, Hello, NodeMetrics,
        ReleaseInfo, RenewRequest, RenewResponse, StatusRequest,
    };

    /// Guards against a test hanging forever if the server never answers.
    const TEST_TIMEOUT: Duration = Duration::from_secs(10);

    fn sample_heartbeat() -> Heartbeat {
        Heartbeat {
            unix_time: 1_700_000_000,
            metrics: Some(NodeMetrics {
                cpu_percent: 12.5,
                mem_used_bytes: 512 * 1024 * 1024,
                mem_total_bytes: 2 * 1024 * 1024 * 1024,
                load1: 0.25,
                load5: 0.5,
                load15: 0.75,
                disks: vec![DiskUsage {
                    mount: "/".to_owned(),
                    used_bytes: 10_000_000_000,
                    total_bytes: 50_000_000_000,
                }],
            }),
            apps: vec![AppStatus {
                app: "web".to_owned(),
                current_release: "20240101T000000Z-abc123".to_owned(),
                releases: vec![ReleaseInfo {
                    id: "20240101T000000Z-abc123".to_owned(),
                    status: "active".to_owned(),
                    created_at_unix: 1_704_067_200,
                    artifact_sha256: "ab".repeat(32),
                    reason: String::new(),
                    env_version: 2,
                }],
                health: "healthy".to_owned(),
                in_progress: true,
                env_version: 3,
                public: Some(crate::v1::PublicAddress {
                    address: "0.0.0.0:3000".to_owned(),
                    mode: "agent_proxy".to_owned(),
                    release: "20240101T000000Z-abc123".to_owned(),
                    backend: "127.0.0.1:8081".to_owned(),
                    draining: 2,
                    forwarding: String::new(),
                }),
            }],
            agent_version: "0.1.0".to_owned(),
            agent_rss_bytes: 24 * 1024 * 1024,
        }
    }

    #[test]
    fn heartbeat_round_trips_through_prost() {
        let sent = AgentMessage {
            kind: Some(agent_message::Kind::Heartbeat(sample_heartbeat())),
        };

        let bytes = sent.encode_to_vec();
        let got = AgentMessage::decode(bytes.as_slice()).unwrap();

        assert_eq!(got, sent);
        let Some(agent_message::Kind::Heartbeat(hb)) = got.kind else {
            panic!("expected a heartbeat, got {:?}", got.kind);
        };
        assert_eq!(hb.unix_time, 1_700_000_000);
        let metrics = hb.metrics.unwrap();
        assert!((metrics.cpu_percent - 12.5).abs() < f64::EPSILON);
        assert_eq!(metrics.mem_total_bytes, 2 * 1024 * 1024 * 1024);
        assert!((metrics.load15 - 0.75).abs() < f64::EPSILON);
        assert_eq!(metrics.disks.len(), 1);
        assert_eq!(metrics.disks[0].mount, "/");
        assert_eq!(metrics.disks[0].total_bytes, 50_000_000_000);
        assert_eq!(hb.apps.len(), 1);
        let app = &hb.apps[0];
        assert_eq!(app.app, "web");
        assert_eq!(app.health, "healthy");
        assert!(app.in_progress);
        assert_eq!(app.releases[0].status, "active");
        assert_eq!(app.releases[0].created_at_unix, 1_704_067_200);
        assert_eq!(app.releases[0].artifact_sha256.len(), 64);
        assert_eq!(hb.agent_version, "0.1.0");
        assert_eq!(hb.agent_rss_bytes, 24 * 1024 * 1024);
    }

    /// Minimal controller side: answers every `Hello` with a `StatusRequest`
    /// whose command id names the node, which is enough to prove messages
    /// flow both ways on the bidirectional stream.
    #[derive(Debug)]
    struct EchoLink;

    #[tonic::async_trait]
    impl AgentLink for EchoLink {
        type ConnectStream = ReceiverStream<Result<ControllerMessage, Status>>;

        async fn connect(
            &self,
            request: Request<Streaming<AgentMessage>>,
        ) -> Result<Response<Self::ConnectStream>, Status> {
            let mut inbound = request.into_inner();
            let (tx, rx) = mpsc::channel(4);
            tokio::spawn(async move {
                while let Ok(Some(msg)) = inbound.message().await {
                    if let Some(agent_message::Kind::Hello(hello)) = msg.kind {
                        let reply = ControllerMessage {
                            kind: Some(controller_message::Kind::StatusRequest(StatusRequest {
                                command_id: format!("status-{}", hello.node_id),
                            })),
                        };
                        if tx.send(Ok(reply)).await.is_err() {
                            break;
                        }
                    }
                }
            });
            Ok(Response::new(ReceiverStream::new(rx)))
        }

        async fn renew(
            &self,
            _request: Request<RenewRequest>,
        ) -> Result<Response<RenewResponse>, Status> {
            Err(Status::unimplemented("not part of this test"))
        }

        type FetchArtifactStream = ReceiverStream<Result<ArtifactChunk, Status>>;

        async fn fetch_artifact(
            &self,
            _request: Request<FetchArtifactRequest>,
        ) -> Result<Response<Self::FetchArtifactStream>, Status> {
            Err(Status::unimplemented("not part of this test"))
        }
    }

    #[tokio::test]
    async fn agent_link_hello_gets_status_request_over_http2() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(
            Server::builder()
                .add_service(AgentLinkServer::new(EchoLink))
                .serve_with_incoming_shutdown(TcpIncoming::from(listener), async {
                    let _ = stop_rx.await;
                }),
        );

        let exchange = async {
            // Plain HTTP/2 for now; production links use an mTLS endpoint.
            let channel = Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut client = AgentLinkClient::new(channel);

            let (out_tx, out_rx) = mpsc::channel(4);
            out_tx
                .send(AgentMessage {
                    kind: Some(agent_message::Kind::Hello(Hello {
                        node_id: "node-1".to_owned(),
                        agent_version: "0.1.0".to_owned(),
                        apps: Vec::new(),
                        droplet_id: 0,
                    })),
                })
                .await
                .unwrap();

            let mut inbound = client
                .connect(ReceiverStream::new(out_rx))
                .await
                .unwrap()
                .into_inner();
            let reply = inbound.message().await.unwrap().unwrap();

            // Closing our side ends the session; the server then ends its side.
            drop(out_tx);
            assert_eq!(inbound.message().await.unwrap(), None);
            reply
        };
        let reply = tokio::time::timeout(TEST_TIMEOUT, exchange)
            .await
            .expect("exchange timed out");

        assert_eq!(
            reply.kind,
            Some(controller_message::Kind::StatusRequest(StatusRequest {
                command_id: "status-node-1".to_owned(),
            }))
        );

        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    }
}
