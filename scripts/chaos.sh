#!/usr/bin/env bash
# Chaos at full size: one run of 50,000 jobs (or the count given) on real
# nats-server processes, loopback only, while worker processes are SIGKILLed,
# the echo backend panics on marker inputs, a nats-server is SIGKILLed and
# restarted, a 3-node cluster loses its stream leader, and poison jobs are
# published. The counting is code (worker/tests/chaos.rs); this prints its
# figures: submitted, answered, error replies, dead letters by reason, lost,
# computed twice, answered twice at the client.
# Usage: scripts/chaos.sh [jobs]   (default 50000; e.g. 2000 for a quick run)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
jobs=${1:-50000}
[[ $jobs =~ ^[0-9]+$ ]] && ((jobs >= 100)) || { echo "usage: $0 [jobs >= 100]" >&2; exit 2; }
bash scripts/setup.sh
# The echo backend's own panics (thread 'jetinfer-infer') are the injected
# ones, caught by the worker; any other panic is shown.
JETINFER_CHAOS_JOBS=$jobs cargo test --quiet -p jetinfer-worker --test integration chaos:: -- --nocapture 2>&1 |
  grep -E "^chaos |panicked|faults, first|test result" | grep -v "'jetinfer-infer'"
