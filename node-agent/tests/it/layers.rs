//! The agent's modules form layers (see the `# Layout` of `src/lib.rs`):
//! a room imports only from the layers below it, or from a room of its own
//! layer that does not import it back; inside a room (a folder module), its
//! files import each other without a cycle either.
//!
//! This reads every file under `src/`, collects its `crate::ROOM` references
//! (`use crate::x::…`, `use crate::{x, y}`, `crate::x::f()` in code — not in
//! comments or strings) and its `super::FILE` references to sibling files,
//! and fails naming each import that goes up a layer or closes a cycle. A
//! new room must be added to [`LAYERS`], at the layer it belongs to.

// Helpers here panic on a source tree they cannot read, like the tests.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Every room of the agent and its layer: the one table of the layering.
const LAYERS: &[(&str, u8)] = &[
    // L4: entry points.
    ("cli", 4),
    // L3: the long-running agent and its controller.
    ("daemon", 3),
    ("link", 3),
    // L2: the pipeline.
    ("artifact", 2),
    ("deploy", 2),
    // L1: the pieces of an app.
    ("driver", 1),
    ("front", 1),
    ("health", 1),
    ("logs", 1),
    ("metrics", 1),
    ("public", 1),
    ("release", 1),
    ("supervise", 1),
    ("upkeep", 1),
    // L0: foundations.
    ("bridge", 0),
    ("config", 0),
    ("digest", 0),
    ("durable", 0),
    ("envfile", 0),
    ("error", 0),
    ("fault", 0),
    ("listen", 0),
    ("lock", 0),
    ("proc", 0),
    ("version", 0),
];

/// Files that are not rooms: the crate root declares the rooms (and keeps
/// one re-export), the binary's `main.rs` sits on top of everything.
const NOT_ROOMS: &[&str] = &["lib.rs", "main.rs"];

/// One reference from a file to a room (or, inside a room, a sibling file).
#[derive(Debug, Clone)]
struct Use {
    /// Where: `src/…` path and 1-based line.
    at: String,
    to: String,
}

/// The source files of the agent: path relative to `src/` → text.
fn sources() -> BTreeMap<PathBuf, String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let rel = path.strip_prefix(&src).unwrap().to_owned();
                out.insert(rel, fs::read_to_string(&path).unwrap());
            }
        }
    }
    out
}

