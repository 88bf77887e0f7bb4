"""Scenes: images read one window at a time, as RGB uint8 plus the mask of valid pixels.

A `RasterScene` is a raster file (GeoTIFF, COG, any GDAL format) opened with rasterio, so a
window costs only the bytes of the blocks under it, never the whole file: on S3 through GDAL's
own reader (which merges and overlaps its range requests), on other object stores through
fsspec in range requests of `REMOTE_BLOCK_BYTES` kept in a block cache (docs/benchmarks.md,
"Rasters on S3"). Per scene, once, it picks the three bands, finds the
nodata rule and, for data that is not uint8, the stretch limits (2nd and 98th percentiles of the valid pixels of a
decimated read, which GDAL serves from overviews where the file has them): every tile is then
stretched alike and seams do not change colour. An `ArrayScene` gives the same view of a
photo already decoded in memory.

The band, palette and stretch rules that every raster read follows live here too
(`rgb_bands`, `palette_colours`, `stretch_limits`, `apply_stretch`), as does `decode_raster`,
a TIFF's bytes read whole (`images.decode_image` hands TIFFs to it).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Protocol

import fsspec
import numpy as np
from fsspec.caching import BlockCache, register_cache

from sam_batch.pipeline.errors import ImageError, raster_error_reason
from sam_batch.pipeline.inputs import TIFF_MAGIC_BYTES, check_size, read_bytes, starts_like_tiff

Window = tuple[int, int, int, int]  # XYXY in scene pixels, end exclusive
MAX_RASTER_PIXELS = 30_000 * 30_000  # a TIFF read whole (`decode_raster`) is refused beyond this
MAX_SCENE_PIXELS = 200_000 * 200_000  # a header beyond this is not a scene but a broken file
# a file whose header claims more pixels than this per byte of the file is sparse or broken, not
# a scene worth planning: deflate packs at most about 1,000 bytes into one, 3 bands of zeros at most
# about 3,000 pixels a byte; a sparse 150,000^2 TIFF of 700 KB claims 32,000 (README, "Scenes")
MAX_PIXELS_PER_FILE_BYTE = 10_000
STRETCH_SAMPLE_SIDE = 1024  # the decimated read for stretch limits is at most this a side
# s3fs storage options and the argument of rasterio's AWSSession each is (`gdal_s3_session`)
S3FS_TO_SESSION = {
    "key": "aws_access_key_id",
    "secret": "aws_secret_access_key",
    "token": "aws_session_token",
    "profile": "profile_name",
    "anon": "aws_unsigned",
}
# storage options that only tune fsspec's own caching, nothing GDAL would read differently
FSSPEC_ONLY_OPTIONS = frozenset(
    {
        "skip_instance_cache",
        "use_listings_cache",
        "listings_expiry_time",
        "max_paths",
        "default_block_size",
        "default_fill_cache",
        "default_cache_type",
    }
)
REMOTE_BLOCK_BYTES = 2 * 2**20  # one range request of a remote raster (docs/benchmarks.md, "Rasters on S3")
PARALLEL_BLOCK_READS = 8  # range requests at once when a window's blocks are fetched ahead of its read


class Scene(Protocol):
    """What tiling needs of an image: its size, georeferencing and windows of pixels."""

    width: int
    height: int
    crs: object | None  # rasterio CRS when georeferenced
    transform: object | None  # rasterio Affine (pixel corner -> CRS) when georeferenced

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray | None]:
        """RGB uint8 (h, w, 3) of the window and its valid pixels, bool (h, w) or None if all are."""

    def read_decimated(self, window: Window, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        """`read` of the window brought to `shape` (h, w) pixels, fewer than the window's."""


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

    def read_decimated(self, window: Window, shape: tuple[int, int]) -> tuple[np.ndarray, None]:
        """The window averaged down to `shape` (h, w) (PIL's box filter)."""
        from PIL import Image

        rgb, _ = self.read(window)
        return np.asarray(Image.fromarray(rgb).resize(shape[::-1], Image.Resampling.BOX)), None


