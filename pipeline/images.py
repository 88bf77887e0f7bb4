"""Reading one input image whole into an RGB uint8 array (H, W, 3), through fsspec.

Photos (JPEG, PNG, WebP, ...) are decoded with Pillow: EXIF orientation applied, any mode
(grayscale, palette, RGBA, CMYK, 16-bit) converted to RGB, 16-bit data stretched as rasters
are. TIFFs go to `rasters.decode_raster`. Sizes are checked from the header before any pixel
is decoded. Every failure is an `ImageError` whose message is one line naming the stage and
the reason.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from sam_batch.pipeline.errors import ImageError, one_line_reason
from sam_batch.pipeline.inputs import check_size, read_bytes, starts_like_tiff
from sam_batch.pipeline.rasters import decode_raster, gray_to_rgb, stretch_to_uint8

# photos with more pixels are refused (a 4 KB file can claim 12,000 x 12,000 and decode to
# filler); 64 MP keeps today's 48-61 MP cameras; larger images belong in (tiled) TIFFs
MAX_PHOTO_PIXELS = 8192 * 8192


def decode_image(data: bytes, bands: Sequence[int] | None = None) -> np.ndarray:
    """Decode file bytes into an RGB uint8 array (H, W, 3), H and W as displayed."""
    if starts_like_tiff(data):
        return decode_raster(data, bands)
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
    check_size(image.width, image.height, MAX_PHOTO_PIXELS)
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            return gray_to_rgb(stretch_to_uint8(np.asarray(image)[None]))
        return np.asarray(image.convert("RGB"))
    except Exception as error:  # noqa: BLE001
        raise ImageError("decode", one_line_reason(error)) from None
