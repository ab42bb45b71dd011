//! Backups of the controller's data dir, and restoring one on a new machine.
//!
//! A backup is one file: an [age](https://age-encryption.org) file (to a
//! passphrase, scrypt, or to an age X25519 recipient) holding a zstd-packed
//! tar of
//!
//! - `MANIFEST.json`: format, version, when, the CA's fingerprint, and the
//!   size and sha256 of every other entry;
//! - `controller.db`: a consistent snapshot of the database made with
//!   SQLite's `VACUUM INTO` while the controller serves and deploys (WAL
//!   mode: the snapshot reads as one transaction and blocks no writer);
//! - the CA (`ca.pem`, `ca.key`) and the server certificate (`server.pem`,
//!   `server.key`, `server.hosts`), so a restored controller is the same
//!   controller to every agent: same CA, same server names;
//! - the secrets key file (`secrets.key`) when it is in the data dir (its
//!   default place): without it the apps' environments sealed in the
//!   database do not open. A key file kept elsewhere (`--secrets-key`) is
//!   not in the backup: keep a copy of it apart.
//!
//! Uploaded artifacts are not in it: every agent keeps its releases, and a
//! deploy uploads its artifact again.
//!
//! [`restore`] writes into a new directory only (never over a data dir),
//! checks every entry against the manifest before anything is in place,
//! and renames the finished directory into place last: a failed restore
//! leaves nothing behind.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use age::secrecy::SecretString;
use serde::{Deserialize, Serialize};

use crate::pki::ca::{
    Ca, CA_CERT_FILE, CA_KEY_FILE, NEXT_CA_CERT_FILE, NEXT_CA_KEY_FILE, SERVER_CERT_FILE,
    SERVER_HOSTS_FILE, SERVER_KEY_FILE,
};
use crate::pki::rotation::ROTATION_FILE;
use crate::store::{Store, StoreError, DB_FILE};

/// What `MANIFEST.json` says the file is.
const FORMAT: &str = "slipway-controller-backup";
/// The manifest's version this code writes and reads.
const VERSION: u32 = 1;
const MANIFEST: &str = "MANIFEST.json";
/// The files of the data dir a backup holds besides the database, each
/// with the mode it is restored with. The CA files must be there.
/// During a CA rotation the new CA and the rotation's state are in it
/// too, so a restored controller goes on with the rotation.
const KEY_FILES: [(&str, u32, bool); 9] = [
    (CA_CERT_FILE, 0o644, true),
    (CA_KEY_FILE, 0o600, true),
    (SERVER_CERT_FILE, 0o644, false),
    (SERVER_KEY_FILE, 0o600, false),
    (SERVER_HOSTS_FILE, 0o644, false),
    (NEXT_CA_CERT_FILE, 0o644, false),
    (NEXT_CA_KEY_FILE, 0o600, false),
    (ROTATION_FILE, 0o644, false),
    (crate::secrets::KEY_FILE, 0o600, false),
];
/// Largest manifest accepted on restore.
const MAX_MANIFEST: u64 = 1 << 20;
/// Largest key file accepted on restore.
const MAX_KEY_FILE: u64 = 1 << 20;
/// Largest database accepted on restore.
const MAX_DB: u64 = 1 << 40;
/// Prefix of scheduled backup files (then an RFC 3339-ish UTC time).
pub const SCHEDULED_PREFIX: &str = "slipway-backup-";
/// Suffix of backup files.
pub const SUFFIX: &str = ".age";

