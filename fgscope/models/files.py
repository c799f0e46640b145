"""Model files: what a file holds (sniffed from its bytes), and loading state_dicts and
checkpoints, pickled modules (only with trust), torch.export programs, TorchScript archives and
safetensors, with the architecture guess and the fit check for state_dicts."""

from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fgscope.errors import ConfigError, ModelLoadError, UnsafeModelError
from fgscope.models.export import _from_export
from fgscope.models.hfzoo import _is_hf_folder
from fgscope.models.hub import (
    _build,
    _check_arch,
    _rekey,
    _remap_legacy,
    _sha256,
    _signature,
    native_preprocess,
)
from fgscope.models.pt2scan import _pickled_global
from fgscope.models.timmzoo import _for_state_dict, _is_timm_module, timm_preprocess
from fgscope.models.types import (
    _LIST_HINT,
    ModelSource,
    TorchScriptModel,
    _first_line,
    _is_str_list,
    _Resolved,
)

__all__: list[str] = []

_MODEL_SUFFIXES = (".pt", ".pth", ".pt2", ".bin", ".ckpt", ".tar", ".safetensors")
# fmt: off
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "state_dict_ema",
                "model_ema")  # where checkpoints keep their weights, most likely first
_MODULE_KEYS = ("model", "ema", "module", "net")
_LABEL_KEYS = ("classes", "class_names", "labels", "categories")
_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_COMMON_ARCHS = (  # tried, on the meta device, to guess a state_dict's architecture
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
    "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
    "efficientnet_b0", "efficientnet_b1", "convnext_tiny", "densenet121", "vgg16", "vgg16_bn",
    "alexnet", "squeezenet1_1", "shufflenet_v2_x1_0", "mnasnet1_0", "vit_b_16", "swin_t",
)
_TORCH_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"  # torch.save's pickled magic number
# fmt: on
_NOTE_TORCHSCRIPT = (
    "TorchScript: torch refuses forward hooks on ScriptModules ('register_forward_hook is not "
    "supported on ScriptModules'), so no layer inside the archive can be captured, only the "
    "model's output (recorded as `output`); save a state_dict (with --arch) or a torch.export .pt2 instead"
)


# --- files -------------------------------------------------------------------------------


