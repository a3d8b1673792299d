"""Inference backends: the encoder pairs the service runs (limoe.runtime.encoders.Encoders, numpy in and
out), opened from a verified store entry: `OnnxEncoders` (default, torch-free), `TorchEncoders`
on the entry's TorchScript file (torch, GPU users), and a deterministic fake for API tests.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from limoe.runtime.encoders import EncoderOutput, Encoders, TorchEncoders, threads_per_pass
from limoe.runtime.model_store import FORMAT, Manifest, ModelStore, ModelStoreError, MoEInfo, verify
from limoe.runtime.onnx_encoder import OnnxEncoders, graph_suffix
from limoe.runtime.preprocess import PreprocessConfig
from limoe.runtime.tokenizer import Tokenizer
from service.settings import Settings

log = logging.getLogger("limoe.service")


class Backend(Encoders, Protocol):
    """An encoder pair opened from a store entry."""

    manifest: Manifest
    name: str
    version: str
    device: str  # where it really runs, e.g. "CPUExecutionProvider" or "cuda:0 (fp16)"


def load_manifest(settings: Settings) -> Manifest:
    """The verified store entry the settings point at (a name in the store, or a directory),
    checked to hold the files the chosen backend runs."""
    if settings.model_is_path:
        manifest = verify(Path(settings.model))
    else:
        manifest = ModelStore(settings.model_store).load(settings.model, settings.model_version)
    if settings.backend == "onnx":
        graph_suffix(manifest, settings.quantized)  # raises, naming what the entry lacks
    elif not manifest.has("torchscript"):
        raise ModelStoreError(f"{manifest.path}: the torchscript backend needs torchscript, which this entry does "
                              "not have (export it with --formats torchscript, or use LIMOE_BACKEND=onnx)")
    return manifest


class DeviceError(RuntimeError):
    """LIMOE_DEVICE names hardware or libraries this machine's backend cannot use."""


def check_device(settings: Settings) -> None:
    """Refuse a CUDA device the chosen backend cannot reach, before any model is loaded."""
    device = settings.device
    if not device.startswith("cuda"):
        return
    if settings.backend == "onnx":
        import onnxruntime as ort

        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise DeviceError(f"LIMOE_DEVICE={device}, but this onnxruntime has no CUDA provider (it has "
                              f"{', '.join(available)}): install onnxruntime-gpu, or set LIMOE_DEVICE=cpu")
        return
    import torch

    index = int(device.split(":")[1]) if ":" in device else 0
    if index >= torch.cuda.device_count():
        raise DeviceError(f"LIMOE_DEVICE={device}, but torch sees {torch.cuda.device_count()} CUDA device(s)"
                          + ("" if torch.cuda.is_available() else " (a CPU-only build, or no driver)")
                          + ": set LIMOE_DEVICE=cpu or another index")


