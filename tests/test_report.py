"""fgscope report: the page (well-formed, self-contained, exactly the sections whose results
exist), the figures for papers in every format, `--from` without recomputing, bad input.

A small random-init ResNet-18 at 64 px on tiny generated images keeps this fast; one slow
test runs the documented command on the embedded MobileNetV2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fgscope.cli import app
from fgscope.errors import ConfigError
from fgscope.report import html as page_html
from fgscope.report import panels, paper, plots, runs, sections
from fgscope.report.run import ReportConfig, load_hierarchy, run_report

runner = CliRunner()
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
ALWAYS = {"summary", "table", "hierarchy", "geometry", "grids", "figures", "references"}
MODEL = {"model": "resnet18", "model_kwargs": {"weights": None, "size": 64}, "device": "cpu"}


# --- checking a page ---------------------------------------------------------------------------


class _Checker(HTMLParser):
    """Balanced tags, and every src/href/<link>/<script src> the page refers to."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.refs: list[tuple[str, str, str]] = []  # (tag, attribute, value)
        self.ids: list[str] = []
        self.sections: list[str] = []

    def handle_starttag(self, tag, attrs):
        self._attrs(tag, attrs)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self._attrs(tag, attrs)

    def _attrs(self, tag, attrs):
        d = dict(attrs)
        for a in ("src", "href", "srcset", "data", "poster", "action"):
            if a in d:
                self.refs.append((tag, a, d[a] or ""))
        if tag == "link":
            self.problems.append(f"<link {d}>")
        if tag == "script" and "src" in d:
            self.problems.append("<script src>")
        if "id" in d:
            self.ids.append(d["id"])
        if tag == "section":
            self.sections.append(d.get("id", "?"))

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()


def check_page(path: Path) -> list[str]:
    """Assert the page is well-formed and self-contained; return its section ids in order."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    ET.fromstring(text.split("\n", 1)[1])  # also well-formed XML (XHTML-compatible markup)
    c = _Checker()
    c.feed(text)
    c.close()
    assert c.problems == [] and c.stack == []
    assert len(c.ids) == len(set(c.ids)), "duplicate ids"
    for tag, attr, value in c.refs:
        assert not re.match(r"\s*(https?:)?//", value, re.I), (tag, attr, value[:80])
        if tag == "img":
            assert value.startswith("data:image/png;base64,"), value[:40]
        if tag == "a":
            assert value.startswith("#") and value[1:] in c.ids, value  # in-page links only
    assert not re.search(r"https?://", text), "no URL anywhere, not even in text"
    assert "@import" not in text and "url(" not in text
    for block in re.findall(r"<script>(.*?)</script>", text, re.S):
        assert "<" not in block and "&" not in block
    return c.sections


def _png(path: Path, size=(40, 30), colour=(200, 60, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _manifest(folder: Path, command: str, **extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"command": command, **extra}))


def _pdftoppm() -> str:
    exe = shutil.which("pdftoppm")
    if exe is None:
        msg = "pdftoppm is missing (Debian: poppler-utils; `make test` installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return exe


# --- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    out = []
    for i in range(4):
        p = root / f"img{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(p)
        out.append(str(p))
    return out


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """An ImageFolder: 2 classes x 6 images (reddish vs bluish noise)."""
    root = tmp_path_factory.mktemp("labelled")
    rng = np.random.default_rng(1)
    for cls, base in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
        for i in range(6):
            arr = np.clip(rng.normal(base, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            (root / cls).mkdir(exist_ok=True)
            Image.fromarray(arr).save(root / cls / f"{i}.png")
    return root


_PHASES: list[str] = []  # every phase the live report's display was given


@pytest.fixture(scope="module")
def live(tmp_path_factory, images, labelled):
    from fgscope.progress import Phases

    out = tmp_path_factory.mktemp("live") / "report"
    real = Phases.update

    def update(self, phase, done, total=None):
        if self.prefix == "report: ":
            _PHASES.append(phase)
        return real(self, phase, done, total)

    Phases.update = update
    try:
        return run_report(ReportConfig(
            images=images, probe_data=labelled, out=out, formats=("png", "pdf", "svg"),
            width="single", **MODEL,
        ))
    finally:
        Phases.update = real


def test_live_report_shows_each_jobs_own_phases(live):
    """Not one spinner per step: the report's display names the phase inside each job."""
    for job, phase in (("layers", "forward"), ("cam", "grad-cam"), ("similarity", "forward and CKA"),
                       ("probe", "probe fits"), ("units", "units")):
        assert f"{job}: {phase}" in _PHASES, (job, sorted(set(_PHASES)))


