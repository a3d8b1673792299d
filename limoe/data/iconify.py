"""The Iconify JSON format (the `@iconify-json/<prefix>` npm packages): reading an icon set,
resolving aliases, building each icon's SVG, splitting style variants off icon names, and the
licence policy the `emoji_art` and `iconsets` sources apply to every set.

An `@iconify-json/<prefix>` tarball holds
    package/icons.json     {"prefix", "icons": {name: {"body", "width"?, "height"?, "left"?, "top"?,
                            "rotate"?, "hFlip"?, "vFlip"?, "hidden"?}}, "aliases": {name: {"parent", ...}},
                            "width"?, "height"?, "left"?, "top"?}   (root values are the defaults: 16 x 16)
    package/info.json      name, author, license {"title", "spdx", "url"}, palette, category
    package/metadata.json  optional: "categories" {category: [names]}, "prefixes"/"suffixes"
                            {variant key: variant title} (a name "<base>-<suffix>" is a style variant)
    package/chars.json     optional: {"1f600": "grinning-face"} code point (hex, "-"-joined) -> icon name

Transformations follow Iconify's own iconToSVG (@iconify/utils): an alias's rotate (quarter turns)
adds to its parent's, hFlip / vFlip are exclusive-ors, and the SVG body is wrapped in a <g> with
the translate / scale / rotate that undo them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from limoe.data.npm import fetch_packages, iter_tar

# Licences accepted for training images (SPDX ids, from each set's info.json "license.spdx").
# Permissive, attribution and share-alike licences and public-domain dedications. Refused:
# GPL / LGPL / MPL (copyleft written for software), NonCommercial and NoDerivatives Creative
# Commons licences, OFL (written for fonts: its terms are about the font software, not artwork),
# anything else or missing.
ACCEPTED_LICENSES = frozenset({
    "MIT", "Apache-2.0", "ISC", "BSD-2-Clause", "BSD-3-Clause", "0BSD",
    "CC-BY-3.0", "CC-BY-4.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0", "CC0-1.0", "Unlicense",
})
ATTRIBUTION_LICENSES = frozenset({"CC-BY-3.0", "CC-BY-4.0", "CC-BY-SA-3.0", "CC-BY-SA-4.0"})
SHARE_ALIKE_LICENSES = frozenset({"CC-BY-SA-3.0", "CC-BY-SA-4.0"})

_ANIMATION = re.compile(r"<(animate|animateTransform|animateMotion|set)\b")
_UNSAFE_NAME = re.compile(r"[^a-z0-9_-]")
_CURRENT_COLOR = re.compile(r"currentColor", re.IGNORECASE)


class LicenseRefused(ValueError):
    """An icon set whose licence is not in ACCEPTED_LICENSES."""


def license_ok(spdx: str | None) -> bool:
    return bool(spdx) and spdx in ACCEPTED_LICENSES


def check_license(prefix: str, spdx: str | None, expected: str | None = None) -> str:
    """The set's SPDX id when it may be used; raises LicenseRefused otherwise (also when it differs
    from the licence recorded in the pinned table, `expected`: a set that changed its licence
    between versions must be reviewed again)."""
    if not license_ok(spdx):
        raise LicenseRefused(f"icon set {prefix!r}: licence {spdx!r} is not accepted "
                             f"(accepted: {', '.join(sorted(ACCEPTED_LICENSES))})")
    if expected is not None and spdx != expected:
        raise LicenseRefused(f"icon set {prefix!r}: licence {spdx!r} differs from the reviewed {expected!r}")
    return spdx  # type: ignore[return-value]


@dataclass(frozen=True)
class Icon:
    """One icon with its defaults applied (a resolved alias looks the same, with its own name)."""

    name: str
    body: str
    left: float = 0
    top: float = 0
    width: float = 16
    height: float = 16
    rotate: int = 0  # quarter turns
    h_flip: bool = False
    v_flip: bool = False
    hidden: bool = False
    parent: str | None = None  # for an alias: the icon it points at (after following chains)

    @property
    def picture(self) -> tuple:
        """What decides the rendered pixels: two icons with the same picture look the same."""
        return (self.body, self.left, self.top, self.width, self.height, self.rotate, self.h_flip, self.v_flip)

    @property
    def monochrome(self) -> bool:
        """Drawn in `currentColor` (the colour the page gives it): colourised when rendered."""
        return bool(_CURRENT_COLOR.search(self.body))

    @property
    def animated(self) -> bool:
        """SMIL animation: a static render shows an arbitrary (often empty) first frame."""
        return bool(_ANIMATION.search(self.body))

    @property
    def transformed(self) -> bool:
        return bool(self.rotate % 4 or self.h_flip or self.v_flip)


@dataclass
class IconSet:
    prefix: str
    icons: dict[str, Icon]  # visible and hidden icons, by name (aliases not included)
    aliases: dict[str, dict[str, Any]] = field(default_factory=dict)  # raw alias records
    info: dict[str, Any] = field(default_factory=dict)
    categories: dict[str, list[str]] = field(default_factory=dict)  # icon name -> categories (in file order)
    prefixes: dict[str, str] = field(default_factory=dict)  # variant key -> title
    suffixes: dict[str, str] = field(default_factory=dict)
    chars: dict[str, str] = field(default_factory=dict)  # code point hex -> icon name
    defaults: dict[str, float] = field(default_factory=dict)

    @property
    def license(self) -> str | None:
        return (self.info.get("license") or {}).get("spdx")

    @property
    def palette(self) -> bool:
        """True for multicolour sets (info.json "palette")."""
        return bool(self.info.get("palette"))

    def resolve(self, name: str) -> Icon:
        """The icon `name`, an icon or an alias (chains followed, transformations merged)."""
        if name in self.icons:
            return self.icons[name]
        chain, cur = [], name
        while cur not in self.icons:
            a = self.aliases.get(cur)
            if a is None or cur in chain or len(chain) > 32:
                raise KeyError(f"{self.prefix}: no icon {name!r}")
            chain.append(cur)
            cur = a["parent"]
        icon = self.icons[cur]
        for alias_name in reversed(chain):  # apply from the one nearest the parent outwards
            a = self.aliases[alias_name]
            icon = replace(icon, name=alias_name, parent=cur,
                           body=a.get("body", icon.body),
                           left=a.get("left", icon.left), top=a.get("top", icon.top),
                           width=a.get("width", icon.width), height=a.get("height", icon.height),
                           rotate=(icon.rotate + int(a.get("rotate", 0))) % 4,
                           h_flip=icon.h_flip != bool(a.get("hFlip", False)),
                           v_flip=icon.v_flip != bool(a.get("vFlip", False)),
                           hidden=bool(a.get("hidden", False)))
        return icon

    def pure_aliases(self) -> dict[str, list[str]]:
        """{icon name: [alias names]} for aliases that show the parent unchanged (other names of the
        same picture), in sorted order."""
        out: dict[str, list[str]] = {}
        for alias in sorted(self.aliases):
            if set(self.aliases[alias]) - {"parent"}:
                continue
            try:
                icon = self.resolve(alias)
            except KeyError:
                continue
            if not icon.transformed and icon.body == self.icons[icon.parent].body:  # type: ignore[index]
                out.setdefault(icon.parent, []).append(alias)  # type: ignore[arg-type]
        return out

    def drawn_aliases(self) -> list[str]:
        """Aliases that are pictures of their own (a rotation, a flip or another body/box), sorted."""
        return sorted(a for a, rec in self.aliases.items() if not a.startswith("_") and set(rec) - {"parent"}
                      and not rec.get("hidden"))

    def visible(self) -> list[str]:
        """Names of the icons that are not hidden (deprecated), sorted."""
        return sorted(n for n, icon in self.icons.items() if not icon.hidden)

    def category_of(self, name: str) -> str | None:
        cats = self.categories.get(name)
        return cats[0] if cats else None


def parse_icon_set(icons_json: dict[str, Any], info: dict[str, Any] | None = None,
                   metadata: dict[str, Any] | None = None, chars: dict[str, str] | None = None) -> IconSet:
    """An IconSet from the parsed files of an @iconify-json package (info may also sit inside
    icons.json under "info", and metadata under its own keys, as in @iconify/json's combined files)."""
    defaults = {k: icons_json.get(k, d) for k, d in (("left", 0), ("top", 0), ("width", 16), ("height", 16))}
    icons = {}
    for name, rec in (icons_json.get("icons") or {}).items():
        icons[name] = Icon(name=name, body=rec["body"],
                           left=rec.get("left", defaults["left"]), top=rec.get("top", defaults["top"]),
                           width=rec.get("width", defaults["width"]), height=rec.get("height", defaults["height"]),
                           rotate=int(rec.get("rotate", 0)) % 4, h_flip=bool(rec.get("hFlip", False)),
                           v_flip=bool(rec.get("vFlip", False)), hidden=bool(rec.get("hidden", False)))
    metadata = metadata or {k: icons_json[k] for k in ("categories", "prefixes", "suffixes") if k in icons_json}
    categories: dict[str, list[str]] = {}
    for cat, names in (metadata.get("categories") or {}).items():
        for n in names:
            categories.setdefault(n, []).append(cat)
    return IconSet(prefix=icons_json.get("prefix", ""), icons=icons, aliases=dict(icons_json.get("aliases") or {}),
                   info=dict(info or icons_json.get("info") or {}), categories=categories,
                   prefixes=dict(metadata.get("prefixes") or {}), suffixes=dict(metadata.get("suffixes") or {}),
                   chars=dict(chars or icons_json.get("chars") or {}), defaults=defaults)


PACKAGE_FILES = ("icons.json", "info.json", "metadata.json", "chars.json")


def read_iconify_tarball(path: str | Path) -> IconSet:
    """The IconSet in an @iconify-json/<prefix> npm tarball (one pass over the archive)."""
    wanted = {f"package/{f}" for f in PACKAGE_FILES}
    files = {name.rsplit("/", 1)[-1]: json.loads(data) for name, data in iter_tar(path, wanted.__contains__)}
    if "icons.json" not in files:
        raise ValueError(f"{path}: no package/icons.json (not an @iconify-json package?)")
    return parse_icon_set(files["icons.json"], files.get("info.json"), files.get("metadata.json"),
                          files.get("chars.json"))


def svg_number(x: float) -> str:
    """Numbers as SVG wants them: no trailing ".0", no exponent."""
    s = f"{x:.6f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def icon_box_and_body(icon: Icon) -> tuple[tuple[float, float, float, float], str]:
    """(viewBox (left, top, width, height), body) with the icon's rotation and flips applied, as
    @iconify/utils iconToSVG does."""
    left, top, width, height = icon.left, icon.top, icon.width, icon.height
    transforms: list[str] = []
    rotation = icon.rotate
    if icon.h_flip:
        if icon.v_flip:
            rotation += 2
        else:
            transforms.append(f"translate({svg_number(width + left)} {svg_number(-top)})")
            transforms.append("scale(-1 1)")
            top = left = 0
    elif icon.v_flip:
        transforms.append(f"translate({svg_number(-left)} {svg_number(height + top)})")
        transforms.append("scale(1 -1)")
        top = left = 0
    rotation %= 4
    if rotation == 1:
        c = height / 2 + top
        transforms.insert(0, f"rotate(90 {svg_number(c)} {svg_number(c)})")
    elif rotation == 2:
        transforms.insert(0, f"rotate(180 {svg_number(width / 2 + left)} {svg_number(height / 2 + top)})")
    elif rotation == 3:
        c = width / 2 + left
        transforms.insert(0, f"rotate(-90 {svg_number(c)} {svg_number(c)})")
    if rotation % 2 == 1:
        left, top = top, left
        width, height = height, width
    body = icon.body
    if transforms:
        body = f'<g transform="{" ".join(transforms)}">{body}</g>'
    return (left, top, width, height), body


def set_colour(body: str, colour: str) -> str:
    """Replace `currentColor` (how monochrome icons name their colour) by a CSS colour."""
    return _CURRENT_COLOR.sub(colour, body)


def icon_svg(icon: Icon, colour: str = "#000000", size: float | None = None) -> str:
    """A standalone SVG document of the icon (currentColor set to `colour`); `size` sets the
    height in pixels (the width follows the aspect ratio), default: the viewBox size."""
    (left, top, width, height), body = icon_box_and_body(icon)
    h = size if size is not None else height
    w = h * width / height
    box = " ".join(svg_number(v) for v in (left, top, width, height))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'width="{svg_number(w)}" height="{svg_number(h)}" viewBox="{box}">{set_colour(body, colour)}</svg>')


