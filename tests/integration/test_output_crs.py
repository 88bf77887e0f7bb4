"""One CRS per output (`output.crs`): validated, chosen once from the inputs' headers, frozen in
the plan; geometries reprojected as they are written, the images table keeping each scene's."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.features import shapes
from rasterio.transform import Affine
from rasterio.warp import transform_bounds, transform_geom
from test_geo import parse_wkb

from sam_batch.jobs.job_file import parse_job
from sam_batch.jobs.job_rules import JobError
from sam_batch.jobs.output_crs import FALLBACK_CRS, choose_output_crs, scene_crs
from sam_batch.jobs.runner import run_job
from sam_batch.pipeline.geometry import mask_geometry, reproject_geometries
from shared_data import IMAGES

LANDSAT = IMAGES / "RGB.byte.tif"  # EPSG:32618
UINT16 = IMAGES / "RGBA.uint16.tif"  # EPSG:32612
SAM_BATCH = str(Path(sys.executable).parent / "sam-batch")


def _job(root: Path, uris: list[Path], **output) -> dict:
    return {
        "name": "crs",
        "input": {"uris": [str(uri) for uri in uris]},
        "amg": {"points_per_side": 4},
        "output": {"uri": str(root / "out"), **output},
        "run": {"executor": "local", "shard_size": 1},
    }


# --- the job file -----------------------------------------------------------------------------


def test_output_crs_is_auto_or_a_known_epsg_code(tmp_path: Path) -> None:
    assert parse_job(_job(tmp_path, [LANDSAT])).output.crs == "auto"
    assert parse_job(_job(tmp_path, [LANDSAT], crs="epsg:3857")).output.crs == "EPSG:3857"
    for value, reason in (
        ("EPSG:99999", "output.crs: EPSG:99999 is not a known EPSG code"),
        ("WGS84", "output.crs: expected auto or an EPSG code such as EPSG:4326, got 'WGS84'"),
        (4326, "output.crs: expected auto or an EPSG code such as EPSG:4326, got 4326"),
        ("EPSG:5714", "output.crs: EPSG:5714 is not a geographic or projected CRS"),  # a height
    ):
        with pytest.raises(JobError, match=reason):
            parse_job(_job(tmp_path, [LANDSAT], crs=value))


def test_an_unknown_code_fails_validate_in_one_line(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(_job(tmp_path, [LANDSAT], crs="EPSG:99999")))
    done = subprocess.run([SAM_BATCH, "validate", str(job)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"sam-batch: invalid job: {job}: output.crs: EPSG:99999 is not a known EPSG code "
        "(PROJ's database has no such CRS)"
    ]


def test_the_fingerprint_counts_output_crs(tmp_path: Path) -> None:
    prints = {parse_job(_job(tmp_path, [LANDSAT], crs=crs)).fingerprint() for crs in ("auto", "EPSG:4326", "EPSG:3857")}
    assert len(prints) == 3


# --- the choice -------------------------------------------------------------------------------


def test_auto_takes_the_one_crs_of_the_scenes_else_4326(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="sam_batch")

    def choose(*uris: Path, **output) -> str:
        return choose_output_crs(parse_job(_job(tmp_path, list(uris), **output)), [str(u) for u in uris])

    assert choose(LANDSAT, IMAGES / "dog.jpg") == "EPSG:32618"
    assert choose(LANDSAT, UINT16) == FALLBACK_CRS == "EPSG:4326"
    assert "the scenes are in 2 CRSs (EPSG:32612, EPSG:32618); geometries are written in EPSG:4326" in caplog.text
    assert choose(IMAGES / "dog.jpg", IMAGES / "truck.jpg") == FALLBACK_CRS
    assert "no input has a CRS" in caplog.text
    caplog.clear()
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00" + bytes(range(256)))  # a TIFF's first bytes, then no header
    assert choose(UINT16, broken, tmp_path / "missing.tif") == "EPSG:32612"
    assert "2 input header(s) could not be read and do not count in the choice" in caplog.text
    assert choose(LANDSAT, UINT16, crs="EPSG:3857") == "EPSG:3857"


def test_headers_are_read_through_fsspec() -> None:
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.pipe("/crs-scenes/landsat.tif", LANDSAT.read_bytes())
    assert scene_crs("memory://crs-scenes/landsat.tif", {}) == "EPSG:32618"


# --- reprojection -----------------------------------------------------------------------------


def test_reprojection_is_gdals_of_every_vertex() -> None:
    pixels = np.zeros((40, 60), dtype=bool)
    pixels[2:30, 3:25] = True
    pixels[10:15, 8:12] = False  # a hole
    pixels[5:35, 40:58] = True  # a second part
    with rasterio.open(LANDSAT) as src:
        transform = src.transform
        west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=101)
    wkb, _ = mask_geometry(pixels, 100, 200, transform)
    ((moved, bounds),) = reproject_geometries([wkb], "EPSG:32618", "EPSG:4326")
    placed = transform @ Affine.translation(100, 200)
    expected = [
        transform_geom("EPSG:32618", "EPSG:4326", geometry)["coordinates"]
        for geometry, _ in shapes(pixels.astype(np.uint8), mask=pixels, connectivity=4, transform=placed)
    ]
    got = parse_wkb(moved)
    assert [len(rings) for rings in got] == [len(rings) for rings in expected] == [2, 1]
    for rings, want_rings in zip(got, expected):
        for ring, want in zip(rings, want_rings):
            np.testing.assert_allclose(ring, np.asarray(want), rtol=0, atol=1e-9)
    points = np.concatenate([ring for rings in got for ring in rings])
    assert bounds == {
        "xmin": points[:, 0].min(),
        "ymin": points[:, 1].min(),
        "xmax": points[:, 0].max(),
        "ymax": points[:, 1].max(),
    }
    assert west < bounds["xmin"] < bounds["xmax"] < east and south < bounds["ymin"] < bounds["ymax"] < north


# --- jobs -------------------------------------------------------------------------------------


def _geo_crs(out: Path) -> list[CRS]:
    """The CRS of each masks file's GeoParquet metadata, as DuckDB reads it, from its PROJJSON."""
    found = []
    for path in sorted((out / "masks").glob("*.parquet")):
        ((geo,),) = duckdb.sql(f"SELECT value FROM parquet_kv_metadata('{path}') WHERE key = 'geo'").fetchall()
        assert geo == pq.read_schema(path).metadata[b"geo"]
        column = json.loads(geo)["columns"]["geometry"]
        assert column["crs"]["type"] in ("GeographicCRS", "ProjectedCRS")
        found.append(CRS.from_user_input(json.dumps(column["crs"])))
    return found


