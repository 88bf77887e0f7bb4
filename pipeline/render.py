"""Draw the masks of one image over it, for a person to look at."""

from __future__ import annotations

import numpy as np
from PIL import Image

from sam_batch.pipeline.rle import decode_rle


def overlay(image: np.ndarray, segmentations: list[dict], alpha: float = 0.45, seed: int = 0) -> Image.Image:
    """Blend each mask (COCO RLE over the image) in its own colour, largest first, with outlines.

    image: uint8 (H, W, 3); returns an RGB PIL image of the same size.
    """
    rng = np.random.default_rng(seed)
    canvas = image.astype(np.float32)
    masks = [decode_rle(s) for s in segmentations]
    for mask in sorted(masks, key=lambda m: -int(m.sum())):
        if mask.shape != image.shape[:2]:
            raise ValueError(f"mask of size {mask.shape} does not fit image of size {image.shape[:2]}")
        colour = rng.integers(40, 256, size=3).astype(np.float32)
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * colour
        canvas[_outline(mask)] = colour
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask that touch a pixel outside it (4-neighbourhood)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner
