"""Training losses as pure functions: contrastive, LIMoE's entropy regularisers, classic aux.

Shape letters as in `limoe.model.routing`: G groups, S tokens per group, E experts, N pairs, P dims.
All entropies use the natural log. Router probabilities arrive as float32.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from limoe.model.config import LIMoEConfig
from limoe.model.moe import RoutingInfo


def contrastive_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor,
                     positives: Tensor | None = None) -> Tensor:
    """Symmetric InfoNCE. image_emb, text_emb: (N, P) L2-normalised; pair i is (image i, text i).

    loss = (CE(s * I T^T, Y) + CE(s * T I^T, Y^T)) / 2 with s = exp(logit_scale). The target Y is
    the identity, or with `positives` (N, N) bool, its rows normalised: image i's target spreads
    evenly over every text j with positives[i, j] (UniCL's multi-positive form; two drawings of
    one concept in a batch are then not pushed apart). The diagonal always counts as positive.
    """
    logits = logit_scale.exp() * image_emb @ text_emb.t()  # (N, N)
    n = logits.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=logits.device)
    if positives is None:
        target = torch.arange(n, device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    pos = (positives.to(logits.device) | eye).to(logits.dtype)  # (N, N)
    return (F.cross_entropy(logits, pos / pos.sum(1, keepdim=True))
            + F.cross_entropy(logits.t(), pos.t() / pos.t().sum(1, keepdim=True))) / 2


def sigmoid_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, logit_bias: Tensor,
                 positives: Tensor | None = None) -> Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023). image_emb, text_emb: (N, P) L2-normalised.

    logits_ij = exp(logit_scale) * <I_i, T_j> + logit_bias, label z_ij = +1 for a matching pair
    (the diagonal, plus `positives` (N, N) bool when given) and -1 otherwise;
    loss = -(1/N) sum_ij log sigmoid(z_ij * logits_ij): every pair an independent binary
    decision, so no batch-wide normalisation (the reason it holds up at small batches).
    """
    logits = logit_scale.exp() * image_emb @ text_emb.t() + logit_bias  # (N, N)
    n = logits.shape[0]
    pos = torch.eye(n, dtype=torch.bool, device=logits.device)
    if positives is not None:
        pos = pos | positives.to(logits.device)
    z = pos.to(logits.dtype) * 2 - 1  # (N, N), +1 / -1
    return -F.logsigmoid(z * logits).sum() / n


