"""Helpers shared by the serving benchmarks (bench/serve_batching.py, bench/http_overhead.py,
bench/serve_latency.py): the shipped default model (or, with --fresh, an untrained fp32 `small`
exported once into a cache), `limoe serve` processes
on 127.0.0.1, pre-encoded request bodies, closed-loop load with aiohttp, and what the server spent.

Not a benchmark itself; the scripts import it from their own directory.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = "limoe-small"
LABELS = ["a cat", "a dog", "a red circle", "a blue square", "a car"]
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "limoe-bench-small"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    """Progress goes to stderr; results go to stdout."""
    print(msg, file=sys.stderr, flush=True)


# -- the model ----------------------------------------------------------------------------------------
def add_model_args(p) -> None:
    p.add_argument("--store", default=str(ROOT / "model_store"),
                   help="model store root holding --model (default: the repository's, with the shipped default)")
    p.add_argument("--model", default=MODEL, help=f"model name in the store (default {MODEL}, the shipped default)")
    p.add_argument("--fresh", action="store_true",
                   help="instead, serve a freshly initialised fp32 `small` (ONNX + TorchScript, same compute as a "
                        "trained one), exported once into --cache")
    p.add_argument("--cache", default=str(DEFAULT_CACHE),
                   help="where --fresh exports its model once and reuses it (default: %(default)s)")


def bench_parser(doc: str, max_requests: int = 5000, load: bool = True):
    """A serving benchmark's argument parser: its docstring as help, the model and server options,
    and (with `load`) the closed-loop load options."""
    import argparse

    p = argparse.ArgumentParser(description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(doc.splitlines()[1:]))
    add_model_args(p)
    p.add_argument("--wait-ms", type=float, default=5.0, help="LIMOE_MAX_BATCH_WAIT_MS")
    p.add_argument("--threads", type=int, default=0,
                   help="LIMOE_THREADS, ONNX Runtime intra-op threads; 0 (default) = its default, all cores, as "
                        "the service runs unless told otherwise")
    if load:
        p.add_argument("--max-requests", type=int, default=max_requests, help="requests per timed round at most")
        p.add_argument("--warmup", type=float, default=2.0, help="untimed seconds of load first")
        p.add_argument("--format", choices=["json", "multipart"], default="json", help="request encoding")
    return p


def ensure_store(store: str | None, model: str, cache: str | Path, fresh: bool = False) -> Path:
    """The store root to serve `model` from. With `fresh`, a `small` model initialised with a
    fixed seed is exported once (about 25 s) into `cache` and reused by later runs."""
    from limoe.model_store import ModelStore, ModelStoreError

    if store and not fresh:
        ModelStore(store).load(model)  # fail early, naming the problem
        return Path(store)
    cache = Path(cache)
    root = cache / "store"
    try:
        ModelStore(root).load(model)
        return root
    except (ModelStoreError, OSError, ValueError):
        pass
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="export-", dir=cache))
    try:
        log(f"exporting a fresh `small` model as {model} into {root} (once, ~25 s)")
        ckpt = work / "small.safetensors"
        for cmd in (["init", "small", str(ckpt), "--seed", "0"],
                    ["export", str(ckpt), "--name", model, "--store", str(work / "store")]):
            subprocess.run([sys.executable, "-m", "limoe", *cmd], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)
        if root.exists():  # a concurrent run won the race, or a damaged leftover
            try:
                ModelStore(root).load(model)
                return root
            except (ModelStoreError, OSError, ValueError):
                shutil.rmtree(root)
        os.replace(work / "store", root)
        ModelStore(root).load(model)
        return root
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- images and request bodies ------------------------------------------------------------------------
def png_images(n: int, size: int = 64, seed: int = 0) -> list[bytes]:
    """n distinct RGB PNG files, size x size: a smooth gradient plus noise (about 10 KB each)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        base = np.stack([(xx * rng.uniform(1, 4) + yy * rng.uniform(1, 4) + rng.uniform(0, 255)) % 256
                         for _ in range(3)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 24, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, "PNG")
        out.append(buf.getvalue())
    return out


BOUNDARY = "limoe-bench-boundary-7d3f1c"


def encode_body(images: list[bytes], labels: list[str] = LABELS, fmt: str = "json") -> tuple[bytes, dict]:
    """One /v1/classify request body, encoded once: (bytes, headers)."""
    if fmt == "json":
        body = json.dumps({"images": [base64.b64encode(im).decode() for im in images], "labels": labels})
        return body.encode(), {"content-type": "application/json"}
    if fmt == "multipart":
        parts = []
        for i, im in enumerate(images):
            parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
                         "Content-Type: image/png\r\n\r\n".encode() + im + b"\r\n")
        for label in labels:
            parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="labels"\r\n\r\n{label}\r\n'.encode())
        parts.append(f"--{BOUNDARY}--\r\n".encode())
        return b"".join(parts), {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    raise ValueError(f"unknown format {fmt!r}")


# -- servers --------------------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before exec: Linux sends it SIGTERM if this benchmark dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _exit_on_sigterm() -> None:
    """SIGTERM to the benchmark unwinds it (finally blocks stop the servers) instead of killing it."""
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


class Server:
    """`python -m limoe serve` on 127.0.0.1 and a free port, with LIMOE_* overrides.

    A context manager: the process is always terminated (then killed) on exit. Its log goes to
    a temporary file (never an unread pipe), shown if it fails to become ready."""

    def __init__(self, name: str, **env):
        self.name = name
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "LIMOE_HOST": "127.0.0.1", "LIMOE_PORT": str(self.port),
                    "LIMOE_LOG_LEVEL": "warning", **{f"LIMOE_{k.upper()}": str(v) for k, v in env.items()}}
        self.settings = {k: str(v) for k, v in env.items()}
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile(mode="w+")

    def start(self) -> Server:
        _exit_on_sigterm()
        self.proc = subprocess.Popen([sys.executable, "-m", "limoe", "serve"], cwd=ROOT, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        return self

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False, timeout=2.0) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server {self.name} exited with {self.proc.returncode}:\n{self.output()}")
                try:
                    if c.get(self.base + "/readyz").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"server {self.name} not ready after {timeout:.0f}s:\n{self.output()}")

    def output(self) -> str:
        self._log.seek(0)
        return self._log.read()[-4000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- what the server spent ------------------------------------------------------------------------
    def cpu(self) -> dict[str, float]:
        """CPU seconds so far: the event-loop (main) thread, and every other thread (ONNX Runtime,
        the batcher's forward-pass thread, the decode pool)."""
        pid = self.proc.pid
        total = main = 0.0
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rpartition(")")[2].split()
            except OSError:  # the thread ended meanwhile
                continue
            sec = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
            total += sec
            if int(tid) == pid:
                main = sec
        return {"main": main, "other": total - main, "total": total}

    def rss(self) -> int:
        """Resident memory of the server process now, in bytes (VmRSS)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"server {self.name}: no VmRSS in /proc/{self.proc.pid}/status")

    def metrics(self) -> dict[str, float]:
        """Sums and counts of the image encoder's histograms from /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.base + "/metrics", timeout=10, trust_env=False).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.labels.get("encoder", "image") != "image":
                    continue
                if s.name.endswith(("_sum", "_count")) and s.name.startswith(
                        ("limoe_batch_size", "limoe_inference_seconds", "limoe_preprocess_seconds",
                         "limoe_queue_wait_seconds")):
                    out[s.name] = out.get(s.name, 0.0) + s.value
                if s.name == "limoe_request_duration_seconds_sum" and s.labels.get("route") == "/v1/classify":
                    out["request_seconds_sum"] = s.value
                if s.name == "limoe_request_duration_seconds_count" and s.labels.get("route") == "/v1/classify":
                    out["request_count"] = s.value
        return out


def diff(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after}


# -- load -----------------------------------------------------------------------------------------------
def new_clients(n: int) -> list[aiohttp.ClientSession]:
    """n keep-alive clients of one connection each, one per concurrent worker; no proxies from
    the environment (127.0.0.1 only). Call inside the event loop that uses them.

    The load generator shares the server's cores, so it must be light: aiohttp spends about
    0.17 ms of CPU per request here, where httpx spent 1.0 ms (measured side by side against
    the same server, 32 clients), time that the server under test lost to its own client."""
    # Idle connections are dropped here after 2 s, before uvicorn closes them: reusing one just
    # as the server closes it fails the request (a keep-alive race).
    return [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1, keepalive_timeout=2.0),
                                  timeout=aiohttp.ClientTimeout(total=60), trust_env=False)
            for _ in range(n)]


