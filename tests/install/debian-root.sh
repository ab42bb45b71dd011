#!/bin/sh
# Builds (once) a minimal Debian 12 root with debootstrap and keeps it as a
# tarball, the chroot the install tests (tests/it/install.rs) copy for each
# test. A second call finds the tarball and returns at once.
#
#   tests/install/debian-root.sh [TARBALL]
#
# TARBALL defaults to $SLIPWAY_DEBIAN_ROOT, else
# ${XDG_CACHE_HOME:-$HOME/.cache}/slipway/debian-12-root.tar: once per
# machine, not per clone (CI runs on a fresh clone). The mirror is $SLIPWAY_DEBIAN_MIRROR, else the first Debian
# URI of this machine's apt sources, else http://deb.debian.org/debian.
# Needs root and debootstrap (scripts/test.sh installs it).
set -eu
cd "$(dirname "$0")/../.."
out=${1:-${SLIPWAY_DEBIAN_ROOT:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/slipway/debian-12-root.tar}}
[ -f "$out" ] && exit 0
mkdir -p "$(dirname "$out")"
# Tests running at once build it once: the others wait here, then find it.
exec 9>"$out.lock"
flock 9
[ -f "$out" ] && exit 0

die() { echo "debian-root.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (debootstrap and chroot)"
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install --no-install-recommends debootstrap"

mirror=${SLIPWAY_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | awk '/^URIs:/ && $2 ~ /\/debian\/?$/ { print $2; exit }')
fi
if [ -z "$mirror" ]; then
  mirror=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

work=$(mktemp -d "$(dirname "$out")/root.XXXXXX")
trap 'rm -rf "$work"' EXIT
log="$(dirname "$out")/debootstrap.log"
echo "debootstrap: building a Debian 12 root from $mirror (log: $log) ..."
# systemd: systemctl and the unit directories (not running as PID 1 in a
# chroot); curl: install.sh's --url path; ca-certificates: HTTPS; passwd
# (useradd) and dpkg come with minbase.
if ! debootstrap --variant=minbase --include=systemd,ca-certificates,curl \
  bookworm "$work/root" "$mirror" >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  die "debootstrap failed (full log: $log)"
fi
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
tar -C "$work/root" --numeric-owner -cf "$out.tmp" .
mv -f "$out.tmp" "$out"
echo "debootstrap: root cached in $out ($(du -h "$out" | cut -f1))"
