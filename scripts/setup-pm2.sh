#!/usr/bin/env bash
# Makes sure PM2 is on PATH for the PM2 driver tests, then prints its version.
# Safe to run again: an existing pm2 is left as it is.
#
# Environment:
#   SLIPWAY_PM2_VERSION   npm version spec installed when pm2 is missing
#                         (default: the major the driver is tested against)
set -euo pipefail

# The driver reads `pm2 jlist` and relies on `startOrReload --update-env`;
# a pinned major keeps a fresh CI machine on the behaviour the tests know.
PM2_VERSION="${SLIPWAY_PM2_VERSION:-7}"

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "setup-pm2: node and npm are required (node 20 or later)" >&2
  exit 1
fi

if ! command -v pm2 >/dev/null; then
  echo "setup-pm2: installing pm2@${PM2_VERSION} with npm"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  # --no-fund/--no-audit: no network chatter beyond the install itself.
  $SUDO npm install -g --no-fund --no-audit "pm2@${PM2_VERSION}"
  # npm's global bin dir may not be on PATH (custom prefix). Exporting it
  # here would not reach the tests (this script runs in its own shell).
  command -v pm2 >/dev/null || {
    echo "setup-pm2: pm2 installed but not on PATH; add $(npm prefix -g)/bin to PATH" >&2
    exit 1
  }
fi

# `pm2 --version` would start a daemon in ~/.pm2 as a side effect; the
# package.json of the installed module says the same without one.
pm2_bin="$(command -v pm2)"
pm2_pkg="$(dirname "$(readlink -f "$pm2_bin")")/../package.json"
if [ -f "$pm2_pkg" ]; then
  version="$(node -p 'require(process.argv[1]).version' "$pm2_pkg")"
else
  version="$(pm2 --version)"
fi
echo "pm2 ${version} at ${pm2_bin}"
