//! Unpacking an artifact into a staging directory, safely.
//!
//! Every entry is checked before anything is written: no absolute paths, no
//! `..`, no device or fifo nodes, no hardlink to anything but a regular file
//! met earlier in the same archive, no write through a symlink, bounded entry
//! count and expanded size. Symlink targets are resolved against the tree
//! being built once the whole archive is read, so a chain of links cannot
//! leave the release either. setuid/setgid/sticky bits are dropped.
//!
//! Nothing is written outside `staging`: files that will become new objects in
//! the content store are only *recorded* here and adopted by the caller once
//! the archive has been accepted whole.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{symlink, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::manifest::{Entry, EntryKind, Manifest};
use super::objects::ObjectStore;
use crate::config::UnpackLimits;
use crate::digest::{HashingWriter, Sha256};
use crate::fault;

/// Files up to this size are read into memory and hashed before anything is
/// written, so a file the store already has costs one `link(2)`.
const SMALL_FILE: u64 = 1 << 20;
/// Copy buffer for large files.
const COPY_BUF: usize = 256 << 10;
/// How often (in bytes written) free space is re-checked while unpacking.
const SPACE_CHECK_EVERY: u64 = 64 << 20;
/// Symlink hops followed when checking where a link leads (as Linux's 40).
const MAX_SYMLINK_HOPS: usize = 40;

/// Why an artifact was refused or could not be unpacked.
#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("cannot read artifact {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("artifact {path} is not a .tar.gz, .tar.zst or .tar (starts with {magic})")]
    NotAnArchive { path: PathBuf, magic: String },
    #[error("artifact entry {entry:?} is an absolute path")]
    AbsolutePath { entry: String },
    #[error("artifact entry {entry:?} contains `..` and would escape the release directory")]
    ParentDir { entry: String },
    #[error("artifact entry name {entry:?} is not UTF-8")]
    NotUtf8 { entry: String },
    #[error("artifact {kind} {entry:?} -> {target:?} escapes the release directory")]
    LinkEscapes {
        kind: &'static str,
        entry: String,
        target: String,
    },
    #[error("artifact symlink {entry:?} -> {target:?} is part of a symlink loop")]
    LinkLoop { entry: String, target: String },
    #[error(
        "artifact hardlink {entry:?} -> {target:?} does not point at a regular file earlier in the archive"
    )]
    HardlinkTarget { entry: String, target: String },
    #[error("artifact entry {entry:?} is a {kind}; device nodes and fifos are refused")]
    SpecialFile { entry: String, kind: &'static str },
    #[error("artifact entry {entry:?} has unsupported type {kind}")]
    Unsupported { entry: String, kind: String },
    #[error("artifact has more than {limit} entries (max_entries)")]
    TooManyEntries { limit: u64 },
    #[error("artifact expands past {limit} bytes (max_expanded_size) at entry {entry:?}")]
    TooLarge { entry: String, limit: u64 },
    #[error("artifact is truncated or corrupt{}: {detail}", after_entry(.after))]
    Corrupt {
        after: Option<String>,
        detail: String,
    },
    #[error("artifact entry {entry:?} {what}")]
    Conflict { entry: String, what: &'static str },
    #[error(
        "not enough free space on {path}: {avail} bytes free, unpacking needs {need} more plus a margin of {margin}"
    )]
    NoSpace {
        path: PathBuf,
        avail: u64,
        need: u64,
        margin: u64,
    },
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

fn after_entry(a: &Option<String>) -> String {
    match a {
        Some(e) => format!(" after entry {e:?}"),
        None => String::new(),
    }
}

/// The compression an artifact uses, found from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Gzip,
    Zstd,
    Tar,
}

/// Reads the magic bytes of `path`.
pub fn detect(path: &Path) -> Result<Format, UnpackError> {
    let open = |source| UnpackError::Open {
        path: path.to_owned(),
        source,
    };
    let mut f = File::open(path).map_err(open)?;
    let mut head = [0u8; 262];
    let mut n = 0;
    while n < head.len() {
        match f.read(&mut head[n..]).map_err(open)? {
            0 => break,
            k => n += k,
        }
    }
    let head = &head[..n];
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Format::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Format::Zstd)
    } else if head.len() >= 262 && &head[257..262] == b"ustar" {
        Ok(Format::Tar)
    } else {
        Err(UnpackError::NotAnArchive {
            path: path.to_owned(),
            magic: if head.is_empty() {
                "nothing (empty file)".to_owned()
            } else {
                hex::encode(&head[..head.len().min(8)])
            },
        })
    }
}

