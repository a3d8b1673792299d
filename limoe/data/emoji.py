"""`emoji`: the 64 px emoji PNGs of two art styles (Google's Noto, Twitter's Twemoji) with captions
from the Unicode names and short names of emoji-datasource and the CLDR English labels and tags
of emojibase-data.

Splits. Every emoji *concept* (the base code point sequence; its skin-tone variants share it)
is put in train / val / test by a hash of "emoji:<code>". On top of that:
  - `holdout_style` (default "twitter"): every image of that art style is "test", so a model
    trained on Noto art is evaluated on Twemoji art it never saw (style transfer). Items carry
    `concept_split`, the split their concept would have had, so an evaluation can separate
    "unseen style, seen concept" from "unseen style, unseen concept".
  - `holdout_concepts`: labels, codes or category names forced into "test" for every style.
  - `heldout` says why an item is in test beyond the hash: "style", "concept" or null.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from limoe.data.format import TEST_FRACTION, VAL_FRACTION, SourceWriter, is_built, read_meta, split_for
from limoe.data.licenses import licenses_for
from limoe.data.npm import fetch_packages, iter_tar, read_tar_member

NAME = "emoji"
PACKAGES = {"google": "emoji-datasource-google@16.0.0", "twitter": "emoji-datasource-twitter@16.0.0"}
EMOJIBASE = "emojibase-data@17.0.0"
DEFAULT_HOLDOUT_STYLE = "twitter"
IMAGE_SIZE = 64  # img/<vendor>/64/

SKIN_TONES = {"1F3FB": "light skin tone", "1F3FC": "medium-light skin tone", "1F3FD": "medium skin tone",
              "1F3FE": "medium-dark skin tone", "1F3FF": "dark skin tone"}


def normalize_code(code: str) -> str:
    """"1f636-200d-1f32b-fe0f" -> "1F636-200D-1F32B": upper case, without the FE0F variation
    selector (emoji-datasource and emojibase disagree about where they write it)."""
    return "-".join(p for p in code.strip().upper().split("-") if p and p != "FE0F")


def emojibase_index(records: Iterable[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """emojibase en/data.json -> {normalised hexcode: record}, skin variants included (each with
    "base" pointing at its parent record)."""
    index: dict[str, dict[str, Any]] = {}
    for r in records:
        index[normalize_code(r["hexcode"])] = r
        for s in r.get("skins") or ():
            index[normalize_code(s["hexcode"])] = {**s, "base": r}
    return index


def _dedupe(texts: Iterable[str]) -> list[str]:
    seen, out = set(), []
    for t in texts:
        t = " ".join(str(t).split())
        if t and t.lower() not in seen:
            seen.add(t.lower())
            out.append(t)
    return out


def _short_name_text(s: str) -> str:
    return s.replace("_", " ").strip()


def emoji_captions(record: dict[str, Any], cldr: dict[str, Any] | None = None,
                   skin: str | None = None) -> tuple[str, list[str]]:
    """(class name, captions) of an emoji.json record, or of its skin-tone variant `skin` (a key
    of record["skin_variations"], e.g. "1F3FD"). `cldr` is the emojibase record of the item (the
    variant's own record for a variant; its "base" then holds the parent's label and tags).

    The class name is the CLDR label of the base emoji ("grinning face"), else its lower-cased
    Unicode name. The first caption is the canonical one: the item's own CLDR label."""
    unicode_name = (record.get("name") or "").lower()
    base_cldr = (cldr or {}).get("base", cldr) if skin else cldr
    label = (base_cldr or {}).get("label") or unicode_name
    tags = [str(t) for t in (base_cldr or {}).get("tags") or ()]
    short = [_short_name_text(s) for s in record.get("short_names") or [record.get("short_name", "")] if s]
    label_words = set(label.lower().split())
    new_tags = [t for t in tags if t.lower() not in label_words]

    if not skin:
        captions = [label, unicode_name, f"{label} emoji", f"an emoji of {label}", *short]
        if new_tags:
            captions.append(f"{label}: {', '.join(new_tags[:4])}")
            captions.append(", ".join(tags[:6]))
        return label, _dedupe(captions)

    own = (cldr or {}).get("label") or ""
    tone = own.split(": ", 1)[1] if ": " in own else \
        ", ".join(SKIN_TONES.get(p, p.lower()) for p in skin.upper().split("-"))
    captions = [own or f"{label}: {tone}", f"{label} with {tone}", f"{unicode_name}, {tone}",
                f"{label} emoji, {tone}", *(f"{s}, {tone}" for s in short)]
    if new_tags:
        captions.append(f"{label}, {tone}: {', '.join(new_tags[:4])}")
    return label, _dedupe(captions)


def _is_heldout_concept(entry: str, code: str, *names: str) -> bool:
    """`entry` (from holdout_concepts) names this concept: its code, label, Unicode name or category."""
    e = entry.strip().lower()
    return normalize_code(entry) == code or e in {n.lower() for n in names if n}


