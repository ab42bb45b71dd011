#!/bin/sh
# Installs the Slipway node agent on a droplet (x86_64 Linux with systemd).
#
#   curl -fsSL https://HOST/slipway/install.sh | sh -s -- \
#       --controller ctl.example.com:7443 --token slw1.… [--version 0.1.0]
#   sh install.sh --binary ./slipway-agent --controller … --token …   (a checkout)
#
# Options:
#   --controller HOST:PORT  the controller this node reports to (written into
#                           agent.toml when that file is new, and enrolled with)
#   --token slw1.…          one-time join token (slipway-controller token create);
#                           also read from SLIPWAY_JOIN_TOKEN
#   --name NAME             this node's name (default: the host name)
#   --app NAME=ROOT         an app of the new agent.toml, its files under ROOT
#                           (repeatable; e.g. --app web=/app)
#   --binary FILE           the agent binary, a local file ...
#   --url URL               ... or downloaded from URL ...
#   --version V             ... or from BASE/vV/slipway-agent
#   --base-url BASE         where --version looks (or SLIPWAY_BASE_URL)
#   --sha256 HEX            the binary's sha256; without it, looked up in the
#                           SHA256SUMS file beside the binary (or the URL)
#   --upgrade               replace only the binary (the old one is kept as
#                           slipway-agent.old) and restart the agent
#   --uninstall             remove the unit, the binary and the slipway user;
#                           keep configuration, identity and app data
#   --purge                 with --uninstall: remove those too
#   -h, --help              this text
#
# With no binary option, the slipway-agent file beside this script is used (a
# release folder: install.sh, slipway-agent, SHA256SUMS). A second run with the
# same options changes nothing and says so. A failure undoes what the run did.
# Exit codes: 0 done, 1 failed (and rolled back), 64 bad usage or unsupported
# system.
set -eu

BIN=/usr/local/bin/slipway-agent
UNIT=/etc/systemd/system/slipway-agent.service
CONF_DIR=/etc/slipway
CONF=$CONF_DIR/agent.toml
STATE_DIR=/var/lib/slipway-agent
USER_NAME=slipway
DEFAULT_BASE_URL=https://downloads.example.invalid/slipway

# --- the systemd unit --------------------------------------------------------
# A copy of packaging/systemd/slipway-agent.service, so that `curl | sh` needs
# nothing else; the install tests check that the two are the same.
unit_text() {
  cat <<'UNIT_EOF'
# The Slipway node agent. Installed by install.sh or the .deb as
# /etc/systemd/system/slipway-agent.service (the .deb: /lib/systemd/system).
# README, "systemd units": what each setting is for and the exposure that
# remains. The app roots of /etc/slipway/agent.toml must be writable: /app
# and /srv are; add others in a drop-in (systemctl edit slipway-agent):
#   [Service]
#   ReadWritePaths=/var/www/shop /home/deploy/.pm2
[Unit]
Description=Slipway node agent (releases, PM2/Docker/exec apps, health, controller link)
Documentation=https://example.invalid/slipway
Wants=network-online.target
After=network-online.target docker.service

[Service]
# READY=1 once every app's logs are watched; watchdog pings from the agent's
# runtime at half of WatchdogSec; STOPPING=1 on SIGTERM; STATUS= lines.
Type=notify
NotifyAccess=main
ExecStart=/usr/local/bin/slipway-agent run --config /etc/slipway/agent.toml
Restart=on-failure
RestartSec=2s
WatchdogSec=60s
# The agent starts PM2 and the exec supervisors, and Docker runs the
# containers: a stopped or restarted agent must not take the apps with it.
KillMode=process
TimeoutStopSec=30s
StateDirectory=slipway-agent
StateDirectoryMode=0700
UMask=0022

# Hardening. PM2, its apps and the exec supervisors are started by the
# agent and share this sandbox; Docker's containers do not (dockerd starts
# them). It runs as root: it switches to each app's `user`, owns the app
# roots and talks to /run/docker.sock.
NoNewPrivileges=yes
ProtectSystem=strict
# App roots (the "-" ignores one that does not exist), root's PM2_HOME, and
# the binary's own directory: `slipway agent-upgrade` writes the new binary
# beside the old one and renames it into place (install.sh's path; a .deb's
# agent is upgraded with apt instead).
ReadWritePaths=-/app -/srv -/root/.pm2 -/usr/local/bin
# read-only, not yes: an app's `user` may keep its PM2_HOME in its home
# (add it to ReadWritePaths).
ProtectHome=read-only
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
# AF_NETLINK: interface lists (Node's os.networkInterfaces(), getifaddrs).
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallFilter=@system-service
SystemCallErrorNumber=EPERM
SystemCallArchitectures=native
# What managing apps as root needs: files of any owner in the app roots,
# switching to an app's user, signalling its processes, apps on ports < 1024.
CapabilityBoundingSet=CAP_CHOWN CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH CAP_FOWNER CAP_FSETID CAP_KILL CAP_SETUID CAP_SETGID CAP_NET_BIND_SERVICE

[Install]
WantedBy=multi-user.target
UNIT_EOF
}

