"""`sam-batch run`: plan (or resume), execute (the executor commits shard by shard), record the run.

The plan is frozen at the output root on the first run. Running the same job again resumes it:
committed shards are skipped. Running a different job against the same output is refused
unless `overwrite` is set, which clears the old output first. One run at a time holds an
output (`jobs.lease`).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from sam_batch import __version__
from sam_batch.jobs.dataset import DatasetError, OutputDataset
from sam_batch.jobs.executors import Executor, make_executor
from sam_batch.jobs.lease import LeaseHeld, OutputLease
from sam_batch.jobs.plan import Plan, list_inputs, make_plan
from sam_batch.jobs.prompt_table import plan_fingerprint, planned_images, read_prompt_table
from sam_batch.jobs.schema import JobSpec
from sam_batch.jobs.worker import STAGES, ImageDone, ShardCommit

log = logging.getLogger("sam_batch")


class JobRefused(RuntimeError):
    """The job cannot start as asked (e.g. the output belongs to another job)."""


@dataclass
class RunSummary:
    """What a run did; written as `run.json` at the output root."""

    job_name: str
    output_uri: str
    executor: str
    n_shards: int
    shards_skipped: int
    shards_committed: int = 0
    images_ok: int = 0
    images_error: int = 0
    masks: int = 0
    tiles_segmented: int = 0
    tiles_redone: int = 0
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    workers: list[str] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        done = self.images_ok + self.images_error
        return done / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {
            "sam_batch_version": __version__,
            "job_name": self.job_name,
            "output_uri": self.output_uri,
            "executor": self.executor,
            "n_shards": self.n_shards,
            "shards_skipped": self.shards_skipped,
            "shards_committed": self.shards_committed,
            "images_ok": self.images_ok,
            "images_error": self.images_error,
            "masks": self.masks,
            "tiles_segmented": self.tiles_segmented,
            "tiles_redone": self.tiles_redone,
            "seconds": round(self.seconds, 3),
            "images_per_second": round(self.images_per_second, 4),
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "workers": self.workers,
        }


def list_and_plan(job: JobSpec) -> Plan:
    """A new plan for `job`: its inputs listed and sharded (`jobs.plan`)."""
    return make_plan(job, list_inputs(job))


def prepare_plan(
    job: JobSpec, dataset: OutputDataset, overwrite: bool, new_plan: Callable[[JobSpec], Plan] = list_and_plan
) -> Plan:
    """The frozen plan of this output, made now by `new_plan` if there is none; refuses another
    job's output (or an unreadable plan) unless `overwrite`, which replaces the output, but only
    once the new plan is made: a job that lists no input leaves the old output as it was."""
    try:
        existing = dataset.read_plan()
        readable = True
    except DatasetError:
        if not overwrite:
            raise
        existing, readable = None, False
    table = read_prompt_table(job) if job.prompts.uri else None
    fingerprint = plan_fingerprint(job, table)
    if existing is not None and existing.fingerprint == fingerprint:
        log.info(
            "resuming: the plan of this job's first run stands (%d images in %d shards; "
            "`sam-batch validate` lists inputs added or removed since)",
            len(existing.uris),
            len(existing.shards),
        )
        return existing
    if existing is not None and not overwrite:
        raise JobRefused(
            f"output.uri {job.output.uri!r} holds the output of a different job "
            f"({existing.job.get('name')!r}); use another output.uri or pass --overwrite to replace it"
        )
    plan = new_plan(job) if table is None else make_plan(job, planned_images(table, list_inputs(job)), fingerprint)
    if existing is not None or not readable:
        why = "" if readable else " (its plan cannot be read)"
        log.warning("--overwrite: removing the previous output at %s%s", job.output.uri, why)
        dataset.clear()
    if table is not None:
        dataset.write_prompts(table.to_arrow())
    dataset.write_plan(plan)
    return plan


@dataclass(frozen=True)
class Work:
    """How a run plans its output and where its images are done: `sam-batch run` lists the
    inputs and segments them (the defaults); `sam-batch refilter` takes another output's
    shards and refilters its candidates (`jobs.refilter`)."""

    new_plan: Callable[[JobSpec], Plan] = list_and_plan
    executor: Callable[[JobSpec, int], Executor] = make_executor


def run_job(job: JobSpec, *, overwrite: bool = False, force: bool = False, work: Work = Work()) -> RunSummary:
    """Run (or resume) a job to the end; per-image failures are rows, not exceptions.

    The run holds the output's lease throughout (`jobs.lease`): another run on the same output
    is refused; `force` takes the lease from a run that holds it (one known to be dead).
    """
    started = time.perf_counter()
    dataset = OutputDataset(job.output.uri, job.output.storage_options)
    dataset.check_root()
    dataset.check_exclusive_create(dataset.check_writable())
    with OutputLease(dataset, force=force) as lease:
        return _run_holding_the_lease(job, dataset.for_run(lease.run_id), lease, overwrite, started, work)


def _run_holding_the_lease(
    job: JobSpec, dataset: OutputDataset, lease: OutputLease, overwrite: bool, started: float, work: Work
) -> RunSummary:
    dataset.clean_attempts(lease.holder_run_id())
    _remove_unfinished(dataset)
    plan = prepare_plan(job, dataset, overwrite, work.new_plan)
    dataset = dataset.for_plan(plan)  # geometries in the CRS the plan froze
    committed = dataset.committed_shards()
    todo = [s for s in plan.shards if s.shard_id not in committed]
    n_todo = sum(len(s.uris) for s in todo)
    log.info(
        "plan: %d images in %d shards; %d shards already committed, %d to do",
        sum(len(s.uris) for s in plan.shards),
        len(plan.shards),
        len(plan.shards) - len(todo),
        len(todo),
    )
    executor = work.executor(job, n_todo)  # `run.executor`, auto resolved for the images still to do
    summary = RunSummary(job.name, job.output.uri, executor.name, len(plan.shards), len(plan.shards) - len(todo))
    progress = Progress(n_todo)
    workers: set[str] = set()
    try:
        for event in executor.run(todo, dataset):
            if lease.lost:
                raise LeaseHeld(
                    f"{job.output.uri}: another run took this output's lease; this run stops "
                    "(its committed shards stay)"
                )
            if isinstance(event, ShardCommit):
                summary.stage_seconds["write"] += event.stats["write_seconds"]
                summary.shards_committed += int(event.stats["committed"])
                continue
            _count(summary, event)
            workers.update(event.workers)
            progress.update(event, summary)
    finally:
        progress.close()
    summary.seconds = time.perf_counter() - started
    summary.workers = sorted(workers)
    dataset.write_run_record(summary.to_dict())
    dataset.clean_attempts(lease.holder_run_id())
    return summary


def _remove_unfinished(dataset: OutputDataset) -> None:
    """Take back what a run killed in the middle of a commit published without its marker."""
    removed = dataset.remove_unfinished()
    if removed:
        log.warning(
            "removed %d data file(s) of shards published by a killed run but never committed, "
            "first %s; their shards are done again",
            len(removed),
            removed[0],
        )


def _count(summary: RunSummary, done: ImageDone) -> None:
    if done.error is None:
        summary.images_ok += 1
    else:
        summary.images_error += 1
        log.warning("%s: %s", done.uri, done.error)
    summary.masks += done.n_masks
    summary.tiles_segmented += done.tiles_segmented
    summary.tiles_redone += done.tiles_redone
    for stage, seconds in done.stage_seconds.items():
        summary.stage_seconds[stage] += seconds


class Progress:
    """A tqdm bar (images, masks, images/s, ETA) on a TTY; a plain log line per image otherwise."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.started = time.perf_counter()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", dynamic_ncols=True)

    def update(self, done: ImageDone, summary: RunSummary) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(masks=summary.masks, errors=summary.images_error, refresh=False)
            self.bar.update(1)
            return
        rate = self.done / max(time.perf_counter() - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        log.info(
            "[%d/%d] %s %s masks=%d%s | total masks=%d %.3f img/s eta %.0fs",
            self.done,
            self.total,
            "ok" if done.error is None else "error",
            done.uri,
            done.n_masks,
            f" ({done.error})" if done.error else "",
            summary.masks,
            rate,
            eta,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
