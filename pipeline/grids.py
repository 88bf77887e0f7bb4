"""Prompt-point grids and crop tiling for automatic mask generation.

Pure geometry, no model: which points are prompted, and over which crops of the image.
All boxes are XYXY in integer pixels of the original image, x0/y0 inclusive and x1/y1
exclusive (so ``x1 - x0`` is the crop width).
"""

import math

import numpy as np


def point_grid(n_per_side: int) -> np.ndarray:
    """Regular grid of ``n_per_side**2`` prompt points over the unit square.

    Points sit at the centres of an ``n_per_side`` x ``n_per_side`` grid of cells, i.e. half
    a cell away from the borders.

    Returns:
        float64 array (n_per_side**2, 2) of normalised (x, y) in [0, 1]; x varies fastest
        (row by row, top to bottom). Multiply by (width, height) to get pixel coordinates.
    """
    offset = 1 / (2 * n_per_side)
    ticks = np.linspace(offset, 1 - offset, n_per_side)
    xs, ys = np.meshgrid(ticks, ticks)
    return np.stack([xs.ravel(), ys.ravel()], axis=1)


def point_grids_per_layer(points_per_side: int, n_layers: int, downscale_factor: int) -> list[np.ndarray]:
    """Point grids for crop layers 0..n_layers.

    Layer ``i`` uses ``int(points_per_side / downscale_factor**i)`` points per side.

    Returns:
        ``n_layers + 1`` arrays, each (n_i**2, 2) normalised (x, y) as from :func:`point_grid`.
    """
    return [point_grid(int(points_per_side / downscale_factor**i)) for i in range(n_layers + 1)]


def crop_boxes(height: int, width: int, n_layers: int, overlap_ratio: float) -> tuple[list[list[int]], list[int]]:
    """Crop boxes of every layer, in the order the reference generator visits them.

    Layer 0 is the whole image. Layer ``i >= 1`` tiles the image with ``2**i`` x ``2**i``
    crops that overlap by ``int(overlap_ratio * min(height, width) * 2 / 2**i)`` pixels; each
    crop is ``ceil((overlap * (n - 1) + side) / n)`` pixels long along a side of length
    ``side``, clipped to the image. Within a layer, crops are ordered by x0, then by y0.

    Args:
        height, width: image size in pixels.
        n_layers: number of layers beyond the whole-image layer 0.
        overlap_ratio: overlap as a fraction of the short side, at layer 1 (the reference
            default is 512 / 1500).

    Returns:
        (boxes, layer_indexes): XYXY integer boxes and the layer of each box.
    """
    boxes = [[0, 0, width, height]]
    layers = [0]
    short_side = min(height, width)
    for layer in range(1, n_layers + 1):
        n_per_side = 2**layer
        overlap = int(overlap_ratio * short_side * 2 / n_per_side)
        crop_w = math.ceil((overlap * (n_per_side - 1) + width) / n_per_side)
        crop_h = math.ceil((overlap * (n_per_side - 1) + height) / n_per_side)
        x0s = [(crop_w - overlap) * i for i in range(n_per_side)]
        y0s = [(crop_h - overlap) * i for i in range(n_per_side)]
        for x0 in x0s:
            for y0 in y0s:
                boxes.append([x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)])
                layers.append(layer)
    return boxes, layers
