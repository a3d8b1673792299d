"""Bulk classification, four ways side by side in one run, against the raw image encoder.

Images/s of `limoe classify` in one process, the same classifier as a Ray Data pipeline on a
local Ray instance, a batch job through `limoe serve`, and the server's synchronous bulk endpoint.

    python bench/bulk.py [--images 1024] [--size 64] [--rounds 3] [--batch-size 64] [--workers N] [--passes 2]
                         [--max-batch 32] [--bulk-clients 2] [--job-images 1] [--jobs-max-batch N]
                         [--no-ray] [--ray-concurrency 1] [--threads 0] [--store DIR --model NAME | --fresh]

The inputs: --images distinct synthetic PNG files (--size x --size, bench/_payloads.png_images)
written to a temporary folder, and 10 fixed labels; every path asks for the best 5 labels. Each
path classifies all of them; images/s = images / the seconds timed, as follows.

- raw encoder: the image encoder alone (`encode_images`) on the images already decoded and
  preprocessed (untimed), in batches of --batch-size, one pass at a time, on a session of
  --threads intra-op threads (0: ONNX Runtime's default, every core): the encoder as a caller
  uses it. The target ratio is against this.
- raw, N passes: the same, but --passes batches at once on the classifier's own encoder object
  (the same session, threads and provider: the cores shared out among the passes), the way
  classify runs it; printed with its ratio for comparison.
- classify: `limoe.bulk.classify.classify_items` on the folder, with the model loaded and the label
  set embedded beforehand (the `ZeroShot` built once, as a long run amortises it): listing the
  folder, decoding in --workers threads, encoding in batches of --batch-size, --passes at once,
  scoring, writing the JSON lines. This is `limoe classify` minus its start-up (which its
  summary's images/s includes).
- classify --ray: `limoe.bulk.classify_ray.run_ray` on the folder (--ray-concurrency actors,
  --batch-size, --workers), Ray started beforehand (num_cpus = os.cpu_count()). The figure is a whole
  run: the actors' start (process, imports, model, label set), reading, classifying, writing and
  reading back the output. Reported beside it: the Ray start-up (`ray.init`) and a steady-state
  estimate, (N - B) / (t(N images) - t(B images)) over runs of the whole folder and of its first
  B = --batch-size images in the same round (the fixed costs cancel). Ray runs after the server
  is stopped, in rounds of its own, so that its processes never share the machine with the
  other measurements.
- batch job: one `limoe serve`; the JSONL file (one /v1/classify request of --job-images base64
  images a line: 1 by default, the shape a batch client writes, one custom_id per image) is
  uploaded once, untimed; each round creates a batch on it and polls it every 50 ms; timed from
  sending POST /v1/batches to the poll that sees it completed (validation, decoding, the
  low-priority passes (of at most LIMOE_JOBS_MAX_BATCH job images while interactive requests
  come, whole passes when none does, as here), storing the results, writing
  the output file).
- bulk endpoint: the same server process, right before or after the job (same settings):
  POST /v1/classify/bulk with the same base64 images in JSON, LIMOE_MAX_BULK_IMAGES (256) a
  request, sent by --bulk-clients concurrent keep-alive clients (aiohttp), each taking the next
  request as its last is answered; timed from the first send to the last answer.

Before the rounds, untimed: the server classifies one bulk request and one 1-line job (labels
cached, shapes warm), the in-process encoder runs each batch shape once, and the classifier
classifies the first batch. Each round measures raw and classify back to back, then the job and
the bulk endpoint back to back, alternating the order of each pair from round to round, so that
machine noise hits both alike. Each figure is the median over rounds; each ratio the median of
the per-round ratios (each round's pair side by side). The load average before the run is
printed: other work on the machine skews it all.

The last two lines:
    ratio classify/raw images/s: X (target >= 0.9)
    ratio batch job/bulk endpoint images/s: Y (target >= 0.8)

and before them, for comparison, classify against the raw encoder run its way (N passes at once).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import numpy as np

from limoe.bulk.classify import (
    ClassifyError,
    JsonlWriter,
    ZeroShot,
    classify_items,
    decode,
    iter_items,
    load_entry,
    open_encoders,
)
from limoe.runtime.encoders import threads_per_pass

from _common import bench_parser, ensure_store, listing, log, machine_load, threads_label
from _load import Load, close_clients, new_clients, post, run_async
from _payloads import LABELS, png_images
from _server import Server
from _timing import raw_rate

LABELS10 = [*LABELS, "a tree", "a house", "a bird", "a green field", "a person"]
TOP_K = 5
POLL_S = 0.05  # batch status polls: a GET costs the server about a millisecond of its event loop
FINISHED = ("completed", "failed", "cancelled", "expired")
ROWS = ("raw encoder", "raw, N passes", "classify", "classify --ray", "batch job", "bulk endpoint")


# -- in process: the raw encoder and `limoe classify` -----------------------------------------------
def classify_rate(zs: ZeroShot, folder: Path, out: Path, n: int, batch: int, workers: int, passes: int) -> float:
    """images/s of the offline classifier's pipeline on `folder`, the model already loaded."""
    writer = JsonlWriter(out, append=False)
    start = time.perf_counter()
    try:
        summary = classify_items(iter_items([str(folder)]), zs, writer.write, TOP_K, batch, workers, progress=False,
                                 passes=passes)
    finally:
        writer.close()
    elapsed = time.perf_counter() - start
    if summary.images != n or summary.errors:
        raise RuntimeError(f"classify: {summary}, expected {n} images and no errors")
    return n / elapsed


