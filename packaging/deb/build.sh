#!/bin/sh
# Builds slipway-agent and slipway-controller .deb packages from the static
# binaries of scripts/build-static.sh, without compiling again.
#
#   packaging/deb/build.sh [--profile dist|release|dev] [--deb-version V] [--out DIR] [--fast]
#
# Defaults: --profile dist (target/static/dist), the workspace version,
# --out target/debian. --fast: quicker, lighter compression (tests). Needs cargo-deb (cargo install cargo-deb --locked).
# The staged assets (binaries, units with ExecStart in /usr/bin, maintainer
# scripts with common.sh pasted in) go to target/deb-stage/, which the
# [package.metadata.deb] tables of node-agent/ and controller/ point at.
set -eu
cd "$(dirname "$0")/../.."

profile=dist
deb_version=""
out=target/debian
fast=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=${2:?--profile needs a value}; shift 2 ;;
    --deb-version) deb_version=${2:?--deb-version needs a value}; shift 2 ;;
    --out) out=${2:?--out needs a value}; shift 2 ;;
    --fast) fast=--fast; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "deb/build.sh: unknown argument '$1' (see --help)" >&2; exit 64 ;;
  esac
done
die() { echo "deb/build.sh: $*" >&2; exit 1; }
command -v cargo-deb >/dev/null || die "cargo-deb is missing: cargo install cargo-deb --locked"
bins=target/static/$profile
[ -f "$bins/SHA256SUMS" ] || die "no static binaries in $bins: run scripts/build-static.sh --profile $profile"
(cd "$bins" && sha256sum --quiet -c SHA256SUMS) || die "$bins does not match its SHA256SUMS: run scripts/build-static.sh --profile $profile again"

stage=target/deb-stage
rm -rf "$stage"
mkdir -p "$stage/agent" "$stage/controller"
for b in slipway-agent slipway-controller slipway; do install -m 0755 "$bins/$b" "$stage/$b"; done
# One unit file for install.sh and the .deb: the package puts the binaries
# in /usr/bin (Debian policy keeps packages out of /usr/local).
for u in slipway-agent slipway-controller; do
  sed -e 's|/usr/local/bin/|/usr/bin/|g' -e 's| -/usr/local/bin$||' "packaging/systemd/$u.service" > "$stage/$u.service"
done
for pkg in agent controller; do
  for s in postinst prerm postrm; do
    awk 'FNR == NR { common = common $0 "\n"; next }
         $0 == "#COMMON#" { printf "%s", common; next } { print }' \
      packaging/deb/common.sh "packaging/deb/$pkg/$s" > "$stage/$pkg/$s"
    chmod 0755 "$stage/$pkg/$s"
  done
done

mkdir -p "$out"
for p in slipway-agent slipway-controller; do
  set -- --no-build --no-strip -p "$p" --output "$out"
  [ -z "$deb_version" ] || set -- "$@" --deb-version "$deb_version"
  [ -z "$fast" ] || set -- "$@" "$fast"
  # Its output (and a warning per staged asset: they are not built by
  # cargo, which is the point) only when it fails.
  cargo deb "$@" >"$stage/cargo-deb-$p.log" 2>&1 \
    || { cat "$stage/cargo-deb-$p.log" >&2; die "cargo deb -p $p failed"; }
done
ls -1 "$out"/*.deb
