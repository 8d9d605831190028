"""The composed OCR model: backbone -> (neck) -> head, like PaddleOCR's BaseModel."""
from __future__ import annotations

import torch
from torch import nn

from architectures.layers import clear_inference_caches

# Input sides of the DB detectors: their feature pyramids halve the input five times and add the levels back up.
DET_SIZE_MULTIPLE = 32


class OCRModel(nn.Module):
    """Backbone, optional neck and head under the names ``backbone`` / ``neck`` / ``head``.

    In eval mode ``forward`` returns what Paddle's exported inference program returns
    (det: probability map; rec: softmax over classes per time step; cls: softmax over directions).
    ``size_multiple`` (32 for det models): input height and width must be multiples of it, as in PaddleOCR.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module | None, head: nn.Module,
                 size_multiple: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.size_multiple = size_multiple

    def forward(self, x: torch.Tensor):
        if self.size_multiple is not None and not torch.jit.is_tracing():  # a traced graph holds no Python check
            self._check_size(x)
        x = self.backbone(x)
        if self.neck is not None:
            x = self.neck(x)
        return self.head(x)

    def _check_size(self, x: torch.Tensor) -> None:
        multiple = self.size_multiple
        height, width = x.shape[-2:]
        if height % multiple or width % multiple:
            raise ValueError(
                f"input height and width must be multiples of {multiple} (the detector's feature pyramid halves them "
                f"five times; PaddleOCR resizes det inputs to multiples of {multiple} too), got input shape "
                f"{tuple(x.shape)}: resize or pad the image, e.g. to {-(-height // multiple) * multiple}x"
                f"{-(-width // multiple) * multiple}")

    def reparameterize(self) -> None:
        """Switch every re-parameterizable sub-module to its deploy form (like Paddle's rep())."""
        for module in list(self.modules()):
            if module is not self and hasattr(module, "reparameterize"):
                module.reparameterize()

    def clear_inference_cache(self) -> None:
        """Drop the tensors the inference fast path derived from the weights (folded batch norms, oneDNN-packed
        weights); the next call rebuilds them.

        Call it after changing weights in place through ``.data`` (``p.data.mul_(0.5)``,
        ``bn.running_var.data.fill_(1)``, EMA updates written that way): torch does not count those edits, so the
        fast path (eval mode without gradients) would keep using the old weights. Edits under ``torch.no_grad()``,
        optimizer steps, ``load_state_dict``, ``.to()`` / ``.float()`` and train()/eval() transitions are noticed
        without it. Also needed after replacing a sub-module that already carries forward hooks."""
        clear_inference_caches(self)
