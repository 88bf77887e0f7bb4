"""The work itself, the same under every executor: segment one image, or one tile of it;
finish an image into rows; commit one shard.

`ImageSegmenter` loads the model once. In process it turns an input URI into rows
(`segment`); on Ray it segments one tile at a time (`segment_tile`), whose masks a CPU task
then makes into the image's rows (`finish_image`). A failing image becomes an `images` row
with status `error` and a one-line reason naming the stage; the job goes on. `write_shard`
writes a shard's rows once all its images are back.

torch (the engine, the generator) loads only when an `ImageSegmenter` is made, so a driver and
the read, finish and commit tasks of a Ray job never import it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from sam_batch.jobs.bounded import BoundedScene, Budget, OverBudget, ReadThread
from sam_batch.jobs.dataset import OutputDataset
from sam_batch.jobs.plan import Shard
from sam_batch.jobs.schema import JobSpec
from sam_batch.pipeline.errors import ImageError, one_line_reason
from sam_batch.pipeline.images import decode_image
from sam_batch.pipeline.inputs import read_bytes
from sam_batch.pipeline.params import candidate_floor
from sam_batch.pipeline.rasters import ArrayScene, RasterScene, Scene, is_raster
from sam_batch.pipeline.tables import (
    IMAGES_SCHEMA,
    MASKS_SCHEMA,
    candidate_rows,
    candidates_table,
    image_row,
    images_table,
    mask_rows,
    masks_table,
)

if TYPE_CHECKING:
    from sam_batch.pipeline.prompts import Prompt, PromptMask, PromptPlan
    from sam_batch.pipeline.scenes import ScenePlan, SceneResult
    from sam_batch.pipeline.tile_masks import TileMasks

STAGES = ("read", "segment", "encode", "write")
log = logging.getLogger("sam_batch")


@dataclass(frozen=True)
class ImageDone:
    """What the runner counts of one finished image (its rows stay where they were made).

    error: the images row's one-line error, None when ok; stage_seconds: s per stage of
    `STAGES`; workers: the segmenting workers that ran it (several for a tiled scene on Ray);
    tiles_segmented: its tiles that went through the model (tiles with no valid pixel never
    do); tiles_redone: those segmented again after their worker was lost.
    """

    uri: str
    error: str | None
    n_masks: int
    stage_seconds: dict[str, float]
    workers: tuple[str, ...]
    tiles_segmented: int = 0
    tiles_redone: int = 0


@dataclass
class ImageResult:
    """Rows of one input image, the seconds each stage took on it, the workers that segmented it;
    `candidate_rows`: its rows of the candidates table (`output.candidates`)."""

    uri: str
    mask_rows: list[dict]
    image_row: dict
    stage_seconds: dict[str, float] = field(default_factory=dict)
    workers: tuple[str, ...] = ()
    tiles_segmented: int = 0
    candidate_rows: list[dict] = field(default_factory=list)

    def done(self) -> ImageDone:
        """The runner's summary of this result."""
        return ImageDone(
            self.uri,
            self.image_row["error"],
            len(self.mask_rows),
            self.stage_seconds,
            self.workers,
            self.tiles_segmented,
        )


@dataclass(frozen=True)
class ShardCommit:
    """A shard's commit is done: `stats` as returned by `write_shard` (`committed` is False
    when another attempt had committed it first; `write_seconds` in s)."""

    shard: Shard
    stats: dict


Event = ImageDone | ShardCommit  # what an executor yields to the runner


