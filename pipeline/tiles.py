"""Cutting a large image into overlapping tiles, and making one set of objects out of the tiles' masks.

Tiles are `tile_size` pixels a side (smaller only where the image is) and neighbours share at
least `overlap` pixels. Each tile also has a *core*: the cores split every shared strip down
its middle, so they partition the image and every pixel belongs to exactly one core.

The seam rule (`merge_tiles`), applied to the masks of all tiles in image pixels:

1. A mask is *cut* when it touches an edge of its tile that is not an edge of the image: the
   tile saw only part of the object.
2. Duplicates across tiles are removed with box NMS (IoU above `iou_threshold`) between masks
   of different tiles. The copy kept is, in this order of preference: an uncut one, one whose
   box centre lies in its own tile's core (the tile that sees it with the most context on
   every side), the higher predicted IoU. Masks of the same tile never suppress each other
   (automatic mask generation has already run NMS within the tile).
3. A cut mask whose pixels lie mostly (> 50%) inside a kept mask of another tile is a partial
   view of an object seen whole there, and is dropped.
4. The cut masks left are parts of objects larger than the halo lets one tile see. Parts from
   neighbouring tiles that agree where both tiles see the image (pixel IoU over the two
   tiles' shared window >= 0.5) are one object: they are merged into one mask, their union.

The result is one row per object; objects no tile sees whole are stitched from their parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

SAME_OBJECT_IOU = 0.5  # parts of one object agree at least this well where both tiles see it
COVERED_FRACTION = 0.5  # a cut mask this much inside a kept whole mask is a partial copy of it


@dataclass(frozen=True)
class Tile:
    """A window of the image, XYXY in image pixels (end exclusive), and its core (same form)."""

    window: tuple[int, int, int, int]
    core: tuple[int, int, int, int]


def plan_tiles(width: int, height: int, tile_size: int, overlap: int) -> list[Tile]:
    """Tiles in row-major order covering a (height, width) image; one tile when it fits."""
    columns = _axis_spans(width, tile_size, overlap)
    rows = _axis_spans(height, tile_size, overlap)
    return [
        Tile((x0, y0, x1, y1), (cx0, cy0, cx1, cy1))
        for (y0, y1), (cy0, cy1) in rows
        for (x0, x1), (cx0, cx1) in columns
    ]


def _axis_spans(length: int, tile_size: int, overlap: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """((start, end), (core_start, core_end)) along one axis; tiles spread evenly, all full size."""
    if length <= tile_size:
        return [((0, length), (0, length))]
    count = math.ceil((length - overlap) / (tile_size - overlap))
    starts = [round(i * (length - tile_size) / (count - 1)) for i in range(count)]
    ends = [s + tile_size for s in starts]
    cuts = [0] + [(ends[i] + starts[i + 1]) // 2 for i in range(count - 1)] + [length]
    return [((starts[i], ends[i]), (cuts[i], cuts[i + 1])) for i in range(count)]


@dataclass
class SceneMask:
    """One mask in image pixels, held as the bool pixels of its own box.

    pixels: bool (h, w), pixels[0, 0] at image pixel (x0, y0); iou, stability: the model's
    scores; point: the prompt's xy in image pixels; crop_box: XYXY of the crop or tile that
    produced it; tile: index into the tile plan; cut: touches an inner edge of its tile.
    """

    pixels: np.ndarray
    x0: int
    y0: int
    iou: float
    stability: float
    point: list[float]
    crop_box: list[int]
    tile: int = 0
    cut: bool = False
    parts: list[int] = field(default_factory=list)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """XYXY in image pixels, last pixel inclusive (the reference generator's boxes)."""
        height, width = self.pixels.shape
        return self.x0, self.y0, self.x0 + width - 1, self.y0 + height - 1

    @property
    def area(self) -> int:
        return int(self.pixels.sum())


def is_cut(box: tuple[int, int, int, int], window: tuple[int, int, int, int], image_hw: tuple[int, int]) -> bool:
    """Whether an inclusive XYXY box touches an edge of the window that is inside the image."""
    x0, y0, x1, y1 = box
    wx0, wy0, wx1, wy1 = window
    height, width = image_hw
    return (
        (wx0 > 0 and x0 <= wx0)
        or (wy0 > 0 and y0 <= wy0)
        or (wx1 < width and x1 >= wx1 - 1)
        or (wy1 < height and y1 >= wy1 - 1)
    )


def merge_tiles(masks: list[SceneMask], tiles: list[Tile], iou_threshold: float) -> list[SceneMask]:
    """Apply the seam rule of this module to all tiles' masks; returns them in (tile, input) order."""
    if len(tiles) <= 1:
        return masks
    kept = _nms_across_tiles(masks, tiles, iou_threshold)
    whole = [m for m in kept if not m.cut]
    parts = [m for m in kept if m.cut and not _covered_by_other_tile(m, whole)]
    return sorted(whole + _merge_parts(parts, tiles), key=lambda m: (m.tile, m.parts[0] if m.parts else 0))


def _priority(mask: SceneMask, tiles: list[Tile]) -> tuple:
    x0, y0, x1, y1 = mask.box
    cx0, cy0, cx1, cy1 = tiles[mask.tile].core
    centre_x, centre_y = (x0 + x1 + 1) / 2, (y0 + y1 + 1) / 2
    in_core = cx0 <= centre_x < cx1 and cy0 <= centre_y < cy1
    return (mask.cut, not in_core, -mask.iou)


def _nms_across_tiles(masks: list[SceneMask], tiles: list[Tile], iou_threshold: float) -> list[SceneMask]:
    """Greedy box NMS in priority order, where only masks of overlapping, different tiles compete."""
    for index, mask in enumerate(masks):
        mask.parts = [index]
    order = sorted(range(len(masks)), key=lambda i: (_priority(masks[i], tiles), i))
    neighbours = _overlapping_tiles(tiles)
    kept_boxes: dict[int, list[tuple[int, int, int, int]]] = {t: [] for t in range(len(tiles))}
    kept = []
    for i in order:
        mask = masks[i]
        box = np.array(mask.box, dtype=np.float64)
        rivals = [b for t in neighbours[mask.tile] if t != mask.tile for b in kept_boxes[t]]
        if rivals and _box_iou(box, np.array(rivals, dtype=np.float64)).max() > iou_threshold:
            continue
        kept_boxes[mask.tile].append(mask.box)
        kept.append(mask)
    return kept


def _overlapping_tiles(tiles: list[Tile]) -> list[list[int]]:
    """For each tile, the tiles whose windows overlap it (itself included)."""
    windows = np.array([t.window for t in tiles])
    overlaps = (
        (windows[:, None, 0] < windows[None, :, 2])
        & (windows[None, :, 0] < windows[:, None, 2])
        & (windows[:, None, 1] < windows[None, :, 3])
        & (windows[None, :, 1] < windows[:, None, 3])
    )
    return [np.flatnonzero(row).tolist() for row in overlaps]


def _box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one inclusive XYXY box (4,) with each of (N, 4), areas as the reference's NMS counts them."""
    width = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    height = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = width * height
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def _covered_by_other_tile(part: SceneMask, whole: list[SceneMask]) -> bool:
    area = part.area
    return any(
        other.tile != part.tile and _intersection(part, other) > COVERED_FRACTION * area for other in whole
    )


def _intersection(a: SceneMask, b: SceneMask, window: tuple[int, int, int, int] | None = None) -> int:
    """Pixels set in both masks, optionally only inside an XYXY window (end exclusive)."""
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1) + 1, min(ay1, by1) + 1
    if window is not None:
        x0, y0, x1, y1 = max(x0, window[0]), max(y0, window[1]), min(x1, window[2]), min(y1, window[3])
    if x0 >= x1 or y0 >= y1:
        return 0
    return int((_view(a, x0, y0, x1, y1) & _view(b, x0, y0, x1, y1)).sum())


