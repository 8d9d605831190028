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
from architectures.layers import ConvBNLayer, conv2d, inference_fast_path

MODES = {"large": 4, "small": 8}  # mode -> divisor of in_channels for LocalModule's middle channels


class LocalModule(nn.Module):
    """Concatenate [init_map, feature], 3x3 conv-BN-ReLU (``last_3``), 1x1 conv to one channel (``last_1``)."""

    #: output rows per band at inference: the full-resolution concatenation and ``last_3``'s output (about 100 MB
    #: each for a 640x640 input) are never materialised, only one band of each (a few MB, reused across bands)
    band_rows = 32

    def __init__(self, in_channels: int, mid_channels: int) -> None:
        super().__init__()
        self.last_3 = ConvBNLayer(in_channels + 1, mid_channels, 3, 1, act="relu")
        self.last_1 = nn.Conv2d(mid_channels, 1, 1)

    def forward(self, feature: torch.Tensor, init_map: torch.Tensor, feature_scale: int = 1) -> torch.Tensor:
        """``last_1(last_3(cat([init_map, upsample(feature, feature_scale)])))`` (nearest upsampling)."""
        if not inference_fast_path(self):
            if feature_scale != 1:
                feature = F.interpolate(feature, scale_factor=float(feature_scale), mode="nearest")
            return self.last_1(self.last_3(torch.cat([init_map, feature], dim=1)))
        return self._forward_in_bands(feature, init_map, feature_scale)

    def _forward_in_bands(self, feature: torch.Tensor, init_map: torch.Tensor, scale: int) -> torch.Tensor:
        """Inference, band of rows by band of rows: each band of the (channels-last) concatenated input is built
        with ``last_3``'s halo rows (zeros beyond the image, as its padding), run through ``last_3`` without row
        padding and through ``last_1``. Every output value has the same inputs and weights as the whole-map
        computation."""
        n, c, h, w = init_map.shape
        channels = c + feature.shape[1]
        halo, pad_w = self.last_3.conv.padding
        out = torch.empty((n, 1, h, w), dtype=feature.dtype, device=feature.device)
        band = torch.empty((n, channels, self.band_rows + 2 * halo, w), dtype=feature.dtype, device=feature.device,
                           memory_format=torch.channels_last)
        for top in range(0, h, self.band_rows):
            bottom = min(top + self.band_rows, h)
            first, last = max(top - halo, 0), min(bottom + halo, h)  # image rows inside this band
            rows = band[:, :, :bottom - top + 2 * halo]
            nhwc = rows.permute(0, 2, 3, 1)  # contiguous NHWC view: fast copies
            start = first - (top - halo)  # zero rows above the image
            nhwc[:, :start].zero_()
            nhwc[:, start + last - first:].zero_()
            body = nhwc[:, start:start + last - first]
            body[..., :c].copy_(init_map[:, :, first:last].permute(0, 2, 3, 1))
            _write_nearest_rows(body[..., c:], feature, first, last, scale)
            out[:, :, top:bottom] = conv2d(self.last_3.forward_padded(rows, (0, pad_w)), self.last_1, True)
        return out


def _write_nearest_rows(target: torch.Tensor, feature: torch.Tensor, first: int, last: int, scale: int) -> None:
    """Write rows ``first:last`` of ``feature``'s nearest ``scale``-times upsampling into ``target``, an NHWC view
    (N, last - first, W * scale, C)."""
    n, rows, width, channels = target.shape
    source = feature[:, :, first // scale:(last - 1) // scale + 1].permute(0, 2, 3, 1)
    picked = source.index_select(1, torch.arange(first, last, device=feature.device) // scale - first // scale)
    target.view(n, rows, width // scale, scale, channels).copy_(
        picked[:, :, :, None, :].expand(n, rows, width // scale, scale, channels))


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