/// Best cheap guess of the uncompressed tar size, for the free-space check
/// before unpacking: gzip's ISIZE trailer, zstd's frame content size, or the
/// file size of a plain tar. `None` when the format does not say.
pub fn estimate_expanded_size(path: &Path, format: Format) -> io::Result<Option<u64>> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    match format {
        Format::Tar => Ok(Some(len)),
        Format::Gzip => {
            if len < 18 {
                return Ok(None);
            }
            f.seek(SeekFrom::End(-4))?;
            let mut b = [0u8; 4];
            f.read_exact(&mut b)?;
            // ISIZE is the size mod 2^32; the running check covers the rest.
            Ok(Some(u64::from(u32::from_le_bytes(b))))
        }
        Format::Zstd => {
            let mut head = [0u8; 18];
            let n = f.read(&mut head)?;
            Ok(zstd::zstd_safe::get_frame_content_size(&head[..n])
                .ok()
                .flatten())
        }
    }
}

fn decoder(path: &Path, format: Format) -> Result<Box<dyn Read>, UnpackError> {
    let open = |source| UnpackError::Open {
        path: path.to_owned(),
        source,
    };
    let f = File::open(path).map_err(open)?;
    Ok(match format {
        Format::Gzip => Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(
            COPY_BUF, f,
        ))),
        Format::Zstd => Box::new(zstd::stream::read::Decoder::new(f).map_err(open)?),
        Format::Tar => Box::new(BufReader::with_capacity(COPY_BUF, f)),
    })
}

/// Watches free space on the file system being written.
#[derive(Debug, Clone)]
pub struct SpaceGuard {
    pub path: PathBuf,
    pub margin: u64,
}

impl SpaceGuard {
    /// Free bytes available to unprivileged users on the file system.
    pub fn available(path: &Path) -> io::Result<u64> {
        let s = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
        Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
    }

    /// Fails unless `need` more bytes fit while leaving the margin free.
    pub fn check(&self, need: u64) -> Result<(), UnpackError> {
        let avail = Self::available(&self.path).map_err(|source| UnpackError::Io {
            path: self.path.clone(),
            source,
        })?;
        if avail < need.saturating_add(self.margin) {
            return Err(UnpackError::NoSpace {
                path: self.path.clone(),
                avail,
                need,
                margin: self.margin,
            });
        }
        Ok(())
    }
}

/// How to unpack.
#[derive(Debug)]
pub struct Options<'a> {
    pub limits: UnpackLimits,
    /// The content store to dedupe against; `None` writes plain copies.
    pub store: Option<&'a ObjectStore>,
    pub space: Option<SpaceGuard>,
}

/// A staged file that becomes a store object once the archive is accepted.
#[derive(Debug, Clone)]
pub struct NewObject {
    pub path: PathBuf,
    pub sha256: String,
    pub mode: u32,
}

/// The result of a successful unpack.
#[derive(Debug)]
pub struct Unpacked {
    pub entries: Vec<Entry>,
    pub new_objects: Vec<NewObject>,
    /// Files that were hardlinked from the store instead of written.
    pub reused_files: u64,
}

/// Tracks the tree being built so every entry can be checked against it.
struct Tree<'a> {
    staging: &'a Path,
    opts: &'a Options<'a>,
    dirs: HashSet<PathBuf>,
    /// Symlinks made so far: path -> target.
    symlinks: HashMap<PathBuf, PathBuf>,
    /// Regular files made so far: path -> index into `entries`.
    files: HashMap<PathBuf, usize>,
    dir_modes: Vec<(PathBuf, u32)>,
    entries: Vec<Entry>,
    /// Index of each path's entry, so a later duplicate replaces it.
    index: HashMap<PathBuf, usize>,
    new_objects: Vec<NewObject>,
    reused_files: u64,
    expanded: u64,
    written_since_check: u64,
    big_buf: Vec<u8>,
    pool: Pool,
}

/// One small file for a writer thread: hash it, then link it from the store
/// or write it.
struct Job {
    index: usize,
    dest: PathBuf,
    data: Vec<u8>,
    mode: u32,
}

/// What a writer thread did with a [`Job`].
struct Done {
    index: usize,
    dest: PathBuf,
    mode: u32,
    result: io::Result<(String, bool)>,
}

