"""Load for the serving benchmarks: closed-loop clients with aiohttp, what they got (`Load`),
and what the server says it spent (its Prometheus /metrics)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import httpx
import numpy as np


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


def image_metrics(base: str) -> dict[str, float]:
    """Sums and counts of the image encoder's histograms and of /v1/classify's request time,
    scraped from the server's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics", timeout=10, trust_env=False).text
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
    """What changed between two readings of `image_metrics` or `Server.cpu`."""
    return {k: after[k] - before.get(k, 0.0) for k in after}
