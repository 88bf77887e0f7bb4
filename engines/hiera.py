"""SAM 2.1's image encoder: the Hiera trunk and its FPN neck (images only).

(N, 3, 1024, 1024) normalised images -> three feature maps of 256 channels: (N, 256, 256, 256)
at stride 4, (N, 256, 128, 128) at stride 8 and (N, 256, 64, 64) at stride 16 (the image
embedding's level). The trunk embeds 7x7 patches at stride 4 and runs four stages of
multi-scale blocks; the first block of stages 2-4 max-pools its queries 2x2 and doubles the
width, so the stages output (C, 256²), (2C, 128²), (4C, 64²) and (8C, 32²). Attention is
windowed per stage (`Sam2Config.window_spec`) except in the global blocks. The neck projects
each stage to 256 channels and adds the upsampled (nearest) coarser level to the two coarsest
it keeps; the coarsest level itself (32²) is dropped ("scalp"). The neck's sine position
encodings serve only the video memory and are not made.

Parameter names follow ``image_encoder.trunk.*`` and ``image_encoder.neck.*`` of the official
``sam2.1_hiera_*.pt`` checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import EMBED_CHANNELS
from .mask_decoder import HeadMLP

Q_STRIDE = 2  # the query pooling between stages (2x2)
PATCH_KERNEL, PATCH_STRIDE, PATCH_PADDING = 7, 4, 3
TOP_DOWN_LEVELS = (2, 3)  # the neck's levels (finest first) that receive the coarser level, upsampled
SCALP = 1  # coarsest neck levels dropped


@dataclass(frozen=True)
class HieraConfig:
    """One SAM 2.1 size: the trunk's first width and heads, blocks per stage, the global-attention
    blocks, each stage's window, and the size of the background position embedding."""

    embed_dim: int
    num_heads: int
    stages: tuple[int, ...]
    global_att_blocks: tuple[int, ...]
    window_spec: tuple[int, ...] = (8, 4, 14, 7)
    pos_embed_size: tuple[int, int] = (14, 14)

    @property
    def channels(self) -> list[int]:
        """Each stage's output width, finest first."""
        return [self.embed_dim * 2**i for i in range(len(self.stages))]


HIERA_CONFIGS: dict[str, HieraConfig] = {
    "sam2.1_hiera_t": HieraConfig(96, 1, (1, 2, 7, 2), (5, 7, 9), pos_embed_size=(7, 7)),
    "sam2.1_hiera_s": HieraConfig(96, 1, (1, 2, 11, 2), (7, 10, 13), pos_embed_size=(7, 7)),
    "sam2.1_hiera_b+": HieraConfig(112, 2, (2, 3, 16, 3), (12, 16, 20)),
    "sam2.1_hiera_l": HieraConfig(144, 2, (2, 6, 36, 4), (23, 33, 43), (8, 4, 16, 8), pos_embed_size=(7, 7)),
}


def _pool(x: torch.Tensor) -> torch.Tensor:
    """2x2 max-pooling of a channels-last map (N, H, W, C) -> (N, H/2, W/2, C)."""
    return F.max_pool2d(x.permute(0, 3, 1, 2), Q_STRIDE, Q_STRIDE).permute(0, 2, 3, 1)


def _windows(x: torch.Tensor, window: int) -> torch.Tensor:
    """(N, H, W, C), zero-padded to multiples of `window` -> (N * nH * nW, window, window, C)."""
    n, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, -w % window, 0, -h % window))
    nh, nw = x.shape[1] // window, x.shape[2] // window
    return x.view(n, nh, window, nw, window, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, window, window, c)


def _unwindow(windows: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `_windows` for a (height, width) map: (N * nH * nW, w, w, C) -> (N, height, width, C)."""
    window, c = windows.shape[1], windows.shape[3]
    # ceiling division on non-negative sizes: ONNX's integer Div truncates, so -(-a // b) would export wrong
    nh, nw = (height + window - 1) // window, (width + window - 1) // window
    x = windows.reshape(-1, nh, nw, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, nh * window, nw * window, c)[:, :height, :width]


class MultiScaleAttention(nn.Module):
    """Self-attention over a (H, W) grid, queries max-pooled 2x2 when `pool_queries`:
    (N, H, W, dim) -> (N, H', W', dim_out)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, pool_queries: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.pool_queries = pool_queries
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, h, w, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, h * w, 3, self.num_heads, -1).unbind(2)  # each (N, HW, heads, D)
        if self.pool_queries:
            q = _pool(q.reshape(n, h, w, -1))
            h, w = q.shape[1:3]
            q = q.reshape(n, h * w, self.num_heads, -1)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(n, h, w, -1))


