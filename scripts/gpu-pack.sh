#!/usr/bin/env bash
# Packs everything scripts/gpu-check.sh needs for a GPU machine that has no
# network and takes at most 64 MiB of files with a run, into
# target/gpu-pack.tar.xz:
#   bin/jetinfer-worker      built here with `--features cuda` (CUDA 13.0 from
#                            scripts/deps/cuda.sh, for CUDA_COMPUTE_CAP, 90 =
#                            Hopper by default), stripped
#   bin/jetinfer, bin/jetinfer-loadgen, bin/nats-server
#   model/                   all-MiniLM-L6-v2 with its weights stored as f16
#                            (87 MB of f32 weights do not fit; candle widens
#                            them at load, so an f32 run measures f16-rounded
#                            weights: the report's golden row says how close)
#   minilm_golden.json, bench_corpus.json
# cuBLAS, cuRAND and NVRTC (hundreds of MB) are not packed: the GPU machine's
# CUDA installation provides them (gpu-check.sh looks in the usual places).
# Then, on the GPU machine:
#   tar -xJf target/gpu-pack.tar.xz -C target && bash scripts/gpu-check.sh
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
limit_mib=${GPU_PACK_LIMIT_MIB:-56} # leaves room for the working tree itself
shared=${JETINFER_SHARED_DATA:-$root/../shared/data}

bash scripts/setup.sh
CUDA_HOME=$(bash scripts/deps/cuda.sh)
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# The CUDA build keeps its own target directory: its candle differs from the
# CPU build's, and neither should rebuild the other.
CARGO_TARGET_DIR="$root/target/cuda" cargo build --release --locked -p jetinfer-worker --features cuda
cargo build --release --locked -p jetinfer-producer -p jetinfer-loadgen --bins

pack="$root/target/gpu-pack"
rm -rf "$pack"
mkdir -p "$pack/bin" "$pack/model"
install -m 0755 target/cuda/release/jetinfer-worker target/release/jetinfer \
  target/release/jetinfer-loadgen .cache/bin/nats-server "$pack/bin/"
strip "$pack"/bin/jetinfer*

model=.cache/models/all-MiniLM-L6-v2
cp -r "$model"/*.json "$model"/vocab.txt "$model"/1_Pooling "$pack/model/"
python3 - "$model/model.safetensors" "$pack/model/model.safetensors" <<'EOF'
# safetensors: an 8-byte little-endian header length, a JSON header, data.
import array, json, struct, sys
src, dst = sys.argv[1:3]
with open(src, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    header = json.loads(f.read(n))
    data = f.read()
out_header, chunks, offset = {}, [], 0
for name, info in header.items():
    if name == "__metadata__":
        out_header[name] = info
        continue
    start, end = info["data_offsets"]
    raw = data[start:end]
    if info["dtype"] == "F32":
        values = array.array("f")
        values.frombytes(raw)
        if sys.byteorder != "little":
            values.byteswap()
        raw = struct.pack(f"<{len(values)}e", *values)
        info = dict(info, dtype="F16")
    out_header[name] = dict(info, data_offsets=[offset, offset + len(raw)])
    chunks.append(raw)
    offset += len(raw)
encoded = json.dumps(out_header, separators=(",", ":")).encode()
encoded += b" " * (-len(encoded) % 8)
with open(dst, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for chunk in chunks:
        f.write(chunk)
EOF
cp "$shared/minilm_golden.json" "$shared/bench_corpus.json" "$pack/"

tar -cJf target/gpu-pack.tar.xz -C target gpu-pack
size_mib=$(($(stat -c %s target/gpu-pack.tar.xz) / 1048576))
echo "gpu-pack: target/gpu-pack.tar.xz is $size_mib MiB (limit $limit_mib MiB)" >&2
[ "$size_mib" -le "$limit_mib" ] || { echo "gpu-pack: too large to travel" >&2; exit 1; }
