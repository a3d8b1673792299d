"""A checkpoint's model as an encoder pair (numpy in and out, limoe.runtime.encoders.Encoders),
for evaluation and the export checks. Lives here, beside the exporter's ImageEncoder and
TextEncoder wrappers, because it needs the model code; the runtime's `TorchEncoders` itself
needs torch only (a store entry's TorchScript file carries its own code)."""

from __future__ import annotations

from pathlib import Path

from limoe.export.exporter import ImageEncoder, TextEncoder, logit_scale
from limoe.model.checkpoint import load_checkpoint, read_tokenizer
from limoe.model.transformer import LIMoE
from limoe.runtime.encoders import TorchEncoders
from limoe.runtime.model_store import MoEInfo
from limoe.runtime.preprocess import PreprocessConfig
from limoe.runtime.tokenizer import Tokenizer


def model_encoders(model: LIMoE, tokenizer: Tokenizer) -> TorchEncoders:
    """`model`'s two encoders (in eval mode) with its tokenizer and preprocessing."""
    return TorchEncoders(ImageEncoder(model).eval(), TextEncoder(model).eval(), tokenizer,
                         PreprocessConfig.from_model_config(model.cfg), MoEInfo.from_config(model.cfg), logit_scale(model))


def checkpoint_encoders(path: str | Path, **config_changes) -> TorchEncoders:
    """The checkpoint's model; `config_changes` override inference-time fields, e.g.
    inference_routing="capacity", eval_capacity_factor=1.0 (the weights are the checkpoint's)."""
    model, _ = load_checkpoint(path)
    if config_changes:
        model = model.with_config(**config_changes)
    tokenizer = read_tokenizer(path)
    if tokenizer is None:
        raise ValueError(f"{path} holds no tokenizer")
    return model_encoders(model, tokenizer)
