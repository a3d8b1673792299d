"""Rendering SVG icons into training images: resvg (the `resvg-py` wheel from PyPI) draws each
icon at the model's resolution on a light background, in one pass.

Every choice that varies between items is a pure function of the item's key (`look_for`):
the background (white half the time, else one of 8 light tints), the icon's size (78-94 % of the
side) and a small offset, and, for monochrome icons (drawn in `currentColor`), the colour: black
40 % of the time, else one of the 8 colours of the `scenes` source (so colour words mean the same
everywhere). The same key always gives the same pixels.

The output is an opaque RGB PNG (`limoe.data.format.png_bytes`), so loading needs no alpha
compositing. `Renderer` spreads the work over processes (2 by default).
"""

from __future__ import annotations

import io
import multiprocessing
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

from limoe.data.format import png_bytes, stable_unit
from limoe.data.iconify import Icon, icon_box_and_body, set_colour, svg_number
from limoe.data.scenes import COLOURS

SIZE = 64  # the `small` preset's image_size

# (name, RGB) of the light backgrounds; "white" is drawn half of the time.
BACKGROUNDS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("light grey", (238, 238, 238)), ("cream", (250, 245, 230)), ("light blue", (228, 238, 250)),
    ("light green", (230, 245, 232)), ("light pink", (252, 232, 240)), ("light yellow", (255, 250, 218)),
    ("lavender", (238, 234, 250)), ("peach", (253, 236, 222)),
)
WHITE = ("white", (255, 255, 255))
# Colours of monochrome icons: black 40 %, else one of the scenes' 8 colours.
ICON_COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (("black", (0, 0, 0)), *COLOURS.items())
BLACK_SHARE = 0.4
SCALE_RANGE = (0.78, 0.94)  # icon side / image side


def hex_colour(rgb: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


@dataclass(frozen=True)
class Look:
    """How one item is drawn."""

    background: str  # name
    background_rgb: tuple[int, int, int]
    colour: str | None  # colour of a monochrome icon (None: the icon keeps its own colours)
    colour_rgb: tuple[int, int, int] | None
    scale: float  # icon side / image side
    dx: float  # offset of the icon's centre from the image centre, as a share of the side
    dy: float


def look_for(key: str, monochrome: bool) -> Look:
    """The deterministic look of the item with this key."""
    u = stable_unit(f"bg:{key}")
    bg = WHITE if u < 0.5 else BACKGROUNDS[min(int((u - 0.5) * 2 * len(BACKGROUNDS)), len(BACKGROUNDS) - 1)]
    colour = None
    if monochrome:
        c = stable_unit(f"colour:{key}")
        if c < BLACK_SHARE:
            colour = ICON_COLOURS[0]
        else:
            rest = ICON_COLOURS[1:]
            colour = rest[min(int((c - BLACK_SHARE) / (1 - BLACK_SHARE) * len(rest)), len(rest) - 1)]
    lo, hi = SCALE_RANGE
    scale = lo + (hi - lo) * stable_unit(f"scale:{key}")
    room = (1 - scale) / 2  # the icon stays inside the image
    dx = (2 * stable_unit(f"dx:{key}") - 1) * room * 0.5
    dy = (2 * stable_unit(f"dy:{key}") - 1) * room * 0.5
    return Look(bg[0], bg[1], colour[0] if colour else None, colour[1] if colour else None, scale, dx, dy)


def compose_svg(icon: Icon, look: Look, size: int = SIZE) -> str:
    """One SVG document: the background, then the icon fitted (aspect kept, centred) in a square of
    side look.scale * size around the offset centre."""
    (left, top, width, height), body = icon_box_and_body(icon)
    body = set_colour(body, hex_colour(look.colour_rgb or (0, 0, 0)))
    side = look.scale * size
    x = size / 2 + look.dx * size - side / 2
    y = size / 2 + look.dy * size - side / 2
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'width="{size}" height="{size}" viewBox="0 0 {size} {size}">'
            f'<rect width="{size}" height="{size}" fill="{hex_colour(look.background_rgb)}"/>'
            f'<svg x="{svg_number(x)}" y="{svg_number(y)}" width="{svg_number(side)}" height="{svg_number(side)}" '
            f'viewBox="{" ".join(svg_number(v) for v in (left, top, width, height))}">{body}</svg></svg>')


