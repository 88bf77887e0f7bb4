"""MobileSAM's TinyViT-5M image encoder (``vit_t``).

(N, 3, 1024, 1024) normalised+padded images -> (N, 256, 64, 64) image embeddings:

- ``patch_embed``: two stride-2 3x3 conv+BN layers, 3 -> 64 channels at 256x256;
- ``layers.0``: MBConv blocks (inverted residuals) at 256x256, merged to 128 channels at 128x128;
- ``layers.1..3``: TinyViT blocks (windowed attention with learned relative biases, a depthwise
  3x3 "local" conv, an MLP) at 128x128 (128 ch) and 64x64 (160 and 320 ch); the last patch merge
  keeps the resolution so the output stride is 16 like SAM's ViTs;
- ``neck``: the SAM encoder neck, 320 -> 256 channels.

Parameter and buffer names follow the ``image_encoder.*`` keys of ``mobile_sam.pt``, including
the ImageNet classification head (``norm_head``, ``head``) the checkpoint carries but SAM never uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import encoder_neck

EARLY_STAGE = 1  # the stage whose output is the early features (160 channels at 64x64)


class ConvBN(nn.Module):
    """Bias-free Conv2d (``c``) followed by BatchNorm2d (``bn``); 'same' padding for odd kernels.

    Runs as one convolution with the BatchNorm's running statistics folded into its weights and
    bias (one pass over the activations instead of two): the model only ever infers.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1, groups: int = 1
    ) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.c = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_channels, H, W) -> (N, out_channels, H / stride, W / stride)."""
        conv, norm = self.c, self.bn
        scale = norm.weight * torch.rsqrt(norm.running_var + norm.eps)
        bias = norm.bias - norm.running_mean * scale
        return F.conv2d(
            x, conv.weight * scale[:, None, None, None], bias, conv.stride, conv.padding, conv.dilation, conv.groups
        )


class ConvPatchEmbed(nn.Module):
    """Stem: (N, 3, H, W) -> (N, dim, H/4, W/4) through two stride-2 3x3 conv+BN layers."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(ConvBN(3, dim // 2, 3, stride=2), nn.GELU(), ConvBN(dim // 2, dim, 3, stride=2))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, dim, H/4, W/4)."""
        return self.seq(images)


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand, 3x3 depthwise, 1x1 project, residual add, GELU after each."""

    def __init__(self, dim: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, dim, H, W) -> (N, dim, H, W)."""
        y = self.act(self.conv2(self.act(self.conv1(x))))
        return self.act(x + self.conv3(y))


class PatchMerging(nn.Module):
    """Channel change + downsampling: 1x1 conv, 3x3 depthwise conv (``stride``), 1x1 conv."""

    def __init__(self, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, dim, H, W) -> (N, out_dim, H/stride, W/stride)."""
        return self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))


class ConvStage(nn.Module):
    """First stage: MBConv ``blocks`` then an optional ``downsample``; NCHW in and out."""

    def __init__(self, dim: int, depth: int, expand_ratio: float, downsample: PatchMerging | None) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, dim, H, W) -> (N, out_dim, H', W')."""
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


def window_bias_index(window: int) -> torch.Tensor:
    """(window², window²) index into a window's learned biases: ``|dy| * window + |dx|`` per token pair."""
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :]).abs() * window + (xs[:, None] - xs[None, :]).abs()


