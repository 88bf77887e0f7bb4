"""COCO run-length encoding of binary masks (compressed RLE, column-major), via pycocotools.

A mask is written twice: over its own box (`box_segmentation`, with the box's top-left pixel
`box_origin`), always, and over the whole image (`segmentation`) for images of at most
`MAX_FULL_RLE_PIXELS`: decoding a full-image RLE builds an image-size array, so one small mask
of a large scene would cost seconds and hundreds of MiB to read (docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
from pycocotools import mask as coco_mask

# `segmentation` (COCO RLE over the full image) is written for images of at most this many
# pixels (4096 x 4096, 16.8 MP: one mask decodes to a 16 MiB array); above, it is null
MAX_FULL_RLE_PIXELS = 4096 * 4096


def encode_rle(mask: np.ndarray) -> dict:
    """Encode one (H, W) bool mask as COCO compressed RLE.

    Returns:
        {"size": [H, W], "counts": str}, runs taken down columns (Fortran order).
    """
    return encode_rle_batch(mask[None])[0]


def encode_rle_batch(masks: np.ndarray) -> list[dict]:
    """Encode (N, H, W) bool masks as COCO compressed RLE, with one copy of the stack.

    Returns:
        N dicts as from :func:`encode_rle`, in order.
    """
    stack = np.asfortranarray(masks.transpose(1, 2, 0).view(np.uint8))
    return [{"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")} for rle in coco_mask.encode(stack)]


def decode_rle(rle: dict) -> np.ndarray:
    """Decode COCO compressed RLE ({"size": [H, W], "counts": str | bytes}) to (H, W) bool.

    The array is Fortran-ordered, as pycocotools returns it (no copy is made).
    """
    return coco_mask.decode(rle).view(bool)


def rle_area(rle: dict) -> int:
    """Number of set pixels of a COCO compressed RLE mask."""
    return int(coco_mask.area(rle))


def encode_rle_placed(pixels: np.ndarray, x0: int, y0: int, image_hw: tuple[int, int]) -> dict:
    """COCO compressed RLE of a mask given as the (h, w) bool pixels of a box at (x0, y0).

    Equal to `encode_rle` of the full (H, W) image-size mask, which is never built: the runs
    are found down the box's columns and placed in the image's column-major order.
    """
    height, width = image_hw
    h, w = pixels.shape
    padded = np.zeros((h + 2, w), dtype=np.int8)  # a zero above and below each column
    padded[1:-1] = pixels
    steps = np.diff(padded.ravel(order="F"))
    starts, ends = np.flatnonzero(steps == 1) + 1, np.flatnonzero(steps == -1) + 1

    def placed(index: np.ndarray) -> np.ndarray:
        column, row = np.divmod(index, h + 2)
        return (x0 + column) * height + y0 + row - 1

    counts: list[int] = []
    position = 0
    for start, end in zip(placed(starts).tolist(), placed(ends).tolist()):
        if counts and start == position:  # a run that goes on at the top of the next column
            counts[-1] += end - start
        else:
            counts += [start - position, end - start]
        position = end
    if position < height * width:
        counts.append(height * width - position)
    rle = coco_mask.frPyObjects({"size": [height, width], "counts": counts or [0]}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def mask_rle_columns(pixels: np.ndarray, x0: int, y0: int, image_hw: tuple[int, int]) -> dict:
    """The masks table's RLE columns of one mask given as the (h, w) bool pixels of its box.

    Returns {"segmentation": RLE over the (H, W) image or None when H * W exceeds
    `MAX_FULL_RLE_PIXELS`, "box_segmentation": RLE over the (h, w) box, "box_origin": [x0, y0]},
    the box's top-left pixel in the image.
    """
    height, width = image_hw
    full = encode_rle_placed(pixels, x0, y0, image_hw) if height * width <= MAX_FULL_RLE_PIXELS else None
    return {"segmentation": full, "box_segmentation": encode_rle(pixels), "box_origin": [int(x0), int(y0)]}
