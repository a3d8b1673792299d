"""Labels at scale: a /v1/classify request with 1000 candidate labels against one with 2, on a warm
label cache, measured side by side; and a cold 1000-label request against encoding its prompts
in process at the text encoder's best batch size.

    python bench/label_scaling.py [--labels 1000] [--rounds 5] [--requests 20] [--cold-rounds 2]
                                  [--max-batch 32] [--threads 0] [--store DIR --model NAME | --fresh]

One `limoe serve` (LIMOE_MAX_LABELS = --labels, LIMOE_REQUEST_TIMEOUT_S = 600) serves the shipped
default model (`--store` / `--model` for another). Every request carries the same 64x64 PNG and
asks for `top_k` 5.

Warm: both label sets are sent once first (so they are cached), then each of --rounds rounds sends
--requests requests of 2 labels and --requests of C labels from one keep-alive client, in
alternating order (2 then C, C then 2, ...). Each figure is the median latency over all rounds.

Cold: each of --cold-rounds rounds sends a C-label set the server has never seen (the round's
number is in every label), so all its C x templates prompts are encoded. Beside it, in this
process, the same prompts are tokenised and encoded by an ONNX Runtime session of the same
graphs, one pass at a time on --threads intra-op threads (0: ONNX Runtime's default, every
core), in batches of the best batch size up to LIMOE_MAX_BATCH_SIZE (found first on a sample of
them), while the server idles. Medians over rounds; target cold/raw <= 1. The server runs
LIMOE_ENCODER_PASSES (2) passes at once, each on its share of the cores; for comparison, the same
prompts are also encoded that way in process (2 one-thread passes at once), once per round.

The last line is the warm ratio C/2 labels (target <= 1.2).
"""

from __future__ import annotations

import base64
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx

from limoe.runtime.encoders import threads_per_pass
from limoe.runtime.zeroshot import fill_templates

from _common import bench_parser, ensure_store, listing, load_encoders, log, machine_load, threads_label
from _payloads import png_images
from _server import Server
from _timing import raw_seconds

TOP_K = 5


def body(image_b64: str, labels: list[str]) -> bytes:
    return json.dumps({"images": [image_b64], "labels": labels, "top_k": TOP_K}).encode()


def label_set(n: int, tag: str) -> list[str]:
    """n distinct labels of a few words, like class names; `tag` makes a set unseen before."""
    return [f"object {tag} number {i}" for i in range(n)]


def timed_post(client: httpx.Client, url: str, content: bytes) -> float:
    """Seconds from send to the whole answer; the answer must be 200 with TOP_K labels."""
    started = time.perf_counter()
    r = client.post(url, content=content, headers={"content-type": "application/json"})
    elapsed = time.perf_counter() - started
    if r.status_code != 200:
        raise RuntimeError(f"{url}: {r.status_code} {r.text[:300]}")
    answered = r.json()["results"][0]["labels"]
    if len(answered) != min(TOP_K, len(json.loads(content)["labels"])):
        raise RuntimeError(f"{url}: expected top {TOP_K} labels, got {len(answered)}")
    return elapsed


def best_batch(enc, prompts: list[str], top: int) -> tuple[int, dict[int, float]]:
    """The fastest batch size (prompts/s) among powers of two up to `top` and `top` itself,
    each timed on the same sample of prompts."""
    sizes = sorted({2 ** k for k in range(top.bit_length()) if 2 ** k <= top} | {top})
    sample = prompts[:max(4 * top, 256)]
    rates = {b: len(sample) / raw_seconds(enc, sample, b) for b in sizes}
    return max(rates, key=rates.get), rates


