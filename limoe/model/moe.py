"""The sparse MoE layer: float32 router -> routing plan -> stacked experts -> combine.

Shape letters as in `limoe.model.routing`: B batch, T tokens per example, G groups, S tokens per
group, E experts, C capacity, K choices per token, D width, H expert hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from limoe.model.routing import RoutingPlan, combine, dispatch, expert_capacity, route, route_dropless

INFERENCE_ROUTING = ("dropless", "capacity")


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


def quick_gelu(x: Tensor) -> Tensor:
    """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x): its MLPs, and so its upcycled experts."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"gelu": F.gelu, "quick_gelu": quick_gelu}  # "gelu": exact erf


class Experts(nn.Module):
    """E two-layer MLPs (GELU, or QuickGELU for OpenAI CLIP's) whose weights are stacked, applied
    with one batched matmul."""

    def __init__(self, num_experts: int, width: int, hidden: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, not {activation!r}")
        self.w1 = nn.Parameter(torch.empty(num_experts, width, hidden))  # (E, D, H)
        self.b1 = nn.Parameter(torch.zeros(num_experts, 1, hidden))  # (E, 1, H)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, width))  # (E, H, D)
        self.b2 = nn.Parameter(torch.zeros(num_experts, 1, width))  # (E, 1, D)
        self.activation, self.act = activation, ACTIVATIONS[activation]
        nn.init.trunc_normal_(self.w1, std=0.02)
        nn.init.trunc_normal_(self.w2, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        """(E, N, D) -> (E, N, D); row n of expert e only sees expert e's weights."""
        h = self.act(torch.baddbmm(self.b1, x, self.w1))  # (E, N, H)
        return torch.baddbmm(self.b2, h, self.w2)  # (E, N, D)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert e alone: (N, D) -> (N, D); N may be 0."""
        h = self.act(x @ self.w1[e] + self.b1[e])  # (N, H)
        return h @ self.w2[e] + self.b2[e]  # (N, D)


def dropless_experts(x: Tensor, plan: RoutingPlan, experts: Experts) -> Tensor:
    """Every real token's K choices computed, nothing dropped: (G, S, D) -> (G, S, D).

    Choices are grouped by expert: for each expert e, the choices that picked it (NonZero over
    the N*K choices), their tokens gathered (n_e, D), expert e's MLP on exactly them, times their
    gates. All experts' outputs are then added back at their tokens' rows in one scatter. The
    loop over the E experts is unrolled when exported, so every expert is in the graph, and an
    expert that no token chose runs on 0 rows. FLOPs are the active ones (K MLPs per token, no
    padding to a capacity). Padding tokens are never routed."""
    G, S, D = x.shape
    K = plan.expert_index.shape[-1]
    tokens = x.reshape(G * S, D)  # (N, D), N = G*S
    real = plan.mask.reshape(G * S, 1)  # (N, 1)
    choice = torch.where(real, plan.expert_index.reshape(G * S, K), -1).reshape(-1)  # (N*K,), -1: padding
    gates = plan.gates.reshape(-1)  # (N*K,)
    picks, outputs = [], []
    for e in range(experts.w1.shape[0]):
        picked = (choice == e).nonzero().squeeze(-1)  # (n_e,) choice ids, token-major
        row = picked // K if K > 1 else picked  # (n_e,) their tokens
        y = experts.expert(e, tokens.index_select(0, row))  # (n_e, D)
        picks.append(picked)
        outputs.append(y * gates.index_select(0, picked).unsqueeze(-1).to(y.dtype))
    # Each choice id occurs once, so the outputs go back to their choices' rows with a scatter of
    # distinct indices, then a token sums its K. A scatter-add onto tokens would repeat a token's row
    # K times; with it, a top-2 sparse CLIP's ONNX embeddings came out wrong on a few images in one
    # CI run (ONNX Runtime does not promise repeated indices in ScatterND are added safely).
    per_choice = torch.zeros(G * S * K, D, dtype=tokens.dtype, device=tokens.device)
    per_choice = per_choice.index_copy(0, torch.cat(picks), torch.cat(outputs))  # (N*K, D)
    return per_choice.view(G * S, K, D).sum(1).view(G, S, D)


@torch.library.custom_op("limoe::fused_moe", mutates_args=())
def fused_moe(x: Tensor, logits: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, k: int) -> Tensor:
    """ONNX Runtime's fused `com.microsoft.MoE` op, as PyTorch: the export option `moe_op="fused"`.

    x (N, D) tokens, logits (N, E) router logits, expert weights in ONNX Runtime's layout
    w1 (E, H, D), b1 (E, H), w2 (E, D, H), b2 (E, D). Softmax over E, top-k, and
    y_n = sum_k p_k * expert_k(x_n) with the tanh-approximate GELU of that kernel, gates not
    renormalised; every row is computed (padding too: its output is masked downstream)."""
    probs = torch.softmax(logits.float(), dim=-1)
    gates, index = probs.topk(k, dim=-1)  # (N, k)
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        rows, slot = (index == e).nonzero(as_tuple=True)
        h = F.gelu(x[rows] @ w1[e].t() + b1[e], approximate="tanh")
        y = y.index_add(0, rows, (h @ w2[e].t() + b2[e]) * gates[rows, slot].unsqueeze(-1).to(x.dtype))
    return y


@fused_moe.register_fake
def _(x: Tensor, logits: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, k: int) -> Tensor:
    return torch.empty_like(x)


def _register_ort_moe_schema() -> None:
    """Tell onnx's schema registry about ONNX Runtime's com.microsoft.MoE (the subset we use), so
    that the exporter can emit it; onnx itself knows no com.microsoft ops."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has("MoE", "com.microsoft"):
        return
    p = OpSchema.FormalParameter
    inputs = [p(n, "T") for n in ("input", "router_probs", "fc1_experts_weights", "fc1_experts_bias",
                                   "fc2_experts_weights", "fc2_experts_bias")]
    attrs = [OpSchema.Attribute("k", OpSchema.AttrType.INT, "experts per token"),
             OpSchema.Attribute("activation_type", OpSchema.AttrType.STRING, "gelu"),
             OpSchema.Attribute("normalize_routing_weights", OpSchema.AttrType.INT,
                                "0: gates are softmax probabilities")]
    onnx.defs.register_schema(OpSchema("MoE", "com.microsoft", 1, inputs=inputs, outputs=[p("output", "T")],
                                       type_constraints=[("T", ["tensor(float)"], "")], attributes=attrs))


def fused_moe_onnx(x, logits, w1, b1, w2, b2, k: int):
    """The translation of limoe::fused_moe for torch.onnx's custom_translation_table."""
    import onnxscript

    _register_ort_moe_schema()
    msft = onnxscript.values.Opset("com.microsoft", 1)
    return msft.MoE(x, logits, w1, b1, w2, b2, k=k, activation_type="gelu", normalize_routing_weights=0)


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
        inference_routing: str = "dropless",
        activation: str = "gelu",
    ):
        super().__init__()
        if inference_routing not in INFERENCE_ROUTING:
            raise ValueError(f"inference_routing must be one of {INFERENCE_ROUTING}, not {inference_routing!r}")
        self.router = Router(width, num_experts, router_noise_std)
        self.experts = Experts(num_experts, width, hidden, activation)
        self.num_experts, self.top_k, self.layer = num_experts, top_k, layer
        self.train_capacity_factor = train_capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.batch_priority, self.renormalize_gates = batch_priority, renormalize_gates
        self.train_group_size = train_group_size
        self.inference_routing = inference_routing
        self.moe_op = "standard"  # "fused": the dropless layer as ONNX Runtime's MoE op (export option)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, RoutingInfo]:
        """x (B, T, D), mask (B, T) True for real tokens -> (B, T, D) and the routing info.

        Training routes `train_group_size` examples per group at the training capacity, with BPR.
        Inference is dropless (every token's K choices computed) or, for comparison, routes every
        example as its own group at the inference capacity; either way an example's output never
        depends on its batch neighbours.
        """
        B, T, D = x.shape
        if not self.training and self.inference_routing == "dropless":
            logits, _ = self.router(x)  # (B, T, E) float32: one group per example, S = T
            plan = route_dropless(logits, self.top_k, mask, self.renormalize_gates)
            if self.moe_op == "fused":
                ex = self.experts
                if ex.activation != "gelu":
                    raise ValueError(f"the fused MoE op has GELU experts only, not {ex.activation}")
                y = fused_moe(x.reshape(B * T, D), logits.reshape(B * T, -1), ex.w1.transpose(1, 2), ex.b1[:, 0],
                              ex.w2.transpose(1, 2), ex.b2[:, 0], self.top_k).view(B, T, D)
            else:
                y = dropless_experts(x, plan, self.experts)
            return y, RoutingInfo(self.layer, plan, logits, logits, self.router.noise_std, T)
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
                f"{self.train_capacity_factor}/{self.eval_capacity_factor}, bpr={self.batch_priority}, "
                f"inference={self.inference_routing}")

