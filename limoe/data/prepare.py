"""Preparing the built-in sources and reporting what a cache holds."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from limoe.data.format import default_cache_dir, read_meta

SOURCES = ("emoji", "icons", "mnist", "scenes", "emoji_art", "iconsets")


def prepare(sources: Iterable[str] = SOURCES, cache: str | Path | None = None, force: bool = False,
            scenes_count: int = 10_000, scenes_seed: int = 0, emoji_holdout_style: str | None = "twitter",
            emoji_holdout_concepts: Iterable[str] = (), emoji_art_holdout_styles: Iterable[str] | None = None,
            workers: int | None = None, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Prepare each named source into <cache>/<name> (skipping finished ones unless `force`).
    `emoji_art_holdout_styles` defaults to the art `emoji_holdout_style` names (Twemoji for
    "twitter"), so one style is held out of both emoji sources. `workers`: rendering processes
    (default 2). Returns {name: SOURCE.json record (+ "seconds": wall time of this call)}."""
    cache = Path(cache).expanduser() if cache is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    sources = list(sources)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown source(s) {unknown}; choose from {', '.join(SOURCES)}")
    out = {}
    for name in sources:
        t0 = time.perf_counter()
        if name == "emoji":
            from limoe.data.emoji import prepare_emoji
            meta = prepare_emoji(cache, force, holdout_style=emoji_holdout_style,
                                 holdout_concepts=list(emoji_holdout_concepts), log=log)
        elif name == "icons":
            from limoe.data.icons import prepare_icons
            meta = prepare_icons(cache, force, log=log)
        elif name == "mnist":
            from limoe.data.mnist import prepare_mnist
            meta = prepare_mnist(cache, force, log=log)
        elif name == "scenes":
            from limoe.data.scenes import prepare_scenes
            meta = prepare_scenes(cache, scenes_count, scenes_seed, force, log=log)
        elif name == "emoji_art":
            from limoe.data.emoji_art import HOLDOUT_FOR_EMOJI_STYLE, prepare_emoji_art
            held = (HOLDOUT_FOR_EMOJI_STYLE.get(emoji_holdout_style, ()) if emoji_art_holdout_styles is None
                    else list(emoji_art_holdout_styles))
            meta = prepare_emoji_art(cache, force, holdout_styles=held, workers=workers, log=log)
        else:
            from limoe.data.iconsets import prepare_iconsets
            meta = prepare_iconsets(cache, force, workers=workers, log=log)
        out[name] = {**meta, "seconds": round(time.perf_counter() - t0, 2)}
    return out


def info(cache: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """{source: SOURCE.json} of every finished source directory in the cache."""
    cache = Path(cache).expanduser() if cache is not None else default_cache_dir()
    out = {}
    if cache.is_dir():
        for d in sorted(p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".")):
            meta = read_meta(d)
            if meta is not None:
                out[meta.get("name", d.name)] = meta
    return out


def style_license(name: str, meta: dict[str, Any], style: str) -> str:
    """The licence of one style's images (art style, icon set) of a prepared source."""
    sets = meta.get("sets") or {}
    if style in sets:
        return sets[style].get("license") or "?"
    entries = [e for e in meta.get("licenses", []) if style in (e.get("styles") or ())]
    if not entries:  # prepared before licence entries named their styles
        from limoe.data.licenses import LICENSES

        entries = [e for e in LICENSES.get(name, []) if style in (e.get("styles") or ())]
    return ", ".join(sorted({e["license"] for e in entries})) or "-"


def format_info(metas: dict[str, dict[str, Any]]) -> str:
    """A table of items per source, style (art style, icon set) and split, with each style's
    licence; then each source's licences and downloads."""
    rows = [("source", "style", "licence", "train", "val", "test", "total")]
    for name, meta in metas.items():
        for style, splits in meta.get("styles", {}).items():
            rows.append((name, style, style_license(name, meta, style),
                         *(str(splits.get(s, 0)) for s in ("train", "val", "test")), str(sum(splits.values()))))
        rows.append((name, "(all)", "", *(str(meta.get("splits", {}).get(s, 0)) for s in ("train", "val", "test")),
                     str(meta.get("items", 0))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    for name, meta in metas.items():
        lic = sorted({e["license"] for e in meta.get("licenses", [])})
        downloads = meta.get("downloads", [])
        if len(downloads) > 4:
            dl = f"{len(downloads)} npm packages ({sum(d.get('bytes') or 0 for d in downloads) / 1e6:.1f} MB)"
        else:
            dl = ", ".join(f"{d.get('package')} ({d['bytes'] / 1e6:.1f} MB)" if d.get("bytes")
                           else str(d.get("package")) for d in downloads)
        held = (meta.get("holdout") or {}).get("styles") or (meta.get("holdout") or {}).get("style")
        lines.append(f"{name}: licences {', '.join(lic) or '?'}" + (f"; from {dl}" if dl else "")
                     + (f"; held-out style {held if isinstance(held, str) else ', '.join(held)}" if held else ""))
    return "\n".join(lines)


__all__ = ["SOURCES", "format_info", "info", "prepare", "style_license"]
