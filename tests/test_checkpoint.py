import pytest
import torch
from conftest import random_batch
from safetensors.torch import save_file

from limoe.model.checkpoint import load_checkpoint, read_metadata, save_checkpoint


def test_round_trip_needs_nothing_but_the_file(tiny_model, tiny_cfg, tmp_path):
    path = save_checkpoint(tiny_model, tmp_path / "ckpt" / "model.safetensors", extra={"step": 7})
    model, extra = load_checkpoint(path)
    assert extra == {"step": 7} and model.cfg == tiny_cfg
    images, tokens = random_batch(tiny_cfg, 2)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), tiny_model.encode_image(images))
        torch.testing.assert_close(model.encode_text(tokens), tiny_model.encode_text(tokens))
    assert read_metadata(path)[0] == tiny_cfg
    assert not list(path.parent.glob("*.tmp"))


def test_foreign_safetensors_file_is_refused(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a LIMoE checkpoint"):
        load_checkpoint(path)
