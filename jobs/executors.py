"""Executors place the work: in this process (`local`) or on Ray actors (`ray`).

Both take the images of the shards still to do, in plan order, and yield `ImageResult`s as
they finish; the runner commits a shard once all of its images are back. Ray appears only
here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator

from sam_batch.engines.backend import set_cpu_threads
from sam_batch.jobs.schema import JobSpec
from sam_batch.jobs.worker import ImageResult, ImageSegmenter

log = logging.getLogger("sam_batch")


class LocalExecutor:
    """Everything in this process, one image at a time: for debugging and GPU boxes without Ray."""

    name = "local"

    def __init__(self, job: JobSpec) -> None:
        self.job = job

    def map_images(self, uris: list[str]) -> Iterator[ImageResult]:
        set_cpu_threads()
        segmenter = ImageSegmenter(self.job, "local")
        for uri in uris:
            yield segmenter.segment(uri)


class RayExecutor:
    """Segmenting actors on Ray: one per GPU, or on a CPU-only cluster one per `cpus_per_actor` cores.

    Attaches to `run.ray_address` when given, else starts an embedded Ray bound to 127.0.0.1.
    At most one image per actor is in flight, so memory stays bounded however long the input.
    """

    name = "ray"

    def __init__(self, job: JobSpec, cpus_per_actor: int = 1) -> None:
        self.job = job
        self.cpus_per_actor = cpus_per_actor

    def map_images(self, uris: list[str]) -> Iterator[ImageResult]:
        import ray
        from ray.util import ActorPool

        started_here = self._init_ray(ray)
        try:
            actor_class = ray.remote(_SegmenterActor)
            actors = [
                actor_class.options(max_restarts=3, max_task_retries=3, **self._resources(ray)).remote(self.job)
                for _ in range(self._n_actors(ray, len(uris)))
            ]
            pool = ActorPool(actors)
            yield from pool.map_unordered(lambda actor, uri: actor.segment.remote(uri), uris)
        finally:
            if started_here:
                ray.shutdown()

    def _init_ray(self, ray) -> bool:
        if ray.is_initialized():
            return False
        if self.job.run.ray_address:
            ray.init(address=self.job.run.ray_address, logging_level=logging.WARNING)
        else:
            ray.init(
                address="local",  # always a new embedded Ray, never a cluster found on this machine
                _node_ip_address="127.0.0.1",
                include_dashboard=False,
                logging_level=logging.WARNING,
                num_cpus=len(os.sched_getaffinity(0)),
            )
        return True

    def _resources(self, ray) -> dict:
        if self._n_gpus(ray) and self.job.engine.device != "cpu":
            return {"num_gpus": 1, "num_cpus": 1}
        return {"num_cpus": self.cpus_per_actor}

    def _n_actors(self, ray, n_images: int) -> int:
        if self._n_gpus(ray) and self.job.engine.device != "cpu":
            count = self._n_gpus(ray)
        else:
            count = max(1, int(ray.cluster_resources().get("CPU", 1)) // self.cpus_per_actor)
        return max(1, min(count, n_images))

    @staticmethod
    def _n_gpus(ray) -> int:
        return int(ray.cluster_resources().get("GPU", 0))


class _SegmenterActor:
    """A Ray actor around one `ImageSegmenter`; the model loads once, in the constructor."""

    def __init__(self, job: JobSpec) -> None:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        set_cpu_threads(max(1, int(cpus)))
        node = ray.get_runtime_context().get_node_id()[:8]
        self.segmenter = ImageSegmenter(job, f"node-{node}/pid-{os.getpid()}")

    def segment(self, uri: str) -> ImageResult:
        return self.segmenter.segment(uri)


def make_executor(job: JobSpec) -> LocalExecutor | RayExecutor:
    """The executor named by `run.executor`."""
    return LocalExecutor(job) if job.run.executor == "local" else RayExecutor(job)