/// Why a backup or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// A file could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The database snapshot failed.
    #[error("snapshot of the database: {0}")]
    Store(#[from] StoreError),
    /// Encrypting failed, or the recipient is not an age public key.
    #[error("encryption: {0}")]
    Encrypt(String),
    /// The file cannot be decrypted with what was given.
    #[error("cannot decrypt {}: {why}", path.display())]
    Decrypt {
        /// The backup file.
        path: PathBuf,
        /// Why (wrong passphrase, not an age file, ...).
        why: String,
    },
    /// The backup's contents are not what a backup holds.
    #[error("{} is not a usable backup: {why}", path.display())]
    Invalid {
        /// The backup file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// `restore` would write into a directory that has files.
    #[error("{} exists and is not empty: restore into a new directory", .0.display())]
    NotEmpty(PathBuf),
    /// How to encrypt or decrypt was not said, or said twice.
    #[error("{0}")]
    Usage(String),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> BackupError + 'a {
    move |source| BackupError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// How a backup is encrypted, or decrypted.
pub enum Key {
    /// A passphrase (age's scrypt recipient).
    Passphrase(SecretString),
    /// Encrypt to this age X25519 public key (`age1…`).
    Recipient(age::x25519::Recipient),
    /// Decrypt with the identities of this age identity file.
    IdentityFile(PathBuf),
}

impl std::fmt::Debug for Key {
    // Hand-written so a passphrase never ends up in a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Passphrase(_) => f.write_str("Passphrase(..)"),
            Self::Recipient(r) => write!(f, "Recipient({r})"),
            Self::IdentityFile(p) => write!(f, "IdentityFile({})", p.display()),
        }
    }
}

impl Key {
    /// From the flags: a passphrase file (its first line), an age public
    /// key, or an age identity file; exactly one.
    pub fn from_flags(
        passphrase_file: Option<&Path>,
        recipient: Option<&str>,
        identity: Option<&Path>,
    ) -> Result<Self, BackupError> {
        match (passphrase_file, recipient, identity) {
            (Some(path), None, None) => {
                let text = fs::read_to_string(path).map_err(io_err("reading", path))?;
                let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
                if line.chars().count() < 8 {
                    return Err(BackupError::Usage(format!(
                        "{}: the passphrase must be at least 8 characters on its first line",
                        path.display()
                    )));
                }
                Ok(Self::Passphrase(SecretString::from(line.to_owned())))
            }
            (None, Some(text), None) => Ok(Self::Recipient(parse_recipient(text)?)),
            (None, None, Some(path)) => Ok(Self::IdentityFile(path.to_owned())),
            (None, None, None) => Err(BackupError::Usage(
                "say how the backup is encrypted: --passphrase-file FILE or --recipient age1..."
                    .into(),
            )),
            _ => Err(BackupError::Usage(
                "give only one of --passphrase-file, --recipient and --identity".into(),
            )),
        }
    }
}

/// An age X25519 public key, or a clear error.
pub fn parse_recipient(text: &str) -> Result<age::x25519::Recipient, BackupError> {
    text.trim().parse().map_err(|e| {
        BackupError::Usage(format!(
            "recipient {:?} is not an age public key (age1...): {e}",
            slipway_proto::limits::shown(text)
        ))
    })
}

/// The manifest of a backup.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    format: String,
    version: u32,
    /// When the backup was made (RFC 3339).
    created_at: String,
    /// sha256 of the CA certificate (DER), as the controller logs it.
    ca_sha256: String,
    /// Every other entry: its size and sha256.
    files: BTreeMap<String, FileEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    size: u64,
    sha256: String,
}

/// What a backup wrote.
#[derive(Debug, Serialize)]
pub struct BackupReport {
    /// The backup file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
    /// The database snapshot's size in bytes (before packing).
    pub db_size: u64,
    /// The CA's fingerprint.
    pub ca_sha256: String,
}

