#!/usr/bin/env bash
# The whole test suite, set-up included: fetches nats-server and the model
# into .cache (once) and the monitoring tools (Debian packages, when missing),
# then the Prometheus/Alertmanager checks, the supply-chain check (cargo deny),
# formatting, lints and every test. `.ci/run` calls
# this; run it yourself the same way: scripts/test.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Each step is announced with the seconds elapsed so far, so a slow step shows
# in any log of this script (CI keeps it).
step() { echo "== [${SECONDS}s] $*" >&2; }

step "set-up"
bash scripts/deps/tests.sh      # nats-server, the model, Prometheus, Alertmanager, Chromium
step "cargo-deny (installed when missing)"
bash scripts/deps/cargo-deny.sh # supply-chain check

step "promtool, amtool"
promtool check config monitoring/prometheus/prometheus.yml
promtool check rules monitoring/prometheus/rules/*.yml
promtool test rules monitoring/prometheus/tests/*.yml
amtool check-config monitoring/alertmanager/alertmanager.yml

step "deployment lint (workflows, compose, Kubernetes, NATS config)"
bash scripts/lint-deploy.sh

step "supply chain (cargo deny: advisories, licences, bans, sources)"
bash scripts/deny.sh

step "cargo fmt"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
step "cargo clippy --features cuda (the GPU build, linted without a GPU)"
# The CUDA toolchain comes from pinned wheels (scripts/deps/cuda.sh); candle's
# kernels compile with it for Hopper (sm_90), no GPU or driver needed. The
# same target directory as the lints above: the crates whose features differ
# (candle, the worker) are checked side by side with their CPU builds, and
# every other dependency is checked once. The library and binary only: the
# CUDA code lives there, and the tests differ with the feature only by a
# `cfg!` value (re-checking forty test targets cost minutes for no code of
# their own).
CUDA_HOME=$(bash scripts/deps/cuda.sh)
PATH="$CUDA_HOME/bin:$PATH" CUDA_HOME="$CUDA_HOME" CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} \
  cargo clippy -p jetinfer-worker --features cuda --lib --bins --locked -- -D warnings
step "cargo test"
# The gateway's binary is built with the workspace, so the dashboard test
# checks its panels against a live gateway: a skip would be a failure.
JETINFER_REQUIRE_GATEWAY=1 cargo test --workspace --locked

step "GPU check: no-GPU exit and a CPU rehearsal of every step"
# On a machine without an NVIDIA GPU the check must say so and exit 69; the
# rehearsal runs the same pipeline (nats-server, worker, golden texts through
# NATS, loadgen light and bulk runs, the report) on the CPU, small.
gpu_report=$(mktemp -d)
shared=${JETINFER_SHARED_DATA:-../shared/data}
status=0
NVIDIA_SMI=/nonexistent/nvidia-smi bash scripts/gpu-check.sh --report "$gpu_report/none" || status=$?
[ "$status" = 69 ] || { echo "gpu-check: expected exit 69 without a GPU, got $status" >&2; exit 1; }
grep -q '"status": "no_gpu"' "$gpu_report/none/gpu-report.json"
# The binaries are the ones `cargo test` just built for the integration
# tests. A `cargo build` here would rebuild every workspace crate, since the
# tests enable jetinfer-nats' `testing` feature (a test-server helper the
# binaries never call) and a plain build does not: two minutes of a 2-core
# machine for the same binaries.
bash scripts/gpu-check.sh --device cpu --bin target/debug --model .cache/models/all-MiniLM-L6-v2 \
  --golden "$shared/minilm_golden.json" --corpus "$shared/bench_corpus.json" \
  --dtypes f32 --batches 16 --texts 64 --light-jobs 5 --report "$gpu_report/cpu"
cat "$gpu_report/cpu/gpu-report.md" >&2
rm -rf "$gpu_report"
step "done"
