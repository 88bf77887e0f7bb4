"""The Ray side of `jobs.executors.RayExecutor`: the driver's loop and the segmenting actors.

A tile is the unit of work, and each stage holds a bounded number of tiles or images, so that
memory stays flat however large the scenes and however long the input:

    open tasks (CPU)      tile read tasks (CPU)   segmenting actors        finish tasks (CPU)    commit tasks (CPU)
    a raster's header:    one window each, with   (GPU, else CPU): any     all of an image's     `write_shard` with
    its plan and its   ►  the scene's stretch; ►  tile of any scene, two ► tiles back: seams ►  the rows fetched
    stretch; a photo      ≤ READ_AHEAD per actor  at a time; return each   merged, RLE,          from the object
    decoded whole         (a photo's tiles are    mask's box bits, box     polygons, rows        store; ≤ MAX_COMMITS
    ≤ OPENS_AHEAD         cut by the actor)       and scores               ≤ MAX_FINISHES

Pixels, masks and rows go from stage to stage through Ray's object store; the driver holds
object references, each image's tile count and small statuses, never pixels or rows.

Every wait is bounded: a read by `run.read_timeout_s` where it runs (`jobs.bounded`), an image's
segmenting by `run.image_timeout_s` through the pipeline's checks, checked again before each of
its tiles but the first goes to an actor, and by the driver, which kills an actor still on a
tile `SEGMENT_GRACE_S` past its image's budget.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from sam_batch.jobs.bounded import Budget, OverBudget
from sam_batch.jobs.dataset import OutputDataset
from sam_batch.jobs.plan import Shard
from sam_batch.jobs.prompt_table import prompt_book
from sam_batch.jobs.schema import JobSpec
from sam_batch.jobs.stages import Opened, TileRead, open_image, read_tile
from sam_batch.jobs.worker import (
    STAGES,
    Event,
    ImageDone,
    ImageResult,
    ImageSegmenter,
    ShardCommit,
    finish_image,
    image_result,
    prompted_result,
    with_prompts,
    write_shard,
)
from sam_batch.pipeline.errors import ImageError, one_line_reason
from sam_batch.pipeline.prompts import PromptMask, PromptPlan
from sam_batch.pipeline.rasters import ArrayScene
from sam_batch.pipeline.scenes import ScenePlan, finish_scene
from sam_batch.pipeline.tile_masks import TileMasks

log = logging.getLogger("sam_batch")

READ_AHEAD = 4  # tiles read or being read, per segmenting actor (docs/benchmarks.md, bench-pipeline)
IN_FLIGHT_PER_ACTOR = 2  # tiles handed to one actor at once: it starts the next as the last one's masks go
OPENS_AHEAD = 2  # images being opened (a raster's header, a photo read whole) at once
MAX_COMMITS = 2  # shard commits in flight; reads pause while this many are running
MAX_FINISHES = 2  # images being finished (seam merge, RLE, polygons) at once; reads pause meanwhile
MAX_ATTEMPTS = 3  # tries of one image (or one task) on workers that die under it
RAY_RESOURCE_NAMES = {"num_gpus": "GPU", "num_cpus": "CPU"}  # actor option -> Ray's resource name
# s the driver waits for an image's rows past `run.image_timeout_s` before it kills the actor: the
# actor stops itself at its next check, so this covers, with room to spare, the longest step the
# checks cannot split (one encoder call, one decode batch, the merge of the masks)
SEGMENT_GRACE_S = 60.0
STAGE_TASK_CPUS = 0.25  # CPU share an open, read, finish or commit task declares (mostly I/O)


class JobFailure(RuntimeError):
    """The job cannot go on (e.g. no segmenting actor can load the model)."""


def amounts(resources: dict) -> str:
    """`{"num_gpus": 1, "num_cpus": 1}` as "1 GPU and 1 CPU"."""
    return " and ".join(f"{amount:g} {RAY_RESOURCE_NAMES[option]}" for option, amount in resources.items())


def shortfall(resources: dict, total: dict[str, float], free: dict[str, float]) -> str:
    """What a cluster with `total` resources, `free` of them unused (Ray's names: GPU, CPU),
    lacks for one actor asking for `resources` ("no GPU", "2 GPU, 0 free"); "" when nothing."""
    lacking = []
    for option, amount in resources.items():
        name = RAY_RESOURCE_NAMES[option]
        if not total.get(name, 0):
            lacking.append(f"no {name}")
        elif free.get(name, 0) < amount:
            lacking.append(f"{total[name]:g} {name}, {free.get(name, 0):g} free")
    return " and ".join(lacking)


@dataclass(eq=False)
class _Image:
    """The driver's view of one image in flight: small facts and object references only.

    opened: its opening (`stages.Opened`), None until then; photo: the reference of a photo's
    decoded pixels, which its tiles are cut from; tiles: references of its segmented tiles'
    masks; waiting: its tiles not yet back; deadline: `time.monotonic()` past which
    `run.image_timeout_s` is spent (None: no budget); fed: its tiles handed to actors; redone:
    those handed again after their worker was lost; done: its result is taken (rows made, or
    an error row), so what is still on its way for it is dropped.
    """

    uri: str
    opened: Opened | None = None
    photo: object = None
    tiles: list = field(default_factory=list)
    waiting: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    workers: set[str] = field(default_factory=set)
    deadline: float | None = None
    fed: int = 0
    redone: int = 0
    done: bool = False


@dataclass(eq=False)
class _Unit:
    """One tile of an image: the unit of work of a segmenting actor. pixels, valid: references
    of a raster tile's read (None until read; a photo's tiles are cut from `image.photo`)."""

    image: _Image
    index: int
    pixels: object = None
    valid: object = None
    attempts: int = 0

    @property
    def window(self) -> tuple[int, int, int, int]:
        return self.image.opened.plan.tiles[self.index].window


@dataclass(frozen=True)
class _TileDone:
    """What a segmenting actor tells the driver of one tile: `error` (one line) or None, its
    masks' count, its seconds (s) and the actor's name. The masks stay in the object store."""

    error: str | None
    n_masks: int
    seconds: float
    worker: str


class RayPipeline:
    """The driver's loop: moves every image through open → tile reads → segmenting actors →
    finish → commit, one event at a time, holding only references and counts."""

    def __init__(self, ray, job: JobSpec, dataset: OutputDataset, make_actors: Callable[[int], ActorPool]) -> None:
        """make_actors: the segmenting actors for a job with at least this many tiles to do
        (`RayExecutor._pool`), called once the first images are open."""
        self.ray = ray
        self.job = job
        self.make_actors = make_actors
        self.actors: ActorPool | None = None
        self.capacity = OPENS_AHEAD  # tiles read ahead: READ_AHEAD per actor, once there are actors
        cpu_task = {"num_cpus": STAGE_TASK_CPUS, "max_retries": MAX_ATTEMPTS - 1}
        self.open_task = ray.remote(open_image).options(num_returns=2, **cpu_task)
        self.read_task = ray.remote(read_tile).options(num_returns=3, **cpu_task)
        self.finish_task = ray.remote(_finish).options(num_returns=2, **cpu_task)
        self.prompts, schemas = prompt_book(job, dataset)
        self.commits = _CommitStage(ray, dataset, schemas)
        self.opening: dict = {}  # open status ref -> _Image
        self.reading: dict = {}  # read status ref -> _Unit
        self.finishing: dict = {}  # finish summary ref -> (_Image, result ref)
        self.queued: deque[_Unit] = deque()  # tiles of opened images, not yet read
        self.ready: deque[_Unit] = deque()  # tiles read (or cut from a photo), for the next actor

    def run(self, shards: list[Shard]) -> Iterator[Event]:
        ledger = _Ledger(shards)
        yield from self._start_actors(ledger)
        try:
            while ledger.outstanding or self.commits.running:
                if len(self.commits.running) < MAX_COMMITS and len(self.finishing) < MAX_FINISHES:
                    self._fill(ledger)
                yield from self._over_budget(ledger)
                self.actors.feed(self.ready)
                yield from self._next_events(ledger)
        finally:
            self.actors.stop()

    def _start_actors(self, ledger: _Ledger) -> Iterator[Event]:
        """Open the first images, then start as many actors as their tiles (and one tile for
        each image not yet open) can keep busy, as far as the cluster holds them: a job of one
        large scene gets every actor, a job of two photos two."""
        self._fill(ledger)
        for ref in list(self.opening):
            self.ray.wait([ref])  # an open task's reads are bounded by run.read_timeout_s
            yield from self._on_opened(ref, ledger)
        self.actors = self.make_actors(max(1, len(self.queued) + ledger.unopened))
        self.capacity = READ_AHEAD * self.actors.n_actors
        self.actors.start()

    def _fill(self, ledger: _Ledger) -> None:
        """Start tile reads up to the capacity, then open more images while few tiles are queued."""
        while self.queued and len(self.reading) + len(self.ready) < self.capacity:
            unit = self.queued.popleft()
            if unit.image.done:
                continue
            if not unit.image.opened.raster:
                self.ready.append(unit)  # a photo's tile: its pixels are the decoded photo's
                continue
            options, raster, opened = self.job.input.storage_options, self.job.raster, unit.image.opened
            shape = opened.prompts.read_shape(unit.index) if opened.prompts is not None else None
            status, unit.pixels, unit.valid = self.read_task.remote(
                unit.image.uri, options, raster, opened.stretch, unit.window, self.job.run.read_timeout_s, shape
            )
            self.reading[status] = unit
        while len(self.opening) < OPENS_AHEAD and len(self.queued) < self.capacity:
            uri = ledger.next_uri()
            if uri is None:
                return
            prompts = (self.prompts[uri], self.job.prompts.margin) if self.prompts is not None else ()
            status, photo = self.open_task.remote(
                uri, self.job.input.storage_options, self.job.raster, self.job.run.read_timeout_s, *prompts
            )
            self.opening[status] = _Image(uri, photo=photo)

    def _over_budget(self, ledger: _Ledger) -> Iterator[Event]:
        """The error rows of images past `run.image_timeout_s` with a tile read and waiting for an
        actor, that have had a tile segmented already: as in process, the budget is checked
        before every tile but an image's first (and by the generator within each tile)."""
        now = time.monotonic()
        for unit in self.ready:
            image = unit.image
            if not image.done and image.fed and image.deadline is not None and image.deadline < now:
                yield self._fail(image, str(OverBudget(self.job.run.image_timeout_s)), ledger)

    def _next_events(self, ledger: _Ledger) -> Iterator[Event]:
        """Wait for the next reference any stage holds and handle it; when the wait runs out
        first, kill the actors stuck past their tile's budget (`ActorPool.expire`)."""
        refs = [*self.opening, *self.reading, *self.actors.refs, *self.finishing, *self.commits.running]
        done, _ = self.ray.wait(refs, num_returns=1, timeout=self.actors.wait_timeout())
        if not done:
            self.actors.expire()
            return
        [ref] = done
        if ref in self.commits.running:
            yield self.commits.take(ref)
        elif ref in self.finishing:
            yield self._on_finished(ref, ledger)
        elif ref in self.opening:
            yield from self._on_opened(ref, ledger)
        elif ref in self.reading:
            yield from self._on_read(ref, ledger)
        else:
            yield from self._on_segmented(ref, ledger)

    def _on_opened(self, ref, ledger: _Ledger) -> Iterator[Event]:
        image = self.opening.pop(ref)
        try:
            opened: Opened = self.ray.get(ref)
        except self.ray.exceptions.RayError as error:
            yield self._fail(
                image, f"read: the open task was lost {MAX_ATTEMPTS} times ({type(error).__name__})", ledger
            )
            return
        image.opened = opened
        image.seconds["read"] += opened.seconds
        if opened.error:
            yield self._fail(image, opened.error, ledger)
            return
        if opened.raster:
            image.photo = None  # its tiles are read from the file
        if (budget_s := self.job.run.image_timeout_s) is not None:
            image.deadline = time.monotonic() - opened.seconds + budget_s
        image.waiting = len(opened.plan.tiles)
        self.queued.extend(_Unit(image, index) for index in range(len(opened.plan.tiles)))

    def _on_read(self, ref, ledger: _Ledger) -> Iterator[Event]:
        unit = self.reading.pop(ref)
        image = unit.image
        try:
            status: TileRead = self.ray.get(ref)
        except self.ray.exceptions.RayError as error:
            if not image.done:
                yield self._fail(
                    image, f"read: a tile's read task was lost {MAX_ATTEMPTS} times ({type(error).__name__})", ledger
                )
            return
        if image.done:
            return
        image.seconds["read"] += status.seconds
        if status.error:
            yield self._fail(image, status.error, ledger)
        elif not status.has_pixels:  # no valid pixel: the model never sees it
            self._tile_back(image, None)
        else:
            self.ready.append(unit)

    def _on_segmented(self, ref, ledger: _Ledger) -> Iterator[Event]:
        taken = self.actors.take(ref)
        if taken is None:
            return
        unit, masks, outcome = taken
        image = unit.image
        if image.done:
            return
        if isinstance(outcome, Exception):  # its worker, node or pixels were lost
            unit.attempts += 1
            log.warning(
                "worker lost while segmenting tile %d of %s (%s); attempt %d of %d",
                unit.index,
                image.uri,
                type(outcome).__name__,
                unit.attempts,
                MAX_ATTEMPTS,
            )
            if unit.attempts >= MAX_ATTEMPTS:
                yield self._fail(
                    image, f"segment: the worker died on this image {MAX_ATTEMPTS} times (out of memory?)", ledger
                )
                return
            unit.pixels = unit.valid = None
            image.redone += 1
            self.queued.appendleft(unit)  # read again (a photo's is cut again), before any other
            return
        image.seconds["segment"] += outcome.seconds
        image.workers.add(outcome.worker)
        if outcome.error:
            yield self._fail(image, outcome.error, ledger)
        else:
            self._tile_back(image, masks)

    def _tile_back(self, image: _Image, masks) -> None:
        """One tile of `image` is back (`masks`: the reference of its masks, None for a tile
        with no valid pixel); the last one starts the image's finish task."""
        if masks is not None:
            image.tiles.append(masks)
        image.waiting -= 1
        if image.waiting:
            return
        opened = image.opened
        summary, result = self.finish_task.remote(
            image.uri,
            opened.plan,
            self.job.amg.crop_nms_thresh,
            opened.started,
            image.seconds,
            tuple(sorted(image.workers)),
            (opened.prompts, self.job.prompts.carry) if opened.prompts is not None else None,
            *image.tiles,
        )
        self.finishing[summary] = (image, result)
        image.tiles, image.photo = [], None

    def _on_finished(self, ref, ledger: _Ledger) -> Event:
        image, result = self.finishing.pop(ref)
        try:
            done: ImageDone = self.ray.get(ref)
        except self.ray.exceptions.RayError as error:
            return self._fail(
                image, f"encode: the finish task was lost {MAX_ATTEMPTS} times ({type(error).__name__})", ledger
            )
        image.done = True
        self._add(image.uri, result, ledger)
        return replace(done, tiles_redone=image.redone)

    def _fail(self, image: _Image, error: str, ledger: _Ledger) -> ImageDone:
        """The error row of `image`, which is then done: what is still on its way is dropped."""
        size = None
        if image.opened is not None and image.opened.plan is not None:
            size = image.opened.plan.image_hw
        started = image.opened.started if image.opened is not None else time.time()
        result = image_result(
            image.uri,
            [],
            size=size,
            seconds=time.time() - started,
            stage_seconds=image.seconds,
            workers=tuple(sorted(image.workers)),
            error=error,
        )
        if self.prompts is not None:
            planned = image.opened.prompts if image.opened is not None else None
            result = with_prompts(result, list(planned.prompts) if planned is not None else self.prompts[image.uri])
        image.done = True
        image.tiles, image.photo = [], None
        self._add(image.uri, result, ledger)
        return result.done()

    def _add(self, uri: str, result, ledger: _Ledger) -> None:
        """Keep an image's result (a reference, or an error row); commit its shard when complete."""
        if complete := ledger.add(uri, result):
            self.commits.submit(*complete)


