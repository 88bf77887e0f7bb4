"""`sam-batch run` end to end on the real images: Ray and in-process, read back with pyarrow and DuckDB."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from pycocotools import mask as mask_utils

from shared_data import IMAGES

SAM_BATCH = str(Path(sys.executable).parent / "sam-batch")
ALL_IMAGES = sorted(p.name for p in IMAGES.iterdir())
FAST_AMG = {"points_per_side": 8, "points_per_batch": 64}


def write_job(tmp_path: Path, name: str, uris: list[str], out: Path, **sections) -> Path:
    job = {"name": name, "input": {"uris": uris}, "output": {"uri": str(out)}, **sections}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def sam_batch(*args: str, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`sam-batch ARGS` as a process (with `env` added to this one's environment); raises on a
    non-zero exit when `check`."""
    result = subprocess.run(
        [SAM_BATCH, *args], capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})}
    )
    if check and result.returncode != 0:
        raise AssertionError(f"sam-batch {args} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """Every image of ../shared/data/images through the embedded Ray, 3 shards."""
    tmp = tmp_path_factory.mktemp("ray_run")
    out = tmp / "out"
    job = write_job(tmp, "all-images", [str(IMAGES / "*")], out, amg=FAST_AMG, run={"shard_size": 5, "executor": "ray"})
    return job, out, sam_batch("run", str(job))


def test_every_input_is_one_images_row(ray_run) -> None:
    _, out, result = ray_run
    images = pq.read_table(out / "images").to_pylist()
    assert sorted(Path(r["image_uri"]).name for r in images) == ALL_IMAGES
    assert len({r["image_id"] for r in images}) == len(ALL_IMAGES)
    by_name = {Path(r["image_uri"]).name: r for r in images}
    bad = by_name["corrupt.tif"]
    assert bad["status"] == "error" and bad["error"].startswith("decode: ") and bad["n_masks"] == 0
    good = [r for name, r in by_name.items() if name != "corrupt.tif"]
    assert all(r["status"] == "ok" and r["error"] is None for r in good)
    assert (by_name["dog.jpg"]["width"], by_name["dog.jpg"]["height"]) == (800, 534)
    assert (by_name["truck.jpg"]["width"], by_name["truck.jpg"]["height"]) == (1800, 1200)
    assert sum(r["n_masks"] for r in good) > 0
    assert "images: 11 ok, 1 error" in result.stdout
    # the progress line of a failed image says why
    assert f"error {IMAGES / 'corrupt.tif'} masks=0 ({bad['error']}) | total masks=" in result.stderr


def test_every_mask_decodes_to_its_area_and_box(ray_run) -> None:
    _, out, _ = ray_run
    masks = pq.read_table(out / "masks").to_pylist()
    sizes = {r["image_id"]: (r["height"], r["width"]) for r in pq.read_table(out / "images").to_pylist()}
    assert masks
    for row in masks:
        rle = {"size": row["segmentation"]["size"], "counts": row["segmentation"]["counts"].encode()}
        assert tuple(rle["size"]) == sizes[row["image_id"]]
        decoded = mask_utils.decode(rle)
        assert int(decoded.sum()) == row["area"] == int(mask_utils.area(rle))
        ys, xs = np.nonzero(decoded)
        x0, y0 = xs.min(), ys.min()
        assert row["bbox"] == [float(x0), float(y0), float(xs.max() - x0), float(ys.max() - y0)]
        assert row["predicted_iou"] > 0.88 and row["stability_score"] >= 0.95
        assert len(row["point_coords"]) == 1 and len(row["point_coords"][0]) == 2
        height, width = sizes[row["image_id"]]
        # every image here is whole (raster.tiling: auto): photos of any size, scenes within a tile
        assert row["crop_box"] == [0, 0, width, height]


def test_schema_is_the_spec(ray_run) -> None:
    _, out, _ = ray_run
    masks = pq.read_schema(next((out / "masks").glob("*.parquet")))
    as_written = [
        (f.name, str(f.type).replace("element:", "item:")) for f in masks
    ]  # Parquet names list items "element"
    assert as_written == [
        ("image_uri", "string"),
        ("image_id", "string"),
        ("mask_id", "int32"),
        ("segmentation", "struct<size: list<item: int32>, counts: string>"),
        ("box_segmentation", "struct<size: list<item: int32>, counts: string>"),
        ("box_origin", "list<item: int32>"),
        ("bbox", "list<item: double>"),
        ("area", "int64"),
        ("predicted_iou", "float"),
        ("stability_score", "float"),
        ("point_coords", "list<item: list<item: double>>"),
        ("crop_box", "list<item: int32>"),
        ("geometry", "binary"),
        ("geometry_bbox", "struct<xmin: double, ymin: double, xmax: double, ymax: double>"),
    ]
    images = pq.read_schema(next((out / "images").glob("*.parquet")))
    assert images.names == [
        "image_uri",
        "image_id",
        "status",
        "error",
        "width",
        "height",
        "n_masks",
        "seconds",
        "crs",
        "transform",
    ]


def test_duckdb_reads_the_output(ray_run) -> None:
    _, out, _ = ray_run
    masks, images = f"read_parquet('{out}/masks/*.parquet')", f"read_parquet('{out}/images/*.parquet')"
    duplicates = duckdb.sql(
        f"SELECT count(*) FROM (SELECT image_id, mask_id FROM {masks} GROUP BY ALL HAVING count(*) > 1)"
    )
    assert duplicates.fetchall()[0][0] == 0
    per_image = duckdb.sql(
        f"SELECT i.image_id, i.n_masks, count(m.mask_id) AS n, coalesce(max(m.mask_id), -1) AS last "
        f"FROM {images} i LEFT JOIN {masks} m USING (image_id) GROUP BY ALL"
    ).fetchall()
    assert len(per_image) == len(ALL_IMAGES)
    for _, n_masks, n, last in per_image:
        assert n_masks == n and last == n - 1  # mask ids are 0..n-1
    largest = duckdb.sql(f"SELECT max(area) FROM {masks} WHERE image_uri LIKE '%truck.jpg'").fetchall()[0][0]
    assert 0 < largest <= 1800 * 1200


def test_run_record_and_shards(ray_run) -> None:
    _, out, _ = ray_run
    record = json.loads((out / "run.json").read_text())
    assert record["executor"] == "ray" and record["n_shards"] == 3 and record["shards_committed"] == 3
    assert record["images_ok"] == 11 and record["images_error"] == 1
    assert sorted(p.name for p in (out / "masks").iterdir()) == [f"shard-0000{i}.parquet" for i in range(3)]
    assert not list((out / "_sam_batch" / "attempts").rglob("*"))  # no run's attempts left


def test_rerun_resumes_without_redoing_work(ray_run) -> None:
    job, out, _ = ray_run
    before = pq.read_table(out / "masks")
    result = sam_batch("run", str(job))
    record = json.loads((out / "run.json").read_text())
    assert record["shards_skipped"] == 3 and record["shards_committed"] == 0 and record["images_ok"] == 0
    assert pq.read_table(out / "masks").equals(before)
    assert "3 already done" in result.stdout


def test_a_different_job_is_refused_unless_overwrite(ray_run, tmp_path) -> None:
    _, out, _ = ray_run
    other = write_job(tmp_path, "other", [str(IMAGES / "dog.jpg")], out, amg=FAST_AMG)
    refused = sam_batch("run", str(other), check=False)
    assert refused.returncode == 1 and "--overwrite" in refused.stderr
    copy = tmp_path / "copy"
    other = write_job(tmp_path, "other", [str(IMAGES / "dog.jpg")], copy, amg=FAST_AMG, run={"executor": "local"})
    sam_batch("run", str(other))
    sam_batch("run", str(other), "--set", "amg.points_per_side=4", "--overwrite")
    images = pq.read_table(copy / "images").to_pylist()
    assert [Path(r["image_uri"]).name for r in images] == ["dog.jpg"]


def test_local_executor_gives_the_same_rows_as_ray(ray_run, tmp_path) -> None:
    _, out, _ = ray_run
    uris = [str(IMAGES / n) for n in ("dog.jpg", "rgb1.tif")]
    job = write_job(tmp_path, "local", uris, tmp_path / "local", amg=FAST_AMG, run={"executor": "local"})
    sam_batch("run", str(job))
    local = pq.read_table(tmp_path / "local" / "masks").drop_columns([]).to_pylist()
    ray_rows = [r for r in pq.read_table(out / "masks").to_pylist() if r["image_uri"] in uris]
    key = lambda r: (r["image_uri"], r["mask_id"])  # noqa: E731
    assert len(local) == len(ray_rows) > 0
    for a, b in zip(sorted(local, key=key), sorted(ray_rows, key=key)):
        assert a["segmentation"] == b["segmentation"] and a["bbox"] == b["bbox"]


def test_render_draws_an_overlay(ray_run, tmp_path) -> None:
    _, out, _ = ray_run
    png = tmp_path / "overlay.png"
    result = sam_batch("render", str(out), str(IMAGES / "dog.jpg"), "-o", str(png))
    from PIL import Image

    picture = Image.open(png)
    assert picture.size == (800, 534) and "masks over" in result.stdout
    original = np.asarray(Image.open(IMAGES / "dog.jpg").convert("RGB"))
    assert not np.array_equal(np.asarray(picture), original)
    missing = sam_batch("render", str(out), str(IMAGES / "nope.jpg"), "-o", str(png), check=False)
    assert missing.returncode == 1 and "nope.jpg" in missing.stderr
    jpeg = tmp_path / "overlay.jpg"
    sam_batch("render", str(out), str(IMAGES / "dog.jpg"), "-o", str(jpeg))
    assert Image.open(jpeg).format == "JPEG" and Image.open(png).format == "PNG"
    odd = sam_batch("render", str(out), str(IMAGES / "dog.jpg"), "-o", str(tmp_path / "overlay.xyz"), check=False)
    assert odd.returncode == 1 and "overlay.xyz: unknown file extension" in odd.stderr
    nowhere = sam_batch("render", str(tmp_path / "no-output"), str(IMAGES / "dog.jpg"), "-o", str(png), check=False)
    assert nowhere.returncode == 1 and "no-output: no sam-batch output there" in nowhere.stderr
    shard = next((out / "masks").glob("*.parquet"))
    a_file = sam_batch("render", str(shard), str(IMAGES / "dog.jpg"), "-o", str(png), check=False)
    assert a_file.returncode == 1 and "cannot be read as a sam-batch output" in a_file.stderr


def test_torch_loads_in_the_segmenting_actors_only(tmp_path) -> None:
    """A Ray job's driver, and the read and commit tasks (functions of modules the driver
    imports), never import torch: it is the segmenting actors' alone."""
    out = tmp_path / "out"
    job = write_job(
        tmp_path, "light-driver", [str(IMAGES / "dog.jpg")], out, amg={"points_per_side": 2}, run={"executor": "ray"}
    )
    driver = (
        "import sys; from sam_batch.cli import main; rc = main(sys.argv[1:]); "
        "print('torch' in sys.modules); sys.exit(rc)"
    )
    result = subprocess.run(
        [sys.executable, "-c", driver, "run", str(job)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "False"
    assert pq.read_table(out / "images").column("status").to_pylist() == ["ok"]
    assert pq.read_table(out / "masks").num_rows > 0


BLOCK_IMPORTS = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError("not installed here: " + name)
sys.meta_path.insert(0, Block())
from sam_batch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_photos_run_in_process_without_ray_or_rasterio(tmp_path) -> None:
    """The in-process executor on photos needs neither Ray nor rasterio (a GPU box without them,
    as deploy/gpu-check.sh finds one, runs jobs)."""
    out = tmp_path / "out"
    job = write_job(
        tmp_path, "bare", [str(IMAGES / "dog.jpg")], out, amg={"points_per_side": 2}, run={"executor": "local"}
    )
    driver = BLOCK_IMPORTS.format(blocked=("ray", "rasterio"))
    result = subprocess.run(
        [sys.executable, "-c", driver, "run", str(job)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert pq.read_table(out / "images").select(["status", "error"]).to_pylist() == [{"status": "ok", "error": None}]
    assert pq.read_table(out / "masks").num_rows > 0


STOP_AFTER_FIRST_COMMIT = """
import sys
from sam_batch.jobs import executors
from sam_batch.jobs.worker import ShardCommit
run = executors.LocalExecutor.run
def stopping(self, shards, dataset):
    for event in run(self, shards, dataset):
        yield event
        if isinstance(event, ShardCommit):
            raise KeyboardInterrupt
executors.LocalExecutor.run = stopping
from sam_batch.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_default_executor_runs_a_small_job_in_process_and_resumes_it(tmp_path) -> None:
    """`run.executor: auto` (the default) runs a two-image job in this process; a run stopped
    after its first shard's commit is resumed by the same command, every image once."""
    out = tmp_path / "out"
    names = ["dog.jpg", "groceries.jpg"]
    job = write_job(
        tmp_path, "default", [str(IMAGES / n) for n in names], out, amg={"points_per_side": 2}, run={"shard_size": 1}
    )
    stopped = subprocess.run(
        [sys.executable, "-c", STOP_AFTER_FIRST_COMMIT, "run", str(job)], capture_output=True, text=True, timeout=600
    )
    assert stopped.returncode == 1 and "run the same command again to resume" in stopped.stderr
    assert "executor: local (auto: 2 images to do" in stopped.stderr
    assert len(list((out / "_sam_batch" / "commits").iterdir())) == 1
    again = sam_batch("run", str(job))
    record = json.loads((out / "run.json").read_text())
    assert (record["executor"], record["shards_skipped"], record["shards_committed"]) == ("local", 1, 1)
    assert "executor: local (auto: 1 image to do" in again.stderr
    assert sorted(Path(r["image_uri"]).name for r in pq.read_table(out / "images").to_pylist()) == names


def test_validate_prints_the_plan_without_running(tmp_path) -> None:
    job = write_job(tmp_path, "plan", [str(IMAGES / "*.jpg")], tmp_path / "out", run={"shard_size": 3})
    result = sam_batch("validate", str(job))
    assert "8 images in 3 shards" in result.stdout and "(new)" in result.stdout
    assert not (tmp_path / "out").exists()


def test_a_resumed_job_keeps_its_frozen_plan_and_overwrite_keeps_the_output_until_a_new_plan(tmp_path) -> None:
    """A file added after the first run is not in the job (validate says so, a run resumes the
    frozen plan); the output is the job's however its URI is spelled; --overwrite with a job
    that lists nothing fails before it removes anything."""
    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        Image.open(IMAGES / "dog.jpg").resize((96, 64)).save(folder / name)
    out = tmp_path / "out"
    job = write_job(
        tmp_path,
        "frozen",
        [str(folder / "*.jpg")],
        out,
        amg={"points_per_side": 2},
        run={"executor": "local", "shard_size": 1},
    )
    sam_batch("run", str(job))
    Image.open(IMAGES / "dog.jpg").resize((96, 64)).save(folder / "c.jpg")

    validate = sam_batch("validate", str(job)).stdout
    assert "inputs: 2 images in 2 shards (frozen by the job's first run)" in validate
    assert f"1 listed now, not in the frozen plan (a run skips them): first {folder / 'c.jpg'}" in validate
    resumed = sam_batch("run", str(job), "--set", f"output.uri={out}/")
    assert "resuming: the plan of this job's first run stands (2 images in 2 shards" in resumed.stderr
    assert "0 ok, 0 error" in resumed.stdout and "2 already done" in resumed.stdout

    nothing = sam_batch("run", str(job), "--set", f"input.uris=[{folder}/*.png]", "--overwrite", check=False)
    assert nothing.returncode == 1 and "no images found" in nothing.stderr and "removing" not in nothing.stderr
    assert sorted(Path(u).name for u in pq.read_table(out / "images").column("image_uri").to_pylist()) == [
        "a.jpg",
        "b.jpg",
    ]
    assert "holds this job" in sam_batch("validate", str(job)).stdout


def test_invalid_job_exits_2_naming_the_field(tmp_path) -> None:
    job = write_job(tmp_path, "bad", [str(IMAGES / "dog.jpg")], tmp_path / "out", engine={"backend": "tensorflow"})
    result = sam_batch("run", str(job), check=False)
    assert result.returncode == 2
    assert "engine.backend" in result.stderr and "torch" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_an_output_uri_that_is_a_file_is_one_line_for_validate_and_run(tmp_path) -> None:
    (tmp_path / "out").write_text("not a folder")
    job = write_job(tmp_path, "file-out", [str(IMAGES / "dog.jpg")], tmp_path / "out", run={"executor": "local"})
    for command in ("validate", "run"):
        result = sam_batch(command, str(job), check=False)
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert f"output.uri '{tmp_path / 'out'}' is a file" in result.stderr


@pytest.fixture
def read_only_folder(tmp_path) -> Iterator[Path]:
    """A folder that refuses writes, holding a folder `existing`: of mode 0555, or for root
    (whom modes do not stop) a tmpfs mounted read-only."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        (folder / "existing").mkdir()
        for path in (folder / "existing", folder):
            path.chmod(0o555)
        yield folder
        for path in (folder, folder / "existing"):
            path.chmod(0o755)  # so that pytest can remove them
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs privileges this machine does not give")
    try:
        (folder / "existing").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)  # detach it even if busy


def test_a_read_only_output_is_one_line_for_validate_and_run_before_any_work(tmp_path, read_only_folder) -> None:
    """A write probe in the output's root, or while it does not exist in the nearest folder
    above it: `validate` and `run` say the same line, exit 2, and `run` starts nothing."""
    reason = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    for out, probed in (
        (read_only_folder / "existing", read_only_folder / "existing"),
        (read_only_folder / "new" / "out", read_only_folder),
    ):
        job = write_job(tmp_path, "read-only", [str(IMAGES / "dog.jpg")], out, run={"executor": "local"})
        line = f"sam-batch: invalid job: output.uri '{out}' cannot be written ({probed}: {reason})"
        for command in ("validate", "run"):
            result = sam_batch(command, str(job), check=False)
            assert result.returncode == 2 and result.stderr.strip().splitlines() == [line], result.stderr
            assert "output:" not in result.stdout


def test_no_inputs_is_a_job_failure(tmp_path) -> None:
    job = write_job(tmp_path, "empty", [str(tmp_path / "nothing" / "*.jpg")], tmp_path / "out")
    result = sam_batch("run", str(job), check=False)
    assert result.returncode == 1 and "no images found" in result.stderr


def test_an_unreadable_plan_is_one_line_and_overwrite_starts_again(tmp_path) -> None:
    """A plan cut short (as a kill in the middle of writing it would leave it) stops the run with
    one line naming it; --overwrite clears the output and runs."""
    out = tmp_path / "out"
    (out / "_sam_batch").mkdir(parents=True)
    (out / "_sam_batch" / "plan.json").write_text('{"fingerprint": "3f2a')
    job = write_job(
        tmp_path, "cut", [str(IMAGES / "dog.jpg")], out, amg={"points_per_side": 4}, run={"executor": "local"}
    )
    refused = sam_batch("run", str(job), check=False)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "plan.json cannot be read" in refused.stderr and "--overwrite" in refused.stderr
    sam_batch("run", str(job), "--overwrite")
    assert pq.read_table(out / "images").column("status").to_pylist() == ["ok"]
    assert not list((out / "_sam_batch" / "attempts").rglob("*"))  # no run's attempts left


def test_plan_and_run_record_are_never_half_written(tmp_path) -> None:
    """A write that dies half-way leaves the previous plan and run record readable, whole."""
    from sam_batch.jobs.dataset import OutputDataset
    from sam_batch.jobs.plan import Plan, Shard

    dataset = OutputDataset(str(tmp_path / "out"))
    first = Plan("f" * 16, {"name": "a"}, (Shard(0, ("x.jpg",)),))
    dataset.write_plan(first)
    dataset.write_run_record({"images_ok": 1})

    def dies_half_way(path: str, data: bytes) -> None:
        with dataset.fs.open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError("killed")

    dataset._write_bytes = dies_half_way
    with pytest.raises(OSError):
        dataset.write_plan(Plan("e" * 16, {"name": "b"}, (Shard(0, ("y.jpg",)),)))
    with pytest.raises(OSError):
        dataset.write_run_record({"images_ok": 2})
    assert dataset.read_plan() == first
    assert json.loads((tmp_path / "out" / "run.json").read_text()) == {"images_ok": 1}
    dataset.clean_attempts(None)
    assert sorted(p.name for p in (tmp_path / "out" / "_sam_batch").iterdir()) == ["attempts", "plan.json"]
    assert not list((tmp_path / "out" / "_sam_batch" / "attempts").iterdir())


def test_a_commit_that_dies_before_its_files_are_written_publishes_nothing(tmp_path) -> None:
    """Both tables are staged in full before either is moved under masks/ or images/."""
    from sam_batch.jobs.dataset import OutputDataset
    from sam_batch.jobs.plan import Shard
    from sam_batch.pipeline.tables import IMAGES_SCHEMA, MASKS_SCHEMA

    dataset = OutputDataset(str(tmp_path / "out"))
    write_bytes = dataset._write_bytes

    def dies_on_images(path: str, data: bytes) -> None:
        if path.endswith("images.parquet"):
            raise OSError("killed")
        write_bytes(path, data)

    dataset._write_bytes = dies_on_images
    shard = Shard(0, ("x.jpg",))
    with pytest.raises(OSError):
        dataset.commit_shard(shard, MASKS_SCHEMA.empty_table(), IMAGES_SCHEMA.empty_table(), {})
    assert not (tmp_path / "out" / "masks").exists() and not (tmp_path / "out" / "images").exists()
    dataset._write_bytes = write_bytes
    assert dataset.commit_shard(shard, MASKS_SCHEMA.empty_table(), IMAGES_SCHEMA.empty_table(), {})
    assert dataset.committed_shards() == {0}
    dataset.clean_attempts(None)
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == ["shard-00000.parquet"]


def test_local_executor_reads_ahead_and_bad_files_are_rows(tmp_path) -> None:
    """The in-process executor (its reader thread a file ahead): bad files are error rows naming
    the stage, the others are segmented, every input once, in plan order."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a-empty.jpg").write_bytes(b"")
    (folder / "b-dog.jpg").write_bytes((IMAGES / "dog.jpg").read_bytes())
    (folder / "c-text.png").write_text("not an image")
    (folder / "d-truck.jpg").write_bytes((IMAGES / "truck.jpg").read_bytes())
    out = tmp_path / "out"
    job = write_job(
        tmp_path,
        "local-bad",
        [str(folder / "*")],
        out,
        amg={"points_per_side": 2},
        run={"executor": "local", "shard_size": 3},
    )
    sam_batch("run", str(job))
    rows = sorted(pq.read_table(out / "images").to_pylist(), key=lambda r: r["image_uri"])
    assert [(Path(r["image_uri"]).name, r["status"]) for r in rows] == [
        ("a-empty.jpg", "error"),
        ("b-dog.jpg", "ok"),
        ("c-text.png", "error"),
        ("d-truck.jpg", "ok"),
    ]
    assert rows[0]["error"].startswith("read:") and rows[2]["error"].startswith("decode:")
    assert all("\n" not in r["error"] for r in rows if r["error"])
    assert rows[1]["n_masks"] > 0 and rows[1]["seconds"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_a_fifo_named_like_a_photo_is_an_error_row_not_a_hang(tmp_path, executor: str) -> None:
    import os

    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    job = write_job(
        tmp_path,
        "fifo",
        [str(fifo), str(IMAGES / "dog.jpg")],
        out,
        amg={"points_per_side": 2},
        run={"executor": executor},
    )
    sam_batch("run", str(job))
    rows = {Path(r["image_uri"]).name: r for r in pq.read_table(out / "images").to_pylist()}
    assert rows["x.jpg"]["status"] == "error" and rows["x.jpg"]["error"] == "read: a FIFO, not a regular file"
    assert rows["dog.jpg"]["status"] == "ok"


@pytest.mark.slow
def test_a_full_disk_names_the_output_and_a_rerun_resumes(tmp_path) -> None:
    """On a 40 KiB tmpfs (the first shard takes 32 KiB of pages: plan, lease, claim, marker and
    its two files) the second shard's commit finds no space: one line naming the output, exit 1;
    with room again (the same mount, grown), the same command finishes the job."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs privileges this machine does not give")
    try:
        out = disk / "out"
        names = ["dog.jpg", "groceries.jpg", "picture1.jpg"]
        job = write_job(
            tmp_path,
            "full-disk",
            [str(IMAGES / n) for n in names],
            out,
            amg={"points_per_side": 2},
            run={"executor": "local", "shard_size": 1},
        )
        full = sam_batch("run", str(job), check=False)
        assert full.returncode == 1
        assert f"{out}: no space left on its device while committing shard-0000" in full.stderr
        assert "run the same command again" in full.stderr
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        again = sam_batch("run", str(job))
        done = int(re.search(r"shards: \d+ committed, (\d+) already done", again.stdout).group(1))
        assert done >= 1  # what the full disk let through was kept
        assert sorted(Path(r["image_uri"]).name for r in pq.read_table(out / "images").to_pylist()) == names
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)  # detach it even if busy


def test_a_commit_out_of_space_or_quota_is_one_line_naming_the_output(tmp_path, monkeypatch) -> None:
    """Without a small disk to fill: the write fails as a full disk or a quota would."""
    import errno

    from sam_batch.jobs.dataset import DatasetError, OutputDataset
    from sam_batch.jobs.plan import Shard
    from sam_batch.pipeline.tables import images_table, masks_table

    dataset = OutputDataset(str(tmp_path / "out"))
    for code, what in ((errno.ENOSPC, "no space left on its device"), (errno.EDQUOT, "over its disk quota")):

        def full(path: str, data: bytes, code: int = code) -> None:
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(dataset, "_write_bytes", full)
        with pytest.raises(DatasetError, match=f"out: {what} while committing shard-00003; free some and run the same"):
            dataset.commit_shard(Shard(3, ("a.jpg",)), masks_table([], [], "EPSG:4326"), images_table([]), {})
