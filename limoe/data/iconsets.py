"""`iconsets`: named icons of 123 openly licensed Iconify icon sets (`@iconify-json/*`, pinned and
reviewed in limoe/data/iconify_sets.py), rendered from SVG, with captions from the icon name, its
style variant, its category and its other names; flags named by country.

Each set is one `style` (its Iconify prefix). Icons: every visible (not deprecated) icon, plus
aliases that are pictures of their own (rotated or flipped); aliases that show the same picture
add their names to the captions instead. Animated icons and repeated identical pictures are left
out. Monochrome icons (drawn in `currentColor`) are rendered in black (40 %) or one of the 8
colours of the `scenes` source, named in a caption ("a red icon of a house"); multicolour sets
keep their colours.

Names. The set's metadata "prefixes"/"suffixes" mark style variants ("home-outline-rounded" is
"home", variant "Outline Rounded"); for sets without, a trailing style word (outline, filled,
solid, bold, ...) is split off the same way. The rest, hyphens as spaces, is `label` ("home").

Flags (flag, circle-flags, flagpack, cif). The name's ISO 3166-1 code ("fr", "gb-eng") is named
by the CLDR name of its flag emoji in emojibase ("flag: France"): label "flag of france",
captions "the flag of France", "France flag", "flag: France", "a round flag of France", ...
Flags without a flag emoji (regions, languages, organisations other than EU and UN) are left out.

Splits. A hash of the concept, not of the icon, so one concept's icons in all sets share a
split and near-duplicates across sets do not straddle train and test:
  - icons: split_for("icons:<base name>"), the key the `icons` source (Tabler) uses for a name,
    so equal names agree across both sources ("arrow-left" is in the same split everywhere);
  - flags: split_for("emoji:<flag code point>"), the key of the `emoji` and `emoji_art`
    sources, so a country's flag is in the same split in all three.
Different names for one thing ("home" / "house") can still fall in different splits.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from limoe.data.emoji import EMOJIBASE, emojibase_index, normalize_code
from limoe.data.emoji_art import slug
from limoe.data.format import TEST_FRACTION, VAL_FRACTION, SourceWriter, is_built, read_meta, split_for
from limoe.data.iconify import Icon, IconSet, iter_icons, load_icon_sets, split_variant
from limoe.data.iconify_sets import FLAG_SETS, ICON_SETS
from limoe.data.licenses import licenses_for
from limoe.data.npm import fetch_packages, read_tar_member
from limoe.data.render import SIZE, Look, look_for, renderer_version, write_rendered

NAME = "iconsets"
SETS = tuple(ICON_SETS)
# trailing words that name a drawing style, not a thing (used when the set's metadata has none)
GENERIC_VARIANTS = ("outline", "outlined", "fill", "filled", "solid", "regular", "light", "thin", "bold",
                    "duotone", "twotone", "sharp", "rounded")
FLAG_VARIANTS = {"1x1": "square", "4x3": "rectangular"}  # suffixes of the `flag` set
_REGIONAL = range(0x1F1E6, 0x1F1FF + 1)
_TAGS = range(0xE0061, 0xE007A + 1)


# -- flags -----------------------------------------------------------------------------------------
def flag_names(cldr_index: dict[str, dict[str, Any]]) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """From emojibase: ({"fr": (code "1F1EB-1F1F7", "France"), "gb-eng": (..., "England"), ...},
    {slug of the name: iso}) for every flag emoji of a country, region or subdivision."""
    by_iso: dict[str, tuple[str, str]] = {}
    by_slug: dict[str, str] = {}
    for code, rec in sorted(cldr_index.items()):
        label = rec.get("label") or ""
        if "base" in rec or not label.startswith("flag: "):
            continue
        cps = [int(p, 16) for p in code.split("-")]
        if len(cps) == 2 and all(c in _REGIONAL for c in cps):
            iso = "".join(chr(ord("a") + c - 0x1F1E6) for c in cps)
        elif cps[0] == 0x1F3F4 and cps[-1] == 0xE007F and all(c in _TAGS for c in cps[1:-1]):
            letters = "".join(chr(ord("a") + c - 0xE0061) for c in cps[1:-1])
            iso = f"{letters[:2]}-{letters[2:]}"
        else:
            continue
        country = label[len("flag: "):]
        by_iso[iso] = (code, country)
        by_slug[slug(country)] = iso
    return by_iso, by_slug


def flag_iso(name: str, by_iso: dict[str, tuple[str, str]], by_slug: dict[str, str]) -> str | None:
    """The ISO code of a flag icon's (variant-free) name: "fr", "gb-eng", "european-union" -> "eu"."""
    if name in by_iso:
        return name
    return by_slug.get(name)


