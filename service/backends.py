"""Inference backends: ONNX Runtime (default, torch-free), TorchScript (torch, GPU users) and a
deterministic fake for API tests. All take preprocessed numpy batches and return numpy.

    encode_images((B, 3, R, R) float32) -> EncoderOutput(embeddings, expert_index, dropped)
    encode_tokens((B, L) int64)         -> EncoderOutput
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from limoe.model_store import Manifest, ModelStore, ModelStoreError, verify
from limoe.onnx_encoder import EncoderOutput, OnnxEncoders, graph_suffix
from limoe.preprocess import PreprocessConfig
from limoe.tokenizer import Tokenizer
from service.settings import Settings

log = logging.getLogger("limoe.service")


class Backend(Protocol):
    name: str
    version: str
    manifest: dict
    tokenizer: Tokenizer
    preprocess: PreprocessConfig
    logit_scale: float
    device: str  # where it really runs, e.g. "CPUExecutionProvider" or "cuda:0 (fp16)"

    def encode_images(self, pixels: np.ndarray) -> EncoderOutput: ...

    def encode_tokens(self, ids: np.ndarray) -> EncoderOutput: ...


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


def _preprocess_config(manifest: Manifest) -> PreprocessConfig:
    p = manifest.data["preprocessing"]
    return PreprocessConfig(p["image_size"], tuple(p["mean"]), tuple(p["std"]), p.get("resample", "bicubic"),
                            tuple(p.get("background", (255, 255, 255))))


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


class OnnxBackend:
    def __init__(self, manifest: Manifest, device: str = "auto", threads: int = 0, quantized: bool | None = None,
                 spinning: bool = True):
        import onnxruntime as ort

        available = ort.get_available_providers()
        want_cuda = device.startswith("cuda") or (device == "auto" and "CUDAExecutionProvider" in available)
        providers: list = ["CPUExecutionProvider"]
        if want_cuda:
            device_id = int(device.split(":")[1]) if ":" in device else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        self._enc = OnnxEncoders(manifest, providers=providers, threads=threads or None, quantized=quantized,
                                 spinning=spinning)
        active = self._enc.providers
        # ONNX Runtime falls back to CPU silently; say so, and refuse when CUDA was demanded.
        if want_cuda and "CUDAExecutionProvider" not in active:
            if device != "auto":  # the provider exists but did not start (CUDA/cuDNN libraries)
                raise DeviceError(f"LIMOE_DEVICE={device}, but ONNX Runtime runs on {', '.join(active)} "
                                  "(install onnxruntime-gpu with matching CUDA/cuDNN libraries)")
            log.warning("CUDA provider not active; running on %s", active)
        if "CUDAExecutionProvider" in active and self._enc.quantized:
            # Dynamic int8 (MatMulInteger) has CPU kernels only; static QDQ graphs run on CUDA as
            # dequantise + fp32 matmul, with no int8 speed-up either way.
            log.warning("%s v%s runs its int8 graphs: ONNX Runtime's CUDA provider has no int8 matmul kernels for "
                        "them (quantised matmuls run on the CPU, or dequantised to fp32); export fp32 graphs "
                        "(limoe export CKPT --formats onnx) for GPU speed", manifest.name, manifest.version)
        self.device = active[0] + (" (int8)" if self._enc.quantized else "")
        self.manifest = manifest.data
        self.name, self.version = manifest.name, manifest.version
        self.tokenizer, self.preprocess = self._enc.tokenizer, self._enc.preprocess
        self.logit_scale = self._enc.logit_scale

    def encode_images(self, pixels: np.ndarray) -> EncoderOutput:
        return self._enc.encode_images(pixels)

    def encode_tokens(self, ids: np.ndarray) -> EncoderOutput:
        return self._enc.encode_tokens(ids)


class TorchScriptBackend:
    """The traced encoders on CPU or CUDA (fp16 on CUDA). Imports torch only when chosen."""

    def __init__(self, manifest: Manifest, device: str = "auto", threads: int = 0):
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads and device == "cpu":
            torch.set_num_threads(threads)
        self._torch = torch
        self._device = torch.device(device)
        self._half = self._device.type == "cuda"
        module = torch.jit.load(str(manifest.file("torchscript")), map_location=self._device).eval()
        self._module = module.half() if self._half else module
        self.device = f"{self._device}" + (" (fp16)" if self._half else "")
        self.manifest = manifest.data
        self.name, self.version = manifest.name, manifest.version
        self.tokenizer = Tokenizer.load(manifest.file("tokenizer"))
        self.preprocess = _preprocess_config(manifest)
        self.logit_scale = float(manifest.data["logit_scale"])

    def _out(self, out) -> EncoderOutput:
        emb, index, dropped = (t.cpu() for t in out)
        return EncoderOutput(emb.float().numpy(), index.numpy(), dropped.numpy())

    def encode_images(self, pixels: np.ndarray) -> EncoderOutput:
        x = self._torch.from_numpy(np.ascontiguousarray(pixels)).to(self._device)
        with self._torch.inference_mode():
            return self._out(self._module.encode_image(x.half() if self._half else x))

    def encode_tokens(self, ids: np.ndarray) -> EncoderOutput:
        x = self._torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64)).to(self._device)
        with self._torch.inference_mode():
            return self._out(self._module.encode_text(x))


def load_backend(settings: Settings) -> Backend:
    check_device(settings)
    manifest = load_manifest(settings)
    if settings.backend == "onnx":
        return OnnxBackend(manifest, settings.device, settings.threads, settings.quantized, settings.spinning)
    return TorchScriptBackend(manifest, settings.device, settings.threads)


class FakeBackend:
    """Deterministic stand-in for API and batching tests.

    An image's embedding is a fixed random projection of its per-channel means and a text's of
    its token counts, so results depend only on the item itself. Every call is recorded in
    `calls` (modality, batch size); `delay_s` slows each forward pass; `fail` (a predicate on the
    batch) makes a forward pass raise, to test error isolation."""

    def __init__(self, image_size: int = 16, embed_dim: int = 8, num_experts: int = 4, moe_layers: int = 2,
                 delay_s: float = 0.0, fail: Callable[[str, np.ndarray], bool] | None = None):
        words = ["cat", "dog", "bird", "red", "green", "blue", "circle", "square", "a photo of a"]
        self.tokenizer = Tokenizer.train(words * 3, vocab_size=320, context_length=8)
        self.preprocess = PreprocessConfig(image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.name, self.version, self.device = "fake", "1", "fake"
        self.logit_scale = 10.0
        self.num_experts, self.moe_layers, self.embed_dim = num_experts, moe_layers, embed_dim
        self.delay_s, self.fail = delay_s, fail
        self.calls: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        rng = np.random.default_rng(0)
        self._image_proj = rng.standard_normal((3, embed_dim)).astype(np.float32)
        self._text_proj = rng.standard_normal((self.tokenizer.vocab_size, embed_dim)).astype(np.float32)
        tokens = (image_size // 4) ** 2
        self.manifest = {
            "format": "limoe-model-store/1", "name": "fake", "version": "1", "embedding_size": embed_dim,
            "context_length": 8, "logit_scale": self.logit_scale, "templates": ["{}", "a photo of a {}."],
            "moe": {"layers": list(range(1, 2 * moe_layers, 2)), "num_experts": num_experts, "top_k": 1},
            "graphs": {"image": {"tokens": tokens}, "text": {"tokens": 8}},
            "preprocessing": self.preprocess.to_dict(), "files": {}, "roles": {},
        }

    def _record(self, modality: str, x: np.ndarray) -> None:
        import time

        with self._lock:
            self.calls.append((modality, len(x)))
        if self.delay_s:
            time.sleep(self.delay_s)
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
        index, dropped = self._routing(pixels, self.moe_layers, self.manifest["graphs"]["image"]["tokens"],
                                       self.num_experts)
        return EncoderOutput((z / np.linalg.norm(z, axis=-1, keepdims=True)).astype(np.float32), index, dropped)

    def encode_tokens(self, ids: np.ndarray) -> EncoderOutput:
        self._record("text", ids)
        counts = np.stack([np.bincount(row, minlength=self.tokenizer.vocab_size) for row in ids]).astype(np.float32)
        counts[:, 0] = 0  # padding carries no meaning
        z = counts @ self._text_proj + 1e-3
        index, dropped = self._routing(ids, self.moe_layers, ids.shape[1], self.num_experts)
        index[np.broadcast_to((ids == 0)[:, None, :, None], index.shape)] = -1
        return EncoderOutput((z / np.linalg.norm(z, axis=-1, keepdims=True)).astype(np.float32), index, dropped)
