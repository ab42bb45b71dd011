//! The front's HTTP mode (`listen_mode = "http"`): HTTP/1.1 is terminated
//! here and each request is forwarded to the backend that is current when
//! the request arrives, so a keep-alive client moves to a new release at
//! the next request boundary after a switch (TCP mode cannot: its bytes
//! stay on the connection's backend until one side closes).
//!
//! Per client connection the front keeps one keep-alive connection to the
//! backend it last used (HTTP/1.1 carries one request at a time, so no pool
//! is needed); a request for another backend than that one (a switch came)
//! opens a new one and the old one is dropped. Draining counts requests in
//! flight: a request is counted against its backend from its start until
//! the last byte of its answer went out, which is what the deploy waits for
//! before it stops the old backend.
//!
//! Headers added: `X-Forwarded-For` (the client's address appended to one
//! the request carries), and, unless the request already has them (a
//! TLS-terminating load balancer in front knows better), `X-Forwarded-Proto:
//! http` and `X-Request-Start: t=<µs since the epoch>`. Hop-by-hop headers
//! (RFC 9110 7.6.1) are not forwarded either way. Upgrades (WebSockets,
//! `h2c`) are refused with 501: such apps use TCP mode. Limits are hyper's
//! defaults: at most 100 headers and about 400 KiB for a request head (more
//! is answered 431), a request head must arrive within
//! [`HEADER_READ_TIMEOUT`].
//!
//! A backend that cannot be reached is tried once more after a re-read of
//! the target (a switch may be under way); then the client gets `502` with
//! a one-line body. A kept backend connection that the backend closed while
//! idle is replaced by a new one before the request is sent (hyper hands
//! back a request it did not send).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};

use super::{lock, reread_target, Held, Shared, Stream, CONNECT_TIMEOUT, RETRY_PAUSE};

/// A client must send a whole request head within this (slow-loris guard).
pub(super) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Headers that describe one hop, never forwarded (RFC 9110 7.6.1), besides
/// those a `Connection` header names.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_REQUEST_START: HeaderName = HeaderName::from_static("x-request-start");

/// The kept connection to a backend, per client connection.
struct Kept {
    backend: SocketAddr,
    sender: SendRequest<Incoming>,
}

/// What a client connection's requests share.
struct Conn {
    peer: Option<IpAddr>,
    routes: Shared,
    changed: Arc<tokio::sync::Notify>,
    target_path: PathBuf,
    /// Locked for a request's send only; hyper serves one request of a
    /// connection at a time, so it is never contended.
    kept: tokio::sync::Mutex<Option<Kept>>,
}

