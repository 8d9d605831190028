"""Small building blocks shared by every architecture family.

Names of sub-modules follow PaddleOCR's structured parameter names, so each block takes the attribute
names it must expose (e.g. ``conv``/``bn`` in MobileNetV3, ``_conv``/``_batch_norm`` in ResNet_vd,
``conv``/``norm`` in the SVTR neck).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_globals
from torch.utils.hooks import RemovableHandle

BN_EPS = 1e-5  # Paddle's BatchNorm / BatchNorm2D default epsilon

# Paddle's F.hardsigmoid default slope (stored as a float32 op attribute: 0.1666667).
PADDLE_HARDSIGMOID_SLOPE = 0.1666667


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to a multiple of ``divisor`` the way PaddleOCR's MobileNetV3 does."""
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class HardSigmoid(nn.Module):
    """``clip(slope * x + offset, 0, 1)``; Paddle uses slope 0.2 in some models and 1/6 in others."""

    def __init__(self, slope: float = 0.2, offset: float = 0.5):
        super().__init__()
        self.slope = float(slope)
        self.offset = float(offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x * self.slope + self.offset, 0.0, 1.0)

    def extra_repr(self) -> str:
        return f"slope={self.slope}, offset={self.offset}"


class HardSwish(nn.Hardswish):
    """``x * relu6(x + 3) / 6``, identical to Paddle's hard_swish."""


class Swish(nn.SiLU):
    """Swish with beta = 1 (Paddle's nn.Swish), i.e. ``x * sigmoid(x)``."""


_ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "relu": nn.ReLU,
    "hardswish": HardSwish,
    "hard_swish": HardSwish,
    "swish": Swish,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
}
_INPLACE_CAPABLE = {"relu", "hardswish", "hard_swish", "swish"}


def make_activation(name: str | None, inplace: bool = False) -> nn.Module:
    """An activation module from a Paddle activation name (None -> Identity).

    ``inplace=True`` (for activations that support it) overwrites its input: only for fresh tensors.
    """
    if name is None:
        return nn.Identity()
    key = name.lower()
    if key not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[key](inplace=True) if inplace and key in _INPLACE_CAPABLE else _ACTIVATIONS[key]()


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


