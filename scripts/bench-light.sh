#!/usr/bin/env bash
# Light-load latency against the model's own time, side by side (issue 20,
# goal c): for each SIDE, a directory holding a `jetinfer-worker` and a
# `jetinfer-loadgen` (the loadgen carries the producer's `Client`, so a side
# is both ends), each run on a fresh nats-server and worker, candle backend,
# all-MiniLM-L6-v2, the worker's default config:
#
#   light:    jetinfer-loadgen run -s light --rate 5 --mix single=1,small=0,large=0 --duration 15s
#             (one single-text job every 200 ms) with the worker's inference
#             histogram in the same run: the model's own time at this load
#   b2b:      one user, no think time, single texts (the model warm)
#   bulk:     -s bulk --mix single=1,small=0,large=0 --max-jobs $BULK_JOBS (saturation)
#   breakdown: the light run again on a nats-server tracing every protocol
#             message (-V), read by scripts/light_breakdown.py: where a job's
#             time goes between the client, the server and the worker
#
#   scripts/bench-light.sh before:/tmp/main-release after:target/release
#
# ROUNDS (default 1) repeats every side in turn, so the sides of one round
# share the machine's state. LIGHT_SECONDS (15) and BULK_JOBS (2000) size the
# runs. Prints one table row per side and round, then each side's breakdown.
# Not a test: it asserts nothing.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
. scripts/lib.sh
[ $# -gt 0 ] || { sed -n '2,/^set -e/p' "$0" | sed '$d'; exit 2; }
rounds=${ROUNDS:-1}
secs=${LIGHT_SECONDS:-15}
bulk_jobs=${BULK_JOBS:-2000}
model="$root/.cache/models/all-MiniLM-L6-v2"
[ -d "$model" ] || bash scripts/setup.sh >&2
work=$(mktemp -d)
nats_pid= worker_pid=
stop() {
  [ -n "$worker_pid" ] && kill "$worker_pid" 2>/dev/null && wait "$worker_pid" 2>/dev/null || true
  [ -n "$nats_pid" ] && kill "$nats_pid" 2>/dev/null && wait "$nats_pid" 2>/dev/null || true
  nats_pid= worker_pid=
}
trap 'stop; rm -rf "$work"' EXIT

# start DIR [TRACE_LOG]: a fresh nats-server (tracing into TRACE_LOG if
# given) and DIR's worker, ready.
start() {
  local dir=$1 trace=${2:-}
  port=$(free_port) http_port=$(free_port)
  rm -rf "$work/js" && mkdir -p "$work/js"
  if [ -n "$trace" ]; then
    .cache/bin/nats-server -a 127.0.0.1 -p "$port" -js -sd "$work/js" -V -l "$trace" &
  else
    start_nats "$port" "$work/js" /dev/null
  fi
  nats_pid=$!
  sleep 1
  JETINFER_NATS__URLS="[\"nats://127.0.0.1:$port\"]" JETINFER_HTTP__ADDR="127.0.0.1:$http_port" \
    JETINFER_MODEL__BACKEND=candle JETINFER_MODEL__PATH="$model" \
    "$dir/jetinfer-worker" >"$work/worker.log" 2>&1 &
  worker_pid=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$http_port/readyz" >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "worker of $dir not ready" >&2
  cat "$work/worker.log" >&2
  exit 1
}

# load DIR NAME ARGS...: one loadgen run, its report in $work/NAME.
load() {
  local dir=$1 name=$2
  shift 2
  "$dir/jetinfer-loadgen" run --nats-url "nats://127.0.0.1:$port" -q \
    --metrics-url "http://127.0.0.1:$http_port/metrics" --mix single=1,small=0,large=0 \
    --out "$work/$name" "$@" >"$work/$name.out" 2>&1 || { cat "$work/$name.out" >&2; exit 1; }
}

# field NAME EXPR: a figure from $work/NAME/report.json (python expression
# over `s`, the summary, `infer` and `wait`, the worker's mean inference
# and queue wait in ms).
field() {
  python3 - "$work/$1/report.json" "$2" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
s = r["summary"]
hist = {h["series"].split("{")[0]: h for h in r.get("worker", {}).get("histograms", [])}
mean_ms = lambda name: hist.get(name, {}).get("mean", float("nan")) * 1e3
infer = mean_ms("jetinfer_batch_inference_seconds")
wait = mean_ms("jetinfer_job_queue_wait_seconds")
print(eval(sys.argv[2]))
PY
}

echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores," \
  "flags: $(grep -m1 -o -w 'avx512_bf16\|amx_bf16\|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "load before: $(uptime | sed 's/.*load average/load average/')"
printf '| round | side | light min | light p50 | light p99 | from send p50 | model (inference mean, light) | p50 - model | b2b p50 | model (b2b) | bulk jobs/s | bulk p50 |\n'
printf '|---|---|---|---|---|---|---|---|---|---|---|---|\n'
for round in $(seq "$rounds"); do
  for side in "$@"; do
    label=${side%%:*} dir=${side#*:}
    start "$dir"
    load "$dir" warm -s warm-up
    load "$dir" light -s light --rate 5 --duration "${secs}s"
    load "$dir" b2b -s light --users 1 --think-time 0ms --duration 10s
    load "$dir" bulk -s bulk --max-jobs "$bulk_jobs"
    stop
    printf '| %s | %s | %.1f ms | %.1f ms | %.1f ms | %.1f ms | %.1f ms | %.1f ms | %.1f ms | %.1f ms | %.1f | %.0f ms |\n' \
      "$round" "$label" \
      "$(field light 's["latency"]["min_ms"]')" "$(field light 's["latency"]["p50_ms"]')" \
      "$(field light 's["latency"]["p99_ms"]')" "$(field light 's["service_time"]["p50_ms"]')" \
      "$(field light infer)" "$(field light 's["latency"]["p50_ms"] - infer')" \
      "$(field b2b 's["latency"]["p50_ms"]')" "$(field b2b infer)" \
      "$(field bulk 's["jobs_per_s"]')" "$(field bulk 's["latency"]["p50_ms"]')"
  done
done
for side in "$@"; do
  label=${side%%:*} dir=${side#*:}
  rm -f "$work/trace.log"
  start "$dir" "$work/trace.log"
  load "$dir" warm -s warm-up
    skip=$(wc -l <"$work/trace.log")
  load "$dir" traced -s light --rate 5 --duration "${secs}s"
  stop
  tail -n +"$((skip + 1))" "$work/trace.log" >"$work/traced.log"
  echo
  echo "== breakdown, $label (light run on a tracing nats-server; p50 $(field traced 's["latency"]["p50_ms"]') ms, model $(field traced infer) ms)"
  python3 scripts/light_breakdown.py "$work/traced.log" "$(field traced 's["latency"]["p50_ms"]')" \
    "$(field traced 'wait')" "$(field traced infer)"
done
echo "load after: $(uptime | sed 's/.*load average/load average/')"
