"""COCO run-length encoding of binary masks (compressed RLE, column-major), via pycocotools."""

import numpy as np
from pycocotools import mask as coco_mask


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
    return [
        {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}
        for rle in coco_mask.encode(stack)
    ]


def decode_rle(rle: dict) -> np.ndarray:
    """Decode COCO compressed RLE ({"size": [H, W], "counts": str | bytes}) to (H, W) bool.

    The array is Fortran-ordered, as pycocotools returns it (no copy is made).
    """
    return coco_mask.decode(rle).view(bool)


def rle_area(rle: dict) -> int:
    """Number of set pixels of a COCO compressed RLE mask."""
    return int(coco_mask.area(rle))
