"""Image preprocessing with numpy and Pillow only (the server runs it without torch).

    any image -> RGB (alpha composited on a background) -> resize shorter side to R (bicubic)
              -> centre crop R x R -> float32 in [0, 1] -> (x - mean) / std -> (3, R, R)
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

_RESAMPLING = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class PreprocessConfig:
    image_size: int  # output side R
    mean: tuple[float, float, float]  # per channel, on [0, 1]
    std: tuple[float, float, float]
    resample: str = "bicubic"  # one of _RESAMPLING
    background: tuple[int, int, int] = (255, 255, 255)  # transparent pixels become this colour

    @classmethod
    def from_model_config(cls, cfg) -> "PreprocessConfig":
        return cls(cfg.image_size, tuple(cfg.image_mean), tuple(cfg.image_std))

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "resample": self.resample, "background": list(self.background), "crop": "center"}


class ImageError(ValueError):
    """The input is not an image we can use (corrupt, empty, too large...)."""


def open_image(source: bytes | str | Path, max_pixels: int | None = None) -> Image.Image:
    """Decode an image file's bytes (or path), refusing decompression bombs before decoding.

    Animated images give their first frame; EXIF orientation is applied."""
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source)
        w, h = img.size  # known from the header, before any pixel is decoded
        if w < 1 or h < 1:
            raise ImageError(f"image has no pixels ({w}x{h})")
        if max_pixels is not None and w * h > max_pixels:
            raise ImageError(f"image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
        img.seek(0)
        img.load()
        return ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, EOFError) as e:
        raise ImageError(f"cannot decode image: {e}") from None


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Transparency is composited onto `background`; 16- and
    32-bit greyscale is rescaled from its own range (not clipped); CMYK goes through Pillow."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        if img.mode == "F" and a.max(initial=0) <= 1.0:
            top = 1.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_center_crop(img: Image.Image, size: int, resample: str = "bicubic") -> Image.Image:
    """Scale the shorter side to `size` (aspect kept), then cut the central size x size square."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), _RESAMPLING[resample])
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def preprocess_image(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """One Pillow image -> (3, R, R) float32, normalised."""
    rgb = resize_center_crop(to_rgb(img, cfg.background), cfg.image_size, cfg.resample)
    x = np.asarray(rgb, dtype=np.float32) / 255.0  # (R, R, 3)
    x = (x - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, R, R)


def preprocess_batch(images: Sequence[Image.Image], cfg: PreprocessConfig) -> np.ndarray:
    """(N,) images -> (N, 3, R, R) float32."""
    return np.stack([preprocess_image(im, cfg) for im in images]) if images else \
        np.zeros((0, 3, cfg.image_size, cfg.image_size), np.float32)
