"""Checkpoint -> model-store entry: ONNX image and text encoders, one TorchScript file with both,
the tokenizer, and a manifest with checksums (`limoe export`).

The exported encoders run in inference mode, as the config's `inference_routing` says:
"dropless" (the default) computes every token's K choices, each expert on exactly the tokens
that chose it (per expert NonZero, Gather, the MLP, the gate, one ScatterND back: standard ONNX
ops, unrolled over the E experts); "capacity" routes every example as its own group at the
inference capacity factor. Either way the batch axis is dynamic and results are
batch-independent, and so are the int8 graphs (fixed activation scales, see limoe.export.quantize).
Each encoder returns, besides the embeddings, what its MoE layers did to every token:

    embeddings    (B, P)        float32, L2-normalised
    expert_index  (B, M, T, K)  int64, chosen experts per MoE layer and token (-1 for padding)
    dropped       (B, M, T, K)  bool, the choice found its expert full (token skipped it);
                                always False for a dropless entry

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
from limoe.export.model_card import render_model_card
from limoe.export.quantize import DEFAULT_SCHEME, DESCRIPTIONS, EXPORT_SCHEMES, batches
from limoe.export.quantize import quantize as quantize_graph
from limoe.model.checkpoint import load_checkpoint, read_tokenizer
from limoe.model.moe import RoutingInfo, fused_moe_onnx
from limoe.model.stats import model_stats
from limoe.model.transformer import LIMoE
from limoe.runtime.encoders import Encode, batch_independence
from limoe.runtime.model_store import (
    FORMAT,
    MANIFEST,
    Manifest,
    ModelStore,
    MoEInfo,
    check_identifier,
    file_record,
    verify,
)
from limoe.runtime.onnx_encoder import OnnxGraph
from limoe.runtime.preprocess import PreprocessConfig
from limoe.runtime.templates import DEFAULT_TEMPLATES
from limoe.runtime.tokenizer import Tokenizer
from limoe.train.routing_log import read_log, routing_history

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


class TorchScriptModule(nn.Module):
    """Both encoders in one module, for the single TorchScript file. Its method names are part of
    the store format; limoe.runtime.encoders.TorchEncoders.from_entry runs the file as an encoder pair."""

    def __init__(self, model: LIMoE):
        super().__init__()
        self.image = ImageEncoder(model)
        self.text = TextEncoder(model)

    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.image(images)

    def encode_text(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.text(tokens)


def logit_scale(model: LIMoE) -> float:
    """The multiplier on cosine similarities that inference uses: exp of the clamped learned scale."""
    with torch.no_grad():
        return float(model.logit_scale.clamp(max=model.cfg.logit_scale_max).exp())


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
            dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=opset,
            dynamo=True, external_data=False, verbose=False,
            custom_translation_table={torch.ops.limoe.fused_moe.default: fused_moe_onnx},
        )
    import onnx

    graph = onnx.load(str(path))
    if fold_constant_gathers(graph):
        onnx.save_model(graph, str(path))


def fold_constant_gathers(model) -> int:
    """Replace every Gather of an initializer at a constant index by the gathered initializer.

    The exporter writes expert e's weights as Gather(w1 (E, D, H), e): a runtime copy, and a
    MatMul whose weight is no initializer, which no int8 quantiser touches. Folded, each expert
    has its own (D, H) weights. Returns how many Gathers were folded (the model is edited)."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    constants = {n.output[0]: next((a.t for a in n.attribute if a.name == "value"), None)
                 for n in g.node if n.op_type == "Constant"}

    def constant(name: str) -> np.ndarray | None:
        t = inits.get(name) or constants.get(name)
        return None if t is None else numpy_helper.to_array(t)

    kept, folded = [], 0
    for node in g.node:
        index = constant(node.input[1]) if node.op_type == "Gather" and node.input[0] in inits else None
        if index is None:
            kept.append(node)
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        value = np.take(numpy_helper.to_array(inits[node.input[0]]), index, axis=axis)
        g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), node.output[0]))
        folded += 1
    if folded:
        del g.node[:]
        g.node.extend(kept)
        used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
        for t in [t for t in g.initializer if t.name not in used]:
            g.initializer.remove(t)
    return folded