/// Writer threads for small files. Creating a file is most of the cost of
/// unpacking (inode allocation in the kernel), and it runs in parallel across
/// directories; the archive itself must be read in order, on one thread.
struct Pool {
    jobs: std::sync::mpsc::SyncSender<Job>,
    done: std::sync::mpsc::Receiver<Done>,
    outstanding: usize,
}

/// Jobs queued ahead of the writers (each at most [`SMALL_FILE`] bytes).
const QUEUE: usize = 64;

fn writers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 4))
}

fn writer(
    jobs: &std::sync::Mutex<std::sync::mpsc::Receiver<Job>>,
    done: std::sync::mpsc::Sender<Done>,
    store: Option<&ObjectStore>,
) {
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let result = (|| {
            let sha256 = Sha256::of_bytes(&job.data).into_string();
            if let Some(s) = store {
                if s.link_into(&sha256, job.mode, &job.dest)? {
                    return Ok((sha256, true));
                }
            }
            let mut f = create(&job.dest)?;
            f.write_all(&job.data)?;
            finish(&f, job.mode)?;
            Ok((sha256, false))
        })();
        if done
            .send(Done {
                index: job.index,
                dest: job.dest,
                mode: job.mode,
                result,
            })
            .is_err()
        {
            return;
        }
    }
}

/// Unpacks `artifact` into the empty or missing directory `staging`.
pub fn unpack(
    artifact: &Path,
    staging: &Path,
    opts: &Options<'_>,
) -> Result<Unpacked, UnpackError> {
    let format = detect(artifact)?;
    let io_err = |path: &Path| {
        let path = path.to_owned();
        move |source| UnpackError::Io { path, source }
    };
    fs::create_dir_all(staging).map_err(io_err(staging))?;
    let (job_tx, job_rx) = std::sync::mpsc::sync_channel::<Job>(QUEUE);
    let job_rx = std::sync::Mutex::new(job_rx);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Done>();
    std::thread::scope(|scope| {
        for _ in 0..writers() {
            let (rx, tx, store) = (&job_rx, done_tx.clone(), opts.store);
            scope.spawn(move || writer(rx, tx, store));
        }
        drop(done_tx);
        let tree = Tree {
            staging,
            opts,
            dirs: HashSet::from([PathBuf::new()]),
            symlinks: HashMap::new(),
            files: HashMap::new(),
            dir_modes: Vec::new(),
            entries: Vec::new(),
            index: HashMap::new(),
            new_objects: Vec::new(),
            reused_files: 0,
            expanded: 0,
            written_since_check: 0,
            big_buf: vec![0; COPY_BUF],
            pool: Pool {
                jobs: job_tx,
                done: done_rx,
                outstanding: 0,
            },
        };
        // On error the tree (and so the job sender) is dropped here: the
        // writers finish what is queued and stop before the scope ends, so the
        // caller can remove staging with nothing still writing into it.
        read_archive(artifact, format, tree)
    })
}

