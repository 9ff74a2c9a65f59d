#!/usr/bin/env bash
# Yardstick (d) of docs/benchmarks.md: sentence-transformers encoding the same
# bench_corpus.json texts with the same all-MiniLM-L6-v2 files on this machine,
# the peer a user would pick instead of jetinfer. Installs sentence-transformers
# (and torch, CPU) from PyPI into a throwaway venv under .cache/st-venv for the
# benchmark only: it is never a project dependency. If it cannot be installed,
# it says so and exits 0.
#
#   scripts/bench-sentence-transformers.sh            # 512 texts, batch 8 and 32
#   BENCH_TEXTS=1024 BENCH_BATCHES=8 BENCH_THREADS=2 scripts/bench-sentence-transformers.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.cache/st-venv"
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sentence_transformers' 2>/dev/null; then
  echo "bench-st: installing sentence-transformers into $venv (large download: torch)" >&2
  if ! { "$python" -m venv "$venv" &&
         "$venv/bin/pip" install --quiet --disable-pip-version-check sentence-transformers; } >&2; then
    echo "bench-st: SKIPPED: sentence-transformers could not be installed here (see pip's message above)" >&2
    exit 0
  fi
fi

BENCH_ROOT="$root" "$venv/bin/python" - <<'PY'
import json, os, platform, time
import torch
from sentence_transformers import SentenceTransformer
import sentence_transformers

root = os.environ["BENCH_ROOT"]
n = int(os.environ.get("BENCH_TEXTS", "512"))
batches = [int(b) for b in os.environ.get("BENCH_BATCHES", "8,32").split(",")]
threads = int(os.environ.get("BENCH_THREADS", str(os.cpu_count())))
torch.set_num_threads(threads)
texts = json.load(open(os.path.join(root, "../shared/data/bench_corpus.json")))[:n]
model = SentenceTransformer(os.path.join(root, ".cache/models/all-MiniLM-L6-v2"), device="cpu")
tok = model.tokenizer
tokens = sum(min(len(tok(t)["input_ids"]), model.max_seq_length) for t in texts)
print(f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}, "
      f"{threads} threads, {len(texts)} texts of bench_corpus.json, max_seq_length {model.max_seq_length}")
model.encode(texts[:64], batch_size=8)  # warm-up
print("| batch | texts/s | tokens/s |")
print("|---|---|---|")
best = 0.0
for b in batches:
    t0 = time.perf_counter()
    model.encode(texts, batch_size=b, normalize_embeddings=True)
    dt = time.perf_counter() - t0
    best = max(best, len(texts) / dt)
    print(f"| {b} | {len(texts)/dt:.1f} | {tokens/dt:.0f} |")
if os.environ.get("BENCH_ST_BEST_FILE"):
    open(os.environ["BENCH_ST_BEST_FILE"], "w").write(f"{best:.1f}\n")
# single-text latency, for comparison with loadgen's light scenario
lat = []
for t in texts[:100]:
    t0 = time.perf_counter()
    model.encode([t])
    lat.append(time.perf_counter() - t0)
lat.sort()
print(f"single text: median {lat[len(lat)//2]*1000:.1f} ms, p90 {lat[int(len(lat)*0.9)]*1000:.1f} ms (100 texts, one at a time)")
PY
