"""CKA between all stage pairs for 1000 images: minibatch (Nguyen et al. 2021) vs full Gram.

    .venv/bin/python bench/cka.py [--n 1000] [--batch 32] [--device cpu|cuda]

Features: random tensors shaped like the five `stages` of MobileNetV2 at 224x224
(features.1 16x112x112, features.3 24x56x56, features.6 32x28x28, features.13 96x14x14,
features.18 1280x7x7: 382,592 numbers per image, 1.53 MB in float32). Each image has a
32-dimensional latent; layer l is a fixed random linear map of latent dimensions
4l .. 4l+15 plus unit noise, so neighbouring layers share most of what they encode and
distant ones nothing (CKA falls off with distance, as across a real network's depth).
Features are generated batch by batch from per-image seeds, so both methods see identical
data; generation is not timed.

Each method runs in its own subprocess, measured from the same starting point:
- time: the CKA work only (Grams, centring, accumulation; for `full` also copying the
  features into the (n, p) buffers it keeps);
- peak memory: on CUDA `torch.cuda.max_memory_allocated`; on the CPU the process's peak
  resident set (`ru_maxrss`) minus the resident set just before the work starts (after
  imports and the fixed random maps): it includes the allocator's slack and the generated
  batch, so it is an upper bound of what the method itself holds;
- the bytes the method must hold by construction (features kept + Grams), computed.
The script uses fgscope's own code (`fgscope.similarity.run.centered_gram` and
`CkaAccumulator`), i.e. exactly what `fgscope similarity` runs.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from fgscope.device import tune_host_allocator
from fgscope.similarity import CkaAccumulator, centered_gram
from fgscope.similarity import cka as similarity_cka

STAGES = {
    "features.1": (16, 112, 112),
    "features.3": (24, 56, 56),
    "features.6": (32, 28, 28),
    "features.13": (96, 14, 14),
    "features.18": (1280, 7, 7),
}
LATENT = 32
WINDOW = 16  # latent dimensions each layer reads; layer l starts at 4 l


def _maps(device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    maps = []
    for i, (c, h, w) in enumerate(STAGES.values()):
        m = torch.zeros(LATENT, c * h * w)
        m[4 * i : 4 * i + WINDOW] = torch.randn(WINDOW, c * h * w, generator=g) / WINDOW**0.5
        maps.append(m.to(device))
    return maps


def _batch(idx: range, maps: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Features of images idx: per layer (b, C, H, W) float32, the same for any batching
    (each image's latent and noise come from its own seed)."""
    gens = [torch.Generator(device=device).manual_seed(i + 1) for i in idx]
    z = torch.stack([torch.randn(LATENT, generator=g, device=device) for g in gens])
    out = []
    for (c, h, w), m in zip(STAGES.values(), maps):
        f = z @ m
        noise = torch.stack([torch.randn(c * h * w, generator=g, device=device) for g in gens])
        out.append((f + noise).reshape(len(idx), c, h, w))
    return out


