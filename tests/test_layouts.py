"""layouts: NHWC, tokens and windows found by the geometry trace, and undone by to_nchw."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from fgscope.geometry import trace_geometry
from fgscope.layouts import as_map, to_nchw


def _geo(model, size, layers):
    return trace_geometry(model.eval(), torch.zeros(1, 3, size, size), layers)[0]


def test_to_nchw_by_name():
    x = torch.randn(2, 5, 6, 7)  # NCHW
    assert to_nchw(x, "NCHW") is x
    assert torch.equal(to_nchw(x.permute(0, 2, 3, 1), "NHWC"), x)
    sq = torch.randn(2, 5, 4, 4)
    tokens = sq.flatten(2).transpose(1, 2)  # (N, 16, C)
    assert torch.equal(to_nchw(tokens, "NLC"), sq)
    with_cls = torch.cat([torch.zeros(2, 1, 5), tokens], 1)  # a class token in front
    assert torch.equal(to_nchw(with_cls, "NLC"), sq)
    assert torch.equal(to_nchw(tokens.transpose(1, 2), "NCL"), sq)
    with pytest.raises(ValueError):
        to_nchw(torch.randn(2, 7, 5), "NLC")  # 7 tokens: no square grid
    with pytest.raises(ValueError):
        to_nchw(torch.randn(2, 5), "NC")


class Arrangements(nn.Module):
    """One map in four arrangements: channels last, tokens with a class token, windows."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.nhwc, self.tokens, self.windows = nn.Identity(), nn.Identity(), nn.Identity()

    def forward(self, x):
        y = self.conv(x)  # (N, 6, 8, 8)
        n, c, h, w = y.shape
        nhwc = self.nhwc(y.permute(0, 2, 3, 1))
        tokens = self.tokens(torch.cat([y.new_zeros(n, 1, c), y.flatten(2).transpose(1, 2)], 1))
        win = nhwc.reshape(n, h // 4, 4, w // 4, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 16, c)
        return self.windows(win), tokens


def test_layouts_are_found_and_undone_for_any_batch():
    model = Arrangements().eval()
    g = _geo(model, 8, "all")
    assert [g[n].layout.kind for n in ("conv", "nhwc", "tokens", "windows")] == [
        "NCHW", "NHWC", "NLC", "windows",
    ]
    assert g["tokens"].layout.label == "tokens" and g["tokens"].layout.extra == 1
    assert all(g[n].exact and g[n].rf == (3, 3) for n in ("nhwc", "tokens", "windows"))
    x = torch.randn(3, 3, 8, 8)  # the trace ran with a batch of one; layouts fit any batch
    seen = {}
    hooks = [getattr(model, n).register_forward_hook(lambda m, a, o, n=n: seen.setdefault(n, o))
             for n in ("conv", "nhwc", "tokens", "windows")]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for n in ("nhwc", "tokens", "windows"):
        assert torch.equal(to_nchw(seen[n], g[n].layout), seen["conv"]), n
        assert torch.equal(as_map(seen[n], g[n].layout), seen["conv"]), n
    assert as_map(seen["conv"], g["conv"].layout) is seen["conv"]


def test_convnext_inner_layers_are_channels_last():
    model = torchvision.models.convnext_tiny(weights=None)
    g = _geo(model, 64, "all")
    inner = [n for n in g if n.startswith("features.1.0.block.")]
    kinds = {n: g[n].layout.kind for n in inner}
    assert kinds["features.1.0.block.0"] == "NCHW"  # the depthwise conv
    assert kinds["features.1.0.block.2"] == "NHWC"  # LayerNorm after the permute
    assert kinds["features.1.0.block.3"] == "NHWC"  # Linear over channels
    assert all(g[n].exact for n in inner)


def _tiny_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=64, patch_size=16, num_layers=2, num_heads=2,
                             hidden_dim=16, mlp_dim=32, num_classes=5).eval()


def test_vit_rows_say_tokens():
    from fgscope.summary.compute import summarize

    rows = {r.name: r for r in summarize(_tiny_vit(), (64, 64), "all,encoder.layers.encoder_layer_0").rows}
    ln = rows["encoder.layers.encoder_layer_0.ln_1"]
    assert ln.layout == "tokens" and ln.shape == [17, 16]  # 16 patches and the class token
    assert ln.rf == 16 and ln.stride == 16 and ln.rf_exact  # a token sees its patch
    att = rows["encoder.layers.encoder_layer_0"]
    assert att.layout == "tokens" and att.rf == 64 and not att.rf_exact  # every token: the map
    assert "same field" in att.rf_note
    assert rows["heads.head"].layout == "vector"


def _tiny_swin():
    from torchvision.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    return SwinTransformer([4, 4], 8, [2, 2], [2, 2], [4, 4], num_classes=5).eval()


def test_swin_block_grid_shows_spatial_maps():
    from fgscope.layers.compute import inspect
    from fgscope.render import render_grid

    model = _tiny_swin()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    result = inspect(model, images, layers="features.1.0")
    row = result.rows[0]
    acts = result.activations["features.1.0"]
    side = result.inputs.shape[-1] // 4  # 4-px patches
    assert acts.shape == (2, 8, side, side)  # (N, C, H, W), not (N, H, W, C)
    assert row.spatial == [side, side] and row.channels == 8 and row.stride == 4
    # the map is the block's NHWC output, channels first
    seen = []
    h = model.features[1][0].register_forward_hook(lambda m, a, o: seen.append(o))
    with torch.no_grad():
        model(torch.stack([torch.as_tensor(result.inputs[i]) for i in range(2)]))
    h.remove()
    assert torch.allclose(acts, seen[0].permute(0, 3, 1, 2), atol=1e-5)
    img = render_grid(acts[0], k=4)  # four tiles of side x side maps, not C-wide stripes
    assert img.size[0] > 2 * side and img.size[1] > 2 * side
