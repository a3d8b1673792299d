"""HTTP overhead: end-to-end images/s through `limoe serve` versus the raw ONNX backend in process
at the same batch size, same images and same ONNX Runtime thread count, measured side by side.

    python bench/http_overhead.py [--batch 32] [--clients 2] [--rounds 5] [--duration 4] [--threads 0]
                                  [--format json|multipart] [--store DIR --model NAME]

Server path: `limoe serve` with LIMOE_MAX_BATCH_SIZE=B and LIMOE_MAX_IMAGES_PER_REQUEST=B; each of
--clients closed-loop clients posts /v1/classify requests of B 64x64 PNGs plus 5 fixed labels
(bodies encoded once, connections kept alive), so the server forms batches of B (the mean batch
size it really formed is printed). Raw path, in this process: for the same B PNG files, decode
+ preprocess each (limoe.runtime.preprocess, as the server does), stack, and run the image encoder of an
OnnxEncoders built like the service's (CPU, same LIMOE_THREADS). The two paths alternate (server,
raw, raw, server, ...) while the server idles between its rounds; each figure is the median
over rounds. Server and client CPU time per image are printed to show where the gap goes.

It serves the shipped default model (`--store`/`--model` for another; `--fresh` for an
untrained fp32 `small` exported once into --cache). Every
round stops after --duration seconds (or --max-requests requests); the server is always
terminated. The last line is the ratio server/raw images/s (target >= 0.7).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np

from limoe.runtime.preprocess import open_image, preprocess_image

from _common import bench_parser, ensure_store, listing, load_encoders, log, machine_load, threads_label
from _load import close_clients, closed_loop, diff, image_metrics, new_clients, percentile, run_async
from _payloads import LABELS, encode_body, png_images
from _server import Server


def raw_round(enc, requests: list[list[bytes]], seconds: float) -> dict[str, float]:
    """Decode + preprocess + encode whole batches for about `seconds`; images/s and the split."""
    n = 0
    t_pre = t_enc = 0.0
    k = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        pixels = np.stack([preprocess_image(open_image(png), enc.preprocess) for png in requests[k % len(requests)]])
        t1 = time.perf_counter()
        enc.encode_images(pixels)
        t2 = time.perf_counter()
        t_pre += t1 - t0
        t_enc += t2 - t1
        n += len(pixels)
        k += 1
    elapsed = time.perf_counter() - start
    return {"rate": n / elapsed, "images": n, "pre": t_pre, "enc": t_enc}


def main(argv: list[str] | None = None) -> None:
    p = bench_parser(__doc__, max_requests=2000)
    p.add_argument("--batch", type=int, default=32, help="images per request = server max batch = raw batch")
    p.add_argument("--clients", type=int, default=2, help="concurrent closed-loop clients")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per path (interleaved)")
    p.add_argument("--duration", type=float, default=4.0, help="seconds per round")
    args = p.parse_args(argv)

    store = ensure_store(args.store, args.model, args.cache, args.fresh)
    before = machine_load()
    images = png_images(max(64, 2 * args.batch))
    requests = [[images[(i * args.batch + j) % len(images)] for j in range(args.batch)] for i in range(8)]
    bodies = [encode_body(r, LABELS, args.format) for r in requests]
    enc = load_encoders(store, args.model, args.threads)

    with Server("server", device="cpu", max_batch_size=args.batch, max_images_per_request=max(16, args.batch),
                max_batch_wait_ms=args.wait_ms, threads=args.threads, model=args.model, model_store=store,
                queue_size=max(256, 2 * args.clients * args.batch)) as server:
        log(f"starting the server on {server.base}")
        server.wait_ready()
        rs, raws = run_async(measure(args, server, bodies, enc, requests))

    med_server = statistics.median(r["rate"] for r in rs)
    med_raw = statistics.median(r["rate"] for r in raws)
    total = sum(r["ok"] for r in rs) * args.batch
    m = {k: sum(r["metrics"].get(k, 0.0) for r in rs) for k in rs[0]["metrics"]}
    batches = m.get("limoe_batch_size_count", 0.0)
    avg_batch = m.get("limoe_batch_size_sum", 0.0) / batches if batches else float("nan")
    per = lambda x: 1e3 * x / max(total, 1)
    raw_images = sum(r["images"] for r in raws)
    lat = [x for r in rs for x in r["latencies"]]
    failed = sum(r["failed"] for r in rs)

    print(f"{os.cpu_count()} CPUs, {before}")
    print(f"model {args.model}, batch {args.batch}, ONNX Runtime threads {threads_label(args.threads)}, CPU, "
          f"median of {args.rounds} interleaved rounds of {args.duration:g} s")
    print(f"server: {med_server:7.1f} images/s (rounds {listing(r['rate'] for r in rs)}); "
          f"{args.clients} clients x {args.batch} images/request ({args.format}), mean batch formed {avg_batch:.1f}, "
          f"request p50 {1e3 * percentile(lat, 50):.0f} ms" + (f", {failed} failed" if failed else ""))
    print(f"        per image: forward pass {per(m.get('limoe_inference_seconds_sum', 0)):.2f} ms, "
          f"decode+preprocess {per(m.get('limoe_preprocess_seconds_sum', 0)):.2f} ms (2 workers), "
          f"server CPU {per(sum(r['cpu']['main'] for r in rs)):.2f} ms event loop + "
          f"{per(sum(r['cpu']['other'] for r in rs)):.2f} ms other threads, "
          f"client CPU {per(sum(r['client_cpu'] for r in rs)):.2f} ms")
    print(f"raw:    {med_raw:7.1f} images/s (rounds {listing(r['rate'] for r in raws)}); "
          f"per image: decode+preprocess {1e3 * sum(r['pre'] for r in raws) / raw_images:.2f} ms, "
          f"encode {1e3 * sum(r['enc'] for r in raws) / raw_images:.2f} ms")
    print(f"ratio server/raw images/s: {med_server / med_raw:.3f}")


async def measure(args, server: Server, bodies, enc, requests):
    url = server.base + "/v1/classify"
    clients = new_clients(args.clients)
    try:
        load = await closed_loop(clients, url, bodies, args.warmup, args.max_requests)
        if load.ok == 0:
            raise RuntimeError(f"no request succeeded during warm-up: {load.errors}\n{server.output()}")
        raw_round(enc, requests, args.warmup)
        rs, raws = [], []
        for rnd in range(args.rounds):
            for path in (("server", "raw") if rnd % 2 == 0 else ("raw", "server")):
                if path == "raw":
                    raws.append(raw_round(enc, requests, args.duration))
                    log(f"round {rnd + 1}/{args.rounds} raw: {raws[-1]['rate']:.1f} images/s")
                    continue
                cpu0, m0 = server.cpu(), image_metrics(server.base)
                load = await closed_loop(clients, url, bodies, args.duration, args.max_requests)
                cpu1, m1 = server.cpu(), image_metrics(server.base)
                rs.append({"rate": load.rate() * args.batch, "ok": load.ok, "failed": load.failed,
                           "cpu": diff(cpu1, cpu0), "metrics": diff(m1, m0), "client_cpu": load.client_cpu,
                           "latencies": load.latencies})
                log(f"round {rnd + 1}/{args.rounds} server: {rs[-1]['rate']:.1f} images/s"
                    + (f", errors {load.errors} {load.transport_errors}" if load.failed else ""))
        return rs, raws
    finally:
        await close_clients(clients)


if __name__ == "__main__":
    main()
