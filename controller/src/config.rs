//! `serve` configuration: command-line flags, optionally on top of a TOML
//! file with the same keys. Checked once into [`ServeConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

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
}

/// The TOML file: same keys as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Where the CA, keys and database live.
    pub data_dir: Option<PathBuf>,
    /// Address for the gRPC listener.
    pub listen: Option<SocketAddr>,
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
        Ok(Self { data_dir, listen })
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
        };
        let flags = RawConfig {
            data_dir: None,
            listen: Some("127.0.0.1:2".parse().unwrap()),
        };
        let config = ServeConfig::new(flags, Some(file)).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/file"));
        assert_eq!(config.listen.port(), 2);
        assert!(ServeConfig::new(RawConfig::default(), None).is_err());
    }
}
