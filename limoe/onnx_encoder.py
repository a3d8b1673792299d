"""Run a verified model-store entry with ONNX Runtime. Torch-free (numpy, onnxruntime).

    enc = OnnxEncoders.from_store("model_store", "limoe-small")
    out = enc.encode_images(pixels)            # pixels (B, 3, R, R) float32, preprocessed
    out = enc.encode_texts(["a red circle"])   # tokenised with the entry's tokenizer
    out.embeddings, out.expert_index, out.dropped
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from limoe.model_store import Manifest, ModelStore, ModelStoreError, verify
from limoe.preprocess import PreprocessConfig
from limoe.tokenizer import Tokenizer


@dataclass
class EncoderOutput:
    embeddings: np.ndarray  # (B, P) float32, L2-normalised
    expert_index: np.ndarray  # (B, M, T, K) int64, -1 for padding
    dropped: np.ndarray  # (B, M, T, K) bool


def graph_suffix(manifest: Manifest, quantized: bool | None) -> str:
    """Which ONNX graphs of the entry to run: "" (fp32) or "_int8". quantized=None picks fp32 when
    the entry has them, else int8. An entry without the chosen pair is refused, saying what it has."""
    if quantized is None:
        quantized = not manifest.has("image_onnx")
    suffix = "_int8" if quantized else ""
    missing = [role for role in (f"image_onnx{suffix}", f"text_onnx{suffix}") if not manifest.has(role)]
    if missing:
        have = "int8 graphs only" if manifest.has("image_onnx_int8") else "no int8 graphs"
        raise ModelStoreError(f"{manifest.path}: the onnx backend needs {', '.join(missing)}, which this entry "
                              f"does not have (it has {have}; unset LIMOE_QUANTIZED, or export it with "
                              f"--formats {'int8' if quantized else 'onnx'})")
    return suffix


class OnnxEncoders:
    def __init__(self, manifest: Manifest, providers: Sequence[str] | None = None,
                 threads: int | None = None, quantized: bool | None = None, spinning: bool = True):
        """quantized: True runs the int8 graphs, False the fp32 ones, None (auto) the fp32 ones
        when the entry has them, else the int8 ones."""
        import onnxruntime as ort

        self.manifest = manifest
        suffix = graph_suffix(manifest, quantized)
        self.quantized = suffix == "_int8"
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spinning:  # idle intra-op threads sleep instead of busy-waiting for the next op
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = list(providers or ["CPUExecutionProvider"])
        self.sessions = {}
        for modality in ("image", "text"):
            path = manifest.file(f"{modality}_onnx{suffix}")
            try:
                self.sessions[modality] = ort.InferenceSession(str(path), options, providers=providers)
            except Exception as e:  # ORT raises its own Fail/InvalidGraph types
                raise ModelStoreError(f"{path}: ONNX Runtime cannot load it ({str(e)[:200]})") from None
        self.tokenizer = Tokenizer.load(manifest.file("tokenizer"))
        p = manifest.data["preprocessing"]
        self.preprocess = PreprocessConfig(p["image_size"], tuple(p["mean"]), tuple(p["std"]),
                                           p.get("resample", "bicubic"), tuple(p.get("background", (255, 255, 255))))
        self.logit_scale = float(manifest.data["logit_scale"])

    @classmethod
    def from_store(cls, root: str | Path, name: str, version: str = "latest", **kw) -> "OnnxEncoders":
        return cls(ModelStore(root).load(name, version), **kw)

    @classmethod
    def from_entry(cls, entry: str | Path, **kw) -> "OnnxEncoders":
        return cls(verify(Path(entry)), **kw)

    @property
    def providers(self) -> list[str]:
        """The providers ONNX Runtime actually uses (it falls back to CPU silently)."""
        return self.sessions["image"].get_providers()

    def _run(self, modality: str, name: str, x: np.ndarray) -> EncoderOutput:
        emb, index, dropped = self.sessions[modality].run(None, {name: x})
        return EncoderOutput(emb, index, dropped)

    def encode_images(self, pixels: np.ndarray) -> EncoderOutput:
        """(B, 3, R, R) float32 preprocessed images (see limoe.preprocess)."""
        return self._run("image", "images", np.ascontiguousarray(pixels, dtype=np.float32))

    def encode_tokens(self, ids: np.ndarray) -> EncoderOutput:
        """(B, L) int64 token ids."""
        return self._run("text", "tokens", np.ascontiguousarray(ids, dtype=np.int64))

    def encode_texts(self, texts: Sequence[str]) -> EncoderOutput:
        return self.encode_tokens(self.tokenizer.encode(texts))
