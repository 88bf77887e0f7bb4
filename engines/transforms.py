"""SAM's image preprocessing and coordinate transforms: resize, normalise, pad, scale points.

Frames: an H x W image is resized so its longest side is 1024 (the *input frame*), normalised and
zero-padded bottom/right to 1024 x 1024. Point prompts are xy pixel coordinates in the input frame.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .common import IMAGE_SIZE

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


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


def labelled_points(
    points: np.ndarray | None, labels: np.ndarray | None, boxes: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """B prompts of one shape as the predictor's labelled points: points (B, N, 2) with labels
    (B, N) 1/0, then a box (B, 4) XYXY as two points labelled 2 and 3; a prompt without a box
    ends with one point (0, 0) labelled -1. Returns coords (B, N', 2) float64 and labels (B, N')."""
    parts, tags = [], []
    if points is not None:
        parts.append(np.asarray(points, dtype=np.float64))
        tags.append(np.asarray(labels, dtype=np.int64))
    batch = len(points) if points is not None else len(boxes)
    if boxes is not None:
        parts.append(np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2))
        tags.append(np.tile(np.array([2, 3], dtype=np.int64), (batch, 1)))
    else:
        parts.append(np.zeros((batch, 1, 2)))
        tags.append(np.full((batch, 1), -1, dtype=np.int64))
    return np.concatenate(parts, axis=1), np.concatenate(tags, axis=1)
