"""A synthetic fine-grained data set where what each layer should be able to tell is known.

Every image shows one large shape (the COARSE label: circle, square or triangle) on a
noisy, coloured background, with one small textured spot on it. The FINE label is the
coarse label plus the spot: its texture (stripes or dots) and its position relative to the
shape (top-left or bottom-right of the shape's centre). That makes 3 coarse x 4 part
variants = 12 fine classes, named `<shape>-<texture>-<position>`, e.g.
`circle-stripes-topleft`, in the ImageFolder layout:

    OUT_DIR/<fine class>/<fine class>_<NNNN>.png
    OUT_DIR/coarse_map.json      {"circle-dots-bottomright": "circle", ...}
    OUT_DIR/synthetic.json       generator, parameters and what each factor needs
    OUT_DIR-masks/<fine class>/<fine class>_<NNNN>.png   part masks: 0 background, 1 shape, 2 spot
    OUT_DIR-masks/legend.json    {"1": "shape", "2": "spot"}

The masks sit in a folder beside OUT_DIR (inside it, `masks/` would be read as a 13th class);
`fgscope units MODEL OUT_DIR --masks OUT_DIR-masks` scores every unit against them. A mask
pixel is the shape (or the spot, drawn on top of it) where at least half of the pixel's
supersampled area is covered.

What telling each factor apart needs, by construction:
- shape: the outline's form; colour, position, scale and a small rotation are random, so
  colour and place give nothing away. (Measured: pooled statistics of local edges and corners
  already separate the three shapes, so shape does not need a large receptive field; see
  docs/finegrained.md.)
- spot texture: a small receptive field at high resolution (stripes vs dots of a few
  pixels' period inside a spot about 1/25 of the image's area); the two textures use the
  same two colours in similar proportions, so mean colour does not give it away.
- spot position: the spot *and* the part of the shape around it in one receptive field
  (where the spot sits relative to the outline), or features that keep spatial layout;
  global average pooling of small-field features cannot tell it.

Run `python -m fgscope.synthetic OUT_DIR [--per-class N] [--size S] [--seed 0]`. The same
seed gives the same pixels: each image is drawn from its own generator seeded with
(seed, class index, image index), so a larger `--per-class` only adds images.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fgscope.errors import ConfigError, OutputError
from fgscope.runs import atomic_write_bytes, write_json

__all__ = [
    "SHAPES",
    "TEXTURES",
    "POSITIONS",
    "SyntheticSet",
    "fine_classes",
    "coarse_map",
    "render_example",
    "render_with_mask",
    "masks_dir",
    "MASK_LEGEND",
    "generate",
]

SHAPES = ("circle", "square", "triangle")
TEXTURES = ("stripes", "dots")
POSITIONS = ("topleft", "bottomright")

MASK_LEGEND = {"1": "shape", "2": "spot"}
_SS = 2  # supersampling factor: drawn at 2x, reduced with a box filter (anti-aliasing)
_MIN_SIZE = 32


@dataclass(frozen=True)
class SyntheticSet:
    """What `generate` wrote.

    Attributes:
        root: the ImageFolder root.
        classes: fine class names, sorted (as `fgscope.images.image_folder` reads them).
        coarse_map: fine class -> coarse class (the shape).
        n_images: images written.
        coarse_map_path: path of `coarse_map.json`.
    """

    root: Path
    classes: tuple[str, ...]
    coarse_map: dict[str, str]
    n_images: int
    coarse_map_path: Path


def fine_classes() -> list[str]:
    """The 12 fine class names, sorted: `<shape>-<texture>-<position>`."""
    return sorted(f"{s}-{t}-{p}" for s in SHAPES for t in TEXTURES for p in POSITIONS)


def coarse_map() -> dict[str, str]:
    """Fine class -> coarse class (its shape)."""
    return {name: name.split("-")[0] for name in fine_classes()}


def _contrasting(rng: np.random.Generator, other: np.ndarray, min_dist: float = 110.0) -> np.ndarray:
    """A random RGB colour at least `min_dist` away from `other` (Euclidean, 0..255)."""
    for _ in range(100):
        c = rng.uniform(0, 255, 3)
        if np.linalg.norm(c - other) >= min_dist:
            return c
    return 255.0 - other  # the complement is always far enough from mid-range colours


def _background(rng: np.random.Generator, side: int) -> tuple[np.ndarray, np.ndarray]:
    """(side, side, 3) float background: a base colour, smooth blotches and pixel noise."""
    base = rng.uniform(40, 215, 3)
    coarse = rng.normal(0.0, 18.0, (6, 6, 3))  # low-frequency variation, upsampled
    blot = np.stack(
        [np.asarray(Image.fromarray(coarse[..., c].astype(np.float32), "F").resize(
            (side, side), Image.Resampling.BICUBIC)) for c in range(3)], axis=-1
    )
    noise = rng.normal(0.0, 10.0, (side, side, 3))
    return base + blot + noise, base


def _shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]] | None:
    """Vertices of a square or triangle whose inscribed circle has radius about `r`.

    Square: half-side 0.9 r. Triangle (apex up): circumradius 1.6 r, so its inscribed
    circle (0.8 r) holds the spot wherever it goes. None for a circle.
    """
    if shape == "circle":
        return None
    if shape == "square":
        rad, n, start = 0.9 * r * math.sqrt(2), 4, math.pi / 4
    else:
        rad, n, start = 1.6 * r, 3, -math.pi / 2
    return [
        (cx + rad * math.cos(start + angle + 2 * math.pi * k / n),
         cy + rad * math.sin(start + angle + 2 * math.pi * k / n))
        for k in range(n)
    ]


def _texture(texture: str, side: int, period: float, angle: float, phase: tuple[float, float],
             dark: np.ndarray, light: np.ndarray) -> np.ndarray:
    """(side, side, 3) texture: stripes (50% dark) or a grid of dark dots (~42% dark)."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float64)
    u = xx * math.cos(angle) + yy * math.sin(angle) + phase[0]
    v = -xx * math.sin(angle) + yy * math.cos(angle) + phase[1]
    if texture == "stripes":
        is_dark = np.mod(u, period) < period / 2
    else:
        du = np.mod(u, period) - period / 2
        dv = np.mod(v, period) - period / 2
        is_dark = du**2 + dv**2 < (0.365 * period) ** 2  # pi 0.365^2 ~ 0.42 of the area
    return np.where(is_dark[..., None], dark, light)


