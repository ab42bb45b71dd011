//! Release ids: given by the caller (the controller gives the same id on every
//! node) or generated from the time and the artifact's hash.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest id accepted: ids become directory names and log file names.
pub const MAX_ID_LEN: usize = 128;

/// A checked release id: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 128 bytes, so it
/// is always one plain path component.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ReleaseId(String);

/// Why a string is not a release id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid release id {id:?}: {why}")]
pub struct InvalidId {
    pub id: String,
    pub why: &'static str,
}

impl ReleaseId {
    pub fn new(id: &str) -> Result<Self, InvalidId> {
        let bad = |why| {
            Err(InvalidId {
                id: id.to_owned(),
                why,
            })
        };
        if id.is_empty() {
            return bad("it is empty");
        }
        if id.len() > MAX_ID_LEN {
            return bad("it is longer than 128 characters");
        }
        if id.contains('/') {
            return bad("it contains '/'");
        }
        if id.contains("..") {
            return bad("it contains '..'");
        }
        if !id.as_bytes()[0].is_ascii_alphanumeric() {
            return bad("it must start with a letter or digit");
        }
        if !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return bad("only A-Z a-z 0-9 . _ - are allowed");
        }
        Ok(Self(id.to_owned()))
    }

    /// `YYYYMMDDTHHMMSSZ-<first 8 hex of the artifact sha256>`.
    pub fn generate(now: time::OffsetDateTime, artifact_sha256: &str) -> Self {
        let now = now.to_offset(time::UtcOffset::UTC);
        let short: String = artifact_sha256.chars().take(8).collect();
        Self(format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z-{short}",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second()
        ))
    }

    /// The same id with a `-N` suffix, for a generated id that already exists.
    pub fn with_suffix(&self, n: u32) -> Self {
        Self(format!("{}-{n}", self.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ReleaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for ReleaseId {
    type Error = InvalidId;
    fn try_from(s: String) -> Result<Self, InvalidId> {
        Self::new(&s)
    }
}

impl From<ReleaseId> for String {
    fn from(id: ReleaseId) -> String {
        id.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_ids() {
        for ok in ["v1", "20261125T111500Z-abcdef12", "a.b_c-d", "0"] {
            ReleaseId::new(ok).unwrap();
        }
    }

    #[test]
    fn refuses_paths_and_junk() {
        for bad in ["", "../x", "a/b", "..", ".hidden", "-x", "a b", "a..b", "é"] {
            assert!(ReleaseId::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(ReleaseId::new(&"a".repeat(129)).is_err());
        assert!(ReleaseId::new(&"a".repeat(128)).is_ok());
    }

    #[test]
    fn generated_ids_are_valid() {
        let t = time::macros::datetime!(2026-11-25 11:15:24 UTC);
        let id = ReleaseId::generate(t, "abcdef0123456789");
        assert_eq!(id.as_str(), "20261125T111524Z-abcdef01");
        ReleaseId::new(id.as_str()).unwrap();
        assert_eq!(id.with_suffix(2).as_str(), "20261125T111524Z-abcdef01-2");
    }
}
