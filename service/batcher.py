"""Dynamic batching: items from many requests share one forward pass.

One batcher per encoder. `submit(x)` puts one example into a bounded queue and returns a future
(resolved on the event loop). A worker task takes the first waiting item, keeps collecting until
`max_batch` items or `max_wait` seconds, skips items whose caller went away (cancelled
futures), and runs the forward pass in its own thread, off the event loop. If a batch fails,
its items are retried one by one, so a poisoned item fails alone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from limoe.onnx_encoder import EncoderOutput
from service.errors import Overloaded
from service.metrics import Metrics

log = logging.getLogger("limoe.service")


@dataclass
class ItemResult:
    embedding: np.ndarray  # (P,)
    expert_index: np.ndarray  # (M, T, K)
    dropped: np.ndarray  # (M, T, K)


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class DynamicBatcher:
    def __init__(self, name: str, forward: Callable[[np.ndarray], EncoderOutput], max_batch: int,
                 max_wait_s: float, queue_size: int, metrics: Metrics,
                 on_batch: Callable[[EncoderOutput], None] | None = None):
        self.name, self.forward = name, forward
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.metrics, self.on_batch = metrics, on_batch
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=queue_size)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"limoe-{name}")
        self._task: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.cancel()
        self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    # -- API -------------------------------------------------------------------------------------------
    def submit(self, x: np.ndarray) -> asyncio.Future:
        """Queue one example; the future resolves to an ItemResult. Raises Overloaded when full."""
        future = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(_Item(x, future))
        except asyncio.QueueFull:
            raise Overloaded(f"the {self.name} queue is full ({self._queue.maxsize} items); retry shortly") from None
        self.metrics.queue_depth.labels(self.name).set(self._queue.qsize())
        return future

    async def submit_wait(self, x: np.ndarray) -> asyncio.Future:
        """Queue one example, waiting for room instead of refusing: for work that is already
        accepted (a bulk request's images, a label set's prompts), so it cannot overflow."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(x, future))
        self.metrics.queue_depth.labels(self.name).set(self._queue.qsize())
        return future

    async def run_direct(self, x: np.ndarray) -> EncoderOutput:
        """One forward pass on a whole batch, bypassing the queue (warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.forward, x)

    # -- worker ----------------------------------------------------------------------------------------
    async def _collect(self) -> list[_Item]:
        batch = [await self._queue.get()]
        deadline = time.perf_counter() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        self.metrics.queue_depth.labels(self.name).set(self._queue.qsize())
        return [item for item in batch if not item.future.done()]  # callers that gave up

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            now = time.perf_counter()
            for item in batch:
                self.metrics.queue_seconds.labels(self.name).observe(now - item.enqueued)
            try:
                await self._forward(loop, batch)
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the worker die: it would hang every later request
                log.exception("%s batcher: unexpected error", self.name)
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(RuntimeError("inference failed"))

    async def _forward(self, loop: asyncio.AbstractEventLoop, batch: list[_Item]) -> None:
        x = np.stack([item.x for item in batch])
        started = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._executor, self.forward, x)
        except Exception as e:
            if len(batch) > 1:  # isolate the culprit: retry each item alone
                log.warning("%s batch of %d failed (%s); retrying items one by one", self.name, len(batch), e)
                for item in batch:
                    await self._forward(loop, [item])
                return
            log.error("%s forward pass failed for one item: %s", self.name, e)
            self.metrics.items.labels(self.name, "inference_error").inc()
            if not batch[0].future.done():
                batch[0].future.set_exception(RuntimeError("inference failed for this item"))
            return
        self.metrics.inference_seconds.labels(self.name).observe(time.perf_counter() - started)
        self.metrics.batch_size.labels(self.name).observe(len(batch))
        self.metrics.items.labels(self.name, "ok").inc(len(batch))
        if self.on_batch:
            self.on_batch(out)
        for i, item in enumerate(batch):
            if not item.future.done():
                item.future.set_result(ItemResult(out.embeddings[i], out.expert_index[i], out.dropped[i]))
