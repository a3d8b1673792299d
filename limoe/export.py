"""Checkpoint -> model-store entry: ONNX image and text encoders, one TorchScript file with both,
the tokenizer, and a manifest with checksums (`limoe export`).

The exported encoders run in inference mode: every example is its own routing group at the
inference capacity factor, so the batch axis is dynamic and results are batch-independent.
Each encoder returns, besides the embeddings, what its MoE layers did to every token:

    embeddings    (B, P)        float32, L2-normalised
    expert_index  (B, M, T, K)  int64, chosen experts per MoE layer and token (-1 for padding)
    dropped       (B, M, T, K)  bool, the choice found its expert full (token skipped it)

with M MoE layers, T tokens (patches or text positions), K experts per token.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import limoe
from limoe.checkpoint import load_checkpoint, read_tokenizer
from limoe.model import LIMoE
from limoe.model_card import render_model_card
from limoe.model_store import FORMAT, MANIFEST, Manifest, ModelStore, check_identifier, file_record, verify
from limoe.moe import RoutingInfo
from limoe.preprocess import PreprocessConfig
from limoe.stats import model_stats
from limoe.templates import DEFAULT_TEMPLATES
from limoe.tokenizer import Tokenizer

OUTPUTS = ("embeddings", "expert_index", "dropped")
DEFAULT_OPSET = 18
FORMATS = ("onnx", "torchscript", "int8")  # fp32 ONNX graphs, the TorchScript file, int8 ONNX graphs
DEFAULT_FORMATS = ("onnx", "torchscript")


def _routing_outputs(routing: list[RoutingInfo], batch: int, tokens: int, top_k: int) -> tuple[Tensor, Tensor]:
    """Stack the MoE layers' choices: (B, M, T, K) expert ids (-1 for padding) and drop flags."""
    if not routing:  # a dense model: M = 0
        empty = torch.zeros(batch, 0, tokens, top_k, dtype=torch.int64)
        return empty, empty.bool()
    index = torch.stack([torch.where(r.mask.unsqueeze(-1), r.expert_index, -1) for r in routing], dim=1)
    dropped = torch.stack([r.dropped for r in routing], dim=1)
    return index, dropped


class ImageEncoder(nn.Module):
    """images (B, 3, R, R) float32 -> embeddings, expert_index, dropped."""

    def __init__(self, model: LIMoE):
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feats, routing = self.model.image_features(images)
        emb = F.normalize(self.model.image_proj(feats), dim=-1)
        return (emb, *_routing_outputs(routing, images.shape[0], self.model.cfg.num_patches, self.model.cfg.top_k))


class TextEncoder(nn.Module):
    """tokens (B, L) int64 -> embeddings, expert_index, dropped."""

    def __init__(self, model: LIMoE):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        feats, routing = self.model.text_features(tokens)
        emb = F.normalize(self.model.text_proj(feats), dim=-1)
        return (emb, *_routing_outputs(routing, tokens.shape[0], tokens.shape[1], self.model.cfg.top_k))


