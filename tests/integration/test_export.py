"""`sam-batch export`: GIS files, COCO JSON and amg.py's folders from a real run's output.

One run (module-scoped) over the Landsat scene RGB.byte.tif (EPSG:32618, 300 m pixels) and the
photo dog.jpg, one image a shard; what each export holds is checked against the Parquet tables
as DuckDB reads them.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import geopandas
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from PIL import Image
from pycocotools.coco import COCO
from pyproj import Transformer
from scipy import ndimage

from sam_batch.jobs.export import ExportRequest, export
from sam_batch.jobs.export_formats import AMG_HEADER, box_pixels, full_mask, full_rle
from sam_batch.pipeline.rle import decode_rle, encode_rle
from shared_data import IMAGES

LANDSAT, DOG = IMAGES / "RGB.byte.tif", IMAGES / "dog.jpg"
SAM_BATCH = str(Path(sys.executable).parent / "sam-batch")


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> Path:
    """A real output: the Landsat scene (shard 0) and dog.jpg (shard 1), 8 points a side."""
    root = tmp_path_factory.mktemp("export")
    manifest = root / "inputs.txt"
    manifest.write_text(f"{LANDSAT}\n{DOG}\n")
    job = root / "job.yaml"
    job.write_text(
        f"""
name: export-test
input:
  manifest: {manifest}
model:
  type: vit_t
amg:
  points_per_side: 8
output:
  uri: {root / "out"}
run:
  executor: local
  shard_size: 1
"""
    )
    done = subprocess.run([SAM_BATCH, "run", str(job)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    return root / "out"


def masks_of(output: Path, where: str = "true") -> list[tuple]:
    """(image_uri, mask_id, segmentation, area, predicted_iou, geometry) of the output's masks, in order."""
    return duckdb.sql(
        f"SELECT image_uri, mask_id, segmentation, area, predicted_iou, geometry "
        f"FROM read_parquet('{output}/masks/*.parquet') WHERE {where} ORDER BY image_uri, mask_id"
    ).fetchall()


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SAM_BATCH, "export", *map(str, args)], capture_output=True, text=True, timeout=600)


# --- COCO -------------------------------------------------------------------------------------


def test_coco_loads_and_its_masks_are_the_parquet_masks(output: Path, tmp_path: Path) -> None:
    destination = tmp_path / "masks.json"
    done = run_export(output, "--to", destination)
    assert done.returncode == 0, done.stderr
    coco = COCO(str(destination))
    rows = masks_of(output)
    assert len(coco.anns) == len(rows) > 0
    images = {image["file_name"]: image for image in coco.dataset["images"]}
    assert set(images) == {str(LANDSAT), str(DOG)}
    assert (images[str(LANDSAT)]["width"], images[str(LANDSAT)]["height"]) == (791, 718)
    assert coco.dataset["categories"] == [{"id": 1, "name": "object"}]
    for uri in (str(LANDSAT), str(DOG)):
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[images[uri]["id"]]))
        expected = [row for row in rows if row[0] == uri]
        assert len(annotations) == len(expected) > 0
        for annotation, (_, _, segmentation, area, iou, _) in zip(annotations, expected):
            assert np.array_equal(coco.annToMask(annotation).astype(bool), decode_rle(segmentation))
            assert annotation["area"] == area and annotation["score"] == pytest.approx(iou)


def test_coco_polygons_are_the_masks_with_holes_filled(output: Path, tmp_path: Path) -> None:
    destination = tmp_path / "polygons.json"
    export(ExportRequest(str(output), str(destination), coco_polygons=True, where="image_uri LIKE '%dog.jpg'"))
    coco = COCO(str(destination))
    rows = masks_of(output, "image_uri LIKE '%dog.jpg'")
    assert len(coco.anns) == len(rows) > 0
    for annotation, row in zip(coco.loadAnns(sorted(coco.anns)), rows):
        assert isinstance(annotation["segmentation"], list)
        filled = ndimage.binary_fill_holes(decode_rle(row[2]), structure=np.ones((3, 3)))  # COCO fills holes
        assert np.array_equal(coco.annToMask(annotation).astype(bool), filled)


def test_masks_from_box_columns_equal_the_full_image_ones() -> None:
    """A row whose `segmentation` is null holds its mask as RLE over its box at `box_origin`."""
    rng = np.random.default_rng(0)
    image = np.zeros((40, 60), dtype=bool)
    image[7:19, 11:40] = rng.random((12, 29)) > 0.4
    image[7, 11] = image[18, 39] = True
    box = image[7:19, 11:40]
    boxed = {
        "segmentation": None,
        "box_segmentation": encode_rle(box),
        "box_origin": [11, 7],
        "height": 40,
        "width": 60,
    }
    whole = {"segmentation": encode_rle(image), "bbox": [11.0, 7.0, 28.0, 11.0], "height": 40, "width": 60}
    assert full_rle(boxed) == whole["segmentation"]
    assert np.array_equal(full_mask(boxed), image) and np.array_equal(full_mask(whole), image)
    for row in (boxed, whole):
        pixels, x0, y0 = box_pixels(row)
        assert (x0, y0) == (11, 7) and np.array_equal(pixels, box)