# --- the live report ----------------------------------------------------------------------------


def test_live_report_has_every_section_whose_results_exist(live):
    out, res = live
    ids = check_page(res.html)
    assert ids == res.sections
    assert ALWAYS <= set(ids)
    page = res.html.read_text()
    # A job's section is there exactly when its run wrote its results (a job whose module is
    # not installed yet leaves a note instead).
    expect = {"cam": "cam/cam.json", "similarity": "similarity/similarity.json",
              "probe": "probe/probe.json", "advice": "advise/advice.json", "atlas": "units/units.json"}
    for sid, file in expect.items():
        assert (sid in ids) == (out / file).is_file(), sid
        if sid not in ids:
            assert any(n.lower().startswith(("grad-cam", "layer similarity", "linear probes", "advice",
                                             "unit atlas"))
                       for n in res.notes)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["command"] == "report" and manifest["sections"] == ids
    assert {"report.html", "log.txt", "hierarchy.npz"} <= set(manifest["files"])
    assert all((out / f).is_file() for f in manifest["files"])
    assert "abstraction table" in (out / "log.txt").read_text()
    # The table is the layers run's table, row for row.
    rows = json.loads((out / "layers" / "layers.json").read_text())["layers"]
    assert len(re.findall(r"<tr>", page.split('id="table"')[1].split("</table>")[0])) == len(rows) + 1
    assert "img0.png" in page and 'class="l st-early"' in page


def test_stage_layers_match_the_hierarchy_figure(live):
    from fgscope.layers.compute import LayerStats
    from fgscope.layers.run import hierarchy_columns

    out, _ = live
    rows = json.loads((out / "layers" / "layers.json").read_text())["layers"]
    fields = {f.name for f in dataclasses.fields(LayerStats)}  # the files add a `grid` column
    expected = [r.name for r in hierarchy_columns([LayerStats(**{k: v for k, v in r.items() if k in fields})
                                                   for r in rows])]
    assert [r["name"] for r in sections.stage_layers(rows)] == expected
    _, cols, labels = load_hierarchy(out / "hierarchy.npz")
    assert [c.name for c in cols] == expected and labels == ["img0.png", "img1.png", "img2.png"]
    assert cols[0].energy.shape[0] == 3 and cols[0].energy.dtype == np.float32


def test_paper_figures_in_every_format_open(live):
    out, res = live
    figs = {p.relative_to(out).as_posix() for p in res.figures}
    for name in ("hierarchy", "geometry"):
        assert {f"figures/{name}.{ext}" for ext in ("png", "pdf", "svg")} <= figs
    for p in res.figures:
        assert p.stat().st_size > 1000
        if p.suffix == ".png":
            with Image.open(p) as im:
                assert im.width == round(3.5 * paper.PAPER_DPI)  # single column at 300 dpi
        elif p.suffix == ".svg":
            root = ET.parse(p).getroot()
            assert root.get("width") == "252pt"  # 3.5 in
            assert root.find(".//{http://www.w3.org/2000/svg}text") is not None  # text stays text
        else:
            data = p.read_bytes()
            assert data.startswith(b"%PDF") and b"/MediaBox [ 0 0 252 " in data
    hier_pdf = (out / "figures" / "hierarchy.pdf").read_bytes()
    assert b"/Subtype /Image" in hier_pdf and len(hier_pdf) < 2_000_000  # tiles stay raster
    exe = _pdftoppm()
    for pdf in out.glob("figures/*.pdf"):
        subprocess.run([exe, "-r", "40", "-png", "-singlefile", str(pdf), str(pdf.with_suffix(""))
                        + "_page"], check=True, capture_output=True, timeout=60)
        with Image.open(str(pdf.with_suffix("")) + "_page.png") as im:
            assert im.width == round(3.5 * 40)


