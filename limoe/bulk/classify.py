"""Offline zero-shot classification (`limoe classify`): many images, one label set, no HTTP.
Torch-free on the ONNX path (numpy, Pillow, onnxruntime; pyarrow only to write parquet).

    inputs: folders, globs, CSV/JSONL indexes, WebDataset shards   -> Item(path, ref) stream
      -> decode + preprocess in a thread pool   (a bounded window of futures, kept in input order)
      -> batches of `batch_size` -> image encoder -> zero_shot_scores -> rows -> JSONL or parquet

It opens the same store entry and runs the same encoders as the server, decodes with the same
functions (limoe.runtime.preprocess) and scores with the same function (limoe.runtime.zeroshot.zero_shot_scores),
so an image's scores match the server's. One row per input, in input order:

    {"path": "photos/cat.png", "labels": [{"label": "cat", "score": 0.91}, ...]}   best first, top_k
    {"path": "photos/bad.png", "error": "cannot decode image: ...", "code": "invalid_image"}

Error codes: invalid_image and image_too_large (as the server's), unreadable (the file cannot be
read), invalid_row (an index row names no local image). A bad input gets its row and the run goes on.

`resume=True` keeps the rows an output already holds and classifies only the other inputs;
`retry_errors=True` also drops its error rows first, so those inputs are tried again. A JSONL
output is flushed after every batch, so a killed run loses at most one batch; a parquet file is
written to `<out>.partial` and renamed into place when the run ends (also on Ctrl-C or an
exception), so a killed run leaves the previous file as it was.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import tarfile
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from limoe.data.readers import CSV_IMAGE_KEYS, IMAGE_EXTS, expand_shards
from limoe.runtime.encoders import Encoders, threads_per_pass
from limoe.runtime.model_store import Manifest, ModelStore, default_store, verify
from limoe.runtime.preprocess import ImageError, ImageTooLargeError, PreprocessConfig, clean_error, decode_image
from limoe.runtime.zeroshot import build_zero_shot_classifier, zero_shot_scores

MAX_PIXELS = 40_000_000  # the server's default LIMOE_MAX_IMAGE_PIXELS: refused from the header, before decoding
MAX_BYTES = 256 * 2 ** 20  # larger files are refused unread (image_too_large)
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
INDEX_SUFFIXES = (".csv", ".tsv", ".jsonl")


class ClassifyError(Exception):
    """Something that stops a run before it starts (bad inputs, labels, output): a usage error."""


class ItemError(Exception):
    """Why one input has no scores; it becomes that input's error row."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class Item(NamedTuple):
    path: str  # the row's "path": a file path as given, or "<shard>::<member>" inside a WebDataset shard
    ref: str | bytes | None  # where the image is: a file path or the member's bytes; None with `error`
    error: ItemError | None = None  # known before decoding (an index row naming no local image)


# -- inputs ------------------------------------------------------------------------------------------
def _is_image_name(name: str) -> bool:
    return name.rpartition(".")[2].lower() in IMAGE_EXTS


def is_shard(path: str) -> bool:
    return path.lower().endswith(SHARD_SUFFIXES)


def check_inputs(inputs: Sequence[str]) -> None:
    """ClassifyError naming the first input that is neither an existing path nor a pattern that matches."""
    if not inputs:
        raise ClassifyError("give at least one input: a folder, a glob, a CSV/JSONL index or WebDataset shards")
    for spec in inputs:
        if not Path(spec).exists() and not _matches(spec):
            raise ClassifyError(f"{spec}: no such file or folder, and no file matches it as a pattern")


def _matches(spec: str) -> list[str]:
    if "{" in spec:  # "shards/{000..009}.tar": WebDataset's brace ranges (and globs)
        return expand_shards(spec)
    if any(c in spec for c in "*?["):
        return sorted(glob.glob(os.path.expanduser(spec), recursive=True))
    return []


def iter_sources(inputs: Sequence[str]) -> Iterator[str]:
    """The files `inputs` name, lazily (a million-file folder is never listed into memory at once):
    a folder's image files (recursively, by extension, hidden ones skipped, sorted), a glob's or a
    WebDataset brace pattern's matches (folders among them walked the same way), or the file itself."""
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            yield from _folder_images(path)
        elif path.is_file():
            yield spec
        else:
            for match in _matches(spec):
                yield from _folder_images(Path(match)) if Path(match).is_dir() else (match,)


