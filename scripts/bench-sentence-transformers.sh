#!/usr/bin/env bash
# Yardstick (d) of docs/benchmarks.md: sentence-transformers encoding the same
# bench_corpus.json texts with the same all-MiniLM-L6-v2 files on this machine,
# the peer a user would pick instead of jetinfer, with each backend a user
# could pick: torch in f32, torch in bf16 and ONNX Runtime (`backend="onnx"`).
# Each prints its lowest cosine to the torch f32 embeddings; only those at or
# above the project's bound (0.9999) count as the fastest accurate peer.
# Installs sentence-transformers[onnx] (torch, optimum-onnx, ONNX Runtime)
# into a throwaway venv under .cache/st-venv for the benchmark only: it is
# never a project dependency. If it cannot be installed, it says so and
# exits 0.
#
#   scripts/bench-sentence-transformers.sh            # 512 texts, batch 8 and 32
#   BENCH_TEXTS=1024 BENCH_BATCHES=8 BENCH_THREADS=2 scripts/bench-sentence-transformers.sh
#   BENCH_MODEL=.cache/models/all-mpnet-base-v2 scripts/bench-sentence-transformers.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.cache/st-venv"
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sentence_transformers, onnxruntime, optimum.onnxruntime' 2>/dev/null; then
  echo "bench-st: installing sentence-transformers with its ONNX backend into $venv (large download: torch)" >&2
  if ! { "$python" -m venv "$venv" &&
         "$venv/bin/pip" install --quiet --disable-pip-version-check "sentence-transformers[onnx]"; } >&2; then
    echo "bench-st: SKIPPED: sentence-transformers could not be installed here (see pip's message above)" >&2
    exit 0
  fi
fi

BENCH_ROOT="$root" "$venv/bin/python" - <<'PY'
import json, os, time
import numpy as np
import torch
from sentence_transformers import SentenceTransformer
import sentence_transformers
import onnxruntime

root = os.environ["BENCH_ROOT"]
n = int(os.environ.get("BENCH_TEXTS", "512"))
batches = [int(b) for b in os.environ.get("BENCH_BATCHES", "8,32").split(",")]
threads = int(os.environ.get("BENCH_THREADS", str(os.cpu_count())))
# The project's bound: a peer counts only if every text keeps this cosine
# to sentence-transformers' own f32 torch embedding.
bound = 0.9999
torch.set_num_threads(threads)
# BENCH_MODEL: the model directory both sides run (relative to the repo root).
path = os.path.join(root, os.environ.get("BENCH_MODEL") or ".cache/models/all-MiniLM-L6-v2")
texts = json.load(open(os.path.join(root, "../shared/data/bench_corpus.json")))[:n]
model = SentenceTransformer(path, device="cpu")
tok = model.tokenizer
tokens = sum(min(len(tok(t)["input_ids"]), model.max_seq_length) for t in texts)
print(f"sentence-transformers {sentence_transformers.__version__}, torch {torch.__version__}, "
      f"ONNX Runtime {onnxruntime.__version__}, {threads} threads, {len(texts)} texts of "
      f"bench_corpus.json, max_seq_length {model.max_seq_length}")

def peers():
    yield "torch f32", model
    bf16 = SentenceTransformer(path, device="cpu")
    bf16.to(torch.bfloat16)
    yield "torch bf16", bf16
    try:
        # ONNX Runtime's CPU provider on the same files (exported at load).
        onnx = SentenceTransformer(path, device="cpu", backend="onnx")
    except Exception as e:  # noqa: BLE001: report and go on
        print(f"| onnx | - | not run: {type(e).__name__}: {e} | | |")
        return
    yield "onnx (ONNX Runtime)", onnx

print("| peer | batch | texts/s | tokens/s | lowest cosine to torch f32 |")
print("|---|---|---|---|---|")
reference = None
best, best_name = 0.0, ""
for name, m in peers():
    m.encode(texts[:64], batch_size=8)  # warm-up
    for b in batches:
        t0 = time.perf_counter()
        got = m.encode(texts, batch_size=b, normalize_embeddings=True, convert_to_numpy=False)
        dt = time.perf_counter() - t0
        got = np.stack([g.float().numpy() for g in got])
        if reference is None:
            reference = got
        lowest = float(np.min(np.sum(got * reference, axis=1) /
                              (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))))
        accurate = lowest >= bound
        rate = len(texts) / dt
        note = "" if accurate else f" (below {bound}: not counted)"
        print(f"| {name} | {b} | {rate:.1f} | {tokens/dt:.0f} | {lowest:.7f}{note} |", flush=True)
        if accurate and rate > best:
            best, best_name = rate, f"{name}, batch {b}"
print(f"fastest accurate peer: {best_name}, {best:.1f} texts/s")
if os.environ.get("BENCH_ST_BEST_FILE"):
    open(os.environ["BENCH_ST_BEST_FILE"], "w").write(f"{best:.1f}\n")
if os.environ.get("BENCH_ST_BEST_NAME_FILE"):
    open(os.environ["BENCH_ST_BEST_NAME_FILE"], "w").write(best_name + "\n")
# single-text latency, for comparison with loadgen's light scenario
lat = []
for t in texts[:100]:
    t0 = time.perf_counter()
    model.encode([t])
    lat.append(time.perf_counter() - t0)
lat.sort()
print(f"single text, torch f32: median {lat[len(lat)//2]*1000:.1f} ms, p90 {lat[int(len(lat)*0.9)]*1000:.1f} ms (100 texts, one at a time)")
PY
