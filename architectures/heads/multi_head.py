"""MultiHead (PaddleOCR rec_multi_head): the CTC branch with its own sequence encoder.

The SAR / NRTR branches only produce training losses; the inference program never runs them, so they
are not built here (the conversion rules drop their weights by name).
"""
from __future__ import annotations

import torch
from torch import nn

from architectures.heads import register
from architectures.heads.ctc_head import CTCHead
from architectures.necks.rnn import SequenceEncoder


@register("MultiHead")
class MultiHead(nn.Module):
    """``ctc_encoder`` (a SequenceEncoder, e.g. the SVTR neck) followed by ``ctc_head`` (a CTCHead).

    ``ctc_neck``: SequenceEncoder kwargs (``encoder_type`` plus encoder arguments);
    ``ctc_head``: extra CTCHead kwargs (e.g. ``mid_channels``).
    """

    def __init__(self, in_channels, out_channels, ctc_neck: dict, ctc_head: dict | None = None):
        super().__init__()
        self.ctc_encoder = SequenceEncoder(in_channels, **ctc_neck)
        self.ctc_head = CTCHead(self.ctc_encoder.out_channels, out_channels, **(ctc_head or {}))
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ctc_head(self.ctc_encoder(x))
