"""Label sets at scale, on the engine with the deterministic fake backend: whole label sets' class
matrices are cached beside the per-label cache (keyed by model version, templates and the label
tuple, in order; bounded in bytes, least recently used first out), and a cold label set's prompts
are encoded in full batches."""

import asyncio

import numpy as np
import pytest

from service.backends import FakeBackend
from service.engine import LRU, Engine
from service.metrics import Metrics
from service.settings import Settings

EMBED_DIM = 8  # FakeBackend's
MATRIX_BYTES = EMBED_DIM * 2 * 4  # a 2-label set: (P, 2) float32


def run(scenario, **settings):
    """scenario(engine, fake) on a started engine over a FakeBackend; returns its result."""

    async def main():
        fake = FakeBackend(embed_dim=EMBED_DIM)
        engine = Engine(fake, Settings(**{"warmup": False, "max_batch_wait_ms": 1, **settings}), Metrics())
        await engine.start()
        try:
            return await scenario(engine, fake)
        finally:
            await engine.stop()

    return asyncio.run(main())


def text_rows(fake: FakeBackend) -> list[int]:
    return [n for modality, n in fake.calls if modality == "text"]


def counter(engine: Engine, name: str, result: str) -> float:
    return engine.metrics.value(name, result=result) or 0.0


def test_a_label_set_seen_before_is_the_same_matrix():
    async def scenario(engine, fake):
        templates = engine.templates
        first = await engine.label_matrix(["cat", "dog"], templates)
        rows = text_rows(fake)
        again = await engine.label_matrix(["cat", "dog"], templates)
        return first, again, rows, text_rows(fake), engine

    first, again, rows_before, rows_after, engine = run(scenario)
    assert again is first  # one lookup: no per-label work, no stacking
    assert rows_after == rows_before == [4]  # 2 labels x 2 templates, encoded once
    assert first.shape == (EMBED_DIM, 2) and not first.flags.writeable  # shared: nobody may change it
    np.testing.assert_allclose(np.linalg.norm(first, axis=0), 1.0, rtol=1e-6)
    assert counter(engine, "limoe_label_set_cache_total", "hit") == 1
    assert counter(engine, "limoe_label_set_cache_total", "miss") == 1
    # the per-label counter still counts every label served from a cache
    assert counter(engine, "limoe_label_cache_total", "hit") == 2
    assert engine.metrics.value("limoe_label_set_cache_bytes") == first.nbytes


def test_other_templates_or_another_label_order_are_other_sets():
    async def scenario(engine, fake):
        first = await engine.label_matrix(["cat", "dog"], engine.templates)
        plain = await engine.label_matrix(["cat", "dog"], ("{}",))
        rows = text_rows(fake)
        swapped = await engine.label_matrix(["dog", "cat"], engine.templates)
        return first, plain, swapped, rows, text_rows(fake), engine

    first, plain, swapped, rows_before, rows_after, engine = run(scenario)
    assert plain is not first and not np.allclose(plain, first)  # "{}" alone embeds other prompts
    assert swapped is not first
    np.testing.assert_array_equal(swapped, first[:, ::-1])  # its columns in its own order...
    assert rows_after == rows_before  # ...from the per-label cache: nothing encoded again
    assert counter(engine, "limoe_label_set_cache_total", "miss") == 3


def test_label_sets_are_evicted_least_recently_used_first():
    async def scenario(engine, fake):
        t = engine.templates
        a = await engine.label_matrix(["cat", "dog"], t)
        b = await engine.label_matrix(["bird", "red"], t)
        assert await engine.label_matrix(["cat", "dog"], t) is a  # a is now the more recent
        await engine.label_matrix(["green", "blue"], t)  # room for two: b goes
        a_again = await engine.label_matrix(["cat", "dog"], t)
        b_again = await engine.label_matrix(["bird", "red"], t)
        return a, b, a_again, b_again, engine.label_sets

    a, b, a_again, b_again, sets = run(scenario, label_set_cache_mb=2 * MATRIX_BYTES / 2 ** 20)
    assert a.nbytes == MATRIX_BYTES
    assert a_again is a  # kept
    assert b_again is not b  # evicted, then rebuilt from the per-label cache: same values
    np.testing.assert_array_equal(b_again, b)
    assert len(sets) == 2 and sets.used == 2 * MATRIX_BYTES


def test_lru_bounds_the_total_cost():
    lru = LRU(10, cost=len)
    lru.put("a", "xxxx")
    lru.put("b", "xxxx")
    assert lru.get("a") == "xxxx"  # a is now the more recent
    lru.put("c", "xxx")  # 11 > 10: the least recently used (b) goes
    assert lru.get("b") is None and lru.get("a") == "xxxx" and lru.used == 7
    lru.put("a", "x")  # replacing an entry replaces its cost
    assert lru.used == 4
    lru.put("huge", "x" * 11)  # costs more than the whole cache: not kept, nothing evicted
    assert lru.get("huge") is None and len(lru) == 2
    off = LRU(0)
    off.put("a", 1)
    assert len(off) == 0  # size 0 keeps nothing


@pytest.mark.parametrize("max_batch", [32, 7])
def test_a_cold_label_set_is_encoded_in_full_batches(max_batch):
    labels = [f"cat {i}" for i in range(40)]

    async def scenario(engine, fake):
        return await engine.label_matrix(labels, engine.templates), text_rows(fake)

    matrix, rows = run(scenario, max_batch_size=max_batch)
    prompts = len(labels) * 2  # 2 templates
    assert rows == [max_batch] * (prompts // max_batch) + ([prompts % max_batch] if prompts % max_batch else [])
    one_by_one, rows_alone = run(scenario, max_batch_size=1)
    assert rows_alone == [1] * prompts
    np.testing.assert_allclose(matrix, one_by_one, rtol=1e-6, atol=1e-7)  # batching changes nothing