def _folder_images(folder: Path) -> Iterator[str]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and _is_image_name(name):
                yield str(Path(root) / name)


def is_index(path: str) -> bool:
    return path.lower().endswith(INDEX_SUFFIXES)


def iter_items(inputs: Sequence[str]) -> Iterator[Item]:
    """Every input as Items, lazily: a WebDataset shard's image members, a CSV/TSV/JSONL index's
    images, and any other file as itself (named on the command line, it is classified whatever
    its extension: a file that is no image gets an error row)."""
    for source in iter_sources(inputs):
        if is_shard(source):
            yield from iter_shard(source)
        elif is_index(source):
            yield from iter_index(source)
        else:
            yield Item(source, source)


def iter_index(index: str) -> Iterator[Item]:
    return _iter_jsonl(Path(index)) if index.lower().endswith(".jsonl") else _iter_csv(Path(index))


def _index_item(index: Path, line: int, value: Any) -> Item:
    if not isinstance(value, str) or not value.strip():
        return Item(f"{index}:{line}", None, ItemError("invalid_row", "the row names no image"))
    value = value.strip()
    if "://" in value:
        return Item(value, None, ItemError("invalid_row", "URLs are not downloaded: download the images first"))
    p = Path(value).expanduser()
    p = str(p if p.is_absolute() else index.parent / p)
    return Item(p, p)


def _iter_csv(index: Path) -> Iterator[Item]:
    """A CSV (or TSV: tab-separated when the header has a tab) with an image column
    (limoe.data.readers' names: image, filepath, file, path, img); paths relative to the index."""
    with open(index, encoding="utf-8", newline="") as f:
        header = f.readline()
        f.seek(0)
        reader = csv.DictReader(f, delimiter="\t" if "\t" in header else ",")
        fields = {(k or "").strip().lower(): k for k in reader.fieldnames or ()}
        key = next((fields[k] for k in CSV_IMAGE_KEYS if k in fields), None)
        if key is None:
            raise ClassifyError(f"{index}: a CSV index needs an image column ({'/'.join(CSV_IMAGE_KEYS)}); "
                                f"it has {list(fields)}")
        for row in reader:
            yield _index_item(index, reader.line_num, row.get(key))


