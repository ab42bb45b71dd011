//! The front's HTTP mode on the wire: a real `slipway-agent front` process
//! in front of a small HTTP/1.1 backend of this test, spoken to with raw
//! bytes so every framing case is the test's own choice: bodies by length
//! and chunked, chunked and close-delimited answers, `Expect:
//! 100-continue`, an HTTP/1.0 client, pipelined requests, a kept backend
//! connection the backend closed while idle, and requests refused before
//! they reach the backend.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{free_port, BIN};

/// A request as the backend read it.
struct Seen {
    method: String,
    path: String,
    head: String,
    body: Vec<u8>,
}

/// Reads one request (head, then a body by length or chunked) or `None`
/// at the end of the stream.
fn read_request(r: &mut BufReader<TcpStream>) -> Option<Seen> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let first: Vec<&str> = head.lines().next()?.split(' ').collect();
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if lower.contains("transfer-encoding: chunked") {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).ok()?;
            let n = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).ok()?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(len) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
    {
        body = vec![0; len.trim().parse().ok()?];
        r.read_exact(&mut body).ok()?;
    }
    Some(Seen {
        method: first[0].to_owned(),
        path: first[1].to_owned(),
        head,
        body,
    })
}

/// The backend: `/chunked` answers in chunks, `/close` without a length
/// (then closes), `/idle-close` closes the connection shortly after its
/// answer (a keep-alive timeout), `/head` echoes the head it got; anything
/// else echoes method, path and body. Counts connections it accepted.
fn backend(connections: Arc<AtomicUsize>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            connections.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                while let Some(req) = read_request(&mut r) {
                    let answer: Vec<u8> = match req.path.as_str() {
                        "/chunked" => {
                            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\nX-Trailer: 1\r\n\r\n".to_vec()
                        }
                        "/close" => {
                            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end");
                            return;
                        }
                        "/head" => {
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{}", req.head.len(), req.head).into_bytes()
                        }
                        _ => {
                            let text = format!(
                                "{} {} {}",
                                req.method,
                                req.path,
                                String::from_utf8_lossy(&req.body)
                            );
                            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{text}", text.len()).into_bytes()
                        }
                    };
                    if w.write_all(&answer).is_err() {
                        return;
                    }
                    if req.path == "/idle-close" {
                        std::thread::sleep(Duration::from_millis(50));
                        let _ = w.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A `slipway-agent front` in HTTP mode in front of `backend`.
struct Front {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Front {
    fn start(backend: SocketAddr) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join(".slipway/run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(
            run.join("front-target.json"),
            format!(r#"{{"backend":"{backend}","seq":1,"release":"r1","mode":"http"}}"#),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(BIN)
            .args(["front", "--root"])
            .arg(dir.path())
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the front did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    fn connect(&self) -> Client {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        }
    }
}

impl Drop for Front {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Client {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

/// An answer as the client read it.
#[derive(Debug)]
struct Answer {
    status: String,
    head: String,
    body: String,
}

impl Client {
    fn send(&mut self, bytes: &str) {
        self.w.write_all(bytes.as_bytes()).unwrap();
    }

    /// Reads an answer: by length, chunked (decoded) or to the end.
    fn answer(&mut self) -> Answer {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            assert!(
                self.r.read_line(&mut line).unwrap() > 0,
                "closed; head so far {head:?}"
            );
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        let status = head.lines().next().unwrap().to_owned();
        let lower = head.to_ascii_lowercase();
        let mut body = Vec::new();
        if status.contains(" 100 ") {
        } else if lower.contains("transfer-encoding: chunked") {
            loop {
                let mut size = String::new();
                self.r.read_line(&mut size).unwrap();
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap(), 16).unwrap();
                if n == 0 {
                    // Trailers, then the empty line.
                    loop {
                        let mut line = String::new();
                        self.r.read_line(&mut line).unwrap();
                        if line == "\r\n" {
                            break;
                        }
                    }
                    break;
                }
                let mut chunk = vec![0; n + 2];
                self.r.read_exact(&mut chunk).unwrap();
                body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(len) = lower
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
        {
            body = vec![0; len.trim().parse().unwrap()];
            self.r.read_exact(&mut body).unwrap();
        } else {
            self.r.read_to_end(&mut body).unwrap();
        }
        Answer {
            status,
            head,
            body: String::from_utf8(body).unwrap(),
        }
    }

    /// True once the front closed the connection (read gives 0).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.r.read(&mut b), Ok(0))
    }
}

#[test]
fn http_mode_relays_every_framing_and_refuses_what_it_cannot_trust() {
    let connections = Arc::new(AtomicUsize::new(0));
    let front = Front::start(backend(connections.clone()));

    // One keep-alive connection: a GET, bodies by length and chunked, a
    // chunked answer (the client gets chunks, trailers dropped or not), two
    // pipelined requests in one write.
    let mut c = front.connect();
    c.send("GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\n");
    let a = c.answer();
    assert_eq!(a.status, "HTTP/1.1 200 OK");
    assert_eq!(a.body, "GET /a?b=1 ");
    c.send("POST /len HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello");
    assert_eq!(c.answer().body, "POST /len hello");
    c.send("POST /chunks HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
    assert_eq!(c.answer().body, "POST /chunks hello world");
    c.send("GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n");
    let a = c.answer();
    assert!(
        a.head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{a:?}"
    );
    assert_eq!(a.body, "abcdefg");
    c.send("GET /one HTTP/1.1\r\nHost: x\r\n\r\nPOST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc");
    assert_eq!(c.answer().body, "GET /one ");
    assert_eq!(c.answer().body, "POST /two abc");
    // What the backend got: forwarding headers, no hop-by-hop ones.
    c.send("GET /head HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, x-hop\r\nX-Hop: 1\r\nX-Forwarded-For: 203.0.113.7\r\n\r\n");
    let seen = c.answer().body.to_ascii_lowercase();
    assert!(
        seen.contains("x-forwarded-for: 203.0.113.7, 127.0.0.1\r\n"),
        "{seen}"
    );
    assert!(seen.contains("x-forwarded-proto: http\r\n"), "{seen}");
    assert!(seen.contains("x-request-start: t="), "{seen}");
    assert!(
        !seen.contains("x-hop") && !seen.contains("\r\nconnection:"),
        "{seen}"
    );
    // All of it on one backend connection.
    assert_eq!(connections.load(Ordering::SeqCst), 1);

    // Expect: 100-continue is answered by the front before the body.
    c.send("PUT /expect HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n");
    assert_eq!(c.answer().status, "HTTP/1.1 100 Continue");
    c.send("body");
    assert_eq!(c.answer().body, "PUT /expect body");

    // The backend closes its kept connection while idle: the next request,
    // a POST that cannot be sent twice, goes out on a new one.
    c.send("GET /idle-close HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(c.answer().body, "GET /idle-close ");
    std::thread::sleep(Duration::from_millis(300));
    c.send("POST /after HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok");
    let a = c.answer();
    assert_eq!(
        (a.status.as_str(), a.body.as_str()),
        ("HTTP/1.1 200 OK", "POST /after ok")
    );

    // An answer delimited by the backend's close reaches the client whole,
    // and the client's connection closes after it.
    c.send("GET /close HTTP/1.1\r\nHost: x\r\n\r\n");
    let a = c.answer();
    assert_eq!(a.body, "until the end");
    assert!(
        a.head.to_ascii_lowercase().contains("connection: close"),
        "{a:?}"
    );

    // HTTP/1.0: an HTTP/1.0 answer, chunks decoded, then closed.
    let mut c = front.connect();
    c.send("GET /chunked HTTP/1.0\r\n\r\n");
    let a = c.answer();
    assert!(a.status.starts_with("HTTP/1.0 200"), "{a:?}");
    assert_eq!(a.body, "abcdefg");

    // Refused before the backend: lengths that cannot be trusted (400),
    // too many headers (431), an upgrade (501); each closes the connection.
    let before = connections.load(Ordering::SeqCst);
    let many: String = (0..101).map(|i| format!("x-{i}: v\r\n")).collect();
    for (request, status) in [
        (
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n".to_owned(),
            "400",
        ),
        (
            "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n".to_owned(),
            "400",
        ),
        (format!("GET / HTTP/1.1\r\n{many}\r\n"), "431"),
        (
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n".to_owned(),
            "501",
        ),
        ("NOT HTTP AT ALL\r\n\r\n".to_owned(), "400"),
    ] {
        let mut c = front.connect();
        c.send(&request);
        let a = c.answer();
        assert!(a.status.contains(status), "{request:?}: {a:?}");
        assert!(c.closed(), "{request:?}: the connection stayed open");
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        before,
        "a refused request reached the backend"
    );
}
