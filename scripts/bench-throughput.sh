#!/usr/bin/env bash
# Issue 3's benchmark, in one run on the same texts: sentence-transformers
# (the peer users would pick, with its torch f32, torch bf16 and ONNX Runtime
# backends; installed into a throwaway venv, skipped with a message if it
# cannot be), then jetinfer's backend called directly and jetinfer end to end
# through a real nats-server, for each forward pass, with the ratio of
# jetinfer's end-to-end rate to the fastest peer that keeps cosine >= 0.9999.
#
#   scripts/bench-throughput.sh
#   BENCH_TEXTS=1024 BENCH_BATCHES=16,32,64 BENCH_FORWARDS=packed scripts/bench-throughput.sh
#   BENCH_MODEL=.cache/models/all-mpnet-base-v2 BENCH_TEXTS=256 scripts/bench-throughput.sh
#
# BENCH_PROFILE (default dev: dependencies and the forward are built at -O3,
# see Cargo.toml) picks the cargo profile of the jetinfer side.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
export BENCH_TEXTS=${BENCH_TEXTS:-1024}
st_batches=${BENCH_ST_BATCHES:-8,16,32}
best_file=$(mktemp)
best_name_file=$(mktemp)
trap 'rm -f "$best_file" "$best_name_file"' EXIT

bash scripts/setup.sh >&2
echo "== sentence-transformers" >&2
BENCH_BATCHES=$st_batches BENCH_ST_BEST_FILE="$best_file" BENCH_ST_BEST_NAME_FILE="$best_name_file" \
  bash scripts/bench-sentence-transformers.sh
if [ -s "$best_file" ]; then
  export BENCH_ST_TEXTS_PER_S=$(cat "$best_file")
  export BENCH_ST_NAME=$(cat "$best_name_file")
else
  echo "bench-throughput: no sentence-transformers figure; the ratio column will say n/a" >&2
fi
echo "== jetinfer" >&2
cargo bench --profile "${BENCH_PROFILE:-dev}" -p jetinfer-worker --bench throughput
