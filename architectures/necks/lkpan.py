"""LKPAN (large-kernel PAN) with optional IntraCL blocks: the neck of PP-OCRv4 server det.

Module names follow PaddleOCR's structured names: ``ins_conv.N``, ``inp_conv.N``, ``pan_head_conv.N``,
``pan_lat_conv.N`` (bias-free convs) and ``incl1`` ... ``incl4`` (IntraCLBlock, from PaddleOCR's
``necks/intracl.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from architectures.layers import (BN_EPS, CachedInferenceModule, DerivedTensors, contiguous_nchw, conv2d,
                                  fold_batch_norm, fused_conv2d, inference_fast_path)
from architectures.necks import register
from architectures.necks.db_fpn import concat_pyramid, fuse_top_down

STAGE_KERNELS = (7, 5, 3)  # IntraCLBlock's cascaded stages: k x k + k x 1 + 1 x k convolutions each


class IntraCLBlock(CachedInferenceModule):
    """Intra-instance collaborative learning block: 1x1 reduce, three cascaded square + vertical + horizontal
    conv stages (7, 5, 3), 1x1 restore, BN, ReLU, residual.

    At inference each stage runs as one k x k convolution: the k x 1 and 1 x k kernels (same input, centred
    "same" padding) are added into the centre column and row of the k x k kernel, and the biases summed; the BN
    is folded into the restoring convolution, with the ReLU as its post-op.
    """

    def __init__(self, in_channels: int = 96, reduce_factor: int = 4) -> None:
        super().__init__()
        mid = in_channels // reduce_factor
        self.conv1x1_reduce_channel = nn.Conv2d(in_channels, mid, 1)
        self.conv1x1_return_channel = nn.Conv2d(mid, in_channels, 1)
        for k in STAGE_KERNELS:
            setattr(self, f"v_layer_{k}x1", nn.Conv2d(mid, mid, (k, 1), padding=(k // 2, 0)))
            setattr(self, f"q_layer_1x{k}", nn.Conv2d(mid, mid, (1, k), padding=(0, k // 2)))
            setattr(self, f"c_layer_{k}x{k}", nn.Conv2d(mid, mid, (k, k), padding=(k // 2, k // 2)))
        self.bn = nn.BatchNorm2d(in_channels, eps=BN_EPS)
        self._folded = DerivedTensors()

    def _stages(self) -> list[tuple[nn.Conv2d, nn.Conv2d, nn.Conv2d]]:
        return [(getattr(self, f"c_layer_{k}x{k}"), getattr(self, f"v_layer_{k}x1"), getattr(self, f"q_layer_1x{k}"))
                for k in STAGE_KERNELS]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not inference_fast_path(self):
            y = self.conv1x1_reduce_channel(x)
            for square, vertical, horizontal in self._stages():
                y = square(y) + vertical(y) + horizontal(y)
            y = F.relu(self.bn(self.conv1x1_return_channel(y)))
            return x + y
        folded = self._folded_convs()
        y = conv2d(x, self.conv1x1_reduce_channel, True)
        for k, weight, bias in zip(STAGE_KERNELS, folded[0::2], folded[1::2]):
            y = fused_conv2d(y, weight, bias, 1, k // 2, 1, 1)
        return fused_conv2d(y, folded[-2], folded[-1], 1, 0, 1, 1, "relu", F.relu_).add_(x)

    def _folded_convs(self) -> tuple[torch.Tensor, ...]:
        """(weight, bias) of each stage's single k x k convolution, then of the restoring convolution with the BN
        folded in; cached until a parameter changes."""
        stages = self._stages()
        ret = self.conv1x1_return_channel
        sources = [t for convs in stages for conv in convs for t in (conv.weight, conv.bias)]
        sources += [ret.weight, ret.bias, self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var]

        def fold():
            tensors = []
            for square, vertical, horizontal in stages:
                k = square.kernel_size[0]
                weight = square.weight.clone()
                weight[:, :, :, k // 2:k // 2 + 1] += vertical.weight
                weight[:, :, k // 2:k // 2 + 1, :] += horizontal.weight
                tensors += [weight, square.bias + vertical.bias + horizontal.bias]
            return (*tensors, *fold_batch_norm(ret.weight, ret.bias, self.bn))

        return self._folded.get(sources, fold, extra=(self.bn.eps,))


@register()
class LKPAN(nn.Module):
    """FPN top-down path with 9x9 convs, then a bottom-up PAN path; outputs the 4 levels up-sampled to 1/4 and
    concatenated (``out_channels`` channels). Only PaddleOCR's ``mode="large"`` (plain 9x9 convs) exists here."""

    def __init__(self, in_channels, out_channels: int, mode: str = "large", intracl: bool = False) -> None:
        super().__init__()
        if mode.lower() != "large":
            raise ValueError(f"LKPAN mode {mode!r} is not supported (only 'large', the mode PP-OCR models use)")
        if len(in_channels) != 4:
            raise ValueError(f"LKPAN needs 4 input feature maps, got in_channels={list(in_channels)}")
        self.out_channels = out_channels
        self.intracl = intracl
        quarter = out_channels // 4
        self.ins_conv = nn.ModuleList(nn.Conv2d(c, out_channels, 1, bias=False) for c in in_channels)
        self.inp_conv = nn.ModuleList(nn.Conv2d(out_channels, quarter, 9, padding=4, bias=False)
                                      for _ in in_channels)
        self.pan_head_conv = nn.ModuleList(nn.Conv2d(quarter, quarter, 3, stride=2, padding=1, bias=False)
                                           for _ in range(len(in_channels) - 1))
        self.pan_lat_conv = nn.ModuleList(nn.Conv2d(quarter, quarter, 9, padding=4, bias=False)
                                          for _ in in_channels)
        if intracl:
            self.incl1 = IntraCLBlock(quarter, reduce_factor=2)
            self.incl2 = IntraCLBlock(quarter, reduce_factor=2)
            self.incl3 = IntraCLBlock(quarter, reduce_factor=2)
            self.incl4 = IntraCLBlock(quarter, reduce_factor=2)

    def forward(self, features) -> torch.Tensor:
        c2, c3, c4, c5 = features
        fast = inference_fast_path(self)
        # the 1x1 convolutions in the backbone's layout (channels-last from its folded conv-BN layers)
        in5 = conv2d(c5, self.ins_conv[3], fast)
        in4 = conv2d(c4, self.ins_conv[2], fast)
        in3 = conv2d(c3, self.ins_conv[1], fast)
        in2 = conv2d(c2, self.ins_conv[0], fast)

        out2, out3, out4, in5 = fuse_top_down([in2, in3, in4, in5], fast)

        if fast:  # NCHW from here: oneDNN runs the large 9x9 convolutions ~1.4x faster than in channels-last
            in5, out4, out3, out2 = (contiguous_nchw(f) for f in (in5, out4, out3, out2))
        f5 = self.inp_conv[3](in5)
        f4 = self.inp_conv[2](out4)
        f3 = self.inp_conv[1](out3)
        f2 = self.inp_conv[0](out2)

        pan3 = f3 + self.pan_head_conv[0](f2)
        pan4 = f4 + self.pan_head_conv[1](pan3)
        pan5 = f5 + self.pan_head_conv[2](pan4)

        p2 = self.pan_lat_conv[0](f2)
        p3 = self.pan_lat_conv[1](pan3)
        p4 = self.pan_lat_conv[2](pan4)
        p5 = self.pan_lat_conv[3](pan5)
        if self.intracl:
            p5 = self.incl4(p5)
            p4 = self.incl3(p4)
            p3 = self.incl2(p3)
            p2 = self.incl1(p2)

        return concat_pyramid(p2, p3, p4, p5, fast)
