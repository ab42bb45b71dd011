//! `serve` configuration: command-line flags, optionally on top of a TOML
//! file with the same keys. Checked once into [`ServeConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::liveness;
use crate::session::LinkSettings;

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
}

/// The TOML file: same keys as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Where the CA, keys and database live.
    pub data_dir: Option<PathBuf>,
    /// Address for the gRPC listener.
    pub listen: Option<SocketAddr>,
    /// Heartbeats per second aimed for across the fleet; the announced
    /// interval grows with the fleet to keep to it (default 50).
    pub heartbeats_per_sec: Option<u32>,
    /// Missed heartbeat intervals before a node is unreachable, also the
    /// grace period (in intervals) after a controller start (default 3).
    pub unreachable_after_intervals: Option<u32>,
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

/// Checked settings for `serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeConfig {
    /// Where the CA, keys and database live.
    pub data_dir: PathBuf,
    /// Address for the gRPC listener (enrollment and agent links).
    pub listen: SocketAddr,
    /// Heartbeat policy and certificate lifetime for agent sessions.
    pub link: LinkSettings,
    /// Missed heartbeat intervals before a node is unreachable (and the
    /// grace period after start, in intervals).
    pub unreachable_after: u32,
}

impl ServeConfig {
    /// Defaults for everything but where to keep data and listen (tests).
    pub fn with_defaults(data_dir: PathBuf, listen: SocketAddr) -> Self {
        Self {
            data_dir,
            listen,
            link: LinkSettings::default(),
            unreachable_after: liveness::DEFAULT_UNREACHABLE_AFTER,
        }
    }
}

impl ServeConfig {
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
}
