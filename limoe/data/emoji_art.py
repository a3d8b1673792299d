"""`emoji_art`: twelve openly licensed emoji art styles from the `@iconify-json/*` packages,
rendered from SVG, each image labelled through its code point with the CLDR label the `emoji`
source uses, so class names agree across all styles and both sources.

Styles (the Iconify prefix; licences in limoe/data/iconify_sets.py): noto, noto-v1 (Google's
2016 "blob" Noto art), openmoji, fluent-emoji (Fluent colour), fluent-emoji-flat,
fluent-emoji-high-contrast, emojione (v2), emojione-v1, emojione-monotone, fxemoji (Firefox OS),
streamline-emojis, twemoji. Apple's and Facebook's art (emoji-datasource-apple/-facebook) is not
openly licensed and is never used.

Code points. A set with a `chars.json` (code point -> icon name: twemoji, noto, openmoji,
fluent-emoji-flat, fluent-emoji-high-contrast) is mapped through it, and only through it. The
others are mapped by name (`EmojiNames`): the icon name, or one of its plain aliases, is looked
up, in this order, among the slugs of (1) the CLDR labels of emojibase ("grinning-face"),
(2) the icon names of the chars-mapped sets of this build, (3) the Unicode names and short names
of emoji-datasource's emoji.json; a name that means several emoji in the first tier that has it
is left out. Then "flag-for-X" is tried as "flag-X", "X-2" as "X" (numbered variants), and the
name with its hyphens removed (fxemoji's "alarmclock"). Only code points emojibase knows are
kept (OpenMoji's own extra symbols in the private use area are not emoji and are skipped). On
the five chars-mapped sets this name lookup agrees with chars.json on 99.8 % of the icons.

Labels, captions, concepts: exactly the `emoji` source's (limoe.data.emoji.emoji_captions with
emoji-datasource's record of the base emoji and emojibase's record of the item): `label` is the
base emoji's CLDR label, skin-tone variants are included and share it, `concept` is the base
code, `concept_split` is split_for("emoji:<BASE CODE>"), the same key as the `emoji` source's.

Held out: DEFAULT_HOLDOUT_STYLES = ("twemoji",), the same art the `emoji` source holds out
(its "twitter" style): every item of a held-out style is "test", with `heldout: "style"`. A
model trained on both sources never sees Twemoji art.

Images: 64 x 64 RGB, the icon rendered by resvg on a light background (limoe.data.render);
the two monochrome styles (fluent-emoji-high-contrast, emojione-monotone) are drawn in black or
a colour, named in a caption ("a red emoji of dog face").
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from limoe.data.emoji import EMOJIBASE, PACKAGES, SKIN_TONES, emoji_captions, emojibase_index, normalize_code
from limoe.data.format import TEST_FRACTION, VAL_FRACTION, SourceWriter, is_built, read_meta, split_for
from limoe.data.iconify import Icon, IconSet, iter_icons, load_icon_sets
from limoe.data.iconify_sets import EMOJI_SETS
from limoe.data.licenses import licenses_for
from limoe.data.npm import fetch_packages, read_tar_member
from limoe.data.render import SIZE, Look, look_for, renderer_version, write_rendered

NAME = "emoji_art"
STYLES = tuple(EMOJI_SETS)
DEFAULT_HOLDOUT_STYLES = ("twemoji",)
# emoji.json of this package gives Unicode names, short names and categories (no image is used).
EMOJI_DATA = PACKAGES["google"]
# emojibase "group" -> the category names of emoji-datasource (used when emoji.json lacks the emoji)
EMOJIBASE_GROUPS = {0: "Smileys & Emotion", 1: "People & Body", 2: "Component", 3: "Animals & Nature",
                    4: "Food & Drink", 5: "Travel & Places", 6: "Activities", 7: "Objects", 8: "Symbols", 9: "Flags"}
# --emoji-holdout-style of the `emoji` source -> the same art here.
HOLDOUT_FOR_EMOJI_STYLE: dict[str | None, tuple[str, ...]] = {"twitter": ("twemoji",), "google": ("noto",),
                                                               None: ()}


def slug(text: str) -> str:
    """"Flag: Côte d’Ivoire" -> "flag-cote-divoire": accents dropped, apostrophes removed, every
    other run of non-alphanumerics one hyphen (how Iconify names emoji)."""
    t = unicodedata.normalize("NFKD", text)
    t = "".join(c for c in t if not unicodedata.combining(c)).lower()
    t = re.sub(r"[’'‘`\"“”]", "", t)
    return re.sub(r"[^a-z0-9]+", "-", t).strip("-")


class EmojiNames:
    """Icon name -> code point, for sets without a chars map (see the module doc)."""

    def __init__(self, cldr_index: dict[str, dict[str, Any]], emoji_records: Iterable[dict[str, Any]] = (),
                 chars_sets: Iterable[IconSet] = ()):
        tiers: list[dict[str, set[str]]] = [defaultdict(set) for _ in range(3)]
        for code, rec in cldr_index.items():
            if rec.get("label"):
                tiers[0][slug(rec["label"])].add(code)
        for s in chars_sets:
            names = _chars_names(s, cldr_index)
            aliases = s.pure_aliases()
            for name, code in names.items():
                tiers[1][name].add(code)
                for a in aliases.get(name, ()):
                    tiers[1][a].add(code)
        for rec in emoji_records:
            code = normalize_code(rec["unified"])
            if code in cldr_index:
                for n in [rec.get("name") or "", *(rec.get("short_names") or ())]:
                    if n:
                        tiers[2][slug(n)].add(code)
        self.tiers = [dict(t) for t in tiers]
        squashed: dict[str, set[str]] = defaultdict(set)
        for t in self.tiers:
            for k, codes in t.items():
                squashed[k.replace("-", "")] |= codes
        self.squashed = {k: next(iter(v)) for k, v in squashed.items() if len(v) == 1}

    @staticmethod
    def candidates(name: str) -> list[str]:
        out = [name, re.sub(r"^flag-for-(flag-)?", "flag-", name), re.sub(r"-\d+$", "", name)]
        return list(dict.fromkeys(c for c in out if c))

    def lookup(self, name: str) -> str | None:
        """The code point of an icon name, or None (unknown or ambiguous)."""
        cands = self.candidates(name)
        for c in cands:
            for tier in self.tiers:
                codes = tier.get(c)
                if codes:
                    if len(codes) == 1:
                        return next(iter(codes))
                    break  # ambiguous in the most trusted tier that has it: try the next form
        for c in cands:
            code = self.squashed.get(c.replace("-", ""))
            if code:
                return code
        return None


def _chars_names(icon_set: IconSet, cldr_index: dict[str, dict[str, Any]]) -> dict[str, str]:
    """{icon name: code} from the set's chars map, for code points emojibase knows (the first code,
    in sorted order, when several map to one icon)."""
    out: dict[str, str] = {}
    for ch in sorted(icon_set.chars):
        code = normalize_code(ch)
        name = icon_set.chars[ch]
        if code in cldr_index and name not in out:
            out[name] = code
    return out


def map_icons(icon_set: IconSet, names: EmojiNames, cldr_index: dict[str, dict[str, Any]]
              ) -> tuple[list[tuple[Icon, str, str]], dict[str, int]]:
    """([(icon, code, "chars" | "name")], counts of what was skipped) for one emoji set, icons in
    name order; identical pictures of one set are kept once."""
    skipped: dict[str, int] = defaultdict(int)
    by_chars = _chars_names(icon_set, cldr_index) if icon_set.chars else None
    aliases = icon_set.pure_aliases()
    out, seen = [], set()
    for icon in iter_icons(icon_set):
        if by_chars is not None:
            code, how = by_chars.get(icon.name), "chars"
        else:
            code, how = names.lookup(icon.name), "name"
            for a in aliases.get(icon.name, ()):
                code = code or names.lookup(a)
        if code is None:
            skipped["no emoji code point"] += 1
            continue
        cldr = cldr_index[code]
        if cldr.get("group", cldr.get("base", {}).get("group")) is None:  # regional indicator letters
            skipped["not an emoji on its own"] += 1
            continue
        if icon.animated:
            skipped["animated"] += 1
            continue
        if icon.picture in seen:
            skipped["duplicate picture"] += 1
            continue
        seen.add(icon.picture)
        out.append((icon, code, how))
    return out, dict(skipped)


def _emoji_data_index(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """emoji.json -> {normalised code of the base emoji: record}."""
    return {normalize_code(r["unified"]): r for r in records}


def art_item(style: str, icon: Icon, code: str, how: str, cldr_index: dict[str, dict[str, Any]],
             emoji_data: dict[str, dict[str, Any]], look: Look, license: str | None,
             holdout_styles: Iterable[str] = DEFAULT_HOLDOUT_STYLES, val: float = VAL_FRACTION,
             test: float = TEST_FRACTION) -> dict[str, Any]:
    """The index record of one emoji image (without "image"), drawn with `look` (look_for of
    "emoji_art:<id>")."""
    cldr = cldr_index[code]
    base = cldr.get("base", cldr)
    base_code = normalize_code(base["hexcode"])
    skin = None
    if "base" in cldr:
        skin = "-".join(p for p in code.split("-") if p in SKIN_TONES) or None
    record = emoji_data.get(base_code) or {"name": "", "short_names": []}
    label, captions = emoji_captions(record, cldr, skin)
    item_id = f"{style}:{icon.name}"
    if look.colour:
        captions = [*captions, f"a black and white emoji of {label}" if look.colour == "black"
                    else f"a {look.colour} emoji of {label}"]
    concept_split = split_for(f"emoji:{base_code}", val, test)
    heldout = "style" if style in set(holdout_styles) else None
    item = {"id": item_id, "captions": captions, "label": label, "source": NAME, "style": style,
            "split": "test" if heldout else concept_split, "concept_split": concept_split, "heldout": heldout,
            "concept": base_code.lower(), "code": code, "icon": icon.name, "mapped_by": how,
            "unicode_name": (record.get("name") or "").lower(),
            "category": record.get("category") or EMOJIBASE_GROUPS.get(base.get("group")),
            "colour": look.colour, "license": license}
    if skin:
        item["skin_tone"] = skin
    return item


def prepare_emoji_art(cache: str | Path, force: bool = False, styles: Iterable[str] = STYLES,
                      holdout_styles: Iterable[str] = DEFAULT_HOLDOUT_STYLES, skin_tones: bool = True,
                      val: float = VAL_FRACTION, test: float = TEST_FRACTION, workers: int | None = None,
                      tarballs: dict[str, str | Path] | None = None,
                      log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build <cache>/emoji_art (see the module doc). `tarballs` ({style: path, "emojibase": path,
    optionally "emoji_data": path}) skips npm, e.g. for tests. Returns its SOURCE.json record."""
    cache = Path(cache)
    styles, holdout_styles = list(styles), sorted(set(holdout_styles))
    if tarballs is None:
        unknown = [s for s in [*styles, *holdout_styles] if s not in EMOJI_SETS]
        if unknown:
            raise ValueError(f"unknown emoji art style(s) {unknown}; choose from {', '.join(STYLES)}")
    params = {"styles": styles, "holdout_styles": holdout_styles, "skin_tones": skin_tones, "val": val, "test": test,
              "size": SIZE, "renderer": f"resvg-py {renderer_version()}",
              "packages": [f"@iconify-json/{s}@{EMOJI_SETS[s]['version']}" if s in EMOJI_SETS else s for s in styles]
              + [EMOJIBASE, EMOJI_DATA]}
    if not force and is_built(cache / NAME, params):
        log(f"{NAME}: already prepared in {cache / NAME}")
        return read_meta(cache / NAME)

    downloads: list[dict] = []
    if tarballs is None:
        meta_tar, downloads = fetch_packages({"emojibase": EMOJIBASE, "emoji_data": EMOJI_DATA},
                                             cache / "downloads", log)
        sets, set_downloads = load_icon_sets(styles, EMOJI_SETS, cache / "downloads", log=log)
        downloads = set_downloads + downloads
    else:
        meta_tar = tarballs
        sets, _ = load_icon_sets(styles, EMOJI_SETS, cache / "downloads", tarballs=tarballs, log=log)
    cldr_index = emojibase_index(json.loads(read_tar_member(meta_tar["emojibase"], "package/en/data.json")))
    ed_records = (json.loads(read_tar_member(meta_tar["emoji_data"], "package/emoji.json"))
                  if meta_tar.get("emoji_data") else [])
    emoji_data = _emoji_data_index(ed_records)
    names = EmojiNames(cldr_index, ed_records, [s for s in sets.values() if s.chars])

    plan: list[tuple[dict[str, Any], Icon, Any]] = []
    per_set: dict[str, dict[str, Any]] = {}
    for style in styles:
        s = sets[style]
        mapped, skipped = map_icons(s, names, cldr_index)
        n = 0
        for icon, code, how in mapped:
            if not skin_tones and "base" in cldr_index[code]:
                continue
            look = look_for(f"{NAME}:{style}:{icon.name}", icon.monochrome and not s.palette)
            item = art_item(style, icon, code, how, cldr_index, emoji_data, look, s.license, holdout_styles,
                            val, test)
            plan.append((item, icon, look))
            n += 1
        rec = EMOJI_SETS.get(style, {})
        per_set[style] = {"name": rec.get("name") or s.info.get("name"), "license": s.license,
                          "author": rec.get("author") or (s.info.get("author") or {}).get("name"),
                          "package": f"@iconify-json/{style}@{rec['version']}" if rec else None,
                          "items": n, "mapped_by": "chars" if s.chars else "name", "skipped": skipped,
                          "heldout": style in holdout_styles}
        log(f"{NAME} {style}: {n} images ({per_set[style]['mapped_by']}), skipped "
            + (", ".join(f"{v} {k}" for k, v in sorted(skipped.items())) or "none"))
    del sets

    with SourceWriter(cache, NAME, params) as writer:
        write_rendered(writer, plan, workers, NAME)
        return writer.finish(licenses=licenses_for(NAME, styles), downloads=downloads, sets=per_set,
                             description="Openly licensed emoji art styles (Iconify SVG), CLDR labels by code point",
                             holdout={"styles": holdout_styles,
                                      "rule": "split by hash of emoji:<base code> (as the emoji source); "
                                              "the held-out styles are all 'test'"})


__all__ = [
    "DEFAULT_HOLDOUT_STYLES",
    "EMOJI_DATA",
    "EmojiNames",
    "HOLDOUT_FOR_EMOJI_STYLE",
    "NAME",
    "STYLES",
    "art_item",
    "map_icons",
    "prepare_emoji_art",
    "slug",
]
