//! The systemd notification protocol (`sd_notify(3)`), for `slipway-agent
//! run` and `slipway-controller serve` under a `Type=notify` unit:
//! `READY=1` once serving, `WATCHDOG=1` pings while `WatchdogSec=` is set,
//! `STOPPING=1` on shutdown and `STATUS=` lines for `systemctl status`.
//!
//! A datagram to the unix socket named by `NOTIFY_SOCKET` (a path, or an
//! abstract name written `@name`); with no `NOTIFY_SOCKET` (not under
//! systemd) every call does nothing. Std only: no dependency, no unsafe.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Where notifications go, taken once from the environment at start-up.
#[derive(Debug)]
pub struct Notifier {
    /// `None` when not started by systemd (or `NOTIFY_SOCKET` is unusable).
    target: Option<(UnixDatagram, SocketAddr)>,
    /// How often to ping: half of `WATCHDOG_USEC`, when the watchdog is on
    /// for this process.
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. An invalid
    /// value is logged to stderr and leaves that part off: a unit
    /// misconfiguration must not keep the service from starting.
    pub fn from_env() -> Self {
        let target = match std::env::var_os("NOTIFY_SOCKET") {
            None => None,
            Some(name) => match socket(&name.to_string_lossy()) {
                Ok(t) => Some(t),
                Err(e) => {
                    eprintln!(
                        "warning: NOTIFY_SOCKET={name:?} unusable, not notifying systemd: {e}"
                    );
                    None
                }
            },
        };
        let watchdog = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        Notifier { target, watchdog }
    }

    /// [`Notifier::from_env`], then removes the three variables from the
    /// environment so that processes started later (PM2, the apps, hooks)
    /// do not inherit them and speak for this service. Call it before any
    /// other thread starts (changing the environment is not thread-safe).
    pub fn take_from_env() -> Self {
        let n = Self::from_env();
        for var in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(var);
        }
        n
    }

    /// Notifies nobody (tests, or a service not under systemd).
    pub fn none() -> Self {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    /// True when a notify socket is set (started by systemd).
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// The interval for [`Notifier::watchdog`] pings, when the watchdog is on.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.target.as_ref().and(self.watchdog)
    }

    /// Sends newline-separated `KEY=value` assignments. Failures are
    /// returned for the caller to log; nothing is sent without a socket.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        match &self.target {
            Some((sock, addr)) => sock.send_to_addr(state.as_bytes(), addr).map(|_| ()),
            None => Ok(()),
        }
    }

    /// `READY=1` with a status line.
    pub fn ready(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)))
    }

    /// `STATUS=…`: one line for `systemctl status`.
    pub fn status(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("STATUS={}", one_line(status)))
    }

    /// `WATCHDOG=1`: still alive.
    pub fn watchdog(&self) -> io::Result<()> {
        self.notify("WATCHDOG=1")
    }

    /// `STOPPING=1` with a status line.
    pub fn stopping(&self, status: &str) -> io::Result<()> {
        self.notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)))
    }
}

/// A status text cannot carry a newline: it would start a new assignment.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// An unbound datagram socket and the address `NOTIFY_SOCKET` names.
fn socket(name: &str) -> io::Result<(UnixDatagram, SocketAddr)> {
    let addr = if let Some(abs) = name.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(abs.as_bytes())?
    } else if name.starts_with('/') {
        SocketAddr::from_pathname(name)?
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither an absolute path nor an @abstract name",
        ));
    };
    Ok((UnixDatagram::unbound()?, addr))
}

/// Half of `WATCHDOG_USEC` (systemd's advice), when it is set, positive and
/// meant for this process (`WATCHDOG_PID` unset or our pid).
fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != me {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watchdog_is_half_the_timeout_and_only_for_its_pid() {
        assert_eq!(
            watchdog_interval(Some("60000000"), None, 7),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            watchdog_interval(Some("2000000"), Some("7"), 7),
            Some(Duration::from_secs(1))
        );
        assert_eq!(watchdog_interval(Some("2000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval(None, Some("7"), 7), None);
    }

    #[test]
    fn sends_to_a_path_and_an_abstract_socket() {
        let dir = std::env::temp_dir().join(format!("slipway-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some(socket(path.to_str().unwrap()).unwrap()),
            watchdog: None,
        };
        n.ready("serving\non two lines").unwrap();
        let mut buf = [0u8; 256];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving on two lines");
        std::fs::remove_dir_all(&dir).unwrap();

        use std::os::linux::net::SocketAddrExt;
        let name = format!("slipway-notify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let n = Notifier {
            target: Some(socket(&format!("@{name}")).unwrap()),
            watchdog: None,
        };
        n.watchdog().unwrap();
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
        assert!(socket("relative/path").is_err());
    }
}