/// `text` with comments, string and char literals blanked out (newlines
/// kept, so line numbers stay right).
fn code_only(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    let mut i = 0;
    while i < c.len() {
        let next = c.get(i + 1).copied();
        if c[i] == '/' && next == Some('/') {
            while i < c.len() && c[i] != '\n' {
                blank(&mut out, c[i]);
                i += 1;
            }
        } else if c[i] == '/' && next == Some('*') {
            // Block comments nest.
            let mut depth = 0usize;
            while i < c.len() {
                let pair = (c[i], c.get(i + 1).copied());
                if pair == ('/', Some('*')) || pair == ('*', Some('/')) {
                    if pair.0 == '/' {
                        depth += 1;
                    } else {
                        depth -= 1;
                    }
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if c[i] == 'r'
            && (next == Some('"') || next == Some('#'))
            && (i == 0 || !(c[i - 1].is_alphanumeric() || c[i - 1] == '_'))
        {
            // r"…", r#"…"#: ends at a quote followed by as many #.
            let mut hashes = 0;
            let mut j = i + 1;
            while c.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if c.get(j) != Some(&'"') {
                out.push(c[i]);
                i += 1;
                continue;
            }
            j += 1;
            while j < c.len() {
                if c[j] == '"' && (1..=hashes).all(|k| c.get(j + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            for &ch in &c[i..j.min(c.len())] {
                blank(&mut out, ch);
            }
            i = j;
        } else if c[i] == '"' {
            blank(&mut out, c[i]);
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    blank(&mut out, c[i]);
                    i += 1;
                }
                if i < c.len() {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
            if i < c.len() {
                blank(&mut out, c[i]);
                i += 1;
            }
        } else if c[i] == '\'' && (next == Some('\\') || c.get(i + 2) == Some(&'\'')) {
            // A char literal ('x', '\n', '\''); a lifetime has no closing quote.
            let end = if next == Some('\\') {
                (i + 3..c.len())
                    .find(|&k| c[k] == '\'')
                    .unwrap_or(c.len() - 1)
            } else {
                i + 2
            };
            for &ch in &c[i..=end] {
                blank(&mut out, ch);
            }
            i = end + 1;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

fn ident_at(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// The first names of the paths in a `{…}` group that starts `s` (after
/// the brace): `{a, b::c, d::{e, f}}` → a, b, d.
fn brace_heads(s: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut depth = 1;
    let mut expect_head = true;
    for (k, ch) in s.char_indices() {
        match ch {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            ',' if depth == 1 => expect_head = true,
            c if expect_head && depth == 1 && (c.is_alphabetic() || c == '_') => {
                heads.push(ident_at(&s[k..]));
                expect_head = false;
            }
            _ => {}
        }
    }
    heads
}

/// The names `text` reaches through `prefix` (`crate::` or `super::`),
/// with their line numbers.
fn references(text: &str, prefix: &str) -> Vec<(usize, String)> {
    let code = code_only(text);
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(k) = code[from..].find(prefix) {
        let at = from + k;
        from = at + prefix.len();
        // `$crate::`, `foo_crate::` and the like are not ours.
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$' || c == ':') {
            continue;
        }
        let line = code[..at].matches('\n').count() + 1;
        let rest = &code[from..];
        if let Some(group) = rest.strip_prefix('{') {
            out.extend(brace_heads(group).into_iter().map(|h| (line, h)));
        } else {
            let name = ident_at(rest);
            if !name.is_empty() {
                out.push((line, name));
            }
        }
    }
    out
}

/// The room a file belongs to: its first path component (`link/tls.rs` →
/// `link`, `deploy.rs` → `deploy`); `None` for the crate root and `main.rs`.
fn room_of(rel: &Path) -> Option<String> {
    let first = rel.components().next()?.as_os_str().to_str()?;
    if NOT_ROOMS.contains(&first) {
        return None;
    }
    Some(first.trim_end_matches(".rs").to_owned())
}

/// The file of a room's folder a path names, by its stem (`link/tls.rs` →
/// `tls`); `None` outside a folder, or for the folder's `mod.rs`.
fn file_in_room(rel: &Path) -> Option<String> {
    let mut parts = rel.iter();
    parts.next()?;
    let file = parts.next()?.to_str()?;
    (parts.next().is_none() && file != "mod.rs").then(|| file.trim_end_matches(".rs").to_owned())
}

/// A cycle in `edges` (from → to → where), as `a -> b -> a` with the
/// imports that make it.
fn find_cycle(edges: &BTreeMap<String, BTreeMap<String, String>>) -> Option<String> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeMap<String, String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_owned());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in edges.get(node).into_iter().flat_map(|m| m.keys()) {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for node in edges.keys() {
        if let Some(cycle) = visit(node, edges, &mut Vec::new(), &mut done) {
            let how: Vec<String> = cycle
                .windows(2)
                .map(|w| format!("{} -> {} at {}", w[0], w[1], edges[&w[0]][&w[1]]))
                .collect();
            return Some(format!("{} ({})", cycle.join(" -> "), how.join("; ")));
        }
    }
    None
}

/// Everything wrong with the layering of `files` (path under `src/` →
/// text), one line per problem.
fn problems(files: &BTreeMap<PathBuf, String>) -> Vec<String> {
    let layer: BTreeMap<&str, u8> = LAYERS.iter().copied().collect();
    let mut problems = Vec::new();
    // Room → room it uses → where (the first place), same layer only.
    let mut same_layer: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    // Room → its files' uses of each other.
    let mut inside: BTreeMap<String, BTreeMap<String, BTreeMap<String, String>>> = BTreeMap::new();
    let mut rooms = BTreeSet::new();
    for (rel, text) in files {
        let Some(room) = room_of(rel) else { continue };
        rooms.insert(room.clone());
        let Some(&here) = layer.get(room.as_str()) else {
            problems.push(format!(
                "src/{}: room `{room}` is not in the layer table of tests/it/layers.rs",
                rel.display()
            ));
            continue;
        };
        let mut uses: Vec<Use> = references(text, "crate::")
            .into_iter()
            .map(|(line, to)| Use {
                at: format!("src/{}:{line}", rel.display()),
                to,
            })
            .collect();
        uses.retain(|u| u.to != room && u.to != "self");
        for u in uses {
            match layer.get(u.to.as_str()) {
                None => problems.push(format!(
                    "{}: `{room}` uses crate::{}, which is not in the layer table of tests/it/layers.rs",
                    u.at, u.to
                )),
                Some(&there) if there > here => problems.push(format!(
                    "{}: `{room}` (L{here}) uses crate::{} (L{there}): an import from a higher layer",
                    u.at, u.to
                )),
                Some(&there) if there == here => {
                    same_layer
                        .entry(room.clone())
                        .or_default()
                        .entry(u.to)
                        .or_insert(u.at);
                }
                Some(_) => {}
            }
        }
        // Files of one folder: `super::sibling` and `crate::room::sibling`.
        if let Some(file) = file_in_room(rel) {
            let own = format!("crate::{room}::");
            let siblings = references(text, "super::")
                .into_iter()
                .chain(references(text, &own));
            for (line, to) in siblings {
                if to != file {
                    inside
                        .entry(room.clone())
                        .or_default()
                        .entry(file.clone())
                        .or_default()
                        .entry(to)
                        .or_insert(format!("src/{}:{line}", rel.display()));
                }
            }
        }
    }
    if let Some(cycle) = find_cycle(&same_layer) {
        problems.push(format!("rooms of one layer import each other: {cycle}"));
    }
    for (room, edges) in &inside {
        // A name that is no file of the room (an item of its mod.rs) is a
        // leaf here: it cannot close a cycle.
        if let Some(cycle) = find_cycle(edges) {
            problems.push(format!("files of `{room}` import each other: {cycle}"));
        }
    }
    for (name, _) in LAYERS {
        if !rooms.contains(*name) {
            problems.push(format!(
                "`{name}` is in the layer table of tests/it/layers.rs but not under src/"
            ));
        }
    }
    problems
}

#[test]
fn every_room_imports_only_from_below() {
    let problems = problems(&sources());
    assert!(
        problems.is_empty(),
        "the agent's layering is broken (see the # Layout of src/lib.rs):\n  {}",
        problems.join("\n  ")
    );
}

/// The checker itself: an import from above, a cycle within a layer or a
/// folder, and an unknown room are each caught; comments and strings are
/// not code.
#[test]
fn upward_imports_and_cycles_are_caught() {
    let mut files: BTreeMap<PathBuf, String> = LAYERS
        .iter()
        .map(|(room, _)| (PathBuf::from(format!("{room}.rs")), String::new()))
        .collect();
    // The problems of `files` with `path` holding `text`.
    let with = |files: &BTreeMap<PathBuf, String>, path: &str, text: &str| {
        let mut f = files.clone();
        f.insert(PathBuf::from(path), text.to_owned());
        problems(&f)
    };
    // Fine: downward, same layer one way, and mentions that are no imports.
    assert_eq!(
        with(
            &files,
            "release.rs",
            "use crate::{config::AppConfig, durable};\nuse crate::driver;\n\
             // crate::deploy in a comment\nfn f() { let _ = \"crate::cli\"; }\n",
        ),
        Vec::<String>::new()
    );
    let up = with(
        &files,
        "release.rs",
        "fn f() {\n    crate::deploy::run();\n}\n",
    );
    assert_eq!(up.len(), 1, "{up:?}");
    assert!(
        up[0].starts_with("src/release.rs:2: `release` (L1) uses crate::deploy (L2)"),
        "{up:?}"
    );
    let braced = with(
        &files,
        "config.rs",
        "use crate::{durable, link::Session};\n",
    );
    assert!(
        braced.len() == 1 && braced[0].contains("uses crate::link (L3)"),
        "{braced:?}"
    );
    files.insert(
        PathBuf::from("driver.rs"),
        "use crate::release::Id;\n".into(),
    );
    let cycle = with(&files, "release.rs", "use crate::driver::Driver;\n");
    assert!(
        cycle.len() == 1
            && cycle[0].contains("driver -> release -> driver")
            && cycle[0].contains("src/driver.rs:1")
            && cycle[0].contains("src/release.rs:1"),
        "{cycle:?}"
    );
    files.insert(PathBuf::from("driver.rs"), String::new());
    files.insert(PathBuf::from("link/a.rs"), "use super::b::X;\n".into());
    let inner = with(&files, "link/b.rs", "use crate::link::a::Y;\n");
    assert!(
        inner.len() == 1 && inner[0].contains("files of `link` import each other: a -> b -> a"),
        "{inner:?}"
    );
    let unknown = with(&files, "gadget.rs", "");
    assert!(
        unknown.len() == 1 && unknown[0].contains("`gadget` is not in the layer table"),
        "{unknown:?}"
    );
}
