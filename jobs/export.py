"""`sam-batch export OUT_URI --to DEST`: a committed output's masks as one GIS or COCO file.

Everything the user asked is checked before anything is written (format, `--where`, `--crs`,
the output, the destination); then rows stream from the committed shards
(`export_source.CommittedMasks`) through a format's writer (`export_formats`) into a
temporary file (or folder) beside the destination, moved over it once complete. A failure
removes the temporary: nothing partial is left.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import fsspec

from sam_batch.jobs.export_formats import (
    GDAL_DRIVERS,
    ExportCounts,
    VectorOptions,
    amg_columns,
    coco_columns,
    vector_columns,
    write_amg_folders,
    write_coco,
    write_gdal,
    write_geoparquet,
)
from sam_batch.jobs.export_source import CommittedMasks, ExportError, ImageInfo

GIS_FORMATS = ("gpkg", "fgb", "geojson", "geojsonseq", "geoparquet")
FORMATS = (*GIS_FORMATS, "coco", "amg")
EXTENSIONS = {
    ".gpkg": "gpkg",
    ".fgb": "fgb",
    ".geojson": "geojson",
    ".geojsons": "geojsonseq",
    ".geojsonl": "geojsonseq",
    ".parquet": "geoparquet",
    ".json": "coco",
    "": "amg",
}


@dataclass(frozen=True)
class ExportRequest:
    """What `sam-batch export` was asked. Areas: pixels for coco and amg, map units squared of the
    output CRS for GIS formats; simplify: map units."""

    output_uri: str
    destination: str
    format: str | None = None
    where: str | None = None
    min_area: float | None = None
    max_area: float | None = None
    simplify: float | None = None
    crs: str | None = None
    coco_polygons: bool = False
    overwrite: bool = False


def resolve_format(destination: str, given: str | None) -> str:
    """The format asked (`--format`) or named by the destination's extension (none: amg's folders)."""
    if given is not None:
        if given not in FORMATS:
            raise ExportError(f"--format {given!r}: unknown; choose from {', '.join(FORMATS)}")
        return given
    suffix = os.path.splitext(destination.rstrip("/"))[1].lower()
    if suffix not in EXTENSIONS:
        known = ", ".join(e for e in EXTENSIONS if e)
        raise ExportError(f"{destination}: unknown format {suffix!r}; use one of {known}, a folder, or --format")
    return EXTENSIONS[suffix]


def export(request: ExportRequest, progress: bool | None = None) -> tuple[str, ExportCounts]:
    """Write the export; return its format and counts. `ExportError` for anything asked amiss.

    progress: a progress bar on stderr; None: when stderr is a terminal.
    """
    format_ = resolve_format(request.destination, request.format)
    _check_options(request, format_)
    source = CommittedMasks(request.output_uri)
    source.check_where(request.where)
    names = source.columns()
    images = source.images()
    gis = format_ in GIS_FORMATS
    pixel_bounds = (None, None) if gis else (request.min_area, request.max_area)
    if gis:
        options = VectorOptions(
            _target_crs(request, images), request.simplify, request.min_area, request.max_area, "label" in names
        )
        columns = vector_columns(options)
    else:
        columns = coco_columns(names) if format_ == "coco" else amg_columns(names)
    _check_destination(request.destination, request.overwrite)
    counts = ExportCounts()
    show = sys.stderr.isatty() if progress is None else progress
    with (
        _progress_bar(source.total_rows(), show) as on_read,
        staged(request.destination, folder=format_ == "amg") as path,
    ):
        batches = source.batches(columns, request.where, *pixel_bounds, on_read=on_read)
        if format_ in GDAL_DRIVERS:
            write_gdal(path, GDAL_DRIVERS[format_], batches, options, counts)
        elif format_ == "geoparquet":
            write_geoparquet(path, batches, options, counts)
        elif format_ == "coco":
            write_coco(path, batches, images, request.coco_polygons, counts, request.output_uri)
        else:
            write_amg_folders(path, batches, images, counts)
    return format_, counts


def _check_options(request: ExportRequest, format_: str) -> None:
    if format_ not in GIS_FORMATS:
        for flag, value in (("--crs", request.crs), ("--simplify", request.simplify)):
            if value is not None:
                raise ExportError(f"{flag} applies to GIS formats ({', '.join(GIS_FORMATS)}), not {format_}")
    if request.coco_polygons and format_ != "coco":
        raise ExportError(f"--coco-polygons applies to coco, not {format_}")
    if request.simplify is not None and request.simplify <= 0:
        raise ExportError(f"--simplify {request.simplify}: the tolerance must be above 0")
    if request.crs is not None:
        from pyproj import CRS
        from pyproj.exceptions import CRSError

        try:
            CRS.from_user_input(request.crs)
        except CRSError:
            raise ExportError(f"--crs {request.crs!r}: no such coordinate reference system") from None


def _target_crs(request: ExportRequest, images: list[ImageInfo]) -> str:
    """The CRS of a GIS file: `--crs`, else the one CRS of the output's georeferenced scenes."""
    found = sorted({image.crs for image in images if image.crs is not None})
    if not found:
        raise ExportError(
            f"{request.output_uri}: no georeferenced image, so its masks have no geometry; "
            "export photos' masks to COCO (.json) or amg.py's folders"
        )
    if request.crs is not None:
        return request.crs
    if len(found) > 1:
        raise ExportError(
            f"{request.output_uri}: scenes in {len(found)} CRSs ({', '.join(found)}); pass --crs to choose one"
        )
    return found[0]


def _check_destination(destination: str, overwrite: bool) -> None:
    fs, path = fsspec.core.url_to_fs(destination)
    if fs.exists(path) and not overwrite:
        raise ExportError(f"{destination}: exists; pass --overwrite to replace it")
    if is_local(fs) and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise ExportError(f"{destination}: its folder does not exist")


@contextmanager
def staged(destination: str, folder: bool) -> Iterator[str]:
    """A local path to write the export to, moved to `destination` when the block ends well and
    removed when it fails. Local: a hidden sibling of the destination (same file system, so the
    move is a rename); elsewhere: a local temporary folder, then put to the store."""
    fs, path = fsspec.core.url_to_fs(destination)
    local = is_local(fs)
    path = path.rstrip("/")
    name = os.path.basename(path)
    stem, suffix = os.path.splitext(name)
    scratch = None if local else tempfile.mkdtemp(prefix="sam-batch-export-")
    parent = os.path.dirname(os.path.abspath(path)) if local else scratch
    staging = os.path.join(parent, f".{stem}.partial-{uuid.uuid4().hex}{suffix}")
    try:
        yield staging
        if local:
            if folder and os.path.isdir(path):
                shutil.rmtree(path)
            os.replace(staging, path)
        else:
            if fs.exists(path):
                fs.rm(path, recursive=True)
            fs.put(staging, path, recursive=folder)
    finally:
        for leftover in (staging, scratch):
            if leftover and os.path.isdir(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
            elif leftover and os.path.exists(leftover):
                os.remove(leftover)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether an fsspec filesystem is the local disk."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return "file" in protocols or "local" in protocols


@contextmanager
def _progress_bar(total: int, show: bool) -> Iterator[Callable[[int], None]]:
    """A callable told the rows read, drawn as a bar of `total` on stderr when `show`."""
    if not show:
        yield lambda rows: None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit=" masks", file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar.update
