"""The writers of `sam-batch export`: GIS layers (GDAL through pyogrio), GeoParquet, COCO JSON
and amg.py's folders. Each takes the filtered rows as a stream of Arrow record batches
(`export_source.CommittedMasks.batches`) and writes them as they come, holding one batch (and,
for amg.py's folders, one image's metadata lines) at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from sam_batch.jobs.export_source import ImageInfo
from sam_batch.pipeline.rle import decode_rle, encode_rle_placed

GDAL_DRIVERS = {"gpkg": "GPKG", "fgb": "FlatGeobuf", "geojson": "GeoJSON", "geojsonseq": "GeoJSONSeq"}
GIS_LAYER = "masks"  # the layer name in a GeoPackage
AMG_HEADER = (  # scripts/amg.py's metadata.csv header in segment-anything
    "id,area,bbox_x0,bbox_y0,bbox_w,bbox_h,point_input_x,point_input_y,predicted_iou,"
    "stability_score,crop_box_x0,crop_box_y0,crop_box_w,crop_box_h"
)
DEFAULT_CATEGORY = "object"  # COCO's one category when the output has no `label` column
BOX_COLUMNS = ("box_segmentation", "box_origin")  # a mask as RLE over its own box, where `segmentation` is null


@dataclass
class ExportCounts:
    """What an export selected (rows that passed the SQL filters) and wrote; `skipped` counts
    rows selected but not written, by reason."""

    selected: int = 0
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, n: int) -> None:
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n


# -- masks as pixels ---------------------------------------------------------------------------


def full_rle(row: dict) -> dict:
    """The mask of a row as COCO compressed RLE over the whole image ({"size": [H, W], "counts"}):
    `segmentation`, or, where it is null, `box_segmentation` placed at `box_origin` in an image of
    the row's `height` x `width` (no full-size mask is built)."""
    if row.get("segmentation") is not None:
        return row["segmentation"]
    pixels, x0, y0 = box_pixels(row)
    return encode_rle_placed(pixels, x0, y0, (row["height"], row["width"]))


def box_pixels(row: dict) -> tuple[np.ndarray, int, int]:
    """The mask of a row as the bool (h, w) pixels of a box and the box's origin (x0, y0) in
    image pixels: `box_segmentation` where present, else `segmentation` cut to `bbox` (XYWH,
    whose far edge pixel is x0 + w as SAM's boxes count it)."""
    if row.get("segmentation") is None and row.get("box_segmentation") is not None:
        x0, y0 = row["box_origin"]
        return decode_rle(row["box_segmentation"]), int(x0), int(y0)
    x, y, w, h = (int(v) for v in row["bbox"])
    return decode_rle(row["segmentation"])[y : y + h + 1, x : x + w + 1], x, y


def full_mask(row: dict) -> np.ndarray:
    """The mask of a row as a bool (H, W) image."""
    if row.get("segmentation") is not None:
        return decode_rle(row["segmentation"])
    pixels, x0, y0 = box_pixels(row)
    image = np.zeros((row["height"], row["width"]), dtype=bool)
    image[y0 : y0 + pixels.shape[0], x0 : x0 + pixels.shape[1]] = pixels
    return image


def coco_polygons(pixels: np.ndarray, x0: int, y0: int) -> list[list[float]]:
    """COCO polygons of a mask: the outer ring of each 4-connected part, along its pixels' edges,
    as flat [x1, y1, x2, y2, ...] in image pixels (holes are not representable: COCO fills them)."""
    from rasterio.features import shapes
    from rasterio.transform import Affine

    rings = [
        geometry["coordinates"][0]
        for geometry, _ in shapes(
            pixels.astype(np.uint8), mask=pixels, connectivity=4, transform=Affine.translation(x0, y0)
        )
    ]
    return [[float(c) for point in ring for c in point] for ring in rings]


def pixel_columns(names: list[str]) -> list[str]:
    """The columns that hold a mask's pixels, of those the output has."""
    return ["segmentation", "height", "width", *(c for c in BOX_COLUMNS if c in names)]


# -- GIS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VectorOptions:
    """How masks become features: `target_crs` (a pyproj label or WKT) of the file; `simplify`
    tolerance and area bounds in its map units (area: squared, before simplifying; inclusive)."""

    target_crs: str
    simplify: float | None = None
    min_area: float | None = None
    max_area: float | None = None
    label: bool = False


def vector_columns(options: VectorOptions) -> list[str]:
    """The joined columns the GIS writers read."""
    return [
        "image_uri",
        "image_id",
        "mask_id",
        "area",
        "predicted_iou",
        "stability_score",
        *(["label"] if options.label else []),
        "crs",
        "geometry",
    ]


