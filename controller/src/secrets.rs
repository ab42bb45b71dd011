//! Apps' environments at rest: sealed with AES-256-GCM (ring) under a
//! random data key, which is itself sealed under the key file
//! (`secrets.key`, 0600, made on the first start; its path is
//! configurable). The database holds only sealed blobs, so a copy of it —
//! or of its WAL, or a backup — shows no value without the key file.
//!
//! Also the pure part of a change: applying set/unset/import to a set of
//! variables, rendering them as the `.env` text the agents write, and the
//! layers: a node's environment is the base overlaid by the layers of the
//! tags it carries ([`effective`]), and a tag layer may not set a name
//! another layer of the same node sets ([`conflicts`]).
//! Values never reach a log line, an error or an audit event here.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

use crate::store::{EnvVersionRow, Store, StoreError};

/// The key file's name in the data dir, by default.
pub const KEY_FILE: &str = "secrets.key";

/// Associated data of the sealed data key: it opens as nothing else.
const DATA_KEY_AAD: &[u8] = b"slipway env data key v1";

/// Errors of the key file and of sealing.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    /// The key file cannot be read or made.
    #[error("secrets key file {path}: {why}")]
    KeyFile {
        /// Which file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The key file does not open the data key in the database.
    #[error(
        "the secrets key file {0} does not open the data key stored in the database: \
         it is not the key file this database was set up with (restore that one)"
    )]
    WrongKey(PathBuf),
    /// A stored version does not open (tampered with, or moved).
    #[error("env version {version} of app {app} does not open: the stored row was altered")]
    Corrupt {
        /// The app.
        app: String,
        /// The version.
        version: u64,
    },
    /// No randomness for a nonce or a key.
    #[error("secure random source failed")]
    Random,
    /// The store.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The opened data key. Its `Debug` shows nothing of it.
#[derive(Clone)]
pub struct Secrets {
    data_key: std::sync::Arc<LessSafeKey>,
}

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secrets(..)")
    }
}

fn random<const N: usize>() -> Result<[u8; N], SecretsError> {
    crate::pki::crypto::random_bytes::<N>().map_err(|_| SecretsError::Random)
}

fn key_of(bytes: &[u8; 32]) -> LessSafeKey {
    // 32 bytes is AES-256's key length: `new` cannot fail on it.
    #[allow(clippy::expect_used)]
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("a 32-byte AES-256 key"))
}

/// nonce || ciphertext || tag.
fn seal(key: &LessSafeKey, aad: &[u8], plain: &[u8]) -> Result<Vec<u8>, SecretsError> {
    let nonce = random::<NONCE_LEN>()?;
    let mut out = plain.to_vec();
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut out,
    )
    .map_err(|_| SecretsError::Random)?;
    let mut sealed = nonce.to_vec();
    sealed.extend_from_slice(&out);
    Ok(sealed)
}

/// The plain text of [`seal`]'s output, or None if it does not open.
fn open(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_LEN {
        return None;
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
    let mut buf = body.to_vec();
    let plain = key.open_in_place(nonce, Aad::from(aad), &mut buf).ok()?;
    Some(plain.to_vec())
}

/// Reads the key file, or makes it (0600, 32 random bytes as hex) when
/// there is none. A key file others may read is refused.
pub fn load_or_create_key_file(path: &Path) -> Result<[u8; 32], SecretsError> {
    let err = |why: String| SecretsError::KeyFile {
        path: path.to_owned(),
        why,
    };
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(err(format!(
                    "mode {mode:04o} lets others read it; `chmod 600` it"
                )));
            }
            let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
            let bytes = hex::decode(text.trim())
                .map_err(|_| err("expected 64 hex characters".to_owned()))?;
            <[u8; 32]>::try_from(bytes.as_slice())
                .map_err(|_| err("expected 64 hex characters (32 bytes)".to_owned()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| err(format!("create its directory: {e}")))?;
            }
            let key = random::<32>()?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| err(format!("create: {e}")))?;
            file.write_all(format!("{}\n", hex::encode(key)).as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(|e| err(format!("write: {e}")))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                if let Ok(d) = std::fs::File::open(dir) {
                    let _ = d.sync_all();
                }
            }
            tracing::info!(path = %path.display(), "created the secrets key file (keep a copy apart from the backups)");
            Ok(key)
        }
        Err(e) => Err(err(e.to_string())),
    }
}

