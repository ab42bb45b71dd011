//! Where an app is reached and which release receives its new connections:
//! one answer for `status` and for the heartbeat the controller shows in
//! `slipway status`, `/api/v1/apps` and the fleet page.
//!
//! It is read from what holds the address right now, not from the config
//! alone: the exec supervisor's state (socket handover) or the front's
//! (agent proxy). With `listen` but neither running, the address is "not
//! held" and no release is named.

use serde::Serialize;

use crate::config::{AppConfig, RunConfig};
use crate::front::{self, FrontFiles, FrontState};
use crate::supervise::{self, RunFiles};

/// How new connections reach a release of the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// exec with `listen`: every process of the app accepts on the
    /// supervisor's socket.
    SocketHandover,
    /// docker, PM2 fork mode with `listen`: the agent's front forwards to
    /// the live release's port.
    AgentProxy,
    /// PM2 cluster mode: PM2's own reload on the app's port.
    Pm2Cluster,
    /// The app's own port; a deploy stops the old release first (or, for
    /// docker, moves to the other port of the pair).
    None,
}

impl Mode {
    /// The name on the wire (`PublicAddress.mode`) and in `--json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SocketHandover => "socket_handover",
            Self::AgentProxy => "agent_proxy",
            Self::Pm2Cluster => "pm2_cluster",
            Self::None => "none",
        }
    }
}

/// An app's public address as served now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Public {
    /// `listen`, as configured.
    pub address: Option<String>,
    pub mode: Mode,
    /// The release new connections go to; `None` when nothing holds the
    /// address right now.
    pub release: Option<String>,
    /// agent_proxy: the backend new connections go to.
    pub backend: Option<String>,
    /// agent_proxy: connections still open to earlier backends.
    pub draining: u64,
    /// agent_proxy in TCP mode on IPv4: whether the kernel forwards this
    /// machine's own clients ("kernel-forwarded for local clients …" or
    /// why not); sent in heartbeats, clipped to the wire's limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forwarding: Option<String>,
    /// An address still held for the app that its config no longer names
    /// (`listen` removed or changed), and by what: a front (`run`'s next
    /// pass or the next deploy lets it go) or the exec supervisor (the
    /// next deploy or restart does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub left_behind: Option<String>,
    #[serde(skip)]
    left_by: Option<&'static str>,
}

/// The mode `app`'s config gives it.
pub fn mode(app: &AppConfig) -> Mode {
    match (&app.run, &app.listen) {
        (Some(RunConfig::Exec(_)), Some(_)) => Mode::SocketHandover,
        (Some(RunConfig::Pm2(p)), _) if p.cluster => Mode::Pm2Cluster,
        (Some(RunConfig::Docker(_) | RunConfig::Pm2(_)), Some(_)) => Mode::AgentProxy,
        _ => Mode::None,
    }
}

/// What holds `app`'s public address now.
pub fn of(app: &AppConfig) -> Public {
    let mode = mode(app);
    let address = app.listen.as_ref().map(ToString::to_string);
    let mut public = Public {
        address: address.clone(),
        mode,
        release: None,
        backend: None,
        draining: 0,
        forwarding: None,
        left_behind: None,
        left_by: None,
    };
    let front_files = FrontFiles::new(&app.root);
    if front::is_running(&front_files) {
        if let Some(s) = FrontState::load(&front_files) {
            if mode != Mode::AgentProxy || Some(&s.listen) != address.as_ref() {
                public.left_behind = Some(s.listen);
                public.left_by =
                    Some("the agent's front; the next `run` pass or deploy lets it go");
            }
        }
    }
    let run_files = RunFiles::new(&app.root);
    if supervise::is_running(&run_files) {
        if let Some(held) = supervise::State::load(&run_files).and_then(|s| s.listen) {
            if mode != Mode::SocketHandover || Some(&held) != address.as_ref() {
                public.left_behind = Some(held);
                public.left_by =
                    Some("the exec supervisor; the next deploy or restart of the app lets it go");
            }
        }
    }
    match mode {
        Mode::SocketHandover => {
            let files = RunFiles::new(&app.root);
            if supervise::is_running(&files) {
                if let Some(s) = supervise::State::load(&files)
                    .filter(|s| s.listen == address && s.child_pid.is_some())
                {
                    public.release = s.release;
                }
            }
        }
        Mode::AgentProxy => {
            let files = FrontFiles::new(&app.root);
            if front::is_running(&files) {
                if let Some(s) =
                    FrontState::load(&files).filter(|s| Some(&s.listen) == address.as_ref())
                {
                    public.release = s.backend.and(s.release);
                    public.backend = s.backend.map(|b| b.to_string());
                    public.draining = s.draining.values().sum();
                    if s.mode == crate::listen::ListenMode::Tcp
                        && app.listen.as_ref().is_some_and(|l| l.is_tcp_v4())
                    {
                        public.forwarding = Some(s.kernel.describe());
                    }
                }
            }
        }
        Mode::Pm2Cluster | Mode::None => {}
    }
    public
}

/// The heartbeat's form, within the limits the controller checks.
pub fn to_wire(p: &Public) -> slipway_proto::v1::PublicAddress {
    use slipway_proto::limits;
    slipway_proto::v1::PublicAddress {
        address: p.address.clone().unwrap_or_default(),
        mode: p.mode.as_str().to_owned(),
        release: p.release.clone().unwrap_or_default(),
        backend: p.backend.clone().unwrap_or_default(),
        draining: p.draining.min(limits::MAX_DRAINING),
        forwarding: p
            .forwarding
            .as_deref()
            .map(|f| {
                limits::truncate(
                    &limits::one_line(f, limits::MAX_FORWARDING),
                    limits::MAX_FORWARDING,
                )
                .to_owned()
            })
            .unwrap_or_default(),
    }
}

/// One line for `status`.
pub fn line(p: &Public) -> String {
    let mode = match p.mode {
        Mode::SocketHandover => "socket handover",
        Mode::AgentProxy => "agent proxy",
        Mode::Pm2Cluster => "pm2 cluster",
        Mode::None => "own port",
    };
    let mut line = match (&p.address, &p.release) {
        (None, _) => format!("no public address held by the agent ({mode})"),
        (Some(a), None) => {
            format!("{a} ({mode}): not held right now (the next deploy or start takes it up)")
        }
        (Some(a), Some(r)) => format!("{a} ({mode}): new connections go to {r}"),
    };
    if let Some(b) = &p.backend {
        line.push_str(&format!(" on {b}"));
    }
    if p.draining > 0 {
        line.push_str(&format!("; {} draining", p.draining));
    }
    if let Some(f) = &p.forwarding {
        line.push_str(&format!("; {f}"));
    }
    if let Some(old) = &p.left_behind {
        line.push_str(&format!(
            "; {old} is still held though the config no longer names it (by {})",
            p.left_by.unwrap_or("the agent")
        ));
    }
    line
}
