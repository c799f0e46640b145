"""Every command over a generated grid of bad options and inputs, in-process.

Whatever the input, a command ends with an exit code from the documented set, at most one
`error:` line, no traceback and no logging noise; and `--overwrite` never removes a file that
fgscope did not write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import run
from PIL import Image

# 0 ok, 2 config/usage, 3 model, 4 unsafe pickle, 5 image, 6 layer, 7 device, 8 output
DOCUMENTED = {0, 2, 3, 4, 5, 6, 7, 8}
MODEL = ["resnet18", "--weights", "none", "--size", "32"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    imgs = root / "imgs"
    imgs.mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(imgs / f"g{i}.png")
    data = root / "data"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(data / c / f"{c}{i}.png")
    bad = root / "bad"
    bad.mkdir()
    (bad / "a[b]c.jpg").write_bytes(b"not a jpeg")
    (bad / "[red]x[red].png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    loop = root / "loop"
    loop.mkdir()
    os.symlink(loop, loop / "again")
    (root / "empty").mkdir()
    (root / "garbage.pt").write_bytes(os.urandom(256))
    (root / "empty.pt").write_bytes(b"")
    (root / "text.pth").write_text("hello [bold]world[/bold]\n")
    (root / "notes.txt").write_text("a file, not a folder\n")
    (root / "fake.pt2").write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip named .pt2
    run_dir = root / "notarun"
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(json.dumps({"command": "layers", "images": 3, "argv": [1, 2]}))
    return {"root": root, "imgs": imgs, "data": data, "bad": bad, "loop": loop, "empty": root / "empty",
            "garbage": root / "garbage.pt", "empty_pt": root / "empty.pt", "text": root / "text.pth",
            "file": root / "notes.txt", "img": imgs / "g0.png", "fake_pt2": root / "fake.pt2", "notarun": run_dir}


# Each case: a name and a function of the world giving (command line without --out, uses --out).
def _cases():
    def with_model(cmd, inputs, *extra):
        return lambda w: (
            [cmd, *MODEL, *(str(w[a]) if a in w else a for a in (*inputs, *extra))], cmd != "summary"
        )

    def bad_model(cmd, inputs, key):
        return lambda w: ([cmd, str(w[key]), *[str(w[i]) for i in inputs]], cmd != "summary")

    model_cmds = {
        "summary": [], "layers": ["imgs"], "dump": ["imgs"], "probe": ["data"],
        "advise": ["data"], "cam": ["img"], "similarity": ["imgs"], "report": ["imgs"],
        "units": ["data"],
    }
    cases = {}
    for cmd, inputs in model_cmds.items():
        ins = inputs
        for key in ("garbage", "empty_pt", "text", "fake_pt2", "empty"):
            cases[f"{cmd}-model-{key}"] = bad_model(cmd, ins, key)
        cases[f"{cmd}-model-unknown"] = lambda w, c=cmd, i=ins: ([c, "resnet5", *[str(w[x]) for x in i]], c != "summary")
        cases[f"{cmd}-model-missing"] = lambda w, c=cmd, i=ins: ([c, "nope/model.pt", *[str(w[x]) for x in i]], c != "summary")
        for opt in (["--device", "cuda:99"], ["--device", "tpu"], ["--layers", "nosuch"],
                    ["--layers", "re:["], ["--layers", "features.0[1]"], ["--layers", "[bold]x"],
                    ["--size", "0"], ["--size", "-3"], ["--size", "9"], ["--weights", "NOPE"],
                    ["--arch", "resnet18"], ["--mean", "a,b,c"], ["--std", "0", "0", "0"]):
            if cmd == "summary" and opt[0] in ("--mean", "--std"):
                continue
            cases[f"{cmd}-{'-'.join(opt)}"] = with_model(cmd, ins, *opt)
        if cmd in ("summary", "layers", "dump", "cam"):  # AlexNet cannot take 8 px
            cases[f"{cmd}-too-small"] = lambda w, c=cmd, i=ins: (
                [c, "alexnet", "--weights", "none", "--size", "8", *[str(w[x]) for x in i]], c != "summary"
            )
        if cmd != "summary":
            cases[f"{cmd}-out-file"] = with_model(cmd, ins, "--out", "file")
        if cmd in ("layers", "similarity", "report", "dump"):
            for key in ("bad", "loop", "empty", "file"):
                cases[f"{cmd}-images-{key}"] = lambda w, c=cmd, k=key: ([c, *MODEL, str(w[k])], True)
            cases[f"{cmd}-images-missing"] = lambda w, c=cmd: ([c, *MODEL, "no/such/dir"], True)
        if cmd in ("probe", "advise"):
            for key in ("imgs", "bad", "loop", "empty", "file"):
                cases[f"{cmd}-data-{key}"] = lambda w, c=cmd, k=key: ([c, *MODEL, str(w[k])], True)
            cases[f"{cmd}-folds-1"] = with_model(cmd, ins, "--folds", "1")
            cases[f"{cmd}-pool-nope"] = with_model(cmd, ins, "--pool", "nope")
    extra = {
        "cam-image-bad": lambda w: (["cam", *MODEL, str(w["bad"] / "a[b]c.jpg")], True),
        "cam-image-folder": lambda w: (["cam", *MODEL, str(w["imgs"])], True),
        "cam-class-nope": lambda w: (["cam", *MODEL, str(w["imgs"] / "g0.png"), "--class", "nope"], True),
        "cam-class-9999": lambda w: (["cam", *MODEL, str(w["imgs"] / "g0.png"), "--class", "9999"], True),
        "layers-top-k-0": lambda w: (["layers", *MODEL, str(w["imgs"]), "--top-k", "0"], True),
        "layers-rank-nope": lambda w: (["layers", *MODEL, str(w["imgs"]), "--rank", "nope"], True),
        "layers-normalize-nope": lambda w: (["layers", *MODEL, str(w["imgs"]), "--normalize", "x"], True),
        "layers-cmap-nope": lambda w: (["layers", *MODEL, str(w["imgs"]), "--cmap", "nope"], True),
        "layers-dtype-float8": lambda w: (["layers", *MODEL, str(w["imgs"]), "--dtype", "float8"], True),
        "layers-probe-data-bad": lambda w: (["layers", *MODEL, str(w["imgs"]), "--probe-data", str(w["bad"])], True),
        "dump-shard-3of2": lambda w: (["dump", *MODEL, str(w["imgs"]), "--shard", "3/2"], True),
        "dump-shard-x": lambda w: (["dump", *MODEL, str(w["imgs"]), "--shard", "a/b"], True),
        "dump-shard-mb-inf": lambda w: (["dump", *MODEL, str(w["imgs"]), "--shard-mb", "inf"], True),
        "dump-shard-mb-nan": lambda w: (["dump", *MODEL, str(w["imgs"]), "--shard-mb", "nan"], True),
        "dump-shard-mb-neg": lambda w: (["dump", *MODEL, str(w["imgs"]), "--shard-mb", "-1"], True),
        "dump-pool-nope": lambda w: (["dump", *MODEL, str(w["imgs"]), "--pool", "nope"], True),
        "dump-resize-bad": lambda w: (["dump", *MODEL, str(w["imgs"]), "--pool", "none", "--resize-to", "0x3"], True),
        "dump-dtype-int8": lambda w: (["dump", *MODEL, str(w["imgs"]), "--dtype", "int8"], True),
        "dump-merge-missing": lambda w: (["dump-merge", "no/such", "also/none"], True),
        "dump-merge-empty": lambda w: (["dump-merge", str(w["empty"]), str(w["imgs"])], True),
        "similarity-vs-garbage": lambda w: (["similarity", *MODEL, str(w["imgs"]), "--vs", str(w["garbage"])], True),
        "similarity-vs-unknown": lambda w: (["similarity", *MODEL, str(w["imgs"]), "--vs", "resnet5"], True),
        "similarity-batch-2": lambda w: (["similarity", *MODEL, str(w["imgs"]), "--batch-size", "2"], True),
        "report-format-nope": lambda w: (["report", *MODEL, str(w["imgs"]), "--format", "gif"], True),
        "report-width-nope": lambda w: (["report", *MODEL, str(w["imgs"]), "--width", "huge"], True),
        "report-from-missing": lambda w: (["report", "--from", "no/such"], True),
        "report-from-images": lambda w: (["report", "--from", str(w["imgs"])], True),
        "report-from-notarun": lambda w: (["report", "--from", str(w["notarun"])], True),
        "advise-part-size-0": lambda w: (["advise", *MODEL, str(w["data"]), "--part-size", "0"], True),
        "advise-from-probe-missing": lambda w: (["advise", *MODEL, str(w["data"]), "--from-probe", "no/such"], True),
        "summary-json-in-missing-dir": lambda w: (["summary", *MODEL, "--json", "/proc/nope/x.json"], False),
    }
    cases.update(extra)
    return cases


CASES = _cases()


def check_clean(result, argv) -> None:
    """The documented exit code, one `error:` line at most, no traceback, no logging noise."""
    out = result.output
    assert result.exit_code in DOCUMENTED, (argv, result.exit_code, out)
    assert "Traceback" not in out and "Logging error" not in out, (argv, out)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if result.exit_code not in (0, 2) or errors:
        assert len(errors) == 1, (argv, result.stderr)
        assert result.stderr.strip().splitlines()[-1].startswith("error:"), (argv, result.stderr)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(CASES))
def test_fuzz_grid(case, world, tmp_path):
    argv, takes_out = CASES[case](world)
    if takes_out and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    result = run(*argv)
    check_clean(result, argv)
    if case.endswith(("model-garbage", "model-empty_pt", "model-text", "model-fake_pt2",
                      "model-unknown", "model-missing", "model-empty")):
        assert result.exit_code == 3, (argv, result.output)
    if "--size-8" in case:
        assert result.exit_code == 3 and "smallest square input that works is" in result.stderr, result.stderr
    if case.endswith("-images-bad"):
        assert result.exit_code == 5, result.output


def test_error_text_is_never_markup(world, tmp_path):
    # Square brackets in a path or a layer name are printed as they are, not parsed.
    result = run("layers", *MODEL, str(world["bad"] / "a[b]c.jpg"), "--out", tmp_path / "o")
    check_clean(result, "a[b]c")
    assert result.exit_code == 5 and "a[b]c.jpg" in result.stderr, result.stderr
    result = run("summary", *MODEL, "--layers", "layer1[nope]")
    assert result.exit_code == 6 and "layer1[nope]" in result.stderr, result.stderr


def test_verbose_shows_torch_traceback(world):
    result = run("--verbose", "summary", "alexnet", "--weights", "none", "--size", "8")
    assert result.exit_code == 3
    assert "Traceback" in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error:")


def test_every_error_has_a_documented_exit_code():
    import fgscope.errors as errors

    classes = [getattr(errors, n) for n in errors.__all__]
    assert all(c.exit_code in DOCUMENTED - {0} for c in classes if c is not errors.FgscopeError)
    root = Path(errors.__file__).parent
    bare = [str(p) for p in root.rglob("*.py") if "raise FgscopeError(" in p.read_text()]
    assert not bare, f"raise a subclass with a documented exit code, not FgscopeError: {bare}"


# --- --overwrite never deletes what fgscope did not write ----------------------------------

OVERWRITE_RUNS = {
    "layers": lambda w: ["layers", *MODEL, str(w["imgs"] / "g0.png"), "--no-grids"],
    "cam": lambda w: ["cam", *MODEL, str(w["imgs"] / "g0.png"), "--layers", "layer3"],
    "similarity": lambda w: ["similarity", *MODEL, str(w["imgs"]), "--layers", "layer3,layer4"],
    "probe": lambda w: ["probe", *MODEL, str(w["data"]), "--layers", "layer4", "--folds", "2"],
    "advise": lambda w: ["advise", *MODEL, str(w["data"]), "--layers", "layer3,layer4", "--folds", "2",
                         "--pool", "avg"],
    "report": lambda w: ["report", *MODEL, str(w["imgs"] / "g0.png"), "--format", "png",
                         "--layers", "layer4"],
    "dump": lambda w: ["dump", *MODEL, str(w["imgs"]), "--layers", "layer4", "--pool", "avg"],
    "units": lambda w: ["units", *MODEL, str(w["data"]), "--layers", "layer4", "--top", "2", "--no-figures"],
}


@pytest.mark.parametrize("cmd", sorted(OVERWRITE_RUNS))
def test_overwrite_keeps_user_files(cmd, world, tmp_path):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "thesis.txt").write_text("years of work")
    (out / "data" / "x.csv").write_text("1,2\n")
    argv = OVERWRITE_RUNS[cmd](world)
    result = run(*argv, "--out", out, "--overwrite")
    check_clean(result, argv)
    assert result.exit_code == 8, result.output
    assert "thesis.txt" in result.stderr
    assert (out / "thesis.txt").read_text() == "years of work" and (out / "data" / "x.csv").exists()


@pytest.mark.parametrize("cmd", ["layers", "cam", "similarity"])
def test_overwrite_replaces_own_run(cmd, world, tmp_path):
    out = tmp_path / "out"
    argv = OVERWRITE_RUNS[cmd](world)
    assert run(*argv, "--out", out).exit_code == 0
    first = json.loads((out / "manifest.json").read_text())["files"]
    stale = out / first[0]
    stale.write_bytes(b"stale")
    result = run(*argv, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert stale.read_bytes() != b"stale"
    assert not any(p.name.endswith("-2") for p in tmp_path.iterdir())


def test_out_inside_or_equal_to_an_input_is_refused(world, tmp_path):
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.open(world["imgs"] / "g0.png").save(imgs / "g0.png")
    for out in (imgs, imgs / "sub"):
        result = run("layers", *MODEL, str(imgs), "--no-grids", "--out", out, "--overwrite")
        check_clean(result, out)
        assert result.exit_code == 8 and "input" in result.stderr, result.stderr
    assert sorted(p.name for p in imgs.iterdir()) == ["g0.png"]


def test_out_dot_and_user_files_in_cwd(world, tmp_path, monkeypatch):
    # `--out . --overwrite` where the input and the user's files are: nothing is deleted.
    monkeypatch.chdir(tmp_path)
    Image.open(world["imgs"] / "g0.png").save(tmp_path / "good1.jpg")
    (tmp_path / "thesis.txt").write_text("keep")
    for out in (".", ""):
        result = run("layers", *MODEL, "good1.jpg", "--no-grids", "--out", out, "--overwrite")
        check_clean(result, out)
        assert result.exit_code == 8, result.output
    assert (tmp_path / "good1.jpg").exists() and (tmp_path / "thesis.txt").read_text() == "keep"


def test_report_from_r_out_r_is_refused_before_deleting(world, tmp_path):
    r = tmp_path / "r"
    assert run(*OVERWRITE_RUNS["layers"](world), "--out", r).exit_code == 0
    before = sorted(p.name for p in r.rglob("*"))
    result = run("report", "--from", r, "--out", r, "--overwrite")
    check_clean(result, "report")
    assert result.exit_code == 8 and sorted(p.name for p in r.rglob("*")) == before
