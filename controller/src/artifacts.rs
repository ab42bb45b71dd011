//! The artifact store: `<data_dir>/artifacts/<sha256>`, content-addressed.
//!
//! Uploads ([`Upload`]) are written to a temp file in the same directory
//! while being hashed, checked against the declared digest, fsynced and
//! renamed into place, so a stored artifact is always complete and its name
//! is its sha256. Nothing is ever held whole in memory: agents download
//! ([`Artifacts::chunks`]) in [`CHUNK_SIZE`] pieces.

use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use slipway_proto::v1::ArtifactChunk;
use tokio::fs::File;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// Directory under the data dir holding the artifacts.
pub const ARTIFACTS_DIR: &str = "artifacts";
/// Directory under the data dir holding agent binaries for upgrades: apart
/// from app artifacts, so neither is ever served as the other.
pub const AGENT_BINARIES_DIR: &str = "agent-binaries";
/// Size of each chunk sent to agents: far below gRPC's 4 MiB message limit,
/// large enough that a 20 MB artifact is ~80 messages.
pub const CHUNK_SIZE: usize = 256 * 1024;
/// Chunks read ahead of a slow agent; bounds memory per download.
const CHUNKS_AHEAD: usize = 4;
/// Largest artifact accepted: the agents' default `[artifacts] max_size`.
pub const MAX_ARTIFACT_SIZE: u64 = 2 * 1024 * 1024 * 1024;

