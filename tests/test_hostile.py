"""Hostile model files: every kind of file that could run code from its bytes, through every
command that takes a model, in-process. Without --trust no payload may ever run, the exit code
is the documented one (4: unsafe, needs --trust; 3: damaged or unusable) and stderr is one
`error:` line, with no traceback and no logging noise.

Each payload's `__reduce__` creates a marker file; the marker folder must stay empty.
"""

from __future__ import annotations

import io
import json
import pathlib
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, run
from PIL import Image
from torch import nn

from fgscope.errors import ModelLoadError, UnsafeModelError
from fgscope.models import load_model


class Touch:
    """Unpickling this creates `marker`: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


class SmallNet(nn.Module):
    def __init__(self, inputs: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(inputs, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.down = nn.Conv2d(4, 8, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.down(self.relu(self.conv(x)))))
        return self.fc(torch.flatten(x, 1))


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


# --- building the files ------------------------------------------------------------------


def _export(net: nn.Module, x: torch.Tensor, path: Path, **kwargs) -> Path:
    torch.manual_seed(0)
    torch.export.save(torch.export.export(net.eval(), (x,), **kwargs), str(path))
    return path


def _rewrite(src: Path, dst: Path, edit: Callable[[dict[str, bytes]], None]) -> Path:
    """Copy a .pt2 with `edit` applied to its members (names relative to the archive root)."""
    with zipfile.ZipFile(src) as zf:
        names = zf.namelist()
        root = names[0].split("/", 1)[0] + "/"
        members = {n[len(root) :]: zf.read(n) for n in names}
    edit(members)
    with zipfile.ZipFile(dst, "w") as zf:
        for name, data in members.items():
            zf.writestr(root + name, data)
    return dst


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _edit_json(members: dict[str, bytes], name: str, edit: Callable[[dict], None]) -> None:
    doc = json.loads(members[name])
    edit(doc)
    members[name] = json.dumps(doc).encode()


def _pickled_weight(marker: Path) -> Callable[[dict[str, bytes]], None]:
    def edit(m: dict[str, bytes]) -> None:
        def cfg(doc: dict) -> None:
            entry = next(iter(doc["config"].values()))
            entry["use_pickle"] = True
            m["data/weights/" + entry["path_name"]] = _saved(Touch(marker))

        _edit_json(m, "data/weights/model_weights_config.json", cfg)

    return edit


def _constant(marker: Path, file: str, data: bytes) -> Callable[[dict[str, bytes]], None]:
    def edit(m: dict[str, bytes]) -> None:
        entry = {"path_name": file, "is_param": False, "use_pickle": True, "tensor_meta": None}
        _edit_json(
            m,
            "data/constants/model_constants_config.json",
            lambda doc: doc["config"].__setitem__("evil", entry),
        )
        m["data/constants/" + file] = data

    return edit


def _program(edit: Callable[[dict], None]) -> Callable[[dict[str, bytes]], None]:
    return lambda m: _edit_json(m, "models/model.json", edit)


def _evil_name(marker: Path) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:  # the input placeholder's name goes verbatim into fx code
        old = doc["graph_module"]["graph"]["inputs"][-1]["as_tensor"]["name"]
        new = f"x=__import__('pathlib').Path('{marker}').touch()"
        doc.update(json.loads(json.dumps(doc).replace(json.dumps(old), json.dumps(new))))

    return edit


def _evil_expr(marker: Path) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:  # sympify() evaluates shape expressions with eval
        tv = doc["graph_module"]["graph"]["tensor_values"]
        expr = f"__import__('pathlib').Path('{marker}').touch() or 1"
        next(iter(tv.values()))["sizes"][0] = {"as_expr": {"expr_str": expr, "hint": {"as_int": 1}}}

    return edit


def _evil_spec(marker: Path) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:  # the kwargs keys of in_spec are pasted between quotes
        sig = doc["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(sig["in_spec"])
        kwargs = spec[1]["children_spec"][1]
        kwargs["context"] = json.dumps([f"a':__import__('pathlib').Path('{marker}').touch(),'b"])
        kwargs["children_spec"] = [{"type": None, "context": None, "children_spec": []}]
        spec[1]["children_spec"][0]["children_spec"] = []
        sig["in_spec"] = json.dumps(spec)

    return edit


def _evil_guard(marker: Path) -> Callable[[dict], None]:
    def edit(doc: dict) -> None:  # guards are exec'd as Python by ExportedProgram.module()
        doc["guards_code"] = [f"__import__('pathlib').Path('{marker}').touch() is None"]

    return edit


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _torchscript_with(path: Path, extra: dict[str, bytes] | None, data_pkl: bytes | None) -> Path:
    scripted = torch.jit.script(SmallNet().eval())
    scripted.save(str(path), _extra_files=extra or {})
    if data_pkl is not None:  # the archive's own pickle replaced by one that calls Python
        with zipfile.ZipFile(path) as zf:
            members = {n: zf.read(n) for n in zf.namelist()}
        key = next(n for n in members if n.endswith("/data.pkl"))
        members[key] = data_pkl
        _zip(path, members)
    return path


# name -> (expected exit code without --trust, needle in the error); None: the file is
# harmless and loads, so any exit code will do, but errors are still one line; 0: must work.
EXPECTED: dict[str, tuple[int | None, str]] = {
    "bare_pickle.pt": (3, "not a PyTorch model file"),
    "nested.pt": (4, "pathlib.Path"),
    "ckpt_state_dict.pth": (4, "--trust"),
    "ckpt_model.pth": (4, "--trust"),
    "ckpt_with_arch.pth": (4, "--trust"),
    "legacy_format.pt": (4, "--trust"),
    "sample_inputs.pt2": (4, "data/sample_inputs/model.pt"),
    "pickled_weight.pt2": (4, "data/weights/weight_"),
    "legacy_weights.pt2": (4, "data/weights/model.pt"),
    "pickled_constant.pt2": (4, "data/constants/tensor_0"),
    "opaque_constant.pt2": (4, "data/constants/opaque_obj_0"),
    "custom_obj_constant.pt2": (4, "data/constants/custom_obj_0"),
    "aoti.pt2": (4, "data/aotinductor/"),
    "name_injection.pt2": (4, "name"),
    "expr_injection.pt2": (4, "shape expression"),
    "spec_injection.pt2": (4, "input/output spec"),
    "guard_injection.pt2": (4, "guard"),
    "legacy_layout.pt2": (4, "serialized_state_dict.pt"),
    "only_declares.pt2": (3, "holds no program"),
    "flat_zip.pt2": (3, "not a torch.export archive"),
    "duplicate_member.pt2": (3, "two members named"),
    "mlp.pt2": (3, "(N, 3, H, W)"),
    "static_batch2.pt2": (3, "batches of exactly 2"),
    "torchscript_data_pkl.pt": (3, "TorchScript"),
    "torchscript_extra.pt": (None, ""),
    "pickle_named.safetensors": (4, "--trust"),  # a torch.save file named .safetensors
    "metadata.safetensors": (3, "--arch"),
    "clean.pt2": (0, ""),  # the control: a batch-1 program works with every command
}
# Commands that take a model, with tiny inputs: (args before the model, args after it).
COMMANDS: dict[str, Callable[[Path, Path, Path], list]] = {
    "summary": lambda m, d, o: ["summary", m],
    "layers": lambda m, d, o: ["layers", m, d / "imgs", "--out", o],
    "dump": lambda m, d, o: ["dump", m, d / "imgs", "--out", o],
    "cam": lambda m, d, o: ["cam", m, d / "imgs" / "0.png", "--out", o],
    "similarity": lambda m, d, o: ["similarity", m, d / "imgs", "--out", o],
    "similarity_vs": lambda m, d, o: [
        "similarity",
        d / "clean.pt2",
        d / "imgs",
        "--vs",
        m,
        "--out",
        o,
    ],
    "probe": lambda m, d, o: ["probe", m, d / "dataset", "--out", o, "--folds", 2],
    "advise": lambda m, d, o: ["advise", m, d / "dataset", "--out", o, "--folds", 2],
    "report": lambda m, d, o: ["report", m, d / "imgs", "--out", o],
    "units": lambda m, d, o: ["units", m, d / "dataset", "--out", o, "--top", 2],
}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> Path:
    """Every hostile file, tiny images and an ImageFolder, built once; markers go to marks/."""
    d = tmp_path_factory.mktemp("hostile")
    marks = d / "marks"
    marks.mkdir()
    rng = np.random.default_rng(0)
    for folder, count in (("imgs", 4), ("dataset/a", 3), ("dataset/b", 3)):
        (d / folder).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels, "RGB").save(d / folder / f"{i}.png")

    def touch(name: str) -> Touch:
        return Touch(marks / name)

    clean = _export(SmallNet(), torch.randn(1, 3, 16, 16), d / "clean.pt2")
    state = SmallNet().state_dict()
    (d / "bare_pickle.pt").write_bytes(pickle.dumps({"model": touch("bare_pickle.pt")}))
    torch.save({"a": {"b": [touch("nested.pt")]}}, d / "nested.pt")
    torch.save(
        {"state_dict": {**state, "x": touch("ckpt_state_dict.pth")}}, d / "ckpt_state_dict.pth"
    )
    torch.save({"model": touch("ckpt_model.pth"), "epoch": 1}, d / "ckpt_model.pth")
    torch.save(
        {"state_dict": {**state, "x": touch("ckpt_with_arch.pth")}}, d / "ckpt_with_arch.pth"
    )
    torch.save(
        {"m": touch("legacy_format.pt")},
        d / "legacy_format.pt",
        _use_new_zipfile_serialization=False,
    )
    edits: dict[str, Callable[[dict[str, bytes]], None]] = {
        "sample_inputs.pt2": lambda m: m.__setitem__(
            "data/sample_inputs/model.pt",
            _saved(((torch.zeros(1, 3, 16, 16), touch("sample_inputs.pt2")), {})),
        ),
        "pickled_weight.pt2": _pickled_weight(marks / "pickled_weight.pt2"),
        "legacy_weights.pt2": lambda m: m.__setitem__(
            "data/weights/model.pt", _saved(touch("legacy_weights.pt2"))
        ),
        "pickled_constant.pt2": _constant(
            marks / "pickled_constant.pt2", "tensor_0", _saved(touch("pickled_constant.pt2"))
        ),
        "opaque_constant.pt2": _constant(
            marks / "opaque_constant.pt2",
            "opaque_obj_0",
            pickle.dumps(touch("opaque_constant.pt2")),
        ),
        "custom_obj_constant.pt2": _constant(
            marks / "custom_obj_constant.pt2",
            "custom_obj_0",
            _saved(touch("custom_obj_constant.pt2")),
        ),
        "aoti.pt2": lambda m: m.__setitem__("data/aotinductor/model/model.so", b"\x7fELF"),
        "name_injection.pt2": _program(_evil_name(marks / "name_injection.pt2")),
        "expr_injection.pt2": _program(_evil_expr(marks / "expr_injection.pt2")),
        "spec_injection.pt2": _program(_evil_spec(marks / "spec_injection.pt2")),
        "guard_injection.pt2": _program(_evil_guard(marks / "guard_injection.pt2")),
    }
    for name, edit in edits.items():
        _rewrite(clean, d / name, edit)
    with zipfile.ZipFile(clean) as zf:
        program = zf.read(next(n for n in zf.namelist() if n.endswith("models/model.json")))
    from torch._export.serde.schema import SCHEMA_VERSION

    _zip(
        d / "legacy_layout.pt2",
        {  # torch < 2.7's layout, which torch.export.load still reads
            "version": ".".join(map(str, SCHEMA_VERSION)).encode(),
            "serialized_exported_program.json": program,
            "serialized_state_dict.pt": _saved(touch("legacy_layout.pt2")),
            "serialized_constants.pt": _saved({}),
            "serialized_example_inputs.pt": _saved(((), {})),
        },
    )
    _zip(d / "only_declares.pt2", {"fake/archive_format": b"pt2", "fake/archive_version": b"0"})
    _zip(
        d / "flat_zip.pt2",
        {"archive_format": b"pt2", "data.pkl": pickle.dumps(touch("flat_zip.pt2"))},
    )
    with zipfile.ZipFile(d / "duplicate_member.pt2", "w") as zf, zipfile.ZipFile(clean) as src:
        for n in src.namelist():
            zf.writestr(n, src.read(n))
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr(n, src.read(n))
    _export(Mlp(), torch.randn(1, 16), d / "mlp.pt2")
    _export(SmallNet(), torch.randn(2, 3, 16, 16), d / "static_batch2.pt2")
    evil_pkl = pickle.dumps(touch("torchscript_data_pkl.pt"), protocol=2)
    _torchscript_with(d / "torchscript_data_pkl.pt", None, evil_pkl)
    _torchscript_with(
        d / "torchscript_extra.pt", {"evil.pkl": pickle.dumps(touch("torchscript_extra.pt"))}, None
    )
    from safetensors.torch import save_file

    (d / "pickle_named.safetensors").write_bytes(_saved(touch("pickle_named.safetensors")))
    evil = pickle.dumps(touch("metadata.safetensors")).hex()  # metadata is text, never unpickled
    save_file(state, d / "metadata.safetensors", metadata={"pickle": evil})
    return d  # ckpt_with_arch.pth runs with --arch: see _args


def _args(name: str, command: str, d: Path, out: Path) -> list:
    args = COMMANDS[command](d / name, d, out)
    if name != "ckpt_with_arch.pth":
        return args
    return [*args, "--vs-arch" if command == "similarity_vs" else "--arch", "resnet18"]


def _assert_quiet(result, capfd) -> None:
    captured = capfd.readouterr()
    for text in (result.output, captured.out, captured.err):
        assert "Traceback" not in text and "Logging error" not in text, text


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("name", list(EXPECTED))
def test_no_command_runs_code_from_a_hostile_file(hostile, name, command, tmp_path, capfd):
    code, needle = EXPECTED[name]
    result = run(*_args(name, command, hostile, tmp_path / "out"))
    assert list((hostile / "marks").iterdir()) == [], f"code from {name} ran"
    _assert_quiet(result, capfd)
    if code == 0:
        assert result.exit_code == 0, result.output
    elif code is not None:
        assert_one_line_error(result, code, needle)
    elif result.exit_code != 0:
        assert_one_line_error(result, result.exit_code)


# --- the payloads are live: --trust runs them --------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "nested.pt",
        "sample_inputs.pt2",
        "pickled_weight.pt2",
        "legacy_weights.pt2",
        "pickled_constant.pt2",
        "opaque_constant.pt2",
        "expr_injection.pt2",
        "name_injection.pt2",
    ],
)
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
def test_trust_runs_the_payload(hostile, name, tmp_path):
    """The refusals above are not luck: trusted, the same files do run their code."""
    marker = hostile / "marks" / name
    try:
        load_model(str(hostile / name), trust=True)
    except ModelLoadError:
        pass  # the payload is no model, but it ran while the file was read
    finally:
        ran = marker.exists()
        marker.unlink(missing_ok=True)  # keep marks/ empty for the other tests
    assert ran


@pytest.mark.parametrize(
    "name",
    [
        "sample_inputs.pt2",
        "pickled_weight.pt2",
        "legacy_weights.pt2",
        "pickled_constant.pt2",
        "opaque_constant.pt2",
        "expr_injection.pt2",
        "legacy_layout.pt2",
    ],
)
def test_guard_alone_stops_what_the_scan_would_catch(hostile, name, monkeypatch):
    """Defence in depth: with the pre-scan switched off, torch.export.load itself runs under a
    guard that forces weights_only and refuses plain unpickling and evaluated strings."""
    import fgscope.models.export as export

    monkeypatch.setattr(export, "_scan_pt2", lambda path, trust: None)
    with pytest.raises(UnsafeModelError) as info:
        load_model(str(hostile / name))
    assert "--trust" in str(info.value) and "\n" not in str(info.value)
    assert list((hostile / "marks").iterdir()) == []
    assert torch.load is torch.serialization.load and pickle.loads.__module__ in (
        "_pickle",
        "pickle",
    )


def test_clean_program_still_loads_and_runs(hostile):
    loaded = load_model(str(hostile / "clean.pt2"))
    assert loaded.max_batch == 1 and loaded.input_size == (16, 16)
    assert loaded.module(torch.zeros(1, 3, 16, 16)).shape == (1, 2)
