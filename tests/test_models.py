"""Several models in one server (LIMOE_MODELS), named in every API, with versions, and the model
repository API's load and unload (service/models.py, service/api_repository.py), on real
uvicorn with two tiny store entries: a LIMoE ("tiny") and a two-tower ("tt").

New versions are made by copying an entry and changing its manifest's version: the store then
holds a second, verifiable version with the same weights, as a republished entry would be."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from servers import uvicorn_thread

from bench.model_rollout import add_version
from service.app import create_app
from service.backends import FakeBackend
from service.settings import Settings

LABELS = ["red circle", "blue square", "cat"]
ADMIN = {"Authorization": "Bearer admin-key"}


def png(color=(200, 30, 30)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def source_store(tmp_path_factory, exported, exported_two_tower):
    store = tmp_path_factory.mktemp("models") / "store"
    shutil.copytree(exported[2], store / "tiny" / "1")
    shutil.copytree(exported_two_tower[2], store / "tt" / "1")
    return store


@pytest.fixture
def store(tmp_path, source_store) -> Path:
    """A fresh copy of the two-entry store for each test (tests add versions to it)."""
    shutil.copytree(source_store, tmp_path / "store")
    return tmp_path / "store"


def settings(store: Path, tmp: Path, **kw) -> Settings:
    return Settings(**{"models": ["tiny", "tt"], "model_store": store, "max_batch_size": 4, "max_batch_wait_ms": 2,
                       "jobs_dir": tmp / "jobs", "admin_keys": ["admin-key"], **kw})


@pytest.fixture
def server(store, tmp_path):
    with uvicorn_thread(create_app(settings(store, tmp_path))) as base:
        yield base, store


def classify(base: str, model: str | None = None, **kw) -> httpx.Response:
    body = {"images": [png()], "labels": LABELS, **({"model": model} if model else {})}
    return httpx.post(f"{base}/v1/classify", json=body, timeout=30, **kw)


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def served_versions(base: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for m in httpx.get(f"{base}/v1/models").json()["models"]:
        out.setdefault(m["name"], []).append(m["version"])
    return out


# -- two models, every API ---------------------------------------------------------------------------

def test_two_models_are_served_side_by_side_through_every_api(server):
    base, _ = server
    listed = httpx.get(f"{base}/v1/models").json()
    assert listed["default"] == "tiny"
    by_name = {m["name"]: m for m in listed["models"]}
    assert set(by_name) == {"tiny", "tt"}
    assert by_name["tiny"]["default"] and not by_name["tt"]["default"]
    assert all(m["ready"] and m["current"] and m["state"] == "READY" for m in listed["models"])
    assert all(m["memory_bytes"] > 0 for m in listed["models"])  # each opened its own graphs

    # native classify and embed: the default, then the model the body names
    r = classify(base)
    assert r.status_code == 200 and (r.json()["model"], r.json()["version"]) == ("tiny", "1")
    r = classify(base, "tt")
    assert r.status_code == 200 and r.json()["model"] == "tt", r.text
    assert r.json()["results"][0]["labels"][0]["label"] in LABELS
    r = httpx.post(f"{base}/v1/embed", json={"texts": ["cat"], "model": "tt"}, timeout=30)
    assert r.status_code == 200 and r.json()["model"] == "tt"
    # multipart names it as a form field
    files = [("images", ("a.png", base64.b64decode(png()), "image/png"))]
    r = httpx.post(f"{base}/v1/classify", files=files, data={"labels": LABELS, "model": "tt"}, timeout=30)
    assert r.status_code == 200 and r.json()["model"] == "tt", r.text

    # Hugging Face: /models/{name}, and the headers say who answered
    hf = {"inputs": png(), "parameters": {"candidate_labels": LABELS}}
    r = httpx.post(f"{base}/models/tt", json=hf, timeout=30)
    assert r.status_code == 200 and (r.headers["x-model-name"], r.headers["x-model-version"]) == ("tt", "1")
    r = httpx.post(f"{base}/", json=hf, timeout=30)
    assert r.headers["x-model-name"] == "tiny"

    # OIP v2: each model its own metadata, readiness and inference
    v2 = {"inputs": [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [png()]},
                     {"name": "LABELS", "datatype": "BYTES", "shape": [3], "data": LABELS}]}
    for name in ("tiny", "tt"):
        assert httpx.get(f"{base}/v2/models/{name}").json()["versions"] == ["1"]
        assert httpx.get(f"{base}/v2/models/{name}/ready").json() == {"name": name, "ready": True}
        r = httpx.post(f"{base}/v2/models/{name}/versions/1/infer", json=v2, timeout=30)
        assert r.status_code == 200 and r.json()["model_name"] == name and r.json()["model_version"] == "1"

    # Prometheus: per model and version
    text = httpx.get(f"{base}/metrics").text
    for name in ("tiny", "tt"):
        assert f'limoe_model_ready{{model="{name}",version="1"}} 1.0' in text
        assert f'limoe_inference_seconds_count{{encoder="image",model="{name}",version="1"}}' in text
    assert 'limoe_expert_tokens_total{expert="0",layer="1",modality="image",model="tiny",version="1"}' in text
    assert "limoe_ready 1.0" in text


def test_two_models_flooded_at_once_take_turns_and_answer_everything(store, tmp_path):
    # LIMOE_SHARED_INFLIGHT=1: while both models have requests, each holds one at a time and the
    # others wait their turn (service/batcher.py RequestShare). Every request still answers 200,
    # by the model it named, and no turn is left held.
    app = create_app(settings(store, tmp_path, shared_inflight=1))
    with uvicorn_thread(app) as base:
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda k: classify(base, ("tiny", "tt")[k % 2]), range(48)))
            embeds = list(pool.map(lambda k: httpx.post(f"{base}/v1/embed", json={"texts": ["cat"], "model": "tt"},
                                                         timeout=30), range(8)))
        assert [r.status_code for r in answers + embeds] == [200] * 56
        assert [r.json()["model"] for r in answers] == ["tiny", "tt"] * 24
        models = app.state.models
        engines = [v.engine for versions in models.loaded.values() for v in versions]
        assert len(engines) == 2 and all(e.requests is models.requests for e in engines)
        assert models.requests.limit == 1 and models.requests.held == {"tiny": 0, "tt": 0}


def test_unknown_names_and_versions_get_404_naming_what_is_served(server):
    base, _ = server
    for r in (classify(base, "nope"), httpx.post(f"{base}/models/nope", json={"inputs": png(), "parameters": {
            "candidate_labels": LABELS}}), httpx.get(f"{base}/v2/models/nope")):
        assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
        assert "'tiny'" in r.json()["error"] and "'tt'" in r.json()["error"]
    r = classify(base, "tiny@7")
    assert r.status_code == 404 and "no version '7'" in r.json()["error"] and "'1'" in r.json()["error"]
    assert httpx.get(f"{base}/v2/models/tiny/versions/7/ready").status_code == 404
    r = classify(base, "tiny@1")
    assert r.status_code == 200 and r.json()["version"] == "1"


# -- the repository API ----------------------------------------------------------------------------------

def test_the_repository_api_takes_admin_keys_only(store, tmp_path):
    app = create_app(settings(store, tmp_path, api_keys=["user-key"]))
    with uvicorn_thread(app, ready_path="/healthz") as base:
        url = f"{base}/v2/repository/index"
        assert httpx.post(url).status_code == 401
        assert httpx.post(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = httpx.post(url, headers={"Authorization": "Bearer user-key"})
        assert r.status_code == 403 and "admin key" in r.json()["error"]
        r = httpx.post(url, headers=ADMIN)
        assert r.status_code == 200
        assert {(e["name"], e["version"], e["state"]) for e in r.json()} == {("tiny", "1", "READY"),
                                                                               ("tt", "1", "READY")}
        # the admin key is no API key
        assert classify(base, headers=ADMIN).status_code == 401
        assert classify(base, headers={"Authorization": "Bearer user-key"}).status_code == 200
    with uvicorn_thread(create_app(settings(store, tmp_path, admin_keys=[]))) as base:
        r = httpx.post(f"{base}/v2/repository/index")
        assert r.status_code == 403 and r.json()["code"] == "repository_off"


def test_overlapping_admin_and_api_keys_are_refused():
    with pytest.raises(ValueError, match="must not share a key"):
        Settings(api_keys="a,b", admin_keys="b")


def test_a_load_switches_to_the_new_version_and_the_old_one_unloads(server):
    base, store = server
    add_version(store, "tiny", "1", "2")
    r = httpx.post(f"{base}/v2/repository/models/tiny/load", headers=ADMIN, timeout=60)
    assert r.status_code == 200 and r.json() == {"name": "tiny", "version": "2", "state": "READY"}, r.text
    assert classify(base).json()["version"] == "2"  # at once
    wait_for(lambda: served_versions(base)["tiny"] == ["2"])  # the old one unloaded once idle
    assert httpx.get(f"{base}/readyz").json()["version"] == "2"
    index = {(e["name"], e["version"]): e for e in httpx.post(f"{base}/v2/repository/index", headers=ADMIN).json()}
    assert index[("tiny", "2")]["state"] == "READY"
    assert index[("tiny", "1")]["state"] == "UNAVAILABLE" and index[("tiny", "1")]["reason"] == "not loaded"
    # back to 1, pinned in the load's parameters (a rollback)
    r = httpx.post(f"{base}/v2/repository/models/tiny/load", headers=ADMIN, json={"parameters": {"version": "1"}},
                   timeout=60)
    assert r.status_code == 200 and r.json()["version"] == "1"
    assert classify(base).json()["version"] == "1"
    wait_for(lambda: served_versions(base)["tiny"] == ["1"])
    text = httpx.get(f"{base}/metrics").text
    assert 'limoe_model_loads_total{model="tiny",outcome="loaded"} 2.0' in text
    assert 'limoe_model_loads_total{model="tiny",outcome="unloaded"} 2.0' in text
    assert 'limoe_model_ready{model="tiny",version="2"}' not in text  # its gauges went with it


def test_a_corrupt_version_is_refused_and_the_old_one_serves_on(server):
    base, store = server
    add_version(store, "tiny", "1", "2", corrupt=True)
    r = httpx.post(f"{base}/v2/repository/models/tiny/load", headers=ADMIN, timeout=60)
    assert r.status_code == 400 and r.json()["code"] == "model_load_failed", r.text
    assert "wrong sha256" in r.json()["error"] and "'2'" in r.json()["error"]
    assert classify(base).json()["version"] == "1"
    assert served_versions(base)["tiny"] == ["1"]
    index = {(e["name"], e["version"]): e for e in httpx.post(f"{base}/v2/repository/index", headers=ADMIN).json()}
    assert index[("tiny", "2")]["state"] == "UNAVAILABLE" and "wrong sha256" in index[("tiny", "2")]["reason"]
    assert 'limoe_model_loads_total{model="tiny",outcome="refused"} 1.0' in httpx.get(f"{base}/metrics").text
    r = httpx.post(f"{base}/v2/repository/models/nothing-here/load", headers=ADMIN, timeout=60)
    assert r.status_code == 400 and "no model named 'nothing-here'" in r.json()["error"]


def test_unload_under_load_answers_the_requests_in_flight_and_404_after(server):
    base, _ = server
    stop = threading.Event()
    answers: list[tuple[float, int]] = []

    def client() -> None:
        with httpx.Client(timeout=30) as c:
            while not stop.is_set():
                r = c.post(f"{base}/v1/classify", json={"images": [png()], "labels": LABELS, "model": "tt"})
                answers.append((time.monotonic(), r.status_code))

    with ThreadPoolExecutor(4) as pool:
        for _ in range(4):
            pool.submit(client)
        wait_for(lambda: len(answers) >= 8)
        r = httpx.post(f"{base}/v2/repository/models/tt/unload", headers=ADMIN, timeout=30)
        unloaded_at = time.monotonic()
        assert r.status_code == 200 and r.json() == {"name": "tt", "unloading": 1}
        wait_for(lambda: sum(t > unloaded_at + 1 for t, _ in answers) >= 8)
        stop.set()
    codes = {code for _, code in answers}
    assert codes <= {200, 404}, codes  # nothing failed: answered, or told the model is gone
    assert {code for t, code in answers if t > unloaded_at + 1} == {404}
    wait_for(lambda: "tt" not in served_versions(base))
    r = httpx.post(f"{base}/v2/repository/models/tiny/unload", headers=ADMIN)
    assert r.status_code == 409 and r.json()["code"] == "cannot_unload"
    assert httpx.post(f"{base}/v2/repository/models/tt/unload", headers=ADMIN).status_code == 404
    # and it comes back with a load
    assert httpx.post(f"{base}/v2/repository/models/tt/load", headers=ADMIN, timeout=60).status_code == 200
    assert classify(base, "tt").status_code == 200


def test_the_store_poll_serves_a_new_version_by_itself(store, tmp_path):
    with uvicorn_thread(create_app(settings(store, tmp_path, store_poll_s=0.2))) as base:
        assert classify(base).json()["version"] == "1"
        add_version(store, "tiny", "1", "3", corrupt=True)  # refused once, not retried while unchanged
        time.sleep(1.0)
        assert classify(base).json()["version"] == "1"
        add_version(store, "tiny", "1", "4")
        wait_for(lambda: classify(base).json()["version"] == "4")
        text = httpx.get(f"{base}/metrics").text
        assert 'limoe_model_loads_total{model="tiny",outcome="refused"} 1.0' in text


def test_a_batch_job_keeps_the_version_it_started_with(store, tmp_path):
    from test_batch_jobs import wait_finished

    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/classify",
                         "body": {"images": [png((i % 255, 40, 90))], "labels": LABELS}}) for i in range(300)]
    app = create_app(settings(store, tmp_path, jobs_concurrency=1))  # one request at a time: it spans the switch
    with uvicorn_thread(app) as base, httpx.Client(base_url=base, timeout=60) as c:
        add_version(store, "tiny", "1", "2")
        f = c.post("/v1/files", files={"file": ("in.jsonl", "\n".join(lines).encode())}, data={"purpose": "batch"})
        batch = c.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/classify",
                                            "completion_window": "24h"}).json()
        wait_for(lambda: c.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["completed"] > 0
                 or c.get(f"/v1/batches/{batch['id']}").json()["status"] == "completed")
        r = c.post("/v2/repository/models/tiny/load", headers=ADMIN)
        assert r.status_code == 200 and r.json()["version"] == "2"
        assert classify(base).json()["version"] == "2"  # interactive traffic moved on
        assert c.get(f"/v1/batches/{batch['id']}").json()["status"] == "in_progress"  # the batch spans the switch
        assert served_versions(base)["tiny"] == ["1", "2"]  # 1 is held by the batch
        done = wait_finished(base, batch["id"], timeout=120)
        assert done["status"] == "completed"
        assert done["request_counts"] == {"total": 300, "completed": 300, "failed": 0}
        assert done["model_versions"] == {"tiny": "1"}
        out = c.get(f"/v1/files/{done['output_file_id']}/content").text.splitlines()
        assert {json.loads(x)["response"]["body"]["version"] for x in out} == {"1"}
        # then version 1 is unloaded, once the batch let go of it
        wait_for(lambda: served_versions(base)["tiny"] == ["2"])


# -- a model still loading ------------------------------------------------------------------------------

def test_a_model_loading_for_the_first_time_answers_503_with_retry_after(tmp_path):
    release = threading.Event()

    def slow_opener(s, ref):
        release.wait(20)
        fake = FakeBackend()
        fake.name, fake.version = ref.name, ref.version
        return fake

    (tmp_path / "store" / "other" / "1").mkdir(parents=True)  # what the store lists; the opener opens it
    (tmp_path / "store" / "other" / "1" / "manifest.json").write_text("{}")
    app = create_app(Settings(warmup=False, jobs_enabled=False, admin_keys=["admin-key"],
                              model_store=tmp_path / "store"), backend=FakeBackend(), opener=slow_opener)
    with TestClient(app) as client:
        result: dict = {}

        def run_load() -> None:
            result["r"] = client.post("/v2/repository/models/other/load", headers=ADMIN)

        t = threading.Thread(target=run_load)
        t.start()
        wait_for(lambda: "other" in app.state.models.loading)
        r = client.post("/v1/classify", json={"images": [png()], "labels": LABELS, "model": "other"})
        assert r.status_code == 503 and r.json()["code"] == "model_loading" and r.headers["retry-after"]
        assert client.get("/v2/models/other/ready").json() == {"name": "other", "ready": False}
        release.set()
        t.join(30)
        assert result["r"].status_code == 200, result["r"].text
        assert client.post("/v1/classify", json={"images": [png()], "labels": LABELS, "model": "other"}).json()[
            "model"] == "other"


def test_tritons_own_client_drives_the_repository_api(server):
    """tritonclient's load_model, unload_model, get_model_repository_index and is_model_ready, with
    the admin key as a header."""
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    base, store = server
    client = triton.InferenceServerClient(base.removeprefix("http://"))
    assert "model_repository" in client.get_server_metadata()["extensions"]
    index = client.get_model_repository_index(headers=ADMIN)
    assert {(m["name"], m["state"]) for m in index} == {("tiny", "READY"), ("tt", "READY")}
    add_version(store, "tiny", "1", "2")
    client.load_model("tiny", headers=ADMIN)
    assert client.get_model_metadata("tiny")["versions"] == ["2"]
    assert client.is_model_ready("tiny", "2")
    client.unload_model("tt", headers=ADMIN)
    wait_for(lambda: not client.is_model_ready("tt") if "tt" in served_versions(base) else True)
    with pytest.raises(InferenceServerException, match="admin key"):
        client.load_model("tiny")  # no key
