"""Where a training step's time goes, and what each recipe change does to pairs/s, side by side.

    python bench/train_throughput.py [--preset small] [--batch-size 128] [--data MIX] [--rounds 3]
        [--steps 3] [--synthetic] [--json docs/results/train_throughput.json]

Every variant trains from the same initialisation on the same pre-loaded batches (decoded once,
before timing: the trainer loads step s + 1's batch in a worker while step s computes, so data is
not in the step; what loading a batch costs is printed apart). Variants take turns, `--steps`
optimizer steps each, for `--rounds` rounds; each variant's pairs/s is the median of its rounds and
its ratio is against the baseline of the same rounds.

Variants: the baseline (the preset: softmax loss, every patch, training capacity factor 1.0),
masked patches (FLIP) at 50% and 75%, the sigmoid loss (SigLIP), the text teacher
(all-MiniLM-L6-v2; its embeddings come from the on-disk cache, computed once), training capacity
2.0, and all of them together. "Image side" times the image tower alone (forward and backward).

The breakdown of one baseline step: the image and text towers' forward and backward, of which the
MoE layers' routing and dispatch (router, top-k, Batch Priority Routing, dispatch and combine: the
MoE layer's forward minus its experts'), the losses, the optimizer (clipping included) and loading
a batch from the prepared data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from _common import log

from limoe.model.config import get_config
from limoe.model.moe import MoELayer
from limoe.model.transformer import build_model
from limoe.runtime.preprocess import PreprocessConfig
from limoe.runtime.tokenizer import Tokenizer
from limoe.train.trainer import (
    Batch,
    StepSampler,
    TeacherTargets,
    TrainConfig,
    apply_gradients,
    forward_terms,
    load_batch,
    make_optimizer,
    training_texts,
)

DATA_MIX = "emoji:1,emoji_art:4,icons:1,iconsets:3,mnist:0.3,scenes:0.5"  # the data issue's mix
TEACHER = "all-MiniLM-L6-v2"
VARIANTS: dict[str, tuple[dict, dict]] = {  # name -> (model config overrides, TrainConfig overrides)
    "baseline": ({}, {}),
    "mask 0.5": ({"image_mask_ratio": 0.5}, {}),
    "mask 0.75": ({"image_mask_ratio": 0.75}, {}),
    "sigmoid": ({"contrastive_loss": "sigmoid"}, {}),
    "teacher": ({}, {"teacher": TEACHER}),
    "capacity 2.0": ({"train_capacity_factor": 2.0}, {}),
    "all (mask 0.5, sigmoid, teacher, capacity 2.0)": (
        {"image_mask_ratio": 0.5, "contrastive_loss": "sigmoid", "train_capacity_factor": 2.0}, {"teacher": TEACHER}),
}


# -- batches ----------------------------------------------------------------------------------------
def real_batches(args, cfg, n: int) -> tuple[list[Batch], Tokenizer, float, list]:
    """n batches of the mix, decoded once; the tokenizer trained on the mix's texts; seconds to load one."""
    from limoe.train.dataset import MixDataset

    data = MixDataset(args.data, split="train", preprocess=PreprocessConfig.from_model_config(cfg),
                      cache=args.cache, return_captions=True)
    tok = Tokenizer.train(training_texts(data.items), cfg.vocab_size, cfg.context_length)
    sampler = StepSampler(len(data), args.batch_size, 0, data.sample_weights)
    t0 = time.perf_counter()
    batches = [load_batch(data, sampler.indices(s), 0, s, tok) for s in range(n)]
    return batches, tok, (time.perf_counter() - t0) / n, data.items


