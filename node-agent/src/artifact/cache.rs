//! An app's artifact cache, `.slipway/cache/<sha256>`, and the one way into
//! it.
//!
//! Every artifact a deploy uses is in the cache first, under its digest:
//! copied from a local file ([`copy_file`]), downloaded from an HTTPS URL
//! ([`super::https`]) or fetched from the controller
//! ([`super::controller`]). Each comes in through an [`Incoming`]: a temp
//! file in the cache, hashed as it is written and bounded by a limit, that
//! takes its name `<sha256>` only once it is complete, synced and verified
//! — and is removed otherwise, on drop too, so a fetch that fails or is
//! cancelled leaves nothing behind. A digest already cached is re-hashed
//! before it is used ([`lookup`]); a damaged entry is removed so a fresh
//! copy can take its place.
//!
//! Fetches run without the app's lock; whoever starts one pins the cache
//! first ([`crate::release::Store::pin_cache`]), so a concurrent prune
//! removes neither the temp file nor the result.

use std::fs::{self, File};
use std::io::{self, Read, Write as _};
use std::path::{Path, PathBuf};

use tokio::io::AsyncWriteExt as _;

use crate::digest::{Hasher, Sha256};
use crate::durable::{self, TempFile};

/// Bytes read at a time when copying a local artifact in.
const COPY_BUF: usize = 256 << 10;

/// An artifact in the cache, ready for a deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// `<cache>/<sha256>`.
    pub path: PathBuf,
    pub sha256: Sha256,
    pub bytes: u64,
    /// True when the digest was already cached and nothing was fetched.
    pub cached: bool,
}

/// Why an artifact did not make it into the cache. Each fetch words these
/// for its own source (a URL, the controller, a file).
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// More bytes came than the limit allows.
    #[error("more than {limit} bytes were sent")]
    TooLarge { limit: u64 },
    /// The bytes are not the artifact asked for.
    #[error("received bytes have sha256 {actual}, expected {expected}")]
    Digest { expected: Sha256, actual: Sha256 },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl CacheError {
    fn io(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_owned();
        move |source| Self::Io {
            action,
            path,
            source,
        }
    }
}

/// The artifact with digest `expected` if the cache holds it intact
/// (blocking: it is hashed again); a damaged entry is removed.
pub fn lookup(cache: &Path, expected: &Sha256) -> Result<Option<Fetched>, CacheError> {
    let path = cache.join(expected);
    if !path.is_file() {
        return Ok(None);
    }
    let actual = Sha256::of_file(&path).map_err(CacheError::io("read", &path))?;
    if actual != *expected {
        fs::remove_file(&path).map_err(CacheError::io("remove", &path))?;
        return Ok(None);
    }
    let bytes = fs::metadata(&path)
        .map_err(CacheError::io("stat", &path))?
        .len();
    Ok(Some(Fetched {
        path,
        sha256: actual,
        bytes,
        cached: true,
    }))
}

