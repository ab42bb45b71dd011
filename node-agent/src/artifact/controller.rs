//! Artifacts fetched from the controller by digest, over the agent's mTLS
//! link: the link dials (its `commands`, for a deploy), this asks for
//! the artifact and takes it into the app's cache.
//!
//! A fetch from the controller gets the limits of an HTTPS download
//! ([`super::https`], `[artifacts]`): a `read_timeout` between two chunks
//! and `max_size`; and what the controller sends is checked as it comes —
//! offsets contiguous, total within the limit, the sha256 of the bytes the
//! one asked for — through the cache's one writer
//! ([`super::cache::Incoming`]) before the file takes its name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use slipway_proto::v1::agent_link_client::AgentLinkClient;
use slipway_proto::v1::{ArtifactChunk, FetchArtifactRequest};
use tonic::transport::Channel;

use super::cache::{CacheError, Fetched, Incoming};
use crate::config::ArtifactsConfig;
use crate::digest::Sha256;
use crate::error::status_text;

/// Why an artifact could not be fetched from the controller.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The controller went quiet for longer than `[artifacts]` allows.
    #[error("controller {addr} sent nothing for {after:?} {during}")]
    Idle {
        /// Controller address.
        addr: String,
        /// What the agent was waiting for.
        during: &'static str,
        /// The timeout that fired.
        after: Duration,
    },
    /// The artifact the controller streams is over `[artifacts] max_size`.
    #[error("artifact {sha256} from the controller is larger than the limit of {limit} bytes ([artifacts] max_size)")]
    TooLarge {
        /// The artifact asked for.
        sha256: Sha256,
        /// The limit.
        limit: u64,
    },
    /// The controller's artifact stream broke the protocol (a gap, a
    /// missing last chunk, other bytes than asked for) or failed.
    #[error("artifact {sha256} from the controller: {problem}")]
    BadArtifact {
        /// The artifact asked for.
        sha256: Sha256,
        /// What was wrong.
        problem: String,
    },
    /// The controller refused the fetch.
    #[error("controller refused the session: {0}")]
    Refused(String),
    /// The controller cannot serve the fetch now (gRPC `Unavailable`: its
    /// database does not answer, or it is shutting down): worth another
    /// try a little later.
    #[error("controller cannot serve the artifact now: {0}")]
    Unavailable(String),
    /// The cache could not be written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl FetchError {
    fn cache(sha256: &Sha256, e: CacheError) -> Self {
        match e {
            CacheError::TooLarge { limit } => Self::TooLarge {
                sha256: sha256.clone(),
                limit,
            },
            CacheError::Digest { actual, .. } => Self::BadArtifact {
                sha256: sha256.clone(),
                problem: format!("received bytes have sha256 {actual}"),
            },
            CacheError::Io { path, source, .. } => Self::Io { path, source },
        }
    }
}

/// Asks the controller at `addr` (dialled: `channel`) for artifact `sha256`
/// for command `command_id`, and takes it into `cache` (see the module
/// docs).
pub async fn fetch(
    channel: Channel,
    addr: &str,
    sha256: &Sha256,
    command_id: &str,
    cache: &Path,
    limits: &ArtifactsConfig,
) -> Result<Fetched, FetchError> {
    fetch_kind(channel, addr, sha256, command_id, false, cache, limits).await
}

/// As [`fetch`], for an agent binary of an upgrade: asked for from the
/// controller's store of agent binaries, never its app artifacts.
pub async fn fetch_agent_binary(
    channel: Channel,
    addr: &str,
    sha256: &Sha256,
    command_id: &str,
    cache: &Path,
    limits: &ArtifactsConfig,
) -> Result<Fetched, FetchError> {
    fetch_kind(channel, addr, sha256, command_id, true, cache, limits).await
}

