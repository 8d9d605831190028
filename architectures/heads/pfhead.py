"""PFHeadLocal: the DB head with a local refinement branch (PP-OCRv4 server det).

Eval output follows the PP-OCRv4 server det inference program (PaddleOCR before PR #14472, which the 2023
release export used): a tuple ``(cbn_maps, maps)`` in that fetch order, where ``cbn_maps`` is the refined
probability map and ``maps = 0.5 * (base + cbn_maps)`` averages it with the plain DB shrink map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from architectures.heads import register
from architectures.heads.db_head import DBHead
from architectures.layers import ConvBNLayer, conv2d, nearest_spread, upsampled_blocks

MODES = {"large": 4, "small": 8}  # mode -> divisor of in_channels for LocalModule's middle channels


class LocalModule(nn.Module):
    """Concatenate [init_map, feature], 3x3 conv-BN-ReLU (``last_3``), 1x1 conv to one channel (``last_1``)."""

    def __init__(self, in_channels: int, mid_channels: int) -> None:
        super().__init__()
        self.last_3 = ConvBNLayer(in_channels + 1, mid_channels, 3, 1, act="relu")
        self.last_1 = nn.Conv2d(mid_channels, 1, 1)

    def forward(self, feature: torch.Tensor, init_map: torch.Tensor, feature_scale: int = 1) -> torch.Tensor:
        """``last_1(last_3(cat([init_map, upsample(feature, feature_scale)])))`` (nearest upsampling)."""
        if self.training or torch.is_grad_enabled():
            if feature_scale != 1:
                feature = F.interpolate(feature, scale_factor=float(feature_scale), mode="nearest")
            return self.last_1(self.last_3(torch.cat([init_map, feature], dim=1)))
        # inference: the upsampled feature is written straight into the concatenated (channels-last) input
        n, c, h, w = init_map.shape
        stacked = torch.empty((n, c + feature.shape[1], h, w), dtype=feature.dtype, device=feature.device,
                              memory_format=torch.channels_last)
        stacked.permute(0, 2, 3, 1)[..., :c].copy_(init_map.permute(0, 2, 3, 1))  # NHWC views: a fast copy
        upsampled_blocks(stacked[:, c:], feature_scale).copy_(nearest_spread(feature, feature_scale))
        return conv2d(self.last_3(stacked), self.last_1)


@register()
class PFHeadLocal(DBHead):
    """DBHead + ``cbn_layer`` refining the shrink map from the binarize branch's half-resolution feature.

    Eval: returns ``(cbn_maps, maps)``. Train (with the threshold branch): [cbn, threshold, binary] on channels.
    """

    def __init__(self, in_channels: int, k: int = 50, mode: str = "small", use_threshold: bool = True) -> None:
        super().__init__(in_channels, k=k, use_threshold=use_threshold)
        if mode not in MODES:
            raise ValueError(f"PFHeadLocal mode must be one of {sorted(MODES)}, got {mode!r}")
        self.mode = mode
        self.cbn_layer = LocalModule(in_channels // 4, in_channels // MODES[mode])

    def forward(self, x: torch.Tensor):
        shrink_maps, feature = self.binarize(x, return_f=True)
        cbn_maps = torch.sigmoid(self.cbn_layer(feature, shrink_maps, feature_scale=2))
        if not self.training or self.thresh is None:
            return cbn_maps, 0.5 * (shrink_maps + cbn_maps)
        threshold = self.thresh(x)
        binary = torch.reciprocal(1 + torch.exp(-self.k * (shrink_maps - threshold)))
        return torch.cat([cbn_maps, threshold, binary], dim=1)
