"""`limoe classify`, the offline classifier: bad files become error rows, scores equal a real
server's, --resume finishes a cut-off output, every input kind (folder, CSV/JSONL index,
WebDataset shards) and output format (JSONL, parquet), bounded memory, and no torch on the ONNX path.
All on the tiny placeholder model and a few dozen tiny images."""

import base64
import io
import json
import tarfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from servers import serve_process
from tools import run_without_torch

from limoe.bulk.classify import (
    ClassifyError,
    Item,
    ZeroShot,
    classify_items,
    iter_items,
    load_entry,
    open_encoders,
    parse_labels,
    read_rows,
    run,
)
from limoe.cli import main
from limoe.runtime.zeroshot import zero_shot_scores

ROOT = Path(__file__).resolve().parent.parent
MODEL = "limoe-tiny"
LABELS = ["cat", "dog", "red circle", "blue square"]
BAD = {"empty.png": "invalid_image", "text.png": "invalid_image", "trunc.png": "invalid_image"}


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "PNG")
    return buf.getvalue()


def image_files() -> dict[str, bytes]:
    """17 good images in the modes the server converts (RGBA, L, P, 16-bit, CMYK, animated) and 3 bad."""
    rng = np.random.default_rng(0)
    files = {f"rgb{i:02d}.png": png(rng.integers(0, 256, (12 + i, 20, 3), dtype=np.uint8)) for i in range(10)}
    files["rgba.png"] = png(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8))
    files["grey.png"] = png(rng.integers(0, 256, (16, 24), dtype=np.uint8))
    files["grey16.png"] = png(rng.integers(0, 65536, (20, 16), dtype=np.uint16))  # mode I;16
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)).convert("P").save(buf, "PNG")
    files["palette.png"] = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("CMYK").save(buf, "JPEG")
    files["cmyk.jpg"] = buf.getvalue()
    frames = [Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(2)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    files["animated.gif"] = buf.getvalue()
    files["sub/nested.png"] = png(rng.integers(0, 256, (30, 10, 3), dtype=np.uint8))
    files["empty.png"] = b""
    files["text.png"] = b"not an image at all"
    files["trunc.png"] = files["rgb00.png"][:60]
    return files


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    for name, data in image_files().items():
        (d / name).parent.mkdir(exist_ok=True)
        (d / name).write_bytes(data)
    (d / "notes.txt").write_text("not an image extension: not listed")
    (d / ".hidden.png").write_bytes(b"hidden: not listed")
    return d


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> dict[str, dict]:
    """The folder classified once, every label's score: path -> row."""
    out = tmp_path_factory.mktemp("ref") / "all.jsonl"
    run([str(folder)], out, LABELS, model=MODEL, top_k=None, progress=False)
    return {r["path"]: r for r in read_rows(out)}


def scores(row: dict) -> dict[str, float]:
    return {x["label"]: x["score"] for x in row["labels"]}


def assert_same(a: dict, b: dict, tol: float = 1e-5) -> None:
    """Two rows for the same image: the same error, or the same labels with scores within `tol`."""
    assert ("error" in a) == ("error" in b), (a, b)
    if "error" in a:
        assert (a["error"], a["code"]) == (b["error"], b["code"])
    else:
        sa, sb = scores(a), scores(b)
        assert sa.keys() == sb.keys()
        assert max(abs(sa[k] - sb[k]) for k in sa) <= tol, (a, b)


def test_zero_shot_scores_by_hand():
    """The scoring the server and the classifier share. Image embedding (1, 0); classes (1, 0) and
    (0, 1): cosines 1 and 0; logit_scale ln 3 -> logits ln 3, 0 -> softmax 3/4, 1/4."""
    classes = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)  # (P, C)
    one = zero_shot_scores(np.array([1.0, 0.0], np.float32), classes, np.log(3))
    assert one == pytest.approx([0.75, 0.25], abs=1e-7)
    batch = zero_shot_scores(np.array([[1.0, 0.0], [0.6, 0.8]], np.float32), classes, np.log(3))  # (N, P)
    assert batch[0] == pytest.approx(one) and batch[1] == pytest.approx([3 ** 0.6 / (3 ** 0.6 + 3 ** 0.8),
                                                                         3 ** 0.8 / (3 ** 0.6 + 3 ** 0.8)])


