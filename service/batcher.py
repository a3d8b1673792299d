"""Dynamic batching: items from many requests share one forward pass.

One batcher per encoder. `submit(x)` puts one example into a bounded queue and returns a future
(resolved on the event loop); `submit_many_wait(xs)` puts a chunk of one caller's examples that
travel together (a label set's prompts: one future per chunk, not per prompt). Places in the
queue can be reserved before the examples exist (`reserve(n)`, like TEI's permits), so that a
request is refused at the edge, before any decoding. A worker task takes the first waiting item,
keeps collecting until `max_batch` examples or `max_wait` seconds, skips items whose caller went
away (cancelled futures), and runs the forward pass in its own thread, off the event loop. If a
batch fails, its items are retried one by one, so a poisoned item fails alone.

Up to `passes` forward passes run at once, each in a thread of its own (like Triton's model
instances; with ONNX Runtime on a CPU, each pass on its share of the cores). The worker collects
the next batch as soon as a pass is free, so with two passes the encoder never idles while the
event loop splits a pass's results and counts its routing; while every pass is busy, items stay
in the queues, where interactive ones still go first.

Two priorities: interactive items (the default) and low-priority ones (`submit_wait(x, low=True)`:
batch jobs' images, service/job_runner.py). A batch takes every waiting interactive item first;
only a batch that has none (so far) takes low-priority ones, at most `low_max_batch` examples of
them while interactive traffic flows (an interactive item came within the last `quiet_s`), and
full batches once it has been quiet that long. So an interactive item waits for at most one
forward pass of a few low-priority examples, its own pass carries none (interactive items that
come while a low-priority batch is being collected do join it), and a job alone on the server
runs as fast as a bulk request. Low-priority items have a queue and places of their own (`low_room`), so
however big a job is, interactive requests never get 429 because of it; a job only waits for room.

A forward pass that hangs (`pass_timeout_s`, LIMOE_INFER_TIMEOUT_S): when a pass has not returned
by then, its items fail with 504 inference_timeout (never retried: they would hang again), the
pass is counted (limoe_inference_stuck_total) and left to its thread, and later passes go to a
fresh thread pool, so the encoder keeps serving. While a pass is stuck, `stuck` is non-zero (the
server reports not ready); a stuck pass that returns later is dropped and counted off. Threads
cannot be killed: once more passes are stuck at once than the batcher runs (`passes`), `alive`
turns false, /healthz answers 503 and the kubelet's liveness probe restarts the pod.

Several models in one process share its cores (`PassShare`). While other models' encoders of the
same kind have had work within the last `window_s`, an encoder's fair share is its `passes`
divided among the active ones (at least one). Its passes beyond that share still run, so that no
core idles, but as spare passes: in threads of the lowest CPU priority (nice 19), which the
kernel gives a core only when the other models' passes and every request's event loop and
decoding do not want it. So a flood on one model takes every core that the others leave, and
gives them back as soon as they have work, without waiting for its long passes to end (threads
cannot be preempted, but a thread's priority can be lowered). Alone, an encoder runs all its
passes at its own priority. That priority may also be lowered (`nice`, LIMOE_PASS_NICE), so that
the event loop and the decoding threads, which every request goes through, get a core before
the long passes do. The passes are not all that models share: every request of every model goes
through the one event loop (parsing, answering) before and after its pass. So while several
models have requests, each also holds at most LIMOE_SHARED_INFLIGHT of them in flight
(`RequestShare`); its others wait their turn, undecoded, and cost the event loop nothing until
then. Alone, a model takes as many as come. Niceness is the pass's own thread's: onnxruntime's
intra-op helper threads (LIMOE_THREADS > 1, or a single pass on several cores) keep the process's
priority.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Hashable

import numpy as np

from limoe.runtime.encoders import EncoderOutput
from service.errors import Overloaded, ServiceError
from service.metrics import Metrics

# Low-priority items fill whole passes once no interactive item came for this long (seconds).
QUIET_S = 1.0

log = logging.getLogger("limoe.service")


class PassShare:
    """Which encoders had work lately, and so each one's fair share of its passes (see the module
    doc). One per server; an encoder registers under its model's name (`key`: the versions of one
    name share one place) and its kind ("image" or "text": encoders share with their kind only).
    Event loop only: no locking."""

    def __init__(self, window_s: float = QUIET_S, clock: Callable[[], float] = time.perf_counter):
        self.window_s, self.clock = window_s, clock
        self._last: dict[Hashable, float] = {}  # key -> when it last had an item queued or a pass run

    def touch(self, key: Hashable, kind: str) -> None:
        self._last[(kind, key)] = self.clock()

    def active(self, key: Hashable, kind: str) -> int:
        """Encoders of `kind` with work within `window_s`, `key` always among them."""
        since = self.clock() - self.window_s
        return 1 + sum(1 for (k, other), t in self._last.items() if k == kind and other != key and t >= since)

    def allowed(self, key: Hashable, kind: str, passes: int) -> int:
        """Passes of `passes` that the encoder `key` runs at its own priority: its share, at least one."""
        return max(1, passes // self.active(key, kind))


class RequestShare:
    """Requests in flight per model, shared fairly while several models have them (see the module
    doc). A request takes a turn (`turn(key)`) before its images are decoded and gives it back when
    answered. While another model had a request within `window_s`, a model holds at most `limit`
    turns and its other requests wait, first come first served, without decoding or queueing; a
    model alone holds any number. So a flood on one model leaves the event loop, the decoding and
    the passes free often enough that another model's requests are not served behind all of it.
    One per server, keyed by model name (a name's versions share one); event loop only."""

    def __init__(self, limit: int, window_s: float = QUIET_S, clock: Callable[[], float] = time.perf_counter):
        self.limit = limit
        self.activity = PassShare(window_s, clock)  # who had requests lately (kind "request")
        self.held: dict[Hashable, int] = {}
        self._waiting: dict[Hashable, deque[asyncio.Future]] = {}

    def _shared(self, key: Hashable) -> bool:
        return self.activity.active(key, "request") > 1

    def _may_enter(self, key: Hashable) -> bool:
        return self.held.get(key, 0) < self.limit or not self._shared(key)

    @contextlib.asynccontextmanager
    async def turn(self, key: Hashable):
        self.activity.touch(key, "request")
        waiting = self._waiting.setdefault(key, deque())
        if waiting or not self._may_enter(key):
            waiter = asyncio.get_running_loop().create_future()
            waiting.append(waiter)
            try:
                await waiter  # `_wake` counted our turn before waking us
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():  # woken as we were cancelled: give the turn on
                    self._leave(key)
                else:
                    with contextlib.suppress(ValueError):
                        waiting.remove(waiter)
                raise
        else:
            self.held[key] = self.held.get(key, 0) + 1
        try:
            yield
        finally:
            self._leave(key)

    def _leave(self, key: Hashable) -> None:
        self.held[key] -= 1
        self.activity.touch(key, "request")
        self._wake(key)  # a waiter of this model: it holds a turn less, or is alone by now

    def _wake(self, key: Hashable) -> None:
        waiting = self._waiting.get(key)
        while waiting and self._may_enter(key):
            waiter = waiting.popleft()
            if not waiter.done():
                self.held[key] = self.held.get(key, 0) + 1
                waiter.set_result(None)


# The CPU niceness of spare passes: an encoder's passes beyond its fair share (see the module doc).
SPARE_NICE = 19


def nice_thread(nice: int) -> None:
    """Lower the calling thread's CPU priority by `nice` (Linux: niceness is per thread; raising
    it needs no privilege). Elsewhere, or where refused, the thread keeps its priority."""
    if nice:
        with contextlib.suppress(OSError, AttributeError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


class InferenceTimeout(ServiceError):
    status, code = 504, "inference_timeout"


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
    low: bool = False  # low priority: a batch job's
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
                 on_batch: Callable[[EncoderOutput], None] | None = None, low_max_batch: int | None = None,
                 quiet_s: float = QUIET_S, passes: int = 1, pass_timeout_s: float | None = None,
                 share: PassShare | None = None, share_key: Hashable = None, nice: int = 0):
        self.name, self.forward = name, forward
        self.share, self.share_key, self.nice = share or PassShare(), share_key, nice
        self.passes, self.pass_timeout_s = passes, pass_timeout_s or None
        self.stuck = 0  # passes past pass_timeout_s that have not returned
        self._abandoned: list[ThreadPoolExecutor] = []  # pools left to their stuck threads
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.low_max_batch = max_batch if low_max_batch is None else min(low_max_batch, max_batch)
        self.quiet_s = quiet_s
        self._last_interactive = -math.inf  # when the last interactive item was queued
        self.metrics, self.on_batch = metrics, on_batch
        self.room = Room(queue_size)  # bounds the queue: an item holds a place until the worker collects it
        self.low_room = Room(queue_size)  # the low-priority queue's own places
        self._queue: deque[_Item] = deque()  # interactive
        self._low: deque[_Item] = deque()  # low priority
        self._arrived = asyncio.Event()  # set when an item is queued; the worker clears it before waiting
        self._pools = {spare: self._pool(self._pools_nice(spare)) for spare in (False, True)}  # spare -> threads
        self.spare_passes = 0  # spare passes started (see the module doc)
        self._in_share = 0  # passes running within the fair share
        self._task: asyncio.Task | None = None
        self._held: _Item | None = None  # collected, but did not fit its batch: it starts the next one
        self._passes: set[asyncio.Task] = set()  # forward passes handed over and not yet answered
        self._free = asyncio.Semaphore(passes)  # a pass the worker may start

    def _pool(self, nice: int) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=self.passes, thread_name_prefix=f"limoe-{self.name}",
                                  initializer=nice_thread, initargs=(nice,))

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        for task in [self._task, *self._passes]:
            if task is None:
                continue
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        left = [self._held] if self._held else []
        for queue, room in ((self._queue, self.room), (self._low, self.low_room)):
            while queue:
                left.append(queue.popleft())
                room.give(len(left[-1].x))
        for item in left:
            if not item.future.done():
                item.future.cancel()
        for pool in self._pools.values():
            pool.shutdown(wait=not self.stuck, cancel_futures=True)
        for pool in self._abandoned:
            pool.shutdown(wait=False, cancel_futures=True)

    @property
    def alive(self) -> bool:
        """The worker runs, and no more passes are stuck than the batcher runs (see the module doc)."""
        return self._task is not None and not self._task.done() and self.stuck <= self.passes

    @property
    def depth(self) -> int:
        """Items waiting, both priorities."""
        return len(self._queue) + len(self._low)

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

    async def submit_wait(self, x: np.ndarray, low: bool = False) -> asyncio.Future:
        """Queue one example, waiting for room instead of refusing: for work that is already
        accepted (a bulk request's images, a batch job's with `low`), so it cannot overflow.
        `low`: low priority, in the low-priority queue."""
        await (self.low_room if low else self.room).take()
        return self._put(_Item(x[None], asyncio.get_running_loop().create_future(), low=low))

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
        (self._low if item.low else self._queue).append(item)
        if not item.low:
            self._last_interactive = time.perf_counter()
        self.share.touch(self.share_key, self.name)
        self._arrived.set()
        self.metrics.queue_depth.labels(self.name).set(self.depth)
        return item.future

    async def run_direct(self, x: np.ndarray) -> EncoderOutput:
        """One forward pass on a whole batch, bypassing the queue (warm-up)."""
        return await asyncio.get_running_loop().run_in_executor(self._pools[False], self.forward, x)

    # -- worker ----------------------------------------------------------------------------------------
    def _pop(self, rows: int, low_rows: int) -> _Item | None:
        """The next item for a batch holding `rows` examples, `low_rows` of them low priority:
        an interactive one if any waits; else a low-priority one if the batch is empty, or all
        low priority and the item fits in `low_max_batch` (in `max_batch` when interactive
        traffic has been quiet for `quiet_s`); else None. Gives back the item's places."""
        if self._queue:
            item = self._queue.popleft()
            self.room.give(len(item.x))
            return item
        if self._low:
            n = len(self._low[0].x)
            quiet = time.perf_counter() - self._last_interactive >= self.quiet_s
            share = self.max_batch if quiet else self.low_max_batch
            if rows == 0 or (rows == low_rows and rows + n <= share):
                item = self._low.popleft()
                self.low_room.give(n)
                return item
        return None

    async def _next(self, rows: int = 0, low_rows: int = 0, deadline: float | None = None) -> _Item | None:
        """`_pop`, waiting for an item until `deadline` (for ever when None); None at the deadline,
        or at once when low-priority items wait but may not join: waiting for interactive items
        that may come would only hold the job up (they go first in the next pass anyway)."""
        while (item := self._pop(rows, low_rows)) is None:
            if self._low:
                return None
            self._arrived.clear()
            timeout = None if deadline is None else deadline - time.perf_counter()
            if timeout is not None and timeout <= 0:
                return None
            try:
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            except TimeoutError:
                return None
        return item

    async def _collect(self) -> list[_Item]:
        if self._held is not None:
            batch, self._held = [self._held], None
        else:
            batch = [await self._next()]
        rows = len(batch[0].x)
        low_rows = rows if batch[0].low else 0
        deadline = time.perf_counter() + self.max_wait_s
        while rows < self.max_batch:
            item = await self._next(rows, low_rows, deadline)
            if item is None:
                break
            if rows + len(item.x) > self.max_batch:  # a chunk that does not fit: never exceed max_batch
                self._held = item
                break
            batch.append(item)
            rows += len(item.x)
            low_rows += len(item.x) if item.low else 0
        self.metrics.queue_depth.labels(self.name).set(self.depth)
        return [item for item in batch if not item.future.done()]  # callers that gave up

    @property
    def fair_share(self) -> int:
        """Passes this encoder runs at its own priority now: all of them alone, its share beside others."""
        return min(self.passes, self.share.allowed(self.share_key, self.name, self.passes))

    async def _run(self) -> None:
        while True:
            await self._free.acquire()  # collect only for a free pass: until then, items wait in the queues
            batch = await self._collect()
            if not batch:
                self._free.release()
                continue
            self.share.touch(self.share_key, self.name)
            now = time.perf_counter()
            for item in batch:
                self.metrics.queue_seconds.labels(self.name).observe(now - item.enqueued)
            spare = self._in_share >= self.fair_share
            self.spare_passes += spare
            self._in_share += not spare
            task = asyncio.get_running_loop().create_task(self._pass(batch, spare), name=f"batcher-{self.name}-pass")
            self._passes.add(task)
            task.add_done_callback(functools.partial(self._pass_ended, spare=spare))

    def _pass_ended(self, task: asyncio.Task, spare: bool) -> None:
        self._passes.discard(task)
        self._in_share -= not spare
        self._free.release()

    async def _pass(self, batch: list[_Item], spare: bool = False) -> None:
        """One forward pass and its answers; whatever happens, every item's future ends. `spare`:
        in a thread of the lowest priority (see the module doc)."""
        try:
            await self._forward(asyncio.get_running_loop(), batch, spare)
        except asyncio.CancelledError:
            for item in batch:
                item.future.cancel()
            raise
        except Exception:  # never leave a caller waiting: it would hang its request
            log.exception("%s batcher: unexpected error", self.name)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(RuntimeError("inference failed"))

    def _timed_forward(self, x: np.ndarray) -> tuple[EncoderOutput, float]:
        """The forward pass and its seconds, timed in the pass's own thread."""
        started = time.perf_counter()
        out = self.forward(x)
        return out, time.perf_counter() - started

    async def _run_pass(self, loop: asyncio.AbstractEventLoop, x: np.ndarray,
                        spare: bool = False) -> tuple[EncoderOutput, float]:
        """The forward pass in a pass thread, under `pass_timeout_s` (see the module doc)."""
        future = loop.run_in_executor(self._pools[spare], self._timed_forward, x)
        if self.pass_timeout_s is None:
            return await future
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.pass_timeout_s)
        except TimeoutError:
            self.stuck += 1
            self.metrics.inference_stuck.labels(self.name).inc()
            log.error("%s forward pass of %d examples did not return within LIMOE_INFER_TIMEOUT_S=%gs: its items "
                      "get 504; later passes go to a fresh thread (%d stuck)", self.name, len(x),
                      self.pass_timeout_s, self.stuck)
            self._abandoned.append(self._pools[spare])
            self._pools[spare] = self._pool(self._pools_nice(spare))
            started = time.perf_counter() - self.pass_timeout_s
            future.add_done_callback(lambda _: self._unstuck(started))
            raise InferenceTimeout(f"the {self.name} encoder's forward pass did not finish within "
                                   f"{self.pass_timeout_s:g} s") from None

    def _unstuck(self, started: float) -> None:
        self.stuck -= 1
        log.warning("%s: a stuck forward pass returned after %.1fs (dropped); %d still stuck", self.name,
                    time.perf_counter() - started, self.stuck)

    def _pools_nice(self, spare: bool) -> int:
        return max(self.nice, SPARE_NICE) if spare else self.nice

    async def _forward(self, loop: asyncio.AbstractEventLoop, batch: list[_Item], spare: bool = False) -> None:
        x = np.concatenate([item.x for item in batch])
        try:
            out, seconds = await self._run_pass(loop, x, spare)
        except InferenceTimeout as e:  # not retried item by item: each would hang again
            self.metrics.items.labels(self.name, "inference_timeout").inc(len(x))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        except Exception as e:
            if len(batch) > 1:  # isolate the culprit: retry each item alone
                log.warning("%s batch of %d failed (%s); retrying items one by one", self.name, len(batch), e)
                for item in batch:
                    await self._forward(loop, [item], spare)
                return
            log.error("%s forward pass failed for one item: %s", self.name, e)
            self.metrics.items.labels(self.name, "inference_error").inc(len(x))
            if not batch[0].future.done():
                batch[0].future.set_exception(RuntimeError("inference failed for this item"))
            return
        self.metrics.inference_seconds.labels(self.name).observe(seconds)
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