def test_from_rebuilds_the_page_without_recomputing(live, tmp_path, monkeypatch):
    import fgscope.layers.run as layers_run

    def no(*a, **k):
        raise AssertionError("--from must not run anything")

    monkeypatch.setattr(layers_run, "run_layers", no)
    monkeypatch.setattr(layers_run, "inspect", no)
    out, res = live
    out2, res2 = run_report(ReportConfig(from_dirs=[out], out=tmp_path / "again", formats=("png",)))
    assert check_page(res2.html) == res.sections
    assert (out2 / "figures" / "hierarchy.png").is_file()  # from the report's hierarchy.npz
    assert json.loads((out2 / "manifest.json").read_text())["mode"] == "from"
    assert not (out2 / "layers").exists()


def test_only_sections_with_results_and_notes_for_the_rest(live, tmp_path):
    out, _ = live
    layers = tmp_path / "layers"
    shutil.copytree(out / "layers", layers, ignore=shutil.ignore_patterns("grids"))
    manifest = json.loads((layers / "manifest.json").read_text())  # as `layers --no-grids`
    manifest["options"]["grids"] = False
    (layers / "manifest.json").write_text(json.dumps(manifest))
    _, res = run_report(ReportConfig(from_dirs=[layers], out=tmp_path / "r", formats=("png",)))
    assert set(check_page(res.html)) == ALWAYS - {"grids"}
    notes = " ".join(res.notes)
    assert "--no-grids" in notes and "hierarchy" in notes
    page = res.html.read_text()
    for absent in ('id="cam"', 'id="probe"', 'id="similarity"', 'id="advice"', 'id="dump"'):
        assert absent not in page
    assert [p.name for p in res.figures] == ["geometry.png"]