# --- GIS --------------------------------------------------------------------------------------


def test_geopackage_of_the_landsat_scene(output: Path, tmp_path: Path) -> None:
    destination = tmp_path / "masks.gpkg"
    done = run_export(output, "--to", destination)
    assert done.returncode == 0, done.stderr
    info = pyogrio.read_info(destination)
    georeferenced = [row for row in masks_of(output) if row[5] is not None]
    assert info["crs"] == "EPSG:32618" and info["geometry_type"] == "MultiPolygon"
    assert info["features"] == len(georeferenced) > 0
    frame = geopandas.read_file(destination)
    assert frame.crs.to_epsg() == 32618 and frame.is_valid.all()
    assert frame["image_uri"].eq(str(LANDSAT)).all()
    stored = {row[1]: row for row in georeferenced}
    with rasterio.open(LANDSAT) as scene:
        pixel_area = abs(scene.transform.determinant)
    for mask_id, area_px, geometry in zip(frame["mask_id"], frame["area_px"], frame.geometry):
        assert area_px == stored[mask_id][3]
        assert geometry.area == pytest.approx(area_px * pixel_area)  # outlines along pixel edges
        assert geometry.equals(shapely.from_wkb(stored[mask_id][5]))


def test_geopackage_in_another_crs(output: Path, tmp_path: Path) -> None:
    destination = tmp_path / "wgs84.gpkg"
    export(ExportRequest(str(output), str(destination), crs="EPSG:4326"))
    frame = geopandas.read_file(destination)
    assert frame.crs.to_epsg() == 4326 and frame.is_valid.all() and len(frame) > 0
    native = geopandas.read_file(_export_to(output, tmp_path / "native.gpkg"))
    assert list(frame["mask_id"]) == list(native["mask_id"])
    to_wgs84 = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True)
    for projected, geographic in zip(native.geometry, frame.geometry):
        coords = shapely.get_coordinates(projected)
        x, y = to_wgs84.transform(coords[:, 0], coords[:, 1])
        assert np.allclose(shapely.get_coordinates(geographic), np.column_stack([x, y]))


def _export_to(output: Path, destination: Path, **options) -> Path:
    export(ExportRequest(str(output), str(destination), **options))
    return destination


@pytest.mark.parametrize("name", ["masks.fgb", "masks.geojson", "masks.geojsonl", "masks.parquet"])
def test_other_gis_formats_open_in_gdal_and_geopandas(output: Path, tmp_path: Path, name: str) -> None:
    destination = _export_to(output, tmp_path / name)
    georeferenced = [row for row in masks_of(output) if row[5] is not None]
    frame = geopandas.read_parquet(destination) if name.endswith(".parquet") else geopandas.read_file(destination)
    assert len(frame) == len(georeferenced) > 0 and frame.is_valid.all()
    # GeoJSON text sequences are WGS84 longitude/latitude by their RFC (8142); GDAL reprojects
    assert frame.crs.to_epsg() == (4326 if name.endswith(".geojsonl") else 32618)
    if not name.endswith(".parquet"):
        assert pyogrio.read_info(destination)["features"] == len(georeferenced)


def test_simplify_and_map_area_filters(output: Path, tmp_path: Path) -> None:
    full = geopandas.read_file(_export_to(output, tmp_path / "full.gpkg"))
    simple = geopandas.read_file(_export_to(output, tmp_path / "simple.gpkg", simplify=600.0))  # two pixels
    assert len(simple) == len(full) and simple.is_valid.all()
    assert (
        shapely.get_num_coordinates(simple.geometry.values).sum()
        < shapely.get_num_coordinates(full.geometry.values).sum()
    )
    assert shapely.hausdorff_distance(simple.geometry.values, full.geometry.values).max() <= 600.0 + 1e-6
    middle = float(np.median(full.geometry.area))
    large = geopandas.read_file(_export_to(output, tmp_path / "large.gpkg", min_area=middle))
    assert sorted(large["mask_id"]) == sorted(full.loc[full.geometry.area >= middle, "mask_id"])


# --- filters and amg.py's layout --------------------------------------------------------------


def test_where_and_pixel_area_filters_on_coco(output: Path, tmp_path: Path) -> None:
    where = "predicted_iou > 0.95 AND status = 'ok' AND width = 800"  # masks and images columns
    rows = masks_of(output, "predicted_iou > 0.95 AND image_uri LIKE '%dog.jpg' AND area BETWEEN 500 AND 50000")
    coco = COCO(str(_export_to(output, tmp_path / "some.json", where=where, min_area=500, max_area=50000)))
    assert sorted(a["area"] for a in coco.anns.values()) == sorted(row[3] for row in rows)
    assert len(rows) > 0


def test_progress_bar_counts_the_rows_read(output: Path, tmp_path: Path, capsys) -> None:
    export(ExportRequest(str(output), str(tmp_path / "masks.json"), where="false"), progress=True)
    total = len(masks_of(output))
    assert f"{total}/{total}" in capsys.readouterr().err


