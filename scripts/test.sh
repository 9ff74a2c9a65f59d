#!/usr/bin/env bash
# The whole test suite, set-up included: fetches nats-server and the model
# into .cache (once) and the monitoring tools (Debian packages, when missing),
# then the Prometheus/Alertmanager checks, the supply-chain check (cargo deny),
# formatting, lints and every test. `.ci/run` calls
# this; run it yourself the same way: scripts/test.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/deps/tests.sh      # nats-server, the model, Prometheus, Alertmanager, Chromium
bash scripts/deps/cargo-deny.sh # supply-chain check

echo "== promtool, amtool" >&2
promtool check config monitoring/prometheus/prometheus.yml
promtool check rules monitoring/prometheus/rules/*.yml
promtool test rules monitoring/prometheus/tests/*.yml
amtool check-config monitoring/alertmanager/alertmanager.yml

echo "== deployment lint (workflows, compose, Kubernetes, NATS config)" >&2
bash scripts/lint-deploy.sh

echo "== supply chain (cargo deny: advisories, licences, bans, sources)" >&2
bash scripts/deny.sh

echo "== cargo fmt" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test" >&2
cargo test --workspace --locked
