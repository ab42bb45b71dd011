//! sha256: how artifacts, cached artifacts and release files are named and
//! checked. One type for a digest ([`Sha256`]: parsed once, at the edge, in
//! the cache's spelling), one for hashing as bytes go by ([`Hasher`],
//! [`HashingWriter`]), and [`Sha256::of_file`] for a file on disk.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

use serde::Serialize;
use sha2::Digest as _;

/// Bytes read at a time when hashing a file.
const READ_BUF: usize = 256 << 10;

/// A sha256 digest as 64 lower-case hex characters: the spelling of the
/// artifact cache (`<cache>/<sha256>`), the journal and the manifests.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct Sha256(String);

/// A sha256 given on the command line or in a command that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sha256 {value:?} is not 64 hexadecimal characters")]
pub struct BadSha256 {
    /// As given.
    pub value: String,
}

impl Sha256 {
    /// Checks a digest as given (surrounding space and upper case allowed)
    /// and returns it in lower case.
    pub fn parse(value: &str) -> Result<Self, BadSha256> {
        let v = value.trim().to_ascii_lowercase();
        if v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()) {
            Ok(Self(v))
        } else {
            Err(BadSha256 {
                value: value.to_owned(),
            })
        }
    }

    /// The digest of `data`.
    pub fn of_bytes(data: &[u8]) -> Self {
        let mut h = Hasher::new();
        h.update(data);
        h.finish()
    }

    /// The digest of the whole file at `path` (blocking).
    pub fn of_file(path: &Path) -> io::Result<Self> {
        let mut f = File::open(path)?;
        let mut h = Hasher::new();
        let mut buf = vec![0u8; READ_BUF];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(h.finish())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Sha256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Sha256 {
    type Err = BadSha256;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl AsRef<str> for Sha256 {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl AsRef<Path> for Sha256 {
    /// A digest is also its file name in the artifact cache.
    fn as_ref(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl PartialEq<str> for Sha256 {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<String> for Sha256 {
    fn eq(&self, other: &String) -> bool {
        &self.0 == other
    }
}

impl From<Sha256> for String {
    fn from(s: Sha256) -> Self {
        s.0
    }
}

/// A sha256 computed as bytes go by.
#[derive(Debug, Clone, Default)]
pub struct Hasher(sha2::Sha256);

impl Hasher {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> Sha256 {
        Sha256(hex::encode(self.0.finalize()))
    }
}

/// A writer that hashes what it writes through to `inner`.
#[derive(Debug)]
pub struct HashingWriter<W> {
    inner: W,
    hasher: Hasher,
    /// Bytes written so far.
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Hasher::new(),
            written: 0,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The writer back, and the digest of everything written to it.
    pub fn finish(self) -> (W, Sha256) {
        (self.inner, self.hasher.finish())
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sha256("abc"), from FIPS 180-2.
    const ABC: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    #[test]
    fn digests_are_checked_and_lowercased() {
        let upper = " AB".to_owned() + &"AB".repeat(31) + " ";
        assert_eq!(Sha256::parse(&upper).unwrap().as_str(), "ab".repeat(32));
        for bad in ["abc", &"zz".repeat(32), &"a".repeat(65), ""] {
            let e = Sha256::parse(bad).unwrap_err();
            assert_eq!(e.value, bad);
            assert!(e.to_string().contains("64 hexadecimal"), "{e}");
        }
    }

    #[test]
    fn bytes_files_and_writers_hash_alike() {
        assert_eq!(Sha256::of_bytes(b"abc"), *ABC);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let mut w = HashingWriter::new(File::create(&path).unwrap());
        w.write_all(b"a").unwrap();
        w.write_all(b"bc").unwrap();
        assert_eq!(w.written(), 3);
        let (_, sha) = w.finish();
        assert_eq!(sha, *ABC);
        assert_eq!(Sha256::of_file(&path).unwrap(), *ABC);
    }
}
