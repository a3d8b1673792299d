"""Clients that hold the server's resources: the request-body budget (LIMOE_MAX_INFLIGHT_BYTES:
bodies held by requests in flight are bounded together; one that would pass the bound gets 429 +
Retry-After, JSON) and the header and body deadlines (LIMOE_HEADER_TIMEOUT_S, LIMOE_BODY_TIMEOUT_S:
idle, trickling and stalled senders are cut off). The server keeps serving throughout. Real
`limoe serve`; raw sockets play the slow clients."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import time
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image

from service.http import BodyBudget
from servers import serve_fails, serve_process

BODY_LIMIT, BUDGET = 100_000, 150_000
HELD = 90_000  # what the half-sent request declares


def image_request(size: int) -> bytes:
    """A valid /v1/classify JSON body of exactly `size` bytes (a noise PNG, padded with spaces)."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    body = json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()], "labels": ["red", "blue"]}).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


def in_flight(base: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith("limoe_request_body_bytes_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no limoe_request_body_bytes_in_flight in /metrics")


def wait_in_flight(base: str, value: float) -> None:
    deadline = time.monotonic() + 10
    while in_flight(base) != value:
        assert time.monotonic() < deadline, f"bytes in flight stayed {in_flight(base)}, expected {value}"
        time.sleep(0.02)


@contextlib.contextmanager
def half_sent(base: str, declared: int = HELD, sent: int = HELD - 10_000):
    """A request that declared `declared` bytes and sent `sent` of them: it holds what it sent
    until the rest comes. Yields a function that sends the rest (not JSON) and returns the
    answer's status line."""
    url = urlsplit(base)
    before = in_flight(base)
    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % declared + b"x" * sent)
        wait_in_flight(base, before + sent)

        def finish() -> bytes:
            s.sendall(b"x" * (declared - sent))
            return s.recv(65536).split(b"\r\n")[0]

        yield finish


def post(base: str, body) -> httpx.Response:
    return httpx.post(base + "/v1/classify", content=body, headers={"content-type": "application/json"}, timeout=30)


@pytest.fixture(scope="module")
def base():
    with serve_process(model="limoe-tiny", max_body_bytes=BODY_LIMIT, max_image_bytes=BODY_LIMIT,
                       max_inflight_bytes=BUDGET) as (url, _):
        yield url


def test_budget_counts_and_refuses():
    seen = []
    b = BodyBudget(100, seen.append)
    assert b.take(60) and b.take(40) and not b.take(1) and b.used == 100
    b.give(60)
    assert b.take(0) and b.take(50) and b.used == 90
    assert seen == [60, 100, 40, 40, 90]


def test_a_body_over_the_budget_waits_its_turn(base):
    body = image_request(HELD)
    with half_sent(base) as finish:  # 80,000 of 150,000 held
        r = post(base, body)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["code"] == "too_many_bytes_in_flight" and "retry" in r.json()["error"]
        assert post(base, image_request(20_000)).status_code == 200  # fits beside the held request
        assert finish().startswith(b"HTTP/1.1 400")  # the held request is answered on its own merits
    wait_in_flight(base, 0)
    r = post(base, body)
    assert r.status_code == 200 and r.json()["results"][0]["labels"]


def test_declaring_a_body_without_sending_it_holds_nothing(base):
    """Connections that only declare large bodies cannot lock everyone else out."""
    with half_sent(base, sent=10), half_sent(base, sent=10):  # 2 x 90,000 declared, 20 bytes held
        r = post(base, image_request(HELD))
        assert r.status_code == 200, r.text


def test_a_chunked_body_takes_budget_as_it_arrives(base):
    def chunks():
        for _ in range(9):
            yield b" " * 10_000

    with half_sent(base) as finish:
        r = post(base, chunks())
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert r.status_code == 429 and r.json()["code"] == "too_many_bytes_in_flight"
        finish()
    wait_in_flight(base, 0)  # what the refused chunked body took was given back
    assert post(base, image_request(20_000)).status_code == 200


@pytest.fixture(scope="module")
def impatient():
    """A server that gives clients 1 s for headers and 1 s for a body."""
    with serve_process(model="limoe-tiny", header_timeout_s=1, body_timeout_s=1) as (url, _):
        yield url


def connect(base: str) -> socket.socket:
    url = urlsplit(base)
    return socket.create_connection((url.hostname, url.port), timeout=10)


def read_until_closed(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def read_response(s: socket.socket) -> bytes:
    """One whole response on a kept-alive connection: headers, then Content-Length bytes."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def json_error(answer: bytes, status: int) -> str:
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d" % status), answer[:300]
    return json.loads(payload)["code"]


def test_a_stalled_body_gets_408_and_the_server_keeps_serving(impatient):
    started = time.monotonic()
    with half_sent(impatient, declared=5000, sent=100), connect(impatient) as s:  # two stalled uploads
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 5000\r\n\r\n{\"images\"")
        assert json_error(read_until_closed(s), 408) == "body_timeout"
        assert time.monotonic() - started < 8
        wait_in_flight(impatient, 0)  # both stalled bodies were given back
        assert post(impatient, image_request(20_000)).status_code == 200


def test_trickled_headers_get_408_and_an_idle_connection_is_closed(impatient):
    started = time.monotonic()
    with connect(impatient) as idle, connect(impatient) as trickling:
        trickling.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert json_error(read_until_closed(trickling), 408) == "header_timeout"
        assert read_until_closed(idle) == b""  # connected, never sent a byte: closed without an answer
    assert time.monotonic() - started < 8
    assert post(impatient, image_request(20_000)).status_code == 200


def test_keep_alive_connections_may_idle_between_requests(impatient):
    """The header deadline starts with a request's first bytes, so an idle keep-alive connection
    is left to uvicorn's keep-alive timeout (65 s here), not cut after 1 s."""
    with connect(impatient) as s:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        s.sendall(request)
        assert read_response(s).startswith(b"HTTP/1.1 200")
        time.sleep(2.5)
        s.sendall(request)
        assert read_response(s).startswith(b"HTTP/1.1 200")


def test_body_limit_above_the_budget_is_refused_at_start():
    code, err = serve_fails({"LIMOE_MAX_BODY_BYTES": "2000000", "LIMOE_MAX_IMAGE_BYTES": "1000000",
                              "LIMOE_MAX_INFLIGHT_BYTES": "1000000"})
    assert code == 2 and "\n  LIMOE_MAX_BODY_BYTES cannot exceed LIMOE_MAX_INFLIGHT_BYTES" in err


def test_a_cancelled_request_cancels_its_work():
    """`answer` is awaited by the request's task; when that task is cancelled (a drain cut short),
    the work it started (the request's items in the batch queues) is cancelled too, not left
    running until the engine stops."""
    import asyncio

    from service.http import answer

    class Connected:  # a request whose client never disconnects
        async def receive(self):
            await asyncio.Event().wait()

    async def scenario():
        started, work_cancelled = asyncio.Event(), asyncio.Event()

        async def work():
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                work_cancelled.set()
                raise

        request = asyncio.ensure_future(answer(Connected(), work(), timeout_s=60))
        await started.wait()
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await asyncio.sleep(0)
        return work_cancelled.is_set()

    assert asyncio.run(scenario())