# --- output and failure ----------------------------------------------------
say() { printf 'install.sh: %s\n' "$*"; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'install.sh: %s\n' "$*" >&2; exit 64; }

# Everything this run changed, as shell commands that undo it, newest first;
# run by the EXIT trap when the run fails.
UNDO=""
CHANGES=0
TMP=""
undo_push() { UNDO="$1
$UNDO"; }
changed() { CHANGES=$((CHANGES + 1)); say "$*"; }
# Quotes a value for the undo commands.
q() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

on_exit() {
  status=$?
  trap - EXIT INT TERM
  if [ "$status" -ne 0 ] && [ -n "$UNDO" ]; then
    say "failed: undoing what this run did"
    printf '%s\n' "$UNDO" | while IFS= read -r cmd; do
      [ -n "$cmd" ] || continue
      eval "$cmd" || printf 'install.sh: could not undo: %s\n' "$cmd" >&2
    done
    say "rolled back; the system is as it was before this run"
  fi
  [ -z "$TMP" ] || rm -rf "$TMP"
  exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- arguments ---------------------------------------------------------------
MODE=install
CONTROLLER=""
TOKEN=${SLIPWAY_JOIN_TOKEN:-}
NODE_NAME=""
APPS=""
SRC_FILE=""
SRC_URL=""
VERSION=""
BASE_URL=${SLIPWAY_BASE_URL:-$DEFAULT_BASE_URL}
SHA256=""
PURGE=0

need_value() {
  if [ $# -lt 2 ] || [ -z "$2" ]; then usage_error "$1 needs a value (see --help)"; fi
}
while [ $# -gt 0 ]; do
  case "$1" in
    --controller) need_value "$@"; CONTROLLER=$2; shift 2 ;;
    --token) need_value "$@"; TOKEN=$2; shift 2 ;;
    --name) need_value "$@"; NODE_NAME=$2; shift 2 ;;
    --app) need_value "$@"
      case "$2" in
        =*|*[!A-Za-z0-9_-]*=*|*=*[\"\\[:space:]]*) usage_error "--app wants NAME=/absolute/root (NAME of A-Z a-z 0-9 _ -), not '$2'" ;;
        *=/*) ;;
        *) usage_error "--app wants NAME=/absolute/root, not '$2'" ;;
      esac
      APPS="$APPS$2
"; shift 2 ;;
    --binary) need_value "$@"; SRC_FILE=$2; shift 2 ;;
    --url) need_value "$@"; SRC_URL=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --base-url) need_value "$@"; BASE_URL=${2%/}; shift 2 ;;
    --sha256) need_value "$@"; SHA256=$2; shift 2 ;;
    --upgrade) MODE=upgrade; shift ;;
    --uninstall) MODE=uninstall; shift ;;
    --purge) PURGE=1; shift ;;
    -h|--help)
      awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" 2>/dev/null \
        || echo "usage: install.sh [--binary FILE | --url URL | --version V] --controller HOST:PORT --token slw1.…"
      exit 0 ;;
    *) usage_error "unknown argument '$1' (see --help)" ;;
  esac
done
[ "$PURGE" = 0 ] || [ "$MODE" = uninstall ] || usage_error "--purge goes with --uninstall"
sources=0
for s in "$SRC_FILE" "$SRC_URL" "$VERSION"; do [ -z "$s" ] || sources=$((sources + 1)); done
[ "$sources" -le 1 ] || usage_error "give one of --binary, --url, --version"
case "$SHA256" in
  "") ;;
  *[!0-9a-fA-F]*) usage_error "--sha256 wants 64 hex digits, not '$SHA256'" ;;
  *) [ "${#SHA256}" = 64 ] || usage_error "--sha256 wants 64 hex digits, not '$SHA256'" ;;
esac
if [ -n "$TOKEN" ] && [ -z "$CONTROLLER" ]; then
  usage_error "--token needs --controller HOST:PORT"
fi

# --- the system: refused up front when unsupported ---------------------------
os=$(uname -s)
[ "$os" = Linux ] || usage_error "unsupported OS '$os': the agent runs on Linux only"
arch=$(uname -m)
case "$arch" in
  x86_64|amd64) ;;
  *) usage_error "unsupported architecture '$arch': release binaries are built for x86_64 only" ;;
esac
[ "$(id -u)" = 0 ] || usage_error "must run as root (try: sudo sh install.sh …)"
command -v systemctl >/dev/null 2>&1 || usage_error "unsupported init system: systemd is required (no systemctl on this system)"
[ -d /etc/systemd/system ] || usage_error "unsupported init system: no /etc/systemd/system"
# sd_booted(3): systemd runs as the init system exactly when this exists. In a
# chroot or a container build it does not: the unit is enabled, not started.
if [ -d /run/systemd/system ]; then SYSTEMD_RUNNING=1; else SYSTEMD_RUNNING=0; fi
for tool in sha256sum install mktemp; do
  command -v "$tool" >/dev/null 2>&1 || usage_error "missing '$tool' (coreutils)"
done

# True when the Debian package NAME is installed.
package_installed() {
  command -v dpkg-query >/dev/null 2>&1 \
    && dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q ' installed$'
}
if [ "$MODE" != uninstall ] && package_installed slipway-agent; then
  usage_error "the slipway-agent package is installed: upgrade it with dpkg or apt, not install.sh"
fi

TMP=$(mktemp -d /tmp/slipway-install.XXXXXX)

# --- the binary: fetched, checked against a sha256, run once -----------------
download() { # URL FILE
  if command -v curl >/dev/null 2>&1; then
    curl -fsSL --retry 3 -o "$2" "$1" || die "cannot download $1 (curl failed)"
  elif command -v wget >/dev/null 2>&1; then
    wget -q -O "$2" "$1" || die "cannot download $1 (wget failed)"
  else
    die "cannot download $1: neither curl nor wget is installed"
  fi
}

# The sha256 listed for NAME in the SHA256SUMS file SUMS, or nothing.
sum_for() { awk -v n="$2" '$2 == n || $2 == "*" n { print $1; exit }' "$1"; }

# Puts the verified binary at $TMP/slipway-agent.
fetch_binary() {
  if [ -z "$SRC_FILE$SRC_URL$VERSION" ]; then
    here=$(dirname "$0")
    if [ -f "$here/slipway-agent" ]; then
      SRC_FILE=$here/slipway-agent
    else
      usage_error "no agent binary: give --binary FILE, --url URL or --version V"
    fi
  fi
  [ -z "$VERSION" ] || SRC_URL=$BASE_URL/v$VERSION/slipway-agent
  expected=$SHA256
  if [ -n "$SRC_FILE" ]; then
    [ -f "$SRC_FILE" ] || die "--binary $SRC_FILE: no such file"
    cp "$SRC_FILE" "$TMP/slipway-agent"
    sums=$(dirname "$SRC_FILE")/SHA256SUMS
    if [ -z "$expected" ]; then
      [ -f "$sums" ] || die "no sha256 for $SRC_FILE: give --sha256 or put a SHA256SUMS file beside it"
      expected=$(sum_for "$sums" "$(basename "$SRC_FILE")")
      [ -n "$expected" ] || die "$sums does not list $(basename "$SRC_FILE")"
    fi
    from=$SRC_FILE
  else
    say "downloading $SRC_URL"
    download "$SRC_URL" "$TMP/slipway-agent"
    if [ -z "$expected" ]; then
      download "${SRC_URL%/*}/SHA256SUMS" "$TMP/SHA256SUMS"
      expected=$(sum_for "$TMP/SHA256SUMS" "${SRC_URL##*/}")
      [ -n "$expected" ] || die "${SRC_URL%/*}/SHA256SUMS does not list ${SRC_URL##*/}"
    fi
    from=$SRC_URL
  fi
  got=$(sha256sum "$TMP/slipway-agent" | cut -d' ' -f1)
  expected=$(printf '%s' "$expected" | tr 'A-F' 'a-f')
  [ "$got" = "$expected" ] || die "sha256 mismatch for $from: expected $expected, got $got (a corrupt or wrong file)"
  chmod 0755 "$TMP/slipway-agent"
  NEW_VERSION=$("$TMP/slipway-agent" --version 2>&1) || die "$from does not run on this system: $NEW_VERSION"
  NEW_SHA=$got
}

