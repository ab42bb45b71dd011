//! A bounded HTTP load loop for zero-downtime tests and benches: threads that
//! open a new TCP connection per request, and threads that keep one
//! connection alive across requests. Every request must be answered within
//! [`ANSWER_WITHIN`]; what happens instead is counted by kind.
//!
//! A keep-alive connection the server closes while it is idle (EOF or a reset
//! before any byte of the answer, on a connection that already carried a
//! request) is retried once on a new connection, as every HTTP client does
//! for an idempotent request (RFC 9112, 9.3.1); those are counted apart, and
//! a failure of the retry counts like any other.
// Shared by the tests and a bench: not every user calls every item.
#![allow(dead_code, unreachable_pub)]

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Every request must be answered within this, or it counts as hung.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// One answered request: who asked, on which connection, and when.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The load thread, and whether it keeps its connection alive.
    pub thread: usize,
    pub keep_alive: bool,
    /// The thread's connection, numbered from 1 (a new one per request
    /// for the other threads).
    pub conn: u64,
    /// When the connection that carried the request was opened.
    pub conn_start: Instant,
    /// When the request was written.
    pub req_start: Instant,
    /// The first word of the body (the release).
    pub release: String,
}

/// What the load loop saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Requests answered with 200.
    pub ok: usize,
    /// The first word of each 200 body, in order per thread (the release).
    pub bodies: Vec<String>,
    /// Every answered request, in order per thread.
    pub answers: Vec<Answer>,
    /// No answer within [`ANSWER_WITHIN`] (connect, write or read).
    pub hung: Vec<String>,
    /// Connection reset, or closed before the whole answer.
    pub reset: Vec<String>,
    /// Connection refused.
    pub refused: Vec<String>,
    /// Anything else: a status other than 200, an unparsable answer.
    pub other: Vec<String>,
    /// Idle keep-alive connections the server closed, retried on a new one.
    pub idle_closed: usize,
}

impl LoadReport {
    pub fn failures(&self) -> usize {
        self.hung.len() + self.reset.len() + self.refused.len() + self.other.len()
    }

    fn merge(&mut self, o: LoadReport) {
        self.ok += o.ok;
        self.bodies.extend(o.bodies);
        self.answers.extend(o.answers);
        self.hung.extend(o.hung);
        self.reset.extend(o.reset);
        self.refused.extend(o.refused);
        self.other.extend(o.other);
        self.idle_closed += o.idle_closed;
    }

    /// One line: counts of each kind, then up to 5 examples of failures.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{} ok, {} hung, {} reset, {} refused, {} other, {} idle keep-alive closes retried",
            self.ok,
            self.hung.len(),
            self.reset.len(),
            self.refused.len(),
            self.other.len(),
            self.idle_closed
        );
        let examples: Vec<&String> = self
            .hung
            .iter()
            .chain(&self.reset)
            .chain(&self.refused)
            .chain(&self.other)
            .take(5)
            .collect();
        if !examples.is_empty() {
            s.push_str(&format!("; e.g. {examples:?}"));
        }
        s
    }
}

/// A running load loop; [`Load::stop`] ends it and returns the report.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<LoadReport>>,
}

impl Load {
    /// Starts `new_conns` threads making a new connection per `GET path`
    /// and `keep_alive` threads reusing theirs, against 127.0.0.1:`port`.
    /// Each thread ends by itself after `max_time` or `max_requests`.
    pub fn start(
        port: u16,
        path: &str,
        new_conns: usize,
        keep_alive: usize,
        max_time: Duration,
        max_requests: usize,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut threads = Vec::new();
        for i in 0..new_conns + keep_alive {
            let stop = Arc::clone(&stop);
            let path = path.to_owned();
            let ka = i >= new_conns;
            threads.push(thread::spawn(move || {
                run(i, addr, &path, ka, &stop, max_time, max_requests)
            }));
        }
        Self { stop, threads }
    }

    /// Stops every thread (each finishes the request it is in) and sums up.
    pub fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = LoadReport::default();
        for t in self.threads {
            match t.join() {
                Ok(r) => all.merge(r),
                Err(_) => all.other.push("a load thread panicked".into()),
            }
        }
        all
    }
}

