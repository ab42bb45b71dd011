//! Webhook deliveries, the pure part: the `X-Hub-Signature-256` check
//! (HMAC-SHA256, compared in constant time by ring), the events Slipway
//! reads (`ping`, `push`, `release`, `workflow_run`), and which linked apps
//! an event starts a deployment of ([`matches`]). Every field read from a
//! payload is checked (lengths, characters) before it goes anywhere.

use ring::hmac;
use serde::Deserialize;

use super::api::is_commit_sha;
use super::client::Secret;
use super::config::Link;

/// Largest delivery body accepted (GitHub caps payloads at 25 MB; the
/// events Slipway reads are far smaller, a push of many commits a few MB).
pub const MAX_BODY: usize = 5 << 20;
/// Longest `X-GitHub-Delivery` id kept (GitHub's are 36-character GUIDs).
pub const MAX_DELIVERY_ID: usize = 100;
/// Assets of one release looked at (GitHub allows 1,000).
const MAX_ASSETS: usize = 1000;

/// Why a delivery's signature was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("no X-Hub-Signature-256 header")]
    Missing,
    #[error("X-Hub-Signature-256 is not sha256=<64 hex digits>")]
    Malformed,
    #[error("X-Hub-Signature-256 does not match the body and the webhook secret")]
    Mismatch,
}

/// Checks `header` (`sha256=<hex>`) against HMAC-SHA256(secret, body).
pub fn verify_signature(
    secret: &Secret,
    body: &[u8],
    header: Option<&str>,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let hex_tag = header
        .strip_prefix("sha256=")
        .ok_or(SignatureError::Malformed)?;
    if hex_tag.len() != 64 {
        return Err(SignatureError::Malformed);
    }
    let tag = hex::decode(hex_tag).map_err(|_| SignatureError::Malformed)?;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.expose().as_bytes());
    // ring compares in constant time.
    hmac::verify(&key, body, &tag).map_err(|_| SignatureError::Mismatch)
}

/// A delivery id as GitHub sends them: 1-100 of letters, digits and '-'.
pub fn check_delivery_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_DELIVERY_ID {
        return Err(format!(
            "X-GitHub-Delivery must be 1-{MAX_DELIVERY_ID} characters"
        ));
    }
    if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err("X-GitHub-Delivery must be letters, digits and '-'".into());
    }
    Ok(())
}

/// A release asset named in a `release` event.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Asset {
    pub id: u64,
    pub name: String,
    pub size: u64,
    #[serde(default)]
    pub state: String,
}

/// The parts of an event Slipway reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Ping {
        zen: String,
        hook_id: Option<u64>,
    },
    Push {
        repo: String,
        git_ref: String,
        after: String,
        deleted: bool,
    },
    Release {
        repo: String,
        action: String,
        tag: String,
        draft: bool,
        prerelease: bool,
        assets: Vec<Asset>,
    },
    WorkflowRun {
        repo: String,
        action: String,
        name: String,
        conclusion: Option<String>,
        head_branch: Option<String>,
        head_sha: String,
    },
    /// Any other event: acknowledged, ignored.
    Other(String),
}

#[derive(Deserialize)]
struct RepoField {
    full_name: String,
}

#[derive(Deserialize)]
struct PingBody {
    zen: Option<String>,
    hook_id: Option<u64>,
}

#[derive(Deserialize)]
struct PushBody {
    #[serde(rename = "ref")]
    git_ref: String,
    after: String,
    #[serde(default)]
    deleted: bool,
    repository: RepoField,
}

#[derive(Deserialize)]
struct ReleaseField {
    tag_name: String,
    #[serde(default)]
    draft: bool,
    #[serde(default)]
    prerelease: bool,
    #[serde(default)]
    assets: Vec<Asset>,
}

#[derive(Deserialize)]
struct ReleaseBody {
    action: String,
    release: ReleaseField,
    repository: RepoField,
}

#[derive(Deserialize)]
struct RunField {
    name: Option<String>,
    conclusion: Option<String>,
    head_branch: Option<String>,
    head_sha: String,
}

#[derive(Deserialize)]
struct RunBody {
    action: String,
    workflow_run: RunField,
    repository: RepoField,
}

fn bounded(field: &str, value: &str, max: usize) -> Result<(), String> {
    if value.len() > max || value.chars().any(char::is_control) {
        return Err(format!(
            "{field} is longer than {max} bytes or has control characters"
        ));
    }
    Ok(())
}