file_sha() { sha256sum "$1" | cut -d' ' -f1; }

# Puts $TMP/slipway-agent at $BIN with one rename (the new file is first
# written beside it, on the same file system).
place_binary() {
  install -m 0755 -o root -g root "$TMP/slipway-agent" "$BIN.new"
  mv -f "$BIN.new" "$BIN"
}

# --- pieces of the install, each checked first ------------------------------
ensure_user() {
  if getent passwd "$USER_NAME" >/dev/null 2>&1; then return; fi
  nologin=/usr/sbin/nologin
  [ -x "$nologin" ] || nologin=/bin/false
  if getent group "$USER_NAME" >/dev/null 2>&1; then
    useradd --system --gid "$USER_NAME" --home-dir /nonexistent --no-create-home \
      --shell "$nologin" "$USER_NAME" || die "cannot create user $USER_NAME"
    undo_push "userdel $USER_NAME"
  else
    useradd --system --user-group --home-dir /nonexistent --no-create-home \
      --shell "$nologin" "$USER_NAME" || die "cannot create user $USER_NAME"
    undo_push "userdel $USER_NAME; groupdel $USER_NAME 2>/dev/null || true"
  fi
  changed "created system user $USER_NAME"
}

# ensure_dir PATH OWNER:GROUP MODE
ensure_dir() {
  if [ ! -e "$1" ]; then
    parent=$(dirname "$1")
    [ -d "$parent" ] || ensure_dir "$parent" root:root 0755
    mkdir "$1"
    undo_push "rm -rf $(q "$1")"
    chown "$2" "$1"
    chmod "$3" "$1"
    changed "created $1 ($2, mode $3)"
    return
  fi
  [ -d "$1" ] || die "$1 exists and is not a directory"
  ensure_owner_mode "$1" "$2" "$3"
}

