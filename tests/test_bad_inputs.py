"""Bad inputs against the real server (`limoe serve`, the shipped ONNX model `limoe-tiny`, or
$LIMOE_CORPUS_MODEL from $LIMOE_CORPUS_STORE: see tests/test_bad_inputs_clip.py).

Every bad request must get a clear 4xx JSON error {"error", "code"} with the documented status,
never a 500, a hang, a crash or leaked internals; and after each one the server must still
serve: the process is alive, /healthz is 200 and a good classify request gives the same answer
as before. Inputs that are unusual but valid (1x1, animated GIF, CMYK, 16-bit, transparency,
data: URLs, old Hugging Face shapes) must succeed.

One server for the whole module, with small limits so that "too large" is cheap to send. It
serves two models (LIMOE_MODELS: `limoe-tiny`, the default, and `limoe-small`), so the corpus
runs against a multi-model server, and the model field's own bad values are in it too.
All images are built in memory with Pillow; no fixture files.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import socket
import struct
import time
import zlib
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image
from tritonclient.utils import serialize_byte_tensor

from servers import serve_process

# tests/test_bad_inputs_clip.py runs this corpus again with an imported CLIP as the default model.
MODEL = os.environ.get("LIMOE_CORPUS_MODEL", "limoe-tiny")
SECOND = "limoe-small"
LIMITS = {
    **({"model_store": os.environ["LIMOE_CORPUS_STORE"]} if os.environ.get("LIMOE_CORPUS_STORE") else {}),
    "models": f"{MODEL},{SECOND}",
    "max_body_bytes": 200_000,
    "max_image_bytes": 100_000,
    "max_image_pixels": 1_000_000,
    "max_labels": 5,
    "max_label_chars": 50,
    "max_images_per_request": 4,
    "max_bulk_images": 8,
    "max_batch_size": 4,
    "max_batch_wait_ms": 2,
    "request_timeout_s": 10,
    "preprocess_workers": 2,
}
LABELS = ["red", "blue"]
TIMEOUT = 10.0


# -- images, built in memory ----------------------------------------------------------------------

def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def solid(size=(32, 32), color=(220, 30, 30), mode="RGB", fmt="PNG", **kw) -> bytes:
    return encode(Image.new(mode, size, color), fmt, **kw)


def noise(size=(64, 64), seed=0) -> bytes:
    """A PNG that does not compress (so truncating it really cuts pixel data)."""
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB"))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height but holds almost no pixel data: decoding it would
    fail as truncated, so a 413 proves the size was refused before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


GOOD = solid()
GOOD_B64 = base64.b64encode(GOOD).decode()
CORRUPT = b"\x00\x01garbage, not an image\xff\xfe" * 8


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def animated_gif() -> tuple[bytes, bytes]:
    """(3-frame animated GIF whose first frame is red, single-frame GIF of that red frame)."""
    frames = [Image.new("RGB", (24, 24), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    anim = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(io.BytesIO(anim)).n_frames == 3
    return anim, encode(frames[0], "GIF")


def cmyk_jpeg() -> bytes:
    data = solid((24, 24), (0, 255, 255, 0), mode="CMYK", fmt="JPEG")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    return data


def gray16_png() -> bytes:
    a = (np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 113)
    data = encode(Image.fromarray(a))
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    return data


def rgba_png() -> bytes:
    return solid((24, 24), (255, 0, 0, 128), mode="RGBA")


def palette_transparent_png() -> bytes:
    p = Image.new("P", (24, 24), 1)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.paste(0, (0, 0, 12, 24))  # left half uses the transparent index
    data = encode(p, transparency=0)
    img = Image.open(io.BytesIO(data))
    assert img.mode == "P" and "transparency" in img.info
    return data


# -- the server ------------------------------------------------------------------------------------

class Server:
    def __init__(self, base: str, proc):
        self.base, self.proc = base, proc
        self.baseline: dict | None = None

    def client(self, **kw) -> httpx.Client:
        # No keep-alive: a request that makes the server drop its connection must not make the
        # next (unrelated) request fail.
        return httpx.Client(base_url=self.base, timeout=TIMEOUT,
                            limits=httpx.Limits(max_keepalive_connections=0), **kw)


@pytest.fixture(scope="module")
def server():
    with serve_process(**LIMITS) as (base, proc):
        srv = Server(base, proc)
        with srv.client() as c:
            r = classify_multipart(c, [GOOD])
            assert r.status_code == 200, r.text
            srv.baseline = r.json()["results"][0]
        yield srv


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c


def classify_multipart(c: httpx.Client, images: list[bytes], labels=LABELS, path="/v1/classify", **data):
    files = [("images", (f"img{i}.png", d, "image/png")) for i, d in enumerate(images)]
    return c.post(path, files=files, data={"labels": list(labels), **data})


# -- assertions ------------------------------------------------------------------------------------

LEAKS = ("Traceback", "/work/", "site-packages", 'File "', "/usr/lib", "/root/")


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def assert_no_leaks(r: httpx.Response) -> None:
    for text in [r.text, *_strings(_json_or_none(r))]:
        for leak in LEAKS:
            assert leak not in text, f"response leaks {leak!r}: {text[:300]}"


def _json_or_none(r: httpx.Response):
    try:
        return r.json()
    except ValueError:
        return None


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    """A JSON error body {"error": <message>, "code": code} with this status."""
    assert r.status_code == status, f"expected {status} {code}, got {r.status_code}: {r.text[:500]}"
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers.get("content-type")
    body = r.json()
    assert isinstance(body, dict), body
    assert body.get("code") == code, body
    assert isinstance(body.get("error"), str) and body["error"].strip(), body
    assert_no_leaks(r)
    return body


def assert_all_failed(r: httpx.Response, status: int, code: str, n: int = 1) -> dict:
    """/v1/classify where every image failed: the first item's status, per-item results too."""
    body = assert_error(r, status, code)
    assert len(body["results"]) == n, body
    for i, item in enumerate(body["results"]):
        assert item["index"] == i and "labels" not in item, item
        assert isinstance(item["error"], str) and item["code"], item
    assert body["results"][0]["code"] == code
    return body


