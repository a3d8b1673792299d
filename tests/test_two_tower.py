"""The two-tower baseline (CLIP / ALIGN): shapes, towers that share nothing, FLOPs that match
LIMoE's, training through the same loop, and an exported entry served by the same stack."""

import base64
import io
import json
import re

import httpx
import numpy as np
import pytest
import torch
from conftest import random_batch
from PIL import Image
from servers import serve_process

from limoe.cli import main
from limoe.model.checkpoint import load_checkpoint
from limoe.model.config import LIMoEConfig, dense_counterpart, get_config, two_tower_counterpart
from limoe.model.stats import model_stats
from limoe.model.transformer import LIMoE, TwoTower, build_model

LABELS = ["red circle", "blue square", "cat"]


@pytest.fixture
def two_tower():
    torch.manual_seed(0)
    return build_model(two_tower_counterpart(get_config("tiny"))).eval()


def test_build_model_picks_the_architecture():
    cfg = get_config("tiny")
    assert type(build_model(cfg)) is LIMoE
    tt = two_tower_counterpart(cfg)
    assert (tt.arch, tt.moe_layers, tt.aux_loss) == ("two_tower", "none", "none")
    assert type(build_model(tt)) is TwoTower
    assert LIMoEConfig.from_dict(tt.to_dict()) == tt
    with pytest.raises(ValueError, match="arch must be"):
        cfg.replace(arch="three_tower")


def test_shapes_and_no_routing(two_tower):
    cfg = two_tower.cfg
    images, tokens = random_batch(cfg, 3)
    out = two_tower(images, tokens)
    assert out.image_embeds.shape == out.text_embeds.shape == (3, cfg.embed_dim)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert out.image_routing == [] and out.text_routing == []
    assert torch.allclose(two_tower.encode_image(images), out.image_embeds, atol=1e-6)
    assert torch.allclose(two_tower.encode_text(tokens), out.text_embeds, atol=1e-6)


def test_the_towers_share_no_weight(two_tower):
    """Every parameter is used by exactly one modality: an image's embedding has no gradient in
    the text tower and vice versa, and changing one tower leaves the other modality unchanged."""
    images, tokens = random_batch(two_tower.cfg, 2)
    image_params = {n for n, p in two_tower.named_parameters()
                    if torch.autograd.grad(two_tower.encode_image(images).sum(), p, allow_unused=True)[0] is not None}
    text_params = {n for n, p in two_tower.named_parameters()
                   if torch.autograd.grad(two_tower.encode_text(tokens).sum(), p, allow_unused=True)[0] is not None}
    assert not image_params & text_params
    assert image_params | text_params == {n for n, _ in two_tower.named_parameters()} - {"logit_scale"}
    assert any(n.startswith("text_blocks.") for n in text_params) and any(n.startswith("blocks.") for n in image_params)

    before_img, before_txt = two_tower.encode_image(images), two_tower.encode_text(tokens)
    with torch.no_grad():
        for p in two_tower.text_blocks.parameters():
            p.add_(torch.randn_like(p))
    assert torch.equal(two_tower.encode_image(images), before_img)
    assert not torch.allclose(two_tower.encode_text(tokens), before_txt)


