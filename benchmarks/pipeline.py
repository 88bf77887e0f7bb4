"""The Ray pipeline without a GPU: a stand-in engine with a fixed time per tile, a store with a
fixed latency per range request, and 1, 2 or 4 segmenting actors.

What stands for what:

- **The engine** (`StandInSegmenter`, what each segmenting actor holds in place of an
  `ImageSegmenter`, through `RayExecutor(segmenter=...)`): it sleeps `--tile-seconds` (200 ms,
  about a GPU on a 32x32 point grid), then returns `--masks-per-tile` synthetic masks packed as
  the real engine packs them (`pipeline.tile_masks.pack`): ellipses whose box sides are
  log-uniform between `MIN_MASK_SIDE` and 3/8 of the tile (at most `MAX_MASK_SIDE`), placed at
  random (seeded by the tile), `EDGE_FRACTION` of them touching a tile edge (so a tiled scene's
  seam merge has cut masks to settle). Each actor appends the start and end (`time.time()`) of
  every tile to its own file under the run's folder (`actor-<pid>.log`): the side channel the
  busy fractions are computed from.
- **The node**: a local Ray started here (`ray.init(num_cpus=--cpus, num_gpus=actors)`), which
  `RayExecutor` then uses as it is. The job asks for `engine.device: cuda`, so each actor asks
  for one GPU and one CPU, as on a GPU node; the GPUs are only declared (the stand-in sleeps), and
  the CPUs left are the read, open, finish and commit tasks' (`STAGE_TASK_CPUS` each). On this
  2-core machine the `--cpus` are declared, not real: the stand-in's sleeping needs none.
- **The store** (`LatencyFileSystem`, fsspec protocol `latency://`): local files, each range
  request sleeping `--read-latency-s` (100 ms) before it is served; rasterio reads it as it reads
  any store but S3 and local disk (`pipeline.rasters.BlockReads`: 2 MiB blocks). It stands for an
  object store's time to first byte on each GET, with unlimited bandwidth. Ray's workers learn
  the protocol through `ray.init`'s `worker_process_setup_hook`. Each request appends a line to
  `requests-<pid>.log` under the run's folder.
- **The scenes**: `--scenes` copies of one tiled (512 px blocks, deflate) georeferenced RGB
  GeoTIFF of `--scene-side` pixels a side, with noise so that it compresses about as imagery does;
  at tile 1024 / overlap 128 a 4096² scene is 25 tiles.

It reports, for each actor count (one driver process each, measured one after another):

- tiles/s: tiles segmented / seconds from the first tile's start to the last one's end (every
  actor's log), and the whole run's (`RayExecutor.run`, from its first call to its last event);
- each actor's busy fraction: its seconds inside `segment_tile` / seconds from its first tile's
  start to its last tile's end;
- seconds per tile of each kind of Ray task during the run (`ray.timeline`, wall time of each
  task's execution, sleeping on the store included);
- the driver's peak RSS (`VmHWM`) and its growth from just before `RayExecutor.run`.

With `--variant READ_AHEAD=4` (any of `TUNABLE`, comma-separated; the option repeats), every
actor count is also run with those `jobs.ray_pipeline` constants set in the driver, whose loop
reads them as it runs: values to try side by side before changing them.

Then the driver's peak RSS for `--memory-images` small images (one tile each, `--masks-per-tile`
masks) and for `--memory-masks` masks per image, each run in its own driver process; and, in
this process without Ray or latency, the CPU seconds per tile of what the tasks run: open, read,
finish (seam merge, records) and commit.

    .venv/bin/python benchmarks/pipeline.py [--tile-seconds 0.2] [--read-latency-s 0.1] ...
    make bench-pipeline

The report is Markdown on stdout (docs/benchmarks.md, "Pipeline without a GPU").
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import rasterio

from sam_batch.jobs import ray_pipeline
from sam_batch.jobs.dataset import OutputDataset
from sam_batch.jobs.executors import RayExecutor
from sam_batch.jobs.job_file import parse_job
from sam_batch.jobs.plan import make_plan
from sam_batch.jobs.schema import JobSpec
from sam_batch.jobs.stages import open_image, read_tile
from sam_batch.jobs.worker import ImageDone, finish_image, write_shard
from sam_batch.pipeline.scenes import finish_scene
from sam_batch.pipeline.tile_masks import TileMasks, pack
from sam_batch.pipeline.tiles import SceneMask, is_cut

PROTOCOL = "latency"  # benchmarks/latency_store.py
BENCHMARKS = str(Path(__file__).resolve().parent)
MIN_MASK_SIDE = 4  # px: the smallest side of a synthetic mask's box
MAX_MASK_SIDE = 384  # px: the largest (on a 1024 tile: 3/8 of it)
EDGE_FRACTION = 0.2  # synthetic masks placed touching an edge of their tile
SCENE_BLOCK = 512  # px: the GeoTIFFs' internal tiles
SMALL_SIDE = 256  # px a side of the images of the memory runs (one tile each)
# `jobs.ray_pipeline` constants the driver reads as it runs, which `--variant` may set
TUNABLE = ("READ_AHEAD", "IN_FLIGHT_PER_ACTOR", "OPENS_AHEAD", "MAX_FINISHES", "MAX_COMMITS", "STAGE_TASK_CPUS")
MEMORY_ACTORS = 4  # segmenting actors of the memory runs
DEFAULT_SHARD_SIZE = 64  # `run.shard_size`'s default: the throughput and image-count runs
MASKS_SHARD_SIZE = 4  # images a shard in the masks-per-image runs (commits along the run)
MIB = 2**20
TASK_EVENTS_FLUSH_S = 3.0  # s for Ray's workers to report their last task events (sent every second)


# --- the store --------------------------------------------------------------------------------


def register_latency_store() -> None:
    """Make `latency://` (benchmarks/latency_store.py) known to fsspec in this process; Ray's
    workers run it as they start (`worker_process_setup_hook`, pickled by value from here)."""
    if BENCHMARKS not in sys.path:
        sys.path.insert(0, BENCHMARKS)
    import latency_store

    latency_store.register()


# --- the engine -------------------------------------------------------------------------------


@dataclass(frozen=True)
class StandIn:
    """The stand-in engine's settings: `tile_seconds` s per tile, `masks_per_tile` masks, the
    tiles' times logged under `log_dir`."""

    tile_seconds: float
    masks_per_tile: int
    log_dir: str


