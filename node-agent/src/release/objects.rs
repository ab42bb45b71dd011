//! The per-app content-addressed object store.
//!
//! A regular file is stored once as `objects/<2 hex>/<sha256>-<mode>` and
//! every release that holds the same bytes with the same mode hardlinks it.
//! Objects are read-only: a hardlinked file written in place would change
//! every release sharing it, so the mode keeps honest writers out and
//! `verify` catches the rest. An object whose link count is 1 belongs to no
//! release any more and is collected by [`ObjectStore::gc`].

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Mode bits an object keeps: read and execute, never write or set-id.
pub const OBJECT_MODE_MASK: u32 = 0o555;

/// The object store of one app.
#[derive(Debug, Clone)]
pub struct ObjectStore {
    dir: PathBuf,
}

/// What garbage collection removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GcStats {
    pub objects_removed: u64,
    pub bytes_freed: u64,
    pub objects_kept: u64,
}

impl ObjectStore {
    pub fn new(dir: PathBuf) -> Self {
        Self { dir }
    }

    /// The mode a file gets when it lives in the store.
    pub fn object_mode(mode: u32) -> u32 {
        mode & OBJECT_MODE_MASK
    }

    pub fn path(&self, sha256: &str, mode: u32) -> PathBuf {
        let mode = Self::object_mode(mode);
        self.dir
            .join(&sha256[..2.min(sha256.len())])
            .join(format!("{sha256}-{mode:o}"))
    }

    /// Hardlinks the object into `dest`. `Ok(false)` when the object is absent
    /// or has reached the file system's link limit: the caller then writes a
    /// copy.
    pub fn link_into(&self, sha256: &str, mode: u32, dest: &Path) -> io::Result<bool> {
        match fs::hard_link(self.path(sha256, mode), dest) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) if e.raw_os_error() == Some(nix::libc::EMLINK) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Makes the (already read-only) file at `staged` an object.
    pub fn adopt(&self, staged: &Path, sha256: &str, mode: u32) -> io::Result<()> {
        let obj = self.path(sha256, mode);
        match fs::hard_link(staged, &obj) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(parent) = obj.parent() {
                    fs::create_dir_all(parent)?;
                }
                match fs::hard_link(staged, &obj) {
                    Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
                    _ => Ok(()),
                }
            }
            // Same bytes arrived twice in one artifact, or another release
            // stored it: the staged copy stays a plain file.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) if e.raw_os_error() == Some(nix::libc::EMLINK) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes every object no release links any more.
    pub fn gc(&self) -> io::Result<GcStats> {
        let mut stats = GcStats::default();
        let shards = match fs::read_dir(&self.dir) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(stats),
            Err(e) => return Err(e),
        };
        for shard in shards {
            let shard = shard?;
            if !shard.file_type()?.is_dir() {
                continue;
            }
            let mut left = 0u64;
            for obj in fs::read_dir(shard.path())? {
                let obj = obj?;
                let meta = obj.metadata()?;
                if meta.nlink() <= 1 {
                    fs::remove_file(obj.path())?;
                    stats.objects_removed += 1;
                    stats.bytes_freed += meta.len();
                } else {
                    stats.objects_kept += 1;
                    left += 1;
                }
            }
            if left == 0 {
                let _ = fs::remove_dir(shard.path());
            }
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn adopt_link_and_gc() {
        let dir = tempfile::tempdir().unwrap();
        let store = ObjectStore::new(dir.path().join("objects"));
        let sha = "ab".repeat(32);
        let staged = dir.path().join("f");
        fs::write(&staged, b"hello").unwrap();
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o444)).unwrap();
        store.adopt(&staged, &sha, 0o644).unwrap();
        let copy = dir.path().join("g");
        assert!(store.link_into(&sha, 0o644, &copy).unwrap());
        assert_eq!(fs::read(&copy).unwrap(), b"hello");
        assert!(!store
            .link_into(&"cd".repeat(32), 0o644, &dir.path().join("h"))
            .unwrap());
        assert_eq!(store.gc().unwrap().objects_removed, 0);
        fs::remove_file(&staged).unwrap();
        fs::remove_file(&copy).unwrap();
        let stats = store.gc().unwrap();
        assert_eq!((stats.objects_removed, stats.bytes_freed), (1, 5));
        assert!(!store.path(&sha, 0o644).exists());
    }
}
