"""The `limoe-small/2` candidate against the shipped `limoe-small/1`: per held-out set, and its
score against training minutes from the weights `limoe train --keep-every` kept.

    python bench/small2_report.py RUN --v1-eval V1_EVAL.json --curve DIR --json docs/results/limoe_small_2.json

RUN holds the run's log.jsonl and eval.json (`limoe eval RUN/model.safetensors --template '{}'
--limit 2000`); DIR holds `limoe eval RUN/steps/model-N.safetensors --limit 500 --out DIR/N.json`
for every kept step N. Minutes are the steps' own wall time from the log (2 cores); it prints
the table docs/RESULTS.md shows and says whether the candidate beats /1 on every set. With
--entry (the candidate exported to the store), the curve joins that entry's manifest and card.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def ten_way(ev: dict) -> dict[str, float]:
    return {name: r["top1_of_10"] for name, r in ev["zero_shot"].items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--v1-eval", required=True, help="limoe-small/1's eval.json (the entry's, at the same limit)")
    ap.add_argument("--curve", required=True)
    ap.add_argument("--batch-size", type=int, default=128, help="the run's batch (its log has pairs/s)")
    ap.add_argument("--json")
    ap.add_argument("--entry", help="a store entry exported from RUN: record the curve in its manifest and card")
    args = ap.parse_args(argv)
    run = Path(args.run)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    minutes, elapsed = [], 0.0
    for r in rows:
        elapsed += args.batch_size / r["examples_per_s"] / 60
        minutes.append(elapsed)
    v2, v1 = ten_way(json.loads((run / "eval.json").read_text())), ten_way(json.loads(Path(args.v1_eval).read_text()))
    table = [{"set": name, "v1_10way": v1[name], "v2_10way": v2[name], "better": v2[name] > v1[name]} for name in v1]
    curve = []
    for f in sorted(Path(args.curve).glob("*.json"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
        if not f.stem.isdigit():
            continue
        step = int(f.stem)
        scores = ten_way(json.loads(f.read_text()))
        curve.append({"step": step, "step_minutes": round(minutes[step - 1], 1),
                      "mean_10way": statistics.mean(scores.values()), "sets": scores})
    out = {"run": str(run), "steps": len(rows),
           "median_pairs_per_s": statistics.median(r["examples_per_s"] for r in rows),
           "step_minutes": round(minutes[-1], 1), "sets": table, "v1_mean_10way": statistics.mean(v1.values()),
           "v2_mean_10way": statistics.mean(v2.values()), "beats_v1_everywhere": all(t["better"] for t in table),
           "curve": curve}
    print(f"{len(rows)} steps, {out['step_minutes']} minutes of steps, median {out['median_pairs_per_s']:.1f} pairs/s")
    print("| set | limoe-small/1 10-way | candidate 10-way |")
    print("|---|---|---|")
    for t in table:
        print(f"| {t['set']} | {t['v1_10way']:.2%} | {t['v2_10way']:.2%}{'' if t['better'] else ' (lower)'} |")
    print(f"| mean | {out['v1_mean_10way']:.2%} | {out['v2_mean_10way']:.2%} |")
    for c in curve:
        print(f"step {c['step']:5d}  {c['step_minutes']:5.1f} min  mean 10-way {c['mean_10way']:.2%}")
    print("beats limoe-small/1 on every set:", out["beats_v1_everywhere"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.entry:
        from limoe.export.model_card import rewrite_entry

        rewrite_entry(args.entry, lambda manifest: manifest.setdefault("training", {}).update(score_curve=curve))
    return 0


if __name__ == "__main__":
    sys.exit(main())
