"""Timing an ONNX Runtime image encoder, shared by the model benchmarks (not the serving ones)."""

from __future__ import annotations

import time

import numpy as np


def images_per_second(session, images: np.ndarray, iters: int) -> float:
    """Images per second of `iters` forward passes of an onnxruntime session over `images`."""
    start = time.perf_counter()
    for _ in range(iters):
        session.run(None, {"images": images})
    return iters * len(images) / (time.perf_counter() - start)