/// Writes a backup of `data_dir` to `out` (atomically: a temp file beside
/// it, fsynced, renamed), encrypted with `key`. The database is snapshot
/// with `VACUUM INTO` through `store` while anything else keeps using it.
pub async fn backup(
    store: &Store,
    data_dir: &Path,
    out: &Path,
    key: &Key,
) -> Result<BackupReport, BackupError> {
    let ca = Ca::load_existing(data_dir).map_err(|e| BackupError::Invalid {
        path: data_dir.to_owned(),
        why: format!("no CA to back up: {e}"),
    })?;
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let work = tempfile::Builder::new()
        .prefix(".slipway-backup-")
        .tempdir_in(dir)
        .map_err(io_err("creating a work dir in", dir))?;
    let snapshot = work.path().join(DB_FILE);
    store.snapshot_into(&snapshot).await?;
    let db_size = fs::metadata(&snapshot)
        .map_err(io_err("reading", &snapshot))?
        .len();

    let mut files = BTreeMap::new();
    let mut entries: Vec<(String, PathBuf)> = vec![(DB_FILE.to_owned(), snapshot.clone())];
    for (name, _, required) in KEY_FILES {
        let path = data_dir.join(name);
        if !required && !path.exists() {
            continue;
        }
        entries.push((name.to_owned(), path));
    }
    for (name, path) in &entries {
        let (size, sha256) = hash_file(path)?;
        files.insert(name.clone(), FileEntry { size, sha256 });
    }
    let manifest = Manifest {
        format: FORMAT.to_owned(),
        version: VERSION,
        created_at: crate::rfc3339(crate::now_unix()),
        ca_sha256: ca.fingerprint(),
        files,
    };
    let manifest_json = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| BackupError::Encrypt(format!("manifest: {e}")))?;

    let tmp = work.path().join("backup.age");
    let key_desc = match key {
        Key::Passphrase(p) => KeyForEncrypt::Passphrase(p.clone()),
        Key::Recipient(r) => KeyForEncrypt::Recipient(r.clone()),
        Key::IdentityFile(_) => {
            return Err(BackupError::Usage(
                "an identity file decrypts; to encrypt give --recipient or --passphrase-file"
                    .into(),
            ))
        }
    };
    let tmp2 = tmp.clone();
    tokio::task::spawn_blocking(move || write_archive(&tmp2, &key_desc, &manifest_json, &entries))
        .await
        .map_err(|e| BackupError::Encrypt(format!("backup task failed: {e}")))??;
    fs::rename(&tmp, out).map_err(io_err("moving the backup to", out))?;
    sync_dir(dir);
    let size = fs::metadata(out).map_err(io_err("reading", out))?.len();
    Ok(BackupReport {
        path: out.to_owned(),
        size,
        db_size,
        ca_sha256: ca.fingerprint(),
    })
}

enum KeyForEncrypt {
    Passphrase(SecretString),
    Recipient(age::x25519::Recipient),
}

fn write_archive(
    path: &Path,
    key: &KeyForEncrypt,
    manifest: &[u8],
    entries: &[(String, PathBuf)],
) -> Result<(), BackupError> {
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("creating", path))?;
    let encryptor = match key {
        KeyForEncrypt::Passphrase(p) => age::Encryptor::with_user_passphrase(p.clone()),
        KeyForEncrypt::Recipient(r) => {
            age::Encryptor::with_recipients(std::iter::once(r as &dyn age::Recipient))
                .map_err(|e| BackupError::Encrypt(e.to_string()))?
        }
    };
    let encrypted = encryptor
        .wrap_output(io::BufWriter::new(file))
        .map_err(|e| BackupError::Encrypt(e.to_string()))?;
    let packed =
        zstd::Encoder::new(encrypted, 3).map_err(|e| BackupError::Encrypt(e.to_string()))?;
    let mut tar = tar::Builder::new(packed);
    let write = io_err("writing", path);
    let append = |tar: &mut tar::Builder<_>, name: &str, size: u64, data: &mut dyn Read| {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o600);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, name, data)
    };
    let result = (|| -> io::Result<()> {
        append(
            &mut tar,
            MANIFEST,
            manifest.len() as u64,
            &mut &manifest[..],
        )?;
        for (name, src) in entries {
            let mut f = fs::File::open(src)?;
            let size = f.metadata()?.len();
            append(&mut tar, name, size, &mut f)?;
        }
        let packed = tar.into_inner()?;
        let encrypted = packed.finish()?;
        let mut buffered = encrypted.finish()?;
        buffered.flush()?;
        let file = buffered.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()
    })();
    result.map_err(write)
}

