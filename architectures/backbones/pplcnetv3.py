"""PPLCNetV3, the re-parameterizable backbone of PP-OCRv4 mobile det (x0.75) and rec (x0.95).

Module names follow PaddleOCR's structured names (``conv1.conv``, ``blocks5.2.dw_conv.conv_kxk.1.bn`` ...).
Every :class:`LearnableRepLayer` exists in two forms:

* ``train``: the training branches (``conv_kxk.N`` conv+BN, ``conv_1x1`` conv+BN, the ``identity`` BN) summed,
  as in PaddleOCR's trained checkpoints;
* ``deploy``: one ``reparam_conv`` (with bias), as in the exported inference models.

Both forms apply ``lab`` (a learnable scalar affine) after the convolution, then ``act`` (hardswish followed by its
own ``lab``) -- except when the layer's stride is the *integer* 2 (tuple strides such as (2, 1) keep it); such
layers have no ``act`` module here (PaddleOCR builds one but never runs it).
``reparameterize()`` turns the train form into the deploy form in place, like PaddleOCR's ``rep()``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from architectures.backbones import register
from architectures.layers import (BN_EPS, PADDLE_HARDSIGMOID_SLOPE, CachedInferenceModule, ConvBNLayer, DerivedTensors,
                                  SEModule, inference_fast_path, make_divisible, safe_to_modify)

# Block tables: (kernel, in_channels, out_channels, stride, use_se), channels before scaling.
NET_CONFIG_DET = {
    "blocks2": [(3, 16, 32, 1, False)],
    "blocks3": [(3, 32, 64, 2, False), (3, 64, 64, 1, False)],
    "blocks4": [(3, 64, 128, 2, False), (3, 128, 128, 1, False)],
    "blocks5": [(3, 128, 256, 2, False)] + [(5, 256, 256, 1, False)] * 4,
    "blocks6": [(5, 256, 512, 2, True), (5, 512, 512, 1, True), (5, 512, 512, 1, False), (5, 512, 512, 1, False)],
}
NET_CONFIG_REC = {
    "blocks2": [(3, 16, 32, 1, False)],
    "blocks3": [(3, 32, 64, 1, False), (3, 64, 64, 1, False)],
    "blocks4": [(3, 64, 128, (2, 1), False), (3, 128, 128, 1, False)],
    "blocks5": [(3, 128, 256, (1, 2), False)] + [(5, 256, 256, 1, False)] * 4,
    "blocks6": [(5, 256, 512, (2, 1), True), (5, 512, 512, 1, True), (5, 512, 512, (2, 1), False),
                (5, 512, 512, 1, False)],
}
# Channels of the det backbone's 1x1 output projections (``layer_list``), before scaling.
DET_OUT_CHANNELS = (16, 24, 56, 480)
FORMS = ("deploy", "train")


def _pair(stride) -> tuple[int, int]:
    return (stride, stride) if isinstance(stride, int) else (int(stride[0]), int(stride[1]))


class LearnableAffineBlock(nn.Module):
    """``scale * x + bias`` with two learnable scalars (Paddle shape [1])."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.bias, x, self.scale)


class Act(nn.Module):
    """Hardswish followed by its own learnable affine block (``act.lab``)."""

    def __init__(self) -> None:
        super().__init__()
        self.lab = LearnableAffineBlock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lab(F.hardswish(x))


# (weight, bias, running_mean, running_var) of a BatchNorm, in any tensor type torch.as_tensor accepts.
BNParams = tuple


def _bn_factor_shift(bn: BNParams, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift), float64, with ``bn(y) == y * scale + shift`` in eval mode."""
    gamma, beta, mean, var = (torch.as_tensor(t).double() for t in bn)
    factor = gamma / (var + eps).sqrt()
    return factor, beta - mean * factor


def fuse_rep_branches(kxk: list[tuple[object, BNParams]], conv_1x1: tuple[object, BNParams] | None,
                      identity: BNParams | None, eps: float = BN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias (float64) of one convolution equal to the sum of a LearnableRepLayer's training branches.

    ``kxk``: the (conv weight, BN) pairs of ``conv_kxk.N``; ``conv_1x1``: that branch's pair (kernel > 1 only);
    ``identity``: the identity BN (same in/out channels, stride 1). Shapes alone fix the layout: a weight is
    [out, in / groups, k, k] and the identity is a one-hot at the kernel centre. Works on tensors and arrays, so
    the module (:meth:`LearnableRepLayer.fused_kernel_bias`) and the converter's state-dict rule share it.
    """
    first = torch.as_tensor(kxk[0][0])
    kernel = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
    bias = torch.zeros(first.shape[0], dtype=torch.float64, device=first.device)
    centre = kernel.shape[-1] // 2
    branches = [(kernel, weight, bn) for weight, bn in kxk]
    if conv_1x1 is not None:
        branches.append((kernel[:, :, centre:centre + 1, centre:centre + 1], *conv_1x1))
    for target, weight, bn in branches:
        factor, shift = _bn_factor_shift(bn, eps)
        target.addcmul_(torch.as_tensor(weight).double(), factor.reshape(-1, 1, 1, 1))
        bias += shift
    if identity is not None:
        factor, shift = _bn_factor_shift(identity, eps)
        index = torch.arange(kernel.shape[0], device=kernel.device)
        kernel[index, index % kernel.shape[1], centre, centre] += factor
        bias += shift
    return kernel, bias


