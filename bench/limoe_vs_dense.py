"""The paper's comparison: LIMoE versus the dense model of equal active FLOPs, on the same data
and training budget (steps x batch), plus LIMoE with the classic importance/load losses and
LIMoE with no auxiliary loss.

    python bench/limoe_vs_dense.py --cache DATA --steps 300 --batch-size 64 [--preset small] [--out runs/compare]

Each variant trains with the same seed, data mix, schedule and step-indexed batches (so all see
exactly the same examples), then `limoe.evaluate` runs on the standard held-out sets. Prints a
Markdown table: zero-shot top-1 and 10-way top-1 per set, the means, and for the MoE variants the dropped-token
rate and the number of image-only / text-only / shared experts. The last line is the ratio of
LIMoE's mean top-1 (and 10-way top-1) to the dense model's. The verdict is whatever the numbers say.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from limoe.config import dense_counterpart, get_config
from limoe.data.dataset import MixDataset
from limoe.evaluate import Encoders, evaluate
from limoe.evaluate_sets import default_eval_sets
from limoe.preprocess import PreprocessConfig
from limoe.tokenizer import Tokenizer
from limoe.train import TrainConfig, train

VARIANTS = {  # name -> (run directory, config changes; None = the dense counterpart)
    "LIMoE (entropy losses)": ("limoe_entropy", {}),
    "dense": ("dense", None),
    "LIMoE (importance + load)": ("limoe_classic", {"aux_loss": "classic", "router_noise_std": 1 / 8}),
    "LIMoE (no aux loss)": ("limoe_none", {"aux_loss": "none"}),
}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--data", default="emoji:2,icons:1,mnist:0.5,scenes:1")
    p.add_argument("--cache", help="prepared data (limoe data prepare)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--limit", type=int, default=1000, help="images per evaluation set")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    args = p.parse_args(argv)

    base = get_config(args.preset)
    data = MixDataset(args.data, split="train", preprocess=PreprocessConfig.from_model_config(base), cache=args.cache,
                      return_captions=True)
    tokenizer = Tokenizer.train((c for item in data.items for c in item["captions"]), base.vocab_size,
                                base.context_length)
    tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                     checkpoint_every=args.steps, num_workers=2)
    rows = {}
    for name in args.variants.split(","):
        slug, changes = VARIANTS[name]
        cfg = dense_counterpart(base) if changes is None else base.replace(**changes)
        out = Path(args.out) / slug
        started = time.perf_counter()
        train(cfg, tc, data, tokenizer, out, progress=False)
        seconds = time.perf_counter() - started
        enc = Encoders.from_checkpoint(out / "model.safetensors")
        results = evaluate(enc, default_eval_sets(enc, cache=args.cache, limit=args.limit))
        (out / "eval.json").write_text(json.dumps(results, indent=2))
        rows[name] = (results, seconds)
        print(f"{name}: trained {args.steps} steps x {args.batch_size} in {seconds:.0f}s", flush=True)

    sets = list(next(iter(rows.values()))[0]["zero_shot"])
    print(f"\n{args.steps} steps x batch {args.batch_size}, preset {args.preset}, data {args.data}\n")
    print("Each cell: top-1 over all the set's classes / 10-way top-1 (true class vs 9 random others).\n")
    print("| variant | " + " | ".join(sets) + " | mean | dropped img/txt | experts img/txt/shared |")
    print("|---" * (len(sets) + 4) + "|")
    means, means10 = {}, {}
    for name, (results, _) in rows.items():
        top1 = [results["zero_shot"][s]["top1"] for s in sets]
        ten = [results["zero_shot"][s]["top1_of_10"] for s in sets]
        means[name], means10[name] = sum(top1) / len(top1), sum(ten) / len(ten)
        routing = results.get("routing")
        if routing:
            layers = routing["layers"]
            drop = "/".join(f"{sum(r['dropped_rate'].get(m, 0) for r in layers) / len(layers):.1%}"
                            for m in ("image", "text"))
            kinds = "/".join(str(sum(r["experts"][k] for r in layers)) for k in ("image", "text", "shared"))
        else:
            drop = kinds = "-"
        print(f"| {name} | " + " | ".join(f"{t:.1%} / {u:.1%}" for t, u in zip(top1, ten))
              + f" | {means[name]:.1%} / {means10[name]:.1%} | {drop} | {kinds} |")
    print("\n" + ", ".join(f"{name} {seconds:.0f} s" for name, (_, seconds) in rows.items()))
    if "LIMoE (entropy losses)" in means and "dense" in means:
        limoe, dense = "LIMoE (entropy losses)", "dense"
        print(f"ratio LIMoE/dense mean zero-shot top-1: {means[limoe] / max(means[dense], 1e-9):.3f}, "
              f"10-way: {means10[limoe] / max(means10[dense], 1e-9):.3f}")


if __name__ == "__main__":
    main()
