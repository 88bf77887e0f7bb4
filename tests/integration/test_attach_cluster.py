"""`sam-batch run` attached to a running two-node Ray cluster through `run.ray_address`.

The cluster is Ray's own multi-node test cluster (`ray.cluster_utils.Cluster`): a head and a
second node on 127.0.0.1, one CPU each, started by this process so that their raylets, and the
actors those raylets start, inherit `SAM_BATCH_CACHE` (set by conftest.py) and so find the
seeded weights. With one CPU per node the executor's one-actor-per-CPU pool puts one actor on
each node; the run record names the node of every actor that returned an image.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from ray.cluster_utils import Cluster

from shared_data import IMAGES

pytestmark = pytest.mark.slow

SAM_BATCH = str(Path(sys.executable).parent / "sam-batch")
IMAGE_NAMES = ["dog.jpg", "groceries.jpg", "picture1.jpg", "rgb1.tif"]
WORKER = re.compile(r"node-([0-9a-f]{8})/pid-\d+")


@pytest.fixture
def two_node_cluster() -> Iterator[Cluster]:
    """A head and one more node, 1 CPU each, on 127.0.0.1; shut down after the test."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def run_attached(job: Path) -> subprocess.CompletedProcess:
    """`sam-batch run JOB` as a separate driver process, in the test's own environment (no
    variable telling Ray about loopback); fails the test on a non-zero exit."""
    result = subprocess.run([SAM_BATCH, "run", str(job)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"sam-batch exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def test_run_attaches_to_a_cluster_and_spreads_over_its_nodes(two_node_cluster: Cluster, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "name": "attach",
                "input": {"uris": [str(IMAGES / name) for name in IMAGE_NAMES]},
                "amg": {"points_per_side": 8},
                "output": {"uri": str(out)},
                "run": {"ray_address": two_node_cluster.address, "shard_size": 2},
            }
        )
    )

    result = run_attached(job)

    images = pq.read_table(out / "images").to_pylist()
    assert sorted(Path(row["image_uri"]).name for row in images) == sorted(IMAGE_NAMES)
    assert len({row["image_id"] for row in images}) == len(IMAGE_NAMES)
    assert all(row["status"] == "ok" and row["error"] is None for row in images)
    assert pq.read_table(out / "masks").num_rows == sum(row["n_masks"] for row in images) > 0
    assert "images: 4 ok, 0 error" in result.stdout

    record = json.loads((out / "run.json").read_text())
    assert record["executor"] == "ray" and record["shards_committed"] == 2
    worker_nodes = {WORKER.fullmatch(worker).group(1) for worker in record["workers"]}
    cluster_nodes = {node.node_id[:8] for node in two_node_cluster.list_all_nodes()}
    assert len(cluster_nodes) == 2
    assert worker_nodes == cluster_nodes, f"workers {record['workers']} vs nodes {sorted(cluster_nodes)}"

    again = run_attached(job)
    assert "shards: 0 committed, 2 already done" in again.stdout
    assert pq.read_table(out / "images").num_rows == len(IMAGE_NAMES)


def test_an_address_where_no_cluster_listens_fails_the_job_at_once(tmp_path: Path) -> None:
    """Nothing listens on the port: one line naming the address, exit 1, within the attach
    bound (Ray alone retried for about 7 minutes)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free once closed: nothing listens there
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "name": "nowhere",
                "input": {"uris": [str(IMAGES / "dog.jpg")]},
                "output": {"uri": str(tmp_path / "out")},
                "run": {"ray_address": f"127.0.0.1:{port}"},
            }
        )
    )
    result = subprocess.run([SAM_BATCH, "run", str(job)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"run.ray_address 127.0.0.1:{port}: no Ray cluster reachable there (Connection refused" in result.stderr
