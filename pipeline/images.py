"""Reading one input image into an RGB uint8 array, through fsspec.

Photos (JPEG, PNG, WebP, ...) are decoded with Pillow: EXIF orientation applied, any mode
(grayscale, palette, RGBA, CMYK, 16-bit) converted to RGB. TIFFs go through rasterio, bands
1-3 (or the chosen ones); data that is not uint8 is stretched to 8 bits between its 2nd and
98th percentiles. Sizes are checked from the header before any pixel is decoded.
Every failure is an `ImageError` whose message is one line naming the stage and the reason.
"""

from __future__ import annotations

import io
import os
import re
import stat
import urllib.parse
import warnings
from collections.abc import Sequence

import fsspec
import numpy as np
from PIL import Image, ImageOps

# photos with more pixels are refused (a 4 KB file can claim 12,000 x 12,000 and decode to
# filler); 64 MP keeps today's 48-61 MP cameras; larger images belong in (tiled) TIFFs
MAX_PHOTO_PIXELS = 8192 * 8192
MAX_RASTER_PIXELS = 30_000 * 30_000  # read whole into memory until windowed reading lands
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")  # e.g. PIL's "<_io.BytesIO object at 0x7f…>"


class ImageError(Exception):
    """An input that cannot be turned into an image; `stage` is read or decode."""

    def __init__(self, stage: str, reason: str) -> None:
        self.stage = stage
        super().__init__(f"{stage}: {reason}")


def open_input(uri: str, storage_options: dict | None = None):
    """`fsspec.open(uri, "rb")`, refusing a local path that is not a regular file (reading a FIFO
    or a device can block forever) with `ImageError` ("read: ..."), as it does a missing one."""
    path = urllib.parse.unquote(uri.removeprefix("file://")) if uri.startswith("file://") else uri
    if "://" not in path:
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise ImageError("read", "file not found") from None
        except OSError as error:
            raise ImageError("read", one_line_reason(error)) from None
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a special file"
            raise ImageError("read", f"{kind}, not a regular file")
    return fsspec.open(uri, "rb", **(storage_options or {}))


def read_bytes(uri: str, storage_options: dict | None = None) -> bytes:
    """The whole file behind a local path or fsspec URL."""
    try:
        with open_input(uri, storage_options) as f:
            data = f.read()
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("read", "file not found") from None
    except Exception as error:  # noqa: BLE001 - any storage failure becomes an error row
        raise ImageError("read", one_line_reason(error)) from None
    if not data:
        raise ImageError("read", "file is empty (0 bytes)")
    return data


def decode_image(data: bytes, bands: Sequence[int] | None = None) -> np.ndarray:
    """Decode file bytes into an RGB uint8 array (H, W, 3), H and W as displayed."""
    if data[:4] in TIFF_MAGIC:
        return _decode_raster(data, bands)
    return _decode_photo(data)


def load_image(uri: str, storage_options: dict | None = None, bands: Sequence[int] | None = None) -> np.ndarray:
    """`read_bytes` then `decode_image`."""
    return decode_image(read_bytes(uri, storage_options), bands)


def _decode_photo(data: bytes) -> np.ndarray:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageError("decode", f"header claims over {MAX_PHOTO_PIXELS} pixels (decompression bomb)") from None
    except Exception as error:  # noqa: BLE001
        raise ImageError("decode", f"not a readable image ({one_line_reason(error)})") from None
    _check_size(image.width, image.height, MAX_PHOTO_PIXELS)
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return _gray_to_rgb(_stretch_to_uint8(np.asarray(image)[None]))
        return np.asarray(image.convert("RGB"))
    except Exception as error:  # noqa: BLE001
        raise ImageError("decode", one_line_reason(error)) from None


def _decode_raster(data: bytes, bands: Sequence[int] | None) -> np.ndarray:
    import rasterio
    from rasterio.io import MemoryFile

    try:
        with MemoryFile(data) as memfile, memfile.open() as src:
            _check_size(src.width, src.height, MAX_RASTER_PIXELS)
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
        pixels = _stretch_to_uint8(pixels)
    if pixels.shape[0] == 1:
        return _gray_to_rgb(pixels)
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


def _stretch_to_uint8(pixels: np.ndarray) -> np.ndarray:
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


def _gray_to_rgb(pixels: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.repeat(pixels[0][..., None], 3, axis=-1))


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageError("decode", f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            "decode", f"header claims {width}x{height} pixels, over the limit of {max_pixels} (decompression bomb)"
        )


def raster_error_reason(error: Exception) -> str:
    """GDAL's own reason for a rasterio error, on one line, without the temporary file name."""
    cause = error.__cause__ or error
    text = " ".join(str(cause.args[-1] if cause.args else cause).split())
    return re.sub(r"^(/vsi\w+/)?[0-9a-f-]{32,36}\.?\w*/*, ?", "", text)[:300]


def one_line_reason(error: BaseException, *, typed: bool = False) -> str:
    """The error's message on one line, without object addresses (the same on every run); its
    type's name when it has no message. `typed`: always led by the type's name (`Type: message`)."""
    text = " ".join(OBJECT_REPR.sub("", str(error)).split())[:300]
    if not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text}" if typed else text
