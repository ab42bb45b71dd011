#!/usr/bin/env bash
# The fleet demo — the README's first command. On this machine alone:
#   a controller on SQLite, three agents (each its own root dir and process)
#   enrolled with one-time join tokens over mTLS, a push deploy of a sample
#   web app to all three, a rolling deploy one node at a time, a broken
#   release sent to one node that its health gate rolls back, a node-local
#   rollback, and the fleet view.
# Everything is stopped at the end; the files stay in the printed directory.
#
# Environment:
#   SLIPWAY_BIN_DIR   use these binaries instead of building target/debug
#   SLIPWAY_DEMO_DIR  work here (default: a new temp dir)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${SLIPWAY_BIN_DIR:-}" ]; then
  # The dev profile: the quickest build from nothing (the demo needs no
  # optimised code), and the one `cargo build` and the tests share. Shipped
  # binaries are `cargo build --profile dist` (README, "Build profiles").
  echo "building (cargo build; about 2-3 min from nothing on 2 cores) ..."
  cargo build --workspace --bins -q
  BIN="$PWD/target/debug"
else
  BIN="$(cd "$SLIPWAY_BIN_DIR" && pwd)"
fi
command -v python3 >/dev/null || { echo "the demo app needs python3" >&2; exit 1; }

DIR="${SLIPWAY_DEMO_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/slipway-fleet-demo.XXXXXX")}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
say() { printf '\n# %s\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }
# Runs "$@" every 0.2 s until it succeeds; after 20 s the demo fails, naming
# what it waited for.
wait_for() {
  local what=$1; shift
  for _ in $(seq 100); do "$@" && return 0; sleep 0.2; done
  echo "demo: timed out after 20 s waiting for $what" >&2
  exit 1
}
get() { python3 - "$1" <<'PY'
import sys, urllib.request
try:
    print(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/", timeout=3).read().decode().strip())
except Exception as e:
    print(f"(no answer: {e})")
PY
}

PIDS=()
NODES=(n1 n2 n3)
cleanup() {
  for n in "${NODES[@]}"; do
    if [ -f "$DIR/$n/agent.toml" ]; then
      "$BIN/slipway-agent" --config "$DIR/$n/agent.toml" stop --app web >/dev/null 2>&1 || true
    fi
  done
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

say "a controller on SQLite (CA and server certificate made on first start)"
CPORT=$(free_port)
"$BIN/slipway-controller" serve --data-dir "$DIR/controller" --listen "127.0.0.1:$CPORT" 2>"$DIR/controller.log" &
PIDS+=($!)
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$CPORT") 2>/dev/null; }
wait_for "the controller to listen on 127.0.0.1:$CPORT" listening
echo "controller on 127.0.0.1:$CPORT (log: $DIR/controller.log)"

say "three droplets: enroll each with a one-time token, then start its agent"
declare -A APORT
for n in "${NODES[@]}"; do
  APORT[$n]=$(free_port)
  mkdir -p "$DIR/$n/app/shared"
  echo "PORT=${APORT[$n]}" > "$DIR/$n/app/shared/.env"
  cat > "$DIR/$n/agent.toml" <<EOF
[controller]
url = "127.0.0.1:$CPORT"
state_dir = "$DIR/$n/state"

[apps.web]
root = "$DIR/$n/app"
shared_files = [".env"]

[apps.web.run]
driver = "exec"
command = ["python3", "server.py"]
stop_grace = "2s"

[apps.web.health]
check = "http"
url = "http://127.0.0.1:${APORT[$n]}/api/health"
interval = "200ms"
successes = 3
start_period = "1s"
deadline = "15s"
liveness_interval = "2s"
EOF
  TOKEN=$("$BIN/slipway-controller" token create --ttl 10m --tag env:demo --data-dir "$DIR/controller")
  echo "\$ slipway-agent --config $DIR/$n/agent.toml enroll --controller 127.0.0.1:$CPORT --token ${TOKEN:0:14}… --state-dir $DIR/$n/state --name $n"
  "$BIN/slipway-agent" --config "$DIR/$n/agent.toml" enroll --controller "127.0.0.1:$CPORT" \
    --token "$TOKEN" --state-dir "$DIR/$n/state" --name "$n"
  "$BIN/slipway-agent" --config "$DIR/$n/agent.toml" run 2>"$DIR/$n/agent.log" &
  PIDS+=($!)
done

say "the sample app (tests/fixtures/server.py): v1 and v2, and a v3 whose /api/health answers 500"
for v in v1 v2 v3; do
  mkdir -p "$DIR/src/$v"
  cp tests/fixtures/server.py "$DIR/src/$v/"
  echo "hello from $v" > "$DIR/src/$v/VERSION"
  if [ "$v" = v3 ]; then echo 500 > "$DIR/src/$v/HEALTH"; fi
  "$BIN/slipway-agent" pack --dir "$DIR/src/$v" --out "$DIR/web-$v.tar.gz" >/dev/null
done
sha() { sha256sum "$1" | cut -d' ' -f1; }

export SLIPWAY_CONTROLLER="127.0.0.1:$CPORT" SLIPWAY_CA="$DIR/controller/ca.pem"
SLIPWAY_TOKEN=$("$BIN/slipway-controller" token api --scope deploy:web --data-dir "$DIR/controller")
export SLIPWAY_TOKEN
all_online() {
  [ "$("$BIN/slipway" nodes --json | python3 -c 'import json,sys; print(sum(n["state"]=="online" for n in json.load(sys.stdin)))')" = 3 ]
}
wait_for "the three nodes to be online" all_online

say "push deploy from CI: upload once, every node fetches it over mTLS, health-gated"
show "$BIN/slipway" deploy web "$DIR/web-v1.tar.gz" --sha "$(sha "$DIR/web-v1.tar.gz")" --id v1 --wait
for n in "${NODES[@]}"; do echo "$n: $(get "${APORT[$n]}")"; done
say "a rolling deploy of v2, one node at a time (a failure would stop it and roll back)"
show "$BIN/slipway" deploy web "$DIR/web-v2.tar.gz" --sha "$(sha "$DIR/web-v2.tar.gz")" --id v2 \
  --strategy rolling --max-parallel 1 --wait

say "a bad release to n2: its health gate fails and n2 rolls back by itself"
if show "$BIN/slipway" deploy web "$DIR/web-v3.tar.gz" --sha "$(sha "$DIR/web-v3.tar.gz")" --id v3 --node n2 --wait; then
  echo "expected the deploy of v3 to fail" >&2; exit 1
fi
for n in "${NODES[@]}"; do echo "$n: $(get "${APORT[$n]}")"; done

say "an emergency rollback on n3 alone, as an operator on the droplet would"
show "$BIN/slipway-agent" --config "$DIR/n3/agent.toml" rollback --app web
echo "n3: $(get "${APORT[n3]}")"

# The fleet view is as fresh as each node's last heartbeat (every 5 s here):
# wait until it shows n3's local rollback and the others settled.
settled() {
  "$BIN/slipway" releases web --json | python3 -c '
import json, sys
want = {"n1": "v2", "n2": "v2", "n3": "v1"}
rows = json.load(sys.stdin)
ok = len(rows) == 3 and all(want[r["node"]] == r["current_release"] and r["health"] == "healthy" for r in rows)
sys.exit(0 if ok else 1)'
}
wait_for "the fleet view to show v2 on n1 and n2, v1 on n3, all healthy" settled
say "fleet health"
show "$BIN/slipway" status --refresh
echo "(the three \"droplets\" share this machine: they report the same CPU, memory and load)"
show "$BIN/slipway" nodes
say "releases per node: n3's v2 is bad, marked by its local rollback (who, when)"
show "$BIN/slipway" releases web
say "the audit log: the controller's deploys and n3's local rollback (NODE_LOCAL_ROLLBACK)"
show "$BIN/slipway" audit --since 1h
echo
echo "Everything is in $DIR (stopped now)."
