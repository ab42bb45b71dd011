//! `shared/.env`: `KEY=value` lines handed to the app's environment.
//!
//! Accepts what dotenv files in the wild contain: comments, blank lines,
//! `export KEY=value`, single- or double-quoted values (double quotes take
//! `\n`, `\"` and `\\` escapes). Values never leave the node: nothing here is
//! logged or reported.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EnvError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Reads and parses `root/shared/.env`; no file means no variables.
pub fn load(root: &Path) -> Result<Vec<(String, String)>, EnvError> {
    let path = root.join("shared/.env");
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&path, &text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(EnvError::Read { path, source }),
    }
}

/// Parses `text` (read from `path`, for messages).
pub fn parse(path: &Path, text: &str) -> Result<Vec<(String, String)>, EnvError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let err = |message: String| EnvError::Syntax {
            path: path.to_owned(),
            line: i + 1,
            message,
        };
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line
            .strip_prefix("export ")
            .map(str::trim_start)
            .unwrap_or(line);
        let Some((key, value)) = line.split_once('=') else {
            return Err(err("expected KEY=value".into()));
        };
        let key = key.trim();
        let valid_key = !key.is_empty()
            && !key.as_bytes()[0].is_ascii_digit()
            && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_key {
            return Err(err(format!("{key:?} is not a valid variable name")));
        }
        let value = value.trim();
        let value = if let Some(rest) = value.strip_prefix('"') {
            let Some(end) = rest.rfind('"') else {
                return Err(err(format!(
                    "unterminated double quote in the value of {key}"
                )));
            };
            let mut v = String::new();
            let mut chars = rest[..end].chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    match chars.next() {
                        Some('n') => v.push('\n'),
                        Some(o) => v.push(o),
                        None => v.push('\\'),
                    }
                } else {
                    v.push(c);
                }
            }
            v
        } else if let Some(rest) = value.strip_prefix('\'') {
            let Some(end) = rest.rfind('\'') else {
                return Err(err(format!(
                    "unterminated single quote in the value of {key}"
                )));
            };
            rest[..end].to_owned()
        } else {
            // An unquoted value ends at an inline comment.
            match value.find(" #") {
                Some(i) => value[..i].trim_end().to_owned(),
                None => value.to_owned(),
            }
        };
        out.retain(|(k, _)| k != key);
        out.push((key.to_owned(), value));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_common_forms() {
        let text = "# db\nexport DATABASE_URL=postgres://x\nPORT = 3000 # web\nA=\"line\\nnext\"\nB='raw \\n'\nPORT=3001\n\n";
        let env = parse(Path::new(".env"), text).unwrap();
        assert_eq!(
            env,
            vec![
                ("DATABASE_URL".to_owned(), "postgres://x".to_owned()),
                ("A".to_owned(), "line\nnext".to_owned()),
                ("B".to_owned(), "raw \\n".to_owned()),
                ("PORT".to_owned(), "3001".to_owned()),
            ]
        );
    }

    #[test]
    fn errors_name_the_line() {
        let err = parse(Path::new("/app/shared/.env"), "A=1\nnot a pair\n").unwrap_err();
        assert_eq!(err.to_string(), "/app/shared/.env:2: expected KEY=value");
        let err = parse(Path::new(".env"), "1X=2").unwrap_err();
        assert!(err.to_string().contains("not a valid variable name"));
        let err = parse(Path::new(".env"), "A=\"open").unwrap_err();
        assert!(err.to_string().contains("unterminated"));
    }
}