class Encoders(nn.Module):
    """Both encoders in one module, for the single TorchScript file."""

    def __init__(self, model: LIMoE):
        super().__init__()
        self.image = ImageEncoder(model)
        self.text = TextEncoder(model)

    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.image(images)

    def encode_text(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.text(tokens)


def example_inputs(model: LIMoE, batch: int = 2, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Deterministic images and token ids (with some padding) for tracing and agreement checks."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    tokens = torch.randint(3, cfg.vocab_size, (batch, cfg.context_length), generator=g)
    for i in range(batch):
        tokens[i, 2 + i % (cfg.context_length - 2):] = cfg.pad_id
    return images, tokens


def export_onnx(encoder: nn.Module, example: Tensor, input_name: str, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """One encoder to a single self-contained ONNX file with a dynamic batch axis."""
    # The exporter logs a warning per torchvision op it cannot register; we use none of them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            encoder.eval(), (example,), str(path), input_names=[input_name], output_names=list(OUTPUTS),
            dynamic_shapes={input_name: {0: torch.export.Dim("batch")}}, opset_version=opset,
            dynamo=True, external_data=False, verbose=False,
        )


def export_torchscript(model: LIMoE, images: Tensor, tokens: Tensor, path: Path) -> None:
    """Both encoders traced into one TorchScript file (methods encode_image, encode_text).

    Tracing records shapes symbolically (sizes flow through aten::size), so the batch axis
    stays dynamic; the parity tests check it at several batch sizes."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about static per-example shapes
        traced = torch.jit.trace_module(Encoders(model).eval(),
                                        {"encode_image": (images,), "encode_text": (tokens,)})
    traced.save(str(path))


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8 quantisation of every MatMul/Gemm weight (ONNX Runtime's quantize_dynamic)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its shape inference warns about every int64/bool tensor it skips
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def share_weights(graphs: Sequence[Path], data_file: Path, min_bytes: int = 1024, align: int = 4096) -> None:
    """Move the graphs' initializers into one external-data file, each distinct tensor once.

    The image and text encoders are one transformer: exported apart, both graphs carry the same
    tower weights. Here every initializer of at least `min_bytes` is keyed by its dtype, shape
    and bytes; the first copy goes into `data_file` (offsets aligned to `align` bytes, so ONNX
    Runtime can map them) and every graph points at it. The graphs stay valid ONNX; ONNX
    Runtime finds `data_file` next to them."""
    import hashlib

    import onnx

    models = [onnx.load(str(g)) for g in graphs]
    offsets: dict[bytes, tuple[int, int]] = {}
    with open(data_file, "wb") as out:
        for model in models:
            for t in model.graph.initializer:
                if len(t.raw_data) < min_bytes:
                    continue
                key = hashlib.sha256(f"{t.data_type}:{list(t.dims)}:".encode() + t.raw_data).digest()
                if key not in offsets:
                    out.write(b"\0" * (-out.tell() % align))
                    offsets[key] = (out.tell(), len(t.raw_data))
                    out.write(t.raw_data)
                offset, length = offsets[key]
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                for k, v in (("location", data_file.name), ("offset", str(offset)), ("length", str(length))):
                    entry = t.external_data.add()
                    entry.key, entry.value = k, v
    for model, g in zip(models, graphs):
        onnx.save_model(model, str(g))  # the tensors already point at data_file: nothing else is written


def onnx_agreement(fp32: Path, int8: Path, feed: dict[str, np.ndarray]) -> dict[str, float]:
    """How close the int8 graph stays to fp32 on `feed`: embedding cosine and expert choices."""
    import onnxruntime as ort

    runs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed) for p in (fp32, int8)]
    (e32, x32, _), (e8, x8, _) = runs
    cos = (e32 * e8).sum(-1)
    real = x32 >= 0
    return {
        "embedding_cosine_mean": round(float(cos.mean()), 6),
        "embedding_cosine_min": round(float(cos.min()), 6),
        "expert_choice_agreement": round(float((x32 == x8)[real].mean()), 6) if real.any() else 1.0,
        "examples": int(e32.shape[0]),
    }


def _libraries() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"limoe": limoe.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def export_entry(
    checkpoint: str | Path,
    store: str | Path,
    name: str,
    version: str | None = None,
    quantize: str | None = None,
    tokenizer: Tokenizer | None = None,
    formats: Sequence[str] = DEFAULT_FORMATS,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
) -> Manifest:
    """Write `<store>/<name>/<version>/` from a checkpoint and return its verified manifest.

    `formats` picks what the entry holds (see FORMATS); `quantize="int8"` adds "int8". An entry
    of int8 graphs alone is about a quarter of the fp32 one (the shipped default is one): the
    fp32 graphs are still exported, to quantise from and to check against, then left out.

    The entry is built in a hidden temporary directory and renamed into place, so a failed or
    interrupted export never leaves a half-written version behind."""
    check_identifier(name)
    store_ = ModelStore(store)
    version = check_identifier(version or store_.next_version(name), "version")
    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize supports only 'int8', not {quantize!r}")
    formats = set(formats) | ({"int8"} if quantize else set())
    if not formats or formats - set(FORMATS):
        raise ValueError(f"formats must be a non-empty subset of {', '.join(FORMATS)}, not {sorted(formats)}")
    final = Path(store) / name / version
    if final.exists() and not force:
        raise FileExistsError(f"{final} already exists (pass force=True / --force to replace it)")

    started = time.perf_counter()
    model, extra = load_checkpoint(checkpoint)
    tokenizer = tokenizer or read_tokenizer(checkpoint)
    if tokenizer is None:
        raise ValueError(f"{checkpoint} holds no tokenizer; pass one (--tokenizer FILE)")
    cfg = model.cfg
    if tokenizer.context_length != cfg.context_length or tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError("the tokenizer does not fit the model's context length or vocabulary")

    tmp = Path(store) / name / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        images, tokens = example_inputs(model)
        roles = {"image_onnx": "image_encoder.onnx", "text_onnx": "text_encoder.onnx",
                 "tokenizer": "tokenizer.json"}
        export_onnx(ImageEncoder(model), images, "images", tmp / roles["image_onnx"], opset)
        export_onnx(TextEncoder(model), tokens, "tokens", tmp / roles["text_onnx"], opset)
        if "torchscript" in formats:
            roles["torchscript"] = "encoders.torchscript.pt"
            export_torchscript(model, images, tokens, tmp / roles["torchscript"])
        tokenizer.save(tmp / roles["tokenizer"])

        quantization = {}
        if "int8" in formats:
            check_images, check_tokens = example_inputs(model, batch=32, seed=1)
            for modality, feed in (("image", {"images": check_images.numpy()}),
                                   ("text", {"tokens": check_tokens.numpy()})):
                src, dst = tmp / roles[f"{modality}_onnx"], tmp / f"{modality}_encoder.int8.onnx"
                quantize_int8(src, dst)
                roles[f"{modality}_onnx_int8"] = dst.name
                quantization[modality] = onnx_agreement(src, dst, feed)
        if "onnx" not in formats:  # the fp32 graphs were only the source of the int8 ones
            for modality in ("image", "text"):
                (tmp / roles.pop(f"{modality}_onnx")).unlink()
        # One copy of the shared tower per precision (see share_weights).
        for suffix, data in (("", "encoders.weights"), ("_int8", "encoders.int8.weights")):
            if f"image_onnx{suffix}" in roles:
                share_weights([tmp / roles[f"{m}_onnx{suffix}"] for m in ("image", "text")], tmp / data)
                roles[f"onnx_weights{suffix}"] = data

        with torch.no_grad():
            logit_scale = float(model.logit_scale.clamp(max=cfg.logit_scale_max).exp())
        M, K = len(cfg.moe_layer_ids), cfg.top_k
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "name": name,
            "version": version,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": cfg.to_dict(),
            "preprocessing": PreprocessConfig.from_model_config(cfg).to_dict(),
            "context_length": cfg.context_length,
            "embedding_size": cfg.embed_dim,
            "logit_scale": logit_scale,
            "templates": list(templates),
            "moe": {"layers": list(cfg.moe_layer_ids), "num_experts": cfg.num_experts, "top_k": K,
                    "eval_capacity_factor": cfg.eval_capacity_factor, "batch_priority": cfg.batch_priority},
            "graphs": {
                "image": {"input": {"name": "images", "dtype": "float32",
                                    "shape": ["batch", cfg.in_channels, cfg.image_size, cfg.image_size]},
                          "tokens": cfg.num_patches},
                "text": {"input": {"name": "tokens", "dtype": "int64", "shape": ["batch", cfg.context_length]},
                         "tokens": cfg.context_length},
                "outputs": {"embeddings": {"dtype": "float32", "shape": ["batch", cfg.embed_dim]},
                            "expert_index": {"dtype": "int64", "shape": ["batch", M, "tokens", K]},
                            "dropped": {"dtype": "bool", "shape": ["batch", M, "tokens", K]}},
            },
            "onnx": {"opset": opset, "exporter": "torch.onnx (dynamo)"},
            "libraries": _libraries(),
            "source_checkpoint": {"file": Path(checkpoint).name, **file_record(Path(checkpoint))},
            "evaluation": extra.get("eval", {}),
            "quantization": {"int8": quantization} if quantization else {},
            "roles": roles,
        }
        if "train" in extra:
            manifest["training"] = {k: extra[k] for k in ("step", "train", "data", "sources") if k in extra}
        manifest["stats"] = dataclasses.asdict(model_stats(cfg))
        roles["model_card"] = "MODEL_CARD.md"
        (tmp / roles["model_card"]).write_text(
            render_model_card(manifest, manifest.get("training"), manifest["stats"]), encoding="utf-8")
        manifest["files"] = {f: file_record(tmp / f) for f in sorted(roles.values())}
        manifest["export_seconds"] = round(time.perf_counter() - started, 2)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        verify(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return verify(final)
