"""Mask polygons made ready for GIS files: valid, in one CRS, simplified, all MultiPolygons.

Pure functions over numpy arrays of shapely 2 geometries (one element per mask), vectorised.
Coordinates are in map units of the CRS at hand; areas in map units squared.
"""

from __future__ import annotations

import numpy as np
import shapely

POLYGON_TYPE_ID = 3  # shapely.get_type_id of a Polygon


def from_wkb(wkb: list[bytes | None]) -> np.ndarray:
    """The `geometry` column's WKB (None where a mask has none) as (N,) shapely geometries."""
    return shapely.from_wkb(np.asarray(wkb, dtype=object))


def reproject(geometries: np.ndarray, source_crs: str, target_crs: str) -> np.ndarray:
    """(N,) geometries from `source_crs` to `target_crs` (any pyproj input: 'EPSG:32618', WKT);
    x is easting / longitude, y northing / latitude, whatever the CRS's axis order."""
    from pyproj import Transformer

    transformer = Transformer.from_crs(source_crs, target_crs, always_xy=True)

    def transform(coords: np.ndarray) -> np.ndarray:
        x, y = transformer.transform(coords[:, 0], coords[:, 1])
        return np.column_stack([x, y])

    return shapely.transform(geometries, transform)


def simplify(geometries: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker within `tolerance` map units, keeping each polygon's topology (no ring
    crosses itself or another ring of the same polygon, no part vanishes)."""
    return shapely.simplify(geometries, tolerance, preserve_topology=True)


def valid_multipolygons(geometries: np.ndarray) -> np.ndarray:
    """(N,) geometries made valid (`make_valid` on the invalid ones only, keeping their polygonal
    parts) and promoted to MultiPolygon, so a layer has one geometry type; None stays None and
    a geometry with no area left becomes None."""
    out = geometries.copy()
    invalid = ~shapely.is_valid(out) & ~shapely.is_missing(out)
    if invalid.any():
        out[invalid] = shapely.make_valid(out[invalid], method="structure", keep_collapsed=False)
    out[shapely.is_empty(out)] = None
    polygons = shapely.get_type_id(out) == POLYGON_TYPE_ID
    if polygons.any():
        out[polygons] = shapely.multipolygons(out[polygons], indices=np.arange(int(polygons.sum())))
    return out
