"""Real servers for tests: uvicorn in a thread (with any app, e.g. on a FakeBackend) or
`limoe serve` in a subprocess (the real ONNX model, isolated like production). The subprocess is
bench/_server.py's `Server`, the same code that starts the serving benchmarks' servers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `bench` from the repository, also in subprocesses that import this module
    sys.path.insert(0, str(ROOT))

from bench._server import Server, free_port, wait_ready


@contextlib.contextmanager
def uvicorn_thread(app, ready_path: str = "/readyz", **config):
    """Serve `app` with real uvicorn on 127.0.0.1 from a background thread; yields the base URL.
    `config`: more uvicorn.Config arguments."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, path=ready_path)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@contextlib.contextmanager
def serve_process(**env: str):
    """`python -m limoe serve` on a free port with LIMOE_* overrides, ready; yields (base URL, process)."""
    with Server(**env) as server:
        server.wait_ready()
        yield server.base, server.proc


def metric(base: str, name: str) -> float:
    """The value of the unlabelled metric `name` on the server's /metrics."""
    for line in httpx.get(base + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def serve_fails(env: dict) -> tuple[int, str]:
    """Run `limoe serve` with these environment overrides, expecting it to refuse to start:
    (exit code, stderr)."""
    full = {**os.environ, "LIMOE_PORT": str(free_port()), **env}
    out = subprocess.run([sys.executable, "-m", "limoe", "serve"], cwd=ROOT, env=full, capture_output=True,
                         text=True, timeout=60)
    return out.returncode, out.stderr
