"""A rolling update, simulated with real `limoe serve` processes (docs/SHUTDOWN.md).

Two servers behind a small round-robin client, under continuous load from a few client threads.
As a rollout does, one server gets SIGTERM and a replacement starts on a new port. The client
plays the endpoint controller: it probes every server's /readyz every 50 ms, drops a server from
rotation when it answers anything but 200 (or nothing), and adds one when it answers 200. Every
request has a live server to go to, so every request must get 200.

What it simulates: SIGTERM to a serving replica with requests in flight on kept-alive
connections; readiness turning 503 at once; the grace period covering the time the balancer
takes to stop sending (here one probe interval); the old replica finishing its requests and
exiting 0; the replacement joining once warm.

What it cannot: Kubernetes' own timing. Endpoints are removed when the pod is deleted, not by
the readiness probe, and kube-proxy, ingress controllers and cloud load balancers learn of it
seconds later, node by node; probes run every few seconds, not every 50 ms; connections held
by proxies and conntrack entries may outlive the endpoint. That delay is what
LIMOE_DRAIN_GRACE_S (plus a preStop sleep) must cover in a cluster, and it is not measured
here. Nor are maxSurge/maxUnavailable, SIGKILL at terminationGracePeriodSeconds, or clients
that retry.
"""

from __future__ import annotations

import base64
import io
import itertools
import signal
import threading
import time

import httpx
import numpy as np
from PIL import Image

from servers import Server

SETTINGS = {"model": "limoe-tiny", "warmup": "false", "drain_grace_s": 2.0, "drain_s": 15.0}
CLIENTS = 3


def body() -> dict:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return {"images": [base64.b64encode(buf.getvalue()).decode()], "labels": ["red", "green", "blue"]}


class Balancer:
    """Round robin over the servers whose /readyz last answered 200, probed every `period` s."""

    def __init__(self, period: float = 0.05):
        self.period, self.known, self.ready = period, [], []
        self.lock = threading.Lock()
        self.turn = itertools.count()
        self.stopped = threading.Event()
        self.prober = threading.Thread(target=self._probe, daemon=True)
        self.prober.start()

    def add(self, base: str) -> None:
        with self.lock:
            self.known.append(base)

    def pick(self) -> str | None:
        with self.lock:
            return self.ready[next(self.turn) % len(self.ready)] if self.ready else None

    def _probe(self) -> None:
        with httpx.Client(trust_env=False, timeout=1) as c:
            while not self.stopped.is_set():
                for base in list(self.known):
                    try:
                        ok = c.get(base + "/readyz").status_code == 200
                    except httpx.HTTPError:
                        ok = False
                    with self.lock:
                        if ok and base not in self.ready:
                            self.ready.append(base)
                        elif not ok and base in self.ready:
                            self.ready.remove(base)
                time.sleep(self.period)

    def wait_ready(self, base: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while base not in self.ready:
            assert time.monotonic() < deadline, f"{base} never joined the rotation"
            time.sleep(0.02)


def test_rolling_update_loses_no_request():
    balancer = Balancer()
    results: list[tuple[str, int | str]] = []  # (server, status or the error a client saw)
    stop = threading.Event()

    def load() -> None:
        clients: dict[str, httpx.Client] = {}  # one keep-alive pool per server, as a proxy keeps
        payload = body()
        while not stop.is_set():
            base = balancer.pick()
            if base is None:
                time.sleep(0.01)
                continue
            client = clients.setdefault(base, httpx.Client(trust_env=False, timeout=30))
            try:
                outcome: int | str = client.post(base + "/v1/classify", json=payload).status_code
            except httpx.HTTPError as e:
                outcome = repr(e)
            results.append((base, outcome))
        for c in clients.values():
            c.close()

    old, other, new = (Server(name, **SETTINGS) for name in ("old", "other", "new"))
    with old, other:
        for server in (old, other):
            server.wait_ready()
            balancer.add(server.base)
            balancer.wait_ready(server.base)
        threads = [threading.Thread(target=load) for _ in range(CLIENTS)]
        try:
            for t in threads:
                t.start()
            time.sleep(1.0)
            before = len(results)
            old.proc.send_signal(signal.SIGTERM)
            with new:
                new.wait_ready()
                balancer.add(new.base)
                balancer.wait_ready(new.base)
                rc = old.proc.wait(timeout=SETTINGS["drain_s"])
                time.sleep(1.0)
                stop.set()
                for t in threads:
                    t.join(timeout=30)
                served = {base: sum(1 for b, _ in results if b == base) for base in (old.base, other.base, new.base)}
        finally:
            stop.set()
            balancer.stopped.set()
    print(before, len(results), served)
    failures = [r for r in results if r[1] != 200]
    assert not failures, f"{len(failures)} of {len(results)} requests failed, e.g. {failures[:3]}"
    assert before > 0 and served[new.base] > 0 and served[other.base] > 0
    assert served[old.base] > 0
    assert rc == 0, old.output()
