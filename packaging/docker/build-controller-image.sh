#!/usr/bin/env bash
# Builds the controller's container image (packaging/docker/Dockerfile.controller,
# FROM scratch) from a static binary of scripts/build-static.sh.
#
#   packaging/docker/build-controller-image.sh [--profile dev|release|dist] [--tag TAG]
#
# Defaults: --profile dist, --tag slipway-controller:<version>. The binary
# must exist: target/static/<profile>/slipway-controller.
set -euo pipefail
cd "$(dirname "$0")/../.."

profile=dist
tag=""
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=${2:?--profile needs a value}; shift 2 ;;
    --tag) tag=${2:?--tag needs a value}; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "build-controller-image.sh: unknown argument '$1' (see --help)" >&2; exit 64 ;;
  esac
done
binary="target/static/$profile/slipway-controller"
[ -x "$binary" ] || { echo "build-controller-image.sh: $binary is missing: run scripts/build-static.sh --profile $profile first" >&2; exit 1; }
case "$(LC_ALL=C ldd "$binary" 2>&1 || true)" in
  *"not a dynamic executable"*) ;;
  *) echo "build-controller-image.sh: $binary is not statically linked; a FROM scratch image needs a static binary" >&2; exit 1 ;;
esac
if [ -z "$tag" ]; then
  version=$("$binary" --version | awk '{print $2}')
  tag="slipway-controller:$version"
fi

context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp packaging/docker/Dockerfile.controller packaging/docker/passwd packaging/docker/group "$context/"
cp "$binary" "$context/slipway-controller"
mkdir -m 0700 "$context/data"
docker build --quiet -f "$context/Dockerfile.controller" -t "$tag" "$context" >/dev/null
echo "$tag"
