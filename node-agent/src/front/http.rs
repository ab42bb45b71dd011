//! The front's HTTP mode (`listen_mode = "http"`): HTTP/1.1 is terminated
//! here and each request is forwarded to the backend that is current when
//! the request arrives, so a keep-alive client moves to a new release at
//! the next request boundary after a switch (TCP mode cannot: its bytes
//! stay on the connection's backend until one side closes).
//!
//! One task per client connection does everything — reads a request head
//! (parsed in place with `httparse`), writes the rewritten head and the
//! body to the backend, reads the answer's head and relays the answer —
//! the way an event-loop proxy does, with no second task, channel or
//! header map per request. Bodies are relayed as they come, never held
//! whole: framed by `Content-Length`, by chunked transfer coding (relayed
//! verbatim while its framing is checked, see [`ChunkScan`]) or, for an
//! answer, by the backend closing the connection.
//!
//! Per client connection the front keeps one keep-alive connection to the
//! backend it last used (HTTP/1.1 carries one request at a time, so no pool
//! is needed); a request for another backend than that one (a switch came)
//! opens a new one and the old one is dropped. A kept connection the
//! backend closed while idle is noticed before it is used again and
//! replaced. Draining counts requests in flight: a request is counted
//! against its backend from its start until the last byte of its answer
//! went out, which is what the deploy waits for before it stops the old
//! backend.
//!
//! Headers added: `X-Forwarded-For` (the client's address appended to one
//! the request carries), and, unless the request already has them (a
//! TLS-terminating load balancer in front knows better), `X-Forwarded-Proto:
//! http` and `X-Request-Start: t=<µs since the epoch>`. Hop-by-hop headers
//! (RFC 9110 7.6.1) and those a `Connection` header names are not forwarded
//! either way. `Expect: 100-continue` is answered by the front itself.
//! Upgrades (WebSockets, `h2c`) are refused with 501: such apps use TCP
//! mode.
//!
//! Limits: at most [`MAX_HEADERS`] headers and [`MAX_REQUEST_HEAD`] bytes of
//! request head (more is answered 431), [`MAX_RESPONSE_HEAD`] of answer head
//! (more is a 502); a request head must arrive within
//! [`HEADER_READ_TIMEOUT`] (slow-loris guard; an idle keep-alive connection
//! is closed after it too). A request whose length cannot be told for sure
//! (`Transfer-Encoding` not ending in `chunked`, with `Content-Length`, or
//! on HTTP/1.0; `Content-Length` values that disagree) is answered 400 and
//! its connection closed (RFC 9112 6.3: request smuggling).
//!
//! A backend that cannot be reached is tried once more after a re-read of
//! the target (a switch may be under way); then the client gets `502` with
//! a one-line body. A request without a body and of an idempotent method
//! (RFC 9110 9.2.2) whose kept connection closed before any byte of answer
//! came is sent again on a new connection.

use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt as _;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, Interest};
use tokio::net::TcpStream;

use super::{lock, reread_target, Held, Shared, Stream, CONNECT_TIMEOUT, RETRY_PAUSE};

/// A client must send a whole request head within this (slow-loris guard).
pub(super) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Headers a request or an answer may have.
pub(super) const MAX_HEADERS: usize = 100;
/// Bytes a request head may have (request line and headers).
pub(super) const MAX_REQUEST_HEAD: usize = 64 * 1024;
/// Bytes an answer head may have.
pub(super) const MAX_RESPONSE_HEAD: usize = 256 * 1024;
/// Bytes of a chunk's size line (extensions included) or of the trailer
/// section.
const MAX_CHUNK_LINE: usize = 4096;
const MAX_TRAILERS: usize = 64 * 1024;
/// The 502 texts of a backend that failed a request.
const CLOSED_WITHOUT_ANSWER: &str =
    "bad gateway: the app closed the connection without an answer\n";
const NOT_REACHABLE: &str = "bad gateway: the app's backend is not reachable\n";
/// Read buffers grow by this much at a time.
const READ_CHUNK: usize = 16 * 1024;
/// Relayed bytes are written out once this many are gathered.
const WRITE_AT: usize = 64 * 1024;

/// Headers never forwarded (RFC 9110 7.6.1), besides those a `Connection`
/// header names. `Transfer-Encoding` is handled with the framing.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    /// No body.
    Empty,
    /// `Content-Length`.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the sender closes (answers only).
    Close,
}

/// A client's request head, parsed and rewritten for the backend.
struct RequestHead {
    /// The head as it goes to the backend.
    bytes: Vec<u8>,
    body: Framing,
    /// The client asked to close after this request (or is HTTP/1.0
    /// without keep-alive).
    close: bool,
    http10: bool,
    is_head: bool,
    /// Safe to send again if the kept connection closed before an answer.
    idempotent: bool,
    expect_continue: bool,
}

/// A refusal of a request before any backend is involved.
struct Refusal {
    status: &'static str,
    text: &'static str,
}

const BAD_REQUEST: Refusal = Refusal {
    status: "400 Bad Request",
    text: "bad request\n",
};

/// What the backend answered, rewritten for the client.
struct ResponseHead {
    /// The head as it goes to the client.
    bytes: Vec<u8>,
    body: Framing,
    /// The backend connection can carry another request after this one.
    reusable: bool,
    /// The client connection must close after this answer.
    close_client: bool,
    /// Chunks are decoded for an HTTP/1.0 client (that knows none).
    dechunk: bool,
    /// An interim answer (1xx): another head follows.
    interim: bool,
}

