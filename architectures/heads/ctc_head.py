"""CTC recognition head (PaddleOCR rec_ctc_head)."""
from __future__ import annotations

import torch
from torch import nn

from architectures.heads import register


@register("CTCHead")
class CTCHead(nn.Module):
    """Linear classifier over the sequence (``fc``, or ``fc1`` -> ``fc2`` with ``mid_channels``); softmax in eval."""

    def __init__(self, in_channels, out_channels, mid_channels=None):
        super().__init__()
        self.out_channels = out_channels
        self.mid_channels = mid_channels
        if mid_channels is None:
            self.fc = nn.Linear(in_channels, out_channels)
        else:
            self.fc1 = nn.Linear(in_channels, mid_channels)
            self.fc2 = nn.Linear(mid_channels, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(x) if self.mid_channels is None else self.fc2(self.fc1(x))
        return logits if self.training else torch.softmax(logits, dim=2)
