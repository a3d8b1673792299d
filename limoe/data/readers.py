"""Readers that turn every kind of input into one stream of records.

    prepared source directory   <dir>/index.jsonl (+ SOURCE.json), the common format
    users' JSONL index          {"image": "rel/path.png", "caption": "..."} (or "captions": [...])
    users' CSV / TSV index      columns image,caption (OpenCLIP's filepath,title also work); rows
                                with the same image are merged into one item with several captions
    WebDataset tar shards       OpenCLIP's format: <key>.jpg|png|webp + <key>.txt (+ <key>.json,
                                <key>.cls), members of a key grouped; "shards/{000..009}.tar" or globs

A record is a plain dict (cheap to pickle into DataLoader workers):

    {"ref": path | ("tar", shard, offset, size) | bytes,  where the image bytes are
     "captions": [...], "label": str, "source": str, "style": str, "split": str, "key": str,
     "extras": {...}}

Images of users' data are checked when loaded (`verify`): "header" opens each file's header
(missing files, non-images and unsupported formats are skipped), "decode" decodes every image,
"none" checks nothing. Skipped items are counted per reason and reported with one warning.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from limoe.data.format import INDEX_NAME, META_NAME, SPLITS, iter_jsonl, split_for, validate_item
from limoe.runtime.preprocess import FORMATS, ImageError, open_image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
CSV_IMAGE_KEYS = ("image", "filepath", "file", "path", "img")
CSV_CAPTION_KEYS = ("caption", "title", "text")
_CORE = {"image", "caption", "captions", "label", "source", "style", "split", "id"}


class SourceError(ValueError):
    """A mix entry that names nothing readable."""


# -- image references ------------------------------------------------------------------------------
def read_ref(ref: Any) -> bytes | str:
    """The image of a record: bytes, or a path that open_image reads."""
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if isinstance(ref, tuple) and ref and ref[0] == "tar":
        _, shard, offset, size = ref
        with open(shard, "rb") as f:
            f.seek(offset)
            return f.read(size)
    return ref


def describe_ref(ref: Any) -> str:
    if isinstance(ref, tuple) and ref and ref[0] == "tar":
        return f"{ref[1]}@{ref[2]}"
    return "<bytes>" if isinstance(ref, (bytes, bytearray)) else str(ref)


def check_image(ref: Any, verify: str = "header") -> str | None:
    """None when the image is usable, else the reason ("missing", "not an image: ...")."""
    if verify == "none":
        return None
    if isinstance(ref, str) and not Path(ref).is_file():
        return "missing file"
    try:
        data = read_ref(ref)
        if verify == "decode":
            open_image(data)
        else:
            with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data, formats=FORMATS) as im:
                if im.size[0] < 1 or im.size[1] < 1:
                    return "image has no pixels"
    except ImageError as e:
        return str(e)
    except Exception as e:
        return f"cannot decode image: {type(e).__name__}"
    return None


# -- helpers ---------------------------------------------------------------------------------------
def _clean_captions(values: Iterable[Any]) -> list[str]:
    out = []
    for v in values:
        if isinstance(v, str):
            v = " ".join(v.split())
            if v and v not in out:
                out.append(v)
    return out


def _user_record(image_ref: Any, captions: list[str], fields: dict[str, Any], source: str, key: str) -> dict[str, Any]:
    split = fields.get("split")
    if split not in SPLITS:
        split = split_for(f"{source}:{key}")
    return {"ref": image_ref, "captions": captions, "label": str(fields.get("label") or ""), "source": source,
            "style": str(fields.get("style") or "user"), "split": split, "key": key,
            "extras": {k: v for k, v in fields.items() if k not in _CORE}}


def _finish(records: list[dict[str, Any]], skipped: Counter, verify: str, name: str,
            total: int) -> tuple[list[dict[str, Any]], Counter]:
    kept = []
    for r in records:
        reason = check_image(r["ref"], verify)
        if reason is None:
            kept.append(r)
        else:
            skipped[_reason_class(reason)] += 1
    n = sum(skipped.values())
    if n:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items()))
        warnings.warn(f"{name}: skipped {n} of {total} items ({detail})", stacklevel=3)
    return kept, skipped


def _reason_class(reason: str) -> str:
    """Collapse messages into countable reasons ("missing file", "cannot decode image", ...)."""
    return reason.split(":")[0].strip()


def _resolve_image(base: Path, value: Any) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value):
        return None  # URLs: download the data first
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else base / p)


# -- the common format -------------------------------------------------------------------------------
def read_source_dir(path: str | Path, verify: str = "none") -> tuple[str, list[dict[str, Any]], Counter]:
    """A prepared source (index.jsonl with the common fields). Name: SOURCE.json's, else the folder's."""
    path = Path(path)
    meta_path = path / META_NAME
    name = json.loads(meta_path.read_text())["name"] if meta_path.is_file() else path.name
    records, skipped, total = [], Counter(), 0
    for item in iter_jsonl(path / INDEX_NAME):
        total += 1
        if "captions" not in item and isinstance(item.get("caption"), str):
            item = {**item, "captions": [item["caption"]]}
        item = {"source": name, "style": "user", **item}
        if "split" not in item and "image" in item:
            item["split"] = split_for(f"{name}:{item.get('id', item['image'])}")
        item.setdefault("label", "")
        problems = validate_item(item)
        if problems:
            skipped["invalid record"] += 1
            continue
        records.append({"ref": str(path / item["image"]), "captions": list(item["captions"]), "label": item["label"],
                        "source": item["source"], "style": item["style"], "split": item["split"],
                        "key": str(item.get("id", item["image"])),
                        "extras": {k: v for k, v in item.items() if k not in _CORE}})
    kept, skipped = _finish(records, skipped, verify, name, total)
    return name, kept, skipped


# -- users' indexes ----------------------------------------------------------------------------------
def read_jsonl_index(path: str | Path, name: str | None = None, verify: str = "header"
                     ) -> tuple[str, list[dict[str, Any]], Counter]:
    """Users' JSONL: one object a line with "image" (relative to the file, or absolute) and
    "caption" or "captions"; optional "label", "split", "style" and anything else (extras)."""
    path = Path(path)
    name = name or (path.parent.name if path.stem == "index" else path.stem)
    records, skipped, total = [], Counter(), 0
    for n, obj in enumerate(iter_jsonl(path)):
        total += 1
        if not isinstance(obj, dict):
            skipped["invalid record"] += 1
            continue
        image = _resolve_image(path.parent, obj.get("image"))
        caps = _clean_captions(obj["captions"] if isinstance(obj.get("captions"), list) else [obj.get("caption")])
        if image is None:
            skipped["url or no image path" if obj.get("image") else "no image path"] += 1
            continue
        if not caps:
            skipped["no caption"] += 1
            continue
        records.append(_user_record(image, caps, obj, name, str(obj.get("id", obj.get("image")))))
    return (name, *_finish(records, skipped, verify, name, total))


def read_csv_index(path: str | Path, name: str | None = None, verify: str = "header"
                   ) -> tuple[str, list[dict[str, Any]], Counter]:
    """Users' CSV (or TSV: tab-separated when the header has a tab). Columns: image (or OpenCLIP's
    filepath) and caption (or title); optional label, split, style; other columns become extras.
    Rows naming the same image become one item with all their captions."""
    path = Path(path)
    name = name or (path.parent.name if path.stem == "index" else path.stem)
    with open(path, encoding="utf-8", newline="") as f:
        header = f.readline()
        f.seek(0)
        reader = csv.DictReader(f, delimiter="\t" if "\t" in header else ",")
        fields = {k.strip().lower(): k for k in reader.fieldnames or ()}
        img_key = next((fields[k] for k in CSV_IMAGE_KEYS if k in fields), None)
        cap_key = next((fields[k] for k in CSV_CAPTION_KEYS if k in fields), None)
        if img_key is None or cap_key is None:
            raise SourceError(f"{path}: a CSV index needs an image column ({'/'.join(CSV_IMAGE_KEYS)}) and a "
                              f"caption column ({'/'.join(CSV_CAPTION_KEYS)}); it has {list(fields)}")
        grouped: dict[str, dict[str, Any]] = {}
        skipped, total = Counter(), 0
        for row in reader:
            row = {(k or "").strip().lower(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
            image_value = row.get(img_key.strip().lower())
            image = _resolve_image(path.parent, image_value)
            caps = _clean_captions([row.get(cap_key.strip().lower())])
            if image is None:
                total += 1
                skipped["url or no image path" if image_value else "no image path"] += 1
                continue
            if image not in grouped:
                total += 1
                used = (img_key.strip().lower(), cap_key.strip().lower())
                grouped[image] = {"fields": {k: v for k, v in row.items() if k not in used},
                                  "captions": [], "key": image_value}
            grouped[image]["captions"] += [c for c in caps if c not in grouped[image]["captions"]]
    records = []
    for image, g in grouped.items():
        if not g["captions"]:
            skipped["no caption"] += 1
            continue
        records.append(_user_record(image, g["captions"], g["fields"], name, g["key"]))
    return (name, *_finish(records, skipped, verify, name, total))


# -- WebDataset ------------------------------------------------------------------------------------
def expand_shards(pattern: str) -> list[str]:
    """"data/shard-{000..002}.tar" -> the three paths (zero-padded ranges, as WebDataset/braceexpand),
    "a/{x,y}.tar" -> two paths; glob characters are expanded too. Only existing files are returned."""
    def brace(p: str) -> list[str]:
        m = re.search(r"\{([^{}]*)\}", p)
        if not m:
            return [p]
        body, out = m.group(1), []
        r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
        options = ([str(i).zfill(len(r.group(1))) for i in range(int(r.group(1)), int(r.group(2)) + 1)]
                   if r else body.split(","))
        for o in options:
            out += brace(p[:m.start()] + o + p[m.end():])
        return out

    paths = []
    for p in brace(pattern):
        p = str(Path(p).expanduser())
        paths += sorted(glob.glob(p)) if any(c in p for c in "*?[") else ([p] if Path(p).is_file() else [])
    return list(dict.fromkeys(paths))


def _split_key(member: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name."""
    d, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def read_webdataset(shards: list[str], name: str | None = None, verify: str = "header"
                    ) -> tuple[str, list[dict[str, Any]], Counter]:
    """Items of WebDataset tar shards. Uncompressed shards are read in place (offset + size);
    compressed ones (.tar.gz) are held in memory."""
    if not shards:
        raise SourceError("no WebDataset shards matched")
    name = name or re.sub(r"[-_.]?\d+$", "", Path(shards[0]).name.split(".")[0]) or Path(shards[0]).parent.name
    records, skipped, total = [], Counter(), 0
    for shard in shards:
        with open(shard, "rb") as f:  # gzip, bzip2, xz, zstd magic: members cannot be read in place
            compressed = f.read(6).startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd"))
        groups: dict[str, dict[str, Any]] = {}
        with tarfile.open(shard, "r:*") as tar:
            for m in tar:
                if not m.isfile() or "/." in f"/{m.name}":
                    continue
                key, ext = _split_key(m.name)
                g = groups.setdefault(key, {})
                if ext in IMAGE_EXTS and "image" not in g:
                    g["image"] = (tar.extractfile(m).read() if compressed  # type: ignore[union-attr]
                                  else ("tar", shard, m.offset_data, m.size))
                elif ext in ("txt", "json", "cls"):
                    g[ext] = tar.extractfile(m).read().decode("utf-8", "replace")  # type: ignore[union-attr]
        for key, g in groups.items():
            total += 1
            meta: dict[str, Any] = {}
            if "json" in g:
                try:
                    meta = json.loads(g["json"])
                    meta = meta if isinstance(meta, dict) else {}
                except json.JSONDecodeError:
                    meta = {}
            caps = _clean_captions([g.get("txt")] + list(meta.get("captions") or []) + [meta.get("caption")])
            if "image" not in g:
                skipped["no image member"] += 1
                continue
            if not caps:
                skipped["no caption"] += 1
                continue
            fields = {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) or v is None}
            if "cls" in g and "label" not in fields:
                fields["label"] = g["cls"].strip()
            records.append(_user_record(g["image"], caps, fields, name, f"{Path(shard).name}/{key}"))
    return (name, *_finish(records, skipped, verify, name, total))