def flag_captions(country: str, adjective: str | None = None) -> tuple[str, list[str]]:
    """(label, captions) of a country's flag: ("flag of france", ["the flag of France", ...])."""
    caps = [f"the flag of {country}", f"flag of {country}", f"{country} flag", f"flag: {country}",
            f"a flag icon of {country}", f"the {country} flag"]
    if adjective:
        caps.append(f"a {adjective} flag of {country}")
    return f"flag of {country.lower()}", list(dict.fromkeys(caps))


# -- icons -----------------------------------------------------------------------------------------
def _words(name: str) -> str:
    return " ".join(name.replace("_", "-").split("-")).strip()


def _category_text(category: str) -> str:
    """"ArtificialIntelligence" -> "artificial intelligence"."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])", " ", category).lower().strip()


def _article(words: str) -> str:
    return "an" if words[:1].lower() in "aeiou" else "a"


def icon_captions(label: str, variant: str | None = None, category: str | None = None,
                  aliases: Iterable[str] = (), colour: str | None = None) -> list[str]:
    """Captions of an icon, canonical first: "an icon of a house", "house icon", "house", then
    the colour ("a red icon of a house"), variant ("outline house icon"), category
    ("house, buildings icon") and other names ("home icon") where known."""
    a = _article(label)
    caps = [f"an icon of {a} {label}", f"{label} icon", label]
    if colour:
        caps += [f"a {colour} icon of {a} {label}", f"{colour} {label} icon"]
    if variant and variant.lower() not in ("regular", "default"):
        caps.append(f"{variant.lower()} {label} icon")
    if category:
        caps.append(f"{label}, {_category_text(category)} icon")
    alias_words = [w for w in dict.fromkeys(_words(x) for x in aliases) if w and w != label][:3]
    for w in alias_words[:2]:
        caps.append(f"{w} icon")
    if alias_words:
        caps.append(f"{label} ({', '.join(alias_words)})")
    return list(dict.fromkeys(caps))


def plan_set(icon_set: IconSet, flags: tuple[dict[str, tuple[str, str]], dict[str, str]] | None = None,
             val: float = VAL_FRACTION, test: float = TEST_FRACTION
             ) -> tuple[list[tuple[dict[str, Any], Icon, Look]], dict[str, int]]:
    """[(item without "image", icon, look)] of one set, in icon name order, and counts of what was
    left out. `flags` (flag_names(...)) makes it a flag set."""
    prefix = icon_set.prefix
    skipped: dict[str, int] = defaultdict(int)
    aliases = icon_set.pure_aliases()
    out, seen = [], set()
    for icon in iter_icons(icon_set):
        if icon.animated:
            skipped["animated"] += 1
            continue
        if "<text" in icon.body:
            skipped["text (needs fonts)"] += 1
            continue
        if icon.picture in seen:
            skipped["duplicate picture"] += 1
            continue
        base, variant = split_variant(icon.name, icon_set.prefixes, icon_set.suffixes,
                                      () if flags else GENERIC_VARIANTS)
        item_id = f"{prefix}:{icon.name}"
        look = look_for(f"{NAME}:{item_id}", icon.monochrome and not icon_set.palette and not flags)
        common = {"id": item_id, "source": NAME, "style": prefix, "icon": icon.name, "license": icon_set.license,
                  "colour": look.colour, "heldout": None}
        if flags is not None:
            iso = flag_iso(base, *flags)
            if iso is None:
                skipped["flag without a CLDR country name"] += 1
                continue
            code, country = flags[0][iso]
            adjective = FLAG_SETS.get(prefix)
            if variant in FLAG_VARIANTS:
                adjective = FLAG_VARIANTS[variant]
            label, captions = flag_captions(country, adjective)
            split = split_for(f"emoji:{normalize_code(code)}", val, test)
            item = {**common, "captions": captions, "label": label, "split": split, "concept": code.lower(),
                    "country": country, "iso": iso.upper(), "variant": variant, "category": "Flags"}
        else:
            label = _words(base)
            if not label:
                skipped["no name"] += 1
                continue
            category = icon_set.category_of(icon.name) or icon_set.category_of(icon.parent or "")
            names = [*aliases.get(icon.name, ())]
            bases = (split_variant(a, icon_set.prefixes, icon_set.suffixes, GENERIC_VARIANTS)[0] for a in names)
            other = [b for b in dict.fromkeys(bases) if b != base]
            captions = icon_captions(label, variant, category, other, look.colour)
            item = {**common, "captions": captions, "label": label, "split": split_for(f"icons:{base}", val, test),
                    "concept": base, "variant": variant, "category": category, "aliases": names}
        seen.add(icon.picture)
        out.append((item, icon, look))
    return out, dict(skipped)


def prepare_iconsets(cache: str | Path, force: bool = False, sets: Iterable[str] = SETS, val: float = VAL_FRACTION,
                     test: float = TEST_FRACTION, workers: int | None = None,
                     tarballs: dict[str, str | Path] | None = None,
                     log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build <cache>/iconsets (see the module doc). `tarballs` ({prefix: path, "emojibase": path})
    skips npm (tests); then any prefix is allowed, with the licence policy still applied."""
    cache = Path(cache)
    sets = list(sets)
    if tarballs is None:
        unknown = [s for s in sets if s not in ICON_SETS]
        if unknown:
            raise ValueError(f"unknown icon set(s) {unknown}; the pinned ones are in limoe/data/iconify_sets.py")
    params = {"sets": sets, "val": val, "test": test, "size": SIZE, "renderer": f"resvg-py {renderer_version()}",
              "packages": [f"@iconify-json/{s}@{ICON_SETS[s]['version']}" if s in ICON_SETS else s for s in sets]
              + [EMOJIBASE]}
    if not force and is_built(cache / NAME, params):
        log(f"{NAME}: already prepared in {cache / NAME}")
        return read_meta(cache / NAME)

    downloads: list[dict] = []
    if tarballs is None:
        meta_tar, downloads = fetch_packages({"emojibase": EMOJIBASE}, cache / "downloads", log)
    else:
        meta_tar = tarballs
    flags = flag_names(emojibase_index(json.loads(read_tar_member(meta_tar["emojibase"], "package/en/data.json"))))

    plan: list[tuple[dict[str, Any], Icon, Look]] = []
    per_set: dict[str, dict[str, Any]] = {}
    for prefix in tqdm(sets, desc=f"{NAME} read", unit="set"):
        loaded, recs = load_icon_sets([prefix], ICON_SETS, cache / "downloads",
                                      tarballs=None if tarballs is None else tarballs, log=log)
        downloads += recs
        s = loaded[prefix]
        s.prefix = prefix
        items, skipped = plan_set(s, flags if prefix in FLAG_SETS else None, val, test)
        plan += items
        rec = ICON_SETS.get(prefix, {})
        per_set[prefix] = {"name": rec.get("name") or s.info.get("name"), "license": s.license,
                           "author": rec.get("author") or (s.info.get("author") or {}).get("name"),
                           "package": f"@iconify-json/{prefix}@{rec['version']}" if rec else None,
                           "items": len(items), "palette": s.palette, "flags": prefix in FLAG_SETS,
                           "skipped": skipped}
    log(f"{NAME}: {len(plan)} icons from {len(sets)} sets")

    with SourceWriter(cache, NAME, params) as writer:
        write_rendered(writer, plan, workers, NAME)
        return writer.finish(licenses=licenses_for(NAME, sets), downloads=downloads, sets=per_set,
                             description="Openly licensed Iconify icon sets rendered from SVG, captions from names, "
                                         "variants, categories and aliases; flags named by country",
                             holdout={"rule": "split by hash of icons:<base name> (flags: emoji:<flag code>); "
                                              "no style held out"})


__all__ = ["FLAG_VARIANTS", "GENERIC_VARIANTS", "NAME", "SETS", "flag_captions", "flag_iso", "flag_names",
           "icon_captions", "plan_set", "prepare_iconsets"]