fn run(
    thread: usize,
    addr: SocketAddr,
    path: &str,
    keep_alive: bool,
    stop: &AtomicBool,
    max_time: Duration,
    max_requests: usize,
) -> LoadReport {
    let start = Instant::now();
    let mut r = LoadReport::default();
    let mut conn: Option<TcpStream> = None;
    let mut conn_no = 0;
    let mut conn_start = start;
    for i in 0..max_requests {
        if stop.load(Ordering::SeqCst) || start.elapsed() > max_time {
            break;
        }
        let reused = conn.is_some();
        let mut req_start = Instant::now();
        if !reused {
            conn_no += 1;
            conn_start = req_start;
        }
        let mut outcome = request(&mut conn, addr, path, keep_alive);
        if reused && matches!(outcome, Err(Fail::ClosedBeforeAnswer(_))) {
            r.idle_closed += 1;
            conn = None;
            req_start = Instant::now();
            conn_no += 1;
            conn_start = req_start;
            outcome = request(&mut conn, addr, path, keep_alive);
        }
        let at = format!("{:.3}s", start.elapsed().as_secs_f64());
        match outcome {
            Ok(body) => {
                r.ok += 1;
                let release = body.split_whitespace().next().unwrap_or("").to_owned();
                r.bodies
                    .push(body.split(' ').next().unwrap_or("").to_owned());
                r.answers.push(Answer {
                    thread,
                    keep_alive,
                    conn: conn_no,
                    conn_start,
                    req_start,
                    release,
                });
            }
            Err(f) => {
                conn = None;
                match f {
                    Fail::Hung(e) => r.hung.push(format!("request {i} at {at}: {e}")),
                    Fail::ClosedBeforeAnswer(e) | Fail::Reset(e) => {
                        r.reset.push(format!("request {i} at {at}: {e}"))
                    }
                    Fail::Refused(e) => r.refused.push(format!("request {i} at {at}: {e}")),
                    Fail::Other(e) => r.other.push(format!("request {i} at {at}: {e}")),
                }
            }
        }
        thread::sleep(Duration::from_millis(2));
    }
    r
}

#[derive(Debug)]
enum Fail {
    Hung(String),
    /// Closed or reset before the first byte of the answer.
    ClosedBeforeAnswer(String),
    Reset(String),
    Refused(String),
    Other(String),
}

fn classify(e: &io::Error, got_bytes: bool) -> Fail {
    let text = e.to_string();
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            Fail::Hung(format!("no answer within {ANSWER_WITHIN:?} ({text})"))
        }
        io::ErrorKind::ConnectionRefused => Fail::Refused(text),
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof
            if !got_bytes =>
        {
            Fail::ClosedBeforeAnswer(text)
        }
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::UnexpectedEof => Fail::Reset(text),
        _ => Fail::Other(text),
    }
}