def render_example(
    shape: str, texture: str, position: str, size: int, rng: np.random.Generator
) -> Image.Image:
    """Draw one image: `render_with_mask` without the mask (same pixels for the same rng)."""
    return render_with_mask(shape, texture, position, size, rng)[0]


def render_with_mask(
    shape: str, texture: str, position: str, size: int, rng: np.random.Generator
) -> tuple[Image.Image, np.ndarray]:
    """Draw one image and its part mask ((size, size) uint8: 0 background, 1 shape, 2 spot): `shape` (coarse) with a `texture` spot at `position` (fine).

    Args:
        shape: one of `SHAPES`.
        texture: one of `TEXTURES`.
        position: one of `POSITIONS`, relative to the shape's centre.
        size: side of the square RGB image in pixels (>= 32).
        rng: the source of every random choice (colours, placement, scale, noise).

    Returns:
        A `size` x `size` RGB image, and its mask (values as in `MASK_LEGEND`).

    Raises:
        ConfigError: an unknown shape, texture or position, or a size below 32.
    """
    for value, allowed, what in ((shape, SHAPES, "shape"), (texture, TEXTURES, "texture"),
                                 (position, POSITIONS, "position")):
        if value not in allowed:
            raise ConfigError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    if size < _MIN_SIZE:
        raise ConfigError(f"--size must be at least {_MIN_SIZE} px, got {size}")
    side = size * _SS
    bg, base = _background(rng, side)
    fill = _contrasting(rng, base)

    r = rng.uniform(0.24, 0.30) * side  # inscribed radius of the shape
    angle = math.radians(rng.uniform(-10, 10))
    # Place the shape anywhere it fits entirely (its own bounding box, 2 px margin).
    rel = _shape_polygon(shape, 0.0, 0.0, r, angle) or [(-r, -r), (r, r)]
    x0, x1 = min(p[0] for p in rel), max(p[0] for p in rel)
    y0, y1 = min(p[1] for p in rel), max(p[1] for p in rel)
    cx = rng.uniform(2 - x0, side - 2 - x1)
    cy = rng.uniform(2 - y0, side - 2 - y1)

    mask_img = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask_img)
    poly = _shape_polygon(shape, cx, cy, r, angle)
    if poly is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(poly, fill=255)
    shape_mask = np.asarray(mask_img, dtype=np.float64)[..., None] / 255.0
    shading = rng.normal(0.0, 6.0, (side, side, 3))  # the shape is not perfectly flat either
    img = bg * (1 - shape_mask) + (fill + shading) * shape_mask

    # The spot: about a fifth of the shape's radius, 0.35 r from its centre along each axis,
    # so it stays inside every shape's inscribed circle (0.5 r + 0.22 r < 0.8 r).
    sign = -1.0 if position == "topleft" else 1.0
    sr = r * rng.uniform(0.19, 0.22)
    sx = cx + sign * 0.35 * r + rng.uniform(-0.03, 0.03) * r
    sy = cy + sign * 0.35 * r + rng.uniform(-0.03, 0.03) * r
    dark = rng.uniform(0, 50, 3)
    light = rng.uniform(205, 255, 3)
    period = max(3.0 * _SS, 0.028 * side) * rng.uniform(0.9, 1.1)
    tex = _texture(texture, side, period, rng.uniform(0, math.pi),
                   (rng.uniform(0, period), rng.uniform(0, period)), dark, light)
    spot_img = Image.new("L", (side, side), 0)
    ImageDraw.Draw(spot_img).ellipse((sx - sr, sy - sr, sx + sr, sy + sr), fill=255)
    spot_mask = np.asarray(spot_img, dtype=np.float64)[..., None] / 255.0
    img = img * (1 - spot_mask) + tex * spot_mask

    out = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    mask = np.zeros((size, size), np.uint8)
    for value, m in ((1, shape_mask), (2, spot_mask)):
        cover = m[..., 0].reshape(size, _SS, size, _SS).mean((1, 3))  # the BOX reduction
        mask[cover >= 0.5] = value
    return out.resize((size, size), Image.Resampling.BOX), mask