def _iter_jsonl(index: Path) -> Iterator[Item]:
    """One JSON object a line with "image" (or filepath/file/path/img); paths relative to the index."""
    with open(index, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                obj = None
            value = next((obj[k] for k in CSV_IMAGE_KEYS if k in obj), None) if isinstance(obj, dict) else None
            yield _index_item(index, n, value)


def iter_shard(shard: str, skip: frozenset[str] | set[str] = frozenset()) -> Iterator[Item]:
    """A WebDataset shard's image members, streamed (compressed shards too): one Item per image
    member, whatever other members (.txt, .json, .cls) its sample has; paths in `skip` are not read."""
    with tarfile.open(shard, "r|*") as tar:
        for m in tar:
            if m.isfile() and _is_image_name(m.name) and "/." not in f"/{m.name}":
                path = f"{shard}::{m.name}"
                if path not in skip:
                    yield Item(path, tar.extractfile(m).read())  # type: ignore[union-attr]


# -- decoding, as the server does it -----------------------------------------------------------------
def decode(ref: str | bytes, cfg: PreprocessConfig, max_pixels: int = MAX_PIXELS,
           max_bytes: int = MAX_BYTES) -> np.ndarray:
    """A file path or an image's bytes -> (3, R, R) float32, or ItemError: the server's decoding
    (`limoe.runtime.preprocess.decode_image`, as service.engine.Engine._decode), errors and messages."""
    if isinstance(ref, str):
        try:
            size = os.stat(ref).st_size
            if size > max_bytes:
                raise ItemError("image_too_large", f"the image is {size} bytes; the limit is {max_bytes}")
            data = Path(ref).read_bytes()
        except OSError as e:
            raise unreadable(e) from None
    else:
        data = ref
    try:
        return decode_image(data, cfg, max_bytes, max_pixels)
    except ImageTooLargeError as e:
        raise ItemError("image_too_large", str(e)) from None
    except ImageError as e:
        raise ItemError("invalid_image", str(e)) from None


def unreadable(e: OSError) -> ItemError:
    return ItemError("unreadable", f"cannot read the file: {e.strerror or type(e).__name__}")


def decode_item(item: Item, cfg: PreprocessConfig, max_pixels: int = MAX_PIXELS,
                max_bytes: int = MAX_BYTES) -> np.ndarray:
    """`decode` of one Item; whatever goes wrong with this one input raises ItemError."""
    if item.error is not None:
        raise item.error
    try:
        return decode(item.ref, cfg, max_pixels, max_bytes)
    except ItemError:
        raise
    except Exception as e:  # a decoder bug on one odd file must not end the run
        raise ItemError("invalid_image", f"cannot decode image: {clean_error(e)}") from None


# -- the model -----------------------------------------------------------------------------------------
def load_entry(model: str, version: str = "latest", store: str | Path | None = None) -> Manifest:
    """A verified store entry: a name in `store` (default `default_store()`), `name@version`, or an
    entry directory."""
    if os.sep in model or model.startswith("."):  # a path, as the server's LIMOE_MODEL
        return verify(Path(model))
    model, _, pinned = model.partition("@")  # name@2, as the server's model names
    version = pinned or version
    return ModelStore(store or default_store()).load(model, version)


def open_encoders(manifest: Manifest, backend: str = "onnx", device: str = "auto", quantized: bool | None = None,
                  threads: int = 0) -> Encoders:
    """The entry's encoder pair, as the server opens it: ONNX Runtime (torch-free; CUDA when
    `device` asks for it, or "auto" finds it) or its TorchScript file (imports torch)."""
    if backend == "torchscript":
        from limoe.runtime.encoders import TorchEncoders  # imports torch when built

        if not manifest.has("torchscript"):
            raise ClassifyError(f"{manifest.path} has no TorchScript file; use --backend onnx")
        return TorchEncoders.from_entry(manifest, device, threads)
    import onnxruntime as ort

    from limoe.runtime.onnx_encoder import OnnxEncoders

    providers: list = ["CPUExecutionProvider"]
    if device.startswith("cuda") or (device == "auto" and "CUDAExecutionProvider" in ort.get_available_providers()):
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": int(device.partition(":")[2] or 0)}))
    enc = OnnxEncoders(manifest, providers=providers, threads=threads or None, quantized=quantized)
    if device.startswith("cuda") and "CUDAExecutionProvider" not in enc.providers:
        raise ClassifyError(f"--device {device}, but ONNX Runtime runs on {', '.join(enc.providers)} "
                            "(install onnxruntime-gpu with matching CUDA/cuDNN libraries)")
    return enc


def parse_labels(labels: str | None = None, labels_file: str | Path | None = None) -> list[str]:
    """Labels from "a,b,c" or a file with one label per line (blank lines skipped): stripped,
    non-empty and distinct, as the server requires."""
    if (labels is None) == (labels_file is None):
        raise ClassifyError("give the labels with --labels a,b,c or --labels-file FILE (one of the two)")
    raw = labels.split(",") if labels is not None else Path(labels_file).read_text(encoding="utf-8").splitlines()
    clean = [label.strip() for label in raw if label.strip()]
    if not clean:
        raise ClassifyError("give at least one label")
    duplicates = sorted({label for label in clean if clean.count(label) > 1})
    if duplicates:
        raise ClassifyError(f"labels must be distinct; repeated: {', '.join(duplicates)}")
    return clean


def check_templates(templates: Sequence[str] | None) -> None:
    """ClassifyError unless every template has exactly one "{}" (None: the entry's own)."""
    for t in templates or ():
        if t.count("{}") != 1:
            raise ClassifyError(f"template {t!r} must contain exactly one '{{}}' (where the label goes)")


class ZeroShot:
    """An encoder pair and one label set: the (P, C) class matrix is built once, then
    `scores(pixels)` is one image-encoder pass and `zero_shot_scores`."""

    def __init__(self, encoders: Encoders, labels: Sequence[str], templates: Sequence[str] | None = None,
                 text_batch: int = 256):
        self.encoders, self.labels = encoders, list(labels)
        self.templates = tuple(templates or encoders.manifest.templates)  # the entry's, as the server's default
        self.text_batch = text_batch
        self.classes = build_zero_shot_classifier(self._encode_text, encoders.tokenizer, self.labels, self.templates)

    def _encode_text(self, ids: np.ndarray) -> np.ndarray:
        """(N, L) ids -> (N, P), in chunks: a 1,000-label set is 8,000 prompts with 8 templates."""
        return np.concatenate([self.encoders.encode_tokens(ids[i:i + self.text_batch]).embeddings
                               for i in range(0, len(ids), self.text_batch)])

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.encoders.preprocess

    def scores(self, pixels: np.ndarray) -> np.ndarray:
        """(N, 3, R, R) preprocessed images -> (N, C) softmax over the labels."""
        return zero_shot_scores(self.encoders.encode_images(pixels).embeddings, self.classes,
                                self.encoders.logit_scale)

    def rows(self, paths: Sequence[str], decoded: Sequence[np.ndarray | ItemError], top_k: int | None) -> list[dict]:
        """One output row per input, in order: the ranked labels, or the input's error."""
        good = [x for x in decoded if not isinstance(x, ItemError)]
        probs = iter(self.scores(np.stack(good)) if good else ())
        return [{"path": path, "error": str(x), "code": x.code} if isinstance(x, ItemError)
                else {"path": path, "labels": ranked(next(probs), self.labels, top_k)}
                for path, x in zip(paths, decoded)]


def ranked(scores: np.ndarray, labels: Sequence[str], top_k: int | None = None) -> list[dict[str, Any]]:
    """One image's (C,) scores as [{"label", "score"}], best first (ties in label order), the best
    `top_k` only when given: the order the server's APIs answer in."""
    order = np.argsort(-scores, kind="stable")[: top_k or len(labels)]
    return [{"label": labels[j], "score": float(scores[j])} for j in order]


# -- outputs ---------------------------------------------------------------------------------------------
def output_format(out: str | Path) -> str:
    """"parquet" for *.parquet, "jsonl" for *.jsonl / *.json."""
    suffix = Path(out).suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    raise ClassifyError(f"{out}: the output must end in .jsonl or .parquet")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ClassifyError("writing parquet needs pyarrow: pip install 'limoe-serve[parquet]', "
                            "or write JSON lines (--out results.jsonl)") from None
    return pa, pq


def arrow_schema():
    """The parquet rows: path, labels (list of {label, score}, best first), error, code."""
    pa, _ = _pyarrow()
    return pa.schema([("path", pa.string()),
                      ("labels", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float32())]))),
                      ("error", pa.string()), ("code", pa.string())])


