"""Dataset scale: memory and speed of `fgscope layers` over 10x more images, and the API's
`fgscope.capture` against a plain forward, side by side in one run.

    .venv/bin/python bench/scale.py [--images 200] [--big 2000] [--reps 3]
    .venv/bin/python bench/scale.py --images 20 --big 40 --reps 1 --capture-reps 1 --capture-rounds 1   # smoke

Prints:
1. `fgscope layers MODEL DIR --weights none --no-grids` (a subprocess each, as a user runs it)
   over `--images` and over `--big` random JPEGs of `--size` px: peak RSS of each and their
   ratio. The ratio is taken on anonymous memory (RssAnon, sampled every 10 ms: the data);
   beside it all RSS, of the run (`peak_rss_mb` in its manifest, taken when its files are
   written) and of the whole process (`ru_maxrss`, with the interpreter's exit). All RSS adds
   the pages of torch's shared libraries that the process touched, 430-550 MB of a CUDA
   build, a different amount each run (100-400 MB more at the exit) and none of it set by the
   images: two identical runs over 2000 images peaked at 1326 and 1547 MB. Throughput in
   images/s of the whole command and against a plain loop over the same images on the same
   model (a fresh process: fgscope's preprocessing, a torch DataLoader with the same batch
   size and no workers, a forward under `inference_mode` that keeps nothing), counted over
   the same images.
2. `fgscope.capture(model, "all")` keeping every record on the CPU against a plain forward, in
   a fresh process that never imports the CLI (so only what the API does itself applies, e.g.
   its allocator tuning), per model (random init, batch 8, 224 px, CPU); between them the
   floor of keeping every output at all: bare forward hooks that only hold references, on a
   copy whose in-place modules write out of place (so the kept values are exact), no fgscope.
   What capture costs above the floor is fgscope's; the floor itself is the memory traffic of
   keeping every output (MobileNetV2 at batch 8: 141 outputs, 623 MB, written to fresh memory
   instead of the few cache-hot buffers a plain forward reuses).

Targets (issue 14): RSS(big) <= 1.2x RSS(small); layers >= 0.8x the plain loop; capture <=
1.3x on MobileNetV2 and <= 1.15x on ResNet-50.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FGSCOPE = [sys.executable, "-m", "fgscope"]


def make_images(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """`n` random-noise JPEGs of size x size (noise: no decoder shortcut on flat images)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        path = folder / f"img_{i:05d}.jpg"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
    return folder


def _rss_child(cmd: list[str]) -> tuple[float, float, str, float]:
    """(wall seconds, peak RSS in MB, stdout, peak anonymous RSS in MB) of `cmd`, measured by a
    tiny wrapper process that waits for it (`wait4`: the rusage is that one command's, not the
    max over this process's children) and reads its RssAnon every 10 ms."""
    wrapper = (
        "import os, subprocess, sys, time, json, threading, tempfile\n"
        "t0 = time.perf_counter()\n"
        "fo, fe = tempfile.TemporaryFile(), tempfile.TemporaryFile()\n"
        "p = subprocess.Popen(sys.argv[1:], stdout=fo, stderr=fe)\n"
        "anon = [0]\n"
        "def poll():\n"  # the peak of anonymous memory (the data, not shared library pages)
        "    while True:\n"
        "        try:\n"
        "            st = open(f'/proc/{p.pid}/status').read()\n"
        "            anon[0] = max(anon[0], int(st.split('RssAnon:')[1].split()[0]))\n"
        "        except (OSError, IndexError, ValueError):\n"
        "            return\n"
        "        time.sleep(0.01)\n"
        "threading.Thread(target=poll, daemon=True).start()\n"
        "_, status, ru = os.wait4(p.pid, 0)\n"
        "fo.seek(0); fe.seek(0); out, err = fo.read(), fe.read()\n"
        "code = os.waitstatus_to_exitcode(status)\n"
        "print(json.dumps({'wall': time.perf_counter() - t0, 'rss_kb': ru.ru_maxrss, 'anon_kb': anon[0],"
        " 'code': code, 'out': out.decode()[-4000:], 'err': err.decode()[-2000:]}))\n"
    )
    res = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, cwd=ROOT, check=True)
    doc = json.loads(res.stdout)
    if doc["code"] != 0:
        raise SystemExit(f"failed ({doc['code']}): {' '.join(cmd)}\n{doc['err']}")
    return doc["wall"], doc["rss_kb"] / 1024, doc["out"], doc["anon_kb"] / 1024


