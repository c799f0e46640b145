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


# --- issue 13: geometry that never lies ---------------------------------------------------------
# The method above, for any layer: positive-weight copies (max pooling averaged instead, as its
# gradient reaches the argmax only), the input-gradient support of one unit, in float64.


def _averaging_copy(model):
    """Positive weights that average (no saturation in ReLU6 / hardswish), max pools averaged."""
    for m in list(model.modules()):
        for cname, c in list(m.named_children()):
            if isinstance(c, nn.MaxPool2d):
                setattr(m, cname, nn.AvgPool2d(c.kernel_size, c.stride, c.padding, c.ceil_mode))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
                w = m.weight.abs() + 1e-3
                m.weight.copy_(w / w.flatten(1).sum(1).view(-1, *[1] * (w.dim() - 1)))
                if m.bias is not None:
                    m.bias.zero_()
    return model.eval().double()


def _support(model, layer, size, unit=None, positive=True, draws=1):
    """(geometry, measured first pixel (H, W), measured last pixel + 1, unit) of one unit of
    `layer` (its map in NCHW via the layout), union over `draws` random inputs."""
    from fgscope.layouts import to_nchw

    geo, _ = trace_geometry(model, torch.zeros(1, 3, size, size, dtype=torch.float64), [layer])
    g = geo[layer]
    module = dict(model.named_modules())[layer]
    lo, hi = None, None
    gen = torch.Generator().manual_seed(0)
    for _ in range(draws):
        x = torch.rand(1, 3, size, size, dtype=torch.float64, generator=gen)
        x = (x * 0.01 if positive else x - 0.5).requires_grad_(True)
        got = []
        h = module.register_forward_hook(
            lambda m, a, o, got=got: got.append(o if torch.is_tensor(o) else o[0]))
        try:
            model(x)
        finally:
            h.remove()
        y = to_nchw(got[0], g.layout)
        i, j = unit or (y.shape[-2] // 2, y.shape[-1] // 2)
        r = torch.rand(y.shape[1], dtype=y.dtype, generator=gen) + 0.5
        (y[0, :, i, j] * r).sum().backward()
        nz = x.grad[0].abs().sum(0).nonzero()
        a, b = nz.min(0).values, nz.max(0).values + 1
        lo = a if lo is None else torch.minimum(lo, a)
        hi = b if hi is None else torch.maximum(hi, b)
    return g, lo.tolist(), hi.tolist(), (i, j)


def _predicted(g, unit, size):
    lo = [-g.padding[a] + unit[a] * g.stride[a] for a in (0, 1)]
    return [max(0, v) for v in lo], [min(size, v + g.rf[a]) for a, v in enumerate(lo)]


@pytest.mark.parametrize(
    "layer,size,unit,rf,stride",
    [
        ("stage2", 128, None, 63, 8),  # fits: both ends checked
        ("stage3", 352, (10, 10), 303, 16),  # start 9, end 312
        ("stage4", 288, (0, 0), 527, 32),  # the far end: 263
        ("stage4", 288, (8, 8), 527, 32),  # the near end: -263 + 256 -> 0 .. clipped
    ],
)
def test_shufflenet_channel_shuffle_keeps_the_geometry(layer, size, unit, rf, stride):
    torch.manual_seed(0)
    model = _averaging_copy(torchvision.models.shufflenet_v2_x0_5(weights=None))
    g, lo, hi, u = _support(model, layer, size, unit)
    assert g.rf == (rf, rf) and g.stride == (stride, stride) and g.exact and g.layout.kind == "NCHW"
    assert (lo, hi) == _predicted(g, u, size)


def test_shufflenet_at_224_matches_the_issue():
    model = torchvision.models.shufflenet_v2_x1_0(weights=None)
    g = _geo(model, 224, ["stage2", "stage3", "stage4", "fc"])
    assert [(g[n].rf[0], g[n].stride[0], g[n].exact) for n in ("stage2", "stage3", "stage4")] == [
        (63, 8, True), (303, 16, True), (527, 32, True),
    ]
    assert not g["fc"].spatial


class StackSum(nn.Module):
    """SKNet / ResNeSt style: branches stacked on a new axis, then summed over it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.fuse = nn.Identity()
        self.out = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        x = self.stem(x)
        u = torch.stack([self.a(x), self.b(x)], 1)  # (N, 2, C, H, W)
        grouped = u.view(u.shape[0], 2, 2, 4, *u.shape[-2:]).flatten(1, 3)  # grouped channels
        return self.out(self.fuse(grouped.view_as(u).sum(1)))


class LPPoolNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.LPPool2d(2, 3, 3)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(self.pool(x))


class Conv3dNet(nn.Module):
    """Frames stacked along a depth axis, a (3, 7, 7) kernel, then averaged over depth."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 4, (3, 7, 7), padding=(1, 3, 3), stride=(1, 2, 2))
        self.mean = nn.Identity()

    def forward(self, x):
        return self.mean(self.conv(x.unsqueeze(2).repeat(1, 1, 4, 1, 1)).mean(2))


@pytest.mark.parametrize(
    "net,layer,rf,stride",
    [(StackSum, "fuse", 7, 1), (StackSum, "out", 9, 2), (LPPoolNet, "pool", 3, 3),
     (LPPoolNet, "conv", 9, 3), (Conv3dNet, "mean", 7, 2)],
)
def test_small_blocks_by_gradient_support(net, layer, rf, stride):
    torch.manual_seed(0)
    g, lo, hi, u = _support(_averaging_copy(net()), layer, 48)
    assert g.rf == (rf, rf) and g.stride == (stride, stride) and g.exact, g
    assert (lo, hi) == _predicted(g, u, 48)


class Unpool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)

    def forward(self, x):
        y, idx = self.pool(self.conv(x))
        return self.unpool(y, idx)


