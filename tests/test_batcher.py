"""The dynamic batcher on its own: batch formation, chunks, cancellation, overload and reserved
places (permits), error isolation, and the passes shared between models."""

import asyncio
import math
import os
import sys
import threading
import time

import numpy as np
import pytest

from limoe.runtime.encoders import EncoderOutput
from service.batcher import DynamicBatcher, PassShare, RequestShare, Room
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
    return DynamicBatcher("image", fn, max_batch, wait, queue, Metrics().for_model("m", "1"))


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


async def _until_taken(b: DynamicBatcher) -> None:
    """Until the worker took everything queued: with max_wait 0 it is then inside its forward
    pass (taking an item and starting the pass happen in one step of its task)."""
    while b.depth:
        await asyncio.sleep(0.001)


def test_chunks_travel_together_and_no_batch_exceeds_max_batch():
    async def main():
        fn = Recorder()
        fn.gate.clear()
        b = _batcher(fn, max_batch=4, wait=0.0)
        b.start()
        first = b.submit(np.array([0.0]))
        await _until_taken(b)  # the worker holds item 0 at the gate
        three = await b.submit_many_wait(np.array([[1.0], [2.0], [3.0]]))
        single = b.submit(np.array([4.0]))
        two = await b.submit_many_wait(np.array([[5.0], [6.0]]))
        three_more = await b.submit_many_wait(np.array([[7.0], [8.0], [9.0]]))
        fn.gate.set()
        results = await asyncio.gather(first, three, single, two, three_more)
        await b.stop()
        return fn, results

    fn, (first, three, single, two, three_more) = asyncio.run(main())
    # 3 + 1 fill a batch of 4; 2 + 3 would overflow it, so the chunk of 3 waits for the next pass
    assert fn.batches == [[0.0], [1.0, 2.0, 3.0, 4.0], [5.0, 6.0], [7.0, 8.0, 9.0]]
    assert [float(r.embedding[0]) for r in three] == [1.0, 2.0, 3.0]  # a chunk gets a list, in order
    assert [float(r.embedding[0]) for r in three_more] == [7.0, 8.0, 9.0]
    assert float(single.embedding[0]) == 4.0 and float(first.embedding[0]) == 0.0


def test_chunks_are_at_most_a_batch():
    async def main():
        b = _batcher(Recorder(), max_batch=4, queue=3)
        b.start()
        assert b.chunk == 3  # a full batch would not fit in the queue
        with pytest.raises(ValueError, match="1 to 3"):
            await b.submit_many_wait(np.zeros((4, 1)))
        await b.stop()

    asyncio.run(main())


def test_reserved_places_are_kept_for_their_request():
    async def main():
        fn = Recorder()
        fn.gate.clear()
        b = _batcher(fn, max_batch=1, wait=0.0, queue=3)
        b.start()
        held = b.submit(np.array([0.0]))
        await _until_taken(b)  # the worker holds item 0; 3 places are free
        permit = b.reserve(2)
        with pytest.raises(Overloaded, match="queue is full"):
            b.reserve(2)  # 1 place left
        other = b.submit(np.array([1.0]))  # takes the last free place
        with pytest.raises(Overloaded, match="queue is full"):
            b.submit(np.array([9.0]))
        mine = b.submit(np.array([2.0]), permit)  # on a reserved place: no refusal
        assert permit.left == 1 and b.room.used == 3
        permit.release()  # the request needed only one of its two places
        assert b.room.used == 2 and permit.left == 0
        spare = b.submit(np.array([3.0]))
        fn.gate.set()
        results = await asyncio.gather(held, other, mine, spare)
        await b.stop()
        return results, b.room.used

    results, used = asyncio.run(main())
    assert [float(r.embedding[0]) for r in results] == [0.0, 1.0, 2.0, 3.0]
    assert used == 0