def masks_dir(root: str | Path) -> Path:
    """Where `generate` writes the masks of the set at `root`: the folder `<root>-masks` beside it."""
    root = Path(root)
    return root.parent / f"{root.name}-masks"


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def generate(
    out_dir: str | Path,
    *,
    per_class: int = 40,
    size: int = 224,
    seed: int = 0,
    overwrite: bool = False,
    on_image: Callable[[], None] | None = None,
) -> SyntheticSet:
    """Write the data set (ImageFolder layout, PNG) plus `coarse_map.json`, `synthetic.json`
    and the part masks with their legend in `masks_dir(out_dir)`.

    Args:
        out_dir: the folder to write; it must be empty or missing unless `overwrite`.
        per_class: images per fine class (12 fine classes).
        size: image side in pixels.
        seed: the same seed gives the same images.
        overwrite: write into a non-empty folder (files with the same names are replaced).
        on_image: optional callable, called once after each image is written (progress).

    Raises:
        ConfigError: per_class < 1 or size < 32.
        OutputError: `out_dir` or its masks folder holds files and `overwrite` is False, or
            cannot be written.
    """
    if per_class < 1:
        raise ConfigError(f"--per-class must be at least 1, got {per_class}")
    if size < _MIN_SIZE:
        raise ConfigError(f"--size must be at least {_MIN_SIZE} px, got {size}")
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise OutputError(f"{root} exists and is not a folder", hint="choose another OUT_DIR")
    if root.is_dir() and any(root.iterdir()) and not overwrite:
        raise OutputError(f"{root} is not empty", hint="choose an empty OUT_DIR or pass --overwrite")
    mdir = masks_dir(root)
    if mdir.is_dir() and any(mdir.iterdir()) and not overwrite:
        raise OutputError(f"the masks folder {mdir} is not empty", hint="choose another OUT_DIR or pass --overwrite")
    classes = fine_classes()
    n = 0
    for ci, name in enumerate(classes):
        shape, texture, position = name.split("-")
        for i in range(per_class):
            rng = np.random.default_rng([seed, ci, i])
            img, mask = render_with_mask(shape, texture, position, size, rng)
            atomic_write_bytes(root / name / f"{name}_{i:04d}.png", _png_bytes(img))
            atomic_write_bytes(mdir / name / f"{name}_{i:04d}.png", _png_bytes(Image.fromarray(mask, "L")))
            n += 1
            if on_image is not None:
                on_image()
    cmap = coarse_map()
    write_json(mdir / "legend.json", MASK_LEGEND)
    write_json(root / "coarse_map.json", cmap)
    write_json(root / "synthetic.json", {
        "generator": "fgscope.synthetic",
        "seed": seed, "size": size, "per_class": per_class, "n_images": n,
        "classes": classes, "coarse_classes": list(SHAPES),
        "masks": str(mdir), "mask_legend": MASK_LEGEND,
        "factors": {
            "shape (coarse)": "outline form; local edge and corner statistics already tell it",
            "texture (fine)": "stripes vs dots inside a small spot; needs small, high-resolution units",
            "position (fine)": "spot top-left vs bottom-right of the shape's centre; needs the spot "
                               "and the surrounding outline in one receptive field, or spatial layout",
        },
    })
    return SyntheticSet(root, tuple(classes), cmap, n, root / "coarse_map.json")


if __name__ == "__main__":  # `python -m fgscope.synthetic OUT`: the `fgscope synthetic` command
    import sys

    from fgscope.cli import app

    app(["synthetic", *sys.argv[1:]], prog_name="python -m fgscope.synthetic")