def _from_file(spec: str, arch: str | None, trust: bool, num_classes: int | None) -> _Resolved:
    path = Path(spec).expanduser().absolute()
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}", "check the path")
    if not path.is_file():
        hint = f"it is a transformers save_pretrained folder: pass hf:{spec}" if _is_hf_folder(path) else None
        raise ModelLoadError(f"{path} is a directory, not a model file", hint)
    kind, digest = _sniff(path), _sha256(path)
    if arch is not None and kind in ("export", "torchscript"):
        what = "torch.export program" if kind == "export" else "TorchScript archive"
        raise ConfigError(
            f"--arch does not apply to {path}: a {what} carries its own architecture",
            "drop --arch (it is for state_dict files)",
        )
    if kind == "export":
        return _from_export(spec, path, digest, trust)
    if kind == "torchscript":
        # torch.jit.load runs TorchScript's C++ unpickler, which builds only TorchScript types
        # and refuses Python globals, and compiles the archive's code/ with the TorchScript
        # compiler; extra files are not read unless asked for (we never ask).
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                module = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:
                raise ModelLoadError(
                    f"{path} is a damaged TorchScript archive ({_first_line(exc)})"
                ) from exc
        notes = (_NOTE_TORCHSCRIPT, *dict.fromkeys(str(w.message) for w in caught))
        source = ModelSource(spec, "torchscript", None, None, str(path), digest, notes)
        return _Resolved(TorchScriptModel(module).eval(), None, None, None, source)
    if kind == "safetensors" or (kind == "unknown" and path.suffix == ".safetensors"):
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as exc:
            raise ModelLoadError(
                f"{path} is not a readable safetensors file ({_first_line(exc)})"
            ) from exc
    elif kind in ("torch_zip", "torch_legacy"):
        try:
            # An open file, not the path: torch.load reads a path named .safetensors as one,
            # and what the bytes are (sniffed above) must decide, not the name.
            with open(path, "rb") as fh:
                obj = torch.load(fh, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:  # a global outside torch's allowlist: code, not data
            if not trust:
                raise UnsafeModelError(
                    f"{path} holds a pickled Python object ({_pickled_class(path)}); "
                    "unpickling runs code from the file",
                    "re-run with --trust if you trust its source, or save a state_dict instead",
                ) from exc
            obj = _load_trusted(path)
        except Exception as exc:
            raise ModelLoadError(f"{path} is a damaged PyTorch file ({_first_line(exc)})") from exc
    else:
        raise ModelLoadError(
            f"{path} is not a PyTorch model file ({_describe(path, kind)})",
            "expected a torch.save file, a TorchScript or torch.export archive, or .safetensors",
        )
    module = obj if isinstance(obj, nn.Module) else None
    if module is None and isinstance(obj, Mapping):
        module = next((obj[k] for k in _MODULE_KEYS if isinstance(obj.get(k), nn.Module)), None)
    if module is not None:
        if arch is not None:
            raise ConfigError(
                f"--arch does not apply to {path}: it holds a whole pickled module "
                f"({type(module).__module__}.{type(module).__qualname__}), which carries its own "
                "architecture",
                "drop --arch",
            )
        _usable(module, path)
        pre, notes = timm_preprocess(module) if _is_timm_module(module) else (None, [])
        source = ModelSource(spec, "pickled_module", None, None, str(path), digest, tuple(notes))
        return _Resolved(module.eval(), pre, None, None, source)
    return _from_state_dict(spec, path, digest, obj, arch, num_classes)


def _usable(module: nn.Module, path: Path) -> None:
    """One line, not a traceback later, for a module that cannot be walked after unpickling
    (torch's quantized modules lose their submodules in pickling)."""
    try:
        module.eval()
    except Exception as exc:
        raise ModelLoadError(
            f"{path} holds a pickled {type(module).__module__}.{type(module).__qualname__} that "
            f"is unusable after unpickling ({exc.__class__.__name__}: {exc}; quantized modules "
            "do not survive pickling)",
            "save the float model's state_dict (and pass --arch), or a TorchScript / .pt2 file",
        ) from None


def _load_trusted(path: Path) -> Any:
    try:
        with open(path, "rb") as fh:
            return torch.load(fh, map_location="cpu", weights_only=False)
    except Exception as exc:  # e.g. the pickled class cannot be imported here
        raise ModelLoadError(
            f"cannot unpickle {path} ({_first_line(exc)})",
            "import the module that defines its classes first, or save a state_dict",
        ) from exc


def _from_state_dict(
    spec: str, path: Path, digest: str, obj: Any, arch: str | None, num_classes: int | None
) -> _Resolved:
    state, where = _extract_state_dict(obj)
    if state is None:
        what = (
            f"a dict with keys {_some([str(k) for k in obj])}"
            if isinstance(obj, Mapping)
            else f"a {type(obj).__name__}"
        )
        raise ModelLoadError(f"{path} holds {what}, not a model or a state_dict of tensors")
    notes = [f"weights read from checkpoint[{where!r}]"] if where else []
    state = _rekey(state, _strip_prefixes)
    if arch is None:
        guess = _guess_arch(state)
        raise ModelLoadError(
            f"{path} holds a state_dict ({len(state)} tensors); pass --arch NAME "
            f"(one of torchvision's builders, e.g. {guess or 'resnet50'})",
            f"it looks like {guess}" if guess else _LIST_HINT,
        )
    if arch.strip().lower().startswith("timm:"):
        return _timm_state_dict(spec, path, digest, obj, state, arch, num_classes, notes)
    name = arch.strip().lower()
    _check_arch(name, arch)
    state = _remap_legacy(name, state)
    kwargs: dict[str, Any] = {}
    if name in ("inception_v3", "googlenet"):
        kwargs.update(
            init_weights=False, aux_logits=any(k.startswith(("AuxLogits.", "aux1.")) for k in state)
        )
        notes.append(f"{name}: transform_input is not stored in state_dicts; assumed False")
    ref = _signature(name, tuple(sorted(kwargs.items())))
    if ref is not None:
        state, stripped = _strip_common_prefix(state, ref)
        notes += [f"stripped the prefix {stripped!r} from every key"] if stripped else []
    n_cls = num_classes or (_infer_num_classes(state, ref) if ref else None)
    model = _build(name, **kwargs, **({"num_classes": n_cls} if n_cls else {}))
    _check_fit(path, name, state, model, num_classes is not None)
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # e.g. mnasnet refuses a state_dict without its version metadata
        raise ModelLoadError(
            f"{path} does not load into --arch {name} ({_first_line(exc)})"
        ) from exc
    n_cls = n_cls or 1000
    labels = _checkpoint_labels(obj, where, n_cls)
    source = ModelSource(spec, "state_dict", name, None, str(path), digest, tuple(notes))
    return _Resolved(model.eval(), native_preprocess(name, model), n_cls, labels, source)


def _checkpoint_labels(obj: Any, where: str | None, n_cls: int | None) -> tuple[str, ...] | None:
    found = [tuple(v) for k in _LABEL_KEYS if _is_str_list(v := obj.get(k))] if where else []
    return found[0] if found and len(found[0]) == n_cls else None


def _timm_state_dict(spec: str, path: Path, digest: str, obj: Any, state: Mapping[str, torch.Tensor],
                     arch: str, num_classes: int | None, notes: list[str]) -> _Resolved:
    """A state_dict or checkpoint of a timm model (`--arch timm:NAME`), loaded strictly."""
    model, pre, more = _for_state_dict(arch, state, num_classes)
    name, ref = arch.strip(), {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state, stripped = _strip_common_prefix(state, ref)
    notes += [f"stripped the prefix {stripped!r} from every key"] if stripped else []
    _check_fit(path, name, state, model, num_classes is not None)
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ModelLoadError(f"{path} does not load into --arch {name} ({_first_line(exc)})") from exc
    n_cls = getattr(model, "num_classes", None) or None
    source = ModelSource(spec, "state_dict", name, None, str(path), digest, tuple(notes + more))
    return _Resolved(model.eval(), pre, n_cls, _checkpoint_labels(obj, "state", n_cls), source)


def _extract_state_dict(obj: Any) -> tuple[Mapping[str, torch.Tensor] | None, str | None]:
    if _is_tensor_dict(obj):
        return obj, None
    for key in _NESTED_KEYS if isinstance(obj, Mapping) else ():
        if _is_tensor_dict(obj.get(key)):
            return obj[key], key
    return None, None


def _strip_prefixes(key: str) -> str:
    while key.startswith(_PREFIXES):  # repeatedly: DDP around torch.compile, or the reverse
        key = key.split(".", 1)[1]
    return key


def _strip_common_prefix(
    state: Mapping[str, Any], ref: dict[str, tuple]
) -> tuple[Mapping[str, Any], str | None]:
    # Lightning modules and other wrappers nest the network under one attribute ('model.').
    heads = {k.split(".", 1)[0] for k in state}
    if len(heads) != 1 or not all("." in k for k in state) or set(state) & set(ref):
        return state, None
    stripped = _rekey(state, lambda k: k.split(".", 1)[1])
    return (stripped, f"{heads.pop()}.") if set(stripped) & set(ref) else (state, None)


def _infer_num_classes(state: Mapping[str, torch.Tensor], ref: dict[str, tuple]) -> int | None:
    # The classifier is what has 1000 rows in the reference and another count in the file.
    found = {
        state[k].shape[0]
        for k, s in ref.items()
        if k in state
        and s
        and s[0] == 1000
        and state[k].ndim == len(s)
        and tuple(state[k].shape[1:]) == s[1:]
        and state[k].shape[0] != 1000
    }
    return found.pop() if len(found) == 1 else None


def _guess_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """A common torchvision builder with the same keys and shapes (any number of classes)."""
    for name in _COMMON_ARCHS:
        ref, st = _signature(name), _remap_legacy(name, state)
        if ref is None or set(ref) != set(st):
            continue
        if all(
            tuple(st[k].shape) == s or (s and s[0] == 1000 and tuple(st[k].shape[1:]) == s[1:])
            for k, s in ref.items()
        ):
            return name
    return None


def _check_fit(
    path: Path, name: str, state: Mapping[str, torch.Tensor], model: nn.Module, explicit: bool
) -> None:
    ref = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in ref if k not in state]
    unexpected = [k for k in state if k not in ref]
    wrong = [k for k, s in ref.items() if k in state and tuple(state[k].shape) != s]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {ref[k]}" for k in wrong]
    if not (missing or unexpected or shapes):
        return
    parts = [
        f"{len(missing)} missing keys" + (f" ({_some(missing)})" if missing else ""),
        f"{len(unexpected)} unexpected keys" + (f" ({_some(unexpected)})" if unexpected else ""),
        f"{len(shapes)} shape mismatches" + (f" ({'; '.join(shapes)})" if shapes else ""),
    ]
    heads = _classifier_keys(model)
    # Only the classifier differing in its first dimension means another number of classes.
    head_only = all(
        k in heads and state[k].ndim == len(ref[k]) and tuple(state[k].shape[1:]) == ref[k][1:]
        for k in wrong
    )
    guess = _guess_arch(state)
    if guess and guess != name:
        hint = f"wrong --arch? the file looks like {guess}"
    elif wrong and head_only and not (missing or unexpected):
        hint = (
            "a different number of classes? " + ("check" if explicit else "pass") + " --num-classes"
        )
    else:
        hint = f"wrong --arch? {_LIST_HINT}"
    raise ModelLoadError(f"{path} does not fit --arch {name}: {', '.join(parts)}", hint)


def _classifier_keys(model: nn.Module) -> set[str]:
    """Parameter names of the classifier: the last Linear/Conv2d, and any Linear with as many
    outputs (auxiliary heads such as inception's AuxLogits.fc)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        return set()
    last = layers[-1][1]
    outs = last.out_features if isinstance(last, nn.Linear) else last.out_channels
    names = {layers[-1][0]} | {
        n for n, m in layers if isinstance(m, nn.Linear) and m.out_features == outs
    }
    return {f"{n}.{p}" for n in names for p in ("weight", "bias")}


# --- small helpers -----------------------------------------------------------------------


def _is_tensor_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _looks_like_path(spec: str) -> bool:
    has_separator = any(sep and sep in spec for sep in ("/", os.sep, os.altsep))
    return has_separator or spec.lower().endswith(_MODEL_SUFFIXES)


def _sniff(path: Path) -> str:
    """What a file holds, judged from its bytes alone (nothing is unpickled)."""
    with open(path, "rb") as fh:
        head = fh.read(32)
    if not head:
        return "empty"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            return "unknown"
        if any(
            n in ("archive_format", "serialized_exported_program.json")
            or n.endswith("/archive_format")
            for n in names
        ):
            return "export"  # the torch.export layout, or the one before it (torch < 2.7)
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        return "torch_zip" if any(n.endswith("data.pkl") for n in names) else "zip"
    if head[:1] == b"\x80":  # pickle protocol opcode; torch.save's legacy format adds its magic
        return "torch_legacy" if _TORCH_LEGACY_MAGIC in head else "pickle"
    if (
        len(head) > 8
        and head[8:9] == b"{"
        and int.from_bytes(head[:8], "little") < path.stat().st_size
    ):
        return "safetensors"  # 8-byte little-endian header length, then the JSON header
    return "unknown"


def _describe(path: Path, kind: str) -> str:
    if kind == "empty":
        return "the file is empty"
    if kind in ("zip", "pickle"):
        return f"a {'zip archive' if kind == 'zip' else 'Python pickle'} not written by torch"
    with open(path, "rb") as fh:
        head = fh.read(24)
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive that cannot be read: damaged or truncated"
    text = head.decode("utf-8", errors="replace")
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"it starts with the text {text.splitlines()[0][:20]!r}"
    return f"unrecognised binary data starting {head[:8].hex()}"


def _pickled_class(path: Path) -> str:
    """The first non-tensor global a torch.save file's pickle names (nothing runs)."""
    try:
        with zipfile.ZipFile(path) as zf:
            data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    except Exception:  # the legacy format: the pickle is the file itself
        data = path.read_bytes()
    return _pickled_global(data) or "nn.Module or other code objects"


def _some(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
