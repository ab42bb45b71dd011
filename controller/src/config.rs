//! `serve` configuration: command-line flags, optionally on top of a TOML
//! file with the same keys. Checked once into [`ServeConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::ServeArgs;
use crate::link::liveness;
use crate::link::session::LinkSettings;
use crate::store::PostgresUrl;

/// Default listen address: loopback, so a first start exposes nothing.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7443";

/// A configuration problem; the binary exits 64 (EX_USAGE) on these.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown/mistyped keys; the
    /// TOML error carries line and column.
    #[error("{}: {source}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Parser message with line/column.
        source: Box<toml::de::Error>,
    },
    /// A required setting is missing everywhere.
    #[error("missing setting {0} (give --{0} or set it in --config)")]
    Missing(&'static str),
    /// A setting is out of range.
    #[error("setting {key} = {value} is invalid: {why}")]
    Invalid {
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
        /// What would be valid.
        why: &'static str,
    },
    /// `database_url` is not one; the value is shown without its password.
    #[error("setting database_url = {value} is invalid: {why}")]
    DatabaseUrl {
        /// The value given, password redacted.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// `[digitalocean]` is wrong; the message names the key.
    #[error("{0}")]
    DigitalOcean(String),
    /// `[oidc]` is wrong; the message names the file (when there is one)
    /// and the key, e.g. `oidc.grant[1].repository_id`.
    #[error("{0}")]
    Oidc(String),
    /// `[github]` is wrong; the message names the key.
    #[error("{0}")]
    Github(String),
}

impl ConfigError {
    /// Always: every configuration problem is the operator's to fix (exit 64).
    pub fn is_usage(&self) -> bool {
        true
    }
}

/// The TOML file: same keys as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Where the CA, keys and database live.
    pub data_dir: Option<PathBuf>,
    /// The store: unset for SQLite in the data dir, or
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE`.
    pub database_url: Option<String>,
    /// A directory every controller replica mounts, holding the uploaded
    /// artifacts (the data dir then caches them). Unset: in the data dir,
    /// or with PostgreSQL in the database.
    pub artifact_dir: Option<PathBuf>,
    /// Address for the gRPC listener.
    pub listen: Option<SocketAddr>,
    /// Heartbeats per second aimed for across the fleet; the announced
    /// interval grows with the fleet to keep to it (default 50).
    pub heartbeats_per_sec: Option<u32>,
    /// Missed heartbeat intervals before a node is unreachable, also the
    /// grace period (in intervals) after a controller start (default 3).
    pub unreachable_after_intervals: Option<u32>,
    /// DNS names or IP addresses agents and the CLI use to reach the
    /// controller, put into its server certificate.
    pub server_names: Option<Vec<String>>,
    /// Lifetime of the controller's TLS server certificate, e.g. "365d"
    /// (default; at least 30s). It is renewed at two thirds of it.
    pub server_cert_validity: Option<String>,
    /// Lifetime of node certificates, e.g. "7d" (default; at least 30s).
    /// Agents renew theirs at two thirds of it.
    pub node_cert_validity: Option<String>,
    /// Scheduled backups (file only).
    pub backup: Option<RawBackup>,
    /// The DigitalOcean fleet (file only; `crate::digitalocean::config`).
    pub digitalocean: Option<crate::digitalocean::config::RawDigitalOcean>,
    /// GitHub: credentials, linked apps, webhooks (file only;
    /// `crate::github::config`).
    pub github: Option<crate::github::config::RawGithub>,
    /// Address for the HTTP API and pages (off when unset).
    pub http_listen: Option<SocketAddr>,
    /// Serve HTTP without TLS: allowed only on a loopback `http_listen`
    /// (behind a local TLS proxy, or for a look from this machine).
    pub http_plain: Option<bool>,
    /// `/metrics` answers callers on a loopback address without a token
    /// (a Prometheus on the controller's machine); others still need one.
    pub metrics_loopback_no_auth: Option<bool>,
    /// The key file apps' environments are sealed under (default
    /// `<data_dir>/secrets.key`).
    pub secrets_key: Option<PathBuf>,
    /// GitHub Actions OIDC tokens as CI credentials (file only;
    /// `crate::auth::oidc`).
    pub oidc: Option<crate::auth::oidc::RawOidc>,
    /// Deployment followers (`slipway watch`, the HTTP events stream) one
    /// replica serves at once, in all (file only; default 256).
    pub max_followers: Option<usize>,
    /// Deployment followers one replica serves at once per caller (API
    /// token or operator; file only; default 16).
    pub max_followers_per_caller: Option<usize>,
}

/// `[backup]`: scheduled encrypted backups of the data dir.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackup {
    /// Directory the backups go to.
    pub dir: Option<PathBuf>,
    /// Time between two backups, e.g. "6h" (default "24h").
    pub every: Option<String>,
    /// Backups kept (default 7).
    pub keep: Option<usize>,
    /// The age public key (age1...) they are encrypted to.
    pub recipient: Option<String>,
}

/// Checked `[backup]` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupSchedule {
    /// Directory the backups go to.
    pub dir: PathBuf,
    /// Time between two backups.
    pub every: Duration,
    /// Backups kept.
    pub keep: usize,
    /// The age public key they are encrypted to (checked).
    pub recipient: String,
}

impl RawConfig {
    /// Reads and parses a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }
}

/// Checks a `database_url` setting (flag, environment or file).
pub fn database_url(text: &str) -> Result<PostgresUrl, ConfigError> {
    PostgresUrl::parse(text).map_err(|why| ConfigError::DatabaseUrl {
        value: format!("{:?}", crate::store::redact(text)),
        why,
    })
}

/// Checked settings for `serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// Where the CA, keys and (with SQLite) the database live.
    pub data_dir: PathBuf,
    /// The PostgreSQL store, when not SQLite in the data dir.
    pub database_url: Option<PostgresUrl>,
    /// The artifacts every replica shares, when not in the data dir (or,
    /// with PostgreSQL, the database).
    pub artifact_dir: Option<PathBuf>,
    /// Address for the gRPC listener (enrollment and agent links).
    pub listen: SocketAddr,
    /// Heartbeat policy and certificate lifetime for agent sessions.
    pub link: LinkSettings,
    /// Missed heartbeat intervals before a node is unreachable (and the
    /// grace period after start, in intervals).
    pub unreachable_after: u32,
    /// Extra names/addresses for the server certificate (see
    /// [`ServeConfig::certificate_hosts`]).
    pub server_names: Vec<String>,
    /// Where to write the bound address once serving (`--ready-file`).
    pub ready_file: Option<PathBuf>,
    /// Lifetime of the server certificate; renewed at two thirds of it.
    pub server_cert_validity: Duration,
    /// Scheduled backups, when `[backup]` is set.
    pub backup: Option<BackupSchedule>,
    /// The HTTP API and pages, when `http_listen` is set.
    pub http: Option<HttpSettings>,
    /// Where to write the HTTP listener's bound address (`--http-ready-file`).
    pub http_ready_file: Option<PathBuf>,
    /// The DigitalOcean fleet, when `[digitalocean]` is set.
    pub digitalocean: Option<crate::digitalocean::config::DoConfig>,
    /// OIDC tokens and their grants, when `[oidc]` is set.
    pub oidc: Option<crate::auth::oidc::OidcConfig>,
    /// GitHub deployments and webhooks, when `[github]` is set.
    pub github: Option<crate::github::GithubConfig>,
    /// The key file apps' environments are sealed under.
    pub secrets_key: PathBuf,
    /// How many deployment followers this replica serves at once.
    pub followers: crate::api::watch::FollowerLimits,
}

