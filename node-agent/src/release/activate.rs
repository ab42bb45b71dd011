//! Switching `current` atomically.
//!
//! A new symlink is made beside `current` and `rename(2)`d over it, then the
//! directory is fsynced: a reader sees the old target or the new one, never a
//! missing or dangling link, and the switch survives a power cut. `rm` + `ln`
//! (or `ln -sfn`, which does exactly that) leaves a window with no `current`.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use super::id::ReleaseId;
use crate::durable;

/// Points `root/current` at `root/releases/<id>` atomically and durably.
pub fn switch(root: &Path, id: &ReleaseId) -> io::Result<()> {
    let current = root.join("current");
    let tmp = durable::temp_sibling(&current, "new");
    symlink(Path::new("releases").join(id.as_str()), &tmp)?;
    if let Err(e) = fs::rename(&tmp, &current) {
        let _ = fs::remove_file(&tmp);
        if fs::symlink_metadata(&current).is_ok_and(|m| m.is_dir()) {
            return Err(io::Error::new(
                e.kind(),
                format!(
                    "{} is a real directory, not a symlink; move it away before the first deploy",
                    current.display()
                ),
            ));
        }
        return Err(e);
    }
    durable::fsync_dir(root)
}

/// Removes `current` (only to undo an interrupted first deploy).
pub fn clear(root: &Path) -> io::Result<()> {
    match fs::remove_file(root.join("current")) {
        Ok(()) => durable::fsync_dir(root),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The release `root/current` points at, if it points into `root/releases`.
///
/// Accepts the relative links Slipway makes and the absolute ones an operator
/// makes by hand (`ln -sfn /app/releases/X /app/current`).
pub fn read_current(root: &Path) -> io::Result<Option<ReleaseId>> {
    let target = match fs::read_link(root.join("current")) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}/current is not a symlink", root.display()),
            ))
        }
        Err(e) => return Err(e),
    };
    let target = target.strip_prefix("./").unwrap_or(&target).to_path_buf();
    let parent: PathBuf = target.parent().map(Path::to_path_buf).unwrap_or_default();
    let in_releases = parent == Path::new("releases")
        || parent == root.join("releases")
        || fs::canonicalize(root.join(&parent)).ok()
            == fs::canonicalize(root.join("releases")).ok();
    let name = target.file_name().and_then(OsStr::to_str);
    match (in_releases, name.map(ReleaseId::new)) {
        (true, Some(Ok(id))) => Ok(Some(id)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}/current points at {}, which is not a release in {}/releases",
                root.display(),
                target.display(),
                root.display()
            ),
        )),
    }
}

/// Removes `current.new-*` links left by a switch that was killed midway.
pub fn clean_temp_links(root: &Path) -> io::Result<()> {
    let Ok(dir) = fs::read_dir(root) else {
        return Ok(());
    };
    for entry in dir {
        let entry = entry?;
        if entry
            .file_name()
            .to_string_lossy()
            .starts_with("current.new-")
        {
            fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("releases/a")).unwrap();
        fs::create_dir_all(root.join("releases/b")).unwrap();
        assert_eq!(read_current(root).unwrap(), None);
        let a = ReleaseId::new("a").unwrap();
        let b = ReleaseId::new("b").unwrap();
        switch(root, &a).unwrap();
        assert_eq!(read_current(root).unwrap(), Some(a));
        switch(root, &b).unwrap();
        assert_eq!(read_current(root).unwrap(), Some(b.clone()));
        // An operator's manual absolute link is understood too.
        fs::remove_file(root.join("current")).unwrap();
        symlink(root.join("releases/b"), root.join("current")).unwrap();
        assert_eq!(read_current(root).unwrap(), Some(b));
        assert_eq!(fs::read_dir(root).unwrap().count(), 2);
    }

    #[test]
    fn refuses_real_directory_and_foreign_targets() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("current")).unwrap();
        let err = switch(root, &ReleaseId::new("a").unwrap()).unwrap_err();
        assert!(err.to_string().contains("real directory"), "{err}");
        assert!(read_current(root).is_err());
        fs::remove_dir(root.join("current")).unwrap();
        symlink("/etc", root.join("current")).unwrap();
        let err = read_current(root).unwrap_err().to_string();
        assert!(err.contains("not a release"), "{err}");
    }
}
