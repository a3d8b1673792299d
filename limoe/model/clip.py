"""CLIP as OpenCLIP builds it (Radford et al., 2021; Cherti et al., 2023), in OpenCLIP's parameter
layout, so that its checkpoints load with `load_state_dict(strict=True)` and nothing of open_clip
is imported (its wheel needs torchvision, whose registry builds do not match the CPU torch here).

    image (B, 3, R, R) -> conv1 (patches, no bias) -> [class token; patches] + positions -> ln_pre
        -> L pre-LayerNorm blocks -> ln_post -> class token -> @ proj -> (B, P)
    tokens (B, 77) -> token_embedding + positions -> L blocks with a causal mask -> ln_final
        -> the end-of-text position (the largest id in each row) -> @ text_projection -> (B, P)

A block is x + attn(ln_1(x)), then x + mlp(ln_2(x)), with mlp = c_proj(act(c_fc(.))) and act GELU,
or QuickGELU (x * sigmoid(1.702 x)) for OpenAI's weights. The image and the text tower have their
own widths, depths and heads (ViT-B-32: 768 x 12 x 12 and 512 x 12 x 8, embedding 512).

A sparse CLIP (`moe_layers` other than "none", made by `limoe.model.upcycle.upcycle_clip`) has an
`MoELayer` in place of the MLP of the chosen blocks of both towers, under the same `mlp` name; every
other parameter keeps OpenCLIP's layout.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from limoe.model.config import moe_layer_ids
from limoe.model.moe import INFERENCE_ROUTING, MoELayer, RoutingInfo, quick_gelu
from limoe.model.transformer import LIMoEOutput


@dataclass(frozen=True)
class CLIPConfig:
    embed_dim: int = 512  # P, the joint embedding
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    mlp_ratio: float = 4.0
    quick_gelu: bool = False  # OpenAI's weights; OpenCLIP's own use nn.GELU (exact erf)
    logit_bias: bool = False  # SigLIP-style checkpoints carry a learned bias
    # --- mixture of experts (a sparse CLIP; OpenCLIP's own is "none") -----------------------------
    moe_layers: str = "none"  # in each tower, as LIMoEConfig.moe_layers: "every_2" -> blocks 1, 3, 5, ...
    num_experts: int = 8  # E per MoE layer
    top_k: int = 1  # K experts per token
    renormalize_gates: bool = False  # gates divided by their sum over the K choices (upcycling: True)
    inference_routing: str = "dropless"  # or "capacity", as LIMoEConfig's
    train_capacity_factor: float = 2.0  # training routes groups at this capacity (LIMoEConfig's field)

    def __post_init__(self):
        problems = []
        for tower in ("vision", "text"):
            try:
                moe_layer_ids(getattr(self, f"{tower}_layers"), self.moe_layers)
            except ValueError as e:
                problems.append(f"{tower}: {e}")
        if self.moe_layers != "none" and not 1 <= self.top_k <= self.num_experts:
            problems.append(f"top_k {self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.inference_routing not in INFERENCE_ROUTING:
            problems.append(f"inference_routing must be one of {INFERENCE_ROUTING}, not {self.inference_routing!r}")
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for tower in ("vision", "text"):
            width, heads = getattr(self, f"{tower}_width"), getattr(self, f"{tower}_heads")
            if heads < 1 or width % heads:
                problems.append(f"{tower}_width {width} is not a multiple of {tower}_heads {heads}")
        if problems:
            raise ValueError("invalid CLIPConfig: " + "; ".join(problems))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def vision_moe_ids(self) -> tuple[int, ...]:
        return moe_layer_ids(self.vision_layers, self.moe_layers)

    @property
    def text_moe_ids(self) -> tuple[int, ...]:
        return moe_layer_ids(self.text_layers, self.moe_layers)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CLIPConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(d) - names:
            raise ValueError(f"unknown CLIPConfig fields: {sorted(unknown)}")
        return cls(**d)

    def replace(self, **changes) -> "CLIPConfig":
        return dataclasses.replace(self, **changes)


def _arch(embed: int, image: int, patch: int, vw: int, vl: int, tw: int, tl: int, **kw) -> CLIPConfig:
    # OpenCLIP's head width is 64 in both towers (vision heads = width // 64; text_cfg heads likewise).
    return CLIPConfig(embed_dim=embed, image_size=image, patch_size=patch, vision_width=vw, vision_layers=vl,
                      vision_heads=vw // 64, text_width=tw, text_layers=tl, text_heads=tw // 64, **kw)


# OpenCLIP's model_configs/*.json, for the architectures people most use (names as open_clip spells them).
ARCHITECTURES: dict[str, CLIPConfig] = {
    "ViT-B-32": _arch(512, 224, 32, 768, 12, 512, 12),
    "ViT-B-16": _arch(512, 224, 16, 768, 12, 512, 12),
    "ViT-L-14": _arch(768, 224, 14, 1024, 24, 768, 12),
    "ViT-B-32-256": _arch(512, 256, 32, 768, 12, 512, 12),
}
ARCHITECTURES.update({f"{name}-quickgelu": cfg.replace(quick_gelu=True) for name, cfg in list(ARCHITECTURES.items())
                      if name != "ViT-B-32-256"})


def from_openclip_json(d: Mapping[str, Any]) -> CLIPConfig:
    """An open_clip model config (its model_configs/*.json: embed_dim, vision_cfg, text_cfg, quick_gelu)."""
    try:
        v, t = d["vision_cfg"], d["text_cfg"]
        vw, tw = int(v["width"]), int(t["width"])
        return CLIPConfig(embed_dim=int(d["embed_dim"]), image_size=int(v["image_size"]),
                          patch_size=int(v["patch_size"]), vision_width=vw, vision_layers=int(v["layers"]),
                          vision_heads=vw // int(v.get("head_width", 64)),
                          context_length=int(t.get("context_length", 77)),
                          vocab_size=int(t.get("vocab_size", 49408)), text_width=tw, text_layers=int(t["layers"]),
                          text_heads=int(t.get("heads", max(1, tw // 64))), mlp_ratio=float(v.get("mlp_ratio", 4.0)),
                          quick_gelu=bool(d.get("quick_gelu", False)))
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"not an open_clip model config ({type(e).__name__}: {e})") from None


def architecture(name: str) -> CLIPConfig:
    """A known architecture by open_clip's name, or the path of an open_clip model config JSON."""
    if name.endswith(".json"):
        import json
        from pathlib import Path

        path = Path(name)
        if not path.is_file():
            raise KeyError(f"architecture file {name!r} does not exist")
        return from_openclip_json(json.loads(path.read_text()))
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise KeyError(f"unknown architecture {name!r}; this importer knows {', '.join(sorted(ARCHITECTURES))} "
                       "(or give the path of an open_clip model config .json)") from None


class QuickGELU(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return quick_gelu(x)


class Attention(nn.Module):
    """nn.MultiheadAttention's parameters (in_proj_weight (3D, D), out_proj), as plain matmuls."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: Tensor, causal: bool = False) -> Tensor:  # (B, T, D) -> (B, T, D)
        B, T, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(B, T, 3, self.heads, D // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, D / H)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Sequential):
    def __init__(self, width: int, hidden: int, quick_gelu: bool):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.gelu = QuickGELU() if quick_gelu else nn.GELU()
        self.c_proj = nn.Linear(hidden, width)


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)); `moe` (the sparse config) makes `mlp` an MoE layer."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool, moe: CLIPConfig | None = None,
                 layer: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = MLP(width, hidden, quick_gelu) if moe is None else MoELayer(
            width, hidden, moe.num_experts, moe.top_k, moe.train_capacity_factor,
            renormalize_gates=moe.renormalize_gates, layer=layer,
            inference_routing=moe.inference_routing, activation="quick_gelu" if quick_gelu else "gelu")

    def forward(self, x: Tensor, causal: bool = False, routing: list[RoutingInfo] | None = None,
                mask: Tensor | None = None) -> Tensor:
        """(B, T, D) -> (B, T, D); an MoE layer's routing info is appended to `routing` when given.
        `mask` (B, T), True for the tokens the MoE layer routes (a text's up to its end-of-text)."""
        x = x + self.attn(self.ln_1(x), causal)
        if isinstance(self.mlp, MoELayer):
            y, info = self.mlp(self.ln_2(x), mask)
            if routing is not None:
                routing.append(info)
            return x + y
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool,
                 moe: CLIPConfig | None = None):
        super().__init__()
        ids = moe_layer_ids(layers, moe.moe_layers) if moe is not None else ()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu,
                                                              moe if i in ids else None, i) for i in range(layers))

    def forward(self, x: Tensor, causal: bool = False, routing: list[RoutingInfo] | None = None,
                mask: Tensor | None = None) -> Tensor:
        for block in self.resblocks:
            x = block(x, causal, routing, mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        w = cfg.vision_width
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(w ** -0.5 * torch.randn(w))
        self.positional_embedding = nn.Parameter(w ** -0.5 * torch.randn(cfg.num_patches + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.vision_layers, cfg.vision_heads, cfg.mlp_ratio, cfg.quick_gelu, cfg)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(w ** -0.5 * torch.randn(w, cfg.embed_dim))

    def forward(self, images: Tensor, routing: list[RoutingInfo] | None = None) -> Tensor:  # (B, 3, R, R) -> (B, P)
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, T, W), T = grid^2
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding  # (B, T + 1, W)
        x = self.transformer(self.ln_pre(x), routing=routing)
        return self.ln_post(x)[:, 0] @ self.proj


class CLIP(nn.Module):
    """OpenCLIP's `CLIP` (the non-custom-text variant), parameter for parameter."""

    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.text_width
        self.visual = VisionTransformer(cfg)
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.context_length, w))
        self.transformer = Transformer(w, cfg.text_layers, cfg.text_heads, cfg.mlp_ratio, cfg.quick_gelu, cfg)
        self.ln_final = nn.LayerNorm(w)
        self.text_projection = nn.Parameter(w ** -0.5 * torch.randn(w, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        if cfg.logit_bias:
            self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def encode_image(self, images: Tensor, normalize: bool = False, return_routing: bool = False
                     ) -> Tensor | tuple[Tensor, list[RoutingInfo]]:
        """(B, 3, R, R) -> (B, P), and with `return_routing` the MoE layers' routing infos, block order."""
        routing: list[RoutingInfo] = []
        x = self.visual(images, routing)
        x = F.normalize(x, dim=-1) if normalize else x
        return (x, routing) if return_routing else x

    def encode_text(self, tokens: Tensor, normalize: bool = False, return_routing: bool = False
                    ) -> Tensor | tuple[Tensor, list[RoutingInfo]]:
        """(B, L) -> (B, P), and with `return_routing` the MoE layers' routing infos, block order."""
        routing: list[RoutingInfo] = []
        eot = tokens.argmax(dim=-1)  # OpenCLIP's "argmax" pooling: the end-of-text id is the vocabulary's largest
        # Positions after the end of text are padding: causal attention keeps them out of the pooled
        # output, and the MoE layers do not route them (they take no expert's capacity in training).
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None] <= eot[:, None]  # (B, L)
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.ln_final(self.transformer(x, causal=True, routing=routing, mask=mask))
        x = x[torch.arange(x.shape[0], device=x.device), eot] @ self.text_projection
        x = F.normalize(x, dim=-1) if normalize else x
        return (x, routing) if return_routing else x


    def forward(self, images: Tensor, tokens: Tensor, mask_ratio: float | None = None) -> LIMoEOutput:
        """Both towers, as the trainer calls a LIMoE: normalised embeddings, the temperature and each
        tower's routing (the contrastive and LIMoE entropy losses take them as they take LIMoE's)."""
        if mask_ratio:
            raise ValueError("masked patches (image_mask_ratio) are for LIMoE models, not CLIP")
        image, image_routing = self.encode_image(images, normalize=True, return_routing=True)
        text, text_routing = self.encode_text(tokens, normalize=True, return_routing=True)
        scale = self.logit_scale.clamp(max=math.log(100))  # open_clip's training clamps it there too
        return LIMoEOutput(image, text, scale, image_routing, text_routing,
                           getattr(self, "logit_bias", None))


# -- reading OpenCLIP checkpoints ------------------------------------------------------------------
def unwrap_state_dict(obj: Any) -> dict[str, Tensor]:
    """What open_clip's load_checkpoint accepts: a state dict, or {"state_dict": ...} (its training
    checkpoints), with DistributedDataParallel's "module." prefix removed."""
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError("not a CLIP checkpoint: expected a state dict of tensors or {'state_dict': {...}}")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def infer_config(sd: Mapping[str, Tensor], quick_gelu: bool = False) -> CLIPConfig:
    """The architecture from tensor shapes alone (heads from OpenCLIP's head width of 64)."""
    try:
        vw, _, patch, _ = sd["visual.conv1.weight"].shape
        grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
        vocab, tw = sd["token_embedding.weight"].shape
        cfg = dict(embed_dim=sd["visual.proj"].shape[1], image_size=grid * patch, patch_size=patch, vision_width=vw,
                   vision_layers=_layers(sd, "visual.transformer."), vision_heads=max(1, vw // 64),
                   context_length=sd["positional_embedding"].shape[0], vocab_size=vocab, text_width=tw,
                   text_layers=_layers(sd, "transformer."), text_heads=max(1, tw // 64),
                   mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / vw,
                   quick_gelu=quick_gelu, logit_bias="logit_bias" in sd)
    except KeyError as e:
        raise ValueError(f"not an OpenCLIP ViT checkpoint: it has no {e.args[0]!r}") from None
    return CLIPConfig(**cfg)


def _layers(sd: Mapping[str, Tensor], prefix: str) -> int:
    ids = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"resblocks\.(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def load_openclip_state_dict(model: CLIP, sd: Mapping[str, Tensor]) -> None:
    """Load strictly; a mismatch names the missing, unexpected and misshapen keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own) - {"attn_mask"})  # some open_clip versions saved the causal mask
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)}, architecture {tuple(v.shape)}"
                    for k, v in own.items() if k in sd and sd[k].shape != v.shape)
    if missing or extra or shapes:
        def some(keys):
            return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")

        raise ValueError("the state dict does not match the architecture: " + "; ".join(
            part for part in (missing and f"missing {some(missing)}", extra and f"unexpected {some(extra)}",
                              shapes and f"wrong shapes {some(shapes)}") if part))
    model.load_state_dict({k: sd[k].float() for k in own}, strict=True)


__all__ = ["CLIPConfig", "ARCHITECTURES", "architecture", "from_openclip_json", "CLIP", "unwrap_state_dict",
           "infer_config", "load_openclip_state_dict"]