class ImageSegmenter:
    """Holds one engine; turns input URIs into output rows. `threads`: torch's intra-op threads
    in this process (None: every core it may use)."""

    def __init__(self, job: JobSpec, worker_name: str = "local", threads: int | None = None) -> None:
        from sam_batch.engines.backend import keep_freed_memory, set_cpu_threads
        from sam_batch.engines.factory import build_engine
        from sam_batch.engines.registry import is_sam2
        from sam_batch.engines.sam2_engine import Sam2Generator

        set_cpu_threads(threads)
        keep_freed_memory()
        self.job = job
        self.worker_name = worker_name
        self.params = job.amg
        amg = job.amg
        generator = (
            Sam2Generator(amg.multimask_output, amg.use_m2m, amg.mask_threshold) if is_sam2(job.model.type) else None
        )
        self.engine = build_engine(
            job.model.type,
            job.model.checkpoint,
            job.model.sha256,
            backend=job.engine.backend,
            device=job.engine.device,
            precision=job.engine.precision,
            sam2_generator=generator,
        )

    def segment(self, uri: str, image: np.ndarray | None = None, read_seconds: float = 0.0) -> ImageResult:
        """Rows of one input, all in this process; `image` (H, W, 3) uint8 when a read stage has
        already decoded it, in `read_seconds`, which count in the row's seconds and the read stage's.

        Rasters (TIFF magic) are read here, window by window; photos whole. Either is cut into
        tiles of `raster.tile_size` or segmented whole as `raster.tiling` says
        (`pipeline.scenes.tile_size_for`). Each read here is waited for at most
        `run.read_timeout_s`; the image's work, from this call on (a raster's reads included),
        stops at the first step past `run.image_timeout_s` (`jobs.bounded`). Never raises for a
        bad image: the failure is the images row's `error`.
        """
        from sam_batch.pipeline.scenes import finish_scene, plan_scene, segment_tiles, tile_size_for

        seconds = {**dict.fromkeys(STAGES, 0.0), "read": read_seconds}
        started = time.time() - read_seconds
        budget = Budget(self.job.run.image_timeout_s)
        size: tuple[int, int] | None = None
        raster = self.job.raster
        try:
            with self._scene(uri, image, started, seconds) as scene:
                size = (scene.height, scene.width)
                t = time.perf_counter()
                plan = plan_scene(scene, tile_size_for(scene, raster.tiling, raster.tile_size), raster.tile_overlap)

                def segment(rgb: np.ndarray, valid: np.ndarray | None, index: int) -> TileMasks:
                    return self.segment_tile(uri, rgb, valid, plan, index, budget.check)

                tiles = segment_tiles(scene, plan, segment, budget.check)
                seconds["segment"] = time.perf_counter() - t
            return finish_image(
                uri, finish_scene(plan, tiles, self.params.crop_nms_thresh), started, seconds, (self.worker_name,)
            )
        except (ImageError, OverBudget) as error:
            return self._result(uri, size, started, seconds, str(error))
        except Exception as error:  # noqa: BLE001 - one image's failure must not end the job
            return self._result(uri, size, started, seconds, f"segment: {one_line_reason(error, typed=True)}")

    def segment_prompted(
        self, uri: str, prompts: list[Prompt], image: np.ndarray | None = None, read_seconds: float = 0.0
    ) -> ImageResult:
        """Rows of one input of a prompt job: the masks of its `prompts` (`pipeline.prompts`),
        read, bounded and failing as `segment` does. An image none of whose prompts can be
        segmented is never read: its row is an error naming the first prompt's reason."""
        from sam_batch.pipeline.prompts import plan_prompted_scene, segment_prompts, unusable_prompts

        seconds = {**dict.fromkeys(STAGES, 0.0), "read": read_seconds}
        started = time.time() - read_seconds
        if (error := unusable_prompts(prompts)) is not None:
            return with_prompts(self._result(uri, None, started, seconds, error), prompts)
        budget = Budget(self.job.run.image_timeout_s)
        size: tuple[int, int] | None = None
        try:
            with self._scene(uri, image, started, seconds) as scene:
                size = (scene.height, scene.width)
                t = time.perf_counter()
                raster = self.job.raster
                args = (raster.tiling, raster.tile_size, raster.tile_overlap, self.job.prompts.margin)
                scene_plan, prompt_plan = plan_prompted_scene(scene, prompts, *args)
                if (error := unusable_prompts(list(prompt_plan.prompts))) is not None:
                    return with_prompts(self._result(uri, size, started, seconds, error), list(prompt_plan.prompts))
                masks = segment_prompts(self.engine, scene, prompt_plan, self.job.prompts.best_only, budget.check)
                seconds["segment"] = time.perf_counter() - t
            return prompted_result(
                uri, scene_plan, prompt_plan, masks, self.job.prompts.carry, started, seconds, (self.worker_name,)
            )
        except (ImageError, OverBudget) as error:
            return with_prompts(self._result(uri, size, started, seconds, str(error)), prompts)
        except Exception as error:  # noqa: BLE001 - one image's failure must not end the job
            reason = f"segment: {one_line_reason(error, typed=True)}"
            return with_prompts(self._result(uri, size, started, seconds, reason), prompts)

    def segment_window(self, rgb: np.ndarray, prompt_plan: PromptPlan, index: int) -> list[PromptMask]:
        """`pipeline.prompts.segment_window` on window `index` of `prompt_plan`, whose pixels
        as read are `rgb` (h, w, 3) uint8."""
        from sam_batch.pipeline.prompts import segment_window

        return segment_window(self.engine, rgb, prompt_plan, index, self.job.prompts.best_only)

    @contextmanager
    def _scene(self, uri: str, image: np.ndarray | None, started: float, seconds: dict[str, float]) -> Iterator[Scene]:
        """The scene of `uri` (`_open_scene`) on a read thread of its own, closed on exit; the
        time since `started` (`time.time()`) is its `read` seconds."""
        with ReadThread(self.job.run.read_timeout_s) as reads, ExitStack() as stack:
            scene = self._open_scene(uri, image, reads, stack)
            seconds["read"] = time.time() - started
            yield scene

    def _open_scene(self, uri: str, image: np.ndarray | None, reads: ReadThread, stack: ExitStack) -> Scene:
        """`image` (H, W, 3) uint8 as a scene when a read stage decoded it; else the file at
        `uri`: a raster opened, read window by window and closed on `reads` (`stack` queues the
        close there), or a photo read whole on `reads` and decoded. Each read is waited for at
        most `run.read_timeout_s` (`ReadTimedOut`)."""
        if image is not None:
            return ArrayScene(image)
        options, raster = self.job.input.storage_options, self.job.raster
        if not reads.call(is_raster, uri, options):
            return ArrayScene(decode_image(reads.call(read_bytes, uri, options), raster.bands))
        scene = reads.call(RasterScene, uri, options, raster.bands, raster.nodata)
        stack.callback(reads.post, scene.__exit__, None, None, None)
        return BoundedScene(scene, reads)

    def segment_tile(
        self,
        uri: str,
        rgb: np.ndarray,
        valid: np.ndarray | None,
        plan: ScenePlan,
        index: int,
        check: Callable[[], None],
    ) -> TileMasks:
        """`pipeline.scenes.segment_tile` on tile `index` of `uri`'s `plan` (`rgb` (h, w, 3)
        uint8, `valid` (h, w) bool or None), under the image's time budget (`check`, which
        raises `OverBudget`), run again with half the prompts per decode call each time the
        decoder runs out of device memory (the masks do not depend on the batch); the smaller
        batch stays for the tiles after this one. Out of memory at one prompt a call is the
        image's error, and the batch goes back to what it was when the tile started."""
        import torch

        from sam_batch.pipeline.amg import DecoderOutOfMemory
        from sam_batch.pipeline.scenes import segment_tile

        started_with = (self.params, self.engine.min_prompt_batch)
        while True:
            try:
                floor = candidate_floor(self.params) if self.job.output.candidates else None
                return segment_tile(self.engine, rgb, valid, self.params, plan, index, check, floor)
            except DecoderOutOfMemory as error:
                failed = error.prompts  # the exception (and the tensors its frames hold) is gone below
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if failed <= 1:
                self.params, self.engine.min_prompt_batch = started_with
                raise DecoderOutOfMemory(failed)
            self.params = dataclasses.replace(self.params, points_per_batch=failed // 2)
            self.engine.min_prompt_batch = failed // 2
            log.warning(
                "%s: out of GPU memory at %d prompts per decode call; segmenting it again at %d",
                uri,
                failed,
                failed // 2,
            )

    def _result(
        self, uri: str, size: tuple[int, int] | None, started: float, seconds: dict[str, float], error: str
    ) -> ImageResult:
        return image_result(
            uri,
            [],
            size=size,
            seconds=time.time() - started,
            stage_seconds=seconds,
            workers=(self.worker_name,),
            error=error,
        )


def finish_image(
    uri: str, result: SceneResult, started: float, seconds: dict[str, float], workers: tuple[str, ...]
) -> ImageResult:
    """The rows of a segmented image: its masks' records (RLE, boxes, polygons) made here.

    started: `time.time()` when the image's work began, in any process (its row's seconds count
    from there); seconds: s per stage so far, the encoding's added here.
    """
    t = time.perf_counter()
    rows = mask_rows(uri, result.records())
    seconds = {**seconds, "encode": seconds.get("encode", 0.0) + time.perf_counter() - t}
    done = image_result(
        uri,
        rows,
        size=(result.height, result.width),
        seconds=time.time() - started,
        stage_seconds=seconds,
        workers=workers,
        crs=result.crs,
        transform=result.transform,
    )
    return dataclasses.replace(
        done,
        tiles_segmented=result.tiles - result.tiles_skipped,
        candidate_rows=candidate_rows(uri, result.candidates),
    )


def write_shard(
    dataset: OutputDataset, shard: Shard, results: list[ImageResult], schemas: tuple[pa.Schema, pa.Schema] | None = None
) -> dict:
    """Write a shard's tables in plan order (the candidates table too where the output keeps
    candidates) and create its marker; returns the shard's stats. schemas: the masks and
    images schemas (a prompt job's: `tables.prompt_schemas`)."""
    masks_schema, images_schema = schemas or (MASKS_SCHEMA, IMAGES_SCHEMA)
    by_uri = {r.uri: r for r in results}
    ordered = [by_uri[uri] for uri in shard.uris]
    started = time.perf_counter()
    stats = {
        "n_images": len(ordered),
        "n_errors": sum(r.image_row["status"] == "error" for r in ordered),
        "n_masks": sum(len(r.mask_rows) for r in ordered),
        "workers": sorted({w for r in ordered for w in r.workers}),
    }
    candidates = [row for r in ordered for row in r.candidate_rows]
    committed = dataset.commit_shard(
        shard,
        masks_table(
            [row for r in ordered for row in r.mask_rows], [r.image_row for r in ordered], dataset.crs, masks_schema
        ),
        images_table([r.image_row for r in ordered], images_schema),
        stats,
        candidates_table(candidates) if dataset.candidates else None,
    )
    return {**stats, "committed": committed, "write_seconds": time.perf_counter() - started}


def prompted_result(
    uri: str,
    scene_plan: ScenePlan,
    prompt_plan: PromptPlan,
    masks: list[PromptMask],
    carry: tuple[str, ...],
    started: float,
    seconds: dict[str, float],
    workers: tuple[str, ...],
) -> ImageResult:
    """The rows of a prompted image: its masks (in prompt, then output order) with their
    prompt's id, output index, points and carried values; the images row with its prompts."""
    from sam_batch.pipeline.scenes import SceneResult

    masks = sorted(masks, key=lambda m: (m.prompt, m.mask_index))
    plan = scene_plan
    result = SceneResult(plan.width, plan.height, [m.mask for m in masks], plan.crs, plan.transform, 0, 0)
    done = finish_image(uri, result, started, seconds, workers)
    for row, mask in zip(done.mask_rows, masks):
        prompt = prompt_plan.usable_prompt(mask.prompt)
        row.update(prompt_id=prompt.prompt_id, mask_index=mask.mask_index)
        row.update(point_coords=[list(p) for p in prompt.points], **dict(zip(carry, prompt.carried)))
    done = dataclasses.replace(done, tiles_segmented=len(prompt_plan.windows))
    return with_prompts(done, list(prompt_plan.prompts))


def with_prompts(result: ImageResult, prompts: list[Prompt]) -> ImageResult:
    """`result` with its images row's prompt columns: how many prompts the image had, and the
    id and reason of each that could not be segmented."""
    errors = [{"prompt_id": p.prompt_id, "error": p.error} for p in prompts if p.error is not None]
    result.image_row.update(n_prompts=len(prompts), prompt_errors=errors)
    return result


def image_result(
    uri: str,
    rows: list[dict],
    *,
    size: tuple[int, int] | None = None,
    seconds: float = 0.0,
    stage_seconds: dict[str, float] | None = None,
    workers: tuple[str, ...] = (),
    error: str | None = None,
    crs: str | None = None,
    transform: list[float] | None = None,
) -> ImageResult:
    """One image's result: its mask rows and its `images` row, `ok` unless `error` is given.

    size: (height, width) in pixels as displayed, None when the image was never decoded;
    seconds: the image's wall time in s; error: one line naming the stage (`read: …`);
    crs, transform: a georeferenced scene's, as in `pipeline.scenes.SceneResult`.
    """
    height, width = size if size is not None else (None, None)
    row = image_row(
        uri,
        status="error" if error else "ok",
        error=error,
        width=width,
        height=height,
        n_masks=len(rows),
        seconds=seconds,
        crs=crs,
        transform=transform,
    )
    return ImageResult(uri, rows, row, stage_seconds or {}, workers)
