"""bench/bulk.py end to end at toy scale on the tiny test model: the raw encoder, `limoe classify`,
its Ray path (when Ray is installed: a local instance, about 15 s of the test), a batch job and the
bulk endpoint of a real `limoe serve`, and the report lines the closing notes quote. The figures
themselves are timing and are not asserted; the script fails if any path misses an image."""

import importlib.util
import re
import subprocess
import sys

from servers import ROOT

RATE = r"(\d+\.\d)"
RATIO = r"(\d+\.\d{3})"
HAS_RAY = importlib.util.find_spec("ray") is not None


def within_rounding(ratio: float, num: float, den: float) -> bool:
    """`ratio`, printed to 3 decimals, is num/den of the unrounded rates printed to 1 decimal."""
    return (num - 0.05) / (den + 0.05) - 0.0005 <= ratio <= (num + 0.05) / (den - 0.05) + 0.0005


def test_bulk_benchmark_reports_every_path_and_the_two_ratios():
    # 24 images in batches of 8: three encoder passes, and the Ray steady-state estimate has 16
    # images between its two runs. One round: the ratios are those of the printed rates.
    out = subprocess.run([sys.executable, "bench/bulk.py", "--model", "limoe-tiny", "--images", "24",
                          "--batch-size", "8", "--rounds", "1", "--bulk-clients", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    rows = dict(re.findall(rf"^(raw encoder|raw, N passes|classify|classify --ray|batch job|bulk endpoint) *: "
                           rf"+({RATE[1:-1]}|-) images/s", text, re.M))
    assert list(rows) == ["raw encoder", "raw, N passes", "classify", "classify --ray", "batch job", "bulk endpoint"], text
    assert re.search(r"^raw, N passes *: .*; the same, 2 batches at once on the classifier's encoders", text, re.M), text
    assert re.search(r"^batch job *: .*; 24 lines of 1 image\(s\), create -> completed", text, re.M), text
    assert re.search(r"^bulk endpoint *: .*; 1 request\(s\) of up to 256 images, 1 concurrent client\(s\)$",
                     text, re.M), text
    rates = {name: float(v) for name, v in rows.items() if v != "-"}
    assert all(v > 0 for v in rates.values()), text
    if HAS_RAY:
        assert "classify --ray" in rates, text
        assert re.search(rf"^ray: start-up \(ray\.init\) \d+\.\d\d s, first run of 8 images \d+\.\d\d s, later runs "
                         rf"of 8 images \d+\.\d\d s; steady state ({RATE[1:-1]} images/s|n/a .*)$", text, re.M), text
    else:
        assert re.search(r"^classify --ray *: +- images/s; skipped: Ray is not installed", text, re.M), text

    *_, passes_line, classify_line, job_line = text.strip().splitlines()
    passes = re.fullmatch(rf"ratio classify/raw, 2 passes at once, images/s: {RATIO} \(for comparison\)", passes_line)
    classify = re.fullmatch(rf"ratio classify/raw images/s: {RATIO} \(target >= 0\.9\)", classify_line)
    job = re.fullmatch(rf"ratio batch job/bulk endpoint images/s: {RATIO} \(target >= 0\.8\)", job_line)
    assert passes and classify and job, text
    assert within_rounding(float(classify[1]), rates["classify"], rates["raw encoder"]), text
    assert within_rounding(float(passes[1]), rates["classify"], rates["raw, N passes"]), text
    assert within_rounding(float(job[1]), rates["batch job"], rates["bulk endpoint"]), text
