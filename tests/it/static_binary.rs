//! The statically linked binaries of `scripts/build-static.sh` (in
//! `target/static/dev/`; `scripts/test.sh` builds them before the tests) run
//! in an empty root: a chroot holding only the binary, a CA bundle,
//! `/etc/hosts` and the config the test writes — no libc, no NSS modules,
//! no `/etc/nsswitch.conf`, no `/proc`.
//!
//! Name resolution is the usual trap of a static glibc binary (getaddrinfo
//! loads NSS modules with dlopen). Since glibc 2.34 the `files` and `dns`
//! services are built into libc, static or not, so names resolve from
//! `/etc/hosts` and through the servers of `/etc/resolv.conf` with nothing
//! loaded. These tests prove it: the agent's HTTPS download by a name in
//! `/etc/hosts` (`artifacts.test`) and by a name only a DNS server (the
//! test's, on a loopback address) knows (`dns-only.test`), a clear error
//! while no one knows it, and the agent's controller link by name
//! (`controller.test`).

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::support::{artifact, sha256_file, text, wait_until, APP};

/// A binary of `scripts/build-static.sh --profile dev`.
fn static_bin(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/static/dev")
        .join(name);
    assert!(
        path.is_file(),
        "{} is missing: run `scripts/build-static.sh --profile dev` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// An empty root with one static binary at `/NAME`, `/etc/hosts` mapping
/// `names` to 127.0.0.1 and `ca_pem` as the system CA bundle.
fn empty_root(dir: &Path, binary: &str, names: &[&str], ca_pem: Option<&str>) -> PathBuf {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the empty-root tests chroot(8) and must run as root"
    );
    let root = dir.join("root");
    fs::create_dir_all(root.join("etc/ssl/certs")).unwrap();
    let exe = root.join(binary);
    fs::copy(static_bin(binary), &exe).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(
        root.join("etc/hosts"),
        format!("127.0.0.1 localhost {}\n", names.join(" ")),
    )
    .unwrap();
    if let Some(pem) = ca_pem {
        fs::write(root.join("etc/ssl/certs/ca-certificates.crt"), pem).unwrap();
    }
    // Nothing else: no lib/, no usr/, no nsswitch.conf, no resolv.conf.
    root
}

/// chroot(8) from the test's PATH (the command itself runs with an empty
/// environment, so it cannot be looked up there).
fn chroot_program() -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("chroot"))
                .find(|p| p.is_file())
        })
        .expect("chroot(8) is on PATH (coreutils)")
}

/// `chroot ROOT /BINARY args…` with an empty environment.
fn in_root(root: &Path, binary: &str, args: &[&str]) -> Command {
    let mut c = Command::new(chroot_program());
    c.arg(root)
        .arg(format!("/{binary}"))
        .args(args)
        .env_clear()
        .stdin(Stdio::null());
    c
}

fn ok(out: Output, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A CA and a server certificate for `names`, both PEM, plus the key.
fn certificate(names: &[&str]) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
    let cert = CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

/// python3's HTTPS file server on 127.0.0.1 (a port of its own), serving
/// `files` with the given certificate; it writes its port to `port_file`.
const HTTPS_SERVER: &str = r#"import http.server, ssl, sys, os
root, cert, key, port_file = sys.argv[1:5]
class H(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *a, **k):
        super().__init__(*a, directory=root, **k)
httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
with open(port_file + ".tmp", "w") as f:
    f.write(str(httpd.server_address[1]))
os.rename(port_file + ".tmp", port_file)
httpd.serve_forever()
"#;

/// A DNS server on `ADDR`:53 (UDP) for the test: A queries for names under
/// `.test` answer 127.0.0.1, other names NXDOMAIN, other types (AAAA) an
/// empty answer. Each question goes to the log file, one `TYPE NAME` line.
const DNS_SERVER: &str = r#"import socket, struct, sys
addr, log = sys.argv[1], sys.argv[2]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((addr, 53))
open(log + ".ready", "w").close()
while True:
    q, peer = s.recvfrom(512)
    tid, = struct.unpack(">H", q[:2])
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode()); i += 1 + q[i]
    qtype, = struct.unpack(">H", q[i + 1:i + 3])
    question = q[12:i + 5]
    name = ".".join(labels).lower()
    with open(log, "a") as f:
        f.write(f"{qtype} {name}\n")
    known = name.endswith(".test")
    answer = b""
    if known and qtype == 1:
        answer = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 60, 4) + bytes([127, 0, 0, 1])
    head = struct.pack(">HHHHHH", tid, 0x8180 | (0 if known else 3), 1, 1 if answer else 0, 0, 0)
    s.sendto(head + question + answer, peer)
