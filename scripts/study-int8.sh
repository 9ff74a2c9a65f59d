#!/usr/bin/env bash
# Accuracy study for int8 products (AVX512_VNNI `vpdpbusd`: u8 x s8 into
# int32), before any kernel is written: would they hold the project's bound,
# cosine >= 0.9999 to the f32 model? Simulates each quantisation scheme in the
# dense layers of an embedding model (every encoder Linear; attention scores,
# softmax, LayerNorm and pooling stay f32) with sentence-transformers' torch
# model, and prints the lowest and median cosine to the f32 embeddings over
# the golden texts and BENCH_TEXTS texts of the benchmark corpus.
#
# The products are simulated exactly: the quantised operands are integers
# times a scale, so their int32 sum equals the f64 product of the
# dequantised values (no int32 overflow at these widths: K <= 1536).
#
#   scripts/study-int8.sh                                  # MiniLM, 512 texts
#   BENCH_MODEL=.cache/models/all-mpnet-base-v2 scripts/study-int8.sh
#
# Uses the throwaway venv of scripts/bench-sentence-transformers.sh (created
# there); never a project dependency.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.cache/st-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sentence_transformers' 2>/dev/null; then
  echo "study-int8: SKIPPED: no sentence-transformers venv; run scripts/bench-sentence-transformers.sh once" >&2
  exit 0
fi

BENCH_ROOT="$root" "$venv/bin/python" - <<'PY'
import json, os
import numpy as np
import torch
from sentence_transformers import SentenceTransformer

root = os.environ["BENCH_ROOT"]
shared = os.environ.get("JETINFER_SHARED_DATA", os.path.join(root, "..", "shared", "data"))
model_dir = os.environ.get("BENCH_MODEL", os.path.join(root, ".cache", "models", "all-MiniLM-L6-v2"))
n = int(os.environ.get("BENCH_TEXTS", "512"))
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))

texts = json.load(open(os.path.join(shared, "minilm_golden.json")))["texts"]
texts += json.load(open(os.path.join(shared, "bench_corpus.json")))[:n]

model = SentenceTransformer(model_dir, device="cpu")
model.max_seq_length = 256


def encode():
    with torch.no_grad():
        return model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True).astype(np.float64)


reference = encode()


def quantise_weight(w, bits, group):
    """Symmetric signed integers per output row (or per `group` columns of
    it), as dequantised values."""
    top = 2 ** (bits - 1) - 1
    rows, cols = w.shape
    g = cols if group is None else group
    v = w.reshape(rows, cols // g, g)
    scale = v.abs().amax(dim=2, keepdim=True).clamp_min(1e-30) / top
    return (torch.round(v / scale).clamp(-top, top) * scale).reshape(rows, cols)


def quantise_activation(x, bits):
    """Asymmetric unsigned integers per token (row), dynamic range: the u8
    operand of vpdpbusd (bits=16: two u8 digits, two products)."""
    top = 2 ** bits - 1
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-30) / top
    return torch.round((x - lo) / scale).clamp(0, top) * scale + lo


originals = {}
for name, module in model.named_modules():
    if isinstance(module, torch.nn.Linear):
        originals[name] = (module, module.weight.data.clone())


def quantised_forward(module, a_bits):
    """`module`'s product with its input rounded to `a_bits` (None: f32)."""
    def forward(x):
        if a_bits is None:
            return torch.nn.functional.linear(x, module.weight, module.bias)
        bias = None if module.bias is None else module.bias.double()
        return torch.nn.functional.linear(quantise_activation(x.double(), a_bits), module.weight.double(), bias).float()
    return forward


def apply(w_bits, w_group, a_bits, skip=()):
    for name, (module, weight) in originals.items():
        kept = any(s in name for s in skip)
        quantised = not kept and w_bits is not None
        module.weight.data = quantise_weight(weight.double(), w_bits, w_group).float() if quantised else weight.clone()
        module.forward = quantised_forward(module, None if kept else a_bits)


schemes = [
    ("weights int8 per row, activations f32", 8, None, None, ()),
    ("weights int8 per 32 columns, activations f32", 8, 32, None, ()),
    ("weights int8 per row, activations u8 per token (W8A8)", 8, None, 8, ()),
    ("weights int8 per 32 columns, activations u8 per token", 8, 32, 8, ()),
    ("W8A8, FFN output layer kept f32", 8, None, 8, ("output.dense",)),
    ("weights int8 per row, activations 2 x u8 per token (W8A16, 2 products)", 8, None, 16, ()),
    ("weights 2 x int8 per row (W16), activations u8 per token (2 products)", 16, None, 8, ()),
    ("weights 2 x int8, activations 2 x u8 (4 products)", 16, None, 16, ()),
]
print(f"model {os.path.basename(model_dir.rstrip('/'))}, {len(texts)} texts (golden + corpus), bound 0.9999")
print()
print("| scheme | vpdpbusd per 4 products | lowest cosine | median cosine | texts below 0.9999 |")
print("|---|---|---|---|---|")
for label, w_bits, w_group, a_bits, skip in schemes:
    apply(w_bits, w_group, a_bits, skip)
    got = encode()
    cos = (got * reference).sum(axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(reference, axis=1)
    products = (2 if w_bits == 16 else 1) * (2 if a_bits == 16 else 1)
    print(f"| {label} | {products} | {cos.min():.6f} | {np.median(cos):.6f} | {(cos < 0.9999).sum()} of {len(cos)} |", flush=True)
PY
