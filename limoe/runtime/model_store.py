"""The model store: `<root>/<name>/<version>/` entries that the exporter writes and the server
trusts only after checking them. Torch-free.

An entry holds a `manifest.json` (see model_store/README.md) and the files it lists, each with
its size and sha256. Opening an entry parses and checks the manifest once, into a typed
`Manifest`; `verify` then re-checks every file and fails with a message naming the file and
what is wrong: missing, wrong size, wrong hash, unreadable graph, or a manifest written for
another format version or with a malformed field. Names and versions must be plain identifiers (no path traversal).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from limoe.runtime.preprocess import PreprocessConfig
from limoe.runtime.tokenizer import CLEANERS, Tokenizer


def default_store() -> Path:
    """Where models are looked up by name: $LIMOE_MODEL_STORE, else the checkout's model_store
    (a source checkout, editable install), else ./model_store. The server's default
    (LIMOE_MODEL_STORE, service.settings) and `limoe classify`'s."""
    if os.environ.get("LIMOE_MODEL_STORE"):
        return Path(os.environ["LIMOE_MODEL_STORE"])
    repo = Path(__file__).resolve().parents[2] / "model_store"
    return repo if repo.is_dir() else Path("model_store")

@dataclass(frozen=True)
class MoEInfo:
    """How the encoders route, and so what their routing outputs mean."""

    layers: tuple[int, ...]  # the MoE blocks' indices: M = len(layers); () for a dense model
    num_experts: int  # E
    top_k: int  # K, experts per token
    inference_routing: str = "capacity"  # "dropless" or "capacity" (entries older than dropless have no field)
    onnx_op: str = "standard"  # the ONNX graphs' MoE layers: "standard" ops or ORT's "fused" MoE op
    eval_capacity_factor: float = 1.0  # capacity per expert with "capacity" routing
    batch_priority: bool = True  # Batch Priority Routing with "capacity" routing

    @classmethod
    def from_config(cls, cfg, onnx_op: str = "standard") -> "MoEInfo":
        return cls(tuple(cfg.moe_layer_ids), cfg.num_experts, cfg.top_k, cfg.inference_routing, onnx_op,
                   cfg.eval_capacity_factor, cfg.batch_priority)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MoEInfo":
        """The manifest's `moe` object; raises ValueError naming what is wrong."""
        if not isinstance(d, dict):
            raise ValueError("must be an object")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = [k for k in ("layers", "num_experts", "top_k") if k not in d]
        if missing:
            raise ValueError(f"has no {', '.join(map(repr, missing))}")
        m = cls(**{k: v for k, v in d.items() if k in known})
        if not isinstance(m.layers, (list, tuple)) or not all(_is_int(x) and x >= 0 for x in m.layers):
            raise ValueError(f"'layers' must be a list of block indices, not {m.layers!r}")
        if not _is_int(m.num_experts) or not _is_int(m.top_k) or not 1 <= m.top_k <= max(1, m.num_experts):
            raise ValueError(f"'num_experts' {m.num_experts!r} and 'top_k' {m.top_k!r} must be integers, "
                             "1 <= top_k <= num_experts")
        if m.inference_routing not in ("dropless", "capacity") or m.onnx_op not in ("standard", "fused"):
            raise ValueError(f"unknown 'inference_routing' {m.inference_routing!r} or 'onnx_op' {m.onnx_op!r}")
        return dataclasses.replace(m, layers=tuple(m.layers))

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "layers": list(self.layers)}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)



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


def version_key(v: str) -> tuple:
    """Numeric versions sort as numbers ("10" after "9"), and after any non-numeric one."""
    return (1, int(v), "") if v.isdigit() else (0, 0, v)


@dataclass(frozen=True)
class FileRecord:
    size: int  # bytes
    sha256: str  # hex digest