def is_raster(uri: str, storage_options: dict | None = None) -> bool:
    """Whether the file starts like a TIFF (GeoTIFF, COG, BigTIFF): such inputs are scenes.

    Raises `ImageError` ("read: ...") when the file cannot be read or is empty.
    """
    return starts_like_tiff(read_bytes(uri, storage_options, limit=TIFF_MAGIC_BYTES))


def gdal_s3_session(storage_options: dict):
    """GDAL's S3 reader set up with what s3fs's `storage_options` say (credentials, endpoint,
    region, profile, anonymous access): a rasterio `AWSSession` and the GDAL settings beside
    it; None when the options hold anything else (GDAL might then read otherwise than s3fs
    would) or boto3, through which rasterio hands GDAL credentials, is not installed. Without
    credentials in the options, boto3 finds them as s3fs's botocore does (environment, ~/.aws,
    instance metadata). The session holds secrets: it goes only to GDAL."""
    options = {k: v for k, v in storage_options.items() if k not in FSSPEC_ONLY_OPTIONS}
    client = dict(options.pop("client_kwargs", None) or {})
    endpoint = options.pop("endpoint_url", None) or client.pop("endpoint_url", None)
    session_args = {S3FS_TO_SESSION[k]: options.pop(k) for k in list(options) if k in S3FS_TO_SESSION}
    if "region_name" in client:
        session_args["region_name"] = client.pop("region_name")
    if options or client:
        return None
    settings = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR"}  # no listing of the scene's folder
    if endpoint:
        scheme, _, host = str(endpoint).partition("://")
        if scheme not in ("http", "https") or not host.rstrip("/") or "/" in host.rstrip("/"):
            return None
        session_args["endpoint_url"] = host.rstrip("/")
        settings.update(AWS_HTTPS="YES" if scheme == "https" else "NO", AWS_VIRTUAL_HOSTING="FALSE")
    try:
        from rasterio.session import AWSSession

        return AWSSession(**session_args), settings
    except ImportError:  # boto3
        return None


def _size_or_none(fs: fsspec.AbstractFileSystem, path: str) -> int | None:
    """The file's size in bytes, None where the store cannot say (then no sparseness check)."""
    try:
        return fs.size(path)
    except Exception:  # noqa: BLE001 - opening the raster reports a missing or unreadable file
        return None


