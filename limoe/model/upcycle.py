"""Sparse upcycling (Komatsuzaki et al., ICLR 2023): a dense model's chosen MLP blocks become MoE
layers whose E experts all start as copies of that MLP.

    dense block i:   y = fc2(gelu(fc1(x)))
    upcycled:        y = sum_k g_k(x) * expert_{e_k}(x),  expert_e = the same fc1/fc2 for every e,
                     g = the top-K router probabilities renormalised to sum to 1

so at step 0 every token's output is exactly the dense one, whatever the router says (with
dropless routing, as inference runs; capacity routing in training may drop a token's choice, and
then only the residual passes). The router starts at its usual small random init; training
(`limoe train --init`) with the LIMoE entropy losses then lets the copies diverge.
Everything else (attention, norms, embeddings, heads, temperature) is copied unchanged.

`upcycle_clip` does the same to an OpenCLIP model (`limoe.model.clip.CLIP`, e.g. imported weights):
in both towers, its MLPs c_proj(act(c_fc(.))) become experts with the same activation (GELU, or
QuickGELU for OpenAI's weights).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from limoe.model.clip import CLIP
from limoe.model.config import LIMoEConfig
from limoe.model.moe import MoELayer
from limoe.model.transformer import LIMoE, build_model


def upcycled_config(cfg: LIMoEConfig, num_experts: int, top_k: int, moe_layers: str) -> LIMoEConfig:
    """The sparse config of a dense one: MoE in `moe_layers`, renormalised top-K gates, dropless
    inference and LIMoE's entropy losses (the aux-free dense baseline had none)."""
    if cfg.moe_layer_ids:
        raise ValueError(f"the source already has MoE layers in blocks {list(cfg.moe_layer_ids)}; "
                         "upcycle a dense model")
    aux = cfg.aux_loss if cfg.aux_loss != "none" else "entropy"
    return cfg.replace(moe_layers=moe_layers, num_experts=num_experts, top_k=top_k, renormalize_gates=True,
                       inference_routing="dropless", aux_loss=aux)


def upcycle(dense: LIMoE, num_experts: int, top_k: int = 2, moe_layers: str = "every_2", seed: int = 0) -> LIMoE:
    """A new model of `upcycled_config` whose experts are copies of `dense`'s MLPs (see above)."""
    cfg = upcycled_config(dense.cfg, num_experts, top_k, moe_layers)
    torch.manual_seed(seed)  # the routers' init
    return _copy_weights(dense.state_dict(), build_model(cfg), "fc1", "fc2")


def upcycle_clip(dense: CLIP, num_experts: int, top_k: int = 2, moe_every: int = 2, seed: int = 0) -> CLIP:
    """A sparse CLIP whose blocks `every_{moe_every}` (in each tower) hold MoE layers of copies of
    `dense`'s MLPs, with renormalised top-K gates and dropless inference (see above)."""
    if dense.cfg.vision_moe_ids or dense.cfg.text_moe_ids:
        raise ValueError(f"the source already has MoE layers ({dense.cfg.moe_layers}); upcycle a dense model")
    cfg = dense.cfg.replace(moe_layers=f"every_{moe_every}", num_experts=num_experts, top_k=top_k,
                            renormalize_gates=True, inference_routing="dropless")
    torch.manual_seed(seed)  # the routers' init
    return _copy_weights(dense.state_dict(), CLIP(cfg), "c_fc", "c_proj")


def _copy_weights(src: dict[str, Tensor], sparse: nn.Module, fc1: str, fc2: str) -> nn.Module:
    """Every tensor of `src` that `sparse` has, and each MoE layer's experts from the dense MLP
    `fc2(act(fc1(.)))` that had the MoE layer's path; the routers keep their init."""
    state = sparse.state_dict()
    for name in state:
        if name in src:
            state[name] = src[name].clone()
    for mlp, module in sparse.named_modules():
        if not isinstance(module, MoELayer):
            continue
        w1, b1 = src[f"{mlp}.{fc1}.weight"], src[f"{mlp}.{fc1}.bias"]  # (H, D), (H,)
        w2, b2 = src[f"{mlp}.{fc2}.weight"], src[f"{mlp}.{fc2}.bias"]  # (D, H), (D,)
        E = module.num_experts
        state[f"{mlp}.experts.w1"] = w1.t().expand(E, -1, -1).clone()  # (E, D, H)
        state[f"{mlp}.experts.b1"] = b1.expand(E, 1, -1).clone()  # (E, 1, H)
        state[f"{mlp}.experts.w2"] = w2.t().expand(E, -1, -1).clone()  # (E, H, D)
        state[f"{mlp}.experts.b2"] = b2.expand(E, 1, -1).clone()  # (E, 1, D)
    sparse.load_state_dict(state, strict=True)
    return sparse.eval()


__all__ = ["upcycled_config", "upcycle", "upcycle_clip"]
