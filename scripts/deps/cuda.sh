#!/usr/bin/env bash
# Fetches the CUDA toolchain that `--features cuda` builds with into
# .cache/cuda-13.0 (bin/nvcc, include/, lib/libcudart, nvvm/), once, from the
# pinned, hash-checked wheels in scripts/requirements/cuda.txt. Nothing is
# pip-installed and no GPU or driver is needed: this is enough to compile and
# lint the CUDA build (candle's kernels become PTX and a static library;
# cudarc loads libcuda at run time). Prints the toolchain's root on stdout, so
#   export CUDA_HOME=$(bash scripts/deps/cuda.sh)
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cache="${JETINFER_CACHE:-$root/.cache}"
requirements="$root/scripts/requirements/cuda.txt"
cuda="$cache/cuda-13.0"
python=${PYTHON:-python3}

want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ "$(cat "$cuda/.requirements.sha256" 2>/dev/null)" != "$want" ] || [ ! -x "$cuda/bin/nvcc" ]; then
  echo "cuda: fetching the CUDA 13.0 toolchain wheels (about 100 MB)" >&2
  mkdir -p "$cache/wheels"
  dl=$(mktemp -d "$cache/wheels/cuda.XXXXXX")
  unpacked=$(mktemp -d "$cache/wheels/cuda-unpacked.XXXXXX")
  "$python" -m pip download --quiet --disable-pip-version-check --no-deps \
    --only-binary=:all: --require-hashes -r "$requirements" -d "$dl" >&2
  for wheel in "$dl"/*.whl; do
    "$python" -m zipfile -e "$wheel" "$unpacked"
  done
  rm -rf "$cuda"
  mv "$unpacked/nvidia/cu13" "$cuda"
  chmod +x "$cuda"/bin/* "$cuda"/nvvm/bin/* 2>/dev/null || true
  # The linker looks for the unversioned name.
  ln -sf libcudart.so.13 "$cuda/lib/libcudart.so"
  ln -sfn lib "$cuda/lib64"
  rm -rf "$dl" "$unpacked"
  echo "$want" > "$cuda/.requirements.sha256"
fi
"$cuda/bin/nvcc" --version | tail -1 | sed 's/^/cuda: nvcc /' >&2
echo "$cuda"