"#;

/// A loopback address of its own for the test's DNS server (port 53 is
/// fixed: resolv.conf cannot name another; 127.0.0.53 may be systemd-resolved).
const DNS_ADDR: &str = "127.83.0.53";

/// Starts the DNS server; its log of questions is `work/dns.log`.
fn dns_server(work: &Path) -> Reaped {
    fs::write(work.join("dns.py"), DNS_SERVER).unwrap();
    let log = work.join("dns.log");
    let child = Command::new("python3")
        .arg(work.join("dns.py"))
        .arg(DNS_ADDR)
        .arg(&log)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = Reaped(child);
    let ready = work.join("dns.log.ready");
    wait_until("the DNS server", Duration::from_secs(20), || ready.exists());
    child
}

/// A child process killed when the test ends, however it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn https_server(work: &Path, files: &Path, cert: &str, key: &str) -> (Reaped, u16) {
    fs::write(work.join("https.pem"), cert).unwrap();
    fs::write(work.join("https.key"), key).unwrap();
    fs::write(work.join("https.py"), HTTPS_SERVER).unwrap();
    let port_file = work.join("https.port");
    let child = Command::new("python3")
        .arg(work.join("https.py"))
        .arg(files)
        .arg(work.join("https.pem"))
        .arg(work.join("https.key"))
        .arg(&port_file)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = Reaped(child);
    wait_until("the HTTPS server", Duration::from_secs(20), || {
        port_file.exists()
    });
    let port = fs::read_to_string(&port_file).unwrap().parse().unwrap();
    (child, port)
}

#[test]
fn the_binaries_are_static_and_print_their_commit() {
    for name in ["slipway-agent", "slipway-controller", "slipway"] {
        let path = static_bin(name);
        let ldd = Command::new("ldd").arg(&path).output().unwrap();
        let said = String::from_utf8_lossy(&ldd.stdout).into_owned()
            + &String::from_utf8_lossy(&ldd.stderr);
        assert!(said.contains("not a dynamic executable"), "{name}: {said}");
        // file(1), where installed, says so too (not "static-pie linked").
        if let Ok(out) = Command::new("file").arg("-b").arg(&path).output() {
            let said = String::from_utf8_lossy(&out.stdout);
            assert!(said.contains(", statically linked"), "{name}: {said}");
        }
        let version = ok(
            Command::new(&path).arg("--version").output().unwrap(),
            "--version",
        );
        // The agent prints the version it reports (with the commit as
        // build metadata) first; every binary then names the commit.
        let expected = match name {
            "slipway-agent" => format!("{name} {}+", env!("CARGO_PKG_VERSION")),
            _ => format!("{name} {} (commit ", env!("CARGO_PKG_VERSION")),
        };
        assert!(version.starts_with(&expected), "{name}: {version}");
        assert!(version.contains(" (commit "), "{name}: {version}");
        assert!(!version.contains("unknown"), "{name}: {version}");
    }
}

