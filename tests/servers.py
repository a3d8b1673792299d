"""Real servers for tests: uvicorn in a thread (with any app, e.g. on a FakeBackend) or
`limoe serve` in a subprocess (the real ONNX model, isolated like production)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base_url: str, timeout: float = 60.0, path: str = "/readyz", proc=None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text() if log else ''}")
        try:
            if httpx.get(base_url + path, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{base_url}{path} not ready after {timeout}s")


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
    """`python -m limoe serve` on a free port with LIMOE_* overrides; yields (base URL, process)."""
    port = free_port()
    full_env = {**os.environ, "LIMOE_PORT": str(port), "LIMOE_LOG_LEVEL": "warning",
                **{f"LIMOE_{k.upper()}": str(v) for k, v in env.items()}}
    # Logs go to a file, never to a pipe nobody reads (a full pipe would block the server).
    log = Path(tempfile.mkstemp(prefix="limoe-serve-", suffix=".log")[1])
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "limoe", "serve"], cwd=ROOT, env=full_env,
                                stdout=sink, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc=proc, log=log)
        proc.log = log
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.unlink(missing_ok=True)


def serve_fails(env: dict) -> tuple[int, str]:
    """Run `limoe serve` with these environment overrides, expecting it to refuse to start:
    (exit code, stderr)."""
    full = {**os.environ, "LIMOE_PORT": str(free_port()), **env}
    out = subprocess.run([sys.executable, "-m", "limoe", "serve"], cwd=ROOT, env=full, capture_output=True,
                         text=True, timeout=60)
    return out.returncode, out.stderr
