"""bench/limoe_vs_dense.py: the statistics and the verdict on hand-worked numbers, then end to end
at toy scale (four variants x two seeds on the same batches, evaluated, tabulated, written as
JSON, and resumed without retraining). The toy numbers are meaningless; the plumbing is not."""

import importlib.util
import json
import os
import statistics
import subprocess
import sys

import pytest
from servers import ROOT

spec = importlib.util.spec_from_file_location("limoe_vs_dense", ROOT / "bench" / "limoe_vs_dense.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

VARIANTS = ["LIMoE (entropy losses)", "dense", "two-tower", "LIMoE (importance + load)", "LIMoE (no aux loss)"]
SLUGS = ["limoe_entropy", "dense", "two_tower", "limoe_classic", "limoe_none"]


def _variant(top1s, ten=0.5):
    return bench.summarize([{"seed": i, "mean_top1": t, "mean_10way": ten, "sets": {}} for i, t in enumerate(top1s)])


def test_run_record_averages_sets_and_routing_layers():
    results = {"zero_shot": {"a": {"top1": 0.2, "top5": 0.5, "top1_of_10": 0.6, "classes": 30, "images": 9},
                             "b": {"top1": 0.1, "top5": 0.3, "top1_of_10": 0.3, "classes": 5, "images": 9,
                                   "top1_in_group": 0.4}},
               "routing": {"layers": [
                   {"dropped_rate": {"image": 0.1, "text": 0.0},
                    "experts": {"image": 2, "text": 1, "shared": 1, "unused": 0}},
                   {"dropped_rate": {"image": 0.3, "text": 0.2},
                    "experts": {"image": 1, "text": 0, "shared": 3, "unused": 0}},
               ]}}
    r = bench.run_record(7, results, 12.5)
    assert r["seed"] == 7 and r["train_seconds"] == 12.5
    assert r["mean_top1"] == pytest.approx(0.15) and r["mean_10way"] == pytest.approx(0.45)  # (0.2+0.1)/2, (0.6+0.3)/2
    assert r["sets"] == {"a": {"top1": 0.2, "top1_of_10": 0.6},
                         "b": {"top1": 0.1, "top1_of_10": 0.3, "top1_in_group": 0.4}}
    assert r["dropped_rate"] == pytest.approx({"image": 0.2, "text": 0.1})  # per modality, mean over the 2 layers
    assert r["experts"] == {"image": 3, "text": 1, "shared": 4, "unused": 0}  # summed over layers
    dense = bench.run_record(0, {"zero_shot": results["zero_shot"], "retrieval": {}}, None)
    assert "experts" not in dense and "dropped_rate" not in dense


def test_summary_is_mean_and_sample_std():
    v = _variant([0.12, 0.14, 0.16], ten=0.5)
    # mean 0.14; deviations -0.02, 0, 0.02: sample variance (0.0004 + 0 + 0.0004) / 2 = 0.0004, std 0.02
    assert v["mean_top1"] == pytest.approx(0.14) and v["std_top1"] == pytest.approx(0.02)
    assert v["mean_10way"] == pytest.approx(0.5) and v["std_10way"] == 0
    assert _variant([0.3])["std_top1"] is None  # one seed has no deviation


def test_verdict_says_what_the_numbers_say():
    limoe = _variant([0.12, 0.14, 0.16])  # 14.0% ± 2.0%
    # dense 10%, std 0: ahead by 4 points > max(2, 0)
    assert bench.verdict({"LIMoE (entropy losses)": limoe, "dense": _variant([0.10, 0.10, 0.10])}) == (
        "verdict: LIMoE beats dense by 4.00 points mean top-1, more than a standard deviation (2.00) "
        "(mean top-1 LIMoE 14.0% ± 2.0%, dense 10.0% ± 0.0%; 10-way +0.00 points; 3 and 3 seeds)")
    # dense 13% ± 1%: ahead by 1 point, within the larger std (2)
    assert bench.verdict({"LIMoE (entropy losses)": limoe, "dense": _variant([0.12, 0.13, 0.14])}).startswith(
        "verdict: LIMoE does not beat dense by more than a standard deviation: +1.00 points mean top-1, "
        "standard deviation 2.00 (")
    # dense 20% ± 0: behind by 6 points
    assert bench.verdict({"LIMoE (entropy losses)": limoe, "dense": _variant([0.20, 0.20, 0.20])}).startswith(
        "verdict: LIMoE does not beat dense: dense is ahead by 6.00 points mean top-1, more than a standard "
        "deviation (2.00) (")
    assert bench.verdict({"LIMoE (entropy losses)": _variant([0.3]), "dense": _variant([0.1])}).startswith(
        "verdict: none from one seed: LIMoE minus dense is +20.00 points mean top-1 (")
    assert bench.verdict({"dense": limoe}).startswith("verdict: none (needs both")
    # the same rule against the two-tower baseline
    assert bench.verdict({"LIMoE (entropy losses)": limoe, "two-tower": _variant([0.10, 0.10, 0.10])},
                         "two-tower").startswith("verdict: LIMoE beats two-tower by 4.00 points mean top-1")
    assert bench.verdict({"LIMoE (entropy losses)": limoe, "dense": limoe}, "two-tower").startswith(
        "verdict: none (needs both")


def _run(tmp_path, *extra, **env_vars):
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, **env_vars, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, "bench/limoe_vs_dense.py", "--preset", "tiny", "--set", "width=48", "--data", "scenes",
         "--cache", str(tmp_path / "cache"), "--seeds", "2", "--steps", "3", "--batch-size", "8", "--warmup", "1",
         "--checkpoint-every", "2", "--limit", "40", "--out", str(tmp_path / "runs"),
         "--json", str(tmp_path / "verdict.json"), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


def test_comparison_trains_every_variant_and_seed_writes_json_and_resumes(tmp_path):
    from limoe.data.scenes import prepare_scenes
    from limoe.model.checkpoint import read_metadata

    prepare_scenes(tmp_path / "cache", count=120)
    out = _run(tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    report = json.loads((tmp_path / "verdict.json").read_text())

    # The table: every variant in order; dense has no routing columns.
    rows = [line for line in lines if line.startswith("| ")]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == VARIANTS
    assert rows[2].endswith("| - | - |") and rows[3].endswith("| - | - |")  # dense, two-tower

    # The recorded setup: preset, the override, the full config, data and budget.
    assert report["preset"] == "tiny" and report["overrides"] == {"width": 48} and report["config"]["width"] == 48
    assert report["config"]["num_experts"] == 4  # the rest is the tiny preset's
    assert report["variant_changes"]["dense"] == {"moe_layers": "none", "aux_loss": "none"}
    assert report["variant_changes"]["LIMoE (entropy losses)"] == {}
    assert report["variant_changes"]["two-tower"] == {"arch": "two_tower", "moe_layers": "none", "aux_loss": "none"}
    assert (report["data"], report["sources"], report["seeds"]) == ("scenes", {"scenes": report["examples"]}, [0, 1])
    assert (report["steps"], report["batch_size"], report["eval_limit"]) == (3, 8, 40)
    assert report["eval_sets"] == ["scenes/held-out colour-shape pairs"]
    assert report["wall_seconds"] > 0 and report["train_seconds"] > 0

    # Per variant: two runs (seeds 0, 1) and mean / std computed from them.
    assert list(report["variants"]) == VARIANTS
    for name, slug in zip(VARIANTS, SLUGS):
        v = report["variants"][name]
        assert [r["seed"] for r in v["runs"]] == [0, 1]
        for r in v["runs"]:
            sets = r["sets"].values()
            assert r["mean_top1"] == pytest.approx(statistics.fmean(s["top1"] for s in sets))
            assert r["mean_10way"] == pytest.approx(statistics.fmean(s["top1_of_10"] for s in sets))
            assert ("experts" in r and "dropped_rate" in r) == (name not in ("dense", "two-tower"))
            cfg, extra = read_metadata(tmp_path / "runs" / slug / f"seed{r['seed']}" / "model.safetensors")
            assert extra["train"]["seed"] == r["seed"] and extra["step"] == 3 and cfg.width == 48
            assert cfg.arch == ("two_tower" if name == "two-tower" else "one_tower")
            assert r["train_loss"] > 0  # the mean contrastive loss of its last logged steps
        for key in ("top1", "10way"):
            values = [r[f"mean_{key}"] for r in v["runs"]]
            assert v[f"mean_{key}"] == pytest.approx(statistics.fmean(values))
            assert v[f"std_{key}"] == pytest.approx(statistics.stdev(values))

    # The last lines are the verdicts, computed from those numbers: two-tower, then dense.
    assert lines[-1] == report["verdict"] == bench.verdict(report["variants"])
    assert lines[-2] == report["verdict_two_tower"] == bench.verdict(report["variants"], "two-tower")

    # Again, after losing one run's evaluation: nothing is retrained, that one run is re-evaluated.
    ckpts = sorted((tmp_path / "runs").glob("*/seed*/model.safetensors"))
    assert len(ckpts) == 10
    stamps = [c.stat().st_mtime_ns for c in ckpts]
    (tmp_path / "runs" / "dense" / "seed1" / "eval.json").unlink()
    again = _run(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("already trained") == 10 and [c.stat().st_mtime_ns for c in ckpts] == stamps
    second = json.loads((tmp_path / "verdict.json").read_text())
    assert second["variants"] == report["variants"] and second["verdict"] == report["verdict"]

    # A run directory of other settings is refused, not silently mixed in.
    other = _run(tmp_path, "--lr", "0.01")
    assert other.returncode != 0 and "holds a run with other settings" in other.stderr


def test_the_verdict_trains_with_the_teachers_default_weight(tmp_path):
    """`--teacher` without `--teacher-weight` weighs the teacher as `limoe train` does (a verdict
    once ran at 1 while the recipe's weight is 30)."""
    from limoe.data.scenes import prepare_scenes
    from limoe.model.checkpoint import read_metadata
    from limoe.train.trainer import TrainConfig

    prepare_scenes(tmp_path / "cache", count=60)
    out = _run(tmp_path, "--seeds", "1", "--variants", "dense", "--teacher", "all-MiniLM-L6-v2",
               LIMOE_TEACHER_CACHE=str(tmp_path / "teacher"))
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads((tmp_path / "verdict.json").read_text())
    assert report["recipe"]["teacher"] == "all-MiniLM-L6-v2"
    assert report["recipe"]["teacher_weight"] == TrainConfig.teacher_weight == 30.0
    extra = read_metadata(tmp_path / "runs" / "dense" / "seed0" / "model.safetensors")[1]
    assert (extra["train"]["teacher"], extra["train"]["teacher_weight"]) == ("all-MiniLM-L6-v2", 30.0)