#[test]
fn the_static_agent_packs_deploys_and_downloads_by_host_name_in_an_empty_root() {
    let work = tempfile::tempdir().unwrap();
    let (ca, cert, key) = certificate(&["artifacts.test", "dns-only.test"]);
    let root = empty_root(work.path(), "slipway-agent", &["artifacts.test"], Some(&ca));
    fs::create_dir_all(root.join("etc/slipway")).unwrap();
    fs::create_dir_all(root.join("srv/web")).unwrap();
    // No run section: the release store alone (a driver needs PM2, Docker
    // or a program to run, none of which an empty root has). The HTTPS CA
    // comes from the root's system bundle, not from `[artifacts] ca_file`.
    fs::write(
        root.join("etc/slipway/agent.toml"),
        "[apps.web]\nroot = \"/srv/web\"\n",
    )
    .unwrap();
    let agent = |args: &[&str]| {
        let mut all = vec!["--config", "/etc/slipway/agent.toml"];
        all.extend_from_slice(args);
        in_root(&root, "slipway-agent", &all).output().unwrap()
    };

    let version = ok(agent(&["--version"]), "--version");
    assert!(version.starts_with("slipway-agent 0.1.0+"), "{version}");
    assert!(version.contains(" (commit "), "{version}");

    // pack, then deploy what it packed.
    fs::create_dir_all(root.join("build")).unwrap();
    fs::write(root.join("build/server.py"), APP).unwrap();
    fs::write(root.join("build/VERSION"), "v1\n").unwrap();
    let packed = ok(
        agent(&["pack", "--dir", "/build", "--out", "/web-v1.tar.gz"]),
        "pack",
    );
    let sha1 = sha256_file(&root.join("web-v1.tar.gz"));
    assert!(packed.contains(&sha1), "pack names the sha256: {packed}");
    ok(
        agent(&[
            "deploy",
            "--app",
            "web",
            "--artifact",
            "/web-v1.tar.gz",
            "--sha256",
            &sha1,
            "--id",
            "v1",
        ]),
        "deploy of a local artifact",
    );
    assert_eq!(
        fs::read_link(root.join("srv/web/current")).unwrap(),
        Path::new("releases/v1")
    );
    assert_eq!(
        fs::read_to_string(root.join("srv/web/current/VERSION")).unwrap(),
        "v1\n"
    );

    // An HTTPS download by host name: artifacts.test is only in the root's
    // /etc/hosts, the server's CA only in its CA bundle.
    let files = work.path().join("files");
    fs::create_dir_all(&files).unwrap();
    let v2 = artifact(&files, "v2", APP);
    let sha2 = sha256_file(&v2);
    let (_server, port) = https_server(work.path(), &files, &cert, &key);
    let url = format!("https://artifacts.test:{port}/v2.tar.gz");
    ok(
        agent(&[
            "deploy", "--app", "web", "--url", &url, "--sha256", &sha2, "--id", "v2",
        ]),
        "deploy --url by host name",
    );
    assert_eq!(
        fs::read_link(root.join("srv/web/current")).unwrap(),
        Path::new("releases/v2")
    );
    let cached = root.join("srv/web/.slipway/cache").join(&sha2);
    assert!(
        fs::read_dir(root.join("srv/web/.slipway/cache"))
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().contains(&sha2)),
        "{} (or a file named for it) is in the cache",
        cached.display()
    );

    // A name in no hosts file, with no DNS server configured, fails and
    // says which host it could not reach.
    let missing = format!("https://dns-only.test:{port}/v3.tar.gz");
    let v3 = artifact(&files, "v3", APP);
    let sha3 = sha256_file(&v3);
    let deploy_v3 = || {
        agent(&[
            "deploy", "--app", "web", "--url", &missing, "--sha256", &sha3, "--id", "v3",
        ])
    };
    let out = deploy_v3();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("dns-only.test"),
        "{}",
        text(&out)
    );

    // The same name through DNS (the root's /etc/resolv.conf names the
    // test's server): glibc's built-in dns service, no NSS module loaded.
    let _dns = dns_server(work.path());
    fs::write(
        root.join("etc/resolv.conf"),
        format!("nameserver {DNS_ADDR}\n"),
    )
    .unwrap();
    ok(deploy_v3(), "deploy --url by a name only DNS knows");
    assert_eq!(
        fs::read_link(root.join("srv/web/current")).unwrap(),
        Path::new("releases/v3")
    );
    let asked = fs::read_to_string(work.path().join("dns.log")).unwrap();
    assert!(asked.contains("1 dns-only.test"), "{asked}");
}

