import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from limoe.runtime.preprocess import ImageError, PixelBudget, PreprocessConfig, open_image, preprocess_image, to_rgb

CFG = PreprocessConfig(image_size=16, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))


def _png(img: Image.Image, fmt="PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_solid_colour_normalises_to_hand_values():
    x = preprocess_image(Image.new("RGB", (40, 30), (255, 0, 255)), CFG)
    assert x.shape == (3, 16, 16) and x.dtype == np.float32
    # R: (1 - 0.5) / 0.5 = 1;  G: (0 - 0.25) / 0.25 = -1;  B: (1 - 0) / 1 = 1
    np.testing.assert_allclose(x[:, 5, 5], [1.0, -1.0, 1.0], atol=1e-6)


def test_the_normalising_table_gives_the_formula_bit_for_bit():
    """Every byte value in every channel, with CLIP's mean and std: the table lookup equals
    (x / 255 - mean) / std computed on the image in float32."""
    cfg = PreprocessConfig(image_size=16, mean=(0.48145466, 0.4578275, 0.40821073),
                           std=(0.26862954, 0.26130258, 0.27577711))
    pixels = np.random.default_rng(0).permutation(np.tile(np.arange(256, dtype=np.uint8), 3))[:768]
    rgb = np.stack([pixels.reshape(16, 16, 3)[..., c] for c in range(3)], axis=-1)  # (16, 16, 3)
    rgb[0, :3] = [[0, 0, 0], [255, 255, 255], [1, 128, 254]]
    formula = (rgb.astype(np.float32) / 255.0 - np.asarray(cfg.mean, np.float32)) / np.asarray(cfg.std, np.float32)
    x = preprocess_image(Image.fromarray(rgb, "RGB"), cfg)
    assert np.array_equal(x, formula.transpose(2, 0, 1)) and x.flags.c_contiguous


def test_resize_keeps_aspect_and_crops_the_centre():
    img = Image.new("RGB", (30, 10), (0, 0, 0))  # wide: black sides, white centre third
    img.paste((255, 255, 255), (10, 0, 20, 10))
    x = preprocess_image(img, PreprocessConfig(16, (0, 0, 0), (1, 1, 1), resample="nearest"))
    # shorter side 10 -> 16, width 30 -> 48; centre crop [16, 32) is exactly the white third
    assert x.min() == 1.0


def test_transparency_is_composited_on_white():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("LA", (8, 8), (0, 128))  # black at ~50% alpha on white -> ~127 grey
    assert abs(to_rgb(half).getpixel((0, 0))[0] - 127) <= 1
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([0, 0, 0] * 256)
    pal.info["transparency"] = 0
    assert to_rgb(pal).getpixel((0, 0)) == (255, 255, 255)


def test_cmyk_and_sixteen_bit_images():
    cmyk = open_image(_png(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), fmt="JPEG"))
    r, g, b = to_rgb(cmyk).getpixel((1, 1))
    assert r > 200 and g < 60 and b < 60  # cyan-free, full magenta+yellow = red
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    decoded = open_image(_png(sixteen))
    assert decoded.mode.startswith("I")
    assert to_rgb(decoded).getpixel((0, 0)) == (255, 255, 255)  # rescaled, not clipped garbage
    mid = Image.fromarray(np.full((4, 4), 32896, dtype=np.uint16))  # 32896 / 65535 * 255 = 128
    assert to_rgb(open_image(_png(mid))).getpixel((0, 0)) == (128, 128, 128)


def test_one_pixel_and_animated_images():
    x = preprocess_image(open_image(_png(Image.new("RGB", (1, 1), (255, 255, 255)))), CFG)
    assert x.shape == (3, 16, 16)
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = open_image(buf.getvalue())
    assert to_rgb(img).getpixel((0, 0))[0] > 200  # the first (red) frame


