"""MobileNetV3 backbones: the detection variant (multi-scale outputs) and the recognition/cls variant."""
from __future__ import annotations

import torch
from torch import nn

from architectures.backbones import register
from architectures.layers import ConvBNLayer, SEModule, inference_fast_path, make_divisible, safe_to_modify

# (kernel, expansion, out channels, use SE, activation, stride)
_LARGE = [
    (3, 16, 16, False, "relu", 1),
    (3, 64, 24, False, "relu", 2),
    (3, 72, 24, False, "relu", 1),
    (5, 72, 40, True, "relu", 2),
    (5, 120, 40, True, "relu", 1),
    (5, 120, 40, True, "relu", 1),
    (3, 240, 80, False, "hardswish", 2),
    (3, 200, 80, False, "hardswish", 1),
    (3, 184, 80, False, "hardswish", 1),
    (3, 184, 80, False, "hardswish", 1),
    (3, 480, 112, True, "hardswish", 1),
    (3, 672, 112, True, "hardswish", 1),
    (5, 672, 160, True, "hardswish", 2),
    (5, 960, 160, True, "hardswish", 1),
    (5, 960, 160, True, "hardswish", 1),
]
_SMALL = [
    (3, 16, 16, True, "relu", 2),
    (3, 72, 24, False, "relu", 2),
    (3, 88, 24, False, "relu", 1),
    (5, 96, 40, True, "hardswish", 2),
    (5, 240, 40, True, "hardswish", 1),
    (5, 240, 40, True, "hardswish", 1),
    (5, 120, 48, True, "hardswish", 1),
    (5, 144, 48, True, "hardswish", 1),
    (5, 288, 96, True, "hardswish", 2),
    (5, 576, 96, True, "hardswish", 1),
    (5, 576, 96, True, "hardswish", 1),
]
_SQUEEZE = {"large": 960, "small": 576}
_CFGS = {"large": _LARGE, "small": _SMALL}
SUPPORTED_SCALES = (0.35, 0.5, 0.75, 1.0, 1.25)


def _check(model_name: str, scale: float) -> None:
    if model_name not in _CFGS:
        raise ValueError(f"MobileNetV3 model_name must be one of {sorted(_CFGS)}, got {model_name!r}")
    if scale not in SUPPORTED_SCALES:
        raise ValueError(f"MobileNetV3 scale must be one of {SUPPORTED_SCALES}, got {scale}")


class ResidualUnit(nn.Module):
    """Inverted residual: expand 1x1 -> depthwise kxk -> (SE) -> linear 1x1, with identity shortcut."""

    def __init__(self, in_channels, mid_channels, out_channels, kernel_size, stride, use_se, act,
                 se_slope=0.2, se_offset=0.5):
        super().__init__()
        self.if_shortcut = stride == 1 and in_channels == out_channels
        self.expand_conv = ConvBNLayer(in_channels, mid_channels, 1, act=act)
        self.bottleneck_conv = ConvBNLayer(
            mid_channels, mid_channels, kernel_size, stride=stride, padding=(kernel_size - 1) // 2,
            groups=mid_channels, act=act,
        )
        self.mid_se = SEModule(mid_channels, slope=se_slope, offset=se_offset, inplace=True) if use_se else None
        self.linear_conv = ConvBNLayer(mid_channels, out_channels, 1, act=None)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.bottleneck_conv(self.expand_conv(inputs))
        if self.mid_se is not None:
            x = self.mid_se(safe_to_modify(x, self.bottleneck_conv))  # scaled in place at inference
        x = self.linear_conv(x)
        if self.if_shortcut:
            # in place on the fresh convolution output at inference (same sum, one allocation less)
            x = x.add_(inputs) if inference_fast_path(self) else inputs + x
        return x


@register("DetMobileNetV3")
class DetMobileNetV3(nn.Module):
    """Detection MobileNetV3 (PaddleOCR det_mobilenet_v3): returns the feature maps of every stage."""

    def __init__(self, in_channels=3, model_name="large", scale=0.5, disable_se=False, se_slope=0.2):
        super().__init__()
        _check(model_name, scale)
        inplanes = make_divisible(16 * scale)
        self.conv = ConvBNLayer(in_channels, inplanes, 3, stride=2, padding=1, act="hardswish")
        self.out_channels: list[int] = []
        stages: list[list[nn.Module]] = []
        blocks: list[nn.Module] = []
        start_idx = 2 if model_name == "large" else 0
        for i, (k, exp, c, se, act, s) in enumerate(_CFGS[model_name]):
            if s == 2 and i > start_idx:
                self.out_channels.append(inplanes)
                stages.append(blocks)
                blocks = []
            blocks.append(ResidualUnit(inplanes, make_divisible(scale * exp), make_divisible(scale * c), k, s,
                                       se and not disable_se, act, se_slope=se_slope))
            inplanes = make_divisible(scale * c)
        last = make_divisible(scale * _SQUEEZE[model_name])
        blocks.append(ConvBNLayer(inplanes, last, 1, act="hardswish"))
        stages.append(blocks)
        self.out_channels.append(last)
        for i, stage in enumerate(stages):  # stage0, stage1, ... as in Paddle's names
            self.add_module(f"stage{i}", nn.Sequential(*stage))
        self._num_stages = len(stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.conv(x)
        outputs = []
        for i in range(self._num_stages):
            x = self._modules[f"stage{i}"](x)
            outputs.append(x)
        return outputs


@register("RecMobileNetV3")
class RecMobileNetV3(nn.Module):
    """Recognition / direction-classifier MobileNetV3 (PaddleOCR rec_mobilenet_v3): strides (s, 1), max pool 2x2."""

    def __init__(self, in_channels=3, model_name="small", scale=0.5, large_stride=None, small_stride=None,
                 disable_se=False, se_slope=0.2):
        super().__init__()
        _check(model_name, scale)
        small_stride = list(small_stride or [2, 2, 2, 2])
        large_stride = list(large_stride or [1, 2, 2, 2])
        if len(small_stride) != 4 or len(large_stride) != 4:
            raise ValueError("small_stride and large_stride must have 4 entries")
        if model_name == "large":
            strides = {0: large_stride[0], 1: (large_stride[1], 1), 3: (large_stride[2], 1), 12: (large_stride[3], 1)}
        else:
            strides = {0: (small_stride[0], 1), 1: (small_stride[1], 1), 3: (small_stride[2], 1),
                       8: (small_stride[3], 1)}
        inplanes = make_divisible(16 * scale)
        self.conv1 = ConvBNLayer(in_channels, inplanes, 3, stride=2, padding=1, act="hardswish")
        blocks = []
        for i, (k, exp, c, se, act, _) in enumerate(_CFGS[model_name]):
            blocks.append(ResidualUnit(inplanes, make_divisible(scale * exp), make_divisible(scale * c), k,
                                       strides.get(i, 1), se and not disable_se, act, se_slope=se_slope))
            inplanes = make_divisible(scale * c)
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = make_divisible(scale * _SQUEEZE[model_name])
        self.conv2 = ConvBNLayer(inplanes, self.out_channels, 1, act="hardswish")
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv2(self.blocks(self.conv1(x))))
