"""Prompt tables (`prompts.uri`) through `sam-batch run`: the reference predictor's masks on the
golden prompt files, carried columns joined in DuckDB, bad prompts as reasons, map
coordinates on the Landsat scene, windows of a tiled scene, resume and a changed table."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
import yaml
from test_run_end_to_end import sam_batch

from sam_batch.pipeline.prompts import Prompt, in_image_pixels, plan_prompts, plan_windows, segment_prompts
from sam_batch.pipeline.rasters import ArrayScene, RasterScene
from sam_batch.pipeline.rle import decode_rle
from shared_data import GOLDEN, IMAGES, MOBILE_SAM

GOLDEN_PROMPTS = ["dog.jpg", "truck.jpg"]
LANDSAT = IMAGES / "RGB.byte.tif"


def write_prompt_job(tmp_path: Path, uris: list[Path], table: Path, **prompts) -> Path:
    job = {
        "name": "prompts",
        "input": {"uris": [str(u) for u in uris]},
        "prompts": {"uri": str(table), **prompts},
        "model": {"checkpoint": str(MOBILE_SAM)},
        "output": {"uri": str(tmp_path / "out")},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def golden_prompts(name: str) -> list[dict]:
    return json.loads((GOLDEN / "prompts" / f"{name}.prompts.json").read_text())["prompts"]


@pytest.fixture(scope="module")
def golden_run(tmp_path_factory) -> Path:
    """The golden prompts of dog.jpg and truck.jpg as one detector-style Parquet table (with a
    `label` to carry), and dogs.jpg listed as an input with no prompt."""
    tmp = tmp_path_factory.mktemp("golden_prompts")
    rows = [
        {
            "image_uri": name if name == "dog.jpg" else str(IMAGES / name),  # relative: from the table's folder
            "prompt_id": p["prompt_id"],
            "box": p["box"],
            "points": p["points"],
            "point_labels": p["point_labels"],
            "multimask_output": p["multimask_output"],
            "label": p["prompt_id"].split("-", 1)[1],
        }
        for name in GOLDEN_PROMPTS
        for p in golden_prompts(name)
    ]
    (tmp / "dog.jpg").symlink_to(IMAGES / "dog.jpg")
    pq.write_table(pa.Table.from_pylist(rows), tmp / "boxes.parquet")
    inputs = [tmp / "dog.jpg", IMAGES / "truck.jpg", IMAGES / "dogs.jpg"]
    sam_batch("run", str(write_prompt_job(tmp, inputs, tmp / "boxes.parquet", carry=["label"])))
    return tmp


def test_masks_are_the_reference_predictors_through_run(golden_run: Path) -> None:
    masks = pq.read_table(golden_run / "out" / "masks").to_pylist()
    worst_iou, worst_score = 1.0, 0.0
    for name in GOLDEN_PROMPTS:
        mine = [m for m in masks if m["image_uri"].endswith(name)]
        for prompt in golden_prompts(name):
            rows = sorted((m for m in mine if m["prompt_id"] == prompt["prompt_id"]), key=lambda m: m["mask_index"])
            assert len(rows) == len(prompt["masks"]) == (3 if prompt["multimask_output"] else 1)
            for row, reference, score in zip(rows, prompt["masks"], prompt["scores"]):
                ours, theirs = decode_rle(row["segmentation"]).astype(bool), decode_rle(reference).astype(bool)
                worst_iou = min(worst_iou, (ours & theirs).sum() / (ours | theirs).sum())
                worst_score = max(worst_score, abs(row["predicted_iou"] - score))
                assert row["area"] == ours.sum()
                assert row["label"] == prompt["prompt_id"].split("-", 1)[1]
    assert worst_iou >= 0.99 and worst_score <= 1e-4, (worst_iou, worst_score)


def test_the_onnx_backend_gives_the_reference_predictors_masks(tmp_path: Path) -> None:
    """dog.jpg's golden prompts (boxes, points with three masks, boxes with points) through
    `sam-batch run` on `engine.backend: onnx` (the predictor graph)."""
    rows = [
        {"image_uri": str(IMAGES / "dog.jpg"), **{k: p[k] for k in ("prompt_id", "box", "points", "point_labels")}}
        | {"multimask_output": p["multimask_output"]}
        for p in golden_prompts("dog.jpg")
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "prompts.parquet")
    job = yaml.safe_load(write_prompt_job(tmp_path, [IMAGES / "dog.jpg"], tmp_path / "prompts.parquet").read_text())
    job["engine"] = {"backend": "onnx", "device": "cpu"}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    sam_batch("run", str(tmp_path / "job.yaml"))
    masks = pq.read_table(tmp_path / "out" / "masks").to_pylist()
    assert len(masks) == sum(len(p["masks"]) for p in golden_prompts("dog.jpg"))
    for prompt in golden_prompts("dog.jpg"):
        rows = sorted((m for m in masks if m["prompt_id"] == prompt["prompt_id"]), key=lambda m: m["mask_index"])
        for row, reference, score in zip(rows, prompt["masks"], prompt["scores"], strict=True):
            ours, theirs = decode_rle(row["segmentation"]).astype(bool), decode_rle(reference).astype(bool)
            assert (ours & theirs).sum() / (ours | theirs).sum() >= 0.99
            assert abs(row["predicted_iou"] - score) <= 1e-4


def test_images_count_prompts_and_inputs_without_prompts_are_never_read(golden_run: Path) -> None:
    images = {r["image_uri"].rsplit("/", 1)[-1]: r for r in pq.read_table(golden_run / "out" / "images").to_pylist()}
    assert set(images) == set(GOLDEN_PROMPTS)  # dogs.jpg has no prompt
    for name in GOLDEN_PROMPTS:
        row = images[name]
        assert (row["status"], row["n_prompts"], row["prompt_errors"]) == ("ok", 36, [])
        assert row["n_masks"] == sum(len(p["masks"]) for p in golden_prompts(name))


def test_duckdb_joins_masks_to_the_carried_label(golden_run: Path) -> None:
    out = golden_run / "out"
    counts = duckdb.sql(
        f"SELECT label, count(*) AS masks, round(avg(predicted_iou), 3) AS iou "
        f"FROM '{out}/masks/*.parquet' m JOIN '{out}/images/*.parquet' i USING (image_id) "
        "WHERE i.status = 'ok' GROUP BY label ORDER BY label"
    ).fetchall()
    assert [(label, n) for label, n, _ in counts] == [("box", 24), ("box+points", 24), ("point", 72)]


def test_a_rerun_resumes_and_a_changed_table_is_another_job(golden_run: Path) -> None:
    job = golden_run / "job.yaml"
    assert "0 committed, 1 already done" in sam_batch("run", str(job)).stdout
    table = pq.read_table(golden_run / "boxes.parquet")
    pq.write_table(table.slice(0, 10), golden_run / "boxes.parquet")
    refused = sam_batch("run", str(job), check=False)
    assert refused.returncode != 0 and "different job" in refused.stderr
    pq.write_table(table, golden_run / "boxes.parquet")  # the same content again: the same job
    assert "already done" in sam_batch("run", str(job)).stdout


def test_bad_prompts_are_reasons_and_the_job_goes_on(tmp_path: Path) -> None:
    dog = str(IMAGES / "dog.jpg")
    rows = [
        {"image_uri": dog, "prompt_id": "good", "box": "[3, 225, 420, 531]"},
        {"image_uri": dog, "prompt_id": "outside", "box": "[900, 600, 1000, 700]"},
        {"image_uri": dog, "prompt_id": "flipped", "box": "[420, 225, 3, 531]"},
        {"image_uri": dog, "prompt_id": "label2", "points": "[[100, 100]]", "point_labels": "[2]"},
        {"image_uri": dog, "prompt_id": "nan", "points": "[[NaN, 100]]", "point_labels": "[1]"},
        {"image_uri": str(IMAGES / "truck.jpg"), "prompt_id": "not-input", "box": "[1, 1, 50, 50]"},
        {"image_uri": str(IMAGES / "dogs.jpg"), "prompt_id": "only-outside", "box": "[5000, 5000, 5100, 5100]"},
    ]
    columns = ("image_uri", "prompt_id", "box", "points", "point_labels")
    pa.csv.write_csv(pa.Table.from_pylist([{c: row.get(c) for c in columns} for row in rows]), tmp_path / "prompts.csv")
    sam_batch(
        "run", str(write_prompt_job(tmp_path, [IMAGES / "dog.jpg", IMAGES / "dogs.jpg"], tmp_path / "prompts.csv"))
    )
    images = {r["image_uri"].rsplit("/", 1)[-1]: r for r in pq.read_table(tmp_path / "out" / "images").to_pylist()}
    errors = {e["prompt_id"]: e["error"] for e in images["dog.jpg"]["prompt_errors"]}
    assert images["dog.jpg"]["status"] == "ok" and images["dog.jpg"]["n_masks"] == 1
    assert "outside the 800x534 image" in errors["outside"]
    assert "x1 < x0" in errors["flipped"]
    assert "other than 1" in errors["label2"]
    assert "not finite" in errors["nan"]
    truck = images["truck.jpg"]
    assert truck["status"] == "error" and "not one of the job's inputs" in truck["error"] and truck["width"] is None
    dogs = images["dogs.jpg"]  # read (its size decides), then an error: no prompt of it can run
    assert dogs["status"] == "error" and "'only-outside' box" in dogs["error"] and dogs["n_prompts"] == 1
    masks = pq.read_table(tmp_path / "out" / "masks").to_pylist()
    assert [m["prompt_id"] for m in masks] == ["good"]


def test_a_file_that_is_not_a_table_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "prompts.parquet").write_bytes(b"not parquet at all")
    result = sam_batch(
        "run", str(write_prompt_job(tmp_path, [IMAGES / "dog.jpg"], tmp_path / "prompts.parquet")), check=False
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("sam-batch: invalid job: prompts.uri ")
    assert not (tmp_path / "out" / "masks").exists()


def landsat_boxes() -> list[list[float]]:
    return [[200.0, 150.0, 320.0, 260.0], [450.0, 400.0, 560.0, 470.0], [60.0, 500.0, 180.0, 640.0]]


def test_map_coordinate_boxes_give_the_pixel_boxes_masks(tmp_path: Path) -> None:
    """The same boxes as pixels (Parquet) and as polygons in the scene's CRS (GeoParquet)."""
    import shapely
    from pyproj import CRS

    with RasterScene(str(LANDSAT)) as scene:
        transform, crs = scene.transform, scene.crs
    pixel_rows = [{"image_uri": str(LANDSAT), "prompt_id": str(i), "box": b} for i, b in enumerate(landsat_boxes())]
    corners = [(transform @ (b[0], b[1]), transform @ (b[2], b[3])) for b in landsat_boxes()]
    polygons = [shapely.box(min(a[0], c[0]), min(a[1], c[1]), max(a[0], c[0]), max(a[1], c[1])) for a, c in corners]
    geo = pa.table(
        {
            "image_uri": [str(LANDSAT)] * 3,
            "prompt_id": ["0", "1", "2"],
            "geometry": [p.wkb for p in polygons],
        }
    )
    column = {"encoding": "WKB", "geometry_types": ["Polygon"], "crs": CRS.from_wkt(crs.to_wkt()).to_json_dict()}
    geo = geo.replace_schema_metadata(
        {"geo": json.dumps({"version": "1.1.0", "primary_column": "geometry", "columns": {"geometry": column}})}
    )
    results = []
    for name, table in (("pixels", pa.Table.from_pylist(pixel_rows)), ("map", geo)):
        folder = tmp_path / name
        folder.mkdir()
        pq.write_table(table, folder / "prompts.parquet")
        sam_batch("run", str(write_prompt_job(folder, [LANDSAT], folder / "prompts.parquet")))
        results.append(pq.read_table(folder / "out" / "masks").to_pylist())
    pixels, mapped = results
    assert len(pixels) == len(mapped) == 3
    for a, b in zip(pixels, mapped):
        assert a["prompt_id"] == b["prompt_id"] and a["geometry"] is not None
        ours, theirs = decode_rle(a["segmentation"]).astype(bool), decode_rle(b["segmentation"]).astype(bool)
        assert (ours & theirs).sum() / (ours | theirs).sum() >= 0.99


