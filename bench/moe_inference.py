"""Dropless MoE inference against capacity routing and a dense model, as exported ONNX graphs,
measured side by side in one run on ONNX Runtime (CPU).

    python bench/moe_inference.py [--preset small] [--checkpoint CKPT] [--rounds 5] [--passes 2] [--threads 0]

Graphs of the same image encoder (a freshly initialised `small` model unless --checkpoint):

    dropless        every token's K choices computed, per expert NonZero/Gather/MLP/ScatterND
    dropless-fused  the same as ONNX Runtime's com.microsoft.MoE contrib op (--moe-op fused)
    capacity        capacity factor 1.0, one routing group per example (drops what overflows)
    dense           the dense model of equal active FLOPs (no MoE layers)

each in fp32 and static int8 (calibrated, batch-independent; see limoe.export.quantize), at batch 1
and 32, run as the server runs them: --passes forward passes at once (LIMOE_ENCODER_PASSES,
default 2), each on --threads intra-op threads (0: the cores shared out among the passes;
`--passes 1 --threads 0` is one pass on every core, ONNX Runtime's default). Rounds interleave the graphs (A B C D A B C D ...) so machine noise hits all alike; each
figure is the median over rounds. Also printed: how much the capacity graph drops, and the
largest difference between a batch of 5 and each item alone for every graph. The last line is
the ratio dropless/capacity images/s at batch 32, fp32 (target >= 1.0).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from limoe.export.exporter import ImageEncoder, export_onnx
from limoe.export.quantize import quantize
from limoe.model.checkpoint import load_checkpoint
from limoe.model.config import dense_counterpart, get_config
from limoe.model.transformer import LIMoE
from limoe.runtime.encoders import batch_independence, threads_per_pass
from limoe.runtime.onnx_encoder import OnnxGraph

from _timing import images_per_second


def build_graphs(model: LIMoE, work: Path, calibration: np.ndarray) -> dict[str, Path]:
    """Export every variant's image encoder in fp32 and int8; returns {"<variant> <precision>": path}."""
    variants = {"dropless": model.with_config(inference_routing="dropless"),
                "dropless-fused": model.with_config(inference_routing="dropless"),
                "capacity": model.with_config(inference_routing="capacity", eval_capacity_factor=1.0),
                "dense": LIMoE(dense_counterpart(model.cfg)).eval()}
    variants["dropless-fused"].set_moe_op("fused")
    example = torch.from_numpy(calibration[:2])
    graphs = {}
    for name, m in variants.items():
        fp32, int8 = work / f"{name}.onnx", work / f"{name}.int8.onnx"
        export_onnx(ImageEncoder(m), example, "images", fp32)
        quantize(fp32, int8, "static", [{"images": calibration[i:i + 32]} for i in range(0, len(calibration), 32)])
        graphs[f"{name} fp32"], graphs[f"{name} int8"] = fp32, int8
    return graphs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--checkpoint", help="a trained checkpoint (default: a freshly initialised --preset model)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--passes", type=int, default=2, help="forward passes at once (the server's default, 2)")
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads per pass (0: the cores shared out among the passes, as the server)")
    args = p.parse_args(argv)
    threads = threads_per_pass(args.passes, args.threads)

    torch.manual_seed(0)
    model = load_checkpoint(args.checkpoint)[0] if args.checkpoint else LIMoE(get_config(args.preset)).eval()
    cfg = model.cfg
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((64, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    work = Path(tempfile.mkdtemp(prefix="limoe-moe-inference-"))
    graphs = build_graphs(model, work, calibration)

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    sessions = {k: ort.InferenceSession(str(v), options, providers=["CPUExecutionProvider"]) for k, v in graphs.items()}
    probe = rng.standard_normal((32, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    dropped = sessions["capacity fp32"].run(None, {"images": probe})[2]
    print(f"preset {args.preset if not args.checkpoint else args.checkpoint}: {cfg.num_experts} experts, "
          f"top-{cfg.top_k}, MoE blocks {list(cfg.moe_layer_ids)}, {cfg.num_patches} patches; ONNX Runtime "
          f"{ort.__version__}, {args.passes} pass(es) at once of {threads or 'default'} thread(s) each, median of "
          f"{args.rounds} interleaved rounds")
    print(f"capacity 1.0 drops {dropped.mean():.1%} of token choices on these inputs; dropless drops none")
    print("batch of 5 vs each alone, max |diff| over all outputs: " +
          ", ".join(f"{k} {batch_independence(OnnxGraph(graphs[k]), probe):.1e}" for k in graphs))

    rates: dict[tuple[str, int], float] = {}
    for batch in (1, 32):
        x = probe[:batch]
        iters = 4 if batch == 32 else 40
        for s in sessions.values():
            s.run(None, {"images": x})
        samples: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(args.rounds):
            for k, s in sessions.items():
                samples[k].append(images_per_second(s, x, iters, args.passes))
        for k, v in samples.items():
            rates[(k, batch)] = statistics.median(v)

    print(f"\n{'graph':22s} {'batch 1 img/s':>14s} {'batch 32 img/s':>15s}")
    for k in sessions:
        print(f"{k:22s} {rates[(k, 1)]:14.1f} {rates[(k, 32)]:15.1f}")
    print()
    for precision in ("fp32", "int8"):
        for batch in (1, 32):
            r = {v: rates[(f"{v} {precision}", batch)] for v in ("dropless", "dropless-fused", "capacity", "dense")}
            print(f"{precision} batch {batch:2d}: dropless/capacity {r['dropless'] / r['capacity']:.3f}, "
                  f"dropless/dense {r['dropless'] / r['dense']:.3f}, fused/standard {r['dropless-fused'] / r['dropless']:.3f}")
    print(f"ratio dropless/dense images/s at batch 32: {rates[('dropless fp32', 32)] / rates[('dense fp32', 32)]:.3f}")
    print(f"ratio dropless/capacity images/s at batch 32: "
          f"{rates[('dropless fp32', 32)] / rates[('capacity fp32', 32)]:.3f}")


if __name__ == "__main__":
    main()
