"""Small building blocks shared by every architecture family.

Names of sub-modules follow PaddleOCR's structured parameter names, so each block takes the attribute
names it must expose (e.g. ``conv``/``bn`` in MobileNetV3, ``_conv``/``_batch_norm`` in ResNet_vd,
``conv``/``norm`` in the SVTR neck).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-5  # Paddle's BatchNorm / BatchNorm2D default epsilon

# Paddle's F.hardsigmoid default slope (stored as a float32 op attribute: 0.1666667).
PADDLE_HARDSIGMOID_SLOPE = 0.1666667


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to a multiple of ``divisor`` the way PaddleOCR's MobileNetV3 does."""
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class HardSigmoid(nn.Module):
    """``clip(slope * x + offset, 0, 1)``; Paddle uses slope 0.2 in some models and 1/6 in others."""

    def __init__(self, slope: float = 0.2, offset: float = 0.5):
        super().__init__()
        self.slope = float(slope)
        self.offset = float(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x * self.slope + self.offset, 0.0, 1.0)

    def extra_repr(self) -> str:
        return f"slope={self.slope}, offset={self.offset}"


class HardSwish(nn.Hardswish):
    """``x * relu6(x + 3) / 6``, identical to Paddle's hard_swish."""


class Swish(nn.SiLU):
    """Swish with beta = 1 (Paddle's nn.Swish), i.e. ``x * sigmoid(x)``."""


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "hardswish": HardSwish,
    "hard_swish": HardSwish,
    "swish": Swish,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}


def make_activation(name: str | None) -> nn.Module:
    """An activation module from a Paddle activation name (None -> Identity)."""
    if name is None:
        return nn.Identity()
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}") from None


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


class ConvBNLayer(nn.Module):
    """Conv2d (no bias by default) -> BatchNorm2d -> activation, with Paddle-compatible names.

    ``conv_name`` / ``bn_name`` set the attribute names of the convolution and the batch norm
    (``conv``/``bn`` by default); the activation has no parameters and no name in the state dict.
    ``padding=None`` means "same" padding for odd kernels: ``(k - 1) // 2`` per side.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=None,
        groups: int = 1,
        act: str | None = None,
        conv_name: str = "conv",
        bn_name: str = "bn",
        bias: bool = False,
        bn_eps: float = BN_EPS,
    ):
        super().__init__()
        kernel = _pair(kernel_size)
        if padding is None:
            padding = ((kernel[0] - 1) // 2, (kernel[1] - 1) // 2)
        self._conv_name = conv_name
        self._bn_name = bn_name
        self.add_module(
            conv_name,
            nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups, bias=bias),
        )
        self.add_module(bn_name, nn.BatchNorm2d(out_channels, eps=bn_eps))
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._modules[self._conv_name](x)
        x = self._modules[self._bn_name](x)
        return self.act(x)


class SEModule(nn.Module):
    """Squeeze-and-excitation: avg pool -> conv1 (bias) -> ReLU -> conv2 (bias) -> hard sigmoid -> scale.

    ``slope``/``offset`` select the hard sigmoid: 0.2/0.5 in det_mobilenet_v3 and RSEFPN,
    Paddle's default 1/6 in MobileNetV1Enhance and PPLCNetV3.
    """

    def __init__(self, channels: int, reduction: int = 4, slope: float = 0.2, offset: float = 0.5):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv1 = nn.Conv2d(channels, channels // reduction, 1)
        self.conv2 = nn.Conv2d(channels // reduction, channels, 1)
        self.hardsigmoid = HardSigmoid(slope, offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.avg_pool(x)
        scale = F.relu(self.conv1(scale))
        scale = self.hardsigmoid(self.conv2(scale))
        return x * scale


class Im2Seq(nn.Module):
    """(N, C, 1, W) feature map -> (N, W, C) sequence."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.out_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != 1:
            raise ValueError(f"Im2Seq expects a feature map of height 1, got shape {tuple(x.shape)}")
        return x.squeeze(2).permute(0, 2, 1)
