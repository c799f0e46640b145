"""`fgscope similarity`: linear CKA between all selected layers of one model, or of two.

Kornblith, Norouzi, Lee & Hinton 2019 ("Similarity of neural network representations
revisited") compare two layers by linear centred kernel alignment of their representations of
the same n images. A layer's representation of an image is its whole recorded output,
flattened (C*H*W numbers, not pooled, as in the paper): CKA then compares where *and* what a
layer responds to. CKA depends on the features only through the linear Gram matrix
K = X X^T of the images, so it is computed from Grams:

- `minibatch` (the default with at least two batches of images): Nguyen, Raghu & Kornblith
  2021 ("Do wide and deep networks learn the same things?"). For each batch of b images the
  b x b Grams of every layer are formed and the HSIC of every pair of layers is added up;
  CKA = sum HSIC(K, L) / sqrt(sum HSIC(K, K) * sum HSIC(L, L)). Memory never holds more than
  one batch of features and a few b x b matrices, whatever the number of images.
  `cka_debiased` uses the unbiased HSIC of Song et al. 2012, whose minibatch average is
  independent of b and converges to the full debiased CKA; `cka` uses the biased HSIC,
  which equals Kornblith et al.'s CKA for a single batch of all n but is biased upwards for
  small b (compare runs with `cka_debiased`).
- `full`: one "batch" of all n images, i.e. exactly `fgscope.metrics.linear_cka(x, y)` and
  `linear_cka(x, y, debiased=True)`; the features of every image are kept, and n x n Grams.
  Used when asked for, or when there are fewer than two batches of images.

Images are decoded batch by batch and not kept (only path, size and sha256), so `minibatch`
memory is the models, one batch and a few b x b matrices. `--from-dump DIR` reads the stored
layers of a `fgscope dump` instead of running a model (`fgscope.similarity.dumped`: the same
numbers from raw maps, CKA of pooled features from pooled dumps, said in `features`).

Output folder:
    similarity.json            matrices, layer names and stages, method (see `write_outputs`)
    similarity.csv             the CKA matrix, rows = layers of MODEL, columns = layers of the
                               --vs model (or of MODEL again)
    similarity_debiased.csv    the debiased CKA matrix, same layout
    similarity.png             heatmaps with stage colour bars (+ with --vs: CKA of same-named
                               layers against depth)
    manifest.json              versions, models, images, command, timings
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.markup import escape
from torch import Tensor

from fgscope.errors import ConfigError, ImageError
from fgscope.models import LoadedModel, load_model
from fgscope.runs import RunDir, model_entry, new_run_dir, write_json, write_text
from fgscope.similarity.compute import MIN_IMAGES, SimilarityResult, _num, compute_similarity
from fgscope.similarity.figure import similarity_figure

if TYPE_CHECKING:
    from fgscope.progress import ProgressFn

__all__ = ["SimilarityConfig", "run_similarity"]


# --- the command's job ---------------------------------------------------------------------


@dataclass(frozen=True)
class SimilarityConfig:
    """Options of one `fgscope similarity` run (see the command's help for each)."""

    model: str = "mobilenet_v2"
    images: list[str] = field(default_factory=list)
    vs: str | None = None
    layers: str = "stages"
    out: Path | None = None
    overwrite: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    vs_model_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 32
    minibatch: bool = True
    from_dump: Path | None = None
    """Read the layers from this `fgscope dump` folder instead of running `model` (no --vs)."""



def _matrix_csv(rows: list[str], cols: list[str], mat: Tensor) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["layer", *cols])
    for name, vals in zip(rows, mat.tolist()):
        w.writerow([name, *("" if math.isnan(v) else repr(v) for v in vals)])
    return buf.getvalue()


def _matrix_json(mat: Tensor) -> list[list[float | None]]:
    return [[_num(v) for v in row] for row in mat.tolist()]



