"""The store refuses damaged, foreign or unsafe entries with a message naming the problem."""

import json
import shutil
from pathlib import Path

import pytest

from limoe.runtime.model_store import (
    FileRecord,
    ModelStore,
    ModelStoreError,
    MoEInfo,
    check_identifier,
    file_record,
    read_manifest,
    verify,
)
from limoe.runtime.preprocess import PreprocessConfig

SHIPPED = Path(__file__).resolve().parent.parent / "model_store"


@pytest.fixture
def store(exported, tmp_path):
    """A private copy of the exported entry as <tmp>/store/tiny/1, safe to damage."""
    _, _, entry, _ = exported
    shutil.copytree(entry, tmp_path / "store" / "tiny" / "1")
    return ModelStore(tmp_path / "store")


def _entry(store):
    return store.root / "tiny" / "1"


def test_a_sound_entry_verifies(store):
    manifest = store.load("tiny")
    assert manifest.name == "tiny" and manifest.version == "1"
    assert manifest.file("image_onnx").name == "image_encoder.onnx"
    assert store.names() == ["tiny"] and store.versions("tiny") == ["1"]


def test_missing_file(store):
    (_entry(store) / "text_encoder.onnx").unlink()
    with pytest.raises(ModelStoreError, match=r"text_encoder\.onnx: missing"):
        store.load("tiny")


def test_wrong_size(store):
    with open(_entry(store) / "tokenizer.json", "ab") as f:
        f.write(b" ")
    with pytest.raises(ModelStoreError, match=r"tokenizer\.json: wrong size"):
        store.load("tiny")


def test_wrong_hash_same_size(store):
    path = _entry(store) / "image_encoder.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte deep inside the weights
    path.write_bytes(bytes(data))
    with pytest.raises(ModelStoreError, match=r"image_encoder\.onnx: wrong sha256"):
        store.load("tiny")


def test_unreadable_graph_even_with_matching_checksums(store):
    entry = _entry(store)
    (entry / "image_encoder.onnx").write_bytes(b"this is not a protobuf at all" * 10)
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["files"]["image_encoder.onnx"] = file_record(entry / "image_encoder.onnx")
    (entry / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelStoreError, match=r"image_encoder\.onnx: unreadable ONNX graph"):
        store.load("tiny")


def test_manifest_of_another_format_version(store):
    path = _entry(store) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format"] = "limoe-model-store/2"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelStoreError, match=r"manifest format 'limoe-model-store/2' is not supported"):
        store.load("tiny")
    path.write_text("{ not json")
    with pytest.raises(ModelStoreError, match="unreadable manifest"):
        store.load("tiny")


def test_manifest_listing_a_path_instead_of_a_file(store):
    path = _entry(store) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["files"]["../../secret"] = {"size": 1, "sha256": "0" * 64}
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelStoreError, match="is not a plain file name"):
        verify(_entry(store))


@pytest.mark.parametrize("bad", ["../tiny", "tiny/1", "..", ".hidden", "", "a b", "x" * 200, "tiny\x00"])
def test_names_and_versions_must_be_plain_identifiers(store, bad):
    with pytest.raises(ModelStoreError, match="invalid model"):
        store.resolve(bad)
    with pytest.raises(ModelStoreError, match="invalid model version"):
        store.resolve("tiny", bad)


def test_identifier_examples():
    for good in ("limoe-small", "v1.2", "2026_11_29", "1"):
        assert check_identifier(good) == good


def test_latest_is_the_highest_numeric_version(store):
    for v in ("2", "10", "9"):
        shutil.copytree(_entry(store), store.root / "tiny" / v)
    (store.root / "tiny" / "11").mkdir()  # no manifest: not a version
    assert store.versions("tiny") == ["1", "2", "9", "10"]
    assert store.resolve("tiny").name == "10"
    assert store.resolve("tiny", "9").name == "9"
    assert store.next_version("tiny") == "11"


def test_unknown_name_or_version_lists_what_exists(store):
    with pytest.raises(ModelStoreError, match=r"no model named 'nope' .* \(available: tiny\)"):
        store.resolve("nope")
    with pytest.raises(ModelStoreError, match=r"has no version '7' \(available: 1\)"):
        store.resolve("tiny", "7")


def test_the_manifest_is_parsed_into_types_once(exported, store):
    model, _, _, _ = exported
    cfg = model.cfg
    m = store.load("tiny")
    assert m.preprocess == PreprocessConfig(16, tuple(cfg.image_mean), tuple(cfg.image_std), "bicubic", (255, 255, 255))
    assert m.moe == MoEInfo(layers=(1, 2), num_experts=4, top_k=2, inference_routing="dropless", onnx_op="standard",
                            eval_capacity_factor=0.5, batch_priority=True)
    assert m.image_tokens == cfg.num_patches and m.context_length == cfg.context_length
    assert m.embedding_size == cfg.embed_dim and m.logit_scale > 0 and m.templates[0].count("{}") == 1
    assert m.files["tokenizer.json"] == FileRecord(**file_record(_entry(store) / "tokenizer.json"))
    assert m.roles["image_onnx"] == "image_encoder.onnx"


def test_the_shipped_manifests_read_as_they_are_on_disk():
    for name in ("limoe-small", "limoe-tiny"):
        m = read_manifest(SHIPPED / name / "1")
        assert m.moe.inference_routing == "dropless" and m.moe.onnx_op == "standard"
    small = read_manifest(SHIPPED / "limoe-small" / "1")
    assert small.moe.layers == (1, 3, 5) and small.preprocess.image_size == 64


def test_a_manifest_from_before_dropless_inference_means_capacity_routing(store):
    """Entries exported before dropless inference existed say nothing of it: they drop."""
    path = _entry(store) / "manifest.json"
    manifest = json.loads(path.read_text())
    del manifest["moe"]["inference_routing"], manifest["moe"]["onnx_op"]
    path.write_text(json.dumps(manifest))
    assert read_manifest(_entry(store)).moe.inference_routing == "capacity"


@pytest.mark.parametrize("field, value, message", [
    ("preprocessing", {"image_size": 16, "mean": [0.5, 0.5], "std": [0.5] * 3}, r"'mean' must be 3 numbers"),
    ("preprocessing", {"image_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3, "resample": "magic"},
     r"'resample' must be one of bicubic"),
    ("preprocessing", {"image_size": 16, "mean": [0.5] * 3, "std": [0.0] * 3}, r"'std' must be positive"),
    ("moe", {"layers": [1], "top_k": 1}, r"has no 'num_experts'"),
    ("moe", {"layers": [1], "num_experts": 2, "top_k": 3}, r"1 <= top_k <= num_experts"),
    ("logit_scale", -1.0, r"must be a positive number, not -1.0"),
    ("context_length", "8", r"must be a positive integer, not '8'"),
    ("graphs", {"text": {"tokens": 8}}, r"\.image\.tokens': must be a positive integer, not None"),
    ("templates", ["no placeholder"], r"one '\{\}' each"),
])
def test_a_malformed_field_is_refused_when_the_entry_is_opened(store, field, value, message):
    path = _entry(store) / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest[field] = value
    path.write_text(json.dumps(manifest))
    with pytest.raises(ModelStoreError, match=rf"manifest.json: manifest field '{field.split('.')[0]}.*{message}"):
        store.load("tiny")
