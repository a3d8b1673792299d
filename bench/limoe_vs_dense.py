"""The paper's comparison as a verdict: LIMoE versus its two baselines of equal active FLOPs per
image and per text, the dense one-tower model and the CLIP-style two-tower model, on the same data
and training budget (steps x batch), plus LIMoE with the classic importance/load losses and LIMoE
with no auxiliary loss, each trained with several seeds.

    python bench/limoe_vs_dense.py --cache DATA --seeds 3 --steps 300 --batch-size 64 \\
        [--preset small] [--set width=128 ...] [--out runs/compare] [--json docs/results/limoe_vs_dense.json]
        [--set image_mask_ratio=0.5 --unmasked-steps N --teacher all-MiniLM-L6-v2]   # the recipe, every variant

Seed s changes the initialisation and the batch draw; every variant runs the same seed list, so
seed s of every variant sees exactly the same batches. Each run is evaluated (`limoe.eval.evaluate`)
on the standard held-out sets. Runs live in OUT/<variant>/seed<s>; a run whose directory already
holds a finished checkpoint and its eval.json is not trained again, so an interrupted verdict
continues where it stopped (a half-trained run resumes from its last checkpoint).

Prints a Markdown table (per set: top-1 / 10-way top-1, averaged over seeds; mean top-1 and mean
10-way as mean ± std over seeds; the contrastive training loss at the end of the runs, mean over
their last 10% of steps and over seeds; for the MoE variants the dropped-token rate and the
image-only / text-only / shared expert counts), writes the JSON (per variant: every seed's results and the
mean and sample standard deviation of mean top-1 and mean 10-way), and ends with one line, the
verdicts: LIMoE beats a baseline only if its mean top-1 is ahead by more than the larger of the
two standard deviations; the two-tower verdict comes first, the dense one last. The verdict is
whatever the numbers say.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from limoe.cli import parse_overrides
from limoe.eval.evaluate import evaluate, write_results
from limoe.eval.sets import default_eval_sets
from limoe.export.torch_encoders import checkpoint_encoders
from limoe.model.checkpoint import read_metadata
from limoe.model.config import (
    LIMoEConfig,
    dense_counterpart,
    get_config,
    two_tower_counterpart,
)
from limoe.runtime.preprocess import PreprocessConfig
from limoe.runtime.tokenizer import Tokenizer
from limoe.train.dataset import MixDataset
from limoe.train.trainer import TrainConfig, train, training_texts

LIMOE, DENSE, TWO_TOWER = "LIMoE (entropy losses)", "dense", "two-tower"
VARIANTS: dict[str, tuple[str, Callable[[LIMoEConfig], LIMoEConfig]]] = {  # name -> (run directory, config)
    LIMOE: ("limoe_entropy", lambda c: c),
    DENSE: ("dense", dense_counterpart),
    TWO_TOWER: ("two_tower", two_tower_counterpart),
    "LIMoE (importance + load)": ("limoe_classic", lambda c: c.replace(aux_loss="classic", router_noise_std=1 / 8)),
    "LIMoE (no aux loss)": ("limoe_none", lambda c: c.replace(aux_loss="none")),
}
BY_SLUG = {slug: name for name, (slug, _) in VARIANTS.items()}
DEFAULT_JSON = Path(__file__).resolve().parent.parent / "docs" / "results" / "limoe_vs_dense.json"
# TrainConfig fields that do not change what a run learns; a finished run is reused whatever they were.
_BOOKKEEPING = ("checkpoint_every", "log_every", "num_workers")


def variant_config(base: LIMoEConfig, name: str) -> LIMoEConfig:
    return VARIANTS[name][1](base)


# -- one run's numbers -----------------------------------------------------------------------
def run_record(seed: int, results: dict, train_seconds: float | None) -> dict:
    """One seed's entry in `runs`: mean top-1 / 10-way over the held-out sets, each set's, and
    (MoE only) the dropped rate per modality averaged over MoE layers and the expert split summed
    over them."""
    sets = {name: {k: r[k] for k in ("top1", "top1_of_10", "top1_in_group") if k in r}
            for name, r in results["zero_shot"].items()}
    record = {"seed": seed,
              "mean_top1": statistics.fmean(s["top1"] for s in sets.values()),
              "mean_10way": statistics.fmean(s["top1_of_10"] for s in sets.values()),
              "sets": sets}
    layers = results.get("routing", {}).get("layers")
    if layers:
        record["dropped_rate"] = {m: statistics.fmean(r["dropped_rate"].get(m, 0.0) for r in layers)
                                  for m in ("image", "text")}
        record["experts"] = {k: sum(r["experts"][k] for r in layers) for k in ("image", "text", "shared", "unused")}
    record["train_seconds"] = train_seconds
    return record


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1); no deviation from one value."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarize(runs: list[dict]) -> dict:
    """A variant's JSON entry: its runs and mean / std over seeds of mean top-1 and mean 10-way."""
    mean_top1, std_top1 = mean_std([r["mean_top1"] for r in runs])
    mean_10way, std_10way = mean_std([r["mean_10way"] for r in runs])
    losses = [r["train_loss"] for r in runs if r.get("train_loss") is not None]
    return {"runs": runs, "mean_top1": mean_top1, "std_top1": std_top1, "mean_10way": mean_10way,
            "std_10way": std_10way, "mean_train_loss": statistics.fmean(losses) if losses else None}


