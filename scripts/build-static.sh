#!/usr/bin/env bash
# Builds statically linked x86_64 binaries of the agent, the controller and
# the `slipway` CLI, and writes them with a SHA256SUMS file to one folder.
#
#   scripts/build-static.sh [--profile dev|release|dist] [--out DIR] [--libc gnu|musl]
#
# Defaults: --profile dist (what ships), --out target/static/<profile>,
# --libc musl when the x86_64-unknown-linux-musl target is installed, else gnu
# (glibc linked statically with +crt-static). The target is always given
# explicitly, so build scripts and proc macros stay dynamic host binaries and
# only what ships is static.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=dist
out=""
libc=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=${2:?--profile needs a value}; shift 2 ;;
    --out) out=${2:?--out needs a value}; shift 2 ;;
    --libc) libc=${2:?--libc needs a value}; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "build-static.sh: unknown argument '$1' (see --help)" >&2; exit 64 ;;
  esac
done
case "$profile" in dev|release|dist) ;; *) echo "build-static.sh: --profile must be dev, release or dist, not '$profile'" >&2; exit 64 ;; esac
if [ -z "$libc" ]; then
  if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then libc=musl; else libc=gnu; fi
fi
case "$libc" in
  gnu) target=x86_64-unknown-linux-gnu ;;
  musl) target=x86_64-unknown-linux-musl ;;
  *) echo "build-static.sh: --libc must be gnu or musl, not '$libc'" >&2; exit 64 ;;
esac
[ "$(uname -m)" = x86_64 ] || { echo "build-static.sh: builds x86_64 binaries on an x86_64 host only (this is $(uname -m))" >&2; exit 1; }

# With an explicit --target, RUSTFLAGS apply to the target's crates only.
# relocation-model=static: a plain static executable ("statically linked"
# to file(1), "not a dynamic executable" to ldd), not a static-pie.
export RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static -C relocation-model=static"
# A separate target dir keeps these flags from invalidating the normal build.
export CARGO_TARGET_DIR="${SLIPWAY_STATIC_TARGET_DIR:-$PWD/target/static-build}"
echo "building static $libc binaries (profile $profile, target $target) ..."
cargo build --locked --profile "$profile" --target "$target" \
  -p slipway-agent -p slipway-controller --bins

case "$profile" in dev) dir=debug ;; *) dir=$profile ;; esac
src="$CARGO_TARGET_DIR/$target/$dir"
out=${out:-target/static/$profile}
mkdir -p "$out"
for b in slipway-agent slipway-controller slipway; do
  install -m 0755 "$src/$b" "$out/$b.tmp"
  mv -f "$out/$b.tmp" "$out/$b"
done
(cd "$out" && sha256sum slipway-agent slipway-controller slipway > SHA256SUMS.tmp && mv -f SHA256SUMS.tmp SHA256SUMS)
for b in slipway-agent slipway-controller slipway; do
  linkage=$(LC_ALL=C ldd "$out/$b" 2>&1 || true)
  case "$linkage" in
    *"not a dynamic executable"*) ;;
    *) echo "build-static.sh: $out/$b is not a static executable: $linkage" >&2; exit 1 ;;
  esac
done
echo "static binaries in $out:"
(cd "$out" && ls -l slipway-agent slipway-controller slipway && cat SHA256SUMS)
