#!/usr/bin/env bash
# Installs cargo-deny (the supply-chain check, scripts/deny.sh) at the pinned
# version with `cargo install --locked`, only when that version is missing.
# Builds from source once (about 3 CPU-minutes). Called by scripts/test.sh.
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
# cargo-deny's release profile is fat LTO in one codegen unit, minutes of a
# 2-core machine for a tool that checks this graph in about a second: build
# it without LTO, in parallel units, at -O1 (the profile settings cargo
# takes from the environment over the crate's own).
CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
  cargo install --locked --quiet "cargo-deny@$version"