def run_similarity(
    config: SimilarityConfig, console: Console | None = None, progress: ProgressFn | None = None
) -> tuple[Path, SimilarityResult]:
    """Run the whole `similarity` job; returns the output folder and the measurements.

    `progress`, when given, also receives every phase's updates (`fgscope.progress`: a report
    shows them on its own display).

    Raises:
        FgscopeError: bad models, images, layers or options (before anything is written).
    """
    from fgscope.progress import Phases

    console = console or Console(quiet=True)
    if config.batch_size < 4:
        raise ConfigError(f"--batch-size must be at least 4 for CKA, got {config.batch_size}")
    lm = vlm = dump = None
    with Phases(console, unit="batches", relay=progress) as phases:
        if config.from_dump is not None:
            from fgscope.similarity.dumped import similarity_from_dump
            from fgscope.store.analysis import open_for_analysis

            if config.vs is not None:
                raise ConfigError("--vs needs a model to run: it cannot be used with --from-dump",
                                  hint="dump both models and compare the dumps' layers in Python")
            t0 = time.perf_counter()
            dump = open_for_analysis(config.from_dump)
            t_load = time.perf_counter() - t0
            t0 = time.perf_counter()
            result = similarity_from_dump(
                dump, config.layers, batch_size=config.batch_size, minibatch=config.minibatch,
                progress=lambda done, total: phases.update("CKA", done, total),
            )
        else:
            if not config.images:
                raise ImageError(
                    f"similarity needs at least {MIN_IMAGES} images and none were given",
                    "pass image files or a folder after MODEL",
                )
            t0 = time.perf_counter()
            phases.update("load model", 0)
            lm = load_model(config.model, **config.model_kwargs)
            vlm = load_model(config.vs, **config.vs_model_kwargs) if config.vs is not None else None
            t_load = time.perf_counter() - t0
            t0 = time.perf_counter()
            result = compute_similarity(
                lm, config.images, config.layers, vs=vlm, batch_size=config.batch_size,
                minibatch=config.minibatch, device=config.device, dtype=config.dtype,
                progress=lambda done, total: phases.update("forward and CKA", done, total),
            )
        t_cka = time.perf_counter() - t0
        phases.update("files and figure", 0)
        return _write(config, console, result, lm, vlm, dump, t_load, t_cka)


def _write(config: SimilarityConfig, console: Console, result: SimilarityResult, lm: LoadedModel | None,
           vlm: LoadedModel | None, dump: Any, t_load: float, t_cka: float) -> tuple[Path, SimilarityResult]:
    inputs = [config.from_dump] if dump is not None else config.images
    run = RunDir(new_run_dir(config.out, "similarity", config.overwrite, inputs), "similarity")
    run.time("open_dump" if dump is not None else "load_model", t_load)
    run.time("cka", t_cka)
    run.manifest.update(
        model=model_entry(lm) if lm is not None else dump.index.get("manifest", {}).get("model"),
        vs_model=model_entry(vlm) if vlm is not None else None,
        vs_preprocess=result.vs_preprocess,
        images=[{"path": str(li.path), "sha256": li.sha256, "size": list(li.size)} if li.size is not None
                else {"path": str(li.path)} for li in result.images],
        failures=[{"path": str(f.path), "reason": f.reason} for f in result.failures],
        device=result.device, dtype=result.dtype, layers=config.layers,
        options={k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()},
        notes=list(result.notes), features=result.features,
    )
    if dump is not None:
        run.manifest["from_dump"] = {"path": str(dump.root), "hash": dump.index.get("hash"), "rows": len(dump),
                                     "layers": [dump.layer(n).to_json() for n in result.layers_x]}
    for f in result.failures:
        console.print(f"[yellow]skipped[/] {escape(f.reason)}")
    for note in result.notes:
        console.print(f"[dim]note:[/] {escape(note)}")

    t0 = time.perf_counter()
    data = {
        "model": lm.source.spec if lm is not None else run.manifest["model"] and run.manifest["model"].get("spec"),
        "vs": vlm.source.spec if vlm is not None else None,
        "layers_x": result.layers_x,
        "layers_y": result.layers_y,
        "stages_x": [p.stage for p in result.places_x],
        "stages_y": [p.stage for p in result.places_y],
        "strides_x": [p.stride for p in result.places_x],
        "strides_y": [p.stride for p in result.places_y],
        "n_images": result.n_images,
        "cka": _matrix_json(result.cka),
        "cka_debiased": _matrix_json(result.cka_debiased),
        "method": result.method,
        "batch_size": result.batch_size,
        "n_batches": result.n_batches,
        "features": result.features,
        "from_dump": str(dump.root) if dump is not None else None,
        "vs_preprocess": result.vs_preprocess,
        "notes": list(result.notes),
    }
    if vlm is not None:
        data["diagonal"] = result.diagonal()
    write_json(run.file("similarity.json"), data)
    write_text(run.file("similarity.csv"), _matrix_csv(result.layers_x, result.layers_y, result.cka))
    write_text(
        run.file("similarity_debiased.csv"),
        _matrix_csv(result.layers_x, result.layers_y, result.cka_debiased),
    )
    for name in ("similarity.json", "similarity.csv", "similarity_debiased.csv"):
        run.wrote(run.path / name)
    from fgscope.render import save_figure

    name = _short_name(lm) if lm is not None else Path(str(data["model"] or dump.root)).name
    fig = similarity_figure(result, name, _short_name(vlm) if vlm is not None else None)
    for p in save_figure(fig, run.file("similarity.png")):
        run.wrote(p)
    run.time("files", time.perf_counter() - t0)
    manifest = run.finish()

    _print_summary(console, result, data)
    console.print(
        f"wrote {len(run.manifest['files'])} files to [bold]{escape(str(run.path))}[/] ({manifest.name}, "
        "similarity.json/.csv, similarity_debiased.csv, similarity.png)"
    )
    return run.path, result