def test_max_unpool_is_followed_and_says_units_share_fields():
    model = _averaging_copy(Unpool())  # MaxPool2d(return_indices=True) is kept: it must be
    model.pool = nn.MaxPool2d(2, return_indices=True)
    g = trace_geometry(model, torch.zeros(1, 3, 32, 32, dtype=torch.float64), ["unpool"])[0]["unpool"]
    # each 2x2 group sees its pooled unit's field: the conv's 3 plus one conv unit
    assert g.stride == (1, 1) and g.rf == (4, 4) and g.padding == (1, 1)
    assert not g.exact and "groups of 2x2" in g.note
    # the group at (8, 8): the union over inputs of where the argmax fell is the whole field
    unit = (8, 8)
    lo, hi = None, None
    for seed in range(12):
        torch.manual_seed(seed)
        x = torch.rand(1, 3, 32, 32, dtype=torch.float64, requires_grad=True)
        y = model(x)
        y[0, :, 8:10, 8:10].sum().backward()
        nz = x.grad[0].abs().sum(0).nonzero()
        a, b = nz.min(0).values, nz.max(0).values + 1
        lo = a if lo is None else torch.minimum(lo, a)
        hi = b if hi is None else torch.maximum(hi, b)
    assert (lo.tolist(), hi.tolist()) == _predicted(g, unit, 32)


