"""SAM's prompt encoder: point and box prompts (and optionally a mask) -> sparse and dense embeddings.

Frames and shapes: prompts are points in the 1024x1024 model-input frame; the dense embedding
and positional encoding cover the (64, 64) image-embedding grid. Parameter names follow the
``prompt_encoder.*`` keys of the SAM and MobileSAM checkpoints.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Random Fourier features: unit-square positions (..., 2) as xy -> (..., 2 * num_feats).

    The encoding is the module's `forward`, so an exported graph names its nodes under this
    module (``.../pe_layer/Sin``), which the TensorRT back-end's fp32 pinning finds by name."""

    def __init__(self, num_feats: int = 128) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(2, num_feats))

    def forward(self, unit_xy: torch.Tensor) -> torch.Tensor:
        """(..., 2) xy in [0, 1] -> (..., 2 * num_feats) as [sin, cos] of a random projection."""
        proj = (2 * unit_xy - 1) @ self.positional_encoding_gaussian_matrix
        proj = (2 * math.pi) * proj
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)

    def grid(self, height: int, width: int) -> torch.Tensor:
        """Encoding of the pixel centres of a height x width grid: (1, 2 * num_feats, height, width)."""
        device = self.positional_encoding_gaussian_matrix.device
        ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height
        xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width
        unit_xy = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)
        return self(unit_xy).permute(2, 0, 1).unsqueeze(0)

    def points(self, xy: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        """(..., 2) xy in pixels of an image of size ``image_hw`` -> (..., 2 * num_feats)."""
        size = torch.tensor([image_hw[1], image_hw[0]], device=xy.device, dtype=xy.dtype)
        return self((xy / size).to(torch.float32))


class PromptEncoder(nn.Module):
    """Points (and optionally a mask) -> sparse and dense prompt embeddings.

    ``point_embeddings`` holds four learned vectors: negative point, positive point, and the two
    box corners (a box prompt's top-left and bottom-right).
    """

    def __init__(
        self,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (64, 64),
        input_image_size: tuple[int, int] = (1024, 1024),
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm2d(mask_in_chans),
            nn.GELU(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image embedding grid: (1, embed_dim, 64, 64)."""
        return self.pe_layer.grid(*self.image_embedding_size)

    def embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sparse embeddings of point prompts plus one padding "not a point" token, as SAM's
        prompt encoder makes them without a box: `embed_labelled_points`, padded.

        coords: (B, N, 2) xy in input-frame pixels; labels: (B, N) as `embed_labelled_points`
        takes them. Returns (B, N + 1, embed_dim).
        """
        padding = self.not_a_point_embed.weight.expand(coords.shape[0], 1, -1)
        return torch.cat([self.embed_labelled_points(coords, labels), padding], dim=1)

    def embed_labelled_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Sparse embeddings of prompts written as labelled points, as SAM's predictor (and its
        ONNX model) makes them: coords (B, N, 2) xy in input-frame pixels; labels (B, N): 1
        foreground, 0 background, 2 and 3 a box's top-left and bottom-right corners, -1 the
        "not a point" token a prompt without a box ends with. No padding is added. Returns
        (B, N, embed_dim)."""
        pe = self.pe_layer.points(coords + 0.5, self.input_image_size)  # sample at pixel centres
        by_label = torch.cat([self.not_a_point_embed.weight, *(e.weight for e in self.point_embeddings)])
        ignored = (labels == -1).unsqueeze(-1)
        return torch.where(ignored, 0.0, pe) + by_label[labels.long() + 1]  # rows for labels -1, 0, 1, 2, 3

    def embed_mask(self, masks: torch.Tensor | None) -> torch.Tensor:
        """Dense embedding of mask prompts (B, 1, 256, 256) logits -> (B, embed_dim, 64, 64).

        Without a mask, returns the learned "no mask" vector as (1, embed_dim, 1, 1), which
        broadcasts over the batch and the grid.
        """
        if masks is None:
            return self.no_mask_embed.weight.reshape(1, -1, 1, 1)
        return self.mask_downscaling(masks)

    def forward(
        self, coords: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor | None = None, pad: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, 2), (B, N)[, (B, 1, 256, 256)] -> sparse (B, N + `pad`, C) (`embed_points`, or
        `embed_labelled_points` without `pad`), dense (B or 1, C, 64 or 1, 64 or 1). Exported
        graphs call this, so that every prompt node is named under the prompt encoder."""
        sparse = self.embed_points(coords, labels) if pad else self.embed_labelled_points(coords, labels)
        return sparse, self.embed_mask(masks)