def _contract_runs(root: Path) -> list[Path]:
    """Run folders in the documented formats of cam, probe, advise, similarity and dump."""
    cam = root / "cam"
    _manifest(cam, "cam", model={"spec": "resnet18"})
    _png(cam / "cam.png", (300, 80))
    _png(cam / "cam_00_layer1.png", (64, 64), (250, 200, 10))
    (cam / "cam.json").write_text(json.dumps({
        "image": "/data/cat<1>.jpg", "target": {"index": 3, "label": "<script>alert(1)</script>"},
        "contrast": {"a": {"index": 284, "label": "Siamese cat"}, "b": {"index": 283, "label": "Persian cat"}}, "score": 1.5, "top5": [],
        "layers": [{"name": "layer1", "stride": 4, "rf": 35, "stage": "early", "shape": [64, 16, 16],
                    "peak": [10, 12], "file": "cam_00_layer1.png", "raw_max": 0.25}],
    }))
    probe = root / "probe"
    _manifest(probe, "probe")
    _png(probe / "probe.png", (200, 100))
    rows = [{"layer": n, "index": i, "stage": s, "stride": st, "rf": rf, "pool": "avg",
             "granularity": g, "acc_mean": a, "acc_std": 0.02, "chance": c, "dim": 64}
            for g, c, accs in (("fine", 0.1, (0.2, 0.6, 0.5)), ("coarse", 0.5, (0.7, 0.8, 0.9)))
            for i, (n, s, st, rf, a) in enumerate(zip(("l1", "l2", "l3"), ("early", "middle", "late"),
                                                      (4, 8, 16), (35, 99, 211), accs))]
    (probe / "probe.json").write_text(json.dumps({
        "model": "resnet18", "data": "/data/birds", "n_images": 60, "classes": ["a", "b"],
        "coarse_classes": ["x"], "folds": 5, "seed": 0, "rows": rows}))
    advise = root / "advise"
    _manifest(advise, "advise")
    (advise / "advice.json").write_text(json.dumps({
        "text": "## Where it lives\n\n- **Tap `l2`.** It is *best*.\n- Freeze the rest.",
        "tap_layers": ["l2"], "over_compression_after": "l2",
        "best_pooling": {"fine": "avg", "gain": 0.004, "significant": False, "best_by_mean": "bilinear"},
        "finetune_stages": ["middle"],
        "numbers": {}}))
    sim = root / "similarity"
    _manifest(sim, "similarity")
    _png(sim / "similarity.png", (200, 200))
    (sim / "similarity.json").write_text(json.dumps({
        "model": "resnet18", "vs": "tuned.pt", "layers_x": ["l1", "l2", "l3"],
        "layers_y": ["l1", "l2", "l3"], "stages_x": ["early", "middle", "late"],
        "stages_y": ["early", "middle", "late"], "n_images": 8,
        "cka": [[1, 0.5, 0.2], [0.5, 1, None], [0.2, 0.6, 1]], "cka_debiased": None,
        "method": "minibatch", "batch_size": 4,
        "diagonal": [{"layer": n, "cka": v, "cka_debiased": v - 0.1}
                     for n, v in (("l1", 0.99), ("l2", 0.8), ("l3", 0.4))]}))
    dump = root / "dump"
    _manifest(dump, "dump")
    (dump / "index.json").write_text(json.dumps({
        "layers": [{"name": "layer4.1", "type": "BasicBlock", "source_shape": [512, 2, 2],
                    "shape": [512], "dtype": "float16", "pool": "avg"}],
        "shards": [{"file": "shards/a.safetensors"}], "paths": ["a.png", "b.png"],
        "labels": [0, 1], "failures": [], "rows": 2, "complete": True,
        "manifest": {"command": "fgscope dump", "model": {"spec": "resnet18", "sha256": None}}}))
    return [cam, probe, advise, sim, dump]


def test_from_runs_in_the_documented_formats(live, tmp_path):
    out, _ = live
    folders = [out / "layers", *_contract_runs(tmp_path / "runs")]
    _, res = run_report(ReportConfig(from_dirs=folders, out=tmp_path / "r", formats=("svg",),
                                     width="double"))
    ids = check_page(res.html)
    assert ids == ["summary", "table", "hierarchy", "geometry", "grids", "cam", "probe", "advice",
                   "similarity", "dump", "figures", "references"]
    page = res.html.read_text()
    assert "&lt;script&gt;alert(1)" not in page  # a contrast is shown instead of the target
    assert "evidence for <strong>Siamese cat</strong> over <strong>Persian cat</strong>" in page
    assert "cat&lt;1&gt;.jpg" in page and "<script>alert" not in page
    assert '<span class="best">60.0</span>' in page and '<span class="best">90.0</span>' in page
    assert "<h3>Where it lives</h3>" in page and "<strong>Tap <code>l2</code>.</strong>" in page
    assert "<em>best</em>" in page
    # advice as sentences, not a dict
    assert ('<span class="mono">avg</span> is enough: the best alternative, <span class="mono">'
            'bilinear</span>, changes accuracy by +0.004, within the spread over folds') in page
    assert "best_by_mean" not in page and "significant" not in page
    assert "accumulated over minibatches" in page.split('id="similarity"')[1].split("</section>")[0]
    dump_html = page.split('id="dump"')[1].split("</section>")[0]
    assert "layer4.1" in dump_html and "float16" in dump_html
    assert '<th scope="row">model</th><td><span class="mono">resnet18</span>' in dump_html
    assert "Alain &amp; Bengio 2016" in page and 'id="ref-selvaraju2017"' in page
    names = sorted(p.name for p in res.figures)
    assert names == ["cam.svg", "geometry.svg", "probe.svg", "similarity.svg"]
    for p in res.figures:
        root = ET.parse(p).getroot()
        assert root.get("width") == "504pt"  # 7 in


