//! Health checks: one probe (HTTP, TCP or exec), the readiness gate a deploy
//! must pass, and the liveness record kept once it is live.
//!
//! Probes are plain blocking code with hard time limits: the gate runs inside
//! a deploy (which is synchronous) and the liveness loop runs them on a
//! blocking thread. HTTP is spoken by hand (HTTP/1.1, `Connection: close`):
//! a health endpoint on the node needs no TLS and no client library.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::config::{CheckConfig, HealthConfig};
use crate::durable;
use crate::proc;

/// Bytes of a response or command output kept for messages.
const OUTPUT_LIMIT: usize = 512;
/// Bytes of an HTTP response read at most (and of each output stream of an
/// exec check kept).
const RESPONSE_LIMIT: usize = 64 << 10;
/// An exec check that outlives its timeout gets SIGTERM, then SIGKILL this
/// much later: short, since the probe's time limit is what a gate counts on.
const EXEC_KILL_GRACE: Duration = Duration::from_millis(500);
/// Failure records kept in the liveness file.
const KEEP_FAILURES: usize = 20;

/// The result of one probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Probe {
    pub ok: bool,
    /// What was seen: `HTTP 500: body…`, `connection refused`, the command's
    /// output. Never environment values (the app decides what it prints).
    pub output: String,
    pub elapsed_ms: u64,
}

/// Where a check is run: the port the driver activated (for `{port}`) and the
/// release dir (for exec checks).
#[derive(Debug, Clone)]
pub struct ProbeTarget {
    pub port: Option<u16>,
    pub cwd: PathBuf,
}

fn substitute(text: &str, port: Option<u16>) -> Result<String, String> {
    if text.contains("{port}") {
        match port {
            Some(p) => Ok(text.replace("{port}", &p.to_string())),
            None => Err(format!(
                "{text:?} uses {{port}} but no port is known for this release"
            )),
        }
    } else {
        Ok(text.to_owned())
    }
}

/// Runs one probe with a time limit.
pub fn probe(check: &CheckConfig, timeout: Duration, target: &ProbeTarget) -> Probe {
    let start = Instant::now();
    let result = match check {
        CheckConfig::Http {
            url,
            status,
            body_contains,
        } => substitute(url, target.port)
            .and_then(|u| http(&u, *status, body_contains.as_deref(), timeout)),
        CheckConfig::Tcp { address } => {
            substitute(address, target.port).and_then(|a| tcp(&a, timeout))
        }
        CheckConfig::Exec { command } => {
            substitute(command, target.port).and_then(|c| exec(&c, &target.cwd, timeout))
        }
    };
    let (ok, output) = match result {
        Ok(out) => (true, out),
        Err(out) => (false, out),
    };
    Probe {
        ok,
        output: clip(&output),
        elapsed_ms: start.elapsed().as_millis() as u64,
    }
}

fn clip(s: &str) -> String {
    let s = s.trim();
    if s.len() <= OUTPUT_LIMIT {
        return s.to_owned();
    }
    let mut end = OUTPUT_LIMIT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn connect(address: &str, timeout: Duration) -> Result<TcpStream, String> {
    let addrs: Vec<_> = address
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {address}: {e}"))?
        .collect();
    let mut last = format!("{address} resolves to no address");
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = format!("connect to {a}: {e}"),
        }
    }
    Err(last)
}

fn tcp(address: &str, timeout: Duration) -> Result<String, String> {
    connect(address, timeout).map(|_| format!("connected to {address}"))
}

/// `http://host[:port]/path` split into (host:port, host, path).
fn split_url(url: &str) -> Result<(String, String, String), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?} is not an http:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{url:?} has no host"));
    }
    let address = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok((address, authority.to_owned(), path.to_owned()))
}

fn http(
    url: &str,
    status: (u16, u16),
    body_contains: Option<&str>,
    timeout: Duration,
) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    let (address, host, path) = split_url(url)?;
    let mut stream = connect(&address, timeout)?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    stream
        .set_write_timeout(Some(left()))
        .map_err(|e| e.to_string())?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: slipway-agent\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    );
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("send to {address}: {e}"))?;
    let mut response = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        if Instant::now() >= deadline {
            return Err(format!(
                "no complete response from {url} within {timeout:?}"
            ));
        }
        stream
            .set_read_timeout(Some(left()))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                response.extend_from_slice(&buf[..n]);
                if response.len() >= RESPONSE_LIMIT {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(format!(
                    "no complete response from {url} within {timeout:?}"
                ));
            }
            Err(e) => return Err(format!("read from {address}: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code: u16 = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{url} answered something that is not HTTP: {}", clip(head)))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    let summary = format!("HTTP {code}: {}", clip(&body));
    if code < status.0 || code > status.1 {
        return Err(format!(
            "{summary} (expected status {}-{})",
            status.0, status.1
        ));
    }
    if let Some(needle) = body_contains {
        if !body.contains(needle) {
            return Err(format!("{summary} (body lacks {needle:?})"));
        }
    }
    Ok(summary)
}

