"""DB detection head (PaddleOCR det_db_head)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from architectures.heads import register
from architectures.layers import BN_EPS


class Head(nn.Module):
    """conv kxk -> BN+ReLU -> ConvTranspose x2 -> BN+ReLU -> ConvTranspose x2 to one channel -> sigmoid.

    ``forward(x, return_f=True)`` also returns the feature after the second BN+ReLU (used by PFHeadLocal).
    """

    def __init__(self, in_channels, kernel_list=(3, 2, 2)):
        super().__init__()
        mid = in_channels // 4
        self.conv1 = nn.Conv2d(in_channels, mid, kernel_list[0], padding=kernel_list[0] // 2, bias=False)
        self.conv_bn1 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self.conv2 = nn.ConvTranspose2d(mid, mid, kernel_list[1], stride=2)
        self.conv_bn2 = nn.BatchNorm2d(mid, eps=BN_EPS)
        self.conv3 = nn.ConvTranspose2d(mid, 1, kernel_list[2], stride=2)

    def forward(self, x: torch.Tensor, return_f: bool = False):
        x = F.relu_(self.conv_bn1(self.conv1(x)))
        f = F.relu_(self.conv_bn2(self.conv2(x)))
        out = torch.sigmoid(self.conv3(f))
        return (out, f) if return_f else out


@register("DBHead")
class DBHead(nn.Module):
    """Differentiable-binarization head.

    Eval mode returns the shrink (probability) map (N, 1, H, W), as Paddle's inference program does.
    The threshold branch ``thresh`` only matters for training; ``use_threshold=False`` builds the head
    without it (an inference program carries no threshold weights). Train mode returns
    [shrink, threshold, binary] concatenated on channels when the branch exists.
    """

    def __init__(self, in_channels, k=50, kernel_list=(3, 2, 2), use_threshold=True):
        super().__init__()
        self.k = k
        self.binarize = Head(in_channels, kernel_list)
        self.thresh = Head(in_channels, kernel_list) if use_threshold else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shrink = self.binarize(x)
        if not self.training or self.thresh is None:
            return shrink
        threshold = self.thresh(x)
        binary = torch.reciprocal(1 + torch.exp(-self.k * (shrink - threshold)))
        return torch.cat([shrink, threshold, binary], dim=1)