/// Restores the backup `from` into `data_dir`, which must not exist or be
/// empty. Decrypts with `key`, checks the manifest (format, version, every
/// size and sha256, the CA's fingerprint) and that the database opens,
/// before the directory is put in place.
pub async fn restore(
    from: &Path,
    data_dir: &Path,
    key: &Key,
) -> Result<RestoreReport, BackupError> {
    if let Ok(mut it) = fs::read_dir(data_dir) {
        if it.next().is_some() {
            return Err(BackupError::NotEmpty(data_dir.to_owned()));
        }
    }
    let parent = data_dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
    let work = tempfile::Builder::new()
        .prefix(".slipway-restore-")
        .tempdir_in(parent)
        .map_err(io_err("creating a work dir in", parent))?;
    let staged = work.path().join("data");
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staged)
        .map_err(io_err("creating", &staged))?;

    let (from2, staged2) = (from.to_owned(), staged.clone());
    let key = match key {
        Key::Passphrase(p) => DecryptKey::Passphrase(p.clone()),
        Key::IdentityFile(path) => DecryptKey::IdentityFile(path.clone()),
        Key::Recipient(_) => {
            return Err(BackupError::Usage(
                "a recipient encrypts; to restore give --identity FILE or --passphrase-file".into(),
            ))
        }
    };
    let manifest = tokio::task::spawn_blocking(move || {
        let identities = identities_for(&key, &from2)?;
        unpack(&from2, &staged2, identities)
    })
    .await
    .map_err(|e| BackupError::Encrypt(format!("restore task failed: {e}")))??;

    let ca = Ca::load_existing(&staged).map_err(|e| BackupError::Invalid {
        path: from.to_owned(),
        why: format!("its CA does not load: {e}"),
    })?;
    if ca.fingerprint() != manifest.ca_sha256 {
        return Err(BackupError::Invalid {
            path: from.to_owned(),
            why: "its CA is not the one the manifest names".into(),
        });
    }
    // The database opens, is at a schema this controller knows, and passes
    // SQLite's own check.
    {
        let store = Store::open(&staged).await?;
        store.integrity_check().await?;
        store.close().await;
    }
    // In place last: a directory that was there (empty) is replaced.
    if data_dir.exists() {
        fs::remove_dir(data_dir).map_err(io_err("replacing the empty", data_dir))?;
    }
    fs::rename(&staged, data_dir).map_err(io_err("moving the restored data to", data_dir))?;
    sync_dir(parent);
    Ok(RestoreReport {
        data_dir: data_dir.to_owned(),
        created_at: manifest.created_at,
        ca_sha256: manifest.ca_sha256,
    })
}

/// What a restore put in place.
#[derive(Debug, Serialize)]
pub struct RestoreReport {
    /// The new data dir.
    pub data_dir: PathBuf,
    /// When the backup was made.
    pub created_at: String,
    /// The CA's fingerprint.
    pub ca_sha256: String,
}

enum DecryptKey {
    Passphrase(SecretString),
    IdentityFile(PathBuf),
}

fn identities_for(
    key: &DecryptKey,
    from: &Path,
) -> Result<Vec<Box<dyn age::Identity>>, BackupError> {
    match key {
        DecryptKey::Passphrase(p) => Ok(vec![Box::new(age::scrypt::Identity::new(p.clone()))]),
        DecryptKey::IdentityFile(path) => {
            let file = age::IdentityFile::from_file(path.to_string_lossy().into_owned())
                .map_err(io_err("reading the identity file", path))?;
            let ids = file.into_identities().map_err(|e| BackupError::Decrypt {
                path: from.to_owned(),
                why: format!("identity file {}: {e}", path.display()),
            })?;
            Ok(ids)
        }
    }
}

