"""`fgscope dump` throughput against a plain DataLoader + forward loop, side by side.

    .venv/bin/python bench/dump.py [--images 200] [--batch 16] [--workers 1] [--repeat 2]
                                   [--threads N]

Writes N random 224x224 JPEGs into a temporary folder, then per model (torchvision, random
init) measures images/s of:
- the limit: a plain loop over the same images: the same DataLoader (same decoding, workers,
  batches) and a forward under `torch.inference_mode()`, nothing kept;
- `fgscope dump --layers stages --pool avg` (float32) and `--pool none --dtype float16`
  (raw maps), in this process, loop time (as the limit: first batch requested to last
  shard on disk); the whole call (model loading, layer planning, index) is shown too;
- TorchLens `extract_dataset` (stages, spatial_mean, safetensors shards) in its own process
  (it patches torch for the rest of the process), against a plain loop decoding in the main
  process as TorchLens does (it takes an iterable, no worker processes).
Then scale-out: `torchrun --nproc-per-node=2` (one thread per rank) against one process with
one thread, on the same images, both as `fgscope dump` subprocesses; throughput is images
divided by the time from the first rank's first batch to the last rank's last shard
(from the parts' manifests), so process start-up (importing torch) is left out and shown
separately. Variants are interleaved and the best of `--repeat` runs is kept. On a machine
with few cores, `--threads 1 --workers 1` keeps decoding and compute from oversubscribing
the cores (which makes both sides swing widely from run to run).
Targets: dump >= 0.85x the plain loop; 2 ranks >= 1.7x 1 rank.
thingsvision is not measured: `pip install --dry-run thingsvision` wants torch 2.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from fgscope.data import ImageDataset, make_loader, resolve_inputs, shard_batches
from fgscope.device import tune_host_allocator
from fgscope.dump.run import DumpConfig, run_dump
from fgscope.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path, n: int, size: int = 224) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        noise = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        img = Image.fromarray(noise).filter(ImageFilter.GaussianBlur(2))
        img.save(folder / f"img{i:05d}.jpg", quality=90)


def _model(arch: str):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_model(arch, weights=None)


def plain_loop(arch: str, folder: Path, batch: int, workers: int) -> float:
    """images/s of DataLoader + forward, nothing recorded or kept."""
    lm = _model(arch)
    inputs = resolve_inputs([folder])
    loader = make_loader(ImageDataset(inputs.paths, lm.preprocess),
                         shard_batches([(0, len(inputs))], batch), workers=workers)
    t0 = time.perf_counter()
    n = 0
    with torch.inference_mode():
        for b in loader:
            lm.module(b.images)
            n += len(b)
    return n / (time.perf_counter() - t0)


def dump_once(arch: str, folder: Path, out: Path, batch: int, workers: int, pool: str,
              dtype: str) -> tuple[float, float, int]:
    """(loop images/s, whole-call images/s, bytes written) of one `run_dump`."""
    shutil.rmtree(out, ignore_errors=True)
    config = DumpConfig(model=arch, inputs=(str(folder),), layers="stages", pool=pool,
                        dtype=dtype, out=out, batch_size=batch, workers=workers, device="cpu",
                        model_kwargs={"weights": None})
    t0 = time.perf_counter()
    _, result = run_dump(config)
    whole = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return result.images_per_s, result.images / whole, result.bytes_written


def bench_model(arch: str, folder: Path, tmp: Path, args: argparse.Namespace) -> None:
    best = {"plain": 0.0, "avg": (0.0, 0.0, 0), "raw": (0.0, 0.0, 0)}
    for _ in range(args.repeat):
        best["plain"] = max(best["plain"], plain_loop(arch, folder, args.batch, args.workers))
        for key, pool, dtype in (("avg", "avg", "float32"), ("raw", "none", "float16")):
            got = dump_once(arch, folder, tmp / f"d-{key}", args.batch, args.workers, pool, dtype)
            best[key] = max(best[key], got)
    p = best["plain"]
    line = f"{arch:<13} plain loop {p:6.1f} img/s"
    for key, label in (("avg", "dump stages avg f32"), ("raw", "dump stages raw f16")):
        loop, whole, size = best[key]
        line += (f" | {label} {loop:6.1f} img/s = {loop / p:4.2f}x"
                 f" (whole call {whole / p:4.2f}x, {size / 1e6:.1f} MB)")
    print(line, flush=True)


def bench_torchlens(arch: str, folder: Path, tmp: Path, batch: int) -> None:
    """In its own process: TorchLens extract_dataset against a plain loop, both decoding here."""
    try:
        import torchlens as tl
    except ImportError:
        print(f"{arch:<13} TorchLens: not installed")
        return
    from fgscope.selection import select_layers

    plain = plain_loop(arch, folder, batch, workers=0)
    lm = _model(arch)
    stages = list(select_layers(lm.module, "stages", torch.zeros(1, 3, *lm.input_size)))
    inputs = resolve_inputs([folder])
    ds = ImageDataset(inputs.paths, lm.preprocess)
    out = tmp / "torchlens"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    tl.extract_dataset(lm.module, (ds[i].image for i in range(len(ds))), stages,
                       batch_size=batch, output_dir=out, progress=False, pool="spatial_mean")
    rate = len(ds) / (time.perf_counter() - t0)
    print(f"{arch:<13} plain loop, decoding in-process {plain:6.1f} img/s | TorchLens "
          f"{getattr(tl, '__version__', '')} extract_dataset stages spatial_mean "
          f"{rate:6.1f} img/s = {rate / plain:4.2f}x", flush=True)


def _scaleout_once(arch: str, folder: Path, out: Path, ranks: int, batch: int) -> tuple[float, float]:
    """(images/s over the ranks' loops, wall seconds of the whole command)."""
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    args = ["dump", arch, str(folder), "--weights", "none", "--layers", "stages", "--pool", "avg",
            "--workers", "0", "--batch-size", str(batch), "--out", str(out)]
    if ranks == 1:
        cmd = [sys.executable, "-m", "fgscope", *args]
    else:
        torchrun = Path(sys.executable).with_name("torchrun")
        cmd = [str(torchrun), "--standalone", f"--nproc-per-node={ranks}", "-m", "fgscope", *args]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    manifests = [json.loads(p.read_text()) for p in sorted(out.glob("parts/*/manifest.json"))]
    start = min(m["loop_wall"][0] for m in manifests)
    end = max(m["loop_wall"][1] for m in manifests)
    images = sum(m["images"] for m in manifests)
    shutil.rmtree(out, ignore_errors=True)
    return images / (end - start), wall


def bench_scaleout(arch: str, folder: Path, tmp: Path, args: argparse.Namespace) -> None:
    one = two = (0.0, 0.0)
    for _ in range(args.repeat):
        one = max(one, _scaleout_once(arch, folder, tmp / "s1", 1, args.batch))
        two = max(two, _scaleout_once(arch, folder, tmp / "s2", 2, args.batch))
    print(f"{arch:<13} 1 rank x 1 thread {one[0]:6.1f} img/s | torchrun 2 ranks x 1 thread "
          f"{two[0]:6.1f} img/s = {two[0] / one[0]:4.2f}x (whole commands incl. start-up: "
          f"{one[1]:.1f} s vs {two[1]:.1f} s)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--models", nargs="*", default=["mobilenet_v2", "resnet18"])
    parser.add_argument("--threads", type=int, help="torch threads for the in-process part")
    parser.add_argument("--scaleout-model", default="resnet18")
    parser.add_argument("--torchlens-only", nargs=3, metavar=("ARCH", "IMAGES", "TMP"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    tuned = tune_host_allocator()  # the CLI does this too
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.torchlens_only:
        arch, folder, tmp = args.torchlens_only
        bench_torchlens(arch, Path(folder), Path(tmp), args.batch)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{args.images} JPEGs 224x224, batch {args.batch}, {args.workers} decoding worker(s), "
          f"host allocator tuned: {tuned}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fgscope-bench-dump-") as tmp_name:
        tmp = Path(tmp_name)
        folder = tmp / "images"
        make_images(folder, args.images)
        for arch in args.models:
            bench_model(arch, folder, tmp, args)
        for arch in args.models:
            subprocess.run([sys.executable, __file__, "--torchlens-only", arch, str(folder), str(tmp),
                            "--batch", str(args.batch), "--threads", str(torch.get_num_threads())],
                           check=True)
        bench_scaleout(args.scaleout_model, folder, tmp, args)


if __name__ == "__main__":
    main()
