//! `serve`: load the CA, open the store, and run the gRPC services
//! (Enrollment, AgentLink, Control) on one TLS listener until `shutdown`
//! resolves.
//!
//! Revocations are made by another process (`node revoke` writes the
//! database), so the server polls the database every [`REVOCATION_POLL`] and
//! closes the stream of every revoked node that holds one. (A revoked node's
//! next heartbeat also closes it, and any new request is refused at once.)

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use slipway_proto::notify::Notifier;
use slipway_proto::v1::agent_link_server::AgentLinkServer;
use slipway_proto::v1::control_server::ControlServer;
use slipway_proto::v1::enrollment_server::EnrollmentServer;
use tokio::net::TcpListener;

use tokio_util::sync::CancellationToken;

use crate::api::ControlService;
use crate::artifacts::Artifacts;
use crate::audit::{self, AuditEvent};
use crate::config::ServeConfig;
use crate::link::commands::Commands;
use crate::link::enroll::EnrollmentService;
use crate::link::registry::{CloseReason, Sessions};
use crate::link::replicas::{Replica, ReplicaError};
use crate::link::session::AgentLinkService;
use crate::pki::ca::{Ca, CaError};
use crate::pki::tls::{self, TlsError};
use crate::store::{Store, StoreError};

/// How often `serve` looks for nodes revoked by another process: the longest
/// a revoked node's open stream survives when it sends nothing.
pub const REVOCATION_POLL: Duration = Duration::from_secs(2);
/// HTTP/2 pings on idle connections, so a vanished agent (droplet powered
/// off, no FIN) does not hold a session forever.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// An unanswered ping closes the connection after this long.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Errors that stop the server from starting or running (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Binding the listen address failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The `--ready-file` could not be written.
    #[error("cannot write the ready file {}: {source}", path.display())]
    ReadyFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The CA or server certificate could not be loaded or created.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The database could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// This replica could not be recorded.
    #[error(transparent)]
    Replica(Box<ReplicaError>),
    /// The TLS configuration was refused.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The secrets key file or the data key it seals.
    #[error(transparent)]
    Secrets(Box<crate::secrets::SecretsError>),
    /// The OIDC verifier could not be set up (its CA file).
    #[error("{0}")]
    Oidc(String),
    /// The HTTP listener could not start.
    #[error("http: {0}")]
    Http(String),
    /// The GitHub client could not be set up.
    #[error("{0}")]
    Github(Box<crate::github::GhError>),
    /// `snapshot_before_deploy` is set but the DigitalOcean client cannot
    /// be made (no token, …).
    #[error("digitalocean (snapshot_before_deploy): {0}")]
    DigitalOcean(Box<crate::digitalocean::DoError>),
    /// The gRPC server failed.
    #[error("grpc server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

impl From<ReplicaError> for ServeError {
    fn from(err: ReplicaError) -> Self {
        Self::Replica(Box::new(err))
    }
}

impl From<crate::secrets::SecretsError> for ServeError {
    fn from(err: crate::secrets::SecretsError) -> Self {
        Self::Secrets(Box::new(err))
    }
}

/// Writes `addr` and a newline to `path` through a temp file and a rename,
/// so a reader never sees half an address.
fn write_ready_file(path: &std::path::Path, addr: SocketAddr) -> io::Result<()> {
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, format!("{addr}\n"))?;
    std::fs::rename(&temp, path)
}

/// Binds `config.listen` and serves until `shutdown` resolves, telling
/// systemd through `notifier` (`READY=1` when the ready file is written,
/// watchdog pings, `STOPPING=1`).
pub async fn run(
    config: ServeConfig,
    notifier: Notifier,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    serve_notifying(&config, listener, notifier, shutdown).await
}

/// Serves on an already bound listener (tests bind `127.0.0.1:0`).
pub async fn serve(
    config: &ServeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    serve_notifying(config, listener, Notifier::none(), shutdown).await
}

