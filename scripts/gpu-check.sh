#!/usr/bin/env bash
# The GPU check, in one run on a machine with an NVIDIA GPU and no network:
# starts nats-server and a CUDA worker, runs the golden texts through NATS
# (lowest cosine to the reference), the throughput benchmark at several batch
# sizes (texts/s and tokens/s from the loadgen's bulk run), the light-load
# latency (one user, single texts, p50/p99), and scrapes the worker's GPU
# memory gauges; then writes one report (JSON and Markdown).
#
#   scripts/gpu-check.sh [--bin DIR] [--model DIR] [--dtypes f32,f16]
#                        [--batches 32,64,128,256,512] [--texts N]
#                        [--light-jobs N] [--report DIR] [--device cpu]
#
# --bin holds jetinfer-worker (built with `--features cuda`), jetinfer,
# jetinfer-loadgen and nats-server (default: target/gpu-pack/bin, which
# scripts/gpu-pack.sh fills; it also packs the model, the golden file and
# the corpus so the whole check travels in under 64 MiB). --device cpu
# rehearses the same steps on the CPU (scripts/test.sh does, so the script
# is known to work before a GPU is at hand).
#
# Exit status: 0 the check ran (the report says how it went; 1 if the golden
# check failed), 64 bad arguments, 66 a file it needs is missing, 69 no
# NVIDIA GPU found (nvidia-smi missing or listing none; the report says so).
# Only loopback is used; every wait is bounded.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
pack="$root/target/gpu-pack"

bin="$pack/bin"
model="$pack/model"
golden="$pack/minilm_golden.json"
corpus="$pack/bench_corpus.json"
dtypes="f32,f16"
batches="32,64,128,256,512"
texts=4096
light_jobs=200
report_dir="$root/gpu-report"
device=cuda
nvidia_smi=${NVIDIA_SMI:-nvidia-smi}

usage() { sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "gpu-check: $2" >&2; exit "$1"; }
is_list() { [[ $1 =~ ^[a-z0-9]+(,[a-z0-9]+)*$ ]]; }
is_count() { [[ $1 =~ ^[1-9][0-9]{0,6}$ ]]; }

while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --bin | --model | --golden | --corpus | --dtypes | --batches | --texts | --light-jobs | --report | --device)
      [ $# -ge 2 ] || die 64 "$1 needs a value (see --help)"
      case $1 in
        --bin) bin=$2 ;;
        --model) model=$2 ;;
        --golden) golden=$2 ;;
        --corpus) corpus=$2 ;;
        --dtypes) dtypes=$2 ;;
        --batches) batches=$2 ;;
        --texts) texts=$2 ;;
        --light-jobs) light_jobs=$2 ;;
        --report) report_dir=$2 ;;
        --device) device=$2 ;;
      esac
      shift 2 ;;
    *) die 64 "unknown argument '$1' (see --help)" ;;
  esac
done
is_list "$batches" && ! [[ ,$batches, =~ ,0 ]] || die 64 "--batches takes sizes like 32,64,128, not '$batches'"
is_list "$dtypes" || die 64 "--dtypes takes a list like f32,f16, not '$dtypes'"
for dtype in ${dtypes//,/ }; do
  case $dtype in f32 | f16 | bf16) ;; *) die 64 "--dtypes: '$dtype' is not one of f32, f16, bf16" ;; esac
done
case $device in cuda | cpu) ;; *) die 64 "--device is cuda or cpu, not '$device'" ;; esac
is_count "$texts" || die 64 "--texts takes a count from 1 to 9999999, not '$texts'"
is_count "$light_jobs" || die 64 "--light-jobs takes a count from 1 to 9999999, not '$light_jobs'"
command -v python3 >/dev/null || die 66 "python3 is needed to compare embeddings and write the report"