def test_pooling_rules_come_from_the_operation_not_its_name():
    class Pools(nn.Module):
        def forward(self, x):
            a = nn.functional.lp_pool2d(x, 2.0, 3, 3)  # norm 2, kernel 3, stride 3
            b = nn.functional.avg_pool2d(x, 2, 2)
            c = nn.functional.adaptive_max_pool2d(x, 4)  # 48 / 4 = 12
            return a.sum() + b.sum() + c.sum()

    from fgscope.functional import op_names

    model = Pools().eval()
    x = torch.zeros(1, 3, 48, 48)
    assert {"lp_pool2d", "avg_pool2d", "adaptive_max_pool2d"} <= set(op_names(model, x).ops)
    g, _ = trace_geometry(model, x, "lp_pool2d,avg_pool2d,adaptive_max_pool2d")
    assert (g["lp_pool2d"].rf, g["lp_pool2d"].stride) == ((3, 3), (3, 3))
    assert (g["avg_pool2d"].rf, g["avg_pool2d"].stride) == ((2, 2), (2, 2))
    assert (g["adaptive_max_pool2d"].rf, g["adaptive_max_pool2d"].stride) == ((12, 12), (12, 12))
    assert all(v.exact for v in g.values())


def test_rank_changing_views_are_not_global_pooling():
    class Views(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.tokens = nn.Identity()
            self.back = nn.Identity()

        def forward(self, x):
            y = self.conv(x)
            t = self.tokens(y.flatten(2).transpose(1, 2))  # (N, HW, C)
            return self.back(t.transpose(1, 2).unflatten(2, y.shape[-2:]))

    g = _geo(Views(), 16)
    assert g["tokens"].layout.kind == "NLC" and g["tokens"].rf == (3, 3) and g["tokens"].exact
    assert g["back"].layout.kind == "NCHW" and g["back"].rf == (3, 3) and g["back"].exact


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["swin_t", "maxvit_t"])
def test_windowed_attention_is_flagged_with_a_reason(arch):
    model = torchvision.models.get_model(arch, weights=None)
    g = _geo(model, 224, "blocks")
    spatial = [v for v in g.values() if v is not None and v.spatial]
    assert spatial and all(v.exact or v.note for v in g.values() if v is not None)
    assert max(v.stride[0] for v in spatial) == 32  # the strides survive the windows
    if arch == "swin_t":
        assert g["features.1.0"].layout.kind == "NHWC"
        # W-MSA: each 7x7 window of 4-px patches sees the window
        assert g["features.1.0"].rf == (28, 28) and "groups of 7x7" in g["features.1.0"].note


def _tiny_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer([4, 4], 8, [2, 2], [2, 2], [4, 4], num_classes=5).eval()


def test_swin_window_attention_by_gradient_support():
    model = _tiny_swin().double()
    # the first block (no shift): every unit of a 4x4 window sees the window's 16 x 16 px
    g, lo, hi, u = _support(model, "features.1.0", 64, unit=(4, 4), positive=False)
    assert g.rf == (16, 16) and g.stride == (4, 4) and g.layout.kind == "NHWC"
    assert "groups of 4x4" in g.note
    assert (lo, hi) == ([16, 16], [32, 32])  # window 1 starts at patch 4: pixel 16
    # shifted windows and what follows them: flagged, not exact
    later, _ = trace_geometry(model, torch.zeros(1, 3, 64, 64, dtype=torch.float64), "blocks")
    assert not later["features.1.1"].exact and "roll" in later["features.1.1"].notes[0]


def test_detector_backbone_and_transform_are_flagged_or_exact():
    det = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None).eval()
    g = _geo(det, 96, ["backbone"])
    for name, v in g.items():  # resized by the transform: flagged, with the reason
        assert v is not None and not v.exact and "interpolate" in v.notes[0], name
        assert v.rf[0] < 2000  # not the 10^4 - 10^5 px of a lost trace
    body = _geo(det.backbone, 128, ["body.16", "fpn"])
    assert body["body.16"].exact and body["body.16"].stride == (32, 32)
    assert all(v.exact or v.note for v in body.values())


def test_unknown_shape_changes_are_never_exact():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.out = nn.Identity()

        def forward(self, x):
            y = self.conv(x)
            z = y.reshape(y.shape[0], 4, 8, 32)  # two rows per row
            return self.out(torch.fft.rfft2(z).real)

    g = _geo(Odd(), 16)["out"]
    assert not g.exact and g.note