def _finish(
    uri: str,
    plan: ScenePlan,
    iou_threshold: float,
    started: float,
    seconds: dict[str, float],
    workers: tuple[str, ...],
    prompted: tuple[PromptPlan, tuple[str, ...]] | None,
    *tiles: TileMasks | list[PromptMask],
) -> tuple[ImageDone, ImageResult]:
    """A finish task: one image's rows from its tiles' masks (the seam merge, RLE, polygons),
    and the summary the driver counts; in a prompt job (`prompted`: the image's prompt plan
    and `prompts.carry`) from its windows' masks. Never raises: a failure is the image's error row."""
    try:
        if prompted is not None:
            prompt_plan, carry = prompted
            masks = [mask for window in tiles for mask in window]
            result = prompted_result(uri, plan, prompt_plan, masks, carry, started, seconds, workers)
        else:
            result = finish_image(uri, finish_scene(plan, list(tiles), iou_threshold), started, seconds, workers)
    except Exception as error:  # noqa: BLE001 - one image's failure must not end the job
        result = image_result(
            uri,
            [],
            size=plan.image_hw,
            seconds=time.time() - started,
            stage_seconds=seconds,
            workers=workers,
            error=f"encode: {one_line_reason(error, typed=True)}",
        )
        if prompted is not None:
            result = with_prompts(result, list(prompted[0].prompts))
    return result.done(), result


