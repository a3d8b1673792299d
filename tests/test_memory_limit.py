"""`limoe serve` under a memory limit, as a container runs it: in a cgroup of its own, capped at
the memory limit of the Kubernetes CPU overlay (deploy/kubernetes/overlays/cpu/deployment.yaml,
1Gi), without swap, with the server's default bounds (docs/DEPLOY.md, "Memory").

Eight clients at once post the largest bodies those bounds allow: three incompressible 10 MB
images in one 30 MB multipart body, two in a 26 MB JSON body, four images at the 40-megapixel
limit each (RGBA, 16-bit grey, a palette with transparency, CMYK: the modes whose conversion
once held over 600 MB per image), a 256-image bulk call, and bodies or images just over the
limits. Every answer is a 200 or a refusal (413, or 429/503 with its JSON code, retried as a
client would), the kernel never kills the server for memory, and it serves normally afterwards.

Skipped, saying why, where this process may not make a memory cgroup (not root, or no memory
controller): CI's machine may."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image
from servers import ROOT, Server

MANIFEST = ROOT / "deploy/kubernetes/overlays/cpu/deployment.yaml"
SIDE = 6324  # 6324 x 6324 = 39,992,976 pixels: just under the default 40,000,000
REFUSALS = {413: {"body_too_large", "image_too_large"}, 429: {"overloaded", "too_many_bytes_in_flight"},
            503: {"overloaded", "queue_full", "not_ready"}}


def manifest_limit() -> int:
    """The memory limit of the overlay's container, in bytes."""
    spec = yaml.safe_load(MANIFEST.read_text())["spec"]["template"]["spec"]["containers"][0]
    value = spec["resources"]["limits"]["memory"]
    units = {"Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30}
    return int(value[:-2]) * units[value[-2:]] if value[-2:] in units else int(value)


class MemoryCgroup:
    """A cgroup (v2, or v1's memory controller) with a hard memory limit and no swap."""

    def __init__(self, limit: int):
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        if v2.exists() and "memory" in v2.read_text().split():
            self.v2, root = True, Path("/sys/fs/cgroup")
        elif Path("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists():
            self.v2, root = False, Path("/sys/fs/cgroup/memory")
        else:
            pytest.skip("no cgroup memory controller on this machine")
        self.path = root / f"limoe-test-memory-{os.getpid()}"
        try:
            self.path.mkdir()
            if self.v2:
                (self.path / "memory.max").write_text(str(limit))
                if (self.path / "memory.swap.max").exists():
                    (self.path / "memory.swap.max").write_text("0")
            else:
                (self.path / "memory.limit_in_bytes").write_text(str(limit))
                if (self.path / "memory.memsw.limit_in_bytes").exists():  # memory + swap: no swap at all
                    (self.path / "memory.memsw.limit_in_bytes").write_text(str(limit))
        except OSError as e:
            self.remove()
            pytest.skip(f"cannot make a memory cgroup here ({e.strerror}: {e.filename})")

    def _field(self, name: str, key: str) -> int:
        for line in (self.path / name).read_text().splitlines():
            k, _, v = line.partition(" ")
            if k == key:
                return int(v)
        return 0

    def oom_kills(self) -> int:
        return self._field("memory.events", "oom_kill") if self.v2 else self._field("memory.oom_control", "oom_kill")

    def anonymous(self) -> int:
        """Memory the server holds that the kernel cannot reclaim (no swap): not file cache."""
        return self._field("memory.stat", "anon" if self.v2 else "rss")

    def peak(self) -> int | None:
        f = self.path / ("memory.peak" if self.v2 else "memory.max_usage_in_bytes")
        return int(f.read_text()) if f.exists() else None

    def remove(self) -> None:
        if self.path.exists():
            try:
                self.path.rmdir()
            except OSError:
                pass


def png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def multipart(images: list[bytes], labels: list[str]) -> tuple[bytes, str]:
    b = "limoe-memory-test"
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="labels"\r\n\r\n{json.dumps(labels)}\r\n'.encode()]
    for i, data in enumerate(images):
        parts.append(f'--{b}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


def make_bodies() -> dict[str, tuple[str, bytes, str, int]]:
    """kind -> (path, body, content type, the status it must end with)."""
    rng = np.random.default_rng(0)
    labels = ["a cat", "a dog", "a red circle", "a rocket"]
    noise = [png(Image.fromarray(rng.integers(0, 256, (1860, 1860, 3), dtype=np.uint8))) for _ in range(3)]
    assert all(10_300_000 < len(n) <= 10 * 2 ** 20 for n in noise)  # just under LIMOE_MAX_IMAGE_BYTES
    palette = Image.new("P", (SIDE, SIDE), 3)
    huge = [png(Image.new("RGBA", (SIDE, SIDE), (200, 30, 30, 128))),
            png(Image.fromarray(np.full((SIDE, SIDE), 40000, np.uint16))),
            png(palette, transparency=3),
            png(Image.new("CMYK", (SIDE, SIDE), (0, 255, 255, 0)), "JPEG")]
    small = [png(Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8))) for _ in range(256)]
    json_body = json.dumps({"images": [base64.b64encode(n).decode() for n in noise[:2]], "labels": labels}).encode()
    over = json.dumps({"images": [base64.b64encode(n).decode() for n in noise + noise[:1]], "labels": labels})
    out = {
        "noise_multipart": ("/v1/classify", *multipart(noise, labels), 200),
        "noise_json": ("/v1/classify", json_body, "application/json", 200),
        "huge_pixels": ("/v1/classify", *multipart(huge, labels), 200),
        "bulk_256": ("/v1/classify/bulk", *multipart(small, labels), 200),
        "body_over_limit": ("/v1/classify", over.encode(), "application/json", 413),
        "pixels_over_limit": ("/v1/classify", *multipart([png_header_only(8000, 8000)], labels), 413),
    }
    assert 29 * 2 ** 20 < len(out["noise_multipart"][1]) < 32 * 2 ** 20 < len(out["body_over_limit"][1])
    return out


@pytest.fixture(scope="module")
def bodies() -> dict[str, tuple[str, bytes, str, int]]:
    return make_bodies()


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    limit = manifest_limit()
    cgroup = MemoryCgroup(limit)
    try:
        with Server("memory-limited", cgroup=cgroup.path, jobs_dir=tmp_path_factory.mktemp("jobs")) as server:
            server.wait_ready()
            yield server, cgroup, limit
    finally:
        cgroup.remove()


def post(client: httpx.Client, path: str, body: bytes, ctype: str) -> tuple[int, dict | None]:
    """One call, retried on 429/503 as a client would (after Retry-After, at most 1 s here):
    the final (status, JSON body)."""
    for _ in range(120):
        try:
            r = client.post(path, content=body, headers={"content-type": ctype})
        except (httpx.RemoteProtocolError, httpx.WriteError, httpx.ReadError) as e:
            return -1, {"transport": type(e).__name__}  # only acceptable for a body over the limit
        except httpx.TransportError as e:  # the server is gone (or never answered)
            return -2, {"transport": type(e).__name__}
        try:
            data = r.json()
        except ValueError:
            data = None
        if r.status_code not in (429, 503):
            return r.status_code, data
        time.sleep(min(1.0, float(r.headers.get("retry-after", 1))))
    return r.status_code, data


def test_the_largest_bodies_are_answered_or_refused_never_an_oom_kill(limited_server, bodies):
    server, cgroup, limit = limited_server
    kinds = list(bodies)
    answers: list[tuple[str, int, dict | None]] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        with httpx.Client(base_url=server.base, timeout=120, trust_env=False) as c:
            for i in range(len(kinds)):
                kind = kinds[(k + i) % len(kinds)]
                path, body, ctype, _ = bodies[kind]
                status, data = post(c, path, body, ctype)
                with lock:
                    answers.append((kind, status, data))

    anonymous = [cgroup.anonymous()]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.05):
            anonymous.append(cgroup.anonymous())

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    watcher = threading.Thread(target=watch)
    for t in [*threads, watcher]:
        t.start()
    for t in threads:
        t.join(600)
    done.set()
    watcher.join(5)
    assert not any(t.is_alive() for t in threads), "a client never got its answer"

    assert cgroup.oom_kills() == 0, f"the kernel killed the server for memory:\n{server.output()}"
    assert server.proc.poll() is None, server.output()
    got: dict[str, set] = {}
    for kind, status, data in answers:
        got.setdefault(kind, set()).add(status)
        want = bodies[kind][3]
        if status == -1:
            assert kind == "body_over_limit", (kind, data)  # the server closed on a body it refused mid-way
            continue
        if status != 200:
            assert isinstance(data, dict) and data.get("code") in REFUSALS.get(status, ()), (kind, status, data)
        assert status == want, (kind, status, data)
        if status == 200:
            assert all("labels" in r for r in data["results"]), (kind, data)
    assert len(answers) == 8 * len(kinds), got
    peak = cgroup.peak()
    print(f"memory limit {limit / 2 ** 20:.0f} MiB; peak {peak / 2 ** 20 if peak else float('nan'):.0f} MiB "
          f"(file cache included), anonymous at most {max(anonymous) / 2 ** 20:.0f} MiB; answers "
          f"{sorted(Counter((k, s) for k, s, _ in answers).items())}")


def test_it_serves_normally_afterwards(limited_server, bodies):
    server, cgroup, _ = limited_server
    with httpx.Client(base_url=server.base, timeout=60, trust_env=False) as c:
        assert c.get("/readyz").status_code == 200 and c.get("/healthz").status_code == 200
        image = base64.b64encode(png(Image.new("RGB", (32, 32), (220, 20, 20)))).decode()
        r = c.post("/v1/classify", json={"images": [image], "labels": ["red", "blue"]})
        assert r.status_code == 200 and r.json()["results"][0]["labels"]
    assert cgroup.oom_kills() == 0 and server.proc.poll() is None
