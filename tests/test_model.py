"""The one-tower model: shapes, modalities, routing outputs, batch independence, learning."""

import pytest
import torch
from conftest import random_batch

from limoe.model.config import PRESETS, LIMoEConfig, dense_counterpart, get_config, moe_layer_ids
from limoe.model.losses import limoe_loss
from limoe.model.moe import MoELayer
from limoe.model.transformer import MLP, LIMoE


def test_moe_placement():
    assert moe_layer_ids(6, "every_2") == (1, 3, 5)
    assert moe_layer_ids(12, "every_4") == (3, 7, 11)
    assert moe_layer_ids(6, "last_2") == (4, 5)
    assert moe_layer_ids(6, "none") == ()
    assert moe_layer_ids(6, "0, 2") == (0, 2)
    with pytest.raises(ValueError):
        moe_layer_ids(6, "7")
    with pytest.raises(ValueError):
        moe_layer_ids(6, "sometimes")


def test_blocks_follow_the_placement():
    model = LIMoE(get_config("tiny", depth=4, moe_layers="last_2"))
    kinds = [type(b.mlp) for b in model.blocks]
    assert kinds == [MLP, MLP, MoELayer, MoELayer]
    assert [b.mlp.layer for b in model.blocks[2:]] == [2, 3]
    dense = LIMoE(dense_counterpart(get_config("tiny")))
    assert all(isinstance(b.mlp, MLP) for b in dense.blocks)


def test_invalid_configs_are_refused_with_reasons():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        LIMoEConfig(image_size=30, patch_size=8)
    with pytest.raises(ValueError, match="top_k"):
        LIMoEConfig(num_experts=2, top_k=3)
    with pytest.raises(KeyError, match="unknown preset"):
        get_config("XL/1")


def test_config_round_trips_through_json():
    for cfg in PRESETS.values():
        import json
        assert LIMoEConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_encoders_return_normalised_embeddings(tiny_model, tiny_cfg):
    images, tokens = random_batch(tiny_cfg, 3)
    zi, zt = tiny_model.encode_image(images), tiny_model.encode_text(tokens)
    assert zi.shape == zt.shape == (3, tiny_cfg.embed_dim)
    torch.testing.assert_close(zi.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(zt.norm(dim=-1), torch.ones(3))
    assert tiny_model.encode_image(images, normalize=False).norm(dim=-1).sub(1).abs().max() > 1e-3


def test_forward_reports_routing_per_moe_layer(tiny_cfg):
    cfg = tiny_cfg.replace(depth=4, moe_layers="every_2")  # MoE in blocks 1 and 3
    model = LIMoE(cfg).eval()
    images, tokens = random_batch(cfg, 3)
    out = model(images, tokens)
    assert [r.layer for r in out.image_routing] == [1, 3]
    T, L, E = cfg.num_patches, cfg.context_length, cfg.num_experts
    r = out.image_routing[0]
    assert r.probs.shape == (3, T, E) and r.expert_index.shape == (3, T, 1) and r.dropped.shape == (3, T, 1)
    assert r.mask.all()
    t = out.text_routing[1]
    assert t.probs.shape == (3, L, E)
    torch.testing.assert_close(t.mask, tokens != cfg.pad_id)
    assert not t.dropped[~t.mask].any()  # padding is never routed, so never dropped


@pytest.mark.parametrize("top_k", [1, 2])
def test_inference_is_independent_of_batch_neighbours(top_k):
    cfg = get_config("tiny", top_k=top_k, eval_capacity_factor=1.0)
    torch.manual_seed(0)
    model = LIMoE(cfg).eval()
    images, tokens = random_batch(cfg, 3)
    with torch.no_grad():
        together_i, together_t = model.encode_image(images), model.encode_text(tokens)
        alone_i = torch.cat([model.encode_image(images[i:i + 1]) for i in range(3)])
        alone_t = torch.cat([model.encode_text(tokens[i:i + 1]) for i in range(3)])
        # and in another company: reversed, with strangers
        strangers_i, strangers_t = random_batch(cfg, 4, seed=9)
        mixed_i = model.encode_image(torch.cat([strangers_i, images.flip(0)]))[4:].flip(0)
        mixed_t = model.encode_text(torch.cat([strangers_t, tokens.flip(0)]))[4:].flip(0)
    for got in (alone_i, mixed_i):
        torch.testing.assert_close(got, together_i, atol=1e-5, rtol=0)
    for got in (alone_t, mixed_t):
        torch.testing.assert_close(got, together_t, atol=1e-5, rtol=0)


def test_training_mode_routes_groups_across_examples(tiny_cfg):
    model = LIMoE(tiny_cfg).train()
    images, tokens = random_batch(tiny_cfg, 4)
    out = model(images, tokens)
    plan = out.image_routing[0].plan
    assert plan.probs.shape[0] == 4 // tiny_cfg.train_group_size  # G
    assert plan.probs.shape[1] == tiny_cfg.train_group_size * tiny_cfg.num_patches  # S


def test_text_padding_is_ignored(tiny_model, tiny_cfg):
    # Same text, padded to the full context either way: only real tokens matter, so the
    # embedding does not change when the padded tail's attention/routing could have leaked.
    _, tokens = random_batch(tiny_cfg, 1)
    tokens[0, 3:] = tiny_cfg.pad_id
    with torch.no_grad():
        base = tiny_model.encode_text(tokens)
        # perturb the positional embedding of padded positions: masked, so no effect
        tiny_model.text_pos.data[:, 3:] += 5.0
        torch.testing.assert_close(tiny_model.encode_text(tokens), base, atol=1e-6, rtol=0)


def test_a_few_steps_fit_a_fixed_batch(tiny_cfg):
    torch.manual_seed(0)
    model = LIMoE(tiny_cfg).train()
    images, tokens = random_batch(tiny_cfg, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        out = model(images, tokens)
        terms = limoe_loss(out.image_embeds, out.text_embeds, out.logit_scale, out.image_routing,
                           out.text_routing, tiny_cfg)
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        losses.append(terms["contrastive"].item())
    assert losses[-1] < 0.5 * losses[0]


def test_logit_scale_is_clamped(tiny_model, tiny_cfg):
    images, tokens = random_batch(tiny_cfg, 2)
    tiny_model.logit_scale.data.fill_(10.0)
    assert tiny_model(images, tokens).logit_scale.item() == pytest.approx(tiny_cfg.logit_scale_max)