/// The kept connection to a backend, per client connection.
struct Kept {
    backend: SocketAddr,
    stream: TcpStream,
    /// Bytes read from it and not used yet.
    buf: Vec<u8>,
}

/// Serves HTTP/1.1 on one client connection until it closes.
pub(super) async fn serve(
    mut inbound: Box<dyn Stream>,
    peer: Option<IpAddr>,
    routes: Shared,
    changed: Arc<tokio::sync::Notify>,
    target_path: PathBuf,
) {
    let mut conn = Conn {
        peer,
        routes,
        changed,
        target_path,
        kept: None,
        buf: Vec::with_capacity(READ_CHUNK),
        out: Vec::with_capacity(READ_CHUNK),
    };
    loop {
        match conn.one(&mut inbound).await {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                // A client gone mid-request, a broken backend: nothing to do
                // but note it.
                tracing::debug!(error = %e, "client connection ended with an error");
                break;
            }
        }
    }
    let _ = inbound.shutdown().await;
}

/// A client connection's state between requests.
struct Conn {
    peer: Option<IpAddr>,
    routes: Shared,
    changed: Arc<tokio::sync::Notify>,
    target_path: PathBuf,
    kept: Option<Kept>,
    /// Bytes read from the client and not used yet (pipelined requests).
    buf: Vec<u8>,
    /// What goes out next (reused between requests).
    out: Vec<u8>,
}

impl Conn {
    /// Serves one request; false when the connection is to close.
    async fn one(&mut self, client: &mut Box<dyn Stream>) -> io::Result<bool> {
        let head = match tokio::time::timeout(HEADER_READ_TIMEOUT, self.read_request(client)).await
        {
            Err(_) => {
                if !self.buf.is_empty() {
                    let _ = refuse(
                        client,
                        "408 Request Timeout",
                        "the request head took too long\n",
                    )
                    .await;
                }
                return Ok(false);
            }
            Ok(Ok(Some(Ok(head)))) => head,
            Ok(Ok(Some(Err(refusal)))) => {
                refuse(client, refusal.status, refusal.text).await?;
                return Ok(false);
            }
            Ok(Ok(None)) => return Ok(false),
            Ok(Err(e)) => return Err(e),
        };
        if head.expect_continue && head.body != Framing::Empty {
            let line: &[u8] = if head.http10 {
                b"HTTP/1.0 100 Continue\r\n\r\n"
            } else {
                b"HTTP/1.1 100 Continue\r\n\r\n"
            };
            client.write_all(line).await?;
        }
        self.forward(client, head).await
    }

