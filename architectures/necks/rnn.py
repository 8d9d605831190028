"""Sequence encoders of the recognition models (PaddleOCR necks/rnn.py): reshape, BiLSTM, FC, SVTR."""
from __future__ import annotations

import torch
from torch import nn

from architectures.layers import ConvBNLayer, Im2Seq, make_activation, safe_to_modify
from architectures.necks import register


class EncoderWithRNN(nn.Module):
    """Two-layer bidirectional LSTM (batch first); parameter names equal Paddle's ``lstm.weight_ih_l0`` ..."""

    def __init__(self, in_channels, hidden_size):
        super().__init__()
        self.out_channels = hidden_size * 2
        self.lstm = nn.LSTM(in_channels, hidden_size, num_layers=2, bidirectional=True, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(x)[0]


class EncoderWithFC(nn.Module):
    """A single Linear layer."""

    def __init__(self, in_channels, hidden_size):
        super().__init__()
        self.out_channels = hidden_size
        self.fc = nn.Linear(in_channels, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Mlp(nn.Module):
    """fc1 -> activation -> fc2 (dropout is the identity at inference)."""

    def __init__(self, in_features, hidden_features, act="swish"):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = make_activation(act, inplace=True)  # on the fresh fc1 output
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(safe_to_modify(self.fc1(x), self.fc1)))


class Attention(nn.Module):
    """Global multi-head self-attention with a fused qkv projection, as in PaddleOCR's SVTR."""

    def __init__(self, dim, num_heads=8, qkv_bias=True, qk_scale=None):
        super().__init__()
        self.num_heads = num_heads
        self.dim = dim
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(n, t, self.dim)
        return self.proj(out)


class Block(nn.Module):
    """SVTR transformer block. ``prenorm=False`` (the neck's setting) normalises before each sub-layer."""

    def __init__(self, dim, num_heads, mlp_ratio=2.0, qkv_bias=True, qk_scale=None, act="swish", eps=1e-5,
                 prenorm=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.mixer = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)
        self.prenorm = prenorm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.prenorm:
            x = self.norm1(x + self.mixer(x))
            return self.norm2(x + self.mlp(x))
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _svtr_conv(in_channels, out_channels, kernel_size):
    kernel = tuple(kernel_size) if isinstance(kernel_size, (list, tuple)) else (kernel_size, kernel_size)
    return ConvBNLayer(in_channels, out_channels, kernel, padding=(kernel[0] // 2, kernel[1] // 2), act="swish",
                       conv_name="conv", bn_name="norm")


class EncoderWithSVTR(nn.Module):
    """SVTR neck: conv reduce -> global attention blocks -> conv expand -> concat with input -> conv.

    LayerNorm eps 1e-5 in the blocks and 1e-6 in the final ``norm``; Swish activations.
    ``kernel_size`` is [3, 3] in PP-OCRv3 and [1, 3] in PP-OCRv4.

    ``use_guide`` (True in PP-OCRv3 / PP-OCRv4 rec) only stops gradients: the neck works on a detached copy of the
    backbone features, so a CTC loss alone never trains the backbone. PaddleOCR trains it through the SAR / NRTR
    branch of the MultiHead, which is not built here. To fine-tune the backbone with CTC, set ``use_guide=False``
    (``load_pretrained(..., config_overrides={"head": {"ctc_neck": {"use_guide": False}}})``, or the attribute
    ``model.head.ctc_encoder.encoder.use_guide``); outputs do not change.
    """

    def __init__(self, in_channels, dims=64, depth=2, hidden_dims=120, use_guide=False, num_heads=8,
                 qkv_bias=True, mlp_ratio=2.0, kernel_size=(3, 3), qk_scale=None):
        super().__init__()
        self.use_guide = use_guide
        self.conv1 = _svtr_conv(in_channels, in_channels // 8, kernel_size)
        self.conv2 = _svtr_conv(in_channels // 8, hidden_dims, 1)
        self.svtr_block = nn.ModuleList([
            Block(hidden_dims, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, eps=1e-5,
                  prenorm=False)
            for _ in range(depth)
        ])
        self.norm = nn.LayerNorm(hidden_dims, eps=1e-6)
        self.conv3 = _svtr_conv(hidden_dims, in_channels, 1)
        self.conv4 = _svtr_conv(2 * in_channels, in_channels // 8, kernel_size)
        self.conv1x1 = _svtr_conv(in_channels // 8, dims, 1)
        self.out_channels = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.detach() if self.use_guide else x
        z = self.conv2(self.conv1(h))
        n, c, height, width = z.shape
        z = z.flatten(2).transpose(1, 2)
        for block in self.svtr_block:
            z = block(z)
        z = self.norm(z)
        z = z.reshape(n, height, width, c).permute(0, 3, 1, 2)
        z = self.conv3(z)
        z = torch.cat((h, z), dim=1)
        return self.conv1x1(self.conv4(z))


_ENCODERS = {"fc": EncoderWithFC, "rnn": EncoderWithRNN, "svtr": EncoderWithSVTR}


@register("SequenceEncoder")
class SequenceEncoder(nn.Module):
    """Im2Seq plus an optional ``encoder`` ("reshape", "rnn", "fc" or "svtr")."""

    def __init__(self, in_channels, encoder_type, hidden_size=48, **kwargs):
        super().__init__()
        self.encoder_reshape = Im2Seq(in_channels)
        self.encoder_type = encoder_type
        self.out_channels = in_channels
        if encoder_type == "reshape":
            self.encoder = None
            return
        if encoder_type not in _ENCODERS:
            raise ValueError(f"encoder_type must be one of {['reshape', *_ENCODERS]}, got {encoder_type!r}")
        if encoder_type == "svtr":
            self.encoder = EncoderWithSVTR(in_channels, **kwargs)
        else:
            self.encoder = _ENCODERS[encoder_type](in_channels, hidden_size)
        self.out_channels = self.encoder.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.encoder_type == "svtr":
            return self.encoder_reshape(self.encoder(x))
        x = self.encoder_reshape(x)
        return x if self.encoder is None else self.encoder(x)
