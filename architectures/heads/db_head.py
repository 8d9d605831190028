"""DB detection head (PaddleOCR det_db_head)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from architectures.heads import register
from architectures.layers import (BN_EPS, CachedInferenceModule, DerivedTensors, fold_batch_norm, fused_conv2d,
                                  inference_fast_path, safe_to_modify)


def _is_patchwise(conv: nn.ConvTranspose2d) -> bool:
    return (conv.kernel_size == conv.stride and conv.padding == (0, 0) and conv.output_padding == (0, 0)
            and conv.dilation == (1, 1) and conv.groups == 1)


def patchwise_conv_transpose2d(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
    """``conv(x)`` for a transposed convolution whose patches do not overlap (kernel = stride, no padding): one
    matrix product per input pixel, (N, H, W, C_in) @ (C_in, C_out * kh * kw), then depth-to-space. For the
    one-channel output of the DB head this is about twice as fast as oneDNN's deconvolution on CPU, with the same
    products and sums."""
    kh, kw = conv.kernel_size
    n, _, h, w = x.shape
    weight = conv.weight.permute(1, 2, 3, 0).reshape(conv.out_channels * kh * kw, conv.in_channels)
    bias = None if conv.bias is None else conv.bias.repeat_interleave(kh * kw)
    patches = F.linear(x.permute(0, 2, 3, 1), weight, bias)  # (N, H, W, C_out * kh * kw)
    patches = patches.view(n, h, w, conv.out_channels, kh, kw).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(n, conv.out_channels, h * kh, w * kw)


class Head(CachedInferenceModule):
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
        self._folded = DerivedTensors()

    def forward(self, x: torch.Tensor, return_f: bool = False):
        if not inference_fast_path(self):
            x = F.relu_(safe_to_modify(self.conv_bn1(self.conv1(x)), self.conv_bn1))
            f = F.relu_(safe_to_modify(self.conv_bn2(self.conv2(x)), self.conv_bn2))
        else:  # inference: both batch norms folded into their convolutions, ReLU fused into the first
            weight1, bias1, weight2, bias2 = self._folded_convs()
            conv1, conv2 = self.conv1, self.conv2
            x = fused_conv2d(x, weight1, bias1, conv1.stride, conv1.padding, conv1.dilation, conv1.groups,
                             "relu", F.relu_)
            f = F.relu_(F.conv_transpose2d(x, weight2, bias2, conv2.stride, conv2.padding, conv2.output_padding,
                                           conv2.groups, conv2.dilation))
            if _is_patchwise(self.conv3):
                out = patchwise_conv_transpose2d(f, self.conv3).sigmoid_()
                return (out, f) if return_f else out
        out = torch.sigmoid(self.conv3(f))
        return (out, f) if return_f else out

    def _folded_convs(self) -> tuple[torch.Tensor, ...]:
        """conv1 + conv_bn1 and conv2 + conv_bn2 (transposed: output channels on dim 1) folded, cached."""
        conv1, bn1, conv2, bn2 = self.conv1, self.conv_bn1, self.conv2, self.conv_bn2
        sources = (conv1.weight, conv1.bias, conv2.weight, conv2.bias,
                   *(t for bn in (bn1, bn2) for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)))

        def fold():
            weight1, bias1 = fold_batch_norm(conv1.weight, conv1.bias, bn1)
            return (weight1.contiguous(memory_format=torch.channels_last), bias1,
                    *fold_batch_norm(conv2.weight, conv2.bias, bn2, out_dim=1))

        return self._folded.get(sources, fold, extra=(bn1.eps, bn2.eps))


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
