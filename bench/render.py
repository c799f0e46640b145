"""Benchmark: rendering + writing every activation grid of ResNet-50 vs only PNG-encoding them.

    .venv/bin/python bench/render.py [--rounds 5] [--gallery /tmp/fgscope-render]

One 224x224 image (matplotlib's sample photo) goes through torchvision's resnet50 (random
weights: rendering cost does not depend on them) under `capture(model, "all")`. Every
record with a spatial 4-D output gets one grid of its 16 most active channels (ranked before
timing: ranking is the caller's job). Two measurements, side by side, alternating per round:

- render: `render_grid(...)` + `save_png(...)` for every layer, starting with an empty label
  cache each round (as one CLI run would; fonts and colormaps stay loaded, as they do in one
  process);
- encode: `PIL.Image.fromarray(arr).save(path, format="PNG", **PNG_PARAMS)` for the same final
  pixel arrays -- the floor for writing those pictures at all.

The ratio render / encode is the cost of making the picture on top of writing it (target
<= 1.5). With `--gallery DIR` it also writes example pictures to look at: grids of a real
photo through Gabor-like filters (tile and layer normalisation, overlay), a hierarchy figure
and a geometry figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fgscope.capture import capture
from fgscope.geometry import trace_geometry
from fgscope.layers.figures import geometry_figure, hierarchy_figure
from fgscope.render import (
    PNG_PARAMS,
    render_grid,
    save_figure,
    save_png,
)
from fgscope.render import text as _text

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def sample_image(size: int = 224) -> Image.Image:
    """matplotlib's Grace Hopper photo, centre-cropped to a square and resized."""
    from matplotlib import cbook

    img = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    s = min(img.size)
    left, top = (img.width - s) // 2, (img.height - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)


def to_tensor(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return (x - MEAN) / STD


def resnet50_layers(img: Image.Image) -> list[tuple[str, np.ndarray, list[int]]]:
    """(title, (C, H, W) maps, top-16 channels) for every spatial record of resnet50."""
    from torchvision.models import resnet50

    torch.manual_seed(0)
    model = resnet50(weights=None)
    x = to_tensor(img)
    with capture(model, "all") as rec:
        model(x)
    out = []
    for r in rec.records:
        t = r.tensor
        if t.dim() != 4 or t.shape[-1] * t.shape[-2] <= 1:
            continue
        maps = t[0].float().numpy()
        top = np.argsort(-maps.mean(axis=(1, 2)), kind="stable")[:16].tolist()
        c, h, w = maps.shape
        title = f"{r.name} \u00b7 {r.module_type} \u00b7 {c}x{h}x{w} \u00b7 stride {224 // h}"
        out.append((title, maps, top))
    return out


def bench(rounds: int) -> None:
    img = sample_image()
    t0 = time.perf_counter()
    layers = resnet50_layers(img)
    print(
        f"resnet50 (weights=None), 1 image 224x224: {len(layers)} spatial records "
        f"captured in {time.perf_counter() - t0:.2f} s; PNG params {PNG_PARAMS}"
    )
    # Warm-up (imports, fonts, colormap) and the final arrays for the encode-only run.
    arrays = [np.asarray(render_grid(m, ch, title=t)) for t, m, ch in layers]
    px = sum(a.shape[0] * a.shape[1] for a in arrays)
    print(
        f"{len(arrays)} grids, {px / 1e6:.1f} Mpx in total, "
        f"e.g. {arrays[0].shape[1]}x{arrays[0].shape[0]} px for {layers[0][0].split(' ')[0]}"
    )

    render_t: list[float] = []
    encode_t: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for _ in range(rounds):
            _text._label.cache_clear()
            t0 = time.perf_counter()
            for i, (title, maps, ch) in enumerate(layers):
                save_png(render_grid(maps, ch, title=title), out / f"r{i}.png")
            render_t.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            for i, arr in enumerate(arrays):
                Image.fromarray(arr).save(out / f"e{i}.png", format="PNG", **PNG_PARAMS)
            encode_t.append(time.perf_counter() - t0)
        size = sum(p.stat().st_size for p in out.glob("r*.png"))

    r, e = statistics.median(render_t), statistics.median(encode_t)
    print(
        f"{'':24}{'median':>9}{'min':>9}   (seconds for all {len(layers)} grids, {rounds} rounds)"
    )
    print(f"{'render_grid + save_png':24}{r:9.3f}{min(render_t):9.3f}")
    print(f"{'PNG encode only':24}{e:9.3f}{min(encode_t):9.3f}")
    print(
        f"ratio render/encode: {r / e:.2f}x (median), {min(render_t) / min(encode_t):.2f}x (min); "
        f"target <= 1.5x; {size / 1e6:.1f} MB of PNG"
    )


# --- pictures to look at ---------------------------------------------------------------------


def _gabor_bank(n: int = 16, size: int = 11) -> torch.Tensor:
    """`(n, 3, size, size)` oriented Gabor filters at two scales, on luminance."""
    ys, xs = torch.meshgrid(
        torch.arange(size) - size // 2, torch.arange(size) - size // 2, indexing="ij"
    )
    ks = []
    for i in range(n):
        theta = np.pi * (i % 8) / 8
        lam, sigma = (4.0, 2.0) if i < 8 else (8.0, 3.5)
        xr = xs * np.cos(theta) + ys * np.sin(theta)
        g = torch.exp(-(xs**2 + ys**2) / (2 * sigma**2)) * torch.cos(2 * np.pi * xr / lam)
        ks.append(g - g.mean())
    k = torch.stack(ks)[:, None].float()
    return k.expand(n, 3, size, size) / 3


def gabor_maps(img: Image.Image) -> dict[str, np.ndarray]:
    """Activation-like maps of a photo: Gabor responses (ReLU) at three depths."""
    x = to_tensor(img)
    k = _gabor_bank()
    a1 = F.relu(F.conv2d(x, k, stride=2, padding=5))  # (1, 16, 112, 112): "edges"
    a2 = F.avg_pool2d(a1, 4)  # 28x28
    a2 = F.relu(
        F.conv2d(
            a2,
            torch.randn(32, 16, 3, 3, generator=torch.Generator().manual_seed(0)) / 12,
            padding=1,
        )
    )
    a3 = F.relu(
        F.conv2d(
            F.avg_pool2d(a2, 4),
            torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(1)) / 17,
            padding=1,
        )
    )
    return {"edges": a1[0].numpy(), "parts": a2[0].numpy(), "objects": a3[0].numpy() - 0.2}