# -- the server: a batch job and the bulk endpoint ---------------------------------------------------
def job_file(b64: list[str], per_line: int) -> bytes:
    return "".join(json.dumps({"custom_id": f"img-{i}", "method": "POST", "url": "/v1/classify",
                               "body": {"images": b64[i:i + per_line], "labels": LABELS10, "top_k": TOP_K}}) + "\n"
                   for i in range(0, len(b64), per_line)).encode()


def bulk_bodies(b64: list[str], per_request: int) -> list[bytes]:
    return [json.dumps({"images": b64[i:i + per_request], "labels": LABELS10, "top_k": TOP_K}).encode()
            for i in range(0, len(b64), per_request)]


def upload(api: httpx.Client, content: bytes) -> str:
    r = api.post("/v1/files", files={"file": ("bulk.jsonl", content)}, data={"purpose": "batch"})
    if r.status_code != 200:
        raise RuntimeError(f"upload: {r.status_code} {r.text[:300]}")
    return r.json()["id"]


def job_seconds(api: httpx.Client, file_id: str, lines: int) -> float:
    """Seconds from creating a batch on `file_id` to seeing it completed, every line answered."""
    start = time.perf_counter()
    r = api.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/classify",
                                      "completion_window": "24h"})
    if r.status_code != 200:
        raise RuntimeError(f"create batch: {r.status_code} {r.text[:300]}")
    batch_id = r.json()["id"]
    while (state := api.get(f"/v1/batches/{batch_id}").json())["status"] not in FINISHED:
        time.sleep(POLL_S)
    elapsed = time.perf_counter() - start
    counts = state["request_counts"]
    if state["status"] != "completed" or counts["completed"] != lines or counts["failed"]:
        raise RuntimeError(f"batch {batch_id}: {state['status']}, {counts}, errors {state.get('errors')}")
    return elapsed


async def bulk_seconds(url: str, bodies: list[bytes], clients: int) -> float:
    """Seconds from the first send to the last answer of `bodies`, each sent once by one of
    `clients` closed-loop clients."""
    sessions = new_clients(min(clients, len(bodies)))
    load, queue = Load(), iter(bodies)
    headers = {"content-type": "application/json"}

    async def worker(session) -> None:
        for body in queue:  # shared: each body goes to whichever client is free first
            await post(session, url, body, headers, load)

    try:
        start = time.perf_counter()
        await asyncio.gather(*(worker(s) for s in sessions))
        elapsed = time.perf_counter() - start
    finally:
        await close_clients(sessions)
    if load.failed:
        raise RuntimeError(f"bulk: {load.failed} requests failed: {load.errors} {load.transport_errors}")
    return elapsed


def warm_server(api: httpx.Client, b64: list[str], per_request: int) -> None:
    """One bulk request (the label set cached, the batch shapes warm) and a 1-line job, untimed."""
    r = api.post("/v1/classify/bulk", content=bulk_bodies(b64[:per_request], per_request)[0],
                 headers={"content-type": "application/json"})
    results = r.json().get("results", []) if r.status_code == 200 else []
    if len(results) != min(len(b64), per_request) or any(len(x.get("labels", ())) != TOP_K for x in results):
        raise RuntimeError(f"bulk warm-up: {r.status_code} {r.text[:300]}")
    job_seconds(api, upload(api, job_file(b64[:1], 1)), 1)