def distillation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Cosine distance to a frozen teacher, mean over the batch. student: (N, Q) the student's text
    embedding after its learned projection into the teacher's space; teacher: (N, Q) the teacher's
    embedding of the same texts. loss = mean_i (1 - cos(student_i, teacher_i)), in [0, 2]."""
    return (1 - F.cosine_similarity(student, teacher.to(student.dtype), dim=-1)).mean()


def entropy(p: Tensor, dim: int = -1) -> Tensor:
    """H(p) = -sum p log p, with 0 log 0 = 0."""
    return -torch.xlogy(p, p).sum(dim)


def _masked_mean(x: Tensor, mask: Tensor, dim: int) -> Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def local_entropy_loss(probs: Tensor, mask: Tensor) -> Tensor:
    """mean_i H(p_i) over the real tokens i of all groups. probs (G, S, E), mask (G, S).

    Minimising it makes every token route decisively (one-hot p_i gives 0)."""
    return _masked_mean(entropy(probs), mask, dim=(0, 1))


def global_entropy_loss(probs: Tensor, mask: Tensor, min_experts: float) -> Tensor:
    """mean over groups of max(0, log(S) - H(mean_i p_i)), S = `min_experts`.

    H of the average routing distribution is low when the modality uses few experts, so the
    penalty is 0 once it spreads over at least ~S experts and log(S) at total collapse."""
    p_mean = _masked_mean(probs, mask.unsqueeze(-1), dim=1)  # (G, E)
    return F.relu(math.log(min_experts) - entropy(p_mean)).mean()


def _cv_squared(x: Tensor) -> Tensor:
    """(std / mean)^2 along the last axis (population std), averaged over the rest."""
    return (x.var(dim=-1, unbiased=False) / x.mean(dim=-1).pow(2).clamp_min(1e-9)).mean()


def importance_loss(probs: Tensor, mask: Tensor) -> Tensor:
    """Shazeer et al. 2017: CV^2 of importance_e = sum_i p_ie, per group. 0 when balanced."""
    importance = (probs * mask.unsqueeze(-1).to(probs.dtype)).sum(dim=1)  # (G, E)
    return _cv_squared(importance)


def load_loss(logits: Tensor, noisy_logits: Tensor, noise_std: float, top_k: int,
              mask: Tensor) -> Tensor:
    """V-MoE's load loss: CV^2 of load_e = sum_i P(e is among token i's top-K under noise).

    A token's threshold is its K-th largest noisy logit; expert e is picked when its clean
    logit plus fresh noise beats it: P = 1 - Phi((threshold - logit_e) / noise_std)."""
    threshold = noisy_logits.topk(top_k, dim=-1).values[..., -1:]  # (G, S, 1)
    normal = torch.distributions.Normal(0.0, 1.0)
    p_selected = 1 - normal.cdf((threshold - logits) / noise_std)  # (G, S, E)
    load = (p_selected * mask.unsqueeze(-1).to(p_selected.dtype)).sum(dim=1)  # (G, E)
    return _cv_squared(load)


def auxiliary_losses(routing: Sequence[RoutingInfo], modality: str, cfg: LIMoEConfig) -> dict[str, Tensor]:
    """Weighted auxiliary terms for one modality's forward pass, each the mean over MoE layers.

    Returns e.g. {"local_entropy_image": ..., "global_entropy_image": ...} (already weighted)."""
    if not routing or cfg.aux_loss == "none":
        return {}
    terms: dict[str, list[Tensor]] = {}
    for info in routing:
        p, m = info.plan.probs, info.plan.mask
        if cfg.aux_loss == "entropy":
            w_local = getattr(cfg, f"local_entropy_weight_{modality}")
            w_global = getattr(cfg, f"global_entropy_weight_{modality}")
            s = getattr(cfg, f"global_entropy_min_experts_{modality}")
            terms.setdefault(f"local_entropy_{modality}", []).append(w_local * local_entropy_loss(p, m))
            terms.setdefault(f"global_entropy_{modality}", []).append(w_global * global_entropy_loss(p, m, s))
        else:  # classic
            terms.setdefault(f"importance_{modality}", []).append(cfg.importance_weight * importance_loss(p, m))
            terms.setdefault(f"load_{modality}", []).append(
                cfg.load_weight * load_loss(info.logits, info.noisy_logits, info.noise_std, cfg.top_k, m))
    return {name: torch.stack(v).mean() for name, v in terms.items()}


def limoe_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor,
               image_routing: Sequence[RoutingInfo], text_routing: Sequence[RoutingInfo],
               cfg: LIMoEConfig, positives: Tensor | None = None,
               logit_bias: Tensor | None = None) -> dict[str, Tensor]:
    """All named loss terms plus their sum under "total" (`positives`: see contrastive_loss). The
    contrastive term is cfg.contrastive_loss's: softmax InfoNCE, or the sigmoid loss with `logit_bias`."""
    if cfg.contrastive_loss == "sigmoid":
        if logit_bias is None:
            raise ValueError("contrastive_loss='sigmoid' needs the model's logit_bias")
        terms = {"contrastive": sigmoid_loss(image_emb, text_emb, logit_scale, logit_bias, positives)}
    else:
        terms = {"contrastive": contrastive_loss(image_emb, text_emb, logit_scale, positives)}
    terms.update(auxiliary_losses(image_routing, "image", cfg))
    terms.update(auxiliary_losses(text_routing, "text", cfg))
    terms["total"] = torch.stack(list(terms.values())).sum()
    return terms