/// [`serve`], telling systemd how it goes.
async fn serve_notifying(
    config: &ServeConfig,
    listener: TcpListener,
    notifier: Notifier,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let ca = Arc::new(Ca::load_or_create(&config.data_dir)?);
    let hosts = config.certificate_hosts();
    let identity = ca.server_identity(&config.data_dir, &hosts, config.server_cert_validity)?;
    let store = Store::open_at(&config.data_dir, config.database_url.as_ref()).await?;
    let local = listener.local_addr().ok();
    let replica = Replica::start(
        &store,
        &config.data_dir,
        local.map_or_else(|| config.listen.to_string(), |a| a.to_string()),
        config.http.map(|h| h.listen.to_string()),
    )
    .await?;
    // From here on this replica is recorded as the owner of the
    // deployments it starts.
    let store = replica.store().clone();
    // No deployment of this process runs yet: any marked running whose
    // replica is gone (this controller before a crash or restart, or a
    // dead replica) and that cannot be carried on (recorded without its
    // plan) was cut short and must not block its app. Those with a plan
    // are taken over once the agent sessions can be served (the replica's
    // first renewal); those of live replicas go on.
    let abandoned = replica.abandon_dead_deployments(crate::now_unix()).await?;
    if !abandoned.is_empty() {
        tracing::warn!(
            deployments = ?abandoned,
            "marked deployments interrupted by a controller restart as failed"
        );
    }
    let server_cert = tls::ServerCert::new(&identity)?;
    let (tls_config, client_trust) = tls::server_config_with_trust(&ca, server_cert.clone())?;
    let rotation = crate::link::rotation::RotationWatch {
        data_dir: config.data_dir.clone(),
        ca: ca.clone(),
        trust: client_trust,
        server: server_cert.clone(),
        hosts: hosts.clone(),
        validity: config.server_cert_validity,
        sessions: Sessions::for_replica(replica.clone()),
        store: store.clone(),
    };
    // The CA path is what `slipway --ca` (SLIPWAY_CA) needs.
    let ca_pem = config.data_dir.join(crate::pki::ca::CA_CERT_FILE);
    tracing::info!(
        addr = ?local, ca_sha256 = %ca.fingerprint(), ca_pem = %ca_pem.display(),
        server_names = %hosts.join(" "),
        server_cert_not_after = %crate::rfc3339(identity.not_after),
        server_cert_renew_at = %crate::rfc3339(identity.renew_at()),
        "controller listening"
    );
    let server_cert_for_http = server_cert.clone();
    let renewal = Renewal {
        ca: ca.clone(),
        data_dir: config.data_dir.clone(),
        hosts: hosts.clone(),
        validity: config.server_cert_validity,
        cert: server_cert,
        store: store.clone(),
    };

    // The DigitalOcean token is read now, so a bad one stops the start.
    let snapshot_policy = match &config.digitalocean {
        Some(c) => c
            .snapshot_policy()
            .map_err(|e| ServeError::DigitalOcean(Box::new(e)))?,
        None => None,
    };
    let enrollment = EnrollmentService::new(ca.clone(), store.clone(), config.link.cert_validity);
    let sessions = rotation.sessions.clone();
    let artifacts = Artifacts::for_serve(&config.data_dir, config.artifact_dir.as_deref(), &store);
    let commands = Commands::new();
    // Commands for nodes whose session another live replica holds go
    // through the store to that replica.
    let router = crate::link::routing::Router::new(replica.clone(), commands.clone());
    sessions.route_through(router.clone());
    let link = AgentLinkService::new(
        ca,
        store.clone(),
        sessions.clone(),
        config.link,
        artifacts.clone(),
        commands.clone(),
    );
    let secrets = crate::secrets::Secrets::open(&store, &config.secrets_key).await?;
    let oidc = match &config.oidc {
        Some(oidc) => {
            let verifier = crate::auth::oidc::Oidc::new(oidc.clone())
                .map_err(|e| ServeError::Oidc(e.to_string()))?;
            tracing::info!(
                issuer = %oidc.issuer, audience = %oidc.audience, grants = oidc.grants.len(),
                "accepting GitHub Actions OIDC tokens"
            );
            Some(Arc::new(verifier))
        }
        None => None,
    };
    // Deployment followers end when shutdown begins (the graceful
    // shutdown would wait for their streams).
    let stopping_followers = CancellationToken::new();
    let mut control = ControlService::new(
        store.clone(),
        sessions.clone(),
        commands.clone(),
        artifacts,
        config.data_dir.clone(),
        secrets,
    )
    .with_oidc(oidc)
    .with_stopping(stopping_followers.clone())
    .with_followers(config.followers)
    .with_snapshots(snapshot_policy)
    .with_droplets(config.digitalocean.is_some());
    // GitHub: the rollouts' notes go to the status queue (never waited
    // for); the webhook endpoint starts deployments through `control`.
    let stop_github = CancellationToken::new();
    // Deployments of dead replicas failed after the start, for GitHub.
    let (later_tx, later_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut later_rx = Some(later_rx);
    let mut github_hooks = None;
    let github_queue = match &config.github {
        Some(github) => {
            let github = Arc::new(github.clone());
            let client = github
                .client()
                .map_err(|e| ServeError::Github(Box::new(e)))?;
            let (observer, notes) = crate::rollout::Observer::channel();
            control = control.with_observer(observer);
            github_hooks = Some(crate::github::Hooks::new(
                github.clone(),
                client.clone(),
                control.clone(),
            ));
            tracing::info!(
                credentials = %github.sources(),
                linked_apps = github.links.len(),
                webhooks = github.credentials.webhook_secret.is_some(),
                log_url_base = ?github.public_url,
                "github integration on"
            );
            Some(crate::github::status::spawn(
                github,
                client,
                store.clone(),
                notes,
                abandoned.clone(),
                later_rx
                    .take()
                    .unwrap_or_else(|| tokio::sync::mpsc::unbounded_channel().1),
                stop_github.clone(),
            ))
        }
        None => None,
    };
    // A node that connects with an app's env behind the controller's
    // version gets it (an offline node catching up).
    let catch_up = control.clone();
    let link = link.on_hello(crate::link::session::OnHello(Arc::new(
        move |node, apps| {
            catch_up.env_catch_up(node, apps);
        },
    )));
    let http = match config.http {
        Some(settings) => Some(
            start_http(
                config,
                settings,
                &server_cert_for_http,
                crate::http::HttpState::with_metrics(
                    store.clone(),
                    sessions.clone(),
                    control.clone(),
                    CancellationToken::new(),
                    Some(crate::http::MetricsScrape {
                        scraper: crate::metrics::Scraper::new(
                            store.clone(),
                            sessions.clone(),
                            &config.data_dir,
                        ),
                        loopback_no_auth: settings.metrics_loopback_no_auth,
                    }),
                )
                .with_github_if(github_hooks.clone()),
            )
            .await?,
        ),
        None => None,
    };
    store
        .record_controller_start(crate::now_unix(), config.unreachable_after)
        .await?;

    let stop_polling = CancellationToken::new();
    let poller = tokio::spawn(poll_revocations(
        store.clone(),
        sessions.clone(),
        stop_polling.clone(),
    ));
    let renewer = tokio::spawn(renewal.run(identity.renew_at(), stop_polling.clone()));
    // Without GitHub nobody listens for the later ones.
    let later = later_rx.is_none().then_some(later_tx);
    let carrier = crate::link::replicas::Carrier {
        sessions: sessions.clone(),
        commands: commands.clone(),
        live: control.live().clone(),
        observer: control.observer().cloned(),
    };
    let replica_task = tokio::spawn(replica.run(later, Some(carrier), stop_polling.clone()));
    let rotation = tokio::spawn(rotation.run(stop_polling.clone()));
    let routing = tokio::spawn(router.run(sessions.clone(), stop_polling.clone()));
    let backups = config.backup.clone().map(|schedule| {
        tokio::spawn(scheduled_backups(
            store.clone(),
            config.data_dir.clone(),
            schedule,
            stop_polling.clone(),
        ))
    });
    let join_deploys = tokio::spawn(crate::digitalocean::join_deploy::run(
        store.clone(),
        sessions.clone(),
        commands.clone(),
        Artifacts::for_serve(&config.data_dir, config.artifact_dir.as_deref(), &store),
        stop_polling.clone(),
    ));
    let droplet_sync = config.digitalocean.clone().and_then(|c| {
        let every = c.sync_every?;
        Some(tokio::spawn(crate::digitalocean::inventory::periodic(
            store.clone(),
            c,
            every,
            stop_polling.clone(),
        )))
    });
    // Graceful HTTP/2 shutdown waits for open streams; agent sessions never
    // end by themselves, so close them when shutdown begins.
    let closing = sessions.clone();
    let notifier = Arc::new(notifier);
    let stopping = notifier.clone();
    let shutdown = async move {
        shutdown.await;
        stopping_followers.cancel();
        if let Err(e) = stopping.stopping("stopping: closing agent sessions") {
            tracing::warn!(error = %e, "cannot notify systemd (STOPPING=1)");
        }
        closing.close_all(CloseReason::Shutdown);
    };
    // The listener is bound and everything it serves is set up: from here
    // connections are accepted (queued until the server below takes them).
    if let (Some(path), Some(addr)) = (&config.ready_file, local) {
        write_ready_file(path, addr).map_err(|source| ServeError::ReadyFile {
            path: path.clone(),
            source,
        })?;
    }
    let status = match local {
        Some(addr) => format!("serving on {addr}"),
        None => "serving".to_owned(),
    };
    if let Err(e) = notifier.ready(&status) {
        tracing::warn!(error = %e, "cannot notify systemd (READY=1)");
    }
    if let Some(every) = notifier.watchdog_interval() {
        tracing::info!(?every, "systemd watchdog on");
        tokio::spawn(watchdog(notifier.clone(), every, stop_polling.clone()));
    }
    let served = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(EnrollmentServer::new(enrollment))
        .add_service(AgentLinkServer::new(link))
        .add_service(ControlServer::new(control))
        .serve_with_incoming_shutdown(
            tls::incoming(listener, tls_config, move |peer, why| {
                audit_refused_certificate(store.clone(), peer, why)
            }),
            shutdown,
        )
        .await;
    stop_polling.cancel();
    if let Some((stop, task)) = http {
        let _ = stop.send(());
        let _ = task.await;
    }
    let _ = poller.await;
    let _ = renewer.await;
    let _ = replica_task.await;
    let _ = rotation.await;
    let _ = routing.await;
    if let Some(backups) = backups {
        let _ = backups.await;
    }
    let _ = join_deploys.await;
    if let Some(droplet_sync) = droplet_sync {
        let _ = droplet_sync.await;
    }
    stop_github.cancel();
    if let Some(queue) = github_queue {
        let _ = queue.await;
    }
    served?;
    Ok(())
}

/// Binds the HTTP listener, writes `--http-ready-file`, and serves the
/// HTTP API on it (TLS with the server certificate, or plain on loopback)
/// until the returned sender fires.
async fn start_http(
    config: &ServeConfig,
    settings: crate::config::HttpSettings,
    server_cert: &tls::ServerCert,
    state: crate::http::HttpState,
) -> Result<
    (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ),
    ServeError,
> {
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: settings.listen,
            source,
        })?;
    let local = listener
        .local_addr()
        .map_err(|e| ServeError::Http(e.to_string()))?;
    let tls_config = if settings.plain {
        tracing::warn!(addr = %local, "http api listening WITHOUT TLS (plain HTTP, loopback only)");
        None
    } else {
        tracing::info!(addr = %local, "http api listening (https, the controller's server certificate)");
        Some(crate::http::tls_config(server_cert.clone())?)
    };
    if let Some(path) = &config.http_ready_file {
        write_ready_file(path, local).map_err(|source| ServeError::ReadyFile {
            path: path.clone(),
            source,
        })?;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let served = crate::http::serve(listener, tls_config, state, async {
            let _ = stopped.await;
        })
        .await;
        if let Err(err) = served {
            tracing::error!(%err, "http server failed");
        }
    });
    Ok((stop, task))
}