# -- Ray ---------------------------------------------------------------------------------------------------
def ray_phase(args, store: Path, folder: Path, files: list[str], tmp: Path) -> dict:
    """Whole-run seconds of `run_ray` on all files and on the first batch, per round, plus the
    start-up; {"skipped": why} when Ray is not to be measured."""
    if args.no_ray:
        return {"skipped": "--no-ray"}
    try:
        import ray

        from limoe.bulk.classify_ray import run_ray
    except (ImportError, ClassifyError) as e:
        return {"skipped": f"Ray is not installed ({e}); pip install -e '.[ray]'"}
    options = dict(model=args.model, store=store, threads=args.threads, top_k=TOP_K, batch_size=args.batch_size,
                   workers=args.workers, progress=False, concurrency=args.ray_concurrency)
    small = files[:args.batch_size]

    def seconds(inputs: list[str], n: int, name: str) -> float:
        out = tmp / f"ray-{name}.jsonl"  # a folder of JSON-lines files
        start = time.perf_counter()
        summary = run_ray(inputs, out, LABELS10, **options)
        elapsed = time.perf_counter() - start
        shutil.rmtree(out, ignore_errors=True)
        if summary.images != n or summary.errors:
            raise RuntimeError(f"ray: {summary}, expected {n} images and no errors")
        return elapsed

    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    result = {"startup": time.perf_counter() - start, "full": [], "small": []}
    try:
        result["first"] = seconds(small, len(small), "first")  # untimed: Ray's workers come up
        for r in range(args.rounds):
            result["small"].append(seconds(small, len(small), f"small{r}"))
            result["full"].append(seconds([str(folder)], len(files), f"full{r}"))
            log(f"ray round {r + 1}/{args.rounds}: {len(files)} images in {result['full'][-1]:.2f} s, "
                f"{len(small)} in {result['small'][-1]:.2f} s")
    finally:
        ray.shutdown()
    return result


def steady(n: int, b: int, full: list[float], small: list[float]) -> float | None:
    """The median over rounds of (n - b) / (t_n - t_b); None where no round allows one."""
    rates = [(n - b) / (f - s) for f, s in zip(full, small) if n > b and f > s]
    return statistics.median(rates) if rates else None