def _pm(mean: float, std: float | None) -> str:
    return f"{mean:.1%}" if std is None else f"{mean:.1%} ± {std:.1%}"


def verdict(variants: dict[str, dict], baseline: str = DENSE) -> str:
    """One line from the numbers: does LIMoE's mean top-1 beat the baseline's (dense or two-tower)
    by more than a standard deviation (the larger of the two variants')?"""
    if LIMOE not in variants or baseline not in variants:
        return f"verdict: none (needs both {LIMOE!r} and {baseline!r})"
    a, b, base = variants[LIMOE], variants[baseline], baseline
    diff = 100 * (a["mean_top1"] - b["mean_top1"])
    detail = (f"mean top-1 LIMoE {_pm(a['mean_top1'], a['std_top1'])}, {base} {_pm(b['mean_top1'], b['std_top1'])}; "
              f"10-way {100 * (a['mean_10way'] - b['mean_10way']):+.2f} points; "
              f"{len(a['runs'])} and {len(b['runs'])} seeds")
    if a["std_top1"] is None or b["std_top1"] is None:
        return f"verdict: none from one seed: LIMoE minus {base} is {diff:+.2f} points mean top-1 ({detail})"
    std = 100 * max(a["std_top1"], b["std_top1"])
    if diff > std:
        return (f"verdict: LIMoE beats {base} by {diff:.2f} points mean top-1, more than a standard deviation "
                f"({std:.2f}) ({detail})")
    if -diff > std:
        return (f"verdict: LIMoE does not beat {base}: {base} is ahead by {-diff:.2f} points mean top-1, more than a "
                f"standard deviation ({std:.2f}) ({detail})")
    return (f"verdict: LIMoE does not beat {base} by more than a standard deviation: {diff:+.2f} points mean top-1, "
            f"standard deviation {std:.2f} ({detail})")


def format_table(variants: dict[str, dict]) -> str:
    sets = list(next(iter(variants.values()))["runs"][0]["sets"])
    lines = ["| variant | " + " | ".join(sets)
             + " | mean top-1 | mean 10-way | final train loss | dropped img/txt | experts img/txt/shared |",
             "|---" * (len(sets) + 6) + "|"]
    for name, v in variants.items():
        runs = v["runs"]
        cells = [f"{statistics.fmean(r['sets'][s]['top1'] for r in runs):.1%} / "
                 f"{statistics.fmean(r['sets'][s]['top1_of_10'] for r in runs):.1%}" for s in sets]
        if "experts" in runs[0]:
            drop = "/".join(f"{statistics.fmean(r['dropped_rate'][m] for r in runs):.1%}"
                            for m in ("image", "text"))
            kinds = "/".join(f"{statistics.fmean(r['experts'][k] for r in runs):.3g}"
                             for k in ("image", "text", "shared"))
        else:
            drop = kinds = "-"
        loss = "-" if v.get("mean_train_loss") is None else f"{v['mean_train_loss']:.3f}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_pm(v['mean_top1'], v['std_top1'])} | "
                     f"{_pm(v['mean_10way'], v['std_10way'])} | {loss} | {drop} | {kinds} |")
    return "\n".join(lines)


