#!/usr/bin/env bash
# Installs the monitoring tools the checks and tests use, from the Debian
# packages, only when missing: `prometheus` (prometheus, promtool) and
# `prometheus-alertmanager` (amtool and the daemon, which Debian installs as
# /usr/bin/prometheus-alertmanager; upstream calls it alertmanager). Needs root (or sudo);
# non-interactive. Called by scripts/test.sh.
set -euo pipefail

missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
{ command -v prometheus-alertmanager || command -v alertmanager; } >/dev/null && command -v amtool >/dev/null \
  || missing+=(prometheus-alertmanager)
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=()
[ "$(id -u)" -eq 0 ] || sudo=(sudo)
echo "deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