def main(argv: list[str] | None = None) -> None:
    p = bench_parser(__doc__, load=False)
    p.add_argument("--labels", type=int, default=1000, help="labels in the large set (C)")
    p.add_argument("--rounds", type=int, default=5, help="warm rounds (2 and C labels alternate)")
    p.add_argument("--requests", type=int, default=20, help="requests per label count per warm round")
    p.add_argument("--cold-rounds", type=int, default=2, help="cold C-label requests (each beside a raw encode)")
    p.add_argument("--max-batch", type=int, default=32, help="LIMOE_MAX_BATCH_SIZE")
    args = p.parse_args(argv)

    store = ensure_store(args.store, args.model, args.cache, args.fresh)
    log(f"{args.model} from {store}; {machine_load()}")
    image_b64 = base64.b64encode(png_images(1)[0]).decode()
    small, large = label_set(2, "warm"), label_set(args.labels, "warm")
    bodies = {2: body(image_b64, small), args.labels: body(image_b64, large)}

    # A long deadline: on a busy machine a cold set may take longer than the default 30 s, and
    # it is what this measures.
    server = Server("label-scaling", model_store=store, model=args.model, threads=args.threads,
                    max_labels=max(args.labels, 2), max_batch_size=args.max_batch,
                    max_batch_wait_ms=args.wait_ms, request_timeout_s=600)
    with server, httpx.Client(trust_env=False, timeout=600) as client:
        server.wait_ready()
        url = server.base + "/v1/classify"
        templates = client.get(server.base + "/v1/models").json()["models"][0]["manifest"]["templates"]
        enc = load_encoders(store, args.model, args.threads)
        two = load_encoders(store, args.model, threads_per_pass(2, args.threads))  # the server's way, in process

        # -- cold: a label set never seen, against its prompts encoded in process -----------------------
        batch, rates = best_batch(enc, fill_templates(label_set(args.labels, "sample"), tuple(templates)),
                                  args.max_batch)
        cold, raw, raw2 = [], [], []
        for r in range(args.cold_rounds):
            labels = label_set(args.labels, f"cold{r}")
            cold.append(timed_post(client, url, body(image_b64, labels)))
            raw.append(raw_seconds(enc, fill_templates(labels, tuple(templates)), batch))
            raw2.append(raw_seconds(two, fill_templates(labels, tuple(templates)), batch, passes=2))
            log(f"cold round {r + 1}: server {cold[-1]:.2f} s, raw {raw[-1]:.2f} s, raw 2 passes {raw2[-1]:.2f} s")

        # -- warm: the same two label sets, alternating ---------------------------------------------------
        for n in bodies:  # cache both sets (and warm the connection)
            timed_post(client, url, bodies[n])
        latencies: dict[int, list[float]] = {n: [] for n in bodies}
        for r in range(args.rounds):
            order = list(bodies) if r % 2 == 0 else list(bodies)[::-1]
            for n in order:
                latencies[n] += [timed_post(client, url, bodies[n]) for _ in range(args.requests)]
            log(f"warm round {r + 1}: " + ", ".join(
                f"{n} labels {statistics.median(latencies[n][-args.requests:]) * 1e3:.1f} ms" for n in order))

    prompts = args.labels * len(templates)
    median = {n: statistics.median(v) for n, v in latencies.items()}
    print(f"model {args.model}, {len(templates)} templates, LIMOE_MAX_BATCH_SIZE {args.max_batch}, "
          f"ONNX Runtime threads {threads_label(args.threads)}; top_k {TOP_K}, one 64x64 PNG per request")
    print("raw text encoder, prompts/s by batch size: "
          + ", ".join(f"{b}: {rate:.0f}" for b, rate in rates.items()) + f" (best {batch})")
    print(f"cold {args.labels} labels ({prompts} prompts): server {statistics.median(cold):.2f} s, "
          f"raw at batch {batch} {statistics.median(raw):.2f} s (rounds: {listing(cold, '.2f')} / "
          f"{listing(raw, '.2f')}); raw, 2 one-thread passes at once {statistics.median(raw2):.2f} s")
    print(f"ratio cold/raw: {statistics.median(cold) / statistics.median(raw):.3f} (target <= 1)")
    for n in bodies:
        print(f"warm {n:>4} labels: median {median[n] * 1e3:.2f} ms over {len(latencies[n])} requests "
              f"({args.rounds} rounds)")
    print(f"ratio {args.labels}/2 labels warm: {median[args.labels] / median[2]:.3f}")


if __name__ == "__main__":
    main()
