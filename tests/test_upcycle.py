"""Sparse upcycling (issue 26): every MoE layer's experts are copies of the dense MLP, so at step 0
the upcycled model's embeddings equal the dense model's; then it trains on."""

import json
import subprocess
import sys

import pytest
import torch
from test_train import ColorSquares, tokenizer

from limoe.model.checkpoint import load_checkpoint, read_metadata, save_checkpoint
from limoe.model.config import dense_counterpart, get_config, two_tower_counterpart
from limoe.model.moe import MoELayer
from limoe.model.transformer import build_model
from limoe.model.upcycle import upcycle
from limoe.train.trainer import TrainConfig, train


def _inputs(cfg):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, cfg.vocab_size, (6, cfg.context_length), generator=g)
    tokens[:, 5:] = cfg.pad_id
    return torch.randn(6, 3, cfg.image_size, cfg.image_size, generator=g), tokens


@pytest.mark.parametrize("counterpart", [dense_counterpart, two_tower_counterpart])
@pytest.mark.parametrize("top_k", [1, 2])
def test_step_zero_embeddings_equal_the_dense_models(counterpart, top_k):
    torch.manual_seed(0)
    dense = build_model(counterpart(get_config("tiny"))).eval()
    with torch.no_grad():  # make the MLPs matter: random biases too
        for p in dense.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sparse = upcycle(dense, num_experts=4, top_k=top_k, moe_layers="every_1")
    layers = [m for m in sparse.modules() if isinstance(m, MoELayer)]
    assert len(layers) == (2 if counterpart is dense_counterpart else 4) and sparse.cfg.renormalize_gates
    assert not torch.equal(layers[0].router.weight, torch.zeros_like(layers[0].router.weight))  # routers do route
    images, tokens = _inputs(dense.cfg)
    with torch.no_grad():
        assert (sparse.encode_image(images) - dense.encode_image(images)).abs().max() <= 1e-5
        assert (sparse.encode_text(tokens) - dense.encode_text(tokens)).abs().max() <= 1e-5
        chosen = sparse.image_features(images)[1][0].plan.expert_index
    assert len(chosen.unique()) > 1  # different tokens go to different (identical) experts


def test_an_already_sparse_model_is_refused():
    with pytest.raises(ValueError, match="already has MoE layers"):
        upcycle(build_model(get_config("tiny")), 4)


def test_the_command_writes_a_checkpoint_that_trains_on(tmp_path):
    cfg = dense_counterpart(get_config("tiny"))
    torch.manual_seed(0)
    tok = tokenizer(cfg)
    save_checkpoint(build_model(cfg), tmp_path / "dense.safetensors", extra={"step": 7, "data": "colors"},
                    tokenizer=tok)
    out = subprocess.run([sys.executable, "-m", "limoe", "upcycle", str(tmp_path / "dense.safetensors"), "--experts", "4",
                          "--top-k", "2", "--moe-every", "2", "--out", str(tmp_path / "sparse.safetensors")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    sparse_cfg, extra = read_metadata(tmp_path / "sparse.safetensors")
    assert sparse_cfg.moe_layer_ids == (1,) and sparse_cfg.num_experts == 4 and sparse_cfg.top_k == 2
    assert extra["upcycled_from"]["step"] == 7 and sparse_cfg.aux_loss == "entropy"
    model, _ = load_checkpoint(tmp_path / "sparse.safetensors")
    tc = TrainConfig(steps=6, batch_size=8, lr=3e-3, warmup_steps=1, checkpoint_every=6)
    train(sparse_cfg, tc, ColorSquares(), tok, tmp_path / "run", progress=False, init=tmp_path / "sparse.safetensors")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and "image/layer1" in log[-1]["routing"] and log[-1]["global_entropy_image"] >= 0
    trained, _ = load_checkpoint(tmp_path / "run" / "model.safetensors")
    w1 = trained.blocks[1].mlp.experts.w1
    assert not torch.equal(w1[0], w1[1])  # the copies have started to diverge
    assert torch.equal(model.blocks[1].mlp.experts.w1[0], model.blocks[1].mlp.experts.w1[1])


def test_an_upcycled_run_exports_with_its_routing_over_training(tmp_path):
    """`limoe upcycle`, `limoe train --init`, `limoe export`: the model card says where the weights
    came from, how to rebuild them (the upcycle command first) and how routing moved over the run."""
    from limoe.cli import main
    from limoe.data.scenes import prepare_scenes

    cache, run = tmp_path / "cache", tmp_path / "run"
    prepare_scenes(cache, count=120)
    assert main(["train", "--preset", "tiny", "--dense", "--data", "scenes", "--cache", str(cache), "--out",
                 str(tmp_path / "dense"), "--steps", "2", "--batch-size", "8", "--workers", "0", "--warmup", "1"]) == 0
    assert main(["upcycle", str(tmp_path / "dense" / "model.safetensors"), "--experts", "4", "--top-k", "2",
                 "--moe-every", "2", "--out", str(tmp_path / "up.safetensors")]) == 0
    assert main(["train", "--init", str(tmp_path / "up.safetensors"), "--data", "scenes", "--cache", str(cache),
                 "--out", str(run), "--steps", "5", "--batch-size", "8", "--workers", "0", "--warmup", "1"]) == 0
    _, extra = read_metadata(run / "model.safetensors")
    assert extra["init"]["upcycled_from"]["experts"] == 4 and extra["init"]["upcycled_from"]["step"] == 2
    assert main(["export", str(run / "model.safetensors"), "--name", "up", "--store", str(tmp_path / "store"),
                 "--formats", "onnx"]) == 0
    entry = tmp_path / "store" / "up" / "1"
    history = json.loads((entry / "manifest.json").read_text())["training"]["routing_history"]
    assert sorted(history) == ["image/layer1", "text/layer1"]
    assert [p["step"] for p in history["image/layer1"]] == [1, 2, 3, 4, 5]
    card = (entry / "MODEL_CARD.md").read_text()
    assert f"Sparse upcycling: `{tmp_path / 'up.safetensors'}` is the dense" in card
    assert (f"limoe upcycle {tmp_path / 'dense' / 'model.safetensors'} --experts 4 --top-k 2 --moe-every 2 "
            f"--out {tmp_path / 'up.safetensors'}") in card
    assert "## Routing over training" in card and "| layer | step 1 | step 2 | step 3 | step 4 | step 5 |" in card
    first = history["image/layer1"][0]
    assert f"| image/layer1 | {first['effective_experts']:.2f} / {first['top_share']:.0%} |" in card
