#!/usr/bin/env bash
# Two models in one jetinfer-worker sharing the cores: one flooded, the
# other's latency measured (docs/benchmarks.md, "Several models per worker").
# Both models are all-MiniLM-L6-v2 under two names (`quiet`, `flood`), so
# each has its own consumer, batcher and inference thread.
#
#   scripts/bench-multi.sh
#
# Phase 1 (alone): `quiet` gets single-text jobs at QUIET_RATE jobs/s (open
# loop) while `flood` is idle. Phase 2 (flooded): `flood` gets FLOOD_USERS
# closed-loop users sending 16-64-text jobs with no think time, and `quiet`
# the same open-loop load as in phase 1. A fresh server and worker per
# phase. FLOOD_MAX_TOKENS sets the flooded model's own batch.max_tokens
# (default: [batch]'s 2048), which bounds how long one of its batches holds
# the cores. Reports in target/loadgen/multi/<phase>-<model>/.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
. scripts/lib.sh
profile=${PROFILE:-dev}
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
target=${CARGO_TARGET_DIR:-target}
secs=${BENCH_SECONDS:-30}
quiet_rate=${QUIET_RATE:-2}
flood_users=${FLOOD_USERS:-16}
flood_max_tokens=${FLOOD_MAX_TOKENS:-2048}
out=target/loadgen/multi

bash scripts/setup.sh >&2
cargo build --profile "$profile" -p jetinfer-worker -p jetinfer-loadgen >&2
config=$(mktemp)
cat >"$config" <<EOF
[model]
path = "$root/.cache/models/all-MiniLM-L6-v2"

[[models]]
name = "quiet"

[[models]]
name = "flood"
batch = { max_tokens = $flood_max_tokens }
EOF
nats_pid= worker_pid= store=
stop() {
  [ -n "$worker_pid" ] && kill "$worker_pid" 2>/dev/null && wait "$worker_pid" 2>/dev/null || true
  [ -n "$nats_pid" ] && kill "$nats_pid" 2>/dev/null && wait "$nats_pid" 2>/dev/null || true
  [ -n "$store" ] && rm -rf "$store"
  nats_pid= worker_pid= store=
}
trap 'stop; rm -f "$config"' EXIT
start() {
  port=$(free_port)
  http_port=$(free_port)
  store=$(mktemp -d)
  start_nats "$port" "$store" /dev/null
  nats_pid=$!
  sleep 1
  JETINFER_NATS__URLS="[\"nats://127.0.0.1:$port\"]" JETINFER_HTTP__ADDR="127.0.0.1:$http_port" \
    "$target/$dir/jetinfer-worker" --config "$config" >/dev/null 2>&1 &
  worker_pid=$!
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
loadgen() { # label, model, args...
  local label=$1 model=$2; shift 2
  "$target/$dir/jetinfer-loadgen" run --nats-url "nats://127.0.0.1:$port" -q \
    --model "$model" --out "$out/$label-$model" "$@" >/dev/null
}
quiet() { # label
  loadgen "$1" quiet -s light --rate "$quiet_rate" --duration "${secs}s" --mix single=1,small=0,large=0 --seed 7
}
flood() { # label, seconds
  loadgen "$1" flood -s bulk --users "$flood_users" --max-jobs 1000000 \
    --duration "${2}s" --mix single=0,small=0,large=1 --timeout 120s
}
summary() { # label, model
  python3 - "$out/$1-$2/report.json" "$1" "$2" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))["summary"]
l = s["latency"]
print(f"| {sys.argv[2]} | {sys.argv[3]} | {s['jobs_ok']}/{s['jobs_sent']} | {s['jobs_per_s']:.1f} | "
      f"{s['inputs_per_s']:.1f} | {l['p50_ms']:.1f} | {l['p95_ms']:.1f} | {l['p99_ms']:.1f} | {l['max_ms']:.1f} |")
PY
}

echo "flood batch.max_tokens = $flood_max_tokens, $flood_users flood users, quiet $quiet_rate jobs/s"
echo "load before: $(uptime)"
start
loadgen warm quiet -s warm-up --mix single=1,small=0,large=0 >/dev/null || true
quiet alone
stop

start
loadgen warm quiet -s warm-up --mix single=1,small=0,large=0 >/dev/null || true
flood flooded $((secs + 10)) &
flood_pid=$!
sleep 5
quiet flooded
wait "$flood_pid"
stop
echo "load after: $(uptime)"

echo "| phase | model | jobs ok/sent | jobs/s | inputs/s | p50 ms | p95 ms | p99 ms | max ms |"
echo "|---|---|---|---|---|---|---|---|---|"
summary alone quiet
summary flooded quiet
summary flooded flood
