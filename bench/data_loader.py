"""How fast the training loader delivers image-text pairs from the prepared cache, next to how
fast training consumes them, measured in the same run on the same machine.

    python bench/data_loader.py [--cache DIR] [--data MIX] [--batch-size 128] [--loader-steps 30]
                                [--train-steps 6] [--workers 2] [--preset small]

Loader: exactly what `limoe train` does per step (limoe/cli.py, limoe/train/trainer.py): the mix as a
MixDataset (split "train", the preset's preprocessing, all captions), limoe.train.trainer.StepSampler's
weighted draw of the step's indices, and limoe.train.trainer.load_batch (decode + preprocess each image,
pick and tokenise captions), inline and with `--workers` decoding threads (`limoe train
--workers`, default 2). Training: limoe.train.trainer.train for a few steps of the preset at the same
batch size on batches already in memory, so its examples/s (from log.jsonl, first step dropped)
is the model's consumption alone. The last line is the ratio of the two (loader with --workers).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from limoe.cli import DEFAULT_MIX  # what `limoe train` trains on by default

from _common import log


class InMemory:
    """A dataset of already decoded items (a few hundred, reused), so training pays no loading."""

    def __init__(self, items: list[dict], size: int):
        self.items, self.size = items, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        return self.items[int(i) % len(self.items)]


def loader_rate(ds, tokenizer, batch: int, steps: int, workers: int, seed: int = 0) -> float:
    """Pairs/s of limoe.train.trainer.load_batch over `steps` step-indexed batches (after one warm-up)."""
    from limoe.train.trainer import StepSampler, load_batch

    sampler = StepSampler(len(ds), batch, seed, getattr(ds, "sample_weights", None))
    pool = ThreadPoolExecutor(workers) if workers else None
    try:
        load_batch(ds, sampler.indices(10_000), seed, 10_000, tokenizer, pool)  # warm-up (page cache, threads)
        t0 = time.perf_counter()
        for step in range(steps):
            pixels, tokens, _ = load_batch(ds, sampler.indices(step), seed, step, tokenizer, pool)
            assert pixels.shape[0] == tokens.shape[0] == batch
        return steps * batch / (time.perf_counter() - t0)
    finally:
        if pool is not None:
            pool.shutdown()


def training_rate(cfg, tokenizer, items: list[dict], batch: int, steps: int) -> float:
    """Median examples/s of limoe.train.trainer.train (log.jsonl) over steps 2..steps on in-memory data."""
    from limoe.train.trainer import TrainConfig, train

    with tempfile.TemporaryDirectory(prefix="limoe-bench-loader-") as out:
        tc = TrainConfig(steps=steps, batch_size=batch, warmup_steps=1, checkpoint_every=10**9, num_workers=0)
        train(cfg, tc, InMemory(items, 10 * batch), tokenizer, out, resume=False, progress=False)
        rates = [json.loads(line)["examples_per_s"] for line in Path(out, "log.jsonl").read_text().splitlines()]
    return statistics.median(rates[1:] if len(rates) > 1 else rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--cache", help="prepared data (default $LIMOE_DATA_CACHE or ~/.cache/limoe/data)")
    p.add_argument("--data", default=DEFAULT_MIX, help=f"mix (default {DEFAULT_MIX})")
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--loader-steps", type=int, default=30, help="batches timed per loader setting")
    p.add_argument("--train-steps", type=int, default=6, help="training steps (the first is not counted)")
    p.add_argument("--workers", type=int, default=2, help="decoding threads, as `limoe train --workers` (default 2)")
    args = p.parse_args(argv)

    from limoe.model.config import get_config
    from limoe.runtime.preprocess import PreprocessConfig
    from limoe.runtime.tokenizer import Tokenizer
    from limoe.train.dataset import MixDataset

    cfg = get_config(args.preset)
    t0 = time.perf_counter()
    ds = MixDataset(args.data, split="train", preprocess=PreprocessConfig.from_model_config(cfg), cache=args.cache,
                    return_captions=True)
    t_index = time.perf_counter() - t0
    log(f"{ds!r}: index loaded in {t_index:.1f}s")
    t0 = time.perf_counter()
    tokenizer = Tokenizer.train((c for it in ds.items for c in it["captions"]), cfg.vocab_size, cfg.context_length)
    t_tok = time.perf_counter() - t0
    log(f"tokenizer ({tokenizer.vocab_size} tokens) trained in {t_tok:.1f}s")

    inline = loader_rate(ds, tokenizer, args.batch_size, args.loader_steps, 0)
    log(f"loader inline: {inline:.0f} pairs/s")
    threaded = loader_rate(ds, tokenizer, args.batch_size, args.loader_steps, args.workers) if args.workers else inline
    log(f"loader with {args.workers} threads: {threaded:.0f} pairs/s")

    items = [ds[i] for i in range(0, len(ds), max(1, len(ds) // (2 * args.batch_size)))][: 2 * args.batch_size]
    consumed = training_rate(cfg, tokenizer, items, args.batch_size, args.train_steps)
    log(f"training ({args.preset}, batch {args.batch_size}): {consumed:.1f} pairs/s")

    print(f"mix {args.data}: {len(ds)} train items; index {t_index:.1f}s, tokenizer {t_tok:.1f}s")
    print(f"loader inline:            {inline:8.0f} pairs/s  ({inline / consumed:.1f}x training)")
    print(f"loader, {args.workers} threads:        {threaded:8.0f} pairs/s")
    print(f"training {args.preset}, batch {args.batch_size}: {consumed:8.1f} pairs/s")
    print(f"ratio loader/training pairs/s: {threaded / consumed:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
