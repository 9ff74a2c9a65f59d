#!/usr/bin/env bash
# Every loadgen preset against a real nats-server and jetinfer-worker on this
# machine, shortened so the whole sweep takes a few minutes; figures for
# docs/benchmarks.md. One backend per call:
#
#   scripts/bench-scenarios.sh echo     # the queue's own cost
#   scripts/bench-scenarios.sh candle   # all-MiniLM-L6-v2 on CPU
#
# Reports land in target/loadgen/<backend>/<scenario>/ (report.html etc.),
# each with the worker's own figures (batch size, queue wait, padding waste)
# scraped from its /metrics before and after the run.
# PROFILE=release uses release builds (default: the dev profile, whose
# dependencies, candle included, are built at -O3 anyway).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
. scripts/lib.sh
backend=${1:-echo}
profile=${PROFILE:-dev}
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
secs=${BENCH_SECONDS:-15}

bash scripts/setup.sh
cargo build --profile "$profile" -p jetinfer-worker -p jetinfer-loadgen >&2
export JETINFER_MODEL__BACKEND=$backend JETINFER_MODEL__PATH="$root/.cache/models/all-MiniLM-L6-v2"
nats_pid= worker_pid= store=
stop() {
  [ -n "$worker_pid" ] && kill "$worker_pid" 2>/dev/null && wait "$worker_pid" 2>/dev/null || true
  [ -n "$nats_pid" ] && kill "$nats_pid" 2>/dev/null && wait "$nats_pid" 2>/dev/null || true
  [ -n "$store" ] && rm -rf "$store"
  nats_pid= worker_pid= store=
}
trap stop EXIT
# A fresh server and worker per scenario: jobs an overloaded run left queued
# (timed out on the client, still in the stream) must not slow the next one.
start() {
  port=$(free_port)
  http_port=$(free_port)
  store=$(mktemp -d)
  start_nats "$port" "$store" /dev/null
  nats_pid=$!
  sleep 1
  JETINFER_NATS__URLS="[\"nats://127.0.0.1:$port\"]" JETINFER_HTTP__ADDR="127.0.0.1:$http_port" \
    "target/$dir/jetinfer-worker" >/dev/null 2>&1 &
  worker_pid=$!
  # Ready: connected, model loaded, consumer bound (at most a minute).
  python3 - "$http_port" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/readyz"
for _ in range(600):
    try:
        if urllib.request.urlopen(url, timeout=1).status == 200:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(f"worker not ready at {url}")
PY
}

if [ "$backend" = echo ]; then bulk_jobs=3000; else bulk_jobs=300; fi
only=${SCENARIOS:-}   # e.g. SCENARIOS="soak bulk" runs just those labels
run() { # label, scenario, extra args...
  local label=$1 name=$2; shift 2
  if [ -n "$only" ] && [[ " $only " != *" $label "* ]]; then return; fi
  start
  echo "== $backend $label: jetinfer-loadgen run -s $name $* --nats-url nats://127.0.0.1:PORT"
  "target/$dir/jetinfer-loadgen" run -s "$name" --nats-url "nats://127.0.0.1:$port" -q \
    --metrics-url "http://127.0.0.1:$http_port/metrics" \
    --out "target/loadgen/$backend/$label" "$@" || true
  stop
}
run warm-up warm-up
run light light --duration "${secs}s"
run medium medium --duration "${secs}s"
run heavy heavy --duration "${secs}s"
run spike spike
run soak soak --duration "${secs}s"
run bulk bulk --max-jobs "$bulk_jobs"
run open-2 light --rate 2 --duration "${secs}s"
