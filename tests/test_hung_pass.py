"""A forward pass that never returns (FakeBackend's `hang`, a fault only tests inject), with
LIMOE_INFER_TIMEOUT_S: its requests get 504 at the deadline, /readyz turns 503 while it is stuck,
limoe_inference_stuck_total counts it, the encoder keeps serving other requests on a fresh thread,
and the server is ready again once the pass returns; past the bound, /healthz fails (the kubelet
restarts the pod). A batch job's item on a stuck pass is marked failed with its reason."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
from PIL import Image
from servers import uvicorn_thread

from service.app import create_app
from service.backends import FakeBackend
from service.settings import Settings

LABELS = ["red", "blue"]
HANG_COLOR = (7, 7, 7)  # an image of this colour hangs the image encoder


def png(color) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def hangs(modality: str, x: np.ndarray) -> bool:
    """A batch holding the hanging colour's image (FakeBackend normalises with mean/std 0.5)."""
    if modality != "image":
        return False
    target = (np.array(HANG_COLOR) / 255 - 0.5) / 0.5
    return bool(np.any(np.all(np.abs(x.mean(axis=(2, 3)) - target) < 1e-3, axis=1)))


def classify(base: str, color, timeout: float = 30) -> httpx.Response:
    return httpx.post(f"{base}/v1/classify", json={"images": [png(color)], "labels": LABELS}, timeout=timeout)


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def stuck_total(base: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith('limoe_inference_stuck_total{encoder="image"'):
            return float(line.split()[-1])
    return 0.0


def test_a_hung_pass_gets_504_then_the_server_heals(tmp_path):
    fake = FakeBackend(hang=hangs)
    settings = Settings(infer_timeout_s=0.5, encoder_passes=2, warmup=False, max_batch_wait_ms=1,
                        jobs_dir=tmp_path / "jobs")
    with uvicorn_thread(create_app(settings, backend=fake)) as base:
        try:
            started = time.monotonic()
            r = classify(base, HANG_COLOR)
            took = time.monotonic() - started
            assert r.status_code == 504 and r.json()["code"] == "inference_timeout", r.text
            assert took < 5  # the pass deadline, not the 30 s request timeout
            assert stuck_total(base) == 1
            ready = httpx.get(f"{base}/readyz")
            assert ready.status_code == 503 and ready.json()["stuck_passes"] == 1
            assert httpx.get(f"{base}/healthz").status_code == 200  # 1 stuck of 2 passes: alive
            r = classify(base, (200, 10, 10))  # the encoder still serves, on a fresh thread
            assert r.status_code == 200, r.text
            fake.unhang.set()  # the stuck pass returns: its answer is dropped, the server is ready again
            wait_for(lambda: httpx.get(f"{base}/readyz").status_code == 200)
            assert classify(base, (10, 200, 10)).status_code == 200
        finally:
            fake.unhang.set()


def test_more_stuck_passes_than_the_batcher_runs_fail_liveness(tmp_path):
    fake = FakeBackend(hang=hangs)
    settings = Settings(infer_timeout_s=0.3, encoder_passes=1, warmup=False, max_batch_wait_ms=1,
                        jobs_dir=tmp_path / "jobs")
    with uvicorn_thread(create_app(settings, backend=fake)) as base:
        try:
            assert classify(base, HANG_COLOR).status_code == 504
            assert httpx.get(f"{base}/healthz").status_code == 200  # 1 stuck, 1 pass: the bound
            assert classify(base, HANG_COLOR).status_code == 504
            r = httpx.get(f"{base}/healthz")
            assert r.status_code == 503 and r.json()["status"] == "dead"  # the kubelet restarts the pod
            assert httpx.get(f"{base}/readyz").status_code == 503
            assert stuck_total(base) == 2
        finally:
            fake.unhang.set()
        wait_for(lambda: httpx.get(f"{base}/healthz").status_code == 200)  # it came back by itself


def test_a_batch_item_on_a_stuck_pass_is_failed_with_its_reason(tmp_path):
    fake = FakeBackend(hang=hangs)
    settings = Settings(infer_timeout_s=0.5, encoder_passes=2, warmup=False, max_batch_wait_ms=1,
                        jobs_dir=tmp_path / "jobs", jobs_max_batch=1, max_batch_size=1)
    colors = [(200, 10, 10), HANG_COLOR, (10, 200, 10), (10, 10, 200)]
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/classify",
                         "body": {"images": [png(c)], "labels": LABELS}}) for i, c in enumerate(colors)]
    with uvicorn_thread(create_app(settings, backend=fake)) as base, httpx.Client(base_url=base, timeout=30) as c:
        try:
            f = c.post("/v1/files", files={"file": ("in.jsonl", "\n".join(lines).encode())}, data={"purpose": "batch"})
            b = c.post("/v1/batches", json={"input_file_id": f.json()["id"], "endpoint": "/v1/classify",
                                            "completion_window": "24h"}).json()
            wait_for(lambda: c.get(f"/v1/batches/{b['id']}").json()["status"] == "completed", timeout=30)
            done = c.get(f"/v1/batches/{b['id']}").json()
            assert done["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
            errors = [json.loads(x) for x in c.get(f"/v1/files/{done['error_file_id']}/content").text.splitlines()]
            assert [(e["custom_id"], e["response"]["status_code"], e["error"]["code"]) for e in errors] == [
                ("r1", 504, "inference_timeout")]
        finally:
            fake.unhang.set()
