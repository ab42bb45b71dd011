//! The operations Slipway uses and the shapes it reads from them: create a
//! deployment and its statuses, a commit status, resolve a ref to its
//! commit, download a release asset. What is read is checked before use.

use http::Method;
use serde::{Deserialize, Serialize};

use super::client::{Client, GhError, Sink};

/// `owner/name` of a repository, checked against GitHub's own rules so it
/// can go into a path as is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Repo {
    pub owner: String,
    pub name: String,
}

impl Repo {
    /// `owner/name`: owner 1-39 of letters, digits and '-', name 1-100 of
    /// letters, digits, '.', '-', '_' (not "." or "..").
    pub fn parse(text: &str) -> Result<Self, String> {
        let (owner, name) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not owner/name"))?;
        let owner_ok = (1..=39).contains(&owner.len())
            && owner
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        let name_ok = (1..=100).contains(&name.len())
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
        if !owner_ok {
            return Err(format!(
                "{text:?}: the owner must be 1-39 letters, digits or '-'"
            ));
        }
        if !name_ok {
            return Err(format!(
                "{text:?}: the name must be 1-100 letters, digits, '.', '-' or '_'"
            ));
        }
        Ok(Self {
            owner: owner.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Same repository (GitHub names are case-insensitive).
    pub fn is(&self, full_name: &str) -> bool {
        full_name.eq_ignore_ascii_case(&self.to_string())
    }

    fn path(&self, rest: &str) -> String {
        format!("/repos/{}/{}{rest}", self.owner, self.name)
    }
}

impl std::fmt::Display for Repo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.owner, self.name)
    }
}

/// `POST /repos/{owner}/{repo}/deployments`.
#[derive(Debug, Clone, Serialize)]
pub struct NewDeployment {
    /// The commit sha.
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub environment: String,
    pub description: String,
    /// Never: GitHub would merge the default branch into the ref.
    pub auto_merge: bool,
    /// Empty: the deployment is of an artifact already built and checked;
    /// GitHub does not hold it back for commit statuses.
    pub required_contexts: Vec<String>,
    pub payload: serde_json::Value,
    pub production_environment: bool,
}

/// `POST …/deployments/{id}/statuses`.
#[derive(Debug, Clone, Serialize)]
pub struct NewStatus {
    /// queued, in_progress, success, failure, error, inactive.
    pub state: &'static str,
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_url: Option<String>,
    pub environment: String,
    /// We post `inactive` for the replaced deployment ourselves.
    pub auto_inactive: bool,
}

/// `POST /repos/{owner}/{repo}/statuses/{sha}`.
#[derive(Debug, Clone, Serialize)]
pub struct NewCommitStatus {
    /// pending, success, failure, error.
    pub state: &'static str,
    pub description: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_url: Option<String>,
    pub context: String,
}