fn unpack(
    from: &Path,
    staged: &Path,
    identities: Vec<Box<dyn age::Identity>>,
) -> Result<Manifest, BackupError> {
    let invalid = |why: String| BackupError::Invalid {
        path: from.to_owned(),
        why,
    };
    let file = fs::File::open(from).map_err(io_err("opening", from))?;
    let decrypt_err = |why: String| BackupError::Decrypt {
        path: from.to_owned(),
        why,
    };
    let decryptor = age::Decryptor::new_buffered(io::BufReader::new(file))
        .map_err(|e| decrypt_err(e.to_string()))?;
    let reader = decryptor
        .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .map_err(|e| decrypt_err(e.to_string()))?;
    let unpacked = zstd::Decoder::new(reader).map_err(|e| invalid(format!("not zstd: {e}")))?;
    let mut archive = tar::Archive::new(unpacked);
    let mut manifest: Option<Manifest> = None;
    let mut seen: BTreeMap<String, FileEntry> = BTreeMap::new();
    let entries = archive
        .entries()
        .map_err(|e| invalid(format!("not a tar: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| invalid(format!("damaged: {e}")))?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            return Err(invalid("an entry that is not a regular file".into()));
        }
        let name = entry
            .path()
            .map_err(|e| invalid(format!("bad entry name: {e}")))?
            .to_string_lossy()
            .into_owned();
        let size = entry.size();
        if name == MANIFEST {
            if manifest.is_some() || size > MAX_MANIFEST {
                return Err(invalid("a second or oversized manifest".into()));
            }
            let mut text = Vec::new();
            entry
                .read_to_end(&mut text)
                .map_err(|e| invalid(format!("manifest: {e}")))?;
            let m: Manifest =
                serde_json::from_slice(&text).map_err(|e| invalid(format!("manifest: {e}")))?;
            if m.format != FORMAT || m.version != VERSION {
                return Err(invalid(format!(
                    "format {:?} version {}, this controller reads {FORMAT} version {VERSION}",
                    slipway_proto::limits::shown(&m.format),
                    m.version
                )));
            }
            manifest = Some(m);
            continue;
        }
        let Some(m) = &manifest else {
            return Err(invalid("the manifest does not come first".into()));
        };
        let mode = if name == DB_FILE {
            0o600
        } else if let Some((_, mode, _)) = KEY_FILES.iter().find(|(n, _, _)| *n == name) {
            *mode
        } else {
            return Err(invalid(format!(
                "unexpected entry {:?}",
                slipway_proto::limits::shown(&name)
            )));
        };
        let limit = if name == DB_FILE {
            MAX_DB
        } else {
            MAX_KEY_FILE
        };
        let want = m
            .files
            .get(&name)
            .ok_or_else(|| invalid(format!("{name} is not in the manifest")))?;
        if size != want.size || size > limit || seen.contains_key(&name) {
            return Err(invalid(format!(
                "{name}: {size} bytes, the manifest says {}",
                want.size
            )));
        }
        let dest = staged.join(&name);
        let mut out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&dest)
            .map_err(io_err("creating", &dest))?;
        let mut hasher = HashingWriter::new(&mut out);
        io::copy(&mut (&mut entry).take(limit), &mut hasher)
            .map_err(|e| invalid(format!("{name}: {e}")))?;
        let (n, sha) = hasher.finish();
        if n != want.size || sha != want.sha256 {
            return Err(invalid(format!("{name}: its sha256 is not the manifest's")));
        }
        out.sync_all().map_err(io_err("writing", &dest))?;
        seen.insert(
            name,
            FileEntry {
                size: n,
                sha256: sha,
            },
        );
    }
    let m = manifest.ok_or_else(|| invalid("no manifest".into()))?;
    for name in m.files.keys() {
        if !seen.contains_key(name) {
            return Err(invalid(format!("{name} is missing")));
        }
    }
    for (name, _, required) in KEY_FILES {
        if required && !seen.contains_key(name) {
            return Err(invalid(format!("{name} is missing")));
        }
    }
    if !seen.contains_key(DB_FILE) {
        return Err(invalid(format!("{DB_FILE} is missing")));
    }
    sync_dir(staged);
    Ok(m)
}

