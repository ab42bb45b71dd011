//! The `.env` format both ends read: the agent its `shared/.env`, the
//! `slipway env import` CLI a file to send. Accepts what dotenv files in the
//! wild contain: comments, blank lines, `export KEY=value`, single- or
//! double-quoted values (double quotes take `\n`, `\"` and `\\`
//! escapes). Errors name the line and the variable, never a value.

/// A line that is not `KEY=value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong (names the variable, never its value).
    pub message: String,
}

impl std::fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for SyntaxError {}

/// Parses `text`: the variables in file order (a later line of the same
/// name replaces an earlier one), or the first bad line.
pub fn parse(text: &str) -> Result<Vec<(String, String)>, SyntaxError> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let err = |message: String| SyntaxError {
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
        if !crate::limits::is_env_key(key) {
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
        let env = parse(text).unwrap();
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
}
