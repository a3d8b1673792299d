"""Parameter and FLOP counts for any config, written out layer by layer.

FLOPs count a multiply-add as 2 and cover matmuls, convolutions and attention (the terms
torch's FlopCounterMode counts); norms, activations and the softmax are ignored.
"Active" means per token: a MoE layer costs its router plus K experts. "Executed" is what the
batched implementation really computes at the inference capacity: E * C slots per example.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from limoe.model.config import LIMoEConfig
from limoe.model.routing import expert_capacity


@dataclass(frozen=True)
class ModelStats:
    total_params: int
    active_params: int  # all parameters but the E-K experts a token skips in each MoE layer
    image_flops: int  # active FLOPs per image
    text_flops: int  # active FLOPs per text
    image_flops_executed: int  # FLOPs actually computed per image at eval capacity
    text_flops_executed: int


def _attention_flops(q_len: int, kv_len: int, D: int) -> int:
    """q proj, kv proj, scores, weighted values, out proj."""
    return 2 * q_len * D * D + 2 * kv_len * D * 2 * D + 2 * 2 * q_len * kv_len * D + 2 * q_len * D * D


def _tower_flops(cfg: LIMoEConfig, T: int, executed: bool) -> int:
    D, H, E, K = cfg.width, cfg.mlp_dim, cfg.num_experts, cfg.top_k
    moe = set(cfg.moe_layer_ids)
    mlp = 2 * 2 * D * H  # per token
    total = 0
    for i in range(cfg.depth):
        total += _attention_flops(T, T, D)
        if i in moe:
            slots = E * expert_capacity(T, E, K, cfg.eval_capacity_factor) if executed else K * T
            total += 2 * T * D * E + slots * mlp  # router + experts
        else:
            total += T * mlp
    pooling = _attention_flops(1, T, D) + mlp  # MAP head: probe attention + its MLP
    return total + pooling + 2 * D * cfg.embed_dim  # + projection


def flops_per_example(cfg: LIMoEConfig, modality: str, executed: bool = False) -> int:
    if modality == "image":
        patch = 2 * cfg.num_patches * cfg.in_channels * cfg.patch_size ** 2 * cfg.width
        return patch + _tower_flops(cfg, cfg.num_patches, executed)
    if modality == "text":
        return _tower_flops(cfg, cfg.context_length, executed)
    raise ValueError(f"modality must be 'image' or 'text', not {modality!r}")


def model_stats(cfg: LIMoEConfig) -> ModelStats:
    from limoe.model.transformer import build_model  # build on the meta device: exact counts, no memory

    with torch.device("meta"):
        model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    per_expert = 2 * cfg.width * cfg.mlp_dim + cfg.mlp_dim + cfg.width
    towers = 2 if cfg.arch == "two_tower" else 1
    inactive = towers * len(cfg.moe_layer_ids) * (cfg.num_experts - cfg.top_k) * per_expert
    return ModelStats(
        total_params=total,
        active_params=total - inactive,
        image_flops=flops_per_example(cfg, "image"),
        text_flops=flops_per_example(cfg, "text"),
        image_flops_executed=flops_per_example(cfg, "image", executed=True),
        text_flops_executed=flops_per_example(cfg, "text", executed=True),
    )


def format_table(names: list[str], configs: list[LIMoEConfig]) -> str:
    rows = [("preset", "experts", "MoE blocks", "total params", "active params",
             "GFLOPs/image", "GFLOPs/text")]
    for name, cfg in zip(names, configs):
        s = model_stats(cfg)
        rows.append((name, f"{cfg.num_experts}x top-{cfg.top_k}" if cfg.moe_layer_ids else "-", ",".join(map(str, cfg.moe_layer_ids)) or "-",
                     f"{s.total_params / 1e6:,.2f}M", f"{s.active_params / 1e6:,.2f}M",
                     f"{s.image_flops / 1e9:,.3f}", f"{s.text_flops / 1e9:,.4f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)