/// Serves HTTP/1.1 on one client connection until it closes.
pub(super) async fn serve(
    inbound: Box<dyn Stream>,
    peer: Option<IpAddr>,
    routes: Shared,
    changed: Arc<tokio::sync::Notify>,
    target_path: PathBuf,
) {
    let conn = Arc::new(Conn {
        peer,
        routes,
        changed,
        target_path,
        kept: tokio::sync::Mutex::new(None),
    });
    let service = hyper::service::service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(proxy(&conn, req).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(inbound), service)
        .await;
    if let Err(e) = served {
        // A client that went away mid-request, a malformed request (hyper
        // answered 400 itself), a timeout: nothing to do but note it.
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

/// A request that could not be forwarded: why, and the request back when it
/// was never sent (so it can be sent elsewhere).
enum SendError {
    /// Boxed: the error path only.
    Connect(std::io::Error, Box<Request<Incoming>>),
    Failed(hyper::Error),
}

async fn proxy(conn: &Conn, req: Request<Incoming>) -> Response<ProxyBody> {
    if req.headers().contains_key(header::UPGRADE) {
        return short(
            StatusCode::NOT_IMPLEMENTED,
            "upgrades (WebSocket, h2c) are not proxied in listen_mode = \"http\"; use \"tcp\"\n",
        );
    }
    let mut req = prepare(req, conn.peer);
    for attempt in 0..2 {
        if attempt == 1 {
            tokio::time::sleep(RETRY_PAUSE).await;
            reread_target(&conn.routes, &conn.changed, &conn.target_path).await;
        }
        let Some(backend) = lock(&conn.routes).target.as_ref().map(|t| t.backend) else {
            return short(
                StatusCode::BAD_GATEWAY,
                "bad gateway: no release is live yet\n",
            );
        };
        let held = Held::new(&conn.routes, &conn.changed, backend);
        match send(conn, backend, req).await {
            Ok(resp) => return answer(resp, held),
            Err(SendError::Connect(e, back)) => {
                tracing::warn!(%backend, error = %e, "cannot reach the backend");
                req = *back;
            }
            Err(SendError::Failed(e)) => {
                tracing::warn!(%backend, error = %e, "the backend failed a request");
                return short(
                    StatusCode::BAD_GATEWAY,
                    "bad gateway: the app closed the connection without an answer\n",
                );
            }
        }
    }
    short(
        StatusCode::BAD_GATEWAY,
        "bad gateway: the app's backend is not reachable\n",
    )
}

/// Sends `req` on the kept connection when it leads to `backend` and is
/// still open, else (or when the backend closed it before the request went
/// out) on a new one, which is kept for the next request.
async fn send(
    conn: &Conn,
    backend: SocketAddr,
    mut req: Request<Incoming>,
) -> Result<Response<Incoming>, SendError> {
    let mut kept = conn.kept.lock().await;
    if let Some(k) = kept.take().filter(|k| k.backend == backend) {
        let mut sender = k.sender;
        if sender.ready().await.is_ok() {
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    *kept = Some(Kept { backend, sender });
                    return Ok(resp);
                }
                Err(mut e) => match e.take_message() {
                    // Closed by the backend before the request went out.
                    Some(back) => req = back,
                    None => return Err(SendError::Failed(e.into_error())),
                },
            }
        }
    }
    let mut sender = match connect(backend).await {
        Ok(s) => s,
        Err(e) => return Err(SendError::Connect(e, Box::new(req))),
    };
    match sender.try_send_request(req).await {
        Ok(resp) => {
            *kept = Some(Kept { backend, sender });
            Ok(resp)
        }
        Err(mut e) => match e.take_message() {
            Some(back) => Err(SendError::Connect(
                std::io::Error::other(format!("closed before the request: {}", e.error())),
                Box::new(back),
            )),
            None => Err(SendError::Failed(e.into_error())),
        },
    }
}

async fn connect(backend: SocketAddr) -> std::io::Result<SendRequest<Incoming>> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(backend))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = tcp.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        // Ends when the sender is dropped (client gone, or another
        // backend) or the backend closes.
        if let Err(e) = connection.await {
            tracing::debug!(%backend, error = %e, "backend connection ended with an error");
        }
    });
    Ok(sender)
}

/// The request as it goes to the backend: origin-form target, HTTP/1.1,
/// hop-by-hop headers removed, forwarding headers added.
fn prepare(req: Request<Incoming>, peer: Option<IpAddr>) -> Request<Incoming> {
    let (mut parts, body) = req.into_parts();
    let now_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    rewrite(&mut parts, peer, now_us);
    Request::from_parts(parts, body)
}

/// [`prepare`] on the request's head, at `now_us` µs since the epoch.
fn rewrite(parts: &mut http::request::Parts, peer: Option<IpAddr>, now_us: u128) {
    if parts.uri.scheme().is_some() {
        // Absolute form (a client that takes the front for a proxy): the
        // backend gets the path; Host says the authority.
        if let Some(authority) = parts.uri.authority() {
            if !parts.headers.contains_key(header::HOST) {
                if let Ok(v) = HeaderValue::from_str(authority.as_str()) {
                    parts.headers.insert(header::HOST, v);
                }
            }
        }
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_owned();
        parts.uri = Uri::try_from(path).unwrap_or_else(|_| Uri::from_static("/"));
    }
    parts.version = http::Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    let h = &mut parts.headers;
    if let Some(ip) = peer {
        // Every line of the header is one list (RFC 9110 5.3): folded into
        // one value, the client's address last. One buffer, no copy of the
        // lines (this runs for every request).
        let mut value = String::with_capacity(48);
        for line in h
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            value.push_str(line);
            value.push_str(", ");
        }
        let _ = write!(value, "{ip}");
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(value)) {
            h.insert(X_FORWARDED_FOR, v);
        }
    }
    if !h.contains_key(&X_FORWARDED_PROTO) {
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if !h.contains_key(&X_REQUEST_START) {
        let mut value = String::with_capacity(20);
        let _ = write!(value, "t={now_us}");
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(value)) {
            h.insert(X_REQUEST_START, v);
        }
    }
}