# -- dispatch ----------------------------------------------------------------------------------------
def load_source(spec: str | Path, cache: str | Path | None = None, verify: str | None = None
                ) -> tuple[str, list[dict[str, Any]], Counter]:
    """(name, records, skipped) of one mix entry: a prepared source's name in `cache`, a source
    directory, a .jsonl/.csv/.tsv index, a .tar shard, a shard pattern, or a folder of .tar shards.
    `verify` defaults to "none" for prepared sources and "header" for users' data."""
    s = str(spec)
    p = Path(s).expanduser()
    if cache is not None and re.fullmatch(r"[\w.-]+", s) and (
            (Path(cache) / s / META_NAME).is_file() or (not p.exists() and (Path(cache) / s).is_dir())):
        p = Path(cache) / s  # a bare name: the prepared source in the cache wins over ./name
    if p.is_dir() and (p / INDEX_NAME).is_file() and (p / META_NAME).is_file():
        return read_source_dir(p, verify or "none")
    if p.is_dir() and (p / INDEX_NAME).is_file():  # a user's folder with an index.jsonl
        return read_jsonl_index(p / INDEX_NAME, p.name, verify or "header")
    if p.is_dir() and (p / "index.csv").is_file():
        return read_csv_index(p / "index.csv", p.name, verify or "header")
    if p.is_file() and p.suffix.lower() == ".jsonl":
        return read_jsonl_index(p, verify=verify or "header")
    if p.is_file() and p.suffix.lower() in (".csv", ".tsv"):
        return read_csv_index(p, verify=verify or "header")
    if p.is_dir() and sorted(p.glob("*.tar")):
        return read_webdataset([str(x) for x in sorted(p.glob("*.tar"))], p.name, verify or "header")
    shards = expand_shards(s) if (".tar" in s or ".tgz" in s) else []
    if shards:
        return read_webdataset(shards, verify=verify or "header")
    where = f" (looked in the cache {cache})" if cache is not None else ""
    raise SourceError(f"{s!r} is not a prepared source, a source directory, a .jsonl/.csv index or "
                      f"WebDataset .tar shards{where}; prepare built-in sources with `limoe data prepare`")


__all__ = [
    "IMAGE_EXTS",
    "SourceError",
    "check_image",
    "describe_ref",
    "expand_shards",
    "load_source",
    "read_csv_index",
    "read_jsonl_index",
    "read_ref",
    "read_source_dir",
    "read_webdataset",
]