class DerivedTensors:
    """Tensors computed from module tensors (e.g. a batch norm folded into a convolution), cached and recomputed
    whenever one of the source tensors is replaced or modified in place through autograd-visible operations
    (optimizer steps, ``copy_`` / ``mul_`` under ``no_grad``). Edits through ``.data`` are invisible to torch's
    version counters: ``CachedInferenceModule`` also drops its caches on train()/eval() transitions, ``.to()`` and
    the like, ``load_state_dict``; anything else needs ``clear_inference_caches``."""

    def __init__(self):
        self._entry: tuple[tuple, tuple[torch.Tensor, ...]] | None = None  # (key, value), replaced as a whole

    def __deepcopy__(self, memo) -> DerivedTensors:
        return DerivedTensors()  # a cache: copies start empty (oneDNN-packed tensors cannot be copied)

    def __reduce__(self):
        return DerivedTensors, ()

    def clear(self) -> None:
        """Forget the cached tensors: the next ``get`` computes them again."""
        self._entry = None

    def get(self, sources, compute: Callable[[], tuple[torch.Tensor, ...]], extra=()) -> tuple[torch.Tensor, ...]:
        """The cached value of ``compute()`` for the current state of the ``sources`` (tensors or None)."""
        key = (*extra, *((t.data_ptr(), _version(t), t.dtype, t.device) if t is not None else None for t in sources))
        entry = self._entry
        if entry is None or entry[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                entry = (key, compute())
            self._entry = entry
        return entry[1]


class CachedInferenceModule(nn.Module):
    """Base of the modules whose inference fast path keeps ``DerivedTensors`` (folded batch norms, oneDNN-packed
    weights): the caches are dropped on train()/eval() transitions, on ``_apply`` (``.to()``, ``.float()``,
    ``.cuda()`` ...) and when ``load_state_dict`` reaches the module."""

    def _drop_derived_tensors(self) -> None:
        _clear_caches(self, (DerivedTensors,))

    def train(self, mode: bool = True):
        if mode != self.training:
            self._drop_derived_tensors()
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._drop_derived_tensors()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._drop_derived_tensors()
        super()._load_from_state_dict(*args, **kwargs)


class _HookCheck:
    """The hook-handle counter (``RemovableHandle.next_id``) at which a module last had no forward hooks, or None.
    Not copied or pickled: a copy checks again."""

    __slots__ = ("stamp",)

    def __init__(self):
        self.stamp: int | None = None

    def __deepcopy__(self, memo) -> _HookCheck:
        return _HookCheck()

    def __reduce__(self):
        return _HookCheck, ()

    def clear(self) -> None:
        self.stamp = None


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether forward hooks or pre-hooks are registered on ``module`` or on a module inside it, or globally
    (``torch.nn.modules.module.register_module_forward_hook``).

    A "no" is remembered until the next hook registration anywhere (torch numbers every hook handle), so a call
    costs one comparison; while hooks exist the modules are checked at every call, so a removed hook stops counting
    at once. After replacing a sub-module that already carries hooks, call ``clear_inference_caches``."""
    check = module.__dict__.get("_hook_check")
    if check is not None and check.stamp == RemovableHandle.next_id:
        return False
    stamp = RemovableHandle.next_id
    hooked = bool(_module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in module.modules())
    if check is None:
        check = module.__dict__["_hook_check"] = _HookCheck()
    check.stamp = None if hooked else stamp
    return hooked


def inference_fast_path(module: nn.Module) -> bool:
    """Whether ``module`` may take its CPU inference fast path now (folded batch norms, fused oneDNN convolutions,
    cached derived weights, in-place updates of its sub-modules' outputs).

    Only in eval mode with gradients off, never while ``torch.jit.trace`` records or ``torch.compile`` /
    ``torch.export`` trace (they get the plain module computations), and not when forward hooks are registered on
    the module or inside it, or globally: then every sub-module is called normally, its hooks fire, and the tensors
    they see are not changed afterwards."""
    return not (module.training or torch.is_grad_enabled() or torch.compiler.is_compiling()
                or torch._C._is_tracing() or has_forward_hooks(module))


def safe_to_modify(tensor: torch.Tensor, producer: nn.Module) -> torch.Tensor:
    """``tensor``, an output of ``producer``, to be updated in place; a copy of it when a forward hook on
    ``producer`` (or inside it, or a global one) may hold a reference to it."""
    return tensor.clone() if has_forward_hooks(producer) else tensor


def clear_inference_caches(model: nn.Module) -> None:
    """Drop every cached inference tensor (folded batch norms, oneDNN-packed weights) and remembered hook check
    inside ``model``; they are rebuilt at the next call.

    Needed after changing weights in a way torch does not track, e.g. ``param.data.mul_(0.5)`` or
    ``bn.running_var.data.fill_(1)`` (EMA updates through ``.data``), or after replacing a sub-module that carries
    forward hooks. In-place edits under ``torch.no_grad()``, optimizer steps, ``load_state_dict``, ``.to()`` and
    train()/eval() transitions are noticed without it."""
    for module in model.modules():
        _clear_caches(module, (DerivedTensors, _HookCheck))


def _clear_caches(module: nn.Module, kinds: tuple[type, ...]) -> None:
    """Clear the caches of the given kinds that ``module`` itself holds."""
    for value in module.__dict__.values():
        if isinstance(value, kinds):
            value.clear()


# activation name -> oneDNN post-op name of torch.ops.mkldnn._convolution_pointwise (same math as the modules)
_ONEDNN_POST_OPS = {None: "none", "relu": "relu", "hardswish": "hardswish", "hard_swish": "hardswish",
                    "swish": "swish", "sigmoid": "sigmoid"}


def _onednn_usable(x: torch.Tensor, weight: torch.Tensor, padding) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not isinstance(padding, str) and not torch.is_grad_enabled()
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def fused_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride, padding, dilation,
                 groups: int, act: str | None = None,
                 activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 packed_cache: DerivedTensors | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """Inference convolution, plus ``residual`` when given, followed by the activation ``act`` (a key of
    ``_ONEDNN_POST_OPS``): ``act(residual + conv(x))``.

    On CPU in float32 without gradients this is one oneDNN primitive with the sum and the activation as post-ops,
    on a channels-last input (as Paddle Inference's conv + activation / elementwise-add fuse passes do): no extra
    passes over the output and no NCHW <-> blocked layout round trip. With ``packed_cache`` the weight is kept
    there in oneDNN's own layout for the last input shape and padding (Paddle Inference's weight prepacking)
    instead of being reordered at every call. Elsewhere it is ``F.conv2d`` followed by the sum and ``activation``
    (computing ``act``; required when ``act`` is not None)."""
    if _onednn_usable(x, weight, padding):
        x = x.contiguous(memory_format=torch.channels_last)
        padding, stride, dilation = list(_pair(padding)), list(_pair(stride)), list(_pair(dilation))
        if packed_cache is not None:
            (weight,) = packed_cache.get((weight,), lambda: (torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.to_mkldnn(), padding, stride, dilation, groups, list(x.shape)),), extra=(*x.shape, *padding))
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups,
                                                           _ONEDNN_POST_OPS[act], [], "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, residual.contiguous(memory_format=torch.channels_last), weight, bias, padding, stride, dilation,
            groups, "add", None, _ONEDNN_POST_OPS[act], [], "")
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        y = residual + y
    return y if act is None else activation(y)


def conv2d(x: torch.Tensor, conv: nn.Conv2d, fast: bool) -> torch.Tensor:
    """``conv(x)``; with ``fast`` (the caller's ``inference_fast_path``) through ``fused_conv2d``'s oneDNN path
    (PyTorch's own dispatch runs small-batch 1x1 convolutions without oneDNN, about half as fast)."""
    if not fast:
        return conv(x)
    return fused_conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d,
                    out_dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``bn(conv(x))`` as one convolution (``out_dim``: the output-channel dimension of
    ``weight``, 1 for transposed convolutions), folded in float64 where the device has it and rounded once,
    like Paddle Inference's conv_bn fuse pass. Both results have the convolution's dtype (the batch norm may be
    kept in float32 under a float16 model: see ``load_pretrained``)."""
    wide = torch.float64 if weight.device.type in ("cpu", "cuda") else torch.float32
    scale = bn.weight.to(wide) * torch.rsqrt(bn.running_var.to(wide) + bn.eps)
    shape = [1] * weight.dim()
    shape[out_dim] = -1
    folded = (weight.to(wide) * scale.reshape(shape)).to(weight.dtype)
    shift = bn.running_mean.to(wide)
    if bias is not None:
        shift = shift - bias.to(wide)
    return folded, (bn.bias.to(wide) - shift * scale).to(weight.dtype)


class ConvBNLayer(CachedInferenceModule):
    """Conv2d (no bias by default) -> BatchNorm2d -> activation, with Paddle-compatible names.

    ``conv_name`` / ``bn_name`` set the attribute names of the convolution and the batch norm
    (``conv``/``bn`` by default); the activation has no parameters and no name in the state dict.
    ``padding=None`` means "same" padding for odd kernels: ``(k - 1) // 2`` per side.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=None,
        groups: int = 1,
        act: str | None = None,
        conv_name: str = "conv",
        bn_name: str = "bn",
        bias: bool = False,
        bn_eps: float = BN_EPS,
    ):
        super().__init__()
        kernel = _pair(kernel_size)
        if padding is None:
            padding = ((kernel[0] - 1) // 2, (kernel[1] - 1) // 2)
        self._conv_name = conv_name
        self._bn_name = bn_name
        self.add_module(
            conv_name,
            nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=padding, groups=groups, bias=bias),
        )
        self.add_module(bn_name, nn.BatchNorm2d(out_channels, eps=bn_eps))
        self.act = make_activation(act, inplace=True)  # runs on the fresh batch-norm output
        self._act_name = act.lower() if act is not None else None
        self._folded = DerivedTensors()
        self._packed = DerivedTensors()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self._modules[self._conv_name]
        if inference_fast_path(self):
            return self._forward_folded(x, conv.padding)
        bn = self._modules[self._bn_name]
        return self.act(safe_to_modify(bn(conv(x)), bn))

    def forward_padded(self, x: torch.Tensor, padding) -> torch.Tensor:
        """Inference (eval mode, gradients off), with ``padding`` instead of the convolution's own: e.g. ``(0, p)``
        on a band of rows that carries its own halo rows. The batch norm is folded into the convolution; the
        caller checks ``inference_fast_path`` (this layer's sub-modules are not called)."""
        if self.training or torch.is_grad_enabled():
            raise RuntimeError("forward_padded is an inference path: call it in eval mode without gradients")
        return self._forward_folded(x, padding)

    def forward_residual(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``relu(residual + self(x))`` for a layer without activation (a ResNet block's last convolution) at
        inference, as one convolution with the sum and the ReLU as oneDNN post-ops. Like ``forward_padded`` an
        inference path: the caller checks ``inference_fast_path`` and computes ``relu(residual + layer(x))``
        otherwise."""
        if self._act_name is not None:
            raise ValueError(f"forward_residual needs a layer without activation, this one has {self._act_name!r}")
        if self.training or torch.is_grad_enabled():
            raise RuntimeError("forward_residual is an inference path: call it in eval mode without gradients")
        conv = self._modules[self._conv_name]
        weight, bias = self._folded_conv(conv, self._modules[self._bn_name])
        return fused_conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, "relu", F.relu_,
                            self._packed, residual)

    def _forward_folded(self, x: torch.Tensor, padding) -> torch.Tensor:
        conv = self._modules[self._conv_name]
        weight, bias = self._folded_conv(conv, self._modules[self._bn_name])
        if self._act_name in _ONEDNN_POST_OPS:
            return fused_conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups, self._act_name,
                                self.act, self._packed)
        return self.act(F.conv2d(x, weight, bias, conv.stride, padding, conv.dilation, conv.groups))

    def _folded_conv(self, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference fast path: the batch norm folded into the convolution. The folded weights are cached
        (channels-last, which oneDNN runs fastest, depthwise convolutions above all) and recomputed whenever a
        parameter or statistic is replaced or modified (see ``DerivedTensors``). The state dict keeps the unfused,
        Paddle-named tensors."""

        def fold():
            weight, bias = fold_batch_norm(conv.weight, conv.bias, bn)
            return weight.contiguous(memory_format=torch.channels_last), bias

        return self._folded.get((conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var),
                                fold, extra=(bn.eps,))


def _version(tensor: torch.Tensor) -> int:
    """In-place modification counter of a tensor (-1 for inference tensors, which have none)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1


class SEModule(nn.Module):
    """Squeeze-and-excitation: avg pool -> conv1 (bias) -> ReLU -> conv2 (bias) -> hard sigmoid -> scale.

    ``slope``/``offset`` select the hard sigmoid: 0.2/0.5 in det_mobilenet_v3 and RSEFPN,
    Paddle's default 1/6 in MobileNetV1Enhance and PPLCNetV3. ``inplace=True`` scales the input tensor itself
    on the inference fast path: only for callers that pass a fresh tensor they do not use again (and, when it is a
    sub-module's output, pass it through ``safe_to_modify``).
    """

    def __init__(self, channels: int, reduction: int = 4, slope: float = 0.2, offset: float = 0.5,
                 inplace: bool = False):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv1 = nn.Conv2d(channels, channels // reduction, 1)
        self.conv2 = nn.Conv2d(channels // reduction, channels, 1)
        self.hardsigmoid = HardSigmoid(slope, offset)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not inference_fast_path(self):
            scale = self.hardsigmoid(self.conv2(F.relu(self.conv1(self.avg_pool(x)))))
            return x * scale
        # inference: the 1x1 convolutions of the pooled (N, C) vector as matrix products (a convolution
        # primitive per call costs far more than these tiny products)
        n, c = x.shape[:2]
        pooled = self.avg_pool(x).reshape(n, c)
        hidden = F.relu_(F.linear(pooled, self.conv1.weight.flatten(1), self.conv1.bias))
        scale = self.hardsigmoid(F.linear(hidden, self.conv2.weight.flatten(1), self.conv2.bias))
        scale = scale.reshape(n, c, 1, 1)
        return x.mul_(scale) if self.inplace else x * scale


_TRANSPOSE_BLOCK = 1 << 18  # elements per block of contiguous_nchw's copy (1 MB of float32)


def contiguous_nchw(x: torch.Tensor) -> torch.Tensor:
    """``x.contiguous()``. A channels-last 4-D CPU map is transposed from (H * W, C) to (C, H * W) in blocks of
    about 1 MB: 2-5x faster than PyTorch's generic strided copy, which it otherwise runs for this layout."""
    if x.dim() != 4 or x.device.type != "cpu" or x.is_contiguous() \
            or not x.is_contiguous(memory_format=torch.channels_last):
        return x.contiguous()
    n, c, h, w = x.shape
    out = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device)
    rows = max(1, _TRANSPOSE_BLOCK // c)
    for image, target in zip(x, out):
        pixels = image.permute(1, 2, 0).reshape(h * w, c)  # a view: the image is channels-last
        columns = target.view(c, h * w).t()
        for start in range(0, h * w, rows):
            columns[start:start + rows].copy_(pixels[start:start + rows])
    return out


def upsampled_blocks(x: torch.Tensor, scale: int) -> torch.Tensor:
    """View of an (N, C, H * s, W * s) map as (N, C, H, s, W, s): the s x s blocks nearest upsampling fills."""
    n, c, h, w = x.shape
    return x.view(n, c, h // scale, scale, w // scale, scale)


def nearest_spread(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Broadcast view of ``x`` (N, C, H, W) as (N, C, H, s, W, s): its nearest ``scale``-times upsampling in the
    shape of ``upsampled_blocks`` (nothing is copied); ``upsampled_blocks(out, s).copy_(nearest_spread(x, s))``
    writes the upsampled map into ``out`` without an intermediate tensor."""
    n, c, h, w = x.shape
    return x[:, :, :, None, :, None].expand(n, c, h, scale, w, scale)


class Im2Seq(nn.Module):
    """(N, C, 1, W) feature map -> (N, W, C) sequence."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.out_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[2] != 1:
            raise ValueError(f"Im2Seq expects a feature map of height 1, got shape {tuple(x.shape)}")
        return x.squeeze(2).permute(0, 2, 1)