class MultiScaleBlock(nn.Module):
    """Pre-norm block: (windowed) attention and an MLP; a stage's first block pools its queries and
    widens (the shortcut projected and pooled): (N, H, W, dim) -> (N, H', W', dim_out)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, window: int, pool_queries: bool) -> None:
        super().__init__()
        self.window = window
        self.pool_queries = pool_queries
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, pool_queries)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = HeadMLP(dim_out, 4 * dim_out, dim_out, 2, activation=nn.GELU)
        self.proj = nn.Linear(dim, dim_out) if dim != dim_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.proj is not None:
            shortcut = self.proj(x)
            shortcut = _pool(shortcut) if self.pool_queries else shortcut
        if self.window > 0:
            x = self.attn(_windows(x, self.window))
            x = _unwindow(x, *shortcut.shape[1:3])
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """7x7 patches at stride 4: (N, 3, H, W) -> (N, H/4, W/4, dim), channels-last."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH_KERNEL, PATCH_STRIDE, PATCH_PADDING)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).permute(0, 2, 3, 1)


class Hiera(nn.Module):
    """The trunk: (N, 3, 1024, 1024) -> each stage's output (N, C_i, H_i, W_i), finest first."""

    def __init__(self, config: HieraConfig) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(config.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, config.embed_dim, *config.pos_embed_size))
        window = config.window_spec[0]
        self.pos_embed_window = nn.Parameter(torch.zeros(1, config.embed_dim, window, window))
        ends = [sum(config.stages[: i + 1]) - 1 for i in range(len(config.stages))]
        self.stage_ends = ends
        self.blocks = nn.ModuleList()
        dim, heads, stage = config.embed_dim, config.num_heads, 0
        for i in range(sum(config.stages)):
            window = 0 if i in config.global_att_blocks else config.window_spec[stage]
            first_of_stage = i - 1 in ends
            dim_out, heads = (2 * dim, 2 * heads) if first_of_stage else (dim, heads)
            stage += first_of_stage
            # a pooling block attends in its stage's predecessor's windows, then holds half of them
            self.blocks.append(MultiScaleBlock(dim, dim_out, heads, window, pool_queries=first_of_stage))
            dim = dim_out

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embed(images)
        x = x + self._position_embedding(x.shape[1:3])
        outputs = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_ends:
                outputs.append(x.permute(0, 3, 1, 2))
        return outputs

    def _position_embedding(self, hw: tuple[int, int]) -> torch.Tensor:
        """The background embedding (bicubic to `hw`) plus the window embedding tiled: (1, H, W, C)."""
        background = F.interpolate(self.pos_embed, size=hw, mode="bicubic")
        tiles = [a // b for a, b in zip(background.shape, self.pos_embed_window.shape)]
        # repeat, not tile: the same here (one count per dimension), and it exports without an ONNX If
        return (background + self.pos_embed_window.repeat(tiles)).permute(0, 2, 3, 1)


class _Lateral(nn.Module):
    """One neck level's 1x1 projection (``convs.i.conv``)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, EMBED_CHANNELS, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class FpnNeck(nn.Module):
    """Stage outputs (finest first) -> 256-channel maps at the three finest levels (finest first)."""

    def __init__(self, channels: list[int]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(_Lateral(c) for c in reversed(channels))  # coarsest first

    def forward(self, stages: list[torch.Tensor]) -> list[torch.Tensor]:
        last = len(stages) - 1
        out: list[torch.Tensor] = [stages[0]] * len(stages)
        coarser = None
        for i in range(last, -1, -1):
            lateral = self.convs[last - i](stages[i])
            if i in TOP_DOWN_LEVELS and coarser is not None:
                lateral = lateral + F.interpolate(coarser.float(), scale_factor=2.0, mode="nearest")
            coarser = out[i] = lateral
        return out[: len(out) - SCALP]


class Sam2ImageEncoder(nn.Module):
    """Hiera and its neck: (N, 3, 1024, 1024) -> [(N, 256, 256, 256), (N, 256, 128, 128), (N, 256, 64, 64)]."""

    def __init__(self, config: HieraConfig) -> None:
        super().__init__()
        self.trunk = Hiera(config)
        self.neck = FpnNeck(config.channels)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.neck(self.trunk(images))