    /// Reads and parses the next request head; `None` when the client
    /// closed between requests.
    async fn read_request(
        &mut self,
        client: &mut Box<dyn Stream>,
    ) -> io::Result<Option<Result<RequestHead, Refusal>>> {
        loop {
            if !self.buf.is_empty() {
                match parse_request(&self.buf, self.peer, now_us()) {
                    Parsed::Done(n, head) => {
                        self.buf.drain(..n);
                        return Ok(Some(head));
                    }
                    Parsed::Refused(r) => return Ok(Some(Err(r))),
                    Parsed::Partial if self.buf.len() >= MAX_REQUEST_HEAD => {
                        return Ok(Some(Err(Refusal {
                            status: "431 Request Header Fields Too Large",
                            text: "the request head is too large\n",
                        })));
                    }
                    Parsed::Partial => {}
                }
            }
            if fill(client, &mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Sends `head` (and its body) to the current backend and relays the
    /// answer; false when the client connection is to close.
    async fn forward(
        &mut self,
        client: &mut Box<dyn Stream>,
        head: RequestHead,
    ) -> io::Result<bool> {
        for attempt in 0..2 {
            if attempt == 1 {
                // Refused or unreachable: a switch may have been written but
                // not yet signalled; read the target again and retry once.
                tokio::time::sleep(RETRY_PAUSE).await;
                reread_target(&self.routes, &self.changed, &self.target_path).await;
            }
            let Some(backend) = lock(&self.routes).target.as_ref().map(|t| t.backend) else {
                return self
                    .bad_gateway(client, &head, "bad gateway: no release is live yet\n")
                    .await;
            };
            let held = Held::new(&self.routes, &self.changed, backend);
            let (mut kept, reused) = match self.take_kept(backend) {
                Some(k) => (k, true),
                None => match connect(backend).await {
                    Ok(k) => (k, false),
                    Err(e) => {
                        tracing::warn!(%backend, error = %e, "cannot reach the backend");
                        continue;
                    }
                },
            };
            // The request: head, then the body as it comes.
            self.out.clear();
            self.out.extend_from_slice(&head.bytes);
            let sent = match head.body {
                Framing::Empty => kept.stream.write_all(&self.out).await.map_err(Relay::Write),
                body => {
                    relay(
                        client,
                        &mut self.buf,
                        &mut kept.stream,
                        body,
                        &mut self.out,
                        false,
                    )
                    .await
                }
            };
            let retry_ok = reused && head.body == Framing::Empty && head.idempotent;
            match sent {
                Ok(()) => return self.answer(client, &head, kept, held, retry_ok).await,
                Err(Relay::Write(e)) if retry_ok => {
                    tracing::debug!(%backend, error = %e, "kept backend connection closed; sending again");
                    drop(held);
                    return Box::pin(self.forward_fresh(client, head, backend)).await;
                }
                Err(Relay::Read(e)) => return Err(e),
                Err(Relay::Bad(why)) => {
                    tracing::debug!(why, "malformed request body");
                    return Ok(false);
                }
                Err(Relay::Write(e) | Relay::Truncated(e)) => {
                    tracing::warn!(%backend, error = %e, "the backend failed a request");
                    return self.bad_gateway(client, &head, CLOSED_WITHOUT_ANSWER).await;
                }
            }
        }
        self.bad_gateway(client, &head, NOT_REACHABLE).await
    }

    /// [`Conn::forward`] once more on a new connection to `backend`, after
    /// the kept one turned out closed.
    async fn forward_fresh(
        &mut self,
        client: &mut Box<dyn Stream>,
        head: RequestHead,
        backend: SocketAddr,
    ) -> io::Result<bool> {
        let held = Held::new(&self.routes, &self.changed, backend);
        let mut kept = match connect(backend).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(%backend, error = %e, "cannot reach the backend");
                drop(held);
                return self.bad_gateway(client, &head, NOT_REACHABLE).await;
            }
        };
        if let Err(e) = kept.stream.write_all(&head.bytes).await {
            tracing::warn!(%backend, error = %e, "the backend failed a request");
            return self.bad_gateway(client, &head, CLOSED_WITHOUT_ANSWER).await;
        }
        self.answer(client, &head, kept, held, false).await
    }

    /// Reads the backend's answer to `head` and relays it to the client.
    async fn answer(
        &mut self,
        client: &mut Box<dyn Stream>,
        head: &RequestHead,
        mut kept: Kept,
        held: Held,
        retry_ok: bool,
    ) -> io::Result<bool> {
        let backend = kept.backend;
        loop {
            let resp = match read_response(&mut kept, head).await {
                Ok(r) => r,
                Err(ReadResponse::ClosedBeforeAnswer) if retry_ok => {
                    tracing::debug!(%backend, "kept backend connection closed; sending again");
                    drop(held);
                    return Box::pin(self.forward_fresh(client, clone_head(head), backend)).await;
                }
                Err(ReadResponse::ClosedBeforeAnswer) => {
                    tracing::warn!(%backend, "the backend closed the connection without an answer");
                    return self.bad_gateway(client, head, CLOSED_WITHOUT_ANSWER).await;
                }
                Err(ReadResponse::Bad(why)) => {
                    tracing::warn!(%backend, why, "the backend's answer is malformed");
                    return self
                        .bad_gateway(client, head, "bad gateway: the app's answer is malformed\n")
                        .await;
                }
                Err(ReadResponse::Io(e)) => {
                    tracing::warn!(%backend, error = %e, "the backend failed a request");
                    return self.bad_gateway(client, head, CLOSED_WITHOUT_ANSWER).await;
                }
            };
            self.out.clear();
            self.out.extend_from_slice(&resp.bytes);
            if resp.interim {
                if !head.http10 {
                    client.write_all(&self.out).await?;
                }
                continue;
            }
            let relayed = relay(
                &mut kept.stream,
                &mut kept.buf,
                client,
                resp.body,
                &mut self.out,
                resp.dechunk,
            )
            .await;
            // The answer is out (or broken): no longer in flight.
            drop(held);
            match relayed {
                Ok(()) => {}
                Err(Relay::Write(e)) => return Err(e),
                Err(Relay::Read(e) | Relay::Truncated(e)) => {
                    tracing::warn!(%backend, error = %e, "the backend broke off an answer");
                    return Ok(false);
                }
                Err(Relay::Bad(why)) => {
                    tracing::warn!(%backend, why, "the backend's answer body is malformed");
                    return Ok(false);
                }
            }
            if resp.reusable && kept.buf.is_empty() {
                self.kept = Some(kept);
            }
            return Ok(!(resp.close_client || head.close));
        }
    }

    /// The kept connection when it leads to `backend` and is still open
    /// (the backend may have closed it while it was idle).
    fn take_kept(&mut self, backend: SocketAddr) -> Option<Kept> {
        let k = self.kept.take().filter(|k| k.backend == backend)?;
        // Readiness the runtime already knows of costs no system call; only
        // when the connection looks readable is it read to tell.
        let ready = k.stream.ready(Interest::READABLE).now_or_never();
        match ready {
            None => Some(k),
            Some(Ok(r)) if !r.is_readable() && !r.is_read_closed() => Some(k),
            Some(_) => {
                let mut probe = [0u8; 1];
                match k.stream.try_read(&mut probe) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Some(k),
                    // Closed, or bytes nobody asked for: not to be used.
                    _ => None,
                }
            }
        }
    }

    /// [`Conn::short`] with a `502 Bad Gateway`.
    async fn bad_gateway(
        &mut self,
        client: &mut Box<dyn Stream>,
        head: &RequestHead,
        text: &str,
    ) -> io::Result<bool> {
        self.short(client, head, "502 Bad Gateway", text).await
    }

    /// Answers the client with a short text of the front's own; false when
    /// the connection is to close.
    async fn short(
        &mut self,
        client: &mut Box<dyn Stream>,
        head: &RequestHead,
        status: &str,
        text: &str,
    ) -> io::Result<bool> {
        // A body not read cannot be skipped reliably: close after.
        let close = head.close || head.body != Framing::Empty;
        self.out.clear();
        short_answer(&mut self.out, head.http10, status, text, close);
        client.write_all(&self.out).await?;
        Ok(!close)
    }
}

