"""Image preprocessing with numpy and Pillow only (the server runs it without torch).

    any image -> RGB (alpha composited on a background) -> resize shorter side to R (bicubic)
              -> centre crop R x R -> float32 in [0, 1] -> (x - mean) / std -> (3, R, R)
"""

from __future__ import annotations

import contextlib
import functools
import io
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

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
    return load_image(open_lazily(source, max_pixels))


@contextlib.contextmanager
def _pillow_errors():
    """Pillow's exceptions on a bad file -> ImageError with a message for the client."""
    try:
        yield
    except ImageError:
        raise
    except Image.DecompressionBombError:  # Pillow's own limit, hit inside Image.open
        raise ImageTooLargeError(f"image has more than {Image.MAX_IMAGE_PIXELS * 2} pixels") from None
    except UnidentifiedImageError:
        raise ImageError(f"cannot decode image: not a supported image file ({', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"cannot decode image: {clean_error(e)}") from None


def open_lazily(source: bytes | str | Path, max_pixels: int | None = None) -> Image.Image:
    """The image's header only (no pixel decoded yet): its size, checked against `max_pixels`."""
    with _pillow_errors():
        img = Image.open(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source,
                         formats=FORMATS)
        w, h = img.size
        if w < 1 or h < 1:
            raise ImageError(f"image has no pixels ({w}x{h})")
        if max_pixels is not None and w * h > max_pixels:
            raise ImageTooLargeError(f"image is {w}x{h} = {w * h} pixels, more than the limit of {max_pixels}")
        return img


def load_image(img: Image.Image) -> Image.Image:
    """Decode the pixels of an `open_lazily` image: its first frame, EXIF orientation applied."""
    with _pillow_errors():
        img.seek(0)
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # not a copy of the whole image when nothing turns
        return img


class PixelBudget:
    """Pixels (width x height) that the images being decoded at once, in all threads, may have.

    Decoding and converting a W x H image holds a few bytes a pixel (3 for RGB, up to 7 for CMYK
    or RGBA: the decoded image and its RGB copy), so an image at the server's pixel limit takes
    hundreds of MB: without a bound, a few of them decoded side by side exceed a container's
    memory. A decode waits here until its image's pixels are free; an image larger than the whole
    budget waits for all of it and then runs alone. Small images barely wait."""

    def __init__(self, pixels: int):
        if pixels < 1:
            raise ValueError(f"a pixel budget must be positive, not {pixels}")
        self.total = self.free = pixels
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int):
        n = min(pixels, self.total)
        with self._changed:
            self._changed.wait_for(lambda: self.free >= n)
            self.free -= n
        try:
            yield
        finally:
            with self._changed:
                self.free += n
                self._changed.notify_all()


def decode_image(data: bytes, cfg: PreprocessConfig, max_bytes: int, max_pixels: int,
                 budget: PixelBudget | None = None) -> np.ndarray:
    """An image file's bytes -> (3, R, R) float32 model input, the one decoding the server and
    `limoe classify` share: empty, over `max_bytes` or over `max_pixels` (from the header,
    before decoding) is refused, and so is anything Pillow cannot decode or convert. With a
    `budget`, the pixels are decoded only once its room allows (and held until the result is made).
    Raises ImageTooLargeError or ImageError, with a message for the client."""
    if not data:
        raise ImageError("the image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageTooLargeError(f"the image is {len(data)} bytes; the limit is {max_bytes}")
    img = open_lazily(data, max_pixels=max_pixels)
    with budget.hold(img.width * img.height) if budget is not None else contextlib.nullcontext():
        img = load_image(img)
        try:
            return preprocess_image(img, cfg)
        except (OSError, ValueError) as e:  # e.g. a truncated file that only fails on conversion
            raise ImageError(f"cannot convert image: {clean_error(e)}") from None


STRIP_PIXELS = 1 << 20  # pixels converted at a time: a big image's working copies stay a few MB
DEEP = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def strips(img: Image.Image, strip_pixels: int = STRIP_PIXELS) -> Iterator[tuple[int, Image.Image]]:
    """(top row, the image's rows from it) in bands of about `strip_pixels` pixels (the image
    itself when it is smaller)."""
    w, h = img.size
    rows = max(1, strip_pixels // w)
    if rows >= h:
        yield 0, img
        return
    for top in range(0, h, rows):
        yield top, img.crop((0, top, w, min(h, top + rows)))


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255),
           strip_pixels: int = STRIP_PIXELS) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB. Transparency is composited onto `background`; 16- and
    32-bit greyscale is rescaled from its own range (not clipped); CMYK goes through Pillow.
    Deep and transparent images are converted band by band (`strips`), so the working copies
    (float64 pixels, RGBA canvases) of a 40-megapixel image take a few MB, not a GB."""
    if img.mode in DEEP:
        img = _deep_to_l(img, strip_pixels)
    if img.mode in ALPHA or (img.mode == "P" and "transparency" in img.info):
        out = Image.new("RGB", img.size)
        for top, band in strips(img, strip_pixels):
            rgba = band.convert("RGBA")
            canvas = Image.new("RGBA", rgba.size, (*background, 255))
            out.paste(Image.alpha_composite(canvas, rgba).convert("RGB"), (0, top))
        return out
    return img if img.mode == "RGB" else img.convert("RGB")


def _deep_to_l(img: Image.Image, strip_pixels: int) -> Image.Image:
    """16- or 32-bit greyscale -> 8-bit "L": 16-bit modes over 65535, others over 255 unless
    their values go beyond it (then 65535), floats within [0, 1] over 1."""
    peak = img.getextrema()[1] if not img.mode.startswith("I;16") else 0
    top = 65535.0 if img.mode.startswith("I;16") or peak > 255 else 255.0
    if img.mode == "F" and peak <= 1.0:
        top = 1.0
    out = Image.new("L", img.size)
    for row, band in strips(img, strip_pixels):
        a = np.asarray(band, dtype=np.float64)
        out.paste(Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L"), (0, row))
    return out


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
