"""The output tables of SPEC.md as explicit Arrow schemas, and rows → tables.

`masks`: one row per mask; `images`: one row per input image, ok or error; `candidates` (only
with `output.candidates`): one row per crop, its candidate masks before NMS. A mask is its
box-local RLE (`box_segmentation`, `box_origin`) and, for images of at most
`rle.MAX_FULL_RLE_PIXELS`, its RLE over the whole image (`segmentation`, else null). Masks of
georeferenced scenes carry `geometry` (WKB polygon in the output's CRS, reprojected from the
scene's where they differ) and its bounds in the `geometry_bbox` covering column, and their
files the GeoParquet 1.1 `geo` metadata; other images leave both null. `images` carries each
scene's own `crs` and affine `transform`.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from sam_batch.pipeline.geometry import geometry_type, geoparquet_metadata, reproject_geometries, same_crs
from sam_batch.pipeline.params import CANDIDATE_MIN_IOU, CANDIDATE_MIN_STABILITY

RLE_TYPE = pa.struct([pa.field("size", pa.list_(pa.int32())), pa.field("counts", pa.string())])
MASKS_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("mask_id", pa.int32(), nullable=False),
        pa.field("segmentation", RLE_TYPE),
        pa.field("box_segmentation", RLE_TYPE, nullable=False),
        pa.field("box_origin", pa.list_(pa.int32()), nullable=False),
        pa.field("bbox", pa.list_(pa.float64()), nullable=False),
        pa.field("area", pa.int64(), nullable=False),
        pa.field("predicted_iou", pa.float32(), nullable=False),
        pa.field("stability_score", pa.float32(), nullable=False),
        pa.field("point_coords", pa.list_(pa.list_(pa.float64())), nullable=False),
        pa.field("crop_box", pa.list_(pa.int32()), nullable=False),
        pa.field("geometry", pa.binary()),
        pa.field("geometry_bbox", pa.struct([pa.field(k, pa.float64()) for k in ("xmin", "ymin", "xmax", "ymax")])),
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
        pa.field("crs", pa.string()),
        pa.field("transform", pa.list_(pa.float64())),
    ]
)

# `output.candidates`: one row per crop of a segmented tile, its candidates before NMS
# (`pipeline.candidates`); box XYXY inclusive and crop_box XYXY exclusive, in tile pixels
CANDIDATE_TYPE = pa.struct(
    [
        pa.field("box", pa.list_(pa.int32()), nullable=False),
        pa.field("box_segmentation", RLE_TYPE, nullable=False),
        pa.field("predicted_iou", pa.float32(), nullable=False),
        pa.field("stability_score", pa.float32(), nullable=False),
        pa.field("point", pa.list_(pa.float64()), nullable=False),
    ]
)
FLOOR_KEY = b"sam_batch_candidate_floor"  # a candidates file's metadata: JSON of the two thresholds' floor
CANDIDATES_SCHEMA = pa.schema(
    [
        pa.field("image_uri", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("tile", pa.int32(), nullable=False),
        pa.field("n_tiles", pa.int32(), nullable=False),
        pa.field("nodata", pa.bool_(), nullable=False),
        pa.field("valid", RLE_TYPE),  # the tile's valid pixels where it had nodata, on its first crop's row
        pa.field("crop_index", pa.int32(), nullable=False),
        pa.field("crop_box", pa.list_(pa.int32()), nullable=False),
        pa.field("candidates", pa.list_(CANDIDATE_TYPE), nullable=False),
    ]
)


# a prompt job's extra columns (`prompts.uri`): the masks table's, then the carried ones
PROMPT_MASK_FIELDS = [
    pa.field("prompt_id", pa.string(), nullable=False),
    pa.field("mask_index", pa.int32(), nullable=False),
]
PROMPT_ERROR_TYPE = pa.struct([pa.field("prompt_id", pa.string()), pa.field("error", pa.string())])
PROMPT_IMAGE_FIELDS = [pa.field("n_prompts", pa.int32()), pa.field("prompt_errors", pa.list_(PROMPT_ERROR_TYPE))]


def prompt_schemas(carried: pa.Schema) -> tuple[pa.Schema, pa.Schema]:
    """A prompt job's masks and images schemas: the automatic job's, its prompt columns
    (`prompt_id`, `mask_index`; `n_prompts`, `prompt_errors`) and the carried columns."""
    masks = pa.schema([*MASKS_SCHEMA, *PROMPT_MASK_FIELDS, *carried])
    return masks, pa.schema([*IMAGES_SCHEMA, *PROMPT_IMAGE_FIELDS])


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
    crs: str | None = None,
    transform: list[float] | None = None,
) -> dict:
    """One row of the images table; crs and transform as in `scenes.SceneResult`."""
    return {
        "image_uri": image_uri,
        "image_id": image_id_for(image_uri),
        "status": status,
        "error": error,
        "width": width,
        "height": height,
        "n_masks": n_masks,
        "seconds": seconds,
        "crs": crs,
        "transform": transform,
    }


def masks_table(rows: list[dict], image_rows: list[dict], crs: str, schema: pa.Schema = MASKS_SCHEMA) -> pa.Table:
    """The masks of a file, their geometries in `crs` (the output's: 'EPSG:code' or WKT); with
    GeoParquet metadata when any row has a geometry.

    image_rows: the images rows of the same file, whose `crs` is each scene's own.
    """
    scene_crs = {row["image_id"]: row["crs"] for row in image_rows}
    rows = _reprojected(rows, scene_crs, crs)
    table = pa.Table.from_pylist(rows, schema=schema)
    boxes = [row["geometry_bbox"] for row in rows if row.get("geometry") is not None]
    if not boxes:
        return table
    bounds = [
        min(b["xmin"] for b in boxes),
        min(b["ymin"] for b in boxes),
        max(b["xmax"] for b in boxes),
        max(b["ymax"] for b in boxes),
    ]
    types = sorted({geometry_type(row["geometry"]) for row in rows if row.get("geometry") is not None})
    return table.replace_schema_metadata({b"geo": geoparquet_metadata(crs, bounds, types)})


def _reprojected(rows: list[dict], scene_crs: dict[str, str | None], crs: str) -> list[dict]:
    """`rows` with the geometries (and bounds) of scenes not in `crs` reprojected to it, one
    call per scene; scene_crs: image_id → the scene's CRS."""
    by_image: dict[str, list[int]] = {}
    for index, row in enumerate(rows):
        if row.get("geometry") is not None:
            by_image.setdefault(row["image_id"], []).append(index)
    rows = list(rows)
    for image_id, indexes in by_image.items():
        source = scene_crs[image_id]
        if same_crs(source, crs):
            continue
        moved = reproject_geometries([rows[i]["geometry"] for i in indexes], source, crs)
        for i, (geometry, bounds) in zip(indexes, moved):
            rows[i] = {**rows[i], "geometry": geometry, "geometry_bbox": bounds}
    return rows


def images_table(rows: list[dict], schema: pa.Schema = IMAGES_SCHEMA) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


def candidate_rows(image_uri: str, rows: list[dict]) -> list[dict]:
    """`candidates.crop_row`'s rows of one image → rows of the candidates table."""
    image_id = image_id_for(image_uri)
    return [{"image_uri": image_uri, "image_id": image_id, **row} for row in rows]


def candidates_table(rows: list[dict]) -> pa.Table:
    """The candidates of a file, with the floor they were kept at in its metadata (`FLOOR_KEY`)."""
    floor = {"pred_iou_thresh": CANDIDATE_MIN_IOU, "stability_score_thresh": CANDIDATE_MIN_STABILITY}
    table = pa.Table.from_pylist(rows, schema=CANDIDATES_SCHEMA)
    return table.replace_schema_metadata({FLOOR_KEY: json.dumps(floor).encode()})
