"""The run folders a report is built from: what each is (its manifest's `command`) and its JSON.

`load_runs` turns folders into `Runs` (at most one of each kind, several Grad-CAM runs); a
report folder stands for the runs inside it. Errors are one-line `ConfigError`s naming the
folder and saying what a report can read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fgscope.errors import ConfigError

__all__ = ["RUN_KINDS", "RunFolder", "Runs", "load_runs", "read_json", "model_name"]

RUN_KINDS = ("layers", "cam", "probe", "advise", "similarity", "dump", "units")
_HINT = "pass output folders of fgscope layers, cam, probe, advise, similarity, dump, units or report"


@dataclass(frozen=True)
class RunFolder:
    """One earlier run: its kind (the command that wrote it), folder and manifest."""

    kind: str
    path: Path
    manifest: dict[str, Any]


@dataclass(frozen=True)
class Runs:
    """The run folders a report is built from (at most one of each kind; several CAMs).

    Attributes:
        hierarchy_npz: saved energy maps for the paper hierarchy figure (`hierarchy.npz` of a
            report folder, or of a layers folder that saves it), when there is one.
    """

    layers: RunFolder | None = None
    cams: tuple[RunFolder, ...] = ()
    probe: RunFolder | None = None
    advise: RunFolder | None = None
    similarity: RunFolder | None = None
    dump: RunFolder | None = None
    units: RunFolder | None = None
    hierarchy_npz: Path | None = None
    all: tuple[RunFolder, ...] = field(default=())


def read_json(path: Path, what: str) -> Any:
    """Parse a run's JSON file.

    Raises:
        ConfigError: missing or not valid JSON (one line naming the file).
    """
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing", hint=f"re-run fgscope {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"{path} is not readable JSON ({exc.__class__.__name__})", hint=f"re-run fgscope {what}"
        ) from None


def _kind(folder: Path) -> tuple[str, dict[str, Any]]:
    if not folder.is_dir():
        raise ConfigError(f"--from {folder}: no such folder", hint=_HINT)
    manifest_path = folder / "manifest.json"
    if (folder / "dump.json").is_file() and not (folder / "index.json").is_file():
        raise ConfigError(
            f"--from {folder} is a dump whose parts have not all finished (no index.json)",
            hint="finish every part (the same fgscope dump command) or run fgscope dump-merge",
        )
    if not manifest_path.is_file():
        index = folder / "index.json"
        if index.is_file():  # a dump keeps its manifest inside index.json
            data = read_json(index, "dump")
            if isinstance(data, dict) and "shards" in data:
                return "dump", dict(data.get("manifest") or {})
        raise ConfigError(f"--from {folder} has no manifest.json", hint=_HINT)
    manifest = read_json(manifest_path, "the command that made it")
    command = manifest.get("command") if isinstance(manifest, dict) else None
    if command == "dump" and "parts" in manifest and (folder.parent.name == "parts"):
        raise ConfigError(
            f"--from {folder} is one part of a sharded dump",
            hint=f"pass the dump folder {folder.parent.parent} once every part has finished",
        )
    if command not in (*RUN_KINDS, "report"):
        raise ConfigError(
            f"--from {folder} was written by `fgscope {command}`, which a report cannot show",
            hint=_HINT,
        )
    return str(command), manifest


def load_runs(folders: Sequence[str | Path]) -> Runs:
    """Find the kind of each folder; a report folder stands for the runs inside it.

    Raises:
        ConfigError: a folder that is missing, has no manifest, was made by another command,
            or a second run of a kind a report shows once.
    """
    if not folders:
        raise ConfigError("--from needs at least one run folder", hint=_HINT)
    found: dict[str, Any] = {"cams": []}
    npz: Path | None = None
    order: list[RunFolder] = []

    def add(folder: Path) -> None:
        nonlocal npz
        kind, manifest = _kind(folder)
        if kind == "report":
            subs = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "manifest.json").is_file())
            for sub in subs:
                add(sub)
            if (folder / "hierarchy.npz").is_file():
                npz = folder / "hierarchy.npz"
            return
        run = RunFolder(kind, folder, manifest)
        order.append(run)
        if kind == "cam":
            found["cams"].append(run)
            return
        if kind in found:
            raise ConfigError(
                f"--from got two {kind} runs ({found[kind].path} and {folder})",
                hint="a report shows one run of each kind (several cam runs are fine)",
            )
        found[kind] = run
        if kind == "layers" and (folder / "hierarchy.npz").is_file() and npz is None:
            npz = folder / "hierarchy.npz"

    for f in folders:
        add(Path(f))
    _one_model(order)
    return Runs(
        layers=found.get("layers"), cams=tuple(found["cams"]), probe=found.get("probe"),
        advise=found.get("advise"), similarity=found.get("similarity"), dump=found.get("dump"),
        units=found.get("units"),
        hierarchy_npz=npz, all=tuple(order),
    )


def _model(manifest: dict[str, Any]) -> dict[str, Any]:
    m = manifest.get("model")
    if isinstance(m, str):
        return {"spec": m}
    return m if isinstance(m, dict) else {}


def model_name(manifest: dict[str, Any]) -> str:
    """The model a run's manifest names (its spec: `resnet50`, `model.pt`), "" if none."""
    m = _model(manifest)
    return str(m.get("spec") or m.get("arch") or "")


def _name_key(m: dict[str, Any]) -> str:
    """A model's name without the `torchvision:` prefix, a `:WEIGHTS` suffix or a folder."""
    spec = str(m.get("spec") or m.get("arch") or "").strip()
    if m.get("kind") in (None, "torchvision") and "/" not in spec and "\\" not in spec:
        spec = spec.removeprefix("torchvision:").partition(":")[0]
    return Path(spec).name.lower()


def _same_model(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Both runs used the same model: the same weights file (sha256) when both record one,
    else the same name (runs from random init or with a bare spec record no hash)."""
    if a.get("sha256") and b.get("sha256"):
        return a["sha256"] == b["sha256"]
    return _name_key(a) == _name_key(b)


def _one_model(runs: Sequence[RunFolder]) -> None:
    """Refuse runs of different models: a report describes one model (similarity's --vs
    model is that run's own business)."""
    groups: list[tuple[dict[str, Any], list[RunFolder]]] = []
    for run in runs:
        m = _model(run.manifest)
        if not (m.get("spec") or m.get("arch")):
            continue
        for rep, members in groups:
            if _same_model(rep, m):
                members.append(run)
                break
        else:
            groups.append((m, [run]))
    if len(groups) > 1:
        parts = [
            f"{rep.get('spec') or rep.get('arch')} ({', '.join(f'{r.kind}: {r.path}' for r in members)})"
            for rep, members in groups
        ]
        raise ConfigError(
            f"--from mixes runs of different models: {' and '.join(parts)}",
            hint="a report describes one model; pass the runs of one model (to compare two "
            "models, run fgscope similarity MODEL IMAGES --vs OTHER and report that)",
        )
