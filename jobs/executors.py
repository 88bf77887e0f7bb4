"""Executors place the work: in this process (`local`) or on Ray actors (`ray`).

Both take the images of the shards still to do, in plan order, and yield `ImageResult`s as
they finish; the runner commits a shard once all of its images are back. Ray appears only
here.
"""

from __future__ import annotations

import logging
import os
from collections import Counter, deque
from collections.abc import Iterator

from sam_batch.engines.backend import set_cpu_threads
from sam_batch.jobs.schema import JobSpec
from sam_batch.jobs.worker import ImageResult, ImageSegmenter
from sam_batch.pipeline.tables import image_row

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

    Attaches to `run.ray_address` (or, when that is null, to `$RAY_ADDRESS`, as set by
    `ray job submit`), else starts an embedded Ray bound to 127.0.0.1.
    At most one image per actor is in flight, so memory stays bounded however long the input.
    """

    name = "ray"

    def __init__(self, job: JobSpec, cpus_per_actor: int = 1) -> None:
        self.job = job
        self.cpus_per_actor = cpus_per_actor

    def map_images(self, uris: list[str]) -> Iterator[ImageResult]:
        if not uris:
            return
        import ray

        started_here = self._init_ray(ray)
        try:
            pool = _ActorPool(ray, self.job, self._resources(ray), self._n_actors(ray, len(uris)))
            yield from pool.map(uris)
        finally:
            if started_here:
                ray.shutdown()

    def _init_ray(self, ray) -> bool:
        if ray.is_initialized():
            return False
        address = self.job.run.ray_address or os.environ.get("RAY_ADDRESS")
        if address:  # RAY_ADDRESS is how `ray job submit` tells a driver where its cluster is
            log.info("attaching to the Ray cluster at %s", address)
            ray.init(address=address, logging_level=logging.WARNING)
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


class JobFailure(RuntimeError):
    """The job cannot go on (e.g. no segmenting actor can load the model)."""


class _SegmenterActor:
    """A Ray actor around one `ImageSegmenter`; the model loads once, in the constructor.

    A failure to load is kept and reported by `ready`, so the driver can name its cause.
    """

    def __init__(self, job: JobSpec) -> None:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        set_cpu_threads(max(1, int(cpus)))
        node = ray.get_runtime_context().get_node_id()[:8]
        self.segmenter: ImageSegmenter | None = None
        self.load_error: str | None = None
        try:
            self.segmenter = ImageSegmenter(job, f"node-{node}/pid-{os.getpid()}")
        except Exception as error:  # noqa: BLE001 - reported to the driver by ready()
            self.load_error = f"{type(error).__name__}: {' '.join(str(error).split())}"

    def ready(self) -> str | None:
        return self.load_error

    def segment(self, uri: str) -> ImageResult:
        assert self.segmenter is not None
        return self.segmenter.segment(uri)


class _ActorPool:
    """Segmenting actors that survive losing some of them: to a killed process or a lost node.

    Work is handed only to actors that have loaded their model, one image at a time. When an
    actor dies, its image goes back to the front of the queue and a replacement is started
    (placed wherever Ray finds room). An image that kills `MAX_ATTEMPTS` workers becomes an
    error row instead of taking the job down.
    """

    MAX_ATTEMPTS = 3

    def __init__(self, ray, job: JobSpec, resources: dict, n_actors: int) -> None:
        self.ray = ray
        self.job = job
        self.actor_class = ray.remote(_SegmenterActor).options(max_restarts=0, max_task_retries=0, **resources)
        self.n_actors = n_actors
        self.starting: dict = {}  # ready() ref -> actor
        self.busy: dict = {}  # segment() ref -> (actor, uri)
        self.idle: list = []
        self.attempts: Counter[str] = Counter()

    def map(self, uris: list[str]) -> Iterator[ImageResult]:
        queue = deque(uris)
        for _ in range(self.n_actors):
            self._start_actor()
        try:
            while queue or self.busy:
                while queue and self.idle:
                    actor, uri = self.idle.pop(), queue.popleft()
                    self.busy[actor.segment.remote(uri)] = (actor, uri)
                [ref], _ = self.ray.wait([*self.starting, *self.busy], num_returns=1)
                if ref in self.starting:
                    self._on_started(ref)
                else:
                    yield from self._on_finished(ref, queue)
        finally:
            for actor in [*self.starting.values(), *self.idle, *(a for a, _ in self.busy.values())]:
                self.ray.kill(actor)

    def _start_actor(self) -> None:
        actor = self.actor_class.remote(self.job)
        self.starting[actor.ready.remote()] = actor

    def _on_started(self, ref) -> None:
        actor = self.starting.pop(ref)
        try:
            load_error = self.ray.get(ref)
        except _worker_lost_errors(self.ray):
            log.warning("a segmenting actor died while starting; starting another")
            self._start_actor()
            return
        if load_error:
            raise JobFailure(f"the segmenting actor cannot load the model: {load_error}")
        self.idle.append(actor)

    def _on_finished(self, ref, queue: deque) -> Iterator[ImageResult]:
        actor, uri = self.busy.pop(ref)
        try:
            result = self.ray.get(ref)
        except _worker_lost_errors(self.ray) as error:
            self.attempts[uri] += 1
            log.warning("worker lost while segmenting %s (%s); attempt %d of %d", uri, type(error).__name__,
                        self.attempts[uri], self.MAX_ATTEMPTS)
            self._start_actor()
            if self.attempts[uri] < self.MAX_ATTEMPTS:
                queue.appendleft(uri)
                return
            yield _lost_worker_result(uri, self.attempts[uri])
            return
        self.idle.append(actor)
        yield result


def _worker_lost_errors(ray) -> tuple[type[Exception], ...]:
    """The errors that mean the worker (process or node) went away, not that the image failed."""
    e = ray.exceptions
    return (e.RayActorError, e.WorkerCrashedError, e.ObjectLostError, e.NodeDiedError, e.OutOfMemoryError)


def _lost_worker_result(uri: str, attempts: int) -> ImageResult:
    row = image_row(
        uri,
        status="error",
        error=f"segment: the worker died on this image {attempts} times (out of memory?)",
        width=None,
        height=None,
        n_masks=0,
        seconds=0.0,
    )
    return ImageResult(uri, [], row, {}, "")


def make_executor(job: JobSpec) -> LocalExecutor | RayExecutor:
    """The executor named by `run.executor`."""
    return LocalExecutor(job) if job.run.executor == "local" else RayExecutor(job)
