"""bench/prompt_templates.py: every candidate template set scored on validation splits, the best
one named, the JSON written. A tiny model on a scenes cache: the numbers are noise, the choice
must still be the argmax of what was measured."""

import importlib.util
import json

from servers import ROOT

spec = importlib.util.spec_from_file_location("prompt_templates", ROOT / "bench" / "prompt_templates.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_prompt_templates_scores_candidates_on_validation_and_picks_the_best(tmp_path, capsys):
    from limoe.cli import main
    from limoe.data.scenes import prepare_scenes

    cache, run = tmp_path / "cache", tmp_path / "run"
    prepare_scenes(cache, count=300)
    assert main(["train", "--preset", "tiny", "--data", "scenes", "--cache", str(cache), "--out", str(run),
                 "--steps", "2", "--batch-size", "8", "--workers", "0", "--warmup", "1"]) == 0
    out = bench.main([str(run / "model.safetensors"), "--cache", str(cache), "--limit", "40",
                      "--json", str(tmp_path / "t.json")])
    assert json.loads((tmp_path / "t.json").read_text()) == out
    assert set(out["candidates"]) == set(bench.CANDIDATES)
    for name, r in out["candidates"].items():
        assert r["templates"] == list(bench.CANDIDATES[name]) and list(r["sets"]) == ["scenes/val"]
        assert 0 <= r["mean_top1"] <= r["mean_10way"] <= 1
    best = out["candidates"][out["best"]]
    assert all((best["mean_top1"], best["mean_10way"]) >= (r["mean_top1"], r["mean_10way"])
               for r in out["candidates"].values())
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"best templates on validation: {out['best']}"