def render_svg(svg: str, size: int | None = None) -> Image.Image:
    """Rasterise an SVG document with resvg (RGBA). `size` sets width and height; default: the
    document's own size. System fonts are not loaded (faster, and the same on every machine)."""
    import resvg_py

    kw: dict[str, Any] = {"width": size, "height": size} if size else {}
    data = resvg_py.svg_to_bytes(svg_string=svg, skip_system_fonts=True, **kw)
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGBA")


def render_png(svg: str, size: int = SIZE) -> bytes:
    """An opaque SVG document (compose_svg) as RGB PNG bytes with fixed encoder settings."""
    return png_bytes(render_svg(svg, size).convert("RGB"))


def render_icon(icon: Icon, look: Look, size: int = SIZE) -> bytes:
    """The PNG bytes of one icon drawn with `look`."""
    return render_png(compose_svg(icon, look, size), size)


def _render_task(task: tuple[Icon, Look, int]) -> bytes:
    return render_icon(*task)


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


class Renderer:
    """Renders (icon, look) pairs into PNG bytes, in order, in `workers` processes (inline for 1).

        with Renderer(workers=2) as r:
            for png in r.map(pairs): ...

    The workers are forked where the platform can (they only run resvg and Pillow), so they need
    nothing from the parent's __main__: a script read from stdin works too."""

    def __init__(self, workers: int | None = None, size: int = SIZE, chunksize: int = 64):
        self.workers = default_workers() if workers is None else max(1, int(workers))
        self.size, self.chunksize, self.pool = size, chunksize, None

    def __enter__(self) -> Renderer:
        if self.workers > 1:
            methods = multiprocessing.get_all_start_methods()
            ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            self.pool = ctx.Pool(self.workers)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.pool is not None:
            if exc_type is None:
                self.pool.close()
            else:
                self.pool.terminate()
            self.pool.join()
            self.pool = None

    def map(self, pairs: Iterable[tuple[Icon, Look]]) -> Iterator[bytes]:
        tasks = ((icon, look, self.size) for icon, look in pairs)
        if self.pool is None:
            return (_render_task(t) for t in tasks)
        return self.pool.imap(_render_task, tasks, self.chunksize)


def write_rendered(writer, plan: list, workers: int | None, desc: str) -> None:
    """Render every (item, icon, look) of `plan` and add it to a SourceWriter as
    images/<style>/<icon>.png, in plan order (a repeated file name gets a "_" suffix)."""
    from tqdm.auto import tqdm

    from limoe.data.iconify import safe_file_name

    files: set[str] = set()
    with Renderer(workers) as renderer:
        pngs = renderer.map((icon, look) for _, icon, look in plan)
        for (item, _, _), png in zip(tqdm(plan, desc=desc, unit="img"), pngs):
            name = f"images/{item['style']}/{safe_file_name(item['icon'])}.png"
            while name in files:
                name = name[:-4] + "_.png"
            files.add(name)
            writer.add(item, png, name)


def renderer_version() -> str:
    """The installed resvg-py version (recorded in SOURCE.json; part of what decides the pixels)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("resvg-py")
    except PackageNotFoundError:  # pragma: no cover
        return "unknown"


__all__ = [
    "write_rendered",
    "BACKGROUNDS",
    "BLACK_SHARE",
    "ICON_COLOURS",
    "Look",
    "SCALE_RANGE",
    "SIZE",
    "WHITE",
    "Renderer",
    "compose_svg",
    "default_workers",
    "hex_colour",
    "look_for",
    "render_icon",
    "render_png",
    "render_svg",
    "renderer_version",
]
