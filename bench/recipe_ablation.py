"""The recipe's parts at equal wall clock: baseline, +masked patches, +sigmoid loss, +text teacher,
+training capacity 2.0, and all together, each with several seeds, on the same data.

    python bench/train_throughput.py --json docs/results/train_throughput.json     # pairs/s per variant
    python bench/recipe_ablation.py --minutes 4 --seeds 2 [--throughput docs/results/train_throughput.json] \\
        [--out runs/ablation] [--json docs/results/recipe_ablation.json]

Equal wall clock, without trusting a noisy clock: each variant's step count is the budget times its
pairs/s as `bench/train_throughput.py` measured them side by side, divided by the batch size (a
masked variant's unmasked tail runs at the baseline's rate, and is paid for out of the same budget).
Each run's CPU minutes (process time of its steps' own log) are recorded beside it. Runs live in
OUT/<variant>/seed<s> and are reused when finished, as in `bench/limoe_vs_dense.py`, whose
evaluation, records and table this script shares. Every held-out set is reported, unseen art
styles and unseen icon names among them; the teacher is meant to help the latter most.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from limoe_vs_dense import (
    evaluated,
    final_train_loss,
    finished,
    format_table,
    run_record,
    summarize,
    train_seconds,
)

from limoe.model.config import get_config
from limoe.runtime.preprocess import PreprocessConfig
from limoe.runtime.tokenizer import Tokenizer
from limoe.train.dataset import MixDataset
from limoe.train.trainer import TrainConfig, train, training_texts

ROOT = Path(__file__).resolve().parent.parent
DATA_MIX = "emoji:1,emoji_art:4,icons:1,iconsets:3,mnist:0.3,scenes:0.5"
TEACHER = "all-MiniLM-L6-v2"
TAIL = 0.05  # share of a masked run's steps tuned unmasked at the end (FLIP)
# name -> (run directory, model config changes, TrainConfig changes, train_throughput variant timing it)
VARIANTS: dict[str, tuple[str, dict, dict, str]] = {
    "baseline": ("baseline", {}, {}, "baseline"),
    "+masking (50%, 5% unmasked tail)": ("mask", {"image_mask_ratio": 0.5}, {}, "mask 0.5"),
    "+sigmoid loss": ("sigmoid", {"contrastive_loss": "sigmoid"}, {}, "sigmoid"),
    "+text teacher": ("teacher", {}, {"teacher": TEACHER}, "teacher"),
    "+capacity 2.0": ("capacity2", {"train_capacity_factor": 2.0}, {}, "capacity 2.0"),
    "all together": ("all", {"image_mask_ratio": 0.5, "contrastive_loss": "sigmoid", "train_capacity_factor": 2.0},
                     {"teacher": TEACHER}, "all (mask 0.5, sigmoid, teacher, capacity 2.0)"),
}
BY_SLUG = {v[0]: name for name, v in VARIANTS.items()}


def steps_for(budget_s: float, batch: int, rate: float, base_rate: float, masked: bool) -> tuple[int, int]:
    """(steps, unmasked tail steps) that fill `budget_s` at `rate` pairs/s (the tail at `base_rate`)."""
    if not masked:
        return max(1, round(budget_s * rate / batch)), 0
    # n steps, TAIL * n of them unmasked: n * (1 - TAIL) * batch / rate + n * TAIL * batch / base_rate = budget
    n = budget_s / (batch * ((1 - TAIL) / rate + TAIL / base_rate))
    return max(1, round(n)), round(TAIL * n)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--data", default=DATA_MIX)
    p.add_argument("--cache", help="prepared data (limoe data prepare)")
    p.add_argument("--minutes", type=float, default=4.0, help="training budget per run, at the measured pairs/s")
    p.add_argument("--throughput", default=str(ROOT / "docs" / "results" / "train_throughput.json"),
                   help="bench/train_throughput.py --json output (same preset and batch size)")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup-share", type=float, default=0.1, help="warmup steps as a share of each run's steps")
    p.add_argument("--teacher-weight", type=float, default=TrainConfig.teacher_weight,
                   help=f"the teacher loss weight (default {TrainConfig.teacher_weight:g}, as limoe train)")
    p.add_argument("--limit", type=int, default=500, help="images per evaluation set")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--json", default=str(ROOT / "docs" / "results" / "recipe_ablation.json"))
    p.add_argument("--variants", default=",".join(BY_SLUG), help="comma-separated subset of: " + ", ".join(BY_SLUG))
    args = p.parse_args(argv)
    names = [BY_SLUG.get(n, n) for n in args.variants.split(",")]
    if unknown := [n for n in names if n not in VARIANTS]:
        p.error(f"unknown variants {unknown}; choose from {', '.join(BY_SLUG)}")
    measured = json.loads(Path(args.throughput).read_text())
    if measured["preset"] != args.preset or measured["batch_size"] != args.batch_size:
        p.error(f"{args.throughput} timed preset {measured['preset']} at batch {measured['batch_size']}")
    rates = measured["pairs_per_s"]

    started = time.perf_counter()
    base = get_config(args.preset)
    data = MixDataset(args.data, split="train", preprocess=PreprocessConfig.from_model_config(base), cache=args.cache,
                      return_captions=True)
    tokenizer = Tokenizer.train(training_texts(data.items), base.vocab_size, base.context_length)
    meta = {"data": args.data, "sources": {s.name: s.size for s in data.sources}}
    budget = 60 * args.minutes
    plans = {}
    for name in names:
        slug, model_changes, train_changes, timed_as = VARIANTS[name]
        steps, tail = steps_for(budget, args.batch_size, rates[timed_as], rates["baseline"],
                                "image_mask_ratio" in model_changes)
        plans[name] = (base.replace(**model_changes), steps, tail, train_changes)
        print(f"{name}: {rates[timed_as]:.1f} pairs/s -> {steps} steps ({tail} unmasked)", flush=True)
    eval_sets, runs = [], {name: [] for name in names}
    for seed in range(args.seeds):
        for name in names:
            cfg, steps, tail, train_changes = plans[name]
            extra = {"teacher_weight": args.teacher_weight} if train_changes.get("teacher") else {}
            tc = TrainConfig(steps=steps, batch_size=args.batch_size, lr=args.lr,
                             warmup_steps=max(1, round(args.warmup_share * steps)), seed=seed,
                             checkpoint_every=max(steps, 1), num_workers=2, unmasked_steps=tail,
                             **train_changes, **extra)
            run_dir = Path(args.out) / VARIANTS[name][0] / f"seed{seed}"
            cpu0 = time.process_time()
            reused = finished(run_dir, cfg, tc, args.data)
            if not reused:
                train(cfg, tc, data, tokenizer, run_dir, progress=False, meta=meta)
                (run_dir / "cpu_seconds.json").write_text(json.dumps({"cpu_seconds": time.process_time() - cpu0}))
            results, eval_sets = evaluated(run_dir, args.cache, args.limit, eval_sets, bench={"steps": steps})
            # the same weights routed at capacity 1.0 (not dropless)
            capacity, eval_sets = evaluated(run_dir, args.cache, args.limit, eval_sets, "eval_capacity.json",
                                            bench={"steps": steps}, inference_routing="capacity",
                                            eval_capacity_factor=1.0)
            record = run_record(seed, results, train_seconds(run_dir, args.batch_size))
            at_capacity = run_record(seed, capacity, None)
            record["capacity_1.0"] = {"mean_top1": at_capacity["mean_top1"], "mean_10way": at_capacity["mean_10way"]}
            record["train_dropped"] = train_dropped(run_dir)
            cpu = run_dir / "cpu_seconds.json"
            record.update(steps=steps, unmasked_steps=tail, train_loss=final_train_loss(run_dir),
                          cpu_minutes=round(json.loads(cpu.read_text())["cpu_seconds"] / 60, 2) if cpu.exists() else None,
                          command=command(name, cfg, base, tc, args))
            runs[name].append(record)
            print(f"{name}, seed {seed}: {steps} steps, {record['train_seconds'] or 0:.0f} s of steps, mean top-1 "
                  f"{record['mean_top1']:.1%}, 10-way {record['mean_10way']:.1%}", flush=True)

    variants = {name: summarize(r) for name, r in runs.items()}
    report = {"preset": args.preset, "data": args.data, "sources": meta["sources"], "batch_size": args.batch_size,
              "minutes_per_run": args.minutes, "throughput": rates, "throughput_command": measured.get("command"),
              "seeds": list(range(args.seeds)), "eval_limit": args.limit, "lr": args.lr,
              "teacher_weight": args.teacher_weight, "wall_seconds": round(time.perf_counter() - started, 1),
              "variants": variants}
    out = Path(args.json)
    out.with_suffix(".tmp").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".tmp").replace(out)
    print(f"\n{args.minutes:g} min per run at the measured pairs/s, batch {args.batch_size}, seeds "
          f"{', '.join(map(str, range(args.seeds)))}; per set top-1 / 10-way, mean over seeds\n")
    print(format_table(variants))
    print("\n| variant | dropped in training (image / text) | mean 10-way dropless | at capacity 1.0 | dropless minus capacity |")
    print("|---|---|---|---|---|")
    for name, v in variants.items():
        runs_ = v["runs"]
        drop = "/".join(f"{sum(r['train_dropped'][m] for r in runs_) / len(runs_):.1%}" for m in ("image", "text"))
        dl = sum(r["mean_10way"] for r in runs_) / len(runs_)
        cap = sum(r["capacity_1.0"]["mean_10way"] for r in runs_) / len(runs_)
        print(f"| {name} | {drop} | {dl:.1%} | {cap:.1%} | {100 * (dl - cap):+.2f} points |")
    print(f"\nwrote {out}")


def train_dropped(run_dir: Path, fraction: float = 0.1) -> dict[str, float]:
    """Share of token choices dropped in training, per modality: mean over MoE layers and over the
    last `fraction` of the logged steps (the trainer logs each layer's rate)."""
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    last = lines[-max(1, int(len(lines) * fraction)):]
    out = {}
    for modality in ("image", "text"):
        rates = [v["dropped"] for r in last for k, v in r["routing"].items() if k.startswith(modality + "/")]
        out[modality] = round(sum(rates) / len(rates), 4) if rates else 0.0
    return out


def command(name: str, cfg, base, tc: TrainConfig, args) -> str:
    """The `limoe train` command that runs this variant and seed alone."""
    sets = "".join(f" --set {k}={v}" for k, v in cfg.to_dict().items() if v != base.to_dict()[k])
    recipe = (f" --unmasked-steps {tc.unmasked_steps}" if tc.unmasked_steps else "") + (
        f" --teacher {tc.teacher} --teacher-weight {tc.teacher_weight}" if tc.teacher else "")
    return (f"limoe train --preset {args.preset}{sets} --data {args.data} --out run --steps {tc.steps} "
            f"--batch-size {tc.batch_size} --lr {tc.lr} --warmup {tc.warmup_steps} --seed {tc.seed}{recipe}")


if __name__ == "__main__":
    main()