/// One `GET path`, on `conn` when it holds a live keep-alive connection, else
/// on a new one (kept in `conn` afterwards when `keep_alive` and the server
/// did not say close). Returns the body of a 200.
fn request(
    conn: &mut Option<TcpStream>,
    addr: SocketAddr,
    path: &str,
    keep_alive: bool,
) -> Result<String, Fail> {
    let deadline = Instant::now() + ANSWER_WITHIN;
    let mut s = match conn.take() {
        Some(s) => s,
        None => {
            let s = TcpStream::connect_timeout(&addr, ANSWER_WITHIN).map_err(|e| {
                match classify(&e, true) {
                    // A refused or reset connect is not an idle close.
                    Fail::ClosedBeforeAnswer(t) => Fail::Reset(t),
                    f => f,
                }
            })?;
            s.set_nodelay(true).ok();
            s
        }
    };
    let header = if keep_alive { "keep-alive" } else { "close" };
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: {header}\r\n\r\n");
    s.set_write_timeout(Some(ANSWER_WITHIN)).ok();
    s.write_all(req.as_bytes())
        .map_err(|e| classify(&e, false))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    // Read until the header end and the whole content-length body.
    let (head_len, body_len, close) = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Fail::Hung(format!(
                "no whole answer within {ANSWER_WITHIN:?}"
            )));
        }
        s.set_read_timeout(Some(left)).ok();
        let n = s
            .read(&mut chunk)
            .map_err(|e| classify(&e, !buf.is_empty()))?;
        if n == 0 {
            let e = io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("closed after {} bytes of the answer", buf.len()),
            );
            return Err(classify(&e, !buf.is_empty()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let status = head.split(' ').nth(1).unwrap_or("");
            if status != "200" {
                return Err(Fail::Other(format!(
                    "status line {:?}",
                    head.lines().next()
                )));
            }
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| Fail::Other("no content-length".into()))?;
            let close = head
                .lines()
                .any(|l| l.starts_with("connection:") && l.contains("close"));
            break (end + 4, len, close);
        }
    };
    while buf.len() < head_len + body_len {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Fail::Hung(format!(
                "body not whole within {ANSWER_WITHIN:?}"
            )));
        }
        s.set_read_timeout(Some(left)).ok();
        let n = s.read(&mut chunk).map_err(|e| classify(&e, true))?;
        if n == 0 {
            return Err(Fail::Reset("closed in the middle of the body".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_len..head_len + body_len]).into_owned();
    if keep_alive && !close {
        *conn = Some(s);
    } else {
        let _ = s.shutdown(Shutdown::Both);
    }
    Ok(body)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// When each release went live: the span of the step (a deploy, a restart)
/// that switched to it, in order. Checks that answers came from a release
/// live at the right moment.
#[derive(Debug, Default)]
pub struct Timeline {
    /// (release, step started, step ended).
    steps: Vec<(String, Instant, Instant)>,
}

impl Timeline {
    /// `release` serves from `since` on (the one deployed before the load).
    pub fn live(release: &str, since: Instant) -> Self {
        Self {
            steps: vec![(release.to_owned(), since, since)],
        }
    }

    /// A step that switched to `release` ran from `start` to `end`.
    pub fn step(&mut self, release: &str, start: Instant, end: Instant) {
        self.steps.push((release.to_owned(), start, end));
    }

    /// The releases that may answer something started at `t`: the one the
    /// last finished step switched to, and those of steps under way.
    fn allowed(&self, t: Instant) -> Vec<&str> {
        let mut out: Vec<&str> = self
            .steps
            .iter()
            .rev()
            .find(|s| s.2 <= t)
            .map(|s| s.0.as_str())
            .into_iter()
            .collect();
        out.extend(
            self.steps
                .iter()
                .filter(|s| s.1 <= t && t <= s.2)
                .map(|s| s.0.as_str()),
        );
        out
    }

    /// Answers from a release that was not live when their request
    /// (`by_request`, HTTP mode) or their connection (TCP mode) started.
    pub fn stale(&self, report: &LoadReport, by_request: bool) -> Vec<String> {
        let origin = self.steps.first().map(|s| s.1);
        report
            .answers
            .iter()
            .filter_map(|a| {
                let t = if by_request { a.req_start } else { a.conn_start };
                let ok = self.allowed(t);
                (!ok.contains(&a.release.as_str())).then(|| {
                    format!(
                        "{} answered a {} started at {:.3}s (thread {}, connection {}) when {ok:?} was live",
                        a.release,
                        if by_request { "request" } else { "connection" },
                        origin.map_or(0.0, |o| t.duration_since(o).as_secs_f64()),
                        a.thread,
                        a.conn
                    )
                })
            })
            .collect()
    }

    /// Switches that no keep-alive connection followed: for each step to
    /// another release, some keep-alive connection must have been answered
    /// by the release before it and then by the new one.
    pub fn not_followed(&self, report: &LoadReport) -> Vec<String> {
        // Per keep-alive connection: the releases that answered, in order.
        let mut per_conn: std::collections::BTreeMap<(usize, u64), Vec<&str>> =
            std::collections::BTreeMap::new();
        for a in report.answers.iter().filter(|a| a.keep_alive) {
            let seq = per_conn.entry((a.thread, a.conn)).or_default();
            if seq.last() != Some(&a.release.as_str()) {
                seq.push(&a.release);
            }
        }
        self.steps
            .windows(2)
            .filter(|w| w[0].0 != w[1].0)
            .filter(|w| {
                let (old, new) = (w[0].0.as_str(), w[1].0.as_str());
                !per_conn
                    .values()
                    .any(|seq| seq.windows(2).any(|p| p[0] == old && p[1] == new))
            })
            .map(|w| format!("{} -> {}", w[0].0, w[1].0))
            .collect()
    }
}