#[derive(Debug, Deserialize)]
struct Created {
    id: Option<u64>,
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Commit {
    sha: String,
}

/// GitHub's limit on a status description.
pub const MAX_DESCRIPTION: usize = 140;

/// `text` cut to GitHub's 140 characters.
pub fn description(text: &str) -> String {
    if text.chars().count() <= MAX_DESCRIPTION {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(MAX_DESCRIPTION - 1).collect();
    out.push('…');
    out
}

/// True if `sha` is a full 40-hex commit sha.
pub fn is_commit_sha(sha: &str) -> bool {
    sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Client {
    /// Creates a deployment; its id.
    pub async fn create_deployment(
        &self,
        repo: &Repo,
        new: &NewDeployment,
    ) -> Result<u64, GhError> {
        let path = repo.path("/deployments");
        let created: Created = self.send(Method::POST, &path, new).await?;
        created.id.ok_or_else(|| GhError::Invalid {
            method: Method::POST,
            path,
            reason: format!(
                "no deployment was created: {}",
                created.message.unwrap_or_default()
            ),
        })
    }

    /// Adds a status to deployment `id`.
    pub async fn create_deployment_status(
        &self,
        repo: &Repo,
        id: u64,
        status: &NewStatus,
    ) -> Result<(), GhError> {
        let path = repo.path(&format!("/deployments/{id}/statuses"));
        let _: Created = self.send(Method::POST, &path, status).await?;
        Ok(())
    }

    /// Sets a commit status on `sha`.
    pub async fn create_commit_status(
        &self,
        repo: &Repo,
        sha: &str,
        status: &NewCommitStatus,
    ) -> Result<(), GhError> {
        if !is_commit_sha(sha) {
            return Err(GhError::Config(format!(
                "{sha:?} is not a 40-hex commit sha"
            )));
        }
        let path = repo.path(&format!("/statuses/{sha}"));
        let _: Created = self.send(Method::POST, &path, status).await?;
        Ok(())
    }

    /// The commit sha a ref (a tag, a branch) points at.
    pub async fn commit_sha(&self, repo: &Repo, git_ref: &str) -> Result<String, GhError> {
        let encoded: String = git_ref
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_') {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let path = repo.path(&format!("/commits/{encoded}"));
        let commit: Commit = self.get(&path).await?;
        if !is_commit_sha(&commit.sha) {
            return Err(GhError::Invalid {
                method: Method::GET,
                path,
                reason: format!("sha {:?} is not 40 hex characters", commit.sha),
            });
        }
        Ok(commit.sha.to_ascii_lowercase())
    }

    /// The deployment of `sha` in `environment` whose payload names Slipway
    /// deployment `slipway_id`, if GitHub has one (a create whose answer
    /// was lost).
    pub async fn find_deployment(
        &self,
        repo: &Repo,
        sha: &str,
        environment: &str,
        slipway_id: &str,
    ) -> Result<Option<u64>, GhError> {
        #[derive(Deserialize)]
        struct Listed {
            id: u64,
            #[serde(default)]
            payload: serde_json::Value,
        }
        let query: String = serde_urlencoded::to_string([
            ("sha", sha),
            ("environment", environment),
            ("per_page", "100"),
        ])
        .map_err(|e| GhError::Config(format!("query: {e}")))?;
        let listed: Vec<Listed> = self
            .get(&repo.path(&format!("/deployments?{query}")))
            .await?;
        Ok(listed
            .into_iter()
            .find(|d| d.payload["slipway_deployment_id"] == slipway_id)
            .map(|d| d.id))
    }

    /// Whether the credentials can read `repo`'s deployments (one page of
    /// one): what `slipway-controller validate` checks.
    pub async fn check_repo(&self, repo: &Repo) -> Result<(), GhError> {
        let path = repo.path("/deployments?per_page=1");
        let _: Vec<serde_json::Value> = self.get(&path).await?;
        Ok(())
    }

    /// Downloads release asset `asset_id` (at most `max` bytes) into `sink`.
    pub async fn download_release_asset<S: Sink>(
        &self,
        repo: &Repo,
        asset_id: u64,
        max: u64,
        sink: &mut S,
    ) -> Result<u64, GhError> {
        self.download(
            &repo.path(&format!("/releases/assets/{asset_id}")),
            max,
            sink,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names_follow_githubs_rules() {
        let r = Repo::parse("acme/web.site_2").unwrap();
        assert_eq!(r.to_string(), "acme/web.site_2");
        assert!(r.is("ACME/Web.Site_2"));
        for bad in [
            "acme",
            "/web",
            "acme/",
            "ac me/web",
            "acme/..",
            "a/b/c",
            "acme/w%2f",
        ] {
            assert!(Repo::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn descriptions_fit_githubs_limit() {
        let long = "x".repeat(300);
        assert_eq!(description(&long).chars().count(), MAX_DESCRIPTION);
        assert_eq!(description("short"), "short");
    }
}