impl Secrets {
    /// Opens (or, on the first start, makes) the data key of `store` with
    /// the key file at `key_file`.
    pub async fn open(store: &Store, key_file: &Path) -> Result<Self, SecretsError> {
        let mut stored = store.env_data_key().await?;
        if stored.is_some() && !key_file.exists() && !store.has_env_versions().await? {
            // Nothing was sealed under the lost key file: start afresh.
            store.drop_unused_env_data_key().await?;
            stored = None;
        }
        if stored.is_some() && !key_file.exists() {
            // A new key file would never open what is stored: say so
            // rather than make one.
            return Err(SecretsError::KeyFile {
                path: key_file.to_owned(),
                why: "is missing, but the database holds environments sealed under it; \
                      restore it (a backup of the data dir holds it)"
                    .to_owned(),
            });
        }
        let file_key = key_of(&load_or_create_key_file(key_file)?);
        let sealed = match stored {
            Some(sealed) => sealed,
            None => {
                let data = random::<32>()?;
                let sealed = seal(&file_key, DATA_KEY_AAD, &data)?;
                store.init_env_data_key(&sealed, crate::now_unix()).await?
            }
        };
        let data = open(&file_key, DATA_KEY_AAD, &sealed)
            .and_then(|d| <[u8; 32]>::try_from(d.as_slice()).ok())
            .ok_or_else(|| SecretsError::WrongKey(key_file.to_owned()))?;
        Ok(Self {
            data_key: std::sync::Arc::new(key_of(&data)),
        })
    }

    /// Seals the variables of `app`'s `version` (of `layer`: '' for the
    /// base).
    pub fn seal_vars(
        &self,
        app: &str,
        version: u64,
        layer: &str,
        vars: &Vars,
    ) -> Result<Vec<u8>, SecretsError> {
        let plain = serde_json::to_vec(&vars.0).map_err(|_| SecretsError::Random)?;
        seal(&self.data_key, aad(app, version, layer).as_bytes(), &plain)
    }

    /// The variables of a stored version.
    pub fn open_vars(&self, row: &EnvVersionRow) -> Result<Vars, SecretsError> {
        let corrupt = || SecretsError::Corrupt {
            app: row.app.clone(),
            version: row.version,
        };
        let plain = open(
            &self.data_key,
            aad(&row.app, row.version, &row.layer).as_bytes(),
            &row.sealed,
        )
        .ok_or_else(corrupt)?;
        serde_json::from_slice(&plain)
            .map(Vars)
            .map_err(|_| corrupt())
    }
}

/// The associated data of a sealed version: "<app>/<version>" for the
/// base layer (as before layers existed), "<app>/<version>/<tag>" for a tag
/// layer, so a row moved to another app, version or layer does not open.
fn aad(app: &str, version: u64, layer: &str) -> String {
    if layer.is_empty() {
        format!("{app}/{version}")
    } else {
        format!("{app}/{version}/{layer}")
    }
}

/// An environment: name -> value, sorted. `Debug` shows the names only.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Vars(pub BTreeMap<String, String>);

impl fmt::Debug for Vars {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.keys()).finish()
    }
}

/// What a change did to the names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeSummary {
    /// Names added or given another value.
    pub set: Vec<String>,
    /// Names removed.
    pub unset: Vec<String>,
}

impl Vars {
    /// `self` with `set` applied and `unset` removed; with `replace`, `set`
    /// is the whole new environment. Returns the new one and what changed.
    pub fn apply(
        &self,
        set: &[(String, String)],
        unset: &[String],
        replace: bool,
    ) -> (Vars, ChangeSummary) {
        let mut next = if replace {
            BTreeMap::new()
        } else {
            self.0.clone()
        };
        for (k, v) in set {
            next.insert(k.clone(), v.clone());
        }
        for k in unset {
            next.remove(k);
        }
        let next = Vars(next);
        let summary = self.diff(&next);
        (next, summary)
    }

    /// Which names `next` sets (new or changed) and removes, from `self`.
    pub fn diff(&self, next: &Vars) -> ChangeSummary {
        ChangeSummary {
            set: next
                .0
                .iter()
                .filter(|(k, v)| self.0.get(*k) != Some(*v))
                .map(|(k, _)| k.clone())
                .collect(),
            unset: self
                .0
                .keys()
                .filter(|k| !next.0.contains_key(*k))
                .cloned()
                .collect(),
        }
    }

