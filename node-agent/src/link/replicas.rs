//! The controller replicas this node reports to (`[controller] url`, or
//! `urls` for several), which one the session is on, and the order every
//! other call to the controller tries them in.
//!
//! The session ([`super::session`]) starts on a replica picked at random —
//! so a fleet spreads over the replicas — and on a failed dial or a dropped
//! session moves to the next one in the list, wrapping around (the pauses
//! are the session's: `session::Rotation`). It records here which replica
//! it is on ([`Replicas::connected`]). Everything else the agent asks of
//! the controller — an artifact or agent binary to fetch, a certificate
//! renewal — goes to that replica first and, when it cannot be reached or
//! fails, to the others in list order ([`Replicas::in_order`],
//! [`first_answer`]): no call is tied to the first address of the list.
//!
//! Every replica is held to the same TLS check: the node's stored CA is
//! the only root for all of them (replicas share one CA), and each
//! replica's server certificate must name the host its address gives.
//!
//! The session also writes where it stands in the state dir
//! ([`LINK_FILE`]) for `slipway-agent status`, which runs as another
//! process.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{enroll, LinkError};
use crate::artifact::controller::FetchError;

/// In the controller state dir: where the running agent's session stands
/// (which replica it is on), written by `run`, read by `status`.
pub const LINK_FILE: &str = "link.json";

/// The configured replicas and the one the session is on. Cheap to clone:
/// the clones share the state.
#[derive(Debug, Clone)]
pub struct Replicas {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// As configured, in order.
    urls: Vec<String>,
    /// The replica the session is on, or dials next when it is down.
    current: AtomicUsize,
    /// Whether a session is up on `current`.
    up: AtomicBool,
}

impl Replicas {
    /// The replicas `urls` (from [`crate::config::ControllerConfig`]).
    pub fn new(urls: Vec<String>) -> Self {
        Self {
            inner: Arc::new(Inner {
                urls,
                current: AtomicUsize::new(0),
                up: AtomicBool::new(false),
            }),
        }
    }

    /// Every replica, as configured.
    pub fn urls(&self) -> &[String] {
        &self.inner.urls
    }

    /// How many replicas there are.
    pub fn len(&self) -> usize {
        self.inner.urls.len()
    }

    /// Whether none is configured (a config the checks would refuse).
    pub fn is_empty(&self) -> bool {
        self.inner.urls.is_empty()
    }

    /// The session dials replica `index` next (no session is up).
    pub fn dialling(&self, index: usize) {
        self.inner.current.store(index, Ordering::Relaxed);
        self.inner.up.store(false, Ordering::Relaxed);
    }

    /// A session is up on replica `index`.
    pub fn connected(&self, index: usize) {
        self.inner.current.store(index, Ordering::Relaxed);
        self.inner.up.store(true, Ordering::Relaxed);
    }

    /// The session ended.
    pub fn disconnected(&self) {
        self.inner.up.store(false, Ordering::Relaxed);
    }

    /// The replica the session is on, if one is up.
    pub fn current(&self) -> Option<&str> {
        if !self.inner.up.load(Ordering::Relaxed) {
            return None;
        }
        self.inner
            .urls
            .get(self.inner.current.load(Ordering::Relaxed))
            .map(String::as_str)
    }

    /// The order to try the replicas in for a call beside the session: the
    /// one the session is on (or dials next) first, then the others in list
    /// order from there, wrapping around.
    pub fn in_order(&self) -> Vec<&str> {
        let n = self.len();
        let first = self.inner.current.load(Ordering::Relaxed);
        (0..n)
            .map(|k| self.inner.urls[(first + k) % n].as_str())
            .collect()
    }
}

/// Whether a failed call is worth making again on another replica: this
/// one could not be reached, went quiet, refused or broke off. Not so for
/// a problem of the node itself (its identity, files or limits), which
/// every replica would meet the same.
pub fn another_may_answer(e: &LinkError) -> bool {
    match e {
        LinkError::Connect { .. }
        | LinkError::Idle { .. }
        | LinkError::SessionRefused(_)
        | LinkError::NoWelcome => true,
        LinkError::Fetch(f) => matches!(
            f,
            FetchError::Idle { .. }
                | FetchError::Refused(_)
                | FetchError::Unavailable(_)
                | FetchError::BadArtifact { .. }
        ),
        _ => false,
    }
}