class StandInSegmenter:
    """Held by a segmenting actor in place of an `ImageSegmenter` (made as
    `functools.partial(StandInSegmenter, stand_in)(job, worker_name, threads)`)."""

    def __init__(self, stand_in: StandIn, job: JobSpec, worker_name: str, threads: int) -> None:
        self.stand_in = stand_in
        self.worker_name = worker_name
        self.log = Path(stand_in.log_dir) / f"actor-{os.getpid()}.log"
        pack(synthetic_masks((0, 0, 64, 64), (64, 64), 0, 1), 0)  # warm, as an engine is once loaded

    def segment_tile(self, uri, rgb, valid, plan, index, check) -> TileMasks:
        """Sleep the tile's time, then its synthetic masks, packed; the tile's start and end
        (`time.time()`) appended to this actor's log."""
        started = time.time()
        time.sleep(self.stand_in.tile_seconds)
        tile = plan.tiles[index]
        masks = pack(synthetic_masks(tile.window, plan.image_hw, index, self.stand_in.masks_per_tile), index)
        ended = time.time()
        with self.log.open("a") as log:
            log.write(f"{started!r} {ended!r}\n")
        return masks


def synthetic_masks(
    window: tuple[int, int, int, int], image_hw: tuple[int, int], index: int, count: int
) -> list[SceneMask]:
    """`count` ellipse masks in tile `index` (its `window`, XYXY end exclusive, of an image of
    `image_hw` pixels), in scene pixels; the same for the same tile every time."""
    rng = np.random.default_rng(index)
    wx0, wy0, wx1, wy1 = window
    tile_w, tile_h = wx1 - wx0, wy1 - wy0
    longest = max(MIN_MASK_SIDE + 1, min(MAX_MASK_SIDE, min(tile_w, tile_h) * 3 // 8))
    sides = np.exp(rng.uniform(math.log(MIN_MASK_SIDE), math.log(longest), (count, 2))).astype(int)
    masks = []
    for (w, h), on_edge, edge, x, y, iou, stability in zip(
        sides.tolist(),
        (rng.random(count) < EDGE_FRACTION).tolist(),
        rng.integers(0, 4, count).tolist(),
        rng.random(count).tolist(),
        rng.random(count).tolist(),
        rng.uniform(0.88, 1.0, count).tolist(),
        rng.uniform(0.95, 1.0, count).tolist(),
    ):
        x0, y0 = round(x * (tile_w - w)), round(y * (tile_h - h))
        if on_edge:
            x0 = {0: 0, 1: tile_w - w}.get(edge, x0)
            y0 = {2: 0, 3: tile_h - h}.get(edge, y0)
        mask = SceneMask(
            pixels=ellipse(h, w),
            x0=wx0 + x0,
            y0=wy0 + y0,
            iou=iou,
            stability=stability,
            point=[wx0 + x0 + w / 2, wy0 + y0 + h / 2],
            crop_box=list(window),
            tile=index,
        )
        mask.cut = is_cut(mask.box, window, image_hw)
        masks.append(mask)
    return masks


def ellipse(height: int, width: int) -> np.ndarray:
    """bool (height, width): the ellipse inscribed in the box and its two axes, so that it
    touches all four sides (the box is the mask's)."""
    yy, xx = np.ogrid[:height, :width]
    inside = ((2 * yy + 1 - height) / height) ** 2 + ((2 * xx + 1 - width) / width) ** 2 <= 1
    return inside | (yy == height // 2) | (xx == width // 2)


# --- the inputs ---------------------------------------------------------------------------------


def write_scenes(folder: Path, count: int, side: int, georeferenced: bool) -> list[str]:
    """`count` copies of one tiled, deflate RGB uint8 GeoTIFF of `side` px a side (EPSG:32618
    when `georeferenced`); their `latency://` URIs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side]
    pattern = np.stack([xx // 7 % 256, yy // 5 % 256, (xx + yy) // 11 % 256]) // 2
    pixels = (pattern + rng.integers(0, 64, pattern.shape)).astype(np.uint8)
    profile = {
        "driver": "GTiff",
        "width": side,
        "height": side,
        "count": 3,
        "dtype": "uint8",
        "tiled": True,
        "blockxsize": min(SCENE_BLOCK, side),
        "blockysize": min(SCENE_BLOCK, side),
        "compress": "deflate",
    }
    if georeferenced:
        profile |= {"crs": "EPSG:32618", "transform": rasterio.transform.from_origin(300_000, 4_000_000, 1, 1)}
    first = folder / "scene-00000.tif"
    with rasterio.open(first, "w", **profile) as out:
        out.write(pixels)
    paths = [first] + [folder / f"scene-{i:05d}.tif" for i in range(1, count)]
    for path in paths[1:]:
        shutil.copyfile(first, path)
    return [f"{PROTOCOL}://{path.resolve()}" for path in paths]


def bench_job(
    uris_folder: Path, output: Path, latency_s: float, requests_dir: Path, actors: int, shard_size: int
) -> JobSpec:
    """The job every run uses: a cuda job (one GPU and one CPU an actor), tile 1024 / overlap
    128, its inputs a glob under `uris_folder` (the plans are made from the URIs themselves)."""
    return parse_job(
        {
            "name": "bench-pipeline",
            "input": {
                "uris": [f"{PROTOCOL}://{uris_folder}/*.tif"],
                "storage_options": {"latency_s": latency_s, "requests_dir": str(requests_dir)},
            },
            "engine": {"device": "cuda"},
            "output": {"uri": str(output)},
            "run": {"executor": "ray", "max_actors": actors, "shard_size": shard_size},
        }
    )


# --- one run: a driver process ------------------------------------------------------------------


@dataclass(frozen=True)
class RunConfig:
    """One run of the Ray executor, in its own driver process (`--one`)."""

    label: str
    folder: str  # holds the scenes (scenes/), the output (out/) and the logs (logs/)
    uris: list[str]
    actors: int
    cpus: int
    tile_seconds: float
    masks_per_tile: int
    latency_s: float
    shard_size: int
    tuning: dict[str, float]  # `jobs.ray_pipeline` constants set in the driver (`--variant`), by name


def run_one(config: RunConfig) -> dict:
    """Run the job of `config` on a Ray started here; what the report needs, as plain data."""
    import ray

    folder = Path(config.folder)
    logs = folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    register_latency_store()
    job = bench_job(folder / "scenes", folder / "out", config.latency_s, logs, config.actors, config.shard_size)
    plan = make_plan(job, config.uris)
    dataset = OutputDataset(job.output.uri).for_plan(plan)
    dataset.write_plan(plan)
    stand_in = StandIn(config.tile_seconds, config.masks_per_tile, str(logs))
    for name, value in config.tuning.items():  # read by the driver's loop as it runs
        setattr(ray_pipeline, name, type(getattr(ray_pipeline, name))(value))
    ray.init(
        address="local",
        num_cpus=config.cpus,
        num_gpus=config.actors,
        include_dashboard=False,
        logging_level="WARNING",
        runtime_env={"worker_process_setup_hook": register_latency_store},
    )
    try:
        executor = RayExecutor(job, segmenter=functools.partial(StandInSegmenter, stand_in))
        rss_before = _memory_bytes("VmRSS")
        started = time.time()
        images = masks = 0
        errors: list[str] = []
        for event in executor.run(list(plan.shards), dataset):
            if isinstance(event, ImageDone):
                images += 1
                masks += event.n_masks
                errors += [f"{event.uri}: {event.error}"] if event.error else []
        ended = time.time()
        rss_peak = _memory_bytes("VmHWM")
        time.sleep(TASK_EVENTS_FLUSH_S)
        tasks = task_seconds(ray.timeline())
    finally:
        ray.shutdown()
    return {
        "label": config.label,
        "actors": config.actors,
        "tuning": config.tuning,
        "images": images,
        "errors": errors,
        "masks": masks,
        "run_started": started,
        "run_ended": ended,
        "tiles": actor_tiles(logs),
        "requests": sum(len(p.read_text().splitlines()) for p in logs.glob("requests-*.log")),
        "tasks": tasks,
        "rss_before": rss_before,
        "rss_peak": rss_peak,
    }


def _memory_bytes(field: str) -> int:
    """`VmRSS` (resident now) or `VmHWM` (its peak) of this process, in bytes. Not
    `getrusage`: its peak outlives `exec`, so a new driver would report its parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def actor_tiles(logs: Path) -> dict[str, list[list[float]]]:
    """Each actor's tiles as [start, end] (`time.time()`), from the logs `StandInSegmenter` wrote."""
    return {
        path.stem: [[float(v) for v in line.split()] for line in path.read_text().splitlines()]
        for path in sorted(logs.glob("actor-*.log"))
    }


def task_seconds(timeline: list[dict]) -> dict[str, list[float]]:
    """Seconds of each execution of each kind of task or actor call (its name, as
    `read_tile` or `_SegmenterActor.segment_tile`), its arguments' fetch included, from
    `ray.timeline()`'s trace events (category `task::<name>`, `dur` in µs)."""
    seconds: dict[str, list[float]] = defaultdict(list)
    for event in timeline:
        category = str(event.get("cat", ""))
        if category.startswith("task::") and event.get("ph") == "X":
            seconds[category.removeprefix("task::")].append(event["dur"] / 1e6)
    return dict(seconds)


# --- the report ---------------------------------------------------------------------------------


def throughput(result: dict) -> dict:
    """tiles/s (first tile's start to last tile's end, and the whole run) and each actor's busy
    fraction, from a run's result."""
    tiles = result["tiles"]
    spans = [span for actor in tiles.values() for span in actor]
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    busy = {
        actor: sum(e - s for s, e in actor_spans) / (max(e for _, e in actor_spans) - min(s for s, _ in actor_spans))
        for actor, actor_spans in tiles.items()
    }
    return {
        "tiles": len(spans),
        "tiles_per_s": len(spans) / (last - first),
        "run_tiles_per_s": len(spans) / (result["run_ended"] - result["run_started"]),
        "busy": busy,
    }


def cpu_per_tile(scenes: list[str], latency_folder: Path, masks_per_tile: int) -> dict[str, float]:
    """CPU seconds per tile of what a scene's tasks run, in this process, without latency:
    open (per scene, shared by its tiles), read, finish (its seam merge, then its records:
    RLE, polygons, rows) and commit."""
    job = bench_job(latency_folder, latency_folder / "cpu-out", 0.0, latency_folder, 1, 64)
    uri = scenes[0]
    options = {"latency_s": 0.0}
    clock = time.process_time()
    opened, _ = open_image(uri, options, job.raster, job.run.read_timeout_s)
    open_s = time.process_time() - clock
    plan = opened.plan
    n_tiles = len(plan.tiles)
    clock = time.process_time()
    for tile in plan.tiles:
        status, _, _ = read_tile(uri, options, job.raster, opened.stretch, tile.window, job.run.read_timeout_s)
        assert status.error is None, status.error
    read_s = time.process_time() - clock
    tiles = [pack(synthetic_masks(t.window, plan.image_hw, i, masks_per_tile), i) for i, t in enumerate(plan.tiles)]
    clock = time.process_time()
    merged = finish_scene(plan, tiles, job.amg.crop_nms_thresh)
    merge_s = time.process_time() - clock
    clock = time.process_time()
    result = finish_image(uri, merged, time.time(), {}, ("stand-in",))
    records_s = time.process_time() - clock
    one_scene = make_plan(job, [uri])
    dataset = OutputDataset(job.output.uri).for_plan(one_scene)
    shard = one_scene.shards[0]
    clock = time.process_time()
    write_shard(dataset, shard, [result])
    commit_s = time.process_time() - clock
    return {
        "tiles": n_tiles,
        "masks_kept": len(result.mask_rows),
        "open": open_s / n_tiles,
        "read": read_s / n_tiles,
        "merge": merge_s / n_tiles,
        "records": records_s / n_tiles,
        "commit": commit_s / n_tiles,
    }


def run_in_driver(config: RunConfig) -> dict:
    """`run_one(config)` in a new Python process (its own peak RSS); its result."""
    command = [sys.executable, __file__, "--one", json.dumps(asdict(config))]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{config.label}: the driver exited {done.returncode}: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["errors"]:
        raise RuntimeError(f"{config.label}: {len(result['errors'])} images failed, first {result['errors'][0]}")
    return result


def report_throughput(results: list[dict], tile_seconds: float) -> list[str]:
    """Markdown: tiles/s and busy fractions per actor count, then seconds per task kind."""
    lines = [
        "| tuning | actors | tiles | tiles/s (first tile to last) | tiles/s (whole run) | x of 1 actor "
        "| busy per actor |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    one_actor: dict[str, float] = {}
    for result in results:
        t = throughput(result)
        tuning = tuning_label(result["tuning"])
        one_actor.setdefault(tuning, t["tiles_per_s"] if result["actors"] == 1 else math.nan)
        busy = ", ".join(f"{b:.0%}" for b in sorted(t["busy"].values()))
        lines.append(
            f"| {tuning} | {result['actors']} | {t['tiles']} | {t['tiles_per_s']:.2f} | "
            f"{t['run_tiles_per_s']:.2f} | {t['tiles_per_s'] / one_actor[tuning]:.2f} | {busy} |"
        )
    lines += [
        f"\nIdeal: {1 / tile_seconds:.1f} tiles/s an actor. Seconds of each task (mean, wall, its arguments' "
        "fetch included; `ray.timeline`):\n",
        "| tuning | actors | range requests | open s/scene | read s/tile | segment s/tile (actor call) "
        "| finish s/scene | commit s/shard |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for result in results:
        mean = {name.rsplit(".", 1)[-1]: sum(v) / len(v) for name, v in result["tasks"].items() if v}
        lines.append(
            f"| {tuning_label(result['tuning'])} | {result['actors']} | {result['requests']} | "
            f"{mean.get('open_image', math.nan):.2f} | "
            f"{mean.get('read_tile', math.nan):.2f} | {mean.get('segment_tile', math.nan):.3f} | "
            f"{mean.get('_finish', math.nan):.2f} | {mean.get('_commit', math.nan):.2f} |"
        )
    return lines


def tuning_label(tuning: dict[str, float]) -> str:
    """`READ_AHEAD=4, IN_FLIGHT_PER_ACTOR=3`, or "as committed" for none."""
    return ", ".join(f"{name}={value:g}" for name, value in tuning.items()) or "as committed"


def parse_tuning(text: str) -> dict[str, float]:
    """`READ_AHEAD=4,IN_FLIGHT_PER_ACTOR=3` as {name: value}, names of `TUNABLE` only."""
    tuning = {}
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name not in TUNABLE:
            raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(TUNABLE)}")
        tuning[name] = float(value)
    return tuning


def report_memory(results: list[dict]) -> list[str]:
    """Markdown: the driver's RSS before `RayExecutor.run` and at its peak, per run."""
    lines = [
        "| run | actors | images | masks | driver RSS before run (MiB) | driver peak RSS (MiB) | growth (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    return lines + [
        f"| {r['label']} | {r['actors']} | {r['images']} | {r['masks']} | {r['rss_before'] / MIB:.0f} | "
        f"{r['rss_peak'] / MIB:.0f} | {(r['rss_peak'] - r['rss_before']) / MIB:.0f} |"
        for r in results
    ]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tile-seconds", type=float, default=0.2, help="the stand-in engine's time per tile (s)")
    parser.add_argument("--read-latency-s", type=float, default=0.1, help="the store's latency per range request (s)")
    parser.add_argument("--scenes", type=int, default=8, help="scenes of the throughput runs")
    parser.add_argument("--scene-side", type=int, default=4096, help="px a side of each scene")
    parser.add_argument("--masks-per-tile", type=int, default=60)
    parser.add_argument("--actors", type=int, nargs="*", default=[1, 2, 4])
    parser.add_argument("--cpus", type=int, default=8, help="CPUs the local Ray declares")
    parser.add_argument(
        "--variant",
        type=parse_tuning,
        action="append",
        default=[],
        help="NAME=VALUE[,NAME=VALUE]: also run every actor count with these jobs.ray_pipeline "
        f"constants ({', '.join(TUNABLE)}), interleaved with the runs as committed",
    )
    parser.add_argument(
        "--memory-images",
        type=int,
        nargs="*",
        default=[100, 1000],
        help="image counts of the memory runs (60 masks each)",
    )
    parser.add_argument(
        "--memory-masks",
        type=int,
        nargs="*",
        default=[10, 10_000],
        help="masks per image of the memory runs (over --memory-mask-images images)",
    )
    parser.add_argument("--memory-mask-images", type=int, default=8)
    parser.add_argument("--memory-tile-seconds", type=float, default=0.01)
    parser.add_argument(
        "--work", type=Path, default=None, help="folder for inputs and outputs (default: a temporary one)"
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(run_one(RunConfig(**json.loads(args.one)))))
        return
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as temporary:
        work = args.work or Path(temporary)
        print(
            f"date (UTC): {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}; "
            f"load average at start: {os.getloadavg()[0]:.2f}; command: benchmarks/pipeline.py {' '.join(argv)}\n"
        )
        report(args, work)
        print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


def report(args: argparse.Namespace, work: Path) -> None:
    """Write the inputs under `work`, run every configuration, print the report."""
    register_latency_store()
    scenes = write_scenes(work / "scenes", args.scenes, args.scene_side, georeferenced=True)
    cpu = cpu_per_tile(scenes, work / "scenes", args.masks_per_tile)
    print(
        f"CPU seconds per tile, in one process, no latency ({cpu['tiles']} tiles a scene, "
        f"{cpu['masks_kept']} masks kept of {cpu['tiles'] * args.masks_per_tile}):\n"
    )
    print(
        "| open | read | finish: merge | finish: records | commit | sum |\n| ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    stages = [cpu[k] for k in ("open", "read", "merge", "records", "commit")]
    print("| " + " | ".join(f"{s:.3f}" for s in stages) + f" | {sum(stages):.3f} |\n", flush=True)

    def config(
        label: str,
        folder: str,
        uris: list[str],
        actors: int,
        tile_s: float,
        masks: int,
        latency_s: float,
        shard_size: int,
        tuning: dict[str, float] | None = None,
    ) -> RunConfig:
        return RunConfig(
            label, str(work / folder), uris, actors, args.cpus, tile_s, masks, latency_s, shard_size, tuning or {}
        )

    runs = [
        run_in_driver(
            config(
                f"{n} actors" + (f", {tuning_label(tuning)}" if tuning else ""),
                f"throughput-{n}-{v}",
                scenes,
                n,
                args.tile_seconds,
                args.masks_per_tile,
                args.read_latency_s,
                DEFAULT_SHARD_SIZE,
                tuning,
            )
        )
        for n in args.actors
        for v, tuning in enumerate([{}, *args.variant])
    ]
    runs.sort(key=lambda r: (tuning_label(r["tuning"]) != "as committed", tuning_label(r["tuning"]), r["actors"]))
    print(
        f"Throughput: {args.scenes} scenes of {args.scene_side}² px, {args.tile_seconds * 1000:.0f} ms a tile, "
        f"{args.read_latency_s * 1000:.0f} ms a range request, {args.cpus} CPUs declared:\n"
    )
    print("\n".join(report_throughput(runs, args.tile_seconds)) + "\n", flush=True)
    if not args.memory_images and not args.memory_masks:
        print("\n".join(report_memory(runs)))
        return
    small = write_scenes(
        work / "small", max([*args.memory_images, args.memory_mask_images]), SMALL_SIDE, georeferenced=False
    )
    memory = [
        run_in_driver(
            config(
                f"{count} images",
                f"images-{count}",
                small[:count],
                MEMORY_ACTORS,
                args.memory_tile_seconds,
                args.masks_per_tile,
                0.0,
                DEFAULT_SHARD_SIZE,
            )
        )
        for count in args.memory_images
    ] + [
        run_in_driver(
            config(
                f"{masks} masks an image",
                f"masks-{masks}",
                small[: args.memory_mask_images],
                MEMORY_ACTORS,
                args.memory_tile_seconds,
                masks,
                0.0,
                MASKS_SHARD_SIZE,
            )
        )
        for masks in args.memory_masks
    ]
    print(
        f"Driver memory ({SMALL_SIDE}² images, one tile each, {args.memory_tile_seconds * 1000:.0f} ms a tile, "
        "no latency; the throughput runs first):\n"
    )
    print("\n".join(report_memory(runs + memory)))


if __name__ == "__main__":
    main(sys.argv[1:])