class _Ledger:
    """The driver's bookkeeping: the images still to open, in plan order, and the results
    (object references, or error rows) of the shards begun and not yet complete.

    Shards are tracked from their first image opened on, so this holds about as many images as
    are in flight, however long the plan.
    """

    def __init__(self, shards: list[Shard]) -> None:
        self.unread = ((uri, shard) for shard in shards for uri in shard.uris)
        self.shard_of: dict[str, Shard] = {}
        self.results: dict[int, list] = {}
        self.outstanding = sum(len(shard.uris) for shard in shards)  # images without a result yet
        self.unopened = self.outstanding  # images not yet handed out to open

    def next_uri(self) -> str | None:
        """The next image to open, None when there is none left."""
        uri, shard = next(self.unread, (None, None))
        if uri is not None:
            self.unopened -= 1
            self.shard_of[uri] = shard
            self.results.setdefault(shard.shard_id, [])
        return uri

    def add(self, uri: str, result) -> tuple[Shard, list] | None:
        """Keep one image's result; the shard and all its results when this one completes it."""
        self.outstanding -= 1
        shard = self.shard_of.pop(uri)
        results = self.results[shard.shard_id]
        results.append(result)
        if len(results) < len(shard.uris):
            return None
        return shard, self.results.pop(shard.shard_id)