class PrefetchedBlocks(BlockCache):
    """fsspec's block cache (blocks of the file's block size, one range request each, the last
    `maxblocks` kept) that can also be told which byte ranges a read is about to need (`fetch_ahead`):
    their blocks are then fetched at once, `PARALLEL_BLOCK_READS` requests at a time, instead of
    one after another as GDAL asks for them."""

    name = "sam_batch_prefetched_blocks"

    def fetch_ahead(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Fetch the blocks under byte `ranges` ((start, end), end exclusive), at most `maxblocks`."""
        numbers = sorted(
            {
                number
                for start, end in ranges
                if 0 <= start < end
                for number in range(start // self.blocksize, (min(end, self.size) - 1) // self.blocksize + 1)
            }
        )[: self.maxblocks]
        if len(numbers) > 1:
            with ThreadPoolExecutor(min(PARALLEL_BLOCK_READS, len(numbers))) as pool:
                list(pool.map(self._fetch_block_cached, numbers))


register_cache(PrefetchedBlocks, clobber=True)


class BlockReads:
    """The filesystem rasterio reads a remote raster through: `fs` itself, but each file opened
    to read in blocks of `REMOTE_BLOCK_BYTES` kept in a `PrefetchedBlocks` cache, instead of the
    back-end's default (s3fs: 50 MiB read ahead, the whole of most files). `fetch_ahead` fetches
    the blocks of byte ranges of every file it opened, requests in parallel."""

    def __init__(self, fs: fsspec.AbstractFileSystem) -> None:
        self._fs = fs
        self._opened: list = []

    def open(self, path: str, mode: str = "rb", **kwargs):
        file = self._fs.open(path, mode, block_size=REMOTE_BLOCK_BYTES, cache_type=PrefetchedBlocks.name, **kwargs)
        self._opened.append(file)
        return file

    def fetch_ahead(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Fetch the blocks under byte `ranges` of the files opened here that are still open.
        Best effort: a block that fails here is asked for again by the read that needs it, whose
        failure is then the read's error."""
        self._opened = [file for file in self._opened if not file.closed]
        for file in self._opened:
            cache = getattr(file, "cache", None)  # files of stores that stream have none
            if isinstance(cache, PrefetchedBlocks):
                try:
                    cache.fetch_ahead(ranges)
                except Exception:  # noqa: BLE001 - the read that follows reports the failure
                    continue

    def __getattr__(self, name: str):
        return getattr(self._fs, name)


def tiff_block_ranges(src, bands: Sequence[int], window: Window) -> list[tuple[int, int]]:
    """Byte ranges (start, end exclusive) of the TIFF blocks (tiles or strips) under an XYXY
    `window` of rasterio dataset `src`, for `bands` at full resolution; [] where GDAL does not
    say where a block lies (not a TIFF). Blocks never written (sparse files) have no range."""
    x0, y0, x1, y1 = window
    block_height, block_width = src.block_shapes[bands[0] - 1]
    ranges = set()
    for band in dict.fromkeys(bands):
        for row in range(y0 // block_height, (y1 - 1) // block_height + 1):
            for column in range(x0 // block_width, (x1 - 1) // block_width + 1):
                offset = src.get_tag_item(f"BLOCK_OFFSET_{column}_{row}", "TIFF", bidx=band)
                size = src.get_tag_item(f"BLOCK_SIZE_{column}_{row}", "TIFF", bidx=band)
                if offset is None or size is None:
                    return []
                if int(offset) > 0 and int(size) > 0:
                    ranges.add((int(offset), int(offset) + int(size)))
    return sorted(ranges)


class RasterScene:
    """A raster opened for windowed reading; use as a context manager.

    bands: 1-based band indexes used as RGB (None = the first three that are not alpha; one
    band is repeated as gray, or coloured through its palette); nodata: overrides the file's
    nodata value; stretch: limits an earlier opening of the same file computed (`stretch`),
    so that a tile read elsewhere is stretched alike without computing them again.
    Pixels are valid where any chosen band differs from nodata (and is not NaN),
    or, for files without a nodata value, where GDAL's dataset mask (alpha band or internal
    mask) says so.
    """

    def __init__(
        self,
        uri: str,
        storage_options: dict | None = None,
        bands: Sequence[int] | None = None,
        nodata: float | None = None,
        stretch: tuple[float, float] | None = None,
    ) -> None:
        import rasterio

        self._rasterio = rasterio
        self._open = ExitStack()  # GDAL's S3 settings, if any, then the dataset: closed in reverse
        try:
            self._src = self._open_dataset(uri, storage_options or {})
            self._describe(bands, nodata, stretch)
        except rasterio.errors.RasterioError as error:
            self._open.close()
            raise ImageError("decode", f"raster open failed: {raster_error_reason(error)}") from None
        except BaseException:
            self._open.close()
            raise

    def _open_dataset(self, uri: str, storage_options: dict):
        """The rasterio dataset of `uri`: a local path directly; on S3 through GDAL's own reader
        where `gdal_s3_session` can hand it the job's storage options; any other store through
        its fsspec filesystem (`BlockReads`)."""
        rasterio = self._rasterio
        self._block_reads: BlockReads | None = None
        fs, path = fsspec.core.url_to_fs(uri, **storage_options)
        self._file_bytes = _size_or_none(fs, path)
        protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
        if "file" in protocols:
            return self._open.enter_context(rasterio.open(path))
        if "s3" in protocols and (gdal_s3 := gdal_s3_session(storage_options)) is not None:
            session, settings = gdal_s3
            self._open.enter_context(rasterio.Env(session=session, **settings))
            return self._open.enter_context(rasterio.open(f"s3://{path}"))
        self._block_reads = BlockReads(fs)
        return self._open.enter_context(rasterio.open(path, opener=self._block_reads))

    def _describe(self, bands: Sequence[int] | None, nodata: float | None, stretch: tuple[float, float] | None) -> None:
        src = self._src
        self.width, self.height = src.width, src.height
        if self.width <= 0 or self.height <= 0:
            raise ImageError("decode", f"image has no pixels ({self.width}x{self.height})")
        if self.width * self.height > MAX_SCENE_PIXELS:
            raise ImageError("decode", f"header claims {self.width}x{self.height} pixels, over {MAX_SCENE_PIXELS}")
        if self._file_bytes and self.width * self.height > MAX_PIXELS_PER_FILE_BYTE * self._file_bytes:
            raise ImageError(
                "decode",
                f"header claims {self.width}x{self.height} pixels in a file of "
                f"{self._file_bytes} bytes, over {MAX_PIXELS_PER_FILE_BYTE} pixels a byte: "
                "a sparse or broken raster",
            )
        self.bands = rgb_bands(src, bands)
        self.palette = palette_colours(src, self.bands)
        self.crs = src.crs
        self.transform = src.transform if src.crs is not None else None
        self.nodata = nodata if nodata is not None else src.nodata
        self._use_dataset_mask = self.nodata is None and any(
            flag.name in ("per_dataset", "alpha") for flag in src.mask_flag_enums[self.bands[0] - 1]
        )
        plain = self.palette is not None or src.dtypes[self.bands[0] - 1] == "uint8"
        self.stretch = None if plain else (stretch or self._stretch_limits())

    def __enter__(self) -> RasterScene:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._open.close()

    def _stretch_limits(self) -> tuple[float, float]:
        """Percentile limits of the valid pixels of a read decimated to STRETCH_SAMPLE_SIDE."""
        scale = max(1.0, max(self.width, self.height) / STRETCH_SAMPLE_SIDE)
        shape = (max(1, round(self.height / scale)), max(1, round(self.width / scale)))
        pixels = self._guarded(lambda: self._src.read(self.bands, out_shape=(len(self.bands), *shape)))
        valid = self._valid(pixels, lambda: self._src.dataset_mask(out_shape=shape))
        sample = pixels[:, valid] if valid is not None else pixels
        return stretch_limits(sample)

    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray | None]:
        return self._read(window, None)

    def read_decimated(self, window: Window, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        """The window read at `shape` (h, w): from the file's overviews where it has them,
        averaged (GDAL's `average` resampling)."""
        return self._read(window, shape)

    def _read(self, window: Window, shape: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray | None]:
        x0, y0, x1, y1 = window
        rio_window = self._rasterio.windows.Window(x0, y0, x1 - x0, y1 - y0)
        sized = {} if shape is None else {"resampling": self._rasterio.enums.Resampling.average}
        out_shape = None if shape is None else (len(self.bands), *shape)
        if shape is None and self._block_reads is not None:
            self._block_reads.fetch_ahead(tiff_block_ranges(self._src, self.bands, window))
        pixels = self._guarded(lambda: self._src.read(self.bands, window=rio_window, out_shape=out_shape, **sized))
        valid = self._valid(pixels, lambda: self._src.dataset_mask(window=rio_window, out_shape=shape))
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


def decode_raster(data: bytes, bands: Sequence[int] | None) -> np.ndarray:
    """A TIFF's bytes, read whole, as RGB uint8 (H, W, 3): `rgb_bands`, a palette's colours, or
    data that is not uint8 stretched (`stretch_limits`)."""
    import rasterio
    from rasterio.io import MemoryFile

    try:
        with MemoryFile(data) as memfile, memfile.open() as src:
            check_size(src.width, src.height, MAX_RASTER_PIXELS)
            chosen = rgb_bands(src, bands)
            palette = palette_colours(src, chosen)
            pixels = src.read(chosen)
    except ImageError:
        raise
    except rasterio.errors.RasterioError as error:
        raise ImageError("decode", f"raster read failed: {raster_error_reason(error)}") from None
    if palette is not None:
        pixels = apply_palette(pixels, palette)
    elif pixels.dtype != np.uint8:
        pixels = stretch_to_uint8(pixels)
    if pixels.shape[0] == 1:
        return gray_to_rgb(pixels)
    return np.ascontiguousarray(np.moveaxis(pixels, 0, -1))


def rgb_bands(src, bands: Sequence[int] | None) -> list[int]:
    """The 1-based bands of rasterio dataset `src` shown as RGB: `bands` as given, else the
    first three that are not alpha (one band is shown as gray; the alpha band marks the valid
    pixels through the dataset mask). `ImageError` for a band the file lacks, two bands, or
    complex pixels."""
    not_alpha = [b for b, colour in zip(src.indexes, src.colorinterp) if colour.name != "alpha"]
    chosen = list(bands) if bands else (not_alpha or list(src.indexes))[:3]
    if max(chosen) > src.count:
        raise ImageError("decode", f"bands {chosen} asked for, the file has {src.count}")
    if len(chosen) == 2:
        raise ImageError("decode", f"bands {chosen}: two bands have no RGB view; set raster.bands")
    dtypes = {src.dtypes[b - 1] for b in chosen}
    if any(np.dtype(d).kind == "c" for d in dtypes):
        raise ImageError("decode", f"{'/'.join(sorted(dtypes))} pixels have no RGB view")
    return chosen


def palette_colours(src, bands: list[int]) -> np.ndarray | None:
    """The colours (K, 3) uint8 of index 0..K-1 when `bands` is one palette band of `src`
    (an indexed-colour or 1-bit file), else None."""
    if len(bands) != 1 or src.colorinterp[bands[0] - 1].name != "palette":
        return None
    try:
        colormap = src.colormap(bands[0])
    except ValueError:  # no colour table after all: shown as gray
        return None
    colours = np.zeros((max(colormap) + 1, 3), dtype=np.uint8)
    for index, rgba in colormap.items():
        colours[index] = rgba[:3]
    return colours


def apply_palette(pixels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Indexes (1, H, W) -> RGB (3, H, W) uint8 through `colours` (K, 3); indexes past K are black."""
    index = pixels[0].astype(np.int64)
    rgb = colours[np.clip(index, 0, len(colours) - 1)]
    rgb[(index < 0) | (index >= len(colours))] = 0
    return np.moveaxis(rgb, -1, 0)


def stretch_to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Linear stretch of (C, H, W) data between its 2nd and 98th percentiles, all bands together."""
    return apply_stretch(pixels, *stretch_limits(pixels))


def stretch_limits(pixels: np.ndarray) -> tuple[float, float]:
    """The (low, high) data values that map to 0 and 255: the 2nd and 98th percentiles of the
    finite values of `pixels` (any shape), all bands together. Flat data is placed within
    its type's own range instead; no finite data gives (0, 1).
    """
    finite = pixels[np.isfinite(pixels)] if pixels.dtype.kind == "f" else pixels.ravel()
    if finite.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(finite, [2, 98]))
    if high <= low:
        return (0.0, float(np.iinfo(pixels.dtype).max)) if pixels.dtype.kind in "iu" else (low, low + 1.0)
    return low, high


def apply_stretch(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map data linearly from [low, high] to uint8 [0, 255], clipping; NaN becomes 0."""
    scaled = (np.nan_to_num(pixels.astype(np.float64), nan=low) - low) * (255.0 / (high - low))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def gray_to_rgb(pixels: np.ndarray) -> np.ndarray:
    """One band (1, H, W) as gray RGB (H, W, 3)."""
    return np.ascontiguousarray(np.repeat(pixels[0][..., None], 3, axis=-1))
