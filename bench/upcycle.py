"""Sparse upcycling tested here (Komatsuzaki et al., ICLR 2023): from a dense checkpoint, spend the
same extra CPU minutes three ways and compare on the held-out sets, with several seeds.

    python bench/upcycle.py --seeds 3 --dense-steps 600 --minutes 3 --batch-size 128 \\
        --set width=128 --set mlp_dim=512 --set num_heads=4 --set depth=4 --set train_capacity_factor=2.0 \\
        [--set image_mask_ratio=0.5] [--dense-from runs/compare] [--out runs/upcycle] [--json docs/results/upcycle.json]

Per seed s:
  1. the dense start: the dense one-tower counterpart of the preset, trained --dense-steps (or the
     verdict's `DIR/dense/seed<s>` of `bench/limoe_vs_dense.py`, with --dense-from DIR);
  2. three arms from there, each --minutes of training steps at its own measured pairs/s:
     - "upcycled": `limoe.model.upcycle.upcycle` (E experts, copies of the dense MLPs, top-K
       renormalised; step 0 computes exactly what the dense model does), trained on with the LIMoE
       entropy losses (`limoe train --init`);
     - "dense, trained on": the dense start, trained on (`limoe train --init`);
     - "LIMoE from scratch": the preset's LIMoE, from a random initialisation, same minutes.
     The arms share one seed for the batch draw (1000 + s, so they see batches the dense start did
     not), and so the same batches step for step.
Equal minutes without trusting a noisy clock: before training, the three arms' pairs/s are measured
side by side on the same batches (`bench/train_throughput.py`'s `Run`, taking turns for --rounds),
and each arm's step count is the budget times its rate over the batch size; the rates are kept in
OUT/pairs_per_s.json, so a rerun trains nothing that is finished. Each run's seconds of steps (its
log) are recorded beside it.

Prints a Markdown table (per set top-1 / 10-way top-1 averaged over seeds; mean top-1 and 10-way as
mean ± std over seeds), the upcycled runs' routing over training (per MoE layer, effective experts
exp(H(usage)) and the largest expert's share: the copies diverging), and a verdict line: upcycling
wins against an arm only if its mean top-1 is ahead by more than the larger standard deviation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from limoe_vs_dense import (
    _pm,
    evaluated,
    final_train_loss,
    finished,
    format_table,
    run_record,
    summarize,
    train_seconds,
)
from train_throughput import Run, real_batches, timed

from limoe.cli import parse_overrides
from limoe.model.checkpoint import load_checkpoint, save_checkpoint
from limoe.model.config import LIMoEConfig, dense_counterpart, get_config
from limoe.model.upcycle import upcycle, upcycled_config
from limoe.runtime.preprocess import PreprocessConfig
from limoe.runtime.tokenizer import Tokenizer
from limoe.train.dataset import MixDataset
from limoe.train.routing_log import history_table, read_log, routing_history
from limoe.train.trainer import TrainConfig, train, training_texts

ROOT = Path(__file__).resolve().parent.parent
DATA_MIX = "emoji:1,emoji_art:4,icons:1.5,iconsets:3,mnist:0.3,scenes:0.5"  # the verdict's mix
START, UPCYCLED, DENSE_ON, SCRATCH = "dense start", "upcycled", "dense, trained on", "LIMoE from scratch"
SLUGS = {START: "dense", UPCYCLED: "upcycled", DENSE_ON: "dense_on", SCRATCH: "scratch"}


def arm_configs(base: LIMoEConfig, experts: int, top_k: int, moe_every: int) -> dict[str, LIMoEConfig]:
    dense = dense_counterpart(base)
    return {START: dense, UPCYCLED: upcycled_config(dense, experts, top_k, f"every_{moe_every}"),
            DENSE_ON: dense, SCRATCH: base}


def measure_rates(args, base: LIMoEConfig, configs: dict[str, LIMoEConfig]) -> dict[str, float]:
    """Pairs/s of each arm's training step, measured taking turns on the same batches."""
    batches, _, _, items = real_batches(args, base, 4)
    base_dict = base.to_dict()
    runs = {name: Run(base, batches, items, {k: v for k, v in cfg.to_dict().items() if v != base_dict[k]}, {})
            for name, cfg in configs.items()}
    for run in runs.values():
        run.step()  # warm-up
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            seconds[name].append(timed(run.step, args.rate_steps) / args.rate_steps)
    return {name: args.batch_size / statistics.median(s) for name, s in seconds.items()}


