"""Top-K token routing with fixed expert capacity and Batch Priority Routing (V-MoE, LIMoE).

Shape letters used in every docstring of this module and of `moe.py`:

    B  examples in the batch            T  tokens per example
    G  routing groups                    S  tokens per group (S = examples_per_group * T)
    E  experts                           C  capacity: buffer slots per expert per group
    K  experts chosen per token          D  model width,  H  expert hidden width

Routing is done independently per group. Every token picks its top-K experts by router
probability. Each expert has C slots per group; slots are handed out choice by choice (all
tokens' 1st choices before any 2nd choice), and within a choice either in token order (plain
routing) or from the most to the least confident token (Batch Priority Routing: confidence is
the token's top-1 probability). A choice that finds its expert full is dropped: the token skips
that expert, and if all its choices are dropped it passes through the residual connection only.

Dropless routing (`route_dropless`, inference) makes the same top-K choices with no capacity:
nothing is ever dropped, and `limoe.model.moe.dropless_experts` runs each expert on exactly the tokens
that chose it (MegaBlocks' dMoE, Tutel with capacity factor 0).

Capacity routing has static shapes (argsort, cumsum, gather) so it exports to ONNX/TorchScript.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def expert_capacity(tokens_per_group: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C = ceil(K * S * factor / E), at least 1 and at most S (an expert never needs more slots
    than there are tokens, since a token picks an expert at most once). From shapes only."""
    c = math.ceil(top_k * tokens_per_group * capacity_factor / num_experts)
    return max(1, min(c, tokens_per_group))


@dataclass
class RoutingPlan:
    """Where every token's K choices go. All tensors are in group layout.

    probs:        (G, S, E) float32 router softmax
    expert_index: (G, S, K) chosen experts, best first
    gates:        (G, S, K) combine weight of each choice (0 for dropped or padded choices)
    slot:         (G, S, K) int64 flat buffer position e * C + c, or E * C ("nowhere") if the
                  choice was dropped or the token is padding; None for a dropless plan
    dropped:      (G, S, K) bool, a real token's choice that found its expert full
    mask:         (G, S) bool, True for real tokens (False for padding, which is never routed)
    capacity:     C, or None for a dropless plan (no buffers: every choice is computed)
    """

    probs: Tensor
    expert_index: Tensor
    gates: Tensor
    slot: Tensor | None
    dropped: Tensor
    mask: Tensor
    capacity: int | None

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def dropless(self) -> bool:
        return self.capacity is None

    @property
    def kept(self) -> Tensor:
        """(G, S, K) bool: choices that are computed (got a buffer slot, or any real token's
        choice in a dropless plan)."""
        if self.dropless:
            return self.mask.unsqueeze(-1).expand_as(self.expert_index)
        return self.slot < self.num_experts * self.capacity

    @property
    def position(self) -> Tensor:
        """(G, S, K) slot index c within the chosen expert's buffer, -1 where not kept."""
        return torch.where(self.kept, self.slot % self.capacity, torch.full_like(self.slot, -1))


def _priority_order(top1: Tensor, mask: Tensor) -> Tensor:
    """(G, S) token indices from the most to the least confident; ties go to the lower index,
    padding last. A top-K over one float64 key (no sort op, so it exports to ONNX): top-1
    probabilities are >= 1/E, where float32 values are >= 2^-29 apart, so subtracting
    index * 2^-30 / S only orders equal values."""
    S = top1.shape[1]
    index = torch.arange(S, device=top1.device, dtype=torch.float64)
    key = torch.where(mask, top1.double(), torch.full_like(top1, -1.0, dtype=torch.float64))
    return (key - index * (2.0 ** -30 / S)).topk(S, dim=1).indices