/// Makes `call` (given a replica's address) on each replica in
/// [`Replicas::in_order`] until one answers, moving on only when
/// [`another_may_answer`]; at most one call per replica. `what` names the
/// call in the log line that says why it moved on.
pub async fn first_answer<T, F, Fut>(
    replicas: &Replicas,
    what: &str,
    mut call: F,
) -> Result<T, LinkError>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<T, LinkError>>,
{
    let order: Vec<String> = replicas.in_order().into_iter().map(str::to_owned).collect();
    let mut last = None;
    for (i, url) in order.iter().enumerate() {
        match call(url.clone()).await {
            Ok(t) => return Ok(t),
            Err(e) if another_may_answer(&e) => {
                if let Some(next) = order.get(i + 1) {
                    tracing::warn!(controller = %url, next = %next, "{what} failed on this controller replica, trying the next: {e}");
                }
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or(LinkError::NoController))
}

/// Renews the node's certificate ([`enroll::renew`]) through the replica
/// the session is on, else the others. Returns the new expiry.
pub async fn renew(replicas: &Replicas, state_dir: &Path) -> Result<i64, LinkError> {
    first_answer(replicas, "certificate renewal", |url| async move {
        enroll::renew(&url, state_dir).await
    })
    .await
}

/// Where the running agent's session stands, as `status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkState {
    /// The replica the session is on; none while it reconnects.
    pub connected_to: Option<String>,
    /// The node id the controller welcomed, when connected.
    pub node_id: Option<String>,
    /// Every configured replica, in order.
    pub replicas: Vec<String>,
    /// When this state began (seconds since the Unix epoch).
    pub since_unix: i64,
    /// While reconnecting: the last failure, and which replica is next.
    pub detail: Option<String>,
}

/// Writes `state` to [`LINK_FILE`] in `state_dir` (atomically: a reader
/// sees the old state or the new one).
pub fn write_state(state_dir: &Path, state: &LinkState) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    crate::durable::write_atomic(&state_dir.join(LINK_FILE), &json)
}

/// What [`LINK_FILE`] in `state_dir` says, if it can be read.
pub fn read_state(state_dir: &Path) -> Option<LinkState> {
    let bytes = std::fs::read(state_dir.join(LINK_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Replicas {
        Replicas::new(vec!["a:1".into(), "b:2".into(), "c:3".into()])
    }

    #[test]
    fn calls_go_to_the_session_replica_first_then_the_others_in_order() {
        let r = three();
        assert_eq!(r.in_order(), ["a:1", "b:2", "c:3"]);
        assert_eq!(r.current(), None);
        r.connected(1);
        assert_eq!(r.current(), Some("b:2"));
        assert_eq!(r.in_order(), ["b:2", "c:3", "a:1"]);
        r.disconnected();
        assert_eq!(r.current(), None);
        // While down, the one the session dials next goes first.
        r.dialling(2);
        assert_eq!(r.in_order(), ["c:3", "a:1", "b:2"]);
        assert!(Replicas::new(Vec::new()).in_order().is_empty());
    }

    fn connect_error(addr: &str) -> LinkError {
        LinkError::Connect {
            addr: addr.to_owned(),
            message: "connection refused".into(),
        }
    }

    #[tokio::test]
    async fn first_answer_moves_on_only_when_another_replica_may_answer() {
        let r = three();
        r.connected(1);
        let tried = std::sync::Mutex::new(Vec::new());
        // b and c unreachable: a answers, after both were tried once.
        let got = first_answer(&r, "test call", |url| {
            tried.lock().unwrap().push(url.clone());
            async move {
                if url == "a:1" {
                    Ok(url)
                } else {
                    Err(connect_error(&url))
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(got, "a:1");
        assert_eq!(*tried.lock().unwrap(), ["b:2", "c:3", "a:1"]);

        // A problem of the node's own is not taken to the next replica.
        tried.lock().unwrap().clear();
        let err = first_answer(&r, "test call", |url| {
            tried.lock().unwrap().push(url);
            async { Err::<(), _>(LinkError::BadPem("client certificate")) }
        })
        .await
        .unwrap_err();
        assert!(matches!(err, LinkError::BadPem(_)), "{err}");
        assert_eq!(*tried.lock().unwrap(), ["b:2"]);

        // None answers: each tried once, the last error returned.
        tried.lock().unwrap().clear();
        let err = first_answer(&r, "test call", |url| {
            tried.lock().unwrap().push(url.clone());
            async move { Err::<(), _>(connect_error(&url)) }
        })
        .await
        .unwrap_err();
        assert!(err.to_string().contains("a:1"), "{err}");
        assert_eq!(*tried.lock().unwrap(), ["b:2", "c:3", "a:1"]);

        let none = first_answer(&Replicas::new(Vec::new()), "test call", |_| async {
            Ok::<_, LinkError>(())
        })
        .await
        .unwrap_err();
        assert!(matches!(none, LinkError::NoController), "{none}");
    }

    #[test]
    fn link_state_round_trips_through_its_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_state(dir.path()), None);
        let state = LinkState {
            connected_to: Some("https://b:7443".into()),
            node_id: Some("n-1".into()),
            replicas: vec!["https://a:7443".into(), "https://b:7443".into()],
            since_unix: 1_700_000_000,
            detail: None,
        };
        write_state(dir.path(), &state).unwrap();
        assert_eq!(read_state(dir.path()), Some(state));
    }
}
