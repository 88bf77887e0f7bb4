"""What the CPU side of a job runs, as plain functions: open an image, read one of its tiles
(the read tasks of a Ray job), or read a photo ahead of the segmenter in process.

Opening reads only what planning needs: a raster's header (size, georeferencing, bands,
nodata, and for 16-bit or float data the stretch limits, from one decimated read), or a photo
whole, decoded (a photo is one read however it is tiled). Each later tile read of a raster
opens the file again and reads one window, stretched with the limits found at opening, so
every tile of a scene looks alike wherever it is read. Every read is waited for at most
`run.read_timeout_s`, counted from the task's start (`jobs.bounded`). Failures are one line
naming the stage, never an exception: the image's error row.

torch is never imported here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from sam_batch.jobs.bounded import read_bounded
from sam_batch.jobs.job_sections import RasterSpec
from sam_batch.pipeline.errors import ImageError, one_line_reason
from sam_batch.pipeline.images import decode_image
from sam_batch.pipeline.inputs import TIFF_MAGIC_BYTES, open_input, read_bytes, starts_like_tiff
from sam_batch.pipeline.prompts import Prompt, PromptPlan, plan_prompted_scene, unusable_prompts
from sam_batch.pipeline.rasters import ArrayScene, RasterScene, Scene, Window
from sam_batch.pipeline.scenes import ScenePlan, has_valid_pixels, plan_scene, tile_size_for


@dataclass(frozen=True)
class Opened:
    """An opened image: its plan, or the one-line `error` (stage named) that ends it.

    raster: its tiles are read from the file (`read_tile`), else cut from the decoded photo;
    stretch: a raster's stretch limits for every tile read (None: its pixels need none);
    seconds: the opening's, in s; started: `time.time()` when it began; prompts: a prompt
    job's plan of the image's prompts, whose windows are `plan`'s tiles (None otherwise).
    """

    error: str | None
    plan: ScenePlan | None
    raster: bool
    stretch: tuple[float, float] | None
    seconds: float
    started: float
    prompts: PromptPlan | None = None


@dataclass(frozen=True)
class TileRead:
    """A tile read: `error` (one line) or None; `has_pixels`: False when no pixel is valid
    (the tile never reaches the model); seconds: the read's, in s."""

    error: str | None
    has_pixels: bool
    seconds: float


def open_image(
    uri: str,
    storage_options: dict,
    raster: RasterSpec,
    timeout_s: float,
    prompts: list[Prompt] | None = None,
    margin: int = 0,
) -> tuple[Opened, np.ndarray | None]:
    """(opened, photo): a photo read and decoded to (H, W, 3) uint8, a raster's header only
    (photo None). The read is waited for at most `timeout_s` s (`run.read_timeout_s`).
    prompts: a prompt job's prompts of the image (margin: `prompts.margin`), planned here; an
    image none of whose prompts can be segmented is not read (its `error` says why)."""
    started, clock = time.time(), time.perf_counter()
    if prompts is not None and (unusable := unusable_prompts(prompts)) is not None:
        return Opened(unusable, None, False, None, 0.0, started), None
    try:
        data = read_bounded(timeout_s, _photo_bytes, uri, storage_options)
        if data is None:
            plan, stretch, planned = read_bounded(
                timeout_s, _raster_plan, uri, storage_options, raster, prompts, margin
            )
            return Opened(None, plan, True, stretch, time.perf_counter() - clock, started, planned), None
        photo = ArrayScene(decode_image(data, raster.bands))
    except ImageError as error:
        return Opened(str(error), None, False, None, time.perf_counter() - clock, started), None
    except Exception as error:  # noqa: BLE001 - one image's failure must not end the job
        reason = f"decode: {one_line_reason(error, typed=True)}"
        return Opened(reason, None, False, None, time.perf_counter() - clock, started), None
    plan, planned = _plans(photo, raster, prompts, margin)
    return Opened(None, plan, False, None, time.perf_counter() - clock, started, planned), photo.image


