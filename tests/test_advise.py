"""Advice from probe curves: each rule on hand-built curves, the text quotes its numbers, and
the command (from a probe folder, and end to end)."""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from conftest import run

from fgscope.advise.rules import make_advice
from fgscope.errors import ConfigError
from fgscope.synthetic import generate

LAYERS = [("l1", "early", 4, 20), ("l2", "middle", 8, 60), ("l3", "middle", 16, 150), ("l4", "late", 32, 400)]




def make_probe(curves: dict[tuple[str, str], list[float]], std: float = 0.02, cka=None) -> dict:
    """A probe.json dict: curves[(pool, granularity)] = accuracy per layer of LAYERS."""
    rows = []
    for (pool, gran), accs in curves.items():
        for i, ((name, stage, stride, rf), acc) in enumerate(zip(LAYERS, accs)):
            rows.append({"layer": name, "index": i, "stage": stage, "stride": stride, "rf": rf,
                         "pool": pool, "granularity": gran, "acc_mean": acc, "acc_std": std,
                         "chance": 0.1 if gran == "fine" else 0.5, "dim": 8})
    return {"model": "m", "data": "d", "n_images": 200, "classes": [str(i) for i in range(10)],
            "coarse_classes": ["a", "b"], "folds": 5, "seed": 0, "rows": rows,
            "layers": [{"name": n, "index": i, "stage": s, "stride": st, "rf": rf, "shape": [8, 4, 4]}
                       for i, (n, s, st, rf) in enumerate(LAYERS)],
            "cka_consecutive": cka or []}


def test_rising_curve_no_over_compression():
    adv = make_advice(make_probe({("avg", "fine"): [0.2, 0.4, 0.6, 0.8],
                                  ("avg", "coarse"): [0.6, 0.7, 0.8, 0.9]}))
    assert adv.tap_layers == ("l4",)
    assert adv.over_compression_after is None
    assert adv.finetune_stages == ("late",)
    assert "0.800 ± 0.020" in adv.text and "`l4`" in adv.text
    assert "still rises at the last probed layer" in adv.text
    assert adv.numbers["fine_best"]["layer"] == "l4"


def test_fine_falls_after_the_middle():
    adv = make_advice(make_probe({("avg", "fine"): [0.3, 0.7, 0.69, 0.5],
                                  ("avg", "coarse"): [0.6, 0.7, 0.8, 0.95]}))
    assert adv.tap_layers == ("l2", "l3")  # l3 is within one std of the best
    assert adv.over_compression_after == "l2"
    assert adv.numbers["compression"]["avg"]["verdict"] == "falls"
    assert adv.finetune_stages == ("middle", "late")
    assert "falls from 0.700 to 0.500 at `l4`" in adv.text
    assert "coarse accuracy rises (0.700 → 0.950" in adv.text
    assert "early stage already delivers" in adv.text


def test_fine_flat_while_coarse_rises():
    adv = make_advice(make_probe({("avg", "fine"): [0.3, 0.6, 0.59, 0.6],
                                  ("avg", "coarse"): [0.6, 0.65, 0.8, 0.95]}))
    assert adv.over_compression_after == "l2"
    assert adv.numbers["compression"]["avg"]["verdict"] == "flat_coarse_rises"
    assert "stops rising after `l2`" in adv.text


def test_flat_without_coarse_is_not_called_over_compression():
    adv = make_advice(make_probe({("avg", "fine"): [0.3, 0.6, 0.59, 0.6]}))
    assert adv.over_compression_after is None
    assert "No clear over-compression" in adv.text and "coarse side of the rule" in adv.text


def test_pooling_gain_beyond_and_within_the_noise():
    curves = {("avg", "fine"): [0.3, 0.5, 0.6, 0.62], ("bilinear", "fine"): [0.4, 0.7, 0.75, 0.7],
              ("hypercolumn", "fine"): [0.3, 0.5, 0.61, 0.63]}
    adv = make_advice(make_probe(curves))
    assert adv.best_pooling == {"fine": "bilinear", "gain": pytest.approx(0.13), "significant": True,
                                "best_by_mean": "bilinear"}
    assert adv.tap_layers == ("l3",) and adv.numbers["fine_best"]["pool"] == "bilinear"
    assert "bilinear pays off" in adv.text and "hypercolumn is within the noise" in adv.text
    assert "gain +0.130" in adv.text
    small = make_advice(make_probe({("avg", "fine"): [0.3, 0.5, 0.6, 0.62],
                                    ("bilinear", "fine"): [0.3, 0.5, 0.6, 0.63]}))
    assert small.best_pooling["fine"] == "avg" and small.best_pooling["significant"] is False
    assert small.best_pooling["best_by_mean"] == "bilinear"
    assert "avg is enough" in small.text


def test_weak_evidence_and_flat_curves_are_said():
    probe = make_probe({("avg", "fine"): [0.1, 0.16, 0.22, 0.11]}, std=0.01)
    probe["rows"][2]["acc_std"] = 0.07  # the best is within two stds of chance, l2 is not
    weak = make_advice(probe)
    assert "evidence is weak" in weak.text
    assert weak.numbers["discriminates"] is True
    flat = make_advice(make_probe({("avg", "fine"): [0.8, 0.81, 0.8, 0.8]}, std=0.03))
    assert "curve is flat" in flat.text and len(flat.tap_layers) == 4


