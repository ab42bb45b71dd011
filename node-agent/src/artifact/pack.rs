//! Building artifacts: a directory packed into a `.tar.gz` or `.tar.zst`.
//!
//! Entries are written in sorted order with their modes and with a fixed
//! mtime, so packing the same tree twice gives the same bytes (and the same
//! sha256), which is what lets a redeploy of unchanged code be recognised.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Compression of a packed artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
}

impl Compression {
    /// From a file name: `.tar.zst`/`.tzst` is zstd, anything else gzip.
    pub fn for_path(path: &Path) -> Self {
        let name = path.to_string_lossy();
        if name.ends_with(".zst") || name.ends_with(".tzst") {
            Self::Zstd
        } else {
            Self::Gzip
        }
    }
}

/// Packs the contents of `dir` (not `dir` itself) into `out`.
pub fn pack_dir(dir: &Path, out: &Path, compression: Compression) -> io::Result<()> {
    let file = BufWriter::with_capacity(1 << 20, File::create(out)?);
    match compression {
        Compression::Gzip => {
            let enc = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
            let enc = write_tar(dir, enc)?;
            enc.finish()?.flush()
        }
        Compression::Zstd => {
            let enc = zstd::stream::write::Encoder::new(file, 3)?;
            let enc = write_tar(dir, enc)?;
            enc.finish()?.flush()
        }
    }
}

fn write_tar<W: Write>(dir: &Path, w: W) -> io::Result<W> {
    let mut builder = tar::Builder::new(w);
    builder.follow_symlinks(false);
    add_tree(&mut builder, dir, Path::new(""))?;
    builder.into_inner()
}

fn add_tree<W: Write>(b: &mut tar::Builder<W>, base: &Path, rel: &Path) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(base.join(rel))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let r = rel.join(&name);
        let path = base.join(&r);
        let meta = fs::symlink_metadata(&path)?;
        let mut h = tar::Header::new_gnu();
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mode(meta.permissions().mode() & 0o7777);
        if meta.is_dir() {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
            b.append_data(&mut h, &r, io::empty())?;
            add_tree(b, base, &r)?;
        } else if meta.file_type().is_symlink() {
            h.set_entry_type(tar::EntryType::Symlink);
            h.set_size(0);
            b.append_link(&mut h, &r, fs::read_link(&path)?)?;
        } else if meta.is_file() {
            h.set_entry_type(tar::EntryType::Regular);
            h.set_size(meta.len());
            b.append_data(&mut h, &r, File::open(&path)?)?;
        }
    }
    Ok(())
}
