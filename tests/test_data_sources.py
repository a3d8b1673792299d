"""The emoji_art and iconsets sources on small fixtures written here (no network, no real sets):
code point -> CLDR label, licences, determinism and idempotence, the SVG renderer, flags, and
`limoe data info`."""

import argparse
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from limoe.data.cli import add_data_parser
from limoe.data.emoji import emoji_captions, emojibase_index
from limoe.data.emoji_art import EmojiNames, prepare_emoji_art, slug
from limoe.data.format import iter_jsonl, read_meta, split_for
from limoe.data.iconify import ACCEPTED_LICENSES, LicenseRefused, check_license, icon_svg, parse_icon_set, split_variant
from limoe.data.iconify_sets import EMOJI_SETS, ICON_SETS, package, pinned_integrity
from limoe.data.iconsets import flag_names, icon_captions, prepare_iconsets
from limoe.data.licenses import LICENSES, attribution_markdown, licenses_for
from limoe.data.npm import PINNED_INTEGRITY
from limoe.data.render import Look, compose_svg, look_for, render_png
from limoe.data.scenes import COLOURS
from limoe.runtime.preprocess import PreprocessConfig
from limoe.train.dataset import MixDataset

PRE = PreprocessConfig(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
QUIET = {"log": lambda *a: None}

# -- fixtures: emojibase, emoji.json and Iconify packages ------------------------------------------
EMOJIBASE = [
    {"label": "grinning face", "hexcode": "1F600", "tags": ["face", "grin"], "group": 0},
    {"label": "smiling face", "hexcode": "263A", "tags": ["face", "relaxed"], "group": 0},
    {"label": "waving hand", "hexcode": "1F44B", "tags": ["hello", "wave"], "group": 1,
     "skins": [{"label": "waving hand: medium skin tone", "hexcode": "1F44B-1F3FD", "tone": 3}]},
    {"label": "dog face", "hexcode": "1F436", "tags": ["dog", "pet"], "group": 3},
    {"label": "cat", "hexcode": "1F408", "tags": ["pet"], "group": 3},
    {"label": "cat face", "hexcode": "1F431", "tags": ["pet"], "group": 3},
    {"label": "flag: France", "hexcode": "1F1EB-1F1F7", "tags": ["flag"], "group": 9},
    {"label": "flag: European Union", "hexcode": "1F1EA-1F1FA", "tags": ["flag"], "group": 9},
    {"label": "flag: England", "hexcode": "1F3F4-E0067-E0062-E0065-E006E-E0067-E007F", "tags": ["flag"], "group": 9},
    {"label": "regional indicator A", "hexcode": "1F1E6"},  # a letter of flag sequences: no group
]
EMOJI_JSON = [
    {"name": "GRINNING FACE", "unified": "1F600", "short_names": ["grinning"], "category": "Smileys & Emotion"},
    {"name": "WHITE SMILING FACE", "unified": "263A-FE0F", "short_names": ["relaxed"], "category": "Smileys & Emotion"},
    {"name": "WAVING HAND SIGN", "unified": "1F44B", "short_names": ["wave"], "category": "People & Body"},
    {"name": "DOG FACE", "unified": "1F436", "short_names": ["dog"], "category": "Animals & Nature"},
    {"name": "CAT", "unified": "1F408", "short_names": ["cat2"], "category": "Animals & Nature"},
    {"name": "CAT FACE", "unified": "1F431", "short_names": ["cat"], "category": "Animals & Nature"},
]
SQUARE = '<rect width="16" height="16" fill="#{:02x}{:02x}{:02x}"/>'
MONO = '<path fill="currentColor" d="M{x} 0h4v16h-4z"/>'


def write_tgz(path, files):
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in files.items():
            data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def iconify_package(path, prefix, icons, license="MIT", aliases=None, chars=None, metadata=None, palette=False,
                    width=16, height=16):
    files = {"icons.json": {"prefix": prefix, "icons": icons, "aliases": aliases or {}, "width": width,
                            "height": height},
             "info.json": {"name": prefix.title(), "author": {"name": "Someone"}, "palette": palette,
                           "license": {"title": license, "spdx": license}}}
    if chars is not None:
        files["chars.json"] = chars
    if metadata is not None:
        files["metadata.json"] = metadata
    return write_tgz(path, files)


def colour(i):
    return SQUARE.format(30 * i % 256, 200, 100)


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    root = tmp_path_factory.mktemp("iconify")
    t = {"emojibase": write_tgz(root / "emojibase.tgz", {"en/data.json": EMOJIBASE}),
         "emoji_data": write_tgz(root / "emoji-data.tgz", {"emoji.json": EMOJI_JSON})}
    # chars-mapped (FE0F in one key, a skin tone, a private-use symbol emojibase does not know)
    t["twemoji"] = iconify_package(root / "tw.tgz", "twemoji", {
        "grinning-face": {"body": colour(1)}, "smiling-face": {"body": colour(2)},
        "waving-hand": {"body": colour(3)}, "waving-hand-medium-skin-tone": {"body": colour(4)},
        "extra-symbol": {"body": colour(5)}, "old-name": {"body": colour(6), "hidden": True},
        "regional-indicator-a": {"body": colour(21)}},
        license="CC-BY-4.0", palette=True,
        chars={"1f600": "grinning-face", "263a-fe0f": "smiling-face", "1f44b": "waving-hand",
               "1f44b-1f3fd": "waving-hand-medium-skin-tone", "e000": "extra-symbol", "1f1e6": "regional-indicator-a"})
    # name-mapped: CLDR label, squashed Unicode name, short name, flag-for-, numbered, alias, ambiguous
    t["fxemoji"] = iconify_package(root / "fx.tgz", "fxemoji", {
        "dog-face": {"body": colour(7)}, "grinningface": {"body": colour(8)}, "relaxed": {"body": colour(9)},
        "flag-for-france": {"body": colour(10)}, "waving-hand-2": {"body": colour(11)},
        "pup": {"body": colour(12)}, "mystery": {"body": colour(13)}, "dog-face-1": {"body": colour(7)}},
        license="Apache-2.0", palette=True, aliases={"dog": {"parent": "pup"}})
    # monochrome: drawn in currentColor, colourised
    t["emojione-monotone"] = iconify_package(root / "mono.tgz", "emojione-monotone", {
        "dog-face": {"body": MONO.format(x=2)}, "cat": {"body": MONO.format(x=6)}}, license="CC-BY-4.0")
    # icon sets
    t["mdi"] = iconify_package(root / "mdi.tgz", "mdi", {
        "home": {"body": MONO.format(x=0)}, "home-outline": {"body": MONO.format(x=1)},
        "arrow-right": {"body": MONO.format(x=12)}, "spinner": {"body": '<circle r="4"><animate/></circle>'},
        "gone": {"body": MONO.format(x=3), "hidden": True}}, license="Apache-2.0",
        aliases={"house": {"parent": "home"}, "arrow-left": {"parent": "arrow-right", "hFlip": True}},
        metadata={"categories": {"Home": ["home", "home-outline"], "Arrow": ["arrow-right"]}})
    t["flat-color-icons"] = iconify_package(root / "fci.tgz", "flat-color-icons", {
        "sun": {"body": colour(14)}}, palette=True)
    t["flag"] = iconify_package(root / "flag.tgz", "flag", {
        "fr-4x3": {"body": colour(15), "width": 20, "height": 15}, "fr-1x1": {"body": colour(16)},
        "gb-eng-4x3": {"body": colour(17)}, "xx-4x3": {"body": colour(18)}}, metadata={"suffixes": {"1x1": "1x1",
                                                                                                  "4x3": "4x3"}})
    t["circle-flags"] = iconify_package(root / "cf.tgz", "circle-flags", {
        "european-union": {"body": colour(19)}, "lang-xx": {"body": colour(20)}})
    t["gpl-icons"] = iconify_package(root / "gpl.tgz", "gpl-icons", {"a": {"body": colour(1)}}, license="GPL-3.0")
    t["nc-icons"] = iconify_package(root / "nc.tgz", "nc-icons", {"a": {"body": colour(1)}}, license="CC-BY-NC-4.0")
    return t


ART_STYLES = ["twemoji", "fxemoji", "emojione-monotone"]
ICON_SETS_USED = ["mdi", "flat-color-icons", "flag", "circle-flags"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory, packages):
    root = tmp_path_factory.mktemp("sources")
    prepare_emoji_art(root, styles=ART_STYLES, workers=1, tarballs=packages, **QUIET)
    prepare_iconsets(root, sets=ICON_SETS_USED, workers=1, tarballs=packages, **QUIET)
    return root


def items_of(cache, source):
    return {it["id"]: it for it in iter_jsonl(cache / source / "index.jsonl")}


# -- emoji_art: code point -> CLDR label -------------------------------------------------------------
def test_chars_map_gives_cldr_labels_with_fe0f_and_skin_tones(cache):
    items = items_of(cache, "emoji_art")
    tw = {k: v for k, v in items.items() if v["style"] == "twemoji"}
    # the private-use symbol, the regional indicator letter and the hidden icon are left out
    assert sorted(tw) == ["twemoji:grinning-face", "twemoji:smiling-face", "twemoji:waving-hand",
                          "twemoji:waving-hand-medium-skin-tone"]
    assert read_meta(cache / "emoji_art")["sets"]["twemoji"]["skipped"] == {"no emoji code point": 1,
                                                                            "not an emoji on its own": 1}
    smile = tw["twemoji:smiling-face"]  # chars key "263a-fe0f", emojibase "263A"
    assert (smile["code"], smile["label"], smile["concept"], smile["mapped_by"]) == ("263A", "smiling face", "263a",
                                                                                     "chars")
    assert smile["captions"][:3] == ["smiling face", "white smiling face", "smiling face emoji"]
    skin = tw["twemoji:waving-hand-medium-skin-tone"]
    assert (skin["label"], skin["skin_tone"], skin["concept"], skin["captions"][0]) == (
        "waving hand", "1F3FD", "1f44b", "waving hand: medium skin tone")
    # the same class name and captions as the emoji source for the same code point
    cldr = emojibase_index(EMOJIBASE)
    assert tw["twemoji:grinning-face"]["captions"] == emoji_captions(EMOJI_JSON[0], cldr["1F600"])[1]
    assert skin["concept_split"] == split_for("emoji:1F44B")


def test_names_are_mapped_through_labels_names_and_aliases(cache):
    fx = {k: v for k, v in items_of(cache, "emoji_art").items() if v["style"] == "fxemoji"}
    assert {v["icon"]: (v["code"], v["label"]) for v in fx.values()} == {
        "dog-face": ("1F436", "dog face"),  # a CLDR label
        "grinningface": ("1F600", "grinning face"),  # a name without its hyphens
        "relaxed": ("263A", "smiling face"),  # a short name in emoji.json
        "flag-for-france": ("1F1EB-1F1F7", "flag: France"),
        "waving-hand-2": ("1F44B", "waving hand"),  # a numbered variant
        "pup": ("1F436", "dog face"),  # through its plain alias "dog" (a short name)
    }
    # "mystery" has no code point; "dog-face-1" is the same picture as "dog-face"
    assert read_meta(cache / "emoji_art")["sets"]["fxemoji"]["skipped"] == {"no emoji code point": 1,
                                                                            "duplicate picture": 1}
    assert {v["mapped_by"] for v in fx.values()} == {"name"}
    # the category of emoji.json, else emojibase's group (France is not in this emoji.json)
    assert fx["fxemoji:dog-face"]["category"] == "Animals & Nature"
    assert fx["fxemoji:flag-for-france"]["category"] == "Flags"
    assert {v["concept_split"] for v in fx.values() if v["code"] == "1F436"} == {split_for("emoji:1F436")}


def test_emoji_names_tiers_and_ambiguity():
    cldr = emojibase_index(EMOJIBASE)
    names = EmojiNames(cldr, EMOJI_JSON)
    assert names.lookup("cat") == "1F408"  # the CLDR label "cat" wins over the short name "cat" of 1F431
    assert names.lookup("cat-face") == "1F431"
    assert names.lookup("cat2") == "1F408"  # a short name
    assert names.lookup("flag-for-flag-france") == "1F1EB-1F1F7"
    assert names.lookup("wavinghandsign") == "1F44B"  # the Unicode name, squashed
    assert names.lookup("no-such-emoji") is None
    pets = [{"name": "X", "unified": "1F408", "short_names": ["pet"]}, {"name": "Y", "unified": "1F436",
                                                                       "short_names": ["pet"]}]
    assert EmojiNames(cldr, [*EMOJI_JSON, *pets]).lookup("pet") is None  # means two emoji: left out
    assert slug("Flag: Côte d’Ivoire") == "flag-cote-divoire"


def test_held_out_style_is_all_test(cache):
    items = items_of(cache, "emoji_art").values()
    for it in items:
        if it["style"] == "twemoji":
            assert (it["split"], it["heldout"]) == ("test", "style")
        else:
            assert it["split"] == it["concept_split"] and it["heldout"] is None
    held = MixDataset("emoji_art", "test", PRE, cache, where={"heldout": "style"})
    assert len(held) == 4 and {it["style"] for it in held.items} == {"twemoji"}
    assert read_meta(cache / "emoji_art")["holdout"]["styles"] == ["twemoji"]


def test_monochrome_styles_are_colourised_and_named(cache):
    mono = [v for v in items_of(cache, "emoji_art").values() if v["style"] == "emojione-monotone"]
    assert {v["label"] for v in mono} == {"dog face", "cat"}
    for v in mono:
        look = look_for(f"emoji_art:{v['id']}", True)
        assert v["colour"] == look.colour
        want = (f"a black and white emoji of {v['label']}" if look.colour == "black"
                else f"a {look.colour} emoji of {v['label']}")
        assert v["captions"][-1] == want
        img = np.asarray(Image.open(cache / "emoji_art" / v["image"]))
        rgb = (0, 0, 0) if look.colour == "black" else COLOURS[look.colour]
        assert (img.reshape(-1, 3) == rgb).all(axis=1).sum() > 50  # the stroke is drawn in that colour


# -- iconsets -------------------------------------------------------------------------------------------
def test_icon_names_variants_aliases_categories(cache):
    items = items_of(cache, "iconsets")
    mdi = {k: v for k, v in items.items() if v["style"] == "mdi"}
    assert sorted(mdi) == ["mdi:arrow-left", "mdi:arrow-right", "mdi:home", "mdi:home-outline"]  # hidden, animated out
    home = mdi["mdi:home"]
    assert (home["label"], home["variant"], home["category"], home["aliases"]) == ("home", None, "Home", ["house"])
    c = home["colour"]
    assert home["captions"] == ["an icon of a home", "home icon", "home", f"a {c} icon of a home", f"{c} home icon",
                                "home, home icon", "house icon", "home (house)"]
    outline = mdi["mdi:home-outline"]
    assert (outline["label"], outline["variant"], outline["concept"]) == ("home", "outline", "home")
    assert outline["split"] == home["split"] == split_for("icons:home")  # the icons source's key for "home"
    assert mdi["mdi:arrow-left"]["split"] == split_for("icons:arrow-left")
    sun = items["flat-color-icons:sun"]  # a multicolour set keeps its colours
    assert sun["colour"] is None and sun["captions"] == ["an icon of a sun", "sun icon", "sun"]
    meta = read_meta(cache / "iconsets")
    assert meta["sets"]["mdi"]["skipped"] == {"animated": 1}
    assert meta["sets"]["mdi"]["items"] == 4 and meta["sets"]["mdi"]["license"] == "Apache-2.0"


def test_flags_are_named_by_country(cache):
    flags = {k: v for k, v in items_of(cache, "iconsets").items() if v["category"] == "Flags"}
    assert sorted(flags) == ["circle-flags:european-union", "flag:fr-1x1", "flag:fr-4x3", "flag:gb-eng-4x3"]
    fr = flags["flag:fr-4x3"]
    assert (fr["label"], fr["country"], fr["iso"], fr["concept"]) == ("flag of france", "France", "FR", "1f1eb-1f1f7")
    assert fr["captions"] == ["the flag of France", "flag of France", "France flag", "flag: France",
                              "a flag icon of France", "the France flag", "a rectangular flag of France"]
    assert flags["flag:fr-1x1"]["captions"][-1] == "a square flag of France"
    assert fr["split"] == split_for("emoji:1F1EB-1F1F7")  # as the emoji sources' France
    assert flags["flag:gb-eng-4x3"]["label"] == "flag of england"
    eu = flags["circle-flags:european-union"]
    assert (eu["label"], eu["iso"], eu["captions"][-1]) == ("flag of european union", "EU",
                                                            "a round flag of European Union")
    by_iso, by_slug = flag_names(emojibase_index(EMOJIBASE))
    assert by_iso == {"fr": ("1F1EB-1F1F7", "France"), "eu": ("1F1EA-1F1FA", "European Union"),
                      "gb-eng": ("1F3F4-E0067-E0062-E0065-E006E-E0067-E007F", "England")}
    assert read_meta(cache / "iconsets")["sets"]["flag"]["skipped"] == {"flag without a CLDR country name": 1}


def test_split_variant_and_captions():
    assert split_variant("home-outline-rounded", suffixes={"": "Regular", "rounded": "Rounded",
                                                           "outline-rounded": "Outline Rounded"}) == (
        "home", "Outline Rounded")
    assert split_variant("home", suffixes={"": "Regular", "rounded": "Rounded"}) == ("home", "Regular")
    assert split_variant("outline-home", prefixes={"outline": "Outline"}) == ("home", "Outline")
    assert split_variant("shield-task-24-filled", suffixes={"24-filled": "24 Filled"}) == ("shield-task", "24 Filled")
    assert split_variant("home-fill", generic=("fill",)) == ("home", "fill")
    assert split_variant("fill", generic=("fill",)) == ("fill", None)
    assert icon_captions("apple", "Bold", "FoodDrink", ["fruit"], "red") == [
        "an icon of an apple", "apple icon", "apple", "a red icon of an apple", "red apple icon", "bold apple icon",
        "apple, food drink icon", "fruit icon", "apple (fruit)"]


# -- licences ---------------------------------------------------------------------------------------------
def test_licence_policy_refuses_gpl_and_nc(tmp_path, packages):
    assert {"MIT", "Apache-2.0", "CC-BY-4.0", "CC-BY-SA-4.0"} <= ACCEPTED_LICENSES
    for bad in ("GPL-3.0", "CC-BY-NC-4.0", "CC-BY-ND-4.0", "OFL-1.1", None):
        with pytest.raises(LicenseRefused):
            check_license("x", bad)
    with pytest.raises(LicenseRefused, match="differs from the reviewed"):
        check_license("mdi", "MIT", expected="Apache-2.0")
    for s in ("gpl-icons", "nc-icons"):
        with pytest.raises(LicenseRefused, match=s):
            prepare_iconsets(tmp_path, sets=["mdi", s], workers=1, tarballs=packages, **QUIET)
    assert not (tmp_path / "iconsets").exists() and not list(tmp_path.glob(".*partial"))
    # a pinned set whose package now states another licence is refused too
    with pytest.raises(LicenseRefused):
        prepare_iconsets(tmp_path, sets=["flag"], workers=1, tarballs={**packages, "flag": packages["mdi"]}, **QUIET)


def test_licence_records(cache):
    # every pinned set: accepted licence, its own pin in PINNED_INTEGRITY, one licence entry
    for table, source in ((EMOJI_SETS, "emoji_art"), (ICON_SETS, "iconsets")):
        entries = {e["styles"][0]: e for e in LICENSES[source] if e.get("styles")}
        assert set(entries) == set(table)
        for prefix, rec in table.items():
            assert rec["license"] in ACCEPTED_LICENSES
            assert PINNED_INTEGRITY[package(prefix)] == rec["integrity"]
            assert entries[prefix]["license"] == rec["license"]
    assert len(ICON_SETS) >= 20 and pinned_integrity()["@iconify-json/mdi@1.2.3"].startswith("sha512-")
    om = next(e for e in LICENSES["emoji_art"] if e.get("styles") == ["openmoji"])
    assert om["attribution"] == ("OpenMoji by OpenMoji (https://github.com/hfg-gmuend/openmoji), licensed under "
                                 "CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/); rendered from SVG "
                                 "to 64 px PNG on a light background")
    md = attribution_markdown(["emoji_art", "iconsets"])
    assert "@iconify-json/game-icons@1.2.4 (Game Icons): **CC-BY-3.0**, GameIcons" in md
    assert "licensed under CC BY 4.0" in md
    # SOURCE.json carries the entries of the styles built, plus the metadata's
    lic = read_meta(cache / "emoji_art")["licenses"]
    assert [e["styles"][0] for e in lic if e.get("styles")] == ["emojione-monotone", "fxemoji", "twemoji"]
    assert [e["license"] for e in lic] == ["CC-BY-4.0", "Apache-2.0", "CC-BY-4.0", "MIT", "MIT"]
    assert licenses_for("iconsets", ["flag"])[0]["component"] == "@iconify-json/flag@1.2.12 (Flag Icons)"
    items = items_of(cache, "iconsets")
    assert items["mdi:home"]["license"] == "Apache-2.0" and items["flag:fr-4x3"]["license"] == "MIT"


# -- determinism, idempotence -------------------------------------------------------------------------
def test_rebuild_is_byte_identical_and_idempotent(cache, packages, tmp_path):
    logs = []
    prepare_emoji_art(cache, styles=ART_STYLES, workers=1, tarballs=packages, log=logs.append)
    prepare_iconsets(cache, sets=ICON_SETS_USED, workers=1, tarballs=packages, log=logs.append)
    assert logs == [f"emoji_art: already prepared in {cache / 'emoji_art'}",
                    f"iconsets: already prepared in {cache / 'iconsets'}"]
    # a fresh build elsewhere, in 2 rendering processes, gives the same bytes
    prepare_iconsets(tmp_path, sets=ICON_SETS_USED, workers=2, tarballs=packages, **QUIET)
    for f in ("index.jsonl", "images/mdi/home.png", "images/flag/fr-4x3.png"):
        assert (tmp_path / "iconsets" / f).read_bytes() == (cache / "iconsets" / f).read_bytes(), f
    prepare_emoji_art(tmp_path, styles=ART_STYLES, workers=1, tarballs=packages, **QUIET)
    assert (tmp_path / "emoji_art" / "index.jsonl").read_bytes() == (cache / "emoji_art" / "index.jsonl").read_bytes()
    # other parameters rebuild
    meta = prepare_emoji_art(tmp_path, styles=ART_STYLES, holdout_styles=[], workers=1, tarballs=packages, **QUIET)
    assert meta["holdout"]["styles"] == [] and meta["items"] == 12
    assert all(it["split"] == it["concept_split"] and it["heldout"] is None
               for it in iter_jsonl(tmp_path / "emoji_art" / "index.jsonl"))


# -- the renderer -----------------------------------------------------------------------------------------
def pixels(png):
    return np.asarray(Image.open(io.BytesIO(png)))


def test_render_red_square_on_a_background():
    icon = parse_icon_set({"prefix": "t", "icons": {"sq": {"body": '<rect width="16" height="16" fill="#ff0000"/>'}}})
    look = Look("light blue", (228, 238, 250), None, None, scale=0.5, dx=0.0, dy=0.0)
    a = pixels(render_png(compose_svg(icon.resolve("sq"), look)))
    assert a.shape == (64, 64, 3)
    red = np.zeros((64, 64), bool)
    red[16:48, 16:48] = True  # half the side, centred
    assert (a[red] == (255, 0, 0)).all() and (a[~red] == (228, 238, 250)).all()


def test_render_current_colour_flip_and_rotation():
    s = parse_icon_set({"prefix": "t", "width": 16, "height": 16,
                        "icons": {"right": {"body": '<path fill="currentColor" d="M8 0h8v16H8z"/>'}},
                        "aliases": {"left": {"parent": "right", "hFlip": True},
                                    "down": {"parent": "right", "rotate": 1}}})
    look = Look("white", (255, 255, 255), "red", COLOURS["red"], scale=1.0, dx=0.0, dy=0.0)
    want_half = {"right": (slice(None), slice(32, 64)), "left": (slice(None), slice(0, 32)),
                 "down": (slice(32, 64), slice(None))}
    for name, half in want_half.items():
        a = pixels(render_png(compose_svg(s.resolve(name), look)))
        mask = np.zeros((64, 64), bool)
        mask[half] = True
        assert (a[mask] == COLOURS["red"]).all() and (a[~mask] == 255).all(), name
    assert icon_svg(s.resolve("left"), "#123456") == (
        '<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="16" height="16" '
        'viewBox="0 0 16 16"><g transform="translate(16 0) scale(-1 1)"><path fill="#123456" d="M8 0h8v16H8z"/></g>'
        '</svg>')


def test_look_is_a_function_of_the_key():
    a, b = look_for("iconsets:mdi:home", True), look_for("iconsets:mdi:home", True)
    assert a == b and a.colour is not None and 0.78 <= a.scale <= 0.94
    assert look_for("iconsets:mdi:home", False).colour is None
    looks = [look_for(f"k{i}", True) for i in range(2000)]
    share_white = sum(lk.background == "white" for lk in looks) / 2000
    share_black = sum(lk.colour == "black" for lk in looks) / 2000
    assert abs(share_white - 0.5) < 0.04 and abs(share_black - 0.4) < 0.04
    assert {lk.colour for lk in looks} == {"black", *COLOURS}
    assert all(abs(lk.dx) <= (1 - lk.scale) / 4 and abs(lk.dy) <= (1 - lk.scale) / 4 for lk in looks)


# -- limoe data info --------------------------------------------------------------------------------------
def test_cli_info_lists_every_set_with_licence_and_count(cache, capsys):
    parser = argparse.ArgumentParser(prog="limoe")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", "info", "--cache", str(cache)])
    assert args.func(args) == 0
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in capsys.readouterr().out.splitlines()}
    assert rows[("emoji_art", "twemoji")] == ["CC-BY-4.0", "0", "0", "4", "4"]
    assert rows[("emoji_art", "fxemoji")][0] == "Apache-2.0" and rows[("emoji_art", "fxemoji")][-1] == "6"
    assert rows[("iconsets", "mdi")][0] == "Apache-2.0" and rows[("iconsets", "mdi")][-1] == "4"
    assert rows[("iconsets", "flag")][0] == "MIT" and rows[("iconsets", "flag")][-1] == "3"
    assert rows[("emoji_art:", "licences")] == ["Apache-2.0,", "CC-BY-4.0,", "MIT;", "held-out", "style", "twemoji"]
