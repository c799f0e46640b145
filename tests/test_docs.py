"""The docs are true to the code: the commands they show exist with the options they use, and
what they say a command prints or writes is what it prints or writes.

Fast checks run on random-init models and tiny images (the quoted command with `--weights
none --size 64` added); the ones that need the real embedded MobileNetV2 and the sample photo
(the numbers the docs quote) are marked slow.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from conftest import run
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(path: Path) -> list[str]:
    """The fenced code blocks of a Markdown file (not the Python ones)."""
    text = path.read_text(encoding="utf-8")
    return [b for lang, b in re.findall(r"^```(\w*)\n(.*?)^```", text, re.S | re.M) if lang != "python"]


def _block_after(path: Path, marker: str) -> list[str]:
    """The lines of the first code block after `marker` in a Markdown file."""
    text = path.read_text(encoding="utf-8")
    rest = text[text.index(marker):]
    return re.search(r"^```\w*\n(.*?)^```", rest, re.S | re.M).group(1).rstrip("\n").splitlines()


def _commands(path: Path) -> list[list[str]]:
    """Every `fgscope ...` command line of the code blocks, continuation lines joined."""
    out = []
    for block in _blocks(path):
        for line in block.replace("\\\n", " ").splitlines():
            m = re.search(r"(?:^|\s|/)fgscope\s+(.*)$", line)
            if m and not line.lstrip().startswith(("#", "from", "import")):
                try:
                    words = shlex.split(m.group(1), comments=True)
                except ValueError:
                    continue
                if words and not words[0].startswith(("-", ".")):
                    out.append(words)
    return out


def test_every_documented_command_exists_with_its_options():
    from typer.main import get_command

    from fgscope.cli import app

    group = get_command(app)
    root = {o for p in group.params for o in (*p.opts, *p.secondary_opts)}
    seen = 0
    for path in DOCS:
        for words in _commands(path):
            name = words[0]
            if name.startswith("--"):  # a root option: fgscope --install-completion
                assert name in root, (path.name, words)
                continue
            assert name in group.commands, f"{path.name}: unknown command in `fgscope {' '.join(words)}`"
            cmd = group.commands[name]
            opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help", "-h"}
            for w in words[1:]:
                flag = w.split("=", 1)[0]
                if re.fullmatch(r"--?[a-z][\w-]*", flag):
                    assert flag in opts, f"{path.name}: `fgscope {name}` has no {flag} ({' '.join(words)})"
            seen += 1
    assert seen >= 40  # README, docs/*.md


def _resnet50_glob_table() -> list[tuple[str, str]]:
    """README's table of globs on a ResNet-50: (pattern, what it says it selects)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `'([^`]+)'`(?:, `'[^`]+'`)? \| (.+?) \|$", text, re.M)
    assert len(rows) >= 4, rows
    return rows


def test_readme_glob_table_is_what_selection_does():
    import torchvision

    from fgscope.selection import select_layers

    model = torchvision.models.resnet50(weights=None)
    for pattern, says in _resnet50_glob_table():
        got = list(select_layers(model, pattern))
        count = re.search(r"\((\d+)(?: layers)?\)", says)
        if count:
            assert len(got) == int(count.group(1)), (pattern, says, got)
        if says.startswith("`"):  # a list of the names selected
            names = re.findall(r"`([\w.]+)`", says.split("(")[0])
            assert names == got, (pattern, says, got)


def _images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def _fast(words: list[str], tmp_path: Path, **subs: str) -> list[str]:
    """A documented command made fast: random init at 64 px on the CPU, into tmp_path."""
    out = []
    skip = False
    for w in words:
        if skip:
            skip = False
            continue
        if w in ("--device", "--out"):
            skip = True
            continue
        out.append(subs.get(w, w))
    return [*out, "--weights", "none", "--size", "64", "--device", "cpu", "--out", str(tmp_path / "out")]


def test_readme_layers_glob_command(tmp_path):
    (words,) = [w for w in _commands(ROOT / "README.md") if w[0] == "layers" and "layer*" in w]
    args = _fast(words, tmp_path, **{"photos/": str(_images(tmp_path / "photos", 2))})
    result = run(*args, "--no-grids")
    assert result.exit_code == 0, result.output
    table = json.loads((tmp_path / "out" / "layers.json").read_text())["layers"]
    assert [r["name"] for r in table] == ["layer1", "layer2", "layer3", "layer4"]  # the comment says so
    assert "layer1 .. layer4" in (ROOT / "README.md").read_text()


def test_similarity_cam_doc_cam_glob_command(tmp_path):
    doc = ROOT / "docs" / "similarity_cam.md"
    (words,) = [w for w in _commands(doc) if w[0] == "cam" and "layer3.*,layer4.*" in w]
    assert "its 9 blocks" in doc.read_text()
    img = tmp_path / "bird.jpg"
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(img)
    # model.pt --arch resnet50: the same architecture, by name
    args = _fast(words, tmp_path, **{"bird.jpg": str(img), "model.pt": "resnet50"})
    i = args.index("--arch")
    del args[i:i + 2]
    result = run(*args)
    assert result.exit_code == 0, result.output
    names = [lay["name"] for lay in json.loads((tmp_path / "out" / "cam.json").read_text())["layers"]]
    assert names == [f"layer3.{i}" for i in range(6)] + [f"layer4.{i}" for i in range(3)]


# --- the numbers quoted from the embedded MobileNetV2 and the sample photo --------------------


@pytest.mark.slow
def test_make_demo_prints_and_writes_what_the_readme_says(tmp_path):
    readme = (ROOT / "README.md").read_text()
    quoted, n_files = re.search(r"prints the table and `(.+?)`, and writes (\d+) files", readme, re.S).groups()
    quoted = " ".join(quoted.split())
    result = run("layers", "--out", tmp_path / "gal", "--device", "cpu")  # `make demo`, into a folder
    assert result.exit_code == 0, result.output
    assert quoted in " ".join(result.output.split())
    assert f"wrote {n_files} files to" in result.output
    manifest = json.loads((tmp_path / "gal" / "manifest.json").read_text())
    assert len(manifest["files"]) == int(n_files)
    # docs/gallery.md: the same top-5, and the files it copies exist under those names
    gallery = (ROOT / "docs" / "gallery.md").read_text()
    top5 = quoted.split(": ", 1)[1]
    assert " ".join(top5.split()) in " ".join(gallery.split())
    overlay = [w for w in _commands(ROOT / "docs" / "gallery.md") if "--overlay" in w][0]
    i = overlay.index("--out")
    overlay[i + 1] = str(tmp_path / "gal3")
    assert run(*overlay, "--device", "cpu").exit_code == 0
    for src in re.findall(r"^cp (/tmp/gal3?/\S+)", gallery, re.M):
        for path in src.split():
            local = tmp_path / path.removeprefix("/tmp/")
            assert local.is_file(), path


@pytest.mark.slow
def test_cam_doc_table_is_what_cam_prints(tmp_path):
    doc = ROOT / "docs" / "similarity_cam.md"
    quoted = _block_after(doc, "The first explains the top-1 class")
    result = run("cam", "--out", tmp_path / "cam1", "--device", "cpu")
    assert result.exit_code == 0, result.output
    lines = [ln.rstrip() for ln in result.output.splitlines()]
    start = lines.index(quoted[0])
    assert lines[start:start + len(quoted)] == quoted


@pytest.mark.slow
def test_similarity_doc_table_is_what_similarity_prints(tmp_path):
    doc = ROOT / "docs" / "similarity_cam.md"
    text = doc.read_text()
    snippet = re.search(r"Images used above:\n\n```python\n(.*?)```", text, re.S).group(1)
    folder = tmp_path / "simimgs"
    folder.mkdir()
    exec(snippet.replace("/tmp/simimgs", str(folder)), {})  # the doc's own image recipe
    assert len(list(folder.iterdir())) == 40
    (words,) = [w for w in _commands(doc) if w[:2] == ["similarity", "mobilenet_v2"] and "/tmp/simimgs" in w
                and "--vs" not in w]
    args = [str(folder) if w == "/tmp/simimgs" else str(tmp_path / "sim1") if w == "/tmp/sim1" else w
            for w in words]
    result = run(*args, "--device", "cpu")
    assert result.exit_code == 0, result.output
    quoted = _block_after(doc, "Debiased CKA between the five stages")
    lines = [ln.rstrip() for ln in result.output.splitlines()]
    start = lines.index(quoted[0])
    assert lines[start:start + len(quoted)] == quoted