def read_photo(
    uri: str, storage_options: dict, bands: tuple[int, ...] | None, timeout_s: float
) -> tuple[str | None, np.ndarray | None, float]:
    """(error, photo, seconds): a photo read and decoded to (H, W, 3) uint8 ahead of the
    segmenter in this process; photo None for an error (one line) or a raster, which the
    segmenter reads window by window itself. Waited for at most `timeout_s` s."""
    clock = time.perf_counter()
    try:
        data = read_bounded(timeout_s, _photo_bytes, uri, storage_options)
        photo = None if data is None else decode_image(data, bands)
    except ImageError as error:
        return str(error), None, time.perf_counter() - clock
    except Exception as error:  # noqa: BLE001 - one image's failure must not end the job
        return f"decode: {one_line_reason(error, typed=True)}", None, time.perf_counter() - clock
    return None, photo, time.perf_counter() - clock


def _photo_bytes(uri: str, storage_options: dict) -> bytes | None:
    """The whole file, or None for a TIFF, of which only the first 4 bytes are read.

    On any failure the file is read again by `read_bytes`, which names it (`read: …`).
    """
    try:
        with open_input(uri, storage_options) as f:
            head = f.read(TIFF_MAGIC_BYTES)
            data = head if starts_like_tiff(head) else head + f.read()
    except Exception:  # noqa: BLE001 - read_bytes raises the one-line ImageError
        data = b""
    data = data or read_bytes(uri, storage_options)
    return None if starts_like_tiff(data) else data


def _raster_plan(
    uri: str, storage_options: dict, raster: RasterSpec, prompts: list[Prompt] | None, margin: int
) -> tuple[ScenePlan, tuple[float, float] | None, PromptPlan | None]:
    with RasterScene(uri, storage_options, raster.bands, raster.nodata) as scene:
        plan, planned = _plans(scene, raster, prompts, margin)
        return plan, scene.stretch, planned


def _plans(
    scene: Scene, raster: RasterSpec, prompts: list[Prompt] | None, margin: int
) -> tuple[ScenePlan, PromptPlan | None]:
    """A scene's plan: its tiles, or, in a prompt job, its prompts' windows and their plan."""
    if prompts is not None:
        return plan_prompted_scene(scene, prompts, raster.tiling, raster.tile_size, raster.tile_overlap, margin)
    return plan_scene(scene, tile_size_for(scene, raster.tiling, raster.tile_size), raster.tile_overlap), None


def read_tile(
    uri: str,
    storage_options: dict,
    raster: RasterSpec,
    stretch: tuple[float, float] | None,
    window: Window,
    timeout_s: float,
    shape: tuple[int, int] | None = None,
) -> tuple[TileRead, np.ndarray | None, np.ndarray | None]:
    """(status, rgb, valid): one window of a raster as RGB uint8 (h, w, 3) and its valid pixels
    (h, w) bool, or None when all are; both None on an error or when no pixel is valid. The
    read (opening included) is waited for at most `timeout_s` s. shape: (h, w) to read the
    window decimated to (a prompt window larger than a tile); None: full resolution."""
    clock = time.perf_counter()
    try:
        rgb, valid = read_bounded(timeout_s, _read_window, uri, storage_options, raster, stretch, window, shape)
    except ImageError as error:
        return TileRead(str(error), False, time.perf_counter() - clock), None, None
    except Exception as error:  # noqa: BLE001 - one image's failure must not end the job
        return TileRead(f"decode: {one_line_reason(error, typed=True)}", False, time.perf_counter() - clock), None, None
    if not has_valid_pixels(valid):
        return TileRead(None, False, time.perf_counter() - clock), None, None
    return TileRead(None, True, time.perf_counter() - clock), rgb, valid


def _read_window(
    uri: str,
    storage_options: dict,
    raster: RasterSpec,
    stretch: tuple[float, float] | None,
    window: Window,
    shape: tuple[int, int] | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    with RasterScene(uri, storage_options, raster.bands, raster.nodata, stretch) as scene:
        return scene.read(window) if shape is None else scene.read_decimated(window, shape)