def _short_name(lm: LoadedModel) -> str:
    s = lm.source
    if s.kind == "torchvision":
        return s.arch or s.spec
    return Path(s.path).name if s.path else s.spec


def _print_summary(console: Console, result: SimilarityResult, data: dict[str, Any]) -> None:
    """The matrix when it fits (8 columns at most); otherwise one row per layer: its stage,
    CKA to the next layer, and with --vs the same-named and the best-matching layer."""
    from fgscope.render.table import Col, print_table

    d = result.cka_debiased
    title = "debiased linear CKA"

    def cell(v: float) -> str:
        return "–" if math.isnan(v) else f"{v:.2f}"

    head = [Col("layer", "left", wrap=True), Col("stage", "left")]
    if len(result.layers_y) <= 8:
        rows = [[name, result.places_x[i].stage, *(cell(v) for v in d[i].tolist())]
                for i, name in enumerate(result.layers_x)]
        cols = head + [Col(name) for name in result.layers_y]
        caption = None
        if console.is_terminal and not _fits(console, cols, rows):  # columns by number, named below
            cols = head + [Col(f"[{j}]") for j in range(len(result.layers_y))]
            caption = "columns: " + ", ".join(f"[{j}] {c}" for j, c in enumerate(result.layers_y))
        print_table(console, title, cols, rows, caption=caption)
    elif result.vs_model is None:
        cols = head + [Col("to next"), Col("to first"), Col("to last")]
        rows = []
        for i, name in enumerate(result.layers_x):
            nxt = cell(float(d[i, i + 1])) if i + 1 < len(result.layers_x) else ""
            rows.append([name, result.places_x[i].stage, nxt, cell(float(d[i, 0])), cell(float(d[i, -1]))])
        print_table(console, title, cols, rows)
    else:
        same = {r["layer"]: r for r in data.get("diagonal", [])}
        cols = head + [Col("same layer"), Col("best match in --vs", "left", wrap=True), Col("CKA")]
        rows = []
        for i, name in enumerate(result.layers_x):
            row = torch.nan_to_num(d[i], nan=-math.inf)
            j = int(row.argmax())
            s_ = same.get(name, {}).get("cka_debiased")
            rows.append([name, result.places_x[i].stage, "" if s_ is None else f"{s_:.2f}",
                         result.layers_y[j], cell(float(d[i, j]))])
        print_table(console, title, cols, rows)
    if data.get("diagonal"):
        worst = data["diagonal"][:3]
        text = ", ".join(
            f"{r['layer']} {r['cka_debiased']:.3f}" for r in worst if r["cka_debiased"] is not None
        )
        console.print(f"largest change against --vs (debiased CKA): {text}", markup=False)


def _fits(console: Console, cols: list[Any], rows: list[list[Any]]) -> bool:
    """Every column fits the terminal without wrapping a name."""
    from fgscope.render.table import fit_columns

    keep, wrap = fit_columns(console, cols, rows, console.width)
    return len(keep) == len(cols) and wrap is None