def split_variant(name: str, prefixes: dict[str, str] | None = None, suffixes: dict[str, str] | None = None,
                  generic: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """(base name, variant title) of an icon name using the set's metadata "prefixes" / "suffixes"
    (longest key first; a "" key names the variant of names without a suffix), else the `generic`
    trailing style words ("outline", "fill", ...). "home-outline-rounded" -> ("home", "Outline Rounded")."""
    variant = None
    base = name
    for key, title in sorted((prefixes or {}).items(), key=lambda kv: -len(kv[0])):
        if key and base.startswith(key + "-") and len(base) > len(key) + 1:
            base, variant = base[len(key) + 1:], title
            break
    matched = False
    for key, title in sorted((suffixes or {}).items(), key=lambda kv: -len(kv[0])):
        if key and base.endswith("-" + key) and len(base) > len(key) + 1:
            base = base[:-len(key) - 1]
            variant = f"{variant} {title}" if variant else title
            matched = True
            break
    if not matched and suffixes and "" in suffixes and not variant:
        variant = suffixes[""] or None
    if not matched and generic:
        for _ in range(2):
            parts = base.rsplit("-", 1)
            if len(parts) == 2 and parts[1] in generic and parts[0]:
                base = parts[0]
                variant = f"{parts[1]} {variant}" if variant else parts[1]
            else:
                break
    return base, variant


def safe_file_name(name: str) -> str:
    """An icon name as a file name (Iconify names are [a-z0-9-]; anything else becomes "_")."""
    return _UNSAFE_NAME.sub("_", name.lower()) or "_"


def load_icon_sets(prefixes: list[str], reviewed: dict[str, dict[str, Any]], downloads: str | Path,
                   tarballs: dict[str, str | Path] | None = None, log=print) -> tuple[dict[str, IconSet], list[dict]]:
    """Each set of `prefixes`, parsed, with its licence checked (policy, and equal to the reviewed
    table's where the set is in it). Without `tarballs` ({prefix: path}), fetches the pinned
    "@iconify-json/<prefix>@<version>" of `reviewed` with npm (integrity verified) into `downloads`.
    Returns ({prefix: IconSet}, download records for SOURCE.json)."""
    records: list[dict] = []
    if tarballs is None:
        unknown = [p for p in prefixes if p not in reviewed]
        if unknown:
            raise ValueError(f"no pinned package for icon set(s) {unknown}")
        tarballs, records = fetch_packages({p: f"@iconify-json/{p}@{reviewed[p]['version']}" for p in prefixes},
                                           downloads, log)
    sets = {}
    for p in prefixes:
        s = read_iconify_tarball(tarballs[p])
        check_license(p, s.license, (reviewed.get(p) or {}).get("license"))
        sets[p] = s
    return sets, records


def iter_icons(icon_set: IconSet, with_drawn_aliases: bool = True) -> Iterator[Icon]:
    """Every icon worth rendering, sorted by name: visible icons, and (optionally) aliases that are
    pictures of their own. Hidden (deprecated) icons are skipped."""
    names = set(icon_set.visible())
    if with_drawn_aliases:
        names |= set(icon_set.drawn_aliases())
    for name in sorted(names):
        try:
            icon = icon_set.resolve(name)
        except KeyError:
            continue
        if not icon.hidden:
            yield icon


__all__ = [
    "ACCEPTED_LICENSES",
    "ATTRIBUTION_LICENSES",
    "SHARE_ALIKE_LICENSES",
    "Icon",
    "IconSet",
    "LicenseRefused",
    "check_license",
    "icon_box_and_body",
    "icon_svg",
    "iter_icons",
    "license_ok",
    "load_icon_sets",
    "parse_icon_set",
    "read_iconify_tarball",
    "safe_file_name",
    "set_colour",
    "split_variant",
    "svg_number",
]
