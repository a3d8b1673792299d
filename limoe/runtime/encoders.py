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

Implementations: `limoe.runtime.onnx_encoder.OnnxEncoders` (a store entry's ONNX graphs, no torch),
`TorchEncoders` here (a store entry's TorchScript file, or a checkpoint's model through
`limoe.export.torch_encoders`; torch is imported only when one is built) and the service's
`FakeBackend`. `MoEInfo`, what the routing outputs mean, is the manifest's (limoe.runtime.model_store). The torch model itself keeps open_clip's
single-item names (`LIMoE.encode_image`, `encode_text`: embeddings only), and so do the methods of
the TorchScript file, whose names are part of the store format.
"""

from __future__ import annotations

import os
from typing import Callable, NamedTuple, Protocol

import numpy as np

from limoe.runtime.model_store import Manifest, MoEInfo
from limoe.runtime.preprocess import PreprocessConfig
from limoe.runtime.tokenizer import Tokenizer


class EncoderOutput(NamedTuple):
    embeddings: np.ndarray  # (B, P) float32, L2-normalised
    expert_index: np.ndarray  # (B, M, T, K) int64, -1 for padding
    dropped: np.ndarray  # (B, M, T, K) bool


Encode = Callable[[np.ndarray], EncoderOutput]


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
    """Torch modules as an encoder pair: a store entry's TorchScript file (`from_entry`, the
    service's torch backend; fp16 on CUDA), or a checkpoint's model (built by
    limoe.export.torch_encoders, which holds the model code; this class needs torch only).

    `image` and `text` take tensors and return (embeddings, expert_index, dropped) tensors, as
    limoe.export.exporter's ImageEncoder and TextEncoder do."""

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
        return cls(module.encode_image, module.encode_text, manifest.tokenizer(),
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