def synthetic_batches(args, cfg, n: int) -> tuple[list[Batch], Tokenizer, float, list]:
    """Random pixels and words, for a machine without the prepared data."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(500)]
    texts = [[" ".join(rng.choice(words, 4)) for _ in range(args.batch_size)] for _ in range(n)]
    tok = Tokenizer.train([t for b in texts for t in b], cfg.vocab_size, cfg.context_length)
    batches = [Batch(torch.randn(args.batch_size, 3, cfg.image_size, cfg.image_size),
                     torch.from_numpy(tok.encode(b)), b) for b in texts]
    return batches, tok, float("nan"), [{"captions": t} for b in texts for t in b]


# -- one variant --------------------------------------------------------------------------------------
class Run:
    """A model, its optimizer (and teacher head) and a cursor over the shared batches."""

    def __init__(self, base, batches, items, model_changes: dict, train_changes: dict):
        self.cfg = base.replace(**model_changes)
        self.tc = TrainConfig(**train_changes)
        torch.manual_seed(0)
        self.model = build_model(self.cfg).train()
        self.head = self.targets = None
        modules = [self.model]
        if self.tc.teacher:
            from limoe.train.teacher import TeacherHead

            self.targets = TeacherTargets(self.tc, list(training_texts(items)), torch.device("cpu"))
            self.head = TeacherHead(self.cfg.embed_dim, self.targets.teacher.dim)
            modules.append(self.head)
        self.params = [p for m in modules for p in m.parameters()]
        self.opt = make_optimizer(torch.nn.ModuleList(modules), self.tc)
        self.batches, self.next = batches, 0

    def step(self) -> None:
        b = self.batches[self.next % len(self.batches)]
        self.next += 1
        _, terms = forward_terms(self.model, b.pixels, b.tokens, b.texts, self.cfg, self.tc, None, self.targets,
                                 self.head)
        apply_gradients(self.opt, terms["total"], self.params, self.tc.grad_clip)

    def image_side(self) -> None:
        b = self.batches[self.next % len(self.batches)]
        self.next += 1
        emb, _ = self.model.image_features(b.pixels, self.cfg.image_mask_ratio)
        self.model.image_proj(emb).square().mean().backward()
        self.opt.zero_grad(set_to_none=True)


def timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0


# -- the breakdown ------------------------------------------------------------------------------------
class MoEClock:
    """Forward seconds inside MoE layers and inside their experts, from module hooks."""

    def __init__(self, model):
        self.seconds: dict[str, float] = defaultdict(float)
        self._start: dict[int, float] = {}
        for m in model.modules():
            if isinstance(m, MoELayer):
                self._hook(m, "moe")
                self._hook(m.experts, "experts")

    def _hook(self, module, name: str) -> None:
        module.register_forward_pre_hook(lambda mod, _: self._start.__setitem__(id(mod), time.perf_counter()))
        module.register_forward_hook(
            lambda mod, _i, _o: self.seconds.__setitem__(name, self.seconds[name] + time.perf_counter()
                                                         - self._start[id(mod)]))


def breakdown(run: Run, steps: int) -> dict[str, float]:
    """Mean milliseconds per step of each part of a baseline step, measured part by part."""
    from limoe.model.losses import limoe_loss

    model, cfg, parts = run.model, run.cfg, defaultdict(float)
    clock = MoEClock(model)
    for k in range(steps):
        b = run.batches[k % len(run.batches)]
        for tower, fn in (("image", lambda: model.image_features(b.pixels)),
                          ("text", lambda: model.text_features(b.tokens))):
            clock.seconds.clear()
            t0 = time.perf_counter()
            features, _ = fn()
            emb = (model.image_proj if tower == "image" else model.text_proj)(features)
            t1 = time.perf_counter()
            emb.square().mean().backward()
            t2 = time.perf_counter()
            parts[f"{tower} tower forward"] += t1 - t0
            parts[f"{tower} tower backward"] += t2 - t1
            parts[f"  of which {tower} routing and dispatch (forward)"] += clock.seconds["moe"] - clock.seconds["experts"]
        with torch.no_grad():
            out = model(b.pixels, b.tokens)
        img, txt = out.image_embeds.detach().requires_grad_(), out.text_embeds.detach().requires_grad_()
        t0 = time.perf_counter()
        terms = limoe_loss(img, txt, out.logit_scale, out.image_routing, out.text_routing, cfg, None, out.logit_bias)
        terms["total"].backward()
        parts["losses (forward and backward)"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(run.params, run.tc.grad_clip)
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)
        parts["optimizer (clip, AdamW)"] += time.perf_counter() - t0
    return {k: 1000 * v / steps for k, v in parts.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--preset", default="small")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data", default=DATA_MIX, help=f"prepared mix (default {DATA_MIX})")
    p.add_argument("--cache", help="data cache (default $LIMOE_DATA_CACHE or ~/.cache/limoe/data)")
    p.add_argument("--synthetic", action="store_true", help="random pixels and words instead of the prepared data")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per variant per round")
    p.add_argument("--variants", help="comma-separated subset of: " + ", ".join(VARIANTS))
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args(argv)
    base = get_config(args.preset)
    names = list(VARIANTS) if not args.variants else ["baseline"] + [
        n for n in (v.strip() for v in args.variants.split(",")) if n and n != "baseline"]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}")
    batches, tok, load_s, items = (synthetic_batches if args.synthetic else real_batches)(args, base, 4)
    log(f"{len(batches)} batches of {args.batch_size} in memory; torch threads {torch.get_num_threads()}")
    runs = {n: Run(base, batches, items, *VARIANTS[n]) for n in names}
    for run in runs.values():  # warm-up: first-call allocations and caches
        run.step()
    rates: dict[str, list[float]] = defaultdict(list)
    image_rates: dict[str, list[float]] = defaultdict(list)
    masked = [n for n in names if n == "baseline" or n.startswith("mask")]
    for r in range(args.rounds):
        for n, run in runs.items():
            rates[n].append(args.batch_size * args.steps / timed(run.step, args.steps))
        for n in masked:
            image_rates[n].append(args.batch_size * args.steps / timed(runs[n].image_side, args.steps))
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {rates[n][-1]:.1f}" for n in names))
    parts = breakdown(runs["baseline"], args.steps)
    median = {n: statistics.median(v) for n, v in rates.items()}
    image_median = {n: statistics.median(v) for n, v in image_rates.items()}
    print(f"{args.preset}, batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps, "
          f"{'synthetic' if args.synthetic else args.data}")
    print(f"{'variant':50s} {'pairs/s':>8s} {'ratio':>6s} {'image side pairs/s':>19s} {'ratio':>6s}")
    for n in names:
        side = (f"{image_median[n]:19.1f} {image_median[n] / image_median['baseline']:6.2f}" if n in image_median
                else "")
        print(f"{n:50s} {median[n]:8.1f} {median[n] / median['baseline']:6.2f} {side}")
    step_ms = 1000 * args.batch_size / median["baseline"]
    print(f"\nbaseline step, {step_ms:.0f} ms in training (parts measured one at a time):")
    for k, v in parts.items():
        print(f"  {k:52s} {v:7.1f} ms {v / step_ms:6.1%}")
    print(f"  {'loading a batch (decode, outside the step: prefetched)':52s} {1000 * load_s:7.1f} ms")
    for n in names:
        if n != "baseline":
            print(f"ratio {n}/baseline pairs/s: {median[n] / median['baseline']:.2f}")
    for n in masked[1:]:
        print(f"ratio {n}/baseline image-side pairs/s: {image_median[n] / image_median['baseline']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": "python bench/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "preset": args.preset, "batch_size": args.batch_size, "data": None if args.synthetic else args.data,
            "pairs_per_s": median, "rounds": rates, "image_side_pairs_per_s": image_median,
            "breakdown_ms": parts, "load_batch_ms": 1000 * load_s, "torch_threads": torch.get_num_threads()},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