def _check_bounds(out: Path, crs: str) -> None:
    """Every geometry lies within its scene's bounds reprojected to `crs`, its bbox column is its
    vertices' bounds, and the masks of each scene spread over most of it."""
    masks = f"read_parquet('{out}/masks/*.parquet')"
    images = f"read_parquet('{out}/images/*.parquet')"
    scenes = duckdb.sql(f"SELECT image_id, image_uri, crs, transform, width, height FROM {images}").fetchall()
    assert scenes
    for image_id, uri, crs_in_table, transform, _width, _height in scenes:
        with rasterio.open(uri) as src:
            assert crs_in_table == f"EPSG:{src.crs.to_epsg()}" and transform == list(src.transform)[:6]
            west, south, east, north = transform_bounds(src.crs, crs, *src.bounds, densify_pts=101)
        rows = duckdb.sql(f"SELECT geometry, geometry_bbox FROM {masks} WHERE image_id = '{image_id}'").fetchall()
        assert rows
        margin = 1e-6 * max(abs(east - west), abs(north - south))
        for geometry, box in rows:
            points = np.concatenate([ring for rings in parse_wkb(geometry) for ring in rings])
            assert box == {
                "xmin": points[:, 0].min(),
                "ymin": points[:, 1].min(),
                "xmax": points[:, 0].max(),
                "ymax": points[:, 1].max(),
            }
            assert west - margin <= box["xmin"] <= box["xmax"] <= east + margin
            assert south - margin <= box["ymin"] <= box["ymax"] <= north + margin
        spread_x = max(b["xmax"] for _, b in rows) - min(b["xmin"] for _, b in rows)
        assert spread_x > 0.5 * (east - west)


@pytest.fixture(scope="module")
def two_zones(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("zones")
    summary = run_job(parse_job(_job(root, [LANDSAT, UINT16])))
    assert summary.images_ok == 2 and summary.masks > 0
    return root / "out"


def test_two_utm_zones_are_written_in_4326(two_zones: Path) -> None:
    assert json.loads((two_zones / "_sam_batch" / "plan.json").read_text())["output_crs"] == "EPSG:4326"
    assert [crs.to_epsg() for crs in _geo_crs(two_zones)] == [4326, 4326]
    _check_bounds(two_zones, "EPSG:4326")


def test_a_resumed_run_writes_in_the_frozen_crs(two_zones: Path, tmp_path: Path) -> None:
    """The plan's CRS stands, whatever `auto` would choose now: a shard done again after the
    plan froze EPSG:3857 is written in EPSG:3857."""
    out = tmp_path / "out"
    subprocess.run(["cp", "-r", str(two_zones), str(out)], check=True)
    plan = out / "_sam_batch" / "plan.json"
    plan.write_text(plan.read_text().replace('"output_crs": "EPSG:4326"', '"output_crs": "EPSG:3857"'))
    for path in (
        out / "masks" / "shard-00001.parquet",
        out / "images" / "shard-00001.parquet",
        out / "_sam_batch" / "commits" / "shard-00001.json",
        out / "_sam_batch" / "claims" / "shard-00001.json",
    ):
        path.unlink()
    summary = run_job(parse_job(_job(tmp_path, [LANDSAT, UINT16])))
    assert (summary.shards_skipped, summary.shards_committed) == (1, 1)
    assert [crs.to_epsg() for crs in _geo_crs(out)] == [4326, 3857]
    with rasterio.open(UINT16) as src:
        west, south, east, north = transform_bounds(src.crs, "EPSG:3857", *src.bounds, densify_pts=101)
    redone = pq.read_table(out / "masks" / "shard-00001.parquet").column("geometry_bbox").to_pylist()
    assert redone and all(
        west <= b["xmin"] <= b["xmax"] <= east and south <= b["ymin"] <= b["ymax"] <= north for b in redone
    )


def test_an_explicit_crs_is_honoured(tmp_path: Path) -> None:
    summary = run_job(parse_job(_job(tmp_path, [LANDSAT], crs="EPSG:3857")))
    assert summary.images_ok == 1
    assert [crs.to_epsg() for crs in _geo_crs(tmp_path / "out")] == [3857]
    _check_bounds(tmp_path / "out", "EPSG:3857")
