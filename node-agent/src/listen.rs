//! An app's public address (`listen = "0.0.0.0:3000"` or a unix socket
//! path), parsed and checked once, and the listening socket made from it.
//!
//! The socket is bound by whoever holds it across deploys (the exec driver's
//! supervisor) and handed to each process of the app; it is never closed
//! between two releases, so a client never meets a refused connection.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Component, PathBuf};

/// Longest unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_UNIX_PATH: usize = 107;
/// Longest address text accepted at all.
const MAX_TEXT: usize = 256;

/// How the agent's proxy (`slipway-agent front`) forwards the public
/// address: `listen_mode` in the app's config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenMode {
    /// Bytes copied per connection: any TCP protocol; a connection stays on
    /// the backend it was opened to.
    #[default]
    Tcp,
    /// HTTP/1.1 terminated by the front: each request goes to the backend
    /// current when it arrives (keep-alive clients move at a request
    /// boundary), with `X-Forwarded-*` and `X-Request-Start` added.
    Http,
}

impl ListenMode {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "tcp" => Ok(Self::Tcp),
            "http" => Ok(Self::Http),
            other => Err(format!(
                "{other:?} is not a mode: give \"tcp\" (any TCP protocol, the default) or \"http\" (HTTP/1.1, each request to the current release)"
            )),
        }
    }
}

impl fmt::Display for ListenMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
        })
    }
}

/// Where an app is reached.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl ListenAddr {
    /// `"host:port"` (an IP address, `[::]:3000` for IPv6) or an absolute
    /// unix socket path.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("must not be empty: give \"0.0.0.0:3000\" or a unix socket path".into());
        }
        if text.len() > MAX_TEXT {
            return Err(format!("is {} bytes long; at most {MAX_TEXT}", text.len()));
        }
        if text.contains('\0') {
            return Err("must not contain a NUL byte".into());
        }
        if text.starts_with('/') {
            let path = PathBuf::from(text);
            if path.components().any(|c| c == Component::ParentDir) {
                return Err(format!("{text:?} must not contain `..`"));
            }
            if text.ends_with('/') {
                return Err(format!("{text:?} names a directory, not a socket file"));
            }
            if text.len() > MAX_UNIX_PATH {
                return Err(format!(
                    "{text:?} is {} bytes; a unix socket path holds at most {MAX_UNIX_PATH}",
                    text.len()
                ));
            }
            return Ok(Self::Unix(path));
        }
        let addr: SocketAddr = text.parse().map_err(|_| {
            format!(
                "{text:?} is not an address: give an IP and a port (\"0.0.0.0:3000\", \"[::]:3000\") or an absolute unix socket path"
            )
        })?;
        if addr.port() == 0 {
            return Err(format!(
                "{text:?} has port 0 (a new port on every bind); give a fixed port"
            ));
        }
        Ok(Self::Tcp(addr))
    }

    /// An IPv4 TCP address (what the front's kernel forwarding covers).
    pub fn is_tcp_v4(&self) -> bool {
        matches!(self, Self::Tcp(SocketAddr::V4(_)))
    }

    /// Creates the listening socket. A unix socket file left by an earlier
    /// holder is replaced; any other file at that path is an error.
    pub fn bind(&self) -> io::Result<OwnedFd> {
        match self {
            Self::Tcp(addr) => Ok(TcpListener::bind(addr)
                .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?
                .into()),
            Self::Unix(path) => {
                match std::fs::symlink_metadata(path) {
                    Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
                    Ok(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::AlreadyExists,
                            format!("{} exists and is not a socket", path.display()),
                        ))
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e),
                }
                Ok(UnixListener::bind(path)
                    .map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("cannot listen on {}: {e}", path.display()),
                        )
                    })?
                    .into())
            }
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp(a) => write!(f, "{a}"),
            Self::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked_with_reasons() {
        assert_eq!(
            ListenAddr::parse("0.0.0.0:3000").unwrap(),
            ListenAddr::Tcp("0.0.0.0:3000".parse().unwrap())
        );
        assert!(matches!(
            ListenAddr::parse("[::]:80"),
            Ok(ListenAddr::Tcp(_))
        ));
        assert_eq!(
            ListenAddr::parse("/run/web.sock").unwrap(),
            ListenAddr::Unix("/run/web.sock".into())
        );
        for (bad, why) in [
            ("", "empty"),
            ("3000", "not an address"),
            ("localhost:3000", "not an address"),
            ("127.0.0.1:0", "port 0"),
            ("127.0.0.1:70000", "not an address"),
            ("/run/../etc/x.sock", "`..`"),
            ("/run/dir/", "directory"),
            ("relative.sock", "not an address"),
        ] {
            let e = ListenAddr::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
        let long = format!("/{}", "a".repeat(120));
        assert!(ListenAddr::parse(&long)
            .unwrap_err()
            .contains("at most 107"));
    }

    #[test]
    fn unix_bind_replaces_a_stale_socket_but_not_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("a.sock");
        let addr = ListenAddr::Unix(sock.clone());
        drop(addr.bind().unwrap());
        // The file stays after close: a second bind replaces it.
        drop(addr.bind().unwrap());
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let e = ListenAddr::Unix(file).bind().unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
    }
}
