"""`limoe import open-clip`: an OpenCLIP (or OpenAI CLIP) checkpoint the user has -> a verified,
two-tower store entry that the service and `limoe classify` serve torch-free and open_clip-free.

    checkpoint (.pt / .bin / .safetensors; a state dict or {"state_dict": ...})
      -> limoe.model.clip.CLIP(architecture), loaded strictly (named mismatches)
      -> ONNX fp32 image and text graphs (embeddings, plus empty routing outputs: M = 0)
      -> static int8 graphs, calibrated on the user's images or on synthetic ones
      -> OpenCLIP's tokenizer (limoe.runtime.clip_tokenizer) and preprocessing (torchvision's
         Resize + CenterCrop, bicubic, OpenAI's mean/std) recorded in the manifest
      -> the licence the user gave, a model card, checksums; built aside and renamed into place.

Nothing is downloaded and open_clip is never imported.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from limoe.export.exporter import (
    DEFAULT_OPSET,
    OUTPUTS,
    _libraries,
    _routing_outputs,
    agreement,
    export_onnx,
    finish_entry,
    share_weights,
    training_record,
)
from limoe.export.model_card import routing_over_training
from limoe.export.quantize import DESCRIPTIONS, batches
from limoe.export.quantize import quantize as quantize_graph
from limoe.model.clip import (
    CLIP,
    CLIPConfig,
    architecture,
    infer_config,
    load_openclip_state_dict,
    unwrap_state_dict,
)
from limoe.runtime.clip_tokenizer import openclip_tokenizer
from limoe.runtime.model_store import (
    FORMAT,
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

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip.constants.OPENAI_DATASET_MEAN
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class CheckpointError(ValueError):
    """What is wrong with the checkpoint or the request, in one sentence."""


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The state dict in a file open_clip could load: safetensors, or a torch pickle of tensors
    (read with weights_only=True: a checkpoint runs no code here)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and safetensors errors all mean "not a checkpoint"
        raise CheckpointError(f"{path}: not a checkpoint that torch or safetensors can read "
                           f"({type(e).__name__}: {str(e)[:160]})") from None
    try:
        return unwrap_state_dict(obj)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None


def build_clip(arch: str | None, sd: dict[str, Tensor]) -> CLIP:
    """The architecture by name, checked against the tensors, with the weights loaded; `arch` None:
    the architecture the tensors' shapes give (GELU, heads 64 wide: OpenCLIP's own weights)."""
    try:
        cfg = architecture(arch) if arch is not None else None
    except KeyError as e:
        raise CheckpointError(str(e.args[0])) from None
    try:
        found = infer_config(sd, cfg.quick_gelu if cfg else False)
    except ValueError as e:
        raise CheckpointError(str(e) if cfg else f"neither a checkpoint of this project nor an OpenCLIP one ({e})"
                              ) from None
    cfg = cfg or found
    # The shapes say everything but the heads (infer_config's assume OpenCLIP's usual head width of 64).
    differ = [f.name for f in dataclasses.fields(cfg)
              if f.name not in ("vision_heads", "text_heads") and getattr(found, f.name) != getattr(cfg, f.name)]
    if differ:
        diff = ", ".join(f"{n} {getattr(found, n)} (the architecture has {getattr(cfg, n)})" for n in differ)
        raise CheckpointError(f"the checkpoint is not a {arch}: its tensors say {diff}")
    model = CLIP(cfg).eval()
    try:
        load_openclip_state_dict(model, sd)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    return model


class ClipEncoder(nn.Module):
    """One tower as the store's graph signature: images (B, 3, R, R) or tokens (B, 77) ->
    embeddings (B, P) and the routing outputs (B, M, T, K): M = 0 for a dense CLIP. An image's T
    is its patches (the class token's choices are left out, so the patches form the grid the
    routing maps draw); a text's positions after its end-of-text token are padding (-1), which
    the causal tower's pooled output never sees."""

    def __init__(self, model: CLIP, modality: str):
        super().__init__()
        self.model, self.modality = model, modality

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.model.cfg
        encode = self.model.encode_image if self.modality == "image" else self.model.encode_text
        emb, routing = encode(x, normalize=True, return_routing=True)
        tokens = cfg.num_patches + 1 if self.modality == "image" else x.shape[1]
        index, dropped = _routing_outputs(routing, x.shape[0], tokens, cfg.top_k if routing else 1)
        if self.modality == "image":  # (B, M, 1 + patches, K) -> patches
            return emb, index[:, :, 1:], dropped[:, :, 1:]
        kept = (torch.arange(x.shape[1], device=x.device)[None] <= x.argmax(dim=-1)[:, None])[:, None, :, None]
        return emb, torch.where(kept, index, -1), dropped & kept