/// Longest sleep between two looks at the wall clock while waiting to renew
/// the server certificate: a clock stepped forward (NTP, a resumed VM) is
/// noticed within this.
const RENEWAL_CHECK: Duration = Duration::from_secs(60);
/// After a failed renewal, try again this much later.
const RENEWAL_RETRY: Duration = Duration::from_secs(60);

/// What renewing the server certificate while serving needs.
struct Renewal {
    ca: Arc<Ca>,
    data_dir: std::path::PathBuf,
    hosts: Vec<String>,
    validity: Duration,
    cert: tls::ServerCert,
    store: Store,
}

impl Renewal {
    /// Renews the server certificate each time it reaches two thirds of its
    /// life (`renew_at` for the first), until `stop`. The new certificate is
    /// stored, then presented from the next handshake on: sessions already
    /// open keep theirs and are not dropped.
    async fn run(self, mut renew_at: i64, stop: CancellationToken) {
        loop {
            let now = crate::now_unix();
            if now < renew_at {
                let wait = Duration::from_secs(u64::try_from(renew_at - now).unwrap_or(0))
                    .min(RENEWAL_CHECK);
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(wait) => continue,
                }
            }
            let issued = {
                let (ca, dir, hosts, validity) = (
                    self.ca.clone(),
                    self.data_dir.clone(),
                    self.hosts.clone(),
                    self.validity,
                );
                tokio::task::spawn_blocking(move || ca.issue_server(&dir, &hosts, validity)).await
            };
            let outcome = match issued {
                Ok(Ok(identity)) => self
                    .cert
                    .set(&identity)
                    .map(|()| identity)
                    .map_err(|e| e.to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("renewal task failed: {e}")),
            };
            let event = match outcome {
                Ok(identity) => {
                    renew_at = identity.renew_at();
                    tracing::info!(
                        not_after = %crate::rfc3339(identity.not_after),
                        renew_at = %crate::rfc3339(renew_at),
                        "renewed the server certificate"
                    );
                    AuditEvent::success(
                        audit::SERVER_CERT_RENEWED,
                        "controller",
                        "server_certificate",
                        self.hosts.join(" "),
                        serde_json::json!({
                            "not_before": crate::rfc3339(identity.not_before),
                            "not_after": crate::rfc3339(identity.not_after),
                        }),
                    )
                }
                Err(message) => {
                    renew_at = crate::now_unix() + RENEWAL_RETRY.as_secs() as i64;
                    tracing::error!(%message, "could not renew the server certificate; trying again in a minute");
                    AuditEvent::error(
                        audit::SERVER_CERT_RENEW_FAILED,
                        "controller",
                        "server_certificate",
                        self.hosts.join(" "),
                        serde_json::json!({}),
                        message,
                    )
                }
            };
            if let Err(err) = self.store.audit(&event, crate::now_unix()).await {
                tracing::error!(%err, "could not record audit event");
            }
        }
    }
}

