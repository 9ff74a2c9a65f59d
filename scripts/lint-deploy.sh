#!/usr/bin/env bash
# Lints everything that ships or deploys jetinfer, offline after the first run:
#   actionlint + the GitHub workflow schema   .github/workflows/*.yml
#   yamllint (.yamllint.yml)                  workflows, compose files, deploy/, monitoring/
#   Kubernetes schemas + cross-file checks    deploy/k8s/ (scripts/lint_k8s.py)
#   compose-spec schema                       docker-compose*.yml
#   docker compose config -q                  when the compose plugin is installed
#   nats-server -t                            deploy/nats/*.conf, when .cache/bin/nats-server exists
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

step "deploy/nats/accounts.conf is what render-accounts.sh writes for its tenants"
diff <(bash deploy/nats/render-accounts.sh acme globex) deploy/nats/accounts.conf

nats_server="$cache/bin/nats-server"
if [ -x "$nats_server" ]; then
  step "nats-server -t deploy/nats/nats.conf"
  "$nats_server" -c deploy/nats/nats.conf -t
  # The hardened configs take the users' public NKeys from the environment:
  # throwaway example keys (public, valid encoding, nobody holds their seeds).
  export JETINFER_WORKER_NKEY=UCK7FNXWOUMWS7KUIVLKD4W3JWPNVB55TKEQO7X4SM2EIULYCOSAOB74
  export JETINFER_OPS_NKEY=UC4V36VDAYZGSLKAT5BZI6H7W66CDRA3UU5B75OGNPKVMOPCV3UKDKLN
  export JETINFER_GATEWAY_NKEY=UCWVEOU6UKJVJQTYGXEGKLHDYUFNWEHPM3MXJ7HTWVLOKNICVAEN3YOL
  export JETINFER_PRODUCER_ACME_NKEY=UBPTYVRFGZF4BZZQVLIZX6CPYOBMVWAED775UP33OJ26YPOK6UDTG6TX
  export JETINFER_PRODUCER_GLOBEX_NKEY=UDBZWDVPLAWR7BVIZKSFQMJTTYHZUEZ3UKTXMDRZWC6O3JJB6CMS5YMW
  step "nats-server -t deploy/nats/nats-secure.conf"
  "$nats_server" -c deploy/nats/nats-secure.conf -t
  # The TLS variant loads its certificates while checking: give it a
  # throwaway self-signed pair in place of /etc/nats/tls/.
  if command -v openssl >/dev/null; then
    step "nats-server -t deploy/nats/nats-tls.conf (throwaway certificate)"
    tls_tmp=$(mktemp -d)
    trap 'rm -rf "$tls_tmp"' EXIT
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
      -subj /CN=lint -keyout "$tls_tmp/server-key.pem" -out "$tls_tmp/server.pem" 2>/dev/null
    cp "$tls_tmp/server.pem" "$tls_tmp/ca.pem"
    cp deploy/nats/*.conf "$tls_tmp/"
    sed -i "s#/etc/nats/tls/#$tls_tmp/#g" "$tls_tmp/nats-tls.conf"
    "$nats_server" -c "$tls_tmp/nats-tls.conf" -t
  else
    step "nats-server -t deploy/nats/nats-tls.conf: SKIPPED, no openssl to make a throwaway certificate"
  fi
else
  step "nats-server -t: SKIPPED, no $nats_server (scripts/setup.sh fetches it)"
fi

step "all checks passed"