class SegmenterActor:
    """A Ray actor around one `ImageSegmenter` that segments tiles. The constructor only notes
    the job, so that the driver sees when Ray has placed the actor (`placed`) apart from when
    the model has loaded (`load`, once)."""

    def __init__(self, job: JobSpec, segmenter: type = ImageSegmenter) -> None:
        self.job = job
        self.segmenter_class = segmenter
        self.segmenter: ImageSegmenter | None = None

    def placed(self) -> None:
        """Returns as soon as the actor runs: Ray has given it what it asked for."""

    def load(self) -> str | None:
        """Load the model; the reason it failed (one line), for the driver to name, else None."""
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
        node = ray.get_runtime_context().get_node_id()[:8]
        try:
            self.segmenter = self.segmenter_class(self.job, f"node-{node}/pid-{os.getpid()}", _actor_threads(cpus))
        except Exception as error:  # noqa: BLE001 - reported to the driver
            return f"{type(error).__name__}: {' '.join(str(error).split())}"
        return None

    def segment_tile(
        self,
        uri: str,
        plan: ScenePlan,
        index: int,
        pixels: np.ndarray,
        valid: np.ndarray | None,
        deadline: float | None,
        prompts: PromptPlan | None = None,
    ) -> tuple[_TileDone, TileMasks | list[PromptMask] | None]:
        """The masks of tile `index` of `uri`'s `plan`: `pixels` (h, w, 3) uint8 are the tile's
        (a raster's read) or the whole photo's, which the tile is cut from; `valid` (h, w) bool
        or None. deadline: `time.time()` past which the image's budget is spent (None: none).
        prompts: a prompt job's plan of the image, whose window `index` this tile is (read
        decimated where it says so). Never raises for a bad tile: the failure is the status's `error`."""
        assert self.segmenter is not None
        started = time.perf_counter()
        x0, y0, x1, y1 = plan.tiles[index].window
        shape = prompts.read_shape(index) if prompts is not None else None
        if pixels.shape[:2] not in ((y1 - y0, x1 - x0), shape):  # a photo's: cut (and decimated) here
            photo = ArrayScene(pixels)
            pixels = photo.read((x0, y0, x1, y1)) if shape is None else photo.read_decimated((x0, y0, x1, y1), shape)
            pixels = pixels[0]
        check = Budget.until(deadline, self.job.run.image_timeout_s).check
        name = self.segmenter.worker_name
        try:
            if prompts is not None:
                check()
                masks = self.segmenter.segment_window(pixels, prompts, index)
            else:
                masks = self.segmenter.segment_tile(uri, pixels, valid, plan, index, check)
        except (ImageError, OverBudget) as error:
            return _TileDone(str(error), 0, time.perf_counter() - started, name), None
        except Exception as error:  # noqa: BLE001 - one image's failure must not end the job
            return _TileDone(
                f"segment: {one_line_reason(error, typed=True)}", 0, time.perf_counter() - started, name
            ), None
        return _TileDone(None, len(masks), time.perf_counter() - started, name), masks


