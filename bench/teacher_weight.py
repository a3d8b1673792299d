"""The text teacher's weight swept at the verdict's budget: one table of every held-out set by weight.

    python bench/teacher_weight.py --verdict docs/results/limoe_vs_dense.json \
        runs/teacher-0.3.json runs/teacher-1.0.json runs/teacher-3.0.json --json docs/results/teacher_weight.json

Each RUN is `bench/limoe_vs_dense.py --variants limoe_entropy --teacher all-MiniLM-L6-v2
--teacher-weight W --json RUN` with the verdict's own settings; weight 0 is the verdict's LIMoE
runs of the same seeds (the same batches per seed). Every weight is scored over the seeds all of
them share, so the rows compare like with like; unseen icon names, the set the teacher is for,
are reported apart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from limoe_vs_dense import LIMOE, summarize as over_seeds

UNSEEN_NAMES = "iconsets/test (unseen icon names)"


def limoe_runs(result: dict) -> dict[int, dict]:
    """seed -> that seed's run of the LIMoE variant in a limoe_vs_dense.py JSON."""
    return {r["seed"]: r for r in result["variants"][LIMOE]["runs"]}


def summarize(runs: list[dict], sets: list[str]) -> dict:
    """Per-set 10-way and the pooled means over these seeds' runs (limoe_vs_dense.py's summary)."""
    pooled = {k: v for k, v in over_seeds(runs).items() if k != "runs"}
    return {"seeds": [r["seed"] for r in runs],
            "sets_10way": {s: statistics.fmean(r["sets"][s]["top1_of_10"] for r in runs) for s in sets},
            **pooled, "train_seconds": [r["train_seconds"] for r in runs]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="limoe_vs_dense.py JSONs of teacher runs")
    ap.add_argument("--verdict", type=Path, required=True, help="the verdict's JSON: weight 0")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    verdict = json.loads(args.verdict.read_text())
    by_weight: dict[float, dict[int, dict]] = {0.0: limoe_runs(verdict)}
    for path in args.runs:
        result = json.loads(path.read_text())
        recipe = result.get("recipe", {})
        if recipe.get("teacher") is None or result["steps"] != verdict["steps"]:
            sys.exit(f"{path}: not a teacher run at the verdict's {verdict['steps']} steps")
        by_weight[float(recipe["teacher_weight"])] = limoe_runs(result)
    seeds = sorted(set.intersection(*(set(runs) for runs in by_weight.values())))
    if not seeds:
        sys.exit("no seed is shared by every weight")
    sets = verdict["eval_sets"]
    table = {w: summarize([runs[s] for s in seeds], sets) for w, runs in sorted(by_weight.items())}

    weights = list(table)
    print(f"10-way top-1, mean over seeds {seeds}; teacher weight " + " / ".join(f"{w:g}" for w in weights))
    print("| set | " + " | ".join(f"weight {w:g}" for w in weights) + " |")
    print("|---|" + "---|" * len(weights))
    for s in sets:
        cells = [f"{100 * table[w]['sets_10way'][s]:.1f}%" for w in weights]
        print(f"| {s} | " + " | ".join(cells) + " |")
    print("| mean top-1 / 10-way | " + " | ".join(
        f"{100 * t['mean_top1']:.1f}% / {100 * t['mean_10way']:.1f}% ± {100 * (t['std_10way'] or 0.0):.1f}"
        for t in table.values()) + " |")
    print("| final contrastive loss | " + " | ".join(f"{t['mean_train_loss']:.3f}" for t in table.values()) + " |")
    best = max(weights, key=lambda w: table[w]["sets_10way"][UNSEEN_NAMES])
    names = ", ".join(f"{w:g}: {100 * table[w]['sets_10way'][UNSEEN_NAMES]:.1f}%" for w in weights)
    overall = max(weights, key=lambda w: table[w]["mean_10way"])
    print(f"unseen icon names 10-way by weight ({names}); best weight {best:g}")
    print(f"best weight by mean 10-way over the {len(sets)} sets: {overall:g}")
    if args.json:
        out = {"verdict": str(args.verdict), "runs": [str(p) for p in args.runs], "seeds": seeds,
               "steps": verdict["steps"], "batch_size": verdict["batch_size"], "eval_sets": sets,
               "teacher": "all-MiniLM-L6-v2", "best_weight_unseen_names": best, "best_weight_mean_10way": overall,
               "weights": {f"{w:g}": t for w, t in table.items()}}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
