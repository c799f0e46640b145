"""geometry: hand-computed chains, branches checked against gradients, published values."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from fgscope.geometry import Axis, count_macs, trace_geometry


def _geo(model, size=64, layers="all"):
    g, _ = trace_geometry(model.eval(), torch.zeros(1, 3, size, size), layers)
    return g


def test_axis_formula_by_hand():
    a = Axis(1, 1, 0).conv(3, 1, 1)  # 3x3 pad 1
    assert (a.stride, a.rf, a.start) == (1, 3, -1)
    b = a.conv(3, 2, 1)  # 3x3 stride 2 pad 1
    assert (b.stride, b.rf, b.start) == (2, 5, -2)
    c = b.conv(3, 1, 2, d=2)  # dilated: effective kernel 5
    assert (c.stride, c.rf, c.start) == (2, 13, -6)


def test_plain_chain_by_hand():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 7, stride=2, padding=3),  # j2 r7 p3
        nn.ReLU(),
        nn.MaxPool2d(3, 2, 1),  # j4 r11 p5
        nn.Conv2d(4, 4, 3, padding=1),  # j4 r19 p9
        nn.Conv2d(4, 4, (1, 5), padding=(0, 2)),  # W only: r 19 x 35
    )
    g = _geo(net)
    assert g["0"].stride == (2, 2) and g["0"].rf == (7, 7) and g["0"].padding == (3, 3)
    assert g["1"].rf == (7, 7)  # pointwise
    assert g["2"].stride == (4, 4) and g["2"].rf == (11, 11) and g["2"].padding == (5, 5)
    assert g["3"].rf == (19, 19) and g["3"].padding == (9, 9)
    assert g["4"].rf == (19, 35) and g["4"].padding == (9, 17)
    assert all(v.exact for v in g.values())


class Branchy(nn.Module):
    """Inception-like branches of different kernels concatenated, then a skip connection."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b1 = nn.Conv2d(4, 2, 1)
        self.b3 = nn.Conv2d(4, 2, 3, padding=1)
        self.b5 = nn.Sequential(nn.Conv2d(4, 2, 5, padding=2), nn.Conv2d(2, 2, 5, padding=4, dilation=2))
        self.pool = nn.AvgPool2d(2)
        self.skip = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 3, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b3(x), self.b5(x)], 1)
        x = self.pool(x)
        x = x + self.skip(x)
        return self.head(x)


def test_branches_by_hand():
    g = _geo(Branchy())
    # stem: j2 r3 start -1
    assert g["stem"].rf == (3, 3)
    assert g["b1"].rf == (3, 3)
    assert g["b3"].rf == (7, 7)  # 3 + 2*2
    assert g["b5.0"].rf == (11, 11)  # 3 + 4*2
    assert g["b5.1"].rf == (27, 27)  # 11 + 8*2 (dilated 5 -> 9)
    # cat = union of the branches (all centred): the widest, 27; pool 2: +1*2 -> 29, j4
    assert g["pool"].stride == (4, 4) and g["pool"].rf == (29, 29)
    assert g["head"].rf == (29 + 2 * 4 + 2 * 4,) * 2


def _positive(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(1.0)
                if m.bias is not None:
                    m.bias.zero_()
    return model.eval()


@pytest.mark.parametrize("net", [Branchy, lambda: torchvision.models.resnet18(weights=None).layer1])
def test_receptive_field_equals_gradient_support(net):
    """The definition: the input pixels whose gradient is non-zero for one output unit."""
    model = _positive(net())
    if isinstance(model, nn.Sequential):  # resnet layer1 takes 64 channels
        model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), *model)
        model = _positive(model)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    size = 96
    x = torch.ones(1, 3, size, size, requires_grad=True)
    out = model(x)
    geo, _ = trace_geometry(model, torch.zeros(1, 3, size, size), layers=[_last(model)])
    g = geo[_last(model)]
    i = out.shape[-1] // 2
    out[0, 0, i, i].backward()
    nz = x.grad[0].abs().sum(0).nonzero()
    lo = nz.min(0).values.tolist()
    hi = nz.max(0).values.tolist()
    for axis in (0, 1):
        start = -g.padding[axis] + i * g.stride[axis]
        assert lo[axis] == start
        assert hi[axis] - lo[axis] + 1 == g.rf[axis]


def _last(model):
    return [n for n, _ in model.named_modules() if n][-1] if not isinstance(model, Branchy) else "head"


@pytest.mark.parametrize(
    "arch,layer,size,stride,rf",
    [
        # Araujo, Norris & Sim (Distill 2019), Table 1; torchvision keeps these architectures.
        ("vgg16", "features.30", 224, 32, 212),
        ("alexnet", "features.12", 224, 32, 195),
        ("inception_v3", "Mixed_7c", 299, 32, 1311),
        ("mobilenet_v2", "features.18", 224, 32, 491),
        # torchvision's ResNet-50 is v1.5 (stride in the 3x3 conv): 427, not v1's 483.
        ("resnet50", "layer4", 224, 32, 427),
    ],
)
def test_published_receptive_fields(arch, layer, size, stride, rf):
    kw = {"aux_logits": False, "init_weights": False} if arch == "inception_v3" else {}
    model = torchvision.models.get_model(arch, weights=None, **kw)
    g = _geo(model, size, [layer])[layer]
    assert g.stride == (stride, stride)
    assert g.rf == (rf, rf)
    assert g.exact


def test_squeeze_excitation_is_flagged_not_counted():
    model = torchvision.models.mobilenet_v3_small(weights=None)
    g = _geo(model, 224, ["features.1", "features.12"])
    assert g["features.1"].global_context  # the first block has an SE gate
    assert g["features.12"].spatial and g["features.12"].stride == (32, 32)
    assert g["features.12"].rf[0] < 2000


def test_channels_last_blocks_keep_geometry():
    # ConvNeXt permutes to NHWC around its LayerNorm and MLP.
    model = torchvision.models.convnext_tiny(weights=None)
    g = _geo(model, 64, ["features.0", "features.1.0"])
    assert g["features.0"].stride == (4, 4) and g["features.0"].rf == (4, 4)
    assert g["features.1.0"].rf == (4 + 6 * 4,) * 2


def test_upsampling_is_approximate():
    net = nn.Sequential(nn.Conv2d(3, 3, 3, stride=2, padding=1), nn.Upsample(scale_factor=2, mode="bilinear"))
    g = _geo(net)
    assert g["1"].stride == (1, 1) and not g["1"].exact


def test_vectors_after_global_pooling():
    model = torchvision.models.resnet18(weights=None)
    g = _geo(model, 224, ["avgpool", "fc"])
    assert not g["fc"].spatial
    assert g["fc"].rf == (435 + 6 * 32,) * 2  # union of the 7x7 units


@pytest.mark.parametrize("arch,mmacs", [("resnet50", 4089), ("mobilenet_v2", 301), ("vgg16", 15470)])
def test_macs_match_published(arch, mmacs):
    model = torchvision.models.get_model(arch, weights=None).eval()
    assert count_macs(model, torch.zeros(1, 3, 224, 224)) / 1e6 == pytest.approx(mmacs, rel=0.01)