/// Copies the local artifact `src` into the cache (blocking), unless the
/// cache already holds `expected` intact; without `expected` the copy is
/// named by the digest it turns out to have.
pub fn copy_file(
    cache: &Path,
    src: &Path,
    expected: Option<&Sha256>,
) -> Result<Fetched, CacheError> {
    if let Some(e) = expected {
        if let Some(hit) = lookup(cache, e)? {
            return Ok(hit);
        }
    }
    let mut input = File::open(src).map_err(CacheError::io("open artifact", src))?;
    if !input
        .metadata()
        .map_err(CacheError::io("stat artifact", src))?
        .is_file()
    {
        return Err(CacheError::io("read artifact", src)(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let mut incoming = Incoming::<File>::create(cache, expected, u64::MAX)?;
    let mut buf = vec![0u8; COPY_BUF];
    loop {
        let n = input
            .read(&mut buf)
            .map_err(CacheError::io("read artifact", src))?;
        if n == 0 {
            break;
        }
        incoming.write(&buf[..n])?;
    }
    incoming.finish()
}

/// An artifact on its way into the cache (see the module docs). `F` is the
/// file it is written through: `std::fs::File` on a blocking thread,
/// `tokio::fs::File` in async code; the checks are the same.
#[derive(Debug)]
pub struct Incoming<F> {
    /// Removed unless the artifact is verified and named.
    tmp: TempFile,
    file: F,
    hasher: Hasher,
    received: u64,
    limit: u64,
    cache: PathBuf,
    /// What the bytes must hash to; `None` names them by their digest.
    expected: Option<Sha256>,
}

impl<F> Incoming<F> {
    fn new(cache: &Path, file: F, tmp: TempFile, expected: Option<&Sha256>, limit: u64) -> Self {
        Self {
            tmp,
            file,
            hasher: Hasher::new(),
            received: 0,
            limit,
            cache: cache.to_owned(),
            expected: expected.cloned(),
        }
    }

    fn temp_path(cache: &Path) -> TempFile {
        TempFile::new(durable::temp_sibling(&cache.join("incoming"), "part"))
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Counts and hashes `data`, refusing it past the limit.
    fn take(&mut self, data: &[u8]) -> Result<(), CacheError> {
        let received = self.received.saturating_add(data.len() as u64);
        if received > self.limit {
            return Err(CacheError::TooLarge { limit: self.limit });
        }
        self.received = received;
        self.hasher.update(data);
        Ok(())
    }

    /// Checks the digest of the (synced, closed) temp file and gives it its
    /// name.
    fn name(self) -> Result<Fetched, CacheError> {
        let actual = self.hasher.finish();
        if let Some(expected) = self.expected {
            if actual != expected {
                return Err(CacheError::Digest { expected, actual });
            }
        }
        let path = self.cache.join(&actual);
        self.tmp
            .persist(&path)
            .map_err(CacheError::io("store", &path))?;
        Ok(Fetched {
            path,
            sha256: actual,
            bytes: self.received,
            cached: false,
        })
    }
}

impl Incoming<File> {
    /// Starts an artifact in `cache` (blocking) that must hash to
    /// `expected` (when given) and stay within `limit` bytes.
    pub fn create(cache: &Path, expected: Option<&Sha256>, limit: u64) -> Result<Self, CacheError> {
        fs::create_dir_all(cache).map_err(CacheError::io("create", cache))?;
        let tmp = Self::temp_path(cache);
        let file = File::create(tmp.path()).map_err(CacheError::io("create", tmp.path()))?;
        Ok(Self::new(cache, file, tmp, expected, limit))
    }

    /// Appends `data` (blocking).
    pub fn write(&mut self, data: &[u8]) -> Result<(), CacheError> {
        self.take(data)?;
        self.file
            .write_all(data)
            .map_err(CacheError::io("write", self.tmp.path()))
    }

    /// Syncs, verifies and names the artifact (blocking).
    pub fn finish(self) -> Result<Fetched, CacheError> {
        self.file
            .sync_all()
            .map_err(CacheError::io("sync", self.tmp.path()))?;
        self.name()
    }
}

impl Incoming<tokio::fs::File> {
    /// [`Incoming::create`] for async code.
    pub async fn create_async(
        cache: &Path,
        expected: Option<&Sha256>,
        limit: u64,
    ) -> Result<Self, CacheError> {
        tokio::fs::create_dir_all(cache)
            .await
            .map_err(CacheError::io("create", cache))?;
        let tmp = Self::temp_path(cache);
        let file = tokio::fs::File::create(tmp.path())
            .await
            .map_err(CacheError::io("create", tmp.path()))?;
        Ok(Self::new(cache, file, tmp, expected, limit))
    }

    /// Appends `data`.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), CacheError> {
        self.take(data)?;
        self.file
            .write_all(data)
            .await
            .map_err(CacheError::io("write", self.tmp.path()))
    }

    /// Syncs, verifies and names the artifact.
    pub async fn finish(mut self) -> Result<Fetched, CacheError> {
        // tokio writes in the background: flush, then sync what landed.
        self.file
            .flush()
            .await
            .map_err(CacheError::io("write", self.tmp.path()))?;
        self.file
            .sync_all()
            .await
            .map_err(CacheError::io("sync", self.tmp.path()))?;
        self.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn only_complete_verified_artifacts_take_their_name() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let sha = Sha256::of_bytes(b"0123456789");
        // Right bytes, within the limit: named by the digest.
        let mut ok = Incoming::<File>::create(&cache, Some(&sha), 10).unwrap();
        ok.write(b"01234").unwrap();
        ok.write(b"56789").unwrap();
        let got = ok.finish().unwrap();
        assert_eq!((got.path.clone(), got.bytes), (cache.join(&sha), 10));
        assert_eq!(names(&cache), vec![sha.to_string()]);
        fs::remove_file(&got.path).unwrap();
        // Over the limit, other bytes, given up midway: nothing is left.
        let mut big = Incoming::<File>::create(&cache, Some(&sha), 9).unwrap();
        big.write(b"01234").unwrap();
        assert!(matches!(
            big.write(b"56789"),
            Err(CacheError::TooLarge { limit: 9 })
        ));
        drop(big);
        let mut other = Incoming::<File>::create(&cache, Some(&sha), 10).unwrap();
        other.write(b"0123456788").unwrap();
        let err = other.finish().unwrap_err();
        assert!(
            err.to_string().starts_with("received bytes have sha256"),
            "{err}"
        );
        let mut half = Incoming::<File>::create(&cache, Some(&sha), 10).unwrap();
        half.write(b"01234").unwrap();
        drop(half);
        assert!(names(&cache).is_empty(), "{:?}", names(&cache));
    }

    #[test]
    fn a_damaged_cache_entry_is_dropped_and_copied_again() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let src = dir.path().join("a.tar.gz");
        fs::write(&src, b"artifact").unwrap();
        let sha = Sha256::of_bytes(b"artifact");
        let first = copy_file(&cache, &src, None).unwrap();
        assert_eq!((first.sha256.clone(), first.cached), (sha.clone(), false));
        assert!(copy_file(&cache, &src, Some(&sha)).unwrap().cached);
        fs::write(cache.join(&sha), b"bit rot").unwrap();
        assert_eq!(lookup(&cache, &sha).unwrap(), None);
        let again = copy_file(&cache, &src, Some(&sha)).unwrap();
        assert!(!again.cached);
        assert_eq!(fs::read(&again.path).unwrap(), b"artifact");
        let wrong = Sha256::of_bytes(b"other");
        assert!(matches!(
            copy_file(&cache, &src, Some(&wrong)),
            Err(CacheError::Digest { .. })
        ));
        assert_eq!(names(&cache), vec![sha.to_string()]);
    }
}
