"""The common on-disk format every source writes, and the deterministic split rule.

    <cache>/<source>/
        SOURCE.json    what was built, from what (packages, versions, sha256), licences, counts
        index.jsonl    one JSON object per item (below), in a fixed order
        images/...     PNG files

An item (one line of index.jsonl):

    {"id": "google-1f600",                  stable within the source
     "image": "images/google/1f600.png",   path relative to the index
     "captions": ["grinning face", ...],   non-empty; the first one is the canonical caption
     "label": "grinning face",             class name for zero-shot evaluation
     "source": "emoji", "style": "google", "split": "train" | "val" | "test",
     ...free extras: "category", "concept", "heldout", ...}

A source directory is complete when SOURCE.json exists: it is written last, and the whole
directory is built under a temporary name and renamed into place, so an interrupted build
never looks finished.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
VAL_FRACTION = 0.05  # default share of concepts in "val"
TEST_FRACTION = 0.05  # default share of concepts in "test"
REQUIRED_FIELDS = ("image", "captions", "label", "source", "style", "split")
INDEX_NAME = "index.jsonl"
META_NAME = "SOURCE.json"


def default_cache_dir() -> Path:
    """$LIMOE_DATA_CACHE, else ~/.cache/limoe/data."""
    env = os.environ.get("LIMOE_DATA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "limoe" / "data"


def stable_unit(key: str) -> float:
    """A number in [0, 1) that depends only on `key` (sha256; the same on every machine and run)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def split_for(key: str, val: float = VAL_FRACTION, test: float = TEST_FRACTION) -> str:
    """"train", "val" or "test" from a hash of a stable key (e.g. "emoji:1f600"):
    deterministic, independent of order and of which other items exist."""
    u = stable_unit(key)
    return "test" if u < test else "val" if u < test + val else "train"


def validate_item(item: dict[str, Any]) -> list[str]:
    """What is wrong with an index record ([] when it is a valid common-format item)."""
    problems = [f"missing field {f!r}" for f in REQUIRED_FIELDS if f not in item]
    caps = item.get("captions")
    if "captions" in item and (not isinstance(caps, list) or not caps
                               or not all(isinstance(c, str) and c.strip() for c in caps)):
        problems.append("captions must be a non-empty list of non-empty strings")
    for f in ("image", "label", "source", "style"):
        if f in item and not isinstance(item[f], str):
            problems.append(f"{f} must be a string")
    if "split" in item and item["split"] not in SPLITS:
        problems.append(f"split must be one of {SPLITS}, not {item['split']!r}")
    if isinstance(item.get("image"), str) and (Path(item["image"]).is_absolute() or ".." in Path(item["image"]).parts):
        problems.append("image must be a relative path inside the source directory")
    return problems


def iter_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not JSON: {e}") from None


def read_meta(source_dir: str | Path) -> dict[str, Any] | None:
    """SOURCE.json of a finished source directory, or None."""
    p = Path(source_dir) / META_NAME
    if not p.is_file():
        return None
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def is_built(source_dir: str | Path, params: dict[str, Any] | None = None) -> bool:
    """True when the directory holds a finished source of this format (and, if given, built with
    exactly these parameters)."""
    meta = read_meta(source_dir)
    if meta is None or meta.get("format_version") != FORMAT_VERSION:
        return False
    return params is None or meta.get("params") == json.loads(json.dumps(params))


def png_bytes(img: Image.Image) -> bytes:
    """PNG encoding with fixed settings, so the same pixels always give the same bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def summarize(items: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Counts per split, per style and split, and per source."""
    by_split: dict[str, int] = {}
    by_style: dict[str, dict[str, int]] = {}
    n = 0
    for it in items:
        n += 1
        by_split[it["split"]] = by_split.get(it["split"], 0) + 1
        st = by_style.setdefault(it["style"], {})
        st[it["split"]] = st.get(it["split"], 0) + 1
    return {"items": n, "splits": dict(sorted(by_split.items())),
            "styles": {k: dict(sorted(v.items())) for k, v in sorted(by_style.items())}}


class SourceWriter:
    """Builds one source directory atomically.

        with SourceWriter(cache, "scenes", params) as w:
            w.add({"id": ..., "captions": [...], ...}, image=pil_or_png_bytes, name="images/0.png")
            w.finish(licenses=[...], downloads=[...])
    """

    def __init__(self, cache: str | Path, name: str, params: dict[str, Any]):
        self.cache, self.name, self.params = Path(cache), name, params
        self.final = self.cache / name
        self.tmp = self.cache / f".{name}.partial"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.items: list[dict[str, Any]] = []
        self.ids: set[str] = set()
        self.t0 = time.perf_counter()

    def __enter__(self) -> SourceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.tmp.exists():  # leave nothing half-built behind
            shutil.rmtree(self.tmp, ignore_errors=True)

    def add(self, item: dict[str, Any], image: Image.Image | bytes, name: str) -> None:
        """Write the image under `name` (relative, PNG) and record the item."""
        item = {**item, "image": name}
        problems = validate_item(item)
        if problems:
            raise ValueError(f"invalid item {item.get('id')!r}: {'; '.join(problems)}")
        if item.get("id") in self.ids:
            raise ValueError(f"duplicate item id {item['id']!r}")
        self.ids.add(item.get("id"))
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image if isinstance(image, (bytes, bytearray)) else png_bytes(image))
        self.items.append(item)

    def finish(self, **meta: Any) -> dict[str, Any]:
        """Write index.jsonl and SOURCE.json, then move the directory into place. Returns SOURCE.json."""
        with open(self.tmp / INDEX_NAME, "w", encoding="utf-8") as f:
            for item in self.items:
                f.write(json.dumps(item, ensure_ascii=False, sort_keys=True) + "\n")
        record = {"name": self.name, "format_version": FORMAT_VERSION, "params": self.params,
                  **summarize(self.items), **meta,
                  "build_seconds": round(time.perf_counter() - self.t0, 2)}
        with open(self.tmp / META_NAME, "w", encoding="utf-8") as f:
            json.dump(record, f, ensure_ascii=False, indent=2)
        # Swap by two renames, then delete the old build: a reader (a training run using the
        # previous build) sees the directory missing only between the renames, not while it is deleted.
        old = self.cache / f".{self.name}.old"
        if old.exists():
            shutil.rmtree(old)
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.tmp, self.final)
        shutil.rmtree(old, ignore_errors=True)
        return record


__all__ = [
    "FORMAT_VERSION",
    "INDEX_NAME",
    "META_NAME",
    "REQUIRED_FIELDS",
    "SPLITS",
    "TEST_FRACTION",
    "VAL_FRACTION",
    "SourceWriter",
    "default_cache_dir",
    "is_built",
    "iter_jsonl",
    "png_bytes",
    "read_meta",
    "split_for",
    "stable_unit",
    "summarize",
    "validate_item",
]
