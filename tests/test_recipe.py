"""The training recipe's new parts: SigLIP's sigmoid loss and FLIP's masked patches (issue 25)."""

import json
import math

import numpy as np
import pytest
import torch
from test_train import ColorSquares, tokenizer

from limoe.model.config import get_config
from limoe.model.losses import limoe_loss, sigmoid_loss
from limoe.model.transformer import LIMoE, keep_patches, kept_patches
from limoe.train.trainer import TrainConfig, train


# -- sigmoid loss --------------------------------------------------------------------------------
def test_sigmoid_loss_by_hand_on_2x2():
    """t = exp(log 10) = 10, b = -10 (SigLIP's init). Images e0, e1; texts (0.6, 0.8), e0:
    cosines [[0.6, 1], [0.8, 0]] -> logits 10 * cos - 10 = [[-4, 0], [-2, -10]];
    labels [[+1, -1], [-1, +1]] -> loss = -(log s(-4) + log s(0) + log s(2) + log s(-10)) / 2
    = (4.01815 + 0.69315 + 0.12693 + 10.00005) / 2 = 7.41914."""
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    t, b = torch.tensor(math.log(10.0)), torch.tensor(-10.0)
    assert float(sigmoid_loss(images, texts, t, b)) == pytest.approx(7.419135, abs=1e-5)
    # Matching texts: logits [[0, -10], [-10, 0]] -> (2 ln 2 + 2 ln(1 + e^-10)) / 2 = 0.693193.
    assert float(sigmoid_loss(images, images, t, b)) == pytest.approx(0.6931926, abs=1e-6)
    # positives[1, 0] makes pair (image 1, text 0) a match too: its logit -2 now counts as
    # log s(-2) = -2.12693 instead of log s(2): (4.01815 + 0.69315 + 2.12693 + 10.00005) / 2 = 8.41914.
    positives = torch.tensor([[False, False], [True, False]])
    assert float(sigmoid_loss(images, texts, t, b, positives)) == pytest.approx(8.419135, abs=1e-5)


