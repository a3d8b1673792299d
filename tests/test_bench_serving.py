"""The serving benchmarks end to end at toy scale, on the tiny test model: real `limoe serve`
processes, the aiohttp load generator, the in-process reference, and the report lines the
closing notes quote (the figures themselves are timing and are not asserted)."""

import re
import subprocess
import sys

import pytest

from servers import ROOT

MODEL = ["--model", "limoe-tiny"]
SHORT_LOAD = ["--warmup", "0.5", "--max-requests", "400"]
RATE = r"(\d+\.\d+)"


def run_bench(script: str, *args: str, load: bool = True) -> str:
    out = subprocess.run([sys.executable, f"bench/{script}", *MODEL, *(SHORT_LOAD if load else []), *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not re.search(r"\b[1-9]\d* failed", out.stdout), out.stdout  # every request answered
    return out.stdout


@pytest.mark.parametrize("fmt", ["json", "multipart"])
def test_serve_batching(fmt):
    out = run_bench("serve_batching.py", "--clients", "8", "--rounds", "2", "--duration", "0.5",
                    "--raw-seconds", "0.1", "--format", fmt)
    rates = {m[0]: float(m[1]) for m in re.findall(rf"^(batch32|batch1) *: +{RATE} images/s", out, re.M)}
    assert set(rates) == {"batch32", "batch1"} and min(rates.values()) > 0, out
    assert re.search(r"batch1 *:.*mean batch  1\.0,", out), out  # max batch 1 really ran one at a time
    assert re.search(rf"batch 1 {RATE}, batch 32 {RATE} images/s = ratio", out), out
    last = re.fullmatch(r"ratio batch32/batch1 images/s: (\d+\.\d\d)", out.strip().splitlines()[-1])
    assert last, out  # the ratio of the unrounded rates: within rounding of the printed ones
    assert abs(float(last[1]) - rates["batch32"] / rates["batch1"]) <= 0.01, out


def test_http_overhead():
    out = run_bench("http_overhead.py", "--batch", "4", "--rounds", "2", "--duration", "0.5")
    server = float(re.search(rf"^server: +{RATE} images/s", out, re.M)[1])
    raw = float(re.search(rf"^raw: +{RATE} images/s", out, re.M)[1])
    assert server > 0 and raw > 0
    last = re.fullmatch(r"ratio server/raw images/s: (\d+\.\d{3})", out.strip().splitlines()[-1])
    assert last, out  # the ratio of the unrounded rates: within rounding of the printed ones (to 0.1)
    assert (server - 0.05) / (raw + 0.05) - 0.0005 <= float(last[1]) <= (server + 0.05) / (raw - 0.05) + 0.0005, out


def test_serve_latency():
    out = run_bench("serve_latency.py", "--clients", "8", "--saturation-rounds", "1", "--saturation-seconds", "0.5",
                    "--duration", "1", "--drain", "5")
    assert re.search(r"\d+ sent, \d+ answered, 0 failed", out), out
    assert re.search(rf"^p50 {RATE} ms, p99 {RATE} ms at {RATE} req/s \(half of saturation {RATE} req/s\)$",
                     out.strip().splitlines()[-1]), out


def test_serve_memory():
    out = run_bench("serve_memory.py", "--requests", "120", "--distinct-labels", "400", "--bulk-requests", "2",
                    "--big-requests", "8", load=False)
    phases = re.findall(r"^(classify|again|bulk|big|after) *: +(\d+) ok, (\d+) refused \(429\) and retried, "
                        r"0 failed in \d+ s; RSS at the end (\d+) MiB, peak (\d+) MiB$", out, re.M)
    assert [p[0] for p in phases] == ["classify", "again", "bulk", "big", "after"], out
    assert [int(p[1]) for p in phases] == [120, 120, 2, 8, 30], out  # every request answered in the end
    assert re.search(r"^growth from the end of classify to the end of again \(120 requests later\): [+-]\d+\.\d MiB$",
                     out, re.M), out
    peak = int(re.search(r"^peak RSS (\d+) MiB \(target < 1024\)$", out, re.M)[1])
    assert peak == max(int(p[4]) for p in phases) and peak < 1024, out  # 8 x 25 MB bodies stay bounded


def test_label_scaling():
    out = run_bench("label_scaling.py", "--labels", "40", "--rounds", "2", "--requests", "3", "--cold-rounds", "1",
                    load=False)
    assert re.search(r"^raw text encoder, prompts/s by batch size: 1: \d+, .*32: \d+ \(best \d+\)$", out, re.M), out
    assert re.search(rf"^cold 40 labels \(\d+ prompts\): server {RATE} s, raw at batch \d+ {RATE} s .*; raw, 2 "
                     rf"one-thread passes at once {RATE} s$", out, re.M), out
    assert re.search(rf"^ratio cold/raw: {RATE} \(target <= 1\)$", out, re.M), out
    warm = {int(n): float(ms) for n, ms in re.findall(rf"^warm +(\d+) labels: median {RATE} ms over 6 requests",
                                                      out, re.M)}
    assert set(warm) == {2, 40}, out
    last = re.fullmatch(r"ratio 40/2 labels warm: (\d+\.\d{3})", out.strip().splitlines()[-1])
    assert last, out  # the ratio of the unrounded medians: within rounding of the printed ones
    assert abs(float(last[1]) - warm[40] / warm[2]) <= 0.01, out
