"""Graceful shutdown of a real `limoe serve` (docs/SHUTDOWN.md): SIGTERM while 64 classify
requests are in flight.

To hold requests in flight for certain, the servers batch up to 1024 items and wait up to
LIMOE_MAX_BATCH_WAIT_MS for a batch to fill: the 64 requests' 512 images (and any request sent
meanwhile) wait in the image batcher's queue for one forward pass, seconds after they were
accepted. The gauge limoe_inflight_requests says when the server holds all 64; only then is the
signal sent. Deadlines are generous; nothing asserts how fast a request is answered.
"""

from __future__ import annotations

import base64
import io
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from service.settings import Settings
from servers import Server, metric

REQUESTS, IMAGES = 64, 8
HOLD = {"model": "limoe-tiny", "warmup": "false", "max_batch_size": 1024, "queue_size": 4096}


def classify_body(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(IMAGES):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
        images.append(base64.b64encode(buf.getvalue()).decode())
    return {"images": images, "labels": ["red", "green", "blue"]}


def many_connections() -> httpx.Client:
    return httpx.Client(limits=httpx.Limits(max_connections=REQUESTS + 8), timeout=60, trust_env=False)


def send_all(pool: ThreadPoolExecutor, client: httpx.Client, base: str) -> list[Future]:
    """REQUESTS classify requests at once, each on its own connection; futures of their
    responses (or of the error a client saw: a reset connection would show here)."""
    return [pool.submit(client.post, base + "/v1/classify", json=classify_body(i)) for i in range(REQUESTS)]


def hold_all(base: str, futures: list[Future]) -> None:
    """Wait until the server holds every request; none may have been answered yet."""
    deadline = time.monotonic() + 30
    while metric(base, "limoe_inflight_requests") < REQUESTS:
        assert time.monotonic() < deadline, "the server never held all the requests at once"
        time.sleep(0.05)
    assert not any(f.done() for f in futures), "requests answered before the signal: nothing to drain"


def wait_for(predicate, timeout: float, what: str) -> float:
    """Poll `predicate` until true; the time it took."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, f"{what} within {timeout:g}s"
        time.sleep(0.02)
    return time.monotonic() - started


def readiness(base: str) -> tuple[int, int]:
    with httpx.Client(trust_env=False, timeout=5) as c:  # a new connection, as a kubelet probe makes
        return c.get(base + "/readyz").status_code, c.get(base + "/v2/health/ready").status_code


def refuses_connections(base: str) -> bool:
    try:
        httpx.get(base + "/healthz", timeout=2, trust_env=False)
    except httpx.ConnectError:
        return True
    return False


def test_sigterm_drains_every_request():
    """SIGTERM with 64 requests (512 images) queued: readiness answers 503 at once; for the grace
    period a new request is still accepted; after it, new connections are refused and a request
    on a connection kept alive from before gets 503 shutting_down; every request accepted before
    the signal or during the grace gets 200; the process exits 0 within LIMOE_DRAIN_S."""
    grace, drain = 2.0, 20.0
    with Server("drain", max_batch_wait_ms=8000, drain_grace_s=grace, drain_s=drain, **HOLD) as server, \
            ThreadPoolExecutor(REQUESTS + 1) as pool, many_connections() as client, \
            httpx.Client(trust_env=False, timeout=30) as kept:
        server.wait_ready()
        base = server.base
        assert metric(base, "limoe_inflight_requests") == 0  # a scrape does not count itself
        assert kept.get(base + "/healthz").status_code == 200  # a kept-alive connection, idle from now on
        futures = send_all(pool, client, base)
        hold_all(base, futures)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)

        wait_for(lambda: readiness(base) == (503, 503), grace / 2, "readiness answers 503")
        late = pool.submit(httpx.post, base + "/v1/classify", json=classify_body(99), timeout=60, trust_env=False)
        wait_for(lambda: metric(base, "limoe_inflight_requests") == REQUESTS + 1, grace * 0.75,
                 "a request sent in the grace period is accepted")

        waited = wait_for(lambda: refuses_connections(base), 10, "the listening socket closes after the grace")
        assert time.monotonic() - signalled >= grace
        refused = kept.post(base + "/v1/classify", json=classify_body(100))
        assert refused.status_code == 503 and refused.json()["code"] == "shutting_down"
        assert refused.headers["connection"] == "close"

        rc = server.proc.wait(timeout=drain)
        took = time.monotonic() - signalled
        answers = [f.result() for f in futures]  # an exception here is a request without an HTTP answer
        assert [r.status_code for r in answers] == [200] * REQUESTS
        assert all(len(r.json()["results"]) == IMAGES for r in answers)
        assert all(r.headers["connection"] == "close" for r in answers)  # clients do not reuse them
        assert late.result().status_code == 200
        assert rc == 0, server.output()
        assert took < drain and waited < drain


@pytest.mark.parametrize("cut", ["second_sigterm", "deadline"])
def test_cut_short_answers_503(cut):
    """Cut short, by a second SIGTERM or by the LIMOE_DRAIN_S deadline, while all 64 requests
    still wait for their batch (which would take 10 s): every one is answered 503
    shutting_down, none sees a reset connection, and the process exits 1 (work was refused)
    within LIMOE_DRAIN_S."""
    drain = 20.0 if cut == "second_sigterm" else 3.0
    with Server("cut", max_batch_wait_ms=10_000, drain_grace_s=0.5, drain_s=drain, **HOLD) as server, \
            ThreadPoolExecutor(REQUESTS) as pool, many_connections() as client:
        server.wait_ready()
        futures = send_all(pool, client, server.base)
        hold_all(server.base, futures)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        if cut == "second_sigterm":
            wait_for(lambda: readiness(server.base) == (503, 503), 5, "readiness answers 503")
            server.proc.send_signal(signal.SIGTERM)
        rc = server.proc.wait(timeout=drain)
        took = time.monotonic() - signalled
        answers = [f.result() for f in futures]
        assert [r.status_code for r in answers] == [503] * REQUESTS
        assert {r.json()["code"] for r in answers} == {"shutting_down"}
        assert rc == 1, server.output()
        assert took < (5 if cut == "second_sigterm" else drain)


def test_sigint_skips_the_grace():
    """Ctrl-C (and the test and benchmark helpers' `Server.stop`): no load balancer to wait for,
    so an idle server exits 0 at once, not after LIMOE_DRAIN_GRACE_S."""
    with Server("sigint", model="limoe-tiny", warmup="false", drain_grace_s=20, drain_s=30) as server:
        server.wait_ready()
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGINT)
        assert server.proc.wait(timeout=15) == 0
        assert time.monotonic() - signalled < 10


def test_grace_is_part_of_the_drain():
    with pytest.raises(ValidationError, match="LIMOE_DRAIN_GRACE_S must be shorter than LIMOE_DRAIN_S"):
        Settings(drain_s=5, drain_grace_s=5)
