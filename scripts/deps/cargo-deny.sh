#!/usr/bin/env bash
# Installs cargo-deny (the supply-chain check, scripts/deny.sh) at the pinned
# version with `cargo install --locked`, only when that version is missing.
# Builds from source once (a few minutes on 2 cores). Called by scripts/test.sh.
set -euo pipefail

version=0.20.2
# cargo-deny 0.20 needs Rust 1.88 to build.
min_rust=1.88

if cargo deny --version 2>/dev/null | grep -qx "cargo-deny $version"; then
  exit 0
fi
rust=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$min_rust" "$rust" | sort -V | head -1)" != "$min_rust" ]; then
  echo "deps: cargo-deny $version needs Rust >= $min_rust to build; this is $rust: not installed" >&2
  exit 0
fi
echo "deps: installing cargo-deny $version (cargo install --locked)" >&2
cargo install --locked --quiet "cargo-deny@$version"
