"""The SAM model (image encoder + prompt encoder + mask decoder) and its builder.

Frames: the image encoder takes normalised images zero-padded to 1024 x 1024 (see
``transforms``) and makes image embeddings (256, 64, 64); point prompts are xy pixel
coordinates in the input frame; low-resolution mask logits are 256 x 256 over the padded
1024 x 1024 input.
"""

from __future__ import annotations

import torch
from torch import nn

from .image_encoder import VIT_CONFIGS, ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .registry import MODEL_TYPES
from .tiny_vit import TinyViT
from .transforms import PIXEL_MEAN, PIXEL_STD


class SamModel(nn.Module):
    """SAM: ``image_encoder`` ((N,3,1024,1024) -> (N,256,64,64)), ``prompt_encoder``, ``mask_decoder``.

    ``pixel_mean``/``pixel_std`` (3, 1, 1) are non-persistent buffers, as in the checkpoints,
    which therefore load with ``strict=True``.
    """

    def __init__(self, image_encoder: nn.Module) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = PromptEncoder()
        self.mask_decoder = MaskDecoder()
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).reshape(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).reshape(3, 1, 1), persistent=False)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised, padded images (N, 3, 1024, 1024) -> image embeddings (N, 256, 64, 64)."""
        return self.image_encoder(images)

    @torch.no_grad()
    def decode(
        self, image_embedding: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Three candidate masks per point prompt (SAM's multimask output), before upsampling.

        image_embedding: (1, 256, 64, 64); point_coords: (B, 1, 2) xy in input-frame pixels;
        point_labels: (B, 1) int, 1 = foreground, 0 = background. Coordinates are used in their
        own dtype until the positional encoding (SAM's generator passes float64).
        Returns low-resolution mask logits (B, 3, 256, 256) and predicted IoU (B, 3).
        """
        sparse, dense = self.prompt_encoder(point_coords, point_labels)
        return self.mask_decoder(image_embedding, self.prompt_encoder.dense_pe(), sparse, dense, multimask_output=True)


def build_sam(model_type: str) -> SamModel:
    """A randomly initialised SAM of ``model_type`` (one of :data:`MODEL_TYPES`), in eval mode."""
    if model_type == "vit_t":
        encoder: nn.Module = TinyViT()
    elif model_type in VIT_CONFIGS:
        encoder = ImageEncoderViT(VIT_CONFIGS[model_type])
    else:
        raise ValueError(f"unknown model type {model_type!r}; expected one of {MODEL_TYPES}")
    return SamModel(encoder).eval()