/// A request head copy for sending again.
fn clone_head(h: &RequestHead) -> RequestHead {
    RequestHead {
        bytes: h.bytes.clone(),
        body: h.body,
        close: h.close,
        http10: h.http10,
        is_head: h.is_head,
        idempotent: h.idempotent,
        expect_continue: h.expect_continue,
    }
}

async fn connect(backend: SocketAddr) -> io::Result<Kept> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    let _ = stream.set_nodelay(true);
    Ok(Kept {
        backend,
        stream,
        buf: Vec::with_capacity(READ_CHUNK),
    })
}

/// Reads more into `buf`; 0 at the end of the stream.
async fn fill<R: AsyncRead + Unpin + ?Sized>(from: &mut R, buf: &mut Vec<u8>) -> io::Result<usize> {
    if buf.capacity() - buf.len() < READ_CHUNK / 2 {
        buf.reserve(READ_CHUNK);
    }
    from.read_buf(buf).await
}

fn now_us() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros())
}

fn short_answer(out: &mut Vec<u8>, http10: bool, status: &str, text: &str, close: bool) {
    let version = if http10 { "HTTP/1.0" } else { "HTTP/1.1" };
    let _ = write!(
        Buf(out),
        "{version} {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\n{}\r\n{text}",
        text.len(),
        if close {
            "connection: close\r\n"
        } else if http10 {
            "connection: keep-alive\r\n"
        } else {
            ""
        },
    );
}

/// Refuses a request that was never forwarded; the connection closes after.
async fn refuse(client: &mut Box<dyn Stream>, status: &str, text: &str) -> io::Result<()> {
    let mut out = Vec::with_capacity(160);
    short_answer(&mut out, false, status, text, true);
    client.write_all(&out).await
}

/// `fmt::Write` into a byte buffer.
struct Buf<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for Buf<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// The outcome of parsing what a client sent so far.
enum Parsed {
    /// A whole head of so many bytes.
    Done(usize, Result<RequestHead, Refusal>),
    Refused(Refusal),
    Partial,
}

fn eq(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

/// The comma-separated tokens of header values, trimmed.
fn tokens<'a>(values: impl Iterator<Item = &'a [u8]> + 'a) -> impl Iterator<Item = &'a [u8]> + 'a {
    values
        .flat_map(|v| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// The one length all `Content-Length` values say (`Err` if they disagree
/// or one is not a number), `None` without any.
fn content_length<'a>(values: impl Iterator<Item = &'a [u8]> + 'a) -> Result<Option<u64>, ()> {
    let mut found = None;
    for v in tokens(values) {
        if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
            return Err(());
        }
        let n = std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or(())?;
        if found.is_some_and(|f| f != n) {
            return Err(());
        }
        found = Some(n);
    }
    Ok(found)
}

/// Whether the `Transfer-Encoding` values end in `chunked` (`None` without
/// any).
fn chunked_last<'a>(values: impl Iterator<Item = &'a [u8]> + 'a) -> Option<bool> {
    let mut last = None;
    for t in tokens(values) {
        last = Some(eq(t, "chunked"));
    }
    last
}

/// Parses a request head in `buf` and writes the head the backend gets.
fn parse_request(buf: &[u8], peer: Option<IpAddr>, now_us: u128) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let n = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(httparse::Error::TooManyHeaders) => {
            return Parsed::Refused(Refusal {
                status: "431 Request Header Fields Too Large",
                text: "the request has too many headers\n",
            })
        }
        Err(_) => return Parsed::Refused(BAD_REQUEST),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parsed::Refused(BAD_REQUEST);
    };
    Parsed::Done(
        n,
        rewrite_request(method, target, version, req.headers, peer, now_us),
    )
}

