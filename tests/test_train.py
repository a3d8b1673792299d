"""Training: schedule, weight decay groups, exact resume, logs, and 2-process DDP on CPU."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from servers import free_port

from limoe.model.checkpoint import load_checkpoint, read_tokenizer
from limoe.model.config import get_config
from limoe.model.transformer import LIMoE
from limoe.runtime.templates import DEFAULT_TEMPLATES
from limoe.runtime.tokenizer import Tokenizer
from limoe.train.trainer import (
    StepSampler,
    TrainConfig,
    equal_text_positives,
    learning_rate,
    load_batch,
    make_optimizer,
    train,
    training_texts,
)

COLORS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0), "white": (1.0, 1.0, 1.0)}


class ColorSquares:
    """A tiny dataset: flat-coloured images with a few caption variants."""

    def __init__(self, size=16, n=64):
        self.names = list(COLORS)
        self.size, self.n = size, n
        self.sample_weights = np.ones(n)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        name = self.names[int(i) % len(self.names)]
        pixels = np.ones((3, self.size, self.size), np.float32) * np.array(COLORS[name], np.float32)[:, None, None]
        return {"pixels": pixels, "captions": [name, f"a {name} square", f"something {name}"], "label": name}


def tokenizer(cfg):
    captions = [c for name in COLORS for c in (name, f"a {name} square", f"something {name}")]
    return Tokenizer.train(captions * 5, vocab_size=cfg.vocab_size, context_length=cfg.context_length)


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(0.1)  # (0 + 1) / 10
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(10, cfg) == pytest.approx(1.0)  # cosine starts at the peak
    assert learning_rate(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway: cos(pi/2) = 0
    assert learning_rate(110, cfg) == pytest.approx(0.1)


def test_weight_decay_only_on_matrices():
    model = LIMoE(get_config("tiny"))
    decay, no_decay = make_optimizer(model, TrainConfig()).param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert model.logit_scale in no_decay["params"]


def test_step_sampler_is_a_function_of_the_step_and_splits_ranks():
    s = StepSampler(100, 8, seed=3)
    assert (s.indices(5) == StepSampler(100, 8, seed=3).indices(5)).all()
    assert not (s.indices(5) == s.indices(6)).all()
    r0, r1 = StepSampler(100, 8, 3, rank=0, world_size=2), StepSampler(100, 8, 3, rank=1, world_size=2)
    assert np.concatenate([r0.indices(5), r1.indices(5)]).tolist() == s.indices(5).tolist()
    weighted = StepSampler(3, 3000, seed=0, weights=np.array([1.0, 0.0, 3.0]))
    counts = np.bincount(weighted.indices(0), minlength=3)
    assert counts[1] == 0 and abs(counts[2] / counts[0] - 3) < 0.5


def test_equal_text_positives_pairs_equal_texts_and_never_empty_ones():
    pos = equal_text_positives(["cat", "dog", "cat", "", ""])
    assert pos.tolist() == [[True, False, True, False, False],
                            [False, True, False, False, False],
                            [True, False, True, False, False],
                            [False, False, False, True, False],
                            [False, False, False, False, True]]


def test_template_captions_are_seeded_and_use_the_zero_shot_prompts():
    data, cfg = ColorSquares(), get_config("tiny")
    tok = Tokenizer.train(list(training_texts([data[i] for i in range(4)], template_prob=1.0)),
                          vocab_size=cfg.vocab_size, context_length=cfg.context_length)
    idx = list(range(8))
    never = load_batch(data, idx, seed=0, step=3, tokenizer=tok, template_prob=0.0)
    always = load_batch(data, idx, seed=0, step=3, tokenizer=tok, template_prob=1.0)
    again = load_batch(data, idx, seed=0, step=3, tokenizer=tok, template_prob=1.0)
    assert torch.equal(always.tokens, again.tokens) and always.texts == again.texts
    for k, i in enumerate(idx):
        item = data[i]
        assert always.texts[k] in {t.format(item["label"]) for t in DEFAULT_TEMPLATES}
        assert never.texts[k] in item["captions"]
    assert torch.equal(always.tokens, torch.from_numpy(tok.encode(always.texts)))


def test_training_learns_logs_and_resumes_exactly(tmp_path):
    cfg = get_config("tiny", router_noise_std=0.1)
    tok, data = tokenizer(cfg), ColorSquares()
    tc = TrainConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=5, checkpoint_every=20)
    model = train(cfg, tc, data, tok, tmp_path / "full", progress=False)

    log = [json.loads(line) for line in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 41))
    first, last = log[0], log[-1]
    assert {"contrastive", "local_entropy_image", "global_entropy_text", "total", "lr", "examples_per_s"} <= set(first)
    assert last["contrastive"] < first["contrastive"]
    usage = last["routing"]["image/layer1"]
    assert len(usage["usage"]) == cfg.num_experts and sum(usage["usage"]) == pytest.approx(1.0, abs=1e-3)
    assert 0.0 <= usage["dropped"] <= 1.0

    # Zero-shot on the training colours works after 40 steps.
    with torch.no_grad():
        images = torch.from_numpy(np.stack([data[i]["pixels"] for i in range(4)]))
        texts = torch.from_numpy(tok.encode([f"a {name} square" for name in data.names]))
        pred = (model.encode_image(images) @ model.encode_text(texts).T).argmax(-1)
    assert pred.tolist() == [0, 1, 2, 3]

    # Stop at step 20 (a checkpoint), resume to 40: the same weights as the uninterrupted run.
    train(cfg, tc, data, tok, tmp_path / "split", progress=False, stop_at=20)
    split_log = tmp_path / "split" / "log.jsonl"
    assert len(split_log.read_text().splitlines()) == 20
    # A run killed at step 23 had logged 21-23 past its checkpoint: resuming runs them again, logged once.
    row = json.loads(split_log.read_text().splitlines()[-1])
    with open(split_log, "a") as f:
        f.writelines(json.dumps({**row, "step": s}) + "\n" for s in (21, 22, 23))
    resumed = train(cfg, tc, data, tok, tmp_path / "split", progress=False)
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    assert [json.loads(line)["step"] for line in split_log.read_text().splitlines()] == list(range(1, 41))
    saved, extra = load_checkpoint(tmp_path / "split" / "model.safetensors")
    assert extra["step"] == 40 and read_tokenizer(tmp_path / "split" / "model.safetensors") is not None


DDP_SCRIPT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    sys.path.insert(0, {tests!r})
    from test_train import ColorSquares, tokenizer
    from limoe.model.config import get_config
    from limoe.train.trainer import TrainConfig, finish_distributed, train

    cfg = get_config("tiny")
    model = train(cfg, TrainConfig(steps=4, batch_size=8, lr=1e-2, warmup_steps=1), ColorSquares(),
                  tokenizer(cfg), {out!r}, progress=False)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, flat)
    if dist.get_rank() == 0:
        print("max diff between ranks", float((gathered[0] - gathered[1]).abs().max()), flush=True)
    finish_distributed(0)  # as `limoe train` ends under torchrun
""")