def moe_info(cfg: CLIPConfig) -> MoEInfo:
    """The entry's MoE description: one list of blocks for both towers (the manifest has one)."""
    if not cfg.vision_moe_ids and not cfg.text_moe_ids:
        return MoEInfo((), 1, 1, "dropless")
    if cfg.vision_moe_ids != cfg.text_moe_ids:
        raise CheckpointError(f"the towers' MoE blocks differ (image {list(cfg.vision_moe_ids)}, text "
                              f"{list(cfg.text_moe_ids)}): a store entry names one list for both")
    return MoEInfo(cfg.vision_moe_ids, cfg.num_experts, cfg.top_k, cfg.inference_routing)


def active_params(model: CLIP) -> int:
    """Parameters one token meets: all, less the E - K experts of each MoE layer it does not use."""
    from limoe.model.moe import MoELayer

    unused = sum(sum(p.numel() for p in m.experts.parameters()) * (m.num_experts - m.top_k) // m.num_experts
                 for m in model.modules() if isinstance(m, MoELayer))
    return sum(p.numel() for p in model.parameters()) - unused


def load_clip(arch: str | None, checkpoint: str | Path) -> tuple[CLIP, str | None, dict[str, Any]]:
    """(model, architecture name, source record) of an OpenCLIP checkpoint (`arch` required: the
    tensors cannot tell QuickGELU from GELU) or of this project's CLIP checkpoint (dense or sparse,
    e.g. `limoe upcycle`'s; the architecture is the one recorded)."""
    from limoe.model.checkpoint import (
        CLIP_FORMAT,
        checkpoint_format,
        load_clip_checkpoint,
    )

    if checkpoint_format(checkpoint) == CLIP_FORMAT:
        model, extra = load_clip_checkpoint(checkpoint)
        source = extra.get("upcycled_from") or extra.get("init", {}).get("upcycled_from") or {}  # trained on: init's
        if arch is not None and source.get("arch") not in (None, arch):
            raise CheckpointError(f"{checkpoint} was made from a {source['arch']}, not a {arch}")
        record: dict[str, Any] = {"format": CLIP_FORMAT, **({"upcycled_from": source} if source else {})}
        if "train" in extra:  # `limoe train --init` went on from there
            record["training"] = training_record(checkpoint, extra, model.cfg.moe_layers != "none")
        return model, arch or source.get("arch"), record
    if arch is None:
        raise CheckpointError("--arch is required for an OpenCLIP checkpoint: open_clip's architecture name (e.g. "
                              "ViT-B-32, or ViT-B-32-quickgelu for OpenAI's weights)")
    return build_clip(arch, read_checkpoint(checkpoint)), arch, {"format": "open_clip"}


def preprocessing(cfg: CLIPConfig) -> PreprocessConfig:
    """open_clip's inference transform for these architectures: Resize(R, bicubic), CenterCrop(R),
    RGB, OpenAI's mean and std. Transparent pixels: open_clip's convert("RGB") keeps whatever colour
    lies under them (often black); the entry composites them onto black, the same for most files."""
    return PreprocessConfig(cfg.image_size, OPENAI_MEAN, OPENAI_STD, "bicubic", (0, 0, 0), "resize_crop")