def _bn_params(bn: nn.BatchNorm2d) -> BNParams:
    return bn.weight.detach(), bn.bias.detach(), bn.running_mean, bn.running_var


class LearnableRepLayer(CachedInferenceModule):
    """PPLCNetV3's re-parameterizable conv: train form (branches) or deploy form (``reparam_conv``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride=1, groups: int = 1,
                 num_conv_branches: int = 4, form: str = "train") -> None:
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"LearnableRepLayer form must be one of {FORMS}, got {form!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = _pair(stride)
        self.groups = groups
        self.padding = (kernel_size - 1) // 2
        # Paddle compares the raw stride with the int 2 / int 1: a tuple stride never matches.
        self.apply_act = not (isinstance(stride, int) and stride == 2)
        self.has_identity = out_channels == in_channels and isinstance(stride, int) and stride == 1
        self.is_repped = form == "deploy"
        if self.is_repped:
            self.reparam_conv = nn.Conv2d(in_channels, out_channels, kernel_size, self.stride, self.padding,
                                          groups=groups, bias=True)
        else:
            if self.has_identity:
                self.identity = nn.BatchNorm2d(in_channels, eps=BN_EPS)
            self.conv_kxk = nn.ModuleList(ConvBNLayer(in_channels, out_channels, kernel_size, stride, groups=groups)
                                          for _ in range(num_conv_branches))
            if kernel_size > 1:
                self.conv_1x1 = ConvBNLayer(in_channels, out_channels, 1, stride, groups=groups)
        self._folded = DerivedTensors()
        self.lab = LearnableAffineBlock()
        if self.apply_act:  # Paddle also builds it for stride 2 but never runs it (absent from inference programs)
            self.act = Act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_repped:
            if inference_fast_path(self):
                # lab(conv(x)) with lab's scalar affine folded into the kernel and bias: one pass over the output.
                conv = self.reparam_conv
                weight, bias = self._lab_folded_conv()
                out = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            else:
                out = self.lab(self.reparam_conv(x))
        else:
            # Same summation order as PaddleOCR (identity, 1x1, kxk branches) for the same float32 round-off.
            branches = [self.identity] if self.has_identity else []
            if self.kernel_size > 1:
                branches.append(self.conv_1x1)
            branches.extend(self.conv_kxk)
            out = branches[0](x)
            for branch in branches[1:]:
                out = out + branch(x)
            out = self.lab(out)
        if self.apply_act:
            out = self.act(out)
        return out

    def _lab_folded_conv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``reparam_conv``'s kernel and bias times ``lab.scale`` (+ ``lab.bias``), cached in channels-last layout
        (oneDNN's fastest, depthwise convolutions above all) and recomputed whenever one of the four tensors is
        replaced or modified (see ``DerivedTensors``)."""
        conv, lab = self.reparam_conv, self.lab

        def fold():
            weight = (conv.weight * lab.scale).contiguous(memory_format=torch.channels_last)
            return weight, torch.addcmul(lab.bias, conv.bias, lab.scale)

        return self._folded.get((conv.weight, conv.bias, lab.scale, lab.bias), fold)

    def fused_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The deploy-form kernel and bias (computed in float64) equivalent to the training branches."""
        if self.is_repped:
            return self.reparam_conv.weight.detach().double(), self.reparam_conv.bias.detach().double()
        return fuse_rep_branches(
            [(branch.conv.weight.detach(), _bn_params(branch.bn)) for branch in self.conv_kxk],
            (self.conv_1x1.conv.weight.detach(), _bn_params(self.conv_1x1.bn)) if self.kernel_size > 1 else None,
            _bn_params(self.identity) if self.has_identity else None, eps=self.conv_kxk[0].bn.eps)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fuse the training branches into ``reparam_conv`` and delete them (no-op when already fused)."""
        if self.is_repped:
            return
        kernel, bias = self.fused_kernel_bias()
        reference = self.conv_kxk[0].conv.weight
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         groups=self.groups, bias=True).to(device=reference.device, dtype=reference.dtype)
        conv.weight.copy_(kernel.to(reference.dtype))
        conv.bias.copy_(bias.to(reference.dtype))
        del self.conv_kxk
        if self.kernel_size > 1:
            del self.conv_1x1
        if self.has_identity:
            del self.identity
        self.reparam_conv = conv
        self.is_repped = True
        self._drop_derived_tensors()