/// Checked HTTP listener settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpSettings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// False: HTTPS with the controller's server certificate. True: plain
    /// HTTP, which [`ServeConfig::new`] allows on loopback only.
    pub plain: bool,
    /// `/metrics` needs no token from a loopback caller.
    pub metrics_loopback_no_auth: bool,
}

/// Default lifetime of the controller's server certificate.
pub const DEFAULT_SERVER_CERT_VALIDITY: Duration = Duration::from_secs(365 * 24 * 60 * 60);
/// The shortest server (and node) certificate lifetime accepted (tests
/// use it).
const MIN_SERVER_CERT_VALIDITY: Duration = Duration::from_secs(30);

impl ServeConfig {
    /// Defaults for everything but where to keep data and listen (tests).
    pub fn with_defaults(data_dir: PathBuf, listen: SocketAddr) -> Self {
        Self {
            listen,
            link: LinkSettings::default(),
            unreachable_after: liveness::DEFAULT_UNREACHABLE_AFTER,
            server_names: Vec::new(),
            ready_file: None,
            server_cert_validity: DEFAULT_SERVER_CERT_VALIDITY,
            backup: None,
            digitalocean: None,
            oidc: None,
            github: None,
            http: None,
            http_ready_file: None,
            secrets_key: data_dir.join(crate::secrets::KEY_FILE),
            data_dir,
            database_url: None,
            artifact_dir: None,
            followers: crate::api::watch::FollowerLimits::default(),
        }
    }

