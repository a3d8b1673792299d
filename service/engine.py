"""The engine behind every API: admission (queue places taken before decoding), image decoding in
a worker pool, one dynamic batcher per encoder, the label-embedding and label-set caches, and
zero-shot scoring. The three HTTP APIs only translate formats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from limoe.runtime.preprocess import ImageError, ImageTooLargeError, PixelBudget, decode_image
from limoe.runtime.routing_counts import expert_counts
from limoe.runtime.zeroshot import ensemble, fill_templates, zero_shot_scores
from service.backends import Backend, encoder_passes
from service.batcher import DynamicBatcher, ItemResult, PassShare, Permit, RequestShare
from service.errors import ImageTooLarge, InvalidImage, NotReady, Overloaded, ServiceError, Unprocessable
from service.metrics import Metrics, ModelMetrics
from service.settings import Settings

# A label set's prompts are tokenised this many batcher chunks at a time (see Engine.encode_texts).
TOKENIZE_CHUNKS = 8

log = logging.getLogger("limoe.service")


class InferenceFailed(ServiceError):
    status, code = 500, "inference_failed"


@dataclass
class Routing:
    """How one example was routed through the MoE layers (M layers, E experts, T tokens)."""

    tokens_per_expert: np.ndarray  # (M, E) token choices each expert took
    dropped: np.ndarray  # (M,) token choices dropped because their expert was full
    top1: np.ndarray  # (M, T) int64: each token's first-choice expert, -1 where that choice was dropped


@dataclass
class Scores:
    """One request's zero-shot answer, in input order (N images, C labels). The API adapters
    sort, truncate and shape it for their protocols."""

    probs: np.ndarray  # (N, C) float32: softmax over the labels; zeros for an image that failed
    errors: list[ServiceError | None]  # (N,) why each image failed, or None
    routing: list[Routing | None]  # (N,) how each image was routed, or None where it failed
    prompts: list[Routing] | None = None  # (C * templates,) label-major, with explain: how each prompt was routed


class LRU:
    """A least-recently-used map whose entries' total cost stays within `size`: one per entry by
    default, or e.g. bytes with `cost=lambda v: v.nbytes`. An entry costing more than `size` is
    not kept. `on_change(lru)` runs after every put (to set a gauge)."""

    def __init__(self, size: float, cost: Callable[[Any], float] = lambda value: 1,
                 on_change: Callable[[LRU], None] | None = None):
        self.size, self.cost, self.on_change = size, cost, on_change
        self.used: float = 0
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        if key in self._entries:
            self.used -= self.cost(self._entries.pop(key))
        cost = self.cost(value)
        if cost <= self.size:
            self._entries[key] = value
            self.used += cost
            while self.used > self.size:
                self.used -= self.cost(self._entries.popitem(last=False)[1])
        if self.on_change:
            self.on_change(self)

    def __len__(self) -> int:
        return len(self._entries)


class LabelCache(LRU):
    """Label embeddings keyed by (model version, templates, label), at most `size` of them;
    concurrent requests for the same missing label share one computation (`pending`)."""

    def __init__(self, size: int, metrics: Metrics):
        super().__init__(size, on_change=lambda lru: metrics.label_cache_size.set(len(lru)))
        self.pending: dict[tuple, asyncio.Future] = {}  # label embeddings being computed

    def get(self, key: tuple) -> np.ndarray | asyncio.Future | None:
        value = super().get(key)
        return self.pending.get(key) if value is None else value


class Engine:
    """One model version's serving: its batchers, caches and decoding pools. `metrics`: the
    server's (this version's series are labelled with its name and version) or a ModelMetrics.
    `pixels`: the decoding budget it shares with the server's other models, `share` the forward
    passes (service/batcher.py PassShare); its own of each by default. `requests`: the turns of
    requests in flight that the server's models share (RequestShare; None: no limit)."""

    def __init__(self, backend: Backend, settings: Settings, metrics: Metrics | ModelMetrics,
                 pixels: PixelBudget | None = None, share: PassShare | None = None,
                 requests: RequestShare | None = None):
        if isinstance(metrics, Metrics):
            metrics = metrics.for_model(backend.name, backend.version)
        self.backend, self.settings, self.metrics = backend, settings, metrics
        self.moe_layers: list[int] = list(backend.moe.layers)
        self.num_experts: int = backend.moe.num_experts
        self.templates: tuple[str, ...] = backend.manifest.templates
        self.labels = LabelCache(settings.label_cache_size, metrics)
        # Whole label sets' (P, C) matrices, keyed by (model version, templates, label tuple): a
        # label set seen before costs one lookup, not C of them and a stack.
        self.label_sets = LRU(settings.label_set_cache_mb * 2 ** 20, cost=lambda matrix: matrix.nbytes,
                              on_change=lambda lru: metrics.label_set_cache_bytes.set(lru.used))
        self.pixels = pixels or PixelBudget(settings.max_decode_pixels)
        self.share = share or PassShare()
        self.requests = requests
        self.pool = ThreadPoolExecutor(settings.preprocess_workers, thread_name_prefix="limoe-decode")
        # Batch jobs' images decode here, so that they never queue ahead of interactive ones in `pool`
        self.low_pool = ThreadPoolExecutor(1, thread_name_prefix="limoe-decode-jobs")
        self.warm = False  # the model answered a warm-up forward pass: the inference routes serve
        self.draining = False  # a shutdown began (`drain`): readiness says no, requests are still served
        self.image_batcher = self._batcher("image", backend.encode_images)
        self.text_batcher = self._batcher("text", backend.encode_tokens)

    def _batcher(self, modality: str, forward) -> DynamicBatcher:
        s = self.settings

        def count(out) -> None:
            self.metrics.observe_routing(modality, self.moe_layers, self.num_experts, out.expert_index, out.dropped)

        return DynamicBatcher(modality, forward, s.max_batch_size, s.max_batch_wait_ms / 1000, s.queue_size,
                              self.metrics, on_batch=count, low_max_batch=s.jobs_max_batch,
                              passes=encoder_passes(s, self.backend.manifest),
                              pass_timeout_s=s.infer_timeout_s, share=self.share, share_key=self.backend.name,
                              nice=s.pass_nice)

    # -- lifecycle -------------------------------------------------------------------------------------
    async def start(self, sizes: Sequence[int] | None = None) -> None:
        """Start the batchers and warm up (`sizes`: the batch sizes to run; default
        `warm_up_sizes`); then serve."""
        self.image_batcher.start()
        self.text_batcher.start()
        if self.settings.warmup:
            await self.warm_up(sizes)
        self.warm = True
        self.metrics.model_ready.set(0 if self.draining else 1)

    def warm_up_sizes(self) -> list[int]:
        """Batch sizes to warm up: every size up to 32, then powers of two and the maximum, so
        start-up grows linearly (not quadratically) with LIMOE_MAX_BATCH_SIZE."""
        top = self.settings.max_batch_size
        sizes = set(range(1, min(top, 32) + 1)) | {2 ** k for k in range(top.bit_length()) if 2 ** k <= top} | {top}
        return sorted(sizes)

    async def warm_up(self, sizes: Sequence[int] | None = None) -> None:
        """Run the batch sizes once on both encoders: lazy allocations and kernel selection (and
        cuDNN autotuning on GPU) happen now, not on the first user's request."""
        started = time.perf_counter()
        size = self.backend.preprocess.image_size
        bos_eos = self.backend.tokenizer.encode([""])[0]
        sizes = list(sizes or self.warm_up_sizes())
        for n in sizes:
            await self.image_batcher.run_direct(np.zeros((n, 3, size, size), np.float32))
            await self.text_batcher.run_direct(np.tile(bos_eos, (n, 1)))
        log.info("%s v%s warm-up: %d batch sizes up to %d in %.1fs", self.backend.name, self.backend.version,
                 len(sizes), max(sizes), time.perf_counter() - started)

    def drain(self) -> None:
        """A shutdown began (service/cli.py): stop reporting ready, so that load balancers stop
        sending; the inference routes still serve what comes meanwhile."""
        self.draining = True
        self.metrics.model_ready.set(0)

    async def stop(self) -> None:
        self.warm = False
        self.metrics.model_ready.set(0)
        await self.image_batcher.stop()
        await self.text_batcher.stop()
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.low_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def alive(self) -> bool:
        return self.image_batcher.alive and self.text_batcher.alive

    @property
    def stuck(self) -> int:
        """Forward passes past LIMOE_INFER_TIMEOUT_S that have not returned."""
        return self.image_batcher.stuck + self.text_batcher.stuck

    @property
    def ready(self) -> bool:
        """Ready for new traffic (readiness probes): warm, no forward pass stuck, not shutting down."""
        return self.warm and not self.draining and not self.stuck

    def require_ready(self) -> None:
        """NotReady (503) until the model is warm. A draining server still serves."""
        if not self.warm:
            raise NotReady("the model is still loading")

    def turn(self) -> contextlib.AbstractAsyncContextManager:
        """An interactive request's turn among the server's models (`RequestShare`): waits while
        this model holds its share of requests in flight and another model has requests too."""
        return self.requests.turn(self.backend.name) if self.requests else contextlib.nullcontext()

    def admit(self, images: int, bulk: bool = False) -> Permit:
        """Places in the image queue for a request's images, taken before they are decoded (like
        TEI's permits): Overloaded (429, Retry-After) at once when they are not there, so an
        overloaded server refuses in microseconds. Use it as `with engine.admit(n) as permit:`
        around the request's work and pass `permit` on; leaving the block gives back the places
        not used. Bulk work is not refused: it waits for room image by image (an empty permit).
        A request with more images than the whole queue holds reserves the whole queue; its
        other images take places as the worker frees them, or are refused then, as before."""
        if bulk:
            return Permit()
        return self.image_batcher.reserve(min(images, self.image_batcher.room.size))

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
        started = time.perf_counter()
        try:
            x = decode_image(data, self.backend.preprocess, s.max_image_bytes, s.max_image_pixels, self.pixels)
        except ImageTooLargeError as e:
            raise ImageTooLarge(str(e)) from None
        except ImageError as e:
            raise InvalidImage(str(e)) from None
        self.metrics.preprocess_seconds.observe(time.perf_counter() - started)
        return x

    # -- encoders --------------------------------------------------------------------------------------
    async def encode_image(self, data: bytes, wait: bool = False, permit: Permit | None = None,
                           low: bool = False) -> ItemResult:
        """Decode in the worker pool, then queue for the image encoder, on a place of `permit`
        (see `admit`) when it has one left. `wait`: wait for queue room (bulk work) instead of
        answering 429 when the queue is full. `low`: a batch job's image, at low priority (its
        own decoding thread and queue; it waits for room)."""
        x = await asyncio.get_running_loop().run_in_executor(self.low_pool if low else self.pool, self._decode, data)
        try:
            if low:
                future = await self.image_batcher.submit_wait(x, low=True)
            else:
                future = await self.image_batcher.submit_wait(x) if wait else self.image_batcher.submit(x, permit)
            return await future
        except RuntimeError as e:
            raise InferenceFailed(str(e)) from None

    async def encode_texts(self, texts: Sequence[str]) -> list[ItemResult]:
        """Tokenise in the worker pool (a label set's thousands of prompts take a few hundred ms,
        which the event loop must not wait for), piece by piece while the encoder already runs on
        the first chunk, then queue in chunks of a full batch (one queue item each, not one per
        text), waiting for room: the prompts may outnumber the queue."""
        loop = asyncio.get_running_loop()
        texts, step = list(texts), self.text_batcher.chunk

        def tokenize(start: int, stop: int) -> asyncio.Future:
            return loop.run_in_executor(self.pool, self.backend.tokenizer.encode, texts[start:stop])

        # The first piece is one chunk, so that the encoder starts at once; later ones are
        # TOKENIZE_CHUNKS chunks, tokenised while the chunks before them are encoded.
        pieces = [(0, step)] + [(i, i + step * TOKENIZE_CHUNKS) for i in range(step, len(texts), step * TOKENIZE_CHUNKS)]
        futures: list[asyncio.Future] = []
        pending = tokenize(*pieces[0])
        try:
            for k in range(len(pieces)):
                ids = await pending
                pending = tokenize(*pieces[k + 1]) if k + 1 < len(pieces) else None
                for start in range(0, len(ids), step):
                    futures.append(await self.text_batcher.submit_many_wait(ids[start:start + step]))
            return [result for chunk in await asyncio.gather(*futures) for result in chunk]
        except RuntimeError as e:
            raise InferenceFailed(str(e)) from None
        finally:
            if pending is not None:
                pending.cancel()
            for f in futures:  # if one failed or we were cancelled, free the others' slots
                if not f.done():
                    f.cancel()

    async def label_matrix(self, labels: Sequence[str], templates: tuple[str, ...]) -> np.ndarray:
        """(P, C) class embeddings (L2-normalised columns, read-only): a label set seen before is
        one lookup; otherwise its columns come from the per-label cache where possible.

        Missing labels are embedded by a task of their own, shared with concurrent requests that
        need the same labels and shielded from the caller: a client that disconnects never
        fails another client's request waiting on the same labels."""
        set_key = (self.backend.version, templates, tuple(labels))
        matrix = self.label_sets.get(set_key)
        if matrix is not None:
            self.metrics.label_set_cache.labels("hit").inc()
            self.metrics.label_cache.labels("hit").inc(len(labels))  # served from cache all the same
            return matrix
        self.metrics.label_set_cache.labels("miss").inc()
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
        matrix = np.stack(resolved, axis=1)
        matrix.flags.writeable = False  # shared by every later request with this label set
        self.label_sets.put(set_key, matrix)
        return matrix

    async def _embed_labels(self, keys: list[tuple]) -> dict[tuple, np.ndarray]:
        templates = keys[0][1]
        results = await self.encode_texts(fill_templates([k[2] for k in keys], templates))
        emb = np.stack([r.embedding for r in results]).reshape(len(keys), len(templates), -1)  # (C, M, P)
        classes = ensemble(emb)  # (P, C): all labels at once
        columns = {}
        for j, key in enumerate(keys):
            columns[key] = classes[:, j].copy()  # (P,), not a view: the cache may keep it alone
            self.labels.put(key, columns[key])
        return columns

    def _forget_pending(self, task: asyncio.Future, keys: list[tuple]) -> None:
        for k in keys:
            if self.labels.pending.get(k) is task:
                del self.labels.pending[k]
        if not task.cancelled():
            task.exception()  # retrieved: waiters see it; nobody waiting is not an error

    # -- zero-shot -----------------------------------------------------------------------------------
    def scores(self, embedding: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """(C,) softmax over the labels for one image's (P,) embedding and the (P, C) classes."""
        return zero_shot_scores(embedding, classes, self.backend.logit_scale)

    async def classify(self, images: Sequence[bytes], labels: Sequence[str], templates: tuple[str, ...],
                       bulk: bool = False, permit: Permit | None = None, explain: bool = False,
                       low: bool = False) -> Scores:
        """Every image's scores against `labels` (as `check_labels` and `check_templates` return
        them: the API adapters check at the edge), or that image's own error. `bulk` requests
        wait for queue room; others queue on `permit`'s places (see `admit`), or get 429 when the
        image queue is full. `explain`: the label prompts' routing too (`prompt_routing`). `low`:
        a batch job's request, whose images go at low priority (`encode_image`)."""
        async with contextlib.nullcontext() if low else self.turn():
            return await self._classify(images, labels, templates, bulk, permit, explain, low)

    async def _classify(self, images: Sequence[bytes], labels: Sequence[str], templates: tuple[str, ...],
                        bulk: bool, permit: Permit | None, explain: bool, low: bool) -> Scores:
        matrix_task = asyncio.ensure_future(self.label_matrix(labels, templates))
        image_tasks = [asyncio.ensure_future(self.encode_image(d, wait=bulk, permit=permit, low=low)) for d in images]
        prompts_task = asyncio.ensure_future(self.prompt_routing(labels, templates)) if explain else None
        try:
            encoded = await asyncio.gather(*image_tasks, return_exceptions=True)
            matrix = await matrix_task
            prompts = await prompts_task if prompts_task else None
        except BaseException:
            for t in (matrix_task, *image_tasks, prompts_task):
                if t is not None:
                    t.cancel()
            raise
        probs = np.zeros((len(images), len(labels)), np.float32)
        errors: list[ServiceError | None] = [None] * len(images)
        routing: list[Routing | None] = [None] * len(images)
        for i, result in enumerate(encoded):
            if isinstance(result, Overloaded):
                raise result
            if isinstance(result, ServiceError):
                self.metrics.items.labels("image", result.code).inc()
                errors[i] = result
            elif isinstance(result, BaseException):
                raise result
            else:
                probs[i] = self.scores(result.embedding, matrix)
                routing[i] = self.routing(result)
        return Scores(probs, errors, routing, prompts)

    async def prompt_routing(self, labels: Sequence[str], templates: tuple[str, ...]) -> list[Routing]:
        """How each of the labels' prompts was routed, label-major (`fill_templates`' order). The
        caches keep embeddings only, so explain encodes the prompts again."""
        return [self.routing(r) for r in await self.encode_texts(fill_templates(labels, templates))]

    def routing(self, result: ItemResult) -> Routing:
        """How one encoded example was routed (`expert_counts`, plus each token's first choice)."""
        idx, dropped = result.expert_index, result.dropped  # (M, T, K)
        routed, lost = expert_counts(idx, dropped, self.num_experts)  # (M, E) each
        return Routing(routed, lost.sum(axis=1), np.where(dropped[..., 0], -1, idx[..., 0]).astype(np.int64))
