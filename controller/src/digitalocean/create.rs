//! `slipway-controller droplets create`: a droplet that joins the fleet by
//! itself. A one-time join token is made (bound to the droplet's name,
//! tagged with the droplet's tags,
//! short-lived: user data stays readable on the droplet's metadata
//! service), the cloud-init user data of `packaging/cloud-init/user-data.yaml`
//! is filled in with it, and a step is added that points the agent at the
//! droplet's metadata service (so it reports its droplet id) and restarts
//! it. Every value put into the user data is checked first: it lands in a
//! shell script.

use std::time::Duration;

use super::api::{Droplet, NewDroplet};
use super::client::{Client, DoError};
use crate::auth::token;
use crate::store::Store;

/// The template, as shipped in the repository.
pub const USER_DATA_TEMPLATE: &str = include_str!("../../../packaging/cloud-init/user-data.yaml");

/// Appended to the template's `runcmd`: the agent reads its droplet id
/// from DigitalOcean's metadata service.
const METADATA_STEP: &str = r#"  - - sh
    - -c
    - |
      set -eu
      grep -q '^\[digitalocean\]' /etc/slipway/agent.toml || printf '\n[digitalocean]\nmetadata_url = "http://169.254.169.254"\n' >> /etc/slipway/agent.toml
      systemctl restart slipway-agent
"#;

/// What goes into the user data besides the token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Install {
    /// `host:port` of the controller, as agents dial it.
    pub controller: String,
    /// Where install.sh and the agent binaries are served (https).
    pub base_url: String,
    /// The agent version to install.
    pub version: String,
}

fn safe(value: &str, what: &str, extra: &[char]) -> Result<(), String> {
    if value.is_empty() || value.len() > 256 {
        return Err(format!("{what}: 1 to 256 characters"));
    }
    match value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || extra.contains(c)))
    {
        Some(c) => Err(format!("{what} {value:?}: {c:?} is not allowed here")),
        None => Ok(()),
    }
}

impl Install {
    /// Checks each value (they end up inside single quotes in a script).
    pub fn check(&self) -> Result<(), String> {
        safe(&self.controller, "--controller", &['.', '-', ':', '[', ']'])?;
        if !self.base_url.starts_with("https://") {
            return Err(format!("--base-url {:?}: must be https://", self.base_url));
        }
        safe(
            &self.base_url,
            "--base-url",
            &['.', '-', ':', '/', '_', '~'],
        )?;
        safe(&self.version, "--version", &['.', '-', '+'])
    }
}

/// The user data for a droplet joining with `join_token`.
pub fn user_data(install: &Install, join_token: &str) -> Result<String, String> {
    install.check()?;
    safe(join_token, "join token", &['.', '-', '_'])?;
    let mut text = USER_DATA_TEMPLATE
        .replace("@BASE_URL@", &install.base_url)
        .replace("@VERSION@", &install.version)
        .replace("@CONTROLLER@", &install.controller)
        .replace("@JOIN_TOKEN@", join_token);
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(METADATA_STEP);
    Ok(text)
}

/// Why `droplets create` failed.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Token(#[from] token::TokenError),
    #[error(transparent)]
    Api(#[from] DoError),
}

/// Checks everything, makes the token, creates the droplet.
pub async fn create(
    client: &Client,
    store: &Store,
    ca_sha256: &str,
    mut droplet: NewDroplet,
    install: &Install,
    token_ttl: Duration,
    now: i64,
) -> Result<Droplet, CreateError> {
    // Everything that can be checked is, before a token exists.
    install.check().map_err(CreateError::Usage)?;
    droplet.user_data = Some(String::new());
    droplet.check().map_err(CreateError::Usage)?;
    // Bound to the droplet's name: the token is readable from the droplet's
    // metadata service, and must not enroll anything but this droplet.
    let join = token::create_bound(
        store,
        ca_sha256,
        token_ttl,
        &droplet.tags,
        Some(&droplet.name),
        now,
    )
    .await?;
    droplet.user_data = Some(user_data(install, &join.to_string()).map_err(CreateError::Usage)?);
    droplet.check().map_err(CreateError::Usage)?;
    Ok(client.create_droplet(&droplet).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_that_could_break_the_script_are_refused() {
        let ok = Install {
            controller: "ctl.example.com:7443".into(),
            base_url: "https://dl.example.com/slipway".into(),
            version: "0.1.0".into(),
        };
        let text = user_data(&ok, "slw1.abc.def").unwrap();
        assert!(text.contains("SLIPWAY_JOIN_TOKEN='slw1.abc.def'"), "{text}");
        assert!(text.contains("metadata_url"), "{text}");
        for bad in [
            Install {
                controller: "x';reboot;'".into(),
                ..ok.clone()
            },
            Install {
                base_url: "http://dl.example.com".into(),
                ..ok.clone()
            },
            Install {
                version: "1 2".into(),
                ..ok.clone()
            },
        ] {
            assert!(user_data(&bad, "slw1.abc.def").is_err(), "{bad:?}");
        }
        assert!(user_data(&ok, "a'b").is_err());
    }
}