def feature_schema(options: VectorOptions) -> pa.Schema:
    """The attributes of each feature (one per mask) and its WKB MultiPolygon `geometry`."""
    return pa.schema(
        [
            ("image_uri", pa.string()),
            ("image_id", pa.string()),
            ("mask_id", pa.int32()),
            ("area_px", pa.int64()),
            ("predicted_iou", pa.float32()),
            ("stability_score", pa.float32()),
            *([("label", pa.string())] if options.label else []),
            ("geometry", pa.binary()),
        ]
    )


def feature_batches(
    batches: Iterable[pa.RecordBatch], options: VectorOptions, counts: ExportCounts
) -> Iterator[pa.RecordBatch]:
    """Rows → features in `options.target_crs`: reprojected, filtered by area, simplified, valid
    MultiPolygons; rows without a geometry (photos) or with no area left are skipped."""
    import shapely

    from sam_batch.pipeline.vectors import from_wkb, reproject, simplify, valid_multipolygons

    schema = feature_schema(options)
    for batch in batches:
        counts.selected += batch.num_rows
        geometries = from_wkb(batch.column("geometry").to_pylist())
        crs = np.asarray(batch.column("crs").to_pylist(), dtype=object)
        counts.skip("no geometry (not georeferenced)", int(shapely.is_missing(geometries).sum()))
        for source in set(crs.tolist()) - {None, options.target_crs}:
            chosen = crs == source
            geometries[chosen] = reproject(geometries[chosen], source, options.target_crs)
        keep = ~shapely.is_missing(geometries)
        areas = shapely.area(geometries)
        outside = keep & (
            (areas < options.min_area if options.min_area is not None else False)
            | (areas > options.max_area if options.max_area is not None else False)
        )
        counts.skip("outside the area range", int(outside.sum()))
        keep &= ~outside
        kept = geometries[keep]
        if options.simplify:
            kept = simplify(kept, options.simplify)
        kept = valid_multipolygons(kept)
        present = ~shapely.is_missing(kept)
        counts.skip("no area left once valid", int((~present).sum()))
        rows = np.flatnonzero(keep)[present]
        columns = {name: batch.column(name).take(pa.array(rows)) for name in schema.names if name in batch.schema.names}
        columns["area_px"] = batch.column("area").take(pa.array(rows))
        columns["geometry"] = pa.array(shapely.to_wkb(kept[present]), type=pa.binary())
        counts.written += len(rows)
        yield pa.record_batch([columns[name].cast(schema.field(name).type) for name in schema.names], schema=schema)


def write_gdal(
    path: str, driver: str, batches: Iterable[pa.RecordBatch], options: VectorOptions, counts: ExportCounts
) -> None:
    """One layer of MultiPolygons through GDAL (pyogrio's Arrow stream writer), batch by batch."""
    import pyogrio
    from pyproj import CRS

    stream = pa.RecordBatchReader.from_batches(feature_schema(options), feature_batches(batches, options, counts))
    pyogrio.write_arrow(
        stream,
        path,
        driver=driver,
        layer=GIS_LAYER if driver == "GPKG" else None,
        geometry_name="geometry",
        geometry_type="MultiPolygon",
        crs=CRS.from_user_input(options.target_crs).to_wkt(),
    )