def test_sigmoid_model_starts_at_siglip_init_with_finite_gradients():
    cfg = get_config("tiny", contrastive_loss="sigmoid")
    torch.manual_seed(0)
    model = LIMoE(cfg).train()
    assert model.logit_scale.item() == pytest.approx(math.log(10.0))
    assert model.logit_bias.item() == pytest.approx(-10.0)
    images = torch.randn(4, 3, cfg.image_size, cfg.image_size)
    tokens = torch.randint(1, cfg.vocab_size, (4, cfg.context_length))
    out = model(images, tokens)
    terms = limoe_loss(out.image_embeds, out.text_embeds, out.logit_scale, out.image_routing, out.text_routing,
                       cfg, logit_bias=out.logit_bias)
    terms["total"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert float(model.logit_bias.grad) != 0.0 and float(model.logit_scale.grad) != 0.0
    with pytest.raises(ValueError, match="logit_bias"):
        limoe_loss(out.image_embeds, out.text_embeds, out.logit_scale, [], [], cfg)


def test_softmax_models_keep_their_state_dict():
    assert "logit_bias" not in LIMoE(get_config("tiny")).state_dict()
    assert "logit_bias" in LIMoE(get_config("tiny", contrastive_loss="sigmoid")).state_dict()
    with pytest.raises(ValueError, match="contrastive_loss"):
        get_config("tiny", contrastive_loss="hinge")


# -- masked patches --------------------------------------------------------------------------------
def test_keep_patches_keeps_a_random_ordered_subset_per_example():
    B, T, D = 3, 8, 2
    x = torch.arange(B * T, dtype=torch.float32).reshape(B, T, 1).expand(B, T, D)  # token id in every dim
    g = torch.Generator().manual_seed(0)
    kept = keep_patches(x, 0.5, g)
    assert kept.shape == (B, kept_patches(T, 0.5), D) == (3, 4, 2)
    ids = kept[..., 0].long()
    for b in range(B):
        row = ids[b].tolist()
        assert row == sorted(row) and len(set(row)) == 4  # in order, no repeats
        assert all(b * T <= i < (b + 1) * T for i in row)  # its own patches only
    assert len({tuple(r % T for r in ids[b].tolist()) for b in range(B)}) > 1  # examples differ
    assert kept_patches(64, 0.75) == 16 and kept_patches(3, 0.9) == 1


def test_mask_zero_and_eval_mode_equal_the_unmasked_model_exactly():
    torch.manual_seed(0)
    masked_cfg = get_config("tiny", image_mask_ratio=0.5)
    model = LIMoE(masked_cfg)
    plain = LIMoE(get_config("tiny"))
    plain.load_state_dict(model.state_dict())
    images = torch.randn(4, 3, 16, 16)
    tokens = torch.randint(1, 512, (4, 8))
    model.train(), plain.train()
    torch.manual_seed(1)
    a = model(images, tokens, mask_ratio=0.0)
    torch.manual_seed(1)
    b = plain(images, tokens)
    assert torch.equal(a.image_embeds, b.image_embeds) and torch.equal(a.text_embeds, b.text_embeds)
    model.eval(), plain.eval()
    assert torch.equal(model.encode_image(images), plain.encode_image(images))
    assert torch.equal(model(images, tokens).image_embeds, plain(images, tokens).image_embeds)


def test_masked_routing_counts_kept_tokens_only():
    """tiny: 16 patches per image, mask 0.5 -> 8 kept; groups of 2 examples -> S = 16 tokens per
    group (32 unmasked); capacity ceil(K * S * factor / E) = ceil(16 / 4) = 4 (8 unmasked)."""
    torch.manual_seed(0)
    cfg = get_config("tiny", image_mask_ratio=0.5)
    model = LIMoE(cfg).train()
    images = torch.randn(4, 3, 16, 16)
    out = model(images, torch.randint(1, 512, (4, 8)))
    (info,) = out.image_routing
    assert info.plan.mask.shape == (2, 16) and int(info.plan.mask.sum()) == 4 * 8
    assert info.plan.capacity == 4
    (full,) = model(images, torch.randint(1, 512, (4, 8)), mask_ratio=0.0).image_routing
    assert full.plan.mask.shape == (2, 32) and full.plan.capacity == 8


def test_masked_patches_get_no_gradient():
    """One image of 16 patches keeping 4: exactly 4 rows of the position table get a gradient."""
    torch.manual_seed(0)
    model = LIMoE(get_config("tiny", image_mask_ratio=0.75)).train()
    out = model(torch.randn(1, 3, 16, 16), torch.randint(1, 512, (1, 8)))
    out.image_embeds.sum().backward()
    rows = (model.image_pos.grad[0].abs().sum(-1) > 0).sum()
    assert int(rows) == 4


def test_training_with_mask_sigmoid_and_unmasked_tail(tmp_path):
    cfg = get_config("tiny", contrastive_loss="sigmoid", image_mask_ratio=0.5, train_capacity_factor=2.0)
    tok, data = tokenizer(cfg), ColorSquares()
    tc = TrainConfig(steps=12, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=12, unmasked_steps=3)
    train(cfg, tc, data, tok, tmp_path, progress=False)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert all("logit_bias" in r and np.isfinite(r["total"]) for r in log)
    assert log[-1]["contrastive"] < log[0]["contrastive"]


def test_the_model_card_names_the_recipe_and_reproduces_it():
    from limoe.export.model_card import render_model_card

    cfg = get_config("small", image_mask_ratio=0.5, contrastive_loss="sigmoid", train_capacity_factor=2.0)
    train_cfg = {"steps": 100, "batch_size": 8, "lr": 0.001, "warmup_steps": 1, "seed": 0, "unmasked_steps": 10,
                 "teacher": "all-MiniLM-L6-v2", "teacher_weight": 0.5}
    teacher = {"attribution": "all-MiniLM-L6-v2 (Apache-2.0)", "license": "Apache-2.0", "checksum": "f" * 64,
               "weight": 0.5, "url": "https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2"}
    moe = {"layers": list(cfg.moe_layer_ids), "num_experts": 8, "top_k": 1, "inference_routing": "dropless",
           "batch_priority": True}
    card = render_model_card({"name": "m", "version": "2", "config": cfg.to_dict(), "moe": moe, "roles": {}},
                             {"step": 100, "train": train_cfg, "data": "scenes", "teacher": teacher})
    assert ("limoe train --preset small --set contrastive_loss=sigmoid --set image_mask_ratio=0.5 "
            "--set train_capacity_factor=2.0 --data scenes") in card
    assert "--unmasked-steps 10 --teacher all-MiniLM-L6-v2 --teacher-weight 0.5" in card
    assert "masked patches (FLIP): 50%" in card and "contrastive loss `sigmoid`" in card
    assert "text teacher (training only" in card and "weights licence Apache-2.0" in card


def test_the_export_keeps_the_teacher_and_the_averaging_for_the_card(tmp_path):
    """What `limoe export` records of the run: the teacher (its licence goes in the card) and the
    averaging, not the checkpoint's own evaluation."""
    from limoe.export.exporter import training_record

    teacher = {"name": "all-MiniLM-L6-v2", "license": "Apache-2.0", "checksum": "f" * 64, "weight": 30.0}
    extra = {"step": 20, "train": {"steps": 20}, "data": "scenes", "teacher": teacher, "eval": {"zero_shot": {}},
             "averaged": {"checkpoints": ["model-10.safetensors", "model.safetensors"], "steps": [10, 20]}}
    record = training_record(tmp_path / "model.safetensors", extra, sparse=True)  # no log.jsonl beside it
    assert record == {k: extra[k] for k in ("step", "train", "data", "teacher", "averaged")}
