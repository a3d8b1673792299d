"""Contrastive training of LIMoE: `limoe train` (single process or torchrun/DDP).

The data is a map-style dataset (`ds[i]` -> {"pixels": (3, R, R) float32, "caption" or
"captions", ...}, `len(ds)`, optional `ds.sample_weights`). Which examples make up step s is a
pure function of (seed, s, rank) — see `StepSampler` — so resuming from a checkpoint replays
exactly the batches an uninterrupted run would have seen.

Per step: AdamW (weight decay on matrices only), linear warmup then cosine decay, gradient
clipping, bf16 autocast on CUDA, the contrastive loss plus the configured routing losses. Every
step appends one JSON line to `log.jsonl` with each loss term, the learning rate, throughput
and, per MoE layer and modality, expert usage and the dropped-token rate.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from limoe.model.checkpoint import load_any_checkpoint, save_checkpoint, save_clip_checkpoint
from limoe.model.clip import CLIP, CLIPConfig
from limoe.model.config import LIMoEConfig
from limoe.model.losses import distillation_loss, limoe_loss
from limoe.model.moe import RoutingInfo
from limoe.model.transformer import LIMoE, build_model
from limoe.runtime.routing_counts import expert_counts
from limoe.runtime.templates import DEFAULT_TEMPLATES
from limoe.runtime.tokenizer import Tokenizer


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # global batch (split across ranks)
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.05  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on parameters with dim >= 2 only
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    betas: tuple[float, float] = (0.9, 0.98)
    seed: int = 0
    checkpoint_every: int = 200  # steps between checkpoints (the last step always saves)
    keep_every: int = 0  # also keep the weights of every N-th step as steps/model-N.safetensors (0 = off)
    log_every: int = 1  # steps between JSONL log lines
    num_workers: int = 0  # threads decoding examples for a batch (0 = inline)
    prefetch: bool = True  # load step s + 1's batch in a background thread while step s computes
    # Text side of the recipe. With probability template_prob a pair's text is a random prompt
    # template (limoe.runtime.templates.DEFAULT_TEMPLATES, the ones zero-shot classification averages)
    # filled with the item's label, instead of one of its captions: the model then reads the
    # prompts it is queried with. multi_positive: pairs that show the same text are positives of
    # each other in the contrastive loss (equal_text_positives).
    template_prob: float = 0.0
    multi_positive: bool = False
    # FLIP's unmasked tuning: the last `unmasked_steps` steps see every patch (model cfg image_mask_ratio
    # applies before them).
    unmasked_steps: int = 0
    # The text teacher (limoe.train.teacher): "" is off, else a TEACHERS name. Its loss weight, and
    # where its embeddings are cached ("" = $LIMOE_TEACHER_CACHE or ~/.cache/limoe/teacher).
    teacher: str = ""
    teacher_weight: float = 30.0  # the sweep's best mean 10-way at the verdict's budget (docs/RESULTS.md)
    teacher_cache: str = ""


# -- schedule and optimizer ------------------------------------------------------------------
def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup from 0 over `warmup_steps`, then cosine decay to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)


# -- data ------------------------------------------------------------------------------------
class StepSampler:
    """The example indices of step s on one rank: a seeded draw (with replacement, by the
    dataset's sample weights) of the global batch, of which this rank takes its slice."""

    def __init__(self, n: int, batch_size: int, seed: int, weights: np.ndarray | None = None,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must divide by the number of processes {world_size}")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world_size
        self.p = None if weights is None else np.asarray(weights, np.float64) / np.sum(weights)

    def global_batch(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, step])
        return rng.choice(self.n, size=self.batch_size, replace=True, p=self.p)

    def indices(self, step: int) -> np.ndarray:
        per_rank = self.batch_size // self.world
        return self.global_batch(step)[self.rank * per_rank:(self.rank + 1) * per_rank]


class Batch(NamedTuple):
    pixels: Tensor  # (B, 3, R, R)
    tokens: Tensor  # (B, L) token ids
    texts: list[str]  # (B,) the text each pair shows


def equal_text_positives(texts: Sequence[str]) -> Tensor:
    """(B, B) bool: pairs i and j show the same non-empty text (the diagonal is always True).

    Two items with one text ("home icon" from two icon sets, "rocket" in two emoji styles) are the
    batch's false negatives: the identity target would ask image i to prefer text i over its
    identical twin. Different captions of one label stay negatives, since a caption may say more
    than its label ("two pink hexagons on the right")."""
    ids = {text: k for k, text in enumerate(dict.fromkeys(texts))}
    key = torch.tensor([ids[text] if text else -1 - i for i, text in enumerate(texts)])
    return key[:, None] == key[None, :]


def _caption(item: dict, rng: np.random.Generator, template_prob: float = 0.0) -> str:
    """One of the item's captions, or (with probability template_prob) a prompt template with its label."""
    if template_prob and item.get("label") and rng.random() < template_prob:
        return DEFAULT_TEMPLATES[int(rng.integers(len(DEFAULT_TEMPLATES)))].format(item["label"])
    if "captions" in item and item["captions"]:
        return item["captions"][int(rng.integers(len(item["captions"])))]
    return item["caption"]


def training_texts(items: Sequence[dict], template_prob: float = 0.0):
    """Every text training can show (captions, and with templates on, each label in each template),
    e.g. to train the tokenizer on."""
    for item in items:
        yield from item.get("captions") or [item["caption"]]
        if template_prob and item.get("label"):
            yield from (t.format(item["label"]) for t in DEFAULT_TEMPLATES)


def load_batch(dataset, indices: Sequence[int], seed: int, step: int, tokenizer: Tokenizer,
               pool=None, template_prob: float = 0.0) -> Batch:
    """Pixels, token ids and texts of the given examples; caption and template choice seeded."""
    items = list(pool.map(dataset.__getitem__, indices)) if pool else [dataset[int(i)] for i in indices]
    rng = np.random.default_rng([seed, step, 1])
    captions = [_caption(item, rng, template_prob) for item in items]
    pixels = torch.from_numpy(np.stack([item["pixels"] for item in items]))
    return Batch(pixels, torch.from_numpy(tokenizer.encode(captions)), captions)


# -- logging ---------------------------------------------------------------------------------
def routing_stats(routing: Sequence[RoutingInfo], modality: str) -> dict[str, Any]:
    """Per MoE layer: share of this modality's kept token choices per expert, dropped rate."""
    out = {}
    for info in routing:
        plan = info.plan
        index = torch.where(plan.mask.unsqueeze(-1), plan.expert_index, -1)  # padding is never routed
        routed, lost = expert_counts(index.detach().cpu().numpy()[None], plan.dropped.detach().cpu().numpy()[None],
                                     plan.num_experts)  # (1, E) each: this layer
        out[f"{modality}/layer{info.layer}"] = {
            "usage": np.round(routed[0] / max(1, routed[0].sum()), 4).tolist(),
            "dropped": round(float(lost[0].sum() / max(1, routed[0].sum() + lost[0].sum())), 4),
        }
    return out


# -- distributed -----------------------------------------------------------------------------
def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; a plain run is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def finish_distributed(code: int = 0) -> NoReturn:
    """End this rank's process: leave torchrun's process group together, flush, exit with `code`.

    Once DDP has wrapped a module, torch keeps the gloo process group's threads (and references to
    it that Python cannot see) alive past destroy_process_group, and the interpreter's finalization
    then aborts the process now and then (SIGABRT, "terminate called without an active exception":
    5 exits in 60 on these 2 cores). Every rank has written what it had to by now, so it skips
    finalization."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def gather(x: Tensor) -> Tensor:
    """All ranks' rows (CLIP-style global batch). Other ranks' rows are constants here; each rank
    back-propagates through its own rows and DDP averages the gradients (OpenCLIP's default)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    rows = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, x.detach().contiguous())
    rows[dist.get_rank()] = x
    return torch.cat(rows, dim=0)


def gather_texts(texts: list[str]) -> list[str]:
    """All ranks' texts in rank order, matching `gather`'s rows."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return texts
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, texts)
    return [text for part in parts for text in part]


# -- one step --------------------------------------------------------------------------------
def loss_config(cfg: LIMoEConfig | CLIPConfig) -> LIMoEConfig:
    """The config the losses read. A (sparse) CLIP has none of LIMoE's loss fields: it trains with
    the softmax contrastive loss and LIMoE's entropy losses at their defaults (the paper's weights)."""
    if isinstance(cfg, CLIPConfig):
        return LIMoEConfig(num_experts=cfg.num_experts, top_k=cfg.top_k)
    return cfg


def new_model(cfg: LIMoEConfig | CLIPConfig) -> LIMoE | CLIP:
    return CLIP(cfg) if isinstance(cfg, CLIPConfig) else build_model(cfg)


def save_weights(model: LIMoE | CLIP, path: Path, tokenizer: Tokenizer, extra: dict) -> None:
    """A LIMoE checkpoint with its tokenizer, or a CLIP one (its tokenizer is open_clip's, fixed by the config)."""
    if isinstance(model, CLIP):
        save_clip_checkpoint(model, path, extra=extra)
    else:
        save_checkpoint(model, path, tokenizer=tokenizer, extra=extra)


def forward_terms(model: nn.Module, pixels: Tensor, tokens: Tensor, texts: Sequence[str], model_cfg: LIMoEConfig,
                  train_cfg: TrainConfig, positives: Tensor | None = None, targets: "TeacherTargets | None" = None,
                  head: nn.Module | None = None, mask_ratio: float | None = None):
    """The forward pass and every loss term of one step: (LIMoEOutput, terms with "total")."""
    output = model(pixels, tokens, mask_ratio=mask_ratio)
    terms = limoe_loss(gather(output.image_embeds.float()), gather(output.text_embeds.float()),
                       output.logit_scale, output.image_routing, output.text_routing, loss_config(model_cfg), positives,
                       output.logit_bias)
    if targets is not None:
        terms["teacher"] = train_cfg.teacher_weight * distillation_loss(head(output.text_embeds.float()),
                                                                        targets(texts))
        terms["total"] = terms["total"] + terms["teacher"]
    return output, terms


def apply_gradients(opt: torch.optim.Optimizer, total: Tensor, params: Sequence[Tensor], grad_clip: float) -> Tensor:
    """Backward, global-norm clipping (0 = off) and the optimizer step; the norm before clipping."""
    opt.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip or float("inf"))
    opt.step()
    return grad_norm


# -- the loop --------------------------------------------------------------------------------
class TeacherTargets:
    """The teacher's embedding of each training text, looked up by text (computed before step 0)."""

    def __init__(self, train_cfg: TrainConfig, texts: Sequence[str], device: torch.device):
        from limoe.train.teacher import TEACHERS, TeacherCache, load_teacher

        self.teacher = load_teacher(train_cfg.teacher)
        self.cache = TeacherCache(self.teacher, train_cfg.teacher_cache or None)
        self.device = device
        t0 = time.perf_counter()
        self.cache.lookup(list(dict.fromkeys(texts)))
        if self.cache.misses:
            print(f"teacher {self.teacher.name}: embedded {self.cache.misses} new texts in "
                  f"{time.perf_counter() - t0:.0f} s ({len(self.cache)} cached in {self.cache.dir})", flush=True)
        self.meta = {**asdict(TEACHERS[train_cfg.teacher]), "checksum": self.teacher.checksum,
                     "dim": self.teacher.dim, "weight": train_cfg.teacher_weight}

    def __call__(self, texts: Sequence[str]) -> Tensor:  # (B, Q) float32
        return torch.from_numpy(self.cache.lookup(texts).astype(np.float32)).to(self.device)


def _save(out: Path, model: LIMoE, tokenizer: Tokenizer, opt, step: int, train_cfg: TrainConfig,
          extra: dict | None = None, head: nn.Module | None = None) -> None:
    """model.safetensors (weights, config, tokenizer) + train_state.pt (optimizer, step, the
    teacher's head if any), atomically."""
    save_weights(model, out / "model.safetensors", tokenizer,
                 {"step": step, "train": asdict(train_cfg), **(extra or {})})
    tmp = out / "train_state.pt.tmp"
    torch.save({"optimizer": opt.state_dict(), "step": step, "train": asdict(train_cfg),
                **({"teacher_head": head.state_dict()} if head is not None else {})}, tmp)
    tmp.replace(out / "train_state.pt")


def forget_steps_after(log_path: Path, step: int) -> None:
    """Drop the log lines of steps after `step`: a run stopped past its last checkpoint logged steps
    that resuming from that checkpoint runs again, so each step keeps one line, in order."""
    if not log_path.exists():
        return
    lines = log_path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        tmp = log_path.with_suffix(".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(log_path)


def train(model_cfg: LIMoEConfig, train_cfg: TrainConfig, dataset, tokenizer: Tokenizer, out: str | Path,
          resume: bool = True, progress: bool = True, stop_at: int | None = None,
          meta: dict | None = None, init: str | Path | None = None) -> LIMoE:
    """Train (or resume training in `out`) and return the model. Works under torchrun.

    `stop_at` ends this invocation after that step (with a checkpoint), as a preempted job
    would; running again with the same arguments continues exactly where it stopped. `meta`
    (e.g. the data mix) is stored in every checkpoint, for the model card. `init` starts from a
    checkpoint's weights (fine-tuning; `model_cfg` may change its training fields) with a fresh
    optimizer; a resumed run ignores it."""
    rank, world, device = setup_distributed()
    out = Path(out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    start = 0
    torch.manual_seed(train_cfg.seed)
    model = new_model(model_cfg)
    if init is not None and not (resume and (out / "train_state.pt").exists()):
        start_from, _ = load_any_checkpoint(init)
        model.load_state_dict(start_from.state_dict(), strict=True)
    if resume and (out / "train_state.pt").exists():
        model, _ = load_any_checkpoint(out / "model.safetensors")
        model_cfg = model.cfg
    model.to(device).train()
    targets = head = None
    if train_cfg.teacher:
        from limoe.train.teacher import TeacherHead

        texts = list(training_texts(dataset.items, train_cfg.template_prob)) if hasattr(dataset, "items") else []
        targets = TeacherTargets(train_cfg, texts, device)  # texts not listed are computed when first seen
        meta = {**(meta or {}), "teacher": targets.meta}
        head = TeacherHead(model_cfg.embed_dim, targets.teacher.dim).to(device).train()
    opt = make_optimizer(model if head is None else nn.ModuleList([model, head]), train_cfg)
    if resume and (out / "train_state.pt").exists():
        state = torch.load(out / "train_state.pt", map_location=device, weights_only=False)
        opt.load_state_dict(state["optimizer"])
        start = state["step"]
        if head is not None:
            head.load_state_dict(state["teacher_head"])
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    ddp_head = nn.parallel.DistributedDataParallel(head) if world > 1 and head is not None else head
    params = list(model.parameters()) + (list(head.parameters()) if head is not None else [])
    sampler = StepSampler(len(dataset), train_cfg.batch_size, train_cfg.seed,
                          getattr(dataset, "sample_weights", None), rank, world)
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(train_cfg.num_workers) if train_cfg.num_workers else None
    loader = ThreadPoolExecutor(1, thread_name_prefix="prefetch") if train_cfg.prefetch else None

    def batch_of(step: int):  # a pure function of the step: prefetching changes no batch
        return load_batch(dataset, sampler.indices(step), train_cfg.seed, step, tokenizer, pool, train_cfg.template_prob)

    def request(step: int):
        return loader.submit(batch_of, step) if loader is not None and step < end else None

    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm

        bar = tqdm(total=train_cfg.steps, initial=start, desc="train", unit="step")
    if rank == 0:
        forget_steps_after(out / "log.jsonl", start)  # a resumed run replays what came after its checkpoint
    log = open(out / "log.jsonl", "a", encoding="utf-8") if rank == 0 else None
    try:
        end = train_cfg.steps if stop_at is None else min(stop_at, train_cfg.steps)
        pending = request(start)
        for step in range(start, end):
            t0 = time.perf_counter()
            torch.manual_seed(train_cfg.seed * 1_000_003 + step)  # router noise etc.: a function of the step
            batch = pending.result() if pending is not None else batch_of(step)
            data_seconds = time.perf_counter() - t0  # waiting for the batch: ~0 when prefetching keeps up
            pending = request(step + 1)
            pixels, tokens = batch.pixels.to(device, non_blocking=True), batch.tokens.to(device, non_blocking=True)
            positives = equal_text_positives(gather_texts(batch.texts)) if train_cfg.multi_positive else None
            lr = learning_rate(step, train_cfg)
            for group in opt.param_groups:
                group["lr"] = lr
            with autocast:
                unmasked = step >= train_cfg.steps - train_cfg.unmasked_steps
                output, terms = forward_terms(ddp, pixels, tokens, batch.texts, model_cfg, train_cfg, positives,
                                              targets, ddp_head, mask_ratio=0.0 if unmasked else None)
            grad_norm = apply_gradients(opt, terms["total"], params, train_cfg.grad_clip)
            seconds = time.perf_counter() - t0
            done = step + 1
            if log is not None and (done % train_cfg.log_every == 0 or done == train_cfg.steps):
                record = {"step": done, "lr": lr, **{k: round(float(v.detach()), 6) for k, v in terms.items()},
                          "grad_norm": round(float(grad_norm), 4), "logit_scale": round(float(output.logit_scale.detach()), 4),
                          **({"logit_bias": round(float(output.logit_bias.detach()), 4)}
                             if output.logit_bias is not None else {}),
                          "examples_per_s": round(train_cfg.batch_size / seconds, 2),
                          "data_wait_s": round(data_seconds, 4),
                          "routing": {**routing_stats(output.image_routing, "image"),
                                      **routing_stats(output.text_routing, "text")}}
                log.write(json.dumps(record) + "\n")
                log.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(terms['total'].detach()):.3f}", lr=f"{lr:.2e}")
            if rank == 0 and (done % train_cfg.checkpoint_every == 0 or done in (train_cfg.steps, end)):
                _save(out, model, tokenizer, opt, done, train_cfg, meta, head)
            if rank == 0 and train_cfg.keep_every and done % train_cfg.keep_every == 0:
                (out / "steps").mkdir(exist_ok=True)
                save_weights(model, out / "steps" / f"model-{done}.safetensors", tokenizer,
                             {"step": done, "train": asdict(train_cfg), **(meta or {})})
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if loader is not None:
            loader.shutdown(cancel_futures=True)
        if pool is not None:
            pool.shutdown()
    if world > 1:
        dist.barrier()
    return model.eval()
