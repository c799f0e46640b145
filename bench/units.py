"""Throughput of `fgscope units` against a plain forward loop over the same images.

    .venv/bin/python bench/units.py [--model mobilenet_v2] [--images 240] [--size 224] [--batch 32]

Writes a synthetic set (`fgscope.synthetic`, `--images` rounded up to 12 classes) and times,
in one process with the same model (random init) and device:
- plain: decode + preprocess + forward of every image, batch by batch, in inference mode;
- units: `fgscope.units(...)` on the same images and the default `stages` layers (decode,
  forward, top-K, quantile sketch, class means; no figures, no files).
Prints images/s of both side by side and their ratio. Target: units >= 0.7x plain.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import fgscope
from fgscope.device import resolve_device, tune_host_allocator
from fgscope.images import LoadedImage, iter_images
from fgscope.synthetic import generate


def _plain(lm, paths: list[str], batch: int, dev: torch.device) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(paths), batch):
            xs = [lm.preprocess(i.image) for i in iter_images(paths[start: start + batch],
                                                              resize_size=lm.preprocess.resize_size)
                  if isinstance(i, LoadedImage)]
            lm.module(torch.stack(xs).to(dev))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    tune_host_allocator()
    dev = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        ds = generate(Path(tmp) / "syn", per_class=max(1, -(-args.images // 12)), size=args.size)
        from fgscope.images import image_folder

        paths = [str(p) for p in image_folder(ds.root).paths]
        lm = fgscope.load_model(args.model, weights=None, size=args.size)
        lm.module.to(dev).eval()
        _plain(lm, paths[: args.batch], args.batch, dev)  # warm-up
        t_plain = _plain(lm, paths, args.batch, dev)
        t0 = time.perf_counter()
        fgscope.units(lm, ds.root, device=str(dev), batch_size=args.batch)
        t_units = time.perf_counter() - t0
    n = len(paths)
    print(f"{args.model}, {n} images of {args.size}px, batch {args.batch}, {dev}")
    print(f"{'plain forward loop':>20}: {n / t_plain:8.1f} images/s")
    print(f"{'fgscope.units()':>20}: {n / t_units:8.1f} images/s   ({t_plain / t_units:.2f}x plain; target >= 0.7x)")


if __name__ == "__main__":
    main()