def export_torchscript(model: LIMoE, images: Tensor, tokens: Tensor, path: Path) -> None:
    """Both encoders traced into one TorchScript file (methods encode_image, encode_text).

    Tracing records shapes symbolically (sizes flow through aten::size), so the batch axis
    stays dynamic; the parity tests check it at several batch sizes."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about static per-example shapes
        traced = torch.jit.trace_module(TorchScriptModule(model).eval(),
                                        {"encode_image": (images,), "encode_text": (tokens,)})
    traced.save(str(path))


def calibration_inputs(cfg, tokenizer: Tokenizer, data: str | None = None, cache: str | Path | None = None,
                       count: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Images (N, 3, R, R) and token ids (N, L) to calibrate int8 activation scales, with a record
    of where they came from. `data` is a training mix ("emoji:2,icons:1"; its train split, N
    items drawn by seed, one caption each); None gives synthetic inputs (random pixels and token
    ids), good enough for an untrained model only."""
    if data is None:
        g = torch.Generator().manual_seed(seed)
        images = torch.randn(count, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
        tokens = torch.randint(3, cfg.vocab_size, (count, cfg.context_length), generator=g)
        for i in range(count):
            tokens[i, 2 + i % (cfg.context_length - 2):] = cfg.pad_id
        return images.numpy(), tokens.numpy(), {"source": "synthetic", "count": count, "seed": seed}
    from limoe.train.dataset import MixDataset

    ds = MixDataset(data, split="train", preprocess=PreprocessConfig.from_model_config(cfg), cache=cache, seed=seed)
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(ds), size=min(count, len(ds)), replace=False, p=ds.sample_weights / ds.sample_weights.sum())
    items = [ds[int(i)] for i in picks]
    images = np.stack([it["pixels"] for it in items]).astype(np.float32)
    tokens = tokenizer.encode([it["caption"] for it in items])
    return images, tokens, {"source": data, "split": "train", "count": len(items), "seed": seed}


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


def agreement(reference: Encode, candidate: Encode, x: np.ndarray) -> dict[str, float]:
    """How close `candidate` (an int8 graph) stays to `reference` (fp32) on `x`: embedding cosine
    and expert choices, and whether the candidate is batch-independent."""
    ref, got = reference(x), candidate(x)
    cos = (ref.embeddings * got.embeddings).sum(-1)
    real = ref.expert_index >= 0
    return {
        "embedding_cosine_mean": round(float(cos.mean()), 6),
        "embedding_cosine_min": round(float(cos.min()), 6),
        "expert_choice_agreement": round(float((ref.expert_index == got.expert_index)[real].mean()), 6)
        if real.any() else 1.0,
        "examples": int(ref.embeddings.shape[0]),
        "batch_independence_max_diff": batch_independence(candidate, x),
    }


