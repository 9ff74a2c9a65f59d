#!/usr/bin/env bash
# Issue 18's rerank rate, in one run on the same pairs: sentence-transformers'
# CrossEncoder(dir).predict(pairs), then jetinfer's cross-encoder backend
# called directly and jetinfer end to end through a real nats-server, with
# pairs/s for each, the ratio, and the largest logit and score difference
# between the two (docs/benchmarks.md, issue 18).
#
#   scripts/bench-rerank.sh
#   BENCH_JOBS=32 BENCH_DOCS=32 BENCH_BATCHES=64 BENCH_THREADS=2 scripts/bench-rerank.sh
#
# No package registry ships a real cross-encoder, so the model is
# all-MiniLM-L6-v2's encoder under a seeded random classifier, the shape of
# cross-encoder/ms-marco-MiniLM-L-6-v2, made once into
# .cache/models/minilm-cross-encoder (scripts/bench_rerank.py model). The
# pairs: BENCH_JOBS jobs (default 64) of a query and BENCH_DOCS documents
# (default 16), consecutive texts of bench_corpus.json.
#
# Python side: the venv of scripts/bench-sentence-transformers.sh
# (.cache/st-venv) or, failing that, the fixtures' pinned one
# (.cache/fixtures-venv); BENCH_VENV names another. With none that imports
# sentence-transformers it installs one as bench-sentence-transformers.sh
# does, and stops with a message if it cannot (torch makes the model).
# BENCH_PROFILE (default dev: dependencies and the forward are built at -O3,
# see Cargo.toml) picks the cargo profile of the jetinfer side.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
jobs=${BENCH_JOBS:-64}
docs=${BENCH_DOCS:-16}
model="$root/.cache/models/minilm-cross-encoder"
corpus="$root/../shared/data/bench_corpus.json"
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

bash scripts/setup.sh >&2
usable() { [ -x "$1/bin/python" ] && "$1/bin/python" -c 'import sentence_transformers' 2>/dev/null; }
venv=${BENCH_VENV:-}
if [ -z "$venv" ]; then
  for candidate in "$root/.cache/st-venv" "$root/.cache/fixtures-venv"; do
    if usable "$candidate"; then venv=$candidate; break; fi
  done
fi
if [ -z "$venv" ]; then
  venv="$root/.cache/st-venv"
  echo "bench-rerank: installing sentence-transformers into $venv (large download: torch)" >&2
  if ! { "$python" -m venv "$venv" &&
         "$venv/bin/pip" install --quiet --disable-pip-version-check sentence-transformers; } >&2; then
    echo "bench-rerank: STOPPED: sentence-transformers could not be installed here (see pip's message above); it makes the benchmark model" >&2
    exit 1
  fi
fi
usable "$venv" || { echo "bench-rerank: $venv cannot import sentence_transformers" >&2; exit 1; }

if [ ! -f "$model/model.safetensors" ]; then
  echo "== making $model" >&2
  "$venv/bin/python" scripts/bench_rerank.py model "$root/.cache/models/all-MiniLM-L6-v2" "$corpus" "$model"
fi
"$python" scripts/bench_rerank.py pairs "$corpus" "$jobs" "$docs" "$work/pairs.json"
echo "== sentence-transformers CrossEncoder ($venv)" >&2
"$venv/bin/python" scripts/bench_rerank.py peer "$model" "$work/pairs.json" "$work/peer.json"
echo "== jetinfer" >&2
BENCH_RERANK_MODEL="$model" BENCH_RERANK_PAIRS="$work/pairs.json" BENCH_RERANK_PEER="$work/peer.json" \
  cargo bench --profile "${BENCH_PROFILE:-dev}" -p jetinfer-worker --bench rerank