def test_one_tower_models_route_both_modalities_through_the_same_blocks(tiny_model):
    """The contrast: in LIMoE the text embedding depends on the blocks images also cross."""
    _, tokens = random_batch(tiny_model.cfg, 2)
    grads = torch.autograd.grad(tiny_model.encode_text(tokens).sum(), tiny_model.blocks[0].mlp.fc1.weight)
    assert grads[0].abs().sum() > 0


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_active_flops_match_the_limoe_preset(preset):
    """Per image and per text the two-tower model does the dense counterpart's work exactly, and
    LIMoE's (K=1) up to its routers; it has twice the dense model's tower parameters."""
    limoe = get_config(preset)
    s_moe, s_dense, s_tt = (model_stats(c) for c in (limoe, dense_counterpart(limoe), two_tower_counterpart(limoe)))
    assert (s_tt.image_flops, s_tt.text_flops) == (s_dense.image_flops, s_dense.text_flops)
    D, E = limoe.width, limoe.num_experts
    routers = len(limoe.moe_layer_ids) * 2 * D * E  # per token
    assert s_moe.image_flops - s_tt.image_flops == routers * limoe.num_patches
    assert s_moe.text_flops - s_tt.text_flops == routers * limoe.context_length
    assert s_moe.image_flops / s_tt.image_flops == pytest.approx(1, abs=0.01)
    per_block = sum(p.numel() for p in build_model(limoe.replace(moe_layers="none")).blocks[0].parameters())
    assert s_tt.total_params - s_dense.total_params == limoe.depth * per_block + 2 * D  # + the text tower's final LN
    assert s_tt.active_params == s_tt.total_params


def test_limoe_info_states_the_baselines(capsys):
    assert main(["info", "small", "--baselines"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ")[0].strip(): line.split() for line in out.splitlines() if line.startswith("small")}
    assert set(rows) == {"small", "small dense", "small two-tower"}
    assert rows["small two-tower"][-2:] == rows["small dense"][-2:]  # GFLOPs per image and per text


def test_trained_by_limoe_train_and_reloaded(tmp_path):
    """`limoe train --arch two_tower` on a tiny data set; the checkpoint reloads as a TwoTower and
    `limoe eval` reports it with no routing layers."""
    from limoe.data.scenes import prepare_scenes

    prepare_scenes(tmp_path / "c", count=200)
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--arch", "two_tower", "--data", "scenes", "--cache", str(tmp_path / "c"),
                 "--out", str(out), "--steps", "3", "--batch-size", "8", "--warmup", "1", "--workers", "0"]) == 0
    model, extra = load_checkpoint(out / "model.safetensors")
    assert type(model) is TwoTower and model.cfg.arch == "two_tower" and extra["step"] == 3
    assert main(["eval", str(out / "model.safetensors"), "--cache", str(tmp_path / "c"), "--limit", "40",
                 "--template", "{}"]) == 0
    results = json.loads((out / "eval.json").read_text())
    assert "scenes/held-out colour-shape pairs" in results["zero_shot"]
    assert not results.get("routing", {}).get("layers")


@pytest.fixture(scope="module")
def entry(exported_two_tower):
    return exported_two_tower


def test_the_entry_has_both_graphs_and_no_routing(entry):
    from limoe.runtime.model_store import ModelStore
    from limoe.runtime.onnx_encoder import OnnxEncoders

    model, tok, path = entry
    loaded = ModelStore(path.parent.parent).load("tt")
    assert loaded.moe.layers == ()
    assert loaded.data["config"]["arch"] == "two_tower"
    enc = OnnxEncoders(loaded, quantized=False)
    images, tokens = random_batch(model.cfg, 3)
    out_img, out_txt = enc.encode_images(images.numpy()), enc.encode_tokens(tokens.numpy())
    with torch.no_grad():
        np.testing.assert_allclose(out_img.embeddings, model.encode_image(images).numpy(), atol=1e-5)
        np.testing.assert_allclose(out_txt.embeddings, model.encode_text(tokens).numpy(), atol=1e-5)
    assert out_img.expert_index.shape[1] == 0 and out_txt.expert_index.shape[1] == 0
    card = (path / "MODEL_CARD.md").read_text()
    assert "two-tower (CLIP-style)" in card and "share no weight" in card and "MoE in blocks" not in card