    /// The names and addresses the server certificate must be valid for:
    /// `server_names`, then the listen address — or, when listening on
    /// every interface (`0.0.0.0` / `[::]`), each local interface address and
    /// the host name, since agents dial one of those. (`localhost` and
    /// 127.0.0.1 are added by [`crate::pki::ca::Ca::server_identity`].)
    pub fn certificate_hosts(&self) -> Vec<String> {
        let mut hosts = self.server_names.clone();
        let mut add = |host: String| {
            if !hosts.contains(&host) {
                hosts.push(host);
            }
        };
        let ip = self.listen.ip();
        if ip.is_unspecified() {
            for address in local_addresses() {
                if address.is_ipv4() || ip.is_ipv6() {
                    add(address.to_string());
                }
            }
            if let Ok(name) = nix::unistd::gethostname() {
                if let Some(name) = name.to_str().filter(|n| is_dns_name(n)) {
                    add(name.to_owned());
                }
            }
        } else {
            add(ip.to_string());
        }
        hosts
    }
}

/// The addresses of this machine's interfaces (empty if they cannot be
/// listed).
fn local_addresses() -> Vec<std::net::IpAddr> {
    let Ok(addresses) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for interface in addresses {
        let Some(address) = interface.address else {
            continue;
        };
        let ip = if let Some(v4) = address.as_sockaddr_in() {
            std::net::IpAddr::V4(v4.ip())
        } else if let Some(v6) = address.as_sockaddr_in6() {
            // Link-local addresses need a scope id; nobody dials them.
            let ip = v6.ip();
            if ip.segments()[0] & 0xffc0 == 0xfe80 {
                continue;
            }
            std::net::IpAddr::V6(ip)
        } else {
            continue;
        };
        if !found.contains(&ip) {
            found.push(ip);
        }
    }
    found
}