def assert_ranked(labels: list[dict], expected=LABELS) -> None:
    assert sorted(x["label"] for x in labels) == sorted(expected), labels
    scores = [x["score"] for x in labels]
    assert all(0.0 <= s <= 1.0 for s in scores), scores
    assert scores == sorted(scores, reverse=True), scores
    assert sum(scores) == pytest.approx(1.0, abs=1e-4)


def assert_classified(r: httpx.Response, n: int = 1, expected=LABELS) -> list[dict]:
    assert r.status_code == 200, r.text[:500]
    body = r.json()
    assert body["model"] == MODEL and len(body["results"]) == n, body
    for i, item in enumerate(body["results"]):
        assert item["index"] == i and "error" not in item, item
        assert_ranked(item["labels"], expected)
    return body["results"]


def same_scores(a: list[dict], b: list[dict]) -> bool:
    return [x["label"] for x in a] == [x["label"] for x in b] and \
        all(x["score"] == pytest.approx(y["score"], abs=1e-4) for x, y in zip(a, b))


def assert_still_serving(server: Server) -> None:
    assert server.proc.poll() is None, f"server exited with {server.proc.returncode}"
    with server.client() as c:
        r = c.get("/healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text
        [item] = assert_classified(classify_multipart(c, [GOOD]))
        assert same_scores(item["labels"], server.baseline["labels"]), (item, server.baseline)


# -- images ----------------------------------------------------------------------------------------

BAD_IMAGES = {
    "corrupt_bytes": (CORRUPT, 400, "invalid_image"),
    "empty_file": (b"", 400, "invalid_image"),
    "truncated_png": (noise()[: len(noise()) // 2], 400, "invalid_image"),
    "text_file_named_png": (b"hello, I am a text file with a .png name\n" * 4, 400, "invalid_image"),
    # 5000x5000 black: ~25 KB on the wire, 25 Mpx (75 MB RGB) once decoded.
    "decompression_bomb": (solid((5000, 5000), 0, mode="L"), 413, "image_too_large"),
    # IHDR says 3000x3000 but there are no pixels: only a check before decoding gives 413.
    "over_pixel_limit_header_only": (png_header_only(3000, 3000), 413, "image_too_large"),
    # a real, decodable PNG of ~120 KB: over max_image_bytes (100 KB), under max_body_bytes
    "over_max_image_bytes": (noise((200, 200)), 413, "image_too_large"),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_image_multipart(server, client, name):
    data, status, code = BAD_IMAGES[name]
    if name == "decompression_bomb":
        assert len(data) < 50_000
    if name == "over_max_image_bytes":
        assert LIMITS["max_image_bytes"] < len(data) < LIMITS["max_body_bytes"] - 10_000
    started = time.monotonic()
    r = classify_multipart(client, [data])
    assert_all_failed(r, status, code)
    assert time.monotonic() - started < 5
    assert_still_serving(server)


@pytest.mark.parametrize("name", ["corrupt_bytes", "empty_file", "decompression_bomb", "over_max_image_bytes"])
def test_bad_image_json(server, client, name):
    data, status, code = BAD_IMAGES[name]
    r = client.post("/v1/classify", json={"images": [b64(data)], "labels": LABELS})
    assert_all_failed(r, status, code)
    assert_still_serving(server)


def test_pillow_bomb_limit_is_still_413(server, client):
    """IHDR claims 20000x20000 (400 Mpx): more than Pillow's own bomb limit (2 x 89 Mpx). Pillow
    raises DecompressionBombError inside Image.open, which must still be 413 image_too_large
    like any image over the pixel limit, not a 400 'invalid image'."""
    r = classify_multipart(client, [png_header_only(20000, 20000)])
    body = assert_all_failed(r, 413, "image_too_large")
    assert "DOS attack" not in body["error"]
    assert_still_serving(server)


def _peak_rss_mb(pid: int) -> int | None:
    """The process's peak resident memory (VmHWM), which psutil does not report, or None off Linux."""
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        return None
    m = re.search(r"VmHWM:\s+(\d+)\s+kB", status.read_text())
    return int(m.group(1)) // 1024 if m else None


def test_extreme_aspect_ratio_is_cheap(server, client):
    """A 1 x 400000 PNG is under the pixel limit (0.4 Mpx) and under 1 KB on the wire. Resizing
    its shorter side to the model's size *before* cropping blows it up to 16 x 6.4M pixels: the
    server's peak memory jumps by ~750 MB for one request (with the default 40 Mpx limit a 30 KB
    file needs ~75 GB). It must be classified without a large memory spike."""
    data = solid((1, 400_000), 128, mode="L")
    assert len(data) < 2_000
    before = _peak_rss_mb(server.proc.pid)
    if before is None:
        pytest.skip("needs /proc/<pid>/status (Linux)")
    r = classify_multipart(client, [data])
    assert_classified(r)
    grew = _peak_rss_mb(server.proc.pid) - before
    assert grew < 200, f"one 1x400000 image raised the server's peak memory by {grew} MB"
    assert_still_serving(server)


GOOD_ODD_IMAGES = {
    "1x1": lambda: solid((1, 1)),
    "cmyk_jpeg": cmyk_jpeg,
    "gray16_png": gray16_png,
    "rgba_png": rgba_png,
    "palette_transparency_png": palette_transparent_png,
    "animated_gif": lambda: animated_gif()[0],
}


@pytest.mark.parametrize("name", list(GOOD_ODD_IMAGES))
def test_unusual_valid_images_succeed(server, client, name):
    r = classify_multipart(client, [GOOD_ODD_IMAGES[name]()])
    assert_classified(r)
    assert_still_serving(server)


def test_animated_gif_uses_first_frame(server, client):
    anim, first = animated_gif()
    [a] = assert_classified(classify_multipart(client, [anim]))
    [f] = assert_classified(classify_multipart(client, [first]))
    assert same_scores(a["labels"], f["labels"]), (a, f)
    assert_still_serving(server)


def test_unsupported_format_does_not_run_ghostscript(server, client):
    """EPS is not an image format the service supports, and Pillow rasterises EPS by running the
    Ghostscript binary on the upload. It must be refused as an invalid image without Pillow ever
    trying (today the message says 'Unable to locate Ghostscript on paths': it tried)."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nnewpath 0 0 moveto 10 10 lineto stroke\n%%EOF\n"
    body = assert_all_failed(classify_multipart(client, [eps]), 400, "invalid_image")
    assert "ghostscript" not in body["error"].lower(), body
    assert_still_serving(server)


# -- no internal details in messages -----------------------------------------------------------

OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>|\bat 0x[0-9a-fA-F]{6,}")


@pytest.mark.parametrize("route", ["v1_multipart", "v1_json", "hf", "v2", "embed"])
def test_error_messages_do_not_leak_object_reprs(server, client, route):
    """'cannot identify image file <_io.BytesIO object at 0x7f...>' exposes a Python object and a
    heap address; the message must only say the bytes are not a supported image."""
    if route == "v1_multipart":
        r = classify_multipart(client, [CORRUPT])
    elif route == "v1_json":
        r = client.post("/v1/classify", json={"images": [b64(CORRUPT)], "labels": LABELS})
    elif route == "hf":
        r = client.post("/", json={"inputs": b64(CORRUPT), "parameters": {"candidate_labels": LABELS}})
    elif route == "v2":
        r = client.post(f"/v2/models/{MODEL}/infer", json={"inputs": [
            {"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [b64(CORRUPT)]},
            {"name": "LABELS", "datatype": "BYTES", "shape": [2], "data": LABELS}]})
    else:
        r = client.post("/v1/embed", json={"images": [b64(CORRUPT)]})
    assert r.status_code in (200, 400), r.text
    assert_no_leaks(r)
    for text in _strings(r.json()):
        assert not OBJECT_REPR.search(text), f"message leaks an object repr: {text!r}"
    assert_still_serving(server)


# -- labels ----------------------------------------------------------------------------------------

BAD_LABELS = {
    "too_many": (["a", "b", "c", "d", "e", "f"], "too_many_labels"),
    "empty_list": ([], "invalid_labels"),
    "empty_string": (["", "cat"], "invalid_labels"),
    "whitespace_only": (["   ", "cat"], "invalid_labels"),
    "duplicates": (["cat", "cat"], "invalid_labels"),
    "duplicates_after_strip": (["cat", " cat "], "invalid_labels"),
    "over_max_length": (["x" * (LIMITS["max_label_chars"] + 1), "cat"], "invalid_labels"),
}


@pytest.mark.parametrize("name", list(BAD_LABELS))
@pytest.mark.parametrize("kind", ["multipart", "json"])
def test_bad_labels(server, client, name, kind):
    labels, code = BAD_LABELS[name]
    if kind == "multipart":
        r = classify_multipart(client, [GOOD], labels=labels)
    else:
        r = client.post("/v1/classify", json={"images": [GOOD_B64], "labels": labels})
    assert_error(r, 422, code)
    assert_still_serving(server)


def test_label_at_max_length_succeeds(server, client):
    labels = ["x" * LIMITS["max_label_chars"], "cat"]
    assert_classified(classify_multipart(client, [GOOD], labels=labels), expected=labels)


def test_many_labels_multipart_is_too_many_labels(server, client):
    """60 labels in a multipart body: must be 422 too_many_labels like 6 labels are, not the
    form parser's '400 Too many fields' with code http_error."""
    r = classify_multipart(client, [GOOD], labels=[f"label {i}" for i in range(60)])
    assert_error(r, 422, "too_many_labels")
    assert_still_serving(server)


def test_hf_missing_labels(server, client):
    r = client.post("/", json={"inputs": GOOD_B64, "parameters": {}})
    assert_error(r, 422, "invalid_labels")
    assert_still_serving(server)


# -- JSON ------------------------------------------------------------------------------------------

def test_malformed_json(server, client):
    r = client.post("/v1/classify", content=b'{"images": ["abc"], "labels": [', headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json")
    assert_still_serving(server)


def test_non_utf8_json(server, client):
    r = client.post("/v1/classify", content=b'{"images": ["\xff\xfe"]}', headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json")
    assert_still_serving(server)


WRONG_SHAPES = {
    "images_is_string": {"images": GOOD_B64, "labels": LABELS},
    "labels_missing": {"images": [GOOD_B64]},
    "images_missing": {"labels": LABELS},
    "image_not_string": {"images": [123], "labels": LABELS},
    "labels_not_strings": {"images": [GOOD_B64], "labels": [1, 2]},
    "body_is_list": [GOOD_B64],
    "body_is_null": None,
    "top_k_zero": {"images": [GOOD_B64], "labels": LABELS, "top_k": 0},
}


@pytest.mark.parametrize("name", list(WRONG_SHAPES))
def test_json_wrong_shape(server, client, name):
    r = client.post("/v1/classify", content=json.dumps(WRONG_SHAPES[name]), headers={"content-type": "application/json"})
    assert_error(r, 422, "invalid_request")
    assert_still_serving(server)


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/embed", "/", f"/v2/models/{MODEL}/infer"])
def test_deeply_nested_json(server, client, path):
    """50 000 nested '[' is 50 KB (under the body limit); json.loads raises RecursionError, which
    read_json / _split_body do not catch: 500 'internal', and the connection is dropped."""
    r = client.post(path, content=b"[" * 50_000 + b"]" * 50_000, headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_json")
    assert_still_serving(server)


def test_invalid_base64(server, client):
    r = client.post("/v1/classify", json={"images": ["!!!not base64###"], "labels": LABELS})
    assert_error(r, 400, "invalid_base64")
    assert_still_serving(server)


def test_data_url_succeeds(server, client):
    r = client.post("/v1/classify", json={"images": ["data:image/png;base64," + GOOD_B64], "labels": LABELS})
    [item] = assert_classified(r)
    assert same_scores(item["labels"], server.baseline["labels"])
    assert_still_serving(server)


# -- multipart and content types -------------------------------------------------------------------

def _part(name: str, data: bytes, filename: str | None = None, boundary: str = "XyZzY") -> bytes:
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"'
    if filename:
        head += f'; filename="{filename}"\r\nContent-Type: image/png'
    return head.encode() + b"\r\n\r\n" + data + b"\r\n"


def _multipart_body(boundary: str = "XyZzY") -> bytes:
    return (_part("labels", b"red", boundary=boundary) + _part("labels", b"blue", boundary=boundary)
            + _part("images", GOOD, "a.png", boundary) + _part("images", GOOD, "b.png", boundary))


def test_handmade_multipart_is_accepted(server, client):
    """Sanity check for the malformed variants below: the well-formed body classifies 2 images."""
    r = client.post("/v1/classify", content=_multipart_body() + b"--XyZzY--\r\n",
                    headers={"content-type": "multipart/form-data; boundary=XyZzY"})
    assert_classified(r, n=2)


MALFORMED_MULTIPART = {
    # the header names a boundary the body never uses
    "wrong_boundary": ("multipart/form-data; boundary=NotTheBoundary", _multipart_body() + b"--XyZzY--\r\n"),
    "missing_boundary": ("multipart/form-data", _multipart_body() + b"--XyZzY--\r\n"),
    "not_multipart_at_all": ("multipart/form-data; boundary=XyZzY", b"this is not a multipart body"),
    # cut in the middle of the second image, no closing boundary: today the incomplete part is
    # dropped silently and the request 'succeeds' with one result for two images sent
    "truncated_in_second_image": ("multipart/form-data; boundary=XyZzY",
                                  _multipart_body()[: _multipart_body().rindex(GOOD) + len(GOOD) // 2]),
    # cut in the middle of the only image
    "truncated_in_first_image": ("multipart/form-data; boundary=XyZzY",
                                 _multipart_body()[: _multipart_body().index(GOOD) + len(GOOD) // 2]),
}


@pytest.mark.parametrize("name", list(MALFORMED_MULTIPART))
def test_malformed_multipart(server, client, name):
    ctype, body = MALFORMED_MULTIPART[name]
    r = client.post("/v1/classify", content=body, headers={"content-type": ctype})
    assert_error(r, 400, "invalid_multipart")
    assert_still_serving(server)


def test_multipart_without_images(server, client):
    r = client.post("/v1/classify", data={"labels": LABELS}, files=[("other", ("notes.txt", b"x", "text/plain"))])
    assert_error(r, 422, "no_images")
    assert_still_serving(server)


def test_multipart_images_as_text_field(server, client):
    r = client.post("/v1/classify", data={"labels": LABELS, "images": GOOD_B64},
                    files=[("other", ("notes.txt", b"x", "text/plain"))])
    assert_error(r, 422, "invalid_images")
    assert_still_serving(server)


@pytest.mark.parametrize("path", ["/v1/classify", "/v1/classify/bulk", "/", f"/models/{MODEL}", "/v1/embed"])
def test_wrong_content_type(server, client, path):
    body = json.dumps({"images": [GOOD_B64], "labels": LABELS, "texts": ["cat"],
                       "inputs": GOOD_B64, "parameters": {"candidate_labels": LABELS}})
    r = client.post(path, content=body, headers={"content-type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type")
    assert_still_serving(server)


def test_too_many_images_json(server, client):
    n = LIMITS["max_images_per_request"] + 1
    r = client.post("/v1/classify", json={"images": [GOOD_B64] * n, "labels": LABELS})
    assert_error(r, 422, "too_many_images")
    assert_still_serving(server)


@pytest.mark.parametrize("path,limit", [("/v1/classify", "max_images_per_request"),
                                        ("/v1/classify/bulk", "max_bulk_images")])
def test_too_many_images_multipart(server, client, path, limit):
    """One image over the limit as multipart: must be 422 too_many_images, as in JSON, not the
    form parser's '400 Too many files' with code http_error."""
    r = classify_multipart(client, [GOOD] * (LIMITS[limit] + 1), path=path)
    assert_error(r, 422, "too_many_images")
    assert_still_serving(server)


# -- body size ------------------------------------------------------------------------------------

def test_oversized_body_by_content_length(server, client):
    body = json.dumps({"images": ["A" * (LIMITS["max_body_bytes"] + 1000)], "labels": LABELS}).encode()
    r = client.post("/v1/classify", content=body, headers={"content-type": "application/json"})
    assert_error(r, 413, "body_too_large")
    assert_still_serving(server)


def test_oversized_content_length_refused_before_reading(server):
    """Headers alone, declaring 50 MB, and no body: the answer must come at once (413), without
    waiting for (or buffering) the body."""
    url = urlsplit(server.base)
    with socket.create_connection((url.hostname, url.port), timeout=TIMEOUT) as s:
        s.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 50000000\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), data[:300]
    assert json.loads(payload)["code"] == "body_too_large"
    assert_still_serving(server)


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: appli\x01cation/json\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
], ids=["request-line", "control-byte-in-header", "negative-length"])
def test_unparseable_http_gets_the_json_error_shape(server, raw):
    """Requests the HTTP parser rejects never reach the app; they still get our JSON 400."""
    url = urlsplit(server.base)
    with socket.create_connection((url.hostname, url.port), timeout=TIMEOUT) as s:
        s.sendall(raw)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), data[:300]
    assert b"content-type: application/json" in head.lower()
    assert json.loads(payload) == {"error": "malformed HTTP request: the request line or a header could not be parsed",
                                   "code": "invalid_http"}
    assert_still_serving(server)


def _chunks(total: int, size: int = 10_000):
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


@pytest.mark.parametrize("path,ctype", [
    ("/v1/classify", "application/json"),
    ("/v1/classify", "multipart/form-data; boundary=XyZzY"),
    ("/", "application/json"),
    (f"/v2/models/{MODEL}/infer", "application/json"),
])
def test_oversized_chunked_body(server, client, path, ctype):
    """No Content-Length (chunked transfer encoding): the streamed bytes are counted."""
    def body():
        if ctype.startswith("multipart"):
            yield _part("labels", b"red") + b'--XyZzY\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
        yield from _chunks(LIMITS["max_body_bytes"] + 50_000)

    r = client.post(path, content=body(), headers={"content-type": ctype})
    assert "content-length" not in {k.lower() for k in r.request.headers}
    assert_error(r, 413, "body_too_large")
    assert_still_serving(server)


# -- partial failure --------------------------------------------------------------------------------

def test_mix_of_corrupt_and_good_image(server, client):
    r = classify_multipart(client, [CORRUPT, GOOD])
    assert r.status_code == 200, r.text
    body = r.json()
    bad, good = body["results"]
    assert bad["index"] == 0 and bad["code"] == "invalid_image" and isinstance(bad["error"], str)
    assert "labels" not in bad and "error" not in body and "code" not in body
    assert good["index"] == 1 and "error" not in good
    assert_ranked(good["labels"])
    [alone] = assert_classified(classify_multipart(client, [GOOD]))
    assert same_scores(good["labels"], alone["labels"]), (good, alone)
    assert_no_leaks(r)
    assert_still_serving(server)


def test_all_images_bad_reports_first_error(server, client):
    r = classify_multipart(client, [b"", CORRUPT])
    body = assert_all_failed(r, 400, "invalid_image", n=2)
    assert body["error"] == body["results"][0]["error"]
    assert_still_serving(server)


def test_embed_corrupt_image_is_per_item(server, client):
    r = client.post("/v1/embed", json={"images": [b64(CORRUPT), GOOD_B64], "texts": ["cat"]})
    assert r.status_code == 200, r.text
    bad, good = r.json()["images"]
    assert bad["code"] == "invalid_image" and "embedding" not in bad
    assert isinstance(good["embedding"], list) and len(good["embedding"]) > 0
    assert len(r.json()["texts"]) == 1
    assert_still_serving(server)


# -- Hugging Face routes ---------------------------------------------------------------------------

def _assert_hf_ranked(r: httpx.Response, baseline: list[dict]) -> None:
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, list), body
    assert_ranked(body)
    assert same_scores(body, baseline), (body, baseline)


def test_hf_comma_separated_labels(server, client):
    r = client.post("/", json={"inputs": GOOD_B64, "parameters": {"candidate_labels": "red, blue"}})
    _assert_hf_ranked(r, server.baseline["labels"])
    assert_still_serving(server)


def test_hf_old_shape(server, client):
    r = client.post(f"/models/{MODEL}", json={"inputs": {"image": GOOD_B64, "candidateLabels": "red,blue"}})
    _assert_hf_ranked(r, server.baseline["labels"])
    assert_still_serving(server)


def test_hf_unknown_model(server, client):
    r = client.post("/models/no-such-model", json={"inputs": GOOD_B64, "parameters": {"candidate_labels": LABELS}})
    assert_error(r, 404, "not_found")
    assert_still_serving(server)


def test_hf_corrupt_image(server, client):
    r = client.post("/", json={"inputs": b64(CORRUPT), "parameters": {"candidate_labels": LABELS}})
    assert_error(r, 400, "invalid_image")
    assert_still_serving(server)


# -- Open Inference Protocol v2 ---------------------------------------------------------------------

V2 = f"/v2/models/{MODEL}/infer"


def v2_inputs(image=GOOD_B64, labels=LABELS) -> list[dict]:
    return [{"name": "IMAGE", "datatype": "BYTES", "shape": [1], "data": [image]},
            {"name": "LABELS", "datatype": "BYTES", "shape": [len(labels)], "data": list(labels)}]


def v2_binary(declared_header_len_extra: int = 0, image_size_extra: int = 0, count: int = 1):
    tensor = serialize_byte_tensor(np.array([GOOD], dtype=object)).item()  # Triton's BYTES: uint32 length + bytes
    header = json.dumps({"inputs": [
        {"name": "IMAGE", "datatype": "BYTES", "shape": [count],
         "parameters": {"binary_data_size": len(tensor) + image_size_extra}},
        {"name": "LABELS", "datatype": "BYTES", "shape": [2], "data": LABELS}]}).encode()
    return header + tensor, {"Inference-Header-Content-Length": str(len(header) + declared_header_len_extra),
                             "content-type": "application/octet-stream"}


def test_v2_good_json_and_binary(server, client):
    for kw in ({"json": {"inputs": v2_inputs()}}, dict(zip(("content", "headers"), v2_binary()))):
        r = client.post(V2, **kw)
        assert r.status_code == 200, r.text
        out = {o["name"]: o for o in r.json()["outputs"]}
        assert out["SCORES"]["shape"] == [1, 2] and out["SCORES"]["datatype"] == "FP32"
        assert sum(out["SCORES"]["data"]) == pytest.approx(1.0, abs=1e-4)


def _v2_bad(name: str):
    inputs = v2_inputs()
    if name == "wrong_datatype":
        return {"json": {"inputs": [{**inputs[0], "datatype": "FP32"}, inputs[1]]}}, 422, "invalid_request"
    if name == "missing_labels":
        return {"json": {"inputs": [inputs[0]]}}, 422, "invalid_request"
    if name == "shape_data_mismatch":
        return {"json": {"inputs": [{**inputs[0], "shape": [2]}, inputs[1]]}}, 422, "invalid_request"
    if name == "shape_not_1d":
        return {"json": {"inputs": [{**inputs[0], "shape": [1, 1]}, inputs[1]]}}, 422, "invalid_request"
    if name == "unknown_input":
        return {"json": {"inputs": [*inputs, {"name": "AUDIO", "datatype": "BYTES", "shape": [0], "data": []}]}}, \
            422, "invalid_request"
    if name == "inputs_missing":
        return {"json": {"outputs": [{"name": "SCORES"}]}}, 422, "invalid_request"
    if name == "invalid_base64_image":
        return {"json": {"inputs": v2_inputs(image="!!!")}}, 400, "invalid_base64"
    if name == "corrupt_image":
        return {"json": {"inputs": v2_inputs(image=b64(CORRUPT))}}, 400, "invalid_image"
    if name == "duplicate_labels":
        return {"json": {"inputs": v2_inputs(labels=["cat", "cat"])}}, 422, "invalid_labels"
    if name == "malformed_json":
        return {"content": b'{"inputs": [', "headers": {"content-type": "application/json"}}, 400, "invalid_json"
    if name == "binary_header_longer_than_body":
        body, headers = v2_binary(declared_header_len_extra=10_000)
        return {"content": body, "headers": headers}, 400, "invalid_header"
    if name == "binary_header_not_int":
        body, headers = v2_binary()
        return {"content": body, "headers": {**headers, "Inference-Header-Content-Length": "lots"}}, \
            400, "invalid_header"
    if name == "binary_data_size_past_body":
        body, headers = v2_binary(image_size_extra=1_000)
        return {"content": body, "headers": headers}, 400, "invalid_tensor"
    if name == "binary_count_mismatch":
        body, headers = v2_binary(count=2)
        return {"content": body, "headers": headers}, 400, "invalid_tensor"
    raise KeyError(name)


V2_BAD = ["wrong_datatype", "missing_labels", "shape_data_mismatch", "shape_not_1d", "unknown_input",
          "inputs_missing", "invalid_base64_image", "corrupt_image", "duplicate_labels", "malformed_json",
          "binary_header_longer_than_body", "binary_header_not_int", "binary_data_size_past_body",
          "binary_count_mismatch"]


@pytest.mark.parametrize("name", V2_BAD)
def test_v2_bad_request(server, client, name):
    kw, status, code = _v2_bad(name)
    r = client.post(V2, **kw)
    assert_error(r, status, code)
    assert_still_serving(server)


V2_BAD_OBJECTS = {
    "outputs_not_a_list": {"inputs": v2_inputs(), "outputs": 5},
    "request_parameters_not_object": {"inputs": v2_inputs(), "parameters": "binary"},
    "input_parameters_not_object": {"inputs": [{**v2_inputs()[0], "parameters": "x"}, v2_inputs()[1]]},
    "output_parameters_not_object": {"inputs": v2_inputs(), "outputs": [{"name": "SCORES", "parameters": 3}]},
}


@pytest.mark.parametrize("name", list(V2_BAD_OBJECTS))
def test_v2_non_object_fields(server, client, name):
    """Fields that must be objects/lists but are not: today AttributeError/TypeError -> 500."""
    r = client.post(V2, json=V2_BAD_OBJECTS[name])
    assert_error(r, 422, "invalid_request")
    assert_still_serving(server)


def test_v2_unknown_model(server, client):
    r = client.post("/v2/models/no-such-model/infer", json={"inputs": v2_inputs()})
    assert_error(r, 404, "not_found")
    assert_still_serving(server)


# -- naming a model ----------------------------------------------------------------------------------

@pytest.mark.parametrize("model, status, code", [
    ("no-such-model", 404, "not_found"), (f"{MODEL}@99", 404, "not_found"), ("", 422, "invalid_request"),
    ("x" * 201, 422, "invalid_request"), (7, 422, "invalid_request"), (["a"], 422, "invalid_request"),
    ("../../etc/passwd", 404, "not_found"), ("\u0000", 404, "not_found")])
def test_bad_model_names(server, client, model, status, code):
    r = client.post("/v1/classify", json={"images": [GOOD_B64], "labels": LABELS, "model": model})
    assert_error(r, status, code)
    assert_still_serving(server)


@pytest.mark.parametrize("image, status, code", [(CORRUPT, 400, "invalid_image"), (b"", 400, "invalid_image")])
def test_bad_images_sent_to_the_second_model(server, client, image, status, code):
    r = client.post("/v1/classify", json={"images": [b64(image)], "labels": LABELS, "model": SECOND})
    assert_error(r, status, code)
    good = client.post("/v1/classify", json={"images": [GOOD_B64], "labels": LABELS, "model": SECOND})
    assert good.status_code == 200 and good.json()["model"] == SECOND
    assert_still_serving(server)


# -- routing -----------------------------------------------------------------------------------------

def test_unknown_route(server, client):
    assert_error(client.get("/no/such/route"), 404, "not_found")
    assert_error(client.post("/v1/nothing", json={}), 404, "not_found")
    assert_still_serving(server)


@pytest.mark.parametrize("method,path", [("GET", "/v1/classify"), ("PUT", "/healthz"), ("DELETE", V2),
                                         ("GET", "/v1/embed")])
def test_wrong_method(server, client, method, path):
    assert_error(client.request(method, path), 405, "method_not_allowed")
    assert_still_serving(server)


# -- concurrency -------------------------------------------------------------------------------------

def test_concurrent_good_and_bad(server):
    """20 requests at once, every other one with a corrupt image: each good one gets its correct
    200, each bad one its 400, none hangs."""
    baseline = server.baseline["labels"]

    async def one(c: httpx.AsyncClient, i: int):
        data = CORRUPT if i % 2 else GOOD
        files = [("images", (f"{i}.png", data, "image/png"))]
        return i, await asyncio.wait_for(c.post("/v1/classify", files=files, data={"labels": LABELS}), TIMEOUT)

    async def main():
        async with httpx.AsyncClient(base_url=server.base, timeout=TIMEOUT,
                                     limits=httpx.Limits(max_connections=20)) as c:
            return await asyncio.gather(*(one(c, i) for i in range(20)))

    started = time.monotonic()
    results = asyncio.run(main())
    assert time.monotonic() - started < 2 * TIMEOUT
    assert len(results) == 20
    for i, r in results:
        if i % 2:
            assert_all_failed(r, 400, "invalid_image")
        else:
            [item] = assert_classified(r)
            assert same_scores(item["labels"], baseline), (i, item, baseline)
    assert_still_serving(server)
