"""Mask outlines as polygons in a scene's CRS, written as WKB, reprojected to the output's CRS,
and the GeoParquet metadata.

A mask's outline follows its pixels' edges (GDAL's polygonize, 4-connected), mapped through
the scene's affine transform: pixel (col, row) spans transform @ (col, row) to
transform @ (col + 1, row + 1). One connected part gives a Polygon (with its holes), several a
MultiPolygon. An output holds one CRS: geometries of scenes in another are reprojected vertex
by vertex (GDAL through rasterio; an outline has a vertex at every pixel corner where it turns,
so its edges are short). The bbox covering column holds each geometry's bounds, so a spatial
window is a plain SQL filter on four numbers.
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
    return _geometry_wkb(polygons), _bounds(polygons)


def reproject_geometries(wkbs: list[bytes], source_crs: str, target_crs: str) -> list[tuple[bytes, dict[str, float]]]:
    """WKB geometries (as `mask_geometry` writes them) in `source_crs` → the same in
    `target_crs`, with their bounds; CRSs as 'EPSG:code' or WKT. All vertices go through one
    GDAL call. A vertex that has no place in `target_crs` is a `ValueError`."""
    from rasterio.crs import CRS
    from rasterio.warp import transform

    geometries = [_wkb_polygons(wkb) for wkb in wkbs]
    rings = [ring for polygons in geometries for rings in polygons for ring in rings]
    if not rings:
        return []
    points = np.concatenate(rings)
    xs, ys = transform(CRS.from_user_input(source_crs), CRS.from_user_input(target_crs), points[:, 0], points[:, 1])
    moved = np.column_stack([xs, ys])
    if not np.isfinite(moved).all():
        raise ValueError(f"geometries in {crs_name(source_crs)} have vertices outside {crs_name(target_crs)}")
    ends = np.cumsum([len(ring) for ring in rings])
    moved_rings = iter(np.split(moved, ends[:-1]))
    result = []
    for polygons in geometries:
        placed = [[next(moved_rings) for _ in rings] for rings in polygons]
        result.append((_geometry_wkb(placed), _bounds(placed)))
    return result


def same_crs(first: str, second: str) -> bool:
    """Whether two CRS labels ('EPSG:code' or WKT) name the same CRS."""
    from rasterio.crs import CRS

    return first == second or CRS.from_user_input(first) == CRS.from_user_input(second)


def crs_name(label: str) -> str:
    """A CRS label ('EPSG:code' or WKT) for a message: 'EPSG:code', or the name a WKT starts with."""
    if label.startswith("EPSG:") or '"' not in label:
        return label
    return label.split('"')[1]


def _bounds(polygons: list[list]) -> dict[str, float]:
    points = np.concatenate([np.asarray(ring) for rings in polygons for ring in rings])
    return {
        "xmin": float(points[:, 0].min()),
        "ymin": float(points[:, 1].min()),
        "xmax": float(points[:, 0].max()),
        "ymax": float(points[:, 1].max()),
    }


def _geometry_wkb(polygons: list[list]) -> bytes:
    """Polygons, each a list of rings ((N, 2) xy), as a WKB Polygon (one) or MultiPolygon."""
    if len(polygons) == 1:
        return _polygon_wkb(polygons[0])
    return struct.pack("<BII", 1, _WKB_MULTIPOLYGON, len(polygons)) + b"".join(map(_polygon_wkb, polygons))


def _polygon_wkb(rings: list) -> bytes:
    parts = [struct.pack("<BII", 1, _WKB_POLYGON, len(rings))]
    for ring in rings:
        coords = np.asarray(ring, dtype="<f8")
        parts.append(struct.pack("<I", len(coords)) + coords.tobytes())
    return b"".join(parts)


def _wkb_polygons(wkb: bytes) -> list[list[np.ndarray]]:
    """A little-endian WKB Polygon or MultiPolygon → its polygons, each a list of (N, 2) rings."""
    if struct.unpack_from("<I", wkb, 1)[0] == _WKB_POLYGON:
        return [_read_polygon(wkb, 0)[0]]
    (count,) = struct.unpack_from("<I", wkb, 5)
    polygons, offset = [], 9
    for _ in range(count):
        rings, offset = _read_polygon(wkb, offset)
        polygons.append(rings)
    return polygons


def _read_polygon(wkb: bytes, offset: int) -> tuple[list[np.ndarray], int]:
    """The rings of the WKB Polygon at `offset`, and the offset after it."""
    (n_rings,) = struct.unpack_from("<I", wkb, offset + 5)
    offset += 9
    rings = []
    for _ in range(n_rings):
        (n_points,) = struct.unpack_from("<I", wkb, offset)
        rings.append(np.frombuffer(wkb, "<f8", 2 * n_points, offset + 4).reshape(-1, 2))
        offset += 4 + 16 * n_points
    return rings, offset


def crs_label(crs) -> str | None:
    """A short name for a rasterio CRS: 'EPSG:code' where it has one, else its WKT."""
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt()


def geometry_type(wkb: bytes) -> str:
    """'Polygon' or 'MultiPolygon', from a little-endian WKB header."""
    return GEOMETRY_TYPES[0] if struct.unpack_from("<I", wkb, 1)[0] == _WKB_POLYGON else GEOMETRY_TYPES[1]


def geoparquet_metadata(crs: str, bounds: list[float], geometry_types: list[str]) -> bytes:
    """The `geo` key of a masks file (GeoParquet 1.1) whose geometries are in `crs` ('EPSG:code'
    or WKT), written as PROJJSON. bounds: [xmin, ymin, xmax, ymax] in `crs`.
    """
    from rasterio.crs import CRS

    column = {
        "encoding": "WKB",
        "geometry_types": geometry_types,
        "crs": CRS.from_user_input(crs).to_dict(projjson=True),
        "bbox": bounds,
        "covering": {"bbox": {k: ["geometry_bbox", k] for k in ("xmin", "ymin", "xmax", "ymax")}},
    }
    return json.dumps({"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}}).encode()
