"""Memory under sustained load: the resident set of `limoe serve` on the shipped default model
while clients send thousands of requests, read with psutil.

    python bench/serve_memory.py [--requests 2000] [--clients 16] [--distinct-labels 10000]
                                 [--bulk-requests 30] [--big-requests 24] [--store DIR --model NAME]

Phases, one after the other, with the resident set (RSS) sampled every 50 ms:
  classify  --requests one-image /v1/classify requests, each with 5 labels drawn from
            --distinct-labels different ones (more than LIMOE_LABEL_CACHE_SIZE, so the label
            cache fills and evicts);
  again     the same load with other label draws: a leak shows as growth between the two;
  bulk      --bulk-requests /v1/classify/bulk requests of 256 small images (JSON, ~3.5 MB each);
  big       --big-requests bulk requests of 256 noisy 180x180 PNGs (multipart, ~25 MB each, near
            LIMOE_MAX_BODY_BYTES), 8 clients at once: more than LIMOE_MAX_INFLIGHT_BYTES allows,
            so some are refused with 429 and, like polite clients, wait Retry-After and resend;
  after     --requests / 4 classify requests: what the big bodies left behind.
Every phase prints its requests, refusals, failures, and the RSS at its end and at its peak. The
last lines are the growth from `classify` to `again` (target: none beyond noise) and the peak
over the run (target < 1 GiB for the CPU service with the default model, DESIGN.md).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
import numpy as np

from _common import bench_parser, ensure_store, log, machine_load, threads_label
from _load import close_clients, new_clients, run_async
from _payloads import encode_body, noisy_pngs, png_images
from _server import Server

MIB = 1024 * 1024


def label_sets(count: int, distinct: int, per_request: int = 5, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    return [[f"object number {k}" for k in rng.choice(distinct, per_request, replace=False)] for _ in range(count)]


async def sample_rss(server: Server, samples: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        samples.append(server.rss())
        try:
            await asyncio.wait_for(stop.wait(), 0.05)
        except asyncio.TimeoutError:
            pass


async def polite_loop(clients, url: str, bodies, requests: int) -> tuple[int, int, dict, float]:
    """Closed loop that, like a well-behaved client, waits Retry-After on 429 and sends again.
    Returns (answered 200, refused with 429 and retried, other failures by status, seconds)."""
    ok = refused = sent = 0
    failures: dict[int, int] = {}
    start = time.perf_counter()

    async def worker(i: int, client) -> None:
        nonlocal ok, refused, sent
        k = i
        while sent < requests:
            sent += 1
            body, headers = bodies[k % len(bodies)]
            k += len(clients)
            while True:
                try:
                    async with client.post(url, data=body, headers=headers) as r:
                        await r.read()
                        status, retry = r.status, float(r.headers.get("retry-after", "1"))
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    status, retry = 0, 0.0
                if status != 429:
                    break
                refused += 1
                await asyncio.sleep(retry)
            if status == 200:
                ok += 1
            else:
                failures[status] = failures.get(status, 0) + 1

    await asyncio.gather(*(worker(i, c) for i, c in enumerate(clients)))
    return ok, refused, failures, time.perf_counter() - start


async def phase(server: Server, name: str, path: str, bodies, clients: int, requests: int) -> dict:
    samples: list[int] = []
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(sample_rss(server, samples, stop))
    conns = new_clients(clients)
    try:
        ok, refused, failures, seconds = await polite_loop(conns, server.base + path, bodies, requests)
    finally:
        await close_clients(conns)
        stop.set()
        await sampler
    end = server.rss()
    result = {"name": name, "ok": ok, "refused": refused, "failed": sum(failures.values()), "errors": failures,
              "peak": max(samples + [end]), "end": end, "seconds": seconds}
    log(f"{name}: {ok} ok, {refused} refused (429, retried), {result['failed']} failed in {seconds:.1f} s, "
        f"RSS end {end / MIB:.0f} MiB, peak {result['peak'] / MIB:.0f} MiB")
    return result


async def measure(args, server: Server) -> list[dict]:
    small = png_images(64)
    sets = label_sets(args.requests, args.distinct_labels)
    classify = [encode_body([small[i % len(small)]], labels) for i, labels in enumerate(sets)]
    again = [encode_body([small[i % len(small)]], labels)
             for i, labels in enumerate(label_sets(args.requests, args.distinct_labels, seed=1))]
    bulk = [encode_body([small[(i + k) % len(small)] for k in range(256)], sets[i]) for i in range(4)]
    noisy = noisy_pngs(16)
    big = [encode_body([noisy[(i + k) % len(noisy)] for k in range(256)], sets[i], "multipart") for i in range(2)]
    log(f"bodies: classify {len(classify[0][0]) / 1024:.0f} KiB, bulk {len(bulk[0][0]) / MIB:.1f} MiB, "
        f"big {len(big[0][0]) / MIB:.1f} MiB")
    return [
        await phase(server, "classify", "/v1/classify", classify, args.clients, args.requests),
        await phase(server, "again", "/v1/classify", again, args.clients, args.requests),
        await phase(server, "bulk", "/v1/classify/bulk", bulk, 4, args.bulk_requests),
        await phase(server, "big", "/v1/classify/bulk", big, 8, args.big_requests),
        await phase(server, "after", "/v1/classify", classify, args.clients, args.requests // 4),
    ]


def main(argv: list[str] | None = None) -> None:
    p = bench_parser(__doc__, load=False)
    p.add_argument("--requests", type=int, default=2000, help="requests in each classify phase")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients in the classify phases")
    p.add_argument("--distinct-labels", type=int, default=10_000, help="labels drawn from (cache: 4096)")
    p.add_argument("--bulk-requests", type=int, default=30, help="bulk requests of 256 small images")
    p.add_argument("--big-requests", type=int, default=24, help="bulk requests of ~25 MB, 8 at a time")
    args = p.parse_args(argv)

    store = ensure_store(args.store, args.model, args.cache, args.fresh)
    before = machine_load()
    with Server("server", model=args.model, model_store=store, threads=args.threads,
                max_batch_wait_ms=args.wait_ms, max_bulk_images=256) as server:
        server.wait_ready()
        ready = server.rss()
        phases = run_async(measure(args, server))

    print(f"{os.cpu_count()} CPUs, {before}")
    print(f"model {args.model}, ONNX Runtime threads {threads_label(args.threads)}; RSS when ready {ready / MIB:.0f} MiB")
    for r in phases:
        errors = f" {r['errors']}" if r["failed"] else ""
        print(f"{r['name']:8s}: {r['ok']:5d} ok, {r['refused']} refused (429) and retried, "
              f"{r['failed']} failed{errors} in {r['seconds']:.0f} s; "
              f"RSS at the end {r['end'] / MIB:.0f} MiB, peak {r['peak'] / MIB:.0f} MiB")
    peak = max(r["peak"] for r in phases)
    first, second = phases[0], phases[1]
    print(f"growth from the end of classify to the end of again ({second['ok']} requests later): "
          f"{(second['end'] - first['end']) / MIB:+.1f} MiB")
    print(f"peak RSS {peak / MIB:.0f} MiB (target < 1024)")


if __name__ == "__main__":
    main()
