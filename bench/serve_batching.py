"""Dynamic batching gain: images/s of the service with max batch 32 versus max batch 1, both
serving the `small` model to 32 concurrent single-image clients, measured side by side in one run.

    python bench/serve_batching.py [--clients 32] [--rounds 5] [--duration 4] [--threads 0]
                                   [--wait-ms 5] [--format json|multipart] [--store DIR --model NAME]

Two `limoe serve` processes run at once on 127.0.0.1 (LIMOE_MAX_BATCH_SIZE=32 and =1, every
other setting equal), but only one is loaded at a time: rounds alternate A B, B A, ... so
machine noise hits both alike, and each figure is the median over rounds. A request is one
64x64 PNG plus 5 fixed labels (their text embeddings are cached after the warm-up), so the
steady-state cost is the image encoder. Request bodies are encoded once and connections are
kept alive: the load generator shares the CPU with the server and must stay light; its CPU
time per image is printed next to the server's (event-loop thread vs all other threads), and
so is the model's own ceiling: the image encoder alone, in this process, at batch 1 and 32
with the same threads (measured while both servers idle, once per round), and the server's
gain relative to it.

It serves the shipped default model (`--store`/`--model` for another; `--fresh` for an
untrained fp32 `small` exported once into --cache). Every round stops after --duration seconds or --max-requests
requests; the servers are always terminated. The last line is the ratio batch32/batch1
images/s (target >= 3 on CPU).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from _common import bench_parser, ensure_store, listing, load_encoders, log, machine_load, threads_label
from _load import close_clients, closed_loop, diff, image_metrics, new_clients, percentile, run_async
from _payloads import LABELS, encode_body, png_images
from _server import Server
from _timing import encoder_rate


def main(argv: list[str] | None = None) -> None:
    p = bench_parser(__doc__)
    p.add_argument("--clients", type=int, default=32, help="concurrent closed-loop clients")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per server (interleaved)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per round")
    p.add_argument("--batch", type=int, default=32, help="max batch size of the batching server")
    p.add_argument("--raw-seconds", type=float, default=1.0,
                   help="per round, seconds of the in-process encoder alone at batch 1 and at --batch "
                        "(the model's own batching ceiling; 0 to skip)")
    args = p.parse_args(argv)

    store = ensure_store(args.store, args.model, args.cache, args.fresh)
    before = machine_load()
    images = png_images(64)
    bodies = [encode_body([im], LABELS, args.format) for im in images]
    common = {"model": args.model, "model_store": store, "max_batch_wait_ms": args.wait_ms, "threads": args.threads,
              "queue_size": max(256, 4 * args.clients)}
    names = [f"batch{args.batch}", "batch1"]

    with contextlib.ExitStack() as stack:
        servers = {n: stack.enter_context(Server(n, max_batch_size=b, **common))
                   for n, b in zip(names, (args.batch, 1))}
        log(f"starting {', '.join(f'{s.name} on {s.base}' for s in servers.values())}")
        for s in servers.values():
            s.wait_ready()
        enc = load_encoders(store, args.model, args.threads) if args.raw_seconds > 0 else None
        results = run_async(measure(args, servers, bodies, enc))

    print(f"{os.cpu_count()} CPUs, {before}")
    print(f"model {args.model}, {args.clients} concurrent clients x 1 image ({args.format}, {len(LABELS)} labels), "
          f"LIMOE_THREADS={threads_label(args.threads)}, max wait {args.wait_ms:g} ms, "
          f"median of {args.rounds} interleaved rounds of {args.duration:g} s")
    med = {}
    for n in names:
        rs = results[n]
        med[n] = statistics.median(r["rate"] for r in rs)
        total_img = sum(r["ok"] for r in rs)
        m = {k: sum(r["metrics"].get(k, 0.0) for r in rs) for k in rs[0]["metrics"]}
        batches = m.get("limoe_batch_size_count", 0.0)
        avg_batch = m.get("limoe_batch_size_sum", 0.0) / batches if batches else float("nan")
        infer_ms = 1e3 * m.get("limoe_inference_seconds_sum", 0.0) / max(total_img, 1)
        cpu_main = 1e3 * sum(r["cpu"]["main"] for r in rs) / max(total_img, 1)
        cpu_other = 1e3 * sum(r["cpu"]["other"] for r in rs) / max(total_img, 1)
        client = 1e3 * sum(r["client_cpu"] for r in rs) / max(total_img, 1)
        lat = [x for r in rs for x in r["latencies"]]
        failed = sum(r["failed"] for r in rs)
        print(f"{n:8s}: {med[n]:7.1f} images/s (rounds {listing(r['rate'] for r in rs)}), "
              f"mean batch {avg_batch:4.1f}, forward pass {infer_ms:5.2f} ms/image, "
              f"server CPU {cpu_main:4.2f} ms/image event loop + {cpu_other:4.2f} other, "
              f"client CPU {client:4.2f} ms/image, latency p50 {1e3 * percentile(lat, 50):.0f} ms"
              + (f", {failed} failed" if failed else ""))
    if results["raw"]:
        raw = {b: statistics.median(r[b] for r in results["raw"]) for b in (1, args.batch)}
        print(f"reference, image encoder alone in process (no HTTP, no decode, same threads): batch 1 "
              f"{raw[1]:.1f}, batch {args.batch} {raw[args.batch]:.1f} images/s = ratio {raw[args.batch] / raw[1]:.2f}")
        # the server's gain can exceed the model's: HTTP and hand-off costs per image shrink with batching too
        print(f"server gain / encoder's own gain: {(med[names[0]] / med[names[1]]) / (raw[args.batch] / raw[1]):.2f}")
    print(f"ratio batch{args.batch}/batch1 images/s: {med[names[0]] / med[names[1]]:.2f}")


async def measure(args, servers: dict[str, Server], bodies, enc) -> dict[str, list[dict]]:
    url = "/v1/classify"
    clients = {n: new_clients(args.clients) for n in servers}
    try:
        for n, s in servers.items():  # label embeddings, connections, steady state
            load = await closed_loop(clients[n], s.base + url, bodies, args.warmup, args.max_requests)
            if load.ok == 0:
                raise RuntimeError(f"{n}: no request succeeded during warm-up: {load.errors}\n{s.output()}")
        results: dict[str, list[dict]] = {n: [] for n in servers}
        results["raw"] = []
        size = enc.preprocess.image_size if enc else 0
        pixels = {b: np.random.default_rng(b).standard_normal((b, 3, size, size)).astype(np.float32)
                  for b in (1, args.batch)}
        if enc:
            for x in pixels.values():
                encoder_rate(enc, x, 0.2)
        order = list(servers)
        for rnd in range(args.rounds):
            for n in (order if rnd % 2 == 0 else order[::-1]):
                s = servers[n]
                cpu0, m0 = s.cpu(), image_metrics(s.base)
                load = await closed_loop(clients[n], s.base + url, bodies, args.duration, args.max_requests)
                cpu1, m1 = s.cpu(), image_metrics(s.base)
                results[n].append({"rate": load.rate(), "ok": load.ok, "failed": load.failed,
                                   "cpu": diff(cpu1, cpu0), "metrics": diff(m1, m0),
                                   "client_cpu": load.client_cpu, "latencies": load.latencies})
                log(f"round {rnd + 1}/{args.rounds} {n}: {load.rate():.1f} images/s"
                    + (f", errors {load.errors} {load.transport_errors}" if load.failed else ""))
            if enc:  # both servers idle now
                results["raw"].append({b: encoder_rate(enc, x, args.raw_seconds) for b, x in pixels.items()})
        return results
    finally:
        for cs in clients.values():
            await close_clients(cs)


if __name__ == "__main__":
    main()
