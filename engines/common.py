"""Layers and sizes SAM's modules share: the model's input size, LayerNorm2d, the encoder neck, MLPBlock.

As ``modeling/common.py`` in facebookresearch/segment-anything. The image encoders
(``image_encoder``, ``tiny_vit``), the prompt encoder, the two-way transformer and the mask
decoder import from here; this module imports none of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_SIZE = 1024  # the model's input frame: the longest side after resizing, and the padded square
EMBED_CHANNELS = 256
LOW_RES_SIZE = IMAGE_SIZE // 4  # the side of the decoders' low-resolution logits, and of a mask prompt


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel dimension of (N, C, H, W) maps (eps 1e-6)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W), normalised per pixel across C."""
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def encoder_neck(in_channels: int, out_channels: int = EMBED_CHANNELS) -> nn.Sequential:
    """Neck shared by every SAM encoder: conv1x1 -> LayerNorm2d -> conv3x3 -> LayerNorm2d (no biases)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
        LayerNorm2d(out_channels),
        nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
        LayerNorm2d(out_channels),
    )


class MLPBlock(nn.Module):
    """Two-layer MLP ``lin2(act(lin1(x)))`` over the last dimension (ViT blocks, two-way transformer)."""

    def __init__(self, dim: int, hidden_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden_dim)
        self.lin2 = nn.Linear(hidden_dim, dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., dim)."""
        return self.lin2(self.act(self.lin1(x)))
