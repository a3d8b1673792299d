"""Checkpoints: one safetensors file holding the weights and, in its metadata, the config
(and the tokenizer, when given). Loading needs nothing else: the config rebuilds the module,
the tensors fill it, and export finds the tokenizer in the same file.

A CLIP of `limoe.model.clip` (a sparse one from `limoe upcycle` of OpenCLIP weights) is saved the
same way under its own format, since its config is a `CLIPConfig`: `save_clip_checkpoint`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from limoe.model.clip import CLIP, CLIPConfig
from limoe.model.config import LIMoEConfig
from limoe.model.transformer import LIMoE, build_model
from limoe.runtime.tokenizer import Tokenizer

FORMAT = "limoe-checkpoint/1"
CLIP_FORMAT = "limoe-clip-checkpoint/1"


def _write(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write a safetensors file under a temporary name, then rename it: never a half-written
    checkpoint under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def _read_state(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def save_checkpoint(model: LIMoE, path: str | Path, extra: dict[str, Any] | None = None,
                    tokenizer: Tokenizer | None = None) -> Path:
    """Write `model`'s weights and config (plus optional JSON-able `extra`, e.g. eval results,
    and the tokenizer the model was trained with).

    Pass the plain module, not a torch.compile or DDP wrapper (their state dicts are prefixed)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": FORMAT, "config": model.cfg.to_json(), "extra": json.dumps(extra or {})}
    if tokenizer is not None:
        if tokenizer.context_length != model.cfg.context_length or tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"tokenizer (context {tokenizer.context_length}, vocab {tokenizer.vocab_size}) does "
                             f"not fit the model (context {model.cfg.context_length}, vocab {model.cfg.vocab_size})")
        metadata["tokenizer"] = tokenizer.to_str()
    return _write(state, path, metadata)


def _metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a LIMoE checkpoint (format {meta.get('format')!r}, want {FORMAT!r})")
    return meta


def read_metadata(path: str | Path) -> tuple[LIMoEConfig, dict[str, Any]]:
    """The config and `extra` stored in a checkpoint, without reading the weights."""
    meta = _metadata(path)
    return LIMoEConfig.from_dict(json.loads(meta["config"])), json.loads(meta.get("extra", "{}"))


def read_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer saved with the checkpoint, if any."""
    text = _metadata(path).get("tokenizer")
    return None if text is None else Tokenizer.from_str(text)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[LIMoE, dict[str, Any]]:
    """Rebuild the model from its stored config and load the weights; returns (model, extra)."""
    cfg, extra = read_metadata(path)
    model = build_model(cfg)
    model.load_state_dict(_read_state(path, device), strict=True)
    return model.to(device).eval(), extra


def checkpoint_format(path: str | Path) -> str | None:
    """The `format` in a safetensors file's metadata (FORMAT, CLIP_FORMAT, ...); None for any other file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except (SafetensorError, OSError):  # not safetensors, or no such file
        return None


def save_clip_checkpoint(model: CLIP, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write a CLIP's weights (OpenCLIP's keys, plus routers and experts when sparse) and its config."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"format": CLIP_FORMAT, "config": json.dumps(model.cfg.to_dict(), sort_keys=True),
                "extra": json.dumps(extra or {})}
    return _write(state, path, metadata)


def load_clip_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[CLIP, dict[str, Any]]:
    """Rebuild a CLIP from a `save_clip_checkpoint` file; returns (model, extra)."""
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        meta = f.metadata() or {}
        if meta.get("format") != CLIP_FORMAT:
            raise ValueError(f"{path}: not a CLIP checkpoint of this project (format {meta.get('format')!r}, "
                             f"want {CLIP_FORMAT!r})")
        state = {k: f.get_tensor(k) for k in f.keys()}
    model = CLIP(CLIPConfig.from_dict(json.loads(meta["config"])))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), json.loads(meta.get("extra", "{}"))


def load_any_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[LIMoE | CLIP, dict[str, Any]]:
    """A LIMoE (FORMAT) or CLIP (CLIP_FORMAT) checkpoint of this project, whichever `path` holds."""
    if checkpoint_format(path) == CLIP_FORMAT:
        return load_clip_checkpoint(path, device)
    return load_checkpoint(path, device)


# -- averaging: the latest weights of one run (LAWA) --------------------------------------------
def average_state_dicts(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The element-wise mean of K state dicts with the same keys and shapes: each floating tensor
    is summed in float64 and divided by K, then cast back to its dtype; any other tensor (an
    integer buffer) must be equal in all K and is kept."""
    if not states:
        raise ValueError("nothing to average")
    keys = list(states[0])
    for i, state in enumerate(states[1:], 1):
        if set(state) != set(keys):
            raise ValueError(f"checkpoint {i} holds other tensors than checkpoint 0: "
                             f"{sorted(set(state) ^ set(keys))[:5]}")
    out = {}
    for k in keys:
        first = states[0][k]
        if any(s[k].shape != first.shape for s in states):
            raise ValueError(f"{k}: shapes differ ({[tuple(s[k].shape) for s in states]})")
        if first.is_floating_point():
            out[k] = (sum(s[k].double() for s in states) / len(states)).to(first.dtype)
        elif all(torch.equal(s[k], first) for s in states):
            out[k] = first.clone()
        else:
            raise ValueError(f"{k}: a non-float tensor that differs between checkpoints cannot be averaged")
    return out


def average_checkpoints(paths: Sequence[str | Path], out: str | Path) -> Path:
    """Write the mean of the weights of `paths`, LIMoE checkpoints of one model (the same config
    and tokenizer; typically one run's last kept steps, `limoe train --keep-every`): latest weight
    averaging (LAWA; Kaddour, 2022), a cheap stand-in for the weight EMA of longer recipes. The
    result's `extra` is the last checkpoint's (its own evaluation dropped), plus `averaged`: the
    files and their steps."""
    if len(paths) < 2:
        raise ValueError("averaging needs at least 2 checkpoints")
    metas = [_metadata(p) for p in paths]
    for p, meta in zip(paths[1:], metas[1:]):
        if json.loads(meta["config"]) != json.loads(metas[0]["config"]):
            raise ValueError(f"{p}: another config than {paths[0]}; only checkpoints of one model average")
        if meta.get("tokenizer") != metas[0].get("tokenizer"):
            raise ValueError(f"{p}: another tokenizer than {paths[0]}")
    states = [_read_state(p) for p in paths]
    extras = [json.loads(m.get("extra", "{}")) for m in metas]
    extra = {k: v for k, v in extras[-1].items() if k != "eval"}
    extra["averaged"] = {"checkpoints": [Path(p).name for p in paths], "steps": [e.get("step") for e in extras]}
    return _write(average_state_dicts(states), out, {**metas[-1], "extra": json.dumps(extra)})