def test_room_serves_waiters_in_order_and_passes_on_a_cancelled_wait():
    async def main():
        room = Room(4)
        assert room.try_take(3)
        big = asyncio.ensure_future(room.take(2))  # 3 + 2 > 4: waits
        small = asyncio.ensure_future(room.take(1))
        await asyncio.sleep(0)
        assert not big.done() and not small.done()
        assert not room.try_take(1)  # a place is free, but others wait for it first
        big.cancel()
        await asyncio.wait_for(small, 5)  # the cancelled wait no longer blocks the one behind it
        assert room.used == 4
        waiting = asyncio.ensure_future(room.take(2))
        await asyncio.sleep(0)
        room.give(1)
        await asyncio.sleep(0)
        assert not waiting.done()  # 1 free place is not 2
        room.give(1)
        await waiting
        return room.used

    assert asyncio.run(main()) == 4


# -- priorities: batch jobs' items (low) go after interactive ones ---------------------------------------

async def _busy_worker(fn: Recorder) -> None:
    """Wait until the worker is inside a forward pass, held at the recorder's gate."""
    while not fn.entered.is_set():
        await asyncio.sleep(0.005)


class GatedRecorder(Recorder):
    """A Recorder that says when the worker has entered a forward pass (`entered`), before its gate."""

    def __init__(self):
        super().__init__()
        self.entered = threading.Event()

    def __call__(self, x):
        self.entered.set()
        return super().__call__(x)


def test_interactive_items_go_first_and_low_ones_fill_passes_of_their_own_up_to_their_share():
    # max_batch 4, at most 2 low-priority examples per pass. While the worker is held in the pass
    # of item 0, five job items (10-14) queue, then two interactive ones (1, 2). Next pass: 1 and
    # 2, though they came last, and no job item with them (an interactive pass carries none);
    # then the job items, 2 per pass although a batch holds 4: 10 and 11, 12 and 13, then 14.
    async def main():
        fn = GatedRecorder()
        fn.gate.clear()
        b = DynamicBatcher("image", fn, 4, 0.02, 64, Metrics().for_model("m", "1"), low_max_batch=2)
        b.start()
        first = b.submit(np.array([0.0]))
        await _busy_worker(fn)
        low = [await b.submit_wait(np.array([float(v)]), low=True) for v in (10, 11, 12, 13, 14)]
        interactive = [b.submit(np.array([float(v)])) for v in (1, 2)]
        assert b.depth == 7 and b.room.used == 2 and b.low_room.used == 5  # each queue counts its own places
        fn.gate.set()
        results = await asyncio.gather(first, *interactive, *low)
        await b.stop()
        return fn.batches, results

    batches, results = asyncio.run(main())
    assert batches == [[0.0], [1.0, 2.0], [10.0, 11.0], [12.0, 13.0], [14.0]]
    assert [float(r.embedding[0]) for r in results] == [0, 1, 2, 10, 11, 12, 13, 14]  # each its own row


def test_interactive_items_join_a_pass_of_low_ones_that_has_not_started():
    # A pass of job items still being collected takes the interactive items that come meanwhile:
    # they wait for no pass. The first pass is full (items 0-3) so it goes at once; then the
    # worker takes job item 10 and waits (up to 5 s) for more; interactive 4, 5, 6 fill it.
    async def main():
        fn = GatedRecorder()
        fn.gate.clear()
        b = DynamicBatcher("image", fn, 4, 5.0, 64, Metrics().for_model("m", "1"), low_max_batch=4)
        b.start()
        first = [b.submit(np.array([float(v)])) for v in range(4)]
        await _busy_worker(fn)
        low = await b.submit_wait(np.array([10.0]), low=True)
        fn.gate.set()
        while b.depth:  # the worker has item 10
            await asyncio.sleep(0.001)
        interactive = [b.submit(np.array([float(v)])) for v in (4, 5, 6)]
        await asyncio.gather(*first, *interactive, low)
        await b.stop()
        return fn.batches

    assert asyncio.run(main()) == [[0.0, 1.0, 2.0, 3.0], [10.0, 4.0, 5.0, 6.0]]