# --- the page's building blocks -------------------------------------------------------------------


def test_render_page_escapes_and_cites():
    sec = page_html.Section("x", "A <b> & c", f"lead {page_html.cite('zeiler2014')}", "<p>body</p>")
    refs = page_html.references_section([sec])
    text = page_html.render_page("T <1>", "sub", [sec, refs], notes=["run `fgscope probe` & see"])
    ET.fromstring(text.split("\n", 1)[1])
    assert "<h2>A &lt;b&gt; &amp; c</h2>" in text and "<title>T &lt;1&gt;</title>" in text
    assert "<li>run <code>fgscope probe</code> &amp; see</li>" in text
    assert 'href="#ref-zeiler2014"' in text and 'id="ref-zeiler2014"' in text
    assert 'id="ref-araujo2019"' not in text  # only what is cited


def test_table_sort_values_and_alignment():
    t = page_html.table_html(
        [("name", "tip \"q\""), ("v", "")],
        [[page_html.Cell("a", "a", "l nm"), page_html.Cell("1.5", 1.5)],
         [page_html.Cell("b", "b", "l nm"), page_html.Cell("", None)]],
    )
    ET.fromstring(f"<div>{t}</div>")  # the box, then the note shown when it scrolls
    assert '<th scope="col" class="l nm" title="tip &quot;q&quot;">name</th>' in t
    assert t.endswith('<p class="swipe">scroll sideways for the rest →</p>')
    assert 'data-v="1.5"' in t and 'data-v=""' in t and 'class="sortable"' in t


def test_png_data_uri_keeps_pixels(tmp_path):
    arr = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    p = tmp_path / "a.png"
    Image.fromarray(arr).save(p, compress_level=1)
    uri, w, h = page_html.png_data_uri(p)
    import base64
    import io

    data = base64.b64decode(uri.split(",", 1)[1])
    assert (w, h) == (30, 20) and len(data) <= p.stat().st_size
    with Image.open(io.BytesIO(data)) as im:
        assert np.array_equal(np.asarray(im), arr)


def test_paper_options_and_layout():
    assert paper.parse_formats("PNG, pdf,png") == ("png", "pdf")
    assert paper.paper_width("single") == 3.5 and paper.paper_width("double") == 7.0
    for bad in ("gif", "", "png,jpg"):
        with pytest.raises(ConfigError, match="--format"):
            paper.parse_formats(bad)
    with pytest.raises(ConfigError, match="--width 'triple'"):
        paper.paper_width("triple")
    assert panels._panel_grid(6, 7.0)[0] == 6 and panels._panel_grid(6, 3.5)[0] == 3
    assert panels._panel_grid(5, 3.5)[0] == 3  # 3 + 2, not 4 + 1


def test_hierarchy_paper_checks_shapes_and_constant_maps():
    img = np.zeros((32, 32, 3), np.uint8)
    col = panels.EnergyColumn("a", 2.0, 7.0, "early", np.ones((1, 4, 4), np.float32))
    fig = panels.hierarchy_paper([img], [col], 3.5)  # a constant map: no division by zero
    assert fig.get_size_inches()[0] == pytest.approx(3.5)
    with pytest.raises(ValueError, match="must be"):
        panels.hierarchy_paper([img], [panels.EnergyColumn("b", 2, 7, "early", np.ones((4, 4)))], 3.5)
    with pytest.raises(ValueError, match="cka"):
        plots.similarity_paper({"cka": [[1]], "layers_x": ["a", "b"], "layers_y": ["a"]}, 7.0)


# --- bad input ---------------------------------------------------------------------------------------


