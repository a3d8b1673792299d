"""The engine behind every API: image decoding in a worker pool, one dynamic batcher per encoder,
the label-embedding cache, and zero-shot scoring. The three HTTP APIs only translate formats.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from limoe.preprocess import ImageError, ImageTooLargeError, clean_error, open_image, preprocess_image
from limoe.routing_counts import expert_counts
from limoe.zeroshot import ensemble, fill_templates, softmax
from service.backends import Backend
from service.batcher import DynamicBatcher, ItemResult
from service.errors import ImageTooLarge, InvalidImage, NotReady, Overloaded, ServiceError, Unprocessable
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("limoe.service")


class InferenceFailed(ServiceError):
    status, code = 500, "inference_failed"


@dataclass
class Classification:
    scores: list[dict]  # [{"label", "score"}] sorted by score, descending
    routing: ItemResult


class LabelCache:
    """LRU of label embeddings keyed by (model version, templates, label); concurrent requests
    for the same missing label share one computation."""

    def __init__(self, size: int, metrics: Metrics):
        self.size, self.metrics = size, metrics
        self._entries: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self.pending: dict[tuple, asyncio.Future] = {}  # label embeddings being computed

    def get(self, key: tuple) -> np.ndarray | asyncio.Future | None:
        if key in self._entries:
            self._entries.move_to_end(key)
            return self._entries[key]
        return self.pending.get(key)

    def put(self, key: tuple, value: np.ndarray) -> None:
        if self.size == 0:
            return
        self._entries[key] = value
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        self.metrics.label_cache_size.set(len(self._entries))

    def __len__(self) -> int:
        return len(self._entries)


class Engine:
    def __init__(self, backend: Backend, settings: Settings, metrics: Metrics):
        self.backend, self.settings, self.metrics = backend, settings, metrics
        m = backend.manifest
        self.moe_layers: list[int] = list(m["moe"]["layers"])
        self.num_experts: int = m["moe"]["num_experts"]
        self.templates: tuple[str, ...] = tuple(m.get("templates") or ["{}"])
        self.labels = LabelCache(settings.label_cache_size, metrics)
        self.pool = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="limoe-decode")
        self.ready = False
        self.image_batcher = self._batcher("image", backend.encode_images)
        self.text_batcher = self._batcher("text", backend.encode_tokens)

    def _batcher(self, modality: str, forward) -> DynamicBatcher:
        s = self.settings

        def count(out) -> None:
            self.metrics.observe_routing(modality, self.moe_layers, self.num_experts, out.expert_index, out.dropped)

        return DynamicBatcher(modality, forward, s.max_batch_size, s.max_batch_wait_ms / 1000, s.queue_size,
                              self.metrics, on_batch=count)

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.image_batcher.start()
        self.text_batcher.start()
        if self.settings.warmup:
            await self.warm_up()
        self.ready = True
        self.metrics.ready.set(1)

    def warm_up_sizes(self) -> list[int]:
        """Batch sizes to warm up: every size up to 32, then powers of two and the maximum, so
        start-up grows linearly (not quadratically) with LIMOE_MAX_BATCH_SIZE."""
        top = self.settings.max_batch_size
        sizes = set(range(1, min(top, 32) + 1)) | {2 ** k for k in range(top.bit_length()) if 2 ** k <= top} | {top}
        return sorted(sizes)

    async def warm_up(self) -> None:
        """Run the batch sizes once on both encoders: lazy allocations and kernel selection (and
        cuDNN autotuning on GPU) happen now, not on the first user's request."""
        started = time.perf_counter()
        size = self.backend.preprocess.image_size
        bos_eos = self.backend.tokenizer.encode([""])[0]
        for n in self.warm_up_sizes():
            await self.image_batcher.run_direct(np.zeros((n, 3, size, size), np.float32))
            await self.text_batcher.run_direct(np.tile(bos_eos, (n, 1)))
        log.info("warm-up: %d batch sizes up to %d in %.1fs", len(self.warm_up_sizes()), self.settings.max_batch_size,
                 time.perf_counter() - started)

    async def stop(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        await self.image_batcher.stop()
        await self.text_batcher.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)

    @property
    def alive(self) -> bool:
        return self.image_batcher.alive and self.text_batcher.alive

    def require_ready(self) -> None:
        if not self.ready:
            raise NotReady("the model is still loading")

    # -- inputs ------------------------------------------------------------------------------------------
    def check_labels(self, labels: Sequence[str]) -> list[str]:
        s = self.settings
        if not isinstance(labels, (list, tuple)) or not labels:
            raise Unprocessable("give at least one candidate label", "invalid_labels")
        if len(labels) > s.max_labels:
            raise Unprocessable(f"{len(labels)} labels; at most {s.max_labels} per request", "too_many_labels")
        clean = []
        for label in labels:
            if not isinstance(label, str) or not label.strip():
                raise Unprocessable("labels must be non-empty strings", "invalid_labels")
            if len(label) > s.max_label_chars:
                raise Unprocessable(f"a label is longer than {s.max_label_chars} characters", "invalid_labels")
            clean.append(label.strip())
        if len(set(clean)) != len(clean):
            raise Unprocessable("labels must be distinct", "invalid_labels")
        return clean

    def check_templates(self, templates: Sequence[str] | None) -> tuple[str, ...]:
        if templates is None:
            return self.templates
        if not isinstance(templates, (list, tuple)) or not templates or len(templates) > 32:
            raise Unprocessable("templates must be a list of 1 to 32 strings", "invalid_templates")
        for t in templates:
            if not isinstance(t, str) or t.count("{}") != 1 or len(t) > 500:
                raise Unprocessable(f"template {t!r} must be a string with exactly one '{{}}'", "invalid_templates")
        return tuple(templates)

    def _decode(self, data: bytes) -> np.ndarray:
        s = self.settings
        if not data:
            raise InvalidImage("the image is empty (0 bytes)")
        if len(data) > s.max_image_bytes:
            raise ImageTooLarge(f"the image is {len(data)} bytes; the limit is {s.max_image_bytes}")
        started = time.perf_counter()
        try:
            img = open_image(data, max_pixels=s.max_image_pixels)
        except ImageTooLargeError as e:
            raise ImageTooLarge(str(e)) from None
        except ImageError as e:
            raise InvalidImage(str(e)) from None
        try:
            x = preprocess_image(img, self.backend.preprocess)
        except (OSError, ValueError) as e:  # e.g. a truncated file that only fails on conversion
            raise InvalidImage(f"cannot convert image: {clean_error(e)}") from None
        self.metrics.preprocess_seconds.observe(time.perf_counter() - started)
        return x

    # -- encoders --------------------------------------------------------------------------------------
    async def encode_image(self, data: bytes, wait: bool = False) -> ItemResult:
        """Decode in the worker pool, then queue for the image encoder. `wait`: wait for queue
        room (bulk work) instead of answering 429 when the queue is full."""
        x = await asyncio.get_running_loop().run_in_executor(self.pool, self._decode, data)
        try:
            future = await self.image_batcher.submit_wait(x) if wait else self.image_batcher.submit(x)
            return await future
        except RuntimeError as e:
            raise InferenceFailed(str(e)) from None

    async def encode_texts(self, texts: Sequence[str]) -> list[ItemResult]:
        ids = self.backend.tokenizer.encode(list(texts))
        futures: list[asyncio.Future] = []
        try:
            for row in ids:  # prompts of one label set may outnumber the queue: wait for room
                futures.append(await self.text_batcher.submit_wait(row))
            return list(await asyncio.gather(*futures))
        except RuntimeError as e:
            raise InferenceFailed(str(e)) from None
        finally:
            for f in futures:  # if one failed or we were cancelled, free the others' slots
                if not f.done():
                    f.cancel()

    async def label_matrix(self, labels: Sequence[str], templates: tuple[str, ...]) -> np.ndarray:
        """(P, C) class embeddings, from the cache where possible.

        Missing labels are embedded by a task of their own, shared with concurrent requests that
        need the same labels and shielded from the caller: a client that disconnects never
        fails another client's request waiting on the same labels."""
        keys = [(self.backend.version, templates, label) for label in labels]
        columns: list = [self.labels.get(k) for k in keys]
        missing = [k for k, c in zip(keys, columns) if c is None]
        if len(missing) < len(keys):
            self.metrics.label_cache.labels("hit").inc(len(keys) - len(missing))
        if missing:
            self.metrics.label_cache.labels("miss").inc(len(missing))
            task = asyncio.ensure_future(self._embed_labels(missing))
            for k in missing:
                self.labels.pending[k] = task
            task.add_done_callback(lambda t: self._forget_pending(t, missing))
            columns = [task if c is None else c for c in columns]
        resolved = []
        for key, column in zip(keys, columns):
            if isinstance(column, asyncio.Future):
                column = (await asyncio.shield(column))[key]
            resolved.append(column)
        return np.stack(resolved, axis=1)

    async def _embed_labels(self, keys: list[tuple]) -> dict[tuple, np.ndarray]:
        templates = keys[0][1]
        results = await self.encode_texts(fill_templates([k[2] for k in keys], templates))
        emb = np.stack([r.embedding for r in results]).reshape(len(keys), len(templates), -1)
        columns = {}
        for j, key in enumerate(keys):
            columns[key] = ensemble(emb[j:j + 1])[:, 0]  # (P,)
            self.labels.put(key, columns[key])
        return columns

    def _forget_pending(self, task: asyncio.Future, keys: list[tuple]) -> None:
        for k in keys:
            if self.labels.pending.get(k) is task:
                del self.labels.pending[k]
        if not task.cancelled():
            task.exception()  # retrieved: waiters see it; nobody waiting is not an error

    # -- zero-shot -----------------------------------------------------------------------------------
    def scores(self, image: ItemResult, classes: np.ndarray, labels: Sequence[str], top_k: int | None) -> list[dict]:
        probs = softmax(self.backend.logit_scale * (image.embedding @ classes))
        order = np.argsort(-probs, kind="stable")[: top_k or len(labels)]
        return [{"label": labels[i], "score": float(probs[i])} for i in order]

    async def classify(self, images: Sequence[bytes], labels: Sequence[str], templates: Sequence[str] | None = None,
                       top_k: int | None = None, bulk: bool = False) -> list[Classification | ServiceError]:
        """Per image, its ranked labels or its own error (in input order). `bulk` requests wait
        for queue room; others get 429 when the image queue is full."""
        self.require_ready()
        labels = self.check_labels(labels)
        templates = self.check_templates(templates)
        if top_k is not None and top_k < 1:
            raise Unprocessable("top_k must be >= 1", "invalid_top_k")
        matrix_task = asyncio.ensure_future(self.label_matrix(labels, templates))
        image_tasks = [asyncio.ensure_future(self.encode_image(d, wait=bulk)) for d in images]
        try:
            encoded = await asyncio.gather(*image_tasks, return_exceptions=True)
            matrix = await matrix_task
        except BaseException:
            for t in (matrix_task, *image_tasks):
                t.cancel()
            raise
        out: list[Classification | ServiceError] = []
        for result in encoded:
            if isinstance(result, Overloaded):
                raise result
            if isinstance(result, ServiceError):
                self.metrics.items.labels("image", result.code).inc()
                out.append(result)
            elif isinstance(result, BaseException):
                raise result
            else:
                out.append(Classification(self.scores(result, matrix, labels, top_k), result))
        return out

    def routing_summary(self, result: ItemResult, modality: str = "image") -> dict:
        """How one example was routed: per MoE layer, tokens per expert, dropped choices, and the
        top-1 expert of every token (a patch grid for images: row-major, side x side)."""
        idx, dropped = result.expert_index, result.dropped  # (M, T, K)
        routed, lost = expert_counts(idx, dropped, self.num_experts)  # (M, E) each
        layers = []
        for m, layer in enumerate(self.moe_layers):
            layers.append({
                "layer": layer,
                "tokens_per_expert": routed[m].tolist(),
                "dropped": int(lost[m].sum()),
                "top1_expert": [int(e) if not d else -1 for e, d in zip(idx[m, :, 0], dropped[m, :, 0])],
            })
        summary: dict = {"modality": modality, "num_experts": self.num_experts, "layers": layers}
        if modality == "image":
            summary["grid"] = int(round(np.sqrt(idx.shape[1])))
        return summary
