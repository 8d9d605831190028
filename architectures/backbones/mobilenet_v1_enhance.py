"""MobileNetV1Enhance (PaddleOCR rec_mv1_enhance), the PP-OCRv2 / PP-OCRv3 recognition backbone."""
from __future__ import annotations

import torch
from torch import nn

from architectures.backbones import register
from architectures.layers import PADDLE_HARDSIGMOID_SLOPE, ConvBNLayer, SEModule, safe_to_modify


def _conv_bn(in_channels, out_channels, kernel_size, stride, padding, groups=1):
    return ConvBNLayer(in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups,
                       act="hardswish", conv_name="_conv", bn_name="_batch_norm")


class DepthwiseSeparable(nn.Module):
    """Depthwise kxk conv-BN-hardswish -> (SE, hard sigmoid 1/6) -> pointwise 1x1 conv-BN-hardswish."""

    def __init__(self, num_channels, num_filters1, num_filters2, num_groups, stride, scale, dw_size=3, padding=1,
                 use_se=False):
        super().__init__()
        mid = int(num_filters1 * scale)
        self._depthwise_conv = _conv_bn(num_channels, mid, dw_size, stride, padding, groups=int(num_groups * scale))
        self._se = SEModule(mid, slope=PADDLE_HARDSIGMOID_SLOPE, offset=0.5, inplace=True) if use_se else None
        self._pointwise_conv = _conv_bn(mid, int(num_filters2 * scale), 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._depthwise_conv(x)
        if self._se is not None:
            y = self._se(safe_to_modify(y, self._depthwise_conv))  # scaled in place at inference
        return self._pointwise_conv(y)


@register("MobileNetV1Enhance")
class MobileNetV1Enhance(nn.Module):
    """MobileNetV1Enhance; ``last_pool_type`` "max" (PP-OCRv2, 2x2) or "avg" (PP-OCRv3, ``last_pool_kernel_size``)."""

    def __init__(self, in_channels=3, scale=0.5, last_conv_stride=1, last_pool_type="max",
                 last_pool_kernel_size=(2, 2)):
        super().__init__()
        self.conv1 = _conv_bn(in_channels, int(32 * scale), 3, 2, 1)
        s = scale
        # (in, filters1, filters2, groups, stride, dw_size, padding, use_se)
        spec = [
            (32, 32, 64, 32, 1, 3, 1, False),
            (64, 64, 128, 64, 1, 3, 1, False),
            (128, 128, 128, 128, 1, 3, 1, False),
            (128, 128, 256, 128, (2, 1), 3, 1, False),
            (256, 256, 256, 256, 1, 3, 1, False),
            (256, 256, 512, 256, (2, 1), 3, 1, False),
        ] + [(512, 512, 512, 512, 1, 5, 2, False)] * 5 + [
            (512, 512, 1024, 512, (2, 1), 5, 2, True),
            (1024, 1024, 1024, 1024, _stride(last_conv_stride), 5, 2, True),
        ]
        self.block_list = nn.Sequential(*[
            DepthwiseSeparable(int(cin * s), f1, f2, g, st, s, dw_size=k, padding=p, use_se=se)
            for cin, f1, f2, g, st, k, p, se in spec
        ])
        if last_pool_type == "avg":
            kernel = tuple(last_pool_kernel_size)
            self.pool = nn.AvgPool2d(kernel, stride=kernel, padding=0)
        elif last_pool_type == "max":
            self.pool = nn.MaxPool2d(kernel_size=2, stride=2, padding=0)
        else:
            raise ValueError(f"last_pool_type must be 'max' or 'avg', got {last_pool_type!r}")
        self.out_channels = int(1024 * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.block_list(self.conv1(x)))


def _stride(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value
