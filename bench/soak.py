"""Soak: `limoe serve` on the shipped default model (limoe-small) under a long, mixed, seeded
load on loopback, watched for leaks, errors and latency drift.

    python bench/soak.py                                   # 30 minutes, a sample every 30 s
    nice -n 5 python bench/soak.py --json docs/results/soak.json
    python bench/soak.py --ci --json /tmp/soak_ci.json     # 1 minute, a sample every 5 s (the test runs it)
    python bench/soak.py --seconds 40 --window 5           # any length (for trying things out)

The server runs with its defaults except for a temporary LIMOE_JOBS_DIR and shorter limits so
that the abusive clients are cheap: LIMOE_BODY_TIMEOUT_S=8, LIMOE_HEADER_TIMEOUT_S=5,
LIMOE_MAX_BODY_BYTES=4 MiB (LIMOE_MAX_IMAGE_BYTES=2 MiB). One asyncio loop (uvloop when
installed) in this process drives a fixed set of concurrent workers, each with its own
`random.Random(seed + k)`, until the time is up (every socket and request has a timeout):

- valid traffic, closed loop with a short random think time: 3 x POST /v1/classify JSON (base64,
  1-4 images), 2 x the same as multipart, 1 x POST /v1/embed (images and texts), 1 x POST
  /v1/classify/bulk (16-32 images); every 200 is checked (one result per image, no error);
- 1 batch worker: a JSONL of 24-48 /v1/classify lines (about one in ten with a corrupt image)
  through POST /v1/files and /v1/batches, polled until finished; the output and error files must
  hold every custom_id exactly once, the good lines in the output, the corrupt ones in the
  errors; then its files are deleted (so the disk does not fill up over a long run);
- 1 vanishing client (raw socket), in turn: headers with a Content-Length and half the body, then
  close (`vanish_body`); a whole request, then close before the answer (`vanish_before_response`);
  a whole /v1/embed request, read 12 bytes of the answer, close (`vanish_mid_response`);
- 1 slow client (raw socket), in turn: the body in small chunks spread over 40% of the body
  timeout (`slow_body_under`: 200); half the body, then nothing past the body timeout
  (`slow_body_beyond`: 408 body_timeout); half the headers, then nothing past the header
  timeout (`slow_headers_beyond`: 408 header_timeout);
- 1 bad-input client cycling through a corpus built here (corrupt bytes, empty file, PNG headers
  claiming 100 Mpx and 400 Mpx, malformed/nested JSON, bad base64, 1001 labels, empty labels,
  malformed multipart, wrong media type, too many images, an /v1/embed with nothing, a wrong
  batch purpose; each must get its 4xx with a JSON {"error", "code"} body) and unusual valid
  images (1x1, animated GIF, CMYK JPEG, 16-bit PNG: 200), as tests/test_bad_inputs.py expects;
- 1 oversized client (raw socket), in turn: a Content-Length over LIMOE_MAX_BODY_BYTES and no body
  (`oversized_declared`), and a chunked body streamed past it (`oversized_streamed`): 413
  body_too_large (for the streamed one, a reset connection before the answer could be read is
  counted apart and tolerated: the server closes a socket with unread bytes, which TCP may turn
  into a reset).

Every --window seconds (30; 5 with --ci) a sample: answers by status per kind of traffic,
p50/p99 of the valid /v1/classify calls (JSON and multipart) in the window, and the server's RSS,
open file descriptors and threads (psutil on its pid; these are also traced every 2 s for the
fits), jobs submitted and finished. After the time is up the traffic stops, the last job is
waited for, the clients close, and the server is checked (alive, /healthz and /readyz 200, fds).

Goals (exit 1 if one is broken; `--json PATH` writes the samples, the trace, totals and goals):
- `no_5xx` (strict): no 5xx answer, other than a 503 with a documented overload code
  (`OVERLOAD_503`; today overload is 429 `overloaded` / `too_many_bytes_in_flight`, so in effect
  none), on any kind of traffic;
- `expected_answers` (strict): every answer is the one its kind expects (valid calls 200, or 429
  overload; the slow, vanishing, oversized and bad inputs as above), with no transport errors;
- `bad_inputs` (strict): every corpus entry got its documented status and code;
- `jobs` (strict): every job submitted finished `completed`, each line with exactly one result;
- `traffic` (strict): every kind of traffic was exercised; `server_ok` (strict): alive and
  ready at the end;
- `rss_slope`: least-squares slope of the traced RSS over the second half below
  2 MB/min + 16 MB / (second half in minutes). Over a 30-minute run that is 3.1 MB/min: a leak of
  1 KB per valid request (about 6 MB/min here) fails it, allocator noise (a few MB, once) does
  not; over the 1-minute CI run (34 MB/min) only a gross leak fails;
- `fd_slope`: the same fit of open fds, below 1 fd/min + (client connections at once) / (second
  half in minutes): a few connections more or fewer at one sample is noise, one fd kept per
  vanished or slow client (dozens per minute) fails;
- `p99_steady`: p99 of the valid classify calls in the second half at most 2x that of the first.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._load import close_clients, new_clients, percentile, run_async
from bench._payloads import BOUNDARY, LABELS, encode_body, png_images
from bench._server import Server, unwind_on_sigterm

MODEL = "limoe-small"
BODY_TIMEOUT_S = 8.0
HEADER_TIMEOUT_S = 5.0
MAX_BODY = 4 * 2 ** 20
SERVER_ENV = {"model": MODEL, "body_timeout_s": BODY_TIMEOUT_S, "header_timeout_s": HEADER_TIMEOUT_S,
              "max_body_bytes": MAX_BODY, "max_image_bytes": MAX_BODY // 2}
# 503 codes that mean "overloaded, retry": tolerated by the no_5xx goal. The service answers
# overload with 429 today (service/errors.py Overloaded, service/http.py BodiesInFlight,
# service/job_runner.py TooManyBatches), so this only keeps the goal right if a 503 variant is added.
OVERLOAD_503 = frozenset({"overloaded", "queue_full", "too_many_bytes_in_flight"})
OVERLOAD_429 = frozenset({"overloaded", "too_many_bytes_in_flight"})
LABEL_SETS = [LABELS, ["rocket", "cat", "pizza", "house"], ["red", "green", "blue"], LABELS + ["a tree", "a boat"]]
TEXTS = ["a photo of a cat", "a red circle", "rocket", "a small blue house", "pizza"]
WORKERS = {"classify_json": 3, "classify_multipart": 2, "embed": 1, "bulk": 1, "batch": 1, "vanish": 1, "slow": 1,
           "bad_input": 1, "oversized": 1}
CONNECTIONS = sum(WORKERS.values())  # client connections open at once, at most (a poll is one at a time)
KINDS = ["classify_json", "classify_multipart", "embed", "bulk", "batch_api", "vanish_body", "vanish_before_response",
         "vanish_mid_response", "slow_body_under", "slow_body_beyond", "slow_headers_beyond", "bad_input",
         "oversized_declared", "oversized_streamed"]
# what each kind expects: statuses that are right, and (tolerated) ones that are not errors
EXPECTED = {"classify_json": {"200"}, "classify_multipart": {"200"}, "embed": {"200"}, "bulk": {"200"},
            "batch_api": {"200"}, "vanish_body": {"vanished"}, "vanish_before_response": {"vanished"},
            "vanish_mid_response": {"200"}, "slow_body_under": {"200"}, "slow_body_beyond": {"408"},
            "slow_headers_beyond": {"408"}, "bad_input": set(), "oversized_declared": {"413"},
            "oversized_streamed": {"413", "reset"}}
FINISHED = ("completed", "failed", "cancelled", "expired")
CORRUPT = b"\x00\x01garbage, not an image\xff\xfe" * 8
GOAL_RSS_MB_MIN, RSS_NOISE_MB = 2.0, 16.0
GOAL_FD_MIN = 1.0
GOAL_P99_RATIO = 2.0
# --ci (the suite's run): long enough for every kind of traffic several times over (the slowest, the
# slow client's three variants, take ~17 s a round: 3 rounds; the bad-input corpus ~5 s a pass;
# a job ~1 s) and for 12 samples, short enough for CI; its slope and p99 goals are only indicative.
CI_SECONDS, CI_WINDOW_S = 60.0, 5.0


# -- the bad-input corpus (what tests/test_bad_inputs.py expects of each) --------------------------------

def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height with almost no pixel data (a decompression bomb's
    header): only a size check before decoding answers 413."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (24, 24), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def gray16_png() -> bytes:
    return _encode(Image.fromarray(np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 113))


@dataclass
class Bad:
    """One corpus entry: a request and the answer it must get (`code` None: a 200 classification)."""

    name: str
    path: str
    body: bytes
    ctype: str
    status: int
    code: str | None


def _json(path: str, obj, status: int, code: str | None, name: str) -> Bad:
    return Bad(name, path, json.dumps(obj).encode(), "application/json", status, code)


def _multipart(name: str, images: list[bytes], status: int, code: str | None, labels=LABELS,
               path: str = "/v1/classify") -> Bad:
    body, headers = encode_body(images, labels, "multipart")
    return Bad(name, path, body, headers["content-type"], status, code)


def bad_inputs() -> list[Bad]:
    good = png_images(1, size=32, seed=99)[0]
    g64 = base64.b64encode(good).decode()
    mp_ctype = f"multipart/form-data; boundary={BOUNDARY}"
    whole, _ = encode_body([good, good], LABELS, "multipart")
    cut = whole[: whole.rindex(good) + len(good) // 2]  # in the second image, no closing boundary
    batch_file = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
                  f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
                  f'Content-Type: application/jsonl\r\n\r\n{{"custom_id": "a"}}\n\r\n--{BOUNDARY}--\r\n').encode()
    return [
        _multipart("corrupt_bytes", [CORRUPT], 400, "invalid_image"),
        _multipart("empty_file", [b""], 400, "invalid_image"),
        _json("/v1/classify", {"images": [base64.b64encode(CORRUPT).decode()], "labels": LABELS}, 400, "invalid_image",
              "corrupt_bytes_json"),
        _multipart("bomb_header_100mpx", [png_header_only(10_000, 10_000)], 413, "image_too_large"),
        _json("/v1/classify", {"images": [base64.b64encode(png_header_only(20_000, 20_000)).decode()],
                               "labels": LABELS}, 413, "image_too_large", "bomb_header_400mpx_json"),
        Bad("malformed_json", "/v1/classify", b'{"images": ["abc"], "labels": [', "application/json", 400,
            "invalid_json"),
        Bad("nested_json", "/v1/classify", b"[" * 50_000 + b"]" * 50_000, "application/json", 400, "invalid_json"),
        _json("/v1/classify", {"images": ["!!!not base64###"], "labels": LABELS}, 400, "invalid_base64",
              "invalid_base64"),
        _json("/v1/classify", {"images": [g64], "labels": [f"label {i}" for i in range(1001)]}, 422,
              "too_many_labels", "too_many_labels"),
        _json("/v1/classify", {"images": [g64], "labels": []}, 422, "invalid_labels", "empty_labels"),
        _json("/v1/classify", {"images": [g64], "labels": ["", "cat"]}, 422, "invalid_labels", "empty_label"),
        _multipart("empty_labels_multipart", [good], 422, "invalid_labels", labels=["", "cat"]),
        _json("/v1/classify", {"images": [g64] * 17, "labels": LABELS}, 422, "too_many_images", "too_many_images"),
        _json("/v1/classify", {"images": g64, "labels": LABELS}, 422, "invalid_request", "images_not_a_list"),
        Bad("multipart_wrong_boundary", "/v1/classify", whole, "multipart/form-data; boundary=NotTheBoundary", 400,
            "invalid_multipart"),
        Bad("multipart_no_boundary", "/v1/classify", whole, "multipart/form-data", 400, "invalid_multipart"),
        Bad("multipart_truncated", "/v1/classify", cut, mp_ctype, 400, "invalid_multipart"),
        Bad("multipart_not_multipart", "/v1/classify", b"this is not a multipart body", mp_ctype, 400,
            "invalid_multipart"),
        Bad("wrong_media_type", "/v1/classify", json.dumps({"images": [g64], "labels": LABELS}).encode(),
            "text/plain", 415, "unsupported_media_type"),
        _json("/v1/embed", {}, 422, "empty_request", "embed_nothing"),
        Bad("batch_wrong_purpose", "/v1/files", batch_file, mp_ctype, 422, "invalid_purpose"),
        # unusual but valid: classified
        _multipart("valid_1x1", [_encode(Image.new("RGB", (1, 1), (200, 30, 30)))], 200, None),
        _multipart("valid_animated_gif", [animated_gif()], 200, None),
        _multipart("valid_cmyk_jpeg", [_encode(Image.new("CMYK", (24, 24), (0, 255, 255, 0)), "JPEG")], 200, None),
        _multipart("valid_16bit_png", [gray16_png()], 200, None),
    ]


# -- what happened ---------------------------------------------------------------------------------------

@dataclass
class Record:
    """Everything the workers saw: per-window and total answers by kind and status."""

    window: Counter = field(default_factory=Counter)  # (kind, status) -> count, since the last sample
    total: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)  # valid classify calls, this window (s)
    all_latencies: list[tuple[float, float]] = field(default_factory=list)  # (t since start, seconds)
    unexpected: list[dict] = field(default_factory=list)  # the first examples
    unexpected_n: int = 0
    five_xx: list[dict] = field(default_factory=list)
    five_xx_n: int = 0
    bad: dict = field(default_factory=dict)  # corpus name -> {"expected", "got": {status/code: n}}
    jobs: dict = field(default_factory=lambda: {"submitted": 0, "finished": 0, "ok": 0, "lines": 0,
                                                "failures": [], "seconds": []})
    t0: float = field(default_factory=time.monotonic)

    def note(self, kind: str, status: str, code: str | None = None, ok: bool | None = None, detail: str = "") -> None:
        self.window[(kind, status)] += 1
        self.total[(kind, status)] += 1
        if status[:1] == "5" and not (status == "503" and code in OVERLOAD_503):
            self.five_xx_n += 1
            if len(self.five_xx) < 20:
                self.five_xx.append({"kind": kind, "status": status, "code": code, "detail": detail[:300],
                                     "at_s": round(time.monotonic() - self.t0, 1)})
        if ok is None:
            ok = status in EXPECTED[kind] or (status == "429" and code in OVERLOAD_429)
        if not ok:
            self.unexpected_n += 1
            if len(self.unexpected) < 20:
                self.unexpected.append({"kind": kind, "status": status, "code": code, "detail": detail[:300],
                                        "at_s": round(time.monotonic() - self.t0, 1)})


def _code(text: str | bytes) -> str | None:
    try:
        body = json.loads(text)
    except ValueError:
        return None
    return body.get("code") if isinstance(body, dict) else None


# -- the workers -----------------------------------------------------------------------------------------

class Soak:
    def __init__(self, server: Server, seconds: float, window: float, seed: int):
        self.server, self.base, self.port = server, server.base, server.port
        self.seconds, self.window_s, self.seed = seconds, window, seed
        self.rec = Record()
        self.images = png_images(48, seed=seed)
        self.b64 = [base64.b64encode(im).decode() for im in self.images]
        self.corpus = bad_inputs()
        self.stop = asyncio.Event()
        self.samples: list[dict] = []
        self.trace: list[dict] = []  # every 2 s: t, rss_mb, fds, threads

    # -- valid traffic --
    async def _post(self, session: aiohttp.ClientSession, kind: str, path: str, body: bytes, ctype: str,
                    check) -> None:
        started = time.perf_counter()
        try:
            async with session.post(self.base + path, data=body, headers={"content-type": ctype}) as r:
                text = await r.read()
                status = r.status
        except (TimeoutError, aiohttp.ClientError) as e:
            self.rec.note(kind, f"error:{type(e).__name__}", detail=str(e))
            return
        took = time.perf_counter() - started
        code = _code(text) if status != 200 else None
        if status == 200:
            try:
                why = check(json.loads(text))
            except (ValueError, AttributeError, TypeError) as e:
                why = f"{type(e).__name__}: {text[:200]!r}"
            if why:
                self.rec.note(kind, "200", ok=False, detail=f"bad 200 body: {why}")
                return
            if kind.startswith("classify_"):
                self.rec.latencies.append(took)
                self.rec.all_latencies.append((time.monotonic() - self.rec.t0, took))
        self.rec.note(kind, str(status), code, detail=text[:300].decode(errors="replace"))

    @staticmethod
    def _classified(n: int):
        def check(body) -> str | None:
            results = body.get("results") or []
            if len(results) != n or any("labels" not in r for r in results):
                return f"{len(results)} results for {n} images, or an error: {str(body)[:200]}"
            return None
        return check

    @staticmethod
    def _embedded(n: int):
        def check(body) -> str | None:
            got = [x for x in body.get("images", []) + body.get("texts", []) if x.get("embedding")]
            return None if len(got) == n else f"{len(got)} embeddings for {n} items"
        return check

    async def valid(self, kind: str, k: int, session: aiohttp.ClientSession) -> None:
        rng = random.Random(self.seed * 1000 + k)
        while not self.stop.is_set():
            labels = rng.choice(LABEL_SETS)
            if kind == "embed":
                ims = rng.sample(range(len(self.images)), rng.randint(0, 2))
                texts = rng.sample(TEXTS, rng.randint(0 if ims else 1, 3))
                body = json.dumps({"images": [self.b64[i] for i in ims], "texts": texts}).encode()

                await self._post(session, kind, "/v1/embed", body, "application/json",
                                 self._embedded(len(ims) + len(texts)))
            else:
                n = rng.randint(16, 32) if kind == "bulk" else rng.randint(1, 4)
                ims = [rng.randrange(len(self.images)) for _ in range(n)]
                path = "/v1/classify/bulk" if kind == "bulk" else "/v1/classify"
                if kind == "classify_multipart":
                    body, headers = encode_body([self.images[i] for i in ims], labels, "multipart")
                    ctype = headers["content-type"]
                else:
                    body, ctype = json.dumps({"images": [self.b64[i] for i in ims], "labels": labels}).encode(), \
                        "application/json"
                await self._post(session, kind, path, body, ctype, self._classified(n))
            await asyncio.sleep(rng.uniform(0.0, 0.05))  # think time: load the cores, do not starve the jobs

    # -- batch jobs --
    async def batch(self, session: aiohttp.ClientSession) -> None:
        rng = random.Random(self.seed * 1000 + 500)
        j = 0
        while not self.stop.is_set():
            j += 1
            try:
                await self._one_job(session, rng, j)
            except (TimeoutError, aiohttp.ClientError, ValueError, KeyError) as e:
                self.rec.jobs["failures"].append(f"job {j}: {type(e).__name__}: {e}"[:300])
                self.rec.note("batch_api", f"error:{type(e).__name__}", detail=str(e))
            await asyncio.sleep(rng.uniform(0.5, 1.5))

    async def _api(self, session, method: str, path: str, **kw) -> tuple[int, bytes]:
        async with session.request(method, self.base + path, **kw) as r:
            data = await r.read()
        self.rec.note("batch_api", str(r.status), _code(data) if r.status != 200 else None,
                      detail=f"{method} {path}: {data[:200].decode(errors='replace')}")
        return r.status, data

    async def _one_job(self, session, rng: random.Random, j: int) -> None:
        n = rng.randint(24, 48)
        good, bad = set(), set()
        lines = []
        for i in range(n):
            cid = f"soak-{j}-{i}"
            corrupt = rng.random() < 0.1
            (bad if corrupt else good).add(cid)
            image = base64.b64encode(CORRUPT).decode() if corrupt else rng.choice(self.b64)
            lines.append(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/classify",
                                     "body": {"images": [image], "labels": rng.choice(LABEL_SETS), "top_k": 2}}))
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", ("\n".join(lines) + "\n").encode(), filename=f"soak-{j}.jsonl",
                       content_type="application/jsonl")
        status, data = await self._api(session, "POST", "/v1/files", data=form)
        if status != 200:
            return
        file_id = json.loads(data)["id"]
        while True:
            status, data = await self._api(session, "POST", "/v1/batches", json={
                "input_file_id": file_id, "endpoint": "/v1/classify", "completion_window": "24h"})
            if status != 429 or self.stop.is_set():
                break
            await asyncio.sleep(1.0)
        if status != 200:
            await self._api(session, "DELETE", f"/v1/files/{file_id}")
            return
        batch_id = json.loads(data)["id"]
        self.rec.jobs["submitted"] += 1
        started = time.monotonic()
        deadline = started + max(180.0, 4 * self.window_s)  # polled on after the traffic stops, until then
        while True:
            status, data = await self._api(session, "GET", f"/v1/batches/{batch_id}")
            batch = json.loads(data) if status == 200 else {}
            if batch.get("status") in FINISHED:
                break
            if time.monotonic() > deadline:
                self.rec.jobs["failures"].append(f"job {j} ({batch_id}): still {batch.get('status')} after "
                                                 f"{deadline - started:.0f}s")
                return
            await asyncio.sleep(0.5)
        self.rec.jobs["finished"] += 1
        self.rec.jobs["lines"] += n
        self.rec.jobs["seconds"].append(round(time.monotonic() - started, 2))
        seen: Counter = Counter()
        where: dict[str, str] = {}
        for key in ("output_file_id", "error_file_id"):
            if batch.get(key):
                status, data = await self._api(session, "GET", f"/v1/files/{batch[key]}/content")
                for line in data.decode().splitlines():
                    rec = json.loads(line)
                    seen[rec["custom_id"]] += 1
                    where[rec["custom_id"]] = key
        problems = []
        if batch["status"] != "completed":
            problems.append(f"status {batch['status']}: {batch.get('errors')}")
        if set(seen) != good | bad or any(v != 1 for v in seen.values()):
            problems.append(f"{len(seen)} of {n} custom_ids answered, repeated: "
                            f"{sorted(k for k, v in seen.items() if v != 1)[:5]}")
        if any(where.get(c) != "output_file_id" for c in good) or any(where.get(c) != "error_file_id" for c in bad):
            problems.append("a good line in the error file or a corrupt one in the output")
        counts = batch.get("request_counts") or {}
        if (counts.get("completed"), counts.get("failed")) != (len(good), len(bad)):
            problems.append(f"request_counts {counts}, expected {len(good)} completed, {len(bad)} failed")
        if problems:
            self.rec.jobs["failures"].append(f"job {j} ({batch_id}): " + "; ".join(problems))
        else:
            self.rec.jobs["ok"] += 1
        for key in ("input_file_id", "output_file_id", "error_file_id"):
            if batch.get(key):
                await self._api(session, "DELETE", f"/v1/files/{batch[key]}")

    # -- raw sockets --
    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 10)

    @staticmethod
    def _head(path: str, ctype: str, length: int | None) -> bytes:
        size = f"Content-Length: {length}\r\n" if length is not None else "Transfer-Encoding: chunked\r\n"
        return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ctype}\r\n{size}"
                "Connection: close\r\n\r\n").encode()

    @staticmethod
    async def _read_answer(reader: asyncio.StreamReader, timeout: float) -> tuple[str, str | None, bytes]:
        """(status, code, raw) of the answer read until the server closes; status "closed" when it
        closed without one, "reset" when the connection was reset first, "timeout"."""
        data = b""
        try:
            async with asyncio.timeout(timeout):
                while chunk := await reader.read(65536):
                    data += chunk
        except TimeoutError:
            return ("timeout" if not data else _status(data)), None, data
        except ConnectionError:
            if not data:
                return "reset", None, data
        if not data:
            return "closed", None, data
        return _status(data), _code(data.partition(b"\r\n\r\n")[2]), data

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            await asyncio.wait_for(writer.wait_closed(), 5)
        except (ConnectionError, TimeoutError):
            pass

    def _classify_json(self, rng: random.Random, n: int) -> bytes:
        return json.dumps({"images": [rng.choice(self.b64) for _ in range(n)], "labels": rng.choice(LABEL_SETS)}
                          ).encode()

    async def vanish(self) -> None:
        rng = random.Random(self.seed * 1000 + 600)
        k = 0
        while not self.stop.is_set():
            variant = ("vanish_body", "vanish_before_response", "vanish_mid_response")[k % 3]
            k += 1
            try:
                reader, writer = await self._open()
                try:
                    if variant == "vanish_body":
                        multipart = rng.random() < 0.5
                        if multipart:
                            body, headers = encode_body([rng.choice(self.images) for _ in range(2)], LABELS,
                                                        "multipart")
                            ctype = headers["content-type"]
                        else:
                            body, ctype = self._classify_json(rng, 2), "application/json"
                        cut = rng.randint(1, len(body) - 1)
                        writer.write(self._head("/v1/classify", ctype, len(body)) + body[:cut])
                        await writer.drain()
                        await asyncio.sleep(rng.uniform(0.0, 0.3))
                        status = "vanished"
                    elif variant == "vanish_before_response":
                        body = self._classify_json(rng, 4)
                        writer.write(self._head("/v1/classify/bulk", "application/json", len(body)) + body)
                        await writer.drain()
                        await asyncio.sleep(rng.uniform(0.0, 0.02))
                        status = "vanished"
                    else:
                        body = json.dumps({"images": [rng.choice(self.b64) for _ in range(4)], "texts": TEXTS,
                                           "explain": True}).encode()
                        writer.write(self._head("/v1/embed", "application/json", len(body)) + body)
                        await writer.drain()
                        first = await asyncio.wait_for(reader.readexactly(12), 60)
                        status = _status(first)
                finally:
                    if variant == "vanish_body" and rng.random() < 0.5:
                        writer.close()  # a FIN: the body ends early
                    else:
                        writer.transport.abort()  # a reset: the client is just gone
                self.rec.note(variant, status)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
                self.rec.note(variant, f"error:{type(e).__name__}", detail=str(e))
            await asyncio.sleep(rng.uniform(0.1, 0.4))

    async def slow(self) -> None:
        rng = random.Random(self.seed * 1000 + 700)
        k = 0
        while not self.stop.is_set():
            variant = ("slow_body_under", "slow_body_beyond", "slow_headers_beyond")[k % 3]
            k += 1
            n = 1
            body = self._classify_json(rng, n)
            try:
                reader, writer = await self._open()
                try:
                    if variant == "slow_body_under":
                        writer.write(self._head("/v1/classify", "application/json", len(body)))
                        pieces = [body[i:i + 1024] for i in range(0, len(body), 1024)]
                        pause = 0.4 * BODY_TIMEOUT_S / len(pieces)
                        for piece in pieces:
                            await asyncio.sleep(pause)
                            writer.write(piece)
                            await writer.drain()
                        status, code, raw = await self._read_answer(reader, 60)
                        if status == "200" and len(json.loads(raw.partition(b"\r\n\r\n")[2]).get("results")
                                                    or []) != n:
                            self.rec.note(variant, status, ok=False, detail=raw[:300].decode(errors="replace"))
                            continue
                    elif variant == "slow_body_beyond":
                        writer.write(self._head("/v1/classify", "application/json", len(body)) + body[:len(body) // 2])
                        await writer.drain()
                        status, code, raw = await self._read_answer(reader, BODY_TIMEOUT_S + 15)
                    else:
                        writer.write(b"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
                        await writer.drain()
                        status, code, raw = await self._read_answer(reader, HEADER_TIMEOUT_S + 15)
                finally:
                    await self._close(writer)
                want = "header_timeout" if variant == "slow_headers_beyond" else "body_timeout"
                ok = False if status == "408" and code != want else None
                self.rec.note(variant, status, code, ok=ok, detail=raw[:300].decode(errors="replace"))
            except (OSError, TimeoutError, ValueError) as e:
                self.rec.note(variant, f"error:{type(e).__name__}", detail=str(e))
            await asyncio.sleep(rng.uniform(0.1, 0.5))

    async def oversized(self) -> None:
        rng = random.Random(self.seed * 1000 + 800)
        k = 0
        while not self.stop.is_set():
            variant = ("oversized_declared", "oversized_streamed")[k % 2]
            k += 1
            path = rng.choice(["/v1/classify", "/v1/classify/bulk", "/v1/embed", "/"])
            try:
                reader, writer = await self._open()
                sender = None
                try:
                    if variant == "oversized_declared":
                        writer.write(self._head(path, "application/json", MAX_BODY + rng.randint(1, 10 * MAX_BODY)))
                        await writer.drain()
                    else:
                        writer.write(self._head(path, "application/json", None))

                        async def send(writer: asyncio.StreamWriter) -> None:
                            chunk = b" " * 65536
                            for _ in range(MAX_BODY // len(chunk) + 8):
                                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                                await writer.drain()
                            writer.write(b"0\r\n\r\n")
                            await writer.drain()

                        sender = asyncio.ensure_future(send(writer))
                    status, code, raw = await self._read_answer(reader, 60)
                finally:
                    if sender is not None:
                        sender.cancel()
                        await asyncio.gather(sender, return_exceptions=True)
                    await self._close(writer)
                ok = None if status != "413" or code == "body_too_large" else False
                self.rec.note(variant, status, code, ok=ok, detail=raw[:300].decode(errors="replace"))
            except (OSError, TimeoutError) as e:
                self.rec.note(variant, f"error:{type(e).__name__}", detail=str(e))
            await asyncio.sleep(rng.uniform(0.2, 0.6))

    async def bad_input(self, session: aiohttp.ClientSession) -> None:
        rng = random.Random(self.seed * 1000 + 900)
        order = list(self.corpus)
        while not self.stop.is_set():
            rng.shuffle(order)
            for item in order:
                if self.stop.is_set():
                    break
                await self._bad_one(session, item)
                await asyncio.sleep(rng.uniform(0.1, 0.3))

    async def _bad_one(self, session: aiohttp.ClientSession, item: Bad) -> None:
        entry = self.rec.bad.setdefault(item.name, {"expected": f"{item.status} {item.code or 'classified'}",
                                                    "got": Counter()})
        try:
            async with session.post(self.base + item.path, data=item.body,
                                    headers={"content-type": item.ctype}) as r:
                raw = await r.read()
                status, ctype = r.status, r.headers.get("content-type", "")
        except (TimeoutError, aiohttp.ClientError) as e:
            entry["got"][f"error:{type(e).__name__}"] += 1
            self.rec.note("bad_input", f"error:{type(e).__name__}", ok=False, detail=f"{item.name}: {e}")
            return
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if item.code is None:
            results = (body or {}).get("results") if isinstance(body, dict) else None
            ok = status == 200 and bool(results) and "labels" in results[0]
            got = "200 classified" if ok else f"{status} {_code(raw)}"
        else:
            ok = (status == item.status and ctype.startswith("application/json") and isinstance(body, dict)
                  and body.get("code") == item.code and isinstance(body.get("error"), str) and body["error"].strip())
            got = f"{status} {body.get('code') if isinstance(body, dict) else '(not JSON)'}"
        entry["got"][got] += 1
        self.rec.note("bad_input", str(status), _code(raw), ok=ok, detail=f"{item.name}: {raw[:200]!r}")

    # -- sampling --
    def _proc(self) -> dict:
        p = self.server.process
        return {"rss_mb": round(p.memory_info().rss / 2 ** 20, 2), "fds": p.num_fds(), "threads": p.num_threads()}

    async def sampler(self) -> None:
        next_sample = self.rec.t0 + self.window_s
        while not self.stop.is_set():
            try:
                await asyncio.wait_for(self.stop.wait(), 2.0)
            except TimeoutError:
                pass
            now = time.monotonic()
            proc = self._proc()
            self.trace.append({"t_s": round(now - self.rec.t0, 2), **proc})
            if now >= next_sample or self.stop.is_set():
                self._sample(now, proc)
                next_sample += self.window_s

    def _sample(self, now: float, proc: dict) -> None:
        answers: dict[str, dict[str, int]] = {}
        for (kind, status), n in sorted(self.rec.window.items()):
            answers.setdefault(kind, {})[status] = n
        lat = self.rec.latencies
        self.samples.append({"t_s": round(now - self.rec.t0, 1), "answers": answers,
                             "classify_calls": len(lat), "p50_ms": round(percentile(lat, 50) * 1000, 1),
                             "p99_ms": round(percentile(lat, 99) * 1000, 1), **proc,
                             "jobs_submitted": self.rec.jobs["submitted"], "jobs_finished": self.rec.jobs["finished"]})
        s = self.samples[-1]
        print(f"[{s['t_s']:7.1f}s] classify {s['classify_calls']} calls p50 {s['p50_ms']} ms p99 {s['p99_ms']} ms; "
              f"RSS {s['rss_mb']:.1f} MB, {s['fds']} fds, {s['threads']} threads; jobs {s['jobs_finished']}/"
              f"{s['jobs_submitted']}; 5xx so far {self.rec.five_xx_n}, unexpected {self.rec.unexpected_n}",
              flush=True)
        self.rec.window.clear()
        self.rec.latencies = []

    # -- the run --
    async def run(self) -> dict:
        start_proc = self._proc()
        n_valid = sum(WORKERS[k] for k in ("classify_json", "classify_multipart", "embed", "bulk"))
        sessions = new_clients(n_valid + 2)  # + the batch worker and the bad-input client
        self.rec = Record()
        tasks, k = [], 0
        for kind in ("classify_json", "classify_multipart", "embed", "bulk"):
            for _ in range(WORKERS[kind]):
                tasks.append(asyncio.ensure_future(self.valid(kind, k, sessions[k])))
                k += 1
        batch_task = asyncio.ensure_future(self.batch(sessions[k]))
        tasks += [asyncio.ensure_future(self.bad_input(sessions[k + 1])), asyncio.ensure_future(self.vanish()),
                  asyncio.ensure_future(self.slow()), asyncio.ensure_future(self.oversized())]
        sampler = asyncio.ensure_future(self.sampler())
        try:
            await asyncio.sleep(self.seconds)
        finally:
            self.stop.set()
            stopped = time.monotonic()
            _, pending = await asyncio.wait(tasks, timeout=BODY_TIMEOUT_S + 30)
            for t in pending:
                t.cancel()
            await asyncio.wait([batch_task], timeout=max(200.0, 5 * self.window_s))  # the last job finishes
            batch_task.cancel()
            await asyncio.gather(*tasks, batch_task, sampler, return_exceptions=True)
            await close_clients(sessions)
        for t in tasks + [batch_task]:
            if not t.cancelled() and t.exception() is not None:
                self.rec.note("batch_api" if t is batch_task else "bad_input", "error:worker", ok=False,
                              detail=f"a worker failed: {t.exception()!r}")
        drain_s = time.monotonic() - stopped
        await asyncio.sleep(2.0)  # connections closed on both sides
        return {"start": start_proc, "end": self._proc(), "pending_cancelled": len(pending),
                "drain_s": round(drain_s, 1)}


def _status(data: bytes) -> str:
    parts = data.split(b" ", 2)
    return parts[1].decode(errors="replace") if len(parts) > 1 and parts[0].startswith(b"HTTP/") else "garbled"


# -- the goals -------------------------------------------------------------------------------------------

def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per minute."""
    if len(points) < 3:
        return float("nan")
    t, v = np.array(points, dtype=float).T
    return float(np.polyfit(t / 60.0, v, 1)[0])