async def close_clients(clients) -> None:
    for c in clients:
        await c.close()


@dataclass
class Load:
    ok: int = 0  # requests answered 200
    errors: dict[int, int] = field(default_factory=dict)  # status (0 = transport error) -> count
    elapsed: float = 0.0  # seconds from the first send to the last answer
    latencies: list[float] = field(default_factory=list)  # seconds, answered requests
    client_cpu: float = 0.0  # CPU seconds of this process during the load
    transport_errors: dict[str, int] = field(default_factory=dict)  # aiohttp exception name -> count

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0


async def post(client: aiohttp.ClientSession, url: str, body: bytes, headers: dict, load: Load) -> bool:
    started = time.perf_counter()
    try:
        async with client.post(url, data=body, headers=headers) as r:
            await r.read()
            status = r.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        status = 0
        load.transport_errors[type(e).__name__] = load.transport_errors.get(type(e).__name__, 0) + 1
    if status == 200:
        load.ok += 1
        load.latencies.append(time.perf_counter() - started)
        return True
    load.errors[status] = load.errors.get(status, 0) + 1
    return False


async def closed_loop(clients: list[aiohttp.ClientSession], url: str, bodies: list[tuple[bytes, dict]],
                      duration: float, max_requests: int) -> Load:
    """One worker per client, each sending its next request as soon as the last one is answered,
    until `duration` seconds have passed or `max_requests` were sent (whichever comes first)."""
    load = Load()
    sent = 0
    cpu0 = time.process_time()
    start = time.perf_counter()
    stop_at = start + duration

    async def worker(i: int, client: aiohttp.ClientSession) -> None:
        nonlocal sent
        k = i
        while sent < max_requests and time.perf_counter() < stop_at:
            sent += 1
            body, headers = bodies[k % len(bodies)]
            k += len(clients)
            await post(client, url, body, headers, load)

    await asyncio.gather(*(worker(i, c) for i, c in enumerate(clients)))
    load.elapsed = time.perf_counter() - start
    load.client_cpu = time.process_time() - cpu0
    return load


def run_async(coro):
    """asyncio.run, on uvloop when it is installed (a lighter load generator)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# -- the raw backend, in process ------------------------------------------------------------------------
def machine_load() -> str:
    """Other work on the machine skews every figure here (they share its cores): say how much."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min) before the run"


def threads_label(threads: int) -> str:
    return f"{threads}" if threads else "0 (ONNX Runtime default)"


def load_encoders(store: Path, model: str, threads: int):
    """The same ONNX Runtime sessions the service builds (service.backends.OnnxBackend on CPU)."""
    from limoe.onnx_encoder import OnnxEncoders

    return OnnxEncoders.from_store(store, model, providers=["CPUExecutionProvider"], threads=threads or None)


def encoder_rate(enc, pixels: np.ndarray, seconds: float) -> float:
    """images/s of the image encoder alone on one preprocessed batch, for about `seconds`."""
    n = 0
    start = time.perf_counter()
    while True:
        enc.encode_images(pixels)
        n += len(pixels)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def listing(values, spec: str = ".0f") -> str:
    """'12, 13, 14': per-round figures for the report."""
    return ", ".join(format(v, spec) for v in values)
