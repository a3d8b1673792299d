"""A B/32-size imported CLIP served over HTTP against open_clip in torch on the same cores: images/s at
batch 1 and 32, fp32 and int8, the int8 entry's top-1 agreement with fp32, and the server's memory.

    python bench/clip_serving.py --openclip-python /path/to/venv/bin/python [--arch ViT-B-32]
        [--seconds 20] [--threads 2] [--work /tmp/clip-serving] [--json docs/results/clip_serving.json]

open_clip runs in its own environment (see `bench/openclip_parity.py`: `pip install torch==2.14.1
torchvision==0.29.1 open-clip-torch==3.3.0` in a venv), on random-initialised weights
(pretrained=None, every weight perturbed; nothing is downloaded). That interpreter saves the
checkpoint and times `model.encode_image` under `torch.inference_mode()` with `--threads` threads on
preprocessed 224 px tensors (no decoding: the server's numbers include it, open_clip's do not), at
batch 1 and 32, for --seconds each. This process imports the checkpoint (`limoe import open-clip`,
fp32 and static int8 graphs, calibrated on synthetic images), then serves it with `limoe serve` at
its default limits and measures, for each precision:
  - batch 1: one client sending one 224 px JPEG per /v1/classify request, back to back;
  - batch 32: 32 clients doing the same at once, so that the dynamic batcher forms batches of up to
    32 (LIMOE_MAX_BATCH_SIZE, the default);
  - fp32 twice: at the defaults (the entry advises one forward pass at a time, on every core) and
    with LIMOE_ENCODER_PASSES=2, the server's default for its own small models (two passes at once,
    the cores shared out: one thread each, so a lone request runs on one core);
  - the server's RSS when ready and its peak (VmHWM) under that load;
  - (int8 only) each image's top-1 label against the fp32 entry's on the same --agreement images
    (varied synthetic scenes: gradients, blobs, noise) and 10 labels.
Random weights are the worst case for agreement: their class scores are nearly tied, so int8
rounding flips more top-1s than it would on trained weights.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from _load import close_clients, closed_loop, new_clients, percentile, run_async
from _server import Server
from openclip_parity import BUILD_MODEL

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["a photo of a cat", "a photo of a dog", "a cup of coffee", "an astronaut", "a rocket", "a red car",
          "a bicycle", "a pizza", "a mountain lake", "a city street at night"]

OPEN_CLIP = r'''
import json, sys, time, numpy as np, torch, open_clip
arch, out, seconds, threads = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
''' + BUILD_MODEL + r'''
rates = {}
with torch.inference_mode():
    for batch in (1, 32):
        x = torch.randn(batch, 3, size, size)
        model.encode_image(x)  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            model.encode_image(x)
            n += batch
        rates[str(batch)] = n / (time.perf_counter() - t0)
print(json.dumps({"versions": f"open_clip {open_clip.__version__}, torch {torch.__version__}", "threads": threads,
                  "images_per_s": rates}))
'''


def scene_jpegs(n: int, size: int = 224, seed: int = 0) -> list[bytes]:
    """n varied JPEGs: a smooth two-colour gradient, a few coloured blobs and some noise each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        a, b = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        t = (xx * rng.uniform(-1, 1) + yy * rng.uniform(-1, 1)) % 1.0
        img = a * t[..., None] + b * (1 - t[..., None])
        for _ in range(rng.integers(1, 5)):
            cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
        img = np.clip(img + rng.normal(0, rng.uniform(2, 30), img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img, "RGB").save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def multipart(image: bytes) -> tuple[bytes, dict]:
    boundary = "clip-bench-7a1f"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="images"; filename="x.jpg"\r\n'
             "Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n"]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="labels"\r\n\r\n{label}\r\n'.encode()
              for label in LABELS]
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), {"content-type": f"multipart/form-data; boundary={boundary}"}