def gallery(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    img = sample_image()
    maps = gabor_maps(img)
    m1, m2, m3 = maps["edges"], maps["parts"], maps["objects"]
    rank = np.argsort(-m2.mean(axis=(1, 2)))
    save_png(
        render_grid(
            m1, title="gabor \u00b7 Conv2d \u00b7 16x112x112 \u00b7 stride 2 \u00b7 rf 11 px"
        ),
        folder / "grid_tile_112.png",
    )
    save_png(
        render_grid(
            m2, rank, title="parts \u00b7 Conv2d \u00b7 32x28x28 \u00b7 stride 8 \u00b7 rf 43 px"
        ),
        folder / "grid_tile_28.png",
    )
    save_png(
        render_grid(m2, rank, normalize="layer", title="parts \u00b7 layer scale"),
        folder / "grid_layer_28.png",
    )
    save_png(
        render_grid(
            m3,
            k=5,
            columns=3,
            title="objects \u00b7 Conv2d \u00b7 64x7x7 \u00b7 stride 32 \u00b7 rf 150 px",
        ),
        folder / "grid_tile_7_k5.png",
    )
    save_png(
        render_grid(m2, rank, k=9, image=img, overlay=True, title="parts over the image"),
        folder / "grid_overlay.png",
    )
    save_png(
        render_grid(np.zeros((4, 7, 7), np.float32), k=4, title="constant maps"),
        folder / "grid_constant.png",
    )
    save_png(
        render_grid(m1 * 3000 - 1e4, k=4, tile_size=150, title="wide values, tile_size=150"),
        folder / "grid_wide_values.png",
    )

    imgs = [img, img.transpose(Image.FLIP_LEFT_RIGHT), img.rotate(90)]
    energies = []
    for name, label in (
        ("edges", "gabor\nstride 2 \u00b7 rf 11 px\nearly"),
        ("parts", "parts\nstride 8 \u00b7 rf 43 px\nmiddle"),
        ("objects", "objects\nstride 32 \u00b7 rf 150 px\nlate"),
    ):
        per = [gabor_maps(im)[name] for im in imgs]
        energies.append((label, np.stack([(p**2).mean(0) for p in per])))
    fig = hierarchy_figure(imgs, energies, col_notes=["edges", "parts", "objects"])
    save_figure(fig, folder / "hierarchy3", formats=("png", "pdf", "svg"))
    save_figure(
        hierarchy_figure(imgs[:1], [(lbl, e[:1]) for lbl, e in energies]), folder / "hierarchy1"
    )

    from torchvision.models import resnet50

    model = resnet50(weights=None)
    geo, _ = trace_geometry(model, torch.zeros(1, 3, 224, 224), "all")
    shapes = {}
    with capture(model, "all") as rec:
        model(torch.zeros(1, 3, 224, 224))
    for r in rec.records:
        shapes[r.name] = r.shape
    rows = []
    names = list(shapes)
    for i, name in enumerate(names):
        shp, g = shapes[name], geo.get(name)
        rows.append(
            {
                "index": i,
                "name": name,
                "spatial": shp[1] if len(shp) == 3 else None,
                "channels": shp[0],
                "rf": None if g is None else max(g.rf),
                "stage": "early"
                if i < len(names) // 4
                else "middle"
                if i < 3 * len(names) // 4
                else "late",
            }
        )
    save_figure(geometry_figure(rows, (224, 224)), folder / "geometry", formats=("png", "pdf"))
    print(f"gallery written to {folder}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--gallery", type=Path, default=None, help="also write example pictures here")
    ap.add_argument("--no-bench", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if not args.no_bench:
        bench(args.rounds)
    if args.gallery is not None:
        gallery(args.gallery)
    return 0


if __name__ == "__main__":
    sys.exit(main())
