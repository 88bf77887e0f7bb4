"""The work itself, the same under every executor: segment one image; commit one shard.

`ImageSegmenter` loads the model once and then turns input URIs into rows. A failing image
becomes an `images` row with status `error` and a one-line reason naming the stage; the job
goes on. `commit_shard` writes a shard's rows once all its images are back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from sam_batch.engines.backend import build_engine
from sam_batch.jobs.dataset import OutputDataset, Shard
from sam_batch.jobs.schema import JobSpec
from sam_batch.pipeline.amg import generate_masks, to_records
from sam_batch.pipeline.images import ImageError, load_image
from sam_batch.pipeline.tables import image_row, images_table, mask_rows, masks_table

STAGES = ("read", "segment", "encode", "write")


@dataclass
class ImageResult:
    """Rows of one input image and the seconds each stage took on it."""

    uri: str
    mask_rows: list[dict]
    image_row: dict
    stage_seconds: dict[str, float] = field(default_factory=dict)
    worker: str = ""


class ImageSegmenter:
    """Holds one engine; turns input URIs into output rows."""

    def __init__(self, job: JobSpec, worker_name: str = "local") -> None:
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

    def segment(self, uri: str, image: np.ndarray | None = None) -> ImageResult:
        """Rows of one input; `image` (H, W, 3) uint8 when a read stage has already decoded it.

        Never raises for a bad image: the failure is the images row's `error`.
        """
        seconds = dict.fromkeys(STAGES, 0.0)
        started = time.perf_counter()
        try:
            if image is None:
                image = load_image(uri, self.job.input.storage_options, self.job.raster.bands)
            seconds["read"] = time.perf_counter() - started
            t = time.perf_counter()
            masks = generate_masks(self.engine, image, self.params)
            seconds["segment"] = time.perf_counter() - t
            t = time.perf_counter()
            rows = mask_rows(uri, to_records(masks))
            seconds["encode"] = time.perf_counter() - t
        except ImageError as error:
            return self._result(uri, [], image, started, seconds, error=str(error))
        except Exception as error:  # noqa: BLE001 - one image's failure must not end the job
            reason = " ".join(str(error).split())[:300]
            return self._result(uri, [], image, started, seconds, error=f"segment: {type(error).__name__}: {reason}")
        return self._result(uri, rows, image, started, seconds)

    def _result(self, uri, rows, image, started, seconds, *, error: str | None = None) -> ImageResult:
        height, width = (int(image.shape[0]), int(image.shape[1])) if image is not None else (None, None)
        row = image_row(
            uri,
            status="error" if error else "ok",
            error=error,
            width=width,
            height=height,
            n_masks=len(rows),
            seconds=time.perf_counter() - started,
        )
        return ImageResult(uri, rows, row, seconds, self.worker_name)


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
        masks_table([row for r in ordered for row in r.mask_rows]),
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
) -> ImageResult:
    """One image's result: its mask rows and its `images` row, `ok` unless `error` is given.

    size: (height, width) in pixels as displayed, None when the image was never decoded;
    seconds: the image's wall time in s; error: one line naming the stage (`read: …`).
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
    )
    return ImageResult(uri, rows, row, stage_seconds or {}, worker)
