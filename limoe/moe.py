"""The sparse MoE layer: float32 router -> routing plan -> stacked experts -> combine.

Shape letters as in `limoe.routing`: B batch, T tokens per example, G groups, S tokens per
group, E experts, C capacity, K choices per token, D width, H expert hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from limoe.routing import RoutingPlan, combine, dispatch, expert_capacity, route


class Router(nn.Module):
    """No-bias linear map to expert logits, always computed in float32."""

    def __init__(self, width: int, num_experts: int, noise_std: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, width))  # (E, D)
        self.noise_std = noise_std
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(G, S, D) -> clean and (in training) noisy logits, both (G, S, E) float32."""
        logits = x.float() @ self.weight.float().t()
        if self.training and self.noise_std > 0:
            return logits, logits + self.noise_std * torch.randn_like(logits)
        return logits, logits


class Experts(nn.Module):
    """E two-layer GELU MLPs whose weights are stacked, applied with one batched matmul."""

    def __init__(self, num_experts: int, width: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, width, hidden))  # (E, D, H)
        self.b1 = nn.Parameter(torch.zeros(num_experts, 1, hidden))  # (E, 1, H)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, width))  # (E, H, D)
        self.b2 = nn.Parameter(torch.zeros(num_experts, 1, width))  # (E, 1, D)
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w2, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """(E, N, D) -> (E, N, D); row n of expert e only sees expert e's weights."""
        h = F.gelu(torch.baddbmm(self.b1, x, self.w1))  # (E, N, H)
        return torch.baddbmm(self.b2, h, self.w2)  # (E, N, D)


@dataclass
class RoutingInfo:
    """What one MoE layer did to one batch; the plan's tensors are in group layout (G, S, ...).

    `logits`/`noisy_logits` (G, S, E) feed the auxiliary losses; use `per_example` to see
    the plan as (B, T, ...) for routing maps.
    """

    layer: int
    plan: RoutingPlan
    logits: Tensor
    noisy_logits: Tensor
    noise_std: float
    tokens_per_example: int

    def per_example(self, t: Tensor) -> Tensor:
        """(G, S, ...) -> (B, T, ...)."""
        return t.reshape(-1, self.tokens_per_example, *t.shape[2:])

    @property
    def probs(self) -> Tensor:  # (B, T, E)
        return self.per_example(self.plan.probs)

    @property
    def expert_index(self) -> Tensor:  # (B, T, K)
        return self.per_example(self.plan.expert_index)

    @property
    def dropped(self) -> Tensor:  # (B, T, K) bool
        return self.per_example(self.plan.dropped)

    @property
    def mask(self) -> Tensor:  # (B, T) bool
        return self.per_example(self.plan.mask)


def examples_per_group(batch: int, wanted: int) -> int:
    """The largest divisor of `batch` that is <= `wanted`: groups must tile the batch."""
    g = max(1, min(wanted, batch))
    while batch % g:
        g -= 1
    return g


class MoELayer(nn.Module):
    """Drop-in replacement for the dense MLP of a transformer block."""

    def __init__(
        self,
        width: int,
        hidden: int,
        num_experts: int,
        top_k: int = 1,
        train_capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        batch_priority: bool = True,
        renormalize_gates: bool = False,
        router_noise_std: float = 0.0,
        train_group_size: int = 8,
        layer: int = 0,
    ):
        super().__init__()
        self.router = Router(width, num_experts, router_noise_std)
        self.experts = Experts(num_experts, width, hidden)
        self.num_experts, self.top_k, self.layer = num_experts, top_k, layer
        self.train_capacity_factor = train_capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.batch_priority, self.renormalize_gates = batch_priority, renormalize_gates
        self.train_group_size = train_group_size

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, RoutingInfo]:
        """x (B, T, D), mask (B, T) True for real tokens -> (B, T, D) and the routing info.

        Training routes `train_group_size` examples per group; inference routes every example
        as its own group, so an example's output never depends on its batch neighbours.
        """
        B, T, D = x.shape
        per_group = examples_per_group(B, self.train_group_size) if self.training else 1
        G, S = B // per_group, per_group * T
        factor = self.train_capacity_factor if self.training else self.eval_capacity_factor
        capacity = expert_capacity(S, self.num_experts, self.top_k, factor)

        xg = x.reshape(G, S, D)
        maskg = None if mask is None else mask.reshape(G, S)
        logits, noisy_logits = self.router(xg)  # (G, S, E) float32
        plan = route(noisy_logits, self.top_k, capacity, self.batch_priority, maskg,
                     self.renormalize_gates)
        y = combine(self.experts(dispatch(xg, plan)), plan)  # (G, S, D)
        info = RoutingInfo(self.layer, plan, logits, noisy_logits, self.router.noise_std, T)
        return y.reshape(B, T, D), info

    def extra_repr(self) -> str:
        return (f"E={self.num_experts}, K={self.top_k}, capacity_factor(train/eval)="
                f"{self.train_capacity_factor}/{self.eval_capacity_factor}, bpr={self.batch_priority}")