def test_a_full_low_priority_queue_never_refuses_interactive_items():
    # Queues of 2 places each. Two job items fill the low-priority queue; a third waits for room
    # (never refused); interactive items still get both of their own places, and only a third
    # interactive one is refused.
    async def main():
        fn = GatedRecorder()
        fn.gate.clear()
        b = DynamicBatcher("image", fn, 1, 0.0, 2, Metrics().for_model("m", "1"), low_max_batch=1)
        b.start()
        first = b.submit(np.array([0.0]))
        await _busy_worker(fn)
        low = [await b.submit_wait(np.array([float(v)]), low=True) for v in (10, 11)]
        third = asyncio.ensure_future(b.submit_wait(np.array([12.0]), low=True))
        await asyncio.sleep(0.01)
        assert not third.done()  # waits for a low-priority place
        interactive = [b.submit(np.array([float(v)])) for v in (1, 2)]
        with pytest.raises(Overloaded):
            b.submit(np.array([3.0]))
        fn.gate.set()
        results = await asyncio.gather(first, *interactive, *low, await third)
        await b.stop()
        return fn.batches, results, b.room.used, b.low_room.used

    batches, results, used, low_used = asyncio.run(main())
    assert batches == [[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]]  # interactive first, though they came later
    assert (used, low_used) == (0, 0)


def test_low_priority_items_fill_whole_passes_while_interactive_traffic_is_quiet():
    # No interactive item for `quiet_s`: job items fill passes of max_batch (4), not their share
    # (2), so a job alone runs as fast as bulk work. An interactive item then caps them again.
    async def main():
        fn = GatedRecorder()
        fn.gate.clear()
        b = DynamicBatcher("image", fn, 4, 0.02, 64, Metrics().for_model("m", "1"), low_max_batch=2, quiet_s=60)
        b.start()
        first = await b.submit_wait(np.array([9.0]), low=True)  # held in its pass
        await _busy_worker(fn)
        low = [await b.submit_wait(np.array([float(v)]), low=True) for v in (10, 11, 12, 13, 14)]
        fn.gate.set()
        await asyncio.gather(first, *low)
        fn.gate.clear()
        busy = b.submit(np.array([1.0]))  # interactive traffic: quiet for less than 60 s from now on
        await _busy_worker(fn)
        later = [await b.submit_wait(np.array([float(v)]), low=True) for v in (20, 21, 22, 23)]
        fn.gate.set()
        await asyncio.gather(busy, *later)
        await b.stop()
        return fn.batches

    assert asyncio.run(main()) == [[9.0], [10.0, 11.0, 12.0, 13.0], [14.0], [1.0], [20.0, 21.0], [22.0, 23.0]]


class PassGate:
    """forward(): waits until `passes` forward passes are inside it at once (each thread its
    own), then answers; records each batch. Proves passes overlap, without timing."""

    def __init__(self, passes: int):
        self.barrier = threading.Barrier(passes, timeout=10)
        self.batches: list[list[float]] = []
        self.threads: set[str] = set()

    def __call__(self, x: np.ndarray) -> EncoderOutput:
        self.threads.add(threading.current_thread().name)
        if len(self.batches) < self.barrier.parties:  # the first passes meet; later ones run freely
            self.batches.append(x[:, 0].tolist())
            self.barrier.wait()
        else:
            self.batches.append(x[:, 0].tolist())
        n = len(x)
        return EncoderOutput(x.astype(np.float32), np.full((n, 1, 1, 1), 0, np.int64), np.zeros((n, 1, 1, 1), bool))


def test_two_passes_run_at_once_each_in_its_own_thread():
    # With passes=2 the worker starts a second batch while the first is still in its forward pass:
    # both must be inside forward at once to pass the barrier (one pass at a time would break it).
    async def main():
        fn = PassGate(2)
        b = DynamicBatcher("text", fn, 2, 0.0, 64, Metrics().for_model("m", "1"), passes=2)
        b.start()
        futures = [b.submit(np.array([float(i)])) for i in range(6)]
        results = await asyncio.gather(*futures)
        await b.stop()
        return fn, results

    fn, results = asyncio.run(main())
    assert len(fn.threads) == 2
    assert sorted(v for batch in fn.batches for v in batch) == list(range(6))
    assert [float(r.embedding[0]) for r in results] == list(range(6))  # answers go to their callers