/// Writes through to `inner`, counting and hashing.
struct HashingWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        use sha2::Digest as _;
        Self {
            inner,
            hasher: sha2::Sha256::new(),
            count: 0,
        }
    }

    fn finish(self) -> (u64, String) {
        use sha2::Digest as _;
        (self.count, hex::encode(self.hasher.finalize()))
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        use sha2::Digest as _;
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn hash_file(path: &Path) -> Result<(u64, String), BackupError> {
    let mut f = fs::File::open(path).map_err(io_err("reading", path))?;
    let mut w = HashingWriter::new(io::sink());
    io::copy(&mut f, &mut w).map_err(io_err("reading", path))?;
    Ok(w.finish())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Scheduled backups: where, how often, how many to keep, to whom.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Directory the backups go to (created mode 0700).
    pub dir: PathBuf,
    /// Time between two backups.
    pub every: Duration,
    /// Backups kept; older ones are removed after each new one.
    pub keep: usize,
    /// The age public key they are encrypted to (no passphrase is ever
    /// stored on the controller, and no key that could decrypt them).
    pub recipient: age::x25519::Recipient,
}

/// A scheduled backup into `schedule.dir`, named by the time, then the
/// oldest beyond `keep` removed. Returns the new file.
pub async fn scheduled(
    store: &Store,
    data_dir: &Path,
    schedule: &Schedule,
) -> Result<BackupReport, BackupError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&schedule.dir)
        .map_err(io_err("creating", &schedule.dir))?;
    let stamp = crate::rfc3339(crate::now_unix()).replace(':', "");
    let out = schedule
        .dir
        .join(format!("{SCHEDULED_PREFIX}{stamp}{SUFFIX}"));
    let report = backup(
        store,
        data_dir,
        &out,
        &Key::Recipient(schedule.recipient.clone()),
    )
    .await?;
    let mut old: Vec<PathBuf> = fs::read_dir(&schedule.dir)
        .map_err(io_err("listing", &schedule.dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(SCHEDULED_PREFIX) && n.ends_with(SUFFIX))
        })
        .collect();
    // The names sort by time.
    old.sort();
    let excess = old.len().saturating_sub(schedule.keep.max(1));
    for path in old.into_iter().take(excess) {
        if let Err(err) = fs::remove_file(&path) {
            tracing::warn!(path = %path.display(), %err, "could not remove an old backup");
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use age::secrecy::ExposeSecret as _;

    #[tokio::test]
    async fn scheduled_backups_keep_the_newest_and_restore_with_the_identity() {
        let home = tempfile::tempdir().unwrap();
        let data = home.path().join("data");
        let ca = Ca::load_or_create(&data).unwrap();
        let store = Store::open(&data).await.unwrap();
        // An app's environment, sealed under the key file in the data dir.
        let secrets = crate::secrets::Secrets::open(&store, &data.join(crate::secrets::KEY_FILE))
            .await
            .unwrap();
        let vars = crate::secrets::Vars([("K".to_owned(), "v-123".to_owned())].into());
        let row = crate::store::EnvVersionRow {
            app: "web".to_owned(),
            layer: String::new(),
            version: 1,
            actor: "t".to_owned(),
            created_at: 1,
            change: "set".to_owned(),
            set_keys: vec!["K".to_owned()],
            unset_keys: Vec::new(),
            rollback_to: None,
            var_count: 1,
            sealed: secrets.seal_vars("web", 1, "", &vars).unwrap(),
        };
        let event = crate::audit::AuditEvent::success(
            "ENV_CHANGED",
            "t",
            "app",
            "web",
            serde_json::json!({}),
        );
        store.insert_env_version(&row, &event).await.unwrap();
        let identity = age::x25519::Identity::generate();
        let schedule = Schedule {
            dir: home.path().join("backups"),
            every: Duration::from_secs(60),
            keep: 2,
            recipient: identity.to_public(),
        };
        let mut written = Vec::new();
        for _ in 0..3 {
            written.push(scheduled(&store, &data, &schedule).await.unwrap().path);
            // Names are by the second.
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let mut left: Vec<PathBuf> = fs::read_dir(&schedule.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        left.sort();
        assert_eq!(left, written[1..].to_vec(), "the oldest is removed");

        let id_file = home.path().join("key.txt");
        fs::write(&id_file, identity.to_string().expose_secret()).unwrap();
        let restored = home.path().join("restored");
        let report = restore(&written[2], &restored, &Key::IdentityFile(id_file))
            .await
            .unwrap();
        assert_eq!(report.ca_sha256, ca.fingerprint());
        assert_eq!(
            Ca::load_existing(&restored).unwrap().fingerprint(),
            ca.fingerprint()
        );
        // The restored key file opens the restored environment.
        {
            use std::os::unix::fs::PermissionsExt as _;
            let key = restored.join(crate::secrets::KEY_FILE);
            assert_eq!(
                fs::metadata(&key).unwrap().permissions().mode() & 0o777,
                0o600
            );
            let store = Store::open(&restored).await.unwrap();
            let secrets = crate::secrets::Secrets::open(&store, &key).await.unwrap();
            let row = store.env_latest("web").await.unwrap().unwrap();
            assert_eq!(secrets.open_vars(&row).unwrap(), vars);
            // A missing key file is not made anew, and says so; another
            // key file does not open it, and says so.
            let other_key = home.path().join("other.key");
            let err = crate::secrets::Secrets::open(&store, &other_key)
                .await
                .unwrap_err();
            assert!(err.to_string().contains("is missing"), "{err}");
            assert!(!other_key.exists());
            crate::secrets::load_or_create_key_file(&other_key).unwrap();
            let err = crate::secrets::Secrets::open(&store, &other_key)
                .await
                .unwrap_err();
            assert!(
                err.to_string().contains("does not open the data key"),
                "{err}"
            );
            store.close().await;
        }
        // A passphrase cannot open a file made for a recipient.
        let other = home.path().join("other");
        let err = restore(
            &written[2],
            &other,
            &Key::Passphrase(SecretString::from("a passphrase".to_owned())),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, BackupError::Decrypt { .. }), "{err}");
        assert!(!other.exists());
    }

    #[tokio::test]
    async fn a_rotation_in_progress_is_restored_with_its_new_ca() {
        let home = tempfile::tempdir().unwrap();
        let data = home.path().join("data");
        Ca::load_or_create(&data).unwrap();
        let store = Store::open(&data).await.unwrap();
        let rotation = crate::pki::rotation::start(&data, true, 1000).unwrap();
        let identity = age::x25519::Identity::generate();
        let schedule = Schedule {
            dir: home.path().join("backups"),
            every: Duration::from_secs(60),
            keep: 1,
            recipient: identity.to_public(),
        };
        let written = scheduled(&store, &data, &schedule).await.unwrap().path;
        let id_file = home.path().join("key.txt");
        fs::write(&id_file, identity.to_string().expose_secret()).unwrap();
        let restored = home.path().join("restored");
        restore(&written, &restored, &Key::IdentityFile(id_file))
            .await
            .unwrap();
        assert_eq!(
            crate::pki::rotation::current(&restored).unwrap(),
            Some(rotation.clone())
        );
        let ca = Ca::load_existing(&restored).unwrap();
        assert_eq!(ca.trusted().len(), 2);
        assert_eq!(ca.fingerprint(), rotation.old_ca_sha256);
        assert_eq!(ca.next_fingerprint(), Some(rotation.new_ca_sha256.clone()));
        // And it can be finished there.
        crate::pki::rotation::finish(&restored).unwrap();
        assert_eq!(
            Ca::load_existing(&restored).unwrap().fingerprint(),
            rotation.new_ca_sha256
        );
    }

    #[test]
    fn keys_come_from_exactly_one_flag() {
        let dir = tempfile::tempdir().unwrap();
        let short = dir.path().join("short");
        fs::write(&short, "seven77\n").unwrap();
        let err = Key::from_flags(Some(&short), None, None).unwrap_err();
        assert!(err.to_string().contains("at least 8 characters"), "{err}");
        let err = Key::from_flags(None, None, None).unwrap_err();
        assert!(err.to_string().contains("--passphrase-file"), "{err}");
        let err = Key::from_flags(None, Some("age1nope"), None).unwrap_err();
        assert!(err.to_string().contains("not an age public key"), "{err}");
        let err = Key::from_flags(Some(&short), Some("x"), None).unwrap_err();
        assert!(err.to_string().contains("only one"), "{err}");
    }
}
