#!/usr/bin/env bash
# Makes sure a Docker engine answers on /var/run/docker.sock for the Docker
# driver tests, then prints its version. Safe to run again: installed packages
# and a running engine are left as they are.
#
# Installs (Debian packages, only when missing):
#   docker.io        the engine (dockerd, containerd, runc) and the CLI
#   busybox-static   a static /bin/busybox the tests put in their scratch
#                    images: Docker Hub is not reachable, nothing is pulled
#
# Environment:
#   SLIPWAY_DOCKER_WAIT   seconds to wait for the engine (default 60)
set -euo pipefail

WAIT_SECS="${SLIPWAY_DOCKER_WAIT:-60}"
SOCKET=/var/run/docker.sock

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi

# --- packages ----------------------------------------------------------------
need_apt=()
# Any engine already on PATH (docker-ce, a previous run) is used as it is:
# docker.io would conflict with docker-ce's packages.
command -v dockerd >/dev/null || need_apt+=(docker.io)
# Without recommended packages, AppArmor's parser comes only where the kernel
# enforces AppArmor (dockerd loads its container profile with it there).
if [ -e /sys/kernel/security/apparmor ] && ! command -v apparmor_parser >/dev/null; then
  need_apt+=(apparmor)
fi
# The dynamic `busybox` package is not enough: a scratch image has no libc.
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' ||
  need_apt+=(busybox-static)
if [ ${#need_apt[@]} -gt 0 ]; then
  # No recommended packages (needrestart, criu, apparmor are not needed for
  # the tests); apt's chatter goes to a log file.
  apt_log=$(mktemp -t slipway-apt-docker.XXXXXX.log)
  if { $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${need_apt[@]}"; } >"$apt_log" 2>&1; then
    echo "setup-docker: installed ${need_apt[*]} (apt log: $apt_log)"
  else
    tail -n 20 "$apt_log" >&2
    echo "setup-docker: installing ${need_apt[*]} failed (apt log: $apt_log)" >&2
    exit 1
  fi
fi
command -v dockerd >/dev/null || { echo "setup-docker: dockerd not on PATH after install" >&2; exit 1; }
command -v docker >/dev/null || { echo "setup-docker: docker CLI not on PATH after install" >&2; exit 1; }

# --- engine ------------------------------------------------------------------
engine_up() { $SUDO docker -H "unix://${SOCKET}" info >/dev/null 2>&1; }

if ! engine_up; then
  # A dockerd started a moment ago (another run, the package's init script)
  # may still be coming up: starting a second one would fail on its pid file.
  pid=""
  if [ -s /var/run/docker.pid ]; then pid="$(cat /var/run/docker.pid)"; fi
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    echo "setup-docker: dockerd (pid ${pid}) is starting; waiting for it"
  else
    log_file="$(mktemp /tmp/slipway-dockerd.XXXXXX.log)"
    echo "setup-docker: starting dockerd (log: ${log_file})"
    # No init system on a CI container: run the engine detached from this
    # shell (setsid + nohup) so it outlives the script.
    $SUDO setsid nohup dockerd -H "unix://${SOCKET}" >"$log_file" 2>&1 </dev/null &
  fi
  deadline=$((SECONDS + WAIT_SECS))
  until engine_up; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      echo "setup-docker: the docker engine did not answer on ${SOCKET} within ${WAIT_SECS}s" >&2
      if [ -n "${log_file:-}" ]; then
        echo "--- last lines of ${log_file} ---" >&2
        tail -n 30 "$log_file" >&2 || true
      fi
      exit 1
    fi
    sleep 1
  done
fi

version="$($SUDO docker -H "unix://${SOCKET}" version --format '{{.Server.Version}} (API {{.Server.APIVersion}})')"
echo "docker engine ${version} at ${SOCKET}"