def emoji_items(vendor: str, records: list[dict[str, Any]], cldr_index: dict[str, dict[str, Any]],
                holdout_style: str | None = DEFAULT_HOLDOUT_STYLE, holdout_concepts: Iterable[str] = (),
                skin_tones: bool = True, val: float = VAL_FRACTION, test: float = TEST_FRACTION
                ) -> list[tuple[dict[str, Any], str]]:
    """(item without "image", image file name in img/<vendor>/64/) for every emoji of one vendor that
    has an image, in emoji.json sort order, variants after their base."""
    holdout_concepts = [c for c in holdout_concepts if c.strip()]
    out = []
    for rec in sorted(records, key=lambda r: (r.get("sort_order", 0), r["unified"])):
        base_code = normalize_code(rec["unified"])
        variants = [(None, rec)]
        if skin_tones:
            variants += sorted((rec.get("skin_variations") or {}).items())
        for skin, var in variants:
            if not var.get(f"has_img_{vendor}", False):
                continue
            code = normalize_code(var["unified"])
            label, captions = emoji_captions(rec, cldr_index.get(code), skin)
            concept_split = split_for(f"emoji:{base_code}", val, test)
            heldout = None
            if holdout_style and vendor == holdout_style:
                heldout = "style"
            elif any(_is_heldout_concept(c, base_code, label, rec.get("name") or "", rec.get("category") or "")
                     for c in holdout_concepts):
                heldout = "concept"
            item = {"id": f"{vendor}-{var['unified'].lower()}", "captions": captions, "label": label,
                    "source": NAME, "style": vendor, "split": "test" if heldout else concept_split,
                    "concept_split": concept_split, "heldout": heldout, "concept": base_code.lower(),
                    "unified": var["unified"], "unicode_name": (rec.get("name") or "").lower(),
                    "short_names": rec.get("short_names") or [], "category": rec.get("category"),
                    "subcategory": rec.get("subcategory")}
            if skin:
                item["skin_tone"] = skin
            out.append((item, var["image"]))
    return out


def prepare_emoji(cache: str | Path, force: bool = False, holdout_style: str | None = DEFAULT_HOLDOUT_STYLE,
                  holdout_concepts: Iterable[str] = (), skin_tones: bool = True,
                  vendors: Iterable[str] = ("google", "twitter"),
                  val: float = VAL_FRACTION, test: float = TEST_FRACTION,
                  tarballs: dict[str, str | Path] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build <cache>/emoji (see the module doc). `tarballs` ({"google": path, "twitter": path,
    "emojibase": path}) skips npm, e.g. for tests; the default fetches and verifies them with npm
    into <cache>/downloads. Returns the source's SOURCE.json record."""
    cache = Path(cache)
    vendors = list(vendors)
    if holdout_style is not None and holdout_style not in PACKAGES:
        raise ValueError(f"holdout_style must be one of {list(PACKAGES)} or None, not {holdout_style!r}")
    params = {"vendors": vendors, "holdout_style": holdout_style, "holdout_concepts": sorted(holdout_concepts),
              "skin_tones": skin_tones, "val": val, "test": test,
              "packages": [PACKAGES[v] for v in vendors] + [EMOJIBASE]}
    if not force and is_built(cache / NAME, params):
        log(f"{NAME}: already prepared in {cache / NAME}")
        return read_meta(cache / NAME)

    downloads = []
    if tarballs is None:
        tarballs, downloads = fetch_packages({**{v: PACKAGES[v] for v in vendors}, "emojibase": EMOJIBASE},
                                             cache / "downloads", log)
    cldr_index = emojibase_index(json.loads(read_tar_member(tarballs["emojibase"], "package/en/data.json")))

    with SourceWriter(cache, NAME, params) as writer:
        for vendor in vendors:
            records = json.loads(read_tar_member(tarballs[vendor], "package/emoji.json"))
            plan = emoji_items(vendor, records, cldr_index, holdout_style, holdout_concepts, skin_tones, val, test)
            prefix = f"package/img/{vendor}/{IMAGE_SIZE}/"
            wanted = {prefix + image for _, image in plan}
            images: dict[str, bytes] = {}
            with tqdm(total=len(wanted), desc=f"emoji {vendor}", unit="img") as bar:
                for name, data in iter_tar(tarballs[vendor], wanted.__contains__):
                    images[name] = data
                    bar.update(1)
            missing = 0
            for item, image in plan:
                data = images.get(prefix + image)
                if data is None:  # listed with has_img_<vendor> but not shipped
                    missing += 1
                    continue
                writer.add(item, data, f"images/{vendor}/{image}")
            if missing:
                log(f"{NAME} {vendor}: {missing} images listed in emoji.json are not in the package; skipped")
        return writer.finish(licenses=licenses_for(NAME), downloads=downloads,
                             description="Emoji images (Noto, Twemoji) with Unicode/CLDR captions",
                             holdout={"style": holdout_style, "concepts": sorted(holdout_concepts),
                                      "rule": "split by hash of the base emoji code; the held-out style "
                                              "is all 'test'"})


__all__ = [
    "DEFAULT_HOLDOUT_STYLE",
    "EMOJIBASE",
    "NAME",
    "PACKAGES",
    "emoji_captions",
    "emoji_items",
    "emojibase_index",
    "normalize_code",
    "prepare_emoji",
]
