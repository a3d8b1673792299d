"""`scenes`: procedurally rendered 64 x 64 scenes with templated captions, for compositional
zero-shot evaluation.

Each scene is 1-4 copies of one (colour, shape, texture) object placed in one region (left,
right, top, bottom, centre) of a light background: "two red striped circles on the left".
Everything about item i is drawn from numpy's Generator seeded with [seed, i], so item i is the
same whatever `count` is, on every machine.

Held out: HELDOUT_COMBOS, 8 of the 64 (colour, shape) pairs, one per colour and one per shape
(shape index = 3 * colour index + 1 mod 8). Scenes showing one of them are always "test"
(`heldout`: "combo"); the train split never contains them, although it contains every colour
and every shape, so a model can only name "a blue star" by composing "blue" and "star". Other
scenes are split by a hash of "scenes:<seed>:<i>".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from limoe.data.format import TEST_FRACTION, VAL_FRACTION, SourceWriter, is_built, read_meta, split_for
from limoe.data.licenses import licenses_for

NAME = "scenes"
SIZE = 64
SUPERSAMPLE = 4  # drawn at 256 px, downscaled with Lanczos: anti-aliased edges

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "orange": (245, 135, 20), "yellow": (235, 200, 20), "green": (40, 155, 60),
    "blue": (35, 85, 215), "purple": (130, 50, 180), "pink": (240, 120, 185), "brown": (125, 80, 40),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond", "hexagon", "cross", "heart")
TEXTURES = ("solid", "striped", "dotted")
POSITIONS = ("left", "right", "top", "bottom", "centre")
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "centre": "in the centre"}
_REGIONS = {"left": (0.0, 0.0, 0.5, 1.0), "right": (0.5, 0.0, 1.0, 1.0), "top": (0.0, 0.0, 1.0, 0.5),
            "bottom": (0.0, 0.5, 1.0, 1.0), "centre": (0.2, 0.2, 0.8, 0.8)}
_SIZES = {1: (0.26, 0.34), 2: (0.20, 0.26), 3: (0.17, 0.21), 4: (0.16, 0.20)}  # object diameter / image side

HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    (c, SHAPES[(3 * i + 1) % len(SHAPES)]) for i, c in enumerate(COLOURS))


def is_heldout(colour: str, shape: str) -> bool:
    return (colour, shape) in HELDOUT_COMBOS


def plural(shape: str) -> str:
    return shape + "es" if shape.endswith(("s", "x", "ch", "sh")) else shape + "s"


def sample_spec(seed: int, i: int) -> dict[str, Any]:
    """The attributes and layout of scene i (a pure function of seed and i)."""
    rng = np.random.default_rng([seed, i])
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    texture = TEXTURES[rng.integers(len(TEXTURES))]
    count = int(rng.integers(1, 5))
    position = POSITIONS[rng.integers(len(POSITIONS))]
    x0, y0, x1, y1 = _REGIONS[position]
    lo, hi = _SIZES[count]
    d = float(rng.uniform(lo, hi))
    objects: list[tuple[float, float, float]] = []
    for _ in range(200):  # rejection sampling of non-overlapping centres inside the region
        if len(objects) == count:
            break
        r = d / 2
        if x1 - x0 < d or y1 - y0 < d:
            d *= 0.9
            continue
        cx, cy = rng.uniform(x0 + r, x1 - r), rng.uniform(y0 + r, y1 - r)
        if all(math.hypot(cx - ox, cy - oy) >= (r + orr) * 1.08 for ox, oy, orr in objects):
            objects.append((float(cx), float(cy), r * float(rng.uniform(0.92, 1.08))))
        elif _ % 40 == 39:  # crowded: start again a little smaller
            objects, d = [], d * 0.9
    rot = float(rng.uniform(-12, 12))
    jitter = rng.integers(-14, 15, size=3)
    base = np.array(COLOURS[colour]) + jitter
    background = int(rng.integers(225, 250))
    return {"colour": colour, "shape": shape, "texture": texture, "count": len(objects), "position": position,
            "objects": objects, "rotation": rot, "rgb": tuple(int(v) for v in np.clip(base, 0, 255)),
            "background": (background, background, max(0, background - int(rng.integers(0, 12)))),
            "stripe_angle": float(rng.choice([0.0, 45.0, 90.0, 135.0])), "pattern_phase": float(rng.uniform(0, 1))}


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    def ring(n: int, radius: float, start: float) -> list[tuple[float, float]]:
        return [(radius * math.cos(math.radians(start + rot + 360 * k / n)),
                 radius * math.sin(math.radians(start + rot + 360 * k / n))) for k in range(n)]

    if shape == "circle":
        pts = ring(64, r, 0)
    elif shape == "square":
        pts = ring(4, r * 0.95, 45)
    elif shape == "diamond":
        pts = [(x * 0.75, y) for x, y in ring(4, r, 0)]
    elif shape == "triangle":
        pts = [(x, y + r * 0.15) for x, y in ring(3, r * 1.1, -90)]
    elif shape == "hexagon":
        pts = ring(6, r, 0)
    elif shape == "star":
        outer, inner = ring(5, r * 1.05, -90), ring(5, r * 0.45, -54)
        pts = [p for pair in zip(outer, inner) for p in pair]
    elif shape == "cross":
        a, b = r * 0.33, r * 0.95
        pts = [(-a, -b), (a, -b), (a, -a), (b, -a), (b, a), (a, a),
               (a, b), (-a, b), (-a, a), (-b, a), (-b, -a), (-a, -a)]
        c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
        pts = [(x * c - y * s, x * s + y * c) for x, y in pts]
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 64, endpoint=False)
        pts = [(r * 16 * math.sin(t) ** 3 / 17, -r * (13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                                     - math.cos(4 * t)) / 17 - r * 0.1) for t in ts]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(cx + x, cy + y) for x, y in pts]


def _pattern(spec: dict[str, Any], side: int) -> Image.Image:
    """The fill of the objects: solid colour, colour stripes on white, or colour dots on white."""
    rgb = np.array(spec["rgb"], np.uint8)
    if spec["texture"] == "solid":
        return Image.new("RGB", (side, side), spec["rgb"])
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    white = np.array((250, 250, 250), np.uint8)
    if spec["texture"] == "striped":
        a = math.radians(spec["stripe_angle"])
        t = (xx * math.cos(a) + yy * math.sin(a)) / 0.065 + spec["pattern_phase"]
        on = (t % 1.0) < 0.5
    else:  # dotted: a grid of dots, period 0.068
        p = 0.068
        dx = (xx / p + spec["pattern_phase"]) % 1.0 - 0.5
        dy = (yy / p + spec["pattern_phase"]) % 1.0 - 0.5
        on = dx * dx + dy * dy < 0.33 ** 2
    return Image.fromarray(np.where(on[..., None], rgb, white).astype(np.uint8))


def render_scene(spec: dict[str, Any], size: int = SIZE, supersample: int = SUPERSAMPLE) -> Image.Image:
    """A spec from sample_spec -> a size x size RGB image."""
    side = size * supersample
    canvas = Image.new("RGB", (side, side), spec["background"])
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    polys = [_polygon(spec["shape"], cx * side, cy * side, r * side, spec["rotation"]) for cx, cy, r in spec["objects"]]
    for pts in polys:
        draw.polygon(pts, fill=255)
    canvas.paste(_pattern(spec, side), (0, 0), mask)
    if spec["texture"] != "solid":  # an outline keeps the silhouette readable at 64 px
        outline = ImageDraw.Draw(canvas)
        for pts in polys:
            outline.line([*pts, pts[0]], fill=spec["rgb"], width=max(1, round(1.6 * supersample)), joint="curve")
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def scene_captions(spec: dict[str, Any]) -> tuple[str, list[str]]:
    """(class name "red circle", captions; the first is canonical: "two red striped circles on the left")."""
    c, s, t, n, pos = spec["colour"], spec["shape"], spec["texture"], spec["count"], POSITION_PHRASES[spec["position"]]
    noun = s if n == 1 else plural(s)
    num = "a" if n == 1 else COUNT_WORDS[n]
    tex = "" if t == "solid" else f"{t} "
    captions = [f"{num} {c} {tex}{noun} {pos}", f"{n} {c} {tex}{noun} {pos}", f"{num} {tex}{c} {noun}",
                f"{c} {noun}", f"{num} {noun} {pos}", f"{COUNT_WORDS[n]} {t} {c} {noun}",
                f"{pos}, {num} {c} {tex}{noun}", f"a picture of {num} {c} {tex}{noun} {pos}"]
    if spec["position"] == "centre":
        captions.append(f"{num} {c} {tex}{noun} in the middle")
    return f"{c} {s}", list(dict.fromkeys(" ".join(x.split()) for x in captions))


def scene_item(seed: int, i: int, val: float = VAL_FRACTION,
               test: float = TEST_FRACTION) -> tuple[dict[str, Any], dict[str, Any]]:
    """(index item without "image", spec) of scene i."""
    spec = sample_spec(seed, i)
    label, captions = scene_captions(spec)
    held = is_heldout(spec["colour"], spec["shape"])
    item = {"id": f"{i:06d}", "captions": captions, "label": label, "source": NAME, "style": "scene",
            "split": "test" if held else split_for(f"scenes:{seed}:{i}", val, test),
            "heldout": "combo" if held else None,
            **{k: spec[k] for k in ("colour", "shape", "texture", "count", "position")}}
    return item, spec


def prepare_scenes(cache: str | Path, count: int = 10_000, seed: int = 0, force: bool = False,
                   val: float = VAL_FRACTION, test: float = TEST_FRACTION,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Render `count` scenes into <cache>/scenes."""
    cache = Path(cache)
    params = {"count": count, "seed": seed, "size": SIZE, "val": val, "test": test, "generator": 1}
    if not force and is_built(cache / NAME, params):
        log(f"{NAME}: already prepared in {cache / NAME}")
        return read_meta(cache / NAME)
    with SourceWriter(cache, NAME, params) as writer:
        for i in tqdm(range(count), desc="scenes", unit="img"):
            item, spec = scene_item(seed, i, val, test)
            writer.add(item, render_scene(spec), f"images/{i // 1000:03d}/{i:06d}.png")
        return writer.finish(licenses=licenses_for(NAME), downloads=[],
                             description="Procedural shapes: colour x shape x texture x count x position",
                             holdout={"combos": sorted(map(list, HELDOUT_COMBOS)),
                                      "rule": "scenes with a held-out (colour, shape) are always 'test'; "
                                              "the rest split by hash of scenes:<seed>:<i>"},
                             vocabulary={"colours": list(COLOURS), "shapes": list(SHAPES), "textures": list(TEXTURES),
                                         "positions": list(POSITIONS), "counts": [1, 2, 3, 4]})


__all__ = [
    "COLOURS",
    "HELDOUT_COMBOS",
    "NAME",
    "POSITIONS",
    "SHAPES",
    "TEXTURES",
    "is_heldout",
    "prepare_scenes",
    "render_scene",
    "sample_spec",
    "scene_captions",
    "scene_item",
]
