"""Dynamic batching: items from many requests share one forward pass.

One batcher per encoder. `submit(x)` puts one example into a bounded queue and returns a future
(resolved on the event loop); `submit_many_wait(xs)` puts a chunk of one caller's examples that
travel together (a label set's prompts: one future per chunk, not per prompt). Places in the
queue can be reserved before the examples exist (`reserve(n)`, like TEI's permits), so that a
request is refused at the edge, before any decoding. A worker task takes the first waiting item,
keeps collecting until `max_batch` examples or `max_wait` seconds, skips items whose caller went
away (cancelled futures), and runs the forward pass in its own thread, off the event loop. If a
batch fails, its items are retried one by one, so a poisoned item fails alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from limoe.encoders import EncoderOutput
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
    x: np.ndarray  # (n, ...): n examples of one caller, forwarded in the same pass
    future: asyncio.Future  # -> ItemResult; a list of n of them when `many`
    many: bool = False
    enqueued: float = field(default_factory=time.perf_counter)


class Room:
    """The places in a batcher's queue (one per example), counted apart from the queue so that
    they can be taken before the examples exist. A place is held from when it is taken until the
    worker collects the example. `take` waits for places, first come first served; `try_take`
    never waits, and never jumps ahead of those waiting. Event loop only: no locking."""

    def __init__(self, size: int):
        self.size, self.used = size, 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    def try_take(self, n: int = 1) -> bool:
        if self.used + n > self.size or self._waiters:
            return False
        self.used += n
        return True

    async def take(self, n: int = 1) -> None:
        if n > self.size:
            raise ValueError(f"{n} places asked of a queue of {self.size}")
        if self.try_take(n):
            return
        waiter = asyncio.get_running_loop().create_future()
        entry = (n, waiter)
        self._waiters.append(entry)
        try:
            await waiter  # `give` counted the places for us before waking us
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # given places just as we were cancelled: pass them on
                self.give(n)
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                self.give(0)  # those behind us may fit now
            raise

    def give(self, n: int = 1) -> None:
        self.used -= n
        while self._waiters and self.used + self._waiters[0][0] <= self.size:
            wanted, waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += wanted
                waiter.set_result(None)


class Permit:
    """Places reserved in a batcher's queue for one request's items (`DynamicBatcher.reserve`).
    Each `submit` with the permit spends one; `release` (or leaving a `with` block) gives back
    those not spent, e.g. for images that failed to decode or a request that was cancelled."""

    def __init__(self, room: Room | None = None, n: int = 0):
        self.room, self.left = room, n

    def spend(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        return True

    def release(self) -> None:
        if self.room is not None and self.left:
            self.room.give(self.left)
        self.left = 0

    def __enter__(self) -> Permit:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class DynamicBatcher:
    def __init__(self, name: str, forward: Callable[[np.ndarray], EncoderOutput], max_batch: int,
                 max_wait_s: float, queue_size: int, metrics: Metrics,
                 on_batch: Callable[[EncoderOutput], None] | None = None):
        self.name, self.forward = name, forward
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.metrics, self.on_batch = metrics, on_batch
        self.room = Room(queue_size)  # bounds the queue: an item holds a place until the worker collects it
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"limoe-{name}")
        self._task: asyncio.Task | None = None
        self._held: _Item | None = None  # collected, but did not fit its batch: it starts the next one

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
        left = [self._held] if self._held else []
        while not self._queue.empty():
            left.append(self._queue.get_nowait())
            self.room.give(len(left[-1].x))
        for item in left:
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
    def _full(self) -> Overloaded:
        return Overloaded(f"the {self.name} queue is full ({self.room.size} items); retry shortly")

    def reserve(self, n: int) -> Permit:
        """Places for n items that do not exist yet, or Overloaded at once (nothing waits)."""
        if not self.room.try_take(n):
            raise self._full()
        return Permit(self.room, n)

    def submit(self, x: np.ndarray, permit: Permit | None = None) -> asyncio.Future:
        """Queue one example on a place of `permit`, else on a free place; the future resolves to
        an ItemResult. Raises Overloaded when there is no place."""
        if not (permit is not None and permit.spend()) and not self.room.try_take():
            raise self._full()
        return self._put(_Item(x[None], asyncio.get_running_loop().create_future()))

    async def submit_wait(self, x: np.ndarray) -> asyncio.Future:
        """Queue one example, waiting for room instead of refusing: for work that is already
        accepted (a bulk request's images), so it cannot overflow."""
        await self.room.take()
        return self._put(_Item(x[None], asyncio.get_running_loop().create_future()))

    @property
    def chunk(self) -> int:
        """The most examples `submit_many_wait` takes at once: a full batch, if the queue holds one."""
        return min(self.max_batch, self.room.size)

    async def submit_many_wait(self, xs: np.ndarray) -> asyncio.Future:
        """Queue up to `chunk` examples of one caller, forwarded together, waiting for room; the
        future resolves to their ItemResults, in order. For accepted work that comes in bulk (a
        label set's prompts): one item in the queue, not one per example."""
        if not 0 < len(xs) <= self.chunk:
            raise ValueError(f"{len(xs)} examples; submit 1 to {self.chunk} at once")
        await self.room.take(len(xs))
        return self._put(_Item(xs, asyncio.get_running_loop().create_future(), many=True))

    def _put(self, item: _Item) -> asyncio.Future:
        self._queue.put_nowait(item)
        self.metrics.queue_depth.labels(self.name).set(self._queue.qsize())
        return item.future

    async def run_direct(self, x: np.ndarray) -> EncoderOutput:
        """One forward pass on a whole batch, bypassing the queue (warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.forward, x)

    # -- worker ----------------------------------------------------------------------------------------
    async def _collect(self) -> list[_Item]:
        if self._held is not None:
            batch, self._held = [self._held], None
        else:
            batch = [await self._queue.get()]
            self.room.give(len(batch[0].x))
        rows = len(batch[0].x)
        deadline = time.perf_counter() + self.max_wait_s
        while rows < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            self.room.give(len(item.x))
            if rows + len(item.x) > self.max_batch:  # a chunk that does not fit: never exceed max_batch
                self._held = item
                break
            batch.append(item)
            rows += len(item.x)
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
        x = np.concatenate([item.x for item in batch])
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
            self.metrics.items.labels(self.name, "inference_error").inc(len(x))
            if not batch[0].future.done():
                batch[0].future.set_exception(RuntimeError("inference failed for this item"))
            return
        self.metrics.inference_seconds.labels(self.name).observe(time.perf_counter() - started)
        self.metrics.batch_size.labels(self.name).observe(len(x))
        self.metrics.items.labels(self.name, "ok").inc(len(x))
        if self.on_batch:
            self.on_batch(out)
        start = 0
        for item in batch:
            stop = start + len(item.x)
            if not item.future.done():
                results = [ItemResult(out.embeddings[i], out.expert_index[i], out.dropped[i])
                           for i in range(start, stop)]
                item.future.set_result(results if item.many else results[0])
            start = stop
