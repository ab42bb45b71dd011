//! The artifact store: content-addressed by sha256, in `<data_dir>/artifacts/`
//! and, for controller replicas, in a [`Shared`] store as well.
//!
//! Uploads ([`Upload`]) are written to a temp file in the local directory
//! while being hashed, checked against the declared digest, fsynced and
//! renamed into place, so a stored artifact is always complete and its name
//! is its sha256. With a shared store (`artifact_dir`, or the PostgreSQL
//! database when there is none) the upload is then published there, and
//! the local directory is this replica's cache of it: a replica asked for
//! an artifact it does not hold fetches it from the shared store, checking
//! the digest as it comes. Every read served to an agent
//! ([`Artifacts::chunks`]) checks the digest first: a corrupt cached copy is
//! dropped and fetched again, a corrupt shared copy is dropped (the next
//! upload stores it afresh), and neither is ever served. Nothing is ever
//! held whole in memory: agents download in [`CHUNK_SIZE`] pieces, the
//! database holds [`DB_CHUNK_SIZE`] ones.

use std::io::{self, Read as _, Write as _};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};
use slipway_proto::v1::ArtifactChunk;
use tokio::fs::File;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::store::{Backend, Store, StoreError};

/// Directory under the data dir holding the artifacts.
pub const ARTIFACTS_DIR: &str = "artifacts";
/// Directory under the data dir holding agent binaries for upgrades: apart
/// from app artifacts, so neither is ever served as the other.
pub const AGENT_BINARIES_DIR: &str = "agent-binaries";
/// Size of each chunk sent to agents: far below gRPC's 4 MiB message limit,
/// large enough that a 20 MB artifact is ~80 messages.
pub const CHUNK_SIZE: usize = 256 * 1024;
/// Size of each chunk row in the database: few rows per artifact, and one
/// row is all a replica holds in memory while copying.
pub const DB_CHUNK_SIZE: usize = 1024 * 1024;
/// Chunks read ahead of a slow agent; bounds memory per download.
const CHUNKS_AHEAD: usize = 4;
/// Largest artifact accepted: the agents' default `[artifacts] max_size`.
pub const MAX_ARTIFACT_SIZE: u64 = 2 * 1024 * 1024 * 1024;
/// Buffer for hashing and copying files.
const COPY_BUFFER: usize = 64 * 1024;

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
    /// A stored copy does not hash to its name (a disk or a database that
    /// changed it): it was dropped, never served.
    #[error(
        "the stored copy of artifact {sha256} in {place} is corrupt ({why}); it was dropped: \
         upload the artifact again"
    )]
    Corrupt {
        /// The digest.
        sha256: String,
        /// Where the copy was: a file, or `the database`.
        place: String,
        /// What is wrong with it.
        why: String,
    },
    /// The database holding the shared copies failed.
    #[error("artifact store: {0}")]
    Store(#[from] StoreError),
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
            ArtifactError::Corrupt { .. } => {
                tracing::error!(%err, "artifact store");
                Status::data_loss(err.to_string())
            }
            // Not in the cache and the database does not answer: worth
            // another try once it is back.
            ArtifactError::Store(ref store) if store.is_unavailable() => {
                tracing::warn!(%err, "artifact store");
                Status::unavailable(crate::store::DATABASE_UNAVAILABLE)
            }
            ArtifactError::Io { .. } | ArtifactError::Store(_) => {
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

/// Where replicas find the artifacts one of them was given.
#[derive(Debug, Clone)]
pub enum Shared {
    /// `artifact_dir`: a directory every replica mounts, holding
    /// `<dir>/artifacts/<sha256>` and `<dir>/agent-binaries/<sha256>`.
    Dir(PathBuf),
    /// The PostgreSQL store itself, in chunks (no `artifact_dir` set).
    Database(Store),
}

/// The store; cheap to clone.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// The local directory: the store itself, or this replica's cache of
    /// the shared one.
    dir: PathBuf,
    /// Which store: [`ARTIFACTS_DIR`] or [`AGENT_BINARIES_DIR`] (the
    /// directory name, and `kind` in the database).
    kind: &'static str,
    /// The store every replica sees, if any.
    shared: Option<Shared>,
}

impl Artifacts {
    /// The store under `data_dir` (the directory is created on first upload).
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join(ARTIFACTS_DIR),
            kind: ARTIFACTS_DIR,
            shared: None,
        }
    }

    /// The store `serve` uses: the data dir caching `artifact_dir` when it
    /// is set, else caching the database when that is PostgreSQL (shared
    /// by replicas), else the data dir alone (SQLite).
    pub fn for_serve(data_dir: &Path, artifact_dir: Option<&Path>, store: &Store) -> Self {
        let shared = match (artifact_dir, store.backend()) {
            (Some(dir), _) => Some(Shared::Dir(dir.to_owned())),
            (None, Backend::Postgres) => Some(Shared::Database(store.clone())),
            (None, Backend::Sqlite) => None,
        };
        Self {
            shared,
            ..Self::new(data_dir)
        }
    }

    /// This store, caching `shared`.
    pub fn with_shared(self, shared: Shared) -> Self {
        Self {
            shared: Some(shared),
            ..self
        }
    }

    /// The store of agent binaries beside this one (`agent-binaries/`).
    pub fn agent_binaries(&self) -> Self {
        Self {
            dir: self.dir.with_file_name(AGENT_BINARIES_DIR),
            kind: AGENT_BINARIES_DIR,
            shared: self.shared.clone(),
        }
    }

    /// Where the artifact with this (checked) digest lives locally.
    pub fn path(&self, sha256: &str) -> Result<PathBuf, ArtifactError> {
        check_digest(sha256)?;
        Ok(self.dir.join(sha256))
    }

    /// True if the artifact is stored (in the shared store, when there is
    /// one: a copy only in this replica's cache is not one the others see,
    /// so a client uploads it again and it is published).
    pub async fn contains(&self, sha256: &str) -> Result<bool, ArtifactError> {
        match self.size(sha256).await {
            Ok(_) => Ok(true),
            Err(ArtifactError::NotFound(_)) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// Size of a stored artifact (in the shared store, when there is one).
    pub async fn size(&self, sha256: &str) -> Result<u64, ArtifactError> {
        let path = self.path(sha256)?;
        match &self.shared {
            None => file_size(&path, sha256).await,
            Some(Shared::Dir(root)) => file_size(&root.join(self.kind).join(sha256), sha256).await,
            Some(Shared::Database(store)) => {
                match store.stored_artifact(self.kind, sha256).await? {
                    Some(row) => Ok(u64::try_from(row.size).unwrap_or(u64::MAX)),
                    None => Err(ArtifactError::NotFound(sha256.to_owned())),
                }
            }
        }
    }

    /// Streams the artifact in [`CHUNK_SIZE`] pieces with offsets, `last`
    /// set on the final one (an empty artifact is one empty, last chunk).
    /// The local copy is checked against the digest first (fetched from
    /// the shared store when missing or corrupt); the bytes are hashed
    /// again as they are sent and the last chunk is withheld, with an
    /// error, if they changed meanwhile. Fails at once if it is not stored.
    pub async fn chunks(
        &self,
        sha256: &str,
        command_id: &str,
    ) -> Result<ReceiverStream<Result<ArtifactChunk, Status>>, ArtifactError> {
        let path = self.cached(sha256).await?;
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
        let sha256 = sha256.to_owned();
        tokio::spawn(async move {
            let mut offset = 0u64;
            let mut hasher = Sha256::new();
            loop {
                let mut data = Vec::with_capacity(CHUNK_SIZE);
                let read = (&mut file)
                    .take(CHUNK_SIZE as u64)
                    .read_to_end(&mut data)
                    .await;
                let chunk = match read {
                    Ok(n) => {
                        hasher.update(&data);
                        let last = offset + n as u64 >= size || n == 0;
                        let actual = last.then(|| hex::encode(hasher.clone().finalize()));
                        match actual {
                            Some(actual) if actual != sha256 => {
                                tracing::error!(
                                    path = %path.display(), %sha256, %actual,
                                    "artifact changed on disk while being sent; dropped"
                                );
                                let _ = tokio::fs::remove_file(&path).await;
                                Err(Status::data_loss(format!(
                                    "artifact {sha256} changed on the controller's disk while \
                                     being sent; it was dropped: fetch it again"
                                )))
                            }
                            _ => {
                                let chunk = ArtifactChunk {
                                    command_id: command_id.clone(),
                                    offset,
                                    data,
                                    last,
                                };
                                offset += n as u64;
                                Ok(chunk)
                            }
                        }
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

    /// The local copy of the artifact, checked against its digest: a
    /// corrupt copy is dropped, and a missing or dropped one fetched from
    /// the shared store (checked as it comes).
    async fn cached(&self, sha256: &str) -> Result<PathBuf, ArtifactError> {
        let path = self.path(sha256)?;
        match hash_file(&path).await? {
            Some((actual, _)) if actual == sha256 => return Ok(path),
            Some((actual, size)) => {
                tracing::error!(
                    path = %path.display(), %sha256, %actual,
                    "cached artifact does not match its digest; dropped"
                );
                tokio::fs::remove_file(&path).await.map_err(io_err(&path))?;
                if self.shared.is_none() {
                    return Err(ArtifactError::Corrupt {
                        sha256: sha256.to_owned(),
                        place: path.display().to_string(),
                        why: format!("its {size} bytes have sha256 {actual}"),
                    });
                }
            }
            None if self.shared.is_none() => {
                return Err(ArtifactError::NotFound(sha256.to_owned()))
            }
            None => {}
        }
        self.fetch(sha256).await?;
        Ok(path)
    }

    /// Copies the artifact from the shared store into the local directory,
    /// checking its size and digest as it comes. A shared copy that fails
    /// the check is dropped.
    async fn fetch(&self, sha256: &str) -> Result<(), ArtifactError> {
        let local = Self {
            shared: None,
            ..self.clone()
        };
        match &self.shared {
            None => Err(ArtifactError::NotFound(sha256.to_owned())),
            Some(Shared::Dir(root)) => {
                let path = root.join(self.kind).join(sha256);
                let mut file = match File::open(&path).await {
                    Ok(file) => file,
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {
                        return Err(ArtifactError::NotFound(sha256.to_owned()))
                    }
                    Err(source) => return Err(ArtifactError::Io { path, source }),
                };
                let size = file.metadata().await.map_err(io_err(&path))?.len();
                let mut upload = local.start(Some(sha256), size).await?;
                let mut buf = vec![0; CHUNK_SIZE];
                let copied = async {
                    loop {
                        let n = file.read(&mut buf).await.map_err(io_err(&path))?;
                        if n == 0 {
                            break;
                        }
                        upload.write(&buf[..n]).await?;
                    }
                    upload.finish().await
                }
                .await;
                match copied {
                    Err(
                        err @ (ArtifactError::Mismatch { .. } | ArtifactError::SizeMismatch { .. }),
                    ) => {
                        tracing::error!(
                            path = %path.display(), %sha256, %err,
                            "shared artifact does not match its digest; dropped"
                        );
                        let _ = tokio::fs::remove_file(&path).await;
                        Err(ArtifactError::Corrupt {
                            sha256: sha256.to_owned(),
                            place: path.display().to_string(),
                            why: err.to_string(),
                        })
                    }
                    other => other.map(drop),
                }
            }
            Some(Shared::Database(store)) => {
                let Some(row) = store.stored_artifact(self.kind, sha256).await? else {
                    return Err(ArtifactError::NotFound(sha256.to_owned()));
                };
                let corrupt = |why: String| ArtifactError::Corrupt {
                    sha256: sha256.to_owned(),
                    place: "the database".to_owned(),
                    why,
                };
                let copied = async {
                    let size = u64::try_from(row.size)
                        .map_err(|_| corrupt(format!("its row records {} bytes", row.size)))?;
                    if size > MAX_ARTIFACT_SIZE {
                        return Err(ArtifactError::TooLarge(size));
                    }
                    if row.chunks != db_chunks(size) {
                        return Err(corrupt(format!(
                            "its row records {size} bytes in {} chunks, not {}",
                            row.chunks,
                            db_chunks(size)
                        )));
                    }
                    let mut upload = local.start(Some(sha256), size).await?;
                    for idx in 0..row.chunks {
                        let want =
                            (size - idx as u64 * DB_CHUNK_SIZE as u64).min(DB_CHUNK_SIZE as u64);
                        match store.artifact_chunk(self.kind, sha256, idx).await? {
                            Some(data) if data.len() as u64 == want => {
                                upload.write(&data).await?;
                            }
                            Some(data) => {
                                return Err(corrupt(format!(
                                    "chunk {idx} has {} bytes, expected {want}",
                                    data.len()
                                )))
                            }
                            None => return Err(corrupt(format!("chunk {idx} is missing"))),
                        }
                    }
                    upload.finish().await.map(drop)
                }
                .await;
                let err = match copied {
                    Err(err @ ArtifactError::Corrupt { .. }) => err,
                    Err(
                        err @ (ArtifactError::Mismatch { .. }
                        | ArtifactError::SizeMismatch { .. }
                        | ArtifactError::TooLarge(_)),
                    ) => corrupt(err.to_string()),
                    other => return other,
                };
                tracing::error!(
                    %sha256, kind = self.kind, %err,
                    "artifact in the database does not match its digest; dropped"
                );
                store.delete_artifact(self.kind, sha256).await?;
                Err(err)
            }
        }
    }

    /// Copies the artifact just stored locally at `path` into the shared
    /// store, unless it holds it already (content-addressed: the same name
    /// is the same bytes, and a corrupt copy is caught by its reader).
    async fn publish(&self, sha256: &str, path: &Path, size: u64) -> Result<(), ArtifactError> {
        match &self.shared {
            None => Ok(()),
            Some(Shared::Dir(root)) => {
                let dir = root.join(self.kind);
                let dest = dir.join(sha256);
                if file_size(&dest, sha256).await.ok() == Some(size) {
                    return Ok(());
                }
                let (source, sha256) = (path.to_owned(), sha256.to_owned());
                tokio::task::spawn_blocking(move || copy_atomically(&source, &dir, &sha256))
                    .await
                    .map_err(|e| io_err(path)(io::Error::other(e)))?
            }
            Some(Shared::Database(store)) => {
                if store.stored_artifact(self.kind, sha256).await?.is_some() {
                    return Ok(());
                }
                let mut file = File::open(path).await.map_err(io_err(path))?;
                let mut hasher = Sha256::new();
                let mut idx = 0i64;
                loop {
                    let mut data = Vec::with_capacity(DB_CHUNK_SIZE);
                    let n = (&mut file)
                        .take(DB_CHUNK_SIZE as u64)
                        .read_to_end(&mut data)
                        .await
                        .map_err(io_err(path))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&data);
                    store
                        .put_artifact_chunk(self.kind, sha256, idx, &data)
                        .await?;
                    idx += 1;
                }
                let actual = hex::encode(hasher.finalize());
                if actual != sha256 {
                    return Err(ArtifactError::Corrupt {
                        sha256: sha256.to_owned(),
                        place: path.display().to_string(),
                        why: format!("it changed while copied: its bytes have sha256 {actual}"),
                    });
                }
                let size = i64::try_from(size).map_err(|_| ArtifactError::TooLarge(size))?;
                store
                    .finish_artifact(self.kind, sha256, size, idx, now_secs())
                    .await?;
                Ok(())
            }
        }
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
            store: self.clone(),
            temp: Some(temp),
            file,
            hasher: Sha256::new(),
            bytes: 0,
        })
    }
}

/// The row's chunk count for an artifact of `size` bytes.
fn db_chunks(size: u64) -> i64 {
    i64::try_from(size.div_ceil(DB_CHUNK_SIZE as u64)).unwrap_or(i64::MAX)
}

/// Seconds since the epoch.
fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Size of the file at `path`, [`ArtifactError::NotFound`] naming
/// `sha256` if there is none.
async fn file_size(path: &Path, sha256: &str) -> Result<u64, ArtifactError> {
    match tokio::fs::metadata(path).await {
        Ok(meta) if meta.is_file() => Ok(meta.len()),
        Ok(_) => Err(ArtifactError::NotFound(sha256.to_owned())),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            Err(ArtifactError::NotFound(sha256.to_owned()))
        }
        Err(source) => Err(ArtifactError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// The sha256 (hex) and size of the file at `path`, `None` if there is no
/// file. A file over [`MAX_ARTIFACT_SIZE`] is hashed no further than that
/// (it cannot be a stored artifact, so its digest cannot match).
async fn hash_file(path: &Path) -> Result<Option<(String, u64)>, ArtifactError> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ArtifactError::Io { path, source }),
        };
        let mut reader = file.take(MAX_ARTIFACT_SIZE + 1);
        let mut hasher = Sha256::new();
        let mut buf = vec![0; COPY_BUFFER];
        let mut size = 0u64;
        loop {
            let n = reader.read(&mut buf).map_err(io_err(&path))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            hasher.update(&buf[..n]);
        }
        Ok(Some((hex::encode(hasher.finalize()), size)))
    })
    .await
    .map_err(|e| ArtifactError::Io {
        path: PathBuf::new(),
        source: io::Error::other(e),
    })?
}

/// Copies `source` to `<dir>/<sha256>` so that the name only ever holds
/// the whole file: a temp file in `dir`, written, checked against
/// `sha256`, fsynced, renamed over the name, the directory fsynced. Two
/// replicas doing this at once each rename a complete copy of the same
/// bytes into place. Blocking.
fn copy_atomically(source: &Path, dir: &Path, sha256: &str) -> Result<(), ArtifactError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let suffix =
        crate::pki::crypto::random_hex::<8>().map_err(|e| io_err(dir)(io::Error::other(e)))?;
    let temp = dir.join(format!(".upload-{suffix}"));
    let copied = (|| {
        let mut from = std::fs::File::open(source).map_err(io_err(source))?;
        let mut to = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(io_err(&temp))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0; COPY_BUFFER];
        let mut bytes = 0u64;
        loop {
            let n = from.read(&mut buf).map_err(io_err(source))?;
            if n == 0 {
                break;
            }
            bytes += n as u64;
            hasher.update(&buf[..n]);
            to.write_all(&buf[..n]).map_err(io_err(&temp))?;
        }
        let actual = hex::encode(hasher.finalize());
        if actual != sha256 {
            return Err(ArtifactError::Corrupt {
                sha256: sha256.to_owned(),
                place: source.display().to_string(),
                why: format!("it changed while copied: its {bytes} bytes have sha256 {actual}"),
            });
        }
        to.sync_all().map_err(io_err(&temp))?;
        let dest = dir.join(sha256);
        std::fs::rename(&temp, &dest).map_err(io_err(&dest))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))
    })();
    if copied.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    copied
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
    /// The store: the file lands at `<dir>/<sha256>`, then is published to
    /// its shared store.
    store: Artifacts,
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

    /// Checks the size (and the declared digest, if any), moves the file
    /// into the store and publishes it to the shared store; returns its
    /// digest and size.
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
        let dest = self.store.dir.join(&actual);
        tokio::fs::rename(&temp, &dest)
            .await
            .map_err(io_err(&dest))?;
        self.temp = None;
        self.store.publish(&actual, &dest, self.bytes).await?;
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

    /// Stores `data` through `store`, as an upload from a client does.
    async fn put(store: &Artifacts, data: &[u8]) -> String {
        let sha = crate::pki::crypto::sha256_hex(data);
        let mut up = store.upload(&sha, data.len() as u64).await.unwrap();
        for part in data.chunks(100_000) {
            up.write(part).await.unwrap();
        }
        up.finish().await.unwrap();
        sha
    }

    /// All of the artifact as `store` serves it to an agent.
    async fn served(store: &Artifacts, sha: &str) -> Result<Vec<u8>, ArtifactError> {
        let chunks: Vec<_> = store.chunks(sha, "c").await?.collect().await;
        let mut data = Vec::new();
        for chunk in chunks {
            data.extend(
                chunk
                    .map_err(|s| ArtifactError::NotFound(s.message().to_owned()))?
                    .data,
            );
        }
        Ok(data)
    }

    /// Files in `dir` whose name starts with a dot (temp files).
    fn temp_files(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect()
    }

    #[tokio::test]
    async fn a_corrupt_local_file_is_dropped_never_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = Artifacts::new(dir.path());
        let sha = put(&store, b"the release").await;
        assert_eq!(served(&store, &sha).await.unwrap(), b"the release");
        // Same size, other bytes: only the digest can tell.
        std::fs::write(store.path(&sha).unwrap(), b"the relea5e").unwrap();
        let err = served(&store, &sha).await.unwrap_err();
        assert!(
            matches!(&err, ArtifactError::Corrupt { sha256, .. } if *sha256 == sha),
            "{err}"
        );
        assert!(
            err.to_string().contains("upload the artifact again"),
            "{err}"
        );
        assert!(!store.contains(&sha).await.unwrap());
        // Uploading again repairs it.
        put(&store, b"the release").await;
        assert_eq!(served(&store, &sha).await.unwrap(), b"the release");
    }

    #[tokio::test]
    async fn replicas_share_a_directory_each_caching_it() {
        let (a_dir, b_dir, shared) = (
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
            tempfile::tempdir().unwrap(),
        );
        let a = Artifacts::new(a_dir.path()).with_shared(Shared::Dir(shared.path().into()));
        let b = Artifacts::new(b_dir.path()).with_shared(Shared::Dir(shared.path().into()));
        let data: Vec<u8> = (0..CHUNK_SIZE * 3 + 7).map(|i| (i % 253) as u8).collect();
        let sha = put(&a, &data).await;
        let shared_file = shared.path().join(ARTIFACTS_DIR).join(&sha);
        assert_eq!(std::fs::read(&shared_file).unwrap(), data);
        assert!(temp_files(&shared.path().join(ARTIFACTS_DIR)).is_empty());
        // B sees it, fetches it into its cache and serves it.
        assert_eq!(b.size(&sha).await.unwrap(), data.len() as u64);
        assert!(!b.path(&sha).unwrap().exists());
        assert_eq!(served(&b, &sha).await.unwrap(), data);
        assert_eq!(std::fs::read(b.path(&sha).unwrap()).unwrap(), data);
        // Not an agent binary.
        assert!(matches!(
            b.agent_binaries().chunks(&sha, "c").await,
            Err(ArtifactError::NotFound(_))
        ));
        // B's cached copy corrupted on disk: dropped and fetched again.
        let mut bad = data.clone();
        bad[5] ^= 1;
        std::fs::write(b.path(&sha).unwrap(), &bad).unwrap();
        assert_eq!(served(&b, &sha).await.unwrap(), data);
        assert_eq!(std::fs::read(b.path(&sha).unwrap()).unwrap(), data);
        // The shared copy corrupted and B's cache gone: never served, the
        // shared copy dropped, the error names the digest.
        std::fs::write(&shared_file, &bad).unwrap();
        std::fs::remove_file(b.path(&sha).unwrap()).unwrap();
        let err = served(&b, &sha).await.unwrap_err();
        assert!(
            matches!(&err, ArtifactError::Corrupt { sha256, .. } if *sha256 == sha),
            "{err}"
        );
        assert!(!shared_file.exists());
        assert!(!b.path(&sha).unwrap().exists());
        assert!(!a.contains(&sha).await.unwrap());
        // A still serves its own verified copy; an upload publishes again.
        assert_eq!(served(&a, &sha).await.unwrap(), data);
        put(&a, &data).await;
        assert_eq!(served(&b, &sha).await.unwrap(), data);
        // Unknown digest: a clear error naming it.
        let missing = "0".repeat(64);
        let err = b.chunks(&missing, "c").await.unwrap_err();
        assert!(err.to_string().contains(&missing), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn two_replicas_writing_one_artifact_at_once_into_the_directory() {
        let shared = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..CHUNK_SIZE * 8).map(|i| (i % 241) as u8).collect();
        let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
        let uploads: Vec<_> = dirs
            .iter()
            .map(|d| {
                let store = Artifacts::new(d.path()).with_shared(Shared::Dir(shared.path().into()));
                let data = data.clone();
                tokio::spawn(async move { put(&store, &data).await })
            })
            .collect();
        let mut shas = Vec::new();
        for upload in uploads {
            shas.push(upload.await.unwrap());
        }
        assert!(shas.windows(2).all(|w| w[0] == w[1]));
        let dir = shared.path().join(ARTIFACTS_DIR);
        assert_eq!(std::fs::read(dir.join(&shas[0])).unwrap(), data);
        assert!(temp_files(&dir).is_empty());
    }

    #[test]
    fn an_atomic_copy_that_does_not_match_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("src");
        std::fs::write(&source, b"bytes").unwrap();
        let shared = dir.path().join("shared");
        let claimed = crate::pki::crypto::sha256_hex(b"other bytes");
        let err = copy_atomically(&source, &shared, &claimed).unwrap_err();
        assert!(matches!(err, ArtifactError::Corrupt { .. }), "{err}");
        assert_eq!(std::fs::read_dir(&shared).unwrap().count(), 0);
        let right = crate::pki::crypto::sha256_hex(b"bytes");
        copy_atomically(&source, &shared, &right).unwrap();
        assert_eq!(std::fs::read(shared.join(&right)).unwrap(), b"bytes");
        assert!(temp_files(&shared).is_empty());
    }

    crate::store::testing::store_tests!(
        replicas_share_artifacts_through_the_database,
        two_replicas_storing_one_artifact_at_once_in_the_database,
        a_corrupt_chunk_in_the_database_is_caught_by_the_digest,
        the_database_store_keeps_the_size_limit
    );

    /// Two replicas (own data dirs) on `store`.
    fn replicas(store: &Store) -> (Artifacts, Artifacts, [tempfile::TempDir; 2]) {
        let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
        let a = Artifacts::new(dirs[0].path()).with_shared(Shared::Database(store.clone()));
        let b = Artifacts::new(dirs[1].path()).with_shared(Shared::Database(store.clone()));
        (a, b, dirs)
    }

    async fn replicas_share_artifacts_through_the_database(store: Store) {
        let (a, b, _dirs) = replicas(&store);
        // Over two database chunks, not a whole number of them.
        let data: Vec<u8> = (0..DB_CHUNK_SIZE * 2 + 5)
            .map(|i| (i % 239) as u8)
            .collect();
        let sha = put(&a, &data).await;
        let row = store
            .stored_artifact(ARTIFACTS_DIR, &sha)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((row.size, row.chunks), (data.len() as i64, 3));
        assert!(b.contains(&sha).await.unwrap());
        assert_eq!(served(&b, &sha).await.unwrap(), data);
        assert_eq!(std::fs::read(b.path(&sha).unwrap()).unwrap(), data);
        // An empty artifact: no chunk, one empty last message.
        let empty = put(&a, b"").await;
        assert_eq!(
            store
                .stored_artifact(ARTIFACTS_DIR, &empty)
                .await
                .unwrap()
                .unwrap()
                .chunks,
            0
        );
        assert_eq!(served(&b, &empty).await.unwrap(), b"");
        // Agent binaries are their own store.
        let bin = put(&a.agent_binaries(), b"agent").await;
        assert!(!b.contains(&bin).await.unwrap());
        assert_eq!(served(&b.agent_binaries(), &bin).await.unwrap(), b"agent");
        let missing = "1".repeat(64);
        let err = b.chunks(&missing, "c").await.unwrap_err();
        assert!(
            matches!(&err, ArtifactError::NotFound(s) if *s == missing),
            "{err}"
        );
    }

    async fn two_replicas_storing_one_artifact_at_once_in_the_database(store: Store) {
        let (a, b, _dirs) = replicas(&store);
        let data: Vec<u8> = (0..DB_CHUNK_SIZE * 3).map(|i| (i % 233) as u8).collect();
        let (sha_a, sha_b) = tokio::join!(put(&a, &data), put(&b, &data));
        assert_eq!(sha_a, sha_b);
        let (_, c_dir) = (a, tempfile::tempdir().unwrap());
        let c = Artifacts::new(c_dir.path()).with_shared(Shared::Database(store.clone()));
        assert_eq!(served(&c, &sha_a).await.unwrap(), data);
    }

    async fn a_corrupt_chunk_in_the_database_is_caught_by_the_digest(store: Store) {
        let (a, b, _dirs) = replicas(&store);
        let data: Vec<u8> = (0..DB_CHUNK_SIZE + 10).map(|i| (i % 229) as u8).collect();
        let sha = put(&a, &data).await;
        // Same length, one bit off: only the digest can tell.
        let mut bad = data[DB_CHUNK_SIZE..].to_vec();
        bad[0] ^= 1;
        store
            .put_artifact_chunk(ARTIFACTS_DIR, &sha, 1, &bad)
            .await
            .unwrap();
        let err = served(&b, &sha).await.unwrap_err();
        assert!(
            matches!(&err, ArtifactError::Corrupt { sha256, place, .. }
                if *sha256 == sha && place == "the database"),
            "{err}"
        );
        // Dropped, never cached: an upload stores it afresh.
        assert!(!b.path(&sha).unwrap().exists());
        assert_eq!(
            store.stored_artifact(ARTIFACTS_DIR, &sha).await.unwrap(),
            None
        );
        put(&b, &data).await;
        let c_dir = tempfile::tempdir().unwrap();
        let c = Artifacts::new(c_dir.path()).with_shared(Shared::Database(store.clone()));
        assert_eq!(served(&c, &sha).await.unwrap(), data);
        // A chunk of the wrong length is caught before hashing.
        store
            .put_artifact_chunk(ARTIFACTS_DIR, &sha, 0, b"short")
            .await
            .unwrap();
        let d_dir = tempfile::tempdir().unwrap();
        let d = Artifacts::new(d_dir.path()).with_shared(Shared::Database(store.clone()));
        let err = served(&d, &sha).await.unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("chunk 0 has 5 bytes, expected {DB_CHUNK_SIZE}")),
            "{err}"
        );
    }

    async fn the_database_store_keeps_the_size_limit(store: Store) {
        let (a, b, _dirs) = replicas(&store);
        let sha = "2".repeat(64);
        assert!(matches!(
            a.upload(&sha, MAX_ARTIFACT_SIZE + 1).await,
            Err(ArtifactError::TooLarge(_))
        ));
        // A row claiming more than the limit is not fetched.
        store
            .put_artifact_chunk(ARTIFACTS_DIR, &sha, 0, b"x")
            .await
            .unwrap();
        store
            .finish_artifact(ARTIFACTS_DIR, &sha, 1, 1, 0)
            .await
            .unwrap();
        let big = i64::try_from(MAX_ARTIFACT_SIZE + 1).unwrap();
        sqlx::query("UPDATE stored_artifacts SET size = $1 WHERE sha256 = $2")
            .bind(big)
            .bind(&sha)
            .execute(store.pool_for_tests())
            .await
            .unwrap();
        let err = served(&b, &sha).await.unwrap_err();
        assert!(err.to_string().contains("over the limit"), "{err}");
        assert!(!b.path(&sha).unwrap().exists());
    }
}
