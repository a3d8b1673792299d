"""bench/recipe_ablation.py and bench/train_throughput.py: equal wall clock turned into step counts
by hand, then both scripts end to end at toy scale (the numbers are meaningless; the plumbing is not)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from servers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
spec = importlib.util.spec_from_file_location("recipe_ablation", ROOT / "bench" / "recipe_ablation.py")
ablation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ablation)


def test_equal_wall_clock_steps_by_hand():
    # 60 s at 20 pairs/s in batches of 10: 120 steps.
    assert ablation.steps_for(60, 10, 20.0, 20.0, masked=False) == (120, 0)
    # Masked at 40 pairs/s with a 5% tail at the baseline's 20: n (0.95 * 10 / 40 + 0.05 * 10 / 20) = 60
    # -> n = 60 / 0.2625 = 228.6 -> 229 steps, 11 of them unmasked.
    assert ablation.steps_for(60, 10, 40.0, 20.0, masked=True) == (229, 11)
    # Twice the rate buys twice the steps.
    assert ablation.steps_for(60, 10, 40.0, 20.0, masked=False)[0] == 2 * ablation.steps_for(60, 10, 20.0, 20.0,
                                                                                              masked=False)[0]


def _env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.mark.parametrize("variants", ["mask,sigmoid"])
def test_ablation_end_to_end_on_a_measured_throughput(tmp_path, variants):
    from limoe.data.scenes import prepare_scenes
    from limoe.model.checkpoint import read_metadata

    prepare_scenes(tmp_path / "cache", count=120)
    rates = {"baseline": 40.0, "mask 0.5": 80.0, "sigmoid": 40.0}
    (tmp_path / "tp.json").write_text(json.dumps({"preset": "tiny", "batch_size": 8, "pairs_per_s": rates,
                                                  "command": "python bench/train_throughput.py --preset tiny"}))
    out = subprocess.run(
        [sys.executable, "bench/recipe_ablation.py", "--preset", "tiny", "--data", "scenes", "--cache",
         str(tmp_path / "cache"), "--minutes", "0.05", "--throughput", str(tmp_path / "tp.json"), "--seeds", "1",
         "--batch-size", "8", "--limit", "30", "--out", str(tmp_path / "runs"), "--json", str(tmp_path / "a.json"),
         "--variants", f"baseline,{variants}"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "a.json").read_text())
    runs = {name: v["runs"][0] for name, v in report["variants"].items()}
    # 3 s at 40 pairs/s in batches of 8 = 15 steps; masked at twice the rate, 5% tail at the baseline's: 29 (1).
    assert runs["baseline"]["steps"] == 15 and runs["+sigmoid loss"]["steps"] == 15
    assert (runs["+masking (50%, 5% unmasked tail)"]["steps"], runs["+masking (50%, 5% unmasked tail)"]["unmasked_steps"]) == (29, 1)
    cfg, meta = read_metadata(tmp_path / "runs" / "mask" / "seed0" / "model.safetensors")
    assert cfg.image_mask_ratio == 0.5 and meta["step"] == 29 and meta["train"]["unmasked_steps"] == 1
    assert read_metadata(tmp_path / "runs" / "sigmoid" / "seed0" / "model.safetensors")[0].contrastive_loss == "sigmoid"
    for r in runs.values():
        assert r["cpu_minutes"] > 0 and r["command"].startswith("limoe train --preset tiny")
        assert "scenes/held-out colour-shape pairs" in r["sets"]
        assert 0 <= r["capacity_1.0"]["mean_10way"] <= 1 and set(r["train_dropped"]) == {"image", "text"}
    assert "--set image_mask_ratio=0.5" in runs["+masking (50%, 5% unmasked tail)"]["command"]
    assert "| +masking (50%, 5% unmasked tail) |" in out.stdout and "dropless minus capacity" in out.stdout


def test_throughput_bench_prints_every_variant_and_the_breakdown(tmp_path):
    out = subprocess.run(
        [sys.executable, "bench/train_throughput.py", "--preset", "tiny", "--synthetic", "--batch-size", "8",
         "--rounds", "1", "--steps", "1", "--variants", "mask 0.5,sigmoid", "--json", str(tmp_path / "t.json")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "t.json").read_text())
    assert set(report["pairs_per_s"]) == {"baseline", "mask 0.5", "sigmoid"}
    assert all(v > 0 for v in report["pairs_per_s"].values())
    assert {"image tower forward", "text tower backward", "optimizer (clip, AdamW)"} <= set(report["breakdown_ms"])
    assert "ratio mask 0.5/baseline image-side pairs/s:" in out.stdout