def write_geoparquet(
    path: str, batches: Iterable[pa.RecordBatch], options: VectorOptions, counts: ExportCounts
) -> None:
    """One GeoParquet 1.1 file (WKB MultiPolygons, PROJJSON CRS), one row group per batch."""
    import pyarrow.parquet as pq
    from pyproj import CRS

    column = {
        "encoding": "WKB",
        "geometry_types": ["MultiPolygon"],
        "crs": CRS.from_user_input(options.target_crs).to_json_dict(),
    }
    geo = {"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}
    schema = feature_schema(options).with_metadata({b"geo": json.dumps(geo).encode()})
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for batch in feature_batches(batches, options, counts):
            writer.write_batch(batch.replace_schema_metadata(schema.metadata))


# -- COCO --------------------------------------------------------------------------------------


def coco_columns(names: list[str]) -> list[str]:
    return [
        "image_id",
        "bbox",
        "area",
        "predicted_iou",
        "stability_score",
        *(["label"] if "label" in names else []),
        *pixel_columns(names),
    ]


def write_coco(
    path: str,
    batches: Iterable[pa.RecordBatch],
    images: list[ImageInfo],
    polygons: bool,
    counts: ExportCounts,
    source_uri: str,
) -> None:
    """COCO JSON, written as a stream: the annotations one by one as they come, then `images`
    (every `ok` image: file_name its URI, width, height) and `categories` (one, or one per
    `label` value in order of appearance). Segmentation: compressed RLE over the whole image, or
    polygons; `score` is `predicted_iou`."""
    image_ids = {image.image_id: number for number, image in enumerate(images, start=1)}
    categories: dict[str, int] = {}
    with open(path, "w", encoding="utf-8") as out:
        out.write('{"info": ' + json.dumps({"description": f"sam-batch export of {source_uri}"}))
        out.write(', "licenses": [], "annotations": [')
        for batch in batches:
            counts.selected += batch.num_rows
            for row in batch.to_pylist():
                category = categories.setdefault(row.get("label") or DEFAULT_CATEGORY, len(categories) + 1)
                annotation = {
                    "id": counts.written + 1,
                    "image_id": image_ids[row["image_id"]],
                    "category_id": category,
                    "segmentation": coco_polygons(*box_pixels(row)) if polygons else full_rle(row),
                    "area": row["area"],
                    "bbox": row["bbox"],
                    "iscrowd": 0,
                    "score": row["predicted_iou"],
                    "stability_score": row["stability_score"],
                }
                out.write(("," if counts.written else "") + "\n" + json.dumps(annotation))
                counts.written += 1
        entries = [
            {"id": image_ids[i.image_id], "file_name": i.image_uri, "width": i.width, "height": i.height}
            for i in images
        ]
        out.write('\n], "images": ' + json.dumps(entries))
        names = categories or {DEFAULT_CATEGORY: 1}
        out.write(', "categories": ' + json.dumps([{"id": n, "name": name} for name, n in names.items()]) + "}\n")


# -- amg.py's folders --------------------------------------------------------------------------


def amg_columns(names: list[str]) -> list[str]:
    return [
        "image_id",
        "area",
        "bbox",
        "point_coords",
        "predicted_iou",
        "stability_score",
        "crop_box",
        *pixel_columns(names),
    ]


def folder_names(images: list[ImageInfo]) -> dict[str, str]:
    """image_id → folder name: the file name without its extension, as amg.py names it; a name
    taken by an earlier image gets the image_id after a dash."""
    names: dict[str, str] = {}
    taken: set[str] = set()
    for image in images:
        stem = os.path.splitext(image.image_uri.rstrip("/").rsplit("/", 1)[-1])[0] or image.image_id
        names[image.image_id] = stem if stem not in taken else f"{stem}-{image.image_id}"
        taken.add(names[image.image_id])
    return names


def amg_metadata_line(index: int, row: dict) -> str:
    """One line of amg.py's metadata.csv: its columns, its number spellings (integer boxes)."""
    values = [
        index,
        row["area"],
        *(_number(v) for v in row["bbox"]),
        *row["point_coords"][0],
        row["predicted_iou"],
        row["stability_score"],
        *row["crop_box"],
    ]
    return ",".join(str(v) for v in values)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def write_amg_folders(
    path: str, batches: Iterable[pa.RecordBatch], images: list[ImageInfo], counts: ExportCounts
) -> None:
    """A folder per `ok` image holding `<i>.png` (0/255 grayscale, full image size) for its
    i-th exported mask and `metadata.csv` (amg.py's header, one line per mask)."""
    from PIL import Image

    names = folder_names(images)
    os.makedirs(path)
    lines: dict[str, list[str]] = {}
    done: set[str] = set()

    def finish(image_id: str) -> None:
        with open(os.path.join(path, names[image_id], "metadata.csv"), "w", encoding="utf-8") as f:
            f.write("\n".join([AMG_HEADER, *lines.pop(image_id)]))
        done.add(image_id)

    for batch in batches:
        counts.selected += batch.num_rows
        for row in batch.to_pylist():
            image_id = row["image_id"]
            if image_id not in lines:
                for previous in list(lines):
                    finish(previous)
                os.makedirs(os.path.join(path, names[image_id]))
                lines[image_id] = []
            index = len(lines[image_id])
            Image.fromarray(full_mask(row).astype(np.uint8) * 255).save(
                os.path.join(path, names[image_id], f"{index}.png")
            )
            lines[image_id].append(amg_metadata_line(index, row))
            counts.written += 1
    for image_id in list(lines):
        finish(image_id)
    for image in images:
        if image.image_id not in done:
            os.makedirs(os.path.join(path, names[image.image_id]))
            lines[image.image_id] = []
            finish(image.image_id)
