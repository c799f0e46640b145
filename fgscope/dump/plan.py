"""Planning a dump before its first batch: options, stored layers, identity.

The options (`DumpConfig`; `--resize-to` and `--shard` parsed), this process's part
(torchrun), the layers (resolved with one dummy forward) and how each is stored, and the
dump's identity (a fingerprint of the model and the input list). The job itself is
`fgscope.dump.run.run_dump`, which re-exports the public names here. This module
imports nothing from `dump` or `dump_loop` (they import it).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fgscope import metrics, store
from fgscope.capture import LayerRecord, capture
from fgscope.data import InputList, resolve_inputs
from fgscope.device import autocast, resolve_device, resolve_dtype
from fgscope.errors import ConfigError
from fgscope.forward import forward
from fgscope.store import StoredLayer

__all__ = ["POOLS", "DTYPES", "DumpConfig", "parse_hw", "parse_shard", "resolve_part"]


# --- options -------------------------------------------------------------------------------

POOLS = ("none", "avg", "max", "bilinear")
DTYPES = ("float32", "float16", "bfloat16")


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
        # `not > 0` catches nan too; inf would overflow int() when sizing shards
        if not (self.shard_mb > 0 and math.isfinite(self.shard_mb)):
            raise ConfigError(f"--shard-mb must be a positive number of MiB, got {self.shard_mb}",
                              hint="e.g. --shard-mb 128, or --shard-rows N")
        if self.shard_rows is not None and self.shard_rows < 1:
            raise ConfigError(f"--shard-rows must be >= 1, got {self.shard_rows}")
        if self.shard is not None:
            i, n = self.shard
            if n < 1 or not 0 <= i < n:
                raise ConfigError(f"--shard {i}/{n}: need 0 <= i < N", hint="e.g. --shard 0/4")




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
            forward(module, example)
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
    # Folders and files skipped while searching (loops, no permission): listed, not rows.
    doc["skipped"] = [{"path": str(f.path), "reason": f.reason} for f in inputs.failures]
    return doc


# --- the plan ------------------------------------------------------------------------------


def _device(spec: str, local_rank: int | None) -> torch.device:
    if local_rank is not None and spec in ("auto", "cuda") and torch.cuda.is_available():
        return resolve_device(f"cuda:{local_rank % torch.cuda.device_count()}")
    return resolve_device(spec)


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
    from fgscope.models import load_model

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

