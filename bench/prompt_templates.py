"""Which prompt templates should a model serve with? Zero-shot accuracy of a checkpoint on the
validation split of every prepared source (never the test sets), under candidate template sets.

    python bench/prompt_templates.py runs/small/model.safetensors --cache DATA --limit 300 --json docs/results/prompt_templates.json

Prints one line per candidate (mean top-1 and mean 10-way over the sets, then per set) and, last,
`best templates on validation: NAME`; `limoe export --template ...` then writes the winner into
the entry's manifest, where the service and `limoe eval` take it from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from limoe.eval.evaluate import EvalSet, evaluate
from limoe.export.torch_encoders import checkpoint_encoders
from limoe.runtime.templates import DEFAULT_TEMPLATES
from limoe.train.dataset import MixDataset

CANDIDATES = {
    "default (8 prompts)": DEFAULT_TEMPLATES,
    "label only": ("{}",),
    "caption forms": ("{}", "an emoji of {}", "{} emoji", "an icon of {}", "{} icon"),
}
SOURCES = ("emoji_art", "iconsets", "icons", "emoji", "mnist", "scenes")


def validation_sets(enc, cache: str | None, limit: int, seed: int = 0) -> list[EvalSet]:
    sets = []
    for source in SOURCES:
        try:
            ds = MixDataset(source, split="val", preprocess=enc.preprocess, cache=cache)
        except (FileNotFoundError, ValueError):
            continue  # not prepared
        idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[:limit])
        sets.append(EvalSet(f"{source}/val", np.stack([ds[int(i)]["pixels"] for i in idx]),
                            [ds.items[i]["label"] for i in idx], None))
    if not sets:
        raise SystemExit("no prepared validation data; run `limoe data prepare`")
    return sets


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--cache", help="prepared data (default $LIMOE_DATA_CACHE or ~/.cache/limoe/data)")
    p.add_argument("--limit", type=int, default=300, help="images per validation set")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    enc = checkpoint_encoders(args.checkpoint)
    sets = validation_sets(enc, args.cache, args.limit)
    results = {}
    for name, templates in CANDIDATES.items():
        zs = evaluate(enc, sets, templates)["zero_shot"]
        results[name] = {"templates": list(templates),
                         "mean_top1": round(float(np.mean([r["top1"] for r in zs.values()])), 4),
                         "mean_10way": round(float(np.mean([r["top1_of_10"] for r in zs.values()])), 4),
                         "sets": {s: {"top1": round(r["top1"], 4), "top1_of_10": round(r["top1_of_10"], 4)}
                                  for s, r in zs.items()}}
        r = results[name]
        print(f"{name}: mean top-1 {r['mean_top1']:.2%}, mean 10-way {r['mean_10way']:.2%}; "
              + ", ".join(f"{s} {v['top1']:.1%}/{v['top1_of_10']:.1%}" for s, v in r["sets"].items()), flush=True)
    best = max(results, key=lambda n: (results[n]["mean_top1"], results[n]["mean_10way"]))
    out = {"checkpoint": str(args.checkpoint), "limit": args.limit, "candidates": results, "best": best}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"best templates on validation: {best}")
    return out


if __name__ == "__main__":
    main()
