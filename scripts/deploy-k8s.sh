#!/usr/bin/env bash
# Rolls the jetinfer worker out to the cluster kubectl points at, checks it,
# and rolls back to the previous image if the check fails. deploy.yml runs it
# for staging and production; it works the same by hand:
#
#   scripts/deploy-k8s.sh ghcr.io/<owner>/jetinfer-worker:sha-<commit>
#
# 1. records the image the Deployment runs now;
# 2. applies deploy/k8s with the new image (a throwaway kustomize overlay);
# 3. waits for the rollout, then checks /readyz inside every worker pod and
#    sends a real job through the queue with the image's own CLI;
# 4. on any failure, sets the recorded image back, waits for that rollout,
#    and exits non-zero.
# Env: NAMESPACE (jetinfer), NATS_URL (the Helm chart's client service),
# ROLLOUT_TIMEOUT (10m).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

image=${1:?usage: scripts/deploy-k8s.sh IMAGE:TAG}
case "$image" in *:*) ;; *) echo "deploy: give the image with its tag, got '$image'" >&2; exit 2 ;; esac
namespace=${NAMESPACE:-jetinfer}
nats_url=${NATS_URL:-nats://nats.nats.svc.cluster.local:4222}
timeout=${ROLLOUT_TIMEOUT:-10m}
deployment=deployment/jetinfer-worker
kc=(kubectl --namespace "$namespace")

previous=$("${kc[@]}" get "$deployment" --ignore-not-found \
  -o jsonpath='{.spec.template.spec.containers[?(@.name=="worker")].image}')
echo "deploy: $namespace now runs ${previous:-nothing}; deploying $image" >&2

# The overlay re-targets the image the base kustomization sets.
base_image=$(sed -n 's/^ *newName: *//p' deploy/k8s/kustomization.yaml | head -1)
overlay=$(mktemp -d "$root/.deploy-overlay.XXXXXX")
trap 'rm -rf "$overlay"' EXIT
cat > "$overlay/kustomization.yaml" <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../deploy/k8s
images:
  - name: ${base_image}
    newName: ${image%:*}
    newTag: ${image##*:}
YAML

check() {
  "${kc[@]}" rollout status "$deployment" --timeout "$timeout" || return 1
  local pods pod
  pods=$("${kc[@]}" get pods -l app.kubernetes.io/name=jetinfer-worker \
    --field-selector=status.phase=Running -o name)
  [ -n "$pods" ] || { echo "deploy: no running worker pods" >&2; return 1; }
  for pod in $pods; do
    "${kc[@]}" exec "$pod" -c worker -- curl -fsS --max-time 5 http://127.0.0.1:9464/readyz >/dev/null \
      || { echo "deploy: $pod is not ready" >&2; return 1; }
  done
  echo "deploy: /readyz ok on $(wc -w <<<"$pods") pod(s); sending a job through the queue" >&2
  "${kc[@]}" run "jetinfer-deploy-check-$(date +%s)" --image "$image" --restart Never \
    --rm -i --quiet --pod-running-timeout 3m --command -- \
    jetinfer --nats-url "$nats_url" --tenant deploy-check --timeout 60 \
    embed --summary "jetinfer deploy check"
}

"${kc[@]}" apply -k "$overlay"
if check; then
  echo "deploy: $image is healthy" >&2
  exit 0
fi

echo "deploy: health check FAILED for $image" >&2
if [ -n "$previous" ] && [ "$previous" != "$image" ]; then
  echo "deploy: rolling back to $previous" >&2
  "${kc[@]}" set image "$deployment" "worker=$previous"
  "${kc[@]}" rollout status "$deployment" --timeout "$timeout"
  echo "deploy: rolled back to $previous" >&2
else
  echo "deploy: no previous image to roll back to" >&2
fi
exit 1
