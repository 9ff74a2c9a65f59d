#!/usr/bin/env bash
# The gateway against the NATS Client, same run, same worker: one
# nats-server, one jetinfer-worker (all-MiniLM-L6-v2 on CPU unless
# BACKEND=echo), one jetinfer-gateway on loopback, and jetinfer-loadgen
# driving each target in turn:
#
#   light:      1 user, single texts, 200 ms think time (p50/p99)
#   saturation: SAT_USERS closed-loop users, no think time, the standard
#               mix (texts/s)
#
# ROUNDS rounds (default 2), the order of the two targets reversed each
# round, so drift on a shared machine shows as a difference between rounds
# rather than between targets. Prints a markdown table for
# docs/benchmarks.md; reports land in target/loadgen/gateway/<row>/.
#
#   scripts/bench-gateway.sh               # BENCH_SECONDS=20 per row
#   BACKEND=echo scripts/bench-gateway.sh  # the edge's own cost, no model
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
. scripts/lib.sh
backend=${BACKEND:-candle}
profile=${PROFILE:-dev}
dir=$([ "$profile" = dev ] && echo debug || echo "$profile")
target_dir=${CARGO_TARGET_DIR:-target}
secs=${BENCH_SECONDS:-20}
rounds=${ROUNDS:-2}
sat_users=${SAT_USERS:-64}
out="$target_dir/loadgen/gateway"

bash scripts/setup.sh >&2
cargo build --profile "$profile" -p jetinfer-worker -p jetinfer-gateway -p jetinfer-loadgen --bins >&2
bin="$target_dir/$dir"

work=$(mktemp -d)
pids=()
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
}
trap stop EXIT

wait_ready() { # url
  python3 - "$1" <<'PY'
import sys, time, urllib.request
url = sys.argv[1]
for _ in range(1200):
    try:
        if urllib.request.urlopen(url, timeout=1).status == 200:
            sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(f"not ready at {url}")
PY
}

nats_port=$(free_port)
worker_http=$(free_port)
gateway_port=$(free_port)
mkdir -p "$work/store"
start_nats "$nats_port" "$work/store" "$work/nats.log"
pids+=($!)
sleep 1

JETINFER_NATS__URLS="[\"nats://127.0.0.1:$nats_port\"]" JETINFER_HTTP__ADDR="127.0.0.1:$worker_http" \
  JETINFER_MODEL__BACKEND=$backend JETINFER_MODEL__PATH="$root/.cache/models/all-MiniLM-L6-v2" \
  "$bin/jetinfer-worker" >"$work/worker.log" 2>&1 &
pids+=($!)
wait_ready "http://127.0.0.1:$worker_http/readyz"

# A fresh API key for tenant "bench", no rate limit: the gateway holds only
# its SHA-256.
key=$(python3 -c 'import secrets; print("sk-bench-" + secrets.token_hex(16))')
printf '%s\n' "$key" >"$work/api-key"
cat >"$work/keys.toml" <<TOML
[[keys]]
id = "bench"
sha256 = "$(printf %s "$key" | sha256sum | cut -d' ' -f1)"
tenant = "bench"
role = "user"
TOML
cat >"$work/gateway.toml" <<TOML
listen = "127.0.0.1:$gateway_port"
keys_file = "$work/keys.toml"
[nats]
urls = ["nats://127.0.0.1:$nats_port"]
[tenants.bench]
auth = { kind = "none" }
TOML
"$bin/jetinfer-gateway" --config "$work/gateway.toml" >"$work/gateway.log" 2>&1 &
pids+=($!)
wait_ready "http://127.0.0.1:$gateway_port/readyz"

loadgen() { # row, target, scenario args...
  local row=$1 via=$2; shift 2
  local args=(--target nats --nats-url "nats://127.0.0.1:$nats_port" --tenant bench)
  if [ "$via" = http ]; then
    args=(--target http --url "http://127.0.0.1:$gateway_port" --api-key-file "$work/api-key")
  fi
  echo "== $row: jetinfer-loadgen run ${args[*]/$work\/api-key/KEYFILE} $*" >&2
  "$bin/jetinfer-loadgen" run "${args[@]}" -q --out "$out/$row" "$@" >&2 || true
}
light=(-s light --users 1 --think-time 200ms --mix single=100,small=0,large=0 --duration "${secs}s")
sat=(-s heavy --users "$sat_users" --think-time 0ms --duration "${secs}s")

# Warm the model and both paths (not reported).
loadgen warm-nats nats -s warm-up
loadgen warm-http http -s warm-up
rows=()
for round in $(seq 1 "$rounds"); do
  if [ $((round % 2)) = 1 ]; then order="nats http"; else order="http nats"; fi
  for via in $order; do loadgen "light-$via-$round" "$via" "${light[@]}"; rows+=("light-$via-$round"); done
  for via in $order; do loadgen "sat-$via-$round" "$via" "${sat[@]}"; rows+=("sat-$via-$round"); done
done

python3 - "$out" "${rows[@]}" <<'PY'
import json, sys
out, rows = sys.argv[1], sys.argv[2:]
print("| row | target | jobs ok / sent | texts/s | tokens/s | p50 | p99 | errors |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for row in rows:
    s = json.load(open(f"{out}/{row}/report.json"))["summary"]
    load, via, rnd = row.split("-")
    lat = s["latency"]
    errs = ", ".join(f"{k} {v}" for k, v in s["errors_by_kind"].items()) or "0"
    name = {"nats": "NATS Client", "http": "gateway (HTTP)"}[via]
    print(f"| {load} (round {rnd}) | {name} | {s['jobs_ok']:,} / {s['jobs_sent']:,} | {s['inputs_per_s']:.1f} "
          f"| {s['tokens_per_s']:,.0f} | {lat['p50_ms']:.1f} ms | {lat['p99_ms']:.1f} ms | {errs} |")
PY
