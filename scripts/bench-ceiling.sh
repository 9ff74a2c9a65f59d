#!/usr/bin/env bash
# The queue's ceiling, process by process: `jetinfer-loadgen run -s bulk`
# (single-text jobs, 256 in flight) against each responder in turn, each on a
# fresh nats-server of its own: `raw` (`jetinfer-loadgen raw-responder`) or a
# `jetinfer-worker` binary with the echo backend. Besides loadgen's jobs/s it
# prints the CPU time the responder and the server spent per job (user +
# system, from /proc), the responder's system time and its context switches
# (all threads), which say more than wall clock on a shared machine.
#
#   scripts/bench-ceiling.sh JOBS RESPONDER...
#   RESPONDER: raw | worker:PATH-TO-jetinfer-worker
#   scripts/bench-ceiling.sh 20000 raw worker:old/jetinfer-worker worker:target/debug/jetinfer-worker
#
# LOADGEN (default target/debug/jetinfer-loadgen) picks the loadgen binary.
# Not a test: it asserts nothing and prints one block per responder.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
jobs=$1
shift
loadgen=${LOADGEN:-${CARGO_TARGET_DIR:-target}/debug/jetinfer-loadgen}
nats=.cache/bin/nats-server
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
port=14332
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
sys() { awk '{print $15}' "/proc/$1/stat"; }
switches() { cat /proc/"$1"/task/*/status | awk '/ctxt_switches/ {s += $2} END {print s}'; }
tick=$(getconf CLK_TCK)
per_job() { echo $((($2 - $1) * 1000000 / tick / jobs)); }

for responder in "$@"; do
  port=$((port + 1))
  rm -rf "$work/js" && mkdir -p "$work/js"
  "$nats" -a 127.0.0.1 -p "$port" -js -sd "$work/js" >"$work/nats.log" 2>&1 &
  server=$!
  for _ in $(seq 100); do grep -q "Server is ready" "$work/nats.log" && break; sleep 0.1; done
  url=nats://127.0.0.1:$port
  case $responder in
    raw)
      "$loadgen" raw-responder --nats-url "$url" >"$work/responder.log" 2>&1 &
      ready="" ;;
    worker:*)
      JETINFER_NATS__URLS="[$url]" JETINFER_MODEL__BACKEND=echo JETINFER_MODEL__NAME=minilm \
        JETINFER_HTTP__ADDR=127.0.0.1:0 "${responder#worker:}" >"$work/responder.log" 2>&1 &
      ready="worker consuming" ;;
    *) echo "unknown responder $responder" >&2; exit 2 ;;
  esac
  pid=$!
  for _ in $(seq 120); do grep -q "$ready" "$work/responder.log" && break; sleep 0.5; done
  sleep 2
  c0=$(cpu $pid) s0=$(sys $pid) n0=$(cpu $server) x0=$(switches $pid)
  "$loadgen" run -s bulk --max-jobs "$jobs" --mix single=1,small=0,large=0 --nats-url "$url" \
    --tenant bench -q --out "$work/report" >"$work/loadgen.out" 2>&1 || true
  c1=$(cpu $pid) s1=$(sys $pid) n1=$(cpu $server) x1=$(switches $pid)
  echo "== $responder"
  grep -E "^(jobs|rate|end-to-end)" "$work/loadgen.out"
  echo "cpu us/job: responder $(per_job "$c0" "$c1") (system $(per_job "$s0" "$s1")), nats-server $(per_job "$n0" "$n1"); responder context switches per 100 jobs: $(((x1 - x0) * 100 / jobs))"
  kill -TERM $pid && wait $pid || true
  kill $server && wait $server || true
done