/// Reads event `name` (`X-GitHub-Event`) from `body`; the error names the
/// field that is missing or wrong.
pub fn parse(name: &str, body: &[u8]) -> Result<Event, String> {
    fn de<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
        let de = &mut serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(de).map_err(|e| format!("at {}: {}", e.path(), e.inner()))
    }
    let event = match name {
        "ping" => {
            let b: PingBody = de(body)?;
            Event::Ping {
                zen: b.zen.unwrap_or_default().chars().take(200).collect(),
                hook_id: b.hook_id,
            }
        }
        "push" => {
            let b: PushBody = de(body)?;
            bounded("ref", &b.git_ref, 255)?;
            bounded("repository.full_name", &b.repository.full_name, 141)?;
            Event::Push {
                repo: b.repository.full_name,
                git_ref: b.git_ref,
                after: b.after,
                deleted: b.deleted,
            }
        }
        "release" => {
            let b: ReleaseBody = de(body)?;
            bounded("release.tag_name", &b.release.tag_name, 255)?;
            bounded("repository.full_name", &b.repository.full_name, 141)?;
            if b.release.assets.len() > MAX_ASSETS {
                return Err(format!("release.assets: more than {MAX_ASSETS}"));
            }
            for a in &b.release.assets {
                bounded("release.assets[].name", &a.name, 255)?;
            }
            Event::Release {
                repo: b.repository.full_name,
                action: b.action.chars().take(64).collect(),
                tag: b.release.tag_name,
                draft: b.release.draft,
                prerelease: b.release.prerelease,
                assets: b.release.assets,
            }
        }
        "workflow_run" => {
            let b: RunBody = de(body)?;
            bounded("repository.full_name", &b.repository.full_name, 141)?;
            let name = b.workflow_run.name.unwrap_or_default();
            bounded("workflow_run.name", &name, 255)?;
            if let Some(branch) = &b.workflow_run.head_branch {
                bounded("workflow_run.head_branch", branch, 255)?;
            }
            Event::WorkflowRun {
                repo: b.repository.full_name,
                action: b.action.chars().take(64).collect(),
                name,
                conclusion: b
                    .workflow_run
                    .conclusion
                    .map(|c| c.chars().take(64).collect()),
                head_branch: b.workflow_run.head_branch,
                head_sha: b.workflow_run.head_sha,
            }
        }
        other => Event::Other(other.chars().take(64).collect()),
    };
    Ok(event)
}

/// A deployment an event starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub app: String,
    /// "push", "release" or "workflow_run".
    pub trigger: &'static str,
    /// The commit (None for a release: its tag is resolved through the API).
    pub sha: Option<String>,
    pub tag: Option<String>,
    pub branch: Option<String>,
    /// The release's assets (release events).
    pub assets: Vec<Asset>,
}

/// Which linked apps `event` starts a deployment of (pure). A push to a
/// listed branch (not a branch deletion), a published release that is
/// not a draft, a completed successful run of a listed workflow (on a
/// listed branch when branches are listed). The repository must be the
/// app's; the sha must be a full commit sha.
pub fn matches<'a>(links: impl IntoIterator<Item = &'a Link>, event: &Event) -> Vec<Start> {
    let mut starts = Vec::new();
    for link in links {
        let t = &link.triggers;
        let start = match event {
            Event::Push {
                repo,
                git_ref,
                after,
                deleted,
            } if link.repo.is(repo) && !deleted && is_commit_sha(after) => {
                let Some(branch) = git_ref.strip_prefix("refs/heads/") else {
                    continue;
                };
                if !t.push.iter().any(|b| b == branch) {
                    continue;
                }
                Start {
                    app: link.app.clone(),
                    trigger: "push",
                    sha: Some(after.to_ascii_lowercase()),
                    tag: None,
                    branch: Some(branch.to_owned()),
                    assets: Vec::new(),
                }
            }
            Event::Release {
                repo,
                action,
                tag,
                draft,
                assets,
                ..
            } if link.repo.is(repo) && t.release && action == "published" && !draft => Start {
                app: link.app.clone(),
                trigger: "release",
                sha: None,
                tag: Some(tag.clone()),
                branch: None,
                assets: assets.clone(),
            },
            Event::WorkflowRun {
                repo,
                action,
                name,
                conclusion,
                head_branch,
                head_sha,
            } if link.repo.is(repo)
                && action == "completed"
                && conclusion.as_deref() == Some("success")
                && is_commit_sha(head_sha)
                && t.workflow_run.iter().any(|w| w == name) =>
            {
                if !t.workflow_branches.is_empty()
                    && !head_branch
                        .as_ref()
                        .is_some_and(|b| t.workflow_branches.contains(b))
                {
                    continue;
                }
                Start {
                    app: link.app.clone(),
                    trigger: "workflow_run",
                    sha: Some(head_sha.to_ascii_lowercase()),
                    tag: None,
                    branch: head_branch.clone(),
                    assets: Vec::new(),
                }
            }
            _ => continue,
        };
        starts.push(start);
    }
    starts
}