def _actor_threads(cpus: float) -> int:
    """torch threads of a segmenting actor given `cpus` CPUs (a share such as 1.75 counts whole)."""
    return max(1, math.ceil(cpus))


def _actor_env(resources: dict) -> dict:
    """The runtime environment of a segmenting actor asking for `resources`: `OMP_NUM_THREADS`
    set to its torch threads. Unset, Ray sets it to the CPUs it assigns rounded down (1 for
    1.75) under an actor that runs torch on 2 threads; set, the actor was not slower in either
    round measured (docs/benchmarks.md, 2026-12-04)."""
    threads = _actor_threads(resources.get("num_cpus", 1))
    return {"env_vars": {"OMP_NUM_THREADS": str(threads)}}


class ActorPool:
    """Segmenting actors that survive losing some of them: to a killed process or a lost node.

    An actor is first *placed* (Ray found it the resources it asks for, perhaps once an
    autoscaler added a node), then *loads* its model; tiles go only to actors that have
    loaded it, `IN_FLIGHT_PER_ACTOR` at a time, so that an actor starts its next tile while the
    last one's masks are handed on. While no actor of the pool is placed, the job waits at
    most `run.actor_start_timeout_s`, then fails naming what an actor asks for and what the
    cluster lacks. When a call fails because a worker, a node or the tile's pixels were lost,
    its actor is replaced (placed wherever Ray finds room) and the driver reads the tile again
    (`take` hands it the error). With `run.image_timeout_s`, an actor still busy on a tile
    `SEGMENT_GRACE_S` past its image's budget (stuck where it cannot check it) is killed and
    replaced; its tiles are dropped.
    """

    def __init__(self, ray, job: JobSpec, resources: dict, n_actors: int, segmenter: type = ImageSegmenter) -> None:
        """job: as the actors get it (`RayExecutor.actor_device`); segmenter: what they hold
        (`RayExecutor.segmenter`)."""
        self.ray = ray
        self.job = job
        self.segmenter = segmenter
        self.resources = resources
        self.actor_class = ray.remote(SegmenterActor).options(
            max_restarts=0, max_task_retries=0, runtime_env=_actor_env(resources), **resources
        )
        self.n_actors = n_actors
        self.placing: dict = {}  # placed() ref -> actor
        self.starting: dict = {}  # load() ref -> actor
        self.loaded: list = []  # actors that have loaded the model
        self.busy: dict = {}  # segment_tile() status ref -> (actor, unit, masks ref)
        self.kill_at: dict = {}  # segment_tile() status ref -> time.monotonic() past which its actor is killed
        self.unplaced_since: float | None = None  # time.monotonic() since which no actor is placed

    @property
    def refs(self) -> list:
        return [*self.placing, *self.starting, *self.busy]

    def start(self) -> None:
        for _ in range(self.n_actors):
            self._start_actor()
        log.info(
            "starting %d segmenting actor%s, each asking for %s",
            self.n_actors,
            "s" * (self.n_actors > 1),
            amounts(self.resources),
        )

    def stop(self) -> None:
        for actor in [*self.placing.values(), *self.starting.values(), *self.loaded]:
            self.ray.kill(actor)

    def placement_wait(self) -> float | None:
        """Seconds left to wait for an actor to be placed; None while one is.

        Raises:
            JobFailure: when no actor has been placed for `run.actor_start_timeout_s`.
        """
        if self.starting or self.loaded:
            self.unplaced_since = None
            return None
        now = time.monotonic()
        if self.unplaced_since is None:
            self.unplaced_since = now
        timeout = self.job.run.actor_start_timeout_s
        left = self.unplaced_since + timeout - now
        if left <= 0:
            lacking = shortfall(self.resources, self.ray.cluster_resources(), self.ray.available_resources())
            where = f"the cluster has {lacking}" if lacking else "no node of the cluster has them all free"
            raise JobFailure(
                f"no segmenting actor could start in {timeout:g} s: each asks for {amounts(self.resources)} and {where}"
            )
        return left

    def feed(self, ready: deque) -> None:
        """Hand read tiles from `ready` to loaded actors, the least busy first, up to
        `IN_FLIGHT_PER_ACTOR` each; tiles of images already done are dropped."""
        load = Counter(id(actor) for actor, _, _ in self.busy.values())
        while ready:
            actor = min(self.loaded, key=lambda a: load[id(a)], default=None)
            if actor is None or load[id(actor)] >= IN_FLIGHT_PER_ACTOR:
                return
            unit = ready.popleft()
            if unit.image.done:
                continue
            image = unit.image
            pixels = image.photo if unit.pixels is None else unit.pixels
            deadline = None if image.deadline is None else time.time() + image.deadline - time.monotonic()
            status, masks = actor.segment_tile.options(num_returns=2).remote(
                image.uri, image.opened.plan, unit.index, pixels, unit.valid, deadline, image.opened.prompts
            )
            self.busy[status] = (actor, unit, masks)
            load[id(actor)] += 1
            image.fed += 1
            if image.deadline is not None:
                self.kill_at[status] = image.deadline + SEGMENT_GRACE_S

    def wait_timeout(self) -> float | None:
        """Seconds the driver may wait for any reference: until an actor must be placed
        (`placement_wait`) or the first busy actor must be killed (0 when past); None: no bound.

        Raises:
            JobFailure: when no actor has been placed for `run.actor_start_timeout_s`.
        """
        bounds = [self.placement_wait()]
        if self.kill_at:
            bounds.append(max(0.0, min(self.kill_at.values()) - time.monotonic()))
        known = [b for b in bounds if b is not None]
        return min(known) if known else None

    def expire(self) -> None:
        """Kill and replace the actors busy on a tile `SEGMENT_GRACE_S` past its image's budget;
        their tiles are dropped (the driver has written their images' error rows)."""
        now = time.monotonic()
        for ref in [r for r, at in self.kill_at.items() if at <= now]:
            if ref not in self.busy:
                continue
            actor, unit, _ = self.busy[ref]
            log.warning(
                "%s: tile %d not back %.0f s past run.image_timeout_s; replacing its segmenting actor",
                unit.image.uri,
                unit.index,
                SEGMENT_GRACE_S,
            )
            self._replace(actor)
            for other in [r for r, (a, _, _) in self.busy.items() if a is actor]:
                self.busy.pop(other)
                self.kill_at.pop(other, None)

    def take(self, ref) -> tuple[_Unit, object, _TileDone | Exception] | None:
        """A finished call: None for `placed` or `load`; for `segment_tile`, (unit, masks
        reference, its `_TileDone`, or the exception that says its worker or pixels were lost)."""
        if ref in self.placing:
            self._on_placed(ref)
            return None
        if ref in self.starting:
            self._on_started(ref)
            return None
        actor, unit, masks = self.busy.pop(ref)
        self.kill_at.pop(ref, None)
        try:
            return unit, masks, self.ray.get(ref)
        except _worker_lost_errors(self.ray) as error:
            if actor in self.loaded:
                self._replace(actor)
            return unit, masks, error

    def _replace(self, actor) -> None:
        """Kill `actor` (dead already, or alive and only pixels were lost) and start another."""
        self.ray.kill(actor)
        self.loaded.remove(actor)
        self._start_actor()

    def _start_actor(self) -> None:
        actor = self.actor_class.remote(self.job, self.segmenter)
        self.placing[actor.placed.remote()] = actor

    def _on_placed(self, ref) -> None:
        actor = self.placing.pop(ref)
        try:
            self.ray.get(ref)
        except _worker_lost_errors(self.ray):
            log.warning("a segmenting actor died while starting; starting another")
            self._start_actor()
            return
        self.starting[actor.load.remote()] = actor

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
        self.loaded.append(actor)


