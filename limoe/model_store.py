"""The model store: `<root>/<name>/<version>/` entries that the exporter writes and the server
trusts only after checking them. Torch-free.

An entry holds a `manifest.json` (see model_store/README.md) and the files it lists, each with
its size and sha256. `verify` re-checks all of them and fails with a message naming the file
and what is wrong: missing, wrong size, wrong hash, unreadable graph, or a manifest written
for another format version. Names and versions must be plain identifiers (no path traversal).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "limoe-model-store/1"
MANIFEST = "manifest.json"
_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ModelStoreError(Exception):
    """A store entry is missing, damaged or not ours. The message says which file and why."""


def check_identifier(value: str, what: str = "name") -> str:
    """Refuse anything but [A-Za-z0-9][A-Za-z0-9._-]*: no '/', no '..', no leading dot."""
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise ModelStoreError(f"invalid model {what} {value!r}: use letters, digits, '.', '_' and '-', "
                              "starting with a letter or digit")
    return value


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


def _version_key(v: str) -> tuple:
    """Numeric versions sort as numbers ("10" after "9"), and after any non-numeric one."""
    return (1, int(v), "") if v.isdigit() else (0, 0, v)


@dataclass(frozen=True)
class Manifest:
    path: Path  # the entry's directory
    data: dict[str, Any]

    @property
    def name(self) -> str:
        return self.data["name"]

    @property
    def version(self) -> str:
        return self.data["version"]

    def file(self, key: str) -> Path:
        """Path of a file by its role, e.g. "image_onnx", "text_onnx", "tokenizer", "torchscript",
        "image_onnx_int8"."""
        try:
            return self.path / self.data["roles"][key]
        except KeyError:
            raise ModelStoreError(f"{self.path / MANIFEST}: no file with role {key!r} in this entry") from None

    def has(self, key: str) -> bool:
        return key in self.data.get("roles", {})


def read_manifest(entry: Path) -> Manifest:
    """Parse and sanity-check an entry's manifest (no file checks; see `verify`)."""
    path = entry / MANIFEST
    if not path.is_file():
        raise ModelStoreError(f"{path}: missing (not a model store entry)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelStoreError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise ModelStoreError(f"{path}: manifest format {found!r} is not supported (this version reads {FORMAT!r})")
    for key in ("name", "version", "files", "roles", "config"):
        if key not in data:
            raise ModelStoreError(f"{path}: manifest has no {key!r} field")
    for file in data["files"]:
        if Path(file).name != file or not _IDENTIFIER.fullmatch(file):
            raise ModelStoreError(f"{path}: listed file {file!r} is not a plain file name")
    for role, file in data["roles"].items():
        if file not in data["files"]:
            raise ModelStoreError(f"{path}: role {role!r} names {file!r}, which is not in 'files'")
    return Manifest(entry, data)


def _check_graph(path: Path) -> None:
    """An ONNX file must parse as a model with a graph (a damaged but re-hashed file fails here)."""
    import onnx  # lazily: only verification needs it

    try:
        onnx.load(str(path), load_external_data=False)  # parses
        onnx.checker.check_model(str(path))  # by path: external weights resolve next to the graph
    except Exception as e:  # onnx raises DecodeError, ValidationError, ...: all mean "unreadable"
        raise ModelStoreError(f"{path}: unreadable ONNX graph ({type(e).__name__}: {str(e)[:200]})") from None


def verify(entry: Path, check_graphs: bool = True) -> Manifest:
    """Check every listed file's presence, size and sha256, then that every graph parses."""
    manifest = read_manifest(entry)
    for file, record in manifest.data["files"].items():
        path = entry / file
        if not path.is_file():
            raise ModelStoreError(f"{path}: missing (listed in the manifest)")
        size = path.stat().st_size
        if size != record["size"]:
            raise ModelStoreError(f"{path}: wrong size ({size} bytes, manifest says {record['size']})")
        digest = sha256_file(path)
        if digest != record["sha256"]:
            raise ModelStoreError(f"{path}: wrong sha256 ({digest[:12]}..., manifest says {record['sha256'][:12]}...)")
    if check_graphs:
        for file in manifest.data["files"]:
            if file.endswith(".onnx"):
                _check_graph(entry / file)
    return manifest


class ModelStore:
    """A directory of `<name>/<version>/` entries."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _IDENTIFIER.fullmatch(p.name)
                      and self.versions(p.name))

    def versions(self, name: str) -> list[str]:
        """Versions of `name` that have a manifest, oldest first."""
        base = self.root / check_identifier(name)
        if not base.is_dir():
            return []
        found = [p.name for p in base.iterdir()
                 if p.is_dir() and _IDENTIFIER.fullmatch(p.name) and (p / MANIFEST).is_file()]
        return sorted(found, key=_version_key)

    def resolve(self, name: str, version: str = "latest") -> Path:
        """The entry directory; "latest" is the highest version."""
        check_identifier(name)
        versions = self.versions(name)
        if not versions:
            known = ", ".join(self.names()) or "none"
            raise ModelStoreError(f"no model named {name!r} in {self.root} (available: {known})")
        if version == "latest":
            return self.root / name / versions[-1]
        check_identifier(version, "version")
        if version not in versions:
            raise ModelStoreError(f"model {name!r} has no version {version!r} (available: {', '.join(versions)})")
        return self.root / name / version

    def next_version(self, name: str) -> str:
        numeric = [int(v) for v in self.versions(name) if v.isdigit()]
        return str(max(numeric, default=0) + 1)

    def load(self, name: str, version: str = "latest", check_graphs: bool = True) -> Manifest:
        """Resolve and verify an entry."""
        return verify(self.resolve(name, version), check_graphs=check_graphs)