mkdir -p "$report_dir"
report_json="$report_dir/gpu-report.json"
report_md="$report_dir/gpu-report.md"
results="$report_dir/results.jsonl" # one JSON object per measurement
: >"$results"
machine() {
  python3 - "$@" <<'EOF'
import json, os, platform
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
print(json.dumps({"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release()}))
EOF
}

# Writes the report from $results; $1 is the status (ok, golden_failed,
# no_gpu, failed), $2 the GPU line (or empty).
write_report() {
  python3 - "$1" "$2" "$(machine)" "$results" "$report_json" "$report_md" <<'EOF'
import json, sys
status, gpu, machine, results_path, out_json, out_md = sys.argv[1:7]
rows = [json.loads(l) for l in open(results_path) if l.strip()]
report = {"status": status, "gpu": gpu or None, "machine": json.loads(machine), "measurements": rows}
json.dump(report, open(out_json, "w"), indent=2)
md = ["# jetinfer GPU check", "", f"- status: **{status}**", f"- GPU: {gpu or 'none found'}",
      f"- host: {report['machine']['cpu']}, {report['machine']['cores']} cores", ""]
golden = [r for r in rows if r["kind"] == "golden"]
if golden:
    md += ["| dtype | texts | lowest cosine | bound |", "|---|---|---|---|"]
    md += [f"| {r['dtype']} | {r['texts']} | {r['min_cosine']:.6f} | {r['bound']} |" for r in golden]
    md.append("")
thr = [r for r in rows if r["kind"] == "throughput"]
if thr:
    md += ["| dtype | batch | texts/s | tokens/s | GPU memory used (MiB) |", "|---|---|---|---|---|"]
    md += [f"| {r['dtype']} | {r['batch']} | {r['texts_per_s']:.0f} | {r['tokens_per_s']:.0f} | {r['gpu_memory_used_mib'] if r.get('gpu_memory_used_mib') is not None else 'n/a'} |" for r in thr]
    md.append("")
light = [r for r in rows if r["kind"] == "light"]
if light:
    md += ["| dtype | jobs | p50 ms | p99 ms |", "|---|---|---|---|"]
    md += [f"| {r['dtype']} | {r['jobs']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |" for r in light]
    md.append("")
for r in rows:
    if r["kind"] == "error":
        md.append(f"- error: {r['message']}")
open(out_md, "w").write("\n".join(md) + "\n")
EOF
  echo "gpu-check: report in $report_json and $report_md" >&2
}

# The GPU first: without one nothing else can be measured.
gpu=""
if [ "$device" = cpu ]; then
  gpu="none (a CPU rehearsal: --device cpu)"
elif command -v "$nvidia_smi" >/dev/null 2>&1; then
  gpu=$("$nvidia_smi" --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1 || true)
fi
if [ -z "$gpu" ]; then
  write_report no_gpu ""
  die 69 "no NVIDIA GPU found ('$nvidia_smi' is missing or lists no GPU); nothing measured"
fi
echo "gpu-check: $gpu" >&2

nats_server="$bin/nats-server"
[ -x "$nats_server" ] || nats_server="$root/.cache/bin/nats-server"
for file in "$bin/jetinfer-worker" "$bin/jetinfer" "$bin/jetinfer-loadgen" "$nats_server"; do
  [ -x "$file" ] || die 66 "$file is missing or not executable (scripts/gpu-pack.sh builds the binaries)"
done
for file in "$model/config.json" "$model/tokenizer.json" "$model/model.safetensors" "$golden" "$corpus"; do
  [ -f "$file" ] || die 66 "$file is missing (scripts/gpu-pack.sh packs the model and data)"
done
# candle loads cuBLAS, cuRAND and NVRTC at run time: look where CUDA and the
# Python wheels put them when the loader does not know them.
for dir in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
  /usr/local/lib/python3*/dist-packages/nvidia/*/lib /usr/lib/python3/dist-packages/nvidia/*/lib \
  "$bin/lib"; do
  [ -d "$dir" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$dir"
done

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

nats_port=$(free_port)
"$nats_server" -js -a 127.0.0.1 -p "$nats_port" -sd "$work/store" >"$work/nats.log" 2>&1 &
pids+=($!)
nats_url="nats://127.0.0.1:$nats_port"
for _ in $(seq 50); do
  (exec 3<>"/dev/tcp/127.0.0.1/$nats_port") 2>/dev/null && break
  sleep 0.1
done

worker_pid=""
http_port=""
start_worker() { # dtype max_inputs
  http_port=$(free_port)
  JETINFER_NATS__URLS="[\"$nats_url\"]" \
    JETINFER_MODEL__PATH="$model" JETINFER_MODEL__DEVICE="$device" JETINFER_MODEL__FORWARD=candle \
    JETINFER_MODEL__DTYPE="$1" JETINFER_BATCH__MAX_INPUTS="$2" \
    JETINFER_BATCH__MAX_TOKENS=$(($2 * 256)) JETINFER_PULL__BATCH=$(($2 * 2)) \
    JETINFER_HTTP__ADDR="127.0.0.1:$http_port" \
    "$bin/jetinfer-worker" >"$work/worker-$1-$2.log" 2>&1 &
  worker_pid=$!
  pids+=("$worker_pid")
  for _ in $(seq 600); do # model upload and CUDA start-up: up to 60 s
    curl -fs "http://127.0.0.1:$http_port/readyz" >/dev/null 2>&1 && return 0
    kill -0 "$worker_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "gpu-check: the $device worker did not become ready; its log:" >&2
  tail -20 "$work/worker-$1-$2.log" | python3 -c 'import sys; print(sys.stdin.read().encode("ascii","backslashreplace").decode())' >&2
  return 1
}
stop_worker() {
  kill -TERM "$worker_pid" 2>/dev/null || true
  wait "$worker_pid" 2>/dev/null || true
}
gpu_used_mib() {
  curl -fs "http://127.0.0.1:$http_port/metrics" |
    awk '/^jetinfer_gpu_memory_used_bytes/ { printf "%.0f\n", $2 / 1048576; exit }'
}
record_error() { python3 -c 'import json,sys; print(json.dumps({"kind":"error","message":sys.argv[1]}))' "$1" >>"$results"; }

status=ok
for dtype in ${dtypes//,/ }; do
  bound=$([ "$dtype" = f32 ] && echo 0.9999 || echo 0.999)
  if ! start_worker "$dtype" 64; then
    record_error "$dtype: the CUDA worker did not start (see the worker log lines above)"
    status=failed
    continue
  fi
  # Golden texts through NATS: one job per text, lowest cosine to the reference.
  python3 -c 'import json,sys; [print(t) for t in json.load(open(sys.argv[1]))["texts"]]' "$golden" |
    JETINFER_NATS_URL="$nats_url" "$bin/jetinfer" --timeout 60 embed --model minilm >"$work/golden-$dtype.jsonl"
  python3 - "$golden" "$work/golden-$dtype.jsonl" "$dtype" "$bound" >>"$results" <<'EOF'
import json, math, sys
golden = json.load(open(sys.argv[1]))
got = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))
lowest = min(cos(g["embeddings"][0], r) for g, r in zip(got, golden["embeddings"]))
assert len(got) == len(golden["embeddings"]), "an answer per golden text"
print(json.dumps({"kind": "golden", "dtype": sys.argv[3], "texts": len(got), "min_cosine": lowest, "bound": float(sys.argv[4])}))
EOF
  if python3 -c 'import json,sys; r=[json.loads(l) for l in open(sys.argv[1])][-1]; sys.exit(r["min_cosine"] < r["bound"])' "$results"; then :; else status=golden_failed; fi

  # Light load: one user, single texts, 200 ms apart.
  "$bin/jetinfer-loadgen" run --scenario light --nats-url "$nats_url" --users 1 --think-time 200ms \
    --mix single=100,small=0,large=0 --max-jobs "$light_jobs" --duration 10m --corpus "$corpus" \
    --out "$work/light-$dtype" --quiet >/dev/null
  python3 - "$work/light-$dtype/report.json" "$dtype" >>"$results" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))["summary"]
lat = s["latency"]
print(json.dumps({"kind": "light", "dtype": sys.argv[2], "jobs": s["jobs_ok"], "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"]}))
EOF
  stop_worker

  # Throughput at each batch size: the bulk preset, texts/s and tokens/s.
  for batch in ${batches//,/ }; do
    start_worker "$dtype" "$batch" || { record_error "$dtype batch $batch: the CUDA worker did not start"; status=failed; continue; }
    "$bin/jetinfer-loadgen" run --scenario bulk --nats-url "$nats_url" --max-jobs "$texts" \
      --corpus "$corpus" --out "$work/bulk-$dtype-$batch" --quiet >/dev/null
    used=$(gpu_used_mib || true)
    python3 - "$work/bulk-$dtype-$batch/report.json" "$dtype" "$batch" "${used:-}" >>"$results" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))["summary"]
used = sys.argv[4]
print(json.dumps({"kind": "throughput", "dtype": sys.argv[2], "batch": int(sys.argv[3]),
                  "texts_per_s": s["inputs_per_s"], "tokens_per_s": s["tokens_per_s"],
                  "gpu_memory_used_mib": int(used) if used else None}))
EOF
    stop_worker
  done
done

write_report "$status" "$gpu"
[ "$status" = ok ] || exit 1
