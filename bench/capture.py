"""Capture overhead: plain forward vs fgscope capture of every layer call, side by side.

    .venv/bin/python bench/capture.py [--repeat 10] [--batch 8]

Prints, per model (random init, batch 8, 224x224, inference mode, CPU): the median time of
a plain forward, of the same forward inside `fgscope.capture(model, "all")` keeping every
record on the CPU, and of TorchLens `log_forward_pass` when torchlens is installed; then
the start-up time of `fgscope --help` against `python -c "import torch, torchvision"`.
Both sides run in one process with the same allocator settings (`tune_host_allocator`,
which the CLI applies too).
Targets: capture <= 1.10x the plain forward; `--help` <= 0.1x the torch import.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torchvision

from fgscope.capture import capture
from fgscope.device import tune_host_allocator

ROOT = Path(__file__).resolve().parents[1]


def _median(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(arch: str, batch: int, repeat: int) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    x = torch.randn(batch, 3, 224, 224)

    def plain():
        with torch.inference_mode():
            model(x)

    n_records = 0

    def streamed():
        with capture(model, "all", on_record=lambda rec: None):
            model(x)

    def captured():
        nonlocal n_records
        with capture(model, "all", to="cpu") as rec:
            model(x)
        n_records = len(rec.records)

    # Interleave the variants so that drifts in machine load hit all alike.
    t_plain, t_cap, t_stream = [], [], []
    for _ in range(3):
        t_plain.append(_median(plain, max(repeat // 3, 1)))
        t_cap.append(_median(captured, max(repeat // 3, 1)))
        t_stream.append(_median(streamed, max(repeat // 3, 1)))
    tp, tc, ts = min(t_plain), min(t_cap), min(t_stream)
    line = (
        f"{arch:<13} plain {tp * 1e3:7.1f} ms | capture all, kept on CPU ({n_records} records) "
        f"{tc * 1e3:7.1f} ms = {tc / tp:4.2f}x | streamed to a callback {ts * 1e3:7.1f} ms "
        f"= {ts / tp:4.2f}x"
    )
    print(line, flush=True)


def bench_torchlens(arch: str, batch: int, repeat: int) -> None:
    """TorchLens wraps torch functions for the rest of the process, so it runs in its own
    process, with its own plain-forward baseline measured before it is first used."""
    try:
        import torchlens as tl  # optional peer: `pip install torchlens`
    except ImportError:
        print(f"{arch:<13} TorchLens: not installed")
        return
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None).eval()
    x = torch.randn(batch, 3, 224, 224)

    def plain():
        with torch.inference_mode():
            model(x)

    tp = _median(plain, repeat)
    tt = _median(lambda: tl.trace(model, x), max(repeat // 3, 2))
    version = getattr(tl, "__version__", "")
    print(
        f"{arch:<13} plain {tp * 1e3:7.1f} ms | TorchLens {version} trace (save all) "
        f"{tt * 1e3:7.1f} ms = {tt / tp:4.2f}x",
        flush=True,
    )


def bench_startup(repeat: int = 5) -> None:
    def run(cmd: list[str]) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t_help = run([sys.executable, "-m", "fgscope", "--help"])
    t_torch = run([sys.executable, "-c", "import torch, torchvision"])
    print(
        f"start-up       fgscope --help {t_help * 1e3:7.0f} ms | import torch, torchvision "
        f"{t_torch * 1e3:7.0f} ms = {t_help / t_torch:5.3f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--models", nargs="*", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--torchlens-only", metavar="ARCH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # The CLI does this at start-up; it speeds up both sides (see fgscope.device).
    tuned = tune_host_allocator()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"224x224, host allocator tuned: {tuned}"
    )
    if args.torchlens_only:
        bench_torchlens(args.torchlens_only, args.batch, args.repeat)
        return
    for arch in args.models:
        bench_model(arch, args.batch, args.repeat)
    for arch in args.models:
        subprocess.run(
            [sys.executable, __file__, "--torchlens-only", arch, "--batch", str(args.batch),
             "--repeat", str(args.repeat)],
            check=True,
        )
    bench_startup()


if __name__ == "__main__":
    main()