def _libraries() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"limoe": limoe.__version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def _commit_entry(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest into the finished temporary entry, verify it, and swap it into place
    (an existing entry is renamed away first and deleted after), so readers never see half."""
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    verify(tmp)
    old = final.parent / f".old-{final.name}-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def finish_entry(tmp: Path, final: Path, manifest: dict[str, Any], card: str, started: float) -> None:
    """The last steps of every export: the model card, every file's checksum, the time it took,
    and the swap into place (`_commit_entry`)."""
    roles = manifest["roles"]
    roles["model_card"] = "MODEL_CARD.md"
    (tmp / roles["model_card"]).write_text(card, encoding="utf-8")
    manifest["files"] = {f: file_record(tmp / f) for f in sorted(roles.values())}
    manifest["export_seconds"] = round(time.perf_counter() - started, 2)
    _commit_entry(tmp, final, manifest)


def freeze_entry_int8(entry: str | Path, calibration_data: str | None = None, cache: str | Path | None = None,
                      count: int = 256) -> Manifest:
    """Give an existing entry's dynamic int8 graphs fixed activation scales (limoe.export.quantize.
    freeze_dynamic_int8), calibrated on `count` items of the training mix `calibration_data`:
    for entries exported before static int8 existed, whose checkpoint is gone. The entry is
    rebuilt beside itself and swapped in, so readers never see half of it."""
    from limoe.export.quantize import freeze_dynamic_int8
    from limoe.model.config import LIMoEConfig

    entry = Path(entry)
    manifest = verify(entry)
    data = json.loads(json.dumps(manifest.data))
    roles = data["roles"]
    if "image_onnx_int8" not in roles:
        raise ValueError(f"{entry} has no int8 graphs")
    tokenizer = manifest.tokenizer()
    cfg = LIMoEConfig.from_dict(data["config"])
    cal_images, cal_tokens, record = calibration_inputs(cfg, tokenizer, calibration_data, cache, count)
    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(entry, tmp)
    try:
        int8 = data.setdefault("quantization", {}).setdefault("int8", {})
        frozen = {}
        for modality, name, cal in (("image", "images", cal_images), ("text", "tokens", cal_tokens)):
            path = tmp / roles[f"{modality}_onnx_int8"]
            frozen[modality] = freeze_dynamic_int8(path, path, [{name: b} for b in batches(cal, 32)])
            int8.setdefault(modality, {})["batch_independence_max_diff"] = batch_independence(OnnxGraph(path), cal[:5])
        share_weights([tmp / roles[f"{m}_onnx_int8"] for m in ("image", "text")], tmp / roles["onnx_weights_int8"])
        int8.update(scheme="static-frozen", calibration=record, frozen_nodes=frozen,
                    description="dynamic int8 weights with activation scales frozen from calibration "
                                "(DynamicQuantizeLinear -> QuantizeLinear)")
        if "model_card" in roles:
            (tmp / roles["model_card"]).write_text(
                render_model_card(data, data.get("training"), data.get("stats")), encoding="utf-8")
        data["files"] = {f: file_record(tmp / f) for f in data["files"]}
        _commit_entry(tmp, entry, data)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return verify(entry)


def training_record(checkpoint: str | Path, extra: dict[str, Any], sparse: bool) -> dict[str, Any]:
    """What the model card tells of the training run that wrote `checkpoint` (its metadata `extra`),
    with the routing over the run when the model is sparse and the run's log.jsonl lies beside it
    (exported from its run directory)."""
    record = {k: extra[k] for k in ("step", "train", "data", "sources", "init", "averaged", "teacher") if k in extra}
    log = Path(checkpoint).with_name("log.jsonl")
    if sparse and log.exists():
        record["routing_history"] = routing_history(read_log(log))
    return record


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
    int8_scheme: str = DEFAULT_SCHEME,
    calibration_data: str | None = None,
    calibration_cache: str | Path | None = None,
    calibration_count: int = 256,
    inference_routing: str | None = None,
    moe_op: str = "standard",
) -> Manifest:
    """Write `<store>/<name>/<version>/` from a checkpoint and return its verified manifest.

    `formats` picks what the entry holds (see FORMATS); `quantize="int8"` adds "int8". An entry
    of int8 graphs alone is about a quarter of the fp32 one (the shipped default is one): the
    fp32 graphs are still exported, to quantise from and to check against, then left out.
    int8 graphs use `int8_scheme` (limoe.export.quantize; "static" is calibrated on `calibration_count`
    items of the training mix `calibration_data` in `calibration_cache`, or on synthetic inputs
    when it is None). `inference_routing` ("dropless" or "capacity") overrides the checkpoint's.
    `moe_op="fused"` writes the ONNX graphs' dropless MoE layers as ONNX Runtime's
    `com.microsoft.MoE` op (tanh-approximate GELU) instead of standard ops; TorchScript keeps
    the standard dropless layers.

    The entry is built in a hidden temporary directory and renamed into place, so a failed or
    interrupted export never leaves a half-written version behind."""
    check_identifier(name)
    store_ = ModelStore(store)
    version = check_identifier(version or store_.next_version(name), "version")
    if quantize not in (None, "int8"):
        raise ValueError(f"--quantize supports only 'int8', not {quantize!r}")
    if int8_scheme not in EXPORT_SCHEMES:
        raise ValueError(f"int8 scheme must be one of {', '.join(EXPORT_SCHEMES)} (batch-independent), "
                         f"not {int8_scheme!r}")
    formats = set(formats) | ({"int8"} if quantize else set())
    if not formats or formats - set(FORMATS):
        raise ValueError(f"formats must be a non-empty subset of {', '.join(FORMATS)}, not {sorted(formats)}")
    final = Path(store) / name / version
    if final.exists() and not force:
        raise FileExistsError(f"{final} already exists (pass force=True / --force to replace it)")

    started = time.perf_counter()
    model, extra = load_checkpoint(checkpoint)
    if inference_routing is not None and inference_routing != model.cfg.inference_routing:
        model = model.with_config(inference_routing=inference_routing)
    if moe_op not in ("standard", "fused"):
        raise ValueError(f"moe_op must be 'standard' or 'fused', not {moe_op!r}")
    if moe_op == "fused" and (model.cfg.inference_routing != "dropless" or model.cfg.renormalize_gates):
        raise ValueError("moe_op='fused' needs dropless inference routing and gates that are not renormalised")
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
        model.set_moe_op(moe_op)
        export_onnx(ImageEncoder(model), images, "images", tmp / roles["image_onnx"], opset)
        export_onnx(TextEncoder(model), tokens, "tokens", tmp / roles["text_onnx"], opset)
        model.set_moe_op("standard")
        if "torchscript" in formats:
            roles["torchscript"] = "encoders.torchscript.pt"
            export_torchscript(model, images, tokens, tmp / roles["torchscript"])
        tokenizer.save(tmp / roles["tokenizer"])

        quantization: dict[str, Any] = {}
        if "int8" in formats:
            cal_images, cal_tokens, cal_record = calibration_inputs(cfg, tokenizer, calibration_data,
                                                                    calibration_cache, calibration_count)
            if calibration_data is None:
                check_images, check_tokens = example_inputs(model, batch=32, seed=1)
            else:  # check on real inputs: the range the scales were calibrated for
                check_images, check_tokens = torch.from_numpy(cal_images[:32]), torch.from_numpy(cal_tokens[:32])
            quantization = {"scheme": int8_scheme, "description": DESCRIPTIONS[int8_scheme],
                            "calibration": cal_record}
            for modality, input_name, cal, check in (("image", "images", cal_images, check_images),
                                                     ("text", "tokens", cal_tokens, check_tokens)):
                src, dst = tmp / roles[f"{modality}_onnx"], tmp / f"{modality}_encoder.int8.onnx"
                quantize_graph(src, dst, int8_scheme, [{input_name: b} for b in batches(cal, 32)])
                roles[f"{modality}_onnx_int8"] = dst.name
                quantization[modality] = agreement(OnnxGraph(src), OnnxGraph(dst), check.numpy())
        if "onnx" not in formats:  # the fp32 graphs were only the source of the int8 ones
            for modality in ("image", "text"):
                (tmp / roles.pop(f"{modality}_onnx")).unlink()
        # One copy of the shared tower per precision (see share_weights).
        for suffix, data in (("", "encoders.weights"), ("_int8", "encoders.int8.weights")):
            if f"image_onnx{suffix}" in roles:
                share_weights([tmp / roles[f"{m}_onnx{suffix}"] for m in ("image", "text")], tmp / data)
                roles[f"onnx_weights{suffix}"] = data

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
            "logit_scale": logit_scale(model),
            "templates": list(templates),
            "moe": MoEInfo.from_config(cfg, onnx_op=moe_op).to_dict(),
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
            "source_checkpoint": {"file": Path(checkpoint).name, **file_record(Path(checkpoint)),
                                  **({"recovered_from": extra["recovered_from"]} if "recovered_from" in extra else {})},
            "evaluation": extra.get("eval", {}),
            "quantization": {"int8": quantization} if quantization else {},
            "roles": roles,
        }
        if "train" in extra:
            manifest["training"] = training_record(checkpoint, extra, bool(cfg.moe_layer_ids))
        manifest["stats"] = dataclasses.asdict(model_stats(cfg))
        finish_entry(tmp, final, manifest, render_model_card(manifest, manifest.get("training"), manifest["stats"]),
                     started)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return verify(final)