# Fixes the owner and mode of an existing PATH when they differ.
ensure_owner_mode() {
  now=$(stat -c '%U:%G %a' "$1")
  want="$2 $(printf '%s' "$3" | sed 's/^0*//')"
  if [ "$now" != "$want" ]; then
    old_owner=${now% *}
    old_mode=${now#* }
    chown "$2" "$1"
    chmod "$3" "$1"
    undo_push "chown $old_owner $(q "$1"); chmod $old_mode $(q "$1")"
    changed "set $1 to $2, mode $3 (was $now)"
  fi
}

write_config() {
  if [ -e "$CONF" ]; then
    ensure_owner_mode "$CONF" "root:$USER_NAME" 0640
    # `url = "X"`, or X among the replicas of a one-line `urls = [...]`.
    if [ -n "$CONTROLLER" ] \
        && ! grep -E '^[[:space:]]*urls?[[:space:]]*=' "$CONF" | grep -qF "\"$CONTROLLER\""; then
      say "note: $CONF exists and is kept as it is; its [controller] url (or urls) does not name $CONTROLLER"
    fi
    return
  fi
  {
    echo "# /etc/slipway/agent.toml — the apps this droplet runs (written by"
    echo "# install.sh; edit freely, install.sh never rewrites it). All keys:"
    echo "# packaging/agent.toml.example in the Slipway repository."
    if [ -n "$CONTROLLER" ]; then
      echo
      echo "[controller]"
      echo "url = \"$CONTROLLER\""
      echo "state_dir = \"$STATE_DIR\""
    fi
    printf '%s' "$APPS" | while IFS= read -r app; do
      [ -n "$app" ] || continue
      echo
      echo "[apps.${app%%=*}]"
      echo "root = \"${app#*=}\""
    done
  } > "$TMP/agent.toml"
  install -m 0640 -o root -g "$USER_NAME" "$TMP/agent.toml" "$CONF"
  undo_push "rm -f $(q "$CONF")"
  changed "wrote $CONF"
}

# The app roots named in agent.toml (its `root = "…"` lines).
config_roots() {
  [ -f "$CONF" ] || return 0
  sed -n 's/^[[:space:]]*root[[:space:]]*=[[:space:]]*"\(\/[^"]*\)".*/\1/p' "$CONF"
}

install_binary() {
  if [ -f "$BIN" ]; then
    if [ "$(file_sha "$BIN")" = "$NEW_SHA" ]; then return; fi
    say "note: $BIN is a different build ($("$BIN" --version 2>/dev/null || echo unknown)); kept (replace it with --upgrade)"
    return
  fi
  place_binary
  undo_push "rm -f $(q "$BIN")"
  changed "installed $BIN ($NEW_VERSION)"
}

install_unit() {
  unit_text > "$TMP/unit"
  if [ -f "$UNIT" ] && cmp -s "$TMP/unit" "$UNIT"; then :; else
    if [ -f "$UNIT" ]; then
      cp -p "$UNIT" "$TMP/unit.before"
      undo_push "cp -p $(q "$TMP/unit.before") $(q "$UNIT")"
      what="updated"
    else
      undo_push "rm -f $(q "$UNIT")"
      what="installed"
    fi
    install -m 0644 -o root -g root "$TMP/unit" "$UNIT"
    changed "$what $UNIT"
    if [ "$SYSTEMD_RUNNING" = 1 ]; then systemctl daemon-reload; fi
  fi
  if ! systemctl is-enabled --quiet slipway-agent.service 2>/dev/null; then
    systemctl enable --quiet slipway-agent.service 2>"$TMP/enable.err" \
      || die "systemctl enable slipway-agent failed: $(cat "$TMP/enable.err")"
    undo_push "systemctl disable --quiet slipway-agent.service"
    changed "enabled slipway-agent.service (starts at boot)"
  fi
}

enrolled() { [ -s "$STATE_DIR/node.pem" ] && [ -s "$STATE_DIR/node.key" ]; }

enroll() {
  [ -n "$CONTROLLER" ] || return 0
  if enrolled; then return 0; fi
  [ -n "$TOKEN" ] || die "not enrolled yet and no --token: make one with 'slipway-controller token create' and pass --token"
  # Identity files of a failed enrollment must not stay behind.
  for f in node.key node.pem ca.pem node-id; do
    [ -e "$STATE_DIR/$f" ] || undo_push "rm -f $(q "$STATE_DIR/$f")"
  done
  set -- enroll --controller "$CONTROLLER" --state-dir "$STATE_DIR"
  [ -z "$NODE_NAME" ] || set -- "$@" --name "$NODE_NAME"
  # The token through the environment: `ps` shows command lines.
  if ! out=$(SLIPWAY_JOIN_TOKEN=$TOKEN "$BIN" "$@" 2>&1); then
    die "enrollment with $CONTROLLER failed: $out"
  fi
  changed "$out"
}

start_agent() {
  if [ "$SYSTEMD_RUNNING" = 0 ]; then
    say "systemd is installed but not running (a chroot or an image build): slipway-agent.service is enabled but could not be started; it starts at the next boot"
    return
  fi
  if systemctl is-active --quiet slipway-agent.service; then
    if [ "$CHANGES" -gt 0 ]; then
      systemctl restart slipway-agent.service || die "slipway-agent.service did not restart: see journalctl -u slipway-agent"
      say "restarted slipway-agent.service"
    fi
    return
  fi
  undo_push "systemctl stop slipway-agent.service"
  systemctl start slipway-agent.service || die "slipway-agent.service did not start: see journalctl -u slipway-agent"
  changed "started slipway-agent.service"
}

do_install() {
  fetch_binary
  ensure_user
  ensure_dir "$CONF_DIR" "root:$USER_NAME" 0750
  # The node's private key lives here: root only.
  ensure_dir "$STATE_DIR" root:root 0700
  write_config
  for root in $(config_roots); do
    ensure_dir "$root" root:root 0755
  done
  install_binary
  install_unit
  enroll
  start_agent
  if [ "$CHANGES" = 0 ]; then
    say "slipway-agent is already installed and up to date: nothing changed"
  else
    say "done: $CHANGES change(s)"
  fi
  echo
  echo "next:"
  [ -n "$CONTROLLER" ] || echo "  - add [controller] to $CONF and enroll: $BIN enroll --controller HOST:7443 --token slw1.…"
  echo "  - declare your apps in $CONF (all keys: packaging/agent.toml.example), then: systemctl restart slipway-agent"
  echo "  - status: systemctl status slipway-agent; logs: journalctl -u slipway-agent -f"
  [ -z "$CONTROLLER" ] || echo "  - from CI or your laptop: slipway nodes (this node reports to $CONTROLLER)"
}

do_upgrade() {
  [ -f "$BIN" ] || die "$BIN is not installed; run without --upgrade first"
  fetch_binary
  if [ "$(file_sha "$BIN")" = "$NEW_SHA" ]; then
    say "$BIN is already this build ($NEW_VERSION): nothing changed"
    return
  fi
  old_version=$("$BIN" --version 2>/dev/null || echo unknown)
  if [ -f "$BIN.old" ]; then
    cp -p "$BIN.old" "$TMP/previous.old"
    undo_push "mv -f $(q "$TMP/previous.old") $(q "$BIN.old")"
  else
    undo_push "rm -f $(q "$BIN.old")"
  fi
  cp -p "$BIN" "$BIN.old"
  # Undo: the old binary back in place with one rename, the agent restarted.
  undo_push "cp -p $(q "$BIN.old") $(q "$BIN.back") && mv -f $(q "$BIN.back") $(q "$BIN")$( [ "$SYSTEMD_RUNNING" = 0 ] || echo "; systemctl try-restart slipway-agent.service")"
  place_binary
  changed "replaced $BIN: $old_version -> $NEW_VERSION (the old one is $BIN.old)"
  if [ "$SYSTEMD_RUNNING" = 1 ] && systemctl is-active --quiet slipway-agent.service; then
    systemctl restart slipway-agent.service || die "the new agent did not start: see journalctl -u slipway-agent"
    say "restarted slipway-agent.service"
  elif [ "$SYSTEMD_RUNNING" = 0 ]; then
    say "systemd is not running: the new binary runs at the next start of slipway-agent.service"
  fi
}

do_uninstall() {
  # Read before anything goes: with --purge the app roots are removed too.
  roots=$(config_roots)
  removed=0
  if [ -f "$UNIT" ] || systemctl is-enabled --quiet slipway-agent.service 2>/dev/null; then
    if [ "$SYSTEMD_RUNNING" = 1 ]; then
      systemctl stop slipway-agent.service 2>/dev/null || true
    fi
    systemctl disable --quiet slipway-agent.service 2>/dev/null || true
  fi
  if [ -f "$UNIT" ]; then
    rm -f "$UNIT"
    [ "$SYSTEMD_RUNNING" = 0 ] || systemctl daemon-reload
    say "removed slipway-agent.service ($UNIT)"; removed=1
  fi
  for f in "$BIN" "$BIN.old"; do
    if [ -f "$f" ]; then rm -f "$f"; say "removed $f"; removed=1; fi
  done
  if package_installed slipway-controller; then
    say "kept user $USER_NAME: the slipway-controller package runs as it"
  elif getent passwd "$USER_NAME" >/dev/null 2>&1; then
    userdel "$USER_NAME"
    getent group "$USER_NAME" >/dev/null 2>&1 && groupdel "$USER_NAME"
    say "removed user $USER_NAME"; removed=1
  fi
  if [ "$PURGE" = 1 ]; then
    for d in $roots "$STATE_DIR" "$CONF_DIR"; do
      case "$d" in
        /|/bin|/boot|/dev|/etc|/home|/lib|/lib64|/media|/mnt|/opt|/proc|/root|/run|/sbin|/srv|/sys|/tmp|/usr|/usr/*bin|/usr/lib|/usr/local|/var|/var/lib|/var/log)
          say "not purging $d: a system directory (agent.toml names it as an app root)"; continue ;;
      esac
      if [ -e "$d" ]; then rm -rf "$d"; say "purged $d"; removed=1; fi
    done
  else
    # Its group is gone with the user: the kept configuration stays readable by root.
    if [ -e "$CONF_DIR" ] && ! getent group "$USER_NAME" >/dev/null 2>&1; then
      chgrp -R root "$CONF_DIR"
    fi
    kept=""
    for d in "$CONF_DIR" "$STATE_DIR" $roots; do [ ! -e "$d" ] || kept="$kept $d"; done
    [ -z "$kept" ] || say "kept:$kept (remove with --uninstall --purge)"
  fi
  if [ "$removed" = 0 ]; then
    say "slipway-agent is not installed: nothing changed"
  fi
}

case "$MODE" in
  install) do_install ;;
  upgrade) do_upgrade ;;
  uninstall) do_uninstall ;;
esac
