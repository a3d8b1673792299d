"""bench/moe_inference.py end to end on the tiny preset: every graph exported, all of them
batch-independent, and the report's lines (figures are not asserted: timings vary)."""

import re
import subprocess
import sys

from servers import ROOT


def test_moe_inference_benchmark_reports_every_graph():
    out = subprocess.run([sys.executable, "bench/moe_inference.py", "--preset", "tiny", "--rounds", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    for graph in ("dropless", "dropless-fused", "capacity", "dense"):
        for precision in ("fp32", "int8"):
            assert re.search(rf"^{graph} {precision} +\d+\.\d +\d+\.\d$", text, re.M), text
    diffs = re.search(r"batch of 5 vs each alone, max \|diff\| over all outputs: (.*)$", text, re.M)[1]
    assert all(float(d.rsplit(" ", 1)[1]) <= 1e-4 for d in diffs.split(", ")), diffs
    assert "dropless drops none" in text
    assert re.search(r"2 pass\(es\) at once of \d+ thread\(s\) each", text), text  # as the server runs them
    assert re.search(r"ratio dropless/capacity images/s at batch 32: \d+\.\d{3}\Z", text.strip()), text
