"""The encoder pair: one interface for every way of running a LIMoE model's two encoders.

Evaluation, the export checks, the service's backends and the tests all work on an `Encoders`
pair, numpy in and numpy out:

    encode_images((B, 3, R, R) float32 preprocessed pixels) -> EncoderOutput
    encode_tokens((B, L) int64 token ids)                    -> EncoderOutput

    EncoderOutput.embeddings    (B, P)        float32, L2-normalised
    EncoderOutput.expert_index  (B, M, T, K)  int64, chosen experts per MoE layer and token (-1: padding)
    EncoderOutput.dropped       (B, M, T, K)  bool, the choice found its expert full

with M = len(moe.layers) MoE layers, T tokens (patches or text positions), K = moe.top_k. Texts
are tokenised with the pair's own `tokenizer`, images preprocessed with its `preprocess`.

Implementations: `limoe.onnx_encoder.OnnxEncoders` (a store entry's ONNX graphs, no torch),
`TorchEncoders` here (a checkpoint's model, or a store entry's TorchScript file; torch is imported
only when one is built) and the service's `FakeBackend`. The torch model itself keeps open_clip's
single-item names (`LIMoE.encode_image`, `encode_text`: embeddings only), and so do the methods of
the TorchScript file, whose names are part of the store format.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Protocol

import numpy as np

from limoe.preprocess import PreprocessConfig
from limoe.tokenizer import Tokenizer

if TYPE_CHECKING:
    from limoe.model_store import Manifest


class EncoderOutput(NamedTuple):
    embeddings: np.ndarray  # (B, P) float32, L2-normalised
    expert_index: np.ndarray  # (B, M, T, K) int64, -1 for padding
    dropped: np.ndarray  # (B, M, T, K) bool


Encode = Callable[[np.ndarray], EncoderOutput]


@dataclass(frozen=True)
class MoEInfo:
    """How the encoders route, and so what their routing outputs mean."""

    layers: tuple[int, ...]  # the MoE blocks' indices: M = len(layers); () for a dense model
    num_experts: int  # E
    top_k: int  # K, experts per token
    inference_routing: str = "capacity"  # "dropless" or "capacity" (entries older than dropless have no field)
    onnx_op: str = "standard"  # the ONNX graphs' MoE layers: "standard" ops or ORT's "fused" MoE op
    eval_capacity_factor: float = 1.0  # capacity per expert with "capacity" routing
    batch_priority: bool = True  # Batch Priority Routing with "capacity" routing

    @classmethod
    def from_config(cls, cfg, onnx_op: str = "standard") -> "MoEInfo":
        return cls(tuple(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k, cfg.inference_routing, onnx_op,
                   cfg.eval_capacity_factor, cfg.batch_priority)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoEInfo":
        """The manifest's `moe` object; raises ValueError naming what is wrong."""
        if not isinstance(d, dict):
            raise ValueError("must be an object")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("layers", "num_experts", "top_k") if k not in d]
        if missing:
            raise ValueError(f"has no {', '.join(map(repr, missing))}")
        m = cls(**{k: v for k, v in d.items() if k in known})
        if not isinstance(m.layers, (list, tuple)) or not all(_is_int(x) and x >= 0 for x in m.layers):
            raise ValueError(f"'layers' must be a list of block indices, not {m.layers!r}")
        if not _is_int(m.num_experts) or not _is_int(m.top_k) or not 1 <= m.top_k <= max(1, m.num_experts):
            raise ValueError(f"'num_experts' {m.num_experts!r} and 'top_k' {m.top_k!r} must be integers, "
                             "1 <= top_k <= num_experts")
        if m.inference_routing not in ("dropless", "capacity") or m.onnx_op not in ("standard", "fused"):
            raise ValueError(f"unknown 'inference_routing' {m.inference_routing!r} or 'onnx_op' {m.onnx_op!r}")
        return dataclasses.replace(m, layers=tuple(m.layers))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "layers": list(self.layers)}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class Encoders(Protocol):
    """An image encoder and a text encoder into one embedding space (see the module docstring)."""

    tokenizer: Tokenizer  # texts -> (B, L) token ids for encode_tokens
    preprocess: PreprocessConfig  # images -> (3, R, R) pixels for encode_images
    moe: MoEInfo  # what expert_index and dropped mean
    logit_scale: float  # zero-shot logits = logit_scale * cosine similarity

    def encode_images(self, pixels: np.ndarray) -> EncoderOutput: ...

    def encode_tokens(self, ids: np.ndarray) -> EncoderOutput: ...