/// Errors of the artifact store.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// A digest that is not 64 lowercase hex characters.
    #[error("invalid sha256 {}: expected 64 lowercase hex characters", slipway_proto::limits::shown(.0))]
    BadDigest(String),
    /// No artifact with this digest is stored.
    #[error("no artifact with sha256 {0}")]
    NotFound(String),
    /// The uploaded bytes do not hash to the declared digest.
    #[error("artifact sha256 mismatch: declared {declared}, received {actual} ({bytes} bytes)")]
    Mismatch {
        /// What the client said.
        declared: String,
        /// What the bytes hash to.
        actual: String,
        /// How many bytes were received.
        bytes: u64,
    },
    /// The upload's declared size is over [`MAX_ARTIFACT_SIZE`].
    #[error("artifact size {0} bytes is over the limit of {MAX_ARTIFACT_SIZE}")]
    TooLarge(u64),
    /// The bytes received are not as many as the upload declared.
    #[error("upload declared {declared} bytes but sent {received} bytes or more")]
    SizeMismatch {
        /// What the client said.
        declared: u64,
        /// What came (so far).
        received: u64,
    },
    /// The store holds the digest with another size than the client's file:
    /// the client's file is not the artifact of that digest.
    #[error(
        "the controller holds artifact {sha256} with {stored} bytes, but the upload \
         declares {declared} bytes: the file given is not the artifact of that digest"
    )]
    NotThatArtifact {
        /// The digest.
        sha256: String,
        /// Size of the stored artifact.
        stored: u64,
        /// Size the client declared.
        declared: u64,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

impl From<ArtifactError> for Status {
    fn from(err: ArtifactError) -> Self {
        match err {
            ArtifactError::BadDigest(_)
            | ArtifactError::Mismatch { .. }
            | ArtifactError::TooLarge(_)
            | ArtifactError::SizeMismatch { .. }
            | ArtifactError::NotThatArtifact { .. } => Status::invalid_argument(err.to_string()),
            ArtifactError::NotFound(_) => Status::not_found(err.to_string()),
            ArtifactError::Io { .. } => {
                tracing::error!(%err, "artifact store");
                Status::internal("artifact store failed inside the controller; see its log")
            }
        }
    }
}

/// Checks that `sha256` is a digest as stored (64 lowercase hex), so it can
/// never name a path outside the store.
pub fn check_digest(sha256: &str) -> Result<(), ArtifactError> {
    slipway_proto::limits::check_sha256("sha256", sha256)
        .map_err(|_| ArtifactError::BadDigest(sha256.to_owned()))
}

/// Turns an I/O error on `path` into [`ArtifactError::Io`].
fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ArtifactError {
    let path = path.to_owned();
    move |source| ArtifactError::Io { path, source }
}

/// The store; cheap to clone.
#[derive(Debug, Clone)]
pub struct Artifacts {
    dir: PathBuf,
}

impl Artifacts {
    /// The store under `data_dir` (the directory is created on first upload).
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join(ARTIFACTS_DIR),
        }
    }

    /// The store of agent binaries beside this one (`agent-binaries/`).
    pub fn agent_binaries(&self) -> Self {
        Self {
            dir: self.dir.with_file_name(AGENT_BINARIES_DIR),
        }
    }

    /// Where the artifact with this (checked) digest lives.
    pub fn path(&self, sha256: &str) -> Result<PathBuf, ArtifactError> {
        check_digest(sha256)?;
        Ok(self.dir.join(sha256))
    }

    /// True if the artifact is stored.
    pub async fn contains(&self, sha256: &str) -> Result<bool, ArtifactError> {
        let path = self.path(sha256)?;
        Ok(tokio::fs::metadata(&path).await.is_ok_and(|m| m.is_file()))
    }

    /// Size of a stored artifact.
    pub async fn size(&self, sha256: &str) -> Result<u64, ArtifactError> {
        let path = self.path(sha256)?;
        match tokio::fs::metadata(&path).await {
            Ok(meta) if meta.is_file() => Ok(meta.len()),
            Ok(_) => Err(ArtifactError::NotFound(sha256.to_owned())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                Err(ArtifactError::NotFound(sha256.to_owned()))
            }
            Err(source) => Err(ArtifactError::Io { path, source }),
        }
    }

    /// Streams the artifact in [`CHUNK_SIZE`] pieces with offsets, `last`
    /// set on the final one (an empty artifact is one empty, last chunk).
    /// Fails at once if it is not stored.
    pub async fn chunks(
        &self,
        sha256: &str,
        command_id: &str,
    ) -> Result<ReceiverStream<Result<ArtifactChunk, Status>>, ArtifactError> {
        let path = self.path(sha256)?;
        let mut file = match File::open(&path).await {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(ArtifactError::NotFound(sha256.to_owned()))
            }
            Err(source) => return Err(ArtifactError::Io { path, source }),
        };
        let size = file.metadata().await.map_err(io_err(&path))?.len();
        let (tx, rx) = mpsc::channel(CHUNKS_AHEAD);
        let command_id = command_id.to_owned();
        tokio::spawn(async move {
            let mut offset = 0u64;
            loop {
                let mut data = Vec::with_capacity(CHUNK_SIZE);
                let read = (&mut file)
                    .take(CHUNK_SIZE as u64)
                    .read_to_end(&mut data)
                    .await;
                let chunk = match read {
                    Ok(n) => {
                        let last = offset + n as u64 >= size || n == 0;
                        let chunk = ArtifactChunk {
                            command_id: command_id.clone(),
                            offset,
                            data,
                            last,
                        };
                        offset += n as u64;
                        Ok(chunk)
                    }
                    Err(err) => {
                        tracing::error!(path = %path.display(), %err, "reading artifact");
                        Err(Status::internal("reading the artifact failed"))
                    }
                };
                let stop = chunk.as_ref().map_or(true, |c| c.last);
                if tx.send(chunk).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    /// Starts an upload of an artifact declared to have digest `sha256`
    /// and `size` bytes.
    pub async fn upload(&self, sha256: &str, size: u64) -> Result<Upload, ArtifactError> {
        check_digest(sha256)?;
        self.start(Some(sha256), size).await
    }

    /// Starts receiving `size` bytes whose digest is not known beforehand
    /// (a download the controller makes itself); [`Upload::finish_any`]
    /// stores it under the digest of what came.
    pub async fn receive(&self, size: u64) -> Result<Upload, ArtifactError> {
        self.start(None, size).await
    }

    async fn start(&self, sha256: Option<&str>, size: u64) -> Result<Upload, ArtifactError> {
        if size > MAX_ARTIFACT_SIZE {
            return Err(ArtifactError::TooLarge(size));
        }
        tokio::fs::create_dir_all(&self.dir)
            .await
            .map_err(io_err(&self.dir))?;
        let suffix = crate::pki::crypto::random_hex::<8>()
            .map_err(|e| io_err(&self.dir)(io::Error::other(e)))?;
        let temp = self.dir.join(format!(".upload-{suffix}"));
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .await
            .map_err(io_err(&temp))?;
        Ok(Upload {
            declared: sha256.map(str::to_owned),
            declared_size: size,
            dir: self.dir.clone(),
            temp: Some(temp),
            file,
            hasher: Sha256::new(),
            bytes: 0,
        })
    }
}

/// An upload in progress: bytes go to a temp file and into the hash. Dropped
/// unfinished, the temp file is removed.
#[derive(Debug)]
pub struct Upload {
    /// The digest the client declared (None: whatever comes, see
    /// [`Artifacts::receive`]).
    declared: Option<String>,
    /// Bytes the client said it sends: more is refused as it streams.
    declared_size: u64,
    /// The store's directory; the file lands at `<dir>/<sha256>`.
    dir: PathBuf,
    /// Removed on drop unless renamed into place.
    temp: Option<PathBuf>,
    file: File,
    hasher: Sha256,
    bytes: u64,
}

impl Upload {
    /// Appends bytes.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ArtifactError> {
        self.bytes += data.len() as u64;
        if self.bytes > self.declared_size {
            return Err(ArtifactError::SizeMismatch {
                declared: self.declared_size,
                received: self.bytes,
            });
        }
        self.hasher.update(data);
        self.file
            .write_all(data)
            .await
            .map_err(|source| ArtifactError::Io {
                path: self.temp.clone().unwrap_or_default(),
                source,
            })
    }

    /// Checks the digest and moves the file into the store; returns its size.
    pub async fn finish(self) -> Result<u64, ArtifactError> {
        self.finish_any().await.map(|(_, size)| size)
    }

    /// Checks the size (and the declared digest, if any) and moves the
    /// file into the store; returns its digest and size.
    pub async fn finish_any(mut self) -> Result<(String, u64), ArtifactError> {
        if self.bytes != self.declared_size {
            return Err(ArtifactError::SizeMismatch {
                declared: self.declared_size,
                received: self.bytes,
            });
        }
        let actual = hex::encode(std::mem::take(&mut self.hasher).finalize());
        if let Some(declared) = &self.declared {
            if actual != *declared {
                return Err(ArtifactError::Mismatch {
                    declared: declared.clone(),
                    actual,
                    bytes: self.bytes,
                });
            }
        }
        let temp = self.temp.clone().unwrap_or_default();
        self.file.sync_all().await.map_err(io_err(&temp))?;
        let dest = self.dir.join(&actual);
        tokio::fs::rename(&temp, &dest)
            .await
            .map_err(io_err(&dest))?;
        self.temp = None;
        Ok((actual, self.bytes))
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(temp) = self.temp.take() {
            let _ = std::fs::remove_file(temp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt as _;

    #[tokio::test]
    async fn upload_then_stream_back_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let store = Artifacts::new(dir.path());
        let data: Vec<u8> = (0..CHUNK_SIZE * 2 + 10).map(|i| (i % 251) as u8).collect();
        let sha = crate::pki::crypto::sha256_hex(&data);
        let mut up = store.upload(&sha, data.len() as u64).await.unwrap();
        for part in data.chunks(1000) {
            up.write(part).await.unwrap();
        }
        assert_eq!(up.finish().await.unwrap(), data.len() as u64);
        assert!(store.contains(&sha).await.unwrap());

        let chunks: Vec<_> = store
            .chunks(&sha, "c1")
            .await
            .unwrap()
            .map(Result::unwrap)
            .collect()
            .await;
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[1].offset, CHUNK_SIZE as u64);
        assert!(chunks[2].last && !chunks[1].last);
        let joined: Vec<u8> = chunks.into_iter().flat_map(|c| c.data).collect();
        assert_eq!(joined, data);
    }

    #[tokio::test]
    async fn mismatch_and_bad_digests_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Artifacts::new(dir.path());
        let sha = crate::pki::crypto::sha256_hex(b"right");
        let mut up = store.upload(&sha, 5).await.unwrap();
        up.write(b"wrong").await.unwrap();
        assert!(matches!(
            up.finish().await,
            Err(ArtifactError::Mismatch { .. })
        ));
        // More or fewer bytes than declared.
        let mut up = store.upload(&sha, 4).await.unwrap();
        assert!(matches!(
            up.write(b"right").await,
            Err(ArtifactError::SizeMismatch {
                declared: 4,
                received: 5
            })
        ));
        // The caller drops a failed upload; its temp file goes with it.
        drop(up);
        let mut up = store.upload(&sha, 6).await.unwrap();
        up.write(b"right").await.unwrap();
        assert!(matches!(
            up.finish().await,
            Err(ArtifactError::SizeMismatch { .. })
        ));
        assert!(matches!(
            store.upload(&sha, MAX_ARTIFACT_SIZE + 1).await,
            Err(ArtifactError::TooLarge(_))
        ));
        assert!(!store.contains(&sha).await.unwrap());
        // No temp file is left behind.
        let left = std::fs::read_dir(dir.path().join(ARTIFACTS_DIR))
            .unwrap()
            .count();
        assert_eq!(left, 0);
        assert!(store.path("../etc/passwd").is_err());
        assert!(matches!(
            store.chunks(&sha, "c").await,
            Err(ArtifactError::NotFound(_))
        ));
    }
}
