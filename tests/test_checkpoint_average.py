"""Latest weight averaging (`limoe average`): the mean of one run's last checkpoints."""

import pytest
import torch
from conftest import CAPTIONS
from safetensors import safe_open

from limoe.cli import main
from limoe.model.checkpoint import (
    average_checkpoints,
    average_state_dicts,
    load_checkpoint,
    read_metadata,
    read_tokenizer,
    save_checkpoint,
)
from limoe.model.config import get_config
from limoe.model.transformer import LIMoE
from limoe.runtime.tokenizer import Tokenizer


def test_the_mean_of_state_dicts_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "h": torch.tensor([1.0], dtype=torch.float16), "n": torch.tensor([7])}
    b = {"w": torch.tensor([3.0, 6.0]), "h": torch.tensor([2.0], dtype=torch.float16), "n": torch.tensor([7])}
    c = {"w": torch.tensor([5.0, 1.0]), "h": torch.tensor([3.0], dtype=torch.float16), "n": torch.tensor([7])}
    out = average_state_dicts([a, b, c])
    assert out["w"].tolist() == [3.0, 3.0] and out["w"].dtype == torch.float32
    assert out["h"].tolist() == [2.0] and out["h"].dtype == torch.float16  # dtype kept
    assert out["n"].tolist() == [7]  # an integer buffer equal in all is kept


@pytest.mark.parametrize("other, message", [
    ({"w": torch.zeros(2)}, "other tensors"),
    ({"w": torch.zeros(3), "n": torch.tensor([7])}, "shapes differ"),
    ({"w": torch.zeros(2), "n": torch.tensor([8])}, "cannot be averaged"),
])
def test_state_dicts_that_do_not_average(other, message):
    with pytest.raises(ValueError, match=message):
        average_state_dicts([{"w": torch.ones(2), "n": torch.tensor([7])}, other])
    with pytest.raises(ValueError, match="nothing"):
        average_state_dicts([])


def _run(tmp_path, cfg):
    """Two 'kept steps' of one run: the same model config and tokenizer, different weights."""
    tok = Tokenizer.train(CAPTIONS, vocab_size=cfg.vocab_size, context_length=cfg.context_length)
    paths = []
    for step in (10, 20):
        torch.manual_seed(step)
        extra = {"step": step, "data": "scenes", "eval": {"zero_shot": {}}}
        paths.append(save_checkpoint(LIMoE(cfg), tmp_path / f"model-{step}.safetensors", extra=extra, tokenizer=tok))
    return paths


def test_limoe_average_writes_the_mean_and_records_it(tmp_path, capsys):
    cfg = get_config("tiny")
    paths = _run(tmp_path, cfg)
    out = tmp_path / "averaged.safetensors"
    assert main(["average", *map(str, paths), "--out", str(out)]) == 0
    assert "steps [10, 20]" in capsys.readouterr().out
    model, extra = load_checkpoint(out)  # a checkpoint like any other
    assert extra["averaged"] == {"checkpoints": ["model-10.safetensors", "model-20.safetensors"], "steps": [10, 20]}
    assert extra["step"] == 20 and extra["data"] == "scenes" and "eval" not in extra  # the last one's eval is not its
    assert read_tokenizer(out).to_str() == read_tokenizer(paths[0]).to_str()
    assert read_metadata(out)[0] == cfg
    differ = 0
    with safe_open(str(paths[0]), "pt") as f0, safe_open(str(paths[1]), "pt") as f1:
        for k, v in model.state_dict().items():
            a, b = f0.get_tensor(k), f1.get_tensor(k)
            expected = (a.double() + b.double()) / 2 if a.is_floating_point() else a
            torch.testing.assert_close(v, expected.to(v.dtype), rtol=0, atol=1e-7)
            differ += not torch.equal(a, b)
    assert differ > 10  # the two inputs really differ, so the mean is not either one


def test_checkpoints_of_different_models_are_refused(tmp_path, capsys):
    a = _run(tmp_path, get_config("tiny"))[0]
    other = tmp_path / "other"
    other.mkdir()
    b = _run(other, get_config("tiny", depth=3))[0]
    with pytest.raises(ValueError, match="another config"):
        average_checkpoints([a, b], tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="at least 2"):
        average_checkpoints([a], tmp_path / "x.safetensors")
    assert main(["average", str(a), str(b), "--out", str(tmp_path / "x.safetensors")]) == 1
    assert "another config" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def test_the_model_card_reproduces_the_averaging():
    from limoe.export.model_card import render_model_card

    cfg = get_config("small")
    moe = {"layers": list(cfg.moe_layer_ids), "num_experts": 8, "top_k": 1, "inference_routing": "dropless",
           "batch_priority": True}
    train_cfg = {"steps": 3300, "batch_size": 128, "lr": 0.001, "warmup_steps": 200, "seed": 0, "keep_every": 660}
    averaged = {"checkpoints": ["model-2640.safetensors", "model.safetensors"], "steps": [2640, 3300]}
    card = render_model_card({"name": "m", "version": "2", "config": cfg.to_dict(), "moe": moe,
                              "roles": {"image_onnx_int8": "i.onnx"}},
                             {"step": 3300, "train": train_cfg, "data": "scenes", "averaged": averaged})
    assert "--seed 0 --keep-every 660" in card and "checkpoints at steps [2640, 3300]" in card
    assert ("limoe average run/steps/model-2640.safetensors run/model.safetensors --out run/averaged.safetensors"
            in card)
    assert "limoe export run/averaged.safetensors --name m" in card and "limoe eval run/averaged.safetensors" in card
    plain = render_model_card({"name": "m", "version": "2", "config": cfg.to_dict(), "moe": moe, "roles": {}},
                              {"step": 3300, "train": train_cfg, "data": "scenes"})
    assert "limoe average" not in plain and "--keep-every" not in plain
