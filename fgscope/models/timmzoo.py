"""timm models (the optional extra `fgscope[timm]`): `timm:NAME[.TAG]` by name, state_dicts
with `--arch timm:NAME`, and the preprocessing and class names of timm's `pretrained_cfg`.

timm is imported only here, and only when a timm model is asked for, so the core runs
without it. Pretrained weights are read offline from where timm keeps them, the Hugging Face
hub cache (`models--timm--NAME.TAG/snapshots/REV/model.safetensors`), or from
`FGSCOPE_WEIGHTS_PATH`; nothing is downloaded. `.bin` files are read with torch's
`weights_only` unpickler, safetensors files without any pickle.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from fgscope.errors import ConfigError, ModelLoadError
from fgscope.models.hub import _sha256
from fgscope.models.types import ModelSource, Preprocess, _first_line, _Resolved

__all__ = ["timm_preprocess", "hub_cache_dir"]

_EXTRA_HINT = "pip install 'fgscope[timm]'"
_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm pushes to the hub, preferred first
_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


def _timm(what: str) -> ModuleType:
    """Import timm, or say in one line which extra installs it."""
    try:
        import timm
        import timm.data
    except ImportError as exc:
        raise ModelLoadError(f"{what} needs the optional extra: {_EXTRA_HINT}") from exc
    return timm


def _split(spec: str) -> str:
    """`timm:NAME` -> NAME (a ModelLoadError for an empty name)."""
    name = spec.strip()[len("timm:") :].strip()
    if not name:
        raise ModelLoadError(f"{spec!r} names no timm model", "write timm:NAME, e.g. timm:resnet50")
    return name


def _check_name(timm: ModuleType, name: str, spec: str) -> None:
    arch = timm.models.split_model_name_tag(name)[0]
    if timm.is_model(arch):
        return
    close = difflib.get_close_matches(arch, timm.list_models(), n=3)
    did = f"did you mean {', '.join('timm:' + c for c in close)}? " if close else ""
    raise ModelLoadError(
        f"unknown model {spec!r}: {arch!r} is not a timm architecture",
        f"{did}list them with `python -c 'import timm; print(timm.list_models())'`",
    )


def _create(timm: ModuleType, name: str, **kwargs: Any) -> nn.Module:
    """`timm.create_model` with random init (`pretrained=False`: timm reads and fetches nothing)."""
    try:
        return timm.create_model(name, pretrained=False, **kwargs)
    except Exception as exc:  # timm asserts on unsupported arguments or tags
        raise ModelLoadError(f"timm cannot build {name} ({_first_line(exc)})") from exc


def _from_timm(spec: str, weights: str | None, size: Any = None) -> _Resolved:
    """`timm:NAME[.TAG]`: random init with weights 'none', else the pretrained weights of the
    tag (timm's default tag for 'default') read offline from the hub cache or
    `FGSCOPE_WEIGHTS_PATH`."""
    name = _split(spec)
    timm = _timm(spec.strip())
    _check_name(timm, name, spec)
    arch, tag = timm.models.split_model_name_tag(name)
    wanted = "none" if weights is None else str(weights).strip()
    if wanted.lower() not in ("none", "random", "default"):
        if tag:
            raise ConfigError(f"{spec!r} names its tag .{tag}; --weights {wanted} contradicts it")
        tag = wanted.rpartition(".")[2] if wanted.startswith(arch + ".") else wanted
    full = f"{arch}.{tag}" if tag else arch
    kwargs: dict[str, Any] = {}
    try:
        cfg = timm.models.get_pretrained_cfg(full)
    except RuntimeError:  # "Invalid pretrained tag (x) for arch"
        cfg = None
    if cfg is None and tag:
        tags = [t.partition(".")[2] for t in timm.list_pretrained(arch + ".*")]
        raise ModelLoadError(
            f"timm has no weights tag {tag!r} for {arch}", f"valid: {', '.join(tags) or 'none'}"
        )
    if size is not None and cfg is not None and cfg.fixed_input_size:
        # A ViT's position embeddings fix its input size: build it for the one asked for.
        kwargs["img_size"] = tuple(size) if isinstance(size, (tuple, list)) else size
    if wanted.lower() in ("none", "random"):
        model = _create(timm, full, **kwargs).eval()
        pre, notes = timm_preprocess(model)
        source = ModelSource(spec, "timm", full, None, None, None, tuple(notes))
        return _Resolved(model, pre, _num_classes(model), None, source)
    if cfg is None:
        raise ModelLoadError(
            f"timm has no pretrained weights for {arch}", "use --weights none for random init"
        )
    full = f"{arch}.{cfg.tag}" if cfg.tag else arch  # the default tag, named
    path, looked = _find_weights(cfg, full)
    if path is None:
        repo = cfg.hf_hub_id or f"timm/{full}"
        raise ModelLoadError(
            f"no offline weights for timm:{full} (looked in {'; '.join(looked)})",
            f"fetch them once with `hf download {repo}` (they land in the hub cache), put "
            f"{full}.safetensors in FGSCOPE_WEIGHTS_PATH, or use --weights none",
        )
    state = _read_state(path)
    try:  # timm's own loader: its checkpoint filter, then a strict load
        model = timm.create_model(
            full, pretrained=True, pretrained_cfg_overlay={"state_dict": state}, **kwargs
        ).eval()
    except Exception as exc:
        raise ModelLoadError(
            f"weights file {path} does not load into timm:{full} ({_first_line(exc)})",
            "delete it and fetch it again",
        ) from exc
    pre, notes = timm_preprocess(model)
    labels = _labels(timm, model)
    source = ModelSource(
        spec, "timm", full, f"timm:{full}", str(path.resolve()), _sha256(path), tuple(notes)
    )
    return _Resolved(model, pre, _num_classes(model), labels, source)


def _num_classes(model: nn.Module) -> int | None:
    n = getattr(model, "num_classes", None)
    return n if isinstance(n, int) and n > 0 else None


def _labels(timm: ModuleType, model: nn.Module) -> tuple[str, ...] | None:
    """Class names timm knows offline: the pretrained_cfg's `label_names`, or the ImageNet
    subset its class count implies (the first name of each of timm's descriptions, the way
    torchvision's categories read: 'tench', 'goldfish')."""
    n = _num_classes(model)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("label_names")
    if names and len(names) == n:
        return tuple(str(v) for v in names)
    subset = timm.data.infer_imagenet_subset(model)
    if subset is None:
        return None
    try:
        found = timm.data.ImageNetInfo(subset).label_descriptions()
    except Exception:  # an older timm without the bundled files: no names rather than wrong ones
        return None
    return tuple(d.split(",")[0].strip() for d in found) if len(found) == n else None


def timm_preprocess(model_or_cfg: nn.Module | Mapping[str, Any]) -> tuple[Preprocess, list[str]]:
    """timm's evaluation transform as a `Preprocess`, with notes where it is approximated.

    The data config is resolved the way timm does (`timm.data.resolve_data_config`) and
    mapped the way `transforms_imagenet_eval` uses it: the shorter side resized to
    floor(size / crop_pct), then a center crop (crop_mode 'center'); both sides resized to it
    (crop_mode 'squash').

    Args:
        model_or_cfg: a timm model (its `pretrained_cfg`) or a pretrained_cfg mapping.

    Returns:
        The preprocessing and the notes about it.
    """
    timm = _timm("timm preprocessing")
    if isinstance(model_or_cfg, nn.Module):
        cfg = timm.data.resolve_model_data_config(model_or_cfg)
    else:
        cfg = timm.data.resolve_data_config(pretrained_cfg=dict(model_or_cfg))
    _, h, w = cfg["input_size"]
    crop_pct = cfg.get("crop_pct") or timm.data.DEFAULT_CROP_PCT
    mode = cfg.get("crop_mode") or "center"
    notes: list[str] = []
    interp = cfg.get("interpolation") or "bicubic"
    if interp not in _INTERPOLATIONS:  # 'lanczos', 'box', 'hamming', 'random'
        notes.append(f"timm's interpolation {interp!r} is approximated with bicubic")
        interp = "bicubic"
    scale = math.floor(min(h, w) / crop_pct)
    if h != w:
        notes.append(
            f"timm resizes {h}x{w} inputs keeping the ratio of each side; fgscope resizes the "
            f"shorter side to {scale}"
        )
    if mode == "border":
        notes.append("timm's crop_mode 'border' (resize and pad) is approximated by a center crop")
    pre = Preprocess(
        (int(h), int(w)), scale, tuple(cfg["mean"]), tuple(cfg["std"]), interp, mode == "squash"
    )
    return pre, notes


# --- state_dicts -------------------------------------------------------------------------


def _for_state_dict(
    arch: str, state: Mapping[str, torch.Tensor], num_classes: int | None
) -> tuple[nn.Module, Preprocess, list[str]]:
    """A random-init timm model for `--arch timm:NAME` whose classifier fits `state` (its
    class count from the file unless given; none when the file has no classifier)."""
    name = _split(arch)
    timm = _timm(arch.strip())
    _check_name(timm, name, arch)
    if num_classes is None:
        ref = _create(timm, name)
        head = (getattr(ref, "pretrained_cfg", None) or {}).get("classifier")
        heads = [head] if isinstance(head, str) else list(head or ())
        found = [state[f"{h}.weight"].shape[0] for h in heads if f"{h}.weight" in state]
        num_classes = found[0] if found else (0 if heads else None)
        if num_classes == _num_classes(ref) or num_classes is None:
            pre, notes = timm_preprocess(ref)
            return ref, pre, notes
    model = _create(timm, name, num_classes=num_classes)
    pre, notes = timm_preprocess(model)
    return model, pre, notes


# --- weights files -----------------------------------------------------------------------


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, where timm and transformers keep downloads: `HF_HUB_CACHE`
    (or the older `HUGGINGFACE_HUB_CACHE`), else `$HF_HOME/hub`, else
    `$XDG_CACHE_HOME/huggingface/hub` (default ~/.cache/huggingface/hub)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def _snapshots(repo_dir: Path) -> list[Path]:
    """The snapshot folders of one cached repo, the one `refs/main` names first."""
    snaps = repo_dir / "snapshots"
    if not snaps.is_dir():
        return []
    found = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: -p.stat().st_mtime)
    ref = repo_dir / "refs" / "main"
    main = ref.read_text().strip() if ref.is_file() else ""
    return sorted(found, key=lambda p: p.name != main)


def _find_weights(cfg: Any, full: str) -> tuple[Path | None, list[str]]:
    """The weights file of a pretrained_cfg, offline: the hub cache (the repo timm would fetch
    from), then each folder of FGSCOPE_WEIGHTS_PATH (`NAME.TAG.safetensors`, `NAME.TAG.bin`,
    `NAME.TAG/model.safetensors`, or a hub cache layout). Returns the file (None when absent)
    and the places looked in."""
    repo = cfg.hf_hub_id or f"timm/{full}"
    names = (cfg.hf_hub_filename,) if getattr(cfg, "hf_hub_filename", None) else _FILES
    folder = "models--" + repo.replace("/", "--")
    extra = [
        Path(p).expanduser()
        for p in os.environ.get("FGSCOPE_WEIGHTS_PATH", "").split(os.pathsep)
        if p
    ]
    looked: list[str] = []
    for base in (hub_cache_dir(), *extra):
        looked.append(str(base / folder))
        for snap in _snapshots(base / folder):
            for n in names:
                if (snap / n).is_file():
                    return snap / n, looked
    for base in extra:
        for cand in (
            base / f"{full}.safetensors",
            base / f"{full}.bin",
            base / full / _FILES[0],
            base / full / _FILES[1],
        ):
            if cand.is_file():
                return cand, looked
        looked.append(f"{base}/{full}.safetensors")
    if not extra:
        looked.append("FGSCOPE_WEIGHTS_PATH (not set)")
    return None, looked


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """A weights file as tensors: safetensors without pickle, anything else with torch's
    `weights_only` unpickler (no code runs); a checkpoint's `state_dict` is taken out."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            with open(path, "rb") as fh:
                obj = torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"weights file {path} cannot be read ({_first_line(exc)})",
            "delete it and fetch it again",
        ) from exc
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(f"weights file {path} holds no state_dict of tensors")
    return dict(obj)


def _is_timm_module(module: nn.Module) -> bool:
    """A module built by timm (its class lives in timm and it carries a pretrained_cfg)."""
    return type(module).__module__.startswith("timm.") and isinstance(
        getattr(module, "pretrained_cfg", None), Mapping
    )
