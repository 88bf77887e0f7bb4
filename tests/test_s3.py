"""Inputs from and output to a real S3 endpoint: moto's server on 127.0.0.1, through s3fs.

The credentials carry a canary secret that must never reach logs, errors or the output.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import s3fs
import yaml

from conftest import IMAGES

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
    for name in ("dog.jpg", "groceries.jpg", "corrupt.tif"):
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
    assert sorted(by_name) == ["corrupt.tif", "dog.jpg", "empty.jpg", "groceries.jpg"]
    assert all(r["image_uri"].startswith("s3://photos/in/") for r in images)
    assert by_name["dog.jpg"]["status"] == "ok" and by_name["dog.jpg"]["n_masks"] > 0
    assert by_name["empty.jpg"]["error"] == "read: file is empty (0 bytes)"
    assert by_name["corrupt.tif"]["error"].startswith("decode: ")
    masks = pq.read_table("photos/out/masks", filesystem=fs)
    assert masks.num_rows == sum(r["n_masks"] for r in images)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls("photos/out/_sam_batch/commits")) == [
        "shard-00000.json",
        "shard-00001.json",
    ]
    assert not fs.exists("photos/out/_sam_batch/attempts")


def test_duckdb_reads_the_s3_output_through_pyarrow(s3_run) -> None:
    fs, _, _, _ = s3_run
    masks = pq.read_table("photos/out/masks", filesystem=fs)  # noqa: F841 - read by DuckDB below
    per_image = duckdb.sql("SELECT image_uri, count(*) FROM masks GROUP BY ALL").fetchall()
    assert {uri.rsplit("/", 1)[-1] for uri, _ in per_image} == {"dog.jpg", "groceries.jpg"}


def test_rerun_on_s3_resumes(s3_run) -> None:
    fs, _, path, _ = s3_run
    result = subprocess.run([SAM_BATCH, "run", str(path)], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0 and "2 already done" in result.stdout
    record = json.loads(fs.cat_file("photos/out/run.json"))
    assert record["shards_skipped"] == 2 and record["images_ok"] == 0


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