def open_onnx(manifest: Manifest, device: str = "auto", threads: int = 0, quantized: bool | None = None,
              spinning: bool = True) -> OnnxEncoders:
    """The entry's ONNX graphs on the providers LIMOE_DEVICE asks for. ONNX Runtime falls back to
    the CPU silently: say so, and refuse when CUDA was demanded. Warn about int8 graphs on CUDA."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    want_cuda = device.startswith("cuda") or (device == "auto" and "CUDAExecutionProvider" in available)
    providers: list = ["CPUExecutionProvider"]
    if want_cuda:
        device_id = int(device.split(":")[1]) if ":" in device else 0
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
    enc = OnnxEncoders(manifest, providers=providers, threads=threads or None, quantized=quantized, spinning=spinning)
    active = enc.providers
    if want_cuda and "CUDAExecutionProvider" not in active:
        if device != "auto":  # the provider exists but did not start (CUDA/cuDNN libraries)
            raise DeviceError(f"LIMOE_DEVICE={device}, but ONNX Runtime runs on {', '.join(active)} "
                              "(install onnxruntime-gpu with matching CUDA/cuDNN libraries)")
        log.warning("CUDA provider not active; running on %s", active)
    if "CUDAExecutionProvider" in active and enc.quantized:
        # Dynamic int8 (MatMulInteger) has CPU kernels only; static QDQ graphs run on CUDA as
        # dequantise + fp32 matmul, with no int8 speed-up either way.
        log.warning("%s v%s runs its int8 graphs: ONNX Runtime's CUDA provider has no int8 matmul kernels for "
                    "them (quantised matmuls run on the CPU, or dequantised to fp32); export fp32 graphs "
                    "(limoe export CKPT --formats onnx) for GPU speed", manifest.name, manifest.version)
    return enc


def encoder_passes(settings: Settings, manifest: Manifest) -> int:
    """LIMOE_ENCODER_PASSES when it is set; else the entry's advice (the manifest's
    `serving.encoder_passes`: an imported CLIP asks for 1, so that one pass gets every core and a
    lone request is not held to one core's speed); else the setting's default."""
    if "encoder_passes" in settings.model_fields_set:
        return settings.encoder_passes
    advised = (manifest.data.get("serving") or {}).get("encoder_passes")
    return advised if isinstance(advised, int) and not isinstance(advised, bool) and 1 <= advised <= 16 \
        else settings.encoder_passes


def load_backend(settings: Settings) -> Backend:
    check_device(settings)
    manifest = load_manifest(settings)
    threads = threads_per_pass(encoder_passes(settings, manifest), settings.threads)
    if settings.backend == "onnx":
        return open_onnx(manifest, settings.device, threads, settings.quantized, settings.spinning)
    return TorchEncoders.from_entry(manifest, settings.device, threads)


class FakeBackend:
    """A deterministic Backend for API and batching tests.

    An image's embedding is a fixed random projection of its per-channel means and a text's of
    its token counts, so results depend only on the item itself. Every call is recorded in
    `calls` (modality, batch size); `delay_s` slows each forward pass; `fail` (a predicate on the
    batch) makes a forward pass raise, to test error isolation; `hang` (another) makes it block
    until `unhang` is set (a stuck pass: tests of LIMOE_INFER_TIMEOUT_S)."""

    def __init__(self, image_size: int = 16, embed_dim: int = 8, num_experts: int = 4, moe_layers: int = 2,
                 delay_s: float = 0.0, fail: Callable[[str, np.ndarray], bool] | None = None,
                 hang: Callable[[str, np.ndarray], bool] | None = None):
        words = ["cat", "dog", "bird", "red", "green", "blue", "circle", "square", "a photo of a"]
        self.tokenizer = Tokenizer.train(words * 3, vocab_size=320, context_length=8)
        self.preprocess = PreprocessConfig(image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.name, self.version, self.device = "fake", "1", "fake"
        self.logit_scale = 10.0
        self.moe = MoEInfo(tuple(range(1, 2 * moe_layers, 2)), num_experts, top_k=1, inference_routing="dropless")
        self.embed_dim = embed_dim
        self.delay_s, self.fail, self.hang = delay_s, fail, hang
        self.unhang = threading.Event()
        self.calls: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        rng = np.random.default_rng(0)
        self._image_proj = rng.standard_normal((3, embed_dim)).astype(np.float32)
        self._text_proj = rng.standard_normal((self.tokenizer.vocab_size, embed_dim)).astype(np.float32)
        tokens = (image_size // 4) ** 2
        self.manifest = Manifest.parse({
            "format": FORMAT, "name": "fake", "version": "1", "embedding_size": embed_dim, "config": {},
            "context_length": 8, "logit_scale": self.logit_scale, "templates": ["{}", "a photo of a {}."],
            "moe": self.moe.to_dict(), "graphs": {"image": {"tokens": tokens}, "text": {"tokens": 8}},
            "preprocessing": self.preprocess.to_dict(), "files": {}, "roles": {},
        }, Path("fake"))

    def _record(self, modality: str, x: np.ndarray) -> None:
        import time

        with self._lock:
            self.calls.append((modality, len(x)))
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.hang and self.hang(modality, x):
            self.unhang.wait(120)
        if self.fail and self.fail(modality, x):
            raise RuntimeError(f"injected failure in the {modality} encoder")

    @staticmethod
    def _routing(keys: np.ndarray, layers: int, tokens: int, experts: int) -> tuple[np.ndarray, np.ndarray]:
        """Expert ids from a hash of each item: (B, M, T, 1); nothing dropped."""
        out = np.zeros((len(keys), layers, tokens, 1), np.int64)
        for i, key in enumerate(keys):
            seed = int.from_bytes(hashlib.sha256(key.tobytes()).digest()[:4], "little")
            out[i] = np.random.default_rng(seed).integers(0, experts, (layers, tokens, 1))
        return out, np.zeros_like(out, dtype=bool)

    def encode_images(self, pixels: np.ndarray) -> EncoderOutput:
        self._record("image", pixels)
        z = pixels.mean(axis=(2, 3)) @ self._image_proj + 1e-3
        index, dropped = self._routing(pixels, len(self.moe.layers), self.manifest.image_tokens,
                                       self.moe.num_experts)
        return EncoderOutput((z / np.linalg.norm(z, axis=-1, keepdims=True)).astype(np.float32), index, dropped)

    def encode_tokens(self, ids: np.ndarray) -> EncoderOutput:
        self._record("text", ids)
        counts = np.stack([np.bincount(row, minlength=self.tokenizer.vocab_size) for row in ids]).astype(np.float32)
        counts[:, 0] = 0  # padding carries no meaning
        z = counts @ self._text_proj + 1e-3
        index, dropped = self._routing(ids, len(self.moe.layers), ids.shape[1], self.moe.num_experts)
        index[np.broadcast_to((ids == 0)[:, None, :, None], index.shape)] = -1
        return EncoderOutput((z / np.linalg.norm(z, axis=-1, keepdims=True)).astype(np.float32), index, dropped)
