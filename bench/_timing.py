"""Timing encoders in process, the one place for it: an ONNX Runtime session (the model benchmarks)
and an encoder pair (the raw encoder that the serving and bulk benchmarks hold the server to)."""

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


def raw_rate(enc, pixels: np.ndarray, batch: int, passes: int = 1) -> float:
    """images/s of `encode_images` over all of `pixels` (N, 3, R, R), `batch` at a time, `passes`
    batches at once (each in its own thread)."""
    chunks = [pixels[i:i + batch] for i in range(0, len(pixels), batch)]
    with ThreadPoolExecutor(passes) as pool:
        start = time.perf_counter()
        for _ in pool.map(enc.encode_images, chunks):
            pass
        return len(pixels) / (time.perf_counter() - start)


def encoder_rate(enc, pixels: np.ndarray, seconds: float) -> float:
    """images/s of the image encoder alone on one preprocessed batch, for about `seconds`."""
    n = 0
    start = time.perf_counter()
    while True:
        enc.encode_images(pixels)
        n += len(pixels)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return n / elapsed


def raw_seconds(enc, prompts: list[str], batch: int, passes: int = 1) -> float:
    """Tokenise and encode `prompts` in batches of `batch`, `passes` batches at once."""
    started = time.perf_counter()
    ids = enc.tokenizer.encode(prompts)
    with ThreadPoolExecutor(passes) as pool:
        for _ in pool.map(enc.encode_tokens, [ids[i:i + batch] for i in range(0, len(ids), batch)]):
            pass
    return time.perf_counter() - started
