"""Latency under load: the saturating throughput of `limoe serve` (closed loop, many clients),
then an open-loop Poisson load at half of it, with latency percentiles.

    python bench/serve_latency.py [--clients 64] [--saturation-rounds 3] [--saturation-seconds 4]
                                  [--fraction 0.5] [--duration 20] [--threads 0] [--wait-ms 5]
                                  [--format json|multipart] [--store DIR --model NAME]

One server (LIMOE_MAX_BATCH_SIZE=32) on 127.0.0.1; a request is one 64x64 PNG plus 5 fixed
labels (bodies encoded once, connections kept alive). Saturation W: the median over rounds of
requests/s with --clients closed-loop clients. Then requests arrive at --fraction x W per second
as a Poisson process (seeded) for --duration seconds, each sent at its scheduled time whatever
is still outstanding (open loop); latency runs from the scheduled time to the answer, so a late
send counts against the server and the client alike (no coordinated omission). Outstanding
requests are capped (--max-outstanding; the excess counts as dropped) and given --drain seconds
to finish, so the run always ends. The server is always terminated.

It serves the shipped default model (`--store`/`--model` for another; `--fresh` for an
untrained fp32 `small` exported once into --cache). The last
line: `p50 X ms, p99 Y ms at Z req/s (half of saturation W req/s)`, Z the achieved rate.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from _common import bench_parser, ensure_store, listing, log, machine_load, threads_label
from _load import Load, close_clients, closed_loop, diff, image_metrics, new_clients, percentile, post, run_async
from _payloads import LABELS, encode_body, png_images
from _server import Server


def main(argv: list[str] | None = None) -> None:
    p = bench_parser(__doc__)
    p.add_argument("--clients", type=int, default=64, help="closed-loop clients when finding saturation")
    p.add_argument("--saturation-rounds", type=int, default=3)
    p.add_argument("--saturation-seconds", type=float, default=4.0, help="seconds per saturation round")
    p.add_argument("--fraction", type=float, default=0.5, help="open-loop rate as a fraction of saturation")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of open-loop arrivals")
    p.add_argument("--drain", type=float, default=15.0, help="seconds to let outstanding requests finish")
    p.add_argument("--max-outstanding", type=int, default=512, help="open-loop requests in flight at most")
    p.add_argument("--batch", type=int, default=32, help="LIMOE_MAX_BATCH_SIZE")
    p.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrivals")
    args = p.parse_args(argv)

    store = ensure_store(args.store, args.model, args.cache, args.fresh)
    before = machine_load()
    bodies = [encode_body([im], LABELS, args.format) for im in png_images(64)]
    with Server("server", max_batch_size=args.batch, max_batch_wait_ms=args.wait_ms, threads=args.threads,
                model=args.model, model_store=store, queue_size=max(256, 2 * args.max_outstanding)) as server:
        log(f"starting the server on {server.base}")
        server.wait_ready()
        out = run_async(measure(args, server, bodies))

    sat, rounds, open_load, offered, sent, dropped, late, m, cpu = out
    ms = [1e3 * x for x in open_load.latencies]
    achieved = open_load.ok / max(args.duration, open_load.elapsed)  # answers per second, to the last one
    batches = m.get("limoe_batch_size_count", 0.0)
    avg_batch = m.get("limoe_batch_size_sum", 0.0) / batches if batches else float("nan")
    queue_ms = 1e3 * m.get("limoe_queue_wait_seconds_sum", 0.0) / max(m.get("limoe_queue_wait_seconds_count", 0), 1)
    server_ms = 1e3 * m.get("request_seconds_sum", 0.0) / max(m.get("request_count", 0), 1)
    print(f"{os.cpu_count()} CPUs, {before}")
    print(f"model {args.model}, max batch {args.batch}, max wait {args.wait_ms:g} ms, "
          f"ONNX Runtime threads {threads_label(args.threads)}, "
          f"1 image ({args.format}) + {len(LABELS)} labels per request")
    print(f"saturation: {sat:.1f} req/s with {args.clients} closed-loop clients "
          f"(median of rounds {listing(rounds, '.1f')})")
    print(f"open loop: Poisson at {offered:.1f} req/s for {args.duration:g} s: {sent} sent, {open_load.ok} answered, "
          f"{open_load.failed} failed{f' {open_load.errors} {open_load.transport_errors}' if open_load.failed else ''}, "
          f"{dropped} dropped (over --max-outstanding), "
          f"{late} sent over 10 ms late")
    print(f"latency ms: p50 {percentile(ms, 50):.1f}, p90 {percentile(ms, 90):.1f}, p99 {percentile(ms, 99):.1f}, "
          f"max {max(ms, default=float('nan')):.1f}; in the server: {server_ms:.1f} ms mean, of which "
          f"{queue_ms:.1f} ms waiting for a batch; mean batch {avg_batch:.1f}; "
          f"server CPU {cpu['total'] / args.duration:.2f} cores, client {open_load.client_cpu / args.duration:.2f}")
    share = "half" if args.fraction == 0.5 else f"{args.fraction:g} x"
    print(f"p50 {percentile(ms, 50):.1f} ms, p99 {percentile(ms, 99):.1f} ms at {achieved:.1f} req/s "
          f"({share} of saturation {sat:.1f} req/s)")


async def open_loop(idle: list, url: str, bodies, rate: float, duration: float, drain: float, max_outstanding: int,
                    seed: int):
    """Poisson arrivals at `rate`/s for `duration` s; latency measured from the scheduled time.

    Each request takes an idle one-connection client from `idle` (a new one when none is idle)
    and gives it back when answered; the clients made here are closed at the end."""
    load = Load()
    rng = np.random.default_rng(seed)
    tasks: set[asyncio.Task] = set()
    sent = dropped = late = 0
    cpu0 = time.process_time()

    made = []

    async def one(body, headers, scheduled: float) -> None:
        if idle:
            client = idle.pop()
        else:
            client = new_clients(1)[0]
            made.append(client)
        r = Load()
        try:
            ok = await post(client, url, body, headers, r)
        finally:
            idle.append(client)
        if ok:
            load.ok += 1
            load.latencies.append(time.perf_counter() - scheduled)
            load.elapsed = max(load.elapsed, time.perf_counter() - start)  # to the last answer
        else:
            for k, v in r.errors.items():
                load.errors[k] = load.errors.get(k, 0) + v
            for k, v in r.transport_errors.items():
                load.transport_errors[k] = load.transport_errors.get(k, 0) + v

    start = time.perf_counter()
    t = start
    while True:
        t += rng.exponential(1.0 / rate)
        if t - start >= duration:
            break
        delay = t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.010:
            late += 1
        if len(tasks) >= max_outstanding:
            dropped += 1
            continue
        body, headers = bodies[sent % len(bodies)]
        sent += 1
        task = asyncio.ensure_future(one(body, headers, t))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        _, pending = await asyncio.wait(set(tasks), timeout=drain)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
            load.errors[-1] = len(pending)  # -1: still unanswered after the drain
    load.client_cpu = time.process_time() - cpu0
    for client in made:
        idle.remove(client)
    await close_clients(made)
    return load, sent, dropped, late


async def measure(args, server: Server, bodies):
    url = server.base + "/v1/classify"
    clients = new_clients(args.clients)
    try:
        load = await closed_loop(clients, url, bodies, args.warmup, args.max_requests)
        if load.ok == 0:
            raise RuntimeError(f"no request succeeded during warm-up: {load.errors}\n{server.output()}")
        rounds = []
        for rnd in range(args.saturation_rounds):
            load = await closed_loop(clients, url, bodies, args.saturation_seconds, args.max_requests)
            rounds.append(load.rate())
            log(f"saturation round {rnd + 1}/{args.saturation_rounds}: {load.rate():.1f} req/s, "
                f"p50 {1e3 * percentile(load.latencies, 50):.0f} ms"
                + (f", errors {load.errors} {load.transport_errors}" if load.failed else ""))
        sat = statistics.median(rounds)
        rate = args.fraction * sat
        log(f"open loop at {rate:.1f} req/s for {args.duration:g} s")
        cpu0, m0 = server.cpu(), image_metrics(server.base)
        open_load, sent, dropped, late = await open_loop(list(clients), url, bodies, rate, args.duration, args.drain,
                                                         args.max_outstanding, args.seed)
        cpu1, m1 = server.cpu(), image_metrics(server.base)
        return sat, rounds, open_load, rate, sent, dropped, late, diff(m1, m0), diff(cpu1, cpu0)
    finally:
        await close_clients(clients)


if __name__ == "__main__":
    main()
