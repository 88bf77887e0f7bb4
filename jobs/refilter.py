"""`sam-batch refilter`: an output's masks made again at new model-free parameters from the
candidates it kept (`output.candidates`), into a new output, without loading a model.

The new output is the one `sam-batch run` would write with the source's job at those
parameters (its `masks` and `images` tables, and its plan's fingerprint, so the two resume each
other): `refilter_job` builds that job, refusing a parameter the model sees, a threshold below
the candidates' floor, an output that kept no candidates or candidates without the valid
pixels of a tile with nodata (one line each, `RefilterError`). `refilter` runs it through the
runner (`jobs.runner`: lease, plan, resume, exactly-once commits, `run.json`) with the source's
shards as the plan and `RefilterExecutor`, which reads only the source's committed shards, in
this process or as Ray tasks.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Iterator, Sequence
from functools import partial

import pyarrow.parquet as pq
import yaml

from sam_batch.jobs.dataset import DatasetError, OutputDataset
from sam_batch.jobs.executors import REFILTER_AUTO_RAY_MIN_IMAGES, ShardTaskExecutor, choose_executor
from sam_batch.jobs.job_file import parse_job
from sam_batch.jobs.job_rules import normalise_uri
from sam_batch.jobs.job_sections import FIELD_KEYS
from sam_batch.jobs.plan import Plan, Shard
from sam_batch.jobs.runner import RunSummary, Work, run_job
from sam_batch.jobs.schema import JobSpec
from sam_batch.jobs.worker import STAGES, Event, ImageDone, ImageResult, ShardCommit, finish_image, write_shard
from sam_batch.pipeline.params import CANDIDATE_MIN_IOU, CANDIDATE_MIN_STABILITY, MODEL_FREE_PARAMS, below_floor
from sam_batch.pipeline.tables import FLOOR_KEY

log = logging.getLogger("sam_batch")
# what `--set` may change: the model-free parameters, and where the refilter runs
CHANGEABLE = (*(f"amg.{name}" for name in MODEL_FREE_PARAMS), "run.executor", "run.ray_address")


class RefilterError(ValueError):
    """The refilter cannot be done as asked; one line."""


def refilter(
    source_uri: str, overrides: Sequence[str], dest_uri: str, *, overwrite: bool = False, force: bool = False
) -> RunSummary:
    """Write `dest_uri` from the candidates of the output at `source_uri` with `overrides`
    (`amg.KEY=VALUE` strings as `--set` gives them); re-running the same command resumes."""
    source = OutputDataset(source_uri)
    plan = _source_plan(source)
    job = refilter_job(plan, overrides, dest_uri, _stored_floor(source))
    _check_valid_pixels_kept(source)
    work = Work(new_plan=lambda job: _same_shards(job, plan), executor=partial(RefilterExecutor, source=source))
    return run_job(job, overwrite=overwrite, force=force, work=work)


def _source_plan(source: OutputDataset) -> Plan:
    """The source's plan, if it is a sam-batch output with a committed shard and candidates."""
    try:
        plan = source.read_plan()
    except DatasetError as error:
        raise RefilterError(str(error)) from None
    if plan is None or not source.committed_shards():
        raise RefilterError(f"{source.uri} is not a committed sam-batch output (no plan or no committed shard)")
    if not plan.job["output"].get("candidates"):
        raise RefilterError(
            f"{source.uri} was run without output.candidates: true, so it kept no candidates to refilter"
        )
    return plan


def _stored_floor(source: OutputDataset) -> tuple[float, float]:
    """The (IoU, stability) floor the source kept its candidates at, from its first committed
    candidates file's metadata (`tables.FLOOR_KEY`)."""
    files = source.data_files("candidates")
    metadata = (pq.read_schema(files[0], filesystem=source.fs).metadata or {}) if files else {}
    if FLOOR_KEY not in metadata:
        raise RefilterError(f"{source.uri} holds no candidates file that names its floor")
    floor = json.loads(metadata[FLOOR_KEY])
    return floor["pred_iou_thresh"], floor["stability_score_thresh"]


def refilter_job(
    plan: Plan,
    overrides: Sequence[str],
    dest_uri: str,
    floor: tuple[float, float] = (CANDIDATE_MIN_IOU, CANDIDATE_MIN_STABILITY),
) -> JobSpec:
    """The source's job (`plan.job`) with `overrides` applied, writing `dest_uri`, without
    candidates: the job `sam-batch run` would run for the same output; `floor`: the (IoU,
    stability) thresholds the source's candidates were kept at. Its `run` section is the
    default's but for what `overrides` set (the source's was for the model)."""
    data = copy.deepcopy(plan.job)
    data["run"] = {}
    for section in ("input", "output"):
        data[section]["storage_options"] = {}  # redacted in the plan; refilter reads no input
    if normalise_uri(dest_uri) == data["output"]["uri"]:
        raise RefilterError(f"-o {dest_uri}: the new output must not be the source")
    data["output"].update(uri=dest_uri, candidates=False)
    for override in overrides:
        key, equals, text = override.partition("=")
        key = key.strip()
        if not equals:
            raise RefilterError(f"--set {key}: expects KEY=VALUE (amg.pred_iou_thresh=0.9, say)")
        if key not in CHANGEABLE:
            why = "needs the model" if key.startswith(("amg.", "model.", "engine.")) else "not one refilter may change"
            why = why if key in FIELD_KEYS else "unknown key"
            raise RefilterError(f"--set {override}: {why}; refilter changes only {', '.join(CHANGEABLE)}")
        section, name = key.split(".", 1)
        try:
            data[section][name] = yaml.safe_load(text)
        except yaml.YAMLError:
            raise RefilterError(f"--set {key}: not a YAML value") from None
    job = parse_job(data, "refilter")
    low = below_floor(job.amg, *floor)
    if low:
        raise RefilterError(f"below the floor the candidates were kept at: {'; '.join(low)}")
    return job


