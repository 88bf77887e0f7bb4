"""Inputs from and output to a real S3 endpoint: moto's server on 127.0.0.1, through s3fs.

The credentials carry a canary secret that must never reach logs, errors or the output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import s3fs
import yaml

from shared_data import IMAGES

SAM_BATCH = str(Path(sys.executable).parent / "sam-batch")
CANARY = "canary-secret-7f3c9d1e"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    options = {
        "key": "testing-key",
        "secret": CANARY,
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
    }
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("photos")
    for name in ("dog.jpg", "groceries.jpg", "corrupt.tif", "RGB.byte.tif"):
        fs.put_file(str(IMAGES / name), f"photos/in/{name}")
    fs.pipe_file("photos/in/empty.jpg", b"")
    yield fs, options
    server.stop()


@pytest.fixture(scope="module")
def s3_run(s3, tmp_path_factory):
    fs, options = s3
    tmp = tmp_path_factory.mktemp("s3")
    job = {
        "name": "s3-photos",
        "input": {"uris": ["s3://photos/in/*"], "storage_options": options},
        "output": {"uri": "s3://photos/out", "storage_options": options},
        "amg": {"points_per_side": 6},
        "run": {"shard_size": 2, "executor": "ray"},
    }
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    result = subprocess.run([SAM_BATCH, "run", str(path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    return fs, options, path, result


def test_output_lands_on_s3_and_reads_back(s3_run) -> None:
    fs, _, _, _ = s3_run
    images = pq.read_table("photos/out/images", filesystem=fs).to_pylist()
    by_name = {r["image_uri"].rsplit("/", 1)[-1]: r for r in images}
    assert sorted(by_name) == ["RGB.byte.tif", "corrupt.tif", "dog.jpg", "empty.jpg", "groceries.jpg"]
    assert all(r["image_uri"].startswith("s3://photos/in/") for r in images)
    assert by_name["dog.jpg"]["status"] == "ok" and by_name["dog.jpg"]["n_masks"] > 0
    assert by_name["empty.jpg"]["error"] == "read: file is empty (0 bytes)"
    assert by_name["corrupt.tif"]["error"].startswith("decode: ")
    scene = by_name["RGB.byte.tif"]  # a GeoTIFF read window by window from S3
    assert scene["status"] == "ok" and scene["n_masks"] > 0 and scene["crs"] == "EPSG:32618"
    masks = pq.read_table("photos/out/masks", filesystem=fs)
    assert masks.num_rows == sum(r["n_masks"] for r in images)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("photos/out/_sam_batch/commits")) == [
        "shard-00000.json",
        "shard-00001.json",
        "shard-00002.json",
    ]
    assert not fs.exists("photos/out/_sam_batch/attempts")


def test_duckdb_reads_the_s3_output_through_pyarrow(s3_run) -> None:
    fs, _, _, _ = s3_run
    masks = pq.read_table("photos/out/masks", filesystem=fs)  # noqa: F841 - read by DuckDB below
    per_image = duckdb.sql("SELECT image_uri, count(*) FROM masks GROUP BY ALL").fetchall()
    assert {uri.rsplit("/", 1)[-1] for uri, _ in per_image} == {"RGB.byte.tif", "dog.jpg", "groceries.jpg"}


def test_rerun_on_s3_resumes(s3_run) -> None:
    fs, _, path, _ = s3_run
    result = subprocess.run([SAM_BATCH, "run", str(path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "3 already done" in result.stdout
    record = json.loads(fs.cat_file("photos/out/run.json"))
    assert record["shards_skipped"] == 3 and record["images_ok"] == 0


def test_the_secret_never_leaks(s3_run) -> None:
    fs, _, path, result = s3_run
    assert CANARY not in result.stdout + result.stderr
    for key in fs.find("photos/out"):
        assert CANARY.encode() not in fs.cat_file(key), key
    validate = subprocess.run([SAM_BATCH, "validate", str(path)], capture_output=True, text=True, timeout=300)
    assert validate.returncode == 0 and CANARY not in validate.stdout + validate.stderr
    broken = yaml.safe_load(path.read_text())
    broken["output"]["storage_options"]["client_kwargs"]["endpoint_url"] = "http://127.0.0.1:9"
    broken["output"]["uri"] = "s3://photos/elsewhere"
    path.write_text(yaml.safe_dump(broken))
    failed = subprocess.run([SAM_BATCH, "run", str(path)], capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and CANARY not in failed.stdout + failed.stderr


SIDE = 4096  # pixels a side of the test scenes (48 MiB of RGB)
WINDOW = (1024, 1024, 1536, 1536)  # XYXY: one 512-pixel window, 1/64 of the scene


@pytest.fixture(scope="module")
def scenes_behind_a_counter(s3, tmp_path_factory):
    """A tiled COG with overviews and a plain strip TIFF (`SIDE`² RGB noise, so that blocks do not
    compress away) on S3, and the options that reach them through a `CountingProxy`."""
    import numpy as np
    import rasterio
    from rasterio.shutil import copy as copy_raster

    from s3_counter import CountingProxy

    fs, options = s3
    tmp = tmp_path_factory.mktemp("scenes")
    pixels = np.random.default_rng(0).integers(0, 256, (3, SIDE, SIDE), dtype=np.uint8)
    profile = {
        "driver": "GTiff",
        "width": SIDE,
        "height": SIDE,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32618",
        "transform": rasterio.transform.from_origin(300_000, 4_000_000, 1, 1),
    }
    with rasterio.open(tmp / "strip.tif", "w", **profile) as out:
        out.write(pixels)
    with rasterio.open(tmp / "tiled.tif", "w", tiled=True, blockxsize=256, blockysize=256, **profile) as out:
        out.write(pixels)
        out.build_overviews([2, 4, 8])
    copy_raster(tmp / "tiled.tif", tmp / "cog.tif", driver="COG", blocksize=256)
    for name in ("strip.tif", "cog.tif"):
        fs.put_file(str(tmp / name), f"photos/scenes/{name}")
    moto_port = int(options["client_kwargs"]["endpoint_url"].rsplit(":", 1)[1])
    with CountingProxy(moto_port) as proxy:
        through = {
            **options,
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{proxy.port}"},
            "skip_instance_cache": True,
        }
        yield fs, through, proxy


READERS = {"gdal": {}, "fsspec": {"requester_pays": False}}  # an option only s3fs takes: read through it


@pytest.mark.parametrize("reader", sorted(READERS))
@pytest.mark.parametrize("name", ["cog.tif", "strip.tif"])
def test_scenes_on_s3_are_read_window_by_window(scenes_behind_a_counter, name, reader) -> None:
    """A window costs the blocks under it: a few range requests, a fraction of the file, with
    GDAL's S3 reader and with fsspec's."""
    from sam_batch.pipeline.rasters import REMOTE_BLOCK_BYTES, RasterScene, gdal_s3_session

    fs, through, proxy = scenes_behind_a_counter
    options = {**through, **READERS[reader]}
    assert (gdal_s3_session(options) is not None) == (reader == "gdal")
    size = fs.size(f"photos/scenes/{name}")
    proxy.reset()
    with RasterScene(f"s3://photos/scenes/{name}", options) as scene:
        rgb, valid = scene.read(WINDOW)
    assert rgb.shape == (512, 512, 3) and valid is None and scene.crs == "EPSG:32618"
    fetched, requests = proxy.bytes[f"/photos/scenes/{name}"], proxy.gets[f"/photos/scenes/{name}"]
    # the blocks under the window (6 MiB of rows, or 4 tiles) and the header's, not the 48 MiB file
    assert 0 < requests <= 6 and fetched <= size / 4
    if reader == "fsspec":
        assert fetched <= requests * REMOTE_BLOCK_BYTES


def test_s3_creates_only_if_absent(s3) -> None:
    """The store check a run makes first passes on S3 (conditional puts), and leaves nothing."""
    from sam_batch.jobs.dataset import OutputDataset

    fs, options = s3
    dataset = OutputDataset("s3://photos/probed", options)
    dataset.check_exclusive_create(dataset.check_writable())
    fs.invalidate_cache()
    assert fs.find("photos/probed") == []


@pytest.mark.slow
def test_a_run_on_an_s3_output_another_process_holds_is_refused(s3, tmp_path) -> None:
    """This process holds the lease of an S3 output; `sam-batch run` there is refused with one
    line naming the holder, and runs to the end once the lease is given back."""
    from sam_batch.jobs.dataset import OutputDataset
    from sam_batch.jobs.lease import OutputLease

    fs, options = s3
    names = ["dog.jpg", "groceries.jpg"]
    job = {
        "name": "s3-lease",
        "input": {"uris": [str(IMAGES / n) for n in names]},
        "output": {"uri": "s3://photos/leased", "storage_options": options},
        "amg": {"points_per_side": 4},
        "run": {"executor": "local", "shard_size": 1},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    with OutputLease(OutputDataset("s3://photos/leased", options)):
        refused = subprocess.run([SAM_BATCH, "run", str(path)], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and CANARY not in refused.stdout + refused.stderr
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"sam-batch: LeaseHeld: s3://photos/leased is being written by another run (process {os.getpid()} on "
        )
    )
    fs.invalidate_cache()
    assert not fs.exists("photos/leased/_sam_batch/plan.json")  # refused before it planned
    result = subprocess.run([SAM_BATCH, "run", str(path)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = pq.read_table("photos/leased/images", filesystem=fs).to_pylist()
    assert sorted(r["image_uri"].rsplit("/", 1)[-1] for r in rows) == names
    keys = [(m["image_id"], m["mask_id"]) for m in pq.read_table("photos/leased/masks", filesystem=fs).to_pylist()]
    assert len(keys) == len(set(keys)) == sum(r["n_masks"] for r in rows) > 0


def test_gdal_reads_s3_only_with_what_s3fs_would_use() -> None:
    """The job's S3 options become GDAL's settings one for one; any option GDAL would not take
    the same way sends the scene through fsspec instead."""
    from sam_batch.pipeline.rasters import gdal_s3_session

    session, settings = gdal_s3_session(
        {
            "key": "id",
            "secret": CANARY,
            "token": "t",
            "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": "https://s3.example.org:9000", "region_name": "eu-west-1"},
        }
    )
    assert session.get_credential_options() == {
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": CANARY,
        "AWS_SESSION_TOKEN": "t",
        "AWS_REGION": "eu-west-1",
        "AWS_S3_ENDPOINT": "s3.example.org:9000",
    }
    assert settings == {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "AWS_HTTPS": "YES", "AWS_VIRTUAL_HOSTING": "FALSE"}
    assert CANARY not in repr(session)
    assert gdal_s3_session({"anon": True})[0].get_credential_options() == {"AWS_NO_SIGN_REQUEST": "YES"}
    for other in (
        {"requester_pays": True},
        {"config_kwargs": {"signature_version": "s3v4"}},
        {"client_kwargs": {"verify": False}},
        {"endpoint_url": "http://host:9000/prefix"},
        {"endpoint_url": "ftp://host"},
    ):
        assert gdal_s3_session(other) is None, other


def test_the_installed_s3fs_creates_only_if_absent() -> None:
    """pip resolved an s3fs whose "xb" is a conditional put (2025.7.0 on), not the 2019 one it
    fell back to before the extras asked for it."""
    major, minor = (int(part) for part in s3fs.__version__.split(".")[:2])
    assert (major, minor) >= (2025, 7), s3fs.__version__


RACE_ROUNDS = 20
RACER = """
import json, sys, time
import pyarrow as pa
from sam_batch.jobs.dataset import OutputDataset
from sam_batch.jobs.plan import Shard
options, run_id, start = json.loads(sys.argv[1]), sys.argv[2], float(sys.argv[3])
results = []
for round_ in range(int(sys.argv[4])):
    dataset = OutputDataset(f"s3://photos/race/{round_}", options, run_id=run_id)
    rows = pa.table({"image_id": [run_id], "round": [round_]})
    time.sleep(max(0.0, start + round_ * float(sys.argv[5]) - time.time()))  # both racers start at once
    results.append(dataset.commit_shard(Shard(0, ("x.jpg",)), rows, rows, {"run_id": run_id}))
