"""`limoe serve` as a child process on 127.0.0.1: started on a free port with LIMOE_* overrides,
waited for until /readyz answers 200, always stopped, and what it spent (CPU time per thread,
resident memory, read with psutil).

The one way the serving benchmarks and the tests (tests/servers.py) start a server. It imports
nothing from its siblings: the benchmarks import it as `_server`, the tests as `bench._server`.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, timeout: float = 60.0, path: str = "/readyz",
               gone: Callable[[], str | None] = lambda: None) -> None:
    """Poll `base + path` until it answers 200. `gone()` says why the server can no longer come
    up (its process ended), or None while it still may."""
    deadline = time.monotonic() + timeout
    with httpx.Client(trust_env=False, timeout=2.0) as c:  # 127.0.0.1: no proxies from the environment
        while time.monotonic() < deadline:
            if (why := gone()) is not None:
                raise RuntimeError(why)
            try:
                if c.get(base + path).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise TimeoutError(f"{base}{path} not ready after {timeout:.0f}s")


try:  # resolved here, not in the child between fork and exec, where loading a library may deadlock
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:
    """In the child, before exec: Linux sends it SIGTERM if its parent dies, even by SIGKILL."""
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def unwind_on_sigterm() -> None:
    """SIGTERM to this process unwinds it (finally blocks stop the servers) instead of killing it.
    For benchmark scripts; a test runner keeps its own handling."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


class Server:
    """`python -m limoe serve` on 127.0.0.1 and a free port, with LIMOE_* overrides
    (`Server("batch1", max_batch_size=1)` sets LIMOE_MAX_BATCH_SIZE=1).

    A context manager: the process is always stopped (SIGINT, then SIGKILL) on exit. Its log goes to
    a temporary file (never an unread pipe, which would block the server once full), shown if it
    fails to become ready."""

    def __init__(self, name: str = "limoe serve", cgroup: Path | None = None, **env):
        self.name = name
        self.cgroup = cgroup  # a cgroup directory to start in (its cgroup.procs), e.g. one with a memory limit
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "LIMOE_HOST": "127.0.0.1", "LIMOE_PORT": str(self.port),
                    "LIMOE_LOG_LEVEL": "warning", **{f"LIMOE_{k.upper()}": str(v) for k, v in env.items()}}
        self.settings = {k: str(v) for k, v in env.items()}
        self.proc: subprocess.Popen | None = None
        self.process: psutil.Process | None = None
        self._log = tempfile.TemporaryFile(mode="w+")

    def start(self) -> Server:
        self.proc = subprocess.Popen([sys.executable, "-m", "limoe", "serve"], cwd=ROOT, env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=self._in_child)
        self.process = psutil.Process(self.proc.pid)
        return self

    def _in_child(self) -> None:
        """Before exec: die with the parent, and join the cgroup first, so that all the server's
        memory is charged to it."""
        _die_with_parent()
        if self.cgroup is not None:
            (self.cgroup / "cgroup.procs").write_text(str(os.getpid()))

    def wait_ready(self, timeout: float = 240.0) -> None:
        def gone() -> str | None:
            if self.proc.poll() is None:
                return None
            return f"server {self.name} exited with {self.proc.returncode}:\n{self.output()}"

        try:
            wait_ready(self.base, timeout, gone=gone)
        except TimeoutError as e:
            raise TimeoutError(f"server {self.name}: {e}:\n{self.output()}") from None

    def output(self) -> str:
        """The end of the server's log."""
        self._log.seek(0)
        return self._log.read()[-4000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # SIGINT (Ctrl-C): the server answers what is in flight and exits, without the grace
            # period that SIGTERM gives load balancers (LIMOE_DRAIN_GRACE_S, docs/SHUTDOWN.md)
            self.proc.send_signal(signal.SIGINT)
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
        threads = self.process.threads()
        total = sum(t.user_time + t.system_time for t in threads)
        main = sum(t.user_time + t.system_time for t in threads if t.id == self.proc.pid)
        return {"main": main, "other": total - main, "total": total}

    def rss(self) -> int:
        """Resident memory of the server process now, in bytes."""
        return self.process.memory_info().rss
