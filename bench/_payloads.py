"""Request bodies for the serving benchmarks: synthetic PNG files and /v1/classify bodies
(JSON with base64 images, or multipart), encoded once before the load starts."""

from __future__ import annotations

import base64
import io
import json

import numpy as np

LABELS = ["a cat", "a dog", "a red circle", "a blue square", "a car"]
BOUNDARY = "limoe-bench-boundary-7d3f1c"


def png_images(n: int, size: int = 64, seed: int = 0) -> list[bytes]:
    """n distinct RGB PNG files, size x size: a smooth gradient plus noise (about 10 KB each)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = []
    for _ in range(n):
        base = np.stack([(xx * rng.uniform(1, 4) + yy * rng.uniform(1, 4) + rng.uniform(0, 255)) % 256
                         for _ in range(3)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 24, base.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def encode_body(images: list[bytes], labels: list[str] = LABELS, fmt: str = "json") -> tuple[bytes, dict]:
    """One /v1/classify request body, encoded once: (bytes, headers)."""
    if fmt == "json":
        body = json.dumps({"images": [base64.b64encode(im).decode() for im in images], "labels": labels})
        return body.encode(), {"content-type": "application/json"}
    if fmt == "multipart":
        parts = []
        for i, im in enumerate(images):
            parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{i}.png"\r\n'
                         "Content-Type: image/png\r\n\r\n".encode() + im + b"\r\n")
        for label in labels:
            parts.append(f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="labels"\r\n\r\n{label}\r\n'.encode())
        parts.append(f"--{BOUNDARY}--\r\n".encode())
        return b"".join(parts), {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
    raise ValueError(f"unknown format {fmt!r}")


def noisy_pngs(n: int, size: int = 180) -> list[bytes]:
    """Incompressible PNGs, about 3 bytes per pixel: the most body per decoded pixel."""
    from PIL import Image

    rng = np.random.default_rng(1)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(buf, "PNG")
        out.append(buf.getvalue())
    return out
