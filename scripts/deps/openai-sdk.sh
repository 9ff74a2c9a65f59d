#!/usr/bin/env bash
# The official OpenAI Python SDK, pinned and hashed
# (scripts/requirements/openai-sdk.txt), in a project-local venv at
# .cache/openai-venv for the gateway's SDK test (gateway/tests/openai_sdk.rs).
# Rebuilt only when the requirements file changes.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

cache="${JETINFER_CACHE:-$root/.cache}"
venv="$cache/openai-venv"
requirements=scripts/requirements/openai-sdk.txt
python=${PYTHON:-python3}

want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  echo "deps: installing the OpenAI SDK into $venv" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --no-deps --only-binary=:all: --require-hashes -r "$requirements"
  echo "$want" > "$venv/.requirements.sha256"
fi
