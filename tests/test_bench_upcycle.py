"""bench/upcycle.py: the three arms from one dense start, at toy scale: step counts from the measured
pairs/s, each arm started from what it claims (the upcycled one computing exactly the dense model at
step 0), the routing history of the upcycled runs, the JSON and the verdict lines; a rerun trains
nothing again. The toy numbers are meaningless; the plumbing is not."""

import importlib.util
import json
import sys

import pytest
import torch
from servers import ROOT

sys.path.insert(0, str(ROOT / "bench"))  # the bench imports its neighbours, as when run from bench/
spec = importlib.util.spec_from_file_location("upcycle_bench", ROOT / "bench" / "upcycle.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

ARMS = ["dense start", "upcycled", "dense, trained on", "LIMoE from scratch"]


def _hand(top1s):
    return bench.summarize([{"seed": i, "mean_top1": t, "mean_10way": 0.5, "sets": {}} for i, t in enumerate(top1s)])


def test_verdict_says_what_the_numbers_say():
    arms = {"upcycled": _hand([0.30, 0.32]), "dense, trained on": _hand([0.20, 0.22]),
            "LIMoE from scratch": _hand([0.30, 0.34])}
    assert bench.verdict(arms, "dense, trained on").startswith(
        "upcycled beats dense, trained on by 10.00 points mean top-1, more than a standard deviation (1.41)")
    assert bench.verdict(arms, "LIMoE from scratch").startswith(
        "upcycled vs LIMoE from scratch: -1.00 points, within a standard deviation (2.83)")
    arms["LIMoE from scratch"] = _hand([0.40, 0.42])
    assert bench.verdict(arms, "LIMoE from scratch").startswith("upcycled loses to LIMoE from scratch by 10.00")


def test_three_arms_from_one_dense_start(tmp_path, capsys):
    from limoe.data.scenes import prepare_scenes
    from limoe.model.checkpoint import load_checkpoint, read_metadata

    prepare_scenes(tmp_path / "cache", count=120)
    argv = ["--preset", "tiny", "--set", "width=48", "--data", "scenes", "--cache", str(tmp_path / "cache"),
            "--seeds", "2", "--dense-steps", "3", "--minutes", "0.003", "--batch-size", "8", "--warmup", "1",
            "--extra-warmup", "1", "--experts", "4", "--rounds", "1", "--rate-steps", "1", "--limit", "40",
            "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "upcycle.json")]
    bench.main(argv)
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads((tmp_path / "upcycle.json").read_text())
    assert list(report["arms"]) == ARMS and report["seeds"] == [0, 1] and report["top_k"] == 2
    rates, steps = report["pairs_per_s"], report["steps"]
    assert set(rates) == set(ARMS[1:]) and all(r > 0 for r in rates.values())
    assert steps == {n: max(1, round(0.003 * 60 * r / 8)) for n, r in rates.items()}
    assert lines[-2:] == report["verdicts"] == [bench.verdict(report["arms"], "dense, trained on"),
                                                bench.verdict(report["arms"], "LIMoE from scratch")]

    runs = tmp_path / "runs"
    images = torch.rand(3, 3, 16, 16)  # the tiny preset's size
    for seed in (0, 1):
        dense_ckpt = runs / "dense" / f"seed{seed}" / "model.safetensors"
        dense, extra = load_checkpoint(dense_ckpt)
        assert extra["step"] == 3 and extra["train"]["seed"] == seed and not dense.cfg.moe_layer_ids
        upcycled, _ = load_checkpoint(runs / "upcycled" / f"seed{seed}" / "init.safetensors")
        with torch.no_grad():  # step 0 of the upcycled arm is the dense start
            assert (upcycled.encode_image(images) - dense.encode_image(images)).abs().max() <= 1e-5
        for name, slug in bench.SLUGS.items():
            if name == "dense start":
                continue
            cfg, extra = read_metadata(runs / slug / f"seed{seed}" / "model.safetensors")
            assert extra["step"] == steps[name] and extra["train"]["seed"] == 1000 + seed
            assert bool(cfg.moe_layer_ids) == (name != "dense, trained on")
            started = {"upcycled": str(runs / "upcycled" / f"seed{seed}" / "init.safetensors"),
                       "dense, trained on": str(dense_ckpt)}.get(name)
            assert extra.get("init", {}).get("checkpoint") == started
        cfg, _ = read_metadata(runs / "upcycled" / f"seed{seed}" / "model.safetensors")
        assert (cfg.top_k, cfg.num_experts, cfg.renormalize_gates) == (2, 4, True)

    for run in report["arms"]["upcycled"]["runs"]:
        history = run["routing_history"]
        assert "image/layer1" in history and history["image/layer1"][-1]["step"] == steps["upcycled"]
        assert all(1.0 <= p["effective_experts"] <= 4.0 for points in history.values() for p in points)
    assert "| image/layer1 |" in "\n".join(lines)

    # A rerun reuses the measured rates and every finished run: nothing is trained again.
    ckpts = sorted(runs.glob("*/seed*/model.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in ckpts]
    bench.main(argv)
    assert [p.stat().st_mtime_ns for p in ckpts] == stamps
    assert json.loads((tmp_path / "upcycle.json").read_text())["steps"] == steps


def test_arms_are_the_dense_counterpart_and_its_upcycling():
    from limoe.model.config import get_config

    base = get_config("tiny")
    arms = bench.arm_configs(base, 4, 2, 1)
    assert arms["dense start"] == arms["dense, trained on"] and not arms["dense start"].moe_layer_ids
    assert arms["LIMoE from scratch"] == base
    up = arms["upcycled"]
    assert up.moe_layer_ids == tuple(range(up.depth)) and up.top_k == 2 and up.renormalize_gates
    assert up.aux_loss == "entropy" and up.inference_routing == "dropless"
    with pytest.raises(ValueError, match="already has MoE layers"):
        bench.upcycled_config(base, 4, 2, "every_2")
