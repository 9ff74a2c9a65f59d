#!/usr/bin/env bash
# Every loadgen preset against a real nats-server and jetinfer-worker on this
# machine, shortened so the whole sweep takes a few minutes; figures for
# docs/benchmarks.md. One backend per call:
#
#   scripts/bench-scenarios.sh echo     # the queue's own cost
#   scripts/bench-scenarios.sh candle   # all-MiniLM-L6-v2 on CPU
#
# Reports land in target/loadgen/<backend>/<scenario>/ (report.html etc.).
# PROFILE=release uses release builds (default: the dev profile, whose
# dependencies, candle included, are built at -O3 anyway).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
backend=${1:-echo}
profile=${PROFILE:-dev}
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
secs=${BENCH_SECONDS:-15}

bash scripts/setup.sh
cargo build --profile "$profile" -p jetinfer-worker -p jetinfer-loadgen >&2
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
store=$(mktemp -d)
.cache/bin/nats-server -a 127.0.0.1 -p "$port" -js -sd "$store" >/dev/null 2>&1 &
nats_pid=$!
export JETINFER_NATS__URLS="[\"nats://127.0.0.1:$port\"]" JETINFER_MODEL__BACKEND=$backend \
       JETINFER_MODEL__PATH="$root/.cache/models/all-MiniLM-L6-v2"
sleep 1
"target/$dir/jetinfer-worker" >/dev/null 2>&1 &
worker_pid=$!
trap 'kill $worker_pid $nats_pid 2>/dev/null; rm -rf "$store"' EXIT
sleep 3

if [ "$backend" = echo ]; then bulk_jobs=3000; else bulk_jobs=300; fi
run() { # label, scenario, extra args...
  local label=$1 name=$2; shift 2
  echo "== $backend $label: jetinfer-loadgen run -s $name $* --nats-url nats://127.0.0.1:PORT"
  "target/$dir/jetinfer-loadgen" run -s "$name" --nats-url "nats://127.0.0.1:$port" -q \
    --out "target/loadgen/$backend/$label" "$@" || true
}
run warm-up warm-up
run light light --duration "${secs}s"
run medium medium --duration "${secs}s"
run heavy heavy --duration "${secs}s"
run spike spike
run soak soak --duration "${secs}s"
run bulk bulk --max-jobs "$bulk_jobs"
run open-2 light --rate 2 --duration "${secs}s"
