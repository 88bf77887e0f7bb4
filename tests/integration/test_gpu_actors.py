"""A `cuda` job's segmenting actors on a real local multi-node Ray cluster, with no GPU at first.

The cluster is Ray's own multi-node test cluster (`ray.cluster_utils.Cluster`, every node on
127.0.0.1), started by this process so that its raylets, and the actors they start, inherit
`SAM_BATCH_CACHE` (conftest.py). Its head has CPUs only. A job with `engine.device: cuda` must
ask for a GPU per actor all the same (so that an autoscaler can add one) and go on once a node
with a GPU joins; where none ever does, it fails after `run.actor_start_timeout_s`.

The node that joins declares a GPU it does not have (`num_gpus=1`, no CUDA). In production a
`cuda` actor that sees no CUDA GPU fails the job; these tests give the executor the test-only
`actor_device="cpu"`, so the actors still ask Ray for a GPU but load the model on the CPU.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from ray.cluster_utils import Cluster

from sam_batch.jobs.executors import RayExecutor
from sam_batch.jobs.job_file import parse_job
from sam_batch.jobs.runner import RunSummary, Work, run_job
from shared_data import IMAGES

pytestmark = pytest.mark.slow

SAM_BATCH = str(Path(sys.executable).parent / "sam-batch")
IMAGE_NAMES = ["dog.jpg", "groceries.jpg", "picture1.jpg"]
WORKER = re.compile(r"node-([0-9a-f]{8})/pid-\d+")
WAIT_S = 300  # bound on each wait for the job (s): it never passes on a healthy run


@pytest.fixture(scope="module")
def cpu_only_cluster() -> Iterator[Cluster]:
    """A head node with 2 CPUs and no GPU, on 127.0.0.1; shut down after the module."""
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    try:
        yield cluster
    finally:
        cluster.shutdown()


def job_spec(cluster: Cluster, out: Path, **run) -> dict:
    return {
        "name": "gpu-actors",
        "input": {"uris": [str(IMAGES / name) for name in IMAGE_NAMES]},
        "engine": {"device": "cuda"},
        "amg": {"points_per_side": 4},
        "output": {"uri": str(out)},
        "run": {"ray_address": cluster.address, "shard_size": 2, **run},
    }


class LogSignal(logging.Handler):
    """Sets `seen` when the `sam_batch` log says `needle`."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.INFO)
        self.needle = needle
        self.seen = threading.Event()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        if self.needle in record.getMessage():
            self.seen.set()


@pytest.fixture
def actors_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[LogSignal]:
    """The `sam_batch` log at INFO, signalling once the segmenting actors are asked for."""
    logger = logging.getLogger("sam_batch")
    signal = LogSignal("segmenting actor")
    monkeypatch.setattr(logger, "level", logging.INFO)
    logger.addHandler(signal)
    try:
        yield signal
    finally:
        logger.removeHandler(signal)


# the runner's executor: the Ray executor with the test-only `actor_device="cpu"`
ON_CPU_ACTORS = Work(executor=lambda job, n_images: RayExecutor(job, actor_device="cpu"))


def run_in_thread(spec: dict) -> tuple[threading.Thread, dict]:
    """`run_job` on a thread of this process (the driver); its summary or error land in the dict."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["summary"] = run_job(parse_job(spec), work=ON_CPU_ACTORS)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=target, name="sam-batch-driver")
    thread.start()
    return thread, outcome


def finished(thread: threading.Thread, outcome: dict) -> RunSummary:
    thread.join(WAIT_S)
    assert not thread.is_alive(), f"the job did not end in {WAIT_S} s"
    assert "error" not in outcome, repr(outcome.get("error"))
    return outcome["summary"]


def test_no_gpu_ever_fails_the_job_after_the_timeout(cpu_only_cluster: Cluster, tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(job_spec(cpu_only_cluster, tmp_path / "out", actor_start_timeout_s=2)))
    result = subprocess.run([SAM_BATCH, "run", str(job)], capture_output=True, text=True, timeout=WAIT_S)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "sam-batch: JobFailure: no segmenting actor could start in 2 s: "
        "each asks for 1 GPU and 1 CPU and the cluster has no GPU"
    )


def test_a_gpu_node_joining_mid_job_takes_the_actors_and_max_actors_caps_them(
    cpu_only_cluster: Cluster, actors_log: LogSignal, tmp_path: Path
) -> None:
    thread, outcome = run_in_thread(job_spec(cpu_only_cluster, tmp_path / "joined"))
    assert actors_log.seen.wait(WAIT_S), "the job never asked for its segmenting actors"
    assert not (tmp_path / "joined" / "_sam_batch" / "commits").exists()  # nothing can have run yet
    gpu_node = cpu_only_cluster.add_node(num_cpus=2, num_gpus=2, node_ip_address="127.0.0.1")
    try:
        summary = finished(thread, outcome)
        assert (summary.images_ok, summary.images_error, summary.shards_committed) == (3, 0, 2)
        assert "starting 1 segmenting actor, each asking for 1 GPU and 1 CPU" in actors_log.messages
        assert {WORKER.fullmatch(worker).group(1) for worker in summary.workers} == {gpu_node.node_id[:8]}

        # the 2 GPUs are present now: 2 actors, unless run.max_actors says fewer
        actors_log.messages.clear()
        thread, outcome = run_in_thread(job_spec(cpu_only_cluster, tmp_path / "capped", max_actors=1))
        summary = finished(thread, outcome)
        assert summary.images_ok == 3 and len(summary.workers) == 1
        assert "starting 1 segmenting actor, each asking for 1 GPU and 1 CPU" in actors_log.messages
    finally:
        cpu_only_cluster.remove_node(gpu_node)
