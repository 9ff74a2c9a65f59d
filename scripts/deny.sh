#!/usr/bin/env bash
# The supply-chain check: cargo-deny with deny.toml over the whole dependency
# graph (all features).
#   licenses, bans, sources   always (need only the crates, via cargo)
#   advisories                when the RustSec advisory database can be had:
#                             it is a git repository on GitHub, which is not
#                             reachable from every machine that runs the tests.
#                             Unreachable: a copy fetched earlier is used and its
#                             date printed; with none, the check is SKIPPED with
#                             a message, or fails when JETINFER_REQUIRE_ADVISORIES=1
#                             (CI with network access sets it).
# Called by scripts/test.sh after scripts/deps/cargo-deny.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { echo "== cargo deny: $*" >&2; }

if ! command -v cargo-deny >/dev/null; then
  if [ "${JETINFER_REQUIRE_ADVISORIES:-0}" = 1 ]; then
    echo "cargo deny: cargo-deny is not installed (scripts/deps/cargo-deny.sh)" >&2
    exit 1
  fi
  step "SKIPPED: cargo-deny is not installed here (scripts/deps/cargo-deny.sh says why)"
  exit 0
fi

step "licenses, bans, sources ($(cargo deny --version))"
cargo deny check licenses bans sources

db_url=https://github.com/rustsec/advisory-db
db_root="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
if timeout 20 git ls-remote "$db_url" HEAD >/dev/null 2>&1; then
  step "advisories (fetching the RustSec database)"
  cargo deny check advisories
  exit 0
fi

cached=$(find "$db_root" -mindepth 2 -maxdepth 2 -name .git -type d 2>/dev/null | head -1 || true)
if [ -n "$cached" ]; then
  db=$(dirname "$cached")
  step "advisories against the copy in $db, last updated $(git -C "$db" log -1 --format=%cs 2>/dev/null || echo '(unknown)'): $db_url is unreachable from here"
  cargo deny --offline check advisories
elif [ "${JETINFER_REQUIRE_ADVISORIES:-0}" = 1 ]; then
  echo "cargo deny: advisories cannot run: $db_url is unreachable and no copy is in $db_root" >&2
  exit 1
else
  step "advisories SKIPPED: the RustSec database ($db_url) is unreachable from this machine and no copy is in $db_root; known vulnerabilities were NOT checked here (CI with network access runs them)"
fi
