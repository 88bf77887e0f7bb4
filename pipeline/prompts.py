"""Prompted segmentation: SAM's predictor (a box, points, or both) over a scene, window by window.

A `Prompt` is one row of a prompts table, checked on its own (`check_prompt`) and, once its
image's header is known, against the image (`in_image_pixels`: map coordinates brought to
pixels, then inside the image). `plan_windows` decides where each prompt is segmented:

1. an image no larger than `tile_size` either way is one window: the predictor on the whole
   image, as `SamPredictor.set_image` + `predict` do it;
2. otherwise a prompt goes to the first tile of the scene's tile plan (`tiles.plan_tiles`, in
   row-major order) that holds its extent (the box, or the points' bounds) grown by `margin`
   pixels; prompts in one tile share its encoding;
3. a prompt that no tile holds is segmented in a `tile_size` window centred on its extent,
   clipped to the scene (prompts with the same such window share it);
4. an extent grown by the margin that is larger than `tile_size` is segmented in a window
   around it read decimated by the smallest whole factor that makes it fit (`step`); its
   logits are brought back to the window's full resolution.

`plan_prompts` does this from the image's header (`plan_prompted_scene` also gives the scene
plan whose tiles are the windows, which the executors read as tiles); `segment_window` runs
the model on one window once and decodes its prompts in batches of the same shape (points
count, box or not, multimask), since SAM's predictor pads a prompt without a box with one
"not a point" token and a batch must share its token count; `segment_prompts` does every
window of an image in this process. Each prompt gives one
mask (`multimask` off) or three, and with `best_only` the one of the three with the highest
predicted IoU. No threshold, stability filter or NMS applies: each mask is what was asked for.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sam_batch.pipeline.rasters import Scene, Window
from sam_batch.pipeline.tiles import SceneMask, Tile, plan_tiles

if TYPE_CHECKING:
    from sam_batch.pipeline.amg import Check, Engine
    from sam_batch.pipeline.scenes import ScenePlan

# prompts decoded in one call of the predictor's decoder (memory: about 24 MiB each at fp32)
PROMPTS_PER_CALL = 64
STABILITY_OFFSET = 1.0  # the reference generator's default: the score is written, never filtered on
UPSCALE_CHUNK = 16  # masks brought to full size at once on a device: bounds memory, not results


@dataclass(frozen=True)
class Prompt:
    """One prompt of a prompts table.

    prompt_id: the table's, or derived from the row (`jobs.prompt_table`); box: XYXY; points:
    xy each, with labels 1 (foreground) or 0 (background); coordinates in image pixels, or in
    `crs` units when `crs` is set ('EPSG:code' or WKT). multimask: three masks rather than one.
    carried: the values of the job's `prompts.carry` columns, in that order. error: why the
    prompt cannot be segmented, when known from the row alone.
    """

    prompt_id: str
    box: tuple[float, float, float, float] | None
    points: tuple[tuple[float, float], ...]
    labels: tuple[int, ...]
    multimask: bool
    crs: str | None = None
    carried: tuple = ()
    error: str | None = None

    def extent(self) -> tuple[float, float, float, float]:
        """XYXY bounds of the box and the points together."""
        xs = [x for x, _ in self.points] + ([self.box[0], self.box[2]] if self.box else [])
        ys = [y for _, y in self.points] + ([self.box[1], self.box[3]] if self.box else [])
        return min(xs), min(ys), max(xs), max(ys)


def check_prompt(prompt: Prompt) -> str | None:
    """Why a prompt is unusable on its own (None: it is usable): no box and no point, a box
    that is not four finite numbers with x0 <= x1 and y0 <= y1, a point that is not finite,
    labels other than 0 and 1 or not one per point."""
    if prompt.box is None and not prompt.points:
        return "has neither a box nor points"
    if prompt.box is not None:
        if len(prompt.box) != 4 or not all(math.isfinite(v) for v in prompt.box):
            return f"box {list(prompt.box)} is not four finite numbers"
        x0, y0, x1, y1 = prompt.box
        if x1 < x0 or y1 < y0:
            return f"box {list(prompt.box)} has x1 < x0 or y1 < y0 (boxes are x0, y0, x1, y1)"
    if any(len(p) != 2 or not all(math.isfinite(v) for v in p) for p in prompt.points):
        return f"points {[list(p) for p in prompt.points]} are not finite x, y pairs"
    if len(prompt.labels) != len(prompt.points):
        return f"has {len(prompt.points)} points but {len(prompt.labels)} point_labels"
    if any(label not in (0, 1) for label in prompt.labels):
        return f"point_labels {list(prompt.labels)} hold a value other than 1 (foreground) or 0 (background)"
    return None


def unusable_prompts(prompts: list[Prompt]) -> str | None:
    """The images row's error of an image none of whose prompts can be segmented (it is then
    never read); None when one can."""
    if any(p.error is None for p in prompts):
        return None
    return f"prompts: none can be segmented ({len(prompts)}); {prompts[0].prompt_id!r} {prompts[0].error}"


def in_image_pixels(prompt: Prompt, width: int, height: int, crs, transform) -> Prompt:
    """The prompt in the pixels of a (height, width) image whose georeferencing is `crs` and
    `transform` (rasterio's; None for an image without), with `error` set where it cannot be
    segmented there: map coordinates on an image without georeferencing, a box that does not
    overlap the image, a point outside it."""
    if prompt.error is not None:
        return prompt
    if prompt.crs is not None:
        if crs is None or transform is None:
            return dataclasses.replace(prompt, error="has map coordinates, but the image is not georeferenced")
        prompt = _to_pixels(prompt, crs, transform)
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
            box = [round(v, 3) for v in prompt.box]
            return dataclasses.replace(prompt, error=f"box {box} lies outside the {width}x{height} image")
    for x, y in prompt.points:
        if not (0 <= x < width and 0 <= y < height):
            point = [round(x, 3), round(y, 3)]
            return dataclasses.replace(prompt, error=f"point {point} lies outside the {width}x{height} image")
    return prompt


def _to_pixels(prompt: Prompt, crs, transform) -> Prompt:
    """A prompt in map coordinates (its `crs`) → the image's pixels: reprojected to the image's
    CRS where they differ, then through the inverse affine. A box goes by its two corners, and
    its pixel box is the bounds of their images (a north-up raster flips y)."""
    from rasterio.crs import CRS
    from rasterio.warp import transform as reproject_points

    xs = [x for x, _ in prompt.points] + ([prompt.box[0], prompt.box[2]] if prompt.box else [])
    ys = [y for _, y in prompt.points] + ([prompt.box[1], prompt.box[3]] if prompt.box else [])
    source = CRS.from_user_input(prompt.crs)
    if source != crs:
        xs, ys = reproject_points(source, crs, xs, ys)
    inverse = ~transform
    pixels = [inverse @ (x, y) for x, y in zip(xs, ys)]
    n = len(prompt.points)
    box = None
    if prompt.box is not None:
        (ax, ay), (bx, by) = pixels[n], pixels[n + 1]
        box = (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))
    return dataclasses.replace(prompt, box=box, points=tuple(pixels[:n]), crs=None)


@dataclass(frozen=True)
class PromptWindow:
    """Where some prompts are segmented: window XYXY in scene pixels (end exclusive), read
    decimated by `step` (1: full resolution); prompts: indexes into the image's prompts."""

    window: Window
    step: int
    prompts: tuple[int, ...]


def plan_windows(
    extents: list[tuple[float, float, float, float]],
    width: int,
    height: int,
    tile_size: int,
    overlap: int,
    margin: int,
) -> list[PromptWindow]:
    """The windows that segment prompts whose extents (XYXY image pixels) are `extents`, by the
    module's rule, in the order of their first prompt."""
    if width <= tile_size and height <= tile_size:
        return [PromptWindow((0, 0, width, height), 1, tuple(range(len(extents))))]
    tiles = [tile.window for tile in plan_tiles(width, height, tile_size, overlap)]
    by_window: dict[tuple[Window, int], list[int]] = {}
    for index, extent in enumerate(extents):
        grown = _grown(extent, margin, width, height)
        key = next(((tile, 1) for tile in tiles if _holds(tile, grown)), None)
        if key is None:
            key = _centred_window(grown, width, height, tile_size)
        by_window.setdefault(key, []).append(index)
    return [PromptWindow(window, step, tuple(indexes)) for (window, step), indexes in by_window.items()]


def _grown(extent: tuple[float, float, float, float], margin: int, width: int, height: int) -> Window:
    """An extent grown by `margin` px each way, on whole pixels, clipped to the image."""
    x0, y0, x1, y1 = extent
    return (
        max(0, math.floor(x0) - margin),
        max(0, math.floor(y0) - margin),
        min(width, math.ceil(x1) + 1 + margin),
        min(height, math.ceil(y1) + 1 + margin),
    )


def _holds(window: Window, inner: Window) -> bool:
    return window[0] <= inner[0] and window[1] <= inner[1] and inner[2] <= window[2] and inner[3] <= window[3]


def _centred_window(grown: Window, width: int, height: int, tile_size: int) -> tuple[Window, int]:
    """A window of at least `tile_size` a side (the image's side where smaller) centred on
    `grown`, clipped to the image, and the decimation step that brings it to `tile_size`."""
    x0, y0, x1, y1 = grown
    side = max(tile_size, x1 - x0, y1 - y0)
    wx0, wx1 = _span((x0 + x1) / 2, side, width)
    wy0, wy1 = _span((y0 + y1) / 2, side, height)
    step = math.ceil(max(wx1 - wx0, wy1 - wy0) / tile_size)
    return (wx0, wy0, wx1, wy1), step


def _span(centre: float, side: int, length: int) -> tuple[int, int]:
    """`side` pixels (at most `length`) centred on `centre`, moved inside [0, length)."""
    side = min(side, length)
    start = min(max(0, round(centre - side / 2)), length - side)
    return start, start + side


@dataclass
class PromptMask:
    """One mask of a prompt: `mask` in scene pixels, its predicted IoU and stability score,
    which prompt (index into the image's usable prompts, `PromptPlan.usable`) and which of its
    outputs (0 for a single mask, 0-2 among the three)."""

    mask: SceneMask
    prompt: int
    mask_index: int


@dataclass(frozen=True)
class PromptPlan:
    """How one image's prompts are segmented, known from its header before any pixel.

    prompts: all of its prompts in image pixels, with their reasons (`in_image_pixels`);
    usable: indexes into `prompts` of those without a reason; windows: `plan_windows` over the
    usable ones (their `prompts` index `usable`).
    """

    prompts: tuple[Prompt, ...]
    usable: tuple[int, ...]
    windows: tuple[PromptWindow, ...]

    def read_shape(self, index: int) -> tuple[int, int] | None:
        """(h, w) that window `index` is read at when decimated; None: at full resolution."""
        window = self.windows[index]
        if window.step == 1:
            return None
        x0, y0, x1, y1 = window.window
        return math.ceil((y1 - y0) / window.step), math.ceil((x1 - x0) / window.step)

    def usable_prompt(self, index: int) -> Prompt:
        return self.prompts[self.usable[index]]


def plan_prompts(
    prompts: list[Prompt], width: int, height: int, crs, transform, tile_size: int, overlap: int, margin: int
) -> PromptPlan:
    """The `PromptPlan` of a (height, width) image georeferenced by `crs` and `transform`
    (rasterio's; None for neither) cut into tiles of `tile_size` sharing `overlap` pixels."""
    placed = tuple(in_image_pixels(p, width, height, crs, transform) for p in prompts)
    usable = tuple(i for i, p in enumerate(placed) if p.error is None)
    extents = [placed[i].extent() for i in usable]
    windows = plan_windows(extents, width, height, tile_size, overlap, margin) if usable else []
    return PromptPlan(placed, usable, tuple(windows))


def plan_prompted_scene(
    scene: Scene, prompts: list[Prompt], tiling: str, tile_size: int, overlap: int, margin: int
) -> tuple[ScenePlan, PromptPlan]:
    """A prompt job's plans of a scene, from its header: the scene's (`scenes.plan_scene`, with
    the prompt windows as its tiles, so that the executors read them as they read tiles) and
    the prompts' (`plan_prompts`). tiling, tile_size, overlap: `raster.*`; margin: `prompts.margin`."""
    from sam_batch.pipeline.scenes import plan_scene, tile_size_for

    size = tile_size_for(scene, tiling, tile_size)
    prompt_plan = plan_prompts(prompts, scene.width, scene.height, scene.crs, scene.transform, size, overlap, margin)
    windows = tuple(Tile(w.window, w.window) for w in prompt_plan.windows)
    return dataclasses.replace(plan_scene(scene, size, overlap), tiles=windows), prompt_plan


def segment_prompts(engine: Engine, scene: Scene, plan: PromptPlan, best_only: bool, check: Check) -> list[PromptMask]:
    """The masks of `plan`'s usable prompts on `scene`, in prompt order, then output order.
    `check` runs before each window but the first (raises to stop)."""
    found: list[PromptMask] = []
    for index, window in enumerate(plan.windows):
        if index:
            check()
        shape = plan.read_shape(index)
        rgb, _ = scene.read(window.window) if shape is None else scene.read_decimated(window.window, shape)
        found.extend(segment_window(engine, rgb, plan, index, best_only))
    return sorted(found, key=lambda m: (m.prompt, m.mask_index))


def segment_window(engine: Engine, rgb: np.ndarray, plan: PromptPlan, index: int, best_only: bool) -> list[PromptMask]:
    """The masks of the prompts of window `index` of `plan`, whose pixels as read are `rgb`
    (h, w, 3) uint8 (decimated where the window's step says): encoded once, decoded in batches
    of one shape, each mask brought to the window's full resolution and placed in the scene."""
    window = plan.windows[index]
    x0, y0, x1, y1 = window.window
    full_hw = (y1 - y0, x1 - x0)
    scale = (rgb.shape[1] / full_hw[1], rgb.shape[0] / full_hw[0])  # window pixels → read pixels
    prompts = [plan.usable_prompt(i) for i in range(len(plan.usable))]
    crop = engine.encode(rgb)
    full = dataclasses.replace(crop, crop_hw=full_hw)  # logits come back at full resolution
    masks = []
    for group in _same_shape(prompts, window.prompts):
        for start in range(0, len(group), PROMPTS_PER_CALL):
            indexes = group[start : start + PROMPTS_PER_CALL]
            points, labels, boxes = _batch([prompts[i] for i in indexes], (x0, y0), scale)
            multimask = prompts[indexes[0]].multimask
            low_res, iou = engine.predict(crop, points, labels, boxes, multimask)
            best = iou.argmax(dim=1).tolist()
            kept = [
                (row, output)
                for row in range(len(indexes))
                for output in ([best[row]] if best_only and multimask else range(iou.shape[1]))
            ]
            rows, outputs = [r for r, _ in kept], [o for _, o in kept]
            scores = iou[rows, outputs].tolist()
            found = _full_masks(engine, full, low_res[rows, outputs])
            for (row, output), score, (pixels, origin, stability) in zip(kept, scores, found):
                prompt = indexes[row]
                placed = _placed(pixels, (x0 + origin[0], y0 + origin[1]), (score, stability), prompts[prompt], window)
                masks.append(PromptMask(placed, prompt, output if multimask else 0))
    return masks


def _full_masks(engine: Engine, crop, low_res) -> list[tuple[np.ndarray, tuple[int, int], float]]:
    """Each of `low_res` (K, 256, 256) logits at the crop's full size, thresholded: (pixels,
    (x, y) of pixels[0, 0] in the crop, stability score at offset `STABILITY_OFFSET`). On the
    host (`engine.windowed_upscale`) only over the window where a pixel can pass the lower
    threshold (`upsampling.MaskUpsampler`); else whole, on the engine's device."""
    from sam_batch.pipeline.masks import stability_score
    from sam_batch.pipeline.upsampling import MaskUpsampler

    threshold = engine.mask_threshold
    if not engine.windowed_upscale:
        chunks = range(0, len(low_res), UPSCALE_CHUNK)
        return [m for start in chunks for m in _boxed_on_device(engine, crop, low_res[start : start + UPSCALE_CHUNK])]
    upsampler = MaskUpsampler(crop.input_hw, crop.crop_hw)
    found = []
    for logits in low_res:
        window = upsampler.logits_above(logits, threshold - STABILITY_OFFSET)
        if window is None:  # no pixel above the lower threshold: an empty mask, 0 / 0
            found.append((np.zeros((1, 1), dtype=bool), (0, 0), float("nan")))
            continue
        rows_cols, values = window
        values = values[None]
        stability = float(stability_score(values, threshold, STABILITY_OFFSET)[0])
        found.append(((values[0] > threshold).numpy(), (rows_cols.cols[0], rows_cols.rows[0]), stability))
    return found


def _boxed_on_device(engine: Engine, crop, low_res) -> list[tuple[np.ndarray, tuple[int, int], float]]:
    """`_full_masks` of a chunk on the engine's device: upscaled together, scored and bounded
    there; only each mask's box of pixels comes to the host."""
    import torch

    from sam_batch.pipeline.masks import stability_score

    logits = engine.upscale(crop, low_res)
    stability = stability_score(logits, engine.mask_threshold, STABILITY_OFFSET).tolist()
    binary = logits > engine.mask_threshold
    rows, cols = binary.any(dim=2), binary.any(dim=1)  # (K, h), (K, w)
    first_row, first_col = rows.int().argmax(dim=1), cols.int().argmax(dim=1)
    last_row = rows.shape[1] - 1 - rows.flip(1).int().argmax(dim=1)
    last_col = cols.shape[1] - 1 - cols.flip(1).int().argmax(dim=1)
    bounds = torch.stack([rows.any(dim=1).int(), first_col, first_row, last_col, last_row], dim=1).tolist()
    found = []
    for k, (nonempty, x0, y0, x1, y1) in enumerate(bounds):
        if not nonempty:
            found.append((np.zeros((1, 1), dtype=bool), (0, 0), stability[k]))
            continue
        found.append((binary[k, y0 : y1 + 1, x0 : x1 + 1].cpu().numpy(), (x0, y0), stability[k]))
    return found


def _same_shape(prompts: list[Prompt], indexes: tuple[int, ...]) -> list[list[int]]:
    """`indexes` grouped by what a decoder batch must share: point count, box or not, multimask."""
    groups: dict[tuple[int, bool, bool], list[int]] = {}
    for i in indexes:
        p = prompts[i]
        groups.setdefault((len(p.points), p.box is not None, p.multimask), []).append(i)
    return list(groups.values())


def _batch(
    prompts: list[Prompt], origin: tuple[int, int], scale: tuple[float, float]
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Prompts of one shape as the predictor's arrays, in the pixels of the window as read:
    points (B, N, 2) float64 and labels (B, N) int64, or None; boxes (B, 4) float64 or None."""
    ox, oy = origin
    sx, sy = scale
    points = labels = boxes = None
    if prompts[0].points:
        points = np.array([[((x - ox) * sx, (y - oy) * sy) for x, y in p.points] for p in prompts], dtype=np.float64)
        labels = np.array([p.labels for p in prompts], dtype=np.int64)
    if prompts[0].box is not None:
        boxes = np.array(
            [((p.box[0] - ox) * sx, (p.box[1] - oy) * sy, (p.box[2] - ox) * sx, (p.box[3] - oy) * sy) for p in prompts],
            dtype=np.float64,
        )
    return points, labels, boxes


def _placed(
    pixels: np.ndarray, origin: tuple[int, int], scores: tuple[float, float], prompt: Prompt, window: PromptWindow
) -> SceneMask:
    """A mask's pixels (h, w) bool whose [0, 0] is scene pixel `origin`, as the pixels of its box;
    an empty mask as one unset pixel at the window's origin."""
    ys, xs = np.nonzero(pixels)
    if len(xs):
        bx0, by0, bx1, by1 = xs.min(), ys.min(), xs.max(), ys.max()
        box_pixels = pixels[by0 : by1 + 1, bx0 : bx1 + 1].copy()
    else:
        origin, bx0, by0 = window.window[:2], 0, 0
        box_pixels = np.zeros((1, 1), dtype=bool)
    point = (
        list(prompt.points[0])
        if prompt.points
        else [(prompt.box[0] + prompt.box[2]) / 2, (prompt.box[1] + prompt.box[3]) / 2]
    )
    return SceneMask(
        pixels=box_pixels,
        x0=int(bx0) + origin[0],
        y0=int(by0) + origin[1],
        iou=scores[0],
        stability=scores[1],
        point=point,
        crop_box=list(window.window),
    )