/// Writes a backup every `schedule.every` (the first one `every` after the
/// start), keeping the newest `schedule.keep`, until `stop`; each one, and
/// each failure, is audited.
async fn scheduled_backups(
    store: Store,
    data_dir: std::path::PathBuf,
    schedule: crate::config::BackupSchedule,
    stop: CancellationToken,
) {
    let recipient = match crate::backup::parse_recipient(&schedule.recipient) {
        Ok(r) => r,
        Err(err) => {
            tracing::error!(%err, "scheduled backups are off");
            return;
        }
    };
    let plan = crate::backup::Schedule {
        dir: schedule.dir.clone(),
        every: schedule.every,
        keep: schedule.keep,
        recipient,
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(plan.every) => {}
        }
        let event = match crate::backup::scheduled(&store, &data_dir, &plan).await {
            Ok(report) => {
                tracing::info!(path = %report.path.display(), size = report.size, "wrote a scheduled backup");
                AuditEvent::success(
                    audit::BACKUP_CREATED,
                    "controller",
                    "backup",
                    report.path.display().to_string(),
                    serde_json::json!({ "size": report.size, "db_size": report.db_size, "scheduled": true }),
                )
            }
            Err(err) => {
                tracing::error!(%err, "scheduled backup failed");
                AuditEvent::error(
                    audit::BACKUP_FAILED,
                    "controller",
                    "backup",
                    plan.dir.display().to_string(),
                    serde_json::json!({ "scheduled": true }),
                    err.to_string(),
                )
            }
        };
        if let Err(err) = store.audit(&event, crate::now_unix()).await {
            tracing::error!(%err, "could not record audit event");
        }
    }
}

