"""The one CRS an output's geometries are written in (`output.crs`), chosen when a job is planned.

`auto` reads the CRS in every input TIFF's header (`HEADER_READS_AT_ONCE` at a time, each read
bounded by `run.read_timeout_s`; files named as photos are not opened, and photos have no CRS):
the scenes' CRS when they all share one, otherwise `FALLBACK_CRS`, and the log says which and
why. An explicit `EPSG:NNNN` is used as it is. The plan freezes the choice
(`_sam_batch/plan.json`), so a resumed run writes in the CRS its first run chose, whatever
inputs have changed since.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

import fsspec
from fsspec.implementations.local import LocalFileSystem

from sam_batch.jobs.bounded import read_bounded
from sam_batch.jobs.schema import JobSpec
from sam_batch.pipeline.errors import one_line_reason
from sam_batch.pipeline.geometry import crs_label, crs_name
from sam_batch.pipeline.rasters import BlockReads, is_raster

FALLBACK_CRS = "EPSG:4326"  # scenes in several CRSs (or none) are written in longitude/latitude
HEADER_READS_AT_ONCE = 16  # headers read in parallel while planning: each is a few small requests
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")  # never opened for a CRS
log = logging.getLogger("sam_batch")


def choose_output_crs(job: JobSpec, uris: list[str]) -> str:
    """The CRS ('EPSG:code' or WKT) the job's geometries are written in: `output.crs`, or for
    `auto` the scenes' one CRS, else `FALLBACK_CRS`."""
    if job.output.crs != "auto":
        return job.output.crs
    found = _header_crss(uris, job.input.storage_options, job.run.read_timeout_s)
    crss = sorted({crs for crs in found.values() if crs is not None})
    if len(crss) == 1:
        log.info(
            "output.crs auto: %s, the CRS of every georeferenced scene (%d)",
            crs_name(crss[0]),
            sum(crs is not None for crs in found.values()),
        )
        return crss[0]
    if crss:
        log.info(
            "output.crs auto: the scenes are in %d CRSs (%s); geometries are written in %s",
            len(crss),
            ", ".join(map(crs_name, crss)),
            FALLBACK_CRS,
        )
    else:
        log.info("output.crs auto: no input has a CRS; any geometry is written in %s", FALLBACK_CRS)
    return FALLBACK_CRS


def _header_crss(uris: Iterable[str], storage_options: dict, timeout_s: float) -> dict[str, str | None]:
    """uri → the CRS in its TIFF header (None: a photo, a TIFF without one), for the inputs
    whose header could be read; those that could not are left out, with one warning."""

    def read(uri: str) -> tuple[str, str | None, str | None]:
        try:
            return uri, read_bounded(timeout_s, scene_crs, uri, storage_options), None
        except Exception as error:  # noqa: BLE001 - the image's own run says what is wrong with it
            return uri, None, one_line_reason(error)

    with ThreadPoolExecutor(HEADER_READS_AT_ONCE, thread_name_prefix="sam-batch-header") as pool:
        results = list(pool.map(read, uris))
    failed = [(uri, reason) for uri, _, reason in results if reason is not None]
    if failed:
        log.warning(
            "output.crs auto: %d input header(s) could not be read and do not count in the choice, first %s (%s)",
            len(failed),
            *failed[0],
        )
    return {uri: crs for uri, crs, reason in results if reason is None}


def scene_crs(uri: str, storage_options: dict) -> str | None:
    """The CRS label in a TIFF's header ('EPSG:code' or WKT); None for a file named as a photo,
    a file that is not a TIFF, or a TIFF without a CRS. Reads the header only."""
    import rasterio

    if uri.lower().endswith(PHOTO_SUFFIXES) or not is_raster(uri, storage_options):
        return None
    fs, path = fsspec.core.url_to_fs(uri, **storage_options)
    opener = None if isinstance(fs, LocalFileSystem) else BlockReads(fs)
    with rasterio.Env(), rasterio.open(path, opener=opener) as src:
        return crs_label(src.crs)