# -- the run -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = bench_parser(__doc__, load=False)
    p.add_argument("--images", type=int, default=1024, help="images classified by each path, each round")
    p.add_argument("--size", type=int, default=64, help="image width and height in pixels")
    p.add_argument("--rounds", type=int, default=3, help="rounds of every path")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per encoder pass of classify, its Ray path and the raw encoder (classify's default)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="decoding threads of classify and of each Ray actor (classify's default, min(4, CPUs))")
    p.add_argument("--passes", type=int, default=2, help="encoder passes at once of classify (its default, 2)")
    p.add_argument("--max-batch", type=int, default=32, help="the server's LIMOE_MAX_BATCH_SIZE")
    p.add_argument("--bulk-clients", type=int, default=2, help="concurrent clients of the bulk endpoint")
    p.add_argument("--job-images", type=int, default=1, help="images per request (line) of the batch job")
    p.add_argument("--jobs-max-batch", type=int, default=None,
                   help="LIMOE_JOBS_MAX_BATCH, job images per forward pass (default: the server's)")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray path")
    p.add_argument("--ray-concurrency", type=int, default=1, help="classifier actors of the Ray path (default 1)")
    args = p.parse_args(argv)
    if min(args.images, args.rounds, args.batch_size, args.job_images, args.passes) < 1:
        p.error("--images, --rounds, --batch-size, --job-images and --passes must be at least 1")

    from service.settings import Settings

    defaults = {k: f.default for k, f in Settings.model_fields.items()}
    if args.job_images > defaults["max_images_per_request"]:
        p.error(f"--job-images: a line is one /v1/classify request, at most {defaults['max_images_per_request']} "
                "images (LIMOE_MAX_IMAGES_PER_REQUEST)")
    store = ensure_store(args.store, args.model, args.cache, args.fresh)
    before = machine_load()
    tmp = Path(tempfile.mkdtemp(prefix="limoe-bench-bulk-"))
    try:
        inputs = Inputs.write(args, tmp / "images", defaults["max_bulk_images"])
        rates, notes = measure(args, store, defaults, inputs, tmp)
        report(args, defaults, before, inputs, rates, notes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Inputs:
    """The same images for every path: files in a folder, and the server's request bodies."""

    folder: Path
    files: list[str]
    b64: list[str]  # the files' bytes, base64
    bodies: list[bytes]  # bulk requests, up to LIMOE_MAX_BULK_IMAGES images each
    job: bytes  # the batch job's input file
    lines: int  # requests in it

    @classmethod
    def write(cls, args, folder: Path, per_bulk: int) -> Inputs:
        pngs = png_images(args.images, args.size)
        folder.mkdir(parents=True)
        files = [str(folder / f"{i:06d}.png") for i in range(len(pngs))]
        for path, png in zip(files, pngs):
            Path(path).write_bytes(png)
        b64 = [base64.b64encode(png).decode() for png in pngs]
        job = job_file(b64, args.job_images)
        return cls(folder, files, b64, bulk_bodies(b64, per_bulk), job, len(job.splitlines()))


def server_env(args, store: Path, defaults: dict, inputs: Inputs, jobs_dir: Path) -> dict:
    """LIMOE_* settings of the one server: its defaults, but for what the options set, and limits
    raised where the bodies need it (a large --size); the job and the bulk endpoint share them."""
    env = {"model": args.model, "model_store": store, "threads": args.threads, "max_batch_size": args.max_batch,
           "max_batch_wait_ms": args.wait_ms, "jobs_dir": jobs_dir,
           "jobs_max_file_bytes": max(defaults["jobs_max_file_bytes"], 2 * len(inputs.job))}
    if args.jobs_max_batch:
        env["jobs_max_batch"] = args.jobs_max_batch
    biggest = max(map(len, inputs.bodies)) + 2 ** 16
    if biggest > defaults["max_body_bytes"]:
        env["max_body_bytes"] = biggest
        env["max_inflight_bytes"] = max(defaults["max_inflight_bytes"], biggest * args.bulk_clients)
    return env


def measure(args, store: Path, defaults: dict, inputs: Inputs, tmp: Path) -> tuple[dict[str, list[float]], dict]:
    """images/s per round of every path (ROWS), and what the report says about them."""
    n, batch = args.images, args.batch_size
    rates: dict[str, list[float]] = {name: [] for name in ROWS}
    server = Server("bulk", **server_env(args, store, defaults, inputs, tmp / "jobs")).start()  # loads meanwhile
    try:
        entry = load_entry(args.model, store=store)
        zs = ZeroShot(open_encoders(entry, threads=threads_per_pass(args.passes, args.threads)), LABELS10)
        one_pass = open_encoders(entry, threads=args.threads)  # the raw encoder one pass at a time
        pixels = np.stack([decode(f, zs.preprocess) for f in inputs.files])  # (N, 3, R, R)
        for i in sorted({0, (n - 1) // batch * batch}):  # every batch shape once, untimed
            zs.encoders.encode_images(pixels[i:i + batch])
            one_pass.encode_images(pixels[i:i + batch])
        warm = JsonlWriter(tmp / "warm.jsonl", append=False)  # the pipeline once (its imports), untimed
        classify_items(iter_items(inputs.files[:batch]), zs, warm.write, TOP_K, batch, args.workers, progress=False,
                       passes=args.passes)
        warm.close()
        server.wait_ready()
        with httpx.Client(base_url=server.base, timeout=600, trust_env=False) as api:
            warm_server(api, inputs.b64, defaults["max_bulk_images"])
            start = time.perf_counter()
            file_id = upload(api, inputs.job)
            upload_s = time.perf_counter() - start
            bulk_url = server.base + "/v1/classify/bulk"
            for r in range(args.rounds):
                groups = [("raw encoder", "raw, N passes", "classify"), ("batch job", "bulk endpoint")]
                for name in (name for group in groups for name in (group[::-1] if r % 2 else group)):
                    if name == "raw encoder":
                        rates[name].append(raw_rate(one_pass, pixels, batch))
                    elif name == "raw, N passes":
                        rates[name].append(raw_rate(zs.encoders, pixels, batch, args.passes))
                    elif name == "classify":
                        rates[name].append(classify_rate(zs, inputs.folder, tmp / "classify.jsonl", n, batch,
                                                         args.workers, args.passes))
                    elif name == "batch job":
                        rates[name].append(n / job_seconds(api, file_id, inputs.lines))
                    else:
                        rates[name].append(n / run_async(bulk_seconds(bulk_url, inputs.bodies, args.bulk_clients)))
                log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items() if v)
                    + " images/s")
    finally:
        server.stop()
    ray = ray_phase(args, store, inputs.folder, inputs.files, tmp)
    if "full" in ray:
        rates["classify --ray"] = [n / s for s in ray["full"]]
    return rates, {"ray": ray, "upload_s": upload_s, "providers": zs.encoders.providers}


def report(args, defaults: dict, before: str, inputs: Inputs, rates: dict[str, list[float]], notes: dict) -> None:
    n, batch, ray = args.images, args.batch_size, notes["ray"]
    clients = min(args.bulk_clients, len(inputs.bodies))
    what = {
        "raw encoder": f"encode_images alone on pre-decoded pixels, batches of {batch}, one at a time, "
                       f"ONNX Runtime threads {threads_label(args.threads)}",
        "raw, N passes": f"the same, {args.passes} batches at once on the classifier's encoders "
                         f"({threads_per_pass(args.passes, args.threads)} thread(s) each)",
        "classify": f"classify_items on the folder, model loaded: decode ({args.workers} threads), encode "
                    f"(batches of {batch}, {args.passes} at once), score, write JSONL",
        "classify --ray": f"whole run_ray runs, {args.ray_concurrency} actor(s), Ray already started",
        "batch job": f"{inputs.lines} lines of {args.job_images} image(s), create -> completed "
                     f"(upload of {len(inputs.job) / 2 ** 20:.1f} MiB untimed: {notes['upload_s']:.2f} s)",
        "bulk endpoint": f"{len(inputs.bodies)} request(s) of up to {defaults['max_bulk_images']} images, "
                        f"{clients} concurrent client(s)",
    }
    print(f"{os.cpu_count()} CPUs, {before}")
    print(f"model {args.model} ({', '.join(notes['providers'])}), {n} PNG images {args.size}x{args.size}, "
          f"{len(LABELS10)} labels, top_k {TOP_K}, {args.rounds} round(s); ONNX Runtime threads "
          f"{threads_label(args.threads)}; server: LIMOE_MAX_BATCH_SIZE {args.max_batch}, LIMOE_JOBS_MAX_BATCH "
          f"{args.jobs_max_batch or defaults['jobs_max_batch']}, LIMOE_JOBS_CONCURRENCY "
          f"{defaults['jobs_concurrency']}, max wait {args.wait_ms:g} ms")
    for name in ROWS:
        if rates[name]:
            print(f"{name:<14}: {statistics.median(rates[name]):10.1f} images/s "
                  f"(rounds: {listing(rates[name], '.1f')}); {what[name]}")
        else:
            print(f"{name:<14}: {'-':>10} images/s; skipped: {ray['skipped']}")
    if "full" in ray:
        b = len(inputs.files[:batch])
        rate = steady(n, b, ray["full"], ray["small"])
        print(f"ray: start-up (ray.init) {ray['startup']:.2f} s, first run of {b} images {ray['first']:.2f} s, "
              f"later runs of {b} images {listing(ray['small'], '.2f')} s; steady state "
              + (f"{rate:.1f} images/s" if rate else "n/a (give more images than --batch-size)"))
    ratios = {"classify/raw": [c / r for c, r in zip(rates["classify"], rates["raw encoder"])],
              "classify/raw N passes": [c / r for c, r in zip(rates["classify"], rates["raw, N passes"])],
              "batch job/bulk endpoint": [j / b for j, b in zip(rates["batch job"], rates["bulk endpoint"])]}
    print("per-round ratios: " + "; ".join(f"{k} {listing(v, '.3f')}" for k, v in ratios.items()))
    print(f"ratio classify/raw, {args.passes} passes at once, images/s: "
          f"{statistics.median(ratios['classify/raw N passes']):.3f} (for comparison)")
    print(f"ratio classify/raw images/s: {statistics.median(ratios['classify/raw']):.3f} (target >= 0.9)")
    print(f"ratio batch job/bulk endpoint images/s: {statistics.median(ratios['batch job/bulk endpoint']):.3f} "
          "(target >= 0.8)")


if __name__ == "__main__":
    main()
