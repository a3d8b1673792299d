"""bench/clip_serving.py's serving half, on the tiny fixture CLIP (open_clip's half needs its own
environment and runs by hand): the varied JPEGs, and `serve` measuring batch 1 and 32 over real
HTTP, the server's memory, and each image's top-1 label."""

import importlib.util
import io
import shutil
import sys

import numpy as np
from PIL import Image
from servers import ROOT

sys.path.insert(0, str(ROOT / "bench"))
spec = importlib.util.spec_from_file_location("clip_serving", ROOT / "bench" / "clip_serving.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)



def test_scene_jpegs_are_varied_224_px_jpegs():
    images = bench.scene_jpegs(6)
    decoded = [np.asarray(Image.open(io.BytesIO(b))) for b in images]
    assert all(Image.open(io.BytesIO(b)).format == "JPEG" for b in images)
    assert all(d.shape == (224, 224, 3) for d in decoded)
    means = [d.reshape(-1, 3).mean(0) for d in decoded]
    assert min(np.abs(a - b).max() for i, a in enumerate(means) for b in means[i + 1:]) > 1  # no two alike
    assert bench.scene_jpegs(2, seed=3) == bench.scene_jpegs(2, seed=3)


def test_serve_measures_both_batch_sizes_memory_and_top1(tmp_path, tiny_clip):
    shutil.copytree(tiny_clip[1], tmp_path / "store" / "tiny-clip" / "1")
    images = bench.scene_jpegs(8)
    result = bench.serve(tmp_path / "store", "tiny-clip", False, [bench.multipart(im) for im in images], images,
                         seconds=1.0, threads=0)
    for batch in ("batch1", "batch32"):
        r = result[batch]
        assert r["requests"] > 0 and r["failed"] == 0 and r["images_per_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
    assert 0 < result["rss_ready_mb"] <= result["rss_peak_mb"]
    assert len(result["top1"]) == 8 and set(result["top1"]) <= set(bench.LABELS)
