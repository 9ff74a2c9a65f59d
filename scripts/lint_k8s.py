"""Offline validation of deploy/k8s, run by scripts/lint-deploy.sh in its venv.

Built-in kinds are checked strictly (unknown fields are errors) against the
Kubernetes OpenAPI schemas bundled in the kubernetes-validate package, for
the oldest and newest Kubernetes versions jetinfer supports. The two custom
resources are checked against hand-written schemas in scripts/schemas/.
Then the numbers that must agree across files are checked: shutdown budget,
consumer name, scaling bounds, and the kustomization's resource list; and,
for every Deployment, what wires it together: selectors that select its pods
(Service, PodDisruptionBudget, ServiceMonitor), ports that exist, probes on
the paths the binaries serve, --config in a mounted ConfigMap key, one owner
of its replica count, and for the gateway the files its config names in
mounted Secrets.

Usage: python scripts/lint_k8s.py deploy/k8s
"""

import pathlib
import sys
import tomllib

import jsonschema
import kubernetes_validate
import yaml

# The oldest Kubernetes still widely run and the newest the package knows.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.utils.latest_version())
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
}
SCHEMA_DIR = pathlib.Path(__file__).resolve().parent / "schemas"

errors: list[str] = []


def fail(where: str, message: str) -> None:
    errors.append(f"{where}: {message}")


