#!/usr/bin/env bash
# Rolls the jetinfer worker out to the cluster kubectl points at, checks it,
# and, if anything fails, puts every object it applied back as it was.
# deploy.yml runs it for staging and production; it works the same by hand:
#
#   scripts/deploy-k8s.sh ghcr.io/<owner>/jetinfer-worker:sha-<commit>
#
# 1. renders deploy/k8s with the new image into applied.yaml (a throwaway
#    kustomize overlay: the image, the gateway's image of the same tag,
#    $NAMESPACE, and a pod annotation with the ConfigMaps' SHA-256, so a
#    configuration change alone rolls the pods too);
# 2. records each of those objects as it is now: the configuration last
#    applied to it (the annotation every `kubectl apply` leaves), with the
#    Deployment's image set to the one it runs (a `kubectl set image` since
#    the last apply is kept); an object not there yet is new;
# 3. applies applied.yaml, waits for the rollout, checks /readyz inside every
#    worker pod and sends a real job through the queue with the image's own
#    CLI, as tenant $CHECK_TENANT, with the NATS credentials of the Secret
#    jetinfer-deploy-check-nats if there is one (keys as for the workers'
#    jetinfer-worker-nats: auth_kind, seed, inbox_prefix; deployment.yaml);
#    and waits for the gateway's rollout when its keys Secret exists
#    (without it its pods wait for the Secret: said, not failed);
# 4. if the apply or any check fails: applies the recorded configurations
#    again, deletes the objects this run created, waits for that rollout, and
#    exits 1.
# The Namespace object is applied but neither recorded nor ever deleted. A
# first deployment that fails stays in place: there is nothing to go back to.
#
# Env: NAMESPACE (jetinfer), GATEWAY_IMAGE (IMAGE with jetinfer-worker
# replaced by jetinfer-gateway: docker.yml pushes both with the same tags),
# NATS_URL (the Helm chart's client service),
# CHECK_TENANT (deploy-check), ROLLOUT_TIMEOUT (10m), DEPLOY_RECORD (a
# directory that keeps applied.yaml, previous/ and created.txt, e.g. for a CI
# artifact; default: a temporary one).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

die() { echo "deploy: $*" >&2; exit 2; }
image=${1:?usage: scripts/deploy-k8s.sh IMAGE:TAG}
case "$image" in
  *[!A-Za-z0-9._/:-]*) die "'$image' is not an image name" ;;
  *:*) ;;
  *) die "give the image with its tag, got '$image'" ;;
esac
namespace=${NAMESPACE:-jetinfer}
case "$image" in
  */jetinfer-worker:*) default_gateway_image=${image%/jetinfer-worker:*}/jetinfer-gateway:${image##*:} ;;
  *) default_gateway_image= ;;
esac
gateway_image=${GATEWAY_IMAGE:-$default_gateway_image}
[ -n "$gateway_image" ] || die "'$image' is not .../jetinfer-worker:TAG: name the gateway's image in GATEWAY_IMAGE"
case "$gateway_image" in
  *[!A-Za-z0-9._/:-]*) die "GATEWAY_IMAGE '$gateway_image' is not an image name" ;;
  *:*) ;;
  *) die "give GATEWAY_IMAGE with its tag, got '$gateway_image'" ;;
