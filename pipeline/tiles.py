"""Cutting a large image into overlapping tiles, and making one set of objects out of the tiles' masks.

Tiles are `tile_size` pixels a side (smaller only where the image is) and neighbours share at
least `overlap` pixels. Each tile also has a *core*: the cores split every shared strip down
its middle, so they partition the image and every pixel belongs to exactly one core.

The seam rule (`merge_tiles`), applied to the masks of all tiles in image pixels:

1. A mask is *cut* when it touches an edge of its tile that is not an edge of the image: the
   tile saw only part of the object.
2. Duplicates across tiles are removed by greedy NMS between masks of different tiles: a mask
   is dropped when a kept mask of another tile has a box IoU above `iou_threshold` or a mask
   (pixel) IoU above `DUPLICATE_MASK_IOU` with it — box IoU alone lets the same object survive
   twice when one copy's box is stretched by a few pixels the other does not hold. Mask IoU,
   not intersection over the smaller mask, so that a part and the whole it belongs to (SAM's
   nested masks, which NMS within a tile keeps) are not taken for one object. The copy kept is,
   in this order of preference: an uncut one, one whose box centre lies in its own tile's core
   (the tile that sees it with the most context on every side), the higher predicted IoU. Masks
   of the same tile never suppress each other (automatic mask generation has already run NMS
   within the tile).
3. A cut mask whose pixels lie mostly (> 50%) inside a kept mask of another tile is a partial
   view of an object seen whole there, and is dropped.
4. The cut masks left are parts of objects larger than the halo lets one tile see. Parts from
   neighbouring tiles that agree where both tiles see the image (pixel IoU over the two
   tiles' shared window >= 0.5) are one object: they are merged into one mask, their union.

The result is one row per object; objects no tile sees whole are stitched from their parts.

Every rule compares only masks of different tiles whose boxes share a pixel, and a mask lies
inside its tile's window, so the pairs compared are found tile pair by tile pair (neighbouring
windows, through a grid) among the masks on the pair's shared strip: time and memory grow with
the number of masks, not its square. Masks are held as their boxes' bits packed along rows
(`np.packbits`), 1 bit a pixel.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from itertools import combinations

import numpy as np

SAME_OBJECT_IOU = 0.5  # parts of one object agree at least this well where both tiles see it
COVERED_FRACTION = 0.5  # a cut mask this much inside a kept whole mask is a partial copy of it
DUPLICATE_MASK_IOU = 0.5  # masks of two tiles overlapping more than this (pixel IoU) are one object


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


class SceneMask:
    """One mask in image pixels, held as the bits of its own box packed along rows.

    pixels: bool (h, w), pixels[0, 0] at image pixel (x0, y0) — a new array at each read,
    packed again when assigned; bits: uint8 (h, ceil(w / 8)), `np.packbits(pixels, axis=1)`;
    iou, stability: the model's scores; point: the prompt's xy in image pixels; crop_box: XYXY
    of the crop or tile that produced it; tile: index into the tile plan; cut: touches an inner
    edge of its tile; parts: indexes, into `merge_tiles`'s input, of the masks it stands for.
    """

    __slots__ = (
        "bits",
        "width",
        "height",
        "_area",
        "x0",
        "y0",
        "iou",
        "stability",
        "point",
        "crop_box",
        "tile",
        "cut",
        "parts",
    )

    def __init__(
        self,
        pixels: np.ndarray,
        x0: int,
        y0: int,
        iou: float,
        stability: float,
        point: list[float],
        crop_box: list[int],
        tile: int = 0,
        cut: bool = False,
        parts: list[int] | None = None,
    ) -> None:
        self.pixels = pixels
        self.x0, self.y0 = x0, y0
        self.iou, self.stability = iou, stability
        self.point, self.crop_box = point, crop_box
        self.tile, self.cut = tile, cut
        self.parts = [] if parts is None else parts

    @classmethod
    def from_bits(
        cls,
        bits: np.ndarray,
        width: int,
        x0: int,
        y0: int,
        scored: SceneMask,
        crop_box: list[int],
        tile: int,
        parts: list[int],
    ) -> SceneMask:
        """A mask whose box's rows are already packed: bits uint8 (h, ceil(width / 8)) as
        `np.packbits(pixels, axis=1)` makes them (padding bits 0), at image pixel (x0, y0); its
        scores, prompt and `cut` those of `scored`."""
        mask = cls.__new__(cls)
        mask.bits, mask.height, mask.width = bits, len(bits), width
        mask._area = int(np.count_nonzero(np.unpackbits(bits)))
        mask.x0, mask.y0 = x0, y0
        mask.iou, mask.stability, mask.point, mask.cut = scored.iou, scored.stability, scored.point, scored.cut
        mask.crop_box, mask.tile, mask.parts = crop_box, tile, parts
        return mask

    @property
    def pixels(self) -> np.ndarray:
        return np.unpackbits(self.bits, axis=1, count=self.width).view(bool)

    @pixels.setter
    def pixels(self, pixels: np.ndarray) -> None:
        pixels = np.asarray(pixels, dtype=bool)
        self.bits = np.packbits(pixels, axis=1)
        self.height, self.width = pixels.shape
        self._area = int(np.count_nonzero(pixels))

    @property
    def box(self) -> tuple[int, int, int, int]:
        """XYXY in image pixels, last pixel inclusive (the reference generator's boxes)."""
        return self.x0, self.y0, self.x0 + self.width - 1, self.y0 + self.height - 1

    @property
    def area(self) -> int:
        return self._area

    def __repr__(self) -> str:
        return f"SceneMask(box={self.box}, area={self.area}, tile={self.tile}, cut={self.cut}, iou={self.iou})"


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
    """Apply the seam rule of this module to all tiles' masks; returns them in (tile, input) order.

    Each mask must lie inside its tile's window; iou_threshold in [0, 1]. Sets every input
    mask's `parts` to [its index].
    """
    if len(tiles) <= 1:
        return masks
    for index, mask in enumerate(masks):
        mask.parts = [index]
    field = functools.partial(_field, masks)
    x0, y0 = field("x0"), field("y0")
    boxes = np.stack([x0, y0, x0 + field("width") - 1, y0 + field("height") - 1], axis=1)
    tile_of, cut, areas = field("tile"), field("cut", bool), field("_area")
    overlaps = _Overlaps(masks, boxes, areas, _touching_pairs(boxes, tile_of, tiles))
    order = _priority_order(masks, boxes, tile_of, cut, tiles)
    kept = _nms_across_tiles(order, boxes, overlaps, iou_threshold)
    is_part = kept & cut & ~_covered_by_other_tile(kept, cut, overlaps)
    rank = np.empty(len(masks), dtype=np.int64)
    rank[order] = np.arange(len(masks))
    whole = [masks[i] for i in np.flatnonzero(kept & ~cut)]
    part_pairs = overlaps.pairs[is_part[overlaps.pairs].all(axis=1)]
    stitched = _merge_parts(masks, np.flatnonzero(is_part), rank, part_pairs, tiles)
    return sorted(whole + stitched, key=lambda m: (m.tile, m.parts[0]))


def _field(masks: list[SceneMask], name: str, dtype: type = np.int64) -> np.ndarray:
    """(N,) one attribute of every mask."""
    return np.fromiter((getattr(m, name) for m in masks), dtype=dtype, count=len(masks))


def _priority_order(
    masks: list[SceneMask], boxes: np.ndarray, tile_of: np.ndarray, cut: np.ndarray, tiles: list[Tile]
) -> np.ndarray:
    """Mask indexes, most preferred first: uncut, box centre in its tile's core, higher IoU, input order."""
    cores = np.array([t.core for t in tiles], dtype=np.int64)[tile_of]
    centre_x, centre_y = (boxes[:, 0] + boxes[:, 2] + 1) / 2, (boxes[:, 1] + boxes[:, 3] + 1) / 2
    in_core = (
        (cores[:, 0] <= centre_x) & (centre_x < cores[:, 2]) & (cores[:, 1] <= centre_y) & (centre_y < cores[:, 3])
    )
    iou = np.array([m.iou for m in masks], dtype=np.float64)
    return np.lexsort((np.arange(len(masks)), -iou, ~in_core, cut))


class _Overlaps:
    """The pairs the seam rule compares, with the pixels each pair holds in both masks, counted
    only for the pairs a rule asks about.

    pairs: (P, 2) mask indexes, first < second (see `_touching_pairs`); areas: (P, 2) each
    mask's pixels; most: (P,) a bound on the pixels in both, the smaller area or the size of the
    boxes' intersection: a rule that no count up to it can meet is decided without counting.
    """

    def __init__(self, masks: list[SceneMask], boxes: np.ndarray, areas: np.ndarray, pairs: np.ndarray) -> None:
        self.masks, self.pairs = masks, pairs
        first, second = boxes[pairs[:, 0]], boxes[pairs[:, 1]]
        self.windows = np.concatenate(
            [np.maximum(first[:, :2], second[:, :2]), np.minimum(first[:, 2:], second[:, 2:]) + 1], axis=1
        )
        self.areas = areas[pairs].reshape(-1, 2)
        window_size = (self.windows[:, 2] - self.windows[:, 0]) * (self.windows[:, 3] - self.windows[:, 1])
        self.most = np.minimum(self.areas.min(axis=1), window_size)
        self._shared = np.full(len(pairs), -1, dtype=np.int64)

    def shared(self, asked: np.ndarray) -> np.ndarray:
        """(P,) pixels in both masks, counted where `asked` (bool (P,)); -1 where never asked."""
        for p in np.flatnonzero(asked & (self._shared < 0)).tolist():
            i, j = self.pairs[p]
            self._shared[p] = _pixels_in_both(self.masks[i], self.masks[j], *self.windows[p].tolist())
        return self._shared


def _touching_pairs(boxes: np.ndarray, tile_of: np.ndarray, tiles: list[Tile]) -> np.ndarray:
    """(P, 2) index pairs, first < second, of masks of different tiles whose inclusive XYXY boxes
    share a pixel: for each pair of overlapping tiles, the masks of each on their shared strip."""
    by_tile = np.argsort(tile_of, kind="stable")
    starts = np.searchsorted(tile_of[by_tile], np.arange(len(tiles) + 1))
    found = []
    for t, u in _overlapping_tiles(tiles):
        sx0, sy0, sx1, sy1 = _shared_window(tiles[t], tiles[u])
        sides = []
        for tile in (t, u):
            members = by_tile[starts[tile] : starts[tile + 1]]
            b = boxes[members]
            sides.append(members[(b[:, 0] < sx1) & (b[:, 2] >= sx0) & (b[:, 1] < sy1) & (b[:, 3] >= sy0)])
        a, b = boxes[sides[0]], boxes[sides[1]]
        touch = (
            (a[:, None, 0] <= b[None, :, 2])
            & (b[None, :, 0] <= a[:, None, 2])
            & (a[:, None, 1] <= b[None, :, 3])
            & (b[None, :, 1] <= a[:, None, 3])
        )
        rows, columns = np.nonzero(touch)
        found.append(np.stack([sides[0][rows], sides[1][columns]], axis=1))
    pairs = np.concatenate(found) if found else np.empty((0, 2), dtype=np.int64)
    return np.sort(pairs, axis=1)


def _shared_window(a: Tile, b: Tile) -> tuple[int, int, int, int]:
    """The XYXY window (end exclusive) two overlapping tiles both see."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.window, b.window
    return max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)


def _overlapping_tiles(tiles: list[Tile]) -> list[tuple[int, int]]:
    """Pairs (t, u), t < u, of tiles whose windows overlap, looked for among the tiles that
    share a cell of a grid as coarse as the largest window."""
    windows = [t.window for t in tiles]
    cell = max(max(x1 - x0, y1 - y0) for x0, y0, x1, y1 in windows)
    grid: dict[tuple[int, int], list[int]] = {}
    for index, (x0, y0, x1, y1) in enumerate(windows):
        for column in range(x0 // cell, (x1 - 1) // cell + 1):
            for row in range(y0 // cell, (y1 - 1) // cell + 1):
                grid.setdefault((column, row), []).append(index)
    pairs = {
        (t, u)
        for members in grid.values()
        for t, u in combinations(members, 2)
        if windows[t][0] < windows[u][2]
        and windows[u][0] < windows[t][2]
        and windows[t][1] < windows[u][3]
        and windows[u][1] < windows[t][3]
    }
    return sorted(pairs)


def _nms_across_tiles(order: np.ndarray, boxes: np.ndarray, overlaps: _Overlaps, iou_threshold: float) -> np.ndarray:
    """Greedy NMS in priority order over the touching pairs: a mask is dropped when a kept mask of
    another tile has box IoU above `iou_threshold` or mask IoU above `DUPLICATE_MASK_IOU` with it.

    Returns bool (N,): kept.
    """
    pairs, areas, most = overlaps.pairs, overlaps.areas, overlaps.most
    first, second = boxes[pairs[:, 0]].astype(np.float64), boxes[pairs[:, 1]].astype(np.float64)
    box_duplicate = _box_iou(first, second) > iou_threshold
    asked = ~box_duplicate & (most > DUPLICATE_MASK_IOU * (areas.sum(axis=1) - most))
    shared = overlaps.shared(asked)
    duplicate = box_duplicate | (asked & (shared > DUPLICATE_MASK_IOU * np.maximum(areas.sum(axis=1) - shared, 1)))
    rivals: dict[int, list[int]] = {}
    for i, j in pairs[duplicate].tolist():
        rivals.setdefault(i, []).append(j)
        rivals.setdefault(j, []).append(i)
    kept = np.zeros(len(boxes), dtype=bool)
    for i in order.tolist():
        kept[i] = not any(kept[j] for j in rivals.get(i, ()))
    return kept


def _box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of inclusive XYXY boxes, row by row of two (P, 4), areas as the reference's NMS counts them."""
    width = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    height = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = width * height
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(area_a + area_b - inter, 1e-9)


def _covered_by_other_tile(kept: np.ndarray, cut: np.ndarray, overlaps: _Overlaps) -> np.ndarray:
    """bool (N,): cut masks with more than `COVERED_FRACTION` of their pixels inside one kept
    uncut mask of another tile."""
    covered = np.zeros(len(kept), dtype=bool)
    for side in (0, 1):
        part, whole = overlaps.pairs[:, side], overlaps.pairs[:, 1 - side]
        bar = COVERED_FRACTION * overlaps.areas[:, side]
        asked = kept[part] & cut[part] & kept[whole] & ~cut[whole] & (overlaps.most > bar)
        covered[part[asked & (overlaps.shared(asked) > bar)]] = True
    return covered


def _pixels_in_both(a: SceneMask, b: SceneMask, x0: int, y0: int, x1: int, y1: int) -> int:
    """Pixels set in both masks over an XYXY window (end exclusive) inside both boxes."""
    return int(np.count_nonzero(_view(a, x0, y0, x1, y1) & _view(b, x0, y0, x1, y1)))


def _view(mask: SceneMask, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """The mask's bool pixels over an XYXY window of its box (end exclusive), unpacked."""
    left, right = x0 - mask.x0, x1 - mask.x0
    first_byte = left // 8
    rows = mask.bits[y0 - mask.y0 : y1 - mask.y0, first_byte : (right + 7) // 8]
    return np.unpackbits(rows, axis=1)[:, left - 8 * first_byte : right - 8 * first_byte].view(bool)


class _PartsAgree:
    """Step 4's test, `agree(i, j)`: masks i and j, parts from two tiles, agree (IoU >=
    `SAME_OBJECT_IOU`) over the window both tiles see.

    Asked pair after pair of one pair of tiles (as `_touching_pairs` lists them), it unpacks each
    part's pixels on that pair's shared window once, and forgets them at the next pair of tiles.
    """

    def __init__(self, masks: list[SceneMask], tiles: list[Tile]) -> None:
        self.masks, self.tiles = masks, tiles
        self._tile_pair: tuple[int, int] | None = None
        self._on_strip: dict[int, tuple[tuple[int, int, int, int], np.ndarray, int] | None] = {}

    def __call__(self, i: int, j: int) -> bool:
        tile_pair = (min(self.masks[i].tile, self.masks[j].tile), max(self.masks[i].tile, self.masks[j].tile))
        if tile_pair != self._tile_pair:
            self._tile_pair, self._on_strip = tile_pair, {}
        a, b = self._pixels_on_strip(i, j), self._pixels_on_strip(j, i)
        if a is None or b is None:
            return False  # no pixel in both: IoU 0
        (ax0, ay0, ax1, ay1), pixels_a, count_a = a
        (bx0, by0, bx1, by1), pixels_b, count_b = b
        if min(count_a, count_b) < SAME_OBJECT_IOU * max(count_a, count_b):
            return False  # IoU <= the smaller count over the larger
        x0, y0, x1, y1 = max(ax0, bx0), max(ay0, by0), min(ax1, bx1), min(ay1, by1)
        if x0 >= x1 or y0 >= y1:
            return False
        inter = int(
            np.count_nonzero(
                pixels_a[y0 - ay0 : y1 - ay0, x0 - ax0 : x1 - ax0] & pixels_b[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
            )
        )
        union = count_a + count_b - inter
        return union > 0 and inter >= SAME_OBJECT_IOU * union

    def _pixels_on_strip(self, i: int, j: int) -> tuple[tuple[int, int, int, int], np.ndarray, int] | None:
        """Mask i's box cut to the window its tile shares with mask j's (XYXY, end exclusive),
        its bool pixels there and their count; None where its box misses that window."""
        if i not in self._on_strip:
            mask = self.masks[i]
            inside = _clip(mask.box, _shared_window(self.tiles[mask.tile], self.tiles[self.masks[j].tile]))
            if inside is None:
                self._on_strip[i] = None
            else:
                pixels = _view(mask, *inside)
                self._on_strip[i] = (inside, pixels, int(np.count_nonzero(pixels)))
        return self._on_strip[i]


def _clip(box: tuple[int, int, int, int], window: tuple[int, int, int, int]) -> tuple[int, int, int, int] | None:
    """An inclusive XYXY box cut to an XYXY window (end exclusive), end exclusive; None if nothing is left."""
    x0, y0 = max(box[0], window[0]), max(box[1], window[1])
    x1, y1 = min(box[2] + 1, window[2]), min(box[3] + 1, window[3])
    return (x0, y0, x1, y1) if x0 < x1 and y0 < y1 else None


def _merge_parts(
    masks: list[SceneMask], parts: np.ndarray, rank: np.ndarray, pairs: np.ndarray, tiles: list[Tile]
) -> list[SceneMask]:
    """Union the parts that belong to one object (transitively, over the touching `pairs` that
    agree); each group becomes one mask, its members taken in priority `rank`."""
    group = {int(i): int(i) for i in parts}

    def root(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    agree = _PartsAgree(masks, tiles)
    for i, j in pairs.tolist():
        if root(i) != root(j) and agree(i, j):
            group[root(j)] = root(i)
    groups: dict[int, list[SceneMask]] = {}
    for i in sorted(group, key=lambda i: rank[i]):
        groups.setdefault(root(i), []).append(masks[i])
    return [_union(members, tiles) for members in groups.values()]


def _union(members: list[SceneMask], tiles: list[Tile]) -> SceneMask:
    """One mask from the parts of one object; scores, prompt and tile of its largest part.

    crop_box becomes the XYXY hull of the parts' tile windows. The parts' bits are shifted into
    the union's packed rows, never unpacked.
    """
    if len(members) == 1:
        return members[0]
    largest = max(members, key=lambda m: (m.area, -m.tile))
    x0, y0 = min(m.x0 for m in members), min(m.y0 for m in members)
    x1, y1 = max(m.x0 + m.width for m in members), max(m.y0 + m.height for m in members)
    bits = np.zeros((y1 - y0, (x1 - x0 + 7) // 8 + 1), dtype=np.uint8)  # a spare byte for the shifts
    for m in members:
        rows, (byte, shift) = bits[m.y0 - y0 : m.y0 - y0 + m.height], divmod(m.x0 - x0, 8)
        width = m.bits.shape[1]
        if shift:
            rows[:, byte : byte + width] |= m.bits >> shift
            rows[:, byte + 1 : byte + 1 + width] |= m.bits << (8 - shift)
        else:
            rows[:, byte : byte + width] |= m.bits
    windows = [tiles[m.tile].window for m in members]
    hull = [
        min(w[0] for w in windows),
        min(w[1] for w in windows),
        max(w[2] for w in windows),
        max(w[3] for w in windows),
    ]
    first = min(members, key=lambda m: (m.tile, m.parts[0]))
    return SceneMask.from_bits(
        np.ascontiguousarray(bits[:, :-1]),
        x1 - x0,
        x0,
        y0,
        largest,
        hull,
        first.tile,
        sorted(i for m in members for i in m.parts),
    )
