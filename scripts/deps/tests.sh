#!/usr/bin/env bash
# Everything `cargo test --workspace` needs besides Rust, each installed only
# when missing: nats-server and the model (scripts/setup.sh, into .cache),
# Prometheus and Alertmanager (the monitoring tests start both),
# headless Chromium (the loadgen HTML report test) and the OpenAI Python SDK
# (the gateway's SDK test). scripts/test.sh and the
# coverage job in .github/workflows/ci.yml both run it, so the two set up
# the same machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

bash scripts/setup.sh
bash scripts/deps/monitoring.sh
bash scripts/deps/chromium.sh
bash scripts/deps/openai-sdk.sh
