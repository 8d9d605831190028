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


_ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "relu": nn.ReLU,
    "hardswish": HardSwish,
    "hard_swish": HardSwish,
    "swish": Swish,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}
_INPLACE_CAPABLE = {"relu", "hardswish", "hard_swish", "swish"}


def make_activation(name: str | None, inplace: bool = False) -> nn.Module:
    """An activation module from a Paddle activation name (None -> Identity).

    ``inplace=True`` (for activations that support it) overwrites its input: only for fresh tensors.
    """
    if name is None:
        return nn.Identity()
    key = name.lower()
    if key not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[key](inplace=True) if inplace and key in _INPLACE_CAPABLE else _ACTIVATIONS[key]()


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
        self.act = make_activation(act, inplace=True)  # runs on the fresh batch-norm output
        self._folded: tuple[torch.Tensor, torch.Tensor] | None = None
        self._folded_key: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self._modules[self._conv_name]
        bn = self._modules[self._bn_name]
        if not self.training and not torch.is_grad_enabled():
            weight, bias = self._folded_conv(conv, bn)
            if self._pointwise and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
                # 1x1 conv on a channels-last map = one GEMM over the (N, H, W, C) view, no layout copies
                y = F.linear(x.permute(0, 2, 3, 1), weight.flatten(1), bias).permute(0, 3, 1, 2)
            else:
                y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            return self.act(y)
        return self.act(bn(conv(x)))

    @property
    def _pointwise(self) -> bool:
        conv = self._modules[self._conv_name]
        return conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1 and conv.padding in (
            (0, 0), 0, "valid")

    def _folded_conv(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference fast path (eval mode, gradients off): the batch norm folded into the convolution,
        like Paddle Inference's conv_bn fuse pass. The folded weights are cached (channels-last, which
        oneDNN runs fastest, depthwise convolutions above all) and recomputed whenever a parameter or
        statistic is replaced or modified. The state dict keeps the unfused, Paddle-named tensors."""
        tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        key = (bn.eps, *((t.data_ptr(), _version(t), t.dtype, t.device) if t is not None else None for t in tensors))
        if self._folded_key != key:
            # folded in float64 (where the device has it) and rounded once
            wide = torch.float64 if conv.weight.device.type in ("cpu", "cuda") else torch.float32
            with torch.inference_mode(False), torch.no_grad():
                scale = bn.weight.to(wide) * torch.rsqrt(bn.running_var.to(wide) + bn.eps)
                weight = conv.weight.to(wide) * scale.reshape(-1, 1, 1, 1)
                weight = weight.to(conv.weight.dtype).contiguous(memory_format=torch.channels_last)
                shift = bn.running_mean.to(wide)
                if conv.bias is not None:
                    shift = shift - conv.bias.to(wide)
                bias = (bn.bias.to(wide) - shift * scale).to(bn.bias.dtype)
            self._folded, self._folded_key = (weight, bias), key
        return self._folded


def _version(tensor: torch.Tensor) -> int:
    """In-place modification counter of a tensor (-1 for inference tensors, which have none)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


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