fn read_archive(
    artifact: &Path,
    format: Format,
    mut tree: Tree<'_>,
) -> Result<Unpacked, UnpackError> {
    let opts = tree.opts;
    let mut archive = tar::Archive::new(decoder(artifact, format)?);
    let mut count = 0u64;
    let mut last: Option<String> = None;
    let mut files_written = 0u64;
    {
        let entries = archive.entries().map_err(|e| corrupt(&last, &e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| corrupt(&last, &e))?;
            count += 1;
            if count > opts.limits.max_entries {
                return Err(UnpackError::TooManyEntries {
                    limit: opts.limits.max_entries,
                });
            }
            let raw = entry.path_bytes().into_owned();
            let name = std::str::from_utf8(&raw)
                .map_err(|_| UnpackError::NotUtf8 {
                    entry: String::from_utf8_lossy(&raw).into_owned(),
                })?
                .to_owned();
            let kind = entry.header().entry_type();
            if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() {
                continue;
            }
            let rel = sanitize(&name)?;
            if kind.is_dir() {
                let mode = header_mode(&entry, &last)?;
                tree.dir(&name, &rel, mode)?;
            } else if kind.is_file() || kind == tar::EntryType::Continuous {
                let mode = header_mode(&entry, &last)?;
                let size = entry.size();
                tree.file(&name, &rel, mode, size, &mut entry, &last)?;
                files_written += 1;
                if files_written == 3 {
                    tree.flush()?;
                    fault::point("mid_unpack");
                }
            } else if kind.is_symlink() {
                let target = link_target(&entry, &name)?;
                tree.symlink(&name, &rel, &target)?;
            } else if kind.is_hard_link() {
                let target = link_target(&entry, &name)?;
                tree.hardlink(&name, &rel, &target)?;
            } else if kind.is_character_special() || kind.is_block_special() || kind.is_fifo() {
                return Err(UnpackError::SpecialFile {
                    entry: name,
                    kind: if kind.is_fifo() {
                        "fifo"
                    } else if kind.is_block_special() {
                        "block device"
                    } else {
                        "character device"
                    },
                });
            } else {
                return Err(UnpackError::Unsupported {
                    entry: name,
                    kind: format!("{kind:?}"),
                });
            }
            last = Some(name);
        }
    }
    // Read the compressed stream to its end so gzip's CRC and length (and
    // zstd's checksum) are checked: a corrupt tail must not pass.
    let mut rest = archive.into_inner();
    io::copy(&mut rest, &mut io::sink()).map_err(|e| corrupt(&last, &e))?;
    tree.flush()?;
    tree.check_symlinks()?;
    tree.apply_dir_modes()?;
    Ok(Unpacked {
        entries: tree.entries,
        new_objects: tree.new_objects,
        reused_files: tree.reused_files,
    })
}

fn corrupt(last: &Option<String>, e: &io::Error) -> UnpackError {
    UnpackError::Corrupt {
        after: last.clone(),
        detail: e.to_string(),
    }
}

fn header_mode<R: Read>(
    entry: &tar::Entry<'_, R>,
    last: &Option<String>,
) -> Result<u32, UnpackError> {
    // Only permission bits: setuid, setgid and sticky are dropped.
    entry
        .header()
        .mode()
        .map(|m| m & 0o777)
        .map_err(|e| corrupt(last, &e))
}

fn link_target<R: Read>(entry: &tar::Entry<'_, R>, name: &str) -> Result<String, UnpackError> {
    let raw = entry
        .link_name_bytes()
        .ok_or_else(|| UnpackError::Corrupt {
            after: None,
            detail: format!("link entry {name:?} has no target"),
        })?
        .into_owned();
    String::from_utf8(raw).map_err(|e| UnpackError::NotUtf8 {
        entry: String::from_utf8_lossy(e.as_bytes()).into_owned(),
    })
}

/// Turns an entry name into a clean relative path, refusing escapes.
fn sanitize(name: &str) -> Result<PathBuf, UnpackError> {
    if name.starts_with('/') {
        return Err(UnpackError::AbsolutePath {
            entry: name.to_owned(),
        });
    }
    let mut out = PathBuf::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(UnpackError::ParentDir {
                    entry: name.to_owned(),
                })
            }
            p => out.push(p),
        }
    }
    Ok(out)
}