/// The head the backend gets for a parsed request, or why it is refused.
fn rewrite_request(
    method: &str,
    target: &str,
    version: u8,
    headers: &[httparse::Header<'_>],
    peer: Option<IpAddr>,
    now_us: u128,
) -> Result<RequestHead, Refusal> {
    let http10 = version == 0;
    let named = || {
        headers
            .iter()
            .filter(|h| eq(h.name.as_bytes(), "connection"))
            .map(|h| h.value)
    };
    let conn_tokens: Vec<&[u8]> = tokens(named()).collect();
    let has = |name: &str| headers.iter().any(|h| eq(h.name.as_bytes(), name));
    let values = |name: &'static str| {
        headers
            .iter()
            .filter(move |h| eq(h.name.as_bytes(), name))
            .map(|h| h.value)
    };
    if has("upgrade") {
        return Err(Refusal {
            status: "501 Not Implemented",
            text:
                "upgrades (WebSocket, h2c) are not proxied in listen_mode = \"http\"; use \"tcp\"\n",
        });
    }
    let length = content_length(values("content-length")).map_err(|()| BAD_REQUEST)?;
    let body = match chunked_last(values("transfer-encoding")) {
        // RFC 9112 6.1 and 6.3: no length to trust; a smuggling attempt
        // or a broken client either way.
        Some(_) if http10 || length.is_some() => return Err(BAD_REQUEST),
        Some(false) => return Err(BAD_REQUEST),
        Some(true) => Framing::Chunked,
        None => match length {
            None | Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
        },
    };
    let close = if http10 {
        !conn_tokens.iter().any(|t| eq(t, "keep-alive"))
    } else {
        conn_tokens.iter().any(|t| eq(t, "close"))
    };
    let expect_continue = values("expect").any(|v| eq(v.trim_ascii(), "100-continue"));

    let mut out = Vec::with_capacity(256 + headers.len() * 48);
    out.extend_from_slice(method.as_bytes());
    out.push(b' ');
    let mut host_from_target = None;
    if target.starts_with('/') || target == "*" {
        out.extend_from_slice(target.as_bytes());
    } else {
        // Absolute form (a client that takes the front for a proxy): the
        // backend gets the path; Host says the authority.
        let Ok(uri) = target.parse::<http::Uri>() else {
            return Err(BAD_REQUEST);
        };
        if uri.scheme().is_none() {
            // Authority form is CONNECT's, not proxied.
            return Err(BAD_REQUEST);
        }
        out.extend_from_slice(uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
        host_from_target = uri.authority().map(|a| a.as_str().to_owned());
    }
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut forwarded_for = String::new();
    let (mut has_proto, mut has_start, mut has_host) = (false, false, false);
    for h in headers {
        let name = h.name.as_bytes();
        if HOP_BY_HOP.iter().any(|n| eq(name, n))
            || conn_tokens
                .iter()
                .any(|t| eq(name, std::str::from_utf8(t).unwrap_or("")))
            || (eq(name, "expect") && expect_continue)
            || (eq(name, "content-length") && body == Framing::Empty && length.is_none())
        {
            continue;
        }
        if eq(name, "x-forwarded-for") {
            // Every line of the header is one list (RFC 9110 5.3): folded
            // into one value, the client's address last.
            let v = String::from_utf8_lossy(h.value);
            let v = v.trim();
            if !v.is_empty() {
                forwarded_for.push_str(v);
                forwarded_for.push_str(", ");
            }
            continue;
        }
        has_proto |= eq(name, "x-forwarded-proto");
        has_start |= eq(name, "x-request-start");
        has_host |= eq(name, "host");
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if let (Some(host), false) = (&host_from_target, has_host) {
        let _ = write!(Buf(&mut out), "host: {host}\r\n");
    }
    if let Some(ip) = peer {
        let _ = write!(Buf(&mut out), "x-forwarded-for: {forwarded_for}{ip}\r\n");
    } else if !forwarded_for.is_empty() {
        let _ = write!(
            Buf(&mut out),
            "x-forwarded-for: {}\r\n",
            forwarded_for.trim_end_matches(", ")
        );
    }
    if !has_proto {
        out.extend_from_slice(b"x-forwarded-proto: http\r\n");
    }
    if !has_start {
        let _ = write!(Buf(&mut out), "x-request-start: t={now_us}\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Ok(RequestHead {
        bytes: out,
        body,
        close,
        http10,
        is_head: method == "HEAD",
        idempotent: matches!(
            method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        ),
        expect_continue,
    })
}

/// Why no answer head came from the backend.
enum ReadResponse {
    /// The connection closed before any byte of an answer.
    ClosedBeforeAnswer,
    Bad(&'static str),
    Io(io::Error),
}

/// Reads the answer head to `req` from the backend and rewrites it for the
/// client.
async fn read_response(kept: &mut Kept, req: &RequestHead) -> Result<ResponseHead, ReadResponse> {
    loop {
        if !kept.buf.is_empty() {
            match parse_response(&kept.buf, req) {
                Ok(Some((n, head))) => {
                    kept.buf.drain(..n);
                    return Ok(head);
                }
                Ok(None) if kept.buf.len() >= MAX_RESPONSE_HEAD => {
                    return Err(ReadResponse::Bad("answer head too large"))
                }
                Ok(None) => {}
                Err(why) => return Err(ReadResponse::Bad(why)),
            }
        }
        match fill(&mut kept.stream, &mut kept.buf).await {
            Ok(0) if kept.buf.is_empty() => return Err(ReadResponse::ClosedBeforeAnswer),
            Ok(0) => {
                return Err(ReadResponse::Bad(
                    "connection closed within the answer head",
                ))
            }
            Ok(_) => {}
            Err(e) if kept.buf.is_empty() && e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(ReadResponse::ClosedBeforeAnswer)
            }
            Err(e) => return Err(ReadResponse::Io(e)),
        }
    }
}

/// Parses an answer head; `None` until it is whole.
fn parse_response(
    buf: &[u8],
    req: &RequestHead,
) -> Result<Option<(usize, ResponseHead)>, &'static str> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err("too many headers in the answer"),
        Err(_) => return Err("not an HTTP/1 answer"),
    };
    let (Some(code), Some(version)) = (resp.code, resp.version) else {
        return Err("not an HTTP/1 answer");
    };
    Ok(Some((
        n,
        rewrite_response(code, resp.reason.unwrap_or(""), version, resp.headers, req)?,
    )))
}