/// A value put into a URL or asset name template: letters, digits and
/// `.-_/+` only, so nothing can change the URL's shape.
fn template_value(name: &str, value: &str) -> Result<String, String> {
    if value.is_empty()
        || value.len() > 255
        || value.contains("..")
        || !value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'/' | b'+'))
    {
        return Err(format!(
            "{{{name}}} = {:?} cannot go into a template (letters, digits, . - _ / + only)",
            value.chars().take(80).collect::<String>()
        ));
    }
    Ok(value.to_owned())
}

/// `template` with `{sha}`, `{tag}`, `{version}` (the tag without a
/// leading `v`) and `{branch}` filled in from `start` and `sha`.
pub fn expand(template: &str, start: &Start, sha: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("{template:?}: unbalanced braces"))?;
        let name = &after[..close];
        let value = match name {
            "sha" => Some(sha.to_owned()),
            "tag" => start.tag.clone(),
            "version" => start
                .tag
                .as_ref()
                .map(|t| t.strip_prefix('v').unwrap_or(t).to_owned()),
            "branch" => start.branch.clone(),
            _ => None,
        }
        .ok_or_else(|| {
            format!(
                "{template:?}: {{{name}}} has no value for a {} event",
                start.trigger
            )
        })?;
        out.push_str(&template_value(name, &value)?);
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The digest of `name` in a `sha256sum` file (`<64 hex>  <name>` or
/// `<64 hex> *<name>` per line; a `./` prefix is ignored).
pub fn checksum_for(sums: &str, name: &str) -> Result<String, String> {
    let mut found = None;
    for line in sums.lines() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((digest, file)) = line.split_once(' ') else {
            continue;
        };
        let file = file.trim_start_matches(' ').trim_start_matches('*');
        let file = file.strip_prefix("./").unwrap_or(file);
        if file == name {
            let digest = digest.to_ascii_lowercase();
            if slipway_proto::limits::check_sha256("checksum", &digest).is_err() {
                return Err(format!(
                    "the checksum line for {name:?} has no sha256 digest"
                ));
            }
            if found.as_ref().is_some_and(|d| d != &digest) {
                return Err(format!("two different checksums for {name:?}"));
            }
            found = Some(digest);
        }
    }
    found.ok_or_else(|| format!("no checksum line for {name:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::github::api::Repo;
    use crate::github::config::{ArtifactSource, Triggers};

    #[test]
    fn githubs_documented_test_vector_passes() {
        // From GitHub's documentation (and the api-specs README).
        let secret = Secret::new("It's a Secret to Everybody", "s").unwrap();
        let header = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(
            verify_signature(&secret, b"Hello, World!", Some(header)),
            Ok(())
        );
        assert_eq!(
            verify_signature(&secret, b"Hello, World?", Some(header)),
            Err(SignatureError::Mismatch)
        );
        let other = Secret::new("another secret", "s").unwrap();
        assert_eq!(
            verify_signature(&other, b"Hello, World!", Some(header)),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify_signature(&secret, b"x", None),
            Err(SignatureError::Missing)
        );
        for bad in ["sha1=757107", "sha256=zz", "757107ea"] {
            assert_eq!(
                verify_signature(&secret, b"x", Some(bad)),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
    }

    fn link(app: &str, triggers: Triggers) -> Link {
        Link {
            app: app.to_owned(),
            repo: Repo::parse("acme/web").unwrap(),
            environment: "production".into(),
            commit_status: false,
            tag: None,
            triggers,
            artifact: ArtifactSource::default(),
        }
    }

    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn triggers_match_only_what_they_name() {
        let links = [
            link(
                "web",
                Triggers {
                    push: vec!["main".into()],
                    release: true,
                    ..Triggers::default()
                },
            ),
            link(
                "api",
                Triggers {
                    workflow_run: vec!["build".into()],
                    workflow_branches: vec!["main".into()],
                    ..Triggers::default()
                },
            ),
        ];
        let push = |r: &str, git_ref: &str, deleted: bool| Event::Push {
            repo: r.into(),
            git_ref: git_ref.into(),
            after: SHA.into(),
            deleted,
        };
        let got = matches(&links, &push("acme/web", "refs/heads/main", false));
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].app.as_str(), got[0].sha.as_deref()),
            ("web", Some(SHA))
        );
        assert!(matches(&links, &push("acme/web", "refs/heads/dev", false)).is_empty());
        assert!(matches(&links, &push("acme/web", "refs/tags/main", false)).is_empty());
        assert!(matches(&links, &push("acme/web", "refs/heads/main", true)).is_empty());
        assert!(matches(&links, &push("evil/web", "refs/heads/main", false)).is_empty());
        let release = |action: &str, draft: bool| Event::Release {
            repo: "acme/web".into(),
            action: action.into(),
            tag: "v1.2.0".into(),
            draft,
            prerelease: false,
            assets: vec![],
        };
        assert_eq!(
            matches(&links, &release("published", false))[0]
                .tag
                .as_deref(),
            Some("v1.2.0")
        );
        assert!(matches(&links, &release("created", false)).is_empty());
        assert!(matches(&links, &release("published", true)).is_empty());
        let run = |name: &str, conclusion: &str, branch: &str| Event::WorkflowRun {
            repo: "acme/web".into(),
            action: "completed".into(),
            name: name.into(),
            conclusion: Some(conclusion.into()),
            head_branch: Some(branch.into()),
            head_sha: SHA.into(),
        };
        assert_eq!(
            matches(&links, &run("build", "success", "main"))[0].app,
            "api"
        );
        assert!(matches(&links, &run("build", "failure", "main")).is_empty());
        assert!(matches(&links, &run("build", "success", "dev")).is_empty());
        assert!(matches(&links, &run("lint", "success", "main")).is_empty());
        assert!(matches(&links, &Event::Other("issues".into())).is_empty());
    }

    #[test]
    fn templates_and_checksums() {
        let start = Start {
            app: "web".into(),
            trigger: "release",
            sha: None,
            tag: Some("v1.2.0".into()),
            branch: None,
            assets: vec![],
        };
        assert_eq!(
            expand("https://dl/web-{version}-{sha}.tar.gz", &start, SHA).unwrap(),
            format!("https://dl/web-1.2.0-{SHA}.tar.gz")
        );
        assert!(expand("{branch}", &start, SHA)
            .unwrap_err()
            .contains("no value"));
        let mut evil = start.clone();
        evil.tag = Some("v1?x=../".into());
        assert!(expand("https://dl/{tag}", &evil, SHA).is_err());
        let d = "ab".repeat(32);
        let sums = format!("{}  other.tar.gz\n{d} *web.tar.gz\n", "cd".repeat(32));
        assert_eq!(checksum_for(&sums, "web.tar.gz").unwrap(), d);
        assert!(checksum_for(&sums, "nope")
            .unwrap_err()
            .contains("no checksum line"));
        assert!(checksum_for("xyz  web.tar.gz\n", "web.tar.gz").is_err());
    }

    #[test]
    fn events_are_read_and_checked() {
        let push = format!(
            r#"{{"ref":"refs/heads/main","after":"{SHA}","deleted":false,"repository":{{"full_name":"acme/web"}}}}"#
        );
        assert!(matches!(
            parse("push", push.as_bytes()).unwrap(),
            Event::Push { .. }
        ));
        let e = parse("push", b"{\"ref\":\"x\"}").unwrap_err();
        assert!(e.contains("after") || e.contains("missing"), "{e}");
        assert_eq!(
            parse("issues", b"{}").unwrap(),
            Event::Other("issues".into())
        );
        assert!(check_delivery_id("0b989ba4-242f-11e5-81e1-c7b6966d2516").is_ok());
        assert!(check_delivery_id("../x").is_err());
        assert!(check_delivery_id("").is_err());
    }
}
