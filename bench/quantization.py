"""int8 candidates against fp32 on the held-out sets, side by side in one run.

    python bench/quantization.py --checkpoint CKPT [--cache DATA] [--calibration-data MIX] [--limit 1000]

Exports the checkpoint's dropless image and text encoders (fp32), quantises both with every
scheme of limoe.export.quantize (static QDQ calibrated on --calibration-count items of the training
mix, weight-only MatMulNBits, and dynamic for reference), and reports per scheme, on the
standard held-out sets (limoe.eval.sets):

    cosine     image embedding cosine to fp32 (mean and min over every evaluation image)
    agree      top-1 agreement with fp32's zero-shot prediction (all the set's classes)
    top-1      zero-shot top-1 accuracy, and 10-way top-1, mean over the sets
    batch dep  largest difference between a batch of 5 and each item alone (0: batch-independent)
    img/s      image encoder images/s at batch 1 and 32 (interleaved rounds, medians)

and writes the table to --out (JSON). The last line names the fastest batch-independent scheme
(images/s at batch 1 plus batch 32) whose mean top-1 and 10-way accuracy stay within one point
of fp32's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from limoe.eval.evaluate import encode_batched, n_way_accuracy, topk_accuracy
from limoe.eval.sets import default_eval_sets
from limoe.export.exporter import ImageEncoder, TextEncoder, calibration_inputs, example_inputs, export_onnx
from limoe.export.quantize import SCHEMES, batches, quantize
from limoe.export.torch_encoders import model_encoders
from limoe.model.checkpoint import load_checkpoint, read_tokenizer
from limoe.runtime.encoders import batch_independence
from limoe.runtime.onnx_encoder import OnnxGraph
from limoe.runtime.templates import DEFAULT_TEMPLATES
from limoe.runtime.zeroshot import build_zero_shot_classifier

from _timing import images_per_second

CANDIDATES = ("fp32", *SCHEMES)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--cache", help="data cache with the prepared sources")
    p.add_argument("--calibration-data", help="training mix for static calibration (default: the checkpoint's)")
    p.add_argument("--calibration-count", type=int, default=256)
    p.add_argument("--limit", type=int, default=1000, help="images per evaluation set at most")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="docs/results/quantization.json")
    args = p.parse_args(argv)

    model, extra = load_checkpoint(args.checkpoint)
    tokenizer = read_tokenizer(args.checkpoint)
    cfg = model.cfg
    mix = args.calibration_data or extra.get("data")
    work = Path(tempfile.mkdtemp(prefix="limoe-quant-"))
    images, tokens = example_inputs(model)
    export_onnx(ImageEncoder(model), images, "images", work / "image.fp32.onnx")
    export_onnx(TextEncoder(model), tokens, "tokens", work / "text.fp32.onnx")
    cal_images, cal_tokens, cal_record = calibration_inputs(cfg, tokenizer, mix, args.cache, args.calibration_count)
    paths = {"fp32": (work / "image.fp32.onnx", work / "text.fp32.onnx")}
    for scheme in SCHEMES:
        pair = (work / f"image.{scheme}.onnx", work / f"text.{scheme}.onnx")
        quantize(paths["fp32"][0], pair[0], scheme, [{"images": b} for b in batches(cal_images, 32)])
        quantize(paths["fp32"][1], pair[1], scheme, [{"tokens": b} for b in batches(cal_tokens, 32)])
        paths[scheme] = pair
    graphs = {k: (OnnxGraph(i), OnnxGraph(t)) for k, (i, t) in paths.items()}

    sets = default_eval_sets(model_encoders(model, tokenizer), cache=args.cache, limit=args.limit)
    report: dict[str, dict] = {k: {"sets": {}} for k in CANDIDATES}
    reference: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for s in sets:
        classes = sorted(set(s.labels))
        targets = np.array([classes.index(label) for label in s.labels])
        for k in CANDIDATES:
            img, txt = graphs[k]
            emb = encode_batched(img, s.pixels).embeddings
            w = build_zero_shot_classifier(lambda ids: encode_batched(txt, ids).embeddings, tokenizer, classes,
                                           DEFAULT_TEMPLATES)
            scores = emb @ w
            if k == "fp32":
                reference[s.name] = (emb, scores.argmax(1))
            ref_emb, ref_top = reference[s.name]
            cos = (emb * ref_emb).sum(-1)
            report[k]["sets"][s.name] = {**topk_accuracy(scores, targets, ks=(1,)),
                                         "top1_of_10": n_way_accuracy(scores, targets),
                                         "cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
                                         "top1_agreement": float((scores.argmax(1) == ref_top).mean()),
                                         "images": len(targets)}

    rng = np.random.default_rng(0)
    x32 = np.concatenate([s.pixels[:8] for s in sets])[:32]
    if len(x32) < 32:
        x32 = rng.standard_normal((32, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    speed: dict[tuple[str, int], list[float]] = {(k, b): [] for k in CANDIDATES for b in (1, 32)}
    for batch, iters in ((1, 40), (32, 4)):
        for k in CANDIDATES:
            graphs[k][0](x32[:batch])
        for _ in range(args.rounds):
            for k in CANDIDATES:
                speed[(k, batch)].append(images_per_second(graphs[k][0].session, x32[:batch], iters))

    for k in CANDIDATES:
        sets_ = report[k]["sets"].values()
        report[k].update({
            "cosine_mean": float(np.mean([r["cosine_mean"] for r in sets_])),
            "cosine_min": float(min(r["cosine_min"] for r in sets_)),
            "top1_agreement": float(np.mean([r["top1_agreement"] for r in sets_])),
            "mean_top1": float(np.mean([r["top1"] for r in sets_])),
            "mean_10way": float(np.mean([r["top1_of_10"] for r in sets_])),
            "batch_dependence": max(batch_independence(graphs[k][0], x32),
                                    batch_independence(graphs[k][1], tokenizer.encode(sets[0].labels[:8]))),
            "images_per_s_batch1": statistics.median(speed[(k, 1)]),
            "images_per_s_batch32": statistics.median(speed[(k, 32)]),
        })

    print(f"checkpoint {args.checkpoint}; calibration: {cal_record}; {len(sets)} held-out sets, "
          f"{sum(len(s.labels) for s in sets)} images; ONNX Runtime {ort.__version__}, median of {args.rounds} rounds")
    print(f"{'scheme':12s} {'cos mean':>9s} {'cos min':>8s} {'agree':>7s} {'top-1':>7s} {'10-way':>7s} "
          f"{'batch dep':>10s} {'b1 img/s':>9s} {'b32 img/s':>10s}")
    for k in CANDIDATES:
        r = report[k]
        print(f"{k:12s} {r['cosine_mean']:9.5f} {r['cosine_min']:8.4f} {r['top1_agreement']:7.2%} {r['mean_top1']:7.2%} "
              f"{r['mean_10way']:7.2%} {r['batch_dependence']:10.1e} {r['images_per_s_batch1']:9.1f} "
              f"{r['images_per_s_batch32']:10.1f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "calibration": cal_record,
                               "onnxruntime": ort.__version__, "schemes": report}, indent=2) + "\n")
    ref = report["fp32"]
    fine = [k for k in SCHEMES if report[k]["batch_dependence"] <= 1e-5
            and ref["mean_top1"] - report[k]["mean_top1"] <= 0.01 and ref["mean_10way"] - report[k]["mean_10way"] <= 0.01]
    best = max(fine, key=lambda k: report[k]["images_per_s_batch32"] + report[k]["images_per_s_batch1"], default=None)
    print(f"wrote {out}")
    print(f"fastest batch-independent scheme within 1 point of fp32 accuracy: {best}")


if __name__ == "__main__":
    main()
