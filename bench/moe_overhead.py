"""MoE overhead: forward throughput of the `small` LIMoE versus the dense model of equal
active FLOPs, measured side by side in one run, plus the fp32 matmul roofline.

    python bench/moe_overhead.py [--preset small] [--batch 32] [--rounds 7]

The two models alternate (A B A B ...) so machine noise hits both alike; each figure is the
median over rounds. The last line is the ratio LIMoE / dense images per second (target >= 0.85:
routing, dispatch and combine cost under 15%).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from limoe.model.config import dense_counterpart, get_config
from limoe.model.stats import flops_per_example
from limoe.model.transformer import LIMoE


def images_per_second(model: LIMoE, images: torch.Tensor, iters: int) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(iters):
            model.encode_image(images)
        return iters * images.shape[0] / (time.perf_counter() - start)


def matmul_gflops(m: int, k: int, n: int, iters: int) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    with torch.inference_mode():
        a @ b
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        return iters * 2 * m * k * n / (time.perf_counter() - start) / 1e9


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=5, help="forward passes per timed round")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    cfg = get_config(args.preset)
    models = {"limoe": LIMoE(cfg).eval(), "dense": LIMoE(dense_counterpart(cfg)).eval()}
    flops = {"limoe": flops_per_example(cfg, "image", executed=True),
             "dense": flops_per_example(dense_counterpart(cfg), "image", executed=True)}
    images = torch.randn(args.batch, 3, cfg.image_size, cfg.image_size)
    for m in models.values():  # warm up allocator and kernels
        images_per_second(m, images, 2)

    rates: dict[str, list[float]] = {"limoe": [], "dense": [], "matmul": []}
    T = cfg.num_patches
    for _ in range(args.rounds):
        for name, m in models.items():
            rates[name].append(images_per_second(m, images, args.iters))
        # the MLP's own shape: (B*T, D) @ (D, H)
        rates["matmul"].append(matmul_gflops(args.batch * T, cfg.width, cfg.mlp_dim, 20))
    med = {k: statistics.median(v) for k, v in rates.items()}

    print(f"preset {args.preset}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"median of {args.rounds} interleaved rounds")
    print(f"fp32 matmul ({args.batch * T}x{cfg.width} @ {cfg.width}x{cfg.mlp_dim}): {med['matmul']:.1f} GFLOP/s")
    for name in ("dense", "limoe"):
        gflops = med[name] * flops[name] / 1e9
        print(f"{name:5s}: {med[name]:8.1f} images/s, {flops[name] / 1e6:7.1f} MFLOP/image, "
              f"{gflops:6.1f} GFLOP/s = {gflops / med['matmul']:.2f} of matmul")
    print(f"ratio limoe/dense images/s: {med['limoe'] / med['dense']:.3f}")


if __name__ == "__main__":
    main()