def _view(mask: SceneMask, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    return mask.pixels[y0 - mask.y0 : y1 - mask.y0, x0 - mask.x0 : x1 - mask.x0]


def _count_in(mask: SceneMask, window: tuple[int, int, int, int]) -> int:
    x0, y0, x1, y1 = mask.box
    x0, y0 = max(x0, window[0]), max(y0, window[1])
    x1, y1 = min(x1 + 1, window[2]), min(y1 + 1, window[3])
    return int(_view(mask, x0, y0, x1, y1).sum()) if x0 < x1 and y0 < y1 else 0


def _same_object(a: SceneMask, b: SceneMask, tiles: list[Tile]) -> bool:
    """Parts of two tiles agree (IoU >= SAME_OBJECT_IOU) over the window both tiles see."""
    wa, wb = tiles[a.tile].window, tiles[b.tile].window
    shared = (max(wa[0], wb[0]), max(wa[1], wb[1]), min(wa[2], wb[2]), min(wa[3], wb[3]))
    if shared[0] >= shared[2] or shared[1] >= shared[3]:
        return False
    inter = _intersection(a, b, shared)
    union = _count_in(a, shared) + _count_in(b, shared) - inter
    return union > 0 and inter >= SAME_OBJECT_IOU * union


def _merge_parts(parts: list[SceneMask], tiles: list[Tile]) -> list[SceneMask]:
    """Union the parts that belong to one object (transitively); each group becomes one mask."""
    group = list(range(len(parts)))

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for i, a in enumerate(parts):
        for j in range(i + 1, len(parts)):
            b = parts[j]
            if a.tile != b.tile and _boxes_touch(a.box, b.box) and _same_object(a, b, tiles):
                group[root(j)] = root(i)
    groups: dict[int, list[SceneMask]] = {}
    for i, part in enumerate(parts):
        groups.setdefault(root(i), []).append(part)
    return [_union(members, tiles) for members in groups.values()]


def _boxes_touch(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def _union(members: list[SceneMask], tiles: list[Tile]) -> SceneMask:
    """One mask from the parts of one object; scores, prompt and tile of its largest part.

    crop_box becomes the XYXY hull of the parts' tile windows.
    """
    if len(members) == 1:
        return members[0]
    largest = max(members, key=lambda m: (m.area, -m.tile))
    boxes = np.array([m.box for m in members])
    x0, y0 = boxes[:, :2].min(axis=0)
    x1, y1 = boxes[:, 2:].max(axis=0) + 1
    pixels = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    for m in members:
        height, width = m.pixels.shape
        pixels[m.y0 - y0 : m.y0 - y0 + height, m.x0 - x0 : m.x0 - x0 + width] |= m.pixels
    windows = np.array([tiles[m.tile].window for m in members])
    hull = [int(windows[:, 0].min()), int(windows[:, 1].min()), int(windows[:, 2].max()), int(windows[:, 3].max())]
    first = min(members, key=lambda m: (m.tile, m.parts[0]))
    return replace(
        largest,
        pixels=pixels,
        x0=int(x0),
        y0=int(y0),
        crop_box=hull,
        tile=first.tile,
        parts=sorted(i for m in members for i in m.parts),
    )