impl Tree<'_> {
    fn io(&self, rel: &Path) -> impl FnOnce(io::Error) -> UnpackError {
        let path = self.staging.join(rel);
        move |source| UnpackError::Io { path, source }
    }

    /// Creates the missing parents of `rel`, refusing to go through anything
    /// but directories this unpack made.
    fn parents(&mut self, name: &str, rel: &Path) -> Result<(), UnpackError> {
        let mut missing = Vec::new();
        let mut p = rel.parent();
        while let Some(dir) = p {
            if self.dirs.contains(dir) {
                break;
            }
            if self.symlinks.contains_key(dir) {
                return Err(UnpackError::Conflict {
                    entry: name.to_owned(),
                    what: "would be written through a symlink",
                });
            }
            if self.files.contains_key(dir) {
                return Err(UnpackError::Conflict {
                    entry: name.to_owned(),
                    what: "has a regular file as its parent directory",
                });
            }
            missing.push(dir.to_path_buf());
            p = dir.parent();
        }
        for dir in missing.into_iter().rev() {
            fs::create_dir(self.staging.join(&dir)).map_err(self.io(&dir))?;
            self.dirs.insert(dir);
        }
        Ok(())
    }

    /// Clears `rel` for a new non-directory entry (a later duplicate wins).
    fn clear(&mut self, name: &str, rel: &Path) -> Result<(), UnpackError> {
        if rel.as_os_str().is_empty() || self.dirs.contains(rel) {
            return Err(UnpackError::Conflict {
                entry: name.to_owned(),
                what: "would replace a directory",
            });
        }
        if self.symlinks.contains_key(rel) || self.files.contains_key(rel) {
            // A duplicate entry: the earlier file may still be queued.
            self.flush()?;
            self.symlinks.remove(rel);
            self.files.remove(rel);
            fs::remove_file(self.staging.join(rel)).map_err(self.io(rel))?;
        }
        Ok(())
    }

    /// Records `rel` in the manifest (a later duplicate replaces the earlier
    /// record) and returns its index.
    fn record(&mut self, rel: &Path, kind: EntryKind) -> usize {
        let entry = Entry {
            path: rel.to_string_lossy().into_owned(),
            kind,
        };
        match self.index.get(rel) {
            Some(&i) => {
                self.entries[i] = entry;
                i
            }
            None => {
                self.index.insert(rel.to_owned(), self.entries.len());
                self.entries.push(entry);
                self.entries.len() - 1
            }
        }
    }

    fn dir(&mut self, name: &str, rel: &Path, mode: u32) -> Result<(), UnpackError> {
        if rel.as_os_str().is_empty() {
            return Ok(());
        }
        self.parents(name, rel)?;
        if !self.dirs.contains(rel) {
            if self.symlinks.contains_key(rel) || self.files.contains_key(rel) {
                return Err(UnpackError::Conflict {
                    entry: name.to_owned(),
                    what: "is a directory where the archive already put a file or symlink",
                });
            }
            fs::create_dir(self.staging.join(rel)).map_err(self.io(rel))?;
            self.dirs.insert(rel.to_owned());
        }
        // Owner keeps rwx so shared links and hooks can work in the release.
        let mode = mode | 0o700;
        self.dir_modes.push((rel.to_owned(), mode));
        self.record(rel, EntryKind::Dir { mode });
        Ok(())
    }

    fn grow(&mut self, name: &str, size: u64) -> Result<(), UnpackError> {
        self.expanded = self.expanded.saturating_add(size);
        if self.expanded > self.opts.limits.max_expanded_bytes {
            return Err(UnpackError::TooLarge {
                entry: name.to_owned(),
                limit: self.opts.limits.max_expanded_bytes,
            });
        }
        Ok(())
    }

    fn wrote(&mut self, n: u64) -> Result<(), UnpackError> {
        self.written_since_check += n;
        if self.written_since_check >= SPACE_CHECK_EVERY {
            self.written_since_check = 0;
            if let Some(space) = &self.opts.space {
                space.check(0)?;
            }
        }
        Ok(())
    }

    fn file(
        &mut self,
        name: &str,
        rel: &Path,
        mode: u32,
        size: u64,
        data: &mut impl Read,
        last: &Option<String>,
    ) -> Result<(), UnpackError> {
        self.grow(name, size)?;
        self.parents(name, rel)?;
        self.clear(name, rel)?;
        let dest = self.staging.join(rel);
        let store = self.opts.store;
        let mode = if store.is_some() {
            ObjectStore::object_mode(mode)
        } else {
            mode
        };
        if size <= SMALL_FILE {
            let mut buf = Vec::with_capacity(size as usize);
            data.take(size)
                .read_to_end(&mut buf)
                .map_err(|e| corrupt(last, &e))?;
            if buf.len() as u64 != size {
                return Err(corrupt(last, &io::ErrorKind::UnexpectedEof.into()));
            }
            // The hash is filled in when the writer reports back.
            let i = self.record(
                rel,
                EntryKind::File {
                    mode,
                    size,
                    sha256: String::new(),
                },
            );
            self.files.insert(rel.to_owned(), i);
            self.submit(Job {
                index: i,
                dest,
                data: buf,
                mode,
            })?;
            return self.wrote(size);
        }
        let mut f = HashingWriter::new(create(&dest).map_err(self.io(rel))?);
        let mut done = 0u64;
        loop {
            let n = data
                .read(&mut self.big_buf)
                .map_err(|e| corrupt(last, &e))?;
            if n == 0 {
                break;
            }
            f.write_all(&self.big_buf[..n]).map_err(self.io(rel))?;
            done += n as u64;
            self.wrote(n as u64)?;
        }
        if done != size {
            return Err(corrupt(last, &io::ErrorKind::UnexpectedEof.into()));
        }
        let (f, sha256) = f.finish();
        finish(&f, mode).map_err(self.io(rel))?;
        drop(f);
        let sha256 = sha256.into_string();
        if let Some(s) = store {
            // Swap the fresh copy for the stored one when there is one.
            let tmp = dest.with_file_name(format!(
                ".slipway-dup-{}",
                dest.file_name()
                    .map(OsStr::to_string_lossy)
                    .unwrap_or_default()
            ));
            if s.link_into(&sha256, mode, &tmp).map_err(self.io(rel))? {
                fs::rename(&tmp, &dest).map_err(self.io(rel))?;
                self.reused_files += 1;
            } else {
                self.new_object(store, &dest, &sha256, mode);
            }
        }
        let i = self.record(rel, EntryKind::File { mode, size, sha256 });
        self.files.insert(rel.to_owned(), i);
        Ok(())
    }

    /// Queues a small file for the writers, collecting any finished ones.
    fn submit(&mut self, job: Job) -> Result<(), UnpackError> {
        while let Ok(done) = self.pool.done.try_recv() {
            self.complete(done)?;
        }
        // A failed send hands the job back: its path names the file.
        self.pool.jobs.send(job).map_err(|unsent| UnpackError::Io {
            path: unsent.0.dest,
            source: io::Error::other("writer threads stopped"),
        })?;
        self.pool.outstanding += 1;
        Ok(())
    }

    /// Records what a writer did.
    fn complete(&mut self, done: Done) -> Result<(), UnpackError> {
        self.pool.outstanding -= 1;
        let (sha256, linked) = done.result.map_err(|source| UnpackError::Io {
            path: done.dest.clone(),
            source,
        })?;
        if linked {
            self.reused_files += 1;
        } else {
            self.new_object(self.opts.store, &done.dest, &sha256, done.mode);
        }
        if let Some(Entry {
            kind: EntryKind::File { sha256: slot, .. },
            ..
        }) = self.entries.get_mut(done.index)
        {
            *slot = sha256;
        }
        Ok(())
    }

    /// Waits until every queued file is on disk.
    fn flush(&mut self) -> Result<(), UnpackError> {
        while self.pool.outstanding > 0 {
            match self.pool.done.recv() {
                Ok(done) => self.complete(done)?,
                Err(_) => {
                    return Err(UnpackError::Io {
                        path: self.staging.to_owned(),
                        source: io::Error::other("writer threads stopped"),
                    })
                }
            }
        }
        Ok(())
    }

    fn new_object(&mut self, store: Option<&ObjectStore>, dest: &Path, sha256: &str, mode: u32) {
        if store.is_some() {
            self.new_objects.push(NewObject {
                path: dest.to_owned(),
                sha256: sha256.to_owned(),
                mode,
            });
        }
    }

    fn symlink(&mut self, name: &str, rel: &Path, target: &str) -> Result<(), UnpackError> {
        let escapes = || UnpackError::LinkEscapes {
            kind: "symlink",
            entry: name.to_owned(),
            target: target.to_owned(),
        };
        if target.starts_with('/') || target.is_empty() {
            return Err(escapes());
        }
        // Quick lexical check; the full check runs once the tree is complete.
        let mut depth = rel.components().count() as i64 - 1;
        for part in target.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    depth -= 1;
                    if depth < 0 {
                        return Err(escapes());
                    }
                }
                _ => depth += 1,
            }
        }
        self.parents(name, rel)?;
        self.clear(name, rel)?;
        symlink(target, self.staging.join(rel)).map_err(self.io(rel))?;
        self.symlinks.insert(rel.to_owned(), PathBuf::from(target));
        self.record(
            rel,
            EntryKind::Symlink {
                target: target.to_owned(),
            },
        );
        Ok(())
    }

    fn hardlink(&mut self, name: &str, rel: &Path, target: &str) -> Result<(), UnpackError> {
        let bad = || UnpackError::HardlinkTarget {
            entry: name.to_owned(),
            target: target.to_owned(),
        };
        let target_rel = match sanitize(target) {
            Ok(t) => t,
            Err(_) => {
                return Err(UnpackError::LinkEscapes {
                    kind: "hardlink",
                    entry: name.to_owned(),
                    target: target.to_owned(),
                })
            }
        };
        let Some(&i) = self.files.get(&target_rel) else {
            return Err(bad());
        };
        if target_rel == rel {
            return Err(bad());
        }
        // The target may still be queued for a writer.
        self.flush()?;
        let kind = self.entries[i].kind.clone();
        self.parents(name, rel)?;
        self.clear(name, rel)?;
        fs::hard_link(self.staging.join(&target_rel), self.staging.join(rel))
            .map_err(self.io(rel))?;
        let j = self.record(rel, kind);
        self.files.insert(rel.to_owned(), j);
        Ok(())
    }

    /// Follows every symlink through the finished tree; any that leaves the
    /// release (or loops) fails the unpack.
    fn check_symlinks(&self) -> Result<(), UnpackError> {
        for (link, target) in &self.symlinks {
            let mut stack: Vec<&OsStr> = link
                .parent()
                .map(|p| p.iter().collect())
                .unwrap_or_default();
            let mut pending: Vec<Component<'_>> = target.components().rev().collect();
            let mut hops = 0;
            let err = |loop_: bool| {
                let (entry, target) = (
                    link.to_string_lossy().into_owned(),
                    target.to_string_lossy().into_owned(),
                );
                if loop_ {
                    UnpackError::LinkLoop { entry, target }
                } else {
                    UnpackError::LinkEscapes {
                        kind: "symlink",
                        entry,
                        target,
                    }
                }
            };
            while let Some(c) = pending.pop() {
                match c {
                    Component::RootDir | Component::Prefix(_) => return Err(err(false)),
                    Component::CurDir => {}
                    Component::ParentDir => {
                        if stack.pop().is_none() {
                            return Err(err(false));
                        }
                    }
                    Component::Normal(n) => {
                        stack.push(n);
                        let here: PathBuf = stack.iter().collect();
                        if let Some(next) = self.symlinks.get(&here) {
                            hops += 1;
                            if hops > MAX_SYMLINK_HOPS {
                                return Err(err(true));
                            }
                            stack.pop();
                            pending.extend(next.components().rev());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn apply_dir_modes(&self) -> Result<(), UnpackError> {
        for (rel, mode) in &self.dir_modes {
            fs::set_permissions(self.staging.join(rel), fs::Permissions::from_mode(*mode))
                .map_err(self.io(rel))?;
        }
        Ok(())
    }
}

fn create(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

fn finish(f: &File, mode: u32) -> io::Result<()> {
    f.set_permissions(fs::Permissions::from_mode(mode))
}

/// Rebuilds a release from `manifest` by hardlinking store objects, with no
/// archive at all. `Ok(false)` when an object is missing: the caller removes
/// `staging` and unpacks the artifact instead.
pub fn materialize(
    manifest: &Manifest,
    staging: &Path,
    store: &ObjectStore,
) -> Result<bool, UnpackError> {
    let io_err = |p: &Path| {
        let path = p.to_owned();
        move |source| UnpackError::Io { path, source }
    };
    fs::create_dir_all(staging).map_err(io_err(staging))?;
    let mut dir_modes = Vec::new();
    for e in &manifest.entries {
        let dest = staging.join(&e.path);
        if let Some(parent) = dest.parent() {
            if !parent.exists() {
                fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
        }
        match &e.kind {
            EntryKind::Dir { mode } => {
                if !dest.is_dir() {
                    fs::create_dir(&dest).map_err(io_err(&dest))?;
                }
                dir_modes.push((dest, *mode));
            }
            EntryKind::File { mode, sha256, .. } => {
                if !store
                    .link_into(sha256, *mode, &dest)
                    .map_err(io_err(&dest))?
                {
                    return Ok(false);
                }
            }
            EntryKind::Symlink { target } => {
                symlink(target, &dest).map_err(io_err(&dest))?;
            }
        }
    }
    for (dest, mode) in dir_modes {
        fs::set_permissions(&dest, fs::Permissions::from_mode(mode)).map_err(io_err(&dest))?;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sanitize_rules() {
        assert_eq!(sanitize("./a//b/./c").unwrap(), PathBuf::from("a/b/c"));
        assert_eq!(sanitize("./").unwrap(), PathBuf::new());
        assert!(matches!(
            sanitize("/etc/passwd"),
            Err(UnpackError::AbsolutePath { .. })
        ));
        assert!(matches!(
            sanitize("a/../../b"),
            Err(UnpackError::ParentDir { .. })
        ));
        assert!(matches!(
            sanitize("a/.."),
            Err(UnpackError::ParentDir { .. })
        ));
    }
}
