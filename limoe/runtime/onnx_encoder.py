"""Run a verified model-store entry with ONNX Runtime. Torch-free (numpy, onnxruntime).

    enc = OnnxEncoders.from_store("model_store", "limoe-small")     # an encoder pair (limoe.runtime.encoders)
    out = enc.encode_images(pixels)                                 # (B, 3, R, R) float32, preprocessed
    out = enc.encode_tokens(enc.tokenizer.encode(["a red circle"]))
    out.embeddings, out.expert_index, out.dropped

`OnnxGraph` runs one graph file alone (the export checks use it before an entry exists).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from limoe.runtime.encoders import EncoderOutput
from limoe.runtime.model_store import Manifest, ModelStore, ModelStoreError, verify


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


class OnnxGraph:
    """One exported encoder graph as an encode function: x (B, ...) -> EncoderOutput. The input's
    name and dtype come from the graph ("images" float32 or "tokens" int64)."""

    def __init__(self, path: str | Path, options=None, providers: Sequence = ("CPUExecutionProvider",)):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(path), options, providers=list(providers))
        graph_input = self.session.get_inputs()[0]
        self.input = graph_input.name
        self.dtype = np.int64 if graph_input.type == "tensor(int64)" else np.float32

    def __call__(self, x: np.ndarray) -> EncoderOutput:
        return EncoderOutput(*self.session.run(None, {self.input: np.ascontiguousarray(x, dtype=self.dtype)}))


class OnnxEncoders:
    """A store entry's ONNX graphs as an encoder pair (limoe.runtime.encoders.Encoders)."""

    def __init__(self, manifest: Manifest, providers: Sequence | None = None,
                 threads: int | None = None, quantized: bool | None = None, spinning: bool = True):
        """quantized: True runs the int8 graphs, False the fp32 ones, None (auto) the fp32 ones
        when the entry has them, else the int8 ones. `providers` defaults to the CPU."""
        import onnxruntime as ort

        self.manifest = manifest
        self.name, self.version = manifest.name, manifest.version
        suffix = graph_suffix(manifest, quantized)
        self.quantized = suffix == "_int8"
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if not spinning:  # idle intra-op threads sleep instead of busy-waiting for the next op
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = list(providers or ["CPUExecutionProvider"])
        graphs = {}
        for modality in ("image", "text"):
            path = manifest.file(f"{modality}_onnx{suffix}")
            try:
                graphs[modality] = OnnxGraph(path, options, providers)
            except Exception as e:  # ORT raises its own Fail/InvalidGraph types
                raise ModelStoreError(f"{path}: ONNX Runtime cannot load it ({str(e)[:200]})") from None
        self.image, self.text = graphs["image"], graphs["text"]
        self.tokenizer = manifest.tokenizer()
        self.preprocess, self.moe, self.logit_scale = manifest.preprocess, manifest.moe, manifest.logit_scale

    @classmethod
    def from_store(cls, root: str | Path, name: str, version: str = "latest", **kw) -> "OnnxEncoders":
        return cls(ModelStore(root).load(name, version), **kw)

    @classmethod
    def from_entry(cls, entry: str | Path, **kw) -> "OnnxEncoders":
        return cls(verify(Path(entry)), **kw)

    @property
    def providers(self) -> list[str]:
        """The providers ONNX Runtime actually uses (it falls back to CPU silently)."""
        return self.image.session.get_providers()

    @property
    def device(self) -> str:
        """Where it really runs, e.g. "CPUExecutionProvider (int8)"."""
        return self.providers[0] + (" (int8)" if self.quantized else "")

    def encode_images(self, pixels: np.ndarray) -> EncoderOutput:
        """(B, 3, R, R) float32 preprocessed images (see limoe.runtime.preprocess)."""
        return self.image(pixels)

    def encode_tokens(self, ids: np.ndarray) -> EncoderOutput:
        """(B, L) int64 token ids (see `tokenizer`)."""
        return self.text(ids)
