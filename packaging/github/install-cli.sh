#!/usr/bin/env bash
# Step 1 of the Slipway deploy action (action.yml): puts the `slipway` CLI on
# PATH. A `slipway` already on PATH is used as it is; otherwise SLIPWAY_CLI_URL
# (with `{version}` replaced by SLIPWAY_CLI_VERSION) is downloaded over https,
# checked against SLIPWAY_CLI_SHA256 when given, and added to GITHUB_PATH.
set -euo pipefail

url=${SLIPWAY_CLI_URL:-}
version=${SLIPWAY_CLI_VERSION:-}
want_sha=${SLIPWAY_CLI_SHA256:-}

if [ -z "$url" ]; then
  if command -v slipway >/dev/null 2>&1; then
    echo "using $(command -v slipway): $(slipway --version)"
    exit 0
  fi
  echo "::error title=slipway CLI::slipway is not on PATH: give the action's cli-url (and cli-sha256)" >&2
  exit 1
fi
url=${url//\{version\}/$version}
case "$url" in
  https://*) ;;
  *)
    echo "::error title=slipway CLI::cli-url must be an https:// URL, not ${url}" >&2
    exit 1
    ;;
esac

dir="${RUNNER_TEMP:-${TMPDIR:-/tmp}}/slipway-cli"
mkdir -p "$dir"
tmp="$dir/slipway.download"
curl --fail --silent --show-error --location --proto '=https' --retry 3 \
  --max-time 300 --output "$tmp" "$url"
if [ -n "$want_sha" ]; then
  got_sha=$(sha256sum "$tmp" | cut -d' ' -f1)
  if [ "$got_sha" != "${want_sha,,}" ]; then
    rm -f "$tmp"
    echo "::error title=slipway CLI::${url} has sha256 ${got_sha}, cli-sha256 says ${want_sha}" >&2
    exit 1
  fi
fi
chmod 0755 "$tmp"
mv "$tmp" "$dir/slipway"
echo "$dir" >>"${GITHUB_PATH:?GITHUB_PATH is not set: run this in a GitHub Actions job}"
echo "installed $("$dir/slipway" --version) from ${url}"
