"""`icons`: Tabler's outline icons (PNG renders from @tabler/icons-png, names, categories and tags
from @tabler/icons' icons.json), one style "tabler".

@tabler/icons-png@3.48.0 ships one size only: icons/outline/<name>.png and icons/filled/<name>.png
at 240 x 240 RGBA (black strokes on transparency). We take the outline set and downscale it to
64 x 64 (Lanczos) when preparing. Splits: hash of "icons:<name>".
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from limoe.data.format import TEST_FRACTION, VAL_FRACTION, SourceWriter, is_built, read_meta, split_for
from limoe.data.licenses import licenses_for
from limoe.data.npm import fetch_packages, iter_tar, read_tar_member

NAME = "icons"
PNG_PACKAGE = "@tabler/icons-png@3.48.0"
META_PACKAGE = "@tabler/icons@3.48.0"
STYLE = "outline"
SIZE = 64


def _article(words: str) -> str:
    return "an" if words[:1].lower() in "aeiou" else "a"


def icon_captions(name: str, meta: dict[str, Any] | None = None) -> tuple[str, list[str]]:
    """(class name, captions) of an icon: "brand-github" -> "brand github",
    ["an icon of a brand github", "brand github icon", "brand github", "brand github: ..."]."""
    words = " ".join(name.replace("-", " ").replace("_", " ").split())
    meta = meta or {}
    tags = []
    for t in meta.get("tags") or ():
        t = " ".join(str(t).replace("-", " ").split())
        if t and t.lower() not in set(words.lower().split()) and t.lower() not in {x.lower() for x in tags}:
            tags.append(t)
    captions = [f"an icon of {_article(words)} {words}", f"{words} icon", words]
    if tags:
        captions.append(f"{words}: {', '.join(tags[:4])}")
        captions.append(f"an icon of {_article(words)} {words}, {', '.join(tags[:2])}")
    if meta.get("category"):
        captions.append(f"{words}, {meta['category'].lower()} icon")
    return words, list(dict.fromkeys(captions))


def prepare_icons(cache: str | Path, force: bool = False, val: float = VAL_FRACTION, test: float = TEST_FRACTION,
                  tarballs: dict[str, str | Path] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build <cache>/icons. `tarballs` ({"png": path, "meta": path}) skips npm (tests)."""
    cache = Path(cache)
    params = {"packages": [PNG_PACKAGE, META_PACKAGE], "style": STYLE, "size": SIZE, "val": val, "test": test}
    if not force and is_built(cache / NAME, params):
        log(f"{NAME}: already prepared in {cache / NAME}")
        return read_meta(cache / NAME)
    downloads = []
    if tarballs is None:
        tarballs, downloads = fetch_packages({"png": PNG_PACKAGE, "meta": META_PACKAGE}, cache / "downloads", log)
    meta = json.loads(read_tar_member(tarballs["meta"], "package/icons.json"))
    prefix = f"package/icons/{STYLE}/"
    images: dict[str, bytes] = {}
    expected = sum(1 for m in meta.values() if STYLE in (m.get("styles") or {}))
    with tqdm(desc=f"icons {STYLE}", unit="img", total=expected or None) as bar:
        for member, data in iter_tar(tarballs["png"], lambda n: n.startswith(prefix) and n.endswith(".png")):
            images[member[len(prefix):-len(".png")]] = data
            bar.update(1)
    with SourceWriter(cache, NAME, params) as writer:
        no_meta = 0
        for name in tqdm(sorted(images), desc="icons resize", unit="img"):
            m = meta.get(name)
            no_meta += m is None
            label, captions = icon_captions(name, m)
            img = Image.open(io.BytesIO(images[name]))
            img = img.convert("RGBA").resize((SIZE, SIZE), Image.Resampling.LANCZOS)
            item = {"id": name, "captions": captions, "label": label, "source": NAME, "style": "tabler",
                    "split": split_for(f"icons:{name}", val, test), "category": (m or {}).get("category"),
                    "tags": [str(t) for t in (m or {}).get("tags") or ()], "variant": STYLE}
            writer.add(item, img, f"images/{name}.png")
        if no_meta:
            log(f"{NAME}: {no_meta} icons have no entry in icons.json (captioned from the name only)")
        return writer.finish(licenses=licenses_for(NAME), downloads=downloads,
                             description="Tabler outline icons, 240 px PNG downscaled to 64 px, with name/tag captions",
                             holdout={"rule": "split by hash of the icon name"})


__all__ = ["META_PACKAGE", "NAME", "PNG_PACKAGE", "icon_captions", "prepare_icons"]
