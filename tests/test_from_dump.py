"""`probe`, `similarity` and `advise --from-dump DIR`: the numbers read from a dump equal the
live run's on the same (float32) features; a multi-part dump reads as its union; what a dump
cannot give is a one-line error."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torchvision
from conftest import assert_one_line_error, run

from fgscope.synthetic import generate

MODEL = ("--arch", "resnet18", "--size", "64", "--device", "cpu")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fromdump")
    ds = generate(root / "data", per_class=4, size=64, seed=0)
    torch.manual_seed(0)
    r18 = root / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), r18)
    for name, pool in (("raw", "none"), ("avg", "avg")):
        res = run("dump", r18, ds.root, *MODEL, "--pool", pool, "--dtype", "float32", "--out", root / name)
        assert res.exit_code == 0, res.output
    return root, ds, r18


def _rows(folder):
    data = json.loads((folder / "probe.json").read_text())
    return {(r["layer"], r["pool"], r["granularity"]): (r["fold_acc"], r["dim"]) for r in data["rows"]}, data


def test_probe_from_a_raw_dump_equals_the_live_probe(env):
    root, ds, r18 = env
    common = ("--pool", "avg,max,bilinear,hypercolumn", "--coarse-map", ds.coarse_map_path, "--folds", "3")
    live = run("probe", r18, ds.root, *MODEL, *common, "--out", root / "p_live")
    assert live.exit_code == 0, live.output
    dumped = run("probe", "--from-dump", root / "raw", *common, "--out", root / "p_dump")
    assert dumped.exit_code == 0, dumped.output
    a, ja = _rows(root / "p_live")
    b, jb = _rows(root / "p_dump")
    assert a.keys() == b.keys() and len(a) == 5 * 4 * 2
    for key in a:  # accuracies are counts of test images: equal features give equal counts
        assert a[key] == b[key], key
    assert ja["cka_consecutive"] == jb["cka_consecutive"]
    assert ja["hypercolumn_grid"] == jb["hypercolumn_grid"]
    manifest = json.loads((root / "p_dump" / "manifest.json").read_text())
    assert manifest["from_dump"]["path"] == str(root / "raw") and manifest["n_images"] == 48
    assert manifest["images"][0]["class"] == "circle-dots-bottomright"
    assert all(layer["stage"] == "n/a" and layer["stride"] is None for layer in jb["layers"])


def test_probe_from_a_pooled_dump_equals_the_live_avg_probe(env):
    root, ds, r18 = env
    live = run("probe", r18, ds.root, *MODEL, "--folds", "3", "--layers", "layer2.1,layer4.1",
               "--out", root / "a_live")
    assert live.exit_code == 0, live.output
    dumped = run("probe", "--from-dump", root / "avg", "--folds", "3", "--layers", "layer[24].*",
                 "--out", root / "a_dump")
    assert dumped.exit_code == 0, dumped.output
    assert _rows(root / "a_live")[0] == _rows(root / "a_dump")[0]


def test_similarity_from_a_raw_dump_equals_the_live_run(env):
    root, ds, r18 = env
    for batch, method in (("8", "minibatch"), ("64", "full")):
        live = run("similarity", r18, ds.root, *MODEL, "--batch-size", batch, "--out", root / f"s_live{batch}")
        assert live.exit_code == 0, live.output
        dumped = run("similarity", "--from-dump", root / "raw", "--batch-size", batch,
                     "--out", root / f"s_dump{batch}")
        assert dumped.exit_code == 0, dumped.output
        a = json.loads((root / f"s_live{batch}" / "similarity.json").read_text())
        b = json.loads((root / f"s_dump{batch}" / "similarity.json").read_text())
        assert a["method"] == b["method"] == method and a["n_batches"] == b["n_batches"]
        assert a["layers_x"] == b["layers_x"]
        for key in ("cka", "cka_debiased"):
            np.testing.assert_allclose(np.array(a[key], float), np.array(b[key], float), rtol=0, atol=1e-9)
        assert "not pooled" in b["features"]


def test_similarity_of_a_pooled_dump_says_so_and_is_cka_of_the_pooled_features(env):
    root, _, _ = env
    res = run("similarity", "--from-dump", root / "avg", "--full", "--out", root / "s_avg")
    assert res.exit_code == 0, res.output
    data = json.loads((root / "s_avg" / "similarity.json").read_text())
    assert "avg-pooled" in data["features"] and "pooled" in json.loads(
        (root / "s_avg" / "manifest.json").read_text())["features"]
    from fgscope import metrics, store

    acts = store.open(root / "avg")
    want = metrics.linear_cka(acts["layer1.1"][:], acts["layer3.1"][:], debiased=True)
    i, j = data["layers_x"].index("layer1.1"), data["layers_x"].index("layer3.1")
    assert data["cka_debiased"][i][j] == pytest.approx(want, abs=1e-9)


def test_a_two_part_dump_reads_as_its_union(env):
    root, ds, r18 = env
    for part in ("0/2", "1/2"):
        res = run("dump", r18, ds.root, *MODEL, "--pool", "avg", "--dtype", "float32", "--shard", part,
                  "--out", root / "parts")
        assert res.exit_code == 0, res.output
    one = run("probe", "--from-dump", root / "avg", "--folds", "3", "--out", root / "u1")
    two = run("probe", "--from-dump", root / "parts", "--folds", "3", "--out", root / "u2")
    assert one.exit_code == two.exit_code == 0, two.output
    assert _rows(root / "u1")[0] == _rows(root / "u2")[0]


def test_advise_from_a_dump(env):
    root, ds, _ = env
    res = run("advise", "--from-dump", root / "avg", "--coarse-map", ds.coarse_map_path, "--folds", "3",
              "--out", root / "adv")
    assert res.exit_code == 0, res.output
    advice = json.loads((root / "adv" / "advice.json").read_text())
    probe = json.loads((root / "adv" / "probe.json").read_text())
    assert probe["pools"] == ["avg"]  # the default pools this dump can give
    assert advice["numbers"]["n_images"] == 48


def test_from_dump_errors_are_one_line(env, tmp_path):
    root, ds, r18 = env
    assert_one_line_error(run("probe", "--from-dump", tmp_path / "nope"), 2, "nope", "does not exist")
    assert_one_line_error(run("probe", "--from-dump", ds.root), 2, "not an fgscope dump")
    assert_one_line_error(run("probe", "--from-dump", root / "avg", "--pool", "hypercolumn", "--folds", "3"),
                          2, "relu", "avg-pooled", "hypercolumn", "--pool none")
    assert_one_line_error(run("probe", "--from-dump", root / "avg", "--layers", "layer9", "--folds", "3"),
                          6, "layer9", "stored layers")
    assert_one_line_error(run("probe", r18, "--from-dump", root / "avg"), 2, "MODEL and DATA")
    assert_one_line_error(run("probe", r18), 2, "MODEL and DATA")
    assert_one_line_error(run("similarity", "--from-dump", root / "avg", "--vs", "resnet18"), 2, "--vs")
    assert_one_line_error(run("similarity", r18, "--from-dump", root / "avg"), 2, "IMAGES")
    # An unfinished dump: no index.json, a part whose progress is not complete.
    broken = tmp_path / "unfinished"
    shutil.copytree(root / "avg", broken)
    (broken / "index.json").unlink()
    progress = next(broken.glob("parts/*/progress.json"))
    doc = json.loads(progress.read_text())
    doc["complete"] = False
    progress.write_text(json.dumps(doc))
    assert_one_line_error(run("probe", "--from-dump", broken, "--folds", "3"), 2, "not complete",
                          "fgscope dump")
    assert_one_line_error(run("advise", "--from-dump", broken, "--folds", "3"), 2, "not complete")


def test_every_phase_shows_progress_on_a_terminal_only(env):
    """A terminal console gets one transient display per job (no nested live displays) with
    the phases named; a console that is not a terminal gets none."""
    import io

    from rich.console import Console

    from fgscope.advise import AdviseConfig, run_advise
    from fgscope.probe import ProbeConfig, run_probe
    from fgscope.similarity import SimilarityConfig, run_similarity

    root, ds, r18 = env
    live = ProbeConfig(model=str(r18), data=ds.root, folds=3, layers="layer1.1,layer4.1", device="cpu",
                       model_kwargs={"arch": "resnet18", "size": 64}, out=root / "pr_live", overwrite=True)
    jobs = [
        ("probe", lambda c: run_probe(live, c), ("load model", "forward", "probe fits")),
        ("probe dump", lambda c: run_probe(ProbeConfig(from_dump=root / "avg", folds=3, out=root / "pr_d",
                                                       overwrite=True), c), ("read features", "probe fits")),
        ("similarity dump", lambda c: run_similarity(SimilarityConfig(
            from_dump=root / "raw", batch_size=8, out=root / "sim_d", overwrite=True), c), ("CKA",)),
        ("advise dump", lambda c: run_advise(AdviseConfig(from_dump=root / "avg", folds=3, pools_given=False,
                                                          out=root / "adv_d", overwrite=True), c), ("probe fits",)),
    ]
    for what, job, phases in jobs:
        buf = io.StringIO()
        job(Console(file=buf, force_terminal=True, width=120))
        for phase in phases:
            assert phase in buf.getvalue(), (what, phase)
        quiet = io.StringIO()
        job(Console(file=quiet, force_terminal=False, width=120))
        assert "probe fits" not in quiet.getvalue() and "\x1b[?25l" not in quiet.getvalue(), what