def rows_table(rows: Sequence[dict]):
    """Rows as a pyarrow Table of `arrow_schema()` (absent fields are nulls)."""
    pa, _ = _pyarrow()
    schema = arrow_schema()
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def jsonl(rows: Iterable[dict]) -> str:
    """Rows as JSON lines; absent (None) fields are left out, as in every JSONL output."""
    return "".join(json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False) + "\n"
                   for r in rows)


def read_rows(out: str | Path) -> Iterator[dict]:
    """The rows of an output: a JSONL or parquet file, or a folder of them (a Ray run's). Rows
    come back as they were written: "labels" on success, "error" and "code" on failure."""
    out = Path(out)
    if out.is_dir():
        for f in sorted(out.iterdir()):
            if f.suffix in (".parquet", ".jsonl", ".json") and not f.name.startswith("."):
                yield from read_rows(f)
        return
    if output_format(out) == "jsonl":
        with open(out, encoding="utf-8") as f:
            for line in f:
                if line.endswith("\n"):
                    row = json.loads(line)
                    yield {k: v for k, v in row.items() if v is not None}
        return
    _, pq = _pyarrow()
    for batch in pq.ParquetFile(out).iter_batches():
        for row in batch.to_pylist():
            yield {k: v for k, v in row.items() if v is not None}


