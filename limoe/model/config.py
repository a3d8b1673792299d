"""Model configuration: one flat dataclass and named presets.

The config is saved inside every checkpoint and manifest, so a model can be rebuilt from it
alone. Only plain JSON types live here (ints, floats, strings, lists), no torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LIMoEConfig:
    # --- image input ------------------------------------------------------------------------
    image_size: int = 64  # side of the square input image in pixels
    patch_size: int = 8  # side of a square patch; image_size must be a multiple of it
    in_channels: int = 3  # RGB
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)  # per-channel, on [0, 1]
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    # --- text input -------------------------------------------------------------------------
    vocab_size: int = 4096  # subword vocabulary size; must match the tokenizer
    context_length: int = 16  # every text is padded / truncated to this many tokens
    pad_id: int = 0  # token id of padding; padded positions are masked everywhere
    # --- the transformer -----------------------------------------------------------------------
    # "one_tower" (LIMoE): one transformer shared by image and text tokens. "two_tower" (the CLIP /
    # ALIGN baseline): an image transformer and a text transformer of this same shape that share no
    # weight, so active FLOPs per image and per text equal the one-tower model's.
    arch: str = "one_tower"
    width: int = 192  # D, residual stream width
    depth: int = 6  # number of pre-LayerNorm blocks
    num_heads: int = 3  # attention heads; width must be a multiple of it
    mlp_dim: int = 768  # H, hidden width of every MLP and of every expert
    # --- per-modality heads -------------------------------------------------------------------
    embed_dim: int = 128  # size of the shared, L2-normalised embedding space
    logit_scale_init: float = math.log(1 / 0.07)  # learned temperature, CLIP's initial value
    logit_scale_max: float = math.log(100.0)  # clamp so the temperature never explodes
    # Contrastive loss: "softmax" (CLIP's symmetric InfoNCE) or "sigmoid" (SigLIP, Zhai et al. 2023:
    # every image-text pair an independent binary label, with a learned bias; better at small batches).
    contrastive_loss: str = "softmax"
    sigmoid_logit_scale_init: float = math.log(10.0)  # SigLIP's t' = log 10 (replaces logit_scale_init)
    logit_bias_init: float = -10.0  # SigLIP's b: starts every pair far on the negative side
    # FLIP (Li et al. 2023): in training, each image keeps a random (1 - ratio) of its patches and the
    # tower runs on those alone; routing, capacity and BPR see the kept tokens only. 0 = off.
    image_mask_ratio: float = 0.0
    # --- mixture of experts -------------------------------------------------------------------
    num_experts: int = 8  # E; experts per MoE layer
    top_k: int = 1  # K; experts chosen per token
    moe_layers: str = "every_2"  # "every_N" (blocks N-1, 2N-1, ...), "last_N", "none" or "1,3,5"
    train_capacity_factor: float = 1.0  # C = ceil(K * S * factor / E) while training
    eval_capacity_factor: float = 1.0  # the same at inference with "capacity" routing
    # Inference: "dropless" computes every token's K choices (nothing dropped); "capacity" keeps
    # training's fixed capacity, one routing group per example, eval_capacity_factor (comparison).
    inference_routing: str = "dropless"
    batch_priority: bool = True  # Batch Priority Routing: confident tokens claim slots first
    # Gate renormalisation. False (default, V-MoE): a token's output is sum_k p_k * expert_k(x),
    # so with K=1 the layer is the chosen expert scaled by its router probability and the main
    # loss trains the router. True: gates are divided by their sum over the K choices; with
    # K=1 every gate is exactly 1 and only the auxiliary losses train the router.
    renormalize_gates: bool = False
    router_noise_std: float = 0.0  # std of Gaussian noise on router logits in training (V-MoE: 1/E)
    train_group_size: int = 8  # examples per routing group in training; inference uses 1
    # --- auxiliary routing losses (weights; summed over MoE layers' mean) ---------------------
    aux_loss: str = "entropy"  # "entropy" (LIMoE), "classic" (importance + load) or "none"
    local_entropy_weight_image: float = 0.01  # mean_i H(p_i) over image tokens
    local_entropy_weight_text: float = 0.01  # ... over text tokens
    global_entropy_weight_image: float = 0.1  # max(0, log S - H(mean_i p_i)) over image tokens
    global_entropy_weight_text: float = 0.1
    global_entropy_min_experts_image: float = 4.0  # S for images: tau = log(S)
    global_entropy_min_experts_text: float = 4.0  # S for text
    importance_weight: float = 0.005  # classic: CV^2 of per-expert summed probabilities
    load_weight: float = 0.005  # classic: CV^2 of per-expert selection probability under noise

    # -- derived ---------------------------------------------------------------------------------
    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        return moe_layer_ids(self.depth, self.moe_layers)

    def __post_init__(self) -> None:
        problems = []
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            problems.append(f"width {self.width} is not a multiple of num_heads {self.num_heads}")
        if not 1 <= self.top_k <= self.num_experts:
            problems.append(f"top_k {self.top_k} must be in [1, num_experts={self.num_experts}]")
        if min(self.train_capacity_factor, self.eval_capacity_factor) <= 0:
            problems.append("capacity factors must be positive")
        if self.inference_routing not in ("dropless", "capacity"):
            problems.append(f"inference_routing must be 'dropless' or 'capacity', not {self.inference_routing!r}")
        if self.arch not in ("one_tower", "two_tower"):
            problems.append(f"arch must be 'one_tower' or 'two_tower', not {self.arch!r}")
        if self.aux_loss not in ("entropy", "classic", "none"):
            problems.append(f"aux_loss must be 'entropy', 'classic' or 'none', not {self.aux_loss!r}")
        if self.aux_loss == "classic" and self.moe_layer_ids and self.router_noise_std <= 0:
            problems.append("aux_loss='classic' needs router_noise_std > 0 (the load loss is defined by noise)")
        if self.contrastive_loss not in ("softmax", "sigmoid"):
            problems.append(f"contrastive_loss must be 'softmax' or 'sigmoid', not {self.contrastive_loss!r}")
        if not 0 <= self.image_mask_ratio < 1 or round(self.num_patches * (1 - self.image_mask_ratio)) < 1:
            problems.append(f"image_mask_ratio {self.image_mask_ratio} must be in [0, 1) and keep at least one patch")
        if self.train_group_size < 1:
            problems.append("train_group_size must be >= 1")
        if len(self.image_mean) != self.in_channels or len(self.image_std) != self.in_channels:
            problems.append("image_mean and image_std need one value per input channel")
        try:
            moe_layer_ids(self.depth, self.moe_layers)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("invalid LIMoEConfig: " + "; ".join(problems))

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LIMoEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown LIMoEConfig fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def replace(self, **changes: Any) -> "LIMoEConfig":
        return dataclasses.replace(self, **changes)


def moe_layer_ids(depth: int, placement: str) -> tuple[int, ...]:
    """Which blocks (0-based) hold an MoE layer instead of a dense MLP.

    "every_2" -> 1, 3, 5, ... (V-MoE's "every other layer"); "last_2" -> depth-2, depth-1;
    "none" -> (); "0,3" -> exactly those blocks.
    """
    p = placement.strip()
    if p == "none":
        return ()
    if p.startswith("every_"):
        n = int(p[len("every_"):])
        if n < 1:
            raise ValueError(f"moe_layers {placement!r}: N must be >= 1")
        return tuple(i for i in range(depth) if (i + 1) % n == 0)
    if p.startswith("last_"):
        n = int(p[len("last_"):])
        if not 0 <= n <= depth:
            raise ValueError(f"moe_layers {placement!r}: N must be in [0, depth={depth}]")
        return tuple(range(depth - n, depth))
    try:
        ids = tuple(sorted({int(x) for x in p.split(",") if x.strip()}))
    except ValueError:
        raise ValueError(f"moe_layers {placement!r} is not 'every_N', 'last_N', 'none' or a list") from None
    if any(not 0 <= i < depth for i in ids):
        raise ValueError(f"moe_layers {placement!r}: block ids must be in [0, {depth})")
    return ids


# Named presets. `tiny` is for tests (milliseconds), `small` is the default model trained on
# 2 CPU cores, the rest are the paper's ViT shapes (224 px, 16 text tokens, 32k vocabulary).
_PAPER_TEXT = dict(vocab_size=32_000, context_length=16, image_size=224)
PRESETS: dict[str, LIMoEConfig] = {
    "tiny": LIMoEConfig(
        image_size=16, patch_size=4, vocab_size=512, context_length=8, width=32, depth=2,
        num_heads=2, mlp_dim=64, embed_dim=16, num_experts=4, train_group_size=2,
        global_entropy_min_experts_image=2.0, global_entropy_min_experts_text=2.0,
    ),
    "small": LIMoEConfig(),
    "B/32": LIMoEConfig(**_PAPER_TEXT, patch_size=32, width=768, depth=12, num_heads=12,
                        mlp_dim=3072, embed_dim=768, num_experts=8, router_noise_std=1 / 8),
    "B/16": LIMoEConfig(**_PAPER_TEXT, patch_size=16, width=768, depth=12, num_heads=12,
                        mlp_dim=3072, embed_dim=768, num_experts=8, router_noise_std=1 / 8),
    "L/16": LIMoEConfig(**_PAPER_TEXT, patch_size=16, width=1024, depth=24, num_heads=16,
                        mlp_dim=4096, embed_dim=1024, num_experts=32, router_noise_std=1 / 32,
                        global_entropy_min_experts_image=16.0, global_entropy_min_experts_text=16.0),
}


def get_config(name: str, **overrides: Any) -> LIMoEConfig:
    """A preset by name, with field overrides (e.g. get_config("small", moe_layers="none"))."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
    return base.replace(**overrides) if overrides else base


def dense_counterpart(cfg: LIMoEConfig) -> LIMoEConfig:
    """The dense model with the same active FLOPs per token as a K=1 LIMoE: no MoE layers."""
    if cfg.top_k != 1:
        raise ValueError("a dense model matches a LIMoE's active FLOPs only for top_k=1")
    return cfg.replace(moe_layers="none", aux_loss="none")


def two_tower_counterpart(cfg: LIMoEConfig) -> LIMoEConfig:
    """The CLIP-style two-tower model with the same active FLOPs per image and per text as a K=1
    LIMoE: a dense image tower and a dense text tower, each of the one tower's shape. An image
    crosses exactly the blocks it crosses in the one-tower model, and so does a text; only the
    total parameter count doubles (limoe info states both)."""
    return dense_counterpart(cfg).replace(arch="two_tower")


__all__ = ["LIMoEConfig", "PRESETS", "get_config", "moe_layer_ids", "dense_counterpart", "two_tower_counterpart"]
