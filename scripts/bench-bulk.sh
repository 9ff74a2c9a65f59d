#!/usr/bin/env bash
# Bulk runs end to end, for the README's figures: lines/s of a 100,000-line
# run on the echo backend and of a 10,000-line run on all-MiniLM-L6-v2 (the
# candle backend), and the submitting process's peak memory (GNU time's
# "Maximum resident set size"). Texts come from ../shared/data/bench_corpus.json
# (or $JETINFER_SHARED_DATA/bench_corpus.json), line i gets text i mod 1500.
# Everything runs on loopback: a fresh nats-server, one worker, the CLI.
#
# Usage: scripts/bench-bulk.sh [echo_lines] [candle_lines]
#        PROFILE=release scripts/bench-bulk.sh     (default: dev)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
. scripts/lib.sh
echo_lines=${1:-100000}
candle_lines=${2:-10000}
profile=${PROFILE:-dev}
corpus=${JETINFER_SHARED_DATA:-$root/../shared/data}/bench_corpus.json
[ -x /usr/bin/time ] || { echo "bench-bulk: needs GNU time (apt-get install time)" >&2; exit 1; }

bash scripts/setup.sh
cargo build --quiet --profile "$profile" -p jetinfer-worker -p jetinfer-producer
bin="$root/target/$([ "$profile" = dev ] && echo debug || echo "$profile")"

work=$(mktemp -d)
port=$(free_port)
url="nats://127.0.0.1:$port"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
start_nats "$port" "$work/store" "$work/nats.log"
pids+=($!)

make_input() { # lines path
  python3 - "$1" "$2" "$corpus" <<'PY'
import json, sys
lines, path, corpus = int(sys.argv[1]), sys.argv[2], json.load(open(sys.argv[3]))
with open(path, "w") as f:
    for i in range(lines):
        f.write(json.dumps({"custom_id": f"doc-{i}", "text": corpus[i % len(corpus)]}) + "\n")
PY
}

run() { # backend lines
  local backend=$1 lines=$2 log="$work/worker-$1.log"
  JETINFER_NATS__URLS="[\"$url\"]" JETINFER_MODEL__BACKEND="$backend" \
    JETINFER_HTTP__ADDR="127.0.0.1:$(free_port)" "$bin/jetinfer-worker" >"$log" 2>&1 &
  local worker=$!
  pids+=($worker)
  for _ in $(seq 1 600); do grep -qs "worker consuming" "$log" && break; sleep 0.1; done
  grep -qs "worker consuming" "$log" || { cat "$log" >&2; exit 1; }
  make_input "$lines" "$work/in-$backend.jsonl"
  /usr/bin/time -v -o "$work/time-$backend.txt" "$bin/jetinfer" --nats-url "$url" bulk submit \
    --input "$work/in-$backend.jsonl" --output "$work/out-$backend.jsonl" --progress lines \
    >"$work/summary-$backend.json"
  kill "$worker"; wait "$worker" 2>/dev/null || true
  python3 - "$backend" "$lines" "$work/summary-$backend.json" "$work/time-$backend.txt" "$work/out-$backend.jsonl" <<'PY'
import json, re, sys
backend, lines, summary, timing, out = sys.argv[1:]
s = json.load(open(summary))
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(timing).read()).group(1))
written = sum(1 for _ in open(out))
print(f"| {backend} | {int(lines):,} | {s['ok']:,} | {written:,} | {s['seconds']:.1f} | {s['lines_per_s']:,.0f} | {rss / 1024:.1f} |")
PY
}

echo "| backend | lines | ok | output lines | seconds | lines/s | submitter peak RSS, MiB |"
echo "| --- | --- | --- | --- | --- | --- | --- |"
if [ "$echo_lines" -gt 0 ]; then run echo "$echo_lines"; fi
if [ "$candle_lines" -gt 0 ]; then run candle "$candle_lines"; fi
