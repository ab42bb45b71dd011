//! Test images without a registry: a static busybox httpd imported with
//! `docker import`. Shared by the agent's Docker tests and the end-to-end
//! Docker test (which includes this file by path).

// A failed set-up step should panic with its error, as unwrap does.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

use std::fs;
use std::path::Path;
use std::process::Command;

/// Builds image `tag` with `docker import` from a scratch root file system
/// holding a static busybox whose httpd serves `/www` on port 3000:
/// `index.html` says `version`; `api/health` exists only if `with_health`
/// (otherwise every health probe gets 404); `cgi-bin/headers` prints
/// `version` and the `X-Forwarded-*`/`X-Request-Start` headers it got.
/// Nothing is pulled.
pub fn busybox_image(workdir: &Path, tag: &str, version: &str, with_health: bool) {
    busybox_image_on(None, workdir, tag, version, with_health);
}

/// [`busybox_image`] built in the engine listening on `socket` (the
/// machine's engine when `None`).
pub fn busybox_image_on(
    socket: Option<&Path>,
    workdir: &Path,
    tag: &str,
    version: &str,
    with_health: bool,
) {
    const BUSYBOX: &str = "/bin/busybox";
    assert!(
        Path::new(BUSYBOX).exists(),
        "{BUSYBOX} is missing: run scripts/setup-docker.sh (installs busybox-static)"
    );
    let rootfs = workdir.join(format!("rootfs-{version}"));
    fs::create_dir_all(rootfs.join("bin")).unwrap();
    fs::create_dir_all(rootfs.join("www/api")).unwrap();
    fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
    fs::write(rootfs.join("www/index.html"), format!("{version}\n")).unwrap();
    if with_health {
        fs::write(rootfs.join("www/api/health"), format!("ok {version}\n")).unwrap();
    }
    // `/cgi-bin/headers`: the forwarding headers the app was given (busybox
    // httpd hands request headers to CGI as HTTP_* variables).
    fs::create_dir_all(rootfs.join("www/cgi-bin")).unwrap();
    let cgi = rootfs.join("www/cgi-bin/headers");
    fs::write(
        &cgi,
        format!(
            "#!/bin/busybox sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n'\necho \"{version}\"\necho \"x-forwarded-for=$HTTP_X_FORWARDED_FOR\"\necho \"x-forwarded-proto=$HTTP_X_FORWARDED_PROTO\"\necho \"x-request-start=$HTTP_X_REQUEST_START\"\n"
        ),
    )
    .unwrap();
    fs::set_permissions(&cgi, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let tarball = workdir.join(format!("rootfs-{version}.tar"));
    let mut builder = tar::Builder::new(fs::File::create(&tarball).unwrap());
    builder.append_dir_all(".", &rootfs).unwrap();
    builder.into_inner().unwrap().sync_all().unwrap();
    docker_cli_on(
        socket,
        &[
            "import",
            "--change",
            r#"CMD ["/bin/busybox","httpd","-f","-p","3000","-h","/www"]"#,
            tarball.to_str().unwrap(),
            tag,
        ],
    );
}

/// Runs the docker CLI (test set-up only: the agent uses the Engine API).
pub fn docker_cli(args: &[&str]) -> String {
    docker_cli_on(None, args)
}

/// [`docker_cli`] against the engine listening on `socket` (the machine's
/// engine when `None`).
pub fn docker_cli_on(socket: Option<&Path>, args: &[&str]) -> String {
    let mut cmd = Command::new("docker");
    if let Some(socket) = socket {
        cmd.arg("-H").arg(format!("unix://{}", socket.display()));
    }
    let out = cmd.args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}
