"""SAM's plain-ViT image encoder (vit_b / vit_l / vit_h).

The encoder maps a normalised, zero-padded image (N, 3, 1024, 1024) to an image embedding
(N, 256, 64, 64): 16x16 patches, absolute position embeddings, transformer blocks with windowed
(14x14) or global attention and decomposed relative position biases, then a conv neck.
Parameter names follow the official SAM checkpoints (``image_encoder.*`` in
``sam_vit_{b,l,h}_*.pth``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import IMAGE_SIZE, MLPBlock, encoder_neck

PATCH_SIZE = 16
WINDOW_SIZE = 14


@dataclass(frozen=True)
class ViTConfig:
    """Size of one SAM ViT variant."""

    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]


VIT_CONFIGS: dict[str, ViTConfig] = {
    "vit_b": ViTConfig(768, 12, 12, (2, 5, 8, 11)),
    "vit_l": ViTConfig(1024, 24, 16, (5, 11, 17, 23)),
    "vit_h": ViTConfig(1280, 32, 16, (7, 15, 23, 31)),
}


class PatchEmbed(nn.Module):
    """Non-overlapping 16x16 patches projected to ``dim`` channels, returned channels-last."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH_SIZE, stride=PATCH_SIZE)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, H/16, W/16, dim)."""
        return self.proj(images).permute(0, 2, 3, 1)


def relative_position_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """Gather the (size, size, head_dim) table ``rel_pos[i - j + size - 1]`` for query i, key j.

    ``rel_pos`` is (2 * size - 1, head_dim); SAM only ever attends over square grids of the size
    the table was trained for (14 in windows, 64 globally), so no interpolation is needed.
    """
    if rel_pos.shape[0] != 2 * size - 1:
        raise ValueError(f"relative position table of {rel_pos.shape[0]} rows cannot serve a grid of {size}")
    positions = torch.arange(size, device=rel_pos.device)
    return rel_pos[positions[:, None] - positions[None, :] + size - 1]


class ViTAttention(nn.Module):
    """Multi-head self-attention over an (H, W) token grid with decomposed relative position bias.

    The bias for query (qy, qx) and key (ky, kx) is ``q . Rh[qy - ky] + q . Rw[qx - kx]``.
    """

    def __init__(self, dim: int, num_heads: int, grid_size: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * grid_size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * grid_size - 1, head_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, dim) -> (N, H, W, dim)."""
        n, h, w, dim = x.shape
        qkv = self.qkv(x).reshape(n, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, heads, H*W, head_dim)
        bias = self._relative_bias(q, h, w)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(n, h, w, dim))

    def _relative_bias(self, q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Additive attention bias (N, heads, H*W, H*W) from unscaled queries (N, heads, H*W, head_dim)."""
        n, heads, _, head_dim = q.shape
        grid_q = q.reshape(n, heads, h, w, head_dim)
        bias_h = torch.einsum("nmhwc,hkc->nmhwk", grid_q, relative_position_table(self.rel_pos_h, h))
        bias_w = torch.einsum("nmhwc,wkc->nmhwk", grid_q, relative_position_table(self.rel_pos_w, w))
        return (bias_h[..., :, None] + bias_w[..., None, :]).reshape(n, heads, h * w, h * w)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """Zero-pad (N, H, W, C) to multiples of ``window`` and cut it into (N * nH * nW, window, window, C)."""
    n, h, w, c = x.shape
    pad_h, pad_w = -h % window, -w % window
    x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    nh, nw = (h + pad_h) // window, (w + pad_w) // window
    x = x.reshape(n, nh, window, nw, window, c).transpose(2, 3)
    return x.reshape(n * nh * nw, window, window, c)


def window_unpartition(windows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (N * nH * nW, window, window, C) -> (N, height, width, C)."""
    window, c = windows.shape[1], windows.shape[3]
    # ceiling division on non-negative sizes: ONNX's integer Div truncates, so -(-a // b) would export wrong
    nh, nw = (height + window - 1) // window, (width + window - 1) // window
    x = windows.reshape(-1, nh, nw, window, window, c).transpose(2, 3)
    return x.reshape(-1, nh * window, nw * window, c)[:, :height, :width]


class Block(nn.Module):
    """Pre-norm transformer block; attention is windowed when ``window_size > 0``, else global."""

    def __init__(self, dim: int, num_heads: int, window_size: int, grid_size: int) -> None:
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, num_heads, window_size or grid_size)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, dim) -> (N, H, W, dim)."""
        y = self.norm1(x)
        if self.window_size > 0:
            h, w = y.shape[1:3]
            y = window_unpartition(self.attn(window_partition(y, self.window_size)), h, w)
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """SAM ViT encoder: (N, 3, 1024, 1024) normalised+padded images -> (N, 256, 64, 64)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        grid = IMAGE_SIZE // PATCH_SIZE
        self.patch_embed = PatchEmbed(config.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, config.embed_dim))
        self.blocks = nn.ModuleList(
            Block(
                config.embed_dim,
                config.num_heads,
                window_size=0 if i in config.global_attn_indexes else WINDOW_SIZE,
                grid_size=grid,
            )
            for i in range(config.depth)
        )
        self.neck = encoder_neck(config.embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, 1024, 1024) -> (N, 256, 64, 64)."""
        return self.features(images)[0]

    def features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, 1024, 1024) -> the image embedding (N, 256, 64, 64) and the early features
        (N, embed_dim, 64, 64): the first global-attention block's output, which HQ-SAM's
        decoder fuses with the embedding."""
        first_global = next(i for i, block in enumerate(self.blocks) if block.window_size == 0)
        x = self.patch_embed(images) + self.pos_embed
        for block in self.blocks[: first_global + 1]:
            x = block(x)
        early = x.permute(0, 3, 1, 2)
        for block in self.blocks[first_global + 1 :]:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2)), early
