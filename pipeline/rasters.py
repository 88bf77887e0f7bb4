"""Scenes: images read one window at a time, as RGB uint8 plus the mask of valid pixels.

A `RasterScene` is a raster file (GeoTIFF, COG, any GDAL format) opened with rasterio through
fsspec, so a window costs only the bytes of the blocks under it (a COG's range requests on
object stores). Per scene, once, it picks the three bands, finds the nodata rule and, for
data that is not uint8, the stretch limits (2nd and 98th percentiles of the valid pixels of a
decimated read, which GDAL serves from overviews where the file has them): every tile is then
stretched alike and seams do not change colour. An `ArrayScene` gives the same view of a
photo already decoded in memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import fsspec
import numpy as np

from sam_batch.pipeline.images import (
    TIFF_MAGIC,
    ImageError,
    apply_palette,
    apply_stretch,
    one_line_reason,
    open_input,
    palette_colours,
    raster_error_reason,
    rgb_bands,
    stretch_limits,
)

Window = tuple[int, int, int, int]  # XYXY in scene pixels, end exclusive
MAX_SCENE_PIXELS = 200_000 * 200_000  # a header beyond this is not a scene but a broken file
STRETCH_SAMPLE_SIDE = 1024  # the decimated read for stretch limits is at most this a side


class Scene(Protocol):
    """What tiling needs of an image: its size, georeferencing and windows of pixels."""

    width: int
    height: int
    crs: object | None  # rasterio CRS when georeferenced
    transform: object | None  # rasterio Affine (pixel corner -> CRS) when georeferenced

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray | None]:
        """RGB uint8 (h, w, 3) of the window and its valid pixels, bool (h, w) or None if all are."""


class ArrayScene:
    """An RGB uint8 (H, W, 3) photo in memory, with no nodata and no georeferencing."""

    crs = None
    transform = None

    def __init__(self, image: np.ndarray) -> None:
        self.image = image
        self.height, self.width = image.shape[:2]

    def read(self, window: Window) -> tuple[np.ndarray, None]:
        x0, y0, x1, y1 = window
        return np.ascontiguousarray(self.image[y0:y1, x0:x1]), None


def is_raster(uri: str, storage_options: dict | None = None) -> bool:
    """Whether the file starts like a TIFF (GeoTIFF, COG, BigTIFF): such inputs are scenes.

    Raises `ImageError` ("read: ...") when the file cannot be read or is empty.
    """
    try:
        with open_input(uri, storage_options) as f:
            head = f.read(4)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("read", "file not found") from None
    except Exception as error:  # noqa: BLE001 - any storage failure becomes an error row
        raise ImageError("read", one_line_reason(error)) from None
    if not head:
        raise ImageError("read", "file is empty (0 bytes)")
    return head in TIFF_MAGIC


class RasterScene:
    """A raster opened for windowed reading; use as a context manager.

    bands: 1-based band indexes used as RGB (None = the first three that are not alpha; one
    band is repeated as gray, or coloured through its palette); nodata: overrides the file's
    nodata value. Pixels are valid where any chosen band differs from nodata (and is not NaN),
    or, for files without a nodata value, where GDAL's dataset mask (alpha band or internal
    mask) says so.
    """

    def __init__(
        self,
        uri: str,
        storage_options: dict | None = None,
        bands: Sequence[int] | None = None,
        nodata: float | None = None,
    ) -> None:
        import rasterio

        self._rasterio = rasterio
        fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
        try:
            local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
            self._src = rasterio.open(path) if local else rasterio.open(path, opener=fs.open)
        except rasterio.errors.RasterioError as error:
            raise ImageError("decode", f"raster open failed: {raster_error_reason(error)}") from None
        try:
            self._describe(bands, nodata)
        except BaseException:
            self._src.close()
            raise

    def _describe(self, bands: Sequence[int] | None, nodata: float | None) -> None:
        src = self._src
        self.width, self.height = src.width, src.height
        if self.width <= 0 or self.height <= 0:
            raise ImageError("decode", f"image has no pixels ({self.width}x{self.height})")
        if self.width * self.height > MAX_SCENE_PIXELS:
            raise ImageError("decode", f"header claims {self.width}x{self.height} pixels, over {MAX_SCENE_PIXELS}")
        self.bands = rgb_bands(src, bands)
        self.palette = palette_colours(src, self.bands)
        self.crs = src.crs
        self.transform = src.transform if src.crs is not None else None
        self.nodata = nodata if nodata is not None else src.nodata
        self._use_dataset_mask = self.nodata is None and any(
            flag.name in ("per_dataset", "alpha") for flag in src.mask_flag_enums[self.bands[0] - 1]
        )
        plain = self.palette is not None or src.dtypes[self.bands[0] - 1] == "uint8"
        self.stretch = None if plain else self._stretch_limits()

    def __enter__(self) -> RasterScene:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._src.close()

    def _stretch_limits(self) -> tuple[float, float]:
        """Percentile limits of the valid pixels of a read decimated to STRETCH_SAMPLE_SIDE."""
        scale = max(1.0, max(self.width, self.height) / STRETCH_SAMPLE_SIDE)
        shape = (max(1, round(self.height / scale)), max(1, round(self.width / scale)))
        pixels = self._guarded(lambda: self._src.read(self.bands, out_shape=(len(self.bands), *shape)))
        valid = self._valid(pixels, lambda: self._src.dataset_mask(out_shape=shape))
        sample = pixels[:, valid] if valid is not None else pixels
        return stretch_limits(sample)

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray | None]:
        x0, y0, x1, y1 = window
        rio_window = self._rasterio.windows.Window(x0, y0, x1 - x0, y1 - y0)
        pixels = self._guarded(lambda: self._src.read(self.bands, window=rio_window))
        valid = self._valid(pixels, lambda: self._src.dataset_mask(window=rio_window))
        if self.palette is not None:
            rgb = apply_palette(pixels, self.palette)
        else:
            rgb = pixels if self.stretch is None else apply_stretch(pixels, *self.stretch)
        if valid is not None:
            rgb = np.where(valid, rgb, 0).astype(np.uint8)
        if rgb.shape[0] == 1:
            rgb = np.repeat(rgb, 3, axis=0)
        return np.ascontiguousarray(np.moveaxis(rgb, 0, -1)), valid

    def _valid(self, pixels: np.ndarray, dataset_mask) -> np.ndarray | None:
        """Valid pixels (h, w) of bands (C, h, w) under the scene's nodata rule, None if all are."""
        invalid = np.zeros(pixels.shape[1:], dtype=bool)
        if self.nodata is not None:
            nodata = self.nodata
            invalid |= np.all(np.isnan(pixels) if np.isnan(nodata) else pixels == nodata, axis=0)
        elif self._use_dataset_mask:
            invalid |= self._guarded(dataset_mask) == 0
        if pixels.dtype.kind == "f":
            invalid |= np.any(np.isnan(pixels), axis=0)
        return ~invalid if invalid.any() else None

    def _guarded(self, read):
        try:
            return read()
        except self._rasterio.errors.RasterioError as error:
            raise ImageError("decode", f"raster read failed: {raster_error_reason(error)}") from None