async fn fetch_kind(
    channel: Channel,
    addr: &str,
    sha256: &Sha256,
    command_id: &str,
    agent_binary: bool,
    cache: &Path,
    limits: &ArtifactsConfig,
) -> Result<Fetched, FetchError> {
    let mut client = AgentLinkClient::new(channel);
    let request = client.fetch_artifact(FetchArtifactRequest {
        sha256: sha256.to_string(),
        command_id: command_id.to_owned(),
        agent_binary,
    });
    let stream = tokio::time::timeout(limits.read_timeout, request)
        .await
        .map_err(|_| FetchError::Idle {
            addr: addr.to_owned(),
            during: "in answer to the fetch",
            after: limits.read_timeout,
        })?
        .map_err(|status| {
            if status.code() == tonic::Code::Unavailable {
                FetchError::Unavailable(status_text(&status))
            } else {
                FetchError::Refused(status_text(&status))
            }
        })?
        .into_inner();
    receive(stream, addr, sha256, cache, limits).await
}

/// Writes the chunks of `stream` into `cache`, checking each against what
/// was asked for and `limits` before the next; `<cache>/<sha256>` appears
/// only once the whole artifact has the expected digest.
async fn receive<S>(
    mut stream: S,
    addr: &str,
    sha256: &Sha256,
    cache: &Path,
    limits: &ArtifactsConfig,
) -> Result<Fetched, FetchError>
where
    S: Stream<Item = Result<ArtifactChunk, tonic::Status>> + Unpin,
{
    let bad = |problem: String| FetchError::BadArtifact {
        sha256: sha256.clone(),
        problem,
    };
    // Removed on every error return, a broken stream or a timeout included.
    let mut incoming = Incoming::create_async(cache, Some(sha256), limits.max_size)
        .await
        .map_err(|e| FetchError::cache(sha256, e))?;
    loop {
        let next = tokio::time::timeout(limits.read_timeout, stream.next())
            .await
            .map_err(|_| FetchError::Idle {
                addr: addr.to_owned(),
                during: "in the middle of the artifact",
                after: limits.read_timeout,
            })?;
        let offset = incoming.received();
        let chunk = match next {
            Some(Ok(chunk)) => chunk,
            Some(Err(status)) => {
                return Err(bad(format!("stream failed: {}", status_text(&status))))
            }
            None => {
                return Err(bad(format!(
                    "stream ended after {offset} bytes without its last chunk"
                )))
            }
        };
        if chunk.offset != offset {
            return Err(bad(format!(
                "chunk at offset {} where {offset} was expected",
                chunk.offset
            )));
        }
        incoming
            .write(&chunk.data)
            .await
            .map_err(|e| FetchError::cache(sha256, e))?;
        if chunk.last {
            break;
        }
    }
    incoming
        .finish()
        .await
        .map_err(|e| FetchError::cache(sha256, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;

    type Chunks = ReceiverStream<Result<ArtifactChunk, tonic::Status>>;

    const READ_TIMEOUT: Duration = Duration::from_secs(30);

    fn limits(max_size: u64) -> ArtifactsConfig {
        ArtifactsConfig {
            max_size,
            read_timeout: READ_TIMEOUT,
            ..ArtifactsConfig::default()
        }
    }

    fn chunk(offset: u64, data: &[u8], last: bool) -> Result<ArtifactChunk, tonic::Status> {
        Ok(ArtifactChunk {
            command_id: "c-1".into(),
            offset,
            data: data.to_vec(),
            last,
        })
    }

    /// A stream of `items`, kept open (like a live controller) while the
    /// returned sender lives.
    fn stream(
        items: Vec<Result<ArtifactChunk, tonic::Status>>,
    ) -> (Chunks, mpsc::Sender<Result<ArtifactChunk, tonic::Status>>) {
        let (tx, rx) = mpsc::channel(items.len().max(1));
        for item in items {
            tx.try_send(item).unwrap();
        }
        (ReceiverStream::new(rx), tx)
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    /// A controller that stops sending mid-artifact (gone, or its network
    /// cut) fails the fetch after `read_timeout` of silence, in virtual
    /// time, leaving nothing in the cache — before, the fetch (and the app
    /// lock it was taken under) waited forever.
    #[tokio::test(start_paused = true)]
    async fn a_controller_that_goes_quiet_mid_artifact_is_given_up_on() {
        let dir = tempfile::tempdir().unwrap();
        let sha = Sha256::of_bytes(b"abcdef");
        let (chunks, _open) = stream(vec![chunk(0, b"abc", false)]);
        let started = tokio::time::Instant::now();
        let err = receive(chunks, "ctl:7443", &sha, dir.path(), &limits(1 << 20))
            .await
            .unwrap_err();
        assert!(
            matches!(err, FetchError::Idle { after, .. } if after == READ_TIMEOUT),
            "{err}"
        );
        assert!(err.to_string().contains("sent nothing for 30s"), "{err}");
        let waited = started.elapsed();
        assert!(
            waited >= READ_TIMEOUT && waited < READ_TIMEOUT + Duration::from_secs(1),
            "{waited:?}"
        );
        assert!(names(dir.path()).is_empty(), "{:?}", names(dir.path()));
    }

    /// Chunks that keep coming reset the idle timeout: a slow but live
    /// controller is not cut off.
    #[tokio::test(start_paused = true)]
    async fn a_slow_but_steady_controller_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..40u8).collect();
        let sha = Sha256::of_bytes(&data);
        let (tx, rx) = mpsc::channel(1);
        let feeder = tokio::spawn({
            let data = data.clone();
            async move {
                for (i, piece) in data.chunks(10).enumerate() {
                    // Each gap is most of the timeout; all of them far more.
                    tokio::time::sleep(READ_TIMEOUT - Duration::from_secs(1)).await;
                    let last = (i + 1) * 10 == data.len();
                    tx.send(chunk((i * 10) as u64, piece, last)).await.unwrap();
                }
            }
        });
        let got = receive(
            ReceiverStream::new(rx),
            "ctl:7443",
            &sha,
            dir.path(),
            &limits(1 << 20),
        )
        .await
        .unwrap();
        feeder.await.unwrap();
        assert_eq!(got.bytes, 40);
        assert_eq!(fs::read(&got.path).unwrap(), data);
        assert_eq!(names(dir.path()), vec![sha.to_string()]);
    }

    /// What the controller sends is checked as it arrives: a gap or a
    /// repeat in the offsets, more than `max_size`, a stream that ends
    /// without its last chunk or breaks, and bytes that are not the
    /// artifact asked for are each refused, with nothing left in the cache.
    #[tokio::test]
    async fn what_the_controller_sends_is_checked_before_it_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let data = b"0123456789".to_vec();
        let sha = Sha256::of_bytes(&data);
        let cases: Vec<(&str, Vec<_>, u64, &str)> = vec![
            (
                "gap",
                vec![chunk(0, b"01234", false), chunk(6, b"6789", true)],
                100,
                "chunk at offset 6 where 5 was expected",
            ),
            (
                "repeat",
                vec![chunk(0, b"01234", false), chunk(0, b"01234", true)],
                100,
                "chunk at offset 0 where 5 was expected",
            ),
            (
                "over the limit",
                vec![chunk(0, b"01234", false), chunk(5, b"56789", true)],
                9,
                "larger than the limit of 9 bytes",
            ),
            (
                "no last chunk",
                vec![chunk(0, &data, false)],
                100,
                "stream ended after 10 bytes without its last chunk",
            ),
            (
                "broken stream",
                vec![
                    chunk(0, b"01234", false),
                    Err(tonic::Status::unavailable("controller shutting down")),
                ],
                100,
                "controller shutting down",
            ),
            (
                "other bytes",
                vec![chunk(0, b"0123456788", true)],
                100,
                "received bytes have sha256",
            ),
        ];
        for (what, items, max, want) in cases {
            let (chunks, tx) = stream(items);
            drop(tx); // the controller closes after what it sent
            let err = receive(chunks, "ctl:7443", &sha, dir.path(), &limits(max))
                .await
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(want) && err.contains(sha.as_str()),
                "{what}: {err}"
            );
            assert!(
                names(dir.path()).is_empty(),
                "{what}: {:?}",
                names(dir.path())
            );
        }
        // Exactly at the limit, in order, the right bytes: kept.
        let (chunks, _tx) = stream(vec![chunk(0, b"01234", false), chunk(5, b"56789", true)]);
        let got = receive(chunks, "ctl:7443", &sha, dir.path(), &limits(10))
            .await
            .unwrap();
        assert_eq!(got.bytes, 10);
        assert_eq!(fs::read(&got.path).unwrap(), data);
        assert_eq!(names(dir.path()), vec![sha.to_string()]);
    }
}
