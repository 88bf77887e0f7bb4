"""Reading inputs: awkward but valid images decode to RGB uint8; bad ones fail in one line."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from sam_batch.pipeline.errors import ImageError
from sam_batch.pipeline.images import decode_image, load_image
from shared_data import IMAGES


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but which holds almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def test_jpeg_photo_is_rgb_uint8() -> None:
    image = load_image(str(IMAGES / "dog.jpg"))
    assert image.shape == (534, 800, 3) and image.dtype == np.uint8


def test_uint8_geotiff_reads_bands_1_to_3_unstretched() -> None:
    import rasterio

    image = load_image(str(IMAGES / "RGB.byte.tif"))
    with rasterio.open(IMAGES / "RGB.byte.tif") as src:
        expected = np.moveaxis(src.read([1, 2, 3]), 0, -1)
    assert np.array_equal(image, expected)


def test_flat_16bit_four_band_tiff_keeps_its_level() -> None:
    image = load_image(str(IMAGES / "RGBA.uint16.tif"))  # bands 1-3 are all 10000
    assert image.shape == (411, 634, 3) and image.dtype == np.uint8
    assert np.all(image == round(10000 * 255 / 65535))


def test_16bit_tiff_is_stretched_between_percentiles(tmp_path) -> None:
    import rasterio

    ramp = np.tile(np.arange(1000, 1000 + 500 * 40, 40, dtype=np.uint16), (3, 300, 1))
    path = tmp_path / "ramp16.tif"
    with rasterio.open(path, "w", driver="GTiff", width=500, height=300, count=3, dtype="uint16") as dst:
        dst.write(ramp)
    image = load_image(str(path))
    assert image.dtype == np.uint8 and image.min() == 0 and image.max() == 255
    assert np.all(np.diff(image[0, :, 0].astype(int)) >= 0)


def test_chosen_bands_are_used() -> None:
    reversed_bands = load_image(str(IMAGES / "RGB.byte.tif"), bands=[3, 2, 1])
    default = load_image(str(IMAGES / "RGB.byte.tif"))
    assert np.array_equal(reversed_bands, default[..., ::-1])


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "LA"])
def test_other_modes_become_rgb(mode: str) -> None:
    rgb = np.asarray(Image.open(IMAGES / "dog.jpg").convert("RGB"))[:64, :96]
    source = Image.fromarray(rgb)
    converted = source.convert("I;16") if mode == "I;16" else source.convert(mode)
    image = decode_image(_png_bytes(converted))
    assert image.shape == (64, 96, 3) and image.dtype == np.uint8


def test_cmyk_jpeg_becomes_rgb() -> None:
    buffer = io.BytesIO()
    Image.open(IMAGES / "dog.jpg").convert("CMYK").save(buffer, format="JPEG")
    image = decode_image(buffer.getvalue())
    assert image.shape == (534, 800, 3)


def test_exif_orientation_is_applied() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    Image.open(IMAGES / "dog.jpg").save(buffer, format="JPEG", exif=exif)
    image = decode_image(buffer.getvalue())
    assert image.shape == (800, 534, 3)


@pytest.mark.parametrize(
    ("data", "stage", "reason"),
    [
        (b"", "read", "empty"),
        (b"this is plain text, not a picture", "decode", "not a readable image"),
        ((IMAGES / "dog.jpg").read_bytes()[:20_000], "decode", "truncated"),
        (_bomb_png(100_000, 100_000), "decode", "decompression bomb"),
    ],
    ids=["zero-bytes", "not-an-image", "truncated-jpeg", "decompression-bomb"],
)
def test_bad_inputs_fail_in_one_line(tmp_path, data: bytes, stage: str, reason: str) -> None:
    path = tmp_path / "bad.jpg"
    path.write_bytes(data)
    with pytest.raises(ImageError) as caught:
        load_image(str(path))
    message = str(caught.value)
    assert message.startswith(f"{stage}: ") and reason in message and "\n" not in message
    assert " at 0x" not in message  # no object addresses: the images row is the same on every run


def test_corrupt_geotiff_fails_at_decode() -> None:
    with pytest.raises(ImageError) as caught:
        load_image(str(IMAGES / "corrupt.tif"))
    assert str(caught.value).startswith("decode: ") and "\n" not in str(caught.value)


def test_missing_file_fails_at_read(tmp_path) -> None:
    with pytest.raises(ImageError, match="^read: file not found$"):
        load_image(str(tmp_path / "nope.jpg"))


def test_a_failure_while_segmenting_is_one_stable_line(monkeypatch) -> None:
    """An unexpected exception in the model becomes the row's `segment:` error, on one line and
    without object addresses, and the segmenter goes on with the next image."""
    from sam_batch.jobs.job_file import parse_job
    from sam_batch.jobs.worker import ImageSegmenter

    job = parse_job(
        {
            "name": "fails",
            "input": {"uris": ["x.jpg"]},
            "output": {"uri": "out"},
            "engine": {"device": "cpu"},
            "amg": {"points_per_side": 2},
        }
    )
    segmenter = ImageSegmenter(job, threads=1)
    encode = segmenter.engine.encode

    def broken(crop):
        raise RuntimeError(f"cannot encode\n{object()} of shape {crop.shape}")

    monkeypatch.setattr(segmenter.engine, "encode", broken)
    failed = segmenter.segment(str(IMAGES / "dog.jpg"))
    assert failed.image_row["status"] == "error"
    assert failed.image_row["error"] == "segment: RuntimeError: cannot encode of shape (534, 800, 3)"

    def silent(crop):
        raise RuntimeError()

    monkeypatch.setattr(segmenter.engine, "encode", silent)
    assert segmenter.segment(str(IMAGES / "dog.jpg")).image_row["error"] == "segment: RuntimeError"
    monkeypatch.setattr(segmenter.engine, "encode", encode)
    assert segmenter.segment(str(IMAGES / "dog.jpg")).image_row["status"] == "ok"


def test_one_line_reason_names_the_type_when_the_message_is_empty() -> None:
    from sam_batch.pipeline.errors import one_line_reason

    assert one_line_reason(OSError("disk\n  gone")) == "disk gone"
    assert one_line_reason(KeyError()) == "KeyError"
    assert one_line_reason(ValueError(f"bad {object()}"), typed=True) == "ValueError: bad"
    assert one_line_reason(MemoryError(), typed=True) == "MemoryError"


def test_a_photo_over_the_pixel_cap_is_refused_from_its_header() -> None:
    """A small file whose header claims 12,000 x 12,000 is refused before decoding (the cap is
    64 MP, below Pillow's own 179 MP); one at the cap's side still opens as far as its header."""
    with pytest.raises(ImageError, match=r"^decode: header claims 12000x12000 pixels, over the limit of 67108864"):
        decode_image(_bomb_png(12_000, 12_000))


def test_inputs_that_are_not_regular_files_are_read_errors(tmp_path) -> None:
    """A FIFO named like a photo would block a read forever; a folder is no image either."""
    import os

    from sam_batch.pipeline.rasters import is_raster

    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    for read in (lambda uri: load_image(uri), lambda uri: is_raster(uri)):
        with pytest.raises(ImageError, match=r"^read: a FIFO, not a regular file$"):
            read(str(fifo))
        with pytest.raises(ImageError, match=r"^read: a directory, not a regular file$"):
            read(str(folder))
        with pytest.raises(ImageError, match=r"^read: file not found$"):
            read(str(tmp_path / "missing.jpg"))


def test_the_pixel_cap_is_the_limit_exactly() -> None:
    """A header at the cap passes the size check (and fails later, holding no pixels); one
    pixel row more does not."""
    with pytest.raises(ImageError) as at_cap:
        decode_image(_bomb_png(8192, 8192))
    assert "over the limit" not in str(at_cap.value)
    with pytest.raises(ImageError, match="header claims 8192x8193 pixels, over the limit"):
        decode_image(_bomb_png(8192, 8193))


def test_file_urls_are_checked_as_the_paths_they_name(tmp_path) -> None:
    import os

    fifo = tmp_path / "my fifo.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match=r"^read: a FIFO, not a regular file$"):
        load_image(f"file://{tmp_path}/my%20fifo.jpg")
