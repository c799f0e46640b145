"""The synthetic fine-grained set: layout, determinism, and that each label lives where claimed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fgscope.errors import ConfigError, OutputError
from fgscope.images import image_folder
from fgscope.synthetic import (
    POSITIONS,
    SHAPES,
    TEXTURES,
    coarse_map,
    fine_classes,
    generate,
    render_example,
)


def _render(shape: str, texture: str, position: str, size: int = 96, seed: int = 3) -> np.ndarray:
    return np.asarray(render_example(shape, texture, position, size, np.random.default_rng(seed)), dtype=np.int16)


def test_classes_and_coarse_map():
    classes = fine_classes()
    assert len(classes) == len(SHAPES) * len(TEXTURES) * len(POSITIONS) == 12
    assert classes == sorted(classes)
    cmap = coarse_map()
    assert set(cmap) == set(classes)
    assert sorted(set(cmap.values())) == sorted(SHAPES)
    assert all(name.startswith(cmap[name] + "-") for name in classes)


def test_generate_layout_is_an_image_folder(tmp_path):
    ds = generate(tmp_path / "syn", per_class=2, size=40, seed=1)
    assert ds.n_images == 24
    lp = image_folder(ds.root)
    assert lp.classes == list(ds.classes) == fine_classes()
    assert len(lp.paths) == 24 and lp.labels.count(0) == 2
    with Image.open(lp.paths[0]) as im:
        assert im.size == (40, 40) and im.mode == "RGB"
    assert json.loads(ds.coarse_map_path.read_text()) == coarse_map()
    meta = json.loads((ds.root / "synthetic.json").read_text())
    assert meta["seed"] == 1 and meta["per_class"] == 2 and meta["n_images"] == 24
    assert not list(ds.root.rglob("*.tmp"))


def test_deterministic_with_the_seed_and_prefix_stable(tmp_path):
    a = generate(tmp_path / "a", per_class=2, size=48, seed=7)
    b = generate(tmp_path / "b", per_class=3, size=48, seed=7)
    c = generate(tmp_path / "c", per_class=2, size=48, seed=8)
    name = "square-dots-topleft"
    first = f"{name}/{name}_0000.png"
    assert (a.root / first).read_bytes() == (b.root / first).read_bytes()  # more images, same first ones
    assert (a.root / first).read_bytes() != (c.root / first).read_bytes()


def test_the_fine_part_is_small_and_local():
    # Same random draws, only the spot's texture or position changes: few pixels differ.
    base = _render("circle", "stripes", "topleft")
    for other in (_render("circle", "dots", "topleft"), _render("circle", "stripes", "bottomright")):
        changed = (np.abs(base - other).sum(-1) > 30).mean()
        assert 0.002 < changed < 0.08, changed
    # ...while the coarse label changes much of the image.
    changed = (np.abs(base - _render("square", "stripes", "topleft")).sum(-1) > 30).mean()
    assert changed > 0.04


def test_spot_position_is_relative_to_the_shape():
    tl = _render("triangle", "dots", "topleft", size=128)
    br = _render("triangle", "dots", "bottomright", size=128)
    ys, xs = np.nonzero(np.abs(tl - br).sum(-1) > 60)  # both spots: tl's and br's
    assert len(ys) > 20
    cy, cx = ys.mean(), xs.mean()  # between the two spots, i.e. near the shape's centre
    upper_left = ((ys < cy) & (xs < cx)).mean()
    lower_right = ((ys > cy) & (xs > cx)).mean()
    assert upper_left > 0.35 and lower_right > 0.35 and upper_left + lower_right > 0.9


def test_textures_share_colours():
    # Stripes and dots are drawn from the same two colours in similar proportions, so the spot's
    # mean colour does not give the texture away.
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    a = np.asarray(render_example("square", "stripes", "topleft", 128, rng_a), dtype=float)
    b = np.asarray(render_example("square", "dots", "topleft", 128, rng_b), dtype=float)
    spot = np.abs(a - b).sum(-1) > 30
    grow = spot.copy()
    for axis in (0, 1):
        for shift in (-2, -1, 1, 2):
            grow |= np.roll(spot, shift, axis)
    ma, mb = a[grow].mean(0), b[grow].mean(0)
    assert np.abs(ma - mb).max() < 35, (ma, mb)


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        ({"per_class": 0}, ConfigError, "--per-class"),
        ({"size": 16}, ConfigError, "--size"),
    ],
)
def test_bad_options(tmp_path, kwargs, error, needle):
    with pytest.raises(error, match=needle) as info:
        generate(tmp_path / "x", **kwargs)
    assert "\n" not in str(info.value)


def test_non_empty_folder_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "syn"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(OutputError, match="not empty"):
        generate(out, per_class=1, size=32)
    generate(out, per_class=1, size=32, overwrite=True)
    assert (out / "mine.txt").read_text() == "keep"
    assert len(image_folder(out).paths) == 12


def test_render_rejects_unknown_factors():
    with pytest.raises(ConfigError, match="hexagon"):
        render_example("hexagon", "dots", "topleft", 64, np.random.default_rng(0))


def test_python_dash_m(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run(
        [sys.executable, "-m", "fgscope.synthetic", str(out), "--per-class", "1", "--size", "32",
         "--seed", "2"],
        capture_output=True, text=True,
    )
    assert res.returncode == 0, res.stderr
    assert "wrote 12 images" in res.stdout
    assert (out / "coarse_map.json").is_file()
    res = subprocess.run([sys.executable, "-m", "fgscope.synthetic", str(out)], capture_output=True, text=True)
    assert res.returncode == OutputError.exit_code
    assert res.stderr.strip().startswith("error:") and len(res.stderr.strip().splitlines()) == 1


def test_masks_mark_the_shape_and_the_spot(tmp_path):
    from fgscope.synthetic import MASK_LEGEND, masks_dir, render_with_mask

    img, mask = render_with_mask("square", "stripes", "topleft", 96, np.random.default_rng(4))
    assert np.array_equal(np.asarray(img), _render("square", "stripes", "topleft", 96, 4).astype(np.uint8))
    assert mask.shape == (96, 96) and set(np.unique(mask)) == {0, 1, 2}
    a = np.asarray(img, dtype=np.float64)
    spot = mask == 2
    # The spot is where the texture is: near-black and near-white pixels, far more varied than
    # the shape around it; the shape's own pixels are much flatter.
    assert a[spot].std(0).mean() > 3 * a[mask == 1].std(0).mean()
    ys, xs = np.nonzero(spot)
    shape_ys, shape_xs = np.nonzero(mask > 0)
    assert ys.mean() < shape_ys.mean() and xs.mean() < shape_xs.mean()  # top-left of the centre
    ds = generate(tmp_path / "syn", per_class=1, size=40, seed=1)
    mdir = masks_dir(ds.root)
    assert mdir == tmp_path / "syn-masks"
    assert json.loads((mdir / "legend.json").read_text()) == MASK_LEGEND
    for p in image_folder(ds.root).paths:
        m = np.asarray(Image.open(mdir / p.parent.name / p.name))
        assert m.shape == (40, 40) and m.max() == 2
    with pytest.raises(OutputError, match="masks folder"):
        (tmp_path / "other-masks").mkdir()
        (tmp_path / "other-masks" / "x").write_text("")
        generate(tmp_path / "other", per_class=1, size=40)