def goals(soak: Soak, proc: dict, end: dict, seconds: float) -> dict:
    rec = soak.rec
    half_t = seconds / 2
    second = [p for p in soak.trace if p["t_s"] >= half_t]
    half_min = max(seconds / 2 / 60.0, 1e-6)
    rss_slope = slope_per_min([(p["t_s"], p["rss_mb"]) for p in second])
    fd_slope = slope_per_min([(p["t_s"], p["fds"]) for p in second])
    rss_limit = GOAL_RSS_MB_MIN + RSS_NOISE_MB / half_min
    fd_limit = GOAL_FD_MIN + CONNECTIONS / half_min
    warm = min(10.0, seconds / 10)  # the first seconds set up connections and caches
    first = [d for t, d in rec.all_latencies if warm <= t < half_t]
    last = [d for t, d in rec.all_latencies if t >= half_t]
    p99_first, p99_last = percentile(first, 99) * 1000, percentile(last, 99) * 1000
    ratio = p99_last / p99_first if p99_first else float("nan")
    exercised = {kind: sum(n for (k, _), n in rec.total.items() if k == kind) for kind in KINDS}
    bad_wrong = {name: {"expected": e["expected"], "got": dict(e["got"])} for name, e in rec.bad.items()
                 if set(e["got"]) != {e["expected"]}}
    missing = [b.name for b in soak.corpus if b.name not in rec.bad]
    jobs = rec.jobs
    out = {
        "no_5xx": {"ok": rec.five_xx_n == 0, "value": rec.five_xx_n, "strict": True, "examples": rec.five_xx},
        "expected_answers": {"ok": rec.unexpected_n == 0, "value": rec.unexpected_n, "strict": True,
                             "examples": rec.unexpected},
        "bad_inputs": {"ok": not bad_wrong and not missing, "value": len(bad_wrong), "strict": True,
                       "wrong": bad_wrong, "not_sent": missing},
        "jobs": {"ok": jobs["submitted"] > 0 and jobs["ok"] == jobs["finished"] == jobs["submitted"]
                 and not jobs["failures"], "value": f"{jobs['ok']} ok / {jobs['finished']} finished / "
                 f"{jobs['submitted']} submitted", "strict": True, "failures": jobs["failures"]},
        "traffic": {"ok": all(exercised.values()), "value": exercised, "strict": True},
        "server_ok": {"ok": end["alive"] and end["healthz"] == 200 and end["readyz"] == 200,
                      "value": {k: end[k] for k in ("alive", "healthz", "readyz")}, "strict": True},
        "rss_slope": {"ok": bool(rss_slope < rss_limit), "value": round(rss_slope, 3), "limit": round(rss_limit, 2),
                      "unit": "MB/min over the second half", "strict": False},
        "fd_slope": {"ok": bool(fd_slope < fd_limit), "value": round(fd_slope, 3), "limit": round(fd_limit, 2),
                     "unit": "fds/min over the second half", "strict": False},
        "p99_steady": {"ok": bool(ratio <= GOAL_P99_RATIO), "value": round(ratio, 3), "limit": GOAL_P99_RATIO,
                       "unit": "x",
                       "p99_first_half_ms": round(p99_first, 1), "p99_second_half_ms": round(p99_last, 1),
                       "strict": False},
    }
    return out