def test_bad_inputs_raise_image_error():
    with pytest.raises(ImageError, match="cannot decode"):
        open_image(b"")
    with pytest.raises(ImageError, match="cannot decode"):
        open_image(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    good = _png(Image.new("RGB", (64, 64)))
    with pytest.raises(ImageError, match="cannot decode"):
        open_image(good[: len(good) // 2])  # truncated


def test_decompression_bomb_is_refused_before_decoding():
    # A 4000x4000 PNG of zeros is a few KB; the pixel limit stops it from the header alone.
    bomb = _png(Image.new("L", (4000, 4000)))
    assert len(bomb) < 100_000
    with pytest.raises(ImageError, match="more than the limit"):
        open_image(bomb, max_pixels=1_000_000)
    assert open_image(bomb, max_pixels=16_000_000).size == (4000, 4000)


def test_decode_image_is_the_one_decoding_of_server_and_offline_classifier():
    """Bytes -> model input, refusing empty, oversized (bytes, or pixels from the header) and
    undecodable images with the messages clients see."""
    import io

    from PIL import Image

    from limoe.runtime.preprocess import ImageError, ImageTooLargeError, PreprocessConfig, decode_image

    cfg = PreprocessConfig(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, "PNG")
    png = buf.getvalue()
    assert decode_image(png, cfg, max_bytes=len(png), max_pixels=1200).shape == (3, 16, 16)
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"", cfg, 100, 100)
    with pytest.raises(ImageTooLargeError, match=f"the image is {len(png)} bytes; the limit is {len(png) - 1}"):
        decode_image(png, cfg, len(png) - 1, 10_000)
    with pytest.raises(ImageTooLargeError, match="40x30 = 1200 pixels"):
        decode_image(png, cfg, len(png), 1199)
    with pytest.raises(ImageError, match="cannot decode image"):
        decode_image(b"not an image", cfg, 100, 100)
    with pytest.raises(ImageError, match="cannot (decode|convert) image"):
        decode_image(png[: len(png) // 2], cfg, len(png), 10_000)  # truncated


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "I;16", "I", "F", "RGB", "CMYK"])
def test_band_by_band_conversion_is_the_whole_image_conversion(mode):
    """to_rgb converts deep and transparent images in bands (so a 40-megapixel one needs a few MB
    of working copies): bands of 17, 37 or 100 pixels give the bytes of converting it whole."""
    rng = np.random.default_rng(1)
    if mode in ("RGBA", "LA", "RGB", "CMYK"):
        img = Image.fromarray(rng.integers(0, 256, (23, 17, len(mode)), dtype=np.uint8), mode)
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (23, 17), dtype=np.uint8), "L").convert("P")
        img.info["transparency"] = bytes(rng.integers(0, 256, 256).astype(np.uint8))  # alpha per palette entry
    elif mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (23, 17), dtype=np.uint16))
    elif mode == "I":
        img = Image.fromarray(rng.integers(-5, 300, (23, 17)).astype(np.int32), "I")
    else:
        img = Image.fromarray(rng.random((23, 17)).astype(np.float32), "F")
    whole = np.asarray(to_rgb(img, (10, 20, 30), strip_pixels=10 ** 6))
    assert whole.shape == (23, 17, 3)
    for band in (17, 37, 100):
        assert np.array_equal(np.asarray(to_rgb(img, (10, 20, 30), strip_pixels=band)), whole), band


def test_the_pixel_budget_lets_images_decode_side_by_side_only_while_their_pixels_fit():
    budget = PixelBudget(10)
    order: list[str] = []
    first_in, release_first = threading.Event(), threading.Event()

    def big(name: str, pixels: int, hold: threading.Event | None = None) -> None:
        with budget.hold(pixels):
            order.append(f"{name} in")
            if hold is not None:
                first_in.set()
                hold.wait(5)
            order.append(f"{name} out")

    a = threading.Thread(target=big, args=("a", 6, release_first))
    a.start()
    assert first_in.wait(5)
    small = threading.Thread(target=big, args=("small", 4))  # 6 + 4 fit: it runs beside a
    small.start()
    small.join(5)
    b = threading.Thread(target=big, args=("b", 6))  # 6 + 6 do not: b waits for a
    huge = threading.Thread(target=big, args=("huge", 1000))  # more than all of it: alone, after a
    b.start()
    huge.start()
    deadline = time.monotonic() + 5
    while len(budget._changed._waiters) < 2 and time.monotonic() < deadline:  # both wait in the budget
        time.sleep(0.01)
    assert order == ["a in", "small in", "small out"] and budget.free == 4
    release_first.set()
    for t in (a, b, huge):
        t.join(5)
    assert budget.free == 10 and order[3] == "a out"
    for name in ("b", "huge"):  # each ran alone once a was out: in, then out, nothing between
        i = order.index(f"{name} in")
        assert order[i + 1] == f"{name} out"
    with pytest.raises(ValueError):
        PixelBudget(0)
