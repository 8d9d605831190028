"""The composed OCR model: backbone -> (neck) -> head, like PaddleOCR's BaseModel."""
from __future__ import annotations

import torch
from torch import nn


class OCRModel(nn.Module):
    """Backbone, optional neck and head under the names ``backbone`` / ``neck`` / ``head``.

    In eval mode ``forward`` returns what Paddle's exported inference program returns
    (det: probability map; rec: softmax over classes per time step; cls: softmax over directions).
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head

    def forward(self, x: torch.Tensor):
        x = self.backbone(x)
        if self.neck is not None:
            x = self.neck(x)
        return self.head(x)

    def reparameterize(self) -> None:
        """Switch every re-parameterizable sub-module to its deploy form (like Paddle's rep())."""
        for module in list(self.modules()):
            if module is not self and hasattr(module, "reparameterize"):
                module.reparameterize()