print(json.dumps(results))
"""


@pytest.mark.slow
def test_racing_commits_of_one_shard_on_s3_have_one_winner_whose_files_stay(s3) -> None:
    """Two processes (two runs) commit the same shard with different rows at the same moment,
    in each of 20 rounds: exactly one wins, its marker names it, and the files under masks/
    and images/ are the winner's, never the loser's."""
    import time

    fs, options = s3
    round_s = 0.5  # s between rounds: a commit on moto takes well under it
    start = time.time() + 5.0  # both processes are up by then
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, json.dumps(options), run_id, str(start), str(RACE_ROUNDS), str(round_s)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for run_id in ("run-a", "run-b")
    ]
    outcomes = {}
    for run_id, racer in zip(("run-a", "run-b"), racers):
        stdout, stderr = racer.communicate(timeout=300)
        assert racer.returncode == 0, stderr
        outcomes[run_id] = json.loads(stdout)
    fs.invalidate_cache()
    for round_ in range(RACE_ROUNDS):
        winners = [run_id for run_id, won in outcomes.items() if won[round_]]
        assert len(winners) == 1, (round_, outcomes)
        folder = f"photos/race/{round_}"
        assert json.loads(fs.cat_file(f"{folder}/_sam_batch/commits/shard-00000.json"))["run_id"] == winners[0]
        for table in ("masks", "images"):
            rows = pq.read_table(f"{folder}/{table}/shard-00000.parquet", filesystem=fs).to_pylist()
            assert rows == [{"image_id": winners[0], "round": round_}], (round_, table)