/// Decodes a chunked body (best effort: a truncated one yields what came).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size_line, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
            .unwrap_or(0);
        if size == 0 || after.len() < size {
            out.push_str(&after[..size.min(after.len())]);
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].strip_prefix("\r\n").unwrap_or(&after[size..]);
    }
    out
}

fn exec(command: &str, cwd: &Path, timeout: Duration) -> Result<String, String> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(command).current_dir(cwd);
    // A probe is one step: anything it leaves in the background is killed
    // when it exits, and the time limit covers reading its output.
    let policy = proc::Policy {
        timeout,
        kill_grace: EXEC_KILL_GRACE,
        after_exit: proc::AfterExit::KillGroup,
    };
    let output = proc::Output::Capture {
        limit: RESPONSE_LIMIT,
    };
    let done = proc::run(cmd, output, &policy).map_err(|e| format!("`{command}`: {e}"))?;
    let mut text = done.stdout.text();
    text.push_str(&done.stderr.text());
    match done.ending {
        proc::Ending::TimedOut => Err(format!(
            "`{command}` timed out after {timeout:?}: {}",
            clip(&text)
        )),
        proc::Ending::Exited(s) if s.success() => Ok(text),
        proc::Ending::Exited(s) => Err(format!("`{command}` exited with {s}: {}", clip(&text))),
    }
}

/// A gate that passed.
#[derive(Debug, Clone, Serialize)]
pub struct GatePassed {
    pub probes: u32,
    pub elapsed_ms: u64,
    pub last: Probe,
}

/// A gate that failed, with the last probe's output.
#[derive(Debug, Clone, Serialize, thiserror::Error)]
#[error("health gate failed after {probes} probes in {elapsed_ms} ms ({why}); last check: {}", last.output)]
pub struct GateFailed {
    pub probes: u32,
    pub elapsed_ms: u64,
    pub why: String,
    pub last: Probe,
}

/// The readiness gate: passes once the check succeeds `successes` times in a
/// row; fails when it has failed more than `retries` times in a row after the
/// start period, or when the deadline passes first.
pub fn gate(cfg: &HealthConfig, target: &ProbeTarget) -> Result<GatePassed, GateFailed> {
    let start = Instant::now();
    let (mut probes, mut passes, mut fails) = (0u32, 0u32, 0u32);
    loop {
        let p = probe(&cfg.check, cfg.timeout, target);
        probes += 1;
        tracing::debug!(ok = p.ok, output = %p.output, "health probe");
        let elapsed = start.elapsed();
        let ms = elapsed.as_millis() as u64;
        if p.ok {
            passes += 1;
            fails = 0;
            if passes >= cfg.successes {
                return Ok(GatePassed {
                    probes,
                    elapsed_ms: ms,
                    last: p,
                });
            }
        } else {
            passes = 0;
            if elapsed >= cfg.start_period {
                fails += 1;
                if fails > cfg.retries {
                    return Err(GateFailed {
                        probes,
                        elapsed_ms: ms,
                        why: format!(
                            "{fails} failures in a row after the {:?} start period",
                            cfg.start_period
                        ),
                        last: p,
                    });
                }
            }
        }
        if elapsed + cfg.interval > cfg.deadline {
            return Err(GateFailed {
                probes,
                elapsed_ms: ms,
                why: format!(
                    "not {} passes in a row within the {:?} deadline",
                    cfg.successes, cfg.deadline
                ),
                last: p,
            });
        }
        std::thread::sleep(cfg.interval);
    }
}

/// One recorded liveness failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub output: String,
}

