//! install.sh, the .deb packages and the cloud-init user data, in a fresh
//! Debian 12 root used as a chroot (systemd installed, not running).
//!
//! The root is made once per machine by `tests/install/debian-root.sh`
//! (debootstrap, cached as a tarball in ~/.cache/slipway/); each test unpacks
//! it into its own temporary directory. The agent binaries are the static
//! ones of `scripts/build-static.sh --profile dev` (target/static/dev/).
//! The controller enrolled with runs on the host's loopback: the chroot
//! shares the network namespace. Needs root (chroot, useradd in the root).

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

use crate::support::{free_port, sha256_file, text, Controller};

/// The workspace's top level.
fn top() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// target/static/dev (or $SLIPWAY_STATIC_DIR), checked against its SHA256SUMS.
fn static_dir() -> PathBuf {
    let dir = std::env::var_os("SLIPWAY_STATIC_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| top().join("target/static/dev"));
    assert!(
        dir.join("SHA256SUMS").is_file() && dir.join("slipway-agent").is_file(),
        "no static binaries in {}: run `bash scripts/build-static.sh --profile dev` first",
        dir.display()
    );
    dir
}

/// The cached Debian root tarball, built on first use.
fn root_tarball() -> &'static Path {
    static TAR: OnceLock<PathBuf> = OnceLock::new();
    TAR.get_or_init(|| {
        assert!(
            nix::unistd::Uid::effective().is_root(),
            "the install tests need root (chroot, useradd inside the root)"
        );
        // Once per machine, not per clone: CI runs on a fresh clone.
        let tar = std::env::var_os("SLIPWAY_DEBIAN_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                    .unwrap_or_else(|| top().join("tests/.cache"))
                    .join("slipway/debian-12-root.tar")
            });
        let out = Command::new("sh")
            .arg(top().join("tests/install/debian-root.sh"))
            .arg(&tar)
            .output()
            .unwrap();
        assert!(out.status.success(), "debian-root.sh: {}", text(&out));
        tar
    })
}

/// A fresh copy of the Debian root, removed on drop.
struct Chroot {
    dir: tempfile::TempDir,
}