def test_similarity_text_follows_its_method(tmp_path):
    from fgscope.report.results import similarity_section

    folder = tmp_path / "sim"
    _manifest(folder, "similarity", model={"spec": "resnet18"})
    cases = (("full", "computed on all the images at once", "minibatch", "full: all images at once (12)"),
             ("minibatch", "accumulated over minibatches", "all the images at once",
              "minibatch: 3 batches of 4 images"))
    for method, says, never, row in cases:
        (folder / "similarity.json").write_text(json.dumps({
            "model": "resnet18", "layers_x": ["a"], "layers_y": ["a"], "n_images": 12,
            "method": method, "batch_size": 4, "n_batches": 3}))
        sec = similarity_section(runs.RunFolder("similarity", folder, {}))
        assert says in sec.lead and never not in sec.lead + sec.body and row in sec.body


def test_live_and_from_reports_show_the_unit_atlas(live, tmp_path):
    out, res = live
    assert (out / "units" / "units.json").is_file() and "atlas" in res.sections
    page = res.html.read_text()
    atlas = page.split('id="atlas"')[1].split("</section>")[0]
    assert "<img" in atlas and 'href="#ref-bau2017"' in atlas and 'id="ref-morcos2018"' in page
    # a units run alone (or with others) through --from gives the same section
    _, res2 = run_report(ReportConfig(from_dirs=[out / "units"], out=tmp_path / "r"))
    assert res2.sections[:1] == ["summary"] and "atlas" in res2.sections


def test_from_refuses_runs_of_different_models(live, tmp_path):
    out, _ = live
    cam = tmp_path / "cam"
    _manifest(cam, "cam", model={"spec": "mobilenet_v2", "kind": "torchvision", "sha256": "b0353104aa"})
    (cam / "cam.json").write_text("{}")
    with pytest.raises(ConfigError) as exc:
        runs.load_runs([out / "layers", cam])
    msg = str(exc.value)
    assert "mixes runs of different models" in msg and "resnet18 (layers:" in msg
    assert f"mobilenet_v2 (cam: {cam})" in msg and "\n" not in msg
    result = _cli("--from", out / "layers", cam, "--out", tmp_path / "r")
    assert result.exit_code == 2 and "different models" in result.stderr
    assert not (tmp_path / "r").exists()
    # the same model, named differently, is one model
    same = tmp_path / "cam2"
    _manifest(same, "cam", model={"spec": "torchvision:resnet18", "kind": "torchvision"})
    assert runs.load_runs([out / "layers", same]).cams[0].path == same
    # a report without a layers run is titled with the model of the runs it shows
    _, res = run_report(ReportConfig(from_dirs=_contract_runs(tmp_path / "runs")[:2], out=tmp_path / "r2",
                                     formats=("png",)))
    assert "<title>fgscope report: resnet18</title>" in res.html.read_text()


def test_load_runs_errors_are_one_line(tmp_path):
    _manifest(tmp_path / "s", "summary")
    _manifest(tmp_path / "l1", "layers")
    _manifest(tmp_path / "l2", "layers")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "missing"): "no such folder",
        str(tmp_path / "empty"): "has no manifest.json",
        str(tmp_path / "s"): "`fgscope summary`",
        str(tmp_path / "bad"): "not readable JSON",
    }
    for folder, needle in cases.items():
        with pytest.raises(ConfigError) as exc:
            runs.load_runs([folder])
        assert needle in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ConfigError, match="two layers runs"):
        runs.load_runs([tmp_path / "l1", tmp_path / "l2"])


def _cli(*args):
    return runner.invoke(app, ["report", *[str(a) for a in args]], catch_exceptions=False)


def _one_line_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    err = result.stderr.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and "Traceback" not in result.output
    for n in needles:
        assert n in err, err