def _choose(logits: Tensor, top_k: int, mask: Tensor | None, renormalize: bool
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Router logits (G, S, E) -> float32 probs (G, S, E), each token's top-K experts and gates
    (G, S, K), best first (gates 0 for padding), and the (G, S) mask of real tokens."""
    G, S, _ = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)  # (G, S, E)
    if mask is None:
        mask = torch.ones(G, S, dtype=torch.bool, device=logits.device)
    gates, expert_index = probs.topk(top_k, dim=-1)  # (G, S, K) each, best choice first
    if renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return probs, expert_index, gates * mask.unsqueeze(-1), mask


def route_dropless(logits: Tensor, top_k: int, mask: Tensor | None = None, renormalize: bool = False
                   ) -> RoutingPlan:
    """The same top-K choices as `route`, with no capacity: every real token's K choices are
    kept, so `dropped` is all False and there is no priority order to apply. A token's plan
    depends on that token alone, whatever its group."""
    probs, expert_index, gates, mask = _choose(logits, top_k, mask, renormalize)
    return RoutingPlan(probs=probs, expert_index=expert_index, gates=gates, slot=None,
                       dropped=torch.zeros_like(expert_index, dtype=torch.bool), mask=mask, capacity=None)


def route(
    logits: Tensor,
    top_k: int,
    capacity: int,
    batch_priority: bool = True,
    mask: Tensor | None = None,
    renormalize: bool = False,
) -> RoutingPlan:
    """Build the dispatch plan for router `logits` of shape (G, S, E).

    `mask` (G, S) marks real tokens; padded tokens take no slot and have zero gates.
    The softmax runs in float32 whatever the input dtype.
    """
    G, S, E = logits.shape
    K = top_k
    probs, expert_index, gates, mask = _choose(logits, top_k, mask, renormalize)

    # Order in which tokens claim slots: by decreasing top-1 probability (BPR) or by index.
    if batch_priority:
        order = _priority_order(gates[..., 0], mask)  # (G, S)
    else:
        order = torch.arange(S, device=logits.device).expand(G, S)
    index_sorted = expert_index.gather(1, order.unsqueeze(-1).expand(G, S, K))  # (G, S, K)
    mask_sorted = mask.gather(1, order)  # (G, S)

    # All 1st choices before any 2nd choice: lay choices out as (G, K*S) with K outermost, then
    # the position of a choice inside its expert's buffer is the number of earlier choices of
    # the same expert.
    onehot = F.one_hot(index_sorted, E) * mask_sorted[..., None, None]  # (G, S, K, E)
    onehot = onehot.transpose(1, 2).reshape(G, K * S, E)  # (G, K*S, E)
    position_sorted = ((onehot.cumsum(dim=1) - 1) * onehot).sum(dim=-1)  # (G, K*S)
    position_sorted = position_sorted.reshape(G, K, S).transpose(1, 2)  # (G, S, K)
    # Undo the sort: sorted place j belongs to token order[j].
    position = torch.zeros_like(position_sorted).scatter(1, order.unsqueeze(-1).expand(G, S, K),
                                                         position_sorted)

    real = mask.unsqueeze(-1).expand(G, S, K)
    kept = real & (position < capacity)
    nowhere = torch.full_like(position, E * capacity)
    slot = torch.where(kept, expert_index * capacity + position, nowhere)
    return RoutingPlan(
        probs=probs,
        expert_index=expert_index,
        gates=gates * kept,
        slot=slot,
        dropped=real & ~kept,
        mask=mask,
        capacity=capacity,
    )


def _buffer_rows(plan: RoutingPlan) -> Tensor:
    """(G*S*K,) row of every choice in the experts' flat (E*G*C + 1)-row buffer.

    Rows are expert-major (e, g, c) so the buffer is a free view as (E, G*C, D); row E*G*C is
    where dropped and padded choices point: it holds zeros and no expert reads it."""
    G, S, K = plan.slot.shape
    E, C = plan.num_experts, plan.capacity
    group = torch.arange(G, device=plan.slot.device).view(G, 1, 1)
    row = (plan.slot // C) * (G * C) + group * C + plan.slot % C
    return torch.where(plan.kept, row, torch.full_like(row, E * G * C)).reshape(G * S * K)


def _with_zero_row(x: Tensor) -> Tensor:
    """(N, D) -> (N + 1, D), the last row zeros."""
    return torch.cat([x, x.new_zeros(1, x.shape[-1])])


def dispatch(x: Tensor, plan: RoutingPlan) -> Tensor:
    """Gather tokens into expert buffers: (G, S, D) -> (E, G*C, D). Empty slots hold zeros."""
    G, S, D = x.shape
    K = plan.slot.shape[-1]
    E, C = plan.num_experts, plan.capacity
    rows = _buffer_rows(plan)  # (G*S*K,)
    token = torch.arange(G * S * K, device=x.device) // K  # the token making each choice
    # Which token fills each buffer row; unfilled rows read token G*S, a zero row.
    source = torch.full((E * G * C + 1,), G * S, dtype=rows.dtype, device=x.device).scatter(0, rows, token)
    buffer = _with_zero_row(x.reshape(G * S, D)).index_select(0, source[: E * G * C])  # (E*G*C, D)
    return buffer.view(E, G * C, D)


def combine(expert_out: Tensor, plan: RoutingPlan) -> Tensor:
    """Weighted sum of each token's expert outputs: (E, G*C, D) -> (G, S, D).

    Dropped choices read the zero row, so a fully dropped token gets 0 (residual only)."""
    E, GC, D = expert_out.shape
    G, S, K = plan.slot.shape
    y = _with_zero_row(expert_out.reshape(E * GC, D)).index_select(0, _buffer_rows(plan))
    y = y.view(G, S, K, D)  # (G, S, K, D)
    return (y * plan.gates.to(y.dtype).unsqueeze(-1)).sum(dim=2)  # (G, S, D)
