"""The two output tables of SPEC.md as explicit Arrow schemas, and rows → tables.

`masks`: one row per mask; `images`: one row per input image, ok or error.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

MASKS_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("mask_id", pa.int32(), nullable=False),
        pa.field(
            "segmentation",
            pa.struct([pa.field("size", pa.list_(pa.int32())), pa.field("counts", pa.string())]),
            nullable=False,
        ),
        pa.field("bbox", pa.list_(pa.float64()), nullable=False),
        pa.field("area", pa.int64(), nullable=False),
        pa.field("predicted_iou", pa.float32(), nullable=False),
        pa.field("stability_score", pa.float32(), nullable=False),
        pa.field("point_coords", pa.list_(pa.list_(pa.float64())), nullable=False),
        pa.field("crop_box", pa.list_(pa.int32()), nullable=False),
    ]
)

IMAGES_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("n_masks", pa.int32(), nullable=False),
        pa.field("seconds", pa.float64(), nullable=False),
    ]
)


def image_id_for(uri: str) -> str:
    """Stable id of an input: the first 20 hex digits of sha256 over its URI as listed."""
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:20]


def mask_rows(image_uri: str, records: list[dict]) -> list[dict]:
    """`to_records` output of one image → rows of the masks table, mask_id in record order."""
    image_id = image_id_for(image_uri)
    return [
        {"image_uri": image_uri, "image_id": image_id, "mask_id": mask_id, **record}
        for mask_id, record in enumerate(records)
    ]


def image_row(
    image_uri: str,
    *,
    status: str,
    error: str | None,
    width: int | None,
    height: int | None,
    n_masks: int,
    seconds: float,
) -> dict:
    """One row of the images table."""
    return {
        "image_uri": image_uri,
        "image_id": image_id_for(image_uri),
        "status": status,
        "error": error,
        "width": width,
        "height": height,
        "n_masks": n_masks,
        "seconds": seconds,
    }


def masks_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=MASKS_SCHEMA)


def images_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=IMAGES_SCHEMA)
