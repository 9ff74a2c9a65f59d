"""Offline validation of deploy/k8s, run by scripts/lint-deploy.sh in its venv.

Built-in kinds are checked strictly (unknown fields are errors) against the
Kubernetes OpenAPI schemas bundled in the kubernetes-validate package, for
the oldest and newest Kubernetes versions jetinfer supports. The two custom
resources are checked against hand-written schemas in scripts/schemas/.
Then the numbers that must agree across files are checked: shutdown budget,
consumer name, scaling bounds, and the kustomization's resource list.

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


def find(manifests: dict[str, list[dict]], kind: str) -> dict:
    found = [d for docs in manifests.values() for d in docs if d.get("kind") == kind]
    if len(found) != 1:
        fail("deploy/k8s", f"expected exactly one {kind}, found {len(found)}")
        return {}
    return found[0]


def check_consistency(kustomization: dict, manifests: dict[str, list[dict]]) -> None:
    listed = set(kustomization.get("resources", []))
    for name in sorted(listed - manifests.keys()):
        fail("kustomization.yaml", f"lists {name}, which does not exist")
    for name in sorted(manifests.keys() - listed):
        fail("kustomization.yaml", f"does not list {name}")

    configmap, deployment, scaled = (find(manifests, k) for k in ("ConfigMap", "Deployment", "ScaledObject"))
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
