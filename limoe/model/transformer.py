r"""LIMoE: one pre-LayerNorm transformer shared by image patches and text tokens.

    image (B, 3, R, R) -> patches + image positions ---\                /-> image MAP head -> proj -> (B, P)
                                                         >- blocks -> LN
    text  (B, L) ids   -> token emb + text positions ---/                \-> text MAP head  -> proj -> (B, P)

Some blocks replace their dense MLP by an MoE layer (config.moe_layers). A sequence is always
one modality; the two modalities share every transformer weight and meet in the loss.
Shape letters: B batch, T tokens, D width, H MLP width, P embedding size, E experts.

`TwoTower` is the baseline the paper compares with (CLIP, ALIGN): the same inputs, heads,
projections and loss, but images and texts cross two transformers that share no weight.
`build_model(cfg)` picks the class from `cfg.arch`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from limoe.model.config import LIMoEConfig
from limoe.model.moe import MoELayer, RoutingInfo


class MLP(nn.Module):
    """Dense two-layer GELU MLP."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head attention; queries may come from another sequence (MAP pooling)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor, mask: Tensor | None = None, query: Tensor | None = None) -> Tensor:
        """x (B, T, D) keys/values, query (B, Q, D) (defaults to x), mask (B, T) True = attend."""
        q_in = x if query is None else query
        B, T, D = x.shape
        Q, h = q_in.shape[1], self.num_heads
        q = self.q(q_in).reshape(B, Q, h, D // h).transpose(1, 2)  # (B, h, Q, D/h)
        k, v = self.kv(x).reshape(B, T, 2, h, D // h).permute(2, 0, 3, 1, 4)  # (B, h, T, D/h) each
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, T)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, h, Q, D/h)
        return self.proj(out.transpose(1, 2).reshape(B, Q, D))


class Block(nn.Module):
    """Pre-LayerNorm block: x + attn(LN(x)), then x + mlp(LN(x)); `mlp` is dense or MoE."""

    def __init__(self, width: int, num_heads: int, mlp: nn.Module):
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = Attention(width, num_heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = mlp

    def forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, RoutingInfo | None]:
        x = x + self.attn(self.ln1(x), mask)  # (B, T, D)
        if isinstance(self.mlp, MoELayer):
            y, info = self.mlp(self.ln2(x), mask)
            return x + y, info
        return x + self.mlp(self.ln2(x)), None


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over the tokens -> (B, D)."""

    def __init__(self, width: int, num_heads: int, hidden: int):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, width))
        self.attn = Attention(width, num_heads)
        self.ln = nn.LayerNorm(width)
        self.mlp = MLP(width, hidden)
        nn.init.normal_(self.probe, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        pooled = self.attn(x, mask, query=self.probe.expand(x.shape[0], -1, -1))  # (B, 1, D)
        pooled = pooled + self.mlp(self.ln(pooled))
        return pooled[:, 0]  # (B, D)


@dataclass
class LIMoEOutput:
    image_embeds: Tensor  # (B, P), L2-normalised
    text_embeds: Tensor  # (B, P), L2-normalised
    logit_scale: Tensor  # scalar, log of the temperature's inverse
    image_routing: list[RoutingInfo]  # one entry per MoE layer
    text_routing: list[RoutingInfo]
    logit_bias: Tensor | None = None  # scalar, the sigmoid loss's learned bias (None with softmax)


def kept_patches(num_patches: int, mask_ratio: float) -> int:
    """T' = round(T * (1 - mask_ratio)): how many patches an image keeps under FLIP masking."""
    return max(1, round(num_patches * (1 - mask_ratio)))