def layers_run(model: str, folder: Path, out: Path, batch: int, threads: int) -> tuple[float, ...]:
    """(wall seconds, peak anonymous RSS MB, seconds of its `inspect` phase, peak RSS MB of the
    run, peak RSS MB of the whole process) of one `fgscope layers --no-grids` run; the run's
    peak is the manifest's `peak_rss_mb` and the phase (decoding, forwards, statistics) its
    `timings_s.inspect` (NaN when the manifest has no such entry)."""
    cmd = [*FGSCOPE, "layers", model, str(folder), "--weights", "none", "--no-grids", "--device", "cpu",
           "--batch-size", str(batch), "--out", str(out), "--overwrite"]
    wall, rss, _, anon = _rss_child(["env", f"OMP_NUM_THREADS={threads}", *cmd])
    manifest = json.loads((out / "manifest.json").read_text())
    timings = manifest.get("timings_s", {})
    return wall, anon, float(timings.get("inspect", "nan")), float(manifest.get("peak_rss_mb") or "nan"), rss


def plain_loop(model: str, folder: Path, batch: int, threads: int) -> tuple[float, float]:
    """(seconds of the loop, seconds of the whole process) for a plain DataLoader + forward."""
    code = f"""
import time, json, torch
from pathlib import Path
t_start = time.perf_counter()
torch.set_num_threads({threads})
from fgscope.images import load_image
from fgscope.models import load_model
lm = load_model({model!r}, weights="none")
paths = sorted(Path({str(folder)!r}).glob("*.jpg"))
class DS(torch.utils.data.Dataset):
    def __len__(self): return len(paths)
    def __getitem__(self, i): return lm.preprocess(load_image(paths[i]))
loader = torch.utils.data.DataLoader(DS(), batch_size={batch}, num_workers=0)
module = lm.module.eval()
t0 = time.perf_counter()
with torch.inference_mode():
    for x in loader:
        module(x)
t1 = time.perf_counter()
print(json.dumps({{"loop": t1 - t0, "whole": t1 - t_start}}))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=ROOT, check=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    doc = json.loads(res.stdout.decode().strip().splitlines()[-1])
    return doc["loop"], doc["whole"]


def bench_layers(args: argparse.Namespace, work: Path) -> None:
    rows = {}
    for n in (args.images, args.big):
        folder = make_images(work / f"imgs{n}", n, args.size)
        runs, loops = [], []
        for _ in range(args.reps):  # alternated, so that drifts in machine load hit both alike
            runs.append(layers_run(args.model, folder, work / f"out{n}", args.batch, args.threads))
            loops.append(plain_loop(args.model, folder, args.batch, args.threads))
        rows[n] = (min(r[0] for r in runs), max(r[1] for r in runs), min(r[2] for r in runs),
                   min(lp[0] for lp in loops), min(lp[1] for lp in loops), max(r[3] for r in runs),
                   max(r[4] for r in runs))
    print(f"layers {args.model} --weights none --no-grids, {args.size}px JPEGs, batch {args.batch}, "
          f"{args.threads} thread(s), best of {args.reps} (peak RSS: the highest of the runs)")
    for n, (wall, anon, phase, loop, whole, job, proc) in rows.items():
        print(f"  {n:>6} images: peak anonymous RSS {anon:7.1f} MB (all RSS: run {job:6.0f} MB, process "
              f"with its exit {proc:6.0f} MB) | layers "
              f"inspect phase {n / phase:7.1f} img/s vs plain "
              f"loop {n / loop:7.1f} img/s = {loop / phase:4.2f}x (target >= 0.8x) | whole command "
              f"{n / wall:6.1f} img/s vs whole plain process {n / whole:6.1f} img/s = {whole / wall:4.2f}x")
    small, big = rows[args.images], rows[args.big]
    print(f"  RSS({args.big}) / RSS({args.images}) = {big[1] / small[1]:4.2f}x anonymous (target <= 1.2x); "
          f"all RSS: runs {big[5] / small[5]:4.2f}x, whole processes {big[6] / small[6]:4.2f}x")
    # Per-image cost from the difference of the two sizes: start-up and model load cancel.
    d_layers, d_plain = big[0] - small[0], big[4] - small[4]
    if d_layers > 0 and d_plain > 0:
        extra = args.big - args.images
        print(f"  marginal ({args.images}->{args.big} images, whole commands, start-up cancels): layers "
              f"{extra / d_layers:7.1f} img/s vs plain {extra / d_plain:7.1f} img/s = {d_plain / d_layers:4.2f}x")
    else:
        print("  marginal throughput: n/a (the larger run was not slower than the smaller one: "
              "timing noise dominates; use more images or --reps)")


CAPTURE_CHILD = """
import json, statistics, sys, time, torch, torchvision
import fgscope  # the API only: no fgscope.cli import in this process
arch, batch, size, reps, n_rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
model = torchvision.models.get_model(arch, weights=None).eval()
x = torch.randn(batch, 3, size, size)
def plain():
    with torch.inference_mode():
        model(x)
