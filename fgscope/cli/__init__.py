"""The `fgscope` command: one small file per command, composed into one Typer app.

Commands parse options, build a config, call the library and turn an `FgscopeError` into a
one-line message and an exit code. Heavy imports (torch, torchvision) happen inside commands,
so `fgscope --help` answers at once.
"""

from __future__ import annotations

import typer

from fgscope.cli import advise as _advise
from fgscope.cli import cam as _cam
from fgscope.cli import dump as _dump
from fgscope.cli import layers as _layers
from fgscope.cli import probe as _probe
from fgscope.cli import report as _report
from fgscope.cli import similarity as _similarity
from fgscope.cli import summary as _summary
from fgscope.cli import synthetic as _synthetic
from fgscope.cli import units as _units
from fgscope.cli._command import Command, Group

__all__ = ["app", "main"]

app = typer.Typer(
    name="fgscope",
    help="See and measure how a CNN's features change with depth.",
    no_args_is_help=True,
    add_completion=True,  # Typer's --install-completion / --show-completion (bash, zsh, fish, pwsh)
    cls=Group,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstrings are reflowed paragraphs, `code` rendered
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from fgscope import __version__

        typer.echo(f"fgscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
    verbose: bool = typer.Option(
        False, "--verbose", "-v", help="Also show torch's own warnings and log messages."
    ),
) -> None:
    """See and measure how a CNN's features change with depth.

    Every command loads a model (a torchvision name or a file), runs it on CPU or CUDA, and
    records what each layer produced. Start with `fgscope summary` (no images needed).
    """
    from fgscope.cli._common import set_verbose

    set_verbose(verbose)


# One line per command; each command lives in its own file.
app.command("layers", cls=Command)(_layers.layers)
app.command("summary", cls=Command)(_summary.summary)
app.command("dump", cls=Command)(_dump.dump)
app.command("dump-merge", cls=Command)(_dump.dump_merge)
app.command("probe", cls=Command)(_probe.probe)
app.command("similarity", cls=Command)(_similarity.similarity)
app.command("cam", cls=Command)(_cam.cam)
app.command("advise", cls=Command)(_advise.advise)
app.command("report", cls=Command)(_report.report)
app.command("synthetic", cls=Command)(_synthetic.synthetic)
app.command("units", cls=Command)(_units.units)


def main() -> None:
    """Console-script entry point."""
    app()