def keep_patches(x: Tensor, mask_ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """FLIP's random masking: (B, T, D) -> (B, T', D), each example keeping its own uniformly
    random T' = kept_patches(T, mask_ratio) patches, in their original order (positions are
    already added, so the order carries nothing). The dropped patches cost nothing downstream."""
    B, T, D = x.shape
    keep = kept_patches(T, mask_ratio)
    noise = torch.rand(B, T, device=x.device, generator=generator)  # (B, T)
    ids = noise.argsort(dim=1)[:, :keep].sort(dim=1).values  # (B, T')
    return x.gather(1, ids.unsqueeze(-1).expand(B, keep, D))


def init_linear(root: nn.Module) -> None:
    """Truncated-normal (std 0.02) linear weights with zero biases, normal embeddings."""
    for m in root.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)


class LIMoE(nn.Module):
    def __init__(self, cfg: LIMoEConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.width
        # Modality-specific inputs.
        self.patch_embed = nn.Conv2d(cfg.in_channels, D, cfg.patch_size, stride=cfg.patch_size)
        self.image_pos = nn.Parameter(torch.empty(1, cfg.num_patches, D))
        self.token_embed = nn.Embedding(cfg.vocab_size, D)
        self.text_pos = nn.Parameter(torch.empty(1, cfg.context_length, D))
        # The one shared tower.
        moe_ids = set(cfg.moe_layer_ids)
        self.blocks = nn.ModuleList(
            Block(D, cfg.num_heads, self._moe(cfg, i) if i in moe_ids else MLP(D, cfg.mlp_dim))
            for i in range(cfg.depth)
        )
        self.ln_final = nn.LayerNorm(D)
        # Modality-specific outputs.
        self.image_head = MAPHead(D, cfg.num_heads, cfg.mlp_dim)
        self.text_head = MAPHead(D, cfg.num_heads, cfg.mlp_dim)
        self.image_proj = nn.Linear(D, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(D, cfg.embed_dim, bias=False)
        sigmoid = cfg.contrastive_loss == "sigmoid"
        self.logit_scale = nn.Parameter(torch.tensor(cfg.sigmoid_logit_scale_init if sigmoid else cfg.logit_scale_init))
        if sigmoid:  # only then, so that softmax checkpoints keep their state dict
            self.logit_bias = nn.Parameter(torch.tensor(cfg.logit_bias_init))
        self._init_weights()

    @staticmethod
    def _moe(cfg: LIMoEConfig, layer: int) -> MoELayer:
        return MoELayer(cfg.width, cfg.mlp_dim, cfg.num_experts, cfg.top_k, cfg.train_capacity_factor,
                        cfg.eval_capacity_factor, cfg.batch_priority, cfg.renormalize_gates,
                        cfg.router_noise_std, cfg.train_group_size, layer, cfg.inference_routing)

    def _init_weights(self) -> None:
        init_linear(self)
        nn.init.normal_(self.image_pos, std=0.02)
        nn.init.normal_(self.text_pos, std=0.02)

    def with_config(self, **changes) -> "LIMoE":
        """The same weights under a changed config, in eval mode: for inference-time fields such
        as inference_routing or eval_capacity_factor."""
        other = type(self)(self.cfg.replace(**changes))
        other.load_state_dict(self.state_dict())
        return other.eval()

    def set_moe_op(self, op: str) -> None:
        """How dropless MoE layers are written when exported: "standard" ONNX ops or "fused"
        (ONNX Runtime's com.microsoft.MoE, see limoe.model.moe.fused_moe)."""
        if op not in ("standard", "fused"):
            raise ValueError(f"moe op must be 'standard' or 'fused', not {op!r}")
        for m in self.modules():
            if isinstance(m, MoELayer):
                m.moe_op = op

    # -- the tower -----------------------------------------------------------------------------
    def tower(self, modality: str) -> tuple[nn.ModuleList, nn.LayerNorm]:
        """The blocks and final norm a modality's tokens cross: the one shared tower, for both."""
        return self.blocks, self.ln_final

    def _encode_tokens(self, x: Tensor, mask: Tensor | None, modality: str) -> tuple[Tensor, list[RoutingInfo]]:
        """(B, T, D) -> (B, T, D) through every block, collecting each MoE layer's routing."""
        blocks, ln_final = self.tower(modality)
        routing = []
        for block in blocks:
            x, info = block(x, mask)
            if info is not None:
                routing.append(info)
        return ln_final(x), routing

    def image_features(self, images: Tensor, mask_ratio: float = 0.0) -> tuple[Tensor, list[RoutingInfo]]:
        """(B, 3, R, R) -> pooled (B, D) and routing of the image tokens: all B x num_patches, or
        with `mask_ratio` > 0 (FLIP) a random kept subset per image (see `keep_patches`)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.image_pos  # (B, T, D), T = num_patches
        if mask_ratio > 0:
            x = keep_patches(x, mask_ratio)  # (B, T', D)
        x, routing = self._encode_tokens(x, None, "image")
        return self.image_head(x), routing

    def text_features(self, tokens: Tensor) -> tuple[Tensor, list[RoutingInfo]]:
        """(B, L) token ids -> pooled (B, D) and routing; padding is masked everywhere."""
        mask = tokens != self.cfg.pad_id  # (B, L)
        x = self.token_embed(tokens) + self.text_pos[:, : tokens.shape[1]]  # (B, L, D)
        x, routing = self._encode_tokens(x, mask, "text")
        return self.text_head(x, mask), routing

    # -- open_clip-style API ---------------------------------------------------------------------
    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        z = self.image_proj(self.image_features(images)[0])  # (B, P)
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, tokens: Tensor, normalize: bool = True) -> Tensor:
        z = self.text_proj(self.text_features(tokens)[0])  # (B, P)
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, images: Tensor, tokens: Tensor, mask_ratio: float | None = None) -> LIMoEOutput:
        """Embeddings of both modalities plus every MoE layer's routing, for training/analysis.
        Images are masked (FLIP) by `mask_ratio`, by default cfg.image_mask_ratio in training and
        never in eval mode."""
        if mask_ratio is None:
            mask_ratio = self.cfg.image_mask_ratio if self.training else 0.0
        img, img_routing = self.image_features(images, mask_ratio)
        txt, txt_routing = self.text_features(tokens)
        return LIMoEOutput(
            image_embeds=F.normalize(self.image_proj(img), dim=-1),
            text_embeds=F.normalize(self.text_proj(txt), dim=-1),
            logit_scale=self.logit_scale.clamp(max=self.cfg.logit_scale_max),
            image_routing=img_routing,
            text_routing=txt_routing,
            logit_bias=getattr(self, "logit_bias", None),
        )


class TwoTower(LIMoE):
    """CLIP-style two-tower baseline. `blocks` / `ln_final` are the image tower; `text_blocks` /
    `text_ln_final` the text tower, of the same shape (config.moe_layers applies to both; the
    baseline of `two_tower_counterpart` is dense). Nothing is shared between the modalities but
    the loss and the learned temperature."""

    def __init__(self, cfg: LIMoEConfig):
        super().__init__(cfg)
        moe_ids = set(cfg.moe_layer_ids)
        self.text_blocks = nn.ModuleList(
            Block(cfg.width, cfg.num_heads, self._moe(cfg, i) if i in moe_ids else MLP(cfg.width, cfg.mlp_dim))
            for i in range(cfg.depth)
        )
        self.text_ln_final = nn.LayerNorm(cfg.width)
        init_linear(self.text_blocks)

    def tower(self, modality: str) -> tuple[nn.ModuleList, nn.LayerNorm]:
        return (self.text_blocks, self.text_ln_final) if modality == "text" else (self.blocks, self.ln_final)


def build_model(cfg: LIMoEConfig) -> LIMoE:
    """The module for a config: `LIMoE` (one tower) or `TwoTower`, as cfg.arch says."""
    return TwoTower(cfg) if cfg.arch == "two_tower" else LIMoE(cfg)