def test_one_pass_at_a_time_by_default():
    # passes=1: the second batch cannot start while the first is in forward, so the barrier of
    # two breaks (BrokenBarrierError fails that pass's items alone, then the worker carries on).
    async def main():
        fn = PassGate(2)
        fn.barrier = threading.Barrier(2, timeout=0.2)
        b = DynamicBatcher("text", fn, 2, 0.0, 64, Metrics().for_model("m", "1"))
        b.start()
        futures = [b.submit(np.array([float(i)])) for i in range(4)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        await b.stop()
        return fn, results

    fn, results = asyncio.run(main())
    assert len(fn.threads) == 1
    assert any(isinstance(r, RuntimeError) for r in results)  # the lone pass at the barrier failed


def test_while_every_pass_is_busy_interactive_items_still_go_first():
    # Two passes, both held at the gate (items 0 and 1). Job items 10, 11 queue, then interactive
    # 2: the queue keeps them (nothing is collected for a pass that is not free), so once the gate
    # opens, 2 is taken by the first pass to be free, before the job items although it came last.
    # The order is recorded as the worker hands batches to passes (on the event loop), not in the
    # passes' threads, which may start in either order.
    async def main():
        fn = GatedRecorder()
        fn.gate.clear()
        b = DynamicBatcher("image", fn, 1, 0.0, 64, Metrics().for_model("m", "1"), passes=2)
        handed: list[list[float]] = []
        run_pass = b._pass

        async def recording_pass(batch, spare):
            handed.append([float(item.x[0, 0]) for item in batch])
            await run_pass(batch, spare)

        b._pass = recording_pass
        b.start()
        first = [b.submit(np.array([float(v)])) for v in (0, 1)]
        while b.depth:  # both passes took their item
            await asyncio.sleep(0.001)
        low = [await b.submit_wait(np.array([float(v)]), low=True) for v in (10, 11)]
        interactive = b.submit(np.array([2.0]))
        assert b.depth == 3  # nothing collected while both passes are busy
        fn.gate.set()
        await asyncio.gather(*first, interactive, *low)
        await b.stop()
        return handed, fn.batches

    handed, ran = asyncio.run(main())
    assert handed == [[0.0], [1.0], [2.0], [10.0], [11.0]] and sorted(ran) == handed


def test_pass_share_divides_passes_among_the_encoders_of_a_kind_with_recent_work():
    now = [100.0]
    share = PassShare(window_s=1.0, clock=lambda: now[0])
    assert share.allowed("a", "image", 2) == 2  # alone: all of them
    share.touch("a", "image")
    share.touch("b", "text")
    assert share.allowed("a", "image", 2) == 2  # another model's text encoder is not of its kind
    share.touch("b", "image")
    assert share.allowed("a", "image", 2) == 1 and share.allowed("b", "image", 2) == 1  # 2 // 2
    share.touch("c", "image")
    assert share.allowed("a", "image", 2) == 1  # 2 // 3 is 0: never below one
    assert share.allowed("a", "image", 6) == 2  # 6 // 3
    now[0] += 0.5
    share.touch("a", "image")
    now[0] += 0.6  # b and c were last busy 1.1 s ago, a 0.6 s ago
    assert share.allowed("a", "image", 2) == 2 and share.allowed("b", "image", 2) == 1


def test_request_share_limits_a_model_in_flight_only_while_another_has_requests():
    # limit 2. Alone, model a takes 3 turns at once. Once b has a request, a's 4th and 5th wait in
    # order until a's held turns fall below 2; a cancelled waiter leaves no gap; when b has been
    # quiet for the window, a's waiters all enter.
    now = [100.0]
    share = RequestShare(limit=2, window_s=1.0, clock=lambda: now[0])

    async def main():
        entered: list[str] = []
        gates = {n: asyncio.Event() for n in ("a1", "a2", "a3", "a4", "a5", "a6", "b1")}

        async def request(key: str, name: str):
            async with share.turn(key):
                entered.append(name)
                await gates[name].wait()

        async def settle():
            for _ in range(5):
                await asyncio.sleep(0)

        tasks = {n: asyncio.ensure_future(request("a", n)) for n in ("a1", "a2", "a3")}
        await settle()
        assert entered == ["a1", "a2", "a3"] and share.held["a"] == 3  # alone: no limit
        tasks["b1"] = asyncio.ensure_future(request("b", "b1"))
        await settle()
        assert entered[-1] == "b1"  # b holds 1 of its 2
        for n in ("a4", "a5", "a6"):
            tasks[n] = asyncio.ensure_future(request("a", n))
        await settle()
        assert len(entered) == 4  # a holds 3, over its share of 2: a4, a5, a6 wait
        tasks["a5"].cancel()
        gates["a1"].set()
        await settle()
        assert len(entered) == 4 and share.held["a"] == 2  # at 2, still its share: none enters
        gates["a2"].set()
        await settle()
        assert entered[-1] == "a4" and share.held["a"] == 2  # first come, first served; a5 went away
        gates["b1"].set()
        now[0] += 1.5  # b has been quiet for longer than the window
        gates["a3"].set()
        await settle()
        assert entered[-1] == "a6"  # alone again: the waiter enters
        for g in gates.values():
            g.set()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        assert share.held == {"a": 0, "b": 0}
        return tasks["a5"].cancelled()

    assert asyncio.run(main())


class Passes:
    """forward(): the inputs as embeddings, each pass `delay` long; records the CPU niceness of the
    thread of each pass, and the most passes inside at once, all and those at the base priority."""

    def __init__(self, delay: float, base: int):
        self.delay, self.base = delay, base
        self.inside, self.most, self.inside_base, self.most_base = 0, 0, 0, 0
        self.niceness: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, x):
        nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        with self.lock:
            self.niceness.append(nice)
            self.inside += 1
            self.inside_base += nice == self.base
            self.most, self.most_base = max(self.most, self.inside), max(self.most_base, self.inside_base)
        time.sleep(self.delay)
        with self.lock:
            self.inside -= 1
            self.inside_base -= nice == self.base
        n = len(x)
        return EncoderOutput(x.astype(np.float32), np.zeros((n, 1, 1, 1), np.int64), np.zeros((n, 1, 1, 1), bool))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_a_flooded_model_runs_passes_beyond_its_share_at_the_lowest_priority_while_another_has_work():
    # Two models' image encoders, 2 passes each, one PassShare. Model a alone runs 2 passes at once,
    # both at its own priority. Once b has had work (within the window), a still runs 2 at once (no
    # core idles), but at most 1 at its own priority: the other is spare, at nice 19.
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    async def flood(b_too: bool) -> tuple[Passes, int]:
        share = PassShare(window_s=60)
        a_fn, b_fn = Passes(0.05, base), Passes(0.0, base)
        a = DynamicBatcher("image", a_fn, 1, 0.0, 64, Metrics().for_model("a", "1"), passes=2, share=share,
                           share_key="a")
        b = DynamicBatcher("image", b_fn, 1, 0.0, 64, Metrics().for_model("b", "1"), passes=2, share=share,
                           share_key="b")
        a.start(), b.start()
        if b_too:
            await b.submit(np.array([0.0]))
        results = await asyncio.gather(*[a.submit(np.array([float(i)])) for i in range(8)])
        assert [float(r.embedding[0]) for r in results] == list(range(8))
        await a.stop(), await b.stop()
        return a_fn, a.spare_passes

    alone, spare = asyncio.run(flood(b_too=False))
    assert alone.most == alone.most_base == 2 and spare == 0 and set(alone.niceness) == {base}
    shared, spare = asyncio.run(flood(b_too=True))
    assert shared.most == 2 and shared.most_base == 1
    assert spare == shared.niceness.count(19) > 0 and set(shared.niceness) == {base, 19}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_pass_threads_run_at_the_lower_priority_asked():
    seen: list[int] = []

    def forward(x):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        n = len(x)
        return EncoderOutput(x.astype(np.float32), np.zeros((n, 1, 1, 1), np.int64), np.zeros((n, 1, 1, 1), bool))

    async def main():
        b = DynamicBatcher("image", forward, 1, 0.0, 64, Metrics().for_model("m", "1"), nice=5)
        b.start()
        await b.submit(np.array([1.0]))
        await b.stop()

    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    asyncio.run(main())
    assert seen == [min(19, base + 5)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the caller's own is untouched