/// The head the client gets for an answer.
fn rewrite_response(
    code: u16,
    reason: &str,
    version: u8,
    headers: &[httparse::Header<'_>],
    req: &RequestHead,
) -> Result<ResponseHead, &'static str> {
    if code == 101 {
        return Err("the app switched protocols, which HTTP mode does not carry");
    }
    let values = |name: &'static str| {
        headers
            .iter()
            .filter(move |h| eq(h.name.as_bytes(), name))
            .map(|h| h.value)
    };
    let conn_tokens: Vec<&[u8]> = tokens(values("connection")).collect();
    let interim = (100..200).contains(&code);
    let length = content_length(values("content-length")).map_err(|()| "bad Content-Length")?;
    let body = if interim || req.is_head || code == 204 || code == 304 {
        Framing::Empty
    } else {
        match chunked_last(values("transfer-encoding")) {
            Some(true) if version == 1 => Framing::Chunked,
            // Another coding last, or chunked from HTTP/1.0: ends at close.
            Some(_) => Framing::Close,
            None => match length {
                Some(0) => Framing::Empty,
                Some(n) => Framing::Length(n),
                None => Framing::Close,
            },
        }
    };
    let backend_keeps = if version == 0 {
        conn_tokens.iter().any(|t| eq(t, "keep-alive"))
    } else {
        !conn_tokens.iter().any(|t| eq(t, "close"))
    };
    let dechunk = body == Framing::Chunked && req.http10;
    let close_client = req.close || body == Framing::Close || dechunk;
    let mut out = Vec::with_capacity(128 + headers.len() * 48);
    let _ = write!(
        Buf(&mut out),
        "{} {code} {reason}\r\n",
        if req.http10 { "HTTP/1.0" } else { "HTTP/1.1" }
    );
    for h in headers {
        let name = h.name.as_bytes();
        if HOP_BY_HOP.iter().any(|n| eq(name, n))
            || conn_tokens
                .iter()
                .any(|t| eq(name, std::str::from_utf8(t).unwrap_or("")))
            || (eq(name, "transfer-encoding") && (dechunk || body != Framing::Chunked))
        {
            continue;
        }
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value);
        out.extend_from_slice(b"\r\n");
    }
    if !interim {
        if close_client {
            out.extend_from_slice(b"connection: close\r\n");
        } else if req.http10 {
            out.extend_from_slice(b"connection: keep-alive\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
    Ok(ResponseHead {
        bytes: out,
        body,
        reusable: backend_keeps && body != Framing::Close,
        close_client,
        dechunk,
        interim,
    })
}

/// Why a body was not relayed whole.
#[derive(Debug)]
enum Relay {
    /// Reading from the sender failed.
    Read(io::Error),
    /// The sender closed before the body's end.
    Truncated(io::Error),
    /// Writing to the receiver failed.
    Write(io::Error),
    /// The body's framing is broken.
    Bad(&'static str),
}

/// Relays a body framed as `framing` from `from` (bytes already read in
/// `buf`) to `to`, after what `out` holds (a head, written with the first
/// bytes of body in one go). Bytes after the body's end stay in `buf`.
async fn relay<R, W>(
    from: &mut R,
    buf: &mut Vec<u8>,
    to: &mut W,
    framing: Framing,
    out: &mut Vec<u8>,
    dechunk: bool,
) -> Result<(), Relay>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut left = match framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    let mut chunks = ChunkScan::default();
    loop {
        let done = match framing {
            Framing::Empty => true,
            Framing::Length(_) => {
                let k = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                out.extend_from_slice(&buf[..k]);
                buf.drain(..k);
                left -= k as u64;
                left == 0
            }
            Framing::Chunked => {
                let (used, done) = if dechunk {
                    chunks.scan(buf, |data| out.extend_from_slice(data))
                } else {
                    chunks.scan(buf, |_| ())
                }
                .map_err(Relay::Bad)?;
                if !dechunk {
                    out.extend_from_slice(&buf[..used]);
                }
                buf.drain(..used);
                done
            }
            Framing::Close => {
                out.append(buf);
                false
            }
        };
        if done || out.len() >= WRITE_AT || !out.is_empty() {
            to.write_all(out).await.map_err(Relay::Write)?;
            out.clear();
        }
        if done {
            return Ok(());
        }
        match fill(from, buf).await {
            Ok(0) if framing == Framing::Close => return Ok(()),
            Ok(0) => {
                return Err(Relay::Truncated(io::Error::from(
                    io::ErrorKind::UnexpectedEof,
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(Relay::Read(e)),
        }
    }
}

/// Follows chunked transfer coding (RFC 9112 7.1) through the bytes of a
/// body to find its end, handing on the chunks' data.
#[derive(Debug, Default)]
struct ChunkScan {
    state: ChunkState,
    /// Bytes of the current size line or of the trailers so far.
    line: usize,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// In a chunk size (hex digits read so far, their value).
    #[default]
    SizeStart,
    Size(u8, u64),
    /// In chunk extensions (or whitespace) after the size.
    Ext(u64),
    /// After the size line's CR.
    SizeLf(u64),
    /// In a chunk's data, bytes left.
    Data(u64),
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final CRLF).
    TrailerStart,
    Trailer,
    TrailerLf,
    EndLf,
    Done,
}

impl ChunkScan {
    /// Scans `input`: the bytes of it that belong to the body and whether
    /// the body ended with them; `data` gets the chunks' data.
    fn scan(
        &mut self,
        input: &[u8],
        mut data: impl FnMut(&[u8]),
    ) -> Result<(usize, bool), &'static str> {
        use ChunkState as S;
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            self.state = match self.state {
                S::Done => return Ok((i, true)),
                S::Data(n) => {
                    let k = usize::try_from(n)
                        .unwrap_or(usize::MAX)
                        .min(input.len() - i);
                    data(&input[i..i + k]);
                    i += k;
                    let left = n - k as u64;
                    self.state = if left == 0 { S::DataCr } else { S::Data(left) };
                    continue;
                }
                S::SizeStart => match hex(b) {
                    Some(d) => S::Size(1, u64::from(d)),
                    None => return Err("a chunk size is not hexadecimal"),
                },
                S::Size(digits, v) => match hex(b) {
                    Some(_) if digits >= 15 => return Err("a chunk size is too large"),
                    Some(d) => S::Size(digits + 1, v * 16 + u64::from(d)),
                    None if b == b'\r' => S::SizeLf(v),
                    None if b == b';' || b == b' ' || b == b'\t' => S::Ext(v),
                    None => return Err("a chunk size is not hexadecimal"),
                },
                S::Ext(v) => match b {
                    b'\r' => S::SizeLf(v),
                    b'\n' => return Err("a chunk size line ends without CR"),
                    _ => S::Ext(v),
                },
                S::SizeLf(v) => match b {
                    b'\n' if v == 0 => S::TrailerStart,
                    b'\n' => S::Data(v),
                    _ => return Err("a chunk size line ends without LF"),
                },
                S::DataCr if b == b'\r' => S::DataLf,
                S::DataLf if b == b'\n' => S::SizeStart,
                S::DataCr | S::DataLf => return Err("a chunk's data is not followed by CRLF"),
                S::TrailerStart => match b {
                    b'\r' => S::EndLf,
                    _ => S::Trailer,
                },
                S::Trailer => match b {
                    b'\r' => S::TrailerLf,
                    b'\n' => return Err("a trailer line ends without CR"),
                    _ => S::Trailer,
                },
                S::TrailerLf if b == b'\n' => S::TrailerStart,
                S::EndLf if b == b'\n' => S::Done,
                S::TrailerLf | S::EndLf => return Err("a trailer line ends without LF"),
            };
            self.line = match self.state {
                S::Size(..)
                | S::Ext(_)
                | S::SizeLf(_)
                | S::Trailer
                | S::TrailerLf
                | S::TrailerStart
                | S::EndLf => self.line + 1,
                _ => 0,
            };
            if self.line > MAX_CHUNK_LINE + MAX_TRAILERS {
                return Err("a chunk size line or the trailers are too long");
            }
            if matches!(self.state, S::Size(..) | S::Ext(_)) && self.line > MAX_CHUNK_LINE {
                return Err("a chunk size line is too long");
            }
            i += 1;
        }
        Ok((i, self.state == S::Done))
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str, peer: Option<&str>) -> Result<RequestHead, Refusal> {
        match parse_request(text.as_bytes(), peer.map(|p| p.parse().unwrap()), 42) {
            Parsed::Done(n, head) => {
                assert_eq!(n, text.len());
                head
            }
            Parsed::Refused(r) => Err(r),
            Parsed::Partial => panic!("partial: {text:?}"),
        }
    }

    fn text(head: &RequestHead) -> String {
        String::from_utf8(head.bytes.clone()).unwrap()
    }

    fn lines(head: &RequestHead) -> Vec<String> {
        text(head).split("\r\n").map(str::to_owned).collect()
    }

    #[test]
    fn forwarding_headers_are_added_and_hop_by_hop_ones_dropped() {
        let head = request(
            "GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nConnection: keep-alive, x-secret\r\n\
             X-Secret: hop\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\n\
             X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 198.51.100.1\r\nX-App: kept\r\n\r\n",
            Some("192.0.2.9"),
        )
        .ok()
        .unwrap();
        let l = lines(&head);
        assert_eq!(l[0], "GET /a?b=1 HTTP/1.1");
        assert!(l.contains(&"x-forwarded-for: 203.0.113.7, 198.51.100.1, 192.0.2.9".to_owned()));
        assert_eq!(text(&head).matches("x-forwarded-for").count(), 1);
        assert!(l.contains(&"x-forwarded-proto: http".to_owned()));
        assert!(l.contains(&"x-request-start: t=42".to_owned()));
        let lower = text(&head).to_ascii_lowercase();
        for gone in ["connection:", "x-secret:", "keep-alive:", "te:"] {
            assert!(
                !lower.contains(&format!("\n{gone}")),
                "{gone} was forwarded"
            );
        }
        assert!(l.contains(&"X-App: kept".to_owned()));
        assert!(l.contains(&"Host: example.com".to_owned()));
        assert!(text(&head).ends_with("\r\n\r\n"));
        assert_eq!(head.body, Framing::Empty);
        assert!(!head.close && head.idempotent);
    }

    #[test]
    fn an_edge_in_front_keeps_its_proto_and_start_and_unix_clients_add_no_address() {
        let head = request(
            "GET / HTTP/1.1\r\nX-Forwarded-Proto: https\r\nX-Request-Start: t=1\r\n\r\n",
            None,
        )
        .ok()
        .unwrap();
        let t = text(&head);
        assert!(t.contains("X-Forwarded-Proto: https\r\n"));
        assert!(t.contains("X-Request-Start: t=1\r\n"));
        assert!(!t.contains("x-forwarded-proto"));
        assert!(!t.to_ascii_lowercase().contains("x-forwarded-for"));
    }

    #[test]
    fn an_absolute_target_becomes_a_path_with_its_host() {
        let head = request(
            "GET http://example.com:8080/x?y HTTP/1.1\r\n\r\n",
            Some("10.0.0.1"),
        )
        .ok()
        .unwrap();
        let l = lines(&head);
        assert_eq!(l[0], "GET /x?y HTTP/1.1");
        assert!(l.contains(&"host: example.com:8080".to_owned()));
        assert!(l.contains(&"x-forwarded-for: 10.0.0.1".to_owned()));
    }

    #[test]
    fn lengths_that_cannot_be_trusted_are_refused() {
        for bad in [
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let r = request(bad, None)
                .err()
                .unwrap_or_else(|| panic!("accepted {bad:?}"));
            assert_eq!(r.status, "400 Bad Request", "{bad:?}");
        }
        let same = request("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n", None)
            .ok()
            .unwrap();
        assert_eq!(same.body, Framing::Length(5));
        assert!(!same.idempotent);
        let chunked = request(
            "PUT / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            None,
        )
        .ok()
        .unwrap();
        assert_eq!(chunked.body, Framing::Chunked);
        assert!(text(&chunked).contains("Transfer-Encoding: gzip, chunked\r\n"));
    }

    #[test]
    fn upgrades_are_refused_and_http10_closes_unless_kept_alive() {
        let r = request(
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            None,
        )
        .err()
        .unwrap();
        assert_eq!(r.status, "501 Not Implemented");
        assert!(request("GET / HTTP/1.0\r\n\r\n", None).ok().unwrap().close);
        let kept = request("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", None)
            .ok()
            .unwrap();
        assert!(!kept.close && kept.http10);
        assert!(
            request("GET / HTTP/1.1\r\nConnection: close\r\n\r\n", None)
                .ok()
                .unwrap()
                .close
        );
    }

    #[test]
    fn too_many_headers_and_garbage_are_refused() {
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            many.push_str(&format!("x-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        match parse_request(many.as_bytes(), None, 0) {
            Parsed::Refused(r) => assert!(r.status.starts_with("431")),
            _ => panic!("accepted {MAX_HEADERS}+1 headers"),
        }
        assert!(matches!(
            parse_request(b"GARBAGE\r\n\r\n", None, 0),
            Parsed::Refused(_)
        ));
        assert!(matches!(
            parse_request(b"GET / HTTP/1.1\r\nHost: a", None, 0),
            Parsed::Partial
        ));
    }

    fn answer(text: &str, req: &str) -> ResponseHead {
        let req = request(req, None).ok().unwrap();
        let (n, head) = parse_response(text.as_bytes(), &req).unwrap().unwrap();
        assert_eq!(n, text.len());
        head
    }

    #[test]
    fn answers_are_framed_for_the_client() {
        let get = "GET / HTTP/1.1\r\n\r\n";
        let a = answer(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nKeep-Alive: x\r\n\r\n",
            get,
        );
        assert_eq!(a.body, Framing::Length(2));
        assert!(a.reusable && !a.close_client);
        assert_eq!(a.bytes, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n");
        let a = answer("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", get);
        assert_eq!(a.body, Framing::Chunked);
        assert!(String::from_utf8_lossy(&a.bytes).contains("Transfer-Encoding: chunked"));
        let a = answer("HTTP/1.1 200 OK\r\n\r\n", get);
        assert_eq!(a.body, Framing::Close);
        assert!(a.close_client && !a.reusable);
        assert!(String::from_utf8_lossy(&a.bytes).ends_with("connection: close\r\n\r\n"));
        let a = answer(
            "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
            "HEAD / HTTP/1.1\r\n\r\n",
        );
        assert_eq!(a.body, Framing::Empty);
        let a = answer(
            "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
            get,
        );
        assert_eq!(a.body, Framing::Empty);
        let a = answer(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            get,
        );
        assert!(!a.reusable && !a.close_client);
        let a = answer("HTTP/1.1 100 Continue\r\n\r\n", get);
        assert!(a.interim);
        // An HTTP/1.0 client gets the chunks decoded, then a close.
        let a = answer(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
        );
        assert!(a.dechunk && a.close_client);
        assert!(a.bytes.starts_with(b"HTTP/1.0 200 OK\r\n"));
        assert!(!String::from_utf8_lossy(&a.bytes)
            .to_ascii_lowercase()
            .contains("transfer-encoding"));
        assert!(parse_response(
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            &request(get, None).ok().unwrap()
        )
        .is_err());
    }

    #[test]
    fn chunked_bodies_end_where_their_framing_says_in_any_split() {
        let body =
            b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let end = body.len() - 4;
        for split in 0..body.len() {
            let mut scan = ChunkScan::default();
            let mut data = Vec::new();
            let (a, done_a) = scan
                .scan(&body[..split], |d| data.extend_from_slice(d))
                .unwrap();
            assert_eq!(a, split.min(end));
            if done_a {
                assert!(split >= end);
                continue;
            }
            let (b, done) = scan
                .scan(&body[split..], |d| data.extend_from_slice(d))
                .unwrap();
            assert!(done, "split at {split}");
            assert_eq!(split + b, end);
            assert_eq!(data, b"Wikipedia in\r\n\r\nchunks.");
        }
        for bad in [
            &b"x\r\n"[..],
            b"4\r\nWikiX\r\n",
            b"4\nWiki",
            b"fffffffffffffffff\r\n",
        ] {
            assert!(ChunkScan::default().scan(bad, |_| ()).is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn relay_stops_at_the_end_and_leaves_what_follows() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let mut buf = b"hello worldNEXT".to_vec();
        let mut out = b"HEAD:".to_vec();
        let mut src: &[u8] = b"";
        relay(
            &mut src,
            &mut buf,
            &mut a,
            Framing::Length(11),
            &mut out,
            false,
        )
        .await
        .unwrap();
        assert_eq!(buf, b"NEXT");
        drop(a);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"HEAD:hello world");
        // A body cut short is an error, not a success.
        let (mut a, _b) = tokio::io::duplex(1024);
        let mut buf = b"hel".to_vec();
        let mut src: &[u8] = b"";
        assert!(matches!(
            relay(
                &mut src,
                &mut buf,
                &mut a,
                Framing::Length(11),
                &mut Vec::new(),
                false
            )
            .await,
            Err(Relay::Truncated(_))
        ));
    }
}
