"""Timing an ONNX Runtime image encoder, shared by the model benchmarks (not the serving ones)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def images_per_second(session, images: np.ndarray, iters: int, passes: int = 1) -> float:
    """Images per second of an onnxruntime session over `images`: `passes` threads at once (as
    the server runs LIMOE_ENCODER_PASSES), each making `iters` forward passes."""
    def run(_) -> None:
        for _ in range(iters):
            session.run(None, {"images": images})

    with ThreadPoolExecutor(passes) as pool:
        start = time.perf_counter()
        list(pool.map(run, range(passes)))
        return passes * iters * len(images) / (time.perf_counter() - start)
