"""Hugging Face transformers vision models from a local `save_pretrained` folder (`hf:PATH`,
the optional extra `fgscope[hf]`), with the preprocessing of their saved image processor and
the class names of their config.

transformers is imported only here, and only for an `hf:` spec. Loading never runs code from
the folder: `trust_remote_code=False`, files only (`local_files_only=True`), safetensors when
the folder has them, else torch's `weights_only` unpickler.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from fgscope.errors import ConfigError, ModelLoadError
from fgscope.models.hub import _sha256
from fgscope.models.types import ModelSource, Preprocess, _first_line, _Resolved

__all__ = ["HFImageModel"]

_EXTRA_HINT = "pip install 'fgscope[hf]'"
# The CNNs whose loading, preprocessing and module tree fgscope's tests check; other image
# models of transformers load too, with a note.
_CHECKED = ("convnext", "convnextv2", "resnet", "regnet", "mobilenet_v2")
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling values
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


class HFImageModel(nn.Module):
    """A transformers image model behind `forward(pixel_values) -> tensor`.

    The transformers model is the child `model`, so its own module names follow:
    `model.convnext.encoder.stages.0`, `model.resnet.embedder`, `model.classifier`.
    The output is the classification logits (N, num_labels) of a `*ForImageClassification`
    model; of a bare backbone (`ConvNextModel`, `ResNetModel`) it is the pooled features
    (N, C), flattened (ResNet's pooler keeps (N, C, 1, 1)).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=pixel_values, return_dict=True)
        logits = getattr(out, "logits", None)
        if logits is not None:
            return logits
        return torch.flatten(out.pooler_output, 1)


def _transformers(spec: str) -> ModuleType:
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError(f"{spec} needs the optional extra: {_EXTRA_HINT}") from exc
    return transformers


@contextlib.contextmanager
def _quiet(transformers: ModuleType) -> Iterator[None]:
    """transformers' progress bars and info logs off while loading (the library never prints)."""
    logging = transformers.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _folder(spec: str) -> Path:
    text = spec.strip()[len("hf:") :].strip()
    if not text:
        raise ModelLoadError(
            f"{spec!r} names no folder", "write hf:PATH (a save_pretrained folder)"
        )
    path = Path(text).expanduser().absolute()
    if not path.is_dir():
        what = "is a file" if path.exists() else "not found"
        raise ModelLoadError(
            f"hf: needs a save_pretrained folder; {path} {what}",
            "pass the folder that holds config.json (fgscope reads no hub model ids: nothing is downloaded)",
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json: not a save_pretrained folder")
    return path


def _from_hf(spec: str, weights: str | None) -> _Resolved:
    """`hf:PATH`: the model of a `save_pretrained` folder (random init with weights 'none')."""
    path = _folder(spec)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"{path}/config.json is not readable JSON ({_first_line(exc)})"
        ) from exc
    if not isinstance(raw, dict) or not raw.get("model_type"):
        raise ModelLoadError(f"{path}/config.json names no model_type: not a transformers model")
    if raw.get("auto_map"):
        raise ModelLoadError(
            f"{path} needs its own Python code (config.json has auto_map), which fgscope never runs",
            "save the model with a transformers class, or load it yourself and pass the module",
        )
    wanted = "none" if weights is None else str(weights).strip().lower()
    if wanted not in ("default", "none", "random"):
        raise ConfigError(
            f"--weights {weights} does not apply to {spec}: the folder holds its own weights",
            "drop --weights, or --weights none for random init",
        )
    tf = _transformers(spec.strip())
    archs = raw.get("architectures") or []
    classify = any(str(a).endswith("ForImageClassification") for a in archs)
    auto = tf.AutoModelForImageClassification if classify else tf.AutoModel
    kind = raw["model_type"]
    notes: list[str] = []
    if kind not in _CHECKED:
        notes.append(f"transformers model type {kind!r} is not one fgscope's tests check")
    if not classify:
        notes.append(
            f"{archs[0] if archs else kind} has no classifier: the output is its pooled features"
        )
    weights_file = next((path / f for f in _WEIGHT_FILES if (path / f).is_file()), None)
    with _quiet(tf):
        try:
            config = tf.AutoConfig.from_pretrained(
                str(path), local_files_only=True, trust_remote_code=False
            )
            if wanted != "default":
                model = auto.from_config(config, trust_remote_code=False)
            else:
                model = auto.from_pretrained(
                    str(path),
                    local_files_only=True,
                    trust_remote_code=False,
                    use_safetensors=weights_file is not None,
                    **_weights_only(tf),
                )
        except Exception as exc:
            raise ModelLoadError(
                f"{path} does not load with transformers ({_first_line(exc)})"
            ) from exc
    pre = _processor_preprocess(tf, path, notes)
    labels = _labels(config) if classify else None
    digest = None
    if wanted == "default":
        found = weights_file or next(iter(sorted(path.glob("*.bin"))), None)
        digest = _sha256(found) if found and found.suffix != ".json" else None
    source = ModelSource(spec, "hf", type(model).__name__, None, str(path), digest, tuple(notes))
    n = len(labels) if labels else getattr(config, "num_labels", None) if classify else None
    return _Resolved(HFImageModel(model.eval()).eval(), pre, n, labels, source)


def _weights_only(tf: ModuleType) -> dict[str, bool]:
    """`weights_only=True` where from_pretrained takes it (transformers 5); transformers 4.37+
    reads .bin files with torch's weights_only unpickler anyway."""
    params = inspect.signature(tf.PreTrainedModel.from_pretrained).parameters
    return {"weights_only": True} if "weights_only" in params else {}


def _labels(config: Any) -> tuple[str, ...] | None:
    """config.id2label in index order; None for transformers' placeholders (LABEL_0, ...)."""
    id2label = getattr(config, "id2label", None) or {}
    try:
        names = [str(id2label[i]) for i in range(len(id2label))]
    except KeyError:
        return None
    if not names or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return None
    return tuple(names)


def _processor_preprocess(tf: ModuleType, path: Path, notes: list[str]) -> Preprocess | None:
    """The saved image processor as a `Preprocess` (None, with a note, when there is none).

    ConvNext's processor (also used by ResNet and RegNet checkpoints): below 384 px the shorter
    side is resized to int(shortest_edge / crop_pct) and center-cropped to shortest_edge; at
    384 and above the image is resized to a square. Others: the `size` resize (shorter side
    or height x width), then `crop_size` when `do_center_crop`.
    """
    if not (path / "preprocessor_config.json").is_file():
        notes.append(
            "no preprocessor_config.json: ImageNet preprocessing unless --size/--mean/--std"
        )
        return None
    try:
        proc = tf.AutoImageProcessor.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:
        raise ModelLoadError(
            f"{path}/preprocessor_config.json does not load ({_first_line(exc)})"
        ) from exc
    size, crop = _get(proc, "size"), _get(proc, "crop_size")
    resample = getattr(proc, "resample", 2)
    interp = _RESAMPLE.get(int(getattr(resample, "value", resample)), None)
    if interp is None:
        notes.append(f"the image processor's resample {resample!r} is approximated with bicubic")
        interp = "bicubic"
    if getattr(proc, "do_normalize", True):
        mean, std = tuple(proc.image_mean), tuple(proc.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    factor = getattr(proc, "rescale_factor", 1 / 255) if getattr(proc, "do_rescale", True) else 1
    if abs(factor * 255 - 1) > 1e-6:  # fgscope scales pixels to [0, 1] and normalizes after
        mean = tuple(m / (factor * 255) for m in mean)
        std = tuple(s / (factor * 255) for s in std)
    short, hw = size.get("shortest_edge"), (size.get("height"), size.get("width"))
    crop_pct = getattr(proc, "crop_pct", None)
    if not getattr(proc, "do_resize", True):
        notes.append("the image processor does not resize; fgscope center-crops to 224")
        return Preprocess((224, 224), 224, mean, std, interp)
    if short and crop_pct is not None:  # ConvNextImageProcessor
        if short < 384:
            return Preprocess((short, short), int(short / crop_pct), mean, std, interp)
        return Preprocess((short, short), None, mean, std, interp)
    if getattr(proc, "do_center_crop", False) and crop.get("height"):
        out = (int(crop["height"]), int(crop["width"]))
        if short:
            return Preprocess(out, int(short), mean, std, interp)
        if all(hw):
            if tuple(hw) != out:
                notes.append(
                    f"resize to {hw[0]}x{hw[1]} before the crop is approximated by a shorter-side resize"
                )
            return Preprocess(out, int(min(hw)), mean, std, interp)
    if all(hw):
        return Preprocess((int(hw[0]), int(hw[1])), None, mean, std, interp)
    if short:
        notes.append("the image processor keeps the aspect ratio; fgscope center-crops to a square")
        return Preprocess((int(short), int(short)), int(short), mean, std, interp)
    notes.append(f"image processor size {size} not understood: ImageNet preprocessing")
    return None


def _get(proc: Any, name: str) -> dict[str, Any]:
    """A processor's size dict (a plain dict, or transformers 5's SizeDict)."""
    value = getattr(proc, name, None)
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if isinstance(value, int):
        return {"height": value, "width": value}
    return {k: getattr(value, k, None) for k in ("shortest_edge", "height", "width")}


def _is_hf_folder(path: str | os.PathLike) -> bool:
    """A folder that `hf:` would read (it holds a transformers config.json)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()
