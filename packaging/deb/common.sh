# Shared by the maintainer scripts of slipway-agent and slipway-controller;
# packaging/deb/build.sh pastes it into each script in place of the line
# "#COMMON#" (dpkg runs a maintainer script as one file).

# sd_booted(3): systemd is the running init system. In a chroot or an image
# build it is not: units are enabled (symlinks) but not started or stopped.
systemd_running() { [ -d /run/systemd/system ]; }

ensure_user() {
  if ! getent passwd slipway >/dev/null; then
    if getent group slipway >/dev/null; then
      useradd --system --gid slipway --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin slipway
    else
      useradd --system --user-group --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin slipway
    fi
  fi
  # The configuration is readable by the services' group, not by everyone.
  chown root:slipway /etc/slipway
  chmod 0750 /etc/slipway
}

# True when the other Slipway package (which shares /etc/slipway and the
# user) is still installed.
other_installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q ' installed$'
}