class WindowAttention(nn.Module):
    """Pre-norm multi-head attention inside one window, with a learned bias per head and |offset|.

    ``qkv`` packs q, k and v per head: its output reads as (heads, 3, head_dim).
    """

    def __init__(self, dim: int, num_heads: int, window: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5  # a Python float, so a traced graph holds a constant
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window * window))
        self.register_buffer("attention_bias_idxs", window_bias_index(window), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, window², dim) -> (B, window², dim), B = number of windows."""
        b, n, dim = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, n, self.num_heads, 3, -1).permute(3, 0, 2, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, window², head_dim)
        bias = self.attention_biases[:, self.attention_bias_idxs]  # (heads, window², window²)
        # softmax(q k^T / sqrt(d) + bias) v, written out: scaled_dot_product_attention's CPU path
        # spends about a tenth of the encoder checking a float mask for -inf rows
        scores = torch.matmul(q * self.scale, k.transpose(-1, -2)).add_(bias)  # (B, heads, window², window²)
        out = torch.softmax(scores, dim=-1).matmul(v)
        return self.proj(out.transpose(1, 2).reshape(b, n, dim))


class PreNormMLP(nn.Module):
    """Pre-norm MLP: ``fc2(gelu(fc1(norm(x))))``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        return self.fc2(self.act(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Windowed attention (residual) -> depthwise ``local_conv`` -> MLP (residual), channels-last.

    The grid is zero-padded to whole windows *before* the attention's LayerNorm, so padded
    tokens take part in attention as keys (as in the original TinyViT).
    """

    def __init__(self, dim: int, num_heads: int, window: int, mlp_ratio: float, local_conv_size: int) -> None:
        super().__init__()
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)
        self.mlp = PreNormMLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, dim) -> (N, H, W, dim)."""
        x = x + self._windowed_attention(x)
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, dim) -> (N, H, W, dim): attention within each ``window`` x ``window`` tile."""
        n, h, w, dim = x.shape
        win = self.window
        x = F.pad(x, (0, 0, 0, -w % win, 0, -h % win))
        nh, nw = x.shape[1] // win, x.shape[2] // win
        windows = x.reshape(n, nh, win, nw, win, dim).transpose(2, 3).reshape(n * nh * nw, win * win, dim)
        out = self.attn(windows).reshape(n, nh, nw, win, win, dim).transpose(2, 3)
        return out.reshape(n, nh * win, nw * win, dim)[:, :h, :w]


class AttentionStage(nn.Module):
    """TinyViT ``blocks`` then an optional ``downsample``; NCHW in and out (blocks run channels-last)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        local_conv_size: int,
        downsample: PatchMerging | None,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, num_heads, window, mlp_ratio, local_conv_size) for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, dim, H, W) -> (N, out_dim, H', W')."""
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """TinyViT image encoder with SAM's neck: (N, 3, 1024, 1024) -> (N, 256, 64, 64).

    Defaults are MobileSAM's TinyViT-5M. Every patch merge halves the resolution except the last,
    which keeps it, so the output grid is the input size / 16.
    """

    def __init__(
        self,
        embed_dims: tuple[int, ...] = (64, 128, 160, 320),
        depths: tuple[int, ...] = (2, 2, 6, 2),
        num_heads: tuple[int, ...] = (2, 4, 5, 10),
        window_sizes: tuple[int, ...] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        last = len(embed_dims) - 1
        merges = [PatchMerging(embed_dims[i], embed_dims[i + 1], stride=2 if i < last - 1 else 1) for i in range(last)]
        self.patch_embed = ConvPatchEmbed(embed_dims[0])
        self.layers = nn.ModuleList([ConvStage(embed_dims[0], depths[0], mbconv_expand_ratio, merges[0])])
        self.layers.extend(
            AttentionStage(
                embed_dims[i],
                depths[i],
                num_heads[i],
                window_sizes[i],
                mlp_ratio,
                local_conv_size,
                merges[i] if i < last else None,
            )
            for i in range(1, last + 1)
        )
        # ImageNet classification head from TinyViT pre-training: stored in the checkpoint, unused.
        self.norm_head = nn.LayerNorm(embed_dims[-1])
        self.head = nn.Linear(embed_dims[-1], num_classes)
        self.neck = encoder_neck(embed_dims[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, 1024, 1024) -> (N, 256, 64, 64), contiguous.

        Runs channels-last throughout: the convolutions are faster so on the CPU (about a quarter
        of the encoder's time), and the attention stages' NHWC views need no copies.
        """
        return self.features(images)[0]

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, 1024, 1024) -> the image embedding (N, 256, 64, 64), contiguous, and the early
        features (N, 160, 64, 64): the second stage's output, which light HQ-SAM's decoder fuses
        with the embedding."""
        x = self.patch_embed(images.contiguous(memory_format=torch.channels_last))
        for layer in self.layers[: EARLY_STAGE + 1]:
            x = layer(x)
        early = x
        for layer in self.layers[EARLY_STAGE + 1 :]:
            x = layer(x)
        return self.neck(x).contiguous(), early