# -- running (or reusing) one variant/seed ---------------------------------------------------
def _comparable(train_cfg: dict) -> dict:
    return {k: v for k, v in json.loads(json.dumps(train_cfg)).items() if k not in _BOOKKEEPING}


def finished(run_dir: Path, cfg: LIMoEConfig, tc: TrainConfig, data: str) -> bool:
    """Whether run_dir holds this run's final checkpoint. A checkpoint of other settings (config,
    schedule, seed or data) is an error, never silently reused or resumed."""
    ckpt = run_dir / "model.safetensors"
    if not ckpt.exists():
        return False
    stored, extra = read_metadata(ckpt)
    if stored != cfg or _comparable(extra.get("train", {})) != _comparable(asdict(tc)) or extra.get("data") != data:
        raise SystemExit(f"{run_dir} holds a run with other settings (config, training or data); "
                         "choose another --out or remove that directory")
    return extra.get("step") == tc.steps


def evaluated(run_dir: Path, cache: str | None, limit: int, sets: list, name: str = "eval.json",
              fresh: bool = False, bench: dict | None = None, **routing) -> tuple[dict, list]:
    """run_dir/name: the run's evaluation on the held-out sets, reused unless `fresh` or of another
    limit, else computed now (`routing`: checkpoint_encoders' options, e.g. capacity routing) and
    written with `bench` beside the limit; and the eval sets, loaded on first use (every run of a
    bench shares the image preprocessing)."""
    path = run_dir / name
    results = json.loads(path.read_text()) if path.exists() and not fresh else None
    if results is None or results.get("bench", {}).get("limit") != limit:
        enc = checkpoint_encoders(run_dir / "model.safetensors", **routing)
        sets = sets or default_eval_sets(enc, cache=cache, limit=limit)
        results = {**evaluate(enc, sets), "bench": {"limit": limit, **(bench or {})}}
        write_results(results, path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    return results, sets


def _log(run_dir: Path) -> dict[int, dict]:
    """log.jsonl by step (the last line of each step, so steps replayed after an interruption
    count once); empty when there is no log."""
    log = run_dir / "log.jsonl"
    if not log.exists():
        return {}
    return {r["step"]: r for r in map(json.loads, log.read_text(encoding="utf-8").splitlines())}


def train_seconds(run_dir: Path, batch_size: int) -> float | None:
    """Seconds spent in training steps, from log.jsonl."""
    steps = _log(run_dir)
    return round(sum(batch_size / r["examples_per_s"] for r in steps.values()), 2) if steps else None


def final_train_loss(run_dir: Path, fraction: float = 0.1) -> float | None:
    """The contrastive training loss at the end of the run: its mean over the last `fraction` of
    the logged steps. Beside the held-out accuracy it tells fitting apart from generalising."""
    steps = _log(run_dir)
    if not steps:
        return None
    last = sorted(steps)[-max(1, int(len(steps) * fraction)):]
    return round(statistics.fmean(steps[k]["contrastive"] for k in last), 4)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="named config preset (limoe info lists them)")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                   help="override a preset field, as in `limoe train --set`, e.g. --set width=128 --set depth=4")
    p.add_argument("--data", default="emoji:2,icons:1,mnist:0.5,scenes:1")
    p.add_argument("--cache", help="prepared data (limoe data prepare)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per variant: 0 .. N-1")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (for resuming)")
    p.add_argument("--limit", type=int, default=1000, help="images per evaluation set")
    p.add_argument("--unmasked-steps", type=int, default=0,
                   help="with --set image_mask_ratio=R: the last N steps see every patch (as limoe train)")
    p.add_argument("--teacher", default="", help="text teacher for every variant, e.g. all-MiniLM-L6-v2 (as limoe train)")
    p.add_argument("--teacher-weight", type=float, default=TrainConfig.teacher_weight,
                   help=f"the teacher loss weight (default {TrainConfig.teacher_weight:g}, as limoe train)")
    p.add_argument("--out", default="runs/compare", help="run directories: OUT/<variant>/seed<s>")
    p.add_argument("--json", default=str(DEFAULT_JSON), help="results file (default docs/results/limoe_vs_dense.json)")
    p.add_argument("--variants", default=",".join(BY_SLUG),
                   help="comma-separated subset of: " + ", ".join(BY_SLUG) + " (or the variants' names)")
    args = p.parse_args(argv)
    names = [BY_SLUG.get(n, n) for n in args.variants.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(BY_SLUG)}")
    if args.seeds < 1:
        p.error("--seeds must be at least 1")

    started = time.perf_counter()
    overrides = parse_overrides(args.set)
    base = get_config(args.preset, **overrides)
    configs = {name: variant_config(base, name) for name in names}
    data = MixDataset(args.data, split="train", preprocess=PreprocessConfig.from_model_config(base), cache=args.cache,
                      return_captions=True)
    tokenizer = Tokenizer.train(training_texts(data.items), base.vocab_size, base.context_length)
    meta = {"data": args.data, "sources": {s.name: s.size for s in data.sources}}
    seeds = list(range(args.seeds))
    eval_sets = []  # loaded once: every variant shares the image preprocessing

    runs: dict[str, list[dict]] = {name: [] for name in names}
    total, done = len(seeds) * len(names), 0
    for seed in seeds:  # seed-major, so an interrupted verdict already has whole seeds
        tc = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup,
                         seed=seed, checkpoint_every=args.checkpoint_every, num_workers=2,
                         unmasked_steps=args.unmasked_steps, teacher=args.teacher, teacher_weight=args.teacher_weight)
        for name in names:
            done += 1
            run_dir = Path(args.out) / VARIANTS[name][0] / f"seed{seed}"
            reused = finished(run_dir, configs[name], tc, args.data)
            if not reused:
                train(configs[name], tc, data, tokenizer, run_dir, progress=False, meta=meta)
            results, eval_sets = evaluated(run_dir, args.cache, args.limit, eval_sets, fresh=not reused,
                                           bench={"steps": args.steps})
            record = run_record(seed, results, train_seconds(run_dir, args.batch_size))
            record["train_loss"] = final_train_loss(run_dir)
            runs[name].append(record)
            how = "already trained" if reused else f"trained {args.steps} steps x {args.batch_size}"
            print(f"[{done}/{total}] {name}, seed {seed}: {how} ({record['train_seconds'] or 0:.1f} s of steps), "
                  f"mean top-1 {record['mean_top1']:.1%}, 10-way {record['mean_10way']:.1%}", flush=True)

    variants = {name: summarize(r) for name, r in runs.items()}
    line, two_tower_line = verdict(variants), verdict(variants, TWO_TOWER)
    wall = time.perf_counter() - started
    report = {
        "preset": args.preset, "overrides": overrides, "config": base.to_dict(),
        "variant_changes": {name: {k: v for k, v in cfg.to_dict().items() if v != base.to_dict()[k]}
                            for name, cfg in configs.items()},
        "data": args.data, "sources": meta["sources"], "examples": len(data), "vocab_size": tokenizer.vocab_size,
        "seeds": seeds, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "warmup_steps": args.warmup, "eval_limit": args.limit,
        "recipe": {"unmasked_steps": args.unmasked_steps, "teacher": args.teacher or None,
                   "teacher_weight": args.teacher_weight if args.teacher else None},
        "eval_sets": list(variants[names[0]]["runs"][0]["sets"]),
        "wall_seconds": round(wall, 1),
        "train_seconds": round(sum(r["train_seconds"] or 0 for v in runs.values() for r in v), 1),
        "variants": variants, "verdict": line, "verdict_two_tower": two_tower_line,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".tmp").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    out.with_suffix(".tmp").replace(out)

    changes = ", ".join(f"{k}={v}" for k, v in overrides.items())
    print(f"\n{args.steps} steps x batch {args.batch_size}, preset {args.preset}{f' ({changes})' if changes else ''}, "
          f"data {args.data}, seeds {', '.join(map(str, seeds))}\n")
    print("Per set: top-1 over all the set's classes / 10-way top-1 (true class vs 9 random others), mean over "
          "seeds. Means: mean ± sample standard deviation over seeds.\n")
    print(format_table(variants))
    print(f"\nwrote {out}; {report['train_seconds']:.0f} s of training steps, {wall:.0f} s wall in this invocation")
    print(two_tower_line)
    print(line)


if __name__ == "__main__":
    main()
