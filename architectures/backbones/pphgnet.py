"""PPHGNet (PP-HGNet), the backbone of PP-OCRv4 server det and rec (``PPHGNet_small``).

Module names follow PaddleOCR's structured names (``stem.0.conv``, ``stages.2.blocks.1.layers.3.bn``,
``stages.1.downsample.conv``, ``stages.0.blocks.0.att.conv`` ...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from architectures.backbones import register
from architectures.layers import ConvBNLayer, inference_fast_path, safe_to_modify

# Stage tables: (in_channels, mid_channels, out_channels, block_num, downsample, downsample stride).
PPHGNET_SMALL_DET = (
    (128, 128, 256, 1, False, 2),
    (256, 160, 512, 1, True, 2),
    (512, 192, 768, 2, True, 2),
    (768, 224, 1024, 1, True, 2),
)
PPHGNET_SMALL_REC = (
    (128, 128, 256, 1, True, (2, 1)),
    (256, 160, 512, 1, True, (1, 2)),
    (512, 192, 768, 2, True, (2, 1)),
    (768, 224, 1024, 1, True, (2, 1)),
)
PPHGNET_SMALL_STEM = (64, 64, 128)
PPHGNET_SMALL_LAYER_NUM = 6


def _stride(value):
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else int(value)


class ESEModule(nn.Module):
    """Effective squeeze-excitation: global average pool -> 1x1 conv (bias) -> sigmoid -> scale (on the inference
    fast path in place: the input must be a fresh tensor the caller does not use again, see ``safe_to_modify``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not inference_fast_path(self):
            return x * torch.sigmoid(self.conv(F.adaptive_avg_pool2d(x, 1)))
        # inference: the 1x1 convolution of the pooled (N, C) vector as a matrix product (PyTorch runs it as a
        # slow unbatched convolution otherwise), and the scaling in place: callers pass a fresh tensor
        n, c = x.shape[:2]
        pooled = F.adaptive_avg_pool2d(x, 1).reshape(n, c)
        scale = torch.sigmoid(F.linear(pooled, self.conv.weight.flatten(1), self.conv.bias))
        return x.mul_(scale.reshape(n, c, 1, 1))


class HGBlock(nn.Module):
    """``layer_num`` 3x3 conv-BN-ReLU layers, concatenated with the input, aggregated by a 1x1 conv, ESE."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, layer_num: int,
                 identity: bool) -> None:
        super().__init__()
        self.identity = identity
        self.layers = nn.ModuleList(
            ConvBNLayer(in_channels if i == 0 else mid_channels, mid_channels, 3, 1, act="relu")
            for i in range(layer_num)
        )
        self.aggregation_conv = ConvBNLayer(in_channels + layer_num * mid_channels, out_channels, 1, 1, act="relu")
        self.att = ESEModule(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [x]
        y = x
        for layer in self.layers:
            y = layer(y)
            outputs.append(y)
        y = self.att(safe_to_modify(self.aggregation_conv(torch.cat(outputs, dim=1)), self.aggregation_conv))
        if not self.identity:
            return y
        return y.add_(x) if inference_fast_path(self) else y + x  # y is fresh: add in place at inference


class HGStage(nn.Module):
    """Optional depthwise 3x3 conv-BN down-sampling, then HG blocks (all but the first with a residual)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, block_num: int, layer_num: int,
                 downsample: bool, stride) -> None:
        super().__init__()
        self.has_downsample = bool(downsample)
        if self.has_downsample:
            self.downsample = ConvBNLayer(in_channels, in_channels, 3, _stride(stride), groups=in_channels)
        self.blocks = nn.Sequential(*[
            HGBlock(in_channels if i == 0 else out_channels, mid_channels, out_channels, layer_num, identity=i > 0)
            for i in range(block_num)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_downsample:
            x = self.downsample(x)
        return self.blocks(x)


class PPHGNet(nn.Module):
    """PP-HGNet: conv stem, (det: 3x3/2 max pool), four HG stages.

    det: returns the feature maps of the stages in ``out_indices``; rec: the last stage, average-pooled with
    kernel [3, 2] in eval mode (adaptive pool to [1, 40] in train mode), as PaddleOCR does.
    """

    def __init__(self, stem_channels, stage_config, layer_num: int, in_channels: int = 3, det: bool = False,
                 out_indices=(0, 1, 2, 3)) -> None:
        super().__init__()
        self.det = det
        self.out_indices = tuple(out_indices)
        channels = [in_channels, *stem_channels]
        self.stem = nn.Sequential(*[
            ConvBNLayer(channels[i], channels[i + 1], 3, 2 if i == 0 else 1, act="relu")
            for i in range(len(stem_channels))
        ])
        self.stages = nn.ModuleList(HGStage(*row[:4], layer_num, *row[4:]) for row in stage_config)
        if det:
            self.out_channels = [row[2] for i, row in enumerate(stage_config) if i in self.out_indices]
        else:
            self.out_channels = stage_config[-1][2]

    def forward(self, x: torch.Tensor):
        x = self.stem(x)
        if self.det:
            x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        features = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if self.det and i in self.out_indices:
                features.append(x)
        if self.det:
            return features
        if self.training:
            return F.adaptive_avg_pool2d(x, (1, 40))
        return F.avg_pool2d(x, (3, 2))


@register()
class PPHGNet_small(PPHGNet):  # noqa: N801 - PaddleOCR's name, used in configs
    """PPHGNet_small as in PaddleOCR (det: stride-2 stages after a max pool; rec: (2,1)/(1,2) strides)."""

    def __init__(self, det: bool = False, in_channels: int = 3, out_indices=(0, 1, 2, 3)) -> None:
        super().__init__(PPHGNET_SMALL_STEM, PPHGNET_SMALL_DET if det else PPHGNET_SMALL_REC,
                         PPHGNET_SMALL_LAYER_NUM, in_channels=in_channels, det=det, out_indices=out_indices)
