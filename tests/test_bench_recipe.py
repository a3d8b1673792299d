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


def _verdict_like(path, steps, weight, per_seed):
    """A limoe_vs_dense.py JSON holding only the LIMoE variant: seed -> (unseen-names 10-way, other set's)."""
    sets = ["iconsets/test (unseen icon names)", "scenes/held-out colour-shape pairs"]
    runs = [{"seed": seed, "mean_top1": (a + b) / 4, "mean_10way": (a + b) / 2, "train_seconds": 1.0,
             "train_loss": 3.0 - weight, "sets": {sets[0]: {"top1_of_10": a}, sets[1]: {"top1_of_10": b}}}
            for seed, (a, b) in per_seed.items()]
    recipe = {"teacher": "all-MiniLM-L6-v2", "teacher_weight": weight} if weight else {}
    path.write_text(json.dumps({"steps": steps, "batch_size": 8, "eval_sets": sets, "recipe": recipe,
                                "variants": {"LIMoE (entropy losses)": {"runs": runs}}}))
    return path


def test_teacher_weight_report_scores_shared_seeds_by_hand(tmp_path):
    spec = importlib.util.spec_from_file_location("teacher_weight", ROOT / "bench" / "teacher_weight.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    # Weight 0 has seeds 0-2, weight 1 seeds 0-1: only seeds 0 and 1 count, so seed 2's 0.9 is left out.
    verdict = _verdict_like(tmp_path / "v.json", 100, 0, {0: (0.1, 0.5), 1: (0.3, 0.5), 2: (0.9, 0.9)})
    one = _verdict_like(tmp_path / "w1.json", 100, 1.0, {0: (0.4, 0.1), 1: (0.4, 0.4)})
    out = tmp_path / "tw.json"
    assert report.main([str(one), "--verdict", str(verdict), "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["seeds"] == [0, 1]
    w0, w1 = got["weights"]["0"], got["weights"]["1"]
    # Weight 0: unseen names (0.1 + 0.3) / 2 = 0.2, mean 10-way (0.3 + 0.4) / 2 = 0.35 ± 0.0707.
    assert w0["sets_10way"]["iconsets/test (unseen icon names)"] == pytest.approx(0.2)
    assert w0["mean_10way"] == pytest.approx(0.35) and w0["std_10way"] == pytest.approx(0.05 * 2 ** 0.5)
    # Weight 1: unseen names 0.4 (best), but mean 10-way (0.25 + 0.4) / 2 = 0.325 (below weight 0's).
    assert w1["sets_10way"]["iconsets/test (unseen icon names)"] == pytest.approx(0.4)
    assert w1["mean_10way"] == pytest.approx(0.325)
    assert got["best_weight_unseen_names"] == 1.0 and got["best_weight_mean_10way"] == 0.0
    # A run at another budget is refused, not mixed in.
    other = _verdict_like(tmp_path / "w3.json", 50, 3.0, {0: (0.5, 0.5)})
    with pytest.raises(SystemExit, match="not a teacher run"):
        report.main([str(other), "--verdict", str(verdict)])


def test_small2_report_by_hand_and_its_curve_in_an_entry(tmp_path):
    import shutil

    from limoe.runtime.model_store import read_manifest, verify

    spec = importlib.util.spec_from_file_location("small2_report", ROOT / "bench" / "small2_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    sets = ("a", "b")

    def ev(a, b):
        return {"zero_shot": {"a": {"top1_of_10": a}, "b": {"top1_of_10": b}}}

    run, curve = tmp_path / "run", tmp_path / "curve"
    run.mkdir(), curve.mkdir()
    # 4 steps of batch 60: at 2, 2, 1 and 1 pairs/s they take 0.5, 0.5, 1 and 1 minutes.
    (run / "log.jsonl").write_text("".join(json.dumps({"examples_per_s": r}) + "\n" for r in (2, 2, 1, 1)))
    (run / "eval.json").write_text(json.dumps(ev(0.6, 0.3)))
    (tmp_path / "v1.json").write_text(json.dumps(ev(0.5, 0.4)))
    (curve / "2.json").write_text(json.dumps(ev(0.2, 0.4)))
    (curve / "4.json").write_text(json.dumps(ev(0.5, 0.3)))
    entry = tmp_path / "store" / "limoe-tiny" / "1"
    shutil.copytree(ROOT / "model_store" / "limoe-tiny" / "1", entry)
    out = tmp_path / "r.json"
    assert report.main([str(run), "--v1-eval", str(tmp_path / "v1.json"), "--curve", str(curve), "--batch-size",
                        "60", "--json", str(out), "--entry", str(entry)]) == 0
    got = json.loads(out.read_text())
    assert got["step_minutes"] == 3.0 and got["median_pairs_per_s"] == 1.5
    assert [t["better"] for t in got["sets"]] == [True, False] and not got["beats_v1_everywhere"]
    assert got["v1_mean_10way"] == pytest.approx(0.45) and got["v2_mean_10way"] == pytest.approx(0.45)
    assert [(c["step"], c["step_minutes"]) for c in got["curve"]] == [(2, 1.0), (4, 3.0)]
    assert [c["mean_10way"] for c in got["curve"]] == pytest.approx([0.3, 0.4])
    # The curve joins the entry's manifest and card, and the entry still verifies (the card's checksum redone).
    assert read_manifest(entry).data["training"]["score_curve"] == got["curve"]
    verify(entry)
    card = (entry / "MODEL_CARD.md").read_text()
    assert "## Score against training minutes" in card and f"({', '.join(sets)})" in card
    assert "| 2 | 1.0 | 30.0% |" in card and "| 4 | 3.0 | 40.0% |" in card