def test_two_process_ddp_on_cpu_keeps_ranks_identical(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(__file__), out=str(tmp_path / "run")))
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}",
                          str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-1000:] + out.stderr[-3000:]
    assert "max diff between ranks 0.0" in out.stdout
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_cli_train_then_eval_on_prepared_scenes(tmp_path, capsys):
    from limoe.cli import main
    from limoe.data.scenes import prepare_scenes

    prepare_scenes(tmp_path / "cache", count=200)
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", "scenes", "--cache", str(tmp_path / "cache"), "--out", str(out),
                 "--steps", "3", "--batch-size", "8", "--workers", "0", "--warmup", "1"]) == 0
    assert main(["eval", str(out / "model.safetensors"), "--cache", str(tmp_path / "cache"), "--limit", "50",
                 "--plots", str(tmp_path / "plots"), "--template", "{}", "--template", "a picture of {}"]) == 0
    printed = capsys.readouterr().out
    assert "scenes/held-out colour-shape pairs" in printed and "routing layer" in printed
    results = json.loads((out / "eval.json").read_text())
    assert results["templates"] == ["{}", "a picture of {}"]
    held = results["zero_shot"]["scenes/held-out colour-shape pairs"]
    assert 0 <= held["top1"] <= held["top5"] <= 1 and 2 <= held["classes"] <= 8  # the 8 held-out pairs
    assert (tmp_path / "plots" / "expert_usage.png").exists() and (tmp_path / "plots" / "routing_maps.png").exists()
    # the results travel with the model: checkpoint metadata, then the exported manifest
    from limoe.model.checkpoint import read_metadata
    from limoe.runtime.model_store import read_manifest

    assert read_metadata(out / "model.safetensors")[1]["eval"]["zero_shot"] == results["zero_shot"]
    assert main(["export", str(out / "model.safetensors"), "--name", "t", "--store", str(tmp_path / "store"),
                 "--template", "{}", "--template", "a picture of {}"]) == 0
    entry = tmp_path / "store" / "t" / "1"
    assert read_manifest(entry).templates == ("{}", "a picture of {}")  # the service's default prompts
    assert read_manifest(entry).data["evaluation"]["zero_shot"] == results["zero_shot"]
    assert main(["eval", str(entry), "--cache", str(tmp_path / "cache"), "--limit", "50"]) == 0
    from limoe.runtime.model_store import verify

    m = verify(entry)  # the re-rendered model card's checksum was updated too, and the plots are listed
    assert m.file("plot_expert_usage").name == "expert_usage.png" and m.has("plot_routing_maps")
    card = (entry / "MODEL_CARD.md").read_text()
    assert "![Expert usage by modality, per MoE layer](expert_usage.png)" in card and "10-way top-1" in card
    assert "| scenes/held-out colour-shape pairs |" in card and "steps of batch 8" in card and "data mix `scenes`" in card
    assert "prompts: `{}`, `a picture of {}`" in card  # the entry's eval ran with the entry's own templates
    again = read_manifest(entry).data["evaluation"]["zero_shot"]  # the ONNX export on the same images
    for name, r in results["zero_shot"].items():  # equal up to near-ties flipped by 1e-7 differences
        assert again[name]["top1"] == pytest.approx(r["top1"], abs=0.05)


