"""A tile's masks as a segmenting actor hands them on: a few flat arrays, each mask's box packed
eight pixels to a byte.

A tile of 60 masks is then a handful of numpy buffers (Ray moves those without pickling each
mask), and its pixels cost their boxes' bits. `pack` and `TileMasks.unpack` are exact inverses:
the scores keep every bit (float64), so the seam merge and the records are what they would be
had the masks never left the actor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sam_batch.pipeline.tiles import SceneMask


@dataclass(frozen=True)
class TileMasks:
    """The masks of one tile, in scene pixels, in the generator's order.

    bits: uint8, every mask's box pixels (row-major, `np.packbits`) one after another;
    offsets: int64 (N + 1,), mask i's bytes are bits[offsets[i]:offsets[i + 1]];
    boxes: int64 (N, 4) XYXY of each mask's box in scene pixels, last pixel inclusive;
    scores: float64 (N, 2) predicted IoU and stability score; points: float64 (N, 2) the prompt's
    xy; crop_boxes: int64 (N, 4) XYXY of the crop that made it; cut: bool (N,) touches an inner
    tile edge; tile: index of the tile in the scene's plan; candidates: the tile's crops as rows
    of the candidates table (`pipeline.candidates.crop_rows`) when the job keeps them, else empty.
    """

    bits: np.ndarray
    offsets: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray
    points: np.ndarray
    crop_boxes: np.ndarray
    cut: np.ndarray
    tile: int
    candidates: tuple[dict, ...] = ()

    def __len__(self) -> int:
        return len(self.boxes)

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays: what the tile costs to hand on."""
        arrays = (self.bits, self.offsets, self.boxes, self.scores, self.points, self.crop_boxes, self.cut)
        return sum(a.nbytes for a in arrays)

    def unpack(self) -> list[SceneMask]:
        """The tile's masks as `SceneMask`s, equal to those `pack` was given."""
        masks = []
        for i, (x0, y0, x1, y1) in enumerate(self.boxes.tolist()):
            height, width = y1 - y0 + 1, x1 - x0 + 1
            packed = self.bits[self.offsets[i] : self.offsets[i + 1]]
            pixels = np.unpackbits(packed, count=height * width).reshape(height, width).view(bool)
            masks.append(
                SceneMask(
                    pixels=pixels,
                    x0=x0,
                    y0=y0,
                    iou=float(self.scores[i, 0]),
                    stability=float(self.scores[i, 1]),
                    point=self.points[i].tolist(),
                    crop_box=self.crop_boxes[i].tolist(),
                    tile=self.tile,
                    cut=bool(self.cut[i]),
                )
            )
        return masks


def pack(masks: list[SceneMask], tile: int, candidates: tuple[dict, ...] = ()) -> TileMasks:
    """The masks of tile `tile` (placed in scene pixels, as `SceneMask`s) as one `TileMasks`,
    with the tile's `candidates` rows."""
    packed = [np.packbits(m.pixels, axis=None) for m in masks]
    offsets = np.zeros(len(masks) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in packed], out=offsets[1:])
    return TileMasks(
        bits=np.concatenate(packed) if packed else np.zeros(0, np.uint8),
        offsets=offsets,
        boxes=np.array([m.box for m in masks], dtype=np.int64).reshape(-1, 4),
        scores=np.array([(m.iou, m.stability) for m in masks], dtype=np.float64).reshape(-1, 2),
        points=np.array([m.point for m in masks], dtype=np.float64).reshape(-1, 2),
        crop_boxes=np.array([m.crop_box for m in masks], dtype=np.int64).reshape(-1, 4),
        cut=np.array([m.cut for m in masks], dtype=bool),
        tile=tile,
        candidates=candidates,
    )