def test_amg_folders(output: Path, tmp_path: Path) -> None:
    destination = _export_to(output, tmp_path / "amg")
    assert sorted(p.name for p in destination.iterdir()) == ["RGB.byte", "dog"]
    lines = (destination / "dog" / "metadata.csv").read_text().split("\n")
    assert lines[0] == AMG_HEADER
    rows = masks_of(output, "image_uri LIKE '%dog.jpg'")
    assert len(lines) - 1 == len(rows) == len(list((destination / "dog").glob("*.png")))
    for line, row in zip(lines[1:], rows):
        index, area = (int(v) for v in line.split(",")[:2])
        png = np.asarray(Image.open(destination / "dog" / f"{index}.png"))
        assert area == row[3] and set(np.unique(png)) <= {0, 255}
        assert np.array_equal(png == 255, decode_rle(row[2]))


def test_an_output_and_a_destination_on_another_store(output: Path, tmp_path: Path) -> None:
    """Both ends as fsspec URLs (its in-memory store): read through pyarrow, put once written."""
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.put(str(output), "/export-test/out", recursive=True)
    try:
        export(ExportRequest("memory://export-test/out", "memory://export-test/masks.json"))
        (tmp_path / "masks.json").write_bytes(memory.cat_file("/export-test/masks.json"))
        assert memory.ls("/export-test", detail=False) == ["/export-test/masks.json", "/export-test/out"]
    finally:
        memory.rm("/export-test", recursive=True)
    assert len(COCO(str(tmp_path / "masks.json")).anns) == len(masks_of(output))


# --- what is read, what is refused ------------------------------------------------------------


def test_only_committed_shards_are_exported(output: Path, tmp_path: Path) -> None:
    photos_only = tmp_path / "out"
    shutil.copytree(output, photos_only)
    (photos_only / "_sam_batch" / "commits" / "shard-00000.json").unlink()  # the Landsat scene's shard
    coco = COCO(str(_export_to(photos_only, tmp_path / "dog.json")))
    assert [image["file_name"] for image in coco.dataset["images"]] == [str(DOG)]
    assert len(coco.anns) == len(masks_of(output, "image_uri LIKE '%dog.jpg'"))
    done = run_export(photos_only, "--to", tmp_path / "dog.gpkg")
    assert done.returncode == 2 and "no georeferenced image" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "dog.gpkg").exists()


@pytest.mark.parametrize(
    "args, reason",
    [
        (["--to", "{dest}/masks.shp"], "unknown format"),
        (["--to", "{dest}/masks.gpkg", "--format", "kml"], "unknown"),
        (["--to", "{dest}/masks.gpkg", "--where", "predicted_iou >"], "--where"),
        (["--to", "{dest}/masks.gpkg", "--where", "no_such_column = 1"], "--where"),
        (["--to", "{dest}/masks.gpkg", "--crs", "EPSG:999999"], "no such coordinate reference system"),
        (["--to", "{dest}/masks.json", "--simplify", "5"], "GIS formats"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(output: Path, tmp_path: Path, args: list[str], reason: str) -> None:
    done = run_export(output, *(a.format(dest=tmp_path) for a in args))
    assert done.returncode == 2 and reason in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_not_an_output_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    done = run_export(tmp_path / "empty", "--to", tmp_path / "masks.json")
    assert done.returncode == 2 and "not a sam-batch output" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and sorted(tmp_path.iterdir()) == [tmp_path / "empty"]


def test_an_output_with_no_committed_shard_is_refused(output: Path, tmp_path: Path) -> None:
    uncommitted = tmp_path / "out"
    shutil.copytree(output, uncommitted)
    shutil.rmtree(uncommitted / "_sam_batch" / "commits")
    done = run_export(uncommitted, "--to", tmp_path / "masks.json")
    assert done.returncode == 2 and "no committed shard" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and sorted(tmp_path.iterdir()) == [uncommitted]


def test_a_failure_while_writing_leaves_nothing(output: Path, tmp_path: Path) -> None:
    """A condition that binds but fails on the rows (a cast of a path to a number) fails mid-export."""
    for name in ("masks.gpkg", "masks.json", "amg"):
        done = run_export(output, "--to", tmp_path / name, "--where", "CAST(image_uri AS INTEGER) > 0")
        assert done.returncode == 1, done.stderr
        assert list(tmp_path.iterdir()) == []


# --- bounded memory ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("format_", ["coco", "gpkg"])
def test_memory_does_not_grow_with_the_masks(tmp_path: Path, format_: str) -> None:
    """Peak RSS of an export of 16 shards against one of 4 (same shards): the growth is well
    under what holding the larger output's rows would take."""
    import pyarrow.parquet as pq

    from benchmarks.export_memory import measure_export, synthetic_output

    peaks = {}
    for shards in (4, 16):
        output = synthetic_output(tmp_path / f"out-{shards}", 8 * shards, 500, 8)
        peaks[shards], _ = measure_export(output, tmp_path / f"export-{shards}", format_)
    rows = sum(pq.read_table(path).nbytes for path in (tmp_path / "out-16" / "masks").glob("*.parquet"))
    assert peaks[16] - peaks[4] < rows / 2, (peaks, rows)
