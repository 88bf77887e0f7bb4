"""Error wording shared by every stage: an input's failures as one line naming the stage and
the reason, the same on every run (no object addresses, no temporary file names)."""

from __future__ import annotations

import re

OBJECT_REPR = re.compile(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>")  # e.g. PIL's "<_io.BytesIO object at 0x7f…>"


class ImageError(Exception):
    """An input that cannot be turned into an image; `stage` is read or decode."""

    def __init__(self, stage: str, reason: str) -> None:
        self.stage = stage
        super().__init__(f"{stage}: {reason}")


def one_line_reason(error: BaseException, *, typed: bool = False) -> str:
    """The error's message on one line, without object addresses (the same on every run); its
    type's name when it has no message. `typed`: always led by the type's name (`Type: message`)."""
    text = " ".join(OBJECT_REPR.sub("", str(error)).split())[:300]
    if not text:
        return type(error).__name__
    return f"{type(error).__name__}: {text}" if typed else text


def raster_error_reason(error: Exception) -> str:
    """GDAL's own reason for a rasterio error, on one line, without the temporary file name."""
    cause = error.__cause__ or error
    text = " ".join(str(cause.args[-1] if cause.args else cause).split())
    return re.sub(r"^(/vsi\w+/)?[0-9a-f-]{32,36}\.?\w*/*, ?", "", text)[:300]