fn strip_hop_by_hop(h: &mut HeaderMap) {
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in &named {
            h.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        h.remove(name);
    }
}

/// The backend's answer for the client: hop-by-hop headers removed (hyper
/// frames the body and says keep-alive or close for this hop itself); the
/// request stays counted until the body's end.
fn answer(resp: Response<Incoming>, held: Held) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(
        parts,
        ProxyBody::Backend {
            body,
            held: Some(held),
        },
    )
}

fn short(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Short(Some(Bytes::from_static(text.as_bytes()))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A response body: the backend's, streamed (and counted while it lasts),
/// or a short one of the front's own.
enum ProxyBody {
    Backend {
        body: Incoming,
        /// Dropped with the body: at its end, or when the client is gone.
        held: Option<Held>,
    },
    Short(Option<Bytes>),
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            Self::Backend { body, held } => {
                let polled = Pin::new(body).poll_frame(cx);
                if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
                    // The answer is complete (or broken): no longer in flight.
                    held.take();
                }
                polled
            }
            Self::Short(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Backend { body, .. } => body.is_end_stream(),
            Self::Short(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Backend { body, .. } => body.size_hint(),
            Self::Short(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(req: http::request::Builder) -> http::request::Parts {
        req.body(()).unwrap().into_parts().0
    }

    #[test]
    fn forwarding_headers_are_added_and_hop_by_hop_ones_dropped() {
        let mut p = head(
            Request::get("/a?b=1")
                .header("host", "example.com")
                .header("connection", "keep-alive, x-secret")
                .header("x-secret", "hop")
                .header("keep-alive", "timeout=5")
                .header("te", "trailers")
                .header("x-forwarded-for", "203.0.113.7")
                .header("x-forwarded-for", "198.51.100.1")
                .header("x-app", "kept"),
        );
        rewrite(&mut p, Some("192.0.2.9".parse().unwrap()), 42);
        let h = &p.headers;
        assert_eq!(
            h.get("x-forwarded-for").unwrap(),
            "203.0.113.7, 198.51.100.1, 192.0.2.9"
        );
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "http");
        assert_eq!(h.get("x-request-start").unwrap(), "t=42");
        for gone in ["connection", "x-secret", "keep-alive", "te"] {
            assert!(!h.contains_key(gone), "{gone} was forwarded");
        }
        assert_eq!(h.get("x-app").unwrap(), "kept");
        assert_eq!(h.get("host").unwrap(), "example.com");
        assert_eq!(p.uri, "/a?b=1");
        assert_eq!(p.version, http::Version::HTTP_11);
    }

    #[test]
    fn an_edge_in_front_keeps_its_proto_and_start_and_unix_clients_add_no_address() {
        let mut p = head(
            Request::get("/")
                .header("x-forwarded-proto", "https")
                .header("x-request-start", "t=1"),
        );
        rewrite(&mut p, None, 42);
        assert_eq!(p.headers.get("x-forwarded-proto").unwrap(), "https");
        assert_eq!(p.headers.get("x-request-start").unwrap(), "t=1");
        assert!(!p.headers.contains_key("x-forwarded-for"));
    }

    #[test]
    fn an_absolute_target_becomes_a_path_with_its_host() {
        let mut p = head(Request::get("http://example.com:8080/x?y"));
        rewrite(
            &mut p,
            Some("::ffff:10.0.0.1".parse::<IpAddr>().unwrap().to_canonical()),
            0,
        );
        assert_eq!(p.uri, "/x?y");
        assert_eq!(p.headers.get("host").unwrap(), "example.com:8080");
        assert_eq!(p.headers.get("x-forwarded-for").unwrap(), "10.0.0.1");
    }
}
