"""Mask outlines as polygons in a scene's CRS, written as WKB, and the GeoParquet metadata.

A mask's outline follows its pixels' edges (GDAL's polygonize, 4-connected), mapped through
the scene's affine transform: pixel (col, row) spans transform @ (col, row) to
transform @ (col + 1, row + 1). One connected part gives a Polygon (with its holes), several a
MultiPolygon. The bbox covering column holds each geometry's bounds, so a spatial window is a
plain SQL filter on four numbers.
"""

from __future__ import annotations

import json
import struct

import numpy as np

GEOMETRY_TYPES = ["Polygon", "MultiPolygon"]
_WKB_POLYGON, _WKB_MULTIPOLYGON = 3, 6


def mask_geometry(pixels: np.ndarray, x0: int, y0: int, transform) -> tuple[bytes, dict[str, float]] | None:
    """WKB (little-endian) polygon of a mask and its bounds {xmin, ymin, xmax, ymax} in CRS units.

    pixels: bool (h, w) whose [0, 0] is scene pixel (x0, y0); transform: the scene's rasterio
    Affine. An empty mask has no geometry (None).
    """
    from rasterio.features import shapes
    from rasterio.transform import Affine

    placed = transform @ Affine.translation(x0, y0)
    polygons = [
        geometry["coordinates"]
        for geometry, _ in shapes(pixels.astype(np.uint8), mask=pixels, connectivity=4, transform=placed)
    ]
    if not polygons:
        return None
    points = np.concatenate([np.asarray(ring) for rings in polygons for ring in rings])
    bounds = {
        "xmin": float(points[:, 0].min()),
        "ymin": float(points[:, 1].min()),
        "xmax": float(points[:, 0].max()),
        "ymax": float(points[:, 1].max()),
    }
    if len(polygons) == 1:
        return _polygon_wkb(polygons[0]), bounds
    return struct.pack("<BII", 1, _WKB_MULTIPOLYGON, len(polygons)) + b"".join(map(_polygon_wkb, polygons)), bounds


def _polygon_wkb(rings: list) -> bytes:
    parts = [struct.pack("<BII", 1, _WKB_POLYGON, len(rings))]
    for ring in rings:
        coords = np.asarray(ring, dtype="<f8")
        parts.append(struct.pack("<I", len(coords)) + coords.tobytes())
    return b"".join(parts)


def crs_label(crs) -> str | None:
    """A short name for a rasterio CRS: 'EPSG:code' where it has one, else its WKT."""
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def geometry_type(wkb: bytes) -> str:
    """'Polygon' or 'MultiPolygon', from a little-endian WKB header."""
    return GEOMETRY_TYPES[0] if struct.unpack_from("<I", wkb, 1)[0] == _WKB_POLYGON else GEOMETRY_TYPES[1]


def geoparquet_metadata(crs_wkts: set[str], bounds: list[float], geometry_types: list[str]) -> bytes:
    """The `geo` key of a masks file (GeoParquet 1.1) whose geometries come from scenes in `crs_wkts`.

    One CRS: it is written as PROJJSON. Scenes of several CRSs in one file: crs is null
    (unknown) and each image's CRS is in the images table. bounds: [xmin, ymin, xmax, ymax].
    """
    from rasterio.crs import CRS

    crs = CRS.from_wkt(next(iter(crs_wkts))).to_dict(projjson=True) if len(crs_wkts) == 1 else None
    column = {
        "encoding": "WKB",
        "geometry_types": geometry_types,
        "crs": crs,
        "bbox": bounds,
        "covering": {"bbox": {k: ["geometry_bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}},
    }
    return json.dumps({"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}).encode()
