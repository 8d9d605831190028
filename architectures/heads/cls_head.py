"""Text direction classifier head (PaddleOCR cls_head)."""
from __future__ import annotations

import torch
from torch import nn

from architectures.heads import register


@register("ClsHead")
class ClsHead(nn.Module):
    """Global average pool -> Linear -> softmax (eval)."""

    def __init__(self, in_channels, class_dim):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, class_dim)
        self.out_channels = class_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(self.pool(x).flatten(1))
        return logits if self.training else torch.softmax(logits, dim=1)
