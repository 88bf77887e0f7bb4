"""SAM's upsampling of low-resolution mask logits to crop pixels, computed only where a mask can be.

The reference brings each 256x256 logit map to the 1024 input frame (bilinear), cuts the
padding and resizes the rest to the crop (bilinear again), all before it counts pixels for the
stability score. Both resizes are linear along each axis, so together they are one banded
matrix per axis, A_y (h, 256) and A_x (w, 256), and the crop-size logits are A_y L A_x^T.
Each of their rows is a convex combination of low-res logits, so a crop pixel can exceed a
threshold t only if a low-res logit in its support does. `MaskUpsampler.logits_above` computes
just the window of crop pixels whose support meets the low-res logits above t: everything the
stability score (thresholds t ± offset) and the binary mask (t) count. Outside it no pixel
passes any of them.

For the CPU, where the work is per pixel: on a GPU the batched `engines.backend.upscale_logits`
is the faster way to the same logits (equal to rounding: the composed matrix sums the same
terms in another order).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

LOW_RES = 256  # side of the decoder's logit maps
FRAME = 1024  # side of the model's input frame


@dataclass(frozen=True)
class Window:
    """Crop pixels rows[0]:rows[1], cols[0]:cols[1] (end exclusive)."""

    rows: tuple[int, int]
    cols: tuple[int, int]

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(*self.rows), slice(*self.cols)


class MaskUpsampler:
    """Low-res logits (256, 256) of one crop -> logits at the crop's size, within a window.

    input_hw: the crop's size in the input frame (longest side 1024, before padding);
    crop_hw: its size in original pixels.
    """

    def __init__(self, input_hw: tuple[int, int], crop_hw: tuple[int, int]) -> None:
        self.crop_hw = crop_hw
        self.row_map = _AxisMap(input_hw[0], crop_hw[0])
        self.col_map = _AxisMap(input_hw[1], crop_hw[1])

    def logits_above(self, low_res: torch.Tensor, threshold: float) -> tuple[Window, torch.Tensor] | None:
        """The window of crop pixels that can exceed `threshold`, and their logits (rows, cols).

        None when no low-res logit exceeds it (then no crop pixel does either).
        """
        active_rows = torch.nonzero(low_res.amax(1) > threshold)[:, 0]  # rows holding a logit above it
        if not len(active_rows):
            return None
        active_cols = torch.nonzero(low_res.amax(0) > threshold)[:, 0]
        rows = self.row_map.window(int(active_rows[0]), int(active_rows[-1]))
        cols = self.col_map.window(int(active_cols[0]), int(active_cols[-1]))
        if rows is None or cols is None:
            return None
        (y0, y1), (r0, r1) = rows
        (x0, x1), (c0, c1) = cols
        along_cols = self.col_map.apply((x0, x1), c0, low_res[r0:r1, c0:c1].T)  # (x1 - x0, r1 - r0)
        logits = self.row_map.apply((y0, y1), r0, along_cols.T)
        return Window((y0, y1), (x0, x1)), logits


BLOCK = 128  # crop pixels per block of `_AxisMap.apply`


class _AxisMap:
    """Both resizes along one axis: `matrix` (crop_len, 256), float32, with the support of each row.

    A crop pixel's support is the 2-4 low-res indexes its row of the matrix weighs; it moves
    monotonically along the axis, so a block of `BLOCK` pixels uses a short contiguous span.
    """

    def __init__(self, input_len: int, crop_len: int) -> None:
        to_frame = bilinear_matrix(LOW_RES, FRAME)[:input_len]  # (input_len, 256), the padding cut off
        composed = bilinear_matrix(input_len, crop_len) @ to_frame
        nonzero = composed != 0
        self.first = torch.from_numpy(nonzero.argmax(1))  # first low-res index each crop pixel uses
        self.last = torch.from_numpy(LOW_RES - 1 - nonzero[:, ::-1].argmax(1))  # and its last
        self.matrix = torch.from_numpy(composed.astype(np.float32))

    def window(self, lo: int, hi: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """Crop pixels whose support meets low-res indexes lo..hi, and the low-res span they use.

        Supports move monotonically along the axis, so both are ranges: ((start, end), (first, end)).
        """
        start = int(torch.searchsorted(self.last, lo))  # first pixel whose support reaches lo
        end = int(torch.searchsorted(self.first, hi, right=True))  # past the last one starting at or before hi
        if start >= end:
            return None
        return (start, end), (int(self.first[start]), int(self.last[end - 1]) + 1)

    def apply(self, pixels: tuple[int, int], first: int, values: torch.Tensor) -> torch.Tensor:
        """`matrix[start:end, first:first + n] @ values` for `values` (n, k) whose rows are the
        low-res indexes from `first` on (covering the pixels' supports): (end - start, k).

        Block by block, each over its own span only: the same products as the dense one with
        its zero terms left out, about a tenth of the arithmetic on a 1024-pixel axis.
        """
        start, end = pixels
        out = values.new_empty((end - start, values.shape[1]))
        for block in range(start, end, BLOCK):
            stop = min(block + BLOCK, end)
            lo, hi = int(self.first[block]), int(self.last[stop - 1]) + 1
            torch.mm(
                self.matrix[block:stop, lo:hi], values[lo - first : hi - first], out=out[block - start : stop - start]
            )
        return out


def bilinear_matrix(in_len: int, out_len: int) -> np.ndarray:
    """(out_len, in_len) float64: PyTorch's bilinear resize along one axis (align_corners=False).

    Source position of output i: (i + 0.5) * in_len / out_len - 0.5, clamped at 0, as
    `torch.nn.functional.interpolate` computes it for float32 (a float32 scale, then one fused
    multiply-add rounded once to float32).
    """
    scale = np.float64(np.float32(in_len) / np.float32(out_len))
    src = np.maximum((scale * (np.arange(out_len) + 0.5) - 0.5).astype(np.float32), 0)
    low = src.astype(np.int64)
    high = np.minimum(low + 1, in_len - 1)
    frac = (src - low).astype(np.float64)
    matrix = np.zeros((out_len, in_len))
    rows = np.arange(out_len)
    np.add.at(matrix, (rows, low), 1 - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix
