"""ResNet_vd for text detection (PaddleOCR det_resnet_vd): ResNet18_vd (server det) and ResNet50_vd (v3 teacher)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from architectures.backbones import register
from architectures.layers import ConvBNLayer, inference_fast_path

_DEPTHS = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3], 101: [3, 4, 23, 3], 152: [3, 8, 36, 3],
           200: [3, 12, 48, 3]}
NUM_FILTERS = [64, 128, 256, 512]


def stage_plan(layers: int) -> tuple[list[int], bool, list[int], int]:
    """Blocks per stage, bottleneck or basic, each stage's input channels and the block expansion for ``layers``."""
    if layers not in _DEPTHS:
        raise ValueError(f"ResNet_vd layers must be one of {sorted(_DEPTHS)}, got {layers}")
    bottleneck = layers >= 50
    num_channels = [64, 256, 512, 1024] if bottleneck else [64, 64, 128, 256]
    return _DEPTHS[layers], bottleneck, num_channels, 4 if bottleneck else 1


class VdConvBNLayer(ConvBNLayer):
    """ResNet_vd conv-BN(-ReLU) with ``_conv``/``_batch_norm`` names; in vd mode an exclusive,
    ceil-mode average pool (kernel = stride = ``pool``) runs first."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, act=None, vd_pool=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2,
                         act=act, conv_name="_conv", bn_name="_batch_norm")
        self.vd_pool = None
        if vd_pool is not None:
            self.vd_pool = nn.AvgPool2d(vd_pool, stride=vd_pool, padding=0, ceil_mode=True, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.vd_pool is not None:
            x = self.vd_pool(x)
        return super().forward(x)

    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        if self.vd_pool is not None:
            x = self.vd_pool(x)
        return super().forward_residual(x, residual)


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a (vd-pooled 1x1) shortcut."""

    def __init__(self, in_channels, out_channels, stride, shortcut, short: nn.Module | None = None):
        super().__init__()
        self.conv0 = VdConvBNLayer(in_channels, out_channels, 3, stride=stride, act="relu")
        self.conv1 = VdConvBNLayer(out_channels, out_channels, 3, act=None)
        self.short = short
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = x if self.short is None else self.short(x)
        if inference_fast_path(self):
            return self.conv1.forward_residual(self.conv0(x), short)
        return F.relu_(short + self.conv1(self.conv0(x)))


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4) conv-BN layers plus a (vd-pooled 1x1) shortcut."""

    def __init__(self, in_channels, out_channels, stride, shortcut, short: nn.Module | None = None):
        super().__init__()
        self.conv0 = VdConvBNLayer(in_channels, out_channels, 1, act="relu")
        self.conv1 = VdConvBNLayer(out_channels, out_channels, 3, stride=stride, act="relu")
        self.conv2 = VdConvBNLayer(out_channels, out_channels * 4, 1, act=None)
        self.short = short
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = x if self.short is None else self.short(x)
        if inference_fast_path(self):
            return self.conv2.forward_residual(self.conv1(self.conv0(x)), short)
        return F.relu_(short + self.conv2(self.conv1(self.conv0(x))))


@register("DetResNet_vd")
class DetResNet_vd(nn.Module):
    """Detection ResNet_vd: 3x3 stem, max pool, four stages; returns the outputs of ``out_indices``."""

    def __init__(self, in_channels=3, layers=50, out_indices=None):
        super().__init__()
        depth, bottleneck, num_channels, expansion = stage_plan(layers)
        self.out_indices = list(out_indices) if out_indices is not None else [0, 1, 2, 3]
        self.conv1_1 = VdConvBNLayer(in_channels, 32, 3, stride=2, act="relu")
        self.conv1_2 = VdConvBNLayer(32, 32, 3, act="relu")
        self.conv1_3 = VdConvBNLayer(32, 64, 3, act="relu")
        self.pool2d_max = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.out_channels: list[int] = []
        self._stage_names: list[list[str]] = []
        block_cls = BottleneckBlock if bottleneck else BasicBlock
        for b in range(len(depth)):
            names = []
            for i in range(depth[b]):
                cin = num_channels[b] if i == 0 else NUM_FILTERS[b] * expansion
                short = None
                if i == 0:  # Paddle: shortcut=False for the first block of every stage
                    short = VdConvBNLayer(cin, NUM_FILTERS[b] * expansion, 1,
                                          vd_pool=None if b == 0 else 2)
                stride = 2 if i == 0 and b != 0 else 1
                name = f"bb_{b}_{i}"
                self.add_module(name, block_cls(cin, NUM_FILTERS[b], stride, shortcut=i != 0, short=short))
                names.append(name)
            self._stage_names.append(names)
            if b in self.out_indices:
                self.out_channels.append(NUM_FILTERS[b] * expansion)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.pool2d_max(self.conv1_3(self.conv1_2(self.conv1_1(x))))
        outputs = []
        for i, names in enumerate(self._stage_names):
            for name in names:
                y = self._modules[name](y)
            if i in self.out_indices:
                outputs.append(y)
        return outputs