def test_cli_bad_input(tmp_path, images):
    _one_line_error(_cli("--format", "png,gif", "--out", tmp_path / "a"), 2, "--format", "gif")
    _one_line_error(_cli("--width", "triple", "--out", tmp_path / "a"), 2, "--width", "single")
    _one_line_error(_cli("--from", tmp_path / "nope", "--out", tmp_path / "a"), 2, "no such folder")
    _one_line_error(_cli("--from", tmp_path, "--probe-data", tmp_path, "--out", tmp_path / "a"), 2,
                    "--probe-data")
    _one_line_error(_cli("resnet18", *images, "--probe-data", tmp_path / "nope", "--out",
                         tmp_path / "a"), 2, "--probe-data", "ImageFolder")
    _one_line_error(_cli("resnet5", "--weights", "none", "--out", tmp_path / "b"), 3, "resnet5")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # nothing left behind


def test_cli_from_takes_several_folders(live, tmp_path):
    out, _ = live
    extra = _contract_runs(tmp_path / "runs")
    result = _cli("--from", out / "layers", extra[1], extra[2], "--out", tmp_path / "r",
                  "--format", "png")
    assert result.exit_code == 0, result.output
    ids = check_page(tmp_path / "r" / "report.html")
    assert {"probe", "advice"} <= set(ids) and "cam" not in ids
    assert "report.html" in result.output and "figures/probe.png" in result.output


@pytest.mark.slow
def test_documented_command_on_the_embedded_default(tmp_path):
    """`fgscope report --out DIR` (docs/gallery.md), the real MobileNetV2 and sample photo."""
    result = _cli("--out", tmp_path / "report")
    assert result.exit_code == 0, result.output
    out = tmp_path / "report"
    ids = check_page(out / "report.html")
    assert ALWAYS <= set(ids)
    assert ("cam" in ids) == (out / "cam" / "cam.json").is_file()
    page = (out / "report.html").read_text()
    assert "bow tie" in page and "mobilenet_v2" in page and "features.18" in page
    assert "needs at least 4 images" in page and "--probe-data" in page
    for name in ("hierarchy", "geometry"):
        for ext in ("png", "pdf", "svg"):
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 1000
    assert (out / "report.html").stat().st_size < 6_000_000


def test_abstraction_table_fits_a_laptop_with_ten_images(tmp_path_factory):
    """At 1280 px the abstraction table of a 10-image run (every column filled: debiased CKA
    with intervals, participation ratios) fits its box without sideways scrolling."""
    import test_report_browser as browser_test

    binary = browser_test._chromium_binary()
    if binary is None:
        pytest.skip("Chromium is not installed (see tests/test_report_browser.py)")
    html = browser_test.ten_image_report(tmp_path_factory.mktemp("fit"))
    with browser_test.Chromium(binary) as browser:
        page = browser.open(html.resolve().as_uri(), browser_test.LAPTOP, False)
        box = page.eval("(() => { const b = document.querySelector('#table .scroll');"
                        " return [b.scrollWidth, b.clientWidth]; })()")
        heads = page.eval("Array.from(document.querySelectorAll('#table thead th')).map(t => t.textContent)")
    assert "dCKA in" in heads and "max" in heads, heads
    assert box[0] <= box[1] + 1, box


def test_max_images_bounds_the_report_figures(live):
    """4 images, --max-images 3 (the report's default): the layers run measures all 4 but keeps
    grids for 3; hierarchy.npz, the page's hierarchy and the paper figure show 3 named rows."""
    out, res = live
    layers = json.loads((out / "layers" / "layers.json").read_text())
    assert len(layers["images"]) == 4
    assert len([p for p in (out / "layers" / "grids").iterdir() if p.is_dir()]) == 3
    images, cols, labels = load_hierarchy(out / "hierarchy.npz")
    assert len(images) == 3 and labels == ["img0.png", "img1.png", "img2.png"]
    assert all(c.energy.shape[0] == 3 for c in cols)
    html = res.html.read_text()
    assert "The first 3 of 4 images" in html and "Grids of the first 3 of 4 images" in html


def test_cli_views_are_checked_before_anything_runs(tmp_path, images):
    _one_line_error(_cli("resnet18", *images[:1], "--views", "2", "--out", tmp_path / "r"), 2,
                    "--views must be 0")
    assert not (tmp_path / "r").exists()
