"""Early refusal: a request takes its places in the image queue before its images are decoded
(like TEI's permits), so when there are none it gets 429 + Retry-After without its images being
base64-decoded or decoded to pixels, on every API. The places come back when the request is done,
also for images that failed to decode, and the server keeps serving. Real uvicorn on the fake
backend; the image encoder waits at a gate, so the queue fills without any timing."""

import base64
import contextlib
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

from servers import uvicorn_thread
from service.app import create_app
from service.backends import FakeBackend
from service.settings import Settings

LABELS = ["cat", "dog"]
QUEUE = 2


class GatedBackend(FakeBackend):
    """The image encoder waits at `gate` while it is closed; `inside` is set once a forward pass
    reached the gate."""

    def __init__(self):
        super().__init__()
        self.gate, self.inside = threading.Event(), threading.Event()
        self.gate.set()

    def encode_images(self, pixels):
        self.inside.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return super().encode_images(pixels)


@contextlib.contextmanager
def opened_at_exit(gate: threading.Event):
    """Whatever happens inside, the gate opens at the end: no request stays blocked."""
    try:
        yield
    finally:
        gate.set()


def png(color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, "PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def classify(base: str, images: list[str]) -> httpx.Response:
    return httpx.post(f"{base}/v1/classify", json={"images": images, "labels": LABELS}, timeout=60)


def until(condition, what: str) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def decoded(engine) -> float:
    """Images decoded to pixels so far."""
    return engine.metrics.value("limoe_preprocess_seconds_count") or 0.0


@pytest.fixture()
def server():
    backend = GatedBackend()
    # One forward pass at a time, so that one blocked pass holds the encoder.
    settings = Settings(max_batch_size=1, queue_size=QUEUE, max_batch_wait_ms=0, warmup=False, encoder_passes=1)
    app = create_app(settings, backend=backend)
    with uvicorn_thread(app) as base:
        yield base, app.state.engine, backend


def assert_refused(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == "1"
    assert r.json() == {"error": f"the image queue is full ({QUEUE} items); retry shortly", "code": "overloaded"}


def test_a_full_queue_refuses_before_any_decoding_and_then_serves_again(server):
    base, engine, backend = server
    batcher = engine.image_batcher
    assert classify(base, [b64(png())]).status_code == 200  # the labels are cached from here on

    backend.gate.clear()
    backend.inside.clear()
    with ThreadPoolExecutor(QUEUE + 1) as pool, opened_at_exit(backend.gate):
        # one request inside the forward pass, then QUEUE more filling the queue
        blocker = pool.submit(classify, base, [b64(png((1, 2, 3)))])
        until(backend.inside.is_set, "the first request is in its forward pass")
        fillers = [pool.submit(classify, base, [b64(png((i, 9, 9)))]) for i in range(QUEUE)]
        until(lambda: batcher.depth == QUEUE, "the queue is full")
        before = decoded(engine)

        assert_refused(classify(base, [b64(png((7, 7, 7)))]))
        # not even base64-decoded: an invalid payload would otherwise be a 400 invalid_base64
        assert_refused(classify(base, ["this is not base64!"]))
        files = [("images", ("a.png", png((8, 8, 8)), "image/png"))]
        assert_refused(httpx.post(f"{base}/v1/classify", files=files, data={"labels": LABELS}, timeout=60))
        assert_refused(httpx.post(f"{base}/", json={"inputs": "not base64 either!",
                                                    "parameters": {"candidate_labels": LABELS}}, timeout=60))
        assert_refused(httpx.post(f"{base}/v2/models/fake/infer", json={"inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": ["still not base64!"]},
            {"name": "LABELS", "datatype": "BYTES", "shape": [2], "data": LABELS}]}, timeout=60))
        assert_refused(httpx.post(f"{base}/v1/embed", json={"images": [b64(png((6, 6, 6)))]}, timeout=60))
        assert decoded(engine) == before  # no refused image was decoded to pixels
        assert batcher.room.used == QUEUE  # refusals took no places

        backend.gate.set()
        answers = [blocker.result(), *(f.result() for f in fillers)]
    assert [r.status_code for r in answers] == [200] * (QUEUE + 1)
    assert classify(base, [b64(png((5, 5, 5)))]).status_code == 200
    assert batcher.room.used == 0  # every place came back


def test_places_of_images_that_fail_to_decode_come_back(server):
    base, engine, _ = server
    r = classify(base, [b64(b"not an image"), b64(png((0, 0, 255)))])
    assert r.status_code == 200
    assert [res.get("code") for res in r.json()["results"]] == ["invalid_image", None]
    assert engine.image_batcher.room.used == 0
    # a request as large as the queue still fits: no place was lost
    r = classify(base, [b64(png((i, i, i))) for i in range(QUEUE)])
    assert r.status_code == 200 and engine.image_batcher.room.used == 0


def test_bulk_requests_wait_for_room_instead(server):
    base, engine, _ = server
    r = httpx.post(f"{base}/v1/classify/bulk", json={"images": [b64(png((i, 0, 0))) for i in range(QUEUE + 3)],
                                                    "labels": LABELS}, timeout=60)
    assert r.status_code == 200 and len(r.json()["results"]) == QUEUE + 3
    assert engine.image_batcher.room.used == 0
