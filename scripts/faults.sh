#!/usr/bin/env bash
# The fault tests at full size (the test suite runs them smaller): 5,000 jobs
# through SIGKILLed workers (echo; 500 with candle), server restarts, a
# 3-node cluster losing its stream leader, poison, overload and drain.
# Prints one line of figures per run. Usage: scripts/faults.sh [jobs]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
JETINFER_FAULT_JOBS=${1:-5000} cargo test --quiet -p jetinfer-worker --test integration faults:: -- --nocapture --test-threads 1 2>&1 |
  grep -oE "(worker crash|server restart|cluster failover|poison|overload|drain)[ (:].*|panicked.*|test result.*"