impl Chroot {
    /// Unpacks the cached root; install.sh and the static agent (with its
    /// SHA256SUMS) are put in /opt/slipway, as in a release folder.
    fn new() -> Self {
        let tar = root_tarball();
        let dir = tempfile::Builder::new()
            .prefix("slipway-root.")
            .tempdir()
            .unwrap();
        let out = Command::new("tar")
            .arg("-C")
            .arg(dir.path())
            .arg("-xf")
            .arg(tar)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "unpack {}: {}",
            tar.display(),
            text(&out)
        );
        let c = Self { dir };
        let opt = c.path("/opt/slipway");
        fs::create_dir_all(&opt).unwrap();
        fs::copy(top().join("install.sh"), opt.join("install.sh")).unwrap();
        let bins = static_dir();
        fs::copy(bins.join("slipway-agent"), opt.join("slipway-agent")).unwrap();
        fs::write(
            opt.join("SHA256SUMS"),
            format!(
                "{}  slipway-agent\n",
                sha256_file(&bins.join("slipway-agent"))
            ),
        )
        .unwrap();
        c
    }

    /// A path inside the root, as seen from the host.
    fn path(&self, inside: &str) -> PathBuf {
        self.dir.path().join(inside.trim_start_matches('/'))
    }

    /// `chroot ROOT args…`.
    fn run(&self, args: &[&str]) -> Output {
        Command::new("chroot")
            .arg(self.dir.path())
            .args(args)
            .env_remove("SLIPWAY_JOIN_TOKEN")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `sh /opt/slipway/install.sh args…` in the root.
    fn install_sh(&self, args: &[&str]) -> Output {
        let mut all = vec!["sh", "/opt/slipway/install.sh"];
        all.extend_from_slice(args);
        self.run(&all)
    }

    /// Like `install_sh`, and it must succeed; its stdout.
    fn install_ok(&self, args: &[&str]) -> String {
        let out = self.install_sh(args);
        assert!(out.status.success(), "install.sh {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// owner:group and mode (octal) of a path inside the root (a link's
    /// target), by name.
    fn stat(&self, inside: &str) -> String {
        let out = self.run(&["stat", "-L", "-c", "%U:%G %a", inside]);
        assert!(out.status.success(), "stat {inside}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn has_user(&self, name: &str) -> bool {
        self.run(&["getent", "passwd", name]).status.success()
    }

    fn exists(&self, inside: &str) -> bool {
        self.path(inside).symlink_metadata().is_ok()
    }

    /// Every file, link and directory under the root but /opt/slipway and
    /// /tmp: type, owner, mode and, for files, the content's sha256 (in
    /// /etc) or size and modification time (elsewhere). The
    /// backups and logs shadow-utils writes on every user change (passwd-,
    /// lastlog, …) are left out: their content is not ours to restore.
    fn snapshot(&self) -> BTreeMap<String, String> {
        fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
            for entry in fs::read_dir(dir).unwrap() {
                let entry = entry.unwrap();
                let path = entry.path();
                let rel = format!("/{}", path.strip_prefix(base).unwrap().display());
                let skip = rel.starts_with("/opt/slipway")
                    || rel.starts_with("/tmp/")
                    || rel.starts_with("/var/log/")
                    || rel.starts_with("/etc/.pwd.lock")
                    || (rel.starts_with("/etc/") && rel.ends_with('-'));
                if skip {
                    continue;
                }
                let meta = path.symlink_metadata().unwrap();
                let what = if meta.is_dir() {
                    "dir".to_owned()
                } else if meta.file_type().is_symlink() {
                    format!("link {}", fs::read_link(&path).unwrap().display())
                } else if meta.is_file() && rel.starts_with("/etc/") {
                    // By content: user changes rewrite /etc/passwd and co.
                    format!("file {}", sha256_file(&path))
                } else if meta.is_file() {
                    // Size and mtime: hashing 150 MB per snapshot is slow.
                    format!(
                        "file {} bytes mtime {}.{}",
                        meta.len(),
                        meta.mtime(),
                        meta.mtime_nsec()
                    )
                } else {
                    "other".to_owned()
                };
                out.insert(
                    rel,
                    format!(
                        "{what} {}:{} {:o}",
                        meta.uid(),
                        meta.gid(),
                        meta.permissions().mode() & 0o7777
                    ),
                );
                if meta.is_dir() {
                    walk(base, &path, out);
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(self.dir.path(), self.dir.path(), &mut out);
        out
    }
}

/// What changed between two snapshots, for an assertion message.
fn diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> Vec<String> {
    let mut d = Vec::new();
    for (k, v) in before {
        match after.get(k) {
            None => d.push(format!("removed {k} ({v})")),
            Some(w) if w != v => d.push(format!("changed {k}: {v} -> {w}")),
            _ => {}
        }
    }
    for (k, v) in after {
        if !before.contains_key(k) {
            d.push(format!("added {k} ({v})"));
        }
    }
    d
}

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The node names the controller knows.
fn node_names(controller: &Controller) -> Vec<String> {
    let out = controller.slipway(&controller.api_token("read"), &["nodes", "--json"]);
    assert!(out.status.success(), "slipway nodes: {}", text(&out));
    let nodes: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    nodes
        .iter()
        .filter_map(|n| n["name"].as_str().map(str::to_owned))
        .collect()
}

const AGENT_UNIT: &str = "/etc/systemd/system/slipway-agent.service";
const AGENT_WANTS: &str = "/etc/systemd/system/multi-user.target.wants/slipway-agent.service";

#[test]
fn install_sh_installs_enrolls_and_a_second_run_changes_nothing() {
    let controller = Controller::start();
    let root = Chroot::new();
    let token = controller.token();
    let args = [
        "--binary",
        "/opt/slipway/slipway-agent",
        "--controller",
        &controller.url(),
        "--token",
        &token,
        "--name",
        "droplet-1",
        "--app",
        "web=/app",
    ];
    let first = root.install_ok(&args);
    assert!(first.contains("created system user slipway"), "{first}");
    assert!(first.contains("enrolled as node"), "{first}");
    assert!(
        first.contains("systemd is installed but not running")
            && first.contains("could not be started"),
        "{first}"
    );
    assert!(first.contains("next:"), "{first}");

    // Files, owners and modes.
    assert!(root.has_user("slipway"));
    assert_eq!(root.stat("/etc/slipway"), "root:slipway 750");
    assert_eq!(root.stat("/etc/slipway/agent.toml"), "root:slipway 640");
    assert_eq!(root.stat("/var/lib/slipway-agent"), "root:root 700");
    assert_eq!(root.stat("/app"), "root:root 755");
    assert_eq!(root.stat("/usr/local/bin/slipway-agent"), "root:root 755");
    assert_eq!(root.stat(AGENT_UNIT), "root:root 644");
    assert_eq!(
        sha256_file(&root.path("/usr/local/bin/slipway-agent")),
        sha256_file(&static_dir().join("slipway-agent"))
    );
    assert_eq!(
        fs::read_to_string(root.path(AGENT_UNIT)).unwrap(),
        fs::read_to_string(top().join("packaging/systemd/slipway-agent.service")).unwrap()
    );
    assert_eq!(
        fs::read_link(root.path(AGENT_WANTS)).unwrap(),
        Path::new(AGENT_UNIT)
    );
    let conf = fs::read_to_string(root.path("/etc/slipway/agent.toml")).unwrap();
    assert!(
        conf.contains(&format!("[controller]\nurl = \"{}\"", controller.url()))
            && conf.contains("[apps.web]\nroot = \"/app\""),
        "{conf}"
    );
    // The agent accepts the configuration it was given.
    let status = root.run(&["/usr/local/bin/slipway-agent", "status"]);
    assert!(status.status.success(), "agent status: {}", text(&status));
    for f in ["node.key", "node.pem", "ca.pem", "node-id"] {
        assert!(root.exists(&format!("/var/lib/slipway-agent/{f}")), "{f}");
    }
    assert_eq!(
        root.stat("/var/lib/slipway-agent/node.key"),
        "root:root 600"
    );
    assert_eq!(node_names(&controller), ["droplet-1"]);

    // Again, the same command (the token is spent): nothing changes.
    let before = root.snapshot();
    let second = root.install_ok(&args);
    assert!(
        second.contains("already installed and up to date: nothing changed"),
        "{second}"
    );
    assert_eq!(diff(&before, &root.snapshot()), Vec::<String>::new());
    assert_eq!(node_names(&controller), ["droplet-1"]);
}

#[test]
fn install_sh_rolls_back_a_failed_run() {
    let root = Chroot::new();
    let before = root.snapshot();

    // A wrong sha256: refused before anything is touched.
    let out = root.install_sh(&[
        "--binary",
        "/opt/slipway/slipway-agent",
        "--sha256",
        &"0".repeat(64),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr_of(&out).contains("sha256 mismatch"),
        "{}",
        text(&out)
    );
    assert_eq!(diff(&before, &root.snapshot()), Vec::<String>::new());

    // An unreachable controller: user, directories, config, binary and unit
    // were made before the enrollment failed; all of it is undone.
    let controller = Controller::start();
    let token = controller.token();
    let nobody = format!("127.0.0.1:{}", free_port());
    let out = root.install_sh(&[
        "--binary",
        "/opt/slipway/slipway-agent",
        "--controller",
        &nobody,
        "--token",
        &token,
        "--app",
        "web=/srv/web",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let all = format!("{}{}", stdout_of(&out), stderr_of(&out));
    assert!(
        all.contains("installed /usr/local/bin/slipway-agent"),
        "{all}"
    );
    assert!(
        all.contains(&format!("enrollment with {nobody} failed")),
        "{all}"
    );
    assert!(all.contains("rolled back"), "{all}");
    assert_eq!(diff(&before, &root.snapshot()), Vec::<String>::new());
    assert!(!root.has_user("slipway"));
}

#[test]
fn install_sh_refuses_unsupported_architecture_and_init() {
    let root = Chroot::new();
    let before = root.snapshot();
    let out = Command::new("setarch")
        .args(["i686", "chroot"])
        .arg(root.dir.path())
        .args([
            "sh",
            "/opt/slipway/install.sh",
            "--binary",
            "/opt/slipway/slipway-agent",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        stderr_of(&out).contains("unsupported architecture 'i686'"),
        "{}",
        text(&out)
    );

    // No systemd: systemctl gone, as on a sysvinit or OpenRC system.
    fs::rename(root.path("/usr/bin/systemctl"), root.path("/opt/systemctl")).unwrap();
    let out = root.install_sh(&["--binary", "/opt/slipway/slipway-agent"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        stderr_of(&out).contains("unsupported init system: systemd is required"),
        "{}",
        text(&out)
    );
    fs::rename(root.path("/opt/systemctl"), root.path("/usr/bin/systemctl")).unwrap();
    assert_eq!(diff(&before, &root.snapshot()), Vec::<String>::new());

    let out = root.install_sh(&["--purge"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
}

#[test]
fn install_sh_upgrade_replaces_only_the_binary() {
    let root = Chroot::new();
    root.install_ok(&[
        "--binary",
        "/opt/slipway/slipway-agent",
        "--app",
        "web=/app",
    ]);
    let old_sha = sha256_file(&root.path("/usr/local/bin/slipway-agent"));

    // Another build: the same program with different bytes (an ELF runs
    // with data appended), with its own SHA256SUMS.
    let new_dir = root.path("/opt/new");
    fs::create_dir_all(&new_dir).unwrap();
    let mut bytes = fs::read(static_dir().join("slipway-agent")).unwrap();
    bytes.extend_from_slice(b"\nanother build\n");
    fs::write(new_dir.join("slipway-agent"), &bytes).unwrap();
    let new_sha = sha256_file(&new_dir.join("slipway-agent"));
    fs::write(
        new_dir.join("SHA256SUMS"),
        format!("{new_sha}  slipway-agent\n"),
    )
    .unwrap();

    // Without --upgrade, an installed binary is kept.
    let kept = root.install_ok(&["--binary", "/opt/new/slipway-agent"]);
    assert!(kept.contains("kept (replace it with --upgrade)"), "{kept}");
    assert_eq!(
        sha256_file(&root.path("/usr/local/bin/slipway-agent")),
        old_sha
    );

    // A bad sha256 changes nothing.
    let before = root.snapshot();
    let out = root.install_sh(&[
        "--upgrade",
        "--binary",
        "/opt/new/slipway-agent",
        "--sha256",
        &old_sha,
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(diff(&before, &root.snapshot()), Vec::<String>::new());

    let up = root.install_ok(&["--upgrade", "--binary", "/opt/new/slipway-agent"]);
    assert!(up.contains("replaced /usr/local/bin/slipway-agent"), "{up}");
    assert_eq!(
        sha256_file(&root.path("/usr/local/bin/slipway-agent")),
        new_sha
    );
    assert_eq!(
        sha256_file(&root.path("/usr/local/bin/slipway-agent.old")),
        old_sha
    );
    // Only the binary and its .old copy changed (contents checked above).
    let changed: Vec<String> = diff(&before, &root.snapshot())
        .iter()
        .map(|d| d.split([':', ' ']).take(2).collect::<Vec<_>>().join(" "))
        .collect();
    assert_eq!(
        changed,
        [
            "changed /usr/local/bin/slipway-agent",
            "added /usr/local/bin/slipway-agent.old"
        ],
        "only the binary changes"
    );
    let again = root.install_ok(&["--upgrade", "--binary", "/opt/new/slipway-agent"]);
    assert!(again.contains("already this build"), "{again}");
}

#[test]
fn install_sh_uninstall_keeps_data_and_purge_removes_it() {
    let controller = Controller::start();
    let root = Chroot::new();
    let token = controller.token();
    root.install_ok(&[
        "--binary",
        "/opt/slipway/slipway-agent",
        "--controller",
        &controller.url(),
        "--token",
        &token,
        "--name",
        "droplet-2",
        "--app",
        "web=/app",
    ]);
    fs::create_dir_all(root.path("/app/shared")).unwrap();
    fs::write(root.path("/app/shared/.env"), "PORT=3000\n").unwrap();

    let out = root.install_ok(&["--uninstall"]);
    assert!(out.contains("removed user slipway"), "{out}");
    assert!(
        out.contains("kept: /etc/slipway /var/lib/slipway-agent /app"),
        "{out}"
    );
    for gone in [AGENT_UNIT, AGENT_WANTS, "/usr/local/bin/slipway-agent"] {
        assert!(!root.exists(gone), "{gone} is still there");
    }
    assert!(!root.has_user("slipway"));
    assert!(!root.run(&["getent", "group", "slipway"]).status.success());
    assert_eq!(
        fs::read_to_string(root.path("/app/shared/.env")).unwrap(),
        "PORT=3000\n"
    );
    assert!(root.exists("/var/lib/slipway-agent/node.key"));
    assert_eq!(root.stat("/etc/slipway"), "root:root 750");

    let again = root.install_ok(&["--uninstall"]);
    assert!(again.contains("not installed: nothing changed"), "{again}");

    // A root that is a system directory is never purged.
    let conf = root.path("/etc/slipway/agent.toml");
    let mut text_conf = fs::read_to_string(&conf).unwrap();
    text_conf.push_str("\n[apps.oops]\nroot = \"/var\"\n");
    fs::write(&conf, text_conf).unwrap();

    let purge = root.install_ok(&["--uninstall", "--purge"]);
    assert!(purge.contains("purged /app"), "{purge}");
    assert!(
        purge.contains("not purging /var: a system directory"),
        "{purge}"
    );
    assert!(root.exists("/var/lib/dpkg/status"));
    for gone in ["/app", "/var/lib/slipway-agent", "/etc/slipway"] {
        assert!(!root.exists(gone), "{gone} is still there");
    }
}

#[test]
fn install_sh_downloads_with_curl_pipe_sh() {
    // A release folder served over HTTP on the loopback: install.sh,
    // v0.1.0/slipway-agent and v0.1.0/SHA256SUMS.
    let site = tempfile::tempdir().unwrap();
    let v = site.path().join("v0.1.0");
    fs::create_dir_all(&v).unwrap();
    fs::copy(top().join("install.sh"), site.path().join("install.sh")).unwrap();
    fs::copy(static_dir().join("slipway-agent"), v.join("slipway-agent")).unwrap();
    fs::write(
        v.join("SHA256SUMS"),
        format!("{}  slipway-agent\n", sha256_file(&v.join("slipway-agent"))),
    )
    .unwrap();
    let port = free_port();
    let mut server = Command::new("python3")
        .args([
            "-m",
            "http.server",
            "--bind",
            "127.0.0.1",
            &port.to_string(),
        ])
        .current_dir(site.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    crate::support::wait_until(
        "the HTTP server",
        std::time::Duration::from_secs(10),
        || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
    );

    let controller = Controller::start();
    let root = Chroot::new();
    let script = format!(
        "curl -fsSL {base}/install.sh | sh -s -- --controller {} --base-url {base} --version 0.1.0 --name droplet-3",
        controller.url()
    );
    let out = Command::new("chroot")
        .arg(root.dir.path())
        .args(["sh", "-c", &script])
        .env("SLIPWAY_JOIN_TOKEN", controller.token())
        .output()
        .unwrap();
    assert!(out.status.success(), "curl | sh: {}", text(&out));
    let said = stdout_of(&out);
    assert!(
        said.contains(&format!("downloading {base}/v0.1.0/slipway-agent")),
        "{said}"
    );
    assert!(said.contains("enrolled as node"), "{said}");
    assert_eq!(node_names(&controller), ["droplet-3"]);
    assert_eq!(
        fs::read_to_string(root.path(AGENT_UNIT)).unwrap(),
        fs::read_to_string(top().join("packaging/systemd/slipway-agent.service")).unwrap()
    );

    // A URL whose SHA256SUMS does not list the file is refused.
    fs::copy(v.join("slipway-agent"), v.join("other")).unwrap();
    let out = root.install_sh(&["--upgrade", "--url", &format!("{base}/v0.1.0/other")]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        stderr_of(&out).contains("SHA256SUMS does not list other"),
        "{}",
        text(&out)
    );
    let _ = server.kill();
    let _ = server.wait();
}

#[test]
fn install_sh_is_shellcheck_clean_and_embeds_the_packaged_unit() {
    let install = fs::read_to_string(top().join("install.sh")).unwrap();
    let start = install.find("<<'UNIT_EOF'\n").expect("the unit heredoc") + 13;
    let end = install[start..].find("UNIT_EOF\n").unwrap() + start;
    assert_eq!(
        &install[start..end],
        fs::read_to_string(top().join("packaging/systemd/slipway-agent.service")).unwrap(),
        "the unit embedded in install.sh differs from packaging/systemd/slipway-agent.service: copy the file between the UNIT_EOF lines"
    );
    let out = Command::new("shellcheck")
        .args([
            "install.sh",
            "tests/install/debian-root.sh",
            "packaging/deb/build.sh",
        ])
        .current_dir(top())
        .output()
        .expect("shellcheck (apt-get install shellcheck; scripts/test.sh does)");
    assert!(out.status.success(), "shellcheck: {}", text(&out));
}

/// packaging/deb/build.sh from the static dev binaries into `out`.
fn build_debs(out: &Path, version: &str) -> (PathBuf, PathBuf) {
    let run = Command::new("sh")
        .arg(top().join("packaging/deb/build.sh"))
        .args([
            "--profile",
            "dev",
            "--fast",
            "--deb-version",
            version,
            "--out",
        ])
        .arg(out)
        .output()
        .unwrap();
    assert!(run.status.success(), "deb/build.sh: {}", text(&run));
    let find = |name: &str| {
        fs::read_dir(out)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                let f = p.file_name().unwrap().to_string_lossy().into_owned();
                f.starts_with(&format!("{name}_{version}_")) && f.ends_with(".deb")
            })
            .unwrap_or_else(|| panic!("no {name} {version} .deb in {}", out.display()))
    };
    (find("slipway-agent"), find("slipway-controller"))
}

#[test]
fn deb_packages_install_upgrade_remove_and_purge() {
    static_dir();
    let debs = tempfile::tempdir().unwrap();
    // Built one after the other: both use target/deb-stage.
    let (agent1, ctl1) = build_debs(&debs.path().join("1"), "0.1.0-1");
    let (agent2, _) = build_debs(&debs.path().join("2"), "0.1.1-1");
    // The maintainer scripts as packaged (common.sh pasted in; SC2317: not
    // every script calls every shared helper).
    let out = Command::new("sh")
        .arg("-c")
        .arg("shellcheck -s sh -e SC2317 target/deb-stage/agent/* target/deb-stage/controller/*")
        .current_dir(top())
        .output()
        .unwrap();
    assert!(out.status.success(), "shellcheck: {}", text(&out));

    let root = Chroot::new();
    for (deb, name) in [
        (&agent1, "agent1.deb"),
        (&agent2, "agent2.deb"),
        (&ctl1, "ctl1.deb"),
    ] {
        fs::copy(deb, root.path("/opt/slipway").join(name)).unwrap();
    }
    let dpkg = |args: &[&str]| {
        let mut all = vec!["dpkg"];
        all.extend_from_slice(args);
        let out = root.run(&all);
        assert!(out.status.success(), "dpkg {args:?}: {}", text(&out));
    };
    let version =
        |pkg: &str| stdout_of(&root.run(&["dpkg-query", "-W", "-f=${Status} ${Version}", pkg]));

    // Install: user, directories, conffile, unit enabled (not started: no systemd).
    dpkg(&["-i", "/opt/slipway/agent1.deb"]);
    assert_eq!(version("slipway-agent"), "install ok installed 0.1.0-1");
    assert!(root.has_user("slipway"));
    assert_eq!(root.stat("/etc/slipway"), "root:slipway 750");
    assert_eq!(root.stat("/etc/slipway/agent.toml"), "root:slipway 640");
    assert_eq!(root.stat("/var/lib/slipway-agent"), "root:root 700");
    assert_eq!(root.stat("/usr/bin/slipway-agent"), "root:root 755");
    let unit = fs::read_to_string(root.path("/lib/systemd/system/slipway-agent.service")).unwrap();
    assert!(
        unit.contains("ExecStart=/usr/bin/slipway-agent run"),
        "{unit}"
    );
    assert_eq!(
        fs::read_link(root.path(AGENT_WANTS)).unwrap(),
        Path::new("/lib/systemd/system/slipway-agent.service")
    );
    let status = root.run(&["slipway-agent", "status"]);
    assert!(status.status.success(), "agent status: {}", text(&status));
    // install.sh does not install a second copy beside the package.
    let out = root.install_sh(&["--binary", "/opt/slipway/slipway-agent"]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        stderr_of(&out).contains("the slipway-agent package is installed"),
        "{}",
        text(&out)
    );

    // Enrolled as the README says, with the configuration edited.
    let controller = Controller::start();
    let enroll = Command::new("chroot")
        .arg(root.dir.path())
        .args([
            "slipway-agent",
            "enroll",
            "--controller",
            &controller.url(),
            "--name",
            "deb-1",
        ])
        .env("SLIPWAY_JOIN_TOKEN", controller.token())
        .output()
        .unwrap();
    assert!(enroll.status.success(), "enroll: {}", text(&enroll));
    let edited = format!("[controller]\nurl = \"{}\"\n", controller.url());
    fs::write(root.path("/etc/slipway/agent.toml"), &edited).unwrap();

    // Upgrade: the new version, the edited conffile and the identity kept.
    dpkg(&["-i", "--force-confold", "/opt/slipway/agent2.deb"]);
    assert_eq!(version("slipway-agent"), "install ok installed 0.1.1-1");
    assert_eq!(
        fs::read_to_string(root.path("/etc/slipway/agent.toml")).unwrap(),
        edited
    );
    assert!(root.exists("/var/lib/slipway-agent/node.key"));
    assert!(root.exists(AGENT_WANTS));

    // The controller package beside it: its data dir for the service user.
    dpkg(&["-i", "/opt/slipway/ctl1.deb"]);
    assert_eq!(
        root.stat("/var/lib/slipway-controller"),
        "slipway:slipway 700"
    );
    assert_eq!(
        root.stat("/etc/slipway/controller.toml"),
        "root:slipway 640"
    );
    let token = root.run(&[
        "setpriv",
        "--reuid=slipway",
        "--regid=slipway",
        "--clear-groups",
        "slipway-controller",
        "token",
        "create",
        "--data-dir",
        "/var/lib/slipway-controller",
    ]);
    assert!(
        token.status.success(),
        "token create as slipway: {}",
        text(&token)
    );
    assert!(stdout_of(&token).starts_with("slw1."), "{}", text(&token));
    assert!(root.exists("/etc/systemd/system/multi-user.target.wants/slipway-controller.service"));

    // Remove: binary and unit gone, configuration and identity kept.
    dpkg(&["-r", "slipway-agent"]);
    assert!(!root.exists("/usr/bin/slipway-agent"));
    assert!(!root.exists(AGENT_WANTS));
    assert!(root.exists("/etc/slipway/agent.toml"));
    assert!(root.exists("/var/lib/slipway-agent/node.key"));
    assert!(root.has_user("slipway"));

    // Purge: the agent's state goes; the user stays for the controller...
    dpkg(&["--purge", "slipway-agent"]);
    assert!(!root.exists("/var/lib/slipway-agent"));
    assert!(!root.exists("/etc/slipway/agent.toml"));
    assert!(root.has_user("slipway"));
    // ...until that is purged too.
    dpkg(&["--purge", "slipway-controller"]);
    for gone in [
        "/var/lib/slipway-controller",
        "/etc/slipway",
        "/usr/bin/slipway",
    ] {
        assert!(!root.exists(gone), "{gone} is still there");
    }
    assert!(!root.has_user("slipway"));
    assert!(!root.run(&["getent", "group", "slipway"]).status.success());
}

#[test]
fn cloud_init_user_data_is_valid_and_runs_install_sh() {
    let template = top().join("packaging/cloud-init/user-data.yaml");
    let schema = |file: &Path| {
        Command::new("cloud-init")
            .args(["schema", "--config-file"])
            .arg(file)
            .output()
            .expect("cloud-init (apt-get install --no-install-recommends cloud-init; scripts/test.sh does)")
    };
    let out = schema(&template);
    assert!(out.status.success(), "template: {}", text(&out));

    let dir = tempfile::tempdir().unwrap();
    let rendered = fs::read_to_string(&template)
        .unwrap()
        .replace("@BASE_URL@", "https://dl.example.com/slipway")
        .replace("@VERSION@", "0.1.0")
        .replace("@CONTROLLER@", "ctl.example.com:7443")
        .replace("@JOIN_TOKEN@", "slw1.abc.def");
    let file = dir.path().join("user-data");
    fs::write(&file, &rendered).unwrap();
    let out = schema(&file);
    assert!(out.status.success(), "rendered: {}", text(&out));

    // The runcmd script parses as sh and runs install.sh with the values.
    let py = "import sys, yaml; d = yaml.safe_load(open(sys.argv[1])); print(d['runcmd'][0][2])";
    let script = Command::new("python3")
        .args(["-c", py])
        .arg(&file)
        .output()
        .unwrap();
    assert!(script.status.success(), "{}", text(&script));
    let script = stdout_of(&script);
    assert!(
        script.contains("sh /run/slipway/install.sh --controller 'ctl.example.com:7443'")
            && script.contains("--version '0.1.0'"),
        "{script}"
    );
    fs::write(dir.path().join("runcmd.sh"), &script).unwrap();
    let parse = Command::new("sh")
        .arg("-n")
        .arg(dir.path().join("runcmd.sh"))
        .output()
        .unwrap();
    assert!(parse.status.success(), "sh -n: {}", text(&parse));

    // The check can fail: a value of the wrong type is refused.
    fs::write(
        &file,
        rendered.replace("permissions: \"0600\"", "permissions: [1]"),
    )
    .unwrap();
    let out = schema(&file);
    assert!(!out.status.success(), "a bad value passed: {}", text(&out));
    assert!(
        text(&out).contains("write_files.0.permissions"),
        "{}",
        text(&out)
    );
}

/// The first boot of a droplet made by `slipway-controller droplets create
/// --wait`, played in the Debian root: cloud-init's part is done by the test
/// from the user data the local DigitalOcean API received (each
/// `write_files` entry written with its mode, each `runcmd` step run in the
/// root under the droplet's host name), so install.sh is fetched over HTTPS
/// from `--base-url`, downloads and checks the static agent, and enrolls
/// with the bound join token. systemd is not PID 1 in a chroot: the root's
/// `systemctl` (wrapped to record its calls) enables the unit but cannot
/// restart it, and the test, as init, starts the agent unit's command — with the metadata service at a loopback address
/// instead of 169.254.169.254. The node joins as the droplet, matched by
/// droplet id, and `create --wait` sees it online.
#[test]
fn a_droplet_created_by_the_controller_boots_from_its_user_data_and_joins() {
    use crate::deploy::HttpsFiles;
    use crate::support::do_api::{metadata_service, DoApi};
    use serde_json::Value;

    // The release folder served over HTTPS, as --base-url names it.
    let work = tempfile::tempdir().unwrap();
    let site = work.path().join("site");
    let v = site.join("v0.1.0");
    fs::create_dir_all(&v).unwrap();
    fs::copy(top().join("install.sh"), site.join("install.sh")).unwrap();
    fs::copy(static_dir().join("slipway-agent"), v.join("slipway-agent")).unwrap();
    fs::write(
        v.join("SHA256SUMS"),
        format!("{}  slipway-agent\n", sha256_file(&v.join("slipway-agent"))),
    )
    .unwrap();
    let server = HttpsFiles::start(work.path(), &site);
    let base = server.url("").trim_end_matches('/').to_owned();

    let api = DoApi::start();
    let config = api.controller_config(work.path());
    let controller = Controller::start_with(&["--config", config.to_str().unwrap()]);
    let create = Command::new(crate::support::bin("slipway-controller"))
        .args(["droplets", "create", "--name", "web-7", "--region", "fra1"])
        .args(["--size", "s-1vcpu-1gb", "--image", "debian-12-x64"])
        .args(["--controller", &controller.url(), "--base-url", &base])
        .args(["--version", "0.1.0", "--token-ttl", "10m"])
        .args(["--wait", "--wait-timeout", "3m", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(controller.data_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = api.wait_droplet("web-7")["id"].as_u64().unwrap();
    let user_data = api.user_data(id);
    let file = work.path().join("user-data");
    fs::write(&file, &user_data).unwrap();
    let py = "import json, sys, yaml; print(json.dumps(yaml.safe_load(open(sys.argv[1]))))";
    let parsed = Command::new("python3")
        .args(["-c", py])
        .arg(&file)
        .output()
        .unwrap();
    assert!(parsed.status.success(), "{}", text(&parsed));
    let cloud: Value = serde_json::from_slice(&parsed.stdout).unwrap();

    // The droplet's image: this root, trusting the release site's CA as a
    // droplet trusts the public ones, and a systemctl that records.
    let root = Chroot::new();
    let bundle = root.path("/etc/ssl/certs/ca-certificates.crt");
    let mut trusted = fs::read_to_string(&bundle).unwrap();
    trusted.push_str(&fs::read_to_string(&server.ca_pem).unwrap());
    fs::write(&bundle, trusted).unwrap();
    let systemctl = root.path("/usr/bin/systemctl");
    fs::rename(&systemctl, root.path("/usr/bin/systemctl.real")).unwrap();
    fs::write(
        &systemctl,
        "#!/bin/sh\necho \"$*\" >> /var/log/systemctl.calls\nexec /usr/bin/systemctl.real \"$@\"\n",
    )
    .unwrap();
    fs::set_permissions(&systemctl, fs::Permissions::from_mode(0o755)).unwrap();

    // cloud-init: write_files, then each runcmd step, as the droplet.
    for f in cloud["write_files"].as_array().unwrap() {
        let path = root.path(f["path"].as_str().unwrap());
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, f["content"].as_str().unwrap()).unwrap();
        let mode = u32::from_str_radix(f["permissions"].as_str().unwrap(), 8).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
    }
    let mut said = String::new();
    for step in cloud["runcmd"].as_array().unwrap() {
        let argv: Vec<&str> = step
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let out = Command::new("unshare")
            .args([
                "--uts",
                "sh",
                "-c",
                "hostname web-7 && exec chroot \"$0\" \"$@\"",
            ])
            .arg(root.dir.path())
            .args(&argv)
            .env_remove("SLIPWAY_JOIN_TOKEN")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        said.push_str(&text(&out));
        // The last step restarts the unit: the one thing a chroot cannot do.
        if !out.status.success() {
            assert!(
                argv.last()
                    .unwrap()
                    .contains("systemctl restart slipway-agent"),
                "runcmd step failed: {argv:?}: {}",
                text(&out)
            );
        }
    }
    assert!(said.contains("enrolled as node"), "{said}");
    assert!(
        !root.exists("/run/slipway/join.env"),
        "the token file stays"
    );
    let calls = fs::read_to_string(root.path("/var/log/systemctl.calls")).unwrap();
    assert!(calls.contains("restart slipway-agent"), "{calls}");
    let conf = fs::read_to_string(root.path("/etc/slipway/agent.toml")).unwrap();
    assert!(
        conf.contains("[digitalocean]\nmetadata_url = \"http://169.254.169.254\""),
        "{conf}"
    );
    let join = user_data
        .split("SLIPWAY_JOIN_TOKEN='")
        .nth(1)
        .and_then(|rest| rest.split('\'').next())
        .unwrap();
    assert!(
        !conf.contains(join) && !said.contains(join),
        "the join token is printed or kept: {said}"
    );

    // init: the unit's ExecStart, with the droplet's metadata service on
    // loopback.
    fs::write(
        root.path("/etc/slipway/agent.toml"),
        conf.replace("http://169.254.169.254", &metadata_service(id)),
    )
    .unwrap();
    let unit = fs::read_to_string(root.path(AGENT_UNIT)).unwrap();
    let exec_start = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap()
        .to_owned();
    let mut agent = Command::new("chroot")
        .arg(root.dir.path())
        .args(exec_start.split_whitespace())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Stop<'a>(&'a mut std::process::Child);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _stop = Stop(&mut agent);

    let created = create.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&created.stdout).into_owned();
    assert!(created.status.success(), "{}", text(&created));
    assert!(
        out.contains("created droplet web-7") && out.contains("is online"),
        "{out}"
    );
    // Matched by the droplet id its metadata service gave, after a sync.
    let sync = Command::new(crate::support::bin("slipway-controller"))
        .args(["droplets", "sync", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(controller.data_dir())
        .output()
        .unwrap();
    assert!(sync.status.success(), "{}", text(&sync));
    let list = Command::new(crate::support::bin("slipway-controller"))
        .args(["droplets", "list", "--json", "--config"])
        .arg(&config)
        .arg("--data-dir")
        .arg(controller.data_dir())
        .output()
        .unwrap();
    assert!(list.status.success(), "{}", text(&list));
    let listed: Value = serde_json::from_slice(&list.stdout).unwrap();
    let droplet = listed["droplets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "web-7")
        .unwrap();
    assert_eq!(droplet["node_name"], "web-7", "{listed:#}");
    assert_eq!(node_names(&controller), ["web-7"]);
    api.assert_no_violations();
}