def test_a_geojson_point_in_wgs84_is_the_scenes_pixel(tmp_path: Path) -> None:
    from rasterio.warp import transform as reproject

    with RasterScene(str(LANDSAT)) as scene:
        x, y = scene.transform @ (300, 200)
        (lon,), (lat,) = reproject(scene.crs, "EPSG:4326", [x], [y])
    feature = {
        "type": "Feature",
        "properties": {"image_uri": str(LANDSAT)},
        "geometry": {"type": "Point", "coordinates": [lon, lat]},
    }
    (tmp_path / "points.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    sam_batch("run", str(write_prompt_job(tmp_path, [LANDSAT], tmp_path / "points.geojson")))
    (mask,) = pq.read_table(tmp_path / "out" / "masks").to_pylist()
    assert np.allclose(mask["point_coords"], [[300, 200]], atol=1e-6) and mask["area"] > 0
    assert mask["prompt_id"].startswith("p-") and mask["geometry"] is not None


def test_a_table_without_rows_is_one_line_and_exit_2(tmp_path: Path) -> None:
    pq.write_table(pa.table({"image_uri": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    result = sam_batch(
        "run", str(write_prompt_job(tmp_path, [IMAGES / "dog.jpg"], tmp_path / "empty.parquet")), check=False
    )
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].endswith("empty.parquet: has no rows")


def test_unreadable_cells_are_reasons_and_repeated_ids_become_distinct(tmp_path: Path) -> None:
    from sam_batch.jobs.job_file import parse_job
    from sam_batch.jobs.prompt_table import read_prompt_table

    features = [
        {"type": "Feature", "properties": {"image_uri": "a.jpg", "prompt_id": pid}, "geometry": geometry}
        for pid, geometry in (
            ("a", {"type": "Point", "coordinates": []}),
            ("a", {"type": "Point", "coordinates": [1, 2]}),
            ("a-2", {"type": "Point", "coordinates": [3, 4]}),
        )
    ]
    (tmp_path / "p.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    job = {"name": "t", "input": {"uris": ["a.jpg"]}, "prompts": {"uri": str(tmp_path / "p.geojson")}}
    table = read_prompt_table(parse_job({**job, "output": {"uri": str(tmp_path / "out")}}))
    (prompts,) = table.prompts.values()
    assert [p.prompt_id for p in prompts] == ["a", "a-3", "a-2"]
    assert prompts[0].error.startswith("cannot be read") and prompts[1].error is None


def test_map_coordinates_on_an_image_without_georeferencing_are_a_reason() -> None:
    prompt = Prompt("p", (1.0, 2.0, 3.0, 4.0), (), (), False, crs="EPSG:4326")
    assert "not georeferenced" in in_image_pixels(prompt, 100, 100, None, None).error


def test_window_rule_in_a_tiled_scene() -> None:
    """Tiles of 256 px sharing 32 over 791 x 718: a box inside a tile goes there, one across a
    tile edge gets a window centred on it, one larger than a tile a decimated window."""
    inside, across, large = (40, 40, 120, 120), (150, 100, 300, 160), (50, 50, 600, 500)
    windows = plan_windows([inside, across, large, inside], 791, 718, 256, 32, 16)
    assert [w.prompts for w in windows] == [(0, 3), (1,), (2,)]
    assert windows[0].window == (0, 0, 256, 256) and windows[0].step == 1
    assert windows[1].window == (98, 2, 354, 258) and windows[1].step == 1  # centred on the grown box
    assert windows[2].step == 3 and windows[2].window[2] - windows[2].window[0] >= 600 - 50 + 32


def segmented(engine, scene, box: tuple[float, ...], tile_size: int) -> list:
    """The masks of one box prompt on `scene` cut into tiles of `tile_size` (32 shared, margin 16)."""
    plan = plan_prompts([Prompt("b", box, (), (), False)], scene.width, scene.height, None, None, tile_size, 32, 16)
    return segment_prompts(engine, scene, plan, False, lambda: None)


@pytest.mark.slow
def test_a_box_across_tiles_equals_the_box_in_a_window_centred_on_it() -> None:
    from sam_batch.engines.factory import build_engine

    engine = build_engine("vit_t", str(MOBILE_SAM), device="cpu")
    box = (150.0, 100.0, 300.0, 160.0)  # in no 256-px tile with its 16-px margin
    with RasterScene(str(LANDSAT)) as scene:
        tiled = segmented(engine, scene, box, 256)
        rgb, _ = scene.read((98, 2, 354, 258))  # 256 px centred on the box and its margin
    alone = segmented(engine, ArrayScene(rgb), (box[0] - 98, box[1] - 2, box[2] - 98, box[3] - 2), 256)
    a, b = tiled[0].mask, alone[0].mask
    assert (a.x0 - 98, a.y0 - 2) == (b.x0, b.y0) and np.array_equal(a.pixels, b.pixels) and a.iou == b.iou
    with RasterScene(str(LANDSAT)) as scene:  # larger than a tile: read decimated, mask at full resolution
        (large,) = segmented(engine, scene, (50.0, 50.0, 600.0, 500.0), 256)
    assert large.mask.area > 10_000 and 0 <= large.mask.x0 and large.mask.x0 + large.mask.pixels.shape[1] <= 791


@pytest.mark.slow
def test_ray_gives_the_rows_of_the_local_executor(tmp_path: Path) -> None:
    """A photo and a tiled scene (a prompt in a tile, one across tiles, one decimated), with a
    bad prompt and an image with none usable, through the embedded Ray and in process."""
    landsat, dog, truck = str(LANDSAT), str(IMAGES / "dog.jpg"), str(IMAGES / "truck.jpg")
    rows = [
        {"image_uri": landsat, "box": [40, 40, 120, 120], "label": "in-tile"},
        {"image_uri": landsat, "box": [150, 100, 300, 160], "label": "across"},
        {"image_uri": landsat, "box": [50, 50, 600, 500], "label": "large"},
        {"image_uri": landsat, "box": [900, 900, 950, 950], "label": "outside"},
        {"image_uri": dog, "box": [3, 225, 420, 531], "label": "dog"},
        {"image_uri": truck, "box": [20, 20, 10, 10], "label": "flipped"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "prompts.parquet")
    tables = {}
    for executor in ("local", "ray"):
        folder = tmp_path / executor
        folder.mkdir()
        job = yaml.safe_load(
            write_prompt_job(
                folder,
                [LANDSAT, IMAGES / "dog.jpg", IMAGES / "truck.jpg"],
                tmp_path / "prompts.parquet",
                carry=["label"],
            ).read_text()
        )
        job["raster"], job["run"] = {"tile_size": 256, "tile_overlap": 32}, {"executor": executor}
        (folder / "job.yaml").write_text(yaml.safe_dump(job))
        sam_batch("run", str(folder / "job.yaml"))
        tables[executor] = [pq.read_table(folder / "out" / name) for name in ("masks", "images")]
    keep = ["image_uri", "prompt_id", "mask_index", "label", "segmentation", "bbox", "predicted_iou", "crop_box"]
    local, ray = (tables[e][0].select(keep).to_pylist() for e in ("local", "ray"))
    assert local == ray and [m["label"] for m in local] == ["in-tile", "across", "large", "dog"]
    images = {e: {r["image_uri"].rsplit("/", 1)[-1]: r for r in tables[e][1].to_pylist()} for e in tables}
    for executor in ("local", "ray"):
        assert images[executor]["truck.jpg"]["status"] == "error"
        errors = images[executor]["RGB.byte.tif"]["prompt_errors"]
        assert len(errors) == 1 and "outside the 791x718 image" in errors[0]["error"]