def cpu_cores() -> int:
    """The cores this process may run on (its affinity mask, as a container's cpuset sets it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_per_pass(passes: int, threads: int = 0) -> int:
    """Intra-op threads for each of `passes` forward passes run at once: `threads` when given,
    else the cores shared out among the passes; 0 (the runtime's default, every core) for one
    pass. On 2 cores, two one-thread passes at once encode a batch of 32 prompts 1.5x faster than
    one pass on both cores (small matrices do not split well across threads), images about as fast;
    and a one-thread pass is not held up when other work (decoding) takes one of its cores."""
    if threads or passes <= 1:
        return threads
    return max(1, cpu_cores() // passes)


def batch_independence(encode: Encode, x: np.ndarray, batch: int = 5) -> float:
    """Largest |difference| of any output between a batch of `batch` items of `x` and each item
    encoded alone (0.0: an item's answer never depends on its neighbours)."""
    together = encode(x[:batch])
    worst = 0.0
    for i in range(min(batch, len(x))):
        alone = encode(x[i:i + 1])
        worst = max(worst, *(float(np.abs(a[0].astype(np.float64) - t[i].astype(np.float64)).max(initial=0.0))
                             for a, t in zip(alone, together)))
    return worst


class TorchEncoders:
    """Torch modules as an encoder pair: a checkpoint's model (`from_checkpoint`, for evaluation)
    or a store entry's TorchScript file (`from_entry`, the service's torch backend; fp16 on CUDA).

    `image` and `text` take tensors and return (embeddings, expert_index, dropped) tensors, as
    limoe.export's ImageEncoder and TextEncoder do."""

    def __init__(self, image: Callable, text: Callable, tokenizer: Tokenizer, preprocess: PreprocessConfig,
                 moe: MoEInfo, logit_scale: float, device: str = "cpu", half: bool = False,
                 manifest: Manifest | None = None):
        import torch

        self._torch = torch
        self._image, self._text = image, text
        self.tokenizer, self.preprocess, self.moe, self.logit_scale = tokenizer, preprocess, moe, logit_scale
        self._device, self._half = torch.device(device), half
        self.device = f"{self._device}" + (" (fp16)" if half else "")  # where it really runs
        self.manifest = manifest  # the store entry it came from; None for a checkpoint

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @classmethod
    def from_model(cls, model, tokenizer: Tokenizer) -> "TorchEncoders":
        from limoe.export import ImageEncoder, TextEncoder, logit_scale

        return cls(ImageEncoder(model).eval(), TextEncoder(model).eval(), tokenizer,
                   PreprocessConfig.from_model_config(model.cfg), MoEInfo.from_config(model.cfg), logit_scale(model))

    @classmethod
    def from_checkpoint(cls, path: str | Path, **config_changes) -> "TorchEncoders":
        """`config_changes` override inference-time fields, e.g. inference_routing="capacity",
        eval_capacity_factor=1.0 (the weights are the checkpoint's)."""
        from limoe.checkpoint import load_checkpoint, read_tokenizer

        model, _ = load_checkpoint(path)
        if config_changes:
            model = model.with_config(**config_changes)
        tokenizer = read_tokenizer(path)
        if tokenizer is None:
            raise ValueError(f"{path} holds no tokenizer")
        return cls.from_model(model, tokenizer)

    @classmethod
    def from_entry(cls, manifest: Manifest, device: str = "auto", threads: int = 0) -> "TorchEncoders":
        """The entry's TorchScript file on `device` ("auto": CUDA when torch sees one, else CPU)."""
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads and device == "cpu":
            torch.set_num_threads(threads)
        half = torch.device(device).type == "cuda"
        module = torch.jit.load(str(manifest.file("torchscript")), map_location=device).eval()
        if half:
            module = module.half()
        return cls(module.encode_image, module.encode_text, Tokenizer.load(manifest.file("tokenizer")),
                   manifest.preprocess, manifest.moe, manifest.logit_scale, device, half, manifest)

    def _run(self, module: Callable, x) -> EncoderOutput:
        with self._torch.inference_mode():
            emb, index, dropped = (t.cpu() for t in module(x.to(self._device)))
        return EncoderOutput(emb.float().numpy(), index.numpy(), dropped.numpy())

    def encode_images(self, pixels: np.ndarray) -> EncoderOutput:
        x = self._torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))
        return self._run(self._image, x.half() if self._half else x)

    def encode_tokens(self, ids: np.ndarray) -> EncoderOutput:
        return self._run(self._text, self._torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)))
