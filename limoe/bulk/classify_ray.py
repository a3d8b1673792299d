"""`limoe classify --ray`: the offline classifier (limoe.bulk.classify) as a Ray Data pipeline, for more
than one machine. Needs the `ray` extra (pip install 'limoe-serve[ray]').

    read_binary_files(image files)  +  from_items(shards).flat_map(members)    rows {path, bytes}
      -> map_batches(RayClassifier, compute=ActorPoolStrategy(size=N), num_gpus=G)   each actor opens the store entry and
                                                                 encodes the label set once, then
                                                                 decodes and scores with limoe.bulk.classify
      -> write_parquet(out) or write_json(out)                   `out` is a folder: a file per block

Decoding is ours (read_binary_files, not read_images), so rows match the single-process run's.
The driver lists the inputs (limoe.bulk.classify.iter_sources) and the workers read them: on a cluster,
inputs, the model store and `out` must be at the same path on every node (a shared filesystem), and
limoe installed there. A file listed but gone when a worker looks gets an "unreadable" row.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from limoe.bulk.classify import (
    MAX_BYTES,
    MAX_PIXELS,
    ClassifyError,
    Item,
    ItemError,
    Summary,
    ZeroShot,
    check_inputs,
    check_templates,
    decode_item,
    done_paths,
    is_index,
    is_shard,
    iter_index,
    iter_shard,
    iter_sources,
    jsonl,
    load_entry,
    open_encoders,
    output_format,
    read_rows,
    rows_table,
    unreadable,
)
from limoe.runtime.model_store import verify

try:
    import ray
    from ray.data.datasource import BlockBasedFileDatasink
except ImportError:
    raise ClassifyError("--ray needs Ray: pip install 'limoe-serve[ray]'") from None


class RayClassifier:
    """The map_batches callable: one per actor. A batch {"path", "bytes"} -> a pyarrow Table of
    limoe.bulk.classify's rows (`arrow_schema`)."""

    def __init__(self, entry: str, labels: Sequence[str], templates: Sequence[str] | None, top_k: int | None,
                 backend: str, device: str, quantized: bool | None, threads: int, workers: int,
                 max_pixels: int, max_bytes: int):
        # verified on this node: a worker's copy of the store is checked like the server's
        self.zs = ZeroShot(open_encoders(verify(Path(entry)), backend, device, quantized, threads), labels, templates)
        self.top_k, self.max_pixels, self.max_bytes = top_k, max_pixels, max_bytes
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="limoe-decode")

    def _decode(self, data: bytes) -> np.ndarray | ItemError:
        try:
            return decode_item(Item("", bytes(data)), self.zs.preprocess, self.max_pixels, self.max_bytes)
        except ItemError as e:
            return e

    def __call__(self, batch: dict[str, np.ndarray]):
        decoded = list(self.pool.map(self._decode, batch["bytes"]))
        return rows_table(self.zs.rows([str(p) for p in batch["path"]], decoded, self.top_k))


class JsonlDatasink(BlockBasedFileDatasink):
    """write_json's files, but written by limoe.bulk.classify.jsonl: the same lines as a single-process run's."""

    def __init__(self, path: str):
        super().__init__(path, file_format="jsonl")

    def write_block_to_file(self, block, file) -> None:
        file.write(jsonl(block.to_arrow().to_pylist()).encode("utf-8"))


def _shard_rows(row: dict[str, Any], skip: frozenset[str]) -> Iterator[dict[str, Any]]:
    """A shard's image members as rows, streamed (Ray cuts them into blocks as they come)."""
    for item in iter_shard(row["shard"], skip):
        yield {"path": item.path, "bytes": item.ref}


