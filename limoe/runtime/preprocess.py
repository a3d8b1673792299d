"""Image preprocessing with numpy and Pillow only (the server runs it without torch).

    any image -> RGB (alpha composited on a background) -> resize shorter side to R (bicubic)
              -> centre crop R x R -> float32 in [0, 1] -> (x - mean) / std -> (3, R, R)
"""

from __future__ import annotations

import functools
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

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
    # "center": the central square, resized (this project's models). "resize_crop": torchvision's
    # Resize(R) then CenterCrop(R), which OpenCLIP checkpoints were trained and are evaluated with
    # (the long side truncated to int(R * long / short), the crop offset rounded).
    crop: str = "center"

    @classmethod
    def from_model_config(cls, cfg) -> "PreprocessConfig":
        return cls(cfg.image_size, tuple(cfg.image_mean), tuple(cfg.image_std))

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std),
                "resample": self.resample, "background": list(self.background), "crop": self.crop}

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        """The inverse of `to_dict` (a manifest's `preprocessing`); ValueError says what is wrong."""
        if not isinstance(d, dict):
            raise ValueError("must be an object")
        missing = [k for k in ("image_size", "mean", "std") if k not in d]
        if missing:
            raise ValueError(f"has no {', '.join(map(repr, missing))}")

        def triple(key: str, kind: type, default=None) -> tuple:
            v = d.get(key, default)
            if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                raise ValueError(f"{key!r} must be 3 numbers, not {v!r}")
            return tuple(kind(x) for x in v)

        size = d["image_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"'image_size' must be a positive integer, not {size!r}")
        cfg = cls(size, triple("mean", float), triple("std", float), d.get("resample", "bicubic"),
                  triple("background", int, (255, 255, 255)), d.get("crop", "center"))
        if min(cfg.std) <= 0:
            raise ValueError(f"'std' must be positive, not {list(cfg.std)}")
        if cfg.resample not in _RESAMPLING:
            raise ValueError(f"'resample' must be one of {', '.join(_RESAMPLING)}, not {cfg.resample!r}")
        if not all(0 <= c <= 255 for c in cfg.background):
            raise ValueError(f"'background' must be 3 values in [0, 255], not {list(cfg.background)}")
        if cfg.crop not in CROPS:
            raise ValueError(f"'crop' {cfg.crop!r} is not supported (one of {', '.join(CROPS)})")
        return cfg


# Formats we decode. Restricting Image.open to these keeps Pillow away from formats that run
# external programs (EPS -> Ghostscript) or are rarely what a client meant.
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")


class ImageError(ValueError):
    """The input is not an image we can use (corrupt, empty, unsupported...)."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than allowed (checked from the header, before decoding)."""


def clean_error(e: Exception) -> str:
    """Pillow's message without object reprs such as <_io.BytesIO object at 0x7f...>."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e)).strip() or type(e).__name__


def open_image(source: bytes | str | Path, max_pixels: int | None = None) -> Image.Image:
    """Decode an image file's bytes (or path), refusing decompression bombs before decoding.

    Animated images give their first frame; EXIF orientation is applied."""
    try:
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source,
                         formats=FORMATS)
        w, h = img.size  # known from the header, before any pixel is decoded
        if w < 1 or h < 1:
            raise ImageError(f"image has no pixels ({w}x{h})")
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLargeError(f"image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
        img.seek(0)
        img.load()
        return ImageOps.exif_transpose(img)
    except ImageError:
        raise
    except Image.DecompressionBombError:  # Pillow's own limit, hit inside Image.open
        raise ImageTooLargeError(f"image has more than {Image.MAX_IMAGE_PIXELS * 2} pixels") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot decode image: not a supported image file ({', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"cannot decode image: {clean_error(e)}") from None


def decode_image(data: bytes, cfg: PreprocessConfig, max_bytes: int, max_pixels: int) -> np.ndarray:
    """An image file's bytes -> (3, R, R) float32 model input, the one decoding the server and
    `limoe classify` share: empty, over `max_bytes` or over `max_pixels` (from the header,
    before decoding) is refused, and so is anything Pillow cannot decode or convert.
    Raises ImageTooLargeError or ImageError, with a message for the client."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"the image is {len(data)} bytes; the limit is {max_bytes}")
    img = open_image(data, max_pixels=max_pixels)
    try:
        return preprocess_image(img, cfg)
    except (OSError, ValueError) as e:  # e.g. a truncated file that only fails on conversion
        raise ImageError(f"cannot convert image: {clean_error(e)}") from None


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


def resize_then_crop(img: Image.Image, size: int, resample: str = "bicubic", max_ratio: int = 16) -> Image.Image:
    """torchvision's Resize(size) then CenterCrop(size) on a Pillow image: the shorter side becomes
    `size`, the longer int(size * long / short), and the crop starts at round((resized - size) / 2).
    Done literally (so the bytes are torchvision's) while the resized image's long side stays under
    `max_ratio` x size; a longer strip is sampled as the same box of the source instead, so no huge
    intermediate image is made (then a pixel may differ by a grey level or more)."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    if max(new_w, new_h) <= max_ratio * size:
        return img.resize((new_w, new_h), _RESAMPLING[resample]).crop((left, top, left + size, top + size))
    sx, sy = w / new_w, h / new_h
    return img.resize((size, size), _RESAMPLING[resample],
                      box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))


def resize_center_crop(img: Image.Image, size: int, resample: str = "bicubic") -> Image.Image:
    """The central square (side = the shorter side), resized to size x size: the same as scaling
    the shorter side to `size` and cropping the centre, but a 1 x 1,000,000 strip never gets
    scaled up whole first."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return img.resize((size, size), _RESAMPLING[resample], box=(left, top, left + side, top + side))


CROPS = {"center": resize_center_crop, "resize_crop": resize_then_crop}


@functools.lru_cache(maxsize=16)
def normalise_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: channel c's byte v -> (v / 255 - mean[c]) / std[c], in float32, the same
    operations in the same order as on a whole image, so the same bits."""
    v = np.arange(256, dtype=np.float32) / np.float32(255.0)
    table = (v[None, :] - np.asarray(mean, np.float32)[:, None]) / np.asarray(std, np.float32)[:, None]
    table.flags.writeable = False
    return table


def preprocess_image(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """One Pillow image -> (3, R, R) float32, normalised: (x / 255 - mean) / std per channel, looked
    up in `normalise_table` (a byte has 256 values; half the time of computing it per pixel)."""
    rgb = CROPS[cfg.crop](to_rgb(img, cfg.background), cfg.image_size, cfg.resample)
    channels = np.asarray(rgb).transpose(2, 0, 1)  # (3, R, R) uint8
    table = normalise_table(cfg.mean, cfg.std)
    x = np.empty(channels.shape, np.float32)
    for c in range(3):
        np.take(table[c], channels[c], out=x[c])
    return x


def preprocess_batch(images: Sequence[Image.Image], cfg: PreprocessConfig) -> np.ndarray:
    """(N,) images -> (N, 3, R, R) float32."""
    return np.stack([preprocess_image(im, cfg) for im in images]) if images else \
        np.zeros((0, 3, cfg.image_size, cfg.image_size), np.float32)
