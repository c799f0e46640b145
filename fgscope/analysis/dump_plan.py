"""Planning a dump before its first batch: options, stored layers, identity, the folder.

Parses `--resize-to` and `--shard`, finds this process's part (torchrun), resolves the
layers with one dummy forward and decides how each is stored, fingerprints the model and
inputs into the dump's identity, and prepares (or refuses) the `--out` folder. The job itself
is `fgscope.analysis.dump.run_dump`, which re-exports the public names here.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import metrics, store
from ..capture import LayerRecord, capture
from ..data import InputList, resolve_inputs
from ..device import autocast, resolve_device, resolve_dtype
from ..errors import ConfigError, OutputError
from ..runs import new_run_dir
from ..store import StoredLayer

if TYPE_CHECKING:  # annotations only: dump.py imports this module
    from .dump import DumpConfig

__all__ = ["parse_hw", "parse_shard", "resolve_part"]


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

