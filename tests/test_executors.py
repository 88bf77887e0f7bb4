"""How the Ray executor sizes its segmenting actors (no Ray needed: `_actors` is arithmetic)."""

from __future__ import annotations

import pytest

from sam_batch.jobs.executors import STAGE_TASK_CPUS, RayExecutor
from sam_batch.jobs.schema import parse_job


def executor(device: str = "auto") -> RayExecutor:
    return RayExecutor(parse_job({"name": "sizing", "input": {"uris": ["x.jpg"]}, "output": {"uri": "out"}, "engine": {"device": device}}))


@pytest.mark.parametrize(
    ("cluster", "node_cpus", "n_images", "want_cpus", "want_count"),
    [
        ({"CPU": 2}, 2, 100, 2, 1),  # this machine: one actor, two batch threads
        ({"CPU": 2}, 2, 1, 2, 1),
        ({"CPU": 16}, 16, 1000, 2, 8),
        ({"CPU": 16}, 16, 3, 5, 3),  # fewer images than actors: the actors started share the cores
        ({"CPU": 32}, 16, 2, 16, 2),  # ... as far as one node holds them
        ({"CPU": 2}, 1, 100, 1, 2),  # two 1-core nodes: an actor never asks for more than a node has
        ({"CPU": 1}, 1, 5, 1, 1),
    ],
)
def test_cpu_actors_take_two_cores_each_and_share_the_rest(cluster, node_cpus, n_images, want_cpus, want_count) -> None:
    resources, count = executor()._actors(cluster, node_cpus, n_images)
    assert (resources, count) == ({"num_cpus": want_cpus - STAGE_TASK_CPUS}, want_count)


def test_gpu_actors_take_one_gpu_each_unless_the_job_asks_for_the_cpu() -> None:
    assert executor()._actors({"CPU": 16, "GPU": 4}, 16, 100) == ({"num_gpus": 1, "num_cpus": 1}, 4)
    assert executor()._actors({"CPU": 16, "GPU": 4}, 16, 2) == ({"num_gpus": 1, "num_cpus": 1}, 2)
    assert executor("cpu")._actors({"CPU": 16, "GPU": 4}, 16, 100)[1] == 8