class LCNetV3Block(nn.Module):
    """Depthwise rep-conv, optional SE, pointwise rep-conv."""

    def __init__(self, in_channels: int, out_channels: int, stride, dw_size: int, use_se: bool,
                 conv_kxk_num: int, form: str) -> None:
        super().__init__()
        self.use_se = use_se
        self.dw_conv = LearnableRepLayer(in_channels, in_channels, dw_size, stride, groups=in_channels,
                                         num_conv_branches=conv_kxk_num, form=form)
        if use_se:
            self.se = SEModule(in_channels, slope=PADDLE_HARDSIGMOID_SLOPE, inplace=True)
        self.pw_conv = LearnableRepLayer(in_channels, out_channels, 1, 1, num_conv_branches=conv_kxk_num, form=form)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw_conv(x)
        if self.use_se:
            x = self.se(safe_to_modify(x, self.dw_conv))  # scaled in place at inference
        return self.pw_conv(x)


@register()
class PPLCNetV3(nn.Module):
    """PPLCNetV3 backbone. ``det=True``: four feature maps (after ``layer_list``); else the rec feature map.

    Built in the training form by default, like PaddleOCR (``architectures.build`` calls ``reparameterize()``
    for the deploy form); ``form="deploy"`` builds the fused layers directly.

    The rec variant ends with ``avg_pool2d([3, 2])`` in eval mode (adaptive pool to [1, 40] in train mode), as
    PaddleOCR does.
    """

    def __init__(self, scale: float = 1.0, conv_kxk_num: int = 4, det: bool = False, form: str = "train",
                 in_channels: int = 3) -> None:
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"PPLCNetV3 form must be one of {FORMS}, got {form!r}")
        self.scale = scale
        self.det = det
        self.form = form
        net_config = NET_CONFIG_DET if det else NET_CONFIG_REC
        self.conv1 = ConvBNLayer(in_channels, make_divisible(16 * scale, 16), 3, 2)
        for name, rows in net_config.items():
            blocks = [
                LCNetV3Block(make_divisible(in_c * scale, 16), make_divisible(out_c * scale, 16), stride, k, se,
                             conv_kxk_num, form)
                for k, in_c, out_c, stride, se in rows
            ]
            setattr(self, name, nn.Sequential(*blocks))
        if det:
            stage_channels = [make_divisible(net_config[name][-1][2] * scale, 16)
                              for name in ("blocks3", "blocks4", "blocks5", "blocks6")]
            self.out_channels = [int(c * scale) for c in DET_OUT_CHANNELS]
            self.layer_list = nn.ModuleList(
                nn.Conv2d(c_in, c_out, 1) for c_in, c_out in zip(stage_channels, self.out_channels)
            )
        else:
            self.out_channels = make_divisible(512 * scale, 16)

    def forward(self, x: torch.Tensor):
        x = self.blocks2(self.conv1(x))
        c3 = self.blocks3(x)
        c4 = self.blocks4(c3)
        c5 = self.blocks5(c4)
        c6 = self.blocks6(c5)
        if self.det:
            return [proj(feat) for proj, feat in zip(self.layer_list, (c3, c4, c5, c6))]
        if self.training:
            return F.adaptive_avg_pool2d(c6, (1, 40))
        return F.avg_pool2d(c6, (3, 2))

    def rep_layers(self) -> list[tuple[str, LearnableRepLayer]]:
        """Every re-parameterizable layer with its qualified name (relative to this module)."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, LearnableRepLayer)]

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Switch every LearnableRepLayer to the fused deploy form, in place (like PaddleOCR's rep())."""
        for _, layer in self.rep_layers():
            layer.reparameterize()
        self.form = "deploy"