def load(directory: pathlib.Path) -> tuple[dict, dict[str, list[dict]]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    manifests = {}
    for path in sorted(directory.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            manifests[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d]
    return kustomization, manifests


def validate_schemas(manifests: dict[str, list[dict]]) -> None:
    for name, docs in manifests.items():
        for doc in docs:
            where = f"{name} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            schema_file = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
            if schema_file:
                schema = yaml.safe_load((SCHEMA_DIR / schema_file).read_text())
                for e in jsonschema.Draft202012Validator(schema).iter_errors(doc):
                    fail(where, f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}")
                continue
            for version in K8S_VERSIONS:
                try:
                    kubernetes_validate.validate(doc, version, strict=True)
                except kubernetes_validate.ValidationError as e:
                    path = ".".join(map(str, e.absolute_path)) or "<root>"
                    fail(where, f"Kubernetes {version}: {path}: {e.message}")
                except kubernetes_validate.SchemaNotFoundError:
                    fail(where, f"no schema for {doc.get('apiVersion')} {doc.get('kind')} in Kubernetes {version}")


def find(manifests: dict[str, list[dict]], kind: str, name: str | None = None) -> dict:
    found = [d for docs in manifests.values() for d in docs
             if d.get("kind") == kind and name in (None, d["metadata"]["name"])]
    if len(found) != 1:
        fail("deploy/k8s", f"expected exactly one {kind}{f' {name}' if name else ''}, found {len(found)}")
        return {}
    return found[0]


def all_of(manifests: dict[str, list[dict]], kind: str) -> list[dict]:
    return [d for docs in manifests.values() for d in docs if d.get("kind") == kind]


def check_consistency(kustomization: dict, manifests: dict[str, list[dict]]) -> None:
    listed = set(kustomization.get("resources", []))
    for name in sorted(listed - manifests.keys()):
        fail("kustomization.yaml", f"lists {name}, which does not exist")
    for name in sorted(manifests.keys() - listed):
        fail("kustomization.yaml", f"does not list {name}")

    check_wiring(manifests)
    check_gateway(manifests)
    configmap = find(manifests, "ConfigMap", "jetinfer-worker-config")
    deployment = find(manifests, "Deployment", "jetinfer-worker")
    scaled = find(manifests, "ScaledObject")
    if not (configmap and deployment and scaled):
        return
    try:
        config = tomllib.loads(configmap["data"]["worker.toml"])
    except (KeyError, tomllib.TOMLDecodeError) as e:
        fail("configmap.yaml", f"worker.toml: {e}")
        return

    pod = deployment["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "worker")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_s = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
    drain = config.get("shutdown", {}).get("drain_timeout")
    ack_wait = config.get("consumer", {}).get("ack_wait", 60)
    if not isinstance(drain, int):
        fail("configmap.yaml", "[shutdown] drain_timeout must be set (seconds)")
    else:
        if grace <= pre_stop_s + drain:
            fail("deployment.yaml", f"terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop_s}s + drain_timeout {drain}s")
        if ack_wait <= drain:
            fail("configmap.yaml", f"ack_wait {ack_wait}s must exceed drain_timeout {drain}s")

    http_port = int(config.get("http", {}).get("addr", ":0").rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    if ports.get("metrics") != http_port:
        fail("deployment.yaml", f"metrics port {ports.get('metrics')} differs from [http] addr port {http_port}")

    model = config.get("model", {}).get("name", "minilm")
    triggers = {t["type"]: t["metadata"] for t in scaled["spec"]["triggers"]}
    js = triggers.get("nats-jetstream")
    if not js:
        fail("scaledobject.yaml", "no nats-jetstream trigger")
    else:
        if js["consumer"] != f"worker-{model}":
            fail("scaledobject.yaml", f"consumer {js['consumer']} is not worker-{model}")
        stream = config.get("stream", {}).get("name", "JETINFER_JOBS")
        if js["stream"] != stream:
            fail("scaledobject.yaml", f"stream {js['stream']} is not {stream}")
        pull = config.get("pull", {}).get("batch", 128)
        if int(js["lagThreshold"]) < pull:
            fail("scaledobject.yaml", f"lagThreshold {js['lagThreshold']} is below one pull ({pull}): in-flight work alone would add replicas")
        max_ack = config.get("consumer", {}).get("max_ack_pending", 1024)
        if scaled["spec"]["maxReplicaCount"] * pull > max_ack:
            fail("scaledobject.yaml", f"maxReplicaCount x pull.batch exceeds max_ack_pending {max_ack}: extra workers would idle")
    if scaled["spec"]["scaleTargetRef"]["name"] != deployment["metadata"]["name"]:
        fail("scaledobject.yaml", "scaleTargetRef does not name the Deployment")


# What each binary serves over HTTP (worker/src/http.rs, gateway/src/lib.rs):
# liveness and startup on /healthz (up while the process runs), readiness on
# /readyz (which turns 503 while NATS is away: a liveness probe there would
# restart every pod during a NATS outage).
PROBE_PATHS = {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
# The gateway's defaults for what its config may leave out (gateway/src/config.rs).
GATEWAY_DEFAULT_SHUTDOWN_GRACE_S = 30
GATEWAY_IMAGE_LISTEN = "0.0.0.0:8080"  # deploy/docker/Dockerfile, target gateway


def selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", selector)
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def pod_of(deployment: dict) -> dict:
    return deployment["spec"]["template"]


def container_ports(deployment: dict) -> dict:
    return {p.get("name", str(p["containerPort"])): p["containerPort"]
            for c in pod_of(deployment)["spec"]["containers"] for p in c.get("ports", [])}


def port_exists(port, ports: dict) -> bool:
    return port in ports if isinstance(port, str) else port in ports.values()


def check_wiring(manifests: dict[str, list[dict]]) -> None:
    deployments = all_of(manifests, "Deployment")
    by_name = {d["metadata"]["name"]: d for d in deployments}
    configmaps = {c["metadata"]["name"]: c for c in all_of(manifests, "ConfigMap")}

    def selected(where: str, selector: dict) -> dict | None:
        hits = [d for d in deployments if selects(selector, pod_of(d)["metadata"].get("labels", {}))]
        if len(hits) != 1:
            fail(where, f"selector {selector} selects {len(hits)} Deployments' pods, not one")
            return None
        return hits[0]

    for d in deployments:
        name = d["metadata"]["name"]
        where = f"Deployment/{name}"
        pod = pod_of(d)
        if not selects(d["spec"]["selector"], pod["metadata"].get("labels", {})):
            fail(where, "spec.selector does not select the pod template's labels")
        if not pod["spec"].get("securityContext", {}).get("runAsNonRoot"):
            fail(where, "the pod must set securityContext.runAsNonRoot")
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        ports = container_ports(d)
        for c in pod["spec"]["containers"]:
            sc = c.get("securityContext", {})
            if not sc.get("readOnlyRootFilesystem") or sc.get("allowPrivilegeEscalation", True):
                fail(where, f"container {c['name']}: readOnlyRootFilesystem true and allowPrivilegeEscalation false")
            for probe, path in PROBE_PATHS.items():
                get = c.get(probe, {}).get("httpGet")
                if get is None:
                    fail(where, f"container {c['name']}: no {probe} httpGet")
                    continue
                if get.get("path") != path:
                    fail(where, f"container {c['name']}: {probe} on {get.get('path')}, the binary serves it on {path}")
                if not port_exists(get.get("port"), ports):
                    fail(where, f"container {c['name']}: {probe} port {get.get('port')} is not a container port")
            mounts = c.get("volumeMounts", [])
            for m in mounts:
                if m["name"] not in volumes:
                    fail(where, f"container {c['name']}: mounts volume {m['name']}, which the pod does not have")
            # --config FILE must be a key of a mounted ConfigMap.
            args = c.get("args", [])
            if "--config" in args:
                path = args[args.index("--config") + 1]
                found = False
                for m in mounts:
                    cm = volumes.get(m["name"], {}).get("configMap")
                    prefix = m["mountPath"].rstrip("/") + "/"
                    if cm and path.startswith(prefix):
                        key = path[len(prefix):]
                        found = key in configmaps.get(cm["name"], {}).get("data", {})
                        if not found:
                            fail(where, f"--config {path}: ConfigMap {cm['name']} has no key {key}")
                        found = True
                if not found:
                    fail(where, f"--config {path} is in no mounted ConfigMap")

    for svc in all_of(manifests, "Service"):
        where = f"Service/{svc['metadata']['name']}"
        d = selected(where, svc["spec"].get("selector", {}))
        if d:
            for p in svc["spec"]["ports"]:
                if not port_exists(p.get("targetPort", p["port"]), container_ports(d)):
                    fail(where, f"targetPort {p.get('targetPort')} is not a port of Deployment/{d['metadata']['name']}")
    for pdb in all_of(manifests, "PodDisruptionBudget"):
        selected(f"PodDisruptionBudget/{pdb['metadata']['name']}", pdb["spec"]["selector"])
    services = all_of(manifests, "Service")
    for sm in all_of(manifests, "ServiceMonitor"):
        where = f"ServiceMonitor/{sm['metadata']['name']}"
        hits = [s for s in services if selects(sm["spec"]["selector"], s["metadata"].get("labels", {}))]
        if len(hits) != 1:
            fail(where, f"selects {len(hits)} Services, not one")
            continue
        names = {p.get("name") for p in hits[0]["spec"]["ports"]}
        for e in sm["spec"]["endpoints"]:
            if e.get("port") not in names:
                fail(where, f"endpoint port {e.get('port')} is not a port of Service/{hits[0]['metadata']['name']}")
            if e.get("path", "/metrics") != "/metrics":
                fail(where, f"endpoint path {e.get('path')}: the binaries serve /metrics")

    # One owner of each replica count: an HPA and a KEDA ScaledObject (which
    # makes an HPA of its own) on one Deployment fight each other.
    owners: dict[str, list[str]] = {}
    for obj in all_of(manifests, "HorizontalPodAutoscaler") + all_of(manifests, "ScaledObject"):
        target = obj["spec"]["scaleTargetRef"]["name"]
        owners.setdefault(target, []).append(f"{obj['kind']}/{obj['metadata']['name']}")
        if target not in by_name:
            fail(f"{obj['kind']}/{obj['metadata']['name']}", f"scaleTargetRef {target} is not a Deployment here")
    for target, objs in owners.items():
        if len(objs) > 1:
            fail(f"Deployment/{target}", f"scaled by {len(objs)} objects: {', '.join(objs)}")
    for hpa in all_of(manifests, "HorizontalPodAutoscaler"):
        target = by_name.get(hpa["spec"]["scaleTargetRef"]["name"])
        if not target:
            continue
        for metric in hpa["spec"].get("metrics", []):
            resource = metric.get("resource", {}).get("name")
            if metric["type"] == "Resource" and metric["resource"]["target"]["type"] == "Utilization":
                for c in pod_of(target)["spec"]["containers"]:
                    if resource not in c.get("resources", {}).get("requests", {}):
                        fail(f"HorizontalPodAutoscaler/{hpa['metadata']['name']}",
                             f"{resource} utilisation needs a {resource} request on container {c['name']}")
        for pdb in all_of(manifests, "PodDisruptionBudget"):
            min_available = pdb["spec"].get("minAvailable")
            if (isinstance(min_available, int) and selects(pdb["spec"]["selector"], pod_of(target)["metadata"]["labels"])
                    and min_available >= hpa["spec"].get("minReplicas", 1)):
                fail(f"PodDisruptionBudget/{pdb['metadata']['name']}",
                     "minAvailable reaches the HPA's minReplicas: a node drain would wait forever")


def toml_files(table: dict, prefix: str = "") -> list[tuple[str, str]]:
    """Every `*_file` value of a config, with its dotted key."""
    found = []
    for key, value in table.items():
        if isinstance(value, dict):
            found += toml_files(value, f"{prefix}{key}.")
        elif key.endswith("_file") and isinstance(value, str):
            found.append((f"{prefix}{key}", value))
    return found


def check_gateway(manifests: dict[str, list[dict]]) -> None:
    deployment = find(manifests, "Deployment", "jetinfer-gateway")
    configmap = find(manifests, "ConfigMap", "jetinfer-gateway-config")
    if not (deployment and configmap):
        return
    try:
        config = tomllib.loads(configmap["data"]["gateway.toml"])
    except (KeyError, tomllib.TOMLDecodeError) as e:
        fail("gateway-configmap.yaml", f"gateway.toml: {e}")
        return
    pod = pod_of(deployment)["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "gateway")
    env = {e["name"]: e.get("value") for e in container.get("env", [])}

    # The environment wins over the file: a `listen` there would be ignored.
    if "listen" in config:
        fail("gateway-configmap.yaml", "sets listen, which JETINFER_GATEWAY_LISTEN (deployment or image) overrides")
    listen = env.get("JETINFER_GATEWAY_LISTEN") or GATEWAY_IMAGE_LISTEN
    port = int(listen.rsplit(":", 1)[1])
    if container_ports(deployment).get("http") != port:
        fail("gateway-deployment.yaml", f"container port http is not the listen port {port}")

    grace = pod.get("terminationGracePeriodSeconds", 30)
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pre_stop_s = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
    drain = config.get("limits", {}).get("shutdown_grace", GATEWAY_DEFAULT_SHUTDOWN_GRACE_S)
    if grace <= pre_stop_s + drain:
        fail("gateway-deployment.yaml",
             f"terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop_s}s + [limits] shutdown_grace {drain}s")

    # TLS on the port means the kubelet must probe with HTTPS.
    scheme = "HTTPS" if "tls" in config else "HTTP"
    for probe in PROBE_PATHS:
        got = container.get(probe, {}).get("httpGet", {}).get("scheme", "HTTP")
        if got != scheme:
            fail("gateway-deployment.yaml", f"{probe} scheme {got}, but the config serves {scheme}")

    # Every file the config names is in a mounted Secret, mounted whole (a
    # subPath mount never sees the Secret's updates, so a rotated key would
    # not be reloaded); the keys file's Secret is not optional.
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    if "keys_file" not in config:
        fail("gateway-configmap.yaml", "no keys_file: the gateway would accept no API key")
    for key, path in toml_files(config):
        mount = next((m for m in container.get("volumeMounts", [])
                      if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")), None)
        secret = volumes.get(mount["name"], {}).get("secret") if mount else None
        if not secret:
            fail("gateway-configmap.yaml", f"{key} = {path} is in no mounted Secret")
            continue
        if "subPath" in mount:
            fail("gateway-deployment.yaml", f"mount {mount['name']} uses subPath: Secret updates would not reach {path}")
            continue
        items = secret.get("items")
        name = path[len(mount["mountPath"].rstrip("/")) + 1:]
        if items is not None and name not in {i["path"] for i in items}:
            fail("gateway-deployment.yaml", f"Secret {secret['secretName']} items do not include {name} ({key})")
        if key == "keys_file" and secret.get("optional"):
            fail("gateway-deployment.yaml", f"Secret {secret['secretName']} holds the keys file and must not be optional")


def main() -> int:
    directory = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "deploy/k8s")
    kustomization, manifests = load(directory)
    validate_schemas(manifests)
    if not errors:  # cross-file checks assume well-formed objects
        check_consistency(kustomization, manifests)
    for e in errors:
        print(f"{directory}/{e}", file=sys.stderr)
    count = sum(len(d) for d in manifests.values())
    print(f"k8s: {count} objects in {len(manifests)} files, Kubernetes {' and '.join(K8S_VERSIONS)}: "
          f"{'ok' if not errors else f'{len(errors)} error(s)'}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