def test_a_folder_with_bad_files_completes_with_error_rows(folder, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert main(["classify", str(folder), "--labels", ",".join(LABELS), "--model", MODEL, "--top-k", "2",
                 "--out", str(out), "--batch-size", "4", "--no-progress"]) == 0
    assert "20 images (17 classified, 3 errors), 0 skipped" in capsys.readouterr().out
    lines = out.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    expected = sorted(str(folder / n) for n in image_files() if "/" not in n) + [str(folder / "sub/nested.png")]
    assert [r["path"] for r in rows] == expected  # sorted, recursive; notes.txt and hidden files not listed
    for r in rows:
        name = Path(r["path"]).name
        if name in BAD:
            assert r["code"] == BAD[name] and r["error"] and "labels" not in r
        else:
            assert set(r) == {"path", "labels"} and len(r["labels"]) == 2
            assert r["labels"][0]["score"] >= r["labels"][1]["score"]
    by_name = {Path(r["path"]).name: r for r in rows}
    assert by_name["empty.png"]["error"] == "the image is empty (0 bytes)"  # the server's message


def test_all_scores_sum_to_one(reference):
    good = [r for r in reference.values() if "labels" in r]
    assert len(good) == 17
    for r in good:
        assert [x["label"] for x in r["labels"]] != [] and set(scores(r)) == set(LABELS)
        assert sum(scores(r).values()) == pytest.approx(1.0, abs=1e-5)


def test_scores_match_a_real_server(folder, reference):
    """The same images and labels through `limoe serve` (ONNX, the same store entry): the same
    scores to 1e-5, and the same error for a bad file."""
    names = ["rgb00.png", "rgba.png", "grey.png", "grey16.png", "palette.png", "cmyk.jpg", "animated.gif",
             "sub/nested.png", "trunc.png", "text.png"]
    images = [base64.b64encode((folder / n).read_bytes()).decode() for n in names]
    with serve_process(model=MODEL, warmup="false") as (base, _):
        r = httpx.post(f"{base}/v1/classify", json={"images": images, "labels": LABELS}, timeout=60)
    assert r.status_code == 200, r.text
    for name, result in zip(names, r.json()["results"]):
        ours = reference[str(folder / name)]
        if "error" in ours:
            assert (result["code"], result["error"]) == (ours["code"], ours["error"])
        else:
            assert_same(ours, {"labels": result["labels"]})
            assert [x["label"] for x in ours["labels"]] == [x["label"] for x in result["labels"]]


def test_torchscript_backend_scores_like_onnx(folder, reference, tmp_path):
    out = tmp_path / "ts.jsonl"
    run([str(folder / "rgb01.png"), str(folder / "cmyk.jpg")], out, LABELS, model=MODEL, backend="torchscript",
        device="cpu", top_k=None, progress=False)
    for row in read_rows(out):
        assert_same(row, reference[row["path"]], tol=1e-4)  # another runtime: float32 rounding differs


def test_resume_after_a_cut_off_output(folder, reference, tmp_path):
    out = tmp_path / "out.jsonl"
    full = [json.dumps(reference[p]) + "\n" for p in sorted(reference)]
    out.write_text("".join(full[:7]) + full[7][: len(full[7]) // 2])  # a run killed while writing row 8
    with pytest.raises(ClassifyError, match="--resume"):
        run([str(folder)], out, LABELS, model=MODEL, top_k=None, progress=False)

    summary = run([str(folder)], out, LABELS, model=MODEL, top_k=None, resume=True, progress=False)
    assert (summary.images, summary.skipped) == (13, 7)  # only the rest
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == 20 and set(paths) == set(reference)
    for r in rows:
        assert_same(r, reference[r["path"]])

    again = run([str(folder)], out, LABELS, model=MODEL, top_k=None, resume=True, progress=False)
    assert (again.images, again.skipped) == (0, 20)
    retried = run([str(folder)], out, LABELS, model=MODEL, top_k=None, resume=True, retry_errors=True,
                  progress=False)
    assert (retried.images, retried.errors, retried.skipped) == (3, 3, 17)
    paths = [json.loads(line)["path"] for line in out.read_text().splitlines()]
    assert len(paths) == len(set(paths)) == 20


def test_csv_and_jsonl_indexes(folder, reference, tmp_path):
    (folder / "index.csv").write_text("filepath,title\nrgb02.png,a\nsub/nested.png,b\nmissing.png,c\n"
                                      "https://example.com/x.png,d\n")
    (tmp_path / "index.jsonl").write_text(json.dumps({"image": str(folder / "cmyk.jpg")}) + "\n"
                                          + json.dumps({"caption": "no image"}) + "\n")
    out = tmp_path / "idx.jsonl"
    summary = run([str(folder / "index.csv"), str(tmp_path / "index.jsonl")], out, LABELS, model=MODEL, top_k=None,
                  progress=False)
    (folder / "index.csv").unlink()  # the folder fixture is shared
    rows = list(read_rows(out))
    assert [r["path"] for r in rows] == [str(folder / "rgb02.png"), str(folder / "sub/nested.png"),
                                         str(folder / "missing.png"), "https://example.com/x.png",
                                         str(folder / "cmyk.jpg"), f"{tmp_path / 'index.jsonl'}:2"]
    assert [r.get("code") for r in rows] == [None, None, "unreadable", "invalid_row", None, "invalid_row"]
    for r in rows[:2] + rows[4:5]:
        assert_same(r, reference[r["path"]])
    assert (summary.images, summary.errors) == (6, 3)


def test_webdataset_shards(folder, reference, tmp_path):
    """A plain and a gzipped shard, named by WebDataset's brace pattern: one row per image member
    (captions and .cls members ignored), keyed <shard>::<member>."""
    members = [("s0", "rgb03.png"), ("s1", "grey.png"), ("s2", "trunc.png"), ("s3", "animated.gif")]
    for n, mode in ((0, "w"), (1, "w:gz")):
        with tarfile.open(tmp_path / f"shard-{n}.tar", mode) as tar:
            for key, name in members[2 * n: 2 * n + 2]:
                for member, data in ((f"{key}.{name.split('.')[1]}", (folder / name).read_bytes()),
                                     (f"{key}.txt", b"a caption"), (f"{key}.cls", b"3")):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "wds.jsonl"
    run([f"{tmp_path}/shard-{{0..1}}.tar"], out, LABELS, model=MODEL, top_k=None, progress=False)
    rows = list(read_rows(out))
    expected = [f"{tmp_path}/shard-{n}.tar::{key}.{name.split('.')[1]}" for n in (0, 1)
                for key, name in members[2 * n: 2 * n + 2]]
    assert [r["path"] for r in rows] == expected
    for r, (_, name) in zip(rows, members):
        assert_same(r, reference[str(folder / name)])


def test_parquet_output_holds_the_same_rows(folder, reference, tmp_path):
    out = tmp_path / "out.parquet"
    summary = run([str(folder)], out, LABELS, model=MODEL, top_k=None, progress=False)
    rows = list(read_rows(out))
    assert summary.images == len(rows) == 20 and not (tmp_path / "out.parquet.partial").exists()
    for r in rows:
        assert_same(r, reference[r["path"]], tol=0)  # float32 in parquet: exactly the JSON's value
    (folder / "rgb00.png").rename(folder / "rgb00.keep")  # resume: the parquet file keeps its rows
    try:
        run([str(folder)], out, LABELS, model=MODEL, top_k=None, resume=True, progress=False)
    finally:
        (folder / "rgb00.keep").rename(folder / "rgb00.png")
    assert sorted(r["path"] for r in read_rows(out)) == sorted(reference)


def test_bounded_memory(folder):
    """Decoded images wait in a window of 2 x batch_size futures, plus the batch being filled and
    the `passes` batches being classified: at most (3 + passes) x batch_size inputs are taken
    ahead of what is written, however long the input."""
    zs = ZeroShot(open_encoders(load_entry(MODEL)), LABELS)
    data = (folder / "rgb05.png").read_bytes()
    taken, ahead, written = [0], [], [0]

    def items():
        for i in range(200):
            taken[0] += 1
            yield Item(f"img{i}", data)

    def write(rows):
        ahead.append(taken[0] - written[0])
        written[0] += len(rows)

    summary = classify_items(items(), zs, write, batch_size=8, workers=2, progress=False, passes=2)
    assert summary.images == written[0] == 200 and max(ahead) <= (3 + 2) * 8


def test_one_pass_at_a_time_writes_the_same_rows_in_the_same_order(folder, reference, tmp_path):
    """The reference ran 2 passes at once (`run`'s default); one pass at a time, over batches of 3
    so that several batches are in flight with 2, gives the same rows in input order."""
    zs = ZeroShot(open_encoders(load_entry(MODEL)), LABELS)
    rows: dict[int, list[dict]] = {}
    for passes in (1, 2):
        rows[passes] = []
        classify_items(iter_items([str(folder)]), zs, rows[passes].extend, top_k=None, batch_size=3,
                       progress=False, passes=passes)
    assert [r["path"] for r in rows[1]] == [r["path"] for r in rows[2]] == list(reference)
    for a, b in zip(rows[1], rows[2]):
        assert_same(a, b, tol=0)
        assert_same(a, reference[a["path"]])


def test_threads_per_pass_shares_the_cores_out(monkeypatch, folder, tmp_path):
    import limoe.runtime.encoders as encoders

    monkeypatch.setattr(encoders, "cpu_cores", lambda: 8)
    assert [encoders.threads_per_pass(p) for p in (1, 2, 3, 8, 16)] == [0, 4, 2, 1, 1]  # 0: the runtime's default
    assert encoders.threads_per_pass(2, threads=3) == 3  # asked for: as asked
    with pytest.raises(ClassifyError, match="--passes"):
        run([str(folder)], tmp_path / "o.jsonl", LABELS, model=MODEL, passes=0)


def test_usage_errors(folder, tmp_path, capsys):
    with pytest.raises(ClassifyError, match="distinct"):
        parse_labels("cat, dog,cat")
    assert parse_labels(labels_file=_write(tmp_path / "l.txt", "cat\n\n red circle \n")) == ["cat", "red circle"]
    assert main(["classify", str(tmp_path / "nothing"), "--labels", "a", "--model", MODEL,
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["classify", str(folder), "--labels", "a", "--model", MODEL, "--out", str(tmp_path / "o.csv")]) == 2


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


NO_TORCH = """
    import sys
    from limoe.cli import main

    rc = main(["classify", sys.argv[1], "--labels", "cat,dog", "--model", "limoe-tiny", "--out", sys.argv[2],
               "--no-progress"])
    print(rc, "torch" in sys.modules, "ray" in sys.modules)
"""


def test_the_onnx_path_imports_no_torch(folder, tmp_path):
    out = run_without_torch(NO_TORCH, str(folder), str(tmp_path / "o.jsonl"), cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "0 False False"
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 20
