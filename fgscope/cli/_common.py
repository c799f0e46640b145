"""Options shared by several commands, and the mapping of errors to exit codes."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from fgscope.errors import FgscopeError

__all__ = [
    "OutOpt",
    "OverwriteOpt",
    "FoldsOpt",
    "SeedOpt",
    "MaxPerClassOpt",
    "ModelArg",
    "LayersOpt",
    "WeightsOpt",
    "ArchOpt",
    "TrustOpt",
    "SizeOpt",
    "MeanOpt",
    "StdOpt",
    "NumClassesOpt",
    "DeviceOpt",
    "DtypeOpt",
    "guarded",
    "print_error",
    "set_verbose",
    "err_console",
    "model_kwargs",
]

ModelArg = Annotated[
    str,
    typer.Argument(
        help="torchvision name (resnet50, torchvision:resnet50:IMAGENET1K_V2) or a model file "
        "(.pt/.pth state_dict or checkpoint with --arch, .pt2 export, TorchScript, pickled module with --trust).",
        show_default=True,
    ),
]
LayersOpt = Annotated[
    str,
    typer.Option(
        "--layers",
        "-l",
        help="all | blocks | stages | names, globs ('layer*') or regexes ('re:^layer[12]$'), comma-separated.",
    ),
]
WeightsOpt = Annotated[
    str,
    typer.Option(help="torchvision weights: default, a name (IMAGENET1K_V2) or none (random init)."),
]
ArchOpt = Annotated[
    str | None, typer.Option(help="torchvision architecture for a state_dict file, e.g. resnet50.")
]
TrustOpt = Annotated[
    bool,
    typer.Option(
        "--trust", help="Allow unpickling a whole model file (this runs code from the file)."
    ),
]
SizeOpt = Annotated[
    int | None, typer.Option(help="Input side in pixels (default: the weights' own, else 224).")
]
MeanOpt = Annotated[
    tuple[float, float, float] | None,
    typer.Option(help="Normalisation mean per channel (default: the weights' own, else ImageNet)."),
]
StdOpt = Annotated[
    tuple[float, float, float] | None,
    typer.Option(help="Normalisation std per channel (default: the weights' own, else ImageNet)."),
]
NumClassesOpt = Annotated[
    int | None,
    typer.Option(
        "--num-classes",
        min=1,
        help="Classes of a state_dict's classifier when they cannot be inferred.",
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N | mps.")]
DtypeOpt = Annotated[
    str, typer.Option(help="float32 | float16 | bfloat16 (autocast where supported).")
]

OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Output folder (default: a new one under fgscope-out/)."),
]
OverwriteOpt = Annotated[
    bool, typer.Option(help="Reuse --out even if it holds files (they are replaced).")
]
FoldsOpt = Annotated[int, typer.Option(help="Folds of the stratified cross-validation.")]
SeedOpt = Annotated[
    int,
    typer.Option(help="Seed of folds, subsampling, projections and random init (--weights none)."),
]
MaxPerClassOpt = Annotated[
    int | None, typer.Option(help="Use at most this many images per class (seeded subset).")
]

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def model_kwargs(
    weights: str,
    arch: str | None,
    trust: bool,
    size: int | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    num_classes: int | None = None,
) -> dict:
    """Keyword arguments for `fgscope.models.load_model` from the shared options."""
    return {
        "weights": None if weights.lower() == "none" else weights,
        "arch": arch,
        "trust": trust,
        "size": size,
        "mean": mean,
        "std": std,
        "num_classes": num_classes,
    }


_VERBOSE = {"on": False}  # set by the root `--verbose` option (fgscope/cli/__init__.py)


def set_verbose(on: bool) -> None:
    """Show torch's own warnings and log records (hidden by default, see `guarded`)."""
    _VERBOSE["on"] = bool(on)


@contextlib.contextmanager
def _quiet_libraries(verbose: bool) -> Iterator[None]:
    """Hide torch's internal warnings and logging while a command runs, unless `--verbose`.

    torch.export and torch.serialization log whole tracebacks (`log.warning(..., exc_info=True)`)
    before fgscope turns the same failure into its one-line error, and a log record whose
    arguments do not match its format prints `--- Logging error ---` blocks; neither helps a
    user. Everything is restored afterwards (the CLI runs in-process in tests and notebooks)."""
    if verbose:
        yield
        return
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("torch", "torchvision", "PIL", "matplotlib")]
    levels = [lg.level for lg in loggers]
    raise_exceptions = logging.raiseExceptions
    try:
        logging.raiseExceptions = False  # a broken record is dropped, not printed
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.raiseExceptions = raise_exceptions
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def print_error(console: Console, text: str) -> None:
    """`error: TEXT` on one line. TEXT is printed as plain text: paths, layer names like
    `features.0[1]` and file names like `a[b]c.jpg` are never read as rich markup."""
    console.print(Text.assemble(("error:", "bold red"), " ", " ".join(str(text).split())))


@contextlib.contextmanager
def guarded(console: Console | None = None) -> Iterator[None]:
    """Turn an `FgscopeError` into `error: <one line>` on stderr and its exit code;
    Ctrl-C into exit code 130 with what was written kept; library noise hidden unless
    `--verbose`."""
    console = console or err_console
    try:
        with _quiet_libraries(_VERBOSE["on"]):
            yield
    except FgscopeError as exc:
        if _VERBOSE["on"] and exc.__cause__ is not None:  # what torch said, for a bug report
            import traceback

            console.print("".join(traceback.format_exception(exc.__cause__)).rstrip(), markup=False)
        print_error(console, str(exc))
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/]: files already written are complete and kept.")
        raise typer.Exit(130) from None
    except MemoryError:
        print_error(console, "out of memory (try a smaller --batch-size or --size)")
        sys.exit(9)
