"""An input's bytes through fsspec: opening (regular files only), reading whole, the TIFF sniff
that tells a scene from a photo, and the size check every decoder makes from a header."""

from __future__ import annotations

import os
import stat
import urllib.parse

import fsspec

from sam_batch.pipeline.errors import ImageError, one_line_reason

# the first bytes of a TIFF: classic and BigTIFF, either byte order (GeoTIFF, COG)
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
TIFF_MAGIC_BYTES = 4


def starts_like_tiff(head: bytes) -> bool:
    """Whether a file's first bytes (at least `TIFF_MAGIC_BYTES` of them) are a TIFF's."""
    return head[:TIFF_MAGIC_BYTES] in TIFF_MAGIC


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


def read_bytes(uri: str, storage_options: dict | None = None, limit: int | None = None) -> bytes:
    """The file behind a local path or fsspec URL: whole, or its first `limit` bytes.
    `ImageError` ("read: ...") when it cannot be read or is empty."""
    try:
        with open_input(uri, storage_options) as f:
            data = f.read() if limit is None else f.read(limit)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("read", "file not found") from None
    except Exception as error:  # noqa: BLE001 - any storage failure becomes an error row
        raise ImageError("read", one_line_reason(error)) from None
    if not data:
        raise ImageError("read", "file is empty (0 bytes)")
    return data


def check_size(width: int, height: int, max_pixels: int) -> None:
    """`ImageError` ("decode: ...") for a header with no pixels or more than `max_pixels`."""
    if width <= 0 or height <= 0:
        raise ImageError("decode", f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageError(
            "decode", f"header claims {width}x{height} pixels, over the limit of {max_pixels} (decompression bomb)"
        )