def calibration_images(prep: PreprocessConfig, folder: str | Path | None, count: int, seed: int = 0
                       ) -> tuple[np.ndarray, dict[str, Any]]:
    """Images to calibrate int8 activation scales: the user's (a folder, recursively) or synthetic
    smooth colour fields with noise, which suit a random model only."""
    if folder:
        from limoe.runtime.preprocess import ImageError, open_image, preprocess_image

        paths = sorted(p for p in Path(folder).rglob("*") if p.is_file())
        picked, rng = [], np.random.default_rng(seed)
        for p in rng.permutation(len(paths)):
            try:
                picked.append(preprocess_image(open_image(paths[int(p)].read_bytes()), prep))
            except (ImageError, OSError):
                continue
            if len(picked) == count:
                break
        if not picked:
            raise CheckpointError(f"{folder}: no decodable images to calibrate on")
        return np.stack(picked), {"source": str(folder), "count": len(picked), "seed": seed}
    rng = np.random.default_rng(seed)
    r = prep.image_size
    yy, xx = np.mgrid[0:r, 0:r] / r
    base = rng.standard_normal((count, 3, 3, 1, 1))
    x = base[:, :, 0] + base[:, :, 1] * xx + base[:, :, 2] * yy + 0.3 * rng.standard_normal((count, 3, r, r))
    return x.astype(np.float32), {"source": "synthetic", "count": count, "seed": seed}


CALIBRATION_TEXTS = [t.format(label) for label in (
    "cat", "dog", "car", "tree", "house", "person", "bird", "flower", "computer", "mountain", "beach", "pizza",
    "rocket", "astronaut", "cup of coffee", "bicycle", "city at night", "a red circle", "the number 7", "icon")
    for t in ("{}", "a photo of a {}.", "a drawing of a {}.", "a close-up photo of the {}.")]