def vm(pid: int, field: str) -> float:
    """VmRSS or VmHWM of a process, MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _load(base: str, bodies, clients: int, seconds: float):
    sessions = new_clients(clients)
    try:
        await closed_loop(sessions, base + "/v1/classify", bodies[:clients], 2.0, 10 ** 6)  # warm the label cache
        return await closed_loop(sessions, base + "/v1/classify", bodies, seconds, 10 ** 6)
    finally:
        await close_clients(sessions)


def top1(base: str, images: list[bytes]) -> list[str]:
    out = []
    with httpx.Client(timeout=60, trust_env=False) as c:
        for i in range(0, len(images), 16):
            files = [("images", (f"{j}.jpg", im, "image/jpeg")) for j, im in enumerate(images[i:i + 16])]
            r = c.post(base + "/v1/classify", files=files, data={"labels": LABELS, "top_k": "1"})
            r.raise_for_status()
            out += [x["labels"][0]["label"] for x in r.json()["results"]]
    return out


def serve(store: Path, name: str, quantized: bool, bodies, agreement: list[bytes], seconds: float,
          threads: int = 0, passes: int | None = None) -> dict:
    """`limoe serve` of the entry at its defaults, or with LIMOE_THREADS / LIMOE_ENCODER_PASSES set."""
    settings = {"model": name, "model_store": str(store), "quantized": str(quantized).lower(),
                "jobs_enabled": "false"}
    if threads:
        settings["threads"] = str(threads)
    if passes:
        settings["encoder_passes"] = str(passes)
    with Server(f"{name} {'int8' if quantized else 'fp32'}", **settings) as server:
        t0 = time.perf_counter()
        server.wait_ready(timeout=600)
        ready_s = time.perf_counter() - t0
        pid = server.proc.pid
        result = {"ready_seconds": round(ready_s, 1), "rss_ready_mb": round(vm(pid, "VmRSS"), 1)}
        for clients in (1, 32):
            load = run_async(_load(server.base, bodies, clients, seconds))
            result[f"batch{clients}"] = {
                "images_per_s": round(load.rate(), 2), "requests": load.ok, "failed": load.failed,
                "p50_ms": round(1e3 * percentile(load.latencies, 50), 1),
                "p99_ms": round(1e3 * percentile(load.latencies, 99), 1)}
        result["rss_peak_mb"] = round(vm(pid, "VmHWM"), 1)
        result["top1"] = top1(server.base, agreement)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--openclip-python", required=True, help="a python where `import open_clip` works")
    p.add_argument("--arch", default="ViT-B-32")
    p.add_argument("--seconds", type=float, default=20.0, help="per measurement")
    p.add_argument("--threads", type=int, default=2, help="torch threads for open_clip; the server's LIMOE_THREADS "
                                                         "stays its default (the cores shared out)")
    p.add_argument("--agreement", type=int, default=200, help="images for the int8-vs-fp32 top-1 agreement")
    p.add_argument("--work", default="/tmp/clip-serving")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    print(f"open_clip {args.arch} in torch ({args.threads} threads), {args.seconds:g} s per batch size ...", flush=True)
    reference = json.loads(subprocess.run(
        [args.openclip_python, "-c", OPEN_CLIP, args.arch, str(work), str(args.seconds), str(args.threads)],
        check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
    print(json.dumps(reference), flush=True)

    from limoe.export.openclip_import import import_openclip

    t0 = time.perf_counter()
    manifest = import_openclip(args.arch, work / "model.bin", "clip-b32", "random weights (benchmark)",
                               store=work / "store", version="1", force=True)
    import_s = time.perf_counter() - t0
    sizes = {f: r.size for f, r in manifest.files.items()}
    print(f"imported in {import_s:.0f} s: {sum(sizes.values()) / 1e6:.0f} MB", flush=True)

    images = scene_jpegs(64)
    bodies = [multipart(im) for im in images]
    agreement = scene_jpegs(args.agreement, seed=1)
    served = {}
    for precision, quantized, passes in (("fp32", False, None), ("fp32, 2 passes x 1 thread", False, 2),
                                         ("int8", True, None)):
        served[precision] = serve(work / "store", "clip-b32", quantized, bodies, agreement, args.seconds, 0, passes)
        print(precision, json.dumps({k: v for k, v in served[precision].items() if k != "top1"}), flush=True)
    same = float(np.mean([a == b for a, b in zip(served["fp32"]["top1"], served["int8"]["top1"])]))
    for r in served.values():
        r.pop("top1")
    ref = reference["images_per_s"]
    ratios = {f"{precision} batch{b}": round(served[precision][f"batch{b}"]["images_per_s"] / ref[str(b)], 2)
              for precision in served for b in (1, 32)}
    results = {"arch": args.arch, "open_clip": reference, "import_seconds": round(import_s, 1), "entry_bytes": sizes,
               "served": served, "served_over_open_clip": ratios, "int8_top1_agreement": same,
               "agreement_images": args.agreement, "labels": len(LABELS), "seconds": args.seconds,
               "command": "python bench/clip_serving.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    print("\n| | batch 1 images/s | batch 32 images/s | vs open_clip (1 / 32) | RSS ready / peak MB |")
    print("|---|---|---|---|---|")
    print(f"| open_clip in torch ({args.threads} threads) | {ref['1']:.2f} | {ref['32']:.2f} | 1.00 / 1.00 | - |")
    for precision, r in served.items():
        print(f"| served {precision} over HTTP | {r['batch1']['images_per_s']:.2f} "
              f"| {r['batch32']['images_per_s']:.2f} "
              f"| {ratios[f'{precision} batch1']:.2f} / {ratios[f'{precision} batch32']:.2f} "
              f"| {r['rss_ready_mb']:.0f} / {r['rss_peak_mb']:.0f} |")
    print(f"\nint8 top-1 = fp32 top-1 on {same:.1%} of {args.agreement} images ({len(LABELS)} labels)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