/// The liveness state of one app, kept in `.slipway/health.json` by the
/// agent's liveness loop and shown by `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Liveness {
    pub release: Option<String>,
    pub healthy: Option<bool>,
    pub consecutive_failures: u32,
    pub probes: u64,
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub last_probe_at: Option<OffsetDateTime>,
    pub last_output: Option<String>,
    /// Newest last.
    pub failures: Vec<FailureRecord>,
}

impl Liveness {
    pub fn path(root: &Path) -> PathBuf {
        root.join(".slipway/health.json")
    }

    pub fn load(root: &Path) -> Option<Self> {
        durable::read_json(&Self::path(root))
    }

    pub fn save(&self, root: &Path) -> std::io::Result<()> {
        durable::write_json(&Self::path(root), self)
    }

    /// Folds one probe in: unhealthy after more than `retries` failures in a
    /// row, healthy again at the next pass.
    pub fn record(&mut self, release: Option<&str>, p: &Probe, retries: u32, at: OffsetDateTime) {
        if self.release.as_deref() != release {
            // A new release starts a new record.
            *self = Self {
                release: release.map(str::to_owned),
                ..Self::default()
            };
        }
        self.probes += 1;
        self.last_probe_at = Some(at);
        self.last_output = Some(p.output.clone());
        if p.ok {
            self.consecutive_failures = 0;
            self.healthy = Some(true);
        } else {
            self.consecutive_failures += 1;
            self.failures.push(FailureRecord {
                at,
                output: p.output.clone(),
            });
            if self.failures.len() > KEEP_FAILURES {
                self.failures.remove(0);
            }
            if self.consecutive_failures > retries {
                self.healthy = Some(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A tiny HTTP server answering `responses` in turn (then the last one).
    fn server(responses: Vec<&'static str>) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for (i, conn) in l.incoming().take(200).enumerate() {
                let Ok(mut c) = conn else { break };
                let mut buf = [0u8; 1024];
                let _ = c.read(&mut buf);
                let r = responses[i.min(responses.len() - 1)];
                let _ = c.write_all(r.as_bytes());
            }
        });
        port
    }

    fn cfg(check: CheckConfig) -> HealthConfig {
        HealthConfig {
            check,
            timeout: Duration::from_secs(1),
            interval: Duration::from_millis(20),
            successes: 3,
            retries: 2,
            start_period: Duration::from_millis(0),
            deadline: Duration::from_secs(5),
            liveness_interval: Duration::from_secs(1),
        }
    }

    fn here(port: Option<u16>) -> ProbeTarget {
        ProbeTarget {
            port,
            cwd: std::env::temp_dir(),
        }
    }

    const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
    const FAIL: &str = "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 10\r\n\r\ndb is down";

    #[test]
    fn http_status_range_and_body() {
        let port = server(vec![OK]);
        let check = |status, body: Option<&str>| CheckConfig::Http {
            url: "http://127.0.0.1:{port}/api/health".into(),
            status,
            body_contains: body.map(str::to_owned),
        };
        assert!(
            probe(
                &check((200, 299), Some("ok")),
                Duration::from_secs(1),
                &here(Some(port))
            )
            .ok
        );
        let p = probe(
            &check((200, 299), Some("ready")),
            Duration::from_secs(1),
            &here(Some(port)),
        );
        assert!(!p.ok && p.output.contains("lacks \"ready\""), "{p:?}");
        let p = probe(
            &check((204, 204), None),
            Duration::from_secs(1),
            &here(Some(port)),
        );
        assert!(
            !p.ok && p.output.contains("expected status 204-204"),
            "{p:?}"
        );
        let p = probe(
            &check((200, 299), None),
            Duration::from_secs(1),
            &here(None),
        );
        assert!(!p.ok && p.output.contains("no port"), "{p:?}");
    }

    #[test]
    fn chunked_bodies_are_decoded() {
        let port = server(vec![
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nrea\r\n2\r\ndy\r\n0\r\n\r\n",
        ]);
        let c = CheckConfig::Http {
            url: format!("http://localhost:{port}/"),
            status: (200, 200),
            body_contains: Some("ready".into()),
        };
        let p = probe(&c, Duration::from_secs(1), &here(None));
        assert!(p.ok, "{p:?}");
    }

    #[test]
    fn tcp_and_exec_checks() {
        let port = server(vec![OK]);
        let tcp = CheckConfig::Tcp {
            address: format!("127.0.0.1:{port}"),
        };
        assert!(probe(&tcp, Duration::from_secs(1), &here(None)).ok);
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dead = CheckConfig::Tcp {
            address: format!("127.0.0.1:{closed}"),
        };
        let p = probe(&dead, Duration::from_secs(1), &here(None));
        assert!(!p.ok && p.output.contains("refused"), "{p:?}");
        let ex = CheckConfig::Exec {
            command: "echo checking; exit 3".into(),
        };
        let p = probe(&ex, Duration::from_secs(1), &here(None));
        assert!(
            !p.ok && p.output.contains("exit status: 3") && p.output.contains("checking"),
            "{p:?}"
        );
        // A background process holding the output open does not hold the
        // probe: it is killed when the check exits.
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let lingering = CheckConfig::Exec {
            command: format!("sleep 300 & echo $! > {}; echo started", pid_file.display()),
        };
        let p = probe(&lingering, Duration::from_secs(5), &here(None));
        assert!(p.ok && p.output.contains("started"), "{p:?}");
        assert!(p.elapsed_ms < 4000, "{p:?}");
        let pid = crate::proc::testing::recorded_pid(&pid_file);
        assert!(
            crate::proc::testing::is_gone(pid),
            "background sleep {pid} still runs"
        );
        let slow = CheckConfig::Exec {
            command: "sleep 5".into(),
        };
        let t = Instant::now();
        let p = probe(&slow, Duration::from_millis(200), &here(None));
        assert!(!p.ok && p.output.contains("timed out"), "{p:?}");
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn exec_check_past_its_timeout_leaves_no_grandchild() {
        use crate::proc::testing::{forks_grandchild, is_gone, recorded_pid};
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        let check = CheckConfig::Exec {
            command: forks_grandchild(&pid_file),
        };
        let p = probe(&check, Duration::from_millis(300), &here(None));
        assert!(!p.ok && p.output.contains("timed out"), "{p:?}");
        let pid = recorded_pid(&pid_file);
        assert!(is_gone(pid), "grandchild {pid} survived the probe");
    }

    #[test]
    fn gate_needs_k_passes_in_a_row() {
        let port = server(vec![OK, FAIL, OK, OK, OK]);
        let c = cfg(CheckConfig::Http {
            url: format!("http://127.0.0.1:{port}/"),
            status: (200, 299),
            body_contains: None,
        });
        let passed = gate(&c, &here(None)).unwrap();
        assert_eq!(passed.probes, 5);
    }

    #[test]
    fn gate_fails_with_last_output() {
        let port = server(vec![FAIL]);
        let c = cfg(CheckConfig::Http {
            url: format!("http://127.0.0.1:{port}/api/health"),
            status: (200, 299),
            body_contains: None,
        });
        let err = gate(&c, &here(None)).unwrap_err();
        assert_eq!(
            err.probes, 3,
            "retries = 2 allows two failures, the third ends it"
        );
        assert!(err.to_string().contains("HTTP 500: db is down"), "{err}");
    }

    #[test]
    fn gate_respects_start_period_and_deadline() {
        let port = server(vec![FAIL]);
        let mut c = cfg(CheckConfig::Http {
            url: format!("http://127.0.0.1:{port}/"),
            status: (200, 299),
            body_contains: None,
        });
        c.start_period = Duration::from_millis(300);
        c.retries = 1000;
        c.deadline = Duration::from_millis(600);
        let t = Instant::now();
        let err = gate(&c, &here(None)).unwrap_err();
        assert!(err.why.contains("deadline"), "{err}");
        assert!(
            err.probes > 5,
            "kept probing through the start period: {err}"
        );
        assert!(t.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn liveness_record_turns_unhealthy_after_retries() {
        let mut l = Liveness::default();
        let now = OffsetDateTime::now_utc();
        let bad = Probe {
            ok: false,
            output: "HTTP 500".into(),
            elapsed_ms: 1,
        };
        let good = Probe {
            ok: true,
            output: "HTTP 200".into(),
            elapsed_ms: 1,
        };
        l.record(Some("v1"), &good, 1, now);
        assert_eq!(l.healthy, Some(true));
        l.record(Some("v1"), &bad, 1, now);
        assert_eq!(l.healthy, Some(true), "one failure is within retries");
        l.record(Some("v1"), &bad, 1, now);
        assert_eq!(l.healthy, Some(false));
        assert_eq!(l.failures.len(), 2);
        l.record(Some("v2"), &good, 1, now);
        assert_eq!((l.healthy, l.failures.len(), l.probes), (Some(true), 0, 1));
    }
}