def _check_valid_pixels_kept(source: OutputDataset) -> None:
    """Refuses an output whose candidates lack a nodata tile's valid pixels (written before
    the candidates table held them): the nodata rule needs them."""
    for path in source.data_files("candidates"):
        held = "valid" in pq.read_schema(path, filesystem=source.fs).names
        names = ["image_uri", "tile", "nodata", "crop_index"] + (["valid"] if held else [])
        for row in pq.read_table(path, filesystem=source.fs, columns=names).to_pylist():
            if row["nodata"] and row["crop_index"] == 0 and row.get("valid") is None:
                raise RefilterError(
                    f"{row['image_uri']} had nodata in tile {row['tile']}, but its candidates do not hold the "
                    "tile's valid pixels (written by an earlier sam-batch): run the job again to refilter it"
                )


def _same_shards(job: JobSpec, source: Plan) -> Plan:
    """The new output's plan: the source's inputs and shards, the new job's fingerprint."""
    return Plan(job.fingerprint(), job.redacted_dict(), source.shards, source.output_crs)


class RefilterExecutor:
    """Refilters the shards still to do that the source has committed (the source's shards not
    yet committed are left for a later refilter), each read, refiltered and committed in one
    go (`refilter_and_commit`): in this process, or as Ray tasks (`executors.ShardTaskExecutor`)
    as `run.executor` says (`auto`: Ray for a cluster or `REFILTER_AUTO_RAY_MIN_IMAGES`)."""

    def __init__(self, job: JobSpec, n_images: int, source: OutputDataset) -> None:
        self.job = job
        self.source = source
        self.name, why = choose_executor(job, n_images, REFILTER_AUTO_RAY_MIN_IMAGES, uses_gpus=False)
        log.info("executor: %s (%s)", self.name, why)

    def run(self, shards: list[Shard], dataset: OutputDataset) -> Iterator[Event]:
        committed = self.source.committed_shards()
        left = [shard.name for shard in shards if shard.shard_id not in committed]
        if left:
            log.warning(
                "%d shard(s) not committed in %s yet, first %s: refilter again later",
                len(left),
                self.source.uri,
                left[0],
            )
        shards = [shard for shard in shards if shard.shard_id in committed]
        work = partial(refilter_and_commit, source=self.source)
        if self.name == "ray":
            yield from ShardTaskExecutor(self.job, work).run(shards, dataset)
            return
        for shard in shards:
            images, stats = work(self.job, shard, dataset)
            yield from images
            yield ShardCommit(shard, stats)


def refilter_and_commit(
    job: JobSpec, shard: Shard, dataset: OutputDataset, source: OutputDataset
) -> tuple[list[ImageDone], dict]:
    """Refilter one committed shard of `source` (`refilter_shard`) and commit it to `dataset`."""
    results = refilter_shard(job, source, shard)
    return [result.done() for result in results], write_shard(dataset, shard, results)


def refilter_shard(job: JobSpec, source: OutputDataset, shard: Shard) -> list[ImageResult]:
    """The results of one committed shard of `source`, refiltered at `job.amg`; error rows as
    they were."""
    from sam_batch.pipeline.candidates import refilter_image

    images = _read(source, "images", shard)
    candidates: dict[str, list[dict]] = {}
    for row in _read(source, "candidates", shard):
        candidates.setdefault(row["image_id"], []).append(row)
    results = []
    for image in images:
        started, t = time.time(), time.perf_counter()
        if image["status"] != "ok":
            results.append(ImageResult(image["image_uri"], [], image, dict.fromkeys(STAGES, 0.0), ("refilter",)))
            continue
        scene = refilter_image(
            candidates.get(image["image_id"], []),
            image["width"],
            image["height"],
            image["crs"],
            image["transform"],
            job.raster.tile_size,
            job.raster.tile_overlap,
            job.amg,
        )
        seconds = {**dict.fromkeys(STAGES, 0.0), "segment": time.perf_counter() - t}
        results.append(finish_image(image["image_uri"], scene, started, seconds, ("refilter",)))
    return results


def _read(source: OutputDataset, table_name: str, shard: Shard) -> list[dict]:
    return pq.read_table(source.path(table_name, f"{shard.name}.parquet"), filesystem=source.fs).to_pylist()