    /// The `.env` text: one `KEY="value"` line per variable, double-quoted
    /// with `\\`, `"` and newlines escaped — what the agent's parser reads
    /// back as the same value.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# Written by slipway from the controller's env; changes here are replaced.\n",
        );
        for (k, v) in &self.0 {
            out.push_str(k);
            out.push_str("=\"");
            for c in v.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '"' => out.push_str("\\\""),
                    '\n' => out.push_str("\\n"),
                    c => out.push(c),
                }
            }
            out.push_str("\"\n");
        }
        out
    }
}

/// One version of an app's environment, opened: the layer it changed
/// ('' for the base, else a tag) and that layer's whole content after it.
#[derive(Debug, Clone)]
pub struct LayerVersion {
    /// The version (one sequence per app across its layers).
    pub version: u64,
    /// '' or the tag.
    pub layer: String,
    /// The layer's variables after it.
    pub vars: Vars,
}

/// A tag as layers and node tag sets spell it: `key:value`, or `key` for a
/// label without a value (`role:` and `role` are the same tag).
pub fn canonical_tag(tag: &str) -> String {
    match tag.split_once(':') {
        Some((key, "")) => key.to_owned(),
        _ => tag.to_owned(),
    }
}

/// Each layer's content after `history` (oldest first).
pub fn layer_state(history: &[LayerVersion]) -> BTreeMap<String, Vars> {
    let mut state = BTreeMap::new();
    for v in history {
        state.insert(v.layer.clone(), v.vars.clone());
    }
    state
}

/// The environment of a node carrying `tags` when the layers hold
/// `state`: the base, overlaid by each tag layer the node carries. Tag
/// layers are applied in ascending tag order, so should two of them set
/// the same name (a change that would do so for a live node is refused,
/// but a node can gain a second tag later) the greater tag wins, the same
/// on every run.
pub fn compose(state: &BTreeMap<String, Vars>, tags: &BTreeSet<String>) -> Vars {
    let mut out = state.get("").cloned().unwrap_or_default();
    for (layer, vars) in state {
        if !layer.is_empty() && tags.contains(layer) {
            out.0
                .extend(vars.0.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
    }
    out
}

/// The environment a node carrying `tags` gets after `history` (oldest
/// first), and the version of the newest change that altered it (0: no
/// version ever gave it a variable). A change to a layer the node does not
/// carry, or one whose names a carried layer overrides, leaves both alone:
/// that is the version the node's `.env` should hold.
pub fn effective(history: &[LayerVersion], tags: &BTreeSet<String>) -> (u64, Vars) {
    let mut state: BTreeMap<String, Vars> = BTreeMap::new();
    let mut current = (0, Vars::default());
    for v in history {
        if !v.layer.is_empty() && !tags.contains(&v.layer) {
            continue;
        }
        state.insert(v.layer.clone(), v.vars.clone());
        let next = compose(&state, tags);
        if next != current.1 || current.0 == 0 {
            current = (v.version, next);
        }
    }
    current
}

/// [`effective`] for many nodes at once: nodes whose tags meet the app's
/// layers alike (most of a fleet) share one computation, so a page or a
/// status over a thousand nodes replays the history a few times, not a
/// thousand.
#[derive(Debug)]
pub struct EffectiveCache<'a> {
    history: &'a [LayerVersion],
    layers: BTreeSet<&'a str>,
    memo: std::collections::HashMap<BTreeSet<String>, (u64, Vars)>,
}

impl<'a> EffectiveCache<'a> {
    /// A cache over `history` (oldest first).
    pub fn new(history: &'a [LayerVersion]) -> Self {
        Self {
            history,
            layers: history
                .iter()
                .filter(|v| !v.layer.is_empty())
                .map(|v| v.layer.as_str())
                .collect(),
            memo: std::collections::HashMap::new(),
        }
    }

    /// [`effective`] of a node carrying `tags`.
    pub fn of(&mut self, tags: &BTreeSet<String>) -> (u64, Vars) {
        let relevant: BTreeSet<String> = tags
            .iter()
            .filter(|t| self.layers.contains(t.as_str()))
            .cloned()
            .collect();
        if let Some(found) = self.memo.get(&relevant) {
            return found.clone();
        }
        let found = effective(self.history, &relevant);
        self.memo.insert(relevant, found.clone());
        found
    }
}

/// Two tag layers of one node that set the same name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerConflict {
    /// The node's name.
    pub node: String,
    /// The name both set.
    pub key: String,
    /// The two tags, sorted.
    pub tags: (String, String),
}