def summary(soak: Soak, proc: dict, end: dict, g: dict, seconds: float) -> str:
    rec = soak.rec
    lines = [f"soak: {seconds / 60:.1f} min, seed {soak.seed}, {CONNECTIONS} workers {WORKERS}"]
    for kind in KINDS:
        got = {s: n for (k, s), n in sorted(rec.total.items()) if k == kind}
        lines.append(f"  {kind:24s} {sum(got.values()):7d}  {got}")
    lat = [d for _, d in rec.all_latencies]
    lines.append(f"  valid classify: {len(lat)} calls, p50 {percentile(lat, 50) * 1000:.1f} ms, "
                 f"p99 {percentile(lat, 99) * 1000:.1f} ms")
    js = rec.jobs
    lines.append(f"  jobs: {js['submitted']} submitted, {js['finished']} finished, {js['ok']} with every line right "
                 f"({js['lines']} lines); seconds per job p50 {percentile(js['seconds'], 50):.1f}, "
                 f"max {max(js['seconds'], default=float('nan')):.1f}")
    s, e = proc["start"], proc["end"]
    lines.append(f"  server: RSS {s['rss_mb']:.1f} -> {e['rss_mb']:.1f} MB (peak traced "
                 f"{max((p['rss_mb'] for p in soak.trace), default=float('nan')):.1f}), fds {s['fds']} -> {e['fds']}, "
                 f"threads {s['threads']} -> {e['threads']}; alive {end['alive']}, /healthz {end['healthz']}, "
                 f"/readyz {end['readyz']}; log errors {end['log_errors']}")
    lines.append("goals:")
    for name, goal in g.items():
        unit = f" {goal['unit']}" if goal.get("unit") else ""
        extra = f" (limit {goal['limit']}{unit})" if "limit" in goal else ""
        if name == "p99_steady":
            extra += f" [{goal['p99_first_half_ms']} -> {goal['p99_second_half_ms']} ms]"
        value = goal["value"] if name != "traffic" else ("all kinds" if goal["ok"] else
                                                         [k for k, v in goal["value"].items() if not v])
        lines.append(f"  {'PASS' if goal['ok'] else 'FAIL'} {name}: {value}{extra}")
        for key in ("examples", "failures", "wrong"):
            if not goal["ok"] and goal.get(key):
                lines.append(f"       {key}: {json.dumps(goal[key], default=str)[:1500]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    unwind_on_sigterm()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))
    ap.add_argument("--minutes", type=float, default=30.0, help="how long (default 30)")
    ap.add_argument("--seconds", type=float,
                    help=f"how long, in seconds (overrides --minutes and --ci's {CI_SECONDS:g} s)")
    ap.add_argument("--ci", action="store_true", help=f"{CI_SECONDS:g} s, a sample every {CI_WINDOW_S:g} s")
    ap.add_argument("--window", type=float, help=f"seconds per sample (default 30, {CI_WINDOW_S:g} with --ci)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write samples, trace, totals and goals here")
    args = ap.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else (CI_SECONDS if args.ci else args.minutes * 60)
    window = args.window or (CI_WINDOW_S if args.ci else 30.0)
    command = "python bench/soak.py" + " ".join([""] + (argv if argv is not None else sys.argv[1:]))
    with tempfile.TemporaryDirectory(prefix="limoe-soak-") as jobs_dir, \
            Server("soak", jobs_dir=jobs_dir, **SERVER_ENV) as server:
        server.wait_ready()
        soak = Soak(server, seconds, window, args.seed)
        print(f"soak: limoe serve on {server.base} ({MODEL}), {seconds:.0f} s, a sample every {window:g} s, "
              f"seed {args.seed}", flush=True)
        proc = run_async(soak.run())
        with httpx.Client(base_url=server.base, timeout=10, trust_env=False) as c:
            def get(path: str) -> int:
                try:
                    return c.get(path).status_code
                except httpx.HTTPError:
                    return -1
            end = {"alive": server.proc.poll() is None, "healthz": get("/healthz"), "readyz": get("/readyz")}
        log = server.output()
        end["log_errors"] = sum(log.count(w) for w in ("Traceback", "ERROR", "Exception in"))
    g = goals(soak, proc, end, seconds)
    print(summary(soak, proc, end, g, seconds), flush=True)
    totals: dict[str, dict[str, int]] = {}
    for (kind, status), n in sorted(soak.rec.total.items()):
        totals.setdefault(kind, {})[status] = n
    result = {"command": command, "model": MODEL, "seconds": seconds, "window_s": window, "seed": args.seed,
              "workers": WORKERS, "server_settings": {f"LIMOE_{k.upper()}": v for k, v in SERVER_ENV.items()},
              "totals": totals, "bad_inputs": {k: {"expected": v["expected"], "got": dict(v["got"])}
                                               for k, v in soak.rec.bad.items()},
              "jobs": soak.rec.jobs, "process": proc, "end": end, "goals": g, "samples": soak.samples,
              "trace": soak.trace, **({"server_log_tail": log} if end["log_errors"] else {})}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1, default=str) + "\n")
    broken = [name for name, goal in g.items() if not goal["ok"]]
    print("all goals met" if not broken else f"goals broken: {', '.join(broken)}", flush=True)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
