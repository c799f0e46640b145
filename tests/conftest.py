"""Small synthetic CNNs shared by the tests (no downloads, no real weights)."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest
import torch
from torch import nn

torch.set_num_threads(2)


class ResBlock(nn.Module):
    """A ResNet-style block: one ReLU module used twice, an in-place add after bn2."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class TinyNet(nn.Module):
    """conv(s2) -> bn -> relu(inplace) -> ResBlock -> conv(s2) -> pool -> fc."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=True),
        )
        self.block = ResBlock(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.down(self.block(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


Pair = collections.namedtuple("Pair", ["left", "right"])


class MultiOut(nn.Module):
    """Returns a tuple, a dict and a namedtuple from submodules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor):
        y = self.conv(x)
        return y, {"mean": y.mean((2, 3)), "max": y.amax((2, 3))}


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.multi = MultiOut()
        self.split = SplitPair()

    def forward(self, x: torch.Tensor):
        y, stats = self.multi(x)
        pair = self.split(y)
        return pair.left + pair.right + stats["mean"][:, :2, None, None]


class SplitPair(nn.Module):
    def forward(self, x: torch.Tensor) -> Pair:
        return Pair(x[:, :2], x[:, 2:])


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    net = TinyNet()
    # Non-trivial BatchNorm statistics so that eval mode differs from identity.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return net.eval()


@pytest.fixture
def tiny_input() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


def reference_records(model: nn.Module, x: torch.Tensor, names: list[str]) -> list[tuple[str, torch.Tensor]]:
    """The definition of a correct record: a clone taken inside the hook, every call."""
    out: list[tuple[str, torch.Tensor]] = []
    modules = dict(model.named_modules())
    counts: dict[str, int] = {}
    handles = []

    def make(name: str):
        def hook(m, a, o):
            counts[name] = counts.get(name, 0) + 1
            label = name if counts[name] == 1 else f"{name}:{counts[name]}"
            if isinstance(o, torch.Tensor):
                out.append((label, o.detach().clone()))

        return hook

    for n in names:
        handles.append(modules[n].register_forward_hook(make(n)))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def run(*args):
    """Invoke the CLI in-process (typer's CliRunner); every argument is str()-ed."""
    from typer.testing import CliRunner

    from fgscope.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, code: int, *needles: str) -> None:
    """The CLI failed with `code`, one `error:` line on stderr naming `needles`, no traceback."""
    assert result.exit_code == code, result.output
    err = result.stderr.strip()
    assert err.startswith("error:"), err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in result.output
    for n in needles:
        assert n in err, err


def deny_scandir(monkeypatch: pytest.MonkeyPatch, *locked: Path) -> None:
    """Make `os.scandir` fail with EACCES on `locked` folders (root ignores chmod)."""
    real, denied = os.scandir, {os.path.realpath(p) for p in locked}

    def scandir(path: object = ".") -> object:
        if isinstance(path, (str, os.PathLike)) and os.path.realpath(path) in denied:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "scandir", scandir)