def import_openclip(arch: str | None, checkpoint: str | Path, name: str, license: str,
                    store: str | Path = "model_store", version: str | None = None, int8: bool = True,
                    calibration: str | Path | None = None, calibration_count: int = 64,
                    templates: Sequence[str] = DEFAULT_TEMPLATES, opset: int = DEFAULT_OPSET,
                    force: bool = False) -> Manifest:
    """Write `<store>/<name>/<version>/` from an OpenCLIP checkpoint, or from this project's CLIP
    checkpoint (a sparse one from `limoe upcycle` included; see `load_clip`), and return its verified
    manifest."""
    if not license or not license.strip():
        raise CheckpointError("--license is required: say who may use these weights (e.g. 'MIT, OpenAI CLIP')")
    check_identifier(name)
    version = check_identifier(version or ModelStore(store).next_version(name), "version")
    final = Path(store) / name / version
    if final.exists() and not force:
        raise FileExistsError(f"{final} already exists (pass --force to replace it)")
    started = time.perf_counter()
    model, arch, source = load_clip(arch, checkpoint)
    cfg, prep, moe = model.cfg, preprocessing(model.cfg), moe_info(model.cfg)
    tokenizer = openclip_tokenizer(cfg.context_length)

    tmp = Path(store) / name / f".tmp-{version}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        roles = {"image_onnx": "image_encoder.onnx", "text_onnx": "text_encoder.onnx", "tokenizer": "tokenizer.json"}
        g = torch.Generator().manual_seed(0)
        images = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=g)
        tokens = torch.from_numpy(tokenizer.encode(["a photo of a cat", "rocket"]))
        export_onnx(ClipEncoder(model, "image"), images, "images", tmp / roles["image_onnx"], opset)
        export_onnx(ClipEncoder(model, "text"), tokens, "tokens", tmp / roles["text_onnx"], opset)
        tokenizer.save(tmp / roles["tokenizer"])
        quantization: dict[str, Any] = {}
        if int8:
            cal_images, record = calibration_images(prep, calibration, calibration_count)
            cal_tokens = tokenizer.encode(CALIBRATION_TEXTS)
            quantization = {"scheme": "static", "description": DESCRIPTIONS["static"],
                            "calibration": {**record, "texts": len(CALIBRATION_TEXTS)}}
            for modality, input_name, cal in (("image", "images", cal_images), ("text", "tokens", cal_tokens)):
                src, dst = tmp / roles[f"{modality}_onnx"], tmp / f"{modality}_encoder.int8.onnx"
                quantize_graph(src, dst, "static", [{input_name: b} for b in batches(cal, 16)])
                roles[f"{modality}_onnx_int8"] = dst.name
                quantization[modality] = agreement(OnnxGraph(src), OnnxGraph(dst), cal[:32])
        for suffix, data in (("", "encoders.weights"), ("_int8", "encoders.int8.weights")):
            if f"image_onnx{suffix}" in roles:
                share_weights([tmp / roles[f"{m}_onnx{suffix}"] for m in ("image", "text")], tmp / data)
                roles[f"onnx_weights{suffix}"] = data
        with torch.no_grad():
            scale = float(model.logit_scale.exp().clamp(max=100.0))
        params = sum(p.numel() for p in model.parameters())
        manifest: dict[str, Any] = {
            "format": FORMAT, "name": name, "version": version,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "config": {"arch": "clip", "open_clip_architecture": arch, **cfg.to_dict()},
            "preprocessing": prep.to_dict(),
            "context_length": cfg.context_length,
            "embedding_size": cfg.embed_dim,
            "logit_scale": scale,
            "templates": list(templates),
            "text_cleaning": tokenizer.cleaning,
            "moe": moe.to_dict(),
            "graphs": {
                "image": {"input": {"name": "images", "dtype": "float32",
                                    "shape": ["batch", 3, cfg.image_size, cfg.image_size]},
                          "tokens": cfg.num_patches},
                "text": {"input": {"name": "tokens", "dtype": "int64", "shape": ["batch", cfg.context_length]},
                         "tokens": cfg.context_length},
                "outputs": {"embeddings": {"dtype": "float32", "shape": ["batch", cfg.embed_dim]},
                            "expert_index": {"dtype": "int64", "shape": ["batch", len(moe.layers), "tokens",
                                                                         moe.top_k]},
                            "dropped": {"dtype": "bool", "shape": ["batch", len(moe.layers), "tokens", moe.top_k]}},
            },
            "onnx": {"opset": opset, "exporter": "torch.onnx (dynamo)", "outputs": list(OUTPUTS)},
            "libraries": _libraries(),
            "license": license.strip(),
            "source_checkpoint": {"file": Path(checkpoint).name, **source, **file_record(Path(checkpoint))},
            "quantization": {"int8": quantization} if quantization else {},
            "stats": {"total_params": params, "active_params": active_params(model)},
            # A ViT-B image costs tens of times a LIMoE-small's: one forward pass at a time on every core
            # serves a lone request at torch's speed, where two one-core passes halve it (bench/clip_serving.py).
            "serving": {"encoder_passes": 1},
            "roles": roles,
        }
        finish_entry(tmp, final, manifest, clip_model_card(manifest), started)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return verify(final)