/// Pings systemd's watchdog every `every` until `stop`, from the runtime
/// that serves: a wedged runtime stops the pings and systemd restarts it.
async fn watchdog(notifier: Arc<Notifier>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if let Err(e) = notifier.watchdog() {
            tracing::warn!(error = %e, "cannot notify systemd (WATCHDOG=1)");
        }
    }
}

/// Records a TLS handshake refused for its client certificate.
async fn audit_refused_certificate(store: Store, peer: SocketAddr, refusal: tls::Refusal) {
    let event = match &refusal.named {
        // Whose it was and what to do: the node must re-enroll.
        Some(named) => crate::link::enroll::refused_cert_event(&store, peer, named).await,
        None => AuditEvent::error(
            audit::CLIENT_CERT_REFUSED,
            peer.to_string(),
            "connection",
            peer.to_string(),
            serde_json::json!({ "peer": peer.to_string() }),
            refusal.message,
        ),
    };
    if let Err(err) = store.audit(&event, crate::now_unix()).await {
        tracing::error!(%err, "could not record audit event");
    }
}

/// Closes the sessions of revoked nodes until `stop` is cancelled.
async fn poll_revocations(store: Store, sessions: Sessions, stop: CancellationToken) {
    let mut tick = tokio::time::interval(REVOCATION_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        if sessions.is_empty() {
            continue;
        }
        match store.revoked_node_ids().await {
            Ok(revoked) => {
                for node_id in revoked {
                    if sessions.close(&node_id, CloseReason::Revoked) {
                        tracing::info!(%node_id, "closed the session of a revoked node");
                    }
                }
            }
            Err(err) => tracing::warn!(%err, "could not check for revoked nodes"),
        }
    }
}

/// Resolves on SIGINT or SIGTERM: the `shutdown` of `serve`.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        // Without a SIGTERM handler, Ctrl-C still works.
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
}