def test_fine_tuning_starts_from_the_checkpoint_with_its_vocabulary(tmp_path, capsys):
    """`limoe train --init CKPT`: the checkpoint's weights, config and tokenizer, with `--set`
    changing its training fields. At learning rate 0 the weights stay exactly the checkpoint's."""
    from limoe.cli import main
    from limoe.data.scenes import prepare_scenes
    from limoe.model.checkpoint import read_metadata, save_checkpoint

    prepare_scenes(tmp_path / "cache", count=100)
    cfg = get_config("tiny", depth=3, moe_layers="1")
    torch.manual_seed(3)
    start = LIMoE(cfg)
    tok = tokenizer(cfg)
    ckpt = save_checkpoint(start, tmp_path / "start.safetensors", extra={"step": 9}, tokenizer=tok)
    common = ["train", "--init", str(ckpt), "--data", "scenes", "--cache", str(tmp_path / "cache"), "--steps", "2",
              "--batch-size", "8", "--workers", "0", "--warmup", "1", "--set", "train_capacity_factor=2.0"]
    assert main([*common, "--out", str(tmp_path / "still"), "--lr", "0"]) == 0
    tuned, extra = load_checkpoint(tmp_path / "still" / "model.safetensors")
    for (name, a), b in zip(start.state_dict().items(), tuned.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    assert tuned.cfg == cfg.replace(train_capacity_factor=2.0)  # depth 3 and one MoE layer: not the preset's
    assert read_tokenizer(tmp_path / "still" / "model.safetensors").to_str() == tok.to_str()
    assert extra["init"]["checkpoint"] == str(ckpt) and extra["init"]["step"] == 9
    assert main([*common, "--out", str(tmp_path / "moved"), "--lr", "0.01"]) == 0
    moved, _ = load_checkpoint(tmp_path / "moved" / "model.safetensors")
    assert float((moved.state_dict()["blocks.0.attn.q.weight"] - start.state_dict()["blocks.0.attn.q.weight"]).abs().max()) > 0
    assert read_metadata(tmp_path / "moved" / "model.safetensors")[0].depth == 3
    assert main(["export", str(tmp_path / "moved" / "model.safetensors"), "--name", "tuned", "--store",
                 str(tmp_path / "store"), "--formats", "onnx"]) == 0
    card = (tmp_path / "store" / "tuned" / "1" / "MODEL_CARD.md").read_text()
    assert f"limoe train --init {ckpt} --data scenes --out run --steps 2" in card
    assert f"Fine-tuned from `{ckpt}` (trained 9 steps)" in card
    assert main([*common, "--out", str(tmp_path / "x"), "--dense"]) == 2
    assert "--init takes the checkpoint's architecture" in capsys.readouterr().err