def clip_model_card(manifest: dict[str, Any]) -> str:
    cfg, q = manifest["config"], manifest.get("quantization", {}).get("int8", {})
    src = manifest["source_checkpoint"]
    moe, up = manifest["moe"], src.get("upcycled_from")
    arch = cfg.get("open_clip_architecture") or "inferred from the tensors' shapes"
    what = ("two dense towers, no experts" if not moe["layers"] else
            f"sparse: in blocks {', '.join(map(str, moe['layers']))} of both towers the MLP is a mixture of "
            f"{moe['num_experts']} experts, top-{moe['top_k']} renormalised gates, {moe['inference_routing']} routing")
    origin = (f"upcycled (`limoe upcycle`) from `{up['checkpoint']}`, its experts copies of that model's MLPs"
              if up else "imported from an OpenCLIP checkpoint")
    lines = [f"# {manifest['name']} version {manifest['version']}", "",
             f"A CLIP model {origin} (`{src['file']}`, sha256 {src['sha256'][:16]}...), "
             f"architecture `{arch}`: {what}.", "",
             "## Licence", "", f"The weights' licence, as the importer was told: **{manifest['license']}**. "
             "Check it before you serve these weights to others.", "",
             "## Model", "",
             f"- image tower: ViT, {cfg['vision_width']} wide, {cfg['vision_layers']} layers, "
             f"{cfg['vision_heads']} heads, {cfg['image_size']} px in {cfg['patch_size']} px patches",
             f"- text tower: {cfg['text_width']} wide, {cfg['text_layers']} layers, {cfg['text_heads']} heads, "
             f"{cfg['context_length']} tokens, vocabulary {cfg['vocab_size']}; "
             f"{'QuickGELU' if cfg['quick_gelu'] else 'GELU'}",
             f"- embedding {cfg['embed_dim']}; {manifest['stats']['total_params'] / 1e6:.1f}M parameters"
             + (f", {manifest['stats']['active_params'] / 1e6:.1f}M active per token" if moe["layers"] else "") + "; "
             f"logit scale {manifest['logit_scale']:.2f}",
             "- preprocessing as open_clip's: Resize then CenterCrop (bicubic), OpenAI mean/std; text as open_clip's "
             "tokenizer (ftfy, HTML unescaping, lower case, CLIP BPE, 77 tokens)", ""]
    if q:
        lines += ["## int8", "", f"Static int8 graphs, calibrated on {q['calibration']['source']} images "
                  f"({q['calibration']['count']}) and {q['calibration']['texts']} texts. Against fp32: image "
                  f"cosine mean {q['image']['embedding_cosine_mean']:.5f} "
                  f"(min {q['image']['embedding_cosine_min']:.5f}), "
                  f"text {q['text']['embedding_cosine_mean']:.5f} (min {q['text']['embedding_cosine_min']:.5f}).", ""]
    flag = f"--arch {cfg['open_clip_architecture']} " if cfg.get("open_clip_architecture") else ""
    trained = src.get("training")
    steps = []
    if up:  # limoe upcycle, then (when it was trained on) limoe train --init, then the import
        sparse = trained.get("init", {}).get("checkpoint", "sparse.safetensors") if trained else src["file"]
        steps.append(f"limoe upcycle {shlex.quote(up['checkpoint'])} {flag}--experts {up['experts']} "
                     f"--top-k {up['top_k']} --moe-every {str(up['moe_layers']).removeprefix('every_')} "
                     f"--out {shlex.quote(sparse)}")
    if trained:
        t = trained.get("train", {})
        steps.append(f"limoe train --init {shlex.quote(trained.get('init', {}).get('checkpoint', 'INIT'))} "
                     f"--data {trained.get('data', 'MIX')} --out run --steps {t.get('steps')} "
                     f"--batch-size {t.get('batch_size')} --lr {t.get('lr')} --warmup {t.get('warmup_steps')} "
                     f"--seed {t.get('seed')}")
    checkpoint = "run/model.safetensors" if trained else shlex.quote(src["file"])
    steps.append(f"limoe import open-clip {'' if up else flag}--checkpoint {checkpoint} "
                 f"--name {manifest['name']} --license {shlex.quote(manifest['license'])}")
    lines += ["## Reproduce", "", "```bash", *steps, "```", ""]
    if trained:
        lines += [f"Trained on after upcycling: {trained.get('step')} steps of batch {t.get('batch_size')} on "
                  f"`{trained.get('data')}` with the contrastive loss and LIMoE's entropy losses.", ""]
        lines += routing_over_training(trained)
    elif up:
        lines += ["The experts start as copies, so before any training this entry computes what the dense model "
                  "does (up to float rounding).", ""]
    return "\n".join(lines)


__all__ = ["import_openclip", "read_checkpoint", "build_clip", "CheckpointError", "preprocessing", "calibration_images",
           "ClipEncoder", "clip_model_card"]