esac
nats_url=${NATS_URL:-nats://nats.nats.svc.cluster.local:4222}
tenant=${CHECK_TENANT:-deploy-check}
timeout=${ROLLOUT_TIMEOUT:-10m}
# Each goes into a manifest below: only characters that need no quoting.
[[ $namespace =~ ^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$ ]] || die "NAMESPACE '$namespace' is not a namespace name"
[[ $nats_url =~ ^[a-z]+://[A-Za-z0-9.:,/_-]+$ ]] || die "NATS_URL '$nats_url' is not a NATS URL (list)"
[[ $tenant =~ ^[a-z0-9][a-z0-9_-]{0,63}$ ]] || die "CHECK_TENANT '$tenant' is not a tenant name"
deployment=deployment/jetinfer-worker
gateway_deployment=deployment/jetinfer-gateway
gateway_keys_secret=jetinfer-gateway-keys
check_secret=jetinfer-deploy-check-nats
kc=(kubectl --namespace "$namespace")

work=$(mktemp -d)
overlay=$(mktemp -d "$root/.deploy-overlay.XXXXXX") # kustomize wants the base relative
trap 'rm -rf "$overlay" "$work"' EXIT
record=${DEPLOY_RECORD:-$work/record}
mkdir -p "$record"
rm -rf "$record/previous" "$record/applied.yaml" "$record/created.txt"
mkdir "$record/previous"

live_image() {
  "${kc[@]}" get "$deployment" --ignore-not-found \
    -o jsonpath='{.spec.template.spec.containers[?(@.name=="worker")].image}'
}

# --- 1. render ---------------------------------------------------------------
base_image=$(sed -n 's/^ *newName: *//p' deploy/k8s/kustomization.yaml | head -1)
gateway_base_image=$(sed -n 's/^ *newName: *\(.*\/jetinfer-gateway\)$/\1/p' deploy/k8s/kustomization.yaml | head -1)
[ -n "$gateway_base_image" ] || die "deploy/k8s/kustomization.yaml names no jetinfer-gateway image"
overlay_for() { # config sha-256 (empty: no annotation) -> kustomization.yaml
  cat <<YAML
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
namespace: ${namespace}
resources:
  - ../deploy/k8s
images:
  - name: ${base_image}
    newName: ${image%:*}
    newTag: "${image##*:}"
  - name: ${gateway_base_image}
    newName: ${gateway_image%:*}
    newTag: "${gateway_image##*:}"
YAML
  [ -z "$1" ] || cat <<YAML
patches:
  - target:
      kind: Deployment
      name: jetinfer-(worker|gateway)
    patch: |-
      - op: add
        path: /spec/template/metadata/annotations/jetinfer~1config-sha256
        value: "$1"
YAML
}
overlay_for "" > "$overlay/kustomization.yaml"
config_sha=$(kubectl kustomize "$overlay" | awk '
  /^---$/ { if (configmap) printf "%s", doc; doc = ""; configmap = 0; next }
  { doc = doc $0 "\n" }
  /^kind: ConfigMap$/ { configmap = 1 }
  END { if (configmap) printf "%s", doc }' | sha256sum | cut -d' ' -f1)
overlay_for "$config_sha" > "$overlay/kustomization.yaml"
kubectl kustomize "$overlay" > "$record/applied.yaml"

# --- 2. record what is there now ---------------------------------------------
previous_image=$(live_image)
echo "deploy: $namespace now runs ${previous_image:-nothing}; deploying $image (gateway $gateway_image)" >&2
existing=$("${kc[@]}" get -f "$record/applied.yaml" --ignore-not-found -o name)
unrecorded=()
for object in $existing; do
  case "$object" in namespace/*) continue ;; esac
  file="$record/previous/${object//\//_}.json"
  if ! "${kc[@]}" apply view-last-applied "$object" -o json > "$file" 2>/dev/null; then
    rm -f "$file"
    unrecorded+=("$object")
    continue
  fi
  case "$object" in
    deployment*/jetinfer-worker)
      # Prints nothing when the recorded image already is the one it runs.
      kubectl set image --local -f "$file" "worker=$previous_image" -o json > "$file.new"
      if [ -s "$file.new" ]; then mv "$file.new" "$file"; else rm -f "$file.new"; fi
      ;;
  esac
done
echo "deploy: recorded the previous configuration of $(find "$record/previous" -name '*.json' | wc -l) object(s)" >&2
if [ ${#unrecorded[@]} -gt 0 ]; then
  echo "deploy: WARNING: ${unrecorded[*]} carry no last-applied configuration (not made by kubectl apply):" \
    "a rollback cannot restore them (the Deployment's image still goes back)" >&2
fi

# --- 3. apply and check ------------------------------------------------------
check_pod() { # pod name -> manifest of the pod that sends one job
  cat <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: $1
  labels:
    app.kubernetes.io/name: jetinfer-deploy-check
    app.kubernetes.io/part-of: jetinfer
spec:
  restartPolicy: Never
  activeDeadlineSeconds: 300
  automountServiceAccountToken: false
  securityContext:
    runAsNonRoot: true
    runAsUser: 10001
    runAsGroup: 10001
    fsGroup: 10001
    seccompProfile:
      type: RuntimeDefault
  containers:
    - name: check
      image: "$image"
      command: ["jetinfer"]
      args: ["--nats-url", "$nats_url", "--tenant", "$tenant", "--timeout", "60",
             "embed", "--summary", "jetinfer deploy check"]
      # Unset without the Secret (or its key): no credentials, as the Helm
      # chart's NATS expects; the seed path alone changes nothing.
      env:
        - name: JETINFER_NATS__AUTH__KIND
          valueFrom:
            secretKeyRef: { name: $check_secret, key: auth_kind, optional: true }
        - name: JETINFER_NATS__AUTH__SEED_FILE
          value: /run/secrets/nats/seed
        - name: JETINFER_NATS__INBOX_PREFIX
          valueFrom:
            secretKeyRef: { name: $check_secret, key: inbox_prefix, optional: true }
      resources:
        requests: { cpu: 100m, memory: 64Mi }
        limits: { cpu: "1", memory: 256Mi }
      securityContext:
        allowPrivilegeEscalation: false
        readOnlyRootFilesystem: true
        capabilities:
          drop: ["ALL"]
      volumeMounts:
        - { name: nats-credentials, mountPath: /run/secrets/nats, readOnly: true }
        - { name: tmp, mountPath: /tmp }
  volumes:
    - name: nats-credentials
      secret:
        secretName: $check_secret
        optional: true
        defaultMode: 0440
    - name: tmp
      emptyDir:
        sizeLimit: 16Mi
YAML
}

send_job() {
  local pod phase i
  pod="jetinfer-deploy-check-$(date +%s)"
  if [ -n "$("${kc[@]}" get secret "$check_secret" --ignore-not-found -o name 2>/dev/null)" ]; then
    echo "deploy: sending a job as tenant $tenant with the NATS credentials of Secret $check_secret" >&2
  else
    echo "deploy: sending a job as tenant $tenant without NATS credentials (no Secret $check_secret seen)" >&2
  fi
  check_pod "$pod" > "$work/check-pod.yaml"
  "${kc[@]}" create -f "$work/check-pod.yaml" >/dev/null || return 1
  # Bounded by the pod's activeDeadlineSeconds (300 s): image pull, start, the job's 60 s.
  phase=
  for ((i = 0; i < 160; i++)); do
    phase=$("${kc[@]}" get pod "$pod" -o jsonpath='{.status.phase}' 2>/dev/null) || phase=
    case "$phase" in Succeeded | Failed) break ;; esac
    sleep 2
  done
  "${kc[@]}" logs "$pod" -c check --tail 50 >&2 || true
  "${kc[@]}" delete pod "$pod" --ignore-not-found --wait=false >/dev/null || true
  [ "$phase" = Succeeded ] || { echo "deploy: the check job ended ${phase:-unfinished} (pod $pod)" >&2; return 1; }
}

check() {
  "${kc[@]}" rollout status "$deployment" --timeout "$timeout" || return 1
  local pods pod
  pods=$("${kc[@]}" get pods -l app.kubernetes.io/name=jetinfer-worker \
    --field-selector=status.phase=Running -o name) || return 1
  [ -n "$pods" ] || { echo "deploy: no running worker pods" >&2; return 1; }
  for pod in $pods; do
    "${kc[@]}" exec "$pod" -c worker -- curl -fsS --max-time 5 http://127.0.0.1:9464/readyz >/dev/null \
      || { echo "deploy: $pod is not ready" >&2; return 1; }
  done
  echo "deploy: /readyz ok on $(wc -w <<<"$pods") pod(s)" >&2
  send_job || return 1
  if [ -n "$("${kc[@]}" get secret "$gateway_keys_secret" --ignore-not-found -o name 2>/dev/null)" ]; then
    "${kc[@]}" rollout status "$gateway_deployment" --timeout "$timeout" || return 1
  else
    echo "deploy: gateway not checked: no Secret $gateway_keys_secret, its pods wait for it (docs/deployment.md)" >&2
  fi
}

if "${kc[@]}" apply -f "$record/applied.yaml" && check; then
  echo "deploy: $image is healthy" >&2
  exit 0
fi

# --- 4. roll back ------------------------------------------------------------
echo "deploy: FAILED for $image" >&2
if [ -z "$previous_image" ]; then
  echo "deploy: $namespace ran no worker before: nothing to roll back to; the objects stay for inspection" >&2
  exit 1
fi
now=$("${kc[@]}" get -f "$record/applied.yaml" --ignore-not-found -o name) || now=
created=()
for object in $now; do
  case "$object" in namespace/*) continue ;; esac
  grep -qxF "$object" <<<"$existing" || created+=("$object")
done
: > "$record/created.txt"
[ ${#created[@]} -eq 0 ] || printf '%s\n' "${created[@]}" > "$record/created.txt"
echo "deploy: rolling back to $previous_image and the configuration recorded before" >&2
if [ -n "$(find "$record/previous" -name '*.json')" ]; then
  "${kc[@]}" apply -f "$record/previous"
fi
if [ ${#created[@]} -gt 0 ]; then
  echo "deploy: deleting what this deployment created: ${created[*]}" >&2
  "${kc[@]}" delete --ignore-not-found "${created[@]}"
fi
if [ "$(live_image)" != "$previous_image" ]; then # a Deployment not made by kubectl apply
  "${kc[@]}" set image "$deployment" "worker=$previous_image"
fi
"${kc[@]}" rollout status "$deployment" --timeout "$timeout"
echo "deploy: rolled back to $previous_image" >&2
exit 1
