"""ResNet_vd for text recognition (PaddleOCR rec_resnet_vd ``ResNet``): stages stride (2, 1), final max pool 2x2."""
from __future__ import annotations

import torch
from torch import nn

from architectures.backbones import register
from architectures.backbones.resnet_vd import NUM_FILTERS, BasicBlock, BottleneckBlock, VdConvBNLayer, stage_plan


@register("RecResNet_vd")
class RecResNet_vd(nn.Module):
    """Recognition ResNet_vd (ResNet34_vd in the server v2.0 rec model)."""

    def __init__(self, in_channels=3, layers=34):
        super().__init__()
        depth, bottleneck, num_channels, expansion = stage_plan(layers)
        self.conv1_1 = VdConvBNLayer(in_channels, 32, 3, act="relu")
        self.conv1_2 = VdConvBNLayer(32, 32, 3, act="relu")
        self.conv1_3 = VdConvBNLayer(32, 64, 3, act="relu")
        self.pool2d_max = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        block_cls = BottleneckBlock if bottleneck else BasicBlock
        self._block_names: list[str] = []
        for b in range(len(depth)):
            for i in range(depth[b]):
                cin = num_channels[b] if i == 0 else NUM_FILTERS[b] * expansion
                stride = (2, 1) if i == 0 and b != 0 else (1, 1)
                short = None
                if i == 0:
                    first = b == 0
                    vd = not first and stride[0] != 1
                    short = VdConvBNLayer(cin, NUM_FILTERS[b] * expansion, 1, stride=1 if vd else stride,
                                          vd_pool=stride if vd else None)
                name = f"bb_{b}_{i}"
                self.add_module(name, block_cls(cin, NUM_FILTERS[b], stride, shortcut=i != 0, short=short))
                self._block_names.append(name)
        self.out_channels = NUM_FILTERS[-1] * expansion
        self.out_pool = nn.MaxPool2d(kernel_size=2, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool2d_max(self.conv1_3(self.conv1_2(self.conv1_1(x))))
        for name in self._block_names:
            y = self._modules[name](y)
        return self.out_pool(y)