def arm_rates(args, base: LIMoEConfig, configs: dict[str, LIMoEConfig], out: Path) -> dict[str, float]:
    """The arms' pairs/s: measured once per OUT and these settings, then kept in OUT/pairs_per_s.json,
    so that a rerun computes the same step counts and continues (a new measurement would change
    them and every finished run would have to be trained again)."""
    key = {"batch_size": args.batch_size, "data": args.data, "configs": {n: c.to_dict() for n, c in configs.items()}}
    path = out / "pairs_per_s.json"
    if path.exists() and (kept := json.loads(path.read_text()))["key"] == key:
        return kept["rates"]
    rates = measure_rates(args, base, configs)
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "rates": rates}, indent=2) + "\n")
    return rates


def verdict(arms: dict[str, dict], other: str) -> str:
    a, b = arms[UPCYCLED], arms[other]
    diff = 100 * (a["mean_top1"] - b["mean_top1"])
    detail = (f"mean top-1 upcycled {_pm(a['mean_top1'], a['std_top1'])}, "
              f"{other} {_pm(b['mean_top1'], b['std_top1'])}; "
              f"10-way {100 * (a['mean_10way'] - b['mean_10way']):+.2f} points")
    if a["std_top1"] is None or b["std_top1"] is None:
        return f"upcycled vs {other}: {diff:+.2f} points mean top-1 from one seed ({detail})"
    std = 100 * max(a["std_top1"], b["std_top1"])
    if abs(diff) <= std:
        return f"upcycled vs {other}: {diff:+.2f} points, within a standard deviation ({std:.2f}) ({detail})"
    return (f"upcycled {'beats' if diff > 0 else 'loses to'} {other} by {abs(diff):.2f} points mean top-1, more than "
            f"a standard deviation ({std:.2f}) ({detail})")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--set", action="append", metavar="FIELD=VALUE", help="override a preset field")
    p.add_argument("--data", default=DATA_MIX)
    p.add_argument("--cache", help="prepared data (limoe data prepare)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dense-steps", type=int, default=600, help="steps of the dense start")
    p.add_argument("--dense-from", 
                   help="take the dense starts from DIR/dense/seed<s> (bench/limoe_vs_dense.py's --out)")
    p.add_argument("--minutes", type=float, default=3.0, help="extra training per arm, at its measured pairs/s")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps of the dense start and of LIMoE from scratch")
    p.add_argument("--extra-warmup", type=int, default=10, help="warm-up steps of the arms that start from the dense")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--moe-every", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="rounds of the side-by-side pairs/s measurement")
    p.add_argument("--rate-steps", type=int, default=2, help="steps per arm per round of that measurement")
    p.add_argument("--limit", type=int, default=500, help="images per evaluation set")
    p.add_argument("--out", default="runs/upcycle")
    p.add_argument("--json", default=str(ROOT / "docs" / "results" / "upcycle.json"))
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error("--seeds must be at least 1")

    started = time.perf_counter()
    overrides = parse_overrides(args.set)
    base = get_config(args.preset, **overrides)
    configs = arm_configs(base, args.experts, args.top_k, args.moe_every)
    data = MixDataset(args.data, split="train", preprocess=PreprocessConfig.from_model_config(base), cache=args.cache,
                      return_captions=True)
    tokenizer = Tokenizer.train(training_texts(data.items), base.vocab_size, base.context_length)
    meta = {"data": args.data, "sources": {s.name: s.size for s in data.sources}}
    rates = arm_rates(args, base, {k: v for k, v in configs.items() if k != START}, Path(args.out))
    budget = 60 * args.minutes
    steps = {name: max(1, round(budget * rate / args.batch_size)) for name, rate in rates.items()}
    print("pairs/s " + ", ".join(f"{n} {r:.1f} ({steps[n]} steps)" for n, r in rates.items()), flush=True)

    out, sets = Path(args.out), []
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    histories = []
    for seed in range(args.seeds):
        start_tc = TrainConfig(steps=args.dense_steps, batch_size=args.batch_size, lr=args.lr,
                               warmup_steps=args.warmup, seed=seed, checkpoint_every=200, num_workers=2)
        start_dir = (Path(args.dense_from) if args.dense_from else out) / "dense" / f"seed{seed}"
        if not args.dense_from and not finished(start_dir, configs[START], start_tc, args.data):
            train(configs[START], start_tc, data, tokenizer, start_dir, progress=False, meta=meta)
        start_ckpt = start_dir / "model.safetensors"
        results, sets = evaluated(start_dir, args.cache, args.limit, sets)
        runs[START].append({**run_record(seed, results, train_seconds(start_dir, args.batch_size)),
                            "train_loss": final_train_loss(start_dir)})
        for name in (UPCYCLED, DENSE_ON, SCRATCH):
            run_dir = out / SLUGS[name] / f"seed{seed}"
            from_dense = name != SCRATCH
            tc = TrainConfig(steps=steps[name], batch_size=args.batch_size, lr=args.lr,
                             warmup_steps=args.extra_warmup if from_dense else args.warmup, seed=1000 + seed,
                             checkpoint_every=200, num_workers=2)
            init = None
            if name == UPCYCLED:
                init = run_dir / "init.safetensors"
                if not init.exists():
                    dense, _ = load_checkpoint(start_ckpt)
                    run_dir.mkdir(parents=True, exist_ok=True)
                    save_checkpoint(upcycle(dense, args.experts, args.top_k, f"every_{args.moe_every}", seed), init,
                                    extra={"upcycled_from": {"checkpoint": str(start_ckpt)}}, tokenizer=tokenizer)
            elif name == DENSE_ON:
                init = start_ckpt
            if not finished(run_dir, configs[name], tc, args.data):
                started_from = {"init": {"checkpoint": str(init)}} if init else {}
                train(configs[name], tc, data, tokenizer, run_dir, progress=False, meta={**meta, **started_from},
                      init=init)
            results, sets = evaluated(run_dir, args.cache, args.limit, sets)
            record = {**run_record(seed, results, train_seconds(run_dir, args.batch_size)),
                      "train_loss": final_train_loss(run_dir), "steps": steps[name]}
            if name == UPCYCLED:
                record["routing_history"] = routing_history(read_log(run_dir / "log.jsonl"))
                histories.append(record["routing_history"])
            runs[name].append(record)
            print(f"seed {seed}, {name}: {steps[name]} steps ({record['train_seconds'] or 0:.0f} s of steps), "
                  f"mean top-1 {record['mean_top1']:.1%}, 10-way {record['mean_10way']:.1%}", flush=True)

    arms = {name: summarize(r) for name, r in runs.items()}
    lines = [verdict(arms, DENSE_ON), verdict(arms, SCRATCH)]
    report = {
        "command": "python bench/upcycle.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:]),
        "preset": args.preset, "overrides": overrides, "config": base.to_dict(), "data": args.data,
        "sources": meta["sources"], "seeds": list(range(args.seeds)), "batch_size": args.batch_size, "lr": args.lr,
        "dense_steps": args.dense_steps, "dense_from": args.dense_from, "minutes_per_arm": args.minutes,
        "experts": args.experts, "top_k": args.top_k, "moe_every": args.moe_every, "pairs_per_s": rates,
        "steps": steps, "eval_limit": args.limit, "eval_sets": list(runs[START][0]["sets"]),
        "wall_seconds": round(time.perf_counter() - started, 1), "arms": arms, "verdicts": lines,
    }
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".tmp").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    path.with_suffix(".tmp").replace(path)
    print(f"\ndense start {args.dense_steps} steps, then {args.minutes:g} min per arm, batch {args.batch_size}, "
          f"seeds 0..{args.seeds - 1}\n")
    print(format_table(arms))
    print("\nupcycled, seed 0: routing over training (effective experts / largest expert's share)\n")
    print("\n".join(history_table(histories[0])))
    print(f"\nwrote {path}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