class JsonlWriter:
    """Appends rows to a JSONL file, flushed after every `write`."""

    def __init__(self, out: Path, append: bool):
        self.file = open(out, "a" if append else "w", encoding="utf-8")

    def write(self, rows: Sequence[dict]) -> None:
        self.file.write(jsonl(rows))
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class ParquetWriter:
    """Writes `<out>.partial` (the rows kept from `out` first, when resuming), renamed to `out` on
    `close`: a parquet file is readable only once its footer is written. Rows are written in row
    groups of `group_rows`, not one small group per batch."""

    def __init__(self, out: Path, keep_from: Path | None = None, drop_errors: bool = False, group_rows: int = 8192):
        _, pq = _pyarrow()
        self.out, self.partial = out, out.with_name(out.name + ".partial")
        self.rows: list[dict] = []
        self.group_rows = group_rows
        self.writer = pq.ParquetWriter(self.partial, arrow_schema())
        if keep_from is not None:
            for batch in pq.ParquetFile(keep_from).iter_batches():
                table = _arrow_table(batch)
                if drop_errors:
                    table = table.filter(table["error"].is_null())
                self.writer.write_table(table)

    def write(self, rows: Sequence[dict]) -> None:
        self.rows += rows
        if len(self.rows) >= self.group_rows:
            self.writer.write_table(rows_table(self.rows))
            self.rows = []

    def close(self) -> None:
        if self.rows:
            self.writer.write_table(rows_table(self.rows))
        self.writer.close()
        os.replace(self.partial, self.out)


def _arrow_table(batch):
    pa, _ = _pyarrow()
    return pa.Table.from_batches([batch]).cast(arrow_schema())


def done_paths(out: Path, retry_errors: bool = False) -> set[str]:
    """The paths an output already holds (a resumed run skips them). A JSONL file is repaired
    first: a last line cut short by a killed run is dropped, and with `retry_errors` the error rows
    too (so those inputs get one row again, not two)."""
    if not out.exists():
        return set()
    done: set[str] = set()
    if out.is_dir() or output_format(out) == "parquet":
        for row in read_rows(out):
            if not (retry_errors and row.get("error")):
                done.add(row["path"])
        return done
    repaired, dropped = out.with_name(out.name + ".partial"), False
    with open(out, encoding="utf-8") as src, open(repaired, "w", encoding="utf-8") as dst:
        for line in src:
            try:
                row = json.loads(line) if line.endswith("\n") else None
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or "path" not in row or (retry_errors and row.get("error")):
                dropped = True
                continue
            dst.write(line)
            done.add(row["path"])
    if dropped:
        os.replace(repaired, out)
    else:
        repaired.unlink()
    return done


def open_writer(out: Path, resume: bool, retry_errors: bool):
    if output_format(out) == "jsonl":
        return JsonlWriter(out, append=resume)
    return ParquetWriter(out, keep_from=out if resume and out.exists() else None, drop_errors=retry_errors)


# -- the pipeline ---------------------------------------------------------------------------------------
@dataclass
class Summary:
    images: int = 0  # rows written by this run (classified + errors)
    errors: int = 0  # of which error rows
    skipped: int = 0  # inputs not classified: already in the output (resume), or repeated
    seconds: float = 0.0  # wall time of the run, model loading included

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        return (f"{self.images} images ({self.images - self.errors} classified, {self.errors} errors), "
                f"{self.skipped} skipped, in {self.seconds:.1f}s: {self.images_per_second:.1f} images/s")


def decode_items(items: Sequence[Item], cfg: PreprocessConfig, max_pixels: int = MAX_PIXELS,
                 max_bytes: int = MAX_BYTES) -> list[np.ndarray | ItemError]:
    """`decode_item` of each of `items` (one task of the decoding pool): the pixels, or the error."""
    out: list[np.ndarray | ItemError] = []
    for item in items:
        try:
            out.append(decode_item(item, cfg, max_pixels, max_bytes))
        except ItemError as e:
            out.append(e)
    return out


