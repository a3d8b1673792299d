"""bench/limoe_vs_dense.py end to end at toy scale: four variants trained on the same batches,
evaluated, and tabulated (the numbers are meaningless at 3 steps; the plumbing is not)."""

import json
import subprocess
import sys

from servers import ROOT


def test_comparison_trains_every_variant_and_prints_the_table(tmp_path):
    from limoe.data.scenes import prepare_scenes

    prepare_scenes(tmp_path / "cache", count=120)
    out = subprocess.run(
        [sys.executable, "bench/limoe_vs_dense.py", "--preset", "tiny", "--data", "scenes", "--cache",
         str(tmp_path / "cache"), "--steps", "3", "--batch-size", "8", "--warmup", "1", "--limit", "40",
         "--out", str(tmp_path / "runs")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0][2:] for r in rows[1:]] == ["LIMoE (entropy losses)", "dense",
                                                          "LIMoE (importance + load)", "LIMoE (no aux loss)"]
    assert "| dense |" in out.stdout and rows[2].endswith("| - | - |")  # dense has no routing
    assert "ratio LIMoE/dense mean zero-shot top-1:" in out.stdout
    for slug in ("limoe_entropy", "dense", "limoe_classic", "limoe_none"):
        results = json.loads((tmp_path / "runs" / slug / "eval.json").read_text())
        assert "scenes/held-out colour-shape pairs" in results["zero_shot"]
        assert ("routing" in results) == (slug != "dense")
