"""The `fgscope dump` job: activations of a whole data set, streamed to sharded files.

    inputs ─▶ DataLoader (decoding in worker processes)
           ─▶ forward in batches; `capture(on_record=)` hands each layer's output over
           ─▶ pooled / resized / cast straight into the current shard's buffers
           ─▶ ShardWriter thread: safetensors file (atomic) ─▶ parts/<part>/progress.json
           ─▶ index.json once every part is complete

Memory is bounded by the batch and a few shards, never by the data set. A run is resumable:
the same command against the same `--out` continues after the last complete shard and ends
with the same bytes as an uninterrupted run (batches never cross shard boundaries, so every
shard is computed from the same batches). What a dump *is* (its identity: the model's
weights, the input list, the stored layers, pooling, dtypes, shard size, number of parts) is
hashed into `dump.json`; another command against the folder is refused. Batch size, workers
and device may change between runs: they change values only by float rounding.

Scale-out: the inputs are split into `parts` contiguous blocks (`--shard i/N`, or RANK and
WORLD_SIZE under torchrun; both together give part `i * WORLD_SIZE + RANK` of
`N * WORLD_SIZE`). Each part writes only its own files, so no process group is needed; the
part that completes last writes the union `index.json` (or `fgscope dump-merge`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text
from torch import nn

from .. import metrics, store
from ..capture import LayerRecord, capture
from ..data import ImageDataset, InputList, make_loader, resolve_inputs, shard_batches
from ..device import autocast, resolve_device, resolve_dtype, to_device
from ..errors import ConfigError, OutputError
from ..runs import RunDir, new_run_dir, write_json
from ..store import Failure, PartState, PendingShard, StoredLayer

__all__ = [
    "POOLS",
    "DTYPES",
    "DumpConfig",
    "DumpResult",
    "run_dump",
    "merge_dump",
    "parse_hw",
    "parse_shard",
    "resolve_part",
]

POOLS = ("none", "avg", "max", "bilinear")
DTYPES = ("float32", "float16", "bfloat16")
_MAX_FAILURE_LINES = 10


@dataclass(frozen=True)
class DumpConfig:
    """Options of one `fgscope dump` run (see the command's help for each).

    Attributes:
        model: a model spec for `fgscope.load_model`, or a module.
        inputs: a folder (ImageFolder layout gives labels), globs, files, or a `.txt` list.
        layers: layer selection (`stages`, `blocks`, names, globs, `re:`).
        pool: none (raw maps), avg, max or bilinear (B-CNN: outer products summed over
            locations, signed square root, L2 normalisation).
        resize_to: (H, W): reduce raw maps (pool none) to at most this size with adaptive
            average pooling (never upsampled).
        dtype: storage dtype.
        precision: compute dtype (float16/bfloat16 run the forward under autocast).
        out: the dump folder; None makes a new one under fgscope-out/.
        overwrite: replace an existing dump in `out` instead of continuing or refusing it.
        batch_size: images per forward.
        workers: decoding processes (0: decode in this process).
        shard: (i, N): process only part i of N of the inputs.
        shard_mb: target shard size in MiB (sets the rows per shard).
        shard_rows: rows (inputs) per shard, overriding `shard_mb`.
        device: auto, cpu, cuda, cuda:N or mps (under torchrun, auto = cuda:LOCAL_RANK).
        model_kwargs: extra arguments for `load_model` (weights, arch, trust, size, ...).
        seed: seed for random-init weights, so that every rank and run builds the same model.
    """

    model: str | nn.Module = "mobilenet_v2"
    inputs: tuple[str, ...] = ()
    layers: str = "stages"
    pool: str = "avg"
    resize_to: tuple[int, int] | None = None
    dtype: str = "float32"
    precision: str = "float32"
    out: Path | None = None
    overwrite: bool = False
    batch_size: int = 32
    workers: int = 2
    shard: tuple[int, int] | None = None
    shard_mb: float = 128.0
    shard_rows: int | None = None
    device: str = "auto"
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    def check(self) -> None:
        """Raises ConfigError for malformed or contradictory options."""
        if self.pool not in POOLS:
            raise ConfigError(f"--pool {self.pool!r} is not one of {', '.join(POOLS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        resolve_dtype(self.precision)
        if self.resize_to is not None and self.pool != "none":
            raise ConfigError(
                f"--resize-to applies to raw maps, but --pool is {self.pool}",
                hint="use --pool none with --resize-to",
            )
        if self.resize_to is not None and min(self.resize_to) < 1:
            raise ConfigError(f"--resize-to must be positive, got {self.resize_to}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        if not self.shard_mb > 0:
            raise ConfigError(f"--shard-mb must be > 0, got {self.shard_mb}")
        if self.shard_rows is not None and self.shard_rows < 1:
            raise ConfigError(f"--shard-rows must be >= 1, got {self.shard_rows}")
        if self.shard is not None:
            i, n = self.shard
            if n < 1 or not 0 <= i < n:
                raise ConfigError(f"--shard {i}/{n}: need 0 <= i < N", hint="e.g. --shard 0/4")


@dataclass(frozen=True)
class DumpResult:
    """What one run of `run_dump` did.

    Attributes:
        out: the dump folder.
        part: this process's part; parts: how many parts.
        layers: how each layer is stored.
        inputs: inputs of this part.
        images: images this run processed (rows written).
        failures: inputs this run skipped.
        shards_written: shard files this run wrote; bytes_written: their size.
        seconds: time of the batch loop; images_per_s: images / seconds.
        resumed_at: first shard this run computed (0 = from the start).
        part_complete: every shard of this part exists.
        complete: every part is complete and `index.json` was written.
    """

    out: Path
    part: int
    parts: int
    layers: tuple[StoredLayer, ...]
    inputs: int
    images: int
    failures: int
    shards_written: int
    bytes_written: int
    seconds: float
    images_per_s: float
    resumed_at: int
    part_complete: bool
    complete: bool


# --- options -------------------------------------------------------------------------------


def parse_hw(text: str) -> tuple[int, int]:
    """`"7x7"` or `"7"` -> (7, 7); `"14x7"` -> (14, 7).

    Raises:
        ConfigError: not of the form HxW with positive integers.
    """
    parts = text.lower().replace("×", "x").split("x")
    try:
        hw = tuple(int(p) for p in parts)
    except ValueError:
        hw = ()
    if len(hw) == 1:
        hw = (hw[0], hw[0])
    if len(hw) != 2 or min(hw) < 1:
        raise ConfigError(f"--resize-to {text!r} is not HxW", hint="e.g. --resize-to 7x7")
    return hw  # type: ignore[return-value]


def parse_shard(text: str) -> tuple[int, int]:
    """`"2/8"` -> (2, 8): part 2 of 8 (0-based).

    Raises:
        ConfigError: not of the form i/N with 0 <= i < N.
    """
    try:
        i, n = (int(p) for p in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r} is not i/N", hint="e.g. --shard 0/4 (0-based)") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"--shard {text}: need 0 <= i < N", hint="e.g. --shard 0/4 (0-based)")
    return i, n


def _env_int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {key}={value!r} is not an integer") from None


def resolve_part(
    shard: tuple[int, int] | None, env: Mapping[str, str] | None = None
) -> tuple[int, int, int | None]:
    """This process's (part, parts, local_rank) from `--shard` and the torchrun environment.

    Under torchrun (RANK, WORLD_SIZE) rank r of W takes part r of W; with `--shard i/N` as
    well (e.g. a SLURM array of torchrun jobs), part `i * W + r` of `N * W`.
    """
    env = os.environ if env is None else env
    rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
    local = _env_int(env, "LOCAL_RANK")
    i, n = shard if shard is not None else (0, 1)
    if world is None or world <= 1:
        return i, n, local
    if rank is None or not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} does not fit WORLD_SIZE={world}")
    return i * world + rank, n * world, local


# --- layers --------------------------------------------------------------------------------


def _stored_layer(rec: LayerRecord, pool: str, resize: tuple[int, int] | None, dtype: str) -> StoredLayer:
    src = tuple(int(s) for s in rec.tensor.shape[1:])
    if pool == "none":
        if resize is not None and len(src) == 3:
            hw = (min(src[1], resize[0]), min(src[2], resize[1]))
            eff = hw if hw != src[1:] else None
            return StoredLayer(rec.name, rec.module_name, rec.module_type, src, (src[0], *hw), dtype, "none", eff)
        return StoredLayer(rec.name, rec.module_name, rec.module_type, src, src, dtype, "none")
    if len(src) == 1:  # a vector: nothing to pool
        return StoredLayer(rec.name, rec.module_name, rec.module_type, src, src, dtype, "none")
    if len(src) != 3:
        raise ConfigError(
            f"layer {rec.name} gives outputs of shape (N, {', '.join(map(str, src))}); "
            f"--pool {pool} needs (N, C, H, W) maps or (N, F) vectors",
            hint="use --pool none, or select other layers",
        )
    shape = (src[0] * src[0],) if pool == "bilinear" else (src[0],)
    return StoredLayer(rec.name, rec.module_name, rec.module_type, src, shape, dtype, pool)


def _transform(layer: StoredLayer) -> Callable[[torch.Tensor], torch.Tensor]:
    """What happens to a record before it is stored (the cast happens in the copy)."""
    if layer.pool != "none":
        how = layer.pool
        return lambda x: metrics.pool(x, how)  # (N, C, H, W) -> (N, C) or (N, C*C)
    if layer.resize is not None:
        size = layer.resize
        # (N, C, H, W) -> (N, C, h, w); half inputs are averaged in float32
        return lambda x: F.adaptive_avg_pool2d(
            x if x.dtype in (torch.float32, torch.float64) else x.float(), size
        )
    return lambda x: x


def _plan_layers(
    module: nn.Module, config: DumpConfig, example: torch.Tensor, dev: torch.device
) -> list[StoredLayer]:
    """Resolve the layers with one dummy forward and decide how each is stored."""
    found: list[StoredLayer] = []
    with capture(
        module, config.layers, to=None, example_input=example,
        on_record=lambda rec: found.append(
            _stored_layer(rec, config.pool, config.resize_to, config.dtype)
        ),
    ):
        with autocast(dev, resolve_dtype(config.precision)):
            module(example)
    if not found:
        raise ConfigError(
            f"the layers {config.layers!r} produced no tensor output",
            hint="run `fgscope summary MODEL --layers all` to list the layers",
        )
    return found


# --- identity ------------------------------------------------------------------------------


def _state_sha256(module: nn.Module) -> str:
    """A fingerprint of the weights: names, dtypes, shapes and bytes of the state dict."""
    digest = hashlib.sha256()
    for name, t in module.state_dict().items():
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            try:
                digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            except (RuntimeError, TypeError):  # dtypes without a byte view (quantized)
                digest.update(memoryview(t.float().reshape(-1).numpy()))
    return digest.hexdigest()


def _inputs_doc(inputs: InputList) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "count": len(inputs),
        "paths": list(inputs.paths),
        "labels": list(inputs.labels) if inputs.labels is not None else None,
        "classes": list(inputs.classes) if inputs.classes is not None else None,
    }
    doc["sha256"] = store.identity_hash(
        {k: doc[k] for k in ("paths", "labels", "classes")}
    )
    return doc


def _describe_difference(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """`pool avg -> max, layers` : what differs between two identities, in a few words."""
    out: list[str] = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "model":
            subs = [k for k in sorted(set(a or {}) | set(b or {})) if (a or {}).get(k) != (b or {}).get(k)]
            out.append("model " + "/".join(subs))
        elif isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
            out.append(key)
        else:
            out.append(f"{key} {a} -> {b}")
    return ", ".join(out) or "format"


def _prepare_out(config: DumpConfig, parts: int, identity: Mapping[str, Any], digest: str) -> Path:
    """The dump folder: new, or an existing dump of the same identity (to continue).

    Raises:
        ConfigError: the folder holds a different dump (without --overwrite), or several
            parts were asked for without --out.
        OutputError: the folder holds other files or cannot be created.
    """
    if config.out is None:
        if parts > 1:
            raise ConfigError(
                "several parts need one shared --out folder",
                hint="pass --out DIR (the same for every rank and --shard)",
            )
        return new_run_dir(None, "dump")
    out = Path(os.path.expanduser(os.fspath(config.out)))
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder", hint="choose another --out")
    if out.is_dir():
        desc = store.read_identity(out)
        if desc is None:
            foreign = sorted(
                p.name for p in out.iterdir()
                if not p.name.startswith(".") and p.name not in store.DUMP_FILES
            )
            if foreign:
                raise OutputError(
                    f"--out {out} holds files that are not an fgscope dump "
                    f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})",
                    hint="choose a new or empty --out",
                )
        elif config.overwrite or desc["hash"] != digest:
            if not config.overwrite:
                what = _describe_difference(desc.get("identity", {}), identity)
                raise ConfigError(
                    f"--out {out} holds a dump made by a different command (differs in: {what}), "
                    "so it cannot be continued",
                    hint="choose a new --out, or pass --overwrite to replace that dump",
                )
            if parts > 1:
                raise ConfigError(
                    "--overwrite cannot be used with several parts (ranks would delete each "
                    "other's shards)",
                    hint=f"delete {out} first, then start all parts",
                )
            store.remove_dump(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "shards").mkdir(exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {exc.strerror or exc}") from None
    return out


# --- the run -------------------------------------------------------------------------------


class _RateColumn(ProgressColumn):
    """images/s, from rich's moving estimate."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} img/s" if speed else "– img/s", style="progress.data.speed")


class _ShardBuffers:
    """The shard being filled: one preallocated tensor per layer; batches append rows.

    Records are pooled/resized on the device that produced them and copied (cast to the
    storage dtype) straight into the buffer in the capture callback, so nothing else of a
    record is kept. On CUDA the buffers are pinned and the copies non-blocking.
    """

    def __init__(
        self, layers: Sequence[StoredLayer], paths: Sequence[str], device: torch.device,
        mixed: bool,
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.mixed = mixed
        self.layers = {layer.name: layer for layer in layers}
        self.transforms = {layer.name: _transform(layer) for layer in layers}
        self.dtypes = {layer.name: resolve_dtype(layer.dtype) for layer in layers}
        self.paths = paths
        self.shard: int | None = None
        self.span = (0, 0)
        self.tensors: dict[str, torch.Tensor] = {}
        self.rows = 0
        self.batch = 0
        self.index: list[torch.Tensor] = []
        self.failures: list[Failure] = []
        self.seen: set[str] = set()

    def start(self, shard: int, span: tuple[int, int]) -> None:
        size = span[1] - span[0]
        self.shard, self.span, self.rows = shard, span, 0
        self.tensors = {
            name: torch.empty((size, *layer.shape), dtype=self.dtypes[name], pin_memory=self.cuda)
            for name, layer in self.layers.items()
        }
        self.index, self.failures = [], []

    def on_record(self, rec: LayerRecord) -> None:
        layer = self.layers.get(rec.name)
        if layer is None:
            return
        if self.mixed:  # pool in float32 even inside the forward's autocast
            with torch.autocast(rec.tensor.device.type, enabled=False):
                x = self.transforms[rec.name](rec.tensor)
        else:
            x = self.transforms[rec.name](rec.tensor)
        dst = self.tensors[rec.name][self.rows : self.rows + self.batch]
        if tuple(x.shape) != tuple(dst.shape):
            raise ConfigError(
                f"layer {rec.name} gave shape {tuple(x.shape)[1:]} where {layer.shape} was "
                "expected; its output size must not depend on the image",
            )
        dst.copy_(x, non_blocking=self.cuda)
        self.seen.add(rec.name)

    def forward(self, module: nn.Module, images: torch.Tensor, indices: torch.Tensor,
                dev: torch.device, precision: torch.dtype) -> None:
        self.batch, self.seen = len(indices), set()
        with autocast(dev, precision):
            module(to_device(images, dev))
        missing = [n for n in self.layers if n not in self.seen]
        if missing:
            first = self.paths[int(indices[0])]
            raise ConfigError(
                f"layer {missing[0]} did not run for the batch starting at {first}",
                hint="dump layers that run for every input",
            )
        self.index.append(indices)
        self.rows += self.batch

    def finish(self) -> PendingShard:
        assert self.shard is not None
        if self.cuda:
            torch.cuda.synchronize(self.device)  # the non-blocking copies have landed
        pending = PendingShard(
            shard=self.shard,
            inputs=self.span,
            tensors={n: t[: self.rows] for n, t in self.tensors.items()},
            input_index=torch.cat(self.index) if self.index else torch.empty(0, dtype=torch.int64),
            failures=tuple(self.failures),
        )
        self.shard, self.tensors = None, {}
        return pending


def _versions() -> dict[str, str]:
    import numpy
    import safetensors
    import torchvision

    from .. import __version__

    return {"fgscope": __version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__}


def _device(spec: str, local_rank: int | None) -> torch.device:
    if local_rank is not None and spec in ("auto", "cuda") and torch.cuda.is_available():
        return resolve_device(f"cuda:{local_rank % torch.cuda.device_count()}")
    return resolve_device(spec)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _part_done(out: Path, part: int, parts: int, digest: str) -> bool:
    path = out / "parts" / store.part_tag(part, parts) / "progress.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return doc.get("hash") == digest and bool(doc.get("complete"))


def _write_union(roots: Sequence[Path], index: Mapping[str, Any]) -> None:
    """index.json and manifest.json (the parts' manifests together) in roots[0]."""
    store.write_index(roots[0], index)
    manifests = []
    n = index["manifest"]["identity"]["parts"]
    for p in range(n):
        tag = store.part_tag(p, n)
        for root in roots:
            path = root / "parts" / tag / "manifest.json"
            if path.is_file():
                try:
                    manifests.append(json.loads(path.read_text(encoding="utf-8")))
                except (OSError, ValueError):
                    manifests.append({"part": tag, "error": f"unreadable {path}"})
                break
    write_json(roots[0] / "manifest.json", {
        "command": "dump",
        "finished_at": _dt.datetime.now().astimezone().isoformat(),
        "rows": index["rows"],
        "failures": len(index["failures"]),
        "files": ["index.json", "inputs.json", "dump.json", *(s["file"] for s in index["shards"])],
        "parts": manifests,
    })


@dataclass(frozen=True)
class _Plan:
    """Everything decided before the first batch: model, inputs, layers, identity, part."""

    lm: Any  # LoadedModel
    module: nn.Module
    device: torch.device
    precision: torch.dtype
    example: torch.Tensor
    inputs: InputList
    inputs_doc: dict[str, Any]
    layers: tuple[StoredLayer, ...]
    identity: dict[str, Any]
    digest: str
    part: int
    parts: int
    local_rank: int | None


def _make_plan(config: DumpConfig) -> _Plan:
    """Resolve inputs, model, device and layers; compute the dump's identity."""
    from ..models import load_model

    part, parts, local_rank = resolve_part(config.shard)
    inputs = resolve_inputs(config.inputs)
    dev = _device(config.device, local_rank)
    if dev.type == "cuda" and local_rank is not None:
        torch.cuda.set_device(dev)  # one GPU per rank: no context on cuda:0 from every rank
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # random-init weights: the same model in every process
        lm = load_model(config.model, **dict(config.model_kwargs))
    module = lm.module.to(dev)
    example = torch.zeros((1, 3, *lm.input_size), device=dev)
    layers = tuple(_plan_layers(module, config, example, dev))
    row_bytes = sum(layer.row_bytes for layer in layers)
    rows_per_shard = config.shard_rows or max(1, int(config.shard_mb * 2**20) // max(row_bytes, 1))
    pre, src = lm.preprocess, lm.source
    inputs_doc = _inputs_doc(inputs)
    identity = {
        "model": {
            "kind": src.kind, "arch": src.arch, "weights": src.weights,
            "state_sha256": _state_sha256(module), "input_size": list(lm.input_size),
            "preprocess": {
                "crop_size": list(pre.crop_size), "resize_size": pre.resize_size,
                "mean": list(pre.mean), "std": list(pre.std), "interpolation": pre.interpolation,
            },
        },
        "inputs": {"count": len(inputs), "sha256": inputs_doc["sha256"]},
        "layers": [layer.to_json() for layer in layers],
        "pool": config.pool,
        "resize_to": list(config.resize_to) if config.resize_to else None,
        "dtype": config.dtype,
        "precision": config.precision,
        "rows_per_shard": rows_per_shard,
        "parts": parts,
    }
    return _Plan(lm, module, dev, resolve_dtype(config.precision), example, inputs, inputs_doc,
                 layers, identity, store.identity_hash(identity), part, parts, local_rank)


@dataclass(frozen=True)
class _LoopResult:
    state: PartState
    images: int
    failed: int
    shards_written: int
    bytes_written: int
    seconds: float
    wall: tuple[float, float]


def _loop(plan: _Plan, config: DumpConfig, out: Path, state: PartState, console: Console,
          tag: str) -> _LoopResult:
    """Decode, forward, pool into shard buffers and write, for the shards not done yet."""
    ranges = [state.shard_range(k) for k in range(len(state.shards), state.n_shards)]
    batches = shard_batches(ranges, config.batch_size)
    dataset = ImageDataset(plan.inputs.paths, plan.lm.preprocess, plan.inputs.labels)
    loader = make_loader(dataset, batches, workers=min(config.workers, len(batches)),
                         pin_memory=plan.device.type == "cuda")
    buffers = _ShardBuffers(plan.layers, plan.inputs.paths, plan.device,
                            plan.precision != torch.float32)
    wall_start, t0 = time.time(), time.perf_counter()
    # Start the decoding processes (fork) before any thread of ours exists.
    batch_iter = iter(loader)
    writer = store.ShardWriter(out, state, plan.digest)
    images = failed = 0
    span = state.inputs
    try:
        with Progress(
            TextColumn(f"{tag}dump"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
            TimeRemainingColumn(), console=console, transient=True,
            disable=plan.local_rank not in (None, 0),
        ) as bar, capture(plan.module, config.layers, to=None, on_record=buffers.on_record,
                          example_input=plan.example):
            task = bar.add_task("dump", total=span[1] - span[0], completed=state.done_inputs)
            for batch in batch_iter:
                if buffers.shard is None:
                    k = (batch.span[0] - span[0]) // state.rows_per_shard
                    buffers.start(k, state.shard_range(k))
                for i, reason in batch.failures:
                    buffers.failures.append(Failure(i, plan.inputs.paths[i], reason))
                    if failed < _MAX_FAILURE_LINES:
                        console.print(f"[yellow]skipped[/] {reason}")
                    failed += 1
                if batch.images is not None:
                    buffers.forward(plan.module, batch.images, batch.indices, plan.device,
                                    plan.precision)
                    images += len(batch)
                bar.advance(task, batch.span[1] - batch.span[0])
                if batch.span[1] == buffers.span[1]:
                    writer.submit(buffers.finish())
        state = writer.close()
    except BaseException:
        writer.close(abort=True)
        raise
    assert state.complete, "every shard of the part was submitted"
    return _LoopResult(state, images, failed, writer.shards_written, writer.bytes_written,
                       time.perf_counter() - t0, (wall_start, time.time()))


def run_dump(config: DumpConfig, console: Console | None = None) -> tuple[Path, DumpResult]:
    """Run (or continue) one part of a dump; returns the folder and what this run did.

    Raises:
        FgscopeError: bad model, inputs, layers or options (before anything is written); a
            different dump in `out`; OutputError when a shard cannot be written (completed
            shards stay valid and the same command continues after them).
    """
    console = console or Console(quiet=True)
    config.check()
    t0 = time.perf_counter()
    started_at = _dt.datetime.now().astimezone().isoformat()
    plan = _make_plan(config)
    part, parts, digest = plan.part, plan.parts, plan.digest
    out = _prepare_out(config, parts, plan.identity, digest)
    if store.read_identity(out) is None:
        src = plan.lm.source
        store.write_inputs(out, plan.inputs_doc)
        store.write_identity(out, plan.identity, plan.layers, {
            "model": {"spec": src.spec, "path": src.path, "sha256": src.sha256,
                      "notes": list(src.notes)},
            "versions": _versions(),
        })
    run = RunDir(out / "parts" / store.part_tag(part, parts), "dump",
                 manifest={"started_at": started_at}, started=t0)
    run.time("setup", time.perf_counter() - t0)

    span = store.split_inputs(len(plan.inputs), part, parts)
    rows_per_shard = plan.identity["rows_per_shard"]
    state = store.load_part(out, PartState(part, parts, span, rows_per_shard), digest)
    resumed_at = len(state.shards)
    if resumed_at == 0:
        store.write_progress(out, state, digest)
    tag = f"part {part + 1}/{parts}: " if parts > 1 else ""
    if resumed_at and not state.complete:
        console.print(
            f"{tag}continuing {out}: {resumed_at} of {state.n_shards} shards already complete"
        )
    done = _loop(plan, config, out, state, console, tag)

    run.time("loop", done.seconds)
    rate = done.images / done.seconds if done.seconds > 0 else 0.0
    run.manifest.update(
        part=part, parts=parts, inputs=list(span), device=str(plan.device),
        precision=config.precision, resumed_at_shard=resumed_at, images=done.images,
        failures=done.failed, shards_written=done.shards_written,
        bytes_written=done.bytes_written, images_per_s=round(rate, 3), loop_wall=list(done.wall),
        options={k: (str(v) if isinstance(v, (Path, nn.Module)) else v)
                 for k, v in config.__dict__.items() if k != "model_kwargs"},
        model_kwargs=dict(config.model_kwargs),
        shards=[s.file for s in done.state.shards],
    )
    run.finish()

    complete = all(_part_done(out, p, parts, digest) for p in range(parts))
    if complete:
        _write_union([out], store.build_index([out], require_complete=True))
    _summary(console, tag, out, plan, done, resumed_at, complete, rate)
    result = DumpResult(
        out=out, part=part, parts=parts, layers=plan.layers, inputs=span[1] - span[0],
        images=done.images, failures=done.failed, shards_written=done.shards_written,
        bytes_written=done.bytes_written, seconds=done.seconds, images_per_s=rate,
        resumed_at=resumed_at, part_complete=done.state.complete, complete=complete,
    )
    return out, result


def _summary(console: Console, tag: str, out: Path, plan: _Plan, done: _LoopResult,
             resumed_at: int, complete: bool, rate: float) -> None:
    """The final line: images, failures, bytes written, throughput."""
    state = done.state
    if resumed_at == state.n_shards:
        rows = f" ({len(store.open(out))} rows, index.json)" if complete else ""
        console.print(f"{tag}nothing to do: {out} already holds every shard of this part{rows}")
        return
    where = "index.json" if complete else f"parts/{store.part_tag(state.part, state.parts)}/progress.json"
    listed = f" (listed in {where})" if done.failed else ""
    total = f"; the dump holds {len(store.open(out))} rows" if complete and resumed_at else ""
    later = "" if complete or plan.parts == 1 else " (index.json follows when every part is done)"
    console.print(
        f"{tag}dumped {done.images} images, {done.failed} failed{listed}; "
        f"{_count(len(plan.layers), 'layer')}, {_human(done.bytes_written)} in "
        f"{_count(done.shards_written, 'shard')}; {rate:.1f} images/s -> [bold]{out}[/]"
        f"{total}{later}"
    )


def merge_dump(
    dirs: Sequence[str | os.PathLike[str]], console: Console | None = None, verify: bool = False
) -> Path:
    """Write the union `index.json` (and `manifest.json`) of a dump's parts into dirs[0].

    Args:
        dirs: the dump folder, then folders holding more of its parts (if they were written
            elsewhere); shard paths in the index are relative to dirs[0].
        verify: check every shard's size and sha256 against its progress record.

    Returns:
        The index path.

    Raises:
        ConfigError: not a dump, or folders of different dumps.
        OutputError: parts missing or incomplete; a shard missing or damaged (with verify).
    """
    console = console or Console(quiet=True)
    roots = [Path(os.path.expanduser(os.fspath(d))) for d in dirs]
    index = store.build_index(roots, require_complete=True)
    if verify:
        bad: list[str] = []
        with Progress(
            TextColumn("verify"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            console=console, transient=True,
        ) as bar:
            task = bar.add_task("verify", total=len(index["shards"]))
            for s in index["shards"]:
                digest = hashlib.sha256()
                try:
                    with (roots[0] / s["file"]).open("rb") as fh:
                        while chunk := fh.read(1 << 22):
                            digest.update(chunk)
                    if digest.hexdigest() != s["sha256"]:
                        bad.append(f"{s['file']} (sha256 differs)")
                except OSError as exc:
                    bad.append(f"{s['file']} ({exc.strerror or exc})")
                bar.advance(task)
        if bad:
            raise OutputError(
                f"{len(bad)} damaged shard(s): {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}",
                hint="delete the part's progress.json entries or rerun that part into a new --out",
            )
    _write_union(roots, index)
    console.print(
        f"index.json: {index['rows']} rows from {len(index['shards'])} shards of "
        f"{_count(index['manifest']['identity']['parts'], 'part')}, "
        f"{_count(len(index['failures']), 'failure')}"
        f"{', every shard verified' if verify else ''} -> [bold]{roots[0]}[/]"
    )
    return roots[0] / "index.json"
