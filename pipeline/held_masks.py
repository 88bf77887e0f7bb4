"""How a crop's binary masks are held between the filters and NMS: two stacks, one interface.

`DeviceMasks` holds them dense, (N, h, w) bool on the engine's device (a GPU filters there and
only NMS's survivors leave it). `BoxedMasks` holds each one on the host as the pixels of its
tight box, packed eight to a byte: the CPU path makes them from the windows where each mask can
be (`pipeline.upsampling`), so a crop's many candidate masks cost their boxes' bits rather than
a full crop each (before NMS, a 32x32 grid keeps hundreds to a couple of thousand of them).

Both give: `len`, `tight_boxes()` ((N, 4) int64 XYXY, last pixel inclusive, [0, 0, 0, 0] for an
empty mask, as `masks.masks_to_boxes`), `select(index)`, `cpu()`, `full(i)` (the (h, w) bool
mask as numpy), `box_pixels(i)` (its tight box's pixels as numpy) and `concat(stacks)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sam_batch.pipeline.masks import masks_to_boxes


@dataclass
class DeviceMasks:
    """pixels: (N, h, w) bool on the engine's device."""

    pixels: torch.Tensor

    def __len__(self) -> int:
        return len(self.pixels)

    def tight_boxes(self) -> torch.Tensor:
        return masks_to_boxes(self.pixels)

    def select(self, index: torch.Tensor) -> DeviceMasks:
        return DeviceMasks(self.pixels[index])

    def cpu(self) -> DeviceMasks:
        return DeviceMasks(self.pixels.cpu())

    def full(self, i: int) -> np.ndarray:
        """Mask i, (h, w) bool: a view of the stack when it is on the host."""
        return self.pixels[i].cpu().numpy()

    def box_pixels(self, i: int) -> np.ndarray:
        """Mask i within its tight box, (y1 - y0 + 1, x1 - x0 + 1) bool."""
        x0, y0, x1, y1 = (int(v) for v in masks_to_boxes(self.pixels[i][None])[0].tolist())
        return self.pixels[i, y0 : y1 + 1, x0 : x1 + 1].cpu().numpy()

    @classmethod
    def concat(cls, stacks: list[DeviceMasks]) -> DeviceMasks:
        return cls(torch.cat([stack.pixels for stack in stacks]))

    @classmethod
    def empty(cls, hw: tuple[int, int], device: torch.device) -> DeviceMasks:
        return cls(torch.zeros((0, *hw), dtype=torch.bool, device=device))


@dataclass
class BoxedMasks:
    """hw: the crop's (h, w); boxes: (N, 4) int64 XYXY inclusive, in crop pixels; bits[i]: the
    pixels of box i, row-major, packed by `np.packbits` (an empty mask: one False pixel at 0, 0)."""

    hw: tuple[int, int]
    boxes: torch.Tensor
    bits: list[np.ndarray]

    @classmethod
    def from_windows(cls, hw: tuple[int, int], windows: list[tuple[int, int, np.ndarray] | None]) -> BoxedMasks:
        """Masks given as (top row, left column, pixels (rows, cols) bool) of a window outside
        which they are all False, or None for an empty mask."""
        boxes, bits = [], []
        for window in windows:
            box, pixels = _tight(window)
            boxes.append(box)
            bits.append(np.packbits(pixels, axis=None))
        return cls(hw, torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4), bits)

    def __len__(self) -> int:
        return len(self.bits)

    def tight_boxes(self) -> torch.Tensor:
        return self.boxes

    def select(self, index: torch.Tensor) -> BoxedMasks:
        return BoxedMasks(self.hw, self.boxes[index], [self.bits[i] for i in index.tolist()])

    def cpu(self) -> BoxedMasks:
        return self

    def box_pixels(self, i: int) -> np.ndarray:
        """Mask i within its box, (y1 - y0 + 1, x1 - x0 + 1) bool."""
        x0, y0, x1, y1 = self.boxes[i].tolist()
        shape = (y1 - y0 + 1, x1 - x0 + 1)
        return np.unpackbits(self.bits[i], count=shape[0] * shape[1]).reshape(shape).view(bool)

    def full(self, i: int) -> np.ndarray:
        x0, y0, x1, y1 = self.boxes[i].tolist()
        mask = np.zeros(self.hw, dtype=bool)
        mask[y0 : y1 + 1, x0 : x1 + 1] = self.box_pixels(i)
        return mask

    @classmethod
    def concat(cls, stacks: list[BoxedMasks]) -> BoxedMasks:
        return cls(
            stacks[0].hw, torch.cat([stack.boxes for stack in stacks]), [b for stack in stacks for b in stack.bits]
        )


def _tight(window: tuple[int, int, np.ndarray] | None) -> tuple[list[int], np.ndarray]:
    """The tight XYXY box (inclusive) of a window's True pixels, and the pixels within it."""
    if window is None:
        return [0, 0, 0, 0], np.zeros((1, 1), dtype=bool)
    top, left, pixels = window
    rows, cols = np.flatnonzero(pixels.any(1)), np.flatnonzero(pixels.any(0))
    if not len(rows):
        return [0, 0, 0, 0], np.zeros((1, 1), dtype=bool)
    r0, r1, c0, c1 = rows[0], rows[-1], cols[0], cols[-1]
    return [left + c0, top + r0, left + c1, top + r1], pixels[r0 : r1 + 1, c0 : c1 + 1]
