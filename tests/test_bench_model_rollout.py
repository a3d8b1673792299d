"""bench/model_rollout.py --quick: the rollout, the corrupt version, the unload and the fairness
parts against real `limoe serve` processes, asserting what the issue asks of each (not timings)."""

import json
import subprocess
import sys

from servers import ROOT


def test_the_rollout_benchmark_fails_nothing(tmp_path):
    out = tmp_path / "rollout.json"
    run = subprocess.run([sys.executable, "bench/model_rollout.py", "--quick", "--json", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    r = json.loads(out.read_text())
    rollout = r["rollout"]
    assert [e["to"] for e in rollout["switches"]] == ["2", "1", "2"]
    assert all(e["status"] == 200 and e["answer"]["version"] == e["to"] for e in rollout["switches"])
    assert rollout["non_200"] == 0 and set(rollout["answers"]) == {"200"}
    assert rollout["versions_answering"] == ["1", "2"]
    assert rollout["rss_peak_mb"] >= rollout["rss_ready_mb"] > 0
    corrupt = r["corrupt"]
    assert corrupt["load_status"] == 400 and corrupt["load_answer"]["code"] == "model_load_failed"
    assert corrupt["non_200"] == 0 and corrupt["versions_answering"] == ["2"]
    unload = r["unload"]
    assert unload["unload_status"] == 200 and unload["before_all_200"] and unload["after_all_404"]
    assert r["fairness"]["non_200"] == 0 and r["fairness"]["tiny_answers_per_s_beside_flood"] > 0
    for line in ("rollout:", "corrupt version:", "unload under load:", "fairness:"):
        assert line in run.stdout
