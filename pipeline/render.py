"""Draw the masks of one image over it, for a person to look at."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from sam_batch.pipeline.rle import decode_rle


@dataclass(frozen=True)
class BoxMask:
    """A mask as the bool (h, w) pixels of a box whose top-left pixel is (x0, y0) in the image."""

    pixels: np.ndarray
    x0: int
    y0: int


def box_mask(row: dict) -> BoxMask:
    """The mask of a masks-table row: its box-local RLE placed at `box_origin`, or, where the row
    has none (an output written before box-local masks), its RLE over the whole image (a box at
    (0, 0) the size of the image)."""
    if row.get("box_segmentation") is not None:
        x0, y0 = row["box_origin"]
        return BoxMask(decode_rle(row["box_segmentation"]), x0, y0)
    return BoxMask(decode_rle(row["segmentation"]), 0, 0)


def overlay(image: np.ndarray, masks: list[BoxMask], alpha: float = 0.45, seed: int = 0) -> Image.Image:
    """Blend each mask in its own colour, largest first, with outlines.

    image: uint8 (H, W, 3); returns an RGB PIL image of the same size.
    """
    rng = np.random.default_rng(seed)
    canvas = image.astype(np.float32)
    height, width = image.shape[:2]
    for mask in sorted(masks, key=lambda m: -int(m.pixels.sum())):
        h, w = mask.pixels.shape
        if mask.x0 < 0 or mask.y0 < 0 or mask.x0 + w > width or mask.y0 + h > height:
            raise ValueError(
                f"mask of size {(h, w)} at {(mask.x0, mask.y0)} does not fit image of size {(height, width)}"
            )
        colour = rng.integers(40, 256, size=3).astype(np.float32)
        box = canvas[mask.y0 : mask.y0 + h, mask.x0 : mask.x0 + w]  # a view: drawing on it draws on the canvas
        box[mask.pixels] = (1 - alpha) * box[mask.pixels] + alpha * colour
        box[_outline(mask.pixels)] = colour
    return Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask that touch a pixel outside it (4-neighbourhood)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner
