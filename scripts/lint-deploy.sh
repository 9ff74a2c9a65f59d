#!/usr/bin/env bash
# Lints everything that ships or deploys jetinfer, offline after the first run:
#   actionlint + the GitHub workflow schema   .github/workflows/*.yml
#   yamllint (.yamllint.yml)                  workflows, compose files, deploy/, monitoring/
#   Kubernetes schemas + cross-file checks    deploy/k8s/ (scripts/lint_k8s.py)
#   compose-spec schema                       docker-compose*.yml
#   docker compose config -q                  when the compose plugin is installed
#   nats-server -t                            deploy/nats/nats.conf, when .cache/bin/nats-server exists
# The linters are installed once into .cache/lint-venv from the pinned, hashed
# scripts/requirements/lint.txt; the venv is rebuilt only when that file
# changes. Exits non-zero on the first failing check.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

cache="${JETINFER_CACHE:-$root/.cache}"
venv="$cache/lint-venv"
requirements=scripts/requirements/lint.txt
python=${PYTHON:-python3}

want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [ "$(cat "$venv/.requirements.sha256" 2>/dev/null)" != "$want" ]; then
  echo "lint-deploy: installing linters into $venv" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    --no-deps --only-binary=:all: --require-hashes -r "$requirements"
  echo "$want" > "$venv/.requirements.sha256"
fi
bin="$venv/bin"

step() { echo "== lint-deploy: $*" >&2; }

workflows=(.github/workflows/*.yml)
compose_files=(docker-compose.yml docker-compose.monitoring.yml)

step "actionlint ($("$bin/actionlint" -version | head -1))"
if command -v shellcheck >/dev/null; then
  echo "   run: scripts checked with $(shellcheck --version | sed -n 's/^version: /shellcheck /p')" >&2
else
  echo "   run: scripts not shellchecked (shellcheck not installed)" >&2
fi
"$bin/actionlint" -no-color "${workflows[@]}"

step "GitHub workflow and dependabot schemas"
"$bin/check-jsonschema" --builtin-schema vendor.github-workflows "${workflows[@]}"
"$bin/check-jsonschema" --builtin-schema vendor.dependabot .github/dependabot.yml

yaml_targets=(.yamllint.yml .github "${compose_files[@]}" deploy)
[ -d monitoring ] && yaml_targets+=(monitoring)
step "yamllint ${yaml_targets[*]}"
"$bin/yamllint" --config-file .yamllint.yml --format parsable "${yaml_targets[@]}"

step "Kubernetes manifests (deploy/k8s)"
"$bin/python" scripts/lint_k8s.py deploy/k8s

step "compose files against the compose specification"
"$bin/check-jsonschema" --builtin-schema vendor.compose-spec "${compose_files[@]}"

if docker compose version >/dev/null 2>&1; then
  step "docker compose config"
  docker compose -f docker-compose.yml config -q
  docker compose -f docker-compose.yml -f docker-compose.monitoring.yml config -q
else
  step "docker compose config: SKIPPED, the docker compose plugin is not installed here (the compose-spec schema check above still ran)"
fi

nats_server="$cache/bin/nats-server"
if [ -x "$nats_server" ]; then
  step "nats-server -t deploy/nats/nats.conf"
  "$nats_server" -c deploy/nats/nats.conf -t
else
  step "nats-server -t: SKIPPED, no $nats_server (scripts/setup.sh fetches it)"
fi

step "all checks passed"