/// True if `name` is a usable DNS name for a certificate: dot-separated
/// labels of letters, digits and '-', not starting or ending with '-'.
fn is_dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// True if `name` can go into the server certificate: an IP address or a
/// DNS name (a leading `*.` wildcard is allowed).
/// Checks `[backup]`: a directory, a recipient that parses, `every` of at
/// least a minute and `keep` of at least 1.
fn backup_schedule(raw: RawBackup) -> Result<BackupSchedule, ConfigError> {
    let dir = raw.dir.ok_or(ConfigError::Invalid {
        key: "backup.dir",
        value: "(not set)".into(),
        why: "[backup] needs dir, e.g. dir = \"/var/backups/slipway\"",
    })?;
    if !dir.is_absolute() {
        return Err(ConfigError::Invalid {
            key: "backup.dir",
            value: dir.display().to_string(),
            why: "must be an absolute path",
        });
    }
    let recipient = raw.recipient.ok_or(ConfigError::Invalid {
        key: "backup.recipient",
        value: "(not set)".into(),
        why: "[backup] needs recipient = \"age1...\", the public key backups are encrypted to",
    })?;
    if crate::backup::parse_recipient(&recipient).is_err() {
        return Err(ConfigError::Invalid {
            key: "backup.recipient",
            value: recipient,
            why: "expected an age public key (age1...), from `age-keygen`; its identity stays off this machine",
        });
    }
    let every_text = raw.every.unwrap_or_else(|| "24h".to_owned());
    let every = slipway_proto::cli::parse_duration(&every_text)
        .filter(|d| *d >= Duration::from_secs(60))
        .ok_or(ConfigError::Invalid {
            key: "backup.every",
            value: every_text,
            why: "expected a duration of at least 1m, e.g. 6h or 24h",
        })?;
    let keep = raw.keep.unwrap_or(7);
    if keep == 0 {
        return Err(ConfigError::Invalid {
            key: "backup.keep",
            value: "0".into(),
            why: "must be at least 1",
        });
    }
    Ok(BackupSchedule {
        dir,
        every,
        keep,
        recipient,
    })
}

/// Checks `max_followers` and `max_followers_per_caller` (defaults for
/// those unset): each at least 1, the one per caller at most the total.
fn follower_limits(
    total: Option<usize>,
    per_caller: Option<usize>,
) -> Result<crate::api::watch::FollowerLimits, ConfigError> {
    let defaults = crate::api::watch::FollowerLimits::default();
    let total = total.unwrap_or(defaults.total);
    if total == 0 {
        return Err(ConfigError::Invalid {
            key: "max_followers",
            value: "0".to_owned(),
            why: "must be at least 1 (deployments could not be followed at all)",
        });
    }
    let per_caller = per_caller.unwrap_or(defaults.per_caller.min(total));
    if per_caller == 0 || per_caller > total {
        return Err(ConfigError::Invalid {
            key: "max_followers_per_caller",
            value: per_caller.to_string(),
            why: "must be at least 1 and at most max_followers",
        });
    }
    Ok(crate::api::watch::FollowerLimits { total, per_caller })
}

fn is_server_name(name: &str) -> bool {
    name.parse::<std::net::IpAddr>().is_ok() || is_dns_name(name.strip_prefix("*.").unwrap_or(name))
}

impl ServeConfig {
    /// The configuration of `serve`: its flags over the `--config` file.
    /// `database_url` is the global `--database-url` flag (or its
    /// environment variable), which wins over the file's.
    pub fn from_args(args: ServeArgs, database_url: Option<String>) -> Result<Self, ConfigError> {
        let file = args
            .config
            .as_deref()
            .map(RawConfig::from_file)
            .transpose()?;
        let flags = RawConfig {
            data_dir: args.data_dir,
            database_url,
            listen: args.listen,
            server_names: Some(args.server_names),
            server_cert_validity: args.server_cert_validity,
            node_cert_validity: args.node_cert_validity,
            http_listen: args.http_listen,
            http_plain: args.http_plain.then_some(true),
            metrics_loopback_no_auth: args.metrics_loopback_no_auth.then_some(true),
            secrets_key: args.secrets_key,
            artifact_dir: args.artifact_dir,
            ..RawConfig::default()
        };
        let mut config = Self::new(flags, file).map_err(|err| match (err, &args.config) {
            (ConfigError::Oidc(message), Some(path)) => {
                ConfigError::Oidc(format!("{}: {message}", path.display()))
            }
            (err, _) => err,
        })?;
        config.ready_file = args.ready_file;
        config.http_ready_file = args.http_ready_file;
        Ok(config)
    }

