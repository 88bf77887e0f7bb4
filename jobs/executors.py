"""Executors place the work: in this process (`local`) or on Ray (`ray`); `choose_executor`
resolves `run.executor: auto` to one of them.

Both run the shards still to do, in plan order, and yield an `ImageDone` as each image is done
and a `ShardCommit` as each shard is committed; the runner counts them, shows progress and
writes the run record. Ray appears only here and in `jobs.ray_pipeline`.

On Ray (`jobs.ray_pipeline`) a tile is the unit of work: open tasks, tile read tasks,
segmenting actors, finish tasks and commit tasks, each bounded. This module starts or joins Ray
(an embedded Ray listens on 127.0.0.1 alone and is reaped with the run) and sizes the actors.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import subprocess
import sys
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from itertools import takewhile
from typing import Protocol

from sam_batch.jobs.dataset import OutputDataset
from sam_batch.jobs.plan import Shard
from sam_batch.jobs.prompt_table import prompt_book
from sam_batch.jobs.ray_pipeline import (
    MAX_ATTEMPTS,
    STAGE_TASK_CPUS,
    ActorPool,
    JobFailure,
    RayPipeline,
    amounts,
    shortfall,
)
from sam_batch.jobs.schema import JobSpec
from sam_batch.jobs.stages import read_photo
from sam_batch.jobs.worker import (
    Event,
    ImageDone,
    ImageSegmenter,
    ShardCommit,
    image_result,
    with_prompts,
    write_shard,
)
from sam_batch.pipeline.errors import one_line_reason

log = logging.getLogger("sam_batch")

# cores per CPU segmenting actor (docs/benchmarks.md, "Constants and their measurements")
CPUS_PER_ACTOR = 2
# ... except where each crop's prompts are one decode batch: then one-core actors, where a node
# has this much memory per core for them
ONE_CORE_ACTOR_MEMORY = 2 * 2**30  # bytes of a node's Ray `memory` per core
GPU_ACTOR_RESOURCES = {"num_gpus": 1, "num_cpus": 1}  # what a GPU segmenting actor asks Ray for
ATTACH_CONNECT_TIMEOUT_S = 10.0  # a cluster's address that accepts no connection in this long fails the job
REAPER_EXIT_TIMEOUT_S = 30.0  # seconds a run waits, after Ray's shutdown, for `jobs.reaper` to end what is left
# `run.executor: auto` starts Ray for this many images to do or more, in process below
AUTO_RAY_MIN_IMAGES = 16
NVIDIA_GPUS_DIR = "/proc/driver/nvidia/gpus"  # one entry per GPU the NVIDIA driver sees
# `sam-batch refilter` with `run.executor: auto` runs on Ray from this many images to do: an image
# refilters in far less time than Ray takes to start and stop (docs/benchmarks.md, "candidates")
REFILTER_AUTO_RAY_MIN_IMAGES = 1000
# one shard's work, done and committed where it runs: (job, shard, output) -> (its images, `write_shard`'s stats)
ShardWork = Callable[[JobSpec, Shard, OutputDataset], tuple[list[ImageDone], dict]]


class Executor(Protocol):
    """What the runner needs of an executor (`name` goes into `run.json`)."""

    name: str

    def run(self, shards: list[Shard], dataset: OutputDataset) -> Iterator[Event]: ...


class LocalExecutor:
    """Everything in this process (small jobs, debugging, GPU boxes without Ray): one image segmented
    at a time while a thread reads and decodes the next (as a read task would, its read bounded
    by `run.read_timeout_s`). An image's budget is bounded by the pipeline's checks alone: a
    thread cannot be killed."""

    name = "local"

    def __init__(self, job: JobSpec) -> None:
        self.job = job

    def run(self, shards: list[Shard], dataset: OutputDataset) -> Iterator[Event]:
        segmenter = ImageSegmenter(self.job, "local")
        options, bands = self.job.input.storage_options, self.job.raster.bands
        timeout_s = self.job.run.read_timeout_s
        prompts, schemas = prompt_book(self.job, dataset)
        unread = (uri for shard in shards for uri in shard.uris)
        with ThreadPoolExecutor(max_workers=1) as reader:
            ahead: deque = deque()

            def read_next() -> None:
                if (uri := next(unread, None)) is None:
                    return
                if prompts is not None and all(p.error is not None for p in prompts[uri]):
                    ahead.append((uri, None))  # never read: no prompt of it can be segmented
                else:
                    ahead.append((uri, reader.submit(read_photo, uri, options, bands, timeout_s)))

            read_next()
            for shard in shards:
                results = []
                for _ in shard.uris:
                    uri, read = ahead.popleft()
                    read_next()
                    error, photo, seconds = read.result() if read is not None else (None, None, 0.0)
                    if error:
                        result = image_result(uri, [], seconds=seconds, stage_seconds={"read": seconds}, error=error)
                        results.append(result if prompts is None else with_prompts(result, prompts[uri]))
                    elif prompts is not None:
                        results.append(segmenter.segment_prompted(uri, prompts[uri], photo, seconds))
                    else:
                        results.append(segmenter.segment(uri, photo, seconds))
                    yield results[-1].done()
                yield ShardCommit(shard, write_shard(dataset, shard, results, schemas))


class RayExecutor:
    """The three stages on Ray; segmenting actors one per GPU, or one per `cpus_per_actor` cores.

    Attaches to `run.ray_address` (or, when that is null, to `$RAY_ADDRESS`, as set by
    `ray job submit`), else starts an embedded Ray bound to 127.0.0.1.

    `actor_device` is for tests alone: the engine device the segmenting actors load the model
    on instead of `engine.device`, while they still ask Ray for what `engine.device` implies
    (so a test node that declares a GPU it does not have can run a `cuda` job's actors on its
    CPU). In production it is None: a `cuda` actor that sees no CUDA GPU fails the job.
    `segmenter` is for tests and benchmarks alone: what each segmenting actor holds in place of
    an `ImageSegmenter` (made as `segmenter(job, worker_name, threads)`; its `segment_tile` and
    `worker_name` are used), such as a stand-in engine with a fixed time per tile.
    """

    name = "ray"

    def __init__(
        self,
        job: JobSpec,
        cpus_per_actor: int | None = None,
        actor_device: str | None = None,
        segmenter: type = ImageSegmenter,
    ) -> None:
        self.job = job
        self.cpus_per_actor = cpus_per_actor  # None: chosen from the job and the nodes (`_actors`)
        self.actor_device = actor_device
        self.segmenter = segmenter
        self.reaper: subprocess.Popen | None = None  # `jobs.reaper` of the embedded Ray started here

    def run(self, shards: list[Shard], dataset: OutputDataset) -> Iterator[Event]:
        n_images = sum(len(s.uris) for s in shards)
        if not n_images:
            return
        import ray

        started_here = self._init_ray(ray)
        try:
            yield from RayPipeline(ray, self.job, dataset, lambda units: self._pool(ray, units)).run(shards)
        finally:
            if started_here:
                self._shutdown_ray(ray)

    def _pool(self, ray, n_units: int) -> ActorPool:
        """The segmenting actors (not yet started) for a job with at least `n_units` tiles to
        segment, sized from the cluster as it is now (`_actors`)."""
        largest = max((n["Resources"] for n in ray.nodes() if n["Alive"]), key=lambda r: r.get("CPU", 0), default={})
        resources, n_actors = self._actors(
            ray.cluster_resources(), int(largest.get("CPU", 1)), n_units, largest.get("memory")
        )
        if self.reaper is not None:  # an embedded Ray never grows: what it lacks it will never have
            _check_fits(ray, resources)
        actor_job = self.job
        if self.actor_device is not None:
            actor_job = replace(self.job, engine=replace(self.job.engine, device=self.actor_device))
        return ActorPool(ray, actor_job, resources, n_actors, self.segmenter)

    def _init_ray(self, ray) -> bool:
        """Join or start Ray; False when this process was connected to one already."""
        if ray.is_initialized():
            return False
        address = self.job.run.ray_address or os.environ.get("RAY_ADDRESS")
        if address:  # RAY_ADDRESS is how `ray job submit` tells a driver where its cluster is
            _attach(ray, address, "run.ray_address" if self.job.run.ray_address else "$RAY_ADDRESS")
        else:
            self.reaper = _start_embedded_ray(ray)
        return True

    def _shutdown_ray(self, ray) -> None:
        """Leave the Ray `_init_ray` joined or started; an embedded one's processes are all gone after."""
        ray.shutdown()
        if self.reaper is not None:
            _stop_reaper(self.reaper)
            self.reaper = None

    def _actors(
        self, cluster: dict[str, float], node_cpus: int, n_units: int, node_memory: float | None = None
    ) -> tuple[dict, int]:
        """Resources of one segmenting actor and how many to start, from `cluster_resources()`
        and the CPUs and Ray `memory` (bytes) of the largest node; never more than
        `run.max_actors` nor than `n_units` (tiles to segment, as far as known).

        With `engine.device` cuda (or cuda:N), or auto on a cluster with GPUs, each actor asks
        for one GPU (`GPU_ACTOR_RESOURCES`), GPUs present or not, so that an autoscaler can add
        them: one actor per GPU present, at least one. Otherwise a CPU actor takes
        `cpus_per_actor` cores (as many as a node has, if fewer; by default `_cores_per_actor`)
        and leaves `STAGE_TASK_CPUS` of them to the read and commit tasks, so the stages never
        wait for each other's CPUs. With fewer tiles (or `run.max_actors`) than that makes
        actors, the actors started share the cores (as far as one node holds them).
        """
        most = min(n_units, self.job.run.max_actors or n_units)
        gpus = int(cluster.get("GPU", 0))
        device = self.job.engine.device
        if device.startswith("cuda") or (gpus and device == "auto"):
            return dict(GPU_ACTOR_RESOURCES), min(max(1, gpus), most)
        cpus = max(1, int(cluster.get("CPU", 1)))
        per_actor = max(1, min(self.cpus_per_actor or self._cores_per_actor(node_cpus, node_memory), node_cpus))
        count = min(max(1, cpus // per_actor), most)
        share = min(max(per_actor, cpus // count), max(node_cpus, 1))
        return {"num_cpus": share - STAGE_TASK_CPUS}, count

    def _cores_per_actor(self, node_cpus: int, node_memory: float | None) -> int:
        """1 where every crop's prompts fit in one decode batch (nothing for a second batch
        thread to do) and the node has `ONE_CORE_ACTOR_MEMORY` per core, else `CPUS_PER_ACTOR`."""
        amg = self.job.amg
        one_batch = amg.points_per_side**2 <= amg.points_per_batch
        roomy = node_memory is None or node_memory >= ONE_CORE_ACTOR_MEMORY * node_cpus
        return 1 if one_batch and roomy else CPUS_PER_ACTOR


class ShardTaskExecutor(RayExecutor):
    """Whole shards as Ray tasks of one CPU each, every task doing and committing its shard
    (`work`: `sam-batch refilter`'s, which needs no model and so no actor); Ray joined or
    started as `RayExecutor` does it. A task whose worker dies is retried (a commit is
    idempotent); one that fails ends the job, its shard left for the next run."""

    def __init__(self, job: JobSpec, work: ShardWork) -> None:
        super().__init__(job)
        self.work = work

    def run(self, shards: list[Shard], dataset: OutputDataset) -> Iterator[Event]:
        if not shards:
            return
        import ray

        started_here = self._init_ray(ray)
        try:
            task = ray.remote(_shard_task).options(num_cpus=1, max_retries=MAX_ATTEMPTS - 1)
            work, job, output = ray.put(self.work), ray.put(self.job), ray.put(dataset)
            running = {task.remote(work, job, shard, output): shard for shard in shards}
            while running:
                [ref], _ = ray.wait(list(running))
                shard = running.pop(ref)
                try:
                    images, stats = ray.get(ref)
                except ray.exceptions.RayError as error:
                    cause = getattr(error, "cause", None) or error
                    raise JobFailure(f"{shard.name} failed: {one_line_reason(cause, typed=True)}") from None
                yield from images
                yield ShardCommit(shard, stats)
        finally:
            if started_here:
                self._shutdown_ray(ray)


def _shard_task(work: ShardWork, job: JobSpec, shard: Shard, dataset: OutputDataset) -> tuple[list[ImageDone], dict]:
    """A `ShardTaskExecutor` task: `work` on one shard (a function Ray can make a task of)."""
    return work(job, shard, dataset)


def _attach(ray, address: str, source: str) -> None:
    """Join the cluster at `address` (`auto`, `host:port` or `ray://host:port`), given by `source`.

    An address with a port must accept a TCP connection within `ATTACH_CONNECT_TIMEOUT_S`, else
    the job fails at once with one line (Ray itself would retry for minutes). A cluster whose
    nodes all listen on loopback addresses is joined from 127.0.0.1 (Ray would otherwise swap
    a loopback host for this machine's interface address and never reach it); any other
    cluster is joined as Ray joins it, so its remote nodes can reach this driver.
    """
    host, port = _host_and_port(address)
    if port is not None:
        try:
            socket.create_connection((host, port), timeout=ATTACH_CONNECT_TIMEOUT_S).close()
        except OSError as error:
            reason = "no answer" if isinstance(error, TimeoutError) else (error.strerror or type(error).__name__)
            raise JobFailure(
                f"{source} {address}: no Ray cluster reachable there ({reason} within {ATTACH_CONNECT_TIMEOUT_S:.0f} s)"
            ) from None
    log.info("attaching to the Ray cluster at %s", address)
    loopback = (
        host is not None and _is_loopback(host) and not address.startswith("ray://") and _nodes_on_loopback(address)
    )
    with _ray_multi_node_off(ray) if loopback else nullcontext():
        node_ip = {"_node_ip_address": "127.0.0.1" if host == "localhost" else host} if loopback else {}
        ray.init(address=address, logging_level=logging.WARNING, **node_ip)


def _nodes_on_loopback(address: str) -> bool:
    """Whether every live node of the cluster whose GCS is at `address` (host:port) is
    registered at a loopback address; False when the GCS cannot say."""
    from ray._raylet import GcsClient

    try:
        nodes = GcsClient(address=address).get_all_node_info(timeout=ATTACH_CONNECT_TIMEOUT_S).values()
        addresses = [node.node_manager_address for node in nodes]
    except Exception:  # noqa: BLE001 - a private Ray API: when it fails, Ray's own way stands
        return False
    return bool(addresses) and all(_is_loopback(a) for a in addresses)


def _host_and_port(address: str) -> tuple[str | None, int | None]:
    """('host', port) of `host:port`, `[v6]:port` or `ray://host:port`; (None, None) for `auto`
    and anything else without a port."""
    parts = urllib.parse.urlsplit(address if "://" in address else f"//{address}")
    try:
        port = parts.port
    except ValueError:
        return None, None
    if parts.hostname is None or port is None:
        return None, None
    return parts.hostname, port


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextmanager
def _ray_multi_node_off(ray) -> Iterator[None]:
    """Ray's multi-node flag off for what runs inside: `ray.init` then keeps a loopback node
    address instead of swapping it for the machine's routable one (see `_start_embedded_ray`)."""
    from ray._private import ray_constants

    clusters_enabled = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = clusters_enabled


def _start_embedded_ray(ray) -> subprocess.Popen:
    """A new Ray on this machine alone, with every server listening on 127.0.0.1 only; returns
    the `jobs.reaper` that ends its processes once this process is gone (`_start_reaper`).

    `ray.init` replaces a loopback `_node_ip_address` with the machine's routable address, and
    its servers then listen on all interfaces, unless Ray takes multi-node clusters to be off
    (as on macOS and Windows: `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`). That flag is read once,
    when `ray` is imported, so it is turned off here for the start alone; the node's address is
    fixed by then and handed to every process Ray starts.
    """
    cpus = len(os.sched_getaffinity(0))
    with _ray_multi_node_off(ray):
        ray.init(
            address="local",  # always a new embedded Ray, never a cluster found on this machine
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            logging_level=logging.WARNING,
            num_cpus=cpus,
            # the actors hold a worker per core; keep the read/commit workers alive between tasks
            # too, rather than start a new one (Python, Ray, pyarrow) every few seconds
            _system_config={"num_workers_soft_limit": 2 * cpus},
        )
    return _start_reaper(ray)


def _start_reaper(ray) -> subprocess.Popen:
    """`python -m sam_batch.jobs.reaper` over the processes of the Ray this process started.

    Ray has the kernel end its GCS and raylet with this process, but not what the raylet starts:
    after a SIGKILL here, its dashboard agent and runtime-env agent lived on (adopted by init)
    for a minute or more, blocked reporting the raylet's death to a GCS gone with it. The
    reaper holds the read end of a pipe whose write end only this process has, so it sees this
    process end however it ends, and then ends every process descended from Ray's own. Its own
    session keeps it out of a terminal's Ctrl-C, which reaches this process and Ray's.
    """
    roots = [process.pid for _, process in ray._private.worker._global_node.live_processes()]
    command = [sys.executable, "-m", "sam_batch.jobs.reaper", *(str(pid) for pid in roots)]
    reaper = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
    with reaper.stdout:  # its first line: it has noted what Ray has started so far
        if not reaper.stdout.readline():
            log.warning("the reaper of this run's Ray failed to start: Ray's processes may outlive a killed run")
    return reaper


def _stop_reaper(reaper: subprocess.Popen) -> None:
    """Close the reaper's pipe, as this process's end would, and wait for it to end what is left
    of Ray (after `ray.shutdown`: agents still on their way out), at most `REAPER_EXIT_TIMEOUT_S`."""
    reaper.stdin.close()
    try:
        reaper.wait(timeout=REAPER_EXIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        log.warning("the reaper of this run's Ray did not end in %.0f s; stopping it", REAPER_EXIT_TIMEOUT_S)
        reaper.kill()
        reaper.wait()


def _check_fits(ray, resources: dict) -> None:
    """Fail at once where the cluster, which will not grow, lacks what one segmenting actor asks for."""
    total = ray.cluster_resources()
    lacking = shortfall(resources, total, total)
    if lacking:
        raise JobFailure(
            f"no segmenting actor can start: each asks for {amounts(resources)} and this machine has {lacking}"
        )


def choose_executor(
    job: JobSpec, n_images: int, min_images: int = AUTO_RAY_MIN_IMAGES, uses_gpus: bool = True
) -> tuple[str, str]:
    """(`"local"` or `"ray"`, why) for a job with `n_images` still to do: `run.executor` when it
    names one; for `auto`, Ray where the job or the cluster warrants it, in order:

    - a cluster to attach to (`run.ray_address` or `$RAY_ADDRESS`);
    - a job that may run on a GPU (`engine.device` not cpu, and `uses_gpus`: refilter does
      not) on a machine with more than one GPU visible (Ray places an actor per GPU; this
      process would use one);
    - at least `min_images` images to do (`AUTO_RAY_MIN_IMAGES` for a run);

    else this process, which saves Ray's start and stop (docs/benchmarks.md).
    """
    run = job.run
    if run.executor != "auto":
        return run.executor, "run.executor"
    if run.ray_address or os.environ.get("RAY_ADDRESS"):
        return "ray", "auto: a Ray cluster to attach to"
    if uses_gpus and job.engine.device != "cpu" and (gpus := visible_gpus()) > 1:
        return "ray", f"auto: {gpus} GPUs on this machine"
    if n_images >= min_images:
        return "ray", f"auto: {n_images} images to do, at least {min_images}"
    return "local", f"auto: {n_images} image{'s' * (n_images != 1)} to do, fewer than {min_images}"


def visible_gpus() -> int:
    """NVIDIA GPUs this process may use, without loading torch or CUDA: those the driver lists
    (`NVIDIA_GPUS_DIR`), as many as `$CUDA_VISIBLE_DEVICES` names where it is set."""
    try:
        present = len(os.listdir(NVIDIA_GPUS_DIR))
    except OSError:
        return 0
    named = os.environ.get("CUDA_VISIBLE_DEVICES")
    if named is None:
        return present
    # CUDA takes the devices named up to the first empty or negative entry
    listed = list(takewhile(lambda d: d.strip() and not d.strip().startswith("-"), named.split(",")))
    return min(present, len(listed))


def make_executor(job: JobSpec, n_images: int) -> LocalExecutor | RayExecutor:
    """The executor `choose_executor` picks for `n_images` images to do; logs its choice."""
    name, why = choose_executor(job, n_images)
    log.info("executor: %s (%s)", name, why)
    return LocalExecutor(job) if name == "local" else RayExecutor(job)
