"""FPN necks of the DB detectors: DBFPN (v2.0 / PP-OCRv2) and RSEFPN (PP-OCRv3 / PP-OCRv4 mobile)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from architectures.layers import SEModule, conv2d, inference_fast_path, nearest_spread, upsampled_blocks
from architectures.necks import register


def upsample(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Nearest-neighbour upsampling by an integer factor (Paddle's F.upsample mode="nearest")."""
    return F.interpolate(x, scale_factor=scale, mode="nearest")


def add_upsampled(lateral: torch.Tensor, top: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``lateral + upsample(top, 2)``. ``in_place`` (on the caller's inference fast path) adds into ``lateral``,
    which must be a fresh tensor nothing else uses, without materialising the upsampled map (same sums)."""
    if not in_place:
        return lateral + upsample(top, 2)
    upsampled_blocks(lateral, 2).add_(nearest_spread(top, 2))
    return lateral


def fuse_top_down(ins: list[torch.Tensor], in_place: bool) -> list[torch.Tensor]:
    """Top-down FPN sums: [in2, in3, in4, in5] -> [out2, out3, out4, in5] (``in_place``: into in2..in4)."""
    in2, in3, in4, in5 = ins
    out4 = add_upsampled(in4, in5, in_place)
    out3 = add_upsampled(in3, out4, in_place)
    out2 = add_upsampled(in2, out3, in_place)
    return [out2, out3, out4, in5]


def concat_pyramid(p2, p3, p4, p5, fast: bool) -> torch.Tensor:
    """Upsample p5/p4/p3 to p2's size (x8, x4, x2) and concatenate as [p5, p4, p3, p2]. With ``fast`` (the caller's
    inference fast path) written straight into the result (in p2's memory format) without intermediate upsampled
    maps; otherwise with plain operations, which tracers and exporters (ONNX) follow: they do not see writes into
    views of a fresh tensor."""
    if not fast:
        return torch.cat([upsample(p5, 8), upsample(p4, 4), upsample(p3, 2), p2], dim=1)
    n, c, h, w = p2.shape
    channels_last = p2.is_contiguous(memory_format=torch.channels_last) and not p2.is_contiguous()
    out = torch.empty((n, 4 * c, h, w), dtype=p2.dtype, device=p2.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for i, (level, scale) in enumerate(((p5, 8), (p4, 4), (p3, 2), (p2, 1))):
        upsampled_blocks(out[:, i * c:(i + 1) * c], scale).copy_(nearest_spread(level, scale))
    return out


@register("DBFPN")
class DBFPN(nn.Module):
    """DB FPN: 1x1 lateral convs to ``out_channels``, top-down sum, 3x3 convs to ``out_channels // 4``."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.out_channels = out_channels
        for i, name in enumerate(("in2_conv", "in3_conv", "in4_conv", "in5_conv")):
            self.add_module(name, nn.Conv2d(in_channels[i], out_channels, 1, bias=False))
        for name in ("p5_conv", "p4_conv", "p3_conv", "p2_conv"):
            self.add_module(name, nn.Conv2d(out_channels, out_channels // 4, 3, padding=1, bias=False))

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        c2, c3, c4, c5 = x
        fast = inference_fast_path(self)
        out2, out3, out4, in5 = fuse_top_down([conv2d(c2, self.in2_conv, fast), conv2d(c3, self.in3_conv, fast),
                                               conv2d(c4, self.in4_conv, fast), conv2d(c5, self.in5_conv, fast)], fast)
        return concat_pyramid(conv2d(out2, self.p2_conv, fast), conv2d(out3, self.p3_conv, fast),
                              conv2d(out4, self.p4_conv, fast), conv2d(in5, self.p5_conv, fast), fast)


class RSELayer(nn.Module):
    """Conv (no bias) followed by an SE block (hard sigmoid 0.2), optionally as a residual."""

    def __init__(self, in_channels, out_channels, kernel_size, shortcut=True):
        super().__init__()
        self.out_channels = out_channels
        self.in_conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.se_block = SEModule(out_channels, slope=0.2, offset=0.5)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = conv2d(x, self.in_conv, inference_fast_path(self))
        return x + self.se_block(x) if self.shortcut else self.se_block(x)


@register("RSEFPN")
class RSEFPN(nn.Module):
    """Residual-SE FPN; ``shortcut=True`` is PaddleOCR's default (PP-OCRv3 and PP-OCRv4 det)."""

    def __init__(self, in_channels, out_channels, shortcut=True):
        super().__init__()
        self.out_channels = out_channels
        self.ins_conv = nn.ModuleList([RSELayer(c, out_channels, 1, shortcut) for c in in_channels])
        self.inp_conv = nn.ModuleList([RSELayer(out_channels, out_channels // 4, 3, shortcut) for _ in in_channels])

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        fast = inference_fast_path(self)
        out2, out3, out4, in5 = fuse_top_down([conv(c) for conv, c in zip(self.ins_conv, x)], fast)
        return concat_pyramid(self.inp_conv[0](out2), self.inp_conv[1](out3), self.inp_conv[2](out4),
                              self.inp_conv[3](in5), fast)