impl fmt::Display for LayerConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "node {} carries both {} and {}, and both layers would set {}",
            self.node, self.tags.0, self.tags.1, self.key
        )
    }
}

/// Where layer `changed` (a tag) and another tag layer would both set a
/// name on one of `nodes` (name, tags) when the layers hold `state`.
pub fn conflicts(
    state: &BTreeMap<String, Vars>,
    nodes: &[(String, BTreeSet<String>)],
    changed: &str,
) -> Vec<LayerConflict> {
    let mut out = Vec::new();
    let Some(mine) = state.get(changed) else {
        return out;
    };
    for (node, tags) in nodes {
        if !tags.contains(changed) {
            continue;
        }
        for (layer, vars) in state {
            if layer.is_empty() || layer == changed || !tags.contains(layer) {
                continue;
            }
            for key in mine.0.keys().filter(|k| vars.0.contains_key(*k)) {
                let pair = if changed < layer.as_str() {
                    (changed.to_owned(), layer.clone())
                } else {
                    (layer.clone(), changed.to_owned())
                };
                out.push(LayerConflict {
                    node: node.clone(),
                    key: key.clone(),
                    tags: pair,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::store::testing::store_tests!(
        a_lost_key_file_is_replaced_only_while_nothing_is_sealed_under_it
    );

    #[test]
    fn sealed_blobs_open_only_with_their_key_and_place() {
        let key = key_of(&[7; 32]);
        let sealed = seal(&key, b"web/1", b"secret-value").unwrap();
        assert!(!sealed
            .windows(b"secret-value".len())
            .any(|w| w == b"secret-value"));
        assert_eq!(open(&key, b"web/1", &sealed).unwrap(), b"secret-value");
        assert!(open(&key, b"web/2", &sealed).is_none());
        assert!(open(&key_of(&[8; 32]), b"web/1", &sealed).is_none());
    }

    #[test]
    fn changes_say_which_names_they_touch() {
        let v1 = Vars(
            [("A".into(), "1".into()), ("B".into(), "2".into())]
                .into_iter()
                .collect(),
        );
        let (v2, s) = v1.apply(
            &[("A".into(), "1".into()), ("C".into(), "3".into())],
            &["B".into()],
            false,
        );
        assert_eq!(s.set, vec!["C".to_owned()]);
        assert_eq!(s.unset, vec!["B".to_owned()]);
        assert_eq!(v2.0.len(), 2);
        let (v3, s) = v2.apply(&[("Z".into(), "9".into())], &[], true);
        assert_eq!(v3.0.keys().collect::<Vec<_>>(), vec!["Z"]);
        assert_eq!(s.unset, vec!["A".to_owned(), "C".to_owned()]);
        assert_eq!(format!("{v3:?}"), "{\"Z\"}");
    }

    fn vars(pairs: &[(&str, &str)]) -> Vars {
        Vars(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    fn lv(version: u64, layer: &str, pairs: &[(&str, &str)]) -> LayerVersion {
        LayerVersion {
            version,
            layer: layer.to_owned(),
            vars: vars(pairs),
        }
    }

    #[test]
    fn a_node_sees_the_base_overlaid_by_its_tags_layers_at_the_version_that_changed_it() {
        let history = vec![
            lv(1, "", &[("A", "base"), ("B", "b")]),
            lv(2, "env:staging", &[("A", "staging")]),
            // Overridden on staging nodes: they keep v2.
            lv(3, "", &[("A", "base2"), ("B", "b")]),
            lv(4, "env:production", &[("C", "prod")]),
            lv(5, "", &[("A", "base2"), ("B", "b5")]),
        ];
        let staging: BTreeSet<String> = ["env:staging".to_owned()].into();
        let production: BTreeSet<String> = ["env:production".to_owned()].into();
        let none = BTreeSet::new();
        assert_eq!(
            effective(&history[..4], &staging),
            (2, vars(&[("A", "staging"), ("B", "b")]))
        );
        assert_eq!(
            effective(&history, &staging),
            (5, vars(&[("A", "staging"), ("B", "b5")]))
        );
        assert_eq!(
            effective(&history[..4], &production),
            (4, vars(&[("A", "base2"), ("B", "b"), ("C", "prod")]))
        );
        assert_eq!(
            effective(&history[..4], &none),
            (3, vars(&[("A", "base2"), ("B", "b")]))
        );
        let mut cache = EffectiveCache::new(&history);
        let staging_too: BTreeSet<String> = ["env:staging".to_owned(), "pf-core".to_owned()].into();
        assert_eq!(cache.of(&staging_too), effective(&history, &staging));
        assert_eq!(cache.of(&staging), effective(&history, &staging));
        assert_eq!(cache.of(&none), effective(&history, &none));
        // Only a layer the node does not carry: nothing to hold.
        assert_eq!(effective(&history[1..2], &none), (0, Vars::default()));
        assert_eq!(canonical_tag("role:"), "role");
        assert_eq!(canonical_tag("env:staging"), "env:staging");
    }

    #[test]
    fn two_layers_of_one_node_setting_a_name_are_found_and_the_greater_tag_wins() {
        let state: BTreeMap<String, Vars> = [
            (String::new(), vars(&[("K", "base")])),
            ("env:staging".to_owned(), vars(&[("K", "s"), ("X", "1")])),
            ("role:api".to_owned(), vars(&[("K", "r")])),
        ]
        .into();
        let both: BTreeSet<String> = ["env:staging".to_owned(), "role:api".to_owned()].into();
        let nodes = vec![
            ("web-1".to_owned(), both.clone()),
            ("web-2".to_owned(), ["env:staging".to_owned()].into()),
        ];
        let found = conflicts(&state, &nodes, "role:api");
        assert_eq!(
            found,
            vec![LayerConflict {
                node: "web-1".to_owned(),
                key: "K".to_owned(),
                tags: ("env:staging".to_owned(), "role:api".to_owned()),
            }]
        );
        assert_eq!(
            found[0].to_string(),
            "node web-1 carries both env:staging and role:api, and both layers would set K"
        );
        assert_eq!(compose(&state, &both).0["K"], "r");
        assert!(conflicts(&state, &nodes[1..], "env:staging").is_empty());
    }

    #[test]
    fn rendered_values_parse_back_the_same() {
        let vars = Vars(
            [
                ("Q".into(), "say \"hi\" \\ #not a comment".into()),
                ("ML".into(), "line1\nline2".into()),
                ("EMPTY".into(), String::new()),
            ]
            .into_iter()
            .collect(),
        );
        let text = vars.render();
        let parsed = slipway_agent::envfile::parse(Path::new(".env"), &text).unwrap();
        let back: BTreeMap<String, String> = parsed.into_iter().collect();
        assert_eq!(back, vars.0);
    }

    #[test]
    fn a_key_file_others_can_read_is_refused_and_a_new_one_is_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k/secrets.key");
        let k1 = load_or_create_key_file(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(load_or_create_key_file(&path).unwrap(), k1);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create_key_file(&path).unwrap_err().to_string();
        assert!(err.contains("0644") && err.contains("chmod 600"), "{err}");
    }

    async fn a_lost_key_file_is_replaced_only_while_nothing_is_sealed_under_it(store: Store) {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join(KEY_FILE);
        Secrets::open(&store, &key).await.unwrap();
        std::fs::remove_file(&key).unwrap();
        // No env yet: a new key file and data key.
        let secrets = Secrets::open(&store, &key).await.unwrap();
        assert!(key.exists());
        let vars = Vars([("K".to_owned(), "v".to_owned())].into());
        let row = EnvVersionRow {
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
            crate::audit::ENV_CHANGED,
            "t",
            "app",
            "web",
            serde_json::json!({}),
        );
        store.insert_env_version(&row, &event).await.unwrap();
        // Now the same loss refuses to start, naming the file.
        std::fs::remove_file(&key).unwrap();
        let err = Secrets::open(&store, &key).await.unwrap_err().to_string();
        assert!(
            err.contains("is missing") && err.contains(KEY_FILE),
            "{err}"
        );
        assert!(!key.exists());
        // A second change of the same version is refused, not overwritten.
        let err = store.insert_env_version(&row, &event).await.unwrap_err();
        assert!(matches!(err, StoreError::EnvConflict { .. }), "{err}");
    }
}