@pytest.mark.parametrize("where", ["ceiling", "chance"])
def test_probes_at_ceiling_or_chance_make_no_stage_recommendation(where):
    """Every probe 1.000 ± 0.000 (or at chance): the curves cannot discriminate between layers."""
    accs = [1.0, 1.0, 1.0, 1.0] if where == "ceiling" else [0.1, 0.11, 0.1, 0.12]
    curves = {("avg", "fine"): accs, ("bilinear", "fine"): accs, ("avg", "coarse"): [1.0] * 4}
    adv = make_advice(make_probe(curves, std=0.0 if where == "ceiling" else 0.01))
    assert adv.finetune_stages == () and adv.tap_layers == () and adv.over_compression_after is None
    assert adv.best_pooling["significant"] is False
    assert "cannot tell the layers apart" in adv.text and "no stage recommendation" in adv.text
    assert "Fine-tune" not in adv.text and "Tap" not in adv.text
    stuck = adv.numbers["indiscriminate"]
    assert stuck["at"] == where and stuck["probes"] == 8 and adv.numbers["discriminates"] is False
    assert stuck["noise_floor"] == pytest.approx(5 / 200)  # one test image per fold
    assert ("the ceiling (1.000)" if where == "ceiling" else "chance (0.100)") in adv.text
    # one probe clearly below the ceiling (beyond two noises): the curves discriminate again
    adv = make_advice(make_probe({("avg", "fine"): [0.9, 1.0, 1.0, 1.0]}, std=0.0))
    assert adv.numbers["discriminates"] is True and adv.finetune_stages == ("middle", "late")


def test_part_size_uses_the_stride():
    adv = make_advice(make_probe({("avg", "fine"): [0.2, 0.4, 0.6, 0.8]}), part_size=10)
    assert adv.numbers["part_size"] == {"px": 10, "stride_exceeds_at": "l3", "rf_covers_from": "l1"}
    assert adv.over_compression_after == "l2"  # the curves do not settle it: the stride does
    assert "from `l3` on (16 px)" in adv.text
    none = make_advice(make_probe({("avg", "fine"): [0.2, 0.4, 0.6, 0.8]}), part_size=64)
    assert none.numbers["part_size"]["stride_exceeds_at"] is None


def test_cka_and_coarse_are_quoted():
    cka = [{"a": "l1", "b": "l2", "cka": 0.9}, {"a": "l2", "b": "l3", "cka": 0.35}, {"a": "l3", "b": "l4", "cka": 0.8}]
    adv = make_advice(make_probe({("avg", "fine"): [0.2, 0.4, 0.6, 0.8], ("avg", "coarse"): [0.6, 0.7, 0.8, 0.9]},
                                 cka=cka))
    assert "`l2` → `l3` (debiased linear CKA 0.350" in adv.text
    assert "Coarse labels: best 0.900 ± 0.020 at `l4`" in adv.text


def test_no_single_layer_pooling_is_an_error():
    with pytest.raises(ConfigError, match="avg, max or bilinear"):
        make_advice(make_probe({("hypercolumn", "fine"): [0.2, 0.4, 0.6, 0.8]}))


def test_json_contract():
    adv = make_advice(make_probe({("avg", "fine"): [0.2, 0.4, 0.6, 0.8]}))
    data = json.loads(json.dumps(adv.to_json()))
    assert set(data) >= {"text", "tap_layers", "over_compression_after", "best_pooling", "finetune_stages",
                         "numbers"}
    assert set(data["best_pooling"]) >= {"fine", "gain"}


# --- the command -----------------------------------------------------------------------------


def test_advise_from_a_probe_folder(tmp_path):
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "probe.json").write_text(json.dumps(make_probe(
        {("avg", "fine"): [0.3, 0.7, 0.69, 0.5], ("avg", "coarse"): [0.6, 0.7, 0.8, 0.95]})))
    out = tmp_path / "adv"
    result = run("advise", "--from-probe", probe_dir, "--part-size", "12", "--out", out)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "advice.json").read_text())
    assert data["over_compression_after"] == "l2" and data["tap_layers"] == ["l2", "l3"]
    assert "0.700" in (out / "advice.md").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["files"]) == ["advice.json", "advice.md"]
    assert "Over-compression after" in result.output


def test_advise_errors_are_one_line(tmp_path):
    for args, code, needle in [
        (["--from-probe", tmp_path], 2, "no probe.json"),  # a config error (exit 2), documented
        ([], 2, "DATA"),
        (["mobilenet_v2", tmp_path, "--part-size", "0"], 2, "--part-size"),
    ]:
        result = run("advise", *args, "--out", tmp_path / "o")
        assert result.exit_code == code, result.output
        err = result.stderr.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "o").exists()


def test_advise_end_to_end(tmp_path):
    ds = generate(tmp_path / "syn", per_class=4, size=48, seed=0)
    torch.manual_seed(0)
    model = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), model)
    out = tmp_path / "adv"
    result = run("advise", model, ds.root, "--arch", "resnet18", "--size", "48", "--device", "cpu",
                 "--coarse-map", ds.coarse_map_path, "--folds", "2", "--pool", "avg,bilinear",
                 "--part-size", "10", "--out", out)
    assert result.exit_code == 0, result.output
    for name in ("advice.md", "advice.json", "probe.json", "probe.csv", "probe.md", "probe.png", "manifest.json"):
        assert (out / name).is_file(), name
    advice = json.loads((out / "advice.json").read_text())
    probe = json.loads((out / "probe.json").read_text())
    layers = [layer["name"] for layer in probe["layers"]]
    assert advice["tap_layers"] and set(advice["tap_layers"]) <= set(layers)
    assert advice["finetune_stages"] and set(advice["finetune_stages"]) <= {"early", "middle", "late"}
    best = advice["numbers"]["fine_best"]
    assert f"{best['acc_mean']:.3f} ± {best['acc_std']:.3f}" in advice["text"]  # it quotes its numbers
    assert f"`{best['layer']}`" in advice["text"]
