#!/usr/bin/env bash
# The main job, from a fresh clone: fetch nats-server and the model, build,
# start a local JetStream server and a worker, submit real jobs, show results,
# and stop everything again. Usage: scripts/demo.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
. scripts/lib.sh

bash scripts/setup.sh
echo "demo: building (first time takes a few minutes)" >&2
cargo build --quiet --bins
bin="$root/target/debug"

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
echo "demo: nats-server with JetStream on $url" >&2

JETINFER_NATS__URLS="[\"$url\"]" "$bin/jetinfer-worker" >"$work/worker.log" 2>&1 &
pids+=($!)
for _ in $(seq 1 300); do
  grep -q "worker consuming" "$work/worker.log" && break
  kill -0 "${pids[1]}" 2>/dev/null || { cat "$work/worker.log" >&2; exit 1; }
  sleep 0.1
done
grep -q "worker consuming" "$work/worker.log" || { echo "demo: worker did not start" >&2; cat "$work/worker.log" >&2; exit 1; }
echo "demo: worker is consuming jobs.minilm.* (all-MiniLM-L6-v2 on the CPU)" >&2

export JETINFER_NATS_URL="$url"
echo
echo "== one job with three texts (summary: first values of each 384-d embedding)"
"$bin/jetinfer" embed --summary \
  "The cat sits on the mat." \
  "A kitten is resting on a rug." \
  "Quarterly revenue grew by twelve percent."

echo
echo "== cosine similarity of those three texts (unit vectors: the dot product)"
"$bin/jetinfer" embed \
  "The cat sits on the mat." \
  "A kitten is resting on a rug." \
  "Quarterly revenue grew by twelve percent." | python3 -c '
import json, sys
v = json.loads(sys.stdin.readline())["embeddings"]
dot = lambda a, b: sum(x * y for x, y in zip(a, b))
print(f"cat/mat vs kitten/rug: {dot(v[0], v[1]):.3f}")
print(f"cat/mat vs revenue:    {dot(v[0], v[2]):.3f}")'

echo
echo "== one job per stdin line, submitted concurrently (JSON lines, vectors cut for display)"
printf '%s\n' \
  "NATS JetStream keeps jobs until a worker acknowledges them." \
  "Sentence embeddings map text to vectors." \
  "Dynamic batching groups inputs of similar length." |
  "$bin/jetinfer" embed | python3 -c '
import json, sys
for line in sys.stdin:
    r = json.loads(line)
    v = r["embeddings"][0]
    print(json.dumps({"job_id": r["job_id"], "model": r["model"]["id"], "dims": len(v),
                      "embedding[:3]": [round(x, 4) for x in v[:3]], "tokens": r["token_counts"],
                      "timings": r["timings"]}))'

echo
echo "== a bad job gets a typed error reply"
"$bin/jetinfer" embed --reject-long "$(python3 -c 'print("word " * 400)')" || true

echo
echo "demo: done; stopping worker and server" >&2