#[test]
fn the_static_controller_serves_and_a_static_agent_enrolls_by_host_name() {
    let work = tempfile::tempdir().unwrap();
    let ctl_root = empty_root(
        work.path(),
        "slipway-controller",
        &["controller.test"],
        None,
    );
    let port = crate::support::free_port();
    let listen = format!("127.0.0.1:{port}");
    let version = ok(
        in_root(&ctl_root, "slipway-controller", &["--version"])
            .output()
            .unwrap(),
        "controller --version",
    );
    assert!(
        version.starts_with("slipway-controller 0.1.0 (commit "),
        "{version}"
    );
    let log = fs::File::create(work.path().join("controller.log")).unwrap();
    let server = in_root(
        &ctl_root,
        "slipway-controller",
        &[
            "serve",
            "--data-dir",
            "/data",
            "--listen",
            &listen,
            "--server-name",
            "controller.test",
            "--ready-file",
            "/ready",
        ],
    )
    .stdout(log.try_clone().unwrap())
    .stderr(log)
    .spawn()
    .unwrap();
    let _server = Reaped(server);
    wait_until(
        "the controller in its empty root",
        Duration::from_secs(60),
        || ctl_root.join("ready").exists(),
    );
    let admin = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["--data-dir", "/data"]);
        ok(
            in_root(&ctl_root, "slipway-controller", &all)
                .output()
                .unwrap(),
            "controller admin command",
        )
        .trim()
        .to_owned()
    };
    let join = admin(&["token", "create"]);
    let read = admin(&["token", "api", "--scope", "read"]);
    let ca_pem = fs::read_to_string(ctl_root.join("data/ca.pem")).unwrap();

    // The agent in a root of its own, reaching the controller by a name
    // only its /etc/hosts knows.
    let agent_dir = work.path().join("agent");
    fs::create_dir_all(&agent_dir).unwrap();
    let root = empty_root(&agent_dir, "slipway-agent", &["controller.test"], None);
    fs::create_dir_all(root.join("etc/slipway")).unwrap();
    fs::create_dir_all(root.join("srv/web")).unwrap();
    let controller = format!("controller.test:{port}");
    fs::write(
        root.join("etc/slipway/agent.toml"),
        format!(
            "[controller]\nurl = \"{controller}\"\nstate_dir = \"/var/lib/slipway-agent\"\n\n\
             [apps.web]\nroot = \"/srv/web\"\n"
        ),
    )
    .unwrap();
    let agent = |args: &[&str]| {
        let mut all = vec!["--config", "/etc/slipway/agent.toml"];
        all.extend_from_slice(args);
        in_root(&root, "slipway-agent", &all)
    };
    ok(
        agent(&[
            "enroll",
            "--controller",
            &controller,
            "--token",
            &join,
            "--name",
            "static-1",
        ])
        .output()
        .unwrap(),
        "enroll by host name",
    );
    let log = fs::File::create(agent_dir.join("agent.log")).unwrap();
    let running = agent(&["run", "--ready-file", "/ready"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let _running = Reaped(running);

    // The host's (dynamic) CLI talks to the static controller.
    fs::write(work.path().join("ca.pem"), ca_pem).unwrap();
    let nodes = || -> Vec<Value> {
        let out = Command::new(crate::support::bin("slipway"))
            .arg("--controller")
            .arg(&listen)
            .arg("--ca")
            .arg(work.path().join("ca.pem"))
            .arg("--token")
            .arg(&read)
            .args(["nodes", "--json"])
            .output()
            .unwrap();
        serde_json::from_str(&ok(out, "slipway nodes --json")).unwrap()
    };
    wait_until(
        "the static agent online at the static controller",
        Duration::from_secs(60),
        || {
            nodes()
                .iter()
                .any(|n| n["name"] == "static-1" && n["state"] == "online")
        },
    );
    let node = nodes()
        .into_iter()
        .find(|n| n["name"] == "static-1")
        .unwrap();
    // What the agent reports is its version with the commit of its build.
    let reported = node["agent_version"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(reported.starts_with("0.1.0+"), "{node}");
    assert!(!reported.ends_with("+unknown"), "{node}");
}