    /// Flags win over the file; `listen` defaults to [`DEFAULT_LISTEN`].
    pub fn new(flags: RawConfig, file: Option<RawConfig>) -> Result<Self, ConfigError> {
        let file = file.unwrap_or_default();
        let data_dir = flags
            .data_dir
            .or(file.data_dir)
            .ok_or(ConfigError::Missing("data-dir"))?;
        let listen = match flags.listen.or(file.listen) {
            Some(listen) => listen,
            None => DEFAULT_LISTEN
                .parse()
                .map_err(|_| ConfigError::Missing("listen"))?,
        };
        let mut config = Self::with_defaults(data_dir, listen);
        if let Some(text) = flags.database_url.or(file.database_url) {
            config.database_url = Some(database_url(&text)?);
        }
        if let Some(path) = flags.secrets_key.or(file.secrets_key) {
            config.secrets_key = path;
        }
        if let Some(path) = flags.artifact_dir.or(file.artifact_dir) {
            if path.as_os_str().is_empty() {
                return Err(ConfigError::Invalid {
                    key: "artifact_dir",
                    value: "\"\"".to_owned(),
                    why: "expected the path of a directory every replica mounts",
                });
            }
            config.artifact_dir = Some(path);
        }
        for name in file
            .server_names
            .unwrap_or_default()
            .into_iter()
            .chain(flags.server_names.unwrap_or_default())
        {
            if !is_server_name(&name) {
                return Err(ConfigError::Invalid {
                    key: "server_names",
                    value: name,
                    why: "expected a DNS name (e.g. ctl.example.com) or an IP address",
                });
            }
            if !config.server_names.contains(&name) {
                config.server_names.push(name);
            }
        }
        if let Some(rate) = flags.heartbeats_per_sec.or(file.heartbeats_per_sec) {
            if rate == 0 {
                return Err(ConfigError::Invalid {
                    key: "heartbeats_per_sec",
                    value: rate.to_string(),
                    why: "must be at least 1",
                });
            }
            config.link.heartbeat.target_rate = rate;
        }
        config.followers = follower_limits(
            flags.max_followers.or(file.max_followers),
            flags
                .max_followers_per_caller
                .or(file.max_followers_per_caller),
        )?;
        if let Some(after) = flags
            .unreachable_after_intervals
            .or(file.unreachable_after_intervals)
        {
            if after == 0 {
                return Err(ConfigError::Invalid {
                    key: "unreachable_after_intervals",
                    value: after.to_string(),
                    why: "must be at least 1",
                });
            }
            config.unreachable_after = after;
        }
        if let Some(text) = flags.server_cert_validity.or(file.server_cert_validity) {
            let validity = slipway_proto::cli::parse_duration(&text)
                .filter(|d| *d >= MIN_SERVER_CERT_VALIDITY)
                .ok_or(ConfigError::Invalid {
                    key: "server_cert_validity",
                    value: text,
                    why: "expected a duration of at least 30s, e.g. 90d or 365d",
                })?;
            config.server_cert_validity = validity;
        }
        if let Some(text) = flags.node_cert_validity.or(file.node_cert_validity) {
            let validity = slipway_proto::cli::parse_duration(&text)
                .filter(|d| *d >= MIN_SERVER_CERT_VALIDITY)
                .ok_or(ConfigError::Invalid {
                    key: "node_cert_validity",
                    value: text,
                    why: "expected a duration of at least 30s, e.g. 7d",
                })?;
            config.link.cert_validity = validity;
        }
        if let Some(raw) = file.backup {
            if let Some(url) = &config.database_url {
                return Err(ConfigError::DatabaseUrl {
                    value: format!("{:?}", url.to_string()),
                    why: "[backup] covers the SQLite store only: with PostgreSQL back up the \
                          database with pg_dump (and drop [backup])"
                        .to_owned(),
                });
            }
            config.backup = Some(backup_schedule(raw)?);
        }
        if let Some(raw) = file.digitalocean {
            config.digitalocean = Some(
                crate::digitalocean::config::DoConfig::new(raw)
                    .map_err(ConfigError::DigitalOcean)?,
            );
        }
        if let Some(raw) = file.oidc {
            config.oidc = Some(crate::auth::oidc::OidcConfig::new(raw).map_err(ConfigError::Oidc)?);
        }
        if let Some(raw) = file.github {
            config.github =
                Some(crate::github::GithubConfig::new(raw).map_err(ConfigError::Github)?);
        }
        let plain = flags.http_plain.or(file.http_plain).unwrap_or(false);
        match flags.http_listen.or(file.http_listen) {
            Some(listen) => {
                if plain && !listen.ip().is_loopback() {
                    return Err(ConfigError::Invalid {
                        key: "http_plain",
                        value: format!("true (http_listen = {listen})"),
                        why: "plain HTTP is allowed only on a loopback address (127.0.0.1, ::1); elsewhere the HTTP API is served over TLS",
                    });
                }
                config.http = Some(HttpSettings {
                    listen,
                    plain,
                    metrics_loopback_no_auth: flags
                        .metrics_loopback_no_auth
                        .or(file.metrics_loopback_no_auth)
                        .unwrap_or(false),
                });
            }
            None if plain => {
                return Err(ConfigError::Invalid {
                    key: "http_plain",
                    value: "true".into(),
                    why: "needs http_listen (--http-listen ADDR)",
                })
            }
            None if flags
                .metrics_loopback_no_auth
                .or(file.metrics_loopback_no_auth)
                .unwrap_or(false) =>
            {
                return Err(ConfigError::Invalid {
                    key: "metrics_loopback_no_auth",
                    value: "true".into(),
                    why: "needs http_listen (--http-listen ADDR): /metrics is served by the HTTP listener",
                })
            }
            None => {}
        }
        if let Some(github) = config.github.as_mut() {
            // log_url: the controller's pages, at the HTTP face's address
            // unless `public_url` says where people reach it.
            if github.public_url.is_none() {
                if let Some(http) = &config.http {
                    let host = config.server_names.first().cloned().unwrap_or_else(|| {
                        match http.listen.ip() {
                            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
                            ip => ip.to_string(),
                        }
                    });
                    let scheme = if http.plain { "http" } else { "https" };
                    github.public_url = Some(format!("{scheme}://{host}:{}", http.listen.port()));
                }
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.toml");
        std::fs::write(
            &path,
            "data_dir = \"/var/lib/slipway\"\nlisen = \"0.0.0.0:1\"\n",
        )
        .unwrap();
        let err = RawConfig::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("controller.toml"), "{err}");
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("lisen"), "{err}");
    }