def classify_items(items: Iterable[Item], zs: ZeroShot, write, top_k: int | None = 5, batch_size: int = 64,
                   workers: int = 4, skip: set[str] | None = None, max_pixels: int = MAX_PIXELS,
                   max_bytes: int = MAX_BYTES, progress: bool = True, passes: int = 1) -> Summary:
    """Classify `items` `batch_size` at a time: each batch is decoded by a pool of `workers`
    threads (a slice of the batch per task, not a task per image), at most 2 batches ahead of the
    encoder, then classified, `passes` batches at once (each in its own thread: open the encoders
    with `threads_per_pass(passes)`); `write(rows)` in input order. Memory stays bounded whatever
    the input's size: at most (3 + passes) x `batch_size` inputs are taken ahead of what is
    written. Paths in `skip` (and repeats) are skipped."""
    from tqdm import tqdm

    summary, seen = Summary(), set(skip or ())
    cfg = zs.preprocess
    piece = -(-batch_size // workers)  # images per decoding task: each batch shared among the workers
    decoding: deque[tuple[list[str], list[Future]]] = deque()  # batches being decoded, in input order
    encoding: deque[Future] = deque()  # batches being classified, in input order: each -> rows
    bar = tqdm(unit="img", desc="classify", disable=not progress, dynamic_ncols=True, smoothing=0.1)

    def batches() -> Iterator[list[Item]]:
        batch: list[Item] = []
        for item in items:
            if item.path in seen:
                summary.skipped += 1
                continue
            seen.add(item.path)
            batch.append(item)
            if len(batch) == batch_size:  # error items count too: a run of bad files stays bounded
                yield batch
                batch = []
        if batch:
            yield batch

    def finish() -> None:
        """Write the oldest batch being classified, once it is."""
        rows = encoding.popleft().result()
        write(rows)
        errors = sum("error" in r for r in rows)
        summary.images += len(rows)
        summary.errors += errors
        bar.update(len(rows))
        if errors:
            bar.set_postfix(errors=summary.errors, refresh=False)

    def classify_next() -> None:
        """Hand the oldest batch being decoded, once it is, to the encoder."""
        paths, futures = decoding.popleft()
        decoded = [x for future in futures for x in future.result()]
        while len(encoding) >= passes:
            finish()
        encoding.append(encoder.submit(zs.rows, paths, decoded, top_k))

    with ThreadPoolExecutor(workers, thread_name_prefix="limoe-decode") as pool, \
            ThreadPoolExecutor(passes, thread_name_prefix="limoe-encode") as encoder:
        try:
            for batch in batches():
                if len(decoding) == 2:
                    classify_next()
                decoding.append(([item.path for item in batch],
                                 [pool.submit(decode_items, batch[i:i + piece], cfg, max_pixels, max_bytes)
                                  for i in range(0, len(batch), piece)]))
            while decoding:
                classify_next()
            while encoding:
                finish()
        finally:
            for future in [f for _, futures in decoding for f in futures] + list(encoding):
                future.cancel()  # an interrupted run: stop what nobody will read
            bar.close()
    return summary


def run(inputs: Sequence[str], out: str | Path, labels: Sequence[str], *, templates: Sequence[str] | None = None,
        model: str = "limoe-small", version: str = "latest", store: str | Path | None = None,
        backend: str = "onnx", device: str = "auto", quantized: bool | None = None, threads: int = 0,
        top_k: int | None = 5, batch_size: int = 64, workers: int = 4, resume: bool = False,
        overwrite: bool = False, retry_errors: bool = False, max_pixels: int = MAX_PIXELS,
        max_bytes: int = MAX_BYTES, progress: bool = True, passes: int = 2) -> Summary:
    """Classify `inputs` (see `iter_items`) against `labels` into `out` (.jsonl or .parquet) on one
    machine. An existing `out` needs `resume` (skip what it holds) or `overwrite`."""
    started = time.perf_counter()
    out = Path(out)
    output_format(out)
    check_inputs(inputs)
    if out.exists() and not (resume or overwrite):
        raise ClassifyError(f"{out} exists: --resume to add what it lacks, or --overwrite to start again")
    if out.is_dir():
        raise ClassifyError(f"{out} is a folder (a --ray run's output?): give a file, or add --ray")
    if not resume and retry_errors:
        raise ClassifyError("--retry-errors goes with --resume")
    check_templates(templates)
    if output_format(out) == "parquet":
        _pyarrow()  # fail now, not after the model is loaded
    if passes < 1:
        raise ClassifyError("--passes must be at least 1")
    zs = ZeroShot(open_encoders(load_entry(model, version, store), backend, device, quantized,
                                threads_per_pass(passes, threads)), labels, templates)
    skip = done_paths(out, retry_errors) if resume else set()
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = open_writer(out, resume, retry_errors)
    try:
        summary = classify_items(iter_items(inputs), zs, writer.write, top_k, batch_size, workers, skip,
                                 max_pixels, max_bytes, progress, passes)
    finally:
        writer.close()
    summary.seconds = time.perf_counter() - started
    return summary


def print_summary(summary: Summary, out: str | Path) -> None:
    print(f"{summary}; wrote {out}")