@dataclass(frozen=True)
class Manifest:
    """An entry's manifest.json, parsed and checked once (`read_manifest`, `Manifest.parse`): the
    fields code runs on are typed; `data` keeps the whole document as read, for the descriptive
    records (evaluation, training, stats, quantization, ...) and for writers that update it."""

    path: Path  # the entry's directory
    data: dict[str, Any]  # manifest.json as read
    name: str
    version: str
    preprocess: PreprocessConfig  # "preprocessing"
    context_length: int  # L, tokens per text
    embedding_size: int  # P
    logit_scale: float  # zero-shot logits = logit_scale * cosine similarity
    templates: tuple[str, ...]  # default prompt templates, "{}" marks the label
    moe: MoEInfo
    image_tokens: int  # T of the image encoder's routing outputs: patches per image ("graphs.image.tokens")
    roles: dict[str, str]  # role ("image_onnx", "tokenizer", ...) -> file name
    files: dict[str, FileRecord]  # every file of the entry
    text_cleaning: str | None = None  # Python cleaning before the tokenizer file (limoe.runtime.tokenizer.CLEANERS)

    @classmethod
    def parse(cls, data: Any, entry: Path) -> "Manifest":
        """Check `data` (a decoded manifest.json of the entry `entry`) and type it. Raises
        ModelStoreError naming the manifest and the field."""
        where = entry / MANIFEST
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise ModelStoreError(f"{where}: manifest format {found!r} is not supported "
                                  f"(this version reads {FORMAT!r})")
        for key in ("name", "version", "files", "roles", "config", "preprocessing", "context_length",
                    "embedding_size", "logit_scale", "moe", "graphs"):
            if key not in data:
                raise ModelStoreError(f"{where}: manifest has no {key!r} field")

        def bad(field: str, problem: str) -> ModelStoreError:
            return ModelStoreError(f"{where}: manifest field {field!r}: {problem}")

        def positive_int(field: str, value: Any) -> int:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(field, f"must be a positive integer, not {value!r}")
            return value

        for field in ("name", "version"):
            if not isinstance(data[field], str) or not data[field]:
                raise bad(field, "must be a non-empty string")
        if not isinstance(data["config"], dict):
            raise bad("config", "must be an object")
        if not isinstance(data["files"], dict) or not isinstance(data["roles"], dict):
            raise bad("files" if not isinstance(data["files"], dict) else "roles", "must be an object")
        files = {}
        for file, record in data["files"].items():
            if Path(file).name != file or not _IDENTIFIER.fullmatch(file):
                raise ModelStoreError(f"{where}: listed file {file!r} is not a plain file name")
            if not isinstance(record, dict) or not isinstance(record.get("size"), int) \
                    or not isinstance(record.get("sha256"), str):
                raise bad("files", f"{file!r} needs an integer 'size' and a 'sha256' string")
            files[file] = FileRecord(record["size"], record["sha256"])
        for role, file in data["roles"].items():
            if file not in files:
                raise ModelStoreError(f"{where}: role {role!r} names {file!r}, which is not in 'files'")
        templates = data.get("templates") or ["{}"]
        if not isinstance(templates, list) or not all(isinstance(t, str) and t.count("{}") == 1 for t in templates):
            raise bad("templates", "must be a list of strings with one '{}' each")
        logit_scale = data["logit_scale"]
        if not isinstance(logit_scale, (int, float)) or isinstance(logit_scale, bool) or not logit_scale > 0:
            raise bad("logit_scale", f"must be a positive number, not {logit_scale!r}")
        try:
            preprocess = PreprocessConfig.from_dict(data["preprocessing"])
        except ValueError as e:
            raise bad("preprocessing", str(e)) from None
        try:
            moe = MoEInfo.from_dict(data["moe"])
        except (ValueError, TypeError) as e:
            raise bad("moe", str(e)) from None
        cleaning = data.get("text_cleaning")
        if cleaning is not None and cleaning not in CLEANERS:
            raise bad("text_cleaning", f"unknown cleaning {cleaning!r} (known: {', '.join(CLEANERS)})")
        image = data["graphs"].get("image") if isinstance(data["graphs"], dict) else None
        image_tokens = positive_int("graphs.image.tokens", image.get("tokens") if isinstance(image, dict) else None)
        return cls(entry, data, data["name"], data["version"], preprocess,
                   positive_int("context_length", data["context_length"]),
                   positive_int("embedding_size", data["embedding_size"]), float(logit_scale), tuple(templates),
                   moe, image_tokens, dict(data["roles"]), files, cleaning)

    def tokenizer(self) -> Tokenizer:
        """The entry's tokenizer, with its text cleaning."""
        return Tokenizer.load(self.file("tokenizer"), self.text_cleaning)

    def file(self, key: str) -> Path:
        """Path of a file by its role, e.g. "image_onnx", "text_onnx", "tokenizer", "torchscript",
        "image_onnx_int8"."""
        try:
            return self.path / self.roles[key]
        except KeyError:
            raise ModelStoreError(f"{self.path / MANIFEST}: no file with role {key!r} in this entry") from None

    def has(self, key: str) -> bool:
        return key in self.roles


def read_manifest(entry: Path) -> Manifest:
    """Read, check and type an entry's manifest (no file checks; see `verify`)."""
    path = entry / MANIFEST
    if not path.is_file():
        raise ModelStoreError(f"{path}: missing (not a model store entry)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelStoreError(f"{path}: unreadable manifest ({e})") from None
    return Manifest.parse(data, entry)


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
    for file, record in manifest.files.items():
        path = entry / file
        if not path.is_file():
            raise ModelStoreError(f"{path}: missing (listed in the manifest)")
        size = path.stat().st_size
        if size != record.size:
            raise ModelStoreError(f"{path}: wrong size ({size} bytes, manifest says {record.size})")
        digest = sha256_file(path)
        if digest != record.sha256:
            raise ModelStoreError(f"{path}: wrong sha256 ({digest[:12]}..., manifest says {record.sha256[:12]}...)")
    if check_graphs:
        for file in manifest.files:
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
        return sorted(found, key=version_key)

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