    #[test]
    fn flags_override_file() {
        let file = RawConfig {
            data_dir: Some("/file".into()),
            listen: Some("127.0.0.1:1".parse().unwrap()),
            unreachable_after_intervals: Some(4),
            ..RawConfig::default()
        };
        let flags = RawConfig {
            data_dir: None,
            listen: Some("127.0.0.1:2".parse().unwrap()),
            ..RawConfig::default()
        };
        let config = ServeConfig::new(flags, Some(file)).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/file"));
        assert_eq!(config.listen.port(), 2);
        assert_eq!(config.unreachable_after, 4);
        assert_eq!(config.link.heartbeat.target_rate, 50);
        assert!(ServeConfig::new(RawConfig::default(), None).is_err());
    }

    #[test]
    fn follower_limits_default_and_are_checked() {
        let with = |total: Option<usize>, per_caller: Option<usize>| {
            let file = RawConfig {
                data_dir: Some("/d".into()),
                max_followers: total,
                max_followers_per_caller: per_caller,
                ..RawConfig::default()
            };
            ServeConfig::new(RawConfig::default(), Some(file))
        };
        let limits = |total, per_caller| crate::api::watch::FollowerLimits { total, per_caller };
        assert_eq!(with(None, None).unwrap().followers, limits(256, 16));
        assert_eq!(
            with(Some(1000), Some(50)).unwrap().followers,
            limits(1000, 50)
        );
        // A total under the default per caller lowers that with it.
        assert_eq!(with(Some(8), None).unwrap().followers, limits(8, 8));
        for (total, per_caller, key) in [
            (Some(0), None, "max_followers ="),
            (None, Some(0), "max_followers_per_caller"),
            (Some(4), Some(5), "max_followers_per_caller"),
        ] {
            let err = with(total, per_caller).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("controller.toml");
        std::fs::write(&path, "max_followers = 64\nmax_followers_per_caller = 4\n").unwrap();
        let file = RawConfig::from_file(&path).unwrap();
        assert_eq!(
            (file.max_followers, file.max_followers_per_caller),
            (Some(64), Some(4))
        );
    }

    #[test]
    fn server_names_are_checked_and_go_into_the_certificate_hosts() {
        let file = RawConfig {
            data_dir: Some("/d".into()),
            listen: Some("10.0.0.5:7443".parse().unwrap()),
            server_names: Some(vec!["ctl.example.com".to_owned()]),
            ..RawConfig::default()
        };
        let flags = RawConfig {
            server_names: Some(vec!["203.0.113.7".to_owned(), "ctl.example.com".to_owned()]),
            ..RawConfig::default()
        };
        let config = ServeConfig::new(flags, Some(file)).unwrap();
        assert_eq!(
            config.certificate_hosts(),
            ["ctl.example.com", "203.0.113.7", "10.0.0.5"]
        );
        for bad in [
            "",
            "a b",
            "-x.example",
            "ctl_1.example",
            "x..y",
            "http://ctl",
        ] {
            let flags = RawConfig {
                data_dir: Some("/d".into()),
                server_names: Some(vec![bad.to_owned()]),
                ..RawConfig::default()
            };
            let err = ServeConfig::new(flags, None).unwrap_err().to_string();
            assert!(err.contains("server_names"), "{bad}: {err}");
        }
    }

    #[test]
    fn listening_everywhere_covers_the_local_addresses() {
        let mut config = ServeConfig::with_defaults("/d".into(), "0.0.0.0:7443".parse().unwrap());
        config.server_names = vec!["ctl.example.com".to_owned()];
        let hosts = config.certificate_hosts();
        assert_eq!(hosts[0], "ctl.example.com");
        // Every machine has a loopback interface; the unspecified address
        // itself is never a name.
        assert!(hosts.iter().any(|h| h == "127.0.0.1"), "{hosts:?}");
        assert!(!hosts.iter().any(|h| h == "0.0.0.0"), "{hosts:?}");
        assert!(
            hosts.iter().all(|h| !h.contains(':')),
            "IPv4 listener: {hosts:?}"
        );
    }

    #[test]
    fn metrics_without_a_token_on_loopback_is_a_file_key_that_needs_http() {
        let parse = |text: &str| -> Result<ServeConfig, ConfigError> {
            let file: RawConfig = toml::from_str(text).unwrap();
            let flags = RawConfig {
                data_dir: Some("/d".into()),
                ..RawConfig::default()
            };
            ServeConfig::new(flags, Some(file))
        };
        let config =
            parse("http_listen = \"127.0.0.1:8443\"\nmetrics_loopback_no_auth = true\n").unwrap();
        assert!(config.http.is_some_and(|h| h.metrics_loopback_no_auth));
        let config = parse("http_listen = \"127.0.0.1:8443\"\n").unwrap();
        assert!(config.http.is_some_and(|h| !h.metrics_loopback_no_auth));
        let err = parse("metrics_loopback_no_auth = true\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("metrics_loopback_no_auth"), "{err}");
        assert!(err.contains("http_listen"), "{err}");
    }

    #[test]
    fn artifact_dir_comes_from_the_flag_or_the_file() {
        let parse = |flag: Option<&str>, file: &str| -> Result<ServeConfig, ConfigError> {
            ServeConfig::new(
                RawConfig {
                    data_dir: Some("/d".into()),
                    artifact_dir: flag.map(PathBuf::from),
                    ..RawConfig::default()
                },
                Some(toml::from_str(file).unwrap()),
            )
        };
        assert_eq!(parse(None, "").unwrap().artifact_dir, None);
        let file = "artifact_dir = \"/shared/file\"";
        assert_eq!(
            parse(None, file).unwrap().artifact_dir,
            Some(PathBuf::from("/shared/file"))
        );
        assert_eq!(
            parse(Some("/shared/flag"), file).unwrap().artifact_dir,
            Some(PathBuf::from("/shared/flag"))
        );
        let err = parse(None, "artifact_dir = \"\"").unwrap_err().to_string();
        assert!(err.contains("artifact_dir"), "{err}");
    }

    #[test]
    fn database_url_comes_from_the_flag_or_the_file_and_is_checked() {
        let parse = |flag: Option<&str>, file: &str| -> Result<ServeConfig, ConfigError> {
            ServeConfig::new(
                RawConfig {
                    data_dir: Some("/d".into()),
                    database_url: flag.map(str::to_owned),
                    ..RawConfig::default()
                },
                Some(toml::from_str(file).unwrap()),
            )
        };
        assert_eq!(parse(None, "").unwrap().database_url, None);
        let file = "database_url = \"postgres://u:pw@file/db\"";
        let from_file = parse(None, file).unwrap().database_url.unwrap();
        assert_eq!(from_file.to_string(), "postgres://u:***@file/db");
        let from_flag = parse(Some("postgresql://u:pw@flag/db"), file).unwrap();
        assert_eq!(
            from_flag.database_url.unwrap().to_string(),
            "postgresql://u:***@flag/db"
        );
        for (flag, file, want) in [
            (Some("mysql://u:pw@h/d"), "", "expected postgres://"),
            (None, "database_url = \"\"", "empty value"),
            (
                None,
                "database_url = \"postgres://u:pw@h/d\"\n[backup]\ndir = \"/b\"\n\
                 recipient = \"age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p\"",
                "pg_dump",
            ),
        ] {
            let err = parse(flag, file).unwrap_err().to_string();
            assert!(err.contains("database_url") && err.contains(want), "{err}");
            assert!(!err.contains("pw@"), "{err}");
        }
    }

    #[test]
    fn backup_schedule_is_checked() {
        let parse = |text: &str| -> Result<ServeConfig, ConfigError> {
            let file: RawConfig = toml::from_str(text).unwrap();
            ServeConfig::new(
                RawConfig {
                    data_dir: Some("/var/lib/slipway".into()),
                    ..RawConfig::default()
                },
                Some(file),
            )
        };
        let key = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8p";
        let ok = parse(&format!("[backup]\ndir = \"/b\"\nrecipient = \"{key}\"\n")).unwrap();
        let b = ok.backup.unwrap();
        assert_eq!((b.every, b.keep), (Duration::from_secs(86400), 7));
        for (text, want) in [
            (format!("[backup]\nrecipient = \"{key}\""), "backup.dir"),
            ("[backup]\ndir = \"/b\"".to_owned(), "backup.recipient"),
            (
                "[backup]\ndir = \"/b\"\nrecipient = \"age1x\"".to_owned(),
                "age public key",
            ),
            (
                format!("[backup]\ndir = \"b\"\nrecipient = \"{key}\""),
                "absolute",
            ),
            (
                format!("[backup]\ndir = \"/b\"\nrecipient = \"{key}\"\nevery = \"10s\""),
                "at least 1m",
            ),
            (
                format!("[backup]\ndir = \"/b\"\nrecipient = \"{key}\"\nkeep = 0"),
                "at least 1",
            ),
        ] {
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
        let err = parse("server_cert_validity = \"5s\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 30s"), "{err}");
        let err = parse("node_cert_validity = \"5s\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("node_cert_validity"), "{err}");
        assert_eq!(
            parse("node_cert_validity = \"2d\"")
                .unwrap()
                .link
                .cert_validity,
            Duration::from_secs(2 * 24 * 3600)
        );
    }
}