def _write_local(rows: list[dict], out: Path, fmt: str) -> None:
    """Rows the driver knows (index rows naming no image, files the workers did not find), as one
    more file in `out`."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(rows_table(rows), out / f"driver-{uuid.uuid4().hex[:12]}.parquet")
    else:
        (out / f"driver-{uuid.uuid4().hex[:12]}.jsonl").write_text(jsonl(rows), encoding="utf-8")


def _output_files(out: Path) -> set[Path]:
    return {f for f in out.iterdir() if f.suffix in (".parquet", ".jsonl")} if out.is_dir() else set()


def run_ray(inputs: Sequence[str], out: str | Path, labels: Sequence[str], *, templates: Sequence[str] | None = None,
            model: str = "limoe-small", version: str = "latest", store: str | Path | None = None,
            backend: str = "onnx", device: str = "auto", quantized: bool | None = None, threads: int = 0,
            top_k: int | None = 5, batch_size: int = 64, workers: int = 2, resume: bool = False,
            overwrite: bool = False, retry_errors: bool = False, max_pixels: int = MAX_PIXELS,
            max_bytes: int = MAX_BYTES, progress: bool = True, address: str | None = None, concurrency: int = 1,
            num_gpus: float = 0) -> Summary:
    """`limoe.bulk.classify.run` on Ray: `out` (named *.parquet or *.jsonl for the format) is a folder
    of files. Joins the Ray instance this process already has, else `address` (None: $RAY_ADDRESS,
    else a new local instance). `skipped` counts the inputs the driver lists (files, index rows)
    that `out` already holds; shard members it holds are skipped by the workers, uncounted."""
    started = time.perf_counter()
    out, fmt = Path(out), output_format(out)
    check_inputs(inputs)
    check_templates(templates)
    if retry_errors:
        raise ClassifyError("--retry-errors is not supported with --ray (a folder's files are not rewritten): "
                            "classify the error rows' paths again into a new folder")
    if out.exists() and not out.is_dir():
        raise ClassifyError(f"{out} is a file: with --ray, --out is a folder of files")
    if _output_files(out) and not (resume or overwrite):
        raise ClassifyError(f"{out} holds results: --resume to add what it lacks, or --overwrite to start again")
    if overwrite and not resume:
        for f in _output_files(out):
            f.unlink()
    manifest = load_entry(model, version, store)  # checked here, and by every actor on its node
    done = done_paths(out) if resume else set()

    summary, seen = Summary(), set(done)
    files: list[str] = []
    shards: list[str] = []
    known: list[dict] = []  # rows the driver writes itself
    for source in iter_sources(inputs):
        if is_shard(source):
            shards.append(source)
            continue
        for item in iter_index(source) if is_index(source) else (Item(source, source),):
            if item.path in seen:
                summary.skipped += 1
                continue
            seen.add(item.path)
            if item.error is not None:
                known.append({"path": item.path, "error": str(item.error), "code": item.error.code})
            else:
                files.append(item.path)

    if not ray.is_initialized():
        ray.init(address=address)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    parts = []
    if files:
        parts.append(ray.data.read_binary_files(files, include_paths=True, ignore_missing_paths=True))
    if shards:
        parts.append(ray.data.from_items([{"shard": s} for s in shards])
                     .flat_map(_shard_rows, fn_kwargs={"skip": frozenset(done)}))
    before = _output_files(out)
    out.mkdir(parents=True, exist_ok=True)
    if parts:
        ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        ds = ds.map_batches(
            RayClassifier, batch_size=batch_size, batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=concurrency),  # `concurrency=` is deprecated in Ray 2.51+
            fn_constructor_kwargs=dict(
                entry=str(manifest.path.resolve()), labels=list(labels), templates=templates, top_k=top_k,
                backend=backend, device="cuda" if num_gpus and device == "auto" else device, quantized=quantized,
                threads=threads, workers=workers, max_pixels=max_pixels, max_bytes=max_bytes),
            **({"num_gpus": num_gpus} if num_gpus else {}))
        if fmt == "parquet":
            ds.write_parquet(str(out))
        else:
            ds.write_datasink(JsonlDatasink(str(out)))

    written: set[str] = set()
    for f in sorted(_output_files(out) - before):
        for row in read_rows(f):
            written.add(row["path"])
            summary.errors += "error" in row
    unread = set(files) - written  # gone before a worker read it
    gone = unreadable(FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT)))
    known += [{"path": p, "error": str(gone), "code": gone.code} for p in sorted(unread)]
    if known:
        _write_local(known, out, fmt)
    summary.images = len(written) + len(known)
    summary.errors += len(known)
    summary.seconds = time.perf_counter() - started
    return summary
