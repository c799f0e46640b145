"""The `fgscope advise` job: options (`AdviseConfig`) and `run_advise`, which probes (or reads
an earlier probe run), applies the rules of `fgscope.advise.rules` and writes advice.md and
advice.json into a new run folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from fgscope.advise.rules import Advice, make_advice
from fgscope.errors import ConfigError
from fgscope.probe import ProbeConfig, check_pools
from fgscope.runs import RunDir, new_run_dir, write_json, write_text

if TYPE_CHECKING:
    from rich.console import Console

__all__ = [
    "AdviseConfig",
    "run_advise",
    # re-exported from fgscope.advise.rules
    "Advice",
    "make_advice",
]


@dataclass(frozen=True)
class AdviseConfig:
    """Options of one `fgscope advise` run.

    Attributes:
        model, data: as for `fgscope probe` (unused with `from_probe`).
        part_size: size in input pixels of the parts that tell the fine classes apart.
        coarse_map: fine -> coarse JSON (the over-compression rule needs coarse curves).
        pools: poolings to probe (default: avg, bilinear, hypercolumn).
        layers: layer selection.
        from_probe: reuse the probe.json of this `fgscope probe` run folder instead of probing.
        from_dump: probe the pooled features of this `fgscope dump` folder (no model runs).
        pools_given: the poolings were asked for; when not, a dump is probed with those of
            the default poolings it can give (`fgscope.probe.dumped.dump_pools`).
        Other fields: as `ProbeConfig`.
    """

    model: str = "mobilenet_v2"
    data: Path | None = None
    part_size: int | None = None
    coarse_map: Path | None = None
    pools: tuple[str, ...] = ("avg", "bilinear", "hypercolumn")
    layers: str = "stages"
    out: Path | None = None
    overwrite: bool = False
    from_probe: Path | None = None
    from_dump: Path | None = None
    pools_given: bool = True
    folds: int = 5
    seed: int = 0
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 32
    max_per_class: int | None = None
    c: float = 1.0

    def probe_config(self) -> ProbeConfig:
        if self.data is None and self.from_dump is None:
            raise ConfigError("advise needs DATA (an ImageFolder) or --from-probe DIR")
        return ProbeConfig(
            model=self.model, data=self.data or Path("."), from_dump=self.from_dump, layers=self.layers, pools=self.pools,
            coarse_map=self.coarse_map, folds=self.folds, seed=self.seed, out=self.out,
            overwrite=self.overwrite, model_kwargs=self.model_kwargs, device=self.device,
            dtype=self.dtype, batch_size=self.batch_size, max_per_class=self.max_per_class, c=self.c,
        )

    def check(self) -> None:
        if self.part_size is not None and self.part_size < 1:
            raise ConfigError(f"--part-size must be a positive number of pixels, got {self.part_size}")
        if self.from_probe is not None and self.from_dump is not None:
            raise ConfigError("--from-probe and --from-dump exclude each other",
                              hint="pass one: a probe run folder, or a dump folder")
        if self.from_probe is None:
            self.probe_config().check()
        else:
            check_pools(self.pools)


def run_advise(config: AdviseConfig, console: Console | None = None) -> tuple[Path, Advice]:
    """Probe (or read a probe run), then write advice.md and advice.json (plus the probe files
    when it probed) into a new run folder; returns the folder and the advice.

    Raises:
        FgscopeError: bad options, data or probe folder (before anything is written).
    """
    from rich.console import Console
    from rich.markdown import Markdown

    from fgscope.probe import (
        load_probe,
        print_summary,
        probe,
        seed_everything,
        write_manifest_inputs,
        write_probe_files,
    )

    console = console or Console(quiet=True)
    config.check()
    t0 = started = time.perf_counter()
    dump = rows = None
    if config.from_probe is not None:
        data = load_probe(config.from_probe)
        result = None
    elif config.from_dump is not None:
        from fgscope.probe import dump_pools, probe_dump
        from fgscope.progress import Phases
        from fgscope.store.analysis import open_for_analysis, pick_layers

        pc = config.probe_config()
        dump = open_for_analysis(pc.from_dump)  # type: ignore[arg-type]
        pools = pc.pools
        if not config.pools_given:  # the defaults this dump can give (avg at least, if it can)
            pools = tuple(p for p in pools if p in dump_pools(dump, pick_layers(dump, pc.layers))) or pools
        with Phases(console, unit="rows") as phases:
            result, feats, rows = probe_dump(
                dump, pc.layers, pools, coarse_map=pc.coarse_map, folds=pc.folds, seed=pc.seed,
                c=pc.c, max_per_class=pc.max_per_class, progress=phases.update,
            )
        data = result.to_json()
    else:
        from fgscope.models import load_model

        pc = config.probe_config()
        seed_everything(pc.seed)
        lm = load_model(pc.model, **pc.model_kwargs)
        result, feats = probe(lm, pc.data, pc.layers, pc.pools, coarse_map=pc.coarse_map, folds=pc.folds,
                          seed=pc.seed, c=pc.c, device=pc.device, dtype=pc.dtype,
                          batch_size=pc.batch_size, max_per_class=pc.max_per_class, console=console)
        data = result.to_json()
    t_probe = time.perf_counter() - t0
    advice = make_advice(data, config.part_size)
    run = RunDir(new_run_dir(config.out, "advise", config.overwrite, [config.data, config.from_probe, config.from_dump, config.coarse_map]), "advise", started=started)
    run.time("probe" if result is not None else "read_probe", t_probe)
    if dump is not None:
        from fgscope.probe import dump_manifest_inputs

        dump_manifest_inputs(run, dump, rows, pc, result.notes)
    elif result is not None:
        write_manifest_inputs(run, lm, pc, result, feats)
    else:
        run.manifest.update(model={"spec": data.get("model")}, data=data.get("data"))
    run.manifest.update(
        from_probe=str(config.from_probe) if config.from_probe else None,
        **({} if dump is None else {"from_dump_folder": str(dump.root)}),
        options={k: (str(v) if isinstance(v, Path) else v) for k, v in config.__dict__.items()},
    )
    if result is not None:
        write_probe_files(run, result)
        print_summary(console, result)
    write_text(run.file("advice.md"), "# fgscope advice\n\n" + f"Model `{data.get('model')}`, data "
               f"`{data.get('data')}`.\n\n" + advice.text)
    write_json(run.file("advice.json"), advice.to_json())
    run.wrote(run.path / "advice.md")
    run.wrote(run.path / "advice.json")
    run.finish()
    console.print(Markdown(advice.text))
    console.print(f"wrote {len(run.manifest['files']) + 1} files to [bold]{escape(str(run.path))}[/]")
    return run.path, advice
