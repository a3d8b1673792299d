"""Interactive latency under a running batch job: /v1/classify p99 at a fixed modest rate without a
job, then with a large job running (its requests at low priority), side by side in one run.

    python bench/batch_priority.py [--rate 20] [--seconds 20] [--rounds 2] [--job-lines 5000]
                                   [--job-images 1] [--threads 0] [--wait-ms 5] [--jobs-max-batch N]
                                   [--store DIR --model NAME] [--jobs-dir DIR]

One `limoe serve` (LIMOE_MAX_BATCH_SIZE=32) on 127.0.0.1. Interactive requests (one 64x64 PNG plus
5 fixed labels) arrive as a Poisson process at --rate per second for --seconds (open loop, latency
from the scheduled send: bench/serve_latency.py's `open_loop`). Rounds alternate: without a job,
then with one, --rounds times, so that machine noise hits both alike; each round with a job
starts a new batch of --job-lines requests (--job-images images each, the same labels) on one
uploaded file, waits until it is answering, measures, and cancels it. A round whose job ended
before its measurement did is reported (the job was too small to cover it). Latencies of all
rounds of a kind are pooled before taking percentiles.

The job's requests enter the batchers at low priority: each forward pass takes the waiting
interactive images first and at most LIMOE_JOBS_MAX_BATCH job images. The last line is
`ratio interactive p99 with job / without: X` (target <= 2). The machine's other work skews
every figure here; its load average is printed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx

from _common import bench_parser, ensure_store, log, machine_load, threads_label
from _load import close_clients, closed_loop, new_clients, percentile, run_async
from _payloads import LABELS, encode_body, png_images
from _server import Server
from serve_latency import open_loop

FINISHED = ("completed", "failed", "cancelled", "expired")


def main(argv: list[str] | None = None) -> None:
    p = bench_parser(__doc__)
    p.add_argument("--rate", type=float, default=20.0, help="interactive requests per second (Poisson)")
    p.add_argument("--seconds", type=float, default=20.0, help="seconds of interactive load per round")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (without a job, with a job)")
    p.add_argument("--job-lines", type=int, default=5000, help="requests in the job")
    p.add_argument("--job-images", type=int, default=1, help="images per job request")
    p.add_argument("--jobs-max-batch", type=int, default=None, help="LIMOE_JOBS_MAX_BATCH (default: the server's)")
    p.add_argument("--jobs-dir", default=None, help="LIMOE_JOBS_DIR (default: a temporary directory)")
    p.add_argument("--batch", type=int, default=32, help="LIMOE_MAX_BATCH_SIZE")
    args = p.parse_args(argv)

    store = ensure_store(args.store, args.model, args.cache, args.fresh)
    before = machine_load()
    images = png_images(64)
    bodies = [encode_body([im], LABELS, "json") for im in images]
    b64 = [base64.b64encode(im).decode() for im in images]
    job = "\n".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/classify", "body": {
        "images": [b64[(i * args.job_images + k) % len(b64)] for k in range(args.job_images)], "labels": LABELS}})
        for i in range(args.job_lines)).encode()
    jobs_dir = args.jobs_dir or tempfile.mkdtemp(prefix="limoe-bench-jobs-")
    env = {"model": args.model, "model_store": store, "max_batch_size": args.batch, "max_batch_wait_ms": args.wait_ms,
           "threads": args.threads, "jobs_dir": jobs_dir, "jobs_max_file_bytes": max(2 ** 20, 2 * len(job))}
    if args.jobs_max_batch:
        env["jobs_max_batch"] = args.jobs_max_batch
    with Server("server", **env) as server:
        log(f"starting the server on {server.base}")
        server.wait_ready()
        file_id = httpx.post(server.base + "/v1/files", files={"file": ("job.jsonl", job)}, data={"purpose": "batch"},
                             timeout=300, trust_env=False).json()["id"]
        without, with_job, notes = run_async(measure(args, server.base, bodies, file_id))

    p99_without, p99_with = percentile(without, 99), percentile(with_job, 99)
    print(f"{os.cpu_count()} CPUs, {before}")
    print(f"model {args.model}, max batch {args.batch}, max wait {args.wait_ms:g} ms, ONNX Runtime threads "
          f"{threads_label(args.threads)}; interactive: 1 image + {len(LABELS)} labels at {args.rate:g} req/s "
          f"(Poisson) for {args.seconds:g} s x {args.rounds} rounds; job: {args.job_lines} requests of "
          f"{args.job_images} image(s), {len(job) / 2 ** 20:.1f} MiB")
    for line in notes:
        print(line)
    for name, ms in (("without a job", without), ("with a job   ", with_job)):
        print(f"interactive {name}: {len(ms)} answered, p50 {percentile(ms, 50):.1f} ms, "
              f"p90 {percentile(ms, 90):.1f} ms, p99 {percentile(ms, 99):.1f} ms, max {max(ms, default=float('nan')):.1f} ms")
    print(f"ratio interactive p99 with job / without: {p99_with / p99_without:.2f}")


async def measure(args, base: str, bodies, file_id: str) -> tuple[list[float], list[float], list[str]]:
    url = base + "/v1/classify"
    clients = new_clients(8)
    without: list[float] = []
    with_job: list[float] = []
    notes: list[str] = []
    try:
        await closed_loop(clients, url, bodies, args.warmup, args.max_requests)  # labels cached, pools warm
        async with httpx.AsyncClient(base_url=base, timeout=60, trust_env=False) as api:
            for rnd in range(args.rounds):
                load, *_ = await open_loop(list(clients), url, bodies, args.rate, args.seconds, 15.0, 256, seed=rnd)
                check(load, "without a job")
                without += [1e3 * x for x in load.latencies]
                log(f"round {rnd + 1}/{args.rounds} without a job: p99 {percentile(without, 99):.1f} ms so far")

                batch = (await api.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/classify",
                                                             "completion_window": "24h"})).json()
                while (state := (await api.get(f"/v1/batches/{batch['id']}")).json())["request_counts"]["completed"] < 1:
                    if state["status"] in FINISHED:
                        raise RuntimeError(f"the job ended before it answered: {state}")
                    await asyncio.sleep(0.05)
                started = time.perf_counter()
                load, *_ = await open_loop(list(clients), url, bodies, args.rate, args.seconds, 15.0, 256,
                                           seed=1000 + rnd)
                elapsed = time.perf_counter() - started
                after = (await api.get(f"/v1/batches/{batch['id']}")).json()
                check(load, "with a job")
                with_job += [1e3 * x for x in load.latencies]
                done = after["request_counts"]["completed"] - state["request_counts"]["completed"]
                notes.append(f"round {rnd + 1}: the job answered {done} requests "
                             f"({done * args.job_images / elapsed:.1f} images/s) beside the interactive load"
                             + ("" if after["status"] == "in_progress" else
                                f"; it ended ({after['status']}) before the measurement did: use more --job-lines"))
                await api.post(f"/v1/batches/{batch['id']}/cancel")
                while (await api.get(f"/v1/batches/{batch['id']}")).json()["status"] not in FINISHED:
                    await asyncio.sleep(0.05)
                log(f"round {rnd + 1}/{args.rounds} with a job: p99 {percentile(with_job, 99):.1f} ms so far")
    finally:
        await close_clients(clients)
    return without, with_job, notes


def check(load, what: str) -> None:
    if load.failed:
        log(f"warning: {load.failed} interactive requests failed {what}: {load.errors} {load.transport_errors}")


if __name__ == "__main__":
    main()