# The floor of keeping every output without fgscope: bare hooks holding references on a copy
# whose in-place modules write out of place (so what is kept is exact), nothing else.
import copy
bare = copy.deepcopy(model)
for m in bare.modules():
    if getattr(m, "inplace", False):
        m.inplace = False
leaves = [m for m in bare.modules() if not any(True for _ in m.children())]
def floor():
    kept = []
    hs = [m.register_forward_hook(lambda m, a, o: kept.append(o)) for m in leaves]
    with torch.inference_mode():
        bare(x)
    for h in hs:
        h.remove()
n = 0
def captured():
    global n
    with fgscope.capture(model, "all", to="cpu") as rec:
        model(x)
    n = len(rec.records)
captured()  # the first capture applies whatever the API sets up for the process
for fn in (plain, floor):
    fn()
# Rounds of interleaved runs, in a shuffled order each time (what ran just before changes the
# state of the caches and the allocator): a drift in machine load hits the three alike. Per
# round the median of each; the ratios are taken within a round.
import random
order = [("plain", plain), ("floor", floor), ("capture", captured)]
shuffle = random.Random(0).shuffle
rounds = []
for _ in range(n_rounds):
    ts = {"plain": [], "floor": [], "capture": []}
    for _ in range(reps):
        shuffle(order)
        for key, fn in order:
            t0 = time.perf_counter(); fn(); ts[key].append(time.perf_counter() - t0)
    rounds.append({k: statistics.median(v) for k, v in ts.items()})
import fgscope.device as d
assert "fgscope.cli" not in sys.modules
print(json.dumps({"rounds": rounds, "records": n, "tuned": d._TUNED}))
"""


def bench_capture(args: argparse.Namespace) -> None:
    targets = {"mobilenet_v2": 1.3, "resnet50": 1.15}
    import torch

    print(f"capture(model, 'all') kept on CPU vs plain forward, fresh process without the CLI, "
          f"torch {torch.__version__}, batch {args.capture_batch}, {args.capture_size}px, "
          f"{args.threads} thread(s), {args.capture_rounds} rounds of {args.capture_reps} interleaved "
          "runs each; ratios within a round, median over rounds [lowest-highest round]")
    for arch in args.capture_models:
        res = subprocess.run(
            [sys.executable, "-c", CAPTURE_CHILD, arch, str(args.capture_batch), str(args.capture_size),
             str(args.capture_reps), str(args.capture_rounds)],
            capture_output=True, cwd=ROOT, check=False, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
        )
        if res.returncode != 0:
            raise SystemExit(f"capture child failed for {arch}:\n{res.stderr.decode()[-2000:]}")
        doc = json.loads(res.stdout.decode().strip().splitlines()[-1])
        rounds = doc["rounds"]
        target = f" (target <= {targets[arch]}x)" if arch in targets else ""
        print(f"  {arch:<13} plain {_ms(rounds, 'plain')} | bare keeping hooks (floor) "
              f"{_ms(rounds, 'floor')} = {_ratio(rounds, 'floor', 'plain')} | capture all "
              f"({doc['records']} records) {_ms(rounds, 'capture')} = {_ratio(rounds, 'capture', 'plain')}"
              f"{target}, {_ratio(rounds, 'capture', 'floor')} the floor | allocator tuned by the "
              f"API: {doc['tuned']}")


def _ratio(rounds: list[dict], num: str, den: str) -> str:
    """Median over rounds of the ratio within each round, and its range."""
    r = sorted(x[num] / x[den] for x in rounds)
    return f"{statistics.median(r):4.2f}x [{r[0]:.2f}-{r[-1]:.2f}]"


def _ms(rounds: list[dict], key: str) -> str:
    return f"{statistics.median([x[key] for x in rounds]) * 1e3:7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200, help="the smaller image set")
    parser.add_argument("--big", type=int, default=2000, help="the larger image set")
    parser.add_argument("--size", type=int, default=64, help="side of the random JPEGs")
    parser.add_argument("--model", default="mobilenet_v2", help="torchvision name (random init)")
    parser.add_argument("--batch", type=int, default=16, help="layers --batch-size and the loop's")
    parser.add_argument("--reps", type=int, default=3, help="runs per size (best is kept)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
                        or (os.cpu_count() or 1))
    parser.add_argument("--capture-models", nargs="*", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--capture-batch", type=int, default=8)
    parser.add_argument("--capture-size", type=int, default=224)
    parser.add_argument("--capture-reps", type=int, default=5, help="interleaved runs per round")
    parser.add_argument("--capture-rounds", type=int, default=5)
    parser.add_argument("--work", type=Path, help="folder for images and runs (default: a temp dir)")
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-capture", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fgscope-scale-") as tmp:
        work = args.work or Path(tmp)
        print(f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}")
        if not args.skip_layers:
            bench_layers(args, work)
        if not args.skip_capture:
            bench_capture(args)


if __name__ == "__main__":
    main()
