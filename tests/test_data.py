"""limoe.data: sources, common format, splits, users' data, the mix loader. No network: every
fixture (npm-like tarballs, a WebDataset shard, a CSV index) is built here on the fly."""

import argparse
import base64
import collections
import hashlib
import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from limoe.data import npm
from limoe.data.cli import add_data_parser
from limoe.data.emoji import emoji_captions, emojibase_index, normalize_code, prepare_emoji
from limoe.data.format import SPLITS, iter_jsonl, png_bytes, read_meta, split_for, validate_item
from limoe.data.icons import icon_captions, prepare_icons
from limoe.data.licenses import LICENSES, attribution_markdown
from limoe.data.mnist import prepare_mnist
from limoe.data.readers import expand_shards
from limoe.data.scenes import COLOURS, HELDOUT_COMBOS, SHAPES, prepare_scenes, render_scene, sample_spec
from limoe.runtime.preprocess import PreprocessConfig
from limoe.train.dataset import MixDataset, parse_mix

PRE = PreprocessConfig(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
QUIET = {"log": lambda *a: None}


def png(colour=(200, 30, 30), size=(12, 12), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, "PNG")
    return buf.getvalue()


def write_tgz(path, files: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# -- fake npm packages -------------------------------------------------------------------------------
EMOJI_RECORDS = [
    {"name": "GRINNING FACE", "unified": "1F600", "image": "1f600.png", "short_names": ["grinning"],
     "category": "Smileys & Emotion", "subcategory": "face-smiling", "sort_order": 1},
    {"name": "WHITE SMILING FACE", "unified": "263A-FE0F", "image": "263a-fe0f.png", "short_names": ["relaxed"],
     "category": "Smileys & Emotion", "subcategory": "face-affection", "sort_order": 2},
    {"name": "WAVING HAND SIGN", "unified": "1F44B", "image": "1f44b.png", "short_names": ["wave"],
     "category": "People & Body", "subcategory": "hand-fingers-open", "sort_order": 3,
     "skin_variations": {"1F3FD": {"unified": "1F44B-1F3FD", "image": "1f44b-1f3fd.png",
                                   "has_img_google": True, "has_img_twitter": True}}},
    {"name": "DOG FACE", "unified": "1F436", "image": "1f436.png", "short_names": ["dog"],
     "category": "Animals & Nature", "subcategory": "animal-mammal", "sort_order": 4},
    {"name": "RED APPLE", "unified": "1F34E", "image": "1f34e.png", "short_names": ["apple"],
     "category": "Food & Drink", "subcategory": "food-fruit", "sort_order": 5},
    {"name": "ROCKET", "unified": "1F680", "image": "1f680.png", "short_names": ["rocket"],
     "category": "Travel & Places", "subcategory": "transport-air", "sort_order": 6},
]
EMOJIBASE = [
    {"label": "grinning face", "hexcode": "1F600", "tags": ["face", "grin", "happy", "smile"]},
    {"label": "smiling face", "hexcode": "263A", "tags": ["face", "outlined", "relaxed", "smile"]},
    {"label": "waving hand", "hexcode": "1F44B", "tags": ["bye", "hello", "wave"],
     "skins": [{"label": "waving hand: medium skin tone", "hexcode": "1F44B-1F3FD", "tone": 3}]},
    {"label": "dog face", "hexcode": "1F436", "tags": ["dog", "pet"]},
    {"label": "red apple", "hexcode": "1F34E", "tags": ["apple", "fruit", "red"]},
    {"label": "rocket", "hexcode": "1F680", "tags": ["space"]},
]


@pytest.fixture(scope="module")
def fake_packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("npm")
    tarballs = {}
    for k, vendor in enumerate(("google", "twitter")):
        records = [{**r, f"has_img_{vendor}": True} for r in EMOJI_RECORDS]
        files = {"package/emoji.json": json.dumps(records).encode()}
        for i, r in enumerate(records):
            files[f"package/img/{vendor}/64/{r['image']}"] = png((40 * i, 100 + 50 * k, 90), (64, 64), "RGB")
            for v in (r.get("skin_variations") or {}).values():
                files[f"package/img/{vendor}/64/{v['image']}"] = png((10, 20, 30 + 60 * k), (64, 64))
        tarballs[vendor] = write_tgz(root / f"{vendor}.tgz", files)
    tarballs["emojibase"] = write_tgz(root / "emojibase.tgz", {"package/en/data.json": json.dumps(EMOJIBASE).encode()})
    icon_png = png((0, 0, 0, 255), (240, 240), "RGBA")
    tarballs["png"] = write_tgz(root / "icons-png.tgz", {f"package/icons/outline/{n}.png": icon_png
                                                         for n in ("arrow-left", "brand-github", "eye")}
                                | {"package/icons/filled/eye.png": icon_png})
    tarballs["meta"] = write_tgz(root / "icons.tgz", {"package/icons.json": json.dumps(
        {"arrow-left": {"name": "arrow-left", "category": "Arrows", "tags": ["back", "previous", 2]},
         "eye": {"name": "eye", "category": "Health", "tags": ["see", "view"]}}).encode()})
    return tarballs


@pytest.fixture(scope="module")
def cache(tmp_path_factory, fake_packages):
    """A cache with all four built-in sources, built from fake packages / arrays / a small render."""
    root = tmp_path_factory.mktemp("cache")
    t = fake_packages
    prepare_emoji(root, tarballs={k: t[k] for k in ("google", "twitter", "emojibase")},
                  holdout_concepts=["rocket"], **QUIET)
    prepare_icons(root, tarballs={"png": t["png"], "meta": t["meta"]}, **QUIET)
    rng = np.random.default_rng(0)
    prepare_mnist(root, arrays=(rng.integers(0, 256, (60, 784)), np.arange(60) % 10), **QUIET)
    prepare_scenes(root, count=300, **QUIET)
    return root


@pytest.fixture(scope="module")
def user_data(tmp_path_factory):
    """A CSV index and a WebDataset shard, each with a few bad entries."""
    root = tmp_path_factory.mktemp("user")
    (root / "img").mkdir()
    for i in range(6):
        (root / "img" / f"{i}.png").write_bytes(png((30 * i, 60, 200)))
    (root / "img" / "garbage.png").write_bytes(b"this is not an image")
    good = png((1, 2, 3), (40, 40))
    (root / "img" / "truncated.png").write_bytes(good[: len(good) // 2])  # header fine, pixels cut
    rows = ["image,caption,label"] + [f"img/{i}.png,a blue square number {i},square" for i in range(6)]
    rows += ["img/0.png,another caption of the first image,square",  # merged into item 0
             "img/missing.png,nothing here,x", "img/garbage.png,not an image,x",
             "img/truncated.png,a truncated file,x", "https://example.com/a.png,a url,x"]
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")

    shard = root / "shards" / "data-000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i in range(8):
            add(f"{i:04d}.png", png((200, 20 * i, 20)))
            add(f"{i:04d}.txt", f"a red picture {i}".encode())
            if i % 2:
                add(f"{i:04d}.json", json.dumps({"label": "red", "style": "web"}).encode())
        add("0100.jpg", b"\xff\xd8 broken jpeg")
        add("0100.txt", b"broken")
        add("0101.png", png())  # no caption
    return root


# -- integrity ---------------------------------------------------------------------------------------
def test_sri_sha512_matches_hand_computed_value():
    # FIPS 180-2 test vector: SHA-512("abc"), written out in hex, base64-encoded by hand here
    hex_digest = ("ddaf35a193617abacc417349ae20413112e6fa4e89a97ea20a9eeee64b55d39a"
                  "2192992a274fc1a836ba3c23a3feebbd454d4423643ce80e2a9ac94fa54ca49f")
    expected = "sha512-" + base64.b64encode(bytes.fromhex(hex_digest)).decode()
    assert expected == "sha512-3a81oZNherrMQXNJriBBMRLm+k6JqX6iCp7u5ktV05ohkpkqJ0/BqDa6PCOj/uu9RU1EI2Q86A4qmslPpUyknw=="
    assert npm.sri(b"abc") == expected
    assert npm.verify_integrity(b"abc", expected)
    assert not npm.verify_integrity(b"abd", expected)
    # several hashes: the strongest decides; a file path works like bytes
    sha1 = "sha1-" + base64.b64encode(hashlib.sha1(b"abc").digest()).decode()
    assert npm.verify_integrity(b"abc", f"{sha1} {expected}")
    assert not npm.verify_integrity(b"abc", f"{sha1} sha512-AAAA")
    with pytest.raises(ValueError):
        npm.verify_integrity(b"abc", "md5-xyz")


def test_fetch_npm_verifies_and_reuses_its_cache(tmp_path, monkeypatch):
    payload = b"pretend tarball"
    calls = []

    def fake_npm(*args, cwd=None, timeout=0):
        calls.append(args[0])
        if args[0] == "view":
            return npm.sri(payload) + "\n"
        dest = args[args.index("--pack-destination") + 1]
        (Path(dest) / "pkg-1.0.0.tgz").write_bytes(payload)
        return json.dumps([{"filename": "pkg-1.0.0.tgz"}])

    monkeypatch.setattr(npm, "_npm", fake_npm)
    rec = npm.fetch_npm("pkg@1.0.0", tmp_path / "dl", log=lambda m: None)
    assert rec["sha256"] == hashlib.sha256(payload).hexdigest() and not rec["cached"] and calls == ["view", "pack"]
    rec2 = npm.fetch_npm("pkg@1.0.0", tmp_path / "dl", log=lambda m: None)
    assert rec2["cached"] and calls == ["view", "pack"]  # verified from the record, npm not called
    # a registry answer that does not match the tarball is refused
    monkeypatch.setattr(npm, "_npm", lambda *a, **k: "sha512-AAAA" if a[0] == "view" else fake_npm(*a, **k))
    with pytest.raises(npm.IntegrityError):
        npm.fetch_npm("pkg@1.0.0", tmp_path / "dl2", log=lambda m: None)
    assert not (tmp_path / "dl2" / "pkg-1.0.0.tgz").exists()


# -- caption builders --------------------------------------------------------------------------------
def test_emoji_caption_builder_on_hand_written_records():
    record = {"name": "GRINNING FACE WITH SMILING EYES", "unified": "1F604", "short_names": ["smile", "grin_eyes"],
              "category": "Smileys & Emotion"}
    cldr = {"label": "grinning face with smiling eyes", "hexcode": "1F604",
            "tags": ["eye", "face", "grin", "happy", "laugh", "smile"]}
    label, caps = emoji_captions(record, cldr)
    assert label == "grinning face with smiling eyes"
    assert caps[0] == label
    assert "smile" in caps and "grin eyes" in caps
    assert "grinning face with smiling eyes: eye, grin, happy, laugh" in caps
    assert len(caps) == len({c.lower() for c in caps})  # no duplicates
    # without CLDR data: the lower-cased Unicode name
    label2, caps2 = emoji_captions({"name": "ROCKET", "unified": "1F680", "short_names": ["rocket"]})
    assert label2 == "rocket" and caps2[0] == "rocket"
    # a skin-tone variant: class = the base concept, first caption = the variant's own label
    wave = EMOJI_RECORDS[2]
    index = emojibase_index(EMOJIBASE)
    label3, caps3 = emoji_captions(wave, index[normalize_code("1F44B-1F3FD")], "1F3FD")
    assert label3 == "waving hand"
    assert caps3[0] == "waving hand: medium skin tone" and "wave, medium skin tone" in caps3
    # FE0F is ignored when matching emoji.json's unified to emojibase's hexcode
    assert normalize_code("263a-fe0f") == normalize_code("263A") == "263A"
    assert index[normalize_code("263A-FE0F")]["label"] == "smiling face"


def test_icon_captions():
    label, caps = icon_captions("arrow-left", {"category": "Arrows", "tags": ["back", "previous", 2, "arrow"]})
    assert label == "arrow left"
    assert caps[0] == "an icon of an arrow left"
    assert "arrow left icon" in caps and "arrow left: back, previous, 2" in caps


# -- the common format and splits -----------------------------------------------------------------------
def test_every_prepared_source_writes_the_common_format(cache):
    for name in ("emoji", "icons", "mnist", "scenes"):
        meta = read_meta(cache / name)
        assert meta["name"] == name and meta["licenses"] == LICENSES[name]
        items = list(iter_jsonl(cache / name / "index.jsonl"))
        assert len(items) == meta["items"] > 0
        assert sum(meta["splits"].values()) == len(items)
        for it in items:
            assert validate_item(it) == [], it
            assert it["source"] == name and it["captions"][0]
            with Image.open(cache / name / it["image"]) as im:
                assert im.size == ((28, 28) if name == "mnist" else (64, 64))
    assert {it["style"] for it in iter_jsonl(cache / "emoji" / "index.jsonl")} == {"google", "twitter"}


def test_splits_are_deterministic_hashes():
    assert split_for("emoji:1F600") == split_for("emoji:1F600")
    got = collections.Counter(split_for(f"x:{i}") for i in range(4000))
    assert set(got) == set(SPLITS)
    assert abs(got["val"] / 4000 - 0.05) < 0.015 and abs(got["test"] / 4000 - 0.05) < 0.015
    assert split_for("x:1", val=0, test=0) == "train" and split_for("x:1", val=0, test=1) == "test"


def test_emoji_holdout_style_and_concepts(cache):
    items = list(iter_jsonl(cache / "emoji" / "index.jsonl"))
    assert len(items) == 2 * 7  # 6 emoji + 1 skin variant, per vendor
    for it in items:
        if it["style"] == "twitter":
            assert it["split"] == "test" and it["heldout"] == "style"
        elif it["label"] == "rocket":
            assert it["split"] == "test" and it["heldout"] == "concept"
        else:
            assert it["split"] == it["concept_split"] and it["heldout"] is None
    wave = [it for it in items if it.get("skin_tone")]
    assert {it["label"] for it in wave} == {"waving hand"} and {it["concept"] for it in wave} == {"1f44b"}
    assert read_meta(cache / "emoji")["holdout"]["style"] == "twitter"
    train = MixDataset("emoji", "all", PRE, cache, where={"style": "twitter"})
    assert {it["split"] for it in train.items} == {"test"}
    with pytest.raises(ValueError, match="no items"):
        MixDataset("emoji", ["train", "val"], PRE, cache, where={"style": "twitter"})


def test_preparing_is_idempotent_and_deterministic(cache, fake_packages, tmp_path):
    before = (cache / "emoji" / "index.jsonl").read_bytes()
    logs = []
    tb = {k: fake_packages[k] for k in ("google", "twitter", "emojibase")}
    prepare_emoji(cache, tarballs=tb, holdout_concepts=["rocket"], log=logs.append)
    assert logs and "already prepared" in logs[0]
    # a fresh build elsewhere gives the same bytes
    prepare_emoji(tmp_path, tarballs=tb, holdout_concepts=["rocket"], **QUIET)
    assert (tmp_path / "emoji" / "index.jsonl").read_bytes() == before
    # other parameters rebuild; no style held out -> twitter follows the concept hash
    prepare_emoji(tmp_path, tarballs=tb, holdout_style=None, **QUIET)
    items = list(iter_jsonl(tmp_path / "emoji" / "index.jsonl"))
    assert all(it["split"] == it["concept_split"] for it in items)
    assert not list(tmp_path.glob(".*partial"))


def test_scenes_hold_out_colour_shape_combos(cache):
    assert len(HELDOUT_COMBOS) == 8
    assert {c for c, _ in HELDOUT_COMBOS} == set(COLOURS) and {s for _, s in HELDOUT_COMBOS} == set(SHAPES)
    items = list(iter_jsonl(cache / "scenes" / "index.jsonl"))
    train = [it for it in items if it["split"] == "train"]
    assert train and all((it["colour"], it["shape"]) not in HELDOUT_COMBOS for it in train)
    held = [it for it in items if (it["colour"], it["shape"]) in HELDOUT_COMBOS]
    assert held and all(it["split"] == "test" and it["heldout"] == "combo" for it in held)
    # every colour and every shape still appears in train
    assert {it["colour"] for it in train} == set(COLOURS) and {it["shape"] for it in train} == set(SHAPES)
    it = items[0]
    assert it["label"] == f"{it['colour']} {it['shape']}" and it["colour"] in it["captions"][0]
    assert 1 <= it["count"] <= 4
    # deterministic pixels
    a, b = render_scene(sample_spec(0, 5)), render_scene(sample_spec(0, 5))
    assert a.tobytes() == b.tobytes() and a.size == (64, 64)
    assert (cache / "scenes" / "images" / "000" / "000005.png").read_bytes() == png_bytes(a)


def test_licenses_render():
    md = attribution_markdown()
    for needle in ("CC-BY-4.0", "Apache-2.0", "CC-BY-SA-3.0", "emojibase-data@17.0.0", "@tabler/icons-png@3.48.0"):
        assert needle in md


# -- users' data ---------------------------------------------------------------------------------------
def test_csv_index_skips_bad_images_with_a_count(user_data):
    with pytest.warns(UserWarning, match=r"skipped 3 of 10 items"):
        ds = MixDataset(str(user_data / "pairs.csv"), "all", PRE)
    assert len(ds) == 7  # 6 good + the truncated one (its header is fine)
    assert ds.skipped == {"pairs": {"missing file": 1, "cannot decode image": 1, "url or no image path": 1}}
    first = next(it for it in ds.items if it["ref"].endswith("img/0.png"))
    assert first["captions"] == ["a blue square number 0", "another caption of the first image"]
    assert first["label"] == "square" and first["style"] == "user" and first["split"] in SPLITS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = [ds[i] for i in range(len(ds))]  # the truncated image is replaced, not fatal
    assert any("skipping undecodable image" in str(w.message) for w in caught)
    assert ds.decode_failures["pairs"] == 1
    assert all(o["pixels"].shape == (3, 16, 16) and o["pixels"].dtype == np.float32 for o in out)


def test_webdataset_shard(user_data):
    with pytest.warns(UserWarning, match="skipped 2 of 10"):
        ds = MixDataset(str(user_data / "shards" / "data-{000..000}.tar"), "all", PRE)
    assert len(ds) == 8
    assert {it["source"] for it in ds.items} == {"data"}
    labelled = [it for it in ds.items if it["label"]]
    assert len(labelled) == 4 and {it["style"] for it in labelled} == {"web"}
    ex = ds[0]
    assert ex["caption"].startswith("a red picture") and ex["pixels"].shape == (3, 16, 16)
    # the same shard through a glob and through its folder
    assert expand_shards(str(user_data / "shards" / "*.tar")) == [str(user_data / "shards" / "data-000.tar")]
    with pytest.warns(UserWarning):
        assert len(MixDataset(str(user_data / "shards"), "all", PRE)) == 8


def test_jsonl_index(tmp_path):
    (tmp_path / "a.png").write_bytes(png())
    (tmp_path / "my.jsonl").write_text(json.dumps({"image": "a.png", "captions": ["x", "y"], "label": "l",
                                                   "split": "val", "camera": "z"}) + "\n"
                                       + json.dumps({"image": "a.png"}) + "\n")
    with pytest.warns(UserWarning, match="no caption: 1"):
        ds = MixDataset(str(tmp_path / "my.jsonl"), "val", PRE)
    assert len(ds) == 1 and ds.items[0]["extras"] == {"camera": "z"} and ds[0]["caption"] in ("x", "y")


# -- the mix loader ------------------------------------------------------------------------------------
def test_parse_mix_forms():
    assert parse_mix("emoji:2,scenes:1,mnist:0.5") == parse_mix({"emoji": 2, "scenes": 1, "mnist": 0.5})
    assert [(e.source, e.weight) for e in parse_mix(["emoji", ("x.csv", 3)])] == [("emoji", 1.0), ("x.csv", 3.0)]
    assert [(e.source, e.weight) for e in parse_mix("s/a-{000,001}.tar:2,icons")] == [("s/a-{000,001}.tar", 2.0),
                                                                                      ("icons", 1.0)]
    with pytest.raises(ValueError):
        parse_mix("emoji:-1")


def test_items_and_mix_weights_give_the_proportions(cache):
    ds = MixDataset("scenes:2,mnist:1,icons:0.5,emoji:0.5", "all", PRE, cache, seed=3)
    ex = ds[0]
    assert set(ex) >= {"pixels", "caption", "label", "source", "style"}
    assert ex["pixels"].shape == (3, 16, 16) and ex["pixels"].dtype == np.float32
    assert ex["caption"] in ds.items[0]["captions"] and ds[0]["caption"] == ex["caption"]  # seeded
    # the per-item sample weights (what limoe.train.trainer.StepSampler draws from): each source's items
    # together carry its share of the mix weights (2, 1, 0.5, 0.5 of 4), spread evenly over them
    want = {"scenes": 2 / 4, "mnist": 1 / 4, "icons": 0.5 / 4, "emoji": 0.5 / 4}
    w = ds.sample_weights
    assert [s.name for s in ds.sources] == list(want)
    for s in ds.sources:
        assert s.size > 0 and w[s.start:s.stop] == pytest.approx(np.full(s.size, want[s.name] / s.size), rel=1e-12)
    assert w.sum() == pytest.approx(1.0, rel=1e-12)


# -- CLI -----------------------------------------------------------------------------------------------
def test_cli_prepare_and_info(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="limoe")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "prepare", "--sources", "scenes", "--cache", str(tmp_path),
                              "--scenes-count", "25"])
    assert args.func(args) == 0
    assert "scenes: 25 items" in capsys.readouterr().out
    args = parser.parse_args(["data", "prepare", "--sources", "scenes", "--cache", str(tmp_path),
                              "--scenes-count", "25"])
    assert args.func(args) == 0 and "already prepared" in capsys.readouterr().out
    args = parser.parse_args(["data", "info", "--cache", str(tmp_path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "scenes" in out and "scene" in out and "Apache-2.0" in out
    args = parser.parse_args(["data", "prepare", "--sources", "nope", "--cache", str(tmp_path)])
    assert args.func(args) == 1
