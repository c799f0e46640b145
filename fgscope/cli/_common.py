"""How every command runs: errors mapped to one line and an exit code, library noise hidden
unless `--verbose` (the shared options live in `fgscope.cli.options`)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from fgscope.errors import FgscopeError
from fgscope.notes import Note

__all__ = ["guarded", "run_job", "print_error", "print_warning", "print_note", "set_verbose", "err_console"]

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


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


@contextlib.contextmanager
def _own_warnings(console: Console) -> Iterator[None]:
    """fgscope's own warnings (e.g. `fgscope.runs.OutputRedirected`: --out held files, so the
    run went to DIR-2) as `warning: TEXT` lines on stderr, each at once; other warnings go
    where they would have gone (hidden unless --verbose, see `_quiet_libraries`)."""
    import warnings

    with warnings.catch_warnings():
        previous = warnings.showwarning
        noted: set[str] = set()

        def show(message: Any, category: type[Warning], *args: Any, **kwargs: Any) -> None:
            if category.__module__.split(".")[0] != "fgscope":
                previous(message, category, *args, **kwargs)
            elif issubclass(category, Note):
                if str(message) not in noted:  # once per command
                    noted.add(str(message))
                    print_note(Console(highlight=False, soft_wrap=True), str(message))
            else:
                print_warning(console, str(message))

        warnings.showwarning = show
        from fgscope.runs import OutputRedirected

        warnings.simplefilter("always", OutputRedirected)
        warnings.simplefilter("always", Note)
        yield


def print_note(console: Console, text: str) -> None:
    """`note: TEXT` on one line (stdout), TEXT as plain text: a model note
    (`fgscope.notes.Note`: what can be recorded from a .pt2 or TorchScript model, which of a
    wrapper's outputs is used)."""
    console.print(Text.assemble(("note:", "yellow"), " ", " ".join(str(text).split())))


def print_warning(console: Console, text: str) -> None:
    """`warning: TEXT` on one line, TEXT as plain text (never rich markup)."""
    console.print(Text.assemble(("warning:", "yellow"), " ", " ".join(str(text).split())))


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
        with _quiet_libraries(_VERBOSE["on"]), _own_warnings(console):
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


def run_job(
    job: Callable[[Console], Any], *, tune: bool = True, max_layers: int | None = None
) -> None:
    """Run one command's library job under `guarded`, printing to the terminal.

    Args:
        job: builds the job's config and runs it with the console it is given.
        tune: tune the host allocator first (commands that run a model; see
            `fgscope.device.tune_host_allocator`).
        max_layers: `--max-layers`: how many layers globs and regexes of `--layers` may
            select (`fgscope.selection.layer_limit`); None leaves the library's default
            (and imports no torch, for `report --from`).
    """
    console = Console(highlight=False)
    with guarded():
        if tune:
            from fgscope.device import tune_host_allocator

            tune_host_allocator()
        if max_layers is None:
            job(console)
            return
        from fgscope.selection import layer_limit

        with layer_limit(max_layers):
            job(console)
