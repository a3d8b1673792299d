"""`limoe classify --ray`: the Ray Data pipeline on a local Ray instance (2 CPUs) gives the rows of
the single-process run, for image files, a CSV index (with a missing file and a URL) and a
WebDataset shard; --resume on its output folder classifies only what it lacks."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from limoe.bulk.classify import read_rows, run
from limoe.cli import main

MODEL = "limoe-tiny"
LABELS = ["cat", "dog", "red circle", "blue square"]


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[str]:
    """200 small images and 2 bad files in a folder, a CSV index naming 2 of them, a missing file and
    a URL, and a WebDataset shard with 3 image members (one corrupt)."""
    d = tmp_path_factory.mktemp("ray")
    images = d / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(200):
        Image.fromarray(rng.integers(0, 256, (8 + i % 5, 8, 3), dtype=np.uint8)).save(images / f"{i:03d}.png")
    (images / "empty.png").write_bytes(b"")
    (images / "text.jpg").write_bytes(b"not an image")
    (d / "index.csv").write_text("image\nimages/000.png\nimages/007.png\nmissing.png\nhttps://example.com/a.png\n")
    with tarfile.open(d / "shard.tar", "w") as tar:
        for key, data in (("a", (images / "001.png").read_bytes()), ("b", b"corrupt"),
                          ("c", (images / "002.png").read_bytes())):
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return [str(images), str(d / "index.csv"), str(d / "shard.tar")]


def by_path(rows) -> dict[str, dict]:
    rows = list(rows)
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "a path written twice"
    return {r["path"]: r for r in rows}


def assert_same_rows(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert got.keys() == want.keys()
    for path, w in want.items():
        g = got[path]
        if "error" in w:
            assert (g["error"], g["code"]) == (w["error"], w["code"]), path
        else:
            assert [x["label"] for x in g["labels"]] == [x["label"] for x in w["labels"]], path
            assert np.allclose([x["score"] for x in g["labels"]], [x["score"] for x in w["labels"]], rtol=0,
                               atol=1e-5), path


def test_ray_pipeline_matches_the_single_process_run(local_ray, inputs, tmp_path, capsys):
    single = tmp_path / "single.jsonl"
    run(inputs, single, LABELS, model=MODEL, top_k=None, progress=False)
    want = by_path(read_rows(single))
    assert len(want) == 202 + 4 + 3 - 2  # 2 index rows repeat folder images: classified once
    assert sum("error" in r for r in want.values()) == 5  # empty, text, missing, URL, corrupt member

    out = tmp_path / "ray.parquet"
    assert main(["classify", *inputs, "--labels", ",".join(LABELS), "--model", MODEL, "--top-k", "0",
                 "--out", str(out), "--ray", "--batch-size", "32", "--no-progress"]) == 0
    assert "207 images (202 classified, 5 errors), 2 skipped" in capsys.readouterr().out
    assert out.is_dir()
    assert_same_rows(by_path(read_rows(out)), want)


def test_ray_resume_writes_only_what_is_missing(local_ray, inputs, tmp_path):
    want = by_path(read_rows(_single(inputs, tmp_path)))
    out = tmp_path / "ray.jsonl"
    assert main(["classify", inputs[2], "--labels", ",".join(LABELS), "--model", MODEL, "--top-k", "0",
                 "--out", str(out), "--ray", "--no-progress"]) == 0
    assert len(list(read_rows(out))) == 3
    assert main(["classify", *inputs, "--labels", ",".join(LABELS), "--model", MODEL, "--top-k", "0",
                 "--out", str(out), "--ray", "--no-progress"]) == 2  # holds results: needs --resume
    assert main(["classify", *inputs, "--labels", ",".join(LABELS), "--model", MODEL, "--top-k", "0",
                 "--out", str(out), "--ray", "--resume", "--no-progress"]) == 0
    assert_same_rows(by_path(read_rows(out)), want)
    first = json.loads(next(f for f in sorted(out.iterdir())).read_text().splitlines()[0])
    assert set(first) in ({"path", "labels"}, {"path", "error", "code"})  # the single-process run's JSON lines


def _single(inputs: list[str], tmp_path: Path) -> Path:
    out = tmp_path / "single.jsonl"
    run(inputs, out, LABELS, model=MODEL, top_k=None, progress=False)
    return out