def test_the_model_card_reproduces_a_trained_baseline():
    """A recorded run of a preset's baseline is rebuilt with the same flag it was trained with."""
    from limoe.export.model_card import render_model_card

    training = {"step": 10, "train": {"steps": 10, "batch_size": 8, "lr": 0.001, "warmup_steps": 1, "seed": 0},
                "data": "scenes"}
    for cfg, flag in ((two_tower_counterpart(get_config("small")), "--preset small --arch two_tower --data"),
                      (dense_counterpart(get_config("small")), "--preset small --dense --data"),
                      (get_config("small"), "--preset small --data")):
        moe = {"layers": list(cfg.moe_layer_ids), "num_experts": 8, "top_k": 1, "inference_routing": "dropless",
               "batch_priority": True}
        card = render_model_card({"name": "m", "version": "1", "config": cfg.to_dict(), "moe": moe, "roles": {}},
                                 training)
        assert f"limoe train {flag} scenes" in card
    # an entry exported with its own prompt templates: the card's commands pass them on
    cfg = get_config("small")
    moe = {"layers": list(cfg.moe_layer_ids), "num_experts": 8, "top_k": 1, "inference_routing": "dropless",
           "batch_priority": True}
    card = render_model_card({"name": "m", "version": "1", "config": cfg.to_dict(), "moe": moe, "roles": {},
                              "templates": ["{}", "a {} icon"]}, training)
    flags = "--template '{}' --template 'a {} icon'"
    assert f"limoe eval run/model.safetensors {flags}" in card
    assert re.search(rf"^limoe export run/model\.safetensors .*{re.escape(flags)}$", card, re.M), card
    default = render_model_card({"name": "m", "version": "1", "config": cfg.to_dict(), "moe": moe, "roles": {}},
                                training)
    assert "--template" not in default  # the default templates need no flag


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), color).save(buf, "PNG")
    return buf.getvalue()


def test_served_by_the_same_stack(entry):
    """Native classify (with explain), the Hugging Face route, v2 infer and /metrics on an entry
    without experts."""
    import tritonclient.http as triton

    _, _, path = entry
    with serve_process(model=str(path), max_batch_wait_ms=2) as (base, _):
        r = httpx.post(f"{base}/v1/classify", timeout=30,
                       json={"images": [base64.b64encode(_png((200, 20, 20))).decode()], "labels": LABELS,
                             "explain": True})
        assert r.status_code == 200, r.text
        result = r.json()["results"][0]
        assert sorted(x["label"] for x in result["labels"]) == sorted(LABELS)
        assert sum(x["score"] for x in result["labels"]) == pytest.approx(1, abs=1e-5)
        assert result["routing"]["layers"] == []
        assert "no expert" in result["routing"]["note"]

        r = httpx.post(f"{base}/", timeout=30, json={"inputs": base64.b64encode(_png((20, 20, 200))).decode(),
                                                     "parameters": {"candidate_labels": LABELS}})
        assert r.status_code == 200 and len(r.json()) == 3

        client = triton.InferenceServerClient(base.removeprefix("http://"))
        assert client.is_model_ready("tt")
        image_in = triton.InferInput("IMAGE", [1], "BYTES")
        image_in.set_data_from_numpy(np.array([_png((20, 200, 20))], dtype=object))
        labels_in = triton.InferInput("LABELS", [3], "BYTES")
        labels_in.set_data_from_numpy(np.array([s.encode() for s in LABELS], dtype=object))
        result = client.infer("tt", [image_in, labels_in])
        assert result.as_numpy("SCORES").shape == (1, 3)
        assert result.as_numpy("EXPERTS").shape[:2] == (1, 0)

        metrics = httpx.get(f"{base}/metrics", timeout=10).text
        for route in ("/v1/classify", "/", "/v2/models/{name}/infer"):
            assert re.search(rf'^limoe_requests_total\{{method="POST",route="{re.escape(route)}",status="200"\}} 1\.0$',
                             metrics, re.M), route
        assert re.search(r'^limoe_items_total\{.*\} [1-9]', metrics, re.M)
        assert not re.search(r"^limoe_expert_tokens_total\{", metrics, re.M)
