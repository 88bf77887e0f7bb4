"""The SAM model (image encoder + prompt encoder + mask decoder) and SAM's image preprocessing.

Frames: an H x W image is resized so its longest side is 1024 (the *input frame*), normalised and
zero-padded bottom/right to 1024 x 1024. The image embedding is (256, 64, 64); point prompts are
xy pixel coordinates in the input frame; low-resolution mask logits are 256 x 256 over the padded
1024 x 1024 input.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .registry import MODEL_TYPES
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .tiny_vit import TinyViT
from .common import IMAGE_SIZE
from .image_encoder import VIT_CONFIGS, ImageEncoderViT

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


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


def preprocess_shape(height: int, width: int, long_side: int = IMAGE_SIZE) -> tuple[int, int]:
    """(height, width) scaled so the longer side is ``long_side``, rounded half up."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def resize_longest_side(image: np.ndarray, long_side: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (H', W', 3) with max(H', W') = ``long_side``, PIL bilinear.

    Bilinear is what SAM's reference ``ResizeLongestSide.apply_image`` uses (torchvision's
    ``resize`` on a PIL image, default interpolation); this is the same PIL call, bit for bit.
    """
    new_h, new_w = preprocess_shape(image.shape[0], image.shape[1], long_side)
    return np.array(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))


def image_to_input(
    image_resized: np.ndarray, pixel_mean: torch.Tensor, pixel_std: torch.Tensor, size: int = IMAGE_SIZE
) -> torch.Tensor:
    """Resized uint8 (H', W', 3) -> model input (1, 3, size, size): (x - mean) / std, zero-padded bottom/right.

    ``pixel_mean``/``pixel_std`` are (3, 1, 1) in 0-255 units (e.g. ``SamModel.pixel_mean``).
    """
    x = torch.tensor(image_resized, device=pixel_mean.device).permute(2, 0, 1)
    x = (x - pixel_mean) / pixel_std
    height, width = x.shape[1:]
    return F.pad(x, (0, size - width, 0, size - height)).unsqueeze(0)


def scale_coords(coords: np.ndarray, original_hw: tuple[int, int], long_side: int = IMAGE_SIZE) -> np.ndarray:
    """xy pixel coordinates (..., 2) in the original image -> the input frame (float64 copy)."""
    old_h, old_w = original_hw
    new_h, new_w = preprocess_shape(old_h, old_w, long_side)
    scaled = np.array(coords, dtype=np.float64)
    scaled[..., 0] *= new_w / old_w
    scaled[..., 1] *= new_h / old_h
    return scaled