def _commit(dataset: OutputDataset, schemas: tuple | None, shard: Shard, *results: ImageResult) -> dict:
    """A commit task: `write_shard` with the shard's results, which Ray fetches from the
    object store (the finish tasks' results) before the task starts."""
    return write_shard(dataset, shard, list(results), schemas)


class _CommitStage:
    """Commit tasks: `write_shard` on a CPU worker instead of the driver.

    Ray retries a task whose worker or node is lost; a commit is idempotent (same bytes under
    the same names, marker only if absent), so a retry cannot duplicate rows. A commit that
    fails anyway ends the job: its shard stays uncommitted and a re-run does it again.
    """

    def __init__(self, ray, dataset: OutputDataset, schemas: tuple | None) -> None:
        """schemas: a prompt job's tables' schemas (`tables.prompt_schemas`), else None."""
        self.ray = ray
        self.task = ray.remote(_commit).options(num_cpus=STAGE_TASK_CPUS, max_retries=MAX_ATTEMPTS - 1)
        self.dataset = ray.put(dataset)
        self.schemas = schemas
        self.running: dict = {}  # commit ref -> shard

    def submit(self, shard: Shard, results: list) -> None:
        self.running[self.task.remote(self.dataset, self.schemas, shard, *results)] = shard

    def take(self, ref) -> ShardCommit:
        shard = self.running.pop(ref)
        try:
            return ShardCommit(shard, self.ray.get(ref))
        except self.ray.exceptions.RayError as error:
            cause = getattr(error, "cause", None) or error
            raise JobFailure(f"committing {shard.name} failed: {one_line_reason(cause, typed=True)}") from None


def _worker_lost_errors(ray) -> tuple[type[Exception], ...]:
    """The errors that mean a worker (process or node) or an object went away, not that the image failed."""
    e = ray.exceptions
    return (e.RayActorError, e.WorkerCrashedError, e.ObjectLostError, e.NodeDiedError, e.OutOfMemoryError)
