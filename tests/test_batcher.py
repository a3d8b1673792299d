"""The dynamic batcher on its own: batch formation, cancellation, overload, error isolation."""

import asyncio
import math
import threading
import time

import numpy as np
import pytest

from limoe.onnx_encoder import EncoderOutput
from service.batcher import DynamicBatcher
from service.errors import Overloaded
from service.metrics import Metrics


class Recorder:
    """forward(): embeddings = the inputs themselves; records batch sizes; optional gate/poison."""

    def __init__(self, delay: float = 0.0, poison: float | None = None):
        self.batches: list[list[float]] = []
        self.delay, self.poison = delay, poison
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, x: np.ndarray) -> EncoderOutput:
        self.gate.wait(5)
        self.batches.append(x[:, 0].tolist())
        if self.delay:
            time.sleep(self.delay)
        if self.poison is not None and (x[:, 0] == self.poison).any():
            raise ValueError("poisoned input")
        n = len(x)
        return EncoderOutput(x.astype(np.float32), np.zeros((n, 1, 1, 1), np.int64), np.zeros((n, 1, 1, 1), bool))


def _batcher(fn, max_batch=4, wait=0.05, queue=64):
    return DynamicBatcher("image", fn, max_batch, wait, queue, Metrics())


def test_n_concurrent_items_take_at_most_ceil_n_over_b_passes():
    async def main():
        fn = Recorder()
        fn.gate.clear()  # hold the worker until everything is queued
        b = _batcher(fn, max_batch=4, wait=0.2)
        b.start()
        futures = [b.submit(np.array([float(i)])) for i in range(10)]
        fn.gate.set()
        results = await asyncio.gather(*futures)
        await b.stop()
        return fn, results

    fn, results = asyncio.run(main())
    assert len(fn.batches) <= math.ceil(10 / 4)
    assert sorted(v for batch in fn.batches for v in batch) == list(range(10))
    assert [float(r.embedding[0]) for r in results] == list(range(10))  # each gets its own row


def test_a_lone_item_waits_at_most_max_wait():
    async def main():
        b = _batcher(Recorder(), max_batch=32, wait=0.05)
        b.start()
        started = time.perf_counter()
        await b.submit(np.array([1.0]))
        elapsed = time.perf_counter() - started
        await b.stop()
        return elapsed

    assert asyncio.run(main()) < 2.0  # generous: 0.05 s wait, on a loaded CI machine


def test_cancelled_items_are_skipped():
    async def main():
        fn = Recorder()
        fn.gate.clear()
        b = _batcher(fn, max_batch=8, wait=0.1)
        b.start()
        first = b.submit(np.array([0.0]))  # the worker picks this one up and blocks on the gate
        await asyncio.sleep(0.05)
        keep = [b.submit(np.array([float(i)])) for i in (1, 2, 3)]
        gone = [b.submit(np.array([float(i)])) for i in (10, 11)]
        for f in gone:
            f.cancel()  # e.g. the client disconnected or timed out
        fn.gate.set()
        await asyncio.gather(first, *keep)
        await b.stop()
        return fn

    fn = asyncio.run(main())
    seen = [v for batch in fn.batches for v in batch]
    assert 10.0 not in seen and 11.0 not in seen
    assert sorted(seen) == [0.0, 1.0, 2.0, 3.0]


def test_full_queue_raises_overloaded():
    async def main():
        fn = Recorder()
        fn.gate.clear()
        b = _batcher(fn, max_batch=1, wait=0.0, queue=2)
        b.start()
        held = b.submit(np.array([0.0]))
        await asyncio.sleep(0.05)  # the worker holds item 0; the queue has room for 2 more
        queued = [b.submit(np.array([1.0])), b.submit(np.array([2.0]))]
        with pytest.raises(Overloaded, match="queue is full"):
            b.submit(np.array([3.0]))
        fn.gate.set()
        await asyncio.gather(held, *queued)
        # once drained it accepts work again
        result = await b.submit(np.array([4.0]))
        await b.stop()
        return result

    assert float(asyncio.run(main()).embedding[0]) == 4.0


def test_a_poisoned_item_fails_alone():
    async def main():
        fn = Recorder(poison=13.0)
        fn.gate.clear()
        b = _batcher(fn, max_batch=8, wait=0.2)
        b.start()
        futures = [b.submit(np.array([v])) for v in (1.0, 13.0, 2.0, 3.0)]
        fn.gate.set()
        results = await asyncio.gather(*futures, return_exceptions=True)
        alive = b.alive
        after = await b.submit(np.array([5.0]))  # and the worker survives
        await b.stop()
        return results, alive, after

    results, alive, after = asyncio.run(main())
    assert isinstance(results[1], RuntimeError)
    assert [float(results[i].embedding[0]) for i in (0, 2, 3)] == [1.0, 2.0, 3.0]
    assert alive and float(after.embedding[0]) == 5.0


def test_results_do_not_depend_on_batch_neighbours():
    async def main(values, max_batch):
        b = _batcher(Recorder(), max_batch=max_batch, wait=0.05)
        b.start()
        out = await asyncio.gather(*(b.submit(np.array([v, v * 2])) for v in values))
        await b.stop()
        return np.stack([r.embedding for r in out])

    values = [3.0, 1.0, 4.0, 1.5, 9.0]
    np.testing.assert_array_equal(asyncio.run(main(values, 5)), asyncio.run(main(values, 1)))