def _gram_work(b: int) -> int:
    """Bytes of the float64 column chunk in `centered_gram`."""
    p_max = max(c * h * w for c, h, w in STAGES.values())
    return b * min(p_max, max(1, similarity_cka._GRAM_CHUNK_BYTES // (8 * b))) * 8


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(method: str, n: int, batch: int, device: str) -> dict:
    tune_host_allocator()
    dev = torch.device(device)
    maps = _maps(dev)
    _batch(range(0, 4), maps, dev)  # warm-up (allocator, kernels)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    base = _rss_mb()
    p_total = sum(c * h * w for c, h, w in STAGES.values())
    n_layers = len(STAGES)
    elapsed = 0.0
    if method == "minibatch":
        n_b = n // batch
        bounds = [round(i * n / n_b) for i in range(n_b + 1)]  # even batches, as the command
        acc = CkaAccumulator(n_layers)
        for a, b in zip(bounds[:-1], bounds[1:]):
            feats = _batch(range(a, b), maps, dev)
            t0 = time.perf_counter()
            acc.update([centered_gram(f) for f in feats])
            if dev.type == "cuda":
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - t0
            del feats
        b_max = max(bb - aa for aa, bb in zip(bounds[:-1], bounds[1:]))
        # one batch of features, the float64 working set of centered_gram, the Grams
        held = b_max * p_total * 4 + _gram_work(b_max) + n_layers * b_max**2 * 8 * 3
    else:
        kept = [torch.empty(n, c * h * w, device=dev) for c, h, w in STAGES.values()]
        for a in range(0, n, batch):
            feats = _batch(range(a, min(a + batch, n)), maps, dev)
            t0 = time.perf_counter()
            for store, f in zip(kept, feats):
                store[a : a + len(f)] = f.reshape(len(f), -1)
            elapsed += time.perf_counter() - t0
            del feats
        t0 = time.perf_counter()
        grams = [centered_gram(x) for x in kept]
        del kept
        acc = CkaAccumulator(n_layers)
        acc.update(grams)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - t0
        # every image's features, the Gram working set, the n x n Grams (kept, biased- and
        # U-centred)
        held = n * p_total * 4 + _gram_work(n) + n_layers * n * n * 8 * 3
    cka, cka_u = acc.compute()
    out = {
        "method": method, "n": n, "batch": batch, "device": device, "seconds": elapsed,
        "held_mb": held / 2**20, "rss_base_mb": base, "rss_peak_mb": _rss_mb(),
        "cka": cka.tolist(), "cka_debiased": cka_u.tolist(),
    }
    if dev.type == "cuda":
        out["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="images")
    ap.add_argument("--batch", type=int, default=32, help="minibatch size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worker", choices=("minibatch", "full"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.n, args.batch, args.device)))
        return
    res = {}
    for method in ("minibatch", "full"):
        cmd = [sys.executable, __file__, "--worker", method, "--n", str(args.n),
               "--batch", str(args.batch), "--device", args.device]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{method} failed:\n{done.stderr}")
        res[method] = json.loads(done.stdout.strip().splitlines()[-1])
    mb, fu = res["minibatch"], res["full"]
    p_total = sum(c * h * w for c, h, w in STAGES.values())
    print(f"CKA between the {len(STAGES)} MobileNetV2@224 stage shapes ({p_total:,} features "
          f"per image), {args.n} images, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'':34}{'minibatch (b=' + str(args.batch) + ')':>20}{'full Gram':>14}{'ratio':>9}")

    def row(label: str, a: float, b: float, fmt: str = "{:.1f}") -> None:
        print(f"{label:34}{fmt.format(a):>20}{fmt.format(b):>14}{b / a if a else float('nan'):>8.1f}x")

    row("time, CKA work (s)", mb["seconds"], fu["seconds"], "{:.2f}")
    row("held by construction (MB)", mb["held_mb"], fu["held_mb"])
    row("peak RSS increase (MB)", mb["rss_peak_mb"] - mb["rss_base_mb"], fu["rss_peak_mb"] - fu["rss_base_mb"])
    if "cuda_peak_mb" in mb:
        row("peak CUDA memory (MB)", mb["cuda_peak_mb"], fu["cuda_peak_mb"])
    k = len(STAGES)
    off = [(i, j) for i in range(k) for j in range(k) if i < j]
    du = max(abs(mb["cka_debiased"][i][j] - fu["cka_debiased"][i][j]) for i, j in off)
    db = max(abs(mb["cka"][i][j] - fu["cka"][i][j]) for i, j in off)
    print(f"max |minibatch - full| over the {len(off)} stage pairs: debiased {du:.4f}, biased {db:.4f}")
    names = list(STAGES)
    print("debiased CKA, full (upper) / minibatch (lower triangle):")
    for i in range(k):
        cells = [
            f"{(fu if j > i else mb)['cka_debiased'][i][j]:6.3f}" if j != i else "   -  "
            for j in range(k)
        ]
        print(f"  {names[i]:<12}" + " ".join(cells))


if __name__ == "__main__":
    main()
