"""The work itself, the same under every executor: segment one image; commit one shard.

`ImageSegmenter` loads the model once and then turns input URIs into rows. A failing image
becomes an `images` row with status `error` and a one-line reason naming the stage; the job
goes on. `commit_shard` writes a shard's rows once all its images are back.

torch (the engine, the generator) loads only when an `ImageSegmenter` is made, so a driver and
the read and commit tasks of a Ray job never import it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from sam_batch.jobs.bounded import BoundedScene, Budget, OverBudget, ReadThread
from sam_batch.jobs.dataset import OutputDataset, Shard
from sam_batch.jobs.schema import JobSpec
from sam_batch.pipeline.images import ImageError, decode_image, one_line_reason, read_bytes
from sam_batch.pipeline.rasters import ArrayScene, RasterScene, Scene, is_raster
from sam_batch.pipeline.tables import image_row, images_table, mask_rows, masks_table

if TYPE_CHECKING:
    from sam_batch.pipeline.scenes import SceneResult

STAGES = ("read", "segment", "encode", "write")
log = logging.getLogger("sam_batch")


@dataclass
class ImageResult:
    """Rows of one input image and the seconds each stage took on it."""

    uri: str
    mask_rows: list[dict]
    image_row: dict
    stage_seconds: dict[str, float] = field(default_factory=dict)
    worker: str = ""


class ImageSegmenter:
    """Holds one engine; turns input URIs into output rows. `threads`: torch's intra-op threads
    in this process (None: every core it may use)."""

    def __init__(self, job: JobSpec, worker_name: str = "local", threads: int | None = None) -> None:
        from sam_batch.engines.backend import build_engine, keep_freed_memory, set_cpu_threads

        set_cpu_threads(threads)
        keep_freed_memory()
        self.job = job
        self.worker_name = worker_name
        self.params = job.amg
        self.engine = build_engine(
            job.model.type,
            job.model.checkpoint,
            job.model.sha256,
            backend=job.engine.backend,
            device=job.engine.device,
            precision=job.engine.precision,
        )

    def segment(self, uri: str, image: np.ndarray | None = None, read_seconds: float = 0.0) -> ImageResult:
        """Rows of one input; `image` (H, W, 3) uint8 when a read stage has already decoded it,
        in `read_seconds`, which count in the row's seconds and the read stage's.

        Rasters (TIFF magic) are read here, window by window; photos whole. Either is cut into
        tiles of `raster.tile_size` or segmented whole as `raster.tiling` says
        (`pipeline.scenes.tile_size_for`). Each read here is waited for at most
        `run.read_timeout_s`; the image's work, from this call on (a raster's reads included),
        stops at the first step past `run.image_timeout_s` (`jobs.bounded`). Never raises for a
        bad image: the failure is the images row's `error`.
        """
        from sam_batch.pipeline.scenes import tile_size_for  # imports torch, so not at the top

        seconds = {**dict.fromkeys(STAGES, 0.0), "read": read_seconds}
        started = time.perf_counter() - read_seconds
        budget = Budget(self.job.run.image_timeout_s)
        size: tuple[int, int] | None = None
        raster = self.job.raster
        try:
            with ReadThread(self.job.run.read_timeout_s) as reads, ExitStack() as stack:
                scene = self._open_scene(uri, image, reads, stack)
                size = (scene.height, scene.width)
                seconds["read"] = time.perf_counter() - started
                t = time.perf_counter()
                tile_size = tile_size_for(scene, raster.tiling, raster.tile_size)
                result = self._segment_scene(uri, scene, tile_size, budget.check)
                seconds["segment"] = time.perf_counter() - t
            t = time.perf_counter()
            rows = mask_rows(uri, result.records())
            seconds["encode"] = time.perf_counter() - t
        except (ImageError, OverBudget) as error:
            return self._result(uri, [], size, started, seconds, error=str(error))
        except Exception as error:  # noqa: BLE001 - one image's failure must not end the job
            reason = f"segment: {one_line_reason(error, typed=True)}"
            return self._result(uri, [], size, started, seconds, error=reason)
        return self._result(uri, rows, size, started, seconds, crs=result.crs, transform=result.transform)

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

    def _segment_scene(self, uri: str, scene: Scene, tile_size: int, check: Callable[[], None]) -> SceneResult:
        """`segment_scene` under the image's time budget (`check`, which raises `OverBudget`),
        run again with half the prompts per decode call each time the decoder
        runs out of device memory (the masks do not depend on the batch); the smaller batch
        stays for the images after this one. Out of memory at one prompt a call is the image's
        error, and the batch goes back to what it was when the image started."""
        import torch

        from sam_batch.pipeline.amg import DecoderOutOfMemory
        from sam_batch.pipeline.scenes import segment_scene

        started_with = (self.params, self.engine.min_prompt_batch)
        while True:
            try:
                return segment_scene(self.engine, scene, self.params, tile_size, self.job.raster.tile_overlap, check)
            except DecoderOutOfMemory as error:
                failed = error.prompts  # the exception (and the tensors its frames hold) is gone below
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if failed <= 1:
                self.params, self.engine.min_prompt_batch = started_with
                raise DecoderOutOfMemory(failed)
            self.params = dataclasses.replace(self.params, points_per_batch=failed // 2)
            self.engine.min_prompt_batch = failed // 2
            log.warning("%s: out of GPU memory at %d prompts per decode call; segmenting it again at %d",
                        uri, failed, failed // 2)

    def _result(
        self,
        uri: str,
        rows: list[dict],
        size: tuple[int, int] | None,
        started: float,
        seconds: dict[str, float],
        *,
        error: str | None = None,
        crs: str | None = None,
        transform: list[float] | None = None,
    ) -> ImageResult:
        return image_result(
            uri,
            rows,
            size=size,
            seconds=time.perf_counter() - started,
            stage_seconds=seconds,
            worker=self.worker_name,
            error=error,
            crs=crs,
            transform=transform,
        )


def commit_shard(dataset: OutputDataset, shard: Shard, results: list[ImageResult]) -> dict:
    """Write a shard's tables in plan order and create its marker; returns the shard's stats."""
    by_uri = {r.uri: r for r in results}
    ordered = [by_uri[uri] for uri in shard.uris]
    started = time.perf_counter()
    stats = {
        "n_images": len(ordered),
        "n_errors": sum(r.image_row["status"] == "error" for r in ordered),
        "n_masks": sum(len(r.mask_rows) for r in ordered),
        "workers": sorted({r.worker for r in ordered}),
    }
    committed = dataset.commit_shard(
        shard,
        masks_table([row for r in ordered for row in r.mask_rows], [r.image_row for r in ordered], dataset.crs),
        images_table([r.image_row for r in ordered]),
        stats,
    )
    return {**stats, "committed": committed, "write_seconds": time.perf_counter() - started}


def image_result(
    uri: str,
    rows: list[dict],
    *,
    size: tuple[int, int] | None = None,
    seconds: float = 0.0,
    stage_seconds: dict[str, float] | None = None,
    worker: str = "",
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
    return ImageResult(uri, rows, row, stage_seconds or {}, worker)
