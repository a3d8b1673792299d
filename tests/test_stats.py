"""Parameter and FLOP counts agree with the real modules."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from limoe.model.config import PRESETS, get_config
from limoe.model.stats import flops_per_example, model_stats
from limoe.model.transformer import LIMoE


def _math_sdpa(q, k, v, attn_mask=None, **_):
    """Attention as plain matmuls, so FlopCounterMode sees it (the fused CPU kernel is invisible)."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_executed_flops_match_torch_flop_counter(preset, monkeypatch):
    cfg = get_config(preset)
    model = LIMoE(cfg).eval()
    monkeypatch.setattr(F, "scaled_dot_product_attention", _math_sdpa)
    B = 2
    with FlopCounterMode(display=False) as fc:
        model.encode_image(torch.randn(B, 3, cfg.image_size, cfg.image_size))
    assert fc.get_total_flops() == B * flops_per_example(cfg, "image", executed=True)
    with FlopCounterMode(display=False) as fc:
        model.encode_text(torch.randint(3, cfg.vocab_size, (B, cfg.context_length)))
    assert fc.get_total_flops() == B * flops_per_example(cfg, "text", executed=True)


def test_active_flops_equal_the_dense_counterpart_plus_routers():
    # K = 1 and capacity factor 1 with S divisible by E: a LIMoE computes what the dense model
    # computes, plus one router matmul (2 * T * D * E) per MoE layer.
    cfg = get_config("small")
    dense = cfg.replace(moe_layers="none")
    T, D, E = cfg.num_patches, cfg.width, cfg.num_experts
    routers = len(cfg.moe_layer_ids) * 2 * T * D * E
    assert flops_per_example(cfg, "image") == flops_per_example(dense, "image") + routers
    assert flops_per_example(cfg, "image", executed=True) == flops_per_example(cfg, "image")


def test_parameter_counts():
    cfg = get_config("small")
    s = model_stats(cfg)
    assert s.total_params == sum(p.numel() for p in LIMoE(cfg).parameters())
    D, H, E = cfg.width, cfg.mlp_dim, cfg.num_experts
    per_expert = D * H + H + H * D + D
    assert s.total_params - s.active_params == 3 * (E - 1) * per_expert  # 3 MoE layers
    # A ViT-B-sized tower: ~86M dense transformer parameters, plus 7 extra experts in 6 layers.
    b16 = model_stats(PRESETS["B/16"])
    assert 110e6 < b16.active_params < 140e6
    assert b16.total_params - b16.active_params == 6 * 7 * (2 * 768 * 3072 + 3072 + 768)
